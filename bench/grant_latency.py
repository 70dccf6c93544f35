"""Grant latency: a client's request until the fds are in its hand, against the same kernel work done
in-process by a privileged program (sealed memfd, UMEM registration, rings, bind, map slot).

Brokered two ways, both through the public client API: a new connection per grant (request_fds as a
one-off launcher calls it: connect, and the broker identifies a new peer) and one connection kept open
for every grant (request_fds(connection=...), how a program that grants repeatedly should call it)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from bench.common import Bed, bed, summary
from xskbroker.broker import xsk
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import in_netns
from xskbroker.wire import protocol as proto
from xskbroker.wire.protocol import Geometry

SIZES_MIB = (1, 4, 16)
# seconds: the broker's UMEM pool starts refilling 5 ms after a take (umem_pool.REFILL_DELAY), and making a
# socket (fallocate, then pinning) runs at about 1 ms per MiB here
PAUSE, PAUSE_PER_MIB = 0.012, 0.002
SLOW = 1.5  # a sample over this many times its series' p50 is a tail sample (the goal's p99 bound)
CPU_WAIT_MS = 0.5  # a tail sample whose broker loop and client waited this long for a CPU was held up by another task


def _waited_ms(pid: int) -> float:
    """How long the broker's loop (its main thread) and this thread have waited, runnable, for a CPU: /proc
    schedstat's second field. Read around each sample, it says whether a slow grant was the broker's doing or
    a CPU taken from one side or the other."""
    total = 0.0
    for path in (f"/proc/{pid}/schedstat", f"/proc/self/task/{threading.get_native_id()}/schedstat"):
        with open(path) as f:
            total += int(f.read().split()[1]) / 1e6
    return total


def run(samples: int = 120, queues: int = 32) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with bed(f"xskbench{os.getpid()}l", queues) as b:
        path = b.broker.socket_path
        for mib in SIZES_MIB:
            g = Geometry(umem_size=mib << 20)
            brokered: list[float] = []
            kept: list[float] = []  # on one connection
            direct: list[float] = []
            waits: dict[str, list[float]] = {"new": [], "kept": []}  # CPU waits per sample (_waited_ms)
            conn = Connection(path)
            _sample(b, conn, g, mib, samples, queues, brokered, kept, direct, waits)
            if mib == SIZES_MIB[0]:
                out["floor"] = floor(conn, samples, PAUSE + mib * PAUSE_PER_MIB)
            conn.close()
            bs, ks, ds = summary(brokered), summary(kept), summary(direct)
            out[f"{mib}MiB"] = {"brokered_ms": bs, "direct_ms": ds, "ratio_p50": bs["p50"] / ds["p50"],
                                "ratio_p99": bs["p99"] / ds["p99"], "p99_over_p50": bs["p99"] / bs["p50"],
                                "one_connection_ms": ks, "one_connection_ratio_p50": ks["p50"] / ds["p50"],
                                "one_connection_ratio_p99": ks["p99"] / ds["p99"],
                                "one_connection_p99_over_p50": ks["p99"] / ks["p50"],
                                "tail_cpu_wait": _tail_cpu_wait(brokered, waits["new"]),
                                "one_connection_tail_cpu_wait": _tail_cpu_wait(kept, waits["kept"]),
                                "samples_brokered": brokered, "samples_one_connection": kept,
                                "samples_direct": direct}
    return out


def _sample(b: Bed, conn: Connection, g: Geometry, mib: int, samples: int, queues: int, brokered: list[float],
            kept: list[float], direct: list[float], waits: dict[str, list[float]]) -> None:
    """samples (after 5 to warm up) of each series: a new connection, the kept one, direct, each followed by the
    same pause. Alternated so that a noisy neighbour hurts all alike; queues rotate so that none is reused within
    the ~20 ms the kernel takes to release a closed one."""
    path = b.broker.socket_path
    for i in range(samples + 5):
        for way, series, via in (("new", brokered, None), ("kept", kept, conn)):
            q = (3 * i + (via is not None)) % queues
            before = _waited_ms(b.broker.pid)
            t = time.perf_counter()
            _, fds = request_fds("xsk0", [q], kind="bound", geometry=g, socket_path=path, connection=via)
            elapsed = time.perf_counter() - t
            waited = _waited_ms(b.broker.pid) - before
            for fd in fds:
                os.close(fd)
            if i >= 5:
                series.append(elapsed * 1000)
                waits[way].append(waited)
            # the broker's UMEM pool refills in the background (its helper process zeroes and pins
            # pages): let it finish, so it does not slow the sample that follows on 2 CPUs
            time.sleep(PAUSE + mib * PAUSE_PER_MIB)
        q = (3 * i + 2) % queues
        with in_netns(b.ns.name):
            t = time.perf_counter()
            s = xsk.create_bound(b.ifindex, q, b.program.map_fd, g)
            elapsed = time.perf_counter() - t
        s.close()
        if i >= 5:
            direct.append(elapsed * 1000)
        # the same pause after the direct sample: every series starts from the same idle machine, and the
        # direct close's deferred work (its UMEM unpinned and freed by a kworker) does not land in the next
        # new-connection sample
        time.sleep(PAUSE + mib * PAUSE_PER_MIB)


def _tail_cpu_wait(samples: list[float], waited: list[float]) -> dict[str, Any]:
    """The tail samples (over SLOW x p50) and how many of them the broker's loop and the client spent at least
    CPU_WAIT_MS runnable but waiting for a CPU another task held. Traced with sched_switch here: kworkers
    (on a kernel without preemption one runs until it is done), the broker's other threads, and the client
    itself running on after its request on the CPU the broker was woken on (the waker's)."""
    p50 = summary(samples)["p50"]
    tail = [i for i, x in enumerate(samples) if x > SLOW * p50]
    held = [i for i in tail if waited[i] >= CPU_WAIT_MS]
    return {"tail": len(tail), "held_up": len(held), "of": len(samples),
            "held_up_wait_ms": sorted(round(waited[i], 3) for i in held)}


def _round_trips(call: Any, samples: int, pause: float) -> float:
    """p50 in ms of call(), each after `pause` seconds of idling (0: back to back)."""
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
        if pause:
            time.sleep(pause)
    return summary(times)["p50"]


def floor(conn: Connection, samples: int, pause: float) -> dict[str, float]:
    """What any brokered request costs before its own work, on this machine: a hello on the kept connection,
    and a bare SEQPACKET ping-pong with a child process, each after the pause the grant samples have and back
    to back. After an idle pause every process's code runs from cold caches (a VM's halted vCPU, others'
    work on its core): the gap between the two columns is what a grant's extra process costs for that."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the echo: nothing but recv and send
        ours.close()
        while data := theirs.recv(64):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    try:
        def ping() -> None:
            ours.send(b"x")
            ours.recv(64)

        out = {f"{what}_{when}_ms": _round_trips(call, samples, p)
               for what, call in (("hello", lambda: conn.call(proto.Hello())), ("pingpong", ping))
               for when, p in (("after_pause", pause), ("back_to_back", 0.0))}
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return {**out, "pause_ms": pause * 1000}
