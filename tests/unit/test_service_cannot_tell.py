"""When the broker cannot open a holder's pidfd (out of fds) it cannot tell whether the holder lives: every
caller must take that as "unknown", never as "gone" (which ended or dropped live holders' leases, or raised out
of the orphan poll and the grant). The kernel layer's raising is tested for real in test_holders_out_of_fds."""

from __future__ import annotations

from pathlib import Path

from xskbroker.wire import protocol as proto

from .service_rig import ALICE, Rig, make_rig


def test_a_lease_whose_holder_cannot_be_told_about_at_recovery_is_kept_as_held(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    kept = first.grant(queues=(0,))[0]["lease"]
    kernel = first.kernel
    first.service.leases.close()
    kernel.unknowable.add(ALICE.pid)
    second = make_rig(tmp_path, kernel=kernel)
    recovered = second.service.recover()
    assert [x.id for x in recovered] == [kept]
    assert not recovered[0].orphaned  # not taken for a holder that exited
    assert second.events("lease-dropped") == []
    second.service.close()


def test_the_orphan_poll_keeps_a_bare_lease_whose_holder_cannot_be_told_about(rig: Rig) -> None:
    reply, out = rig.grant(kind="bare")
    rig.kernel.holder_closes(out.fds)
    rig.kernel.unknowable.add(ALICE.pid)
    for _ in range(3):
        rig.service.check_orphans()  # raised out of the poll before
    assert rig.service.leases.get(reply["lease"]) is not None
    rig.kernel.unknowable.clear()
    rig.service.check_orphans()
    rig.service.check_orphans()  # told again: empty at two polls in a row ends it
    assert rig.service.leases.get(reply["lease"]) is None


def test_a_holder_pid_that_cannot_be_pinned_is_refused_with_the_reason(rig: Rig) -> None:
    rig.kernel.procs[6000] = (ALICE.uid, 99, None)
    rig.kernel.unknowable.add(6000)
    reply, out = rig.grant(holder_pid=6000)
    assert not reply["ok"] and reply["error"]["code"] == "kernel-error"
    assert "short of file descriptors" in reply["error"]["message"] and not out.fds
    assert list(rig.service.leases) == []


def test_a_memlock_raise_for_a_holder_that_cannot_be_pinned_is_not_made(rig: Rig) -> None:
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    rig.kernel.unknowable.add(ALICE.pid)
    reply, _ = rig.grant(kind="bare", memlock=32 << 20)
    assert not reply["memlock"]["ok"] and "cannot pin process" in reply["memlock"]["reason"]
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)
    rig.reply(ALICE, proto.Release(reply["lease"]))  # its release looks at no raise
    assert [r for r in rig.records if r["event"].startswith("memlock")] == []
