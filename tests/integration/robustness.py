"""What the robustness suites (test_fuzz, test_load, test_abuse) share: a client connection that waits for
room in the accept backlog, the broker's fd census and liveness checks, percentiles for the figures, and the
unprivileged consumers more than one suite runs.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import open_sockets, request
from xskbroker.testbed.sandbox import BrokerProcess
from xskbroker.wire import protocol as proto

from .conftest import wait_for

KiB = 1 << 10
REPLY_TIMEOUT = 10.0  # seconds a client waits for any one reply before calling it lost
UMEM_POOL = "64MiB"  # the broker's default: these suites run it as deployed, UMEM pool included


# ---- helpers shared by the suites ----------------------------------------------------------------------

def connect(path: str, timeout: float = REPLY_TIMEOUT) -> socket.socket:
    """A client connection that waits (up to timeout) for room in the broker's accept backlog.

    A plain socket with a Python timeout is non-blocking, and a non-blocking AF_UNIX connect fails at once
    with EAGAIN while the backlog is full; a blocking connect with SO_SNDTIMEO sleeps until there is room.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                     struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000)))
        s.connect(path)
        s.settimeout(timeout)
    except BaseException:
        s.close()
        raise
    return s


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values, in the same unit."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def status(b: BrokerProcess) -> dict[str, Any]:
    with Connection(b.socket_path) as c:  # as root, an admin by default: sees every lease
        return c.call(proto.Status())[0]


@dataclass
class Census:
    """The broker's open fds by kind. UMEM memfds at rest belong to the UMEM pool (the broker closes its
    copies of granted ones as soon as the reply is sent), each with its socket (not counted in `kinds`);
    pidfds watch lease holders."""

    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    memfd_sizes: list[int] = field(default_factory=list)
    pidfd_pids: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.kinds.values()) + len(self.memfd_sizes) + len(self.pidfd_pids)


def census(b: BrokerProcess) -> Census:
    b.settled_fds()  # closed connections and exited holders reaped, the UMEM pool refilled
    out = Census()
    base = f"/proc/{b.pid}"
    for fd in os.listdir(f"{base}/fd"):
        try:
            target = os.readlink(f"{base}/fd/{fd}")
            if target.startswith("/memfd:"):
                out.memfd_sizes.append(os.stat(f"{base}/fd/{fd}").st_size)
                continue
            if target == "anon_inode:[pidfd]":
                info = Path(f"{base}/fdinfo/{fd}").read_text()
                out.pidfd_pids.append(int(info.split("Pid:")[1].split()[0]))
                continue
        except (OSError, IndexError, ValueError):
            continue  # closed while we looked
        kind = target.split(":[")[0] if ":[" in target else target
        out.kinds[kind] += 1
    # each socket the UMEM pool made ahead holds one memfd: those sockets are the pool's, like its memfds
    out.kinds["socket"] -= len(out.memfd_sizes)
    return out


def assert_fds_back(b: BrokerProcess, before: Census, *, exact: bool = True) -> Census:
    """The broker holds exactly what it held before: same sockets, maps, programs and files; no pidfd for a
    process that is gone. With exact, the UMEM pool is back to the same memfds too."""
    def settled() -> Census | None:
        now = census(b)
        gone = [pid for pid in now.pidfd_pids if not os.path.exists(f"/proc/{pid}")]
        same_pool = sorted(now.memfd_sizes) == sorted(before.memfd_sizes) or not exact
        same_pids = sorted(now.pidfd_pids) == sorted(before.pidfd_pids) or not exact
        return now if now.kinds == before.kinds and not gone and same_pool and same_pids else None

    try:
        return wait_for(settled, timeout=10.0, what="the broker's fds back at baseline")
    except AssertionError:
        now = census(b)
        raise AssertionError(f"broker fds not back at baseline: before {before}, after {now}\n"
                             + "\n".join(b.fd_targets())) from None


def running(b: BrokerProcess) -> bool:
    return b.proc is not None and b.proc.poll() is None


def alive(b: BrokerProcess) -> None:
    assert running(b), f"broker died:\n{b.log()[-4000:]}"


def kill_all(children: list[Any]) -> None:
    for child in children:
        child.kill()

# ---- consumers used by more than one suite (they run unprivileged, in children) ---------------------------

SMALL = proto.Geometry(umem_size=64 * KiB, fill=64, completion=64, rx=64, tx=64)


class _Granted:
    """A bound grant taken as the client library takes it (request, then map the rings), on a connection
    made by connect(): one that waits for room in the accept backlog instead of failing with EAGAIN."""

    def __init__(self, path: str, iface: str, queue: int) -> None:
        started = time.perf_counter()
        self.sock = connect(path)
        self.connect_s = time.perf_counter() - started
        try:
            self.sock.send(proto.encode_request(proto.Grant(iface, (queue,), geometry=SMALL)))
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 4)
            try:
                self.reply = proto.decode_reply(data)
                self.sockets = open_sockets(self.reply, fds)
            except BaseException:
                close_all(fds)
                raise
        except BaseException:
            self.sock.close()
            raise

    def release(self) -> None:
        """As Grant.release(): close the sockets, then release the lease."""
        for s in self.sockets:
            s.close()
        self.sock.send(proto.encode_request(proto.Release(self.reply["lease"])))
        proto.decode_reply(self.sock.recv(1 << 16))
        self.sock.close()


def grant_cycles(path: str, iface: str, queues: list[int], cycles: int, pause: float,
                 library: bool = False) -> dict[str, Any]:
    """A well-behaved client: grant a queue (round robin), map its rings, release it, pause; repeat.

    With library, through client.grant.request; else the same steps on a connection from connect(). Each
    cycle is timed from connect to rings mapped (grant) and from release to its reply (release).
    """
    grant_s, connect_s, release_s, codes = [], [], [], collections.Counter[str]()
    for i in range(cycles):
        q = queues[i % len(queues)]
        started = time.perf_counter()
        try:
            g: Any = (request(iface, [q], geometry=SMALL, socket_path=path, timeout=REPLY_TIMEOUT) if library
                      else _Granted(path, iface, q))
        except proto.BrokerError as e:
            codes[e.code] += 1
            continue
        except ConnectionError as e:
            codes[f"ConnectionError: {e}"] += 1
            continue
        grant_s.append(time.perf_counter() - started)
        connect_s.append(getattr(g, "connect_s", math.nan))
        codes["ok"] += 1
        started = time.perf_counter()
        g.release()
        release_s.append(time.perf_counter() - started)
        time.sleep(pause)
    return {"ok": codes["ok"], "codes": dict(codes), "grant_s": grant_s, "connect_s": connect_s,
            "release_s": release_s}


def on_threads(n: int, body: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run body(i) on n threads; re-raise the first failure with its thread number."""
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            results[i] = body(i)
        except BaseException as e:
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} threads failed; first: {errors[0]}")
    return results
