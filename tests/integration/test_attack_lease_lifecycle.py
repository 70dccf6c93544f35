"""Lease lifecycle races on the real kernel: a holder's pid reused before the broker read the holder's exit.

The broker's loop handles one round of events at a time. A holder may exit, be reaped, and its pid be taken by
a new process that asks for a grant, all while the loop is busy; the new process's request can then be served
before the old holder's exit event of the same round. Here the loop is held still with SIGSTOP (standing for a
busy round), and the pid is reused for real (testbed.pids: ns_last_pid, retried until it lands). Holders
run as an unprivileged uid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.grant import request_fds
from xskbroker.testbed.pids import fork_on, on_a_free_pid
from xskbroker.testbed.sandbox import BrokerProcess, Child, VethNamespace, drop_privileges, fork_child
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for

POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
kinds = ["bare", "bound", "map"]
max_umem = "16MiB"

[admin]
users = [0]
"""




def hold_until_told(path: str, iface: str, queue: int, kind: str) -> dict[str, str]:
    """Take a lease (this process is its holder), and exit on SIGUSR1: its fds close with it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    reply, _fds = request_fds(iface, [queue], kind=kind, socket_path=path)
    signal.sigwait({signal.SIGUSR1})
    return {"lease": reply["lease"]}


def ask_and_hold(path: str, iface: str, queue: int, kind: str, report: int) -> None:
    """Connect, send a grant, say so (b"S"), wait for the reply, report its lease id, hold the fds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(proto.encode_request(proto.Grant(interface=iface, queues=(queue,), kind=kind)))
    os.write(report, b"S")
    data, _fds, _, _ = socket.recv_fds(sock, 1 << 16, 16)  # held until killed
    reply = json.loads(data)
    os.write(report, (reply.get("lease") or "refused:" + json.dumps(reply)).encode() + b"\n")
    time.sleep(60)  # holding the sockets until killed


@contextlib.contextmanager
def child_at(pid: int, fn, *args: object) -> Iterator[tuple[Child, int]]:  # type: ignore[no-untyped-def]
    """fork_child(fn, *args, report) as CONSUMER_UID with exactly this pid (free now): the child and the read end
    of its report pipe, both gone afterwards (also when the pid was taken and the scenario runs again)."""
    report_r, report_w = os.pipe()
    try:
        child = fork_child(lambda: drop_privileges(CONSUMER_UID), CONSUMER_UID, fn, *args, report_w,
                           fork=lambda: fork_on(pid))
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    try:
        yield child, report_r
    finally:
        child.kill()
        os.close(report_r)


def _leases_without(b: BrokerProcess, lease_id: str) -> dict[str, dict[str, Any]] | None:
    """The broker's leases by id, once lease_id is not among them (None while it is)."""
    now = {x["lease"]: x for x in b.leases()}
    return None if lease_id in now else now


@pytest.mark.parametrize("kind", ["bare", "map"])
def test_a_pid_reused_before_the_old_holders_exit_is_read_keeps_its_own_lease(veth: VethNamespace, kind: str) -> None:
    """Holder A (pid P) exits; before the loop reads A's exit, B takes pid P and is granted a lease. A's exit
    must end A's lease only: B's lease stays B's (neither ended nor orphaned), and B's own exit ends it."""
    def scenario() -> None:
        with BrokerProcess(veth.name, POLICY) as b:
            a = fork_child(lambda: drop_privileges(CONSUMER_UID), CONSUMER_UID, hold_until_told, b.socket_path,
                           veth.inside, 0, kind)
            stopped = False
            other: socket.socket | None = None
            try:
                (held,) = wait_for(lambda: [x for x in b.leases() if x["pid"] == a.pid], what="A's lease")
                b.signal(signal.SIGSTOP)  # the loop is busy: nothing below is read until SIGCONT
                stopped = True
                # a connection queued before A exits (a busy broker has some): the listener is first in the next
                # round
                other = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                other.connect(b.socket_path)
                os.kill(a.pid, signal.SIGUSR1)
                assert a.result(reap=False)["lease"] == held["lease"]  # A has exited, a zombie holding pid P
                a.kill()  # reaped: P is free, right before B is to land on it
                with child_at(a.pid, ask_and_hold, b.socket_path, veth.inside, 1, kind) as (bee, report_r):
                    assert os.read(report_r, 1) == b"S"  # B's request is queued behind A's exit
                    b.signal(signal.SIGCONT)
                    stopped = False
                    got = os.read(report_r, 4096).decode().strip()
                    assert got and not got.startswith("refused"), got
                    # A's exit, read in the same round, ends A's lease (at once, or at the orphan poll if A's socket
                    # was still being released when it was looked at: a loaded machine)
                    leases = wait_for(lambda: _leases_without(b, held["lease"]), timeout=4.0,
                                      what="A's lease to end with A's exit")
                    mine = leases.get(got)
                    assert mine is not None, f"B's live lease ended with A's exit: {b.records('lease-ended')}"
                    assert mine["pid"] == bee.pid and mine["orphaned"] is False, \
                        f"A's exit orphaned B's lease (B, pid {bee.pid}, is alive and holds its sockets): {mine}"
                    bee.kill()
                    ended = wait_for(lambda: [r for r in b.records("lease-ended") if r["lease"] == got], timeout=1.5,
                                     what="B's exit to end B's lease")
                    assert ended[0]["reason"] == "holder exited", ended
            finally:
                if stopped:
                    b.signal(signal.SIGCONT)
                if other is not None:
                    other.close()
                a.kill()
            assert b.proc is not None and b.proc.poll() is None, b.log()

    on_a_free_pid(scenario)


# ---- a named holder that exits while its grant is made -----------------------------------------------------

def grant_for(path: str, iface: str, queue: int, holder: int) -> str:
    """A launcher: ask for a bound grant held by another process of its own (holder_pid), then close the fds."""
    reply, fds = request_fds(iface, [queue], kind="bound", socket_path=path, holder_pid=holder)
    for fd in fds:
        os.close(fd)
    return str(reply["lease"])


def test_a_named_holder_whose_pid_is_reused_mid_grant_does_not_leave_its_lease_on_the_new_process(
        veth: VethNamespace) -> None:
    """A launcher names holder H (pid P) for a bound grant; while the grant binds, H exits and D takes pid P and a
    lease of its own. H's lease must not be tied to D's watch: it ends once its sockets are closed, not when D
    exits (until then its queue and UMEM counted against the quota, a lease without a socket)."""
    def scenario() -> None:
        gate = tempfile.mkdtemp(prefix="gate-") + "/release"
        with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"before-bind:hold={gate}"}) as b:
            holder = fork_child(lambda: drop_privileges(CONSUMER_UID), CONSUMER_UID, time.sleep, 60)
            Path(gate + ".armed").touch()
            launcher = fork_child(lambda: drop_privileges(CONSUMER_UID), CONSUMER_UID, grant_for, b.socket_path,
                                  veth.inside, 0, holder.pid)
            try:
                wait_for(lambda: os.path.exists(gate + ".held"), what="the grant inside its bind")
                holder.kill()  # H exits and is reaped: pid P is free
                with child_at(holder.pid, ask_and_hold, b.socket_path, veth.inside, 1, "bare") as (dee, report_r):
                    assert os.read(report_r, 1) == b"S"
                    theirs = os.read(report_r, 4096).decode().strip()
                    assert theirs and not theirs.startswith("refused"), theirs
                    Path(gate).touch()  # the launcher's grant goes on, for H, which is gone
                    named = launcher.result()  # and the launcher has closed its fds
                    try:
                        wait_for(lambda: [r for r in b.records("lease-ended") if r["lease"] == named], timeout=4.0)
                    except AssertionError:
                        raise AssertionError(f"H's lease lives on (H is gone, its sockets closed; D, pid {dee.pid}, "
                                             f"lives): {[x for x in b.leases() if x['lease'] == named]}") from None
                    (mine,) = [x for x in b.leases() if x["lease"] == theirs]
                    assert mine["pid"] == dee.pid and mine["orphaned"] is False, mine
            finally:
                Path(gate).touch()
                launcher.kill()
                holder.kill()
                shutil.rmtree(os.path.dirname(gate), ignore_errors=True)
            assert b.proc is not None and b.proc.poll() is None, b.log()

    on_a_free_pid(scenario)
