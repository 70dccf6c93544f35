"""A quota naming a group by name counts the leases of its members. A peer's group names are the ones the policy
in force names (broker.peer.GroupNames): a lease granted before a reload (or a restart) that first named a group
was recorded without it, and the group's quota never counted it."""

from __future__ import annotations

from pathlib import Path

from xskbroker.broker.peer import PeerInfo
from xskbroker.policy import parse_policy
from xskbroker.policy import quota as quotas

from .service_rig import ALICE, BOB, POLICY, make_rig

BOTH = POLICY.replace('users = ["alice"]', 'users = ["alice", "bob"]')
WHEEL = BOTH + """
[[quota]]
name = "wheel"
groups = ["wheel"]
max_queues = 2
"""
WHEEL_GID = 10


def _in_wheel(who: PeerInfo, policy) -> PeerInfo:  # type: ignore[no-untyped-def]
    """who, in group wheel too, identified under policy."""
    gids = who.gids | {WHEEL_GID}
    return PeerInfo(pid=who.pid, uid=who.uid, gid=who.gid, gids=gids, user=who.user, groups=_names(policy)(gids),
                    start=who.start)


def _names(policy):  # type: ignore[no-untyped-def]
    """The server's GroupNames.of for this policy: of the group names it names, those whose gid the peer holds."""
    return lambda gids: frozenset(n for n in policy.group_names if n == "wheel" and WHEEL_GID in gids)


def test_a_group_quota_added_at_a_reload_counts_the_leases_its_members_already_hold() -> None:
    """Alice (in wheel) takes 2 queues; a reload adds a quota of 2 queues for group wheel. Bob (in wheel,
    connected since: his group names include wheel) asked for 2 more and got them: wheel's members held 4.
    Spelled by its gid ("10") the quota counted Alice's lease (its gids are recorded), so refused Bob."""
    old = parse_policy(BOTH)
    rig = make_rig(policy=old)
    rig.service.groups_of = _names(old)  # what the server sets: the names as the policy in force has them
    alice = _in_wheel(ALICE, old)
    assert rig.grant(peer=alice, queues=(0, 1))[0]["ok"]
    new = parse_policy(WHEEL)
    rig.service.groups_of = _names(new)
    rig.service.reload(new)
    bob = _in_wheel(BOB, new)
    reply, _ = rig.grant(peer=bob, queues=(2, 3))
    assert not reply["ok"] and reply["error"]["code"] == "quota-queues", reply
    assert quotas.usage(("group", "wheel"), rig.service.held).queues == 2
    rig.service.close()


def test_a_group_quota_added_across_a_restart_counts_the_recovered_leases(tmp_path: Path) -> None:
    """The same across a restart: the journal recorded the lease's group names as the old policy had them."""
    old = parse_policy(BOTH)
    first = make_rig(tmp_path, policy=old)
    alice = _in_wheel(ALICE, old)
    assert first.grant(peer=alice, queues=(0, 1))[0]["ok"]
    first.service.close()
    new = parse_policy(WHEEL)
    second = make_rig(tmp_path, policy=new, kernel=first.kernel)
    second.service.recover()
    second.service.groups_of = _names(new)  # set by the server, which the daemon makes after recovery
    if hasattr(second.service, "regroup"):  # the server's call once it has set groups_of
        second.service.regroup()
    assert quotas.usage(("group", "wheel"), second.service.held).queues == 2
    second.service.close()


def test_a_connection_open_across_a_reload_is_judged_by_the_groups_the_new_policy_names(tmp_path: Path) -> None:
    """A peer's group names are read when it connects, as the policy then names them. A client connected before a
    reload that added a quota (or a deny rule) naming one of its groups was never judged by it: its groups, as
    the server keeps them for its requests, did not include that name however long it stayed connected."""
    import grp
    import os
    import socket

    from xskbroker.broker.server import Server

    mine = grp.getgrgid(os.getgid()).gr_name  # a group this process is in, by name
    rig = make_rig(policy=parse_policy(POLICY))
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    (tmp_path / "policy.toml").write_text(WHEEL.replace('groups = ["wheel"]', f'groups = ["{mine}"]'))
    server = Server(listener, rig.service, lambda record: None, str(tmp_path / "policy.toml"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    server._accept(listener)
    [(_, before)] = server.conns.values()
    assert mine not in before.groups  # the first policy names no group
    server.reload()
    [(_, after)] = server.conns.values()
    assert mine in after.groups, after
    client.close()
    listener.close()
    rig.service.close()


def test_a_grant_waiting_across_a_reload_is_counted_by_the_groups_the_new_policy_names() -> None:
    """A grant that waits (its binds on a worker, a large pin) while a reload first names a group: its lease was
    recorded with the names its peer had before the reload, and that group's quota never counted it."""
    from xskbroker.broker.service import Deferred
    from xskbroker.wire import protocol as proto

    from .service_rig import SMALL, finish

    old = parse_policy(BOTH)
    rig = make_rig(policy=old)
    rig.service.groups_of = _names(old)
    rig.service.loop_busy = True  # as when other clients' events wait: the grant is not waited for inline
    waiting = rig.ask(_in_wheel(ALICE, old), proto.Grant("veth0", (0, 1), geometry=SMALL))
    assert isinstance(waiting, Deferred)
    new = parse_policy(WHEEL)
    rig.service.groups_of = _names(new)
    rig.service.reload(new)
    rig.service.loop_busy = False
    assert finish(rig, waiting)["ok"]
    assert quotas.usage(("group", "wheel"), rig.service.held).queues == 2
    reply, _ = rig.grant(peer=_in_wheel(BOB, new), queues=(2, 3))
    assert not reply["ok"] and reply["error"]["code"] == "quota-queues", reply
    rig.service.close()
