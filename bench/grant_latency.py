"""Grant latency: a client's request until the fds are in its hand, against the same kernel work done
in-process by a privileged program (sealed memfd, UMEM registration, rings, bind, map slot).

Brokered two ways, both through the public client API: a new connection per grant (request_fds as a
one-off launcher calls it: connect, and the broker identifies a new peer) and one connection kept open
for every grant (request_fds(connection=...), how a program that grants repeatedly should call it)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from bench.common import bed, summary
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


def run(samples: int = 120, queues: int = 32) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with bed(f"xskbench{os.getpid()}l", queues) as b:
        path = b.broker.socket_path
        for mib in SIZES_MIB:
            g = Geometry(umem_size=mib << 20)
            brokered: list[float] = []
            kept: list[float] = []  # on one connection
            direct: list[float] = []
            conn = Connection(path)
            # alternate them so a noisy neighbour hurts all alike; rotate queues so none is reused
            # within the ~20 ms the kernel takes to release a closed one
            for i in range(samples + 5):
                for series, via in ((brokered, None), (kept, conn)):
                    q = (3 * i + (via is not None)) % queues
                    t = time.perf_counter()
                    _, fds = request_fds("xsk0", [q], kind="bound", geometry=g, socket_path=path, connection=via)
                    elapsed = time.perf_counter() - t
                    for fd in fds:
                        os.close(fd)
                    if i >= 5:
                        series.append(elapsed * 1000)
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
            if mib == SIZES_MIB[0]:
                out["floor"] = floor(conn, samples, PAUSE + mib * PAUSE_PER_MIB)
            conn.close()
            bs, ks, ds = summary(brokered), summary(kept), summary(direct)
            out[f"{mib}MiB"] = {"brokered_ms": bs, "direct_ms": ds, "ratio_p50": bs["p50"] / ds["p50"],
                                "ratio_p99": bs["p99"] / ds["p99"], "p99_over_p50": bs["p99"] / bs["p50"],
                                "one_connection_ms": ks, "one_connection_ratio_p50": ks["p50"] / ds["p50"],
                                "one_connection_ratio_p99": ks["p99"] / ds["p99"],
                                "one_connection_p99_over_p50": ks["p99"] / ks["p50"],
                                "samples_brokered": brokered, "samples_one_connection": kept,
                                "samples_direct": direct}
    return out


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
