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


def test_the_servers_tally_judges_as_the_list_of_connected_peers_would() -> None:
    """The server keeps a tally by principal as connections come and go (Connected), so that a newcomer costs the
    number of principals, not of connections: its verdicts are the list's, through adds and removes."""
    from xskbroker.broker.admission import Connected

    peers = [_peer(1001)] * 13 + [_peer(0), _peer(1000), _peer(1002)]  # capacity 16: full
    tally = Connected(peers)
    for newcomer in (1000, 1001, 1002, 1003, 0):
        assert admit(POLICY, _peer(newcomer), tally, 16) == admit(POLICY, _peer(newcomer), peers, 16)
    assert admit(POLICY, _peer(1003), tally, 16) == (None, "", 1001)  # the biggest holder makes room
    for _ in range(3):  # the hog's connections close: the table has room again
        tally.remove(peers.pop(0))
    assert admit(POLICY, _peer(1003), tally, 16) == admit(POLICY, _peer(1003), peers, 16) == (None, "", None)
    tally.remove(_peer(1000))
    tally.remove(_peer(1000))  # one too many (a peer dropped twice) leaves no negative count behind
    assert (1000, 1000, frozenset({1000}), frozenset({"u1000"}), "u1000") not in dict(tally.items())
    tally.add(_peer(1000))
    assert dict(tally.items())[(1000, 1000, frozenset({1000}), frozenset({"u1000"}), "u1000")] == 1
