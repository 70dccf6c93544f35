"""The device-plugin endpoint: DPDK's handshake to its map fd, and RX through a per-queue tenant map.

- handshake_ms: connect to the endpoint, /connect (the map grant is taken here), /version, /xsk_map_fd
  until the fd arrives; each round in a fresh process (a fresh grant: the lease ends with it), median of 20;
  `reuse` is a second handshake of a process that holds its lease already (DPDK's next queue).
- rx_pps: a socket the benchmark makes and writes into the tenant map the endpoint gave it (the broker's
  per-queue program: outer[queue] -> tenant XSKMAP), against the same socket code in libxdp's xsk_def_prog
  map on a twin veth; flooded by a TX-only AF_XDP sender on another CPU; runs alternate, medians compared.

Run: .venv/bin/python -m bench.dp_endpoint [seconds]
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

from bench.datapath import GEOMETRY, _blast, _frame, _rx_rate
from xskbroker.broker import netdev, xdp_prog, xsk
from xskbroker.client.connection import Connection
from xskbroker.client.xsk import XskSocket
from xskbroker.testbed.dpdk_like import handshake
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

POLICY = """\
version = 1

[[allow]]
name = "bench"
users = [0]
interfaces = ["xsk0"]
kinds = ["map"]

[admin]
users = [0]
"""
ORDER = ("tenant-map", "libxdp", "libxdp", "tenant-map") * 2 + ("tenant-map", "libxdp")


def _handshake(path: str) -> dict[str, Any]:
    return handshake(path, "xsk0")


def _in_child(path: str) -> float:
    """A handshake in a fresh process (its own lease, ended by its exit): the ms to the map fd."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            got = _handshake(path)
            os.write(w, pickle.dumps(got.get("ms") if got.get("fd") is not None else None))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    ms = pickle.loads(data)
    if ms is None:
        raise RuntimeError("the handshake got no map fd")
    return float(ms)


def _leases(path: str) -> int:
    with Connection(path) as c:
        reply, _ = c.call(proto.Status())
    return len(reply["leases"])


def _wait_free(path: str) -> None:
    deadline = time.monotonic() + 5
    while _leases(path) and time.monotonic() < deadline:
        time.sleep(0.002)


def handshakes(b: BrokerProcess, path: str, rounds: int = 20) -> dict[str, Any]:
    fresh = []
    for _ in range(rounds):
        _wait_free(b.socket_path)
        fresh.append(_in_child(path))
    first = _handshake(path)  # this process's lease: its later handshakes reuse it
    reuse = []
    for _ in range(rounds):
        got = _handshake(path)
        reuse.append(got["ms"])
        os.close(got["fd"])
    return {"fresh_ms_p50": round(statistics.median(fresh), 3), "reuse_ms_p50": round(statistics.median(reuse), 3),
            "rounds": rounds, "map_fd": first["fd"]}


def _socket(ns: VethNamespace, map_fd: int) -> XskSocket:
    with in_netns(ns.name):
        s = xsk.create_bound(netdev.ifindex(ns.inside), 0, map_fd, GEOMETRY)
    return XskSocket(s.xsk_fd, s.umem_fd, 0, GEOMETRY, s.bind_flags)


def run(seconds: float = 1.0) -> dict[str, Any]:
    tag = f"xd{os.getpid()}"
    base = tempfile.mkdtemp(prefix="xd-", dir="/tmp")
    os.chmod(base, 0o755)
    path = f"{base}/afxdp_dp/xsk0/afxdp.sock"
    out: dict[str, Any] = {}
    try:
        with VethNamespace(f"{tag}m", inside="xsk0", peer="xsk0p", queues=1) as nm, \
                VethNamespace(f"{tag}l", inside="xsk0", peer="xsk0p", queues=1) as nl, \
                BrokerProcess(nm.name, POLICY, ["--device-plugin", f"interface=xsk0,user=0,path={path}"]) as b:
            hs = handshakes(b, path)
            maps = {"tenant-map": hs.pop("map_fd")}
            out["handshake"] = hs
            with in_netns(nl.name):
                prog = xdp_prog.find_or_attach(netdev.ifindex("xsk0"), "xsk0", 1)
            maps["libxdp"] = prog.map_fd
            nss = {"tenant-map": nm, "libxdp": nl}
            runs: dict[str, list[float]] = {k: [] for k in nss}
            os.sched_setaffinity(0, {0})
            try:
                for label in ORDER:
                    ns = nss[label]
                    xs = _socket(ns, maps[label])
                    sender = _blast(ns.name, ns.peer, _frame(ns.mac(ns.inside), ns.mac(ns.peer)), cpu=1)
                    try:
                        runs[label].append(_rx_rate(xs, seconds))
                    finally:
                        os.kill(sender, signal.SIGKILL)
                        os.waitpid(sender, 0)
                        xs.close()
                    time.sleep(0.05)
            finally:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
                prog.close()
                os.close(maps["tenant-map"])
            tm, lx = statistics.median(runs["tenant-map"]), statistics.median(runs["libxdp"])
            out["rx_pps"] = {"tenant_map": round(tm), "libxdp": round(lx), "ratio": round(tm / lx, 3), "runs": runs}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0), indent=1))
