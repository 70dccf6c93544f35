"""Robustness suite against a live broker: load.

Each test makes its own namespace and broker, bounds its time, checks afterwards that the broker's open fds
are back at their baseline, and records its counts with the `figures` fixture (printed in the closing
summary). Every client runs in a child that dropped to an unprivileged uid before it connected.

The helpers it shares with the fuzzing and abuse suites are in robustness.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xskbroker.client.grant import request
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, ns_name, wait_for
from .robustness import (
    SMALL,
    UMEM_POOL,
    alive,
    assert_fds_back,
    census,
    close_all,
    connect,
    kill_all,
    ms,
    on_threads,
    percentile,
    rss_kib,
    status,
)

# ---- 2. load ------------------------------------------------------------------------------------------------

LOAD_QUEUES = 64
LOAD_PROCESSES = 4
LOAD_CLIENTS = 200  # connections open at once, spread over the processes
LOAD_CYCLES = 5200
# a queue whose socket just closed answers EBUSY for 12-20 ms on a quiet machine (longer under this load: the
# broker's bind retry then shows in broker_loop_pct as "sleeping"): reuse a queue only this long after its close
COOLDOWN = 0.03

LOAD_POLICY = f"""\
version = 1

[[allow]]
name = "load"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
max_queues = {LOAD_QUEUES}
max_umem = "{LOAD_QUEUES * (64 + 3)}KiB"  # SMALL: 64 KiB of UMEM and 3 KiB of rings a queue
"""


def _grant_all(path: str, iface: str, queues: int) -> dict[str, Any]:
    """One grant of every queue of the interface (proves no slot is held), then release it."""
    with request(iface, queues, geometry=SMALL, socket_path=path, timeout=30) as g:
        return {"queues": [s.queue for s in g.sockets]}


@contextlib.contextmanager
def _loop_sampler(pid: int, every: float = 0.001) -> Iterator[collections.Counter[str]]:
    """Samples what the broker's event-loop thread is doing (from its wchan): "running", "waiting" for
    events, "sleeping" (time.sleep: the bind retry), or in another kernel wait. Percentages once done."""
    counts: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    names = {"0": "running", "do_epoll_wait": "waiting", "hrtimer_nanosleep": "sleeping"}

    def sample() -> None:
        while not stop.wait(every):
            with contextlib.suppress(OSError):
                counts[names.get(Path(f"/proc/{pid}/task/{pid}/wchan").read_text(), "other-kernel-wait")] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield counts
    finally:
        stop.set()
        sampler.join()
        total = sum(counts.values()) or 1
        for k in counts:
            counts[k] = round(100 * counts[k] / total)


def load_consumer(path: str, iface: str, queues: list[int], clients: int, cycles: int, ready_w: int,
                  go_r: int) -> dict[str, Any]:
    """`clients` connections, each a thread doing grant/release cycles on this process's share of the queues.

    A shared FIFO of free queues, each usable again COOLDOWN after its sockets closed, keeps every queue
    busy without asking for one the kernel has not let go of yet. Cycles follow the client library's order
    (close the sockets, then release). Counts every request sent and every reply received.
    """
    conns = [connect(path, 30.0) for _ in range(clients)]
    os.write(ready_w, b"r")
    os.read(go_r, 1)
    free = collections.deque((q, 0.0) for q in queues)
    cond = threading.Condition()
    left = [cycles]
    grant = {q: proto.encode_request(proto.Grant(iface, (q,), geometry=SMALL)) for q in queues}

    def client(i: int) -> dict[str, Any]:
        sock = conns[i]
        mine: dict[str, Any] = {"sent": 0, "replies": 0, "ok": 0, "codes": collections.Counter(),
                                "grant_s": [], "release_s": []}
        while True:
            with cond:
                while left[0] > 0 and not free:
                    cond.wait()
                if left[0] <= 0:
                    cond.notify_all()
                    return mine
                left[0] -= 1
                q, usable = free.popleft()
            try:
                time.sleep(max(0.0, usable - time.monotonic()))
                started = time.perf_counter()
                sock.send(grant[q])
                mine["sent"] += 1
                data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
                mine["grant_s"].append(time.perf_counter() - started)
                mine["replies"] += bool(data)
                reply = json.loads(data)
                close_all(fds)
                if not reply["ok"]:
                    mine["codes"][reply["error"]["code"]] += 1
                    continue
                mine["ok"] += 1
                started = time.perf_counter()
                sock.send(proto.encode_request(proto.Release(reply["lease"])))
                mine["sent"] += 1
                data = sock.recv(1 << 16)
                mine["release_s"].append(time.perf_counter() - started)
                mine["replies"] += bool(data)
                if not json.loads(data)["ok"]:
                    mine["codes"]["release-refused"] += 1
            finally:
                with cond:
                    free.append((q, time.monotonic() + COOLDOWN))
                    cond.notify()

    started = time.monotonic()
    try:
        per_client = on_threads(clients, client)
    finally:
        for c in conns:
            c.close()
    total: dict[str, Any] = {"seconds": time.monotonic() - started, "codes": collections.Counter()}
    for r in per_client:
        for k in ("sent", "replies", "ok"):
            total[k] = total.get(k, 0) + r[k]
        for k in ("grant_s", "release_s"):
            total.setdefault(k, []).extend(r[k])
        total["codes"].update(r["codes"])
    total["codes"] = dict(total["codes"])
    return total


def test_load_200_clients_5000_grant_release_cycles(figures) -> None:  # type: ignore[no-untyped-def]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=LOAD_QUEUES) as ns, \
            BrokerProcess(ns.name, LOAD_POLICY, umem_pool=UMEM_POOL) as b:
        warm = spawn_unprivileged(_grant_all, b.socket_path, "xsk0", LOAD_QUEUES, uid=CONSUMER_UID).result(60)
        assert warm["queues"] == list(range(LOAD_QUEUES))
        before = census(b)
        rss_before = rss_kib(b.pid)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        kids = []
        try:
            for p in range(LOAD_PROCESSES):
                kids.append(spawn_unprivileged(
                    load_consumer, b.socket_path, "xsk0", list(range(p, LOAD_QUEUES, LOAD_PROCESSES)),
                    LOAD_CLIENTS // LOAD_PROCESSES, LOAD_CYCLES // LOAD_PROCESSES, ready_w, go_r, uid=CONSUMER_UID))
            for _ in kids:
                assert os.read(ready_r, 1) == b"r"
            # every client is connected and accepted before the first request
            connected = wait_for(lambda: (n := b.open_fds() - before.total) >= LOAD_CLIENTS and n, timeout=10,
                                 what=f"{LOAD_CLIENTS} connections accepted")
            with _loop_sampler(b.pid) as loop:
                started = time.monotonic()
                os.write(go_w, b"g" * len(kids))
                results = [k.result(timeout=150) for k in kids]
                elapsed = time.monotonic() - started
        finally:
            kill_all(kids)
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
        alive(b)
        rss_after = rss_kib(b.pid)
        # time the broker spent on each grant, by its own audit records (bind retries included)
        handled = [r["ms"] / 1000 for r in b.records() if r.get("event") == "grant" and "ms" in r]
        assert status(b)["leases"] == []
        # no map slot left taken and no queue left bound: one grant of every queue succeeds
        again = spawn_unprivileged(_grant_all, b.socket_path, "xsk0", LOAD_QUEUES, uid=CONSUMER_UID).result(60)
        assert again["queues"] == list(range(LOAD_QUEUES))
        after = assert_fds_back(b, before)
        alive(b)
    sent = sum(r["sent"] for r in results)
    replies = sum(r["replies"] for r in results)
    grants = sum(r["ok"] for r in results)
    codes = collections.Counter[str]()
    for r in results:
        codes.update(r["codes"])
    grant_s = [x for r in results for x in r["grant_s"]]
    release_s = [x for r in results for x in r["release_s"]]
    figures(clients=LOAD_CLIENTS, connections_accepted=connected, queues=LOAD_QUEUES, requests=sent,
            replies=replies, grants=grants, refusals=dict(codes) or 0, seconds=round(elapsed, 1),
            grants_per_s=round(grants / elapsed), grant_p50_ms=ms(percentile(grant_s, 50)),
            grant_p99_ms=ms(percentile(grant_s, 99)), grant_max_ms=ms(max(grant_s)),
            release_p50_ms=ms(percentile(release_s, 50)), release_p99_ms=ms(percentile(release_s, 99)),
            rss_before_kib=rss_before, rss_after_kib=rss_after, broker_fds=f"{before.total}->{after.total}",
            broker_grant_p50_ms=ms(percentile(handled, 50)), broker_grant_p99_ms=ms(percentile(handled, 99)),
            broker_loop_pct=dict(loop))
    assert replies == sent, f"{sent - replies} requests got no reply"
    assert grants >= 5000 and not codes, (grants, codes)
    assert sent == 2 * grants
    assert rss_after - rss_before < 20 * 1024, f"broker RSS grew from {rss_before} to {rss_after} KiB"
