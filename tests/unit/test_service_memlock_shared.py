"""A bare lease whose memlock need was met only by a raise the broker made for an earlier lease of the same process:
that raise is not undone while it lives (its reply said the limit was enough)."""

from __future__ import annotations

from pathlib import Path

from xskbroker.wire import protocol as proto

from .service_rig import ALICE, Rig, make_rig


def test_the_raise_a_later_bare_lease_rests_on_stays_until_that_lease_ends(rig: Rig) -> None:
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    first, first_out = rig.grant(queues=(0,), kind="bare", memlock=32 << 20)
    assert first["ok"] and first["memlock"]["raised"]
    second, second_out = rig.grant(queues=(1,), kind="bare", memlock=32 << 20)
    assert second["ok"] and second["memlock"]["ok"] and not second["memlock"]["raised"]  # the first raise covers it
    rig.kernel.holder_closes(first_out.fds)
    done, _ = rig.reply(ALICE, proto.Release(first["lease"]))
    assert done["ok"] and rig.service.leases.get(second["lease"]) is not None
    assert rig.kernel.memlocks[ALICE.pid][0] >= 32 << 20, "lowered below what the live lease was told it has"
    rig.kernel.holder_closes(second_out.fds)
    rig.reply(ALICE, proto.Release(second["lease"]))
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)  # restored with the last lease that needed it


def test_a_restarted_broker_keeps_the_raise_a_later_bare_lease_rests_on(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    first.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    _, a_out = first.grant(queues=(0,), kind="bare", memlock=32 << 20)
    b, _ = first.grant(queues=(1,), kind="bare", memlock=32 << 20)
    first.kernel.holder_closes(a_out.fds)
    first.service.leases.close()  # the broker dies
    kernel = first.kernel
    second = make_rig(tmp_path, kernel=kernel)
    try:
        kept = [x.id for x in second.service.recover()]
        assert kept == [b["lease"]]
        assert kernel.memlocks[ALICE.pid][0] >= 32 << 20, "lowered below what the live lease was told it has"
    finally:
        second.service.close()


def test_a_bare_lease_granted_the_queue_of_its_own_closed_lease_keeps_the_raise_it_rests_on(rig: Rig) -> None:
    """The grant ends the closed lease that held its slot (LeaseTable.add) before it joins the raise: that lease
    was the raise's last, and the limit was restored under the new lease, whose reply said it was enough."""
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    first, first_out = rig.grant(queues=(0,), kind="bare", memlock=32 << 20)
    assert first["ok"] and first["memlock"]["raised"]
    rig.kernel.holder_closes(first_out.fds)  # the holder closes its socket, and takes the queue again at once
    again, again_out = rig.grant(queues=(0,), kind="bare", memlock=32 << 20)
    assert again["ok"] and again["memlock"]["ok"] and rig.service.leases.get(first["lease"]) is None
    assert rig.kernel.memlocks[ALICE.pid][0] >= 32 << 20, "lowered below what the live lease was told it has"
    rig.kernel.holder_closes(again_out.fds)
    rig.reply(ALICE, proto.Release(again["lease"]))
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)  # restored with the last lease that needed it
