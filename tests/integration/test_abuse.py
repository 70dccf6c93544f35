"""Robustness suite against a live broker: abusive clients.

Each test makes its own namespace and broker, bounds its time, checks afterwards that the broker's open fds
are back at their baseline, and records its counts with the `figures` fixture (printed in the closing
summary). Every client runs in a child that dropped to an unprivileged uid before it connected.

The last two tests began as reproducers of problems the robustness suites found (a library connect that
failed at once against a full accept backlog; a bind retry that stalled the event loop) and now guard their
fixes. The helpers these tests share with the fuzzing and load suites are in robustness.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name, wait_for
from .robustness import (
    SMALL,
    UMEM_POOL,
    Census,
    alive,
    assert_fds_back,
    census,
    close_all,
    connect,
    grant_cycles,
    kill_all,
    ms,
    on_threads,
    percentile,
    rss_kib,
    status,
)

# ---- 3. abusive clients ---------------------------------------------------------------------------------------

ABUSE_POLICY = f"""\
version = 1

[[allow]]
name = "tenant"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
max_queues = 1
max_umem = "1MiB"
"""
SILENT = 200
GOOD_CYCLES = 60
ABUSE_SECONDS = 9.0  # the abuse lasts at least this long (the good client's cycles took 6-10 s)


def _until_stopped(stop_r: int, limit: float) -> threading.Event:
    """An event set when the parent writes to stop_r (or after `limit` seconds, should the parent vanish)."""
    stop = threading.Event()

    def watch() -> None:
        select.select([stop_r], [], [], limit)
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    return stop


def silent_consumer(path: str, n: int, ready_w: int, stop_r: int) -> dict[str, Any]:
    """Connect n times and say nothing; at the end, count the connections the broker still has open."""
    conns = [connect(path, 30.0) for _ in range(n)]
    os.write(ready_w, b"r")
    _until_stopped(stop_r, 90).wait()
    still_open = 0
    for c in conns:
        c.setblocking(False)  # with a timeout set, Python would wait out EAGAIN instead of raising it
        try:
            still_open += c.recv(1) != b""
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        c.close()
    return {"connections": n, "still_open": still_open}


_HELLO = proto.encode_request(proto.Hello())
_GRANT = proto.encode_request(proto.Grant("xsk0", (0,), geometry=SMALL))


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:
        return _HELLO[:rng.randrange(1, len(_HELLO))]  # half a message
    if kind == 2:
        return _GRANT[:rng.randrange(1, len(_GRANT))]
    if kind == 3:
        return b"[" * 4000 + b"]" * 4000
    if kind == 4:
        return b'{"v":1,"op":"hello","client":"' + b"x" * rng.randrange(8000, 70_000) + b'"}'
    if kind == 5:
        return b'{"v":1,"op":"grant","interface":"xsk0","queues":[0],"umem":{"size":4096}}'  # refused: not allowed
    return b'{"v":"1","op":"steal"}'


def abuse_consumer(path: str, threads: int, ready_w: int, stop_r: int, seed: int) -> dict[str, Any]:
    """Threads that, in tight loops until stopped: send garbage and half messages and read the replies;
    send without ever reading (the broker drops them when its reply does not fit); send half a message
    and hang up at once; connect and close."""
    stop = _until_stopped(stop_r, 90)
    roles = ["garbage", "garbage", "blast", "hangup", "flood", "flood"]

    def body(i: int) -> dict[str, Any]:
        role, rng = roles[i % len(roles)], random.Random(seed + i)
        counts: collections.Counter[str] = collections.Counter()
        sock: socket.socket | None = None
        while not stop.is_set():
            try:
                if sock is None:
                    sock = connect(path, 2.0)
                    counts["connects"] += 1
                if role == "flood":
                    sock.close()
                    sock = None
                elif role == "hangup":
                    sock.send(_GRANT[:rng.randrange(1, len(_GRANT))])
                    if rng.random() < 0.5:
                        sock.shutdown(socket.SHUT_WR)
                    sock.close()
                    sock = None
                    counts["messages"] += 1
                elif role == "blast":
                    sock.send(_garbage(rng))
                    counts["messages"] += 1
                else:
                    sock.send(_garbage(rng))
                    counts["messages"] += 1
                    counts["replies"] += bool(sock.recv(1 << 16))
            except OSError:  # the broker dropped a client that never read its replies; connect again
                counts["dropped"] += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()
        return dict(counts, role=role)

    os.write(ready_w, b"r")
    out: dict[str, Any] = collections.Counter()
    for r in on_threads(threads, body):
        role = r.pop("role")
        out.update({f"{role}_{k}": v for k, v in r.items()})
    return dict(out)


@contextlib.contextmanager
def _abusers(b: BrokerProcess, before: Census) -> Iterator[list[Any]]:
    """200 silent connections from an unprivileged stranger, and two processes of hostile threads, running
    until the block ends; yields the children (their results once stopped)."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    kids = []
    try:
        kids.append(spawn_unprivileged(silent_consumer, b.socket_path, SILENT, ready_w, stop_r, uid=STRANGER_UID))
        for seed in (1, 100):
            kids.append(spawn_unprivileged(abuse_consumer, b.socket_path, 6, ready_w, stop_r, seed,
                                           uid=STRANGER_UID))
        for _ in kids:
            assert os.read(ready_r, 1) == b"r"
        wait_for(lambda: b.open_fds() - before.total >= SILENT, timeout=10,
                 what=f"{SILENT} silent connections accepted")
        results: list[Any] = []
        yield results
        os.write(stop_w, b"s" * len(kids))
        results += [k.result(timeout=30) for k in kids]
    finally:
        kill_all(kids)
        for fd in (ready_r, ready_w, stop_r, stop_w):
            os.close(fd)


def test_abusive_clients_never_block_a_well_behaved_one(figures) -> None:  # type: ignore[no-untyped-def]
    queues = list(range(8))
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=len(queues)) as ns, \
            BrokerProcess(ns.name, ABUSE_POLICY, umem_pool=UMEM_POOL) as b:
        quiet = spawn_unprivileged(grant_cycles, b.socket_path, "xsk0", queues, 20, 0.02, uid=CONSUMER_UID).result()
        assert quiet["ok"] == 20, quiet
        before = census(b)
        rss_before = rss_kib(b.pid)
        with _abusers(b, before) as abusers:
            started = time.monotonic()
            good = spawn_unprivileged(grant_cycles, b.socket_path, "xsk0", queues, GOOD_CYCLES, 0.02,
                                      uid=CONSUMER_UID).result(timeout=90)
            elapsed = time.monotonic() - started
            # the abuse counts below are totals: a good client that got through quicker must not make them
            # fall short, so the abuse goes on for ABUSE_SECONDS at least
            time.sleep(max(0.0, ABUSE_SECONDS - (time.monotonic() - started)))
            alive(b)
        silent, *hostile = abusers
        alive(b)
        assert status(b)["leases"] == []
        rss_after = rss_kib(b.pid)
        after = assert_fds_back(b, before)
    abuse: collections.Counter[str] = collections.Counter()
    for h in hostile:
        abuse.update({k: v for k, v in h.items() if isinstance(v, int)})
    cycle_s = [g + r for g, r in zip(good["grant_s"], good["release_s"], strict=False)]
    figures(silent_connections=silent["connections"], silent_still_open=silent["still_open"],
            garbage_messages=abuse["garbage_messages"], garbage_replies=abuse["garbage_replies"],
            blasted_messages=abuse["blast_messages"], blasters_dropped=abuse["blast_dropped"],
            half_messages_then_hangup=abuse["hangup_messages"], flood_connects=abuse["flood_connects"],
            good_cycles=good["ok"], good_seconds=round(elapsed, 1),
            good_grant_p50_ms=ms(percentile(good["grant_s"], 50)),
            good_grant_p99_ms=ms(percentile(good["grant_s"], 99)),
            good_cycle_p99_ms=ms(percentile(cycle_s, 99)),
            good_connect_p50_ms=ms(percentile(good["connect_s"], 50)),
            good_connect_p99_ms=ms(percentile(good["connect_s"], 99)),
            quiet_grant_p99_ms=ms(percentile(quiet["grant_s"], 99)),
            rss_before_kib=rss_before, rss_after_kib=rss_after, broker_fds=f"{before.total}->{after.total}")
    assert good["ok"] == GOOD_CYCLES, good["codes"]
    assert percentile(cycle_s, 99) < 1.0, f"grant+release p99 {percentile(cycle_s, 99):.3f}s under abuse"
    # the abuse was real, and it went on for the whole of the good client's run
    assert abuse["garbage_replies"] >= 1000 and abuse["garbage_replies"] == abuse["garbage_messages"]
    assert abuse["flood_connects"] >= 500 and abuse["hangup_messages"] >= 100 and abuse["blast_messages"] >= 100


# ---- problems these suites found, kept fixed --------------------------------------------------------------

def test_library_client_gets_through_a_connection_flood(figures) -> None:  # type: ignore[no-untyped-def]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=8) as ns, \
            BrokerProcess(ns.name, ABUSE_POLICY, umem_pool=UMEM_POOL) as b:
        before = census(b)
        with _abusers(b, before):
            got = spawn_unprivileged(grant_cycles, b.socket_path, "xsk0", list(range(8)), 20, 0.02, True,
                                     uid=CONSUMER_UID).result(timeout=90)
        figures(library_cycles_ok=got["ok"], failures=sum(v for k, v in got["codes"].items() if k != "ok"))
        assert got["ok"] == 20, got["codes"]


def regrant_held_queue(path: str, iface: str, seconds: float) -> dict[str, Any]:
    """A tenant that releases its lease but keeps the sockets (so the queue stays bound), then asks for the
    same queue again, in a loop."""
    sock, held, codes = connect(path), [], collections.Counter[str]()
    last_error: dict[str, Any] = {}
    grant = proto.encode_request(proto.Grant(iface, (0,), geometry=SMALL))
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.send(grant)
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
            held += fds
            reply = json.loads(data)
            codes["ok" if reply["ok"] else reply["error"]["code"]] += 1
            if not reply["ok"]:
                last_error = reply["error"]
            if reply["ok"]:
                sock.send(proto.encode_request(proto.Release(reply["lease"])))
                sock.recv(1 << 16)
    finally:
        close_all(held)
        sock.close()
    return {**codes, "last_error": last_error}


def hello_pinger(path: str, seconds: float) -> dict[str, Any]:
    """A client that only says hello, every 5 ms; returns its reply times."""
    sock, times = connect(path), []
    deadline = time.monotonic() + seconds
    with sock:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            sock.send(_HELLO)
            sock.recv(1 << 16)
            times.append(time.perf_counter() - started)
            time.sleep(0.005)
    return {"times": times}


def test_a_tenant_regranting_a_queue_it_still_holds_does_not_stall_others(figures) -> None:  # type: ignore[no-untyped-def]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, ABUSE_POLICY, umem_pool=UMEM_POOL) as b:
        tenant = spawn_unprivileged(regrant_held_queue, b.socket_path, "xsk0", 2.5, uid=CONSUMER_UID)
        try:
            time.sleep(0.3)
            times = spawn_unprivileged(hello_pinger, b.socket_path, 1.5, uid=STRANGER_UID).result(30)["times"]
            codes = tenant.result(30)
        finally:
            tenant.kill()
        alive(b)
        figures(tenant_requests=sum(v for v in codes.values() if isinstance(v, int)),
                tenant_kernel_errors=codes.get("kernel-error", 0), hellos=len(times),
                hello_p50_ms=ms(percentile(times, 50)), hello_p99_ms=ms(percentile(times, 99)))
        assert percentile(times, 99) < 0.1, f"hello p99 {percentile(times, 99):.3f}s while a tenant re-grants"
        # the released lease lives on while its socket is kept: the queue's grants are refused naming it
        assert codes.get("ok") == 1 and codes.get("queue-busy", 0) >= 1, codes
        assert "released but keeps open" in codes["last_error"]["message"], codes
