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

from bench.common import bed
from xskbroker.broker import xsk
from xskbroker.client.connection import Connection
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
    return out
