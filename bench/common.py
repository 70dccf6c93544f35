"""Shared pieces of the benchmarks: a broker in a private namespace, the direct baseline, statistics."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from xskbroker.broker import netdev, xdp_prog
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns

ROOT_POLICY = """\
version = 1

[[allow]]
name = "bench"
users = [0, 65534]
interfaces = ["xsk*"]
kinds = ["bound", "bare"]
max_umem = "1100MiB"  # the 1 GiB grant of bench.throughput.hello_during_big_grant, with its rings
"""


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "mean": statistics.fmean(samples), "min": min(samples), "max": max(samples)}


@dataclass
class Bed:
    ns: VethNamespace
    broker: BrokerProcess
    ifindex: int
    program: xdp_prog.XskProgram  # the direct baseline's handle on the same XSK program and map


@contextlib.contextmanager
def bed(name: str, queues: int) -> Iterator[Bed]:
    """A namespace with a many-queue veth, a broker in it, and the XSK program already attached."""
    with VethNamespace(name, inside="xsk0", peer="xsk0p", queues=queues) as ns, \
            BrokerProcess(name, ROOT_POLICY, umem_pool="64MiB") as broker:
        with in_netns(name):
            ifindex = netdev.ifindex("xsk0")
            program = xdp_prog.find_or_attach(ifindex, "xsk0", netdev.queue_count("xsk0"))
        try:
            yield Bed(ns, broker, ifindex, program)
        finally:
            program.close()
