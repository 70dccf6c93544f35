"""A memlock raise must reach the process that was judged, and be undone to that process's own limits.

The broker raises RLIMIT_MEMLOCK by pid (prlimit) and remembers the limits it raised from by pid
(`raised`). Pids are reused (pid_max is 32768 by default): the reuse here is real, forced with
testbed.pids as in test_attack_pids.

- A connection whose connector has exited (it left the connection to a child) asks for a bare grant with a
  memlock raise: the connector's pid now names a root process, whose limit must not move.
- A holder's raise is remembered while its lease lives on orphaned (its socket passed to a child); a new
  process with its pid asks for a raise of its own: when its lease ends, its limits must go back to its own,
  never to the limits the earlier process had.

The victims here are root's, as the broker: prlimit on another uid's process needs CAP_SYS_RESOURCE, which
this machine's root may lack; the broker's logic is the same for any uid.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.pids import fork_on_with_pipe, on_a_free_pid
from xskbroker.testbed.sandbox import BrokerProcess, fork_child, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .test_attack_names import BARE_POLICY, bed

KiB, MiB = 1 << 10, 1 << 20


def memlock_of(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max locked memory"))
    soft, hard = line[len("Max locked memory"):].split()[:2]
    return int(soft), int(hard)


def _records(b: BrokerProcess, event: str) -> list[dict]:
    return [r for r in b.records() if r.get("event") == event]


@contextlib.contextmanager
def at_pid(pid: int, body: Any) -> Iterator[tuple[int, int]]:
    """A root child with exactly this pid (free now) that runs body(result_fd) once it knows it has it:
    (its pid, the read end of its result pipe)."""
    child, r, w = fork_on_with_pipe(pid)
    if child == 0:
        try:
            os.close(r)
            body(w)
        finally:
            os._exit(0)
    os.close(w)
    try:
        yield pid, r
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(r)


def _read_result(r: int, timeout: float = 20.0) -> Any:
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([r], [], [], left)[0], "no result from the child"
        chunk = os.read(r, 1 << 16)
        if not chunk:
            return pickle.loads(data)
        data += chunk


# ---- 1: a raise through a connection its connector left -------------------------------------------------

def connect_then_leave(path: str, iface: str, queue: int, needed: int, seconds: float) -> dict[str, int]:
    """Connect (and be identified: a status is answered), leave the connection to a child and exit. The
    child asks for a bare grant with a memlock raise on SIGUSR1, once the test has given this pid to root."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.send(proto.encode_request(proto.Status()))
    sock.recv(1 << 20)  # answered: the broker has read this process's identity
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sender = os.fork()
    if sender == 0:
        try:
            for name in os.listdir("/proc/self/fd"):  # the parent's result pipe must not wait for this one
                with contextlib.suppress(OSError):
                    if int(name) > 2 and int(name) != sock.fileno():
                        os.close(int(name))
            signal.sigwait({signal.SIGUSR1})
            sock.send(proto.encode_request(proto.Grant(interface=iface, queues=(queue,), kind="bare",
                                                       memlock=needed)))
            socket.recv_fds(sock, 1 << 16, 16)
            time.sleep(seconds)
        finally:
            os._exit(0)
    return {"connector": os.getpid(), "sender": sender}


def _sleeping_with_low_memlock(w: int) -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * KiB, 4 * MiB))
    os.write(w, pickle.dumps("ready"))
    os.close(w)
    while True:
        signal.pause()


def test_a_raise_asked_through_a_connection_its_connector_left_never_reaches_the_pids_new_owner() -> None:
    def scenario() -> None:
        with bed(BARE_POLICY) as (ns, b):
            forked = spawn_unprivileged(connect_then_leave, b.socket_path, ns.inside, 0, MiB, 30.0,
                                        uid=CONSUMER_UID).result()
            sender = os.pidfd_open(forked["sender"])
            try:
                with at_pid(forked["connector"], _sleeping_with_low_memlock) as (victim, r):
                    assert _read_result(r) == "ready"
                    before = memlock_of(victim)
                    assert before == (64 * KiB, 4 * MiB)
                    signal.pidfd_send_signal(sender, signal.SIGUSR1)  # now ask for the grant
                    wait_for(lambda: [x for x in _records(b, "grant") if x.get("decision") == "allow"]
                             or [x for x in _records(b, "grant") if x.get("decision") == "deny"], what="the grant")
                    time.sleep(0.2)
                    after = memlock_of(victim)
                    raised = _records(b, "memlock-raised")
                    assert after == before and raised == [], \
                        f"the broker raised root's pid {victim} from {before} to {after}: {raised}"
            finally:
                signal.pidfd_send_signal(sender, signal.SIGKILL)
                os.close(sender)

    on_a_free_pid(scenario)


# ---- 2: a raise remembered by pid outlives its process ---------------------------------------------------

def _grant_bare_and_hand_off(path: str, iface: str, queue: int, limits: tuple[int, int], needed: int,
                             hold: int) -> dict[str, Any]:
    """Under `limits`, take a bare grant needing `needed`, leave its socket to a child that keeps it until
    `hold` (a pipe) closes, and exit: the lease is orphaned and lives on."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, limits)
    c = Connection(path)
    reply, fds = c.call(proto.Grant(iface, (queue,), kind="bare", memlock=needed))
    keeper = os.fork()
    if keeper == 0:
        try:
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):
                    if int(name) > 2 and int(name) not in fds and int(name) != hold:
                        os.close(int(name))
            select.select([hold], [], [])  # until the test closes its end
        finally:
            os._exit(0)
    return {"lease": reply["lease"], "memlock": reply["memlock"], "keeper": keeper, "pid": os.getpid()}


def _second_holder(path: str, iface: str, queue: int, limits: tuple[int, int], needed: int, go: int,
                   theirs: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """Under `limits`, take a bare grant needing `needed`; once `go` (a pipe) closes, close and release it."""
    def body(w: int) -> None:
        for fd in theirs:  # the test's pipe ends: closed there is the go
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, limits)
        with Connection(path) as c:
            reply, fds = c.call(proto.Grant(iface, (queue,), kind="bare", memlock=needed))
            during = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            os.write(w, b"G")
            select.select([go], [], [])
            for fd in fds:
                os.close(fd)
            c.call(proto.Release(reply["lease"]))
        deadline = time.monotonic() + 3.0  # the lease ends at the release or within the next poll
        while resource.getrlimit(resource.RLIMIT_MEMLOCK) == during and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(w, pickle.dumps({"lease": reply["lease"], "memlock": reply["memlock"], "during": during,
                                  "after": resource.getrlimit(resource.RLIMIT_MEMLOCK)}))
        os.close(w)
        while True:  # alive until the test is done with this pid
            signal.pause()
    return body


@pytest.mark.parametrize("first_ends", ["before", "after"])
def test_a_raise_is_undone_to_the_limits_of_the_process_it_raised_never_to_an_earlier_holder_of_its_pid(
        first_ends: str) -> None:
    """first_ends: whether the earlier holder's (orphaned) lease ends before or after the new process's."""
    def scenario() -> None:
        with bed(BARE_POLICY, queues=2) as (ns, b):
            hold_r, hold_w = os.pipe()
            go_r, go_w = os.pipe()
            first = fork_child(lambda: None, 0, _grant_bare_and_hand_off, b.socket_path, ns.inside, 0,
                               (64 * KiB, 4 * MiB), MiB, hold_r)
            # the first holder has exited, its keeper holds the socket; it is reaped only right before its pid is taken
            # again, so that no other process of the suite takes it meanwhile
            got = first.result(reap=False)
            os.close(hold_r)
            # the keeper is not our child (init reaps it) and exits once hold_w closes, long before the finally
            # below: a pidfd taken now, while hold_w keeps it alive, never signals a later holder of its pid
            keeper_fd = os.pidfd_open(got["keeper"])
            try:
                assert got["memlock"]["raised"] is True, got
                wait_for(lambda: [x for x in _records(b, "lease-orphaned") if x["lease"] == got["lease"]],
                         what="the first lease to be orphaned")
                mine = (128 * KiB, 8 * MiB)  # the second process's own limits: higher than the first's
                first.kill()
                with at_pid(got["pid"], _second_holder(b.socket_path, ns.inside, 1, mine, MiB, go_r,
                                                (go_w, hold_w))) as (pid, r):
                    assert select.select([r], [], [], 10.0)[0] and os.read(r, 1) == b"G", "no grant"
                    if first_ends == "before":
                        os.close(hold_w)  # the keeper exits: the first lease ends (orphan poll)
                        hold_w = -1
                        wait_for(lambda: [x for x in _records(b, "lease-ended") if x["lease"] == got["lease"]],
                                 timeout=10.0, what="the first lease to end")
                    os.close(go_w)  # the second process closes and releases its lease
                    go_w = -1
                    second = _read_result(r)
                    if first_ends == "after":
                        os.close(hold_w)
                        hold_w = -1
                        wait_for(lambda: [x for x in _records(b, "lease-ended") if x["lease"] == got["lease"]],
                                 timeout=10.0, what="the first lease to end")
                        time.sleep(0.2)
                        second["after"] = memlock_of(pid)
                assert second["memlock"]["raised"] is True and second["during"] == (MiB, 8 * MiB), second
                assert second["after"] == mine, (f"pid {pid}'s limits are {second['after']} after its lease ended; its "
                                                 f"own were {mine} (the earlier holder of its pid had "
                                                 f"{(64 * KiB, 4 * MiB)})")
            finally:
                for fd in (hold_w, go_w, go_r):
                    if fd >= 0:
                        os.close(fd)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(keeper_fd, signal.SIGKILL)
                os.close(keeper_fd)

    on_a_free_pid(scenario)
