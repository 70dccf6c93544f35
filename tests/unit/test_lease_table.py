"""LeaseTable on its own: the in-memory index, the JSON-lines journal, compaction and what a restart reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xskbroker.broker import leases as leases_mod
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.leases import STATE_VERSION, LeaseTable


def table(path: Path | None) -> LeaseTable:
    return LeaseTable(str(path) if path else None)


def add(t: LeaseTable, pid: int = 10, ifindex: int = 7, queues: tuple[int, ...] = (0,), kind: str = "bound") -> Lease:
    return t.add(1000, pid, ifindex, "veth0", queues, kind, 1 << 20, (1000,), ("xsk",), pid_start=55, pid_ino=9)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_index_by_id_slot_pid_and_interface() -> None:
    t = table(None)
    a = add(t, pid=10, queues=(0, 1))
    b = add(t, pid=11, ifindex=8, queues=(0,))
    assert len(t) == 2 and t.get(a.id) is a and t.holder(7, 1) is a and t.holder(8, 0) is b
    assert t.of_pid(10) == [a] and t.on_interface(8) == [b] and t.holder(7, 2) is None
    assert t.remove(a.id) is a and t.holder(7, 0) is None and t.remove(a.id) is None
    assert list(t) == [b]


def test_the_quota_holdings_holders_and_bare_leases_follow_every_add_and_end() -> None:
    """Kept with the table (a grant judges quotas over them all): they must match the leases at every step."""
    t = table(None)
    a = add(t, pid=10, queues=(0, 1))
    b = add(t, pid=10, ifindex=8, queues=(0,), kind="bare")
    c = add(t, pid=11, ifindex=9)
    held = sorted((h.uid, h.queues, h.umem, tuple(sorted(h.gids)), tuple(sorted(h.groups))) for h in t.holdings())
    assert held == [(1000, 1, 1 << 20, (1000,), ("xsk",))] * 2 + [(1000, 2, 1 << 20, (1000,), ("xsk",))]
    assert t.holds(10) and t.holds(11) and not t.holds(12) and t.has_bare()
    b.revoked = True
    assert not t.has_bare()  # a revoked bare lease is not watched for squatting any more
    b.revoked = False
    t.remove(b.id)
    assert t.holds(10) and not t.has_bare() and len(list(t.holdings())) == 2
    add(t, pid=12, queues=(1,))  # takes a's slot 1: a ends
    assert not t.holds(10) and t.holds(12) and t.get(a.id) is None
    t.remove(c.id)
    assert not t.holds(11) and [h.queues for h in t.holdings()] == [1]
    t.adopt(Lease("x" * 16, 1001, 13, 7, "veth0", (5,), "bare", 4096))  # a recovered lease is counted too
    assert t.holds(13) and t.has_bare() and sorted(h.uid for h in t.holdings()) == [1000, 1001]


def test_a_fresh_grant_on_a_slot_ends_the_lease_that_held_it() -> None:
    t = table(None)
    ended: list[str] = []
    t.on_end = lambda lease: ended.append(lease.id)
    old = add(t, queues=(0, 1))
    new = add(t, pid=11, queues=(1,))
    assert ended == [old.id] and t.holder(7, 1) is new and t.holder(7, 0) is None


def test_every_end_goes_through_on_end() -> None:
    t = table(None)
    ended: list[Lease] = []
    t.on_end = ended.append
    a = add(t)
    t.remove(a.id)
    t.remove(a.id)
    assert ended == [a]


def test_the_journal_starts_compacted_then_appends_one_line_per_change(tmp_path: Path) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a = add(t)
    assert lines(path) == [{"version": STATE_VERSION}, {"lease": a.record()}]
    a.revoked = True
    t.record(a)
    t.remove(a.id)
    assert lines(path)[2:] == [{"lease": a.record()}, {"end": a.id}]
    assert (path.stat().st_mode & 0o777) == 0o600
    t.close()


def test_a_restart_reads_the_last_state_of_each_lease_in_order(tmp_path: Path) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a, b, c = add(t, queues=(0,)), add(t, queues=(1,)), add(t, queues=(2,))
    b.orphaned = True
    t.record(b)
    t.remove(a.id)
    t.close()
    loaded = table(path).load()
    assert [x.id for x in loaded] == [b.id, c.id]  # granted order, ended ones gone
    assert loaded[0].orphaned and loaded[0] == b and loaded[1] == c
    assert loaded[0].queues == (1,) and loaded[0].gids == (1000,) and loaded[0].groups == ("xsk",)


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a = add(t)
    t.close()
    with open(path, "a") as f:
        f.write('{"lease":{"id":"torn","uid":')  # the crash came mid-write
    assert [x.id for x in table(path).load()] == [a.id]


def test_unreadable_lines_in_the_middle_are_skipped_too(tmp_path: Path) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a = add(t)
    t.close()
    with open(path, "a") as f:
        f.write('{"lease":{"id":"x"}}\n[1,2]\n{"other":1}\n')
    b_rec = dict(a.record(), id="b" * 16)
    with open(path, "a") as f:
        f.write(json.dumps({"lease": b_rec}) + "\n")
    assert [x.id for x in table(path).load()] == [a.id, "b" * 16]


@pytest.mark.parametrize("header", ['{"version": 2}', "{}", "not json", ""])
def test_another_version_or_no_header_is_not_believed(tmp_path: Path, header: str) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a = add(t)
    t.close()
    body = path.read_text().splitlines()[1:]
    path.write_text("\n".join([header, *body]) + "\n")
    path.chmod(0o600)
    assert table(path).load() == []
    assert a.id in path.read_text()


def test_no_journal_or_no_state_file(tmp_path: Path) -> None:
    assert table(tmp_path / "missing.jsonl").load() == []
    assert table(None).load() == []


def test_a_planted_link_is_not_read(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    t = table(real)
    add(t)
    t.close()
    link = tmp_path / "leases.jsonl"
    link.symlink_to(real)
    assert table(link).load() == []


def test_compaction_keeps_the_current_leases_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    keep = add(t, queues=(0,))
    for _ in range(600):  # grant and release: 1200 lines, past the 1000 + 4 per lease threshold
        t.remove(add(t, queues=(1,)).id)
        t.compact_if_due()  # what the server does after each round of requests
    assert len(lines(path)) < 1000
    state = table(path).load()
    assert [x.id for x in state] == [keep.id]
    t.compact()
    assert lines(path) == [{"version": STATE_VERSION}, {"lease": keep.record()}]
    assert not (tmp_path / "leases.jsonl.tmp").exists()
    t.close()


def test_a_grant_never_compacts_the_journal_and_a_failed_compaction_waits_1000_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting every lease cost the grant that crossed the bound ~2 ms: appends only append, the server's
    compact_if_due (between rounds) compacts; one that fails is not retried on every round."""
    path = tmp_path / "leases.jsonl"
    t = table(path)
    add(t, queues=(0,))
    for _ in range(600):
        t.remove(add(t, queues=(1,)).id)
    assert len(lines(path)) == 2 + 1200  # header and first lease, then every change: nothing compacted
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(t, "compact", broken)
    with pytest.raises(OSError):
        t.compact_if_due()
    t.compact_if_due()  # not again at once
    for _ in range(400):
        t.remove(add(t, queues=(1,)).id)
    t.compact_if_due()
    assert len(calls) == 1  # 800 lines later: still waiting
    for _ in range(110):  # past 1000 lines after the failure
        t.remove(add(t, queues=(1,)).id)
    with pytest.raises(OSError):
        t.compact_if_due()
    assert len(calls) == 2
    monkeypatch.undo()
    t.compact_if_due()
    assert len(calls) == 2 and len(lines(path)) > 2000  # deferred again by the second failure
    for _ in range(505):
        t.remove(add(t, queues=(1,)).id)
    t.compact_if_due()
    assert len(lines(path)) == 2  # compacted: the header and the one lease
    t.close()


def test_recovery_adopts_without_journalling_until_compacted(tmp_path: Path) -> None:
    path = tmp_path / "leases.jsonl"
    t = table(path)
    a, b = add(t, queues=(0,)), add(t, queues=(1,))
    t.close()
    second = table(path)
    for lease in second.load():
        if lease.id == a.id:
            second.adopt(lease)
    assert second.holder(7, 0) is not None and second.holder(7, 1) is None and len(second) == 1
    second.compact()  # what the service does after recovery: the dropped lease leaves the journal
    assert [x["lease"]["id"] for x in lines(path)[1:]] == [a.id]
    assert b.id not in path.read_text()
    second.close()


def test_the_record_round_trips(tmp_path: Path) -> None:
    t = table(None)
    a = add(t, kind="map", queues=(0, 1, 2))
    a.map_id, a.misbound = 42, 3
    assert Lease.from_record(json.loads(json.dumps(a.record()))) == a
    a.memlock = (8 << 20, 8 << 20, 32 << 20, 32 << 20)
    assert Lease.from_record(json.loads(json.dumps(a.record()))) == a
    assert leases_mod.STATE_VERSION == 1
    with pytest.raises(ValueError, match="memlock"):  # a line the journal's reader then skips, never half-believes
        Lease.from_record({**a.record(), "memlock": [1, 2]})


def test_a_grant_that_ends_its_slots_old_lease_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ended lease and the new one go out in a single write(2) (the grant path pays one syscall), in
    that order, and a restart reads the new lease alone."""
    path = tmp_path / "leases.jsonl"
    t = table(path)
    old = add(t, pid=10, queues=(0, 1))
    writes: list[bytes] = []
    real = leases_mod.os.write
    monkeypatch.setattr(leases_mod.os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    ended: list[str] = []
    t.on_end = lambda lease: ended.append(lease.id)
    new = add(t, pid=11, queues=(1,))
    assert len(writes) == 1
    assert [json.loads(x) for x in writes[0].decode().splitlines()] == [{"end": old.id}, {"lease": new.record()}]
    assert ended == [old.id] and t.get(old.id) is None
    assert [x.id for x in table(path).load()] == [new.id]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "orphan", "keep", "adopt"]), st.integers(0, 5),
                          st.integers(0, 3), st.integers(0, 3), st.sampled_from(["bound", "bare"])), max_size=40))
def test_every_index_agrees_with_the_leases_after_any_sequence(ops: list[tuple[str, int, int, int, str]]) -> None:
    """By pid, interface and uid (a holder's exit, a grant's look at its interface, a user's status), holders,
    orphaned, released and bare leases, the quota holdings: each must be what a walk of the table would find."""
    t = table(None)
    for op, n, ifindex, queue, kind in ops:
        live = list(t)
        if op == "add":
            t.add(1000 + n % 2, 10 + n, ifindex, "veth0", (queue,), kind, 1 << 20)
        elif op == "adopt":
            if t.holder(ifindex, queue) is None:  # recovery: a journal never has two live leases on a slot
                    t.adopt(Lease(os.urandom(8).hex(), 1000 + n % 2, 10 + n, ifindex, "veth0", (queue,), kind, 4096))
        elif live:
            lease = live[n % len(live)]
            change = {"remove": lambda x: t.remove(x.id), "orphan": t.orphan, "keep": lambda x: t.keep_released(x, 1.0)}
            change[op](lease)
        leases = list(t)
        for pid in range(10, 16):
            # an orphan is held by no pid: its holder has exited
            assert t.of_pid(pid) == [x for x in leases if x.pid == pid and not x.orphaned]
            assert t.holds(pid) == bool(t.of_pid(pid))
        for i in range(4):
            assert t.on_interface(i) == [x for x in leases if x.ifindex == i]
            assert t.count_on(i) == len(t.on_interface(i))
        for uid in (1000, 1001):
            assert t.of_uid(uid) == [x for x in leases if x.uid == uid]
        assert t.holder_count() == len({x.pid for x in leases if not x.orphaned})
        assert sorted(x.id for x in t.orphaned()) == sorted(x.id for x in leases if x.orphaned)
        assert sorted(x.id for x in t.released()) == sorted(x.id for x in leases if x.released_at is not None)
        assert t.has_bare() == any(x.kind == "bare" for x in leases)
        assert sorted((h.uid, h.queues) for h in t.holdings()) == sorted((x.uid, len(x.queues)) for x in leases)
        assert all(t.holder(x.ifindex, q) is x for x in leases for q in x.queues)
