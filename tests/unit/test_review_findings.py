"""Defects found reviewing 75c6482..195529b: each test fails on the code it was written against."""

from __future__ import annotations

import errno

from .service_rig import ALICE, Rig


def _journal_full(rig: Rig) -> None:
    def full(*entries: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    rig.service.leases._append = full  # type: ignore[method-assign]


def test_a_bare_grant_the_journal_refuses_leaves_the_holders_memlock_as_it_was(rig: Rig) -> None:
    """A grant that fails leaves no trace: _memlock raised the holder's limit before the lease could be
    recorded; the journal refused it, nothing was granted, and the limit stayed raised (and remembered
    with no lease to restore it), for the life of the process."""
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    _journal_full(rig)
    reply, _ = rig.grant(queues=(0,), kind="bare", memlock=32 << 20)
    assert not reply["ok"], reply
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)
    assert not rig.service.raised
