"""Release and keep, attacked: a lease released with its sockets open stays on its holder's quota until they
close (broker.lifecycle); these are the ways around that, into a lease that never ends, or into a wait that costs
the loop more the more leases others hold."""

from __future__ import annotations

from xskbroker.broker.service import Deferred
from xskbroker.policy import Policy, parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, POLICY, ROOT, SMALL, Rig, finish, make_rig, opcodes


def _quota(queues: int) -> Policy:
    """The rig's policy with a quota of `queues` queues for every user."""
    return parse_policy(POLICY + f'[[quota]]\nname = "per-user"\nusers = ["*"]\nmax_queues = {queues}\n')


def _kept(rig: Rig, queues: tuple[int, ...] = (0,)) -> tuple[str, list[int]]:
    """A lease granted, released with its sockets still open, and kept released (its settle look done)."""
    reply, out = rig.grant(queues=queues)
    assert reply["ok"], reply
    done, _ = rig.reply(ALICE, proto.Release(reply["lease"]))
    assert done["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.released_at is not None
    return reply["lease"], list(out.fds)


def _alice_queues(rig: Rig) -> int:
    return sum(len(x.queues) for x in rig.service.leases if x.uid == ALICE.uid)


def test_a_grant_waiting_for_a_released_leases_queue_counts_against_the_quota() -> None:
    """A grant of a released lease's queue waits (up to 1 s) for its socket to close. Its quota was judged
    before the wait; another grant made meanwhile must not be judged as if the waiting one held nothing, else
    the two together exceed the quota (3 queues: 1 released + 2 waiting; 2 more granted meanwhile: 4 held)."""
    rig = make_rig(policy=_quota(3))
    _, fds = _kept(rig)  # charged 1
    waiting = rig.ask(ALICE, proto.Grant("veth0", (0, 1), geometry=SMALL))  # 1 + 2 <= 3: waits for queue 0
    assert isinstance(waiting, Deferred) and waiting.step() is None
    # 1 + 2 <= 3 if the waiting grant counts for nothing (over it, it waits 0.1 s for releases to settle)
    meanwhile = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (2, 3), geometry=SMALL)), steps=200)
    rig.kernel.holder_closes(fds)  # the released lease's socket closes: the waiting grant is made
    last = finish(rig, waiting)
    made = int(meanwhile["ok"]) + int(last["ok"])
    assert made <= 1 and _alice_queues(rig) <= 3, (meanwhile, last, _alice_queues(rig))
    rig.service.close()


def test_a_bare_lease_its_holder_got_revoked_by_misbinding_stays_charged_after_release() -> None:
    """A revoked lease released with its sockets kept ends at the release, on the grounds that revoke is an
    admin's act. But a bare holder revokes its own lease at will: it binds its socket to a queue it was not
    granted, and the broker revokes it (bare-misbound). Released then, the lease ended while that socket stays
    bound to the queue, and the quota no longer counted it: under max_queues = 2 the holder held 3 queues."""
    rig = make_rig(policy=_quota(2))
    reply, out = rig.grant(queues=(0,), kind="bare")
    assert reply["ok"], reply
    rig.misbind(out.fds[0], 3)  # its holder binds it to queue 3, granted queue 0
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.revoked and lease.misbound == 3
    done, _ = rig.reply(ALICE, proto.Release(reply["lease"]))  # its socket still open, bound to queue 3
    assert done["ok"]
    more = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (1, 2), geometry=SMALL)), steps=200)
    held = _alice_queues(rig) + 1  # the socket kept bound to queue 3
    assert held <= 2 or not more["ok"], (held, more)
    rig.service.close()


def test_a_released_misbound_lease_ends_once_its_socket_is_closed() -> None:
    """Kept on its quota while its socket stays bound off its queue, it ends when the kernel says the queue is
    free (the 2 s poll), as any released lease does once its sockets close."""
    rig = make_rig(policy=_quota(2))
    reply, out = rig.grant(queues=(0,), kind="bare")
    rig.misbind(out.fds[0], 3)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    kept = rig.service.leases.get(reply["lease"])
    assert kept is not None and kept.released_at is not None and rig.events("release-kept")
    rig.kernel.holder_closes(out.fds)
    rig.kernel.bound_elsewhere.discard(3)
    rig.service.check_orphans()
    assert rig.service.leases.get(reply["lease"]) is None
    assert rig.events("lease-ended")[-1]["reason"] == "its sockets were closed after its release"
    rig.service.close()


def test_a_released_lease_revoked_while_kept_ends_at_the_next_look(rig: Rig) -> None:
    """An admin's revoke empties a kept lease's slots: they say nothing about its sockets any more, and a revoked
    lease's release ends it; one released before the revoke must not stay on its quota until its holder exits."""
    lease, fds = _kept(rig)
    revoked, _ = rig.reply(ROOT, proto.Revoke(lease))
    assert revoked["ok"], revoked
    rig.kernel.holder_closes(fds)
    rig.service.check_orphans()
    assert rig.service.leases.get(lease) is None


def test_a_release_the_broker_stopped_before_settling_is_not_recovered_as_a_live_lease(tmp_path) -> None:
    """The client was told its release was done; the broker stopped (a restart) within the few milliseconds the
    lease waited for its settling look. The journal never heard of the release, so the next broker took the lease
    back as a live one: not listed released, and, its holder alive, never ended when its sockets close (only
    released and orphaned leases are looked at), so it stays on its quota until the holder exits."""
    first = make_rig(tmp_path)
    reply, out = first.grant(queues=(0,))
    assert first.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert reply["lease"] in first.service.leases.settling
    first.service.close()
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    second.kernel.holder_closes(out.fds)
    second.service.check_orphans()
    assert second.service.leases.get(reply["lease"]) is None, second.service.leases.get(reply["lease"])
    second.service.close()


def _step_work(others: int) -> int:
    """The work of one step of a grant over quota waiting for a release to settle, with `others` leases of other
    users (and their own quota) in the table."""
    rig = make_rig(policy=_quota(1))
    for i in range(others):
        rig.service.leases.add(5000 + i, 50000 + i, 100 + i, f"x{i}", (0,), "bound", 1 << 20, (5000 + i,))
    reply, _ = rig.grant(queues=(0,))
    assert reply["ok"], reply
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]  # its socket still in the slot: settling
    waiting = rig.ask(ALICE, proto.Grant("veth0", (1,), geometry=SMALL))
    assert isinstance(waiting, Deferred) and waiting.step() is None  # over quota, waits for the release
    work = opcodes(waiting.step)
    rig.service.close()
    return work


def test_a_grant_waiting_for_a_release_to_settle_does_not_walk_every_lease_at_each_step() -> None:
    """Each step of such a wait (every 2 ms, up to 0.1 s; any user may cause one, and many at once) judged the
    quotas and looked for released leases by walking every lease in the table: with 5,000 leases of others, a
    step took 1.1 ms (20 us with none), so a few waits kept the loop busy. The leases of users the quota does not
    count, and that were not released, are not looked at now."""
    alone, crowded = _step_work(0), _step_work(3000)
    assert crowded < alone + 200, (alone, crowded)


def test_a_released_misbound_lease_stays_charged_when_its_holder_takes_a_bare_grant_of_that_queue() -> None:
    """A released misbound lease stays charged while the kernel says its queue is bound, unless another lease
    holds that queue's slot ("granted since: the kernel freed the queue for it"). A bare grant's slot proves no
    such thing: it is granted with the queue still bound (its holder binds later). The holder takes a bare grant
    of the queue its own socket squats, the released lease ends at the next look, the holder gives the bare
    grant back, and its socket bound to queue 3 is on nobody's quota: under max_queues = 2 it holds 3 queues."""
    rig = make_rig(policy=_quota(2))
    reply, out = rig.grant(queues=(0,), kind="bare")
    assert reply["ok"], reply
    rig.misbind(out.fds[0], 3)  # bound to queue 3, granted queue 0: revoked as misbound
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    assert rig.service.leases.get(reply["lease"]) is not None  # kept: charged while queue 3 is bound
    squat, squat_out = rig.grant(queues=(3,), kind="bare")  # 1 + 1 <= 2; slot 3 is empty
    assert squat["ok"], squat
    rig.service.check_orphans()
    rig.kernel.holder_closes(squat_out.fds)  # the slot socket closed, the lease given back
    assert rig.reply(ALICE, proto.Release(squat["lease"]))[0]["ok"]
    more = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (1, 2), geometry=SMALL)), steps=200)
    held = sum(len(x.queues) for x in rig.service.leases if x.uid == ALICE.uid and x.misbound is None)
    held += 3 in rig.kernel.bound_elsewhere  # the first socket, still bound to queue 3
    assert held <= 2 or not more["ok"], (held, more)
    rig.service.close()


def test_a_released_misbound_lease_ends_once_a_bare_grant_of_its_queue_binds_it() -> None:
    """The other side: a bare socket granted that queue and bound to it proves the kernel freed it."""
    rig = make_rig(policy=_quota(2))
    reply, out = rig.grant(queues=(0,), kind="bare")
    rig.misbind(out.fds[0], 3)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    squat, squat_out = rig.grant(queues=(3,), kind="bare")
    assert squat["ok"], squat
    rig.kernel.holder_closes(out.fds)  # the misbound socket closes; the new one binds queue 3
    rig.kernel.bound_to[squat_out.fds[0]] = 3
    rig.service.check_orphans()
    assert rig.service.leases.get(reply["lease"]) is None
    rig.service.close()


def test_a_released_misbound_lease_stays_charged_when_its_holder_takes_its_granted_queue_again() -> None:
    """A new grant on a lease's slot ends the old lease (LeaseTable.add: the kernel freed the slot, so its
    socket is gone). A revoked lease's slot was emptied by the revoke: it proves nothing, and a misbound socket
    is still bound off that slot. The holder takes its own granted queue again, gives it back, and its socket
    bound to queue 3 is on nobody's quota: under max_queues = 2 it holds 3 queues."""
    rig = make_rig(policy=_quota(2))
    reply, out = rig.grant(queues=(0,), kind="bare")
    rig.misbind(out.fds[0], 3)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    again, again_out = rig.grant(queues=(0,), kind="bare")  # 1 + 1 <= 2; slot 0 emptied by the revoke
    assert again["ok"], again
    rig.kernel.holder_closes(again_out.fds)
    assert rig.reply(ALICE, proto.Release(again["lease"]))[0]["ok"]
    more = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (1, 2), geometry=SMALL)), steps=200)
    held = sum(len(x.queues) for x in rig.service.leases if x.uid == ALICE.uid and x.misbound is None)
    held += 3 in rig.kernel.bound_elsewhere  # the first socket, still bound to queue 3
    assert held <= 2 or not more["ok"], (held, more)
    rig.service.close()


def _misbound_then_restart(tmp_path, release: bool, holder_exits: bool) -> tuple[Rig, str]:
    """A bare lease revoked as misbound (its socket bound to queue 3, granted queue 0; slots emptied by the
    revoke), maybe released and kept, maybe its holder gone with the socket passed on; then the broker restarts."""
    first = make_rig(tmp_path, policy=_quota(2))
    reply, out = first.grant(queues=(0,), kind="bare")
    assert reply["ok"], reply
    first.misbind(out.fds[0], 3)
    lease = first.service.leases.get(reply["lease"])
    assert lease is not None and lease.revoked and lease.misbound == 3
    if release:
        assert first.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
        first.service.settle_releases(first.service.clock() + 1.0)
        kept = first.service.leases.get(reply["lease"])
        assert kept is not None and kept.released_at is not None
    first.service.close()
    kernel = first.kernel
    if holder_exits:
        kernel.procs.pop(ALICE.pid)
        kernel.procs[ALICE.pid + 1] = (1000, 78, None)  # the process it passed the socket on to
    second = make_rig(tmp_path, policy=_quota(2), kernel=kernel)
    second.service.recover()
    return second, reply["lease"]


def test_a_misbound_lease_is_still_charged_after_a_broker_restart(tmp_path) -> None:
    """Recovery dropped a revoked lease whose slots were empty ("none of its queues holds a socket any more"),
    but a misbound lease's slots were emptied by its revoke: its socket lives on, bound to queue 3. After a
    restart the quota no longer counted it, and under max_queues = 2 its holder took 2 more: 3 queues held."""
    for n, (release, exits) in enumerate([(False, False), (True, False), (True, True), (False, True)]):
        (tmp_path / str(n)).mkdir()
        rig, lease_id = _misbound_then_restart(tmp_path / str(n), release, exits)
        kept = rig.service.leases.get(lease_id)
        assert kept is not None, (release, exits, rig.events("lease-dropped"))
        if exits:
            assert kept.orphaned  # polled until the socket closes
        if not exits:
            more = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (1, 2), geometry=SMALL)), steps=200)
            assert not more["ok"], more
        rig.service.close()


def test_a_recovered_misbound_lease_ends_once_its_queue_is_free(tmp_path) -> None:
    """Kept at recovery, released (or orphaned), it ends at the poll that finds its queue unbound."""
    for n, (release, exits) in enumerate([(True, False), (True, True), (False, True)]):
        (tmp_path / str(n)).mkdir()
        rig, lease_id = _misbound_then_restart(tmp_path / str(n), release, exits)
        rig.kernel.bound_elsewhere.discard(3)
        rig.service.check_orphans()
        assert rig.service.leases.get(lease_id) is None, (release, exits)
        rig.service.close()


def test_a_revoked_lease_whose_holder_lives_is_still_charged_after_a_broker_restart(tmp_path) -> None:
    """An admin's revoke empties a lease's slots; the lease lasts until its holder releases or exits, its sockets
    still open (a bound socket still sends). Recovery read the emptied slots as "none of its queues holds a socket
    any more" and dropped it: after a restart its holder took max_queues more while keeping the revoked socket."""
    first = make_rig(tmp_path, policy=_quota(1))
    reply, _ = first.grant(queues=(0,))
    assert reply["ok"], reply
    revoked, _ = first.reply(ROOT, proto.Revoke(reply["lease"]))
    assert revoked["ok"], revoked
    assert not finish(first, first.ask(ALICE, proto.Grant("veth0", (1,), geometry=SMALL)))["ok"]  # charged
    first.service.close()
    second = make_rig(tmp_path, policy=_quota(1), kernel=first.kernel)
    second.service.recover()
    kept = second.service.leases.get(reply["lease"])
    assert kept is not None and kept.revoked, second.events("lease-dropped")
    assert not finish(second, second.ask(ALICE, proto.Grant("veth0", (1,), geometry=SMALL)))["ok"]
    # and it ends as it would have before the restart: when its holder exits
    second.service.holder_exited(ALICE.pid, kept.pid_start, kept.pid_ino)
    assert second.service.leases.get(reply["lease"]) is None
    second.service.close()


def test_a_revoked_lease_whose_holder_is_gone_or_released_is_not_recovered(tmp_path) -> None:
    for n, released in enumerate([False, True]):
        (tmp_path / str(n)).mkdir()
        first = make_rig(tmp_path / str(n))
        reply, _ = first.grant(queues=(0,))
        assert first.reply(ROOT, proto.Revoke(reply["lease"]))[0]["ok"]
        if released:
            assert first.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
            first.service.settle_releases(first.service.clock() + 1.0)
        first.service.close()
        if not released:
            first.kernel.procs.pop(ALICE.pid)
        second = make_rig(tmp_path / str(n), kernel=first.kernel)
        second.service.recover()
        assert second.service.leases.get(reply["lease"]) is None, released
        second.service.close()


def test_a_recovered_misbound_lease_does_not_take_the_slot_index_of_the_lease_granted_that_slot_since(tmp_path) -> None:
    """A misbound lease's revoke emptied its slot (queue 0) and a bound lease was granted it; the table's slot index
    names the new lease. Recovery takes misbound leases back last, and indexed queue 0 as the misbound lease's: once
    that lease ended, queue 0 was indexed as nobody's while the new lease's socket sat in it, so a grant of queue 0
    after that socket closed no longer ended the new lease (two leases charged for one queue)."""
    first = make_rig(tmp_path)
    reply, out = first.grant(queues=(0,), kind="bare")
    first.misbind(out.fds[0], 3)
    again, again_out = first.grant(queues=(0,))
    assert again["ok"], again
    first.service.close()
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    holder = second.service.leases.holder(7, 0)
    assert holder is not None and holder.id == again["lease"], holder
    second.kernel.bound_elsewhere.discard(3)  # the misbound socket closes, and its lease ends
    second.kernel.holder_closes(out.fds)
    assert second.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert second.service.leases.get(reply["lease"]) is None
    second.kernel.holder_closes(again_out.fds)  # the new lease's socket closes; queue 0 is granted again
    third, _ = second.grant(queues=(0,))
    assert third["ok"], third
    assert second.service.leases.get(again["lease"]) is None, "queue 0 charged to two leases"
    second.service.close()


def test_a_misbound_lease_stays_charged_though_a_closed_lease_of_its_own_is_indexed_at_the_squatted_queue() -> None:
    """A released misbound lease ends when a lease "granted since" holds the queue its socket squats, as a bound
    lease there proves the kernel freed the queue. A lease indexed there proves nothing once its own socket has
    closed: the holder takes a bound lease of queue 1, closes its socket (the lease stays while it lives), binds
    its bare socket of queue 0 to queue 1, and releases both leases: its socket bound to queue 1 was on no quota,
    and under max_queues = 2 it was granted 2 more."""
    rig = make_rig(policy=_quota(2))
    first, first_out = rig.grant(queues=(1,))
    assert first["ok"], first
    reply, out = rig.grant(queues=(0,), kind="bare")
    assert reply["ok"], reply
    rig.kernel.holder_closes(first_out.fds)  # queue 1 free; its lease stays (its holder lives)
    rig.misbind(out.fds[0], 1)  # the bare socket of queue 0 binds queue 1: revoked as misbound
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert rig.reply(ALICE, proto.Release(first["lease"]))[0]["ok"]
    rig.service.settle_releases(rig.service.clock() + 1.0)
    more = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (2, 3), geometry=SMALL)), steps=200)
    held = sum(len(x.queues) for x in rig.service.leases if x.uid == ALICE.uid and x.misbound is None)
    held += 1 in rig.kernel.bound_elsewhere  # the bare socket, still bound to queue 1
    assert held <= 2 or not more["ok"], (held, more, rig.events("lease-ended"))
    rig.service.close()
