"""A broker killed in the middle of a revoke (broker.faults' "mid-revoke" point) must not leave the revoked lease
charged to nobody at the next start: its holder keeps its bound socket (and the UMEM the broker pinned for it).
And a revoked lease that stays (a misbound one) must never empty a slot granted to another lease since."""

from __future__ import annotations

from pathlib import Path

import pytest

from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, BOB, POLICY, ROOT, SMALL, finish, make_rig


class Killed(BaseException):
    """The broker's SIGKILL, as far as the service can tell: nothing after the fault point runs."""


def _killed_at(point: str) -> tuple[list[bool], object]:
    armed = [False]

    def fault(name: str) -> None:
        if armed[0] and name == point:
            raise Killed(name)

    return armed, fault


def test_a_broker_killed_mid_revoke_still_charges_the_revoked_lease_after_restart(tmp_path: Path) -> None:
    """The revoke emptied the lease's slots, then journaled it revoked. Killed between the two, the journal said
    the lease was live while its slots were empty, which recovery reads as "none of its queues holds a socket any
    more" and drops it: its holder, alive with its bound socket on queue 0, was then granted max_queues more."""
    policy = parse_policy(POLICY + '[[quota]]\nname = "per-user"\nusers = ["*"]\nmax_queues = 1\n')
    armed, fault = _killed_at("mid-revoke")
    first = make_rig(tmp_path, policy=policy, fault=fault)  # type: ignore[arg-type]
    reply, _ = first.grant(queues=(0,))
    assert reply["ok"], reply
    armed[0] = True
    with pytest.raises(Killed):
        first.ask(ROOT, proto.Revoke(reply["lease"]))
    first.service.leases.close()  # its journal's fd goes with it, as a killed process's does (nothing more)
    # the broker is gone: nothing of it is closed or settled; the next one starts from its journal and the kernel
    second = make_rig(tmp_path, policy=policy, kernel=first.kernel)
    second.service.recover()
    kept = second.service.leases.get(reply["lease"])
    assert kept is not None, second.events("lease-dropped")
    more = finish(second, second.ask(ALICE, proto.Grant("veth0", (1,), geometry=SMALL)))
    assert not more["ok"], more
    # the revoke is done at the start (its slots empty) and it ends as a revoked lease does: with its holder
    assert kept.revoked and not second.kernel.slot_taken(7, 0)
    second.service.holder_exited(ALICE.pid, kept.pid_start, kept.pid_ino)
    assert second.service.leases.get(reply["lease"]) is None
    second.service.close()


def test_a_broker_killed_mid_revoke_whose_holder_exited_since_leaves_no_socket_in_the_slot(tmp_path: Path) -> None:
    """The other side of journaling the revoke first: killed before the slots were emptied, and the holder gone
    since (its socket passed on), the lease is dropped as a revoked lease of a gone holder is, and its slot is
    emptied as the revoke meant: no socket is left in the map with no lease to account for it."""
    armed, fault = _killed_at("mid-revoke")
    first = make_rig(tmp_path, fault=fault)  # type: ignore[arg-type]
    reply, _ = first.grant(queues=(0,))
    armed[0] = True
    with pytest.raises(Killed):
        first.ask(ROOT, proto.Revoke(reply["lease"]))
    first.service.leases.close()
    first.kernel.procs.pop(ALICE.pid)
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    assert second.service.leases.get(reply["lease"]) is None
    assert not second.kernel.slot_taken(7, 0)
    second.service.close()


def test_a_broker_killed_mid_revoke_of_a_misbound_bare_lease_finishes_it_at_restart(tmp_path: Path) -> None:
    """The broker's own revoke of a bare socket bound off its queue, killed before the slot was emptied: the lease
    is kept (its socket squats queue 3) and its own slot is emptied as the revoke meant, else queue 0 stays taken
    by a socket nobody may be granted it past, until that socket closes."""
    armed, fault = _killed_at("mid-revoke")
    first = make_rig(tmp_path, fault=fault)  # type: ignore[arg-type]
    reply, out = first.grant(queues=(0,), kind="bare")
    assert reply["ok"], reply
    first.kernel.bound_to[out.fds[0]] = 3  # bound to queue 3, granted queue 0
    first.kernel.bound_elsewhere.add(3)
    armed[0] = True
    with pytest.raises(Killed):
        first.service.check_bare()
    first.service.leases.close()
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    kept = second.service.leases.get(reply["lease"])
    assert kept is not None and kept.revoked and kept.misbound == 3, second.events("lease-dropped")
    assert not second.kernel.slot_taken(7, 0)
    second.service.close()


def test_finishing_a_revoke_at_restart_never_empties_a_slot_granted_since(tmp_path: Path) -> None:
    """A misbound lease's revoke emptied queue 0's slot and its lease stays (its socket squats queue 3); queue 0 is
    granted again. At the restart the new lease's socket stays in the slot."""
    first = make_rig(tmp_path)
    reply, out = first.grant(queues=(0,), kind="bare")
    first.misbind(out.fds[0], 3)
    again, _ = first.grant(queues=(0,), kind="bare")
    assert again["ok"], again
    first.service.close()
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    assert second.service.leases.get(reply["lease"]) is not None and second.service.leases.get(again["lease"])
    assert second.kernel.slot_taken(7, 0)
    second.service.close()


def test_a_revoked_lease_of_a_gone_holder_attaches_nothing_at_restart(tmp_path: Path) -> None:
    """Finishing a revoke needs the interface's program; with none attached (detached while the broker was down)
    there is no slot to empty, and the lease is dropped without a program being attached for it."""
    first = make_rig(tmp_path)
    reply, _ = first.grant(queues=(0,))
    assert first.reply(ROOT, proto.Revoke(reply["lease"]))[0]["ok"]
    first.service.close()
    first.kernel.procs.pop(ALICE.pid)
    first.kernel.attached_progs.pop(7)
    second = make_rig(tmp_path, kernel=first.kernel)
    second.service.recover()
    assert second.service.leases.get(reply["lease"]) is None
    assert 7 not in second.kernel.attached_progs and not second.events("xdp-attach")
    second.service.close()


def test_revoking_a_misbound_lease_again_leaves_the_slot_granted_since_alone() -> None:
    """A misbound lease's revoke emptied its slot (queue 0); it stays listed (its socket squats queue 3), and queue 0
    is granted again. An admin revoking it again (with --signal, to make its holder close, as the docs advise; or
    every lease on queue 0) emptied queue 0's slot once more: the new lease's socket, which it never revoked. That
    holder's RX stopped with its lease not marked revoked, and with the slot empty a bare grant of queue 0 ended its
    lease while its bound socket lived on, charged to nobody."""
    rig = make_rig()
    reply, out = rig.grant(queues=(0,), kind="bare")
    rig.misbind(out.fds[0], 3)
    again, _ = rig.grant(queues=(0,))
    assert again["ok"], again
    done, _ = rig.reply(ROOT, proto.Revoke(reply["lease"]))
    assert done["ok"] and done["revoked"][0]["emptied_queues"] == [], done
    assert rig.kernel.slot_taken(7, 0)
    bare, _ = rig.grant(queues=(0,), kind="bare")
    assert not bare["ok"] and rig.service.leases.get(again["lease"]) is not None, bare
    rig.service.close()


def test_a_misbound_holder_releasing_its_lease_cannot_empty_the_slot_of_the_tenant_granted_it_since() -> None:
    """The same without an admin: the misbound lease's holder closes its squatting socket and releases its lease,
    whose end emptied its old slot, queue 0, where another tenant's socket now sits: that tenant's RX stopped, and
    the holder's bare grant of queue 0 then ended the tenant's lease (the slot empty, its socket "gone")."""
    rig = make_rig(policy=parse_policy(POLICY + '[[allow]]\nname = "bob"\nusers = ["bob"]\ninterfaces = ["veth*"]\n'))
    reply, out = rig.grant(queues=(0,), kind="bare")
    rig.misbind(out.fds[0], 3)
    victim, _ = rig.grant(BOB, queues=(0,))
    assert victim["ok"], victim
    rig.kernel.bound_elsewhere.discard(3)
    rig.kernel.holder_closes(out.fds)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert rig.service.leases.get(reply["lease"]) is None
    assert rig.kernel.slot_taken(7, 0), "the other tenant's socket was taken out of its slot"
    bare, _ = rig.grant(queues=(0,), kind="bare")
    assert not bare["ok"] and rig.service.leases.get(victim["lease"]) is not None, bare
    rig.service.close()
