"""A memlock limit raised for a bare grant is restored when the holder's last lease that needed it ends, by this
broker or, after a restart, by the next one: the raise is journaled with the lease (it was kept only in memory,
so a restarted broker left the holder's limit raised for good)."""

from __future__ import annotations

import json
from pathlib import Path

from xskbroker.wire import protocol as proto

from .service_rig import ALICE, Rig, make_rig

BEFORE = (8 << 20, 8 << 20)


def granted_then_restarted(tmp_path: Path, *memlocks: int) -> tuple[Rig, list[tuple[str, list[int]]]]:
    first = make_rig(tmp_path)
    first.kernel.memlocks[ALICE.pid] = BEFORE
    grants = []
    for q, need in enumerate(memlocks):
        reply, out = first.grant(queues=(q,), kind="bare", memlock=need)
        assert reply["ok"] and reply["memlock"]["raised"]
        grants.append((reply["lease"], out.fds))
    kernel = first.kernel
    first.service.leases.close()  # the broker dies; the holder keeps its sockets and its raised limit
    kernel.open = {fd: what for fd, what in kernel.open.items() if fd in kernel.handed}
    second = make_rig(tmp_path, kernel=kernel)
    return second, grants


def test_the_raise_is_in_the_journal_with_the_lease(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.kernel.memlocks[ALICE.pid] = BEFORE
    reply, _ = rig.grant(kind="bare", memlock=32 << 20)
    lines = [json.loads(x) for x in (tmp_path / "leases.jsonl").read_text().splitlines()]
    assert lines[-1]["lease"]["id"] == reply["lease"]
    assert lines[-1]["lease"]["memlock"] == [*BEFORE, 32 << 20, 32 << 20]
    rig.service.close()


def test_a_restarted_broker_restores_the_limit_when_the_last_lease_that_needed_it_ends(tmp_path: Path) -> None:
    rig, grants = granted_then_restarted(tmp_path, 32 << 20, 48 << 20)
    assert [x.id for x in rig.service.recover()] == [g[0] for g in grants]
    assert rig.kernel.memlocks[ALICE.pid] == (48 << 20, 48 << 20)  # the second grant raised it further
    for lease_id, fds in grants:
        rig.kernel.holder_closes(fds)
        rig.reply(ALICE, proto.Release(lease_id))
    assert rig.kernel.memlocks[ALICE.pid] == BEFORE  # what it was before the first raise
    assert [r["to"] for r in rig.events("memlock-restored")] == [BEFORE[0]]
    rig.service.close()


def test_a_raise_whose_leases_recovery_drops_is_restored_at_recovery(tmp_path: Path) -> None:
    rig, grants = granted_then_restarted(tmp_path, 32 << 20)
    rig.kernel.holder_closes(grants[0][1])  # closed while no broker ran: the lease is dropped
    assert rig.service.recover() == []
    assert rig.kernel.memlocks[ALICE.pid] == BEFORE
    assert len(rig.events("memlock-restored")) == 1
    rig.service.close()


def test_a_limit_changed_by_someone_else_meanwhile_is_theirs_to_keep(tmp_path: Path) -> None:
    rig, grants = granted_then_restarted(tmp_path, 32 << 20)
    rig.kernel.memlocks[ALICE.pid] = (64 << 20, 64 << 20)  # the holder's admin raised it again
    rig.service.recover()
    rig.kernel.holder_closes(grants[0][1])
    rig.reply(ALICE, proto.Release(grants[0][0]))
    assert rig.kernel.memlocks[ALICE.pid] == (64 << 20, 64 << 20)
    assert rig.events("memlock-restored") == []
    rig.service.close()
