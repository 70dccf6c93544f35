"""Grant throughput: N concurrent clients doing grant+release on distinct queues, against N threads of
a privileged program doing the same kernel work in-process (create, then close).

Closing the last fd of a bound AF_XDP socket waits for an RCU grace period (5-15 ms). A direct program
pays it in the closing thread; a brokered client usually does not, because the broker still holds its
copy for a moment and closes it in its own closer threads. That difference is part of what is measured."""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

from bench.common import bed, summary
from xskbroker.broker import xsk
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import in_netns
from xskbroker.wire import protocol as proto

GEOMETRY = proto.Geometry(umem_size=256 << 10, fill=256, completion=256, rx=256, tx=256)


def _brokered(path: str, queues: list[int], deadline: float, counts: list[int], slot: int) -> None:
    n = done = 0
    with Connection(path) as conn:
        while time.monotonic() < deadline:
            q = queues[n % len(queues)]
            n += 1
            try:
                reply, fds = conn.call(proto.Grant("xsk0", (q,), geometry=GEOMETRY))
            except proto.BrokerError as e:  # a queue still releasing: move on, count only grants
                if e.code in ("queue-busy", "kernel-error", "queue-squatted"):
                    continue
                raise
            for fd in fds:
                os.close(fd)
            conn.call(proto.Release(reply["lease"]))
            done += 1
    counts[slot] = done


def _direct(netns: str, ifindex: int, map_fd: int, queues: list[int], deadline: float, counts: list[int],
            slot: int) -> None:
    n = done = 0
    with in_netns(netns):
        while time.monotonic() < deadline:
            q = queues[n % len(queues)]
            n += 1
            try:
                s = xsk.create_bound(ifindex, q, map_fd, GEOMETRY)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    continue
                raise
            s.close()
            done += 1
    counts[slot] = done


def _measure(target, args_for, clients: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    counts = [0] * clients
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=target, args=(*args_for(i), deadline, counts, i)) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


BIG = proto.Geometry(umem_size=1 << 30)
HELLO_EVERY = 0.002  # seconds between one client's hellos while another's 1 GiB UMEM is pinned


def hello_during_big_grant(path: str, queue: int, grants: int = 3) -> dict[str, Any]:
    """Another client's hello round trips (one connection, one every 2 ms) while a 1 GiB grant is made,
    `grants` times: pinning 1 GiB takes seconds, and must not hold anyone else up."""
    hellos: list[float] = []
    made: list[float] = []
    for _ in range(grants):
        done = threading.Event()

        def big(done: threading.Event = done) -> None:
            try:
                t = time.perf_counter()
                _, fds = request_fds("xsk0", [queue], kind="bound", geometry=BIG, socket_path=path, timeout=60)
                made.append((time.perf_counter() - t) * 1000)
                for fd in fds:
                    os.close(fd)
            finally:
                done.set()

        with Connection(path) as conn:
            conn.call(proto.Hello())
            worker = threading.Thread(target=big)
            worker.start()
            time.sleep(0.05)  # the grant is under way (its decision and slot take under a millisecond)
            while not done.is_set():
                t = time.perf_counter()
                conn.call(proto.Hello())
                hellos.append((time.perf_counter() - t) * 1000)
                time.sleep(HELLO_EVERY)
            worker.join()
        time.sleep(0.2)  # the released queue and its pinned pages go back
    return {"hello_ms": summary(hellos), "big_grant_ms": summary(made) if made else None, "grants": len(made)}


def run(clients: tuple[int, ...] = (1, 8, 32), seconds: float = 3.0, queues: int = 128) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with bed(f"xskbench{os.getpid()}t", queues) as b:
        for n in clients:
            # each client cycles over its own queues, so no queue is reused within the kernel's release delay
            share = queues // n

            def own(i: int, share: int = share) -> list[int]:
                return list(range(i * share, (i + 1) * share))

            brokered = _measure(_brokered, lambda i, own=own: (b.broker.socket_path, own(i)), n, seconds)
            direct = _measure(_direct, lambda i, own=own: (b.ns.name, b.ifindex, b.program.map_fd, own(i)), n,
                              seconds)
            out[str(n)] = {"brokered_grants_per_s": brokered, "direct_grants_per_s": direct,
                           "ratio": brokered / direct}
        out["hello_during_1gib_grant"] = hello_during_big_grant(b.broker.socket_path, queues - 1)
    return out
