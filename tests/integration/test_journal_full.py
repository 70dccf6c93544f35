"""The lease journal on a full file system: a grant that cannot be recorded is refused and leaves nothing behind,
and an end the journal cannot take (a release, a holder's exit) still ends the lease. Before, such a grant left a
lease in the table and its sockets open in the broker (the queue held until a restart), and a holder's exit raised
out of the event loop (the broker exited)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xskbroker.broker import xskdiag
from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .consumers import hold_grant

POLICY = f"""version = 1

[[allow]]
name = "consumer"
users = [0, {CONSUMER_UID}]
interfaces = ["xsk0"]
kinds = ["bound"]

[admin]
users = [0]
"""
SMALL = proto.Geometry(umem_size=1 << 20, fill=64, completion=64, rx=64, tx=64)


@contextlib.contextmanager
def _small_tmpfs() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="xskjournal-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "xskbroker-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


def _fill(where: Path) -> Path:
    """Every page of the file system taken (the journal's last one may still have room)."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    return filler


def _leases(path: str) -> list[str]:
    with Connection(path) as c:
        return [x["lease"] for x in c.call(proto.Status())[0]["leases"]]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_full_journal_refuses_grants_cleanly_and_still_ends_leases(veth: VethNamespace, figures) -> None:  # type: ignore[no-untyped-def]
    with _small_tmpfs() as state, BrokerProcess(veth.name, POLICY, extra_args=["--state-dir", str(state)]) as b:
        holder = spawn_unprivileged(hold_grant, b.socket_path, "xsk0", [1], 60.0, uid=CONSUMER_UID)
        wait_for(lambda: len(_leases(b.socket_path)) == 1, what="the holder's lease")
        # one grant and release first: what the broker keeps from then on (the socket it probes map slots with, made
        # at the first release) is in the baseline, which only what a refused grant leaves behind may exceed
        with Connection(b.socket_path) as c:
            reply, fds = c.call(proto.Grant("xsk0", (0,), geometry=SMALL))
            for fd in fds:
                os.close(fd)
            c.call(proto.Release(reply["lease"]))
        wait_for(lambda: len(_leases(b.socket_path)) == 1, what="the first lease ended")
        filler = _fill(state)
        baseline = _fds(b.pid)
        refusal: dict[str, Any] | None = None
        tries = 0
        with Connection(b.socket_path) as c:
            while refusal is None and tries < 200:  # grant and release until the journal's last page is full
                tries += 1
                try:
                    reply, fds = c.call(proto.Grant("xsk0", (0,), geometry=SMALL))
                except proto.BrokerError as e:
                    refusal = e.reply
                    break
                for fd in fds:
                    os.close(fd)
                c.call(proto.Release(reply["lease"]))
            assert refusal is not None, f"no grant refused in {tries} tries"
            error = refusal["error"]
            assert error["code"] == "kernel-error" and error.get("errno") == "ENOSPC", refusal
            assert "lease journal" in error["message"] and "nothing was granted" in error["message"], refusal
            # nothing of it left: no lease, no socket bound, no fd in the broker
            assert len(_leases(b.socket_path)) == 1
            with in_netns(veth.name):
                wait_for(lambda: xskdiag.xsk_queues(ifindex("xsk0")) == {1}, what="only the holder's socket bound")
            wait_for(lambda: _fds(b.pid) <= baseline, what="the broker's fds back to what they were")
            # a holder's exit while the journal is full ends its lease, and the broker lives on
            holder.kill()
            wait_for(lambda: not _leases(b.socket_path), what="the holder's lease ended")
            assert b.proc is not None and b.proc.poll() is None, b.log()[-2000:]
            failed = [r for r in b.records() if r.get("event") == "journal-write-failed"]
            assert len(failed) == 1, failed
            # room again: the journal catches up, and grants are made again
            filler.unlink()
            reply, fds = c.call(proto.Grant("xsk0", (0,), geometry=SMALL))
            for fd in fds:
                os.close(fd)
            c.call(proto.Release(reply["lease"]))
        assert [r for r in b.records() if r.get("event") == "journal-written"]
        journal = (state / "leases.jsonl").read_text()
        figures(tries=tries, journal_lines=len(journal.splitlines()))


def test_a_line_the_full_disk_cuts_short_is_never_appended_after(figures) -> None:  # type: ignore[no-untyped-def]
    """A write that fills the file system's last page returns short, with no error: the grant it recorded was served
    with a torn journal line, and a line written once there was space again was glued to the fragment, so a
    restarted broker lost both leases. Now a short write is refused like a full disk, and the journal is rewritten
    whole before anything else is appended."""
    from xskbroker.broker.leases import LeaseTable

    with _small_tmpfs() as state:
        path = Path(state / "leases.json")
        table = LeaseTable(str(path))
        try:
            table.add(0, 1, 7, "xsk0", (0,), "bound", 1 << 20)
            filler = _fill(state)
            outcome = "none"
            for q in range(1, 200):  # until a line no longer fits the journal's last page
                try:
                    table.add(0, 1, 7, "xsk0", (q,), "bound", 1 << 20)
                except OSError:
                    outcome = "refused"
                    break
                if not path.read_bytes().endswith(b"\n"):
                    outcome = "torn"
                    break
            filler.unlink()  # space again, at once
            table.add(0, 1, 7, "xsk0", (500,), "bound", 1 << 20)
            held = {lease.id for lease in table}
        finally:
            table.close()
        recovered = {lease.id for lease in LeaseTable(str(path)).load()}
        figures(leases=len(held), last_add=outcome)
        assert outcome == "refused" and recovered == held, f"{outcome}; lost at recovery: {sorted(held - recovered)}"
