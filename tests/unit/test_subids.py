"""broker.subids: a subordinate uid (/etc/subuid) counts as its owner for per-user shares and quotas; the owner
of a range is read from a root-owned file only; decisions still judge the uid itself."""

from __future__ import annotations

import os
from pathlib import Path

from xskbroker.broker import subids
from xskbroker.broker.admission import admit
from xskbroker.broker.core import quota_peer
from xskbroker.broker.peer import PeerInfo
from xskbroker.policy import parse_policy
from xskbroker.wire.errors import ErrorCode

from .service_rig import ALICE, make_rig
from .test_service_grants import QUOTA


def test_ranges_are_parsed_by_owner_name_or_number_and_bad_lines_skipped() -> None:
    text = "alice:100000:65536\n# a comment\n4200:300000:10\nbob:x:1\nghost:500000:5\ncarol:0:0\n"
    ranges = subids.parse(text, {"alice": 1000, "ghost": None, "carol": 1002})
    assert ranges == [(100000, 165535, 1000), (300000, 300009, 4200)]


def test_owners_come_from_a_root_owned_file_and_follow_its_changes(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("4200:300000:10\n")
    os.chmod(path, 0o644)
    now = [0.0]
    owners = subids.Owners(str(path), clock=lambda: now[0])
    assert [owners.owner(u) for u in (299999, 300000, 300009, 300010, 4200)] == [None, 4200, 4200, None, None]
    path.write_text("4300:300000:10\n")
    assert owners.owner(300001) == 4200  # not looked at again before RECHECK
    now[0] += subids.RECHECK
    assert owners.owner(300001) == 4300
    os.chmod(path, 0o666)  # anyone could make any uid anyone's: not believed
    os.utime(path, ns=(1, 1))
    now[0] += subids.RECHECK
    assert owners.owner(300001) is None
    assert subids.Owners(str(tmp_path / "missing")).owner(300001) is None


def _sub(uid: int, owner: int | None = 4200) -> PeerInfo:
    return PeerInfo(pid=uid, uid=uid, gid=uid, gids=frozenset({uid}), owner=owner)


def test_subordinate_uids_share_their_owners_place_in_the_connection_table() -> None:
    policy = parse_policy('version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n')
    table = [_sub(300000 + k) for k in range(15)]  # capacity 16 keeps 1 for admins: one user's 15 uids fill it
    # another user is not "as big as any other" (every uid holding one): the owner's 15 make room
    assert admit(policy, _sub(1001, None), table, max_connections=16) == (None, "", 4200)
    full = admit(policy, _sub(300099), [*table[:14], _sub(1001, None)], max_connections=16)
    assert full == (None, "", None) or full.code is ErrorCode.TOO_MANY_CONNECTIONS


def test_per_user_quotas_count_subordinate_uids_as_their_owner_decisions_do_not() -> None:
    peer = _sub(300001)
    assert quota_peer(peer).uid == 4200 and peer.principal == 4200 and peer.as_dict()["owner"] == 4200
    assert quota_peer(_sub(300001, owner=0)).user == "root"  # a quota naming the owner by name applies too
    r = make_rig(policy=parse_policy(QUOTA.replace('users = ["alice"]', 'users = ["alice", 300001, 300002]')))
    one = PeerInfo(pid=ALICE.pid, uid=300001, gid=1, gids=frozenset({1}), start=ALICE.start, owner=4200)
    two = PeerInfo(pid=ALICE.pid, uid=300002, gid=1, gids=frozenset({1}), start=ALICE.start, owner=4200)
    assert r.grant(peer=one, queues=(0, 1))[0]["ok"]
    reply, _ = r.grant(peer=two, queues=(2,))  # the owner's 2 queues are taken: before, uid 300002 had its own 2
    assert not reply["ok"] and reply["error"]["code"] == "quota-queues", reply
    r.service.close()


def test_a_file_made_safe_again_by_chmod_alone_is_believed(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("4200:300000:10\n")
    os.chmod(path, 0o666)
    now = [0.0]
    owners = subids.Owners(str(path), clock=lambda: now[0])
    assert owners.owner(300001) is None  # anyone may write it: not believed
    os.chmod(path, 0o644)  # the fix: its content, size and mtime stay as they were
    now[0] += subids.RECHECK
    assert owners.owner(300001) == 4200
