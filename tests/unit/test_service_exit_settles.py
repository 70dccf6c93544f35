"""A holder that exits while the broker's own copy of its socket is still closing (kept a moment after the
reply, then closed by the closing helper): its lease settles as a release does instead of becoming an orphan at
once. A process started right after (a VM restarted on its queue, within its quota) waits those milliseconds
rather than being refused queue-busy or over quota, as CI saw (test_attack_umem: the second process's grants
refused quota-umem until the orphan poll 50 ms later)."""

from __future__ import annotations

from xskbroker.broker import lifecycle
from xskbroker.broker.service import Deferred
from xskbroker.common.records import replace
from xskbroker.policy import Policy, parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, POLICY, SMALL, finish, make_rig

NEXT = replace(ALICE, pid=ALICE.pid + 1, start=99)  # the same user's next process


def _quota(queues: int) -> Policy:
    return parse_policy(POLICY + f'[[quota]]\nname = "per-user"\nusers = ["*"]\nmax_queues = {queues}\n')


def test_an_exit_while_only_the_brokers_copy_is_open_ends_the_lease_as_an_exit() -> None:
    rig = make_rig()
    reply, out = rig.grant(queues=(0,))
    rig.service.holder_exited(ALICE.pid)  # the slot still holds the socket: the broker's copy is closing
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.id in rig.service.leases.settling
    assert not rig.service.leases.of_pid(ALICE.pid), "held by no pid: one that reuses it is not its holder"
    rig.kernel.holder_closes(out.fds)  # the copy closes: the kernel empties the slot
    assert rig.service.settle_releases(rig.service.clock() + lifecycle.SETTLE_STEP)
    assert len(rig.service.leases) == 0
    assert [e["reason"] for e in rig.events("lease-ended")] == ["holder exited"]
    assert not rig.events("lease-orphaned")
    rig.service.close()


def test_a_grant_of_the_queue_right_after_the_exit_waits_for_the_copy_instead_of_queue_busy() -> None:
    rig = make_rig()
    _, out = rig.grant(queues=(0,))
    rig.service.holder_exited(ALICE.pid)
    again = rig.ask(NEXT, proto.Grant("veth0", (0,), geometry=SMALL))
    assert isinstance(again, Deferred), again  # refused queue-busy before: the orphan's slot looked taken for good
    assert again.step() is None
    rig.kernel.holder_closes(out.fds)
    done = finish(rig, again, steps=200)
    assert done["ok"], done
    assert [x.pid for x in rig.service.leases] == [NEXT.pid]
    assert [e["reason"] for e in rig.events("lease-ended")] == ["holder exited"]
    rig.service.close()


def test_a_grant_within_quota_once_the_exited_holders_lease_ends_waits_instead_of_being_refused() -> None:
    rig = make_rig(policy=_quota(1))
    _, out = rig.grant(queues=(0,))
    rig.service.holder_exited(ALICE.pid)
    again = rig.ask(NEXT, proto.Grant("veth0", (1,), geometry=SMALL))  # 1 + 1 > 1 while the old lease counts
    assert isinstance(again, Deferred), again  # refused quota-queues before, until the orphan poll
    assert again.step() is None
    rig.kernel.holder_closes(out.fds)
    done = finish(rig, again, steps=200)
    assert done["ok"], done
    rig.service.close()


def test_an_exited_holders_sockets_passed_on_still_count_once_it_settles() -> None:
    """The wait is bounded: sockets that live on elsewhere (QEMU got them) keep the lease, as an orphan, on the
    quota, and the waiting grant is refused when its wait ends."""
    rig = make_rig(policy=_quota(1))
    rig.grant(queues=(0,))
    rig.service.holder_exited(ALICE.pid)
    again = finish(rig, rig.ask(NEXT, proto.Grant("veth0", (1,), geometry=SMALL)), steps=500)
    assert not again["ok"] and again["error"]["code"] == "quota-queues", again
    assert rig.events("lease-orphaned") and len(rig.service.leases) == 1
    rig.service.close()
