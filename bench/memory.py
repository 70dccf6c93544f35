"""Memory: the broker's resident memory idle, per idle connection and per lease.

A broker in a private namespace (UMEM pool off, so what is measured is the broker's own) with N idle
connections held open (each said hello); another with M bound grants held (one per queue, the smallest
UMEM). Each figure is a slope, from N/4 to N: the first items fit in memory the allocator already has
(start-up leaves some free), which would make them look free. RSS is read
from /proc/PID/status after each step: RssAnon is the broker's heap (Python objects, buffers), RssShmem
any UMEM memfd pages it still has mapped, RssFile its code and libraries.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from bench.common import ROOT_POLICY
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

CONNECTIONS = 900  # under the default cap of 1024 (1/16 kept for admins)
LEASES = 256
# the smallest bound socket: what a lease costs the broker, not its UMEM (which the broker does not keep mapped)
SMALL = proto.Geometry(umem_size=64 << 10, fill=64, completion=64, rx=64, tx=64)
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def rss(pid: int) -> dict[str, int]:
    """The resident-memory lines of /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def _settled(pid: int) -> dict[str, int]:
    time.sleep(0.3)  # closers and workers done with what the last step handed them
    return rss(pid)


def _per(after: dict[str, int], before: dict[str, int], n: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n for k in FIELDS}


@contextlib.contextmanager
def _broker(tag: str, queues: int) -> Iterator[tuple[BrokerProcess, int]]:
    name = f"xskbench{os.getpid()}{tag}"
    with VethNamespace(name, inside="xsk0", peer="xsk0p", queues=queues), \
            BrokerProcess(name, ROOT_POLICY, umem_pool="0") as broker:
        assert broker.proc is not None
        # one grant first: libbpf/libxdp loaded, the XSK program attached, the code paths' objects made
        _, fds = request_fds("xsk0", [0], kind="bound", geometry=SMALL, socket_path=broker.socket_path)
        for fd in fds:
            os.close(fd)
        yield broker, broker.proc.pid


def connections(n: int) -> dict[str, Any]:
    """RSS with n/4 and with n idle connections: the slope, once the allocator's free memory is used up."""
    with _broker("m", 1) as (broker, pid):
        idle = _settled(pid)
        conns: list[Connection] = []
        try:
            for target in (n // 4, n):
                while len(conns) < target:
                    c = Connection(broker.socket_path)
                    conns.append(c)
                    c.call_typed(proto.Hello())
                if target < n:
                    quarter = _settled(pid)
            full = _settled(pid)
        finally:
            for c in conns:
                c.close()
    return {"idle": idle, "n": n, "rss": full, "per_connection": _per(full, quarter, n - n // 4)}


def leases(n: int) -> dict[str, Any]:
    """RSS with n/4 and with n leases held (one per queue), as for connections."""
    with _broker("l", n) as (broker, pid):
        idle = _settled(pid)
        held: list[int] = []
        try:
            for target in (n // 4, n):
                for q in range(len(held) // 2, target):  # two fds a bound socket: the socket and its UMEM
                    _, fds = request_fds("xsk0", [q], kind="bound", geometry=SMALL, socket_path=broker.socket_path)
                    held += fds
                if target < n:
                    quarter = _settled(pid)
            full = _settled(pid)
            status, _ = Connection(broker.socket_path).call_typed(proto.Status())
            assert len(status.leases) == n, f"{len(status.leases)} leases, not {n}"
        finally:
            for fd in held:
                os.close(fd)
    return {"idle": idle, "n": n, "rss": full, "per_lease": _per(full, quarter, n - n // 4)}


def run(n_connections: int = CONNECTIONS, n_leases: int = LEASES) -> dict[str, Any]:
    return {"connections": connections(n_connections), "leases": leases(n_leases)}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
