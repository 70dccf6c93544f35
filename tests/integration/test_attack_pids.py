"""Signals to the wrong process: a lease names its holder by pid, and pids are reused (pid_max is 32768 by
default). After a broker restart, `revoke --signal` must reach the process that was granted the lease or
nobody: never a root process that took the holder's pid.

The pid reuse is real: the holder's process exits and is reaped, then a root-owned victim is forked with
exactly its pid (testbed.pids: ns_last_pid set to pid - 1 right before the fork, retried until it lands).
The victim records every signal it gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request, request_fds
from xskbroker.testbed.pids import fork_on_with_pipe, on_a_free_pid
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .probe import RootProbe

MiB = 1 << 20
POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [0, {CONSUMER_UID}]
interfaces = ["xsk*"]
max_umem = "64MiB"

[admin]
users = [0]
revoke_signal = "SIGTERM"
"""
RECORDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


# ---- what the unprivileged holder does (run by spawn_unprivileged) -------------------------------------

def _keep_only_sockets() -> None:
    """In a process that outlives its parent: close inherited pipes (the parent's result pipe would
    otherwise stay open and its reader would wait for this process too)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)


def grant_and_hand_off(path: str, iface: str, queue: int, seconds: float) -> dict[str, int | str]:
    """Take a lease, pass its sockets to a child (by fork) and exit: the lease is orphaned, its sockets live."""
    g = request(iface, [queue], socket_path=path)  # no `with`: leaving must not release the lease
    keeper = os.fork()
    if keeper == 0:
        try:
            _keep_only_sockets()
            time.sleep(seconds)
        finally:
            os._exit(0)
    return {"lease": g.lease, "keeper": keeper}


def connect_then_fork(path: str, iface: str, queue: int, seconds: float) -> dict[str, int]:
    """Connect, then leave the connection to a child and exit: the broker's peer pid (SO_PEERCRED) is this
    process's, gone by the time the child asks for a grant (on SIGUSR1, once the test has reused the pid)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before the fork: no signal can be lost
    sender = os.fork()
    if sender == 0:
        try:
            _keep_only_sockets()
            signal.sigwait({signal.SIGUSR1})
            sock.send(proto.encode_request(proto.Grant(interface=iface, queues=(queue,))))
            _, fds, _, _ = socket.recv_fds(sock, 1 << 16, 16)
            assert fds, "no grant"
            time.sleep(seconds)  # holding the sockets
        finally:
            os._exit(0)
    return {"connector": os.getpid(), "sender": sender}


def grant_for_an_exited_holder(path: str, iface: str, queue: int) -> dict[str, str]:
    """Name as holder_pid a child that has exited but is not reaped yet (a zombie: its /proc/<pid>/status
    still reads, with this uid): the state a holder is in just before its pid is freed for reuse."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        while alive(child):
            time.sleep(0.001)
        reply, fds = request_fds(iface, [queue], kind="bound", socket_path=path, holder_pid=child)
        for fd in fds:
            os.close(fd)
        return {"code": "ok", "lease": reply["lease"]}
    except proto.BrokerError as e:
        return {"code": e.code, "message": e.message}
    finally:
        os.waitpid(child, 0)


# ---- the root-owned victim ---------------------------------------------------------------------------------

def _victim(log: int) -> None:
    try:
        for s in RECORDED:
            signal.signal(s, lambda n, _f: os.write(log, bytes([n])))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(RECORDED))
        os.write(log, b"R")
        while True:
            signal.pause()
    finally:
        os._exit(0)


@contextlib.contextmanager
def victim_at(pid: int) -> Iterator[tuple[int, int]]:
    """A root process with exactly this pid (free now): (its pid, the read end of its signal log)."""
    child, r, w = fork_on_with_pipe(pid)
    if child == 0:
        os.close(r)
        _victim(w)
    os.close(w)
    try:
        assert os.read(r, 1) == b"R"  # its handlers are in place
        yield pid, r
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)


def signals_received(log: int) -> list[str]:
    time.sleep(0.3)  # a signal sent is delivered long before this
    got = b""
    while select.select([log], [], [], 0)[0]:
        got += os.read(log, 64)
    return [signal.Signals(n).name for n in got]


def alive(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] not in "ZX"


def _revoke(path: str, iface: str) -> dict:
    with Connection(path) as c:
        reply, _ = c.call(proto.Revoke(interface=iface, queue=0, signal=True))
    return reply


def _revoke_signalling_nobody(path: str, iface: str, probe: RootProbe, log: int, victim: int) -> dict:
    """Revoke queue 0 with --signal: the root process at the holder's pid gets no signal, and the revoke says
    nothing was signalled. Its entry in the reply."""
    reply = _revoke(path, iface)
    probe.run()
    got = signals_received(log)
    assert got == [] and alive(victim), f"the broker signalled root's pid {victim}: {got}"
    (r,) = reply["revoked"]
    assert r["signalled"] is False and "nothing was signalled" in r["not_signalled"], r
    return r


def _records(b: BrokerProcess, event: str) -> list[dict]:
    return [r for r in b.records() if r.get("event") == event]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---- the attacks ------------------------------------------------------------------------------------------

def test_orphaned_lease_after_restart_never_signals_the_process_that_reused_its_pid(veth: VethNamespace,
                                                                                     figures) -> None:
    """The holder hands its sockets to a child and exits; a root process takes its pid; the broker crashes
    and recovers the lease from its journal; the admin revokes it with --signal."""
    def scenario() -> None:
        with BrokerProcess(veth.name, POLICY) as b:
            probe = RootProbe(b.socket_path, veth.inside)
            holder = spawn_unprivileged(grant_and_hand_off, b.socket_path, veth.inside, 0, 60.0, uid=CONSUMER_UID)
            held = holder.result(reap=False)  # the holder has exited; reaped (its pid freed) only right before reuse
            keeper = os.pidfd_open(held["keeper"])
            try:
                wait_for(lambda: _records(b, "lease-orphaned"), what="the broker to see the holder exit")
                b.proc.kill()  # type: ignore[union-attr]
                b.proc.wait()  # type: ignore[union-attr]
                holder.kill()
                with victim_at(holder.pid) as (victim, log):
                    b.start()
                    probe.run()
                    (lease,) = [x for x in _events_status(b) if x["lease"] == held["lease"]]
                    assert lease["pid"] == victim and lease["orphaned"] is True, lease
                    r = _revoke_signalling_nobody(b.socket_path, veth.inside, probe, log, victim)
                assert _records(b, "revoke")[-1]["not_signalled"] == r["not_signalled"]
            finally:
                signal.pidfd_send_signal(keeper, signal.SIGKILL)
                os.close(keeper)
            figures(reused_pid=victim, not_signalled=r["not_signalled"], **probe.figures())

    on_a_free_pid(scenario)


def test_a_grant_asked_after_its_connector_exited_never_signals_the_pids_new_owner(veth: VethNamespace,
                                                                                    figures) -> None:
    """The connection's process (SO_PEERCRED) exits; a root process takes its pid; only then does the
    connection (now in a child) ask for a grant. A start time read from /proc/<pid> at grant time is the
    root process's: after a restart the journal would name root's process as the holder."""
    def scenario() -> None:
        with BrokerProcess(veth.name, POLICY) as b:
            probe = RootProbe(b.socket_path, veth.inside)
            conn = spawn_unprivileged(connect_then_fork, b.socket_path, veth.inside, 0, 60.0, uid=CONSUMER_UID)
            forked = conn.result()
            sender = os.pidfd_open(forked["sender"])
            try:
                with victim_at(forked["connector"]) as (victim, log):
                    signal.pidfd_send_signal(sender, signal.SIGUSR1)  # now ask for the grant
                    wait_for(lambda: [r for r in _records(b, "grant") if r.get("decision") == "allow"],
                             what="the grant")
                    probe.run()
                    b.proc.kill()  # type: ignore[union-attr]
                    b.proc.wait()  # type: ignore[union-attr]
                    b.start()
                    (lease,) = _events_status(b)
                    assert lease["pid"] == victim, lease
                    # the identity journalled for the holder is the connector's (or none), never the victim's: its
                    # start time alone may be the victim's too (both started within one 10 ms clock tick)
                    journalled = _journalled(b, lease["lease"])
                    assert journalled["pid_start"] is None or journalled.get("pid_ino") not in (None, _ino(victim)), \
                        journalled
                    r = _revoke_signalling_nobody(b.socket_path, veth.inside, probe, log, victim)
            finally:
                signal.pidfd_send_signal(sender, signal.SIGKILL)
                os.close(sender)
            figures(reused_pid=victim, not_signalled=r["not_signalled"], **probe.figures())

    on_a_free_pid(scenario)


def _ino(pid: int) -> int:
    """The pidfs inode of the process (Linux 6.9+: one per process for the whole boot)."""
    pidfd = os.pidfd_open(pid)
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def _journalled(b: BrokerProcess, lease_id: str) -> dict:
    with open(os.path.join(b.workdir, "leases.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    return [e["lease"] for e in entries if e.get("lease", {}).get("id") == lease_id][-1]


def _events_status(b: BrokerProcess) -> list[dict]:
    with Connection(b.socket_path) as c:
        return c.call(proto.Status())[0]["leases"]


def test_a_holder_pid_that_has_exited_is_refused(veth: VethNamespace, figures) -> None:
    """holder_pid is pinned by a pidfd before its uid and start time are read: an exited holder (here a
    zombie, whose /proc entry still reads) is refused, never recorded with whatever start time its pid has
    when the lease is written."""
    with BrokerProcess(veth.name, POLICY) as b:
        probe = RootProbe(b.socket_path, veth.inside)
        probe.run()
        got = spawn_unprivileged(grant_for_an_exited_holder, b.socket_path, veth.inside, 0, uid=CONSUMER_UID).result()
        probe.run()
        assert got["code"] == "bad-holder" and "not a running process" in got["message"], got
        assert _events_status(b) == []
        figures(refused=got["message"], **probe.figures())
