"""broker.admission.admit: a new connection's quota first, then the connection table's fair shares."""

from xskbroker.broker.admission import admit
from xskbroker.broker.peer import PeerInfo
from xskbroker.policy import parse_policy
from xskbroker.wire.errors import ErrorCode

POLICY = parse_policy('version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n'
                      '[[quota]]\nname = "q"\nusers = [1000]\nmax_connections = 2\n')


def _peer(uid: int) -> PeerInfo:
    return PeerInfo(pid=100 + uid, uid=uid, gid=uid, gids=frozenset({uid}), user=f"u{uid}",
                    groups=frozenset({f"u{uid}"}))


def test_a_user_at_its_connection_quota_is_refused_with_the_quota_code() -> None:
    verdict = admit(POLICY, _peer(1000), [_peer(1000), _peer(1000)], max_connections=64)
    assert verdict.code == ErrorCode("quota-connections") and "2" in verdict.reason and verdict.evict_uid is None
    assert admit(POLICY, _peer(1000), [_peer(1000)], max_connections=64) == (None, "", None)


def test_a_full_table_takes_room_from_the_biggest_holder_never_from_root() -> None:
    hog = [_peer(1001)] * 15  # capacity 16 keeps 1 for admins: non-admins share 15, all uid 1001's
    verdict = admit(POLICY, _peer(1002), [*hog, _peer(0)], max_connections=16)
    assert verdict == (None, "", 1001)
    full = admit(POLICY, _peer(1001), [*hog, _peer(0), _peer(1002)], max_connections=16)
    assert full.code is ErrorCode.TOO_MANY_CONNECTIONS and "uid 1001" in full.reason
    # root is an admin by default: the reserve is its own, no connection is taken for it
    assert admit(POLICY, _peer(0), hog, max_connections=16) == (None, "", None)
