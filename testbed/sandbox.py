"""Private test beds for the demo, the tests and the benchmarks.

A network namespace with a veth pair, a broker process inside it, a consumer forked off and dropped
to an unprivileged uid with no capabilities, and a raw-packet peer. Everything here cleans up after
itself, on failure too. Root only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import pkgutil
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request
from xskbroker.common.privileges import drop_to
from xskbroker.testbed import links

# Imported here, while still root: after the drop, modules under a 0700 home cannot be loaded.
from xskbroker.testbed.echo import ETH_P_DEMO, FRAME, MAGIC, PING, TO_CONSUMER, TO_PEER, Reflector
from xskbroker.testbed.links import in_netns, setns
from xskbroker.wire import protocol as proto
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import XDP_ZEROCOPY

__all__ = ["BrokerProcess", "Child", "PacketPeer", "VethNamespace", "drop_privileges", "echo_consumer", "in_netns",
           "preload", "readable_copy", "setns", "spawn_unprivileged"]


@dataclass
class VethNamespace:
    """A namespace holding a veth pair: `inside` for the broker's consumers, `peer` for traffic.

    With several queues, XPS steers the peer's transmissions by sending CPU: a frame sent from CPU c
    leaves the peer on the TX queue mapped to c and so arrives on the same RX queue inside, which lets
    a test aim traffic at a queue by pinning its sender. `xps` maps queue -> CPU (default: q % ncpu).
    """

    name: str
    inside: str = "xsk0"
    peer: str = "xsk0p"
    queues: int = 1
    xps: dict[int, int] | None = None

    def __enter__(self) -> VethNamespace:
        links.create_netns(self.name)
        try:
            links.add_veth(self.name, self.inside, self.peer, self.queues)
            if self.queues > 1:
                self._steer_by_cpu()
        except BaseException:
            self.delete()
            raise
        return self

    def _steer_by_cpu(self) -> None:
        ncpu = os.cpu_count() or 1
        xps = self.xps if self.xps is not None else {q: q % ncpu for q in range(self.queues)}
        links.write_sysfs(self.name, {f"/sys/class/net/{self.peer}/queues/tx-{q}/xps_cpus":
                                      format(1 << xps[q], "x") if q in xps else "0" for q in range(self.queues)})

    def delete(self) -> None:
        links.remove_netns(self.name)

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def mac(self, dev: str) -> bytes:
        return links.mac(self.name, dev)

    # more links in the namespace, for tests that add, rename or remove interfaces under a broker
    def add_veth(self, dev: str, peer: str, queues: int = 1) -> None:
        links.add_veth(self.name, dev, peer, queues)

    def delete_link(self, dev: str) -> None:
        links.delete_link(self.name, dev)

    def rename(self, dev: str, new: str) -> None:
        links.set_link(self.name, dev, rename=new)

    def add_altname(self, dev: str, altname: str) -> None:
        links.add_altname(self.name, dev, altname)

    def xdp_off(self, dev: str) -> None:
        links.set_link(self.name, dev, xdp_off=True)


@dataclass
class BrokerProcess:
    """`xskbroker serve` inside a namespace on a private socket, with its log in a file."""

    netns: str
    policy_text: str
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. XSKBROKER_FAULT
    # off unless asked: the pool's ready memfds would blur the fd counts that leak checks compare
    umem_pool: str = "0"
    workdir: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.workdir, "broker.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "broker.log")

    @property
    def policy_path(self) -> str:
        return os.path.join(self.workdir, "policy.toml")

    def __enter__(self) -> BrokerProcess:
        self.workdir = tempfile.mkdtemp(prefix="xskbroker-")
        os.chmod(self.workdir, 0o711)  # others may reach the socket by its path, not list the folder
        Path(self.policy_path).write_text(self.policy_text)
        os.chmod(self.policy_path, 0o644)  # whatever the umask: the broker refuses a policy others could write
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self, timeout: float = 10.0) -> None:
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "xskbroker.broker", "serve", "--socket",
               self.socket_path, "--policy", self.policy_path, "--socket-mode", "0666", "--state-dir", self.workdir,
               # JSON lines in its log, which records() reads: never the host's journal, even where journald runs
               "--umem-pool", self.umem_pool, "--audit", "json", *self.extra_args]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               "LIBXDP_SKIP_DISPATCHER": "1", **self.env}
        readies = sum(r.get("event") == "ready" for r in self.records())  # a restart appends to the same log
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(r.get("event") == "ready" for r in self.records()) > readies:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.01)
        raise TimeoutError(f"broker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except FileNotFoundError:
            return ""

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The broker's records (the JSON lines of its log), or only those of one event."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out if event is None else [r for r in out if r.get("event") == event]

    def leases(self) -> list[dict[str, Any]]:
        """The leases `status` lists to root (every lease where root is an admin, as the test policies make it)."""
        with Connection(self.socket_path) as c:
            return list(c.call(proto.Status())[0]["leases"])

    @property
    def pid(self) -> int:
        """The broker's own pid (`ip netns exec` execs it, so it is the child's pid)."""
        assert self.proc is not None
        return self.proc.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fds(self, quiet: float = 0.15, timeout: float = 5.0) -> int:
        """The fd count once it has stopped changing (closed client connections are reaped)."""
        deadline = time.monotonic() + timeout
        last, since = self.open_fds(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.open_fds()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def fd_targets(self) -> list[str]:
        """What each open fd of the broker is, for messages about leaks."""
        out = []
        for fd in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                out.append(f"{fd}->{os.readlink(f'/proc/{self.pid}/fd/{fd}')}")
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir:
            # all of it: the broker writes more than the bed gave it (its last good policy copy), and a list of
            # names left every bed's directory behind in /tmp
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """The processes pid's threads started (a broker's UMEM helper, a child pinning a large UMEM); a thread
    that ends while they are read is skipped."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


# ---- unprivileged consumers --------------------------------------------------------------------

def drop_privileges(uid: int, gid: int | None = None) -> dict[str, str]:
    """Become uid/gid for good: no supplementary groups, no capabilities, no way back."""
    caps = drop_to(uid, uid if gid is None else gid)
    if os.getuid() == 0:  # a consumer is never root, whatever uid it was asked to be
        raise PermissionError(f"privileges not dropped: {caps}")
    return caps


@dataclass
class Child:
    """A forked consumer; result() waits for the value its function returned (or its error)."""

    pid: int
    rfd: int
    uid: int
    # Once reaped, its pid is free for any process to take (pid_max is 32768 on some hosts, and the suite forks
    # thousands of times): a kill after that could hit another test's process. Only this process reaps it.
    reaped: bool = False

    def result(self, timeout: float = 30.0, reap: bool = True) -> Any:
        """With reap=False an exited child is left a zombie, its pid still its own, until kill(): a test that is
        to land another process on that pid frees it only right before, so that no other process takes it."""
        chunks = []
        deadline = time.monotonic() + timeout
        ended = False  # end of file: the child has written its result and is exiting
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                    raise TimeoutError(f"consumer {self.pid} gave no result in {timeout}s")
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    ended = True
                    break
                chunks.append(chunk)
        finally:
            if reap or not ended:  # a child that gave no (whole) result is killed whatever reap says
                self.kill()
            else:
                self._close_pipe()
        if not chunks:
            raise RuntimeError(f"consumer {self.pid} died without a result")
        ok, value = pickle.loads(b"".join(chunks))
        if not ok:
            raise RuntimeError(f"consumer failed:\n{value}")
        return value

    def _close_pipe(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self._close_pipe()
        if self.reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)  # not reaped yet, so the pid is still its (a zombie at worst)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.reaped = True

    def alive(self) -> bool:
        if self.reaped:
            return False
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid:
            self.reaped = True
        return not pid


def preload(*packages: str) -> None:
    """Import every module of these packages now, while root: a forked child that dropped privileges cannot load
    a module lazily from a clone under a directory its uid cannot enter (a 0700 home, a mktemp -d)."""
    for name in packages:
        pkg = importlib.import_module(name)
        for m in pkgutil.walk_packages(pkg.__path__, name + "."):
            if not m.name.endswith("__main__"):  # those run a command when imported
                importlib.import_module(m.name)


def spawn_unprivileged(fn: Callable[..., Any], *args: Any, uid: int = 65534, gid: int | None = None) -> Child:
    """Fork, drop to uid (no capabilities) before anything else, then run fn(*args) and send back its result.

    Forking rather than exec'ing lets the child run code from a tree an unprivileged uid may not read.
    """
    return fork_child(lambda: drop_privileges(uid, gid), uid, fn, *args)


def fork_child(become: Callable[[], dict[str, str] | None], uid: int, fn: Callable[..., Any], *args: Any,
               fork: Callable[[], int] = os.fork) -> Child:
    """Fork (with fork: pids.fork_on to land on a chosen pid); in the child, become() first (drop privileges,
    enter a namespace: whatever it must be before it runs), then run fn(*args) and send back its result. What
    become() returns (the capabilities it kept) is added to a dict result under "capabilities"; None adds
    nothing."""
    rfd, wfd = os.pipe()
    pid = fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            caps = become()
            try:
                value = (True, fn(*args))
            except BaseException:
                value = (False, traceback.format_exc())
                code = 1
            if isinstance(value[1], dict) and caps is not None:
                value[1].setdefault("capabilities", caps)
            data = pickle.dumps(value)
            with os.fdopen(wfd, "wb") as w:
                w.write(data)
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    os.close(wfd)
    return Child(pid, rfd, uid)


# ---- the traffic peer --------------------------------------------------------------------------------

class PacketPeer:
    """A raw AF_PACKET socket on the veth's peer end: sends numbered frames, collects the replies."""

    def __init__(self, netns: str, dev: str, dst: bytes) -> None:
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_DEMO))
            self.sock.bind((dev, ETH_P_DEMO))
        self.src = self.sock.getsockname()[4]
        self.dst = dst
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def frame(self, seq: int, tag: bytes = MAGIC, size: int = 64) -> bytes:
        return FRAME.pack(self.dst, self.src, ETH_P_DEMO, tag, seq, TO_CONSUMER).ljust(size, b"\0")

    def send(self, seq: int, tag: bytes = MAGIC) -> None:
        self.sock.send(self.frame(seq, tag))

    def replies(self, timeout: float) -> list[tuple[bytes, int]]:
        """(tag, seq) of every consumer reply that arrives within timeout (returns at the first lull)."""
        out = []
        ready = select.select([self.sock], [], [], timeout)[0]
        while ready:
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING or len(data) < FRAME.size:
                continue
            _, _, _, tag, seq, direction = FRAME.unpack_from(data)
            if direction == TO_PEER:
                out.append((tag, seq))
        return out

    def wait_ready(self, timeout: float = 10.0, cpu: int | None = None) -> float:
        """Probe until the consumer answers (its fill ring is stocked); returns the seconds it took."""
        started = time.monotonic()
        with self._on_cpu(cpu):
            seq = 0
            while time.monotonic() - started < timeout:
                self.send(seq, PING)
                seq += 1
                if any(t == PING for t, _ in self.replies(0.02)):
                    return time.monotonic() - started
        raise TimeoutError(f"no consumer answered on {self.dst.hex(':')} within {timeout}s")

    @contextlib.contextmanager
    def _on_cpu(self, cpu: int | None) -> Iterator[None]:
        old = os.sched_getaffinity(0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        try:
            yield
        finally:
            os.sched_setaffinity(0, old)

    def exchange(self, count: int, window: int = 64, idle: float = 2.0, tag: bytes = MAGIC,
                 cpu: int | None = None) -> dict[str, Any]:
        """Send `count` frames, at most `window` unanswered at a time; count the distinct replies.

        Stops when all are answered or nothing came back for `idle` seconds (a frame was lost).
        """
        with self._on_cpu(cpu):
            sent, got = 0, set[int]()
            started = last = time.monotonic()
            while len(got) < count and time.monotonic() - last < idle:
                while sent < count and sent - len(got) < window:
                    self.send(sent, tag)
                    sent += 1
                before = len(got)
                got.update(seq for t, seq in self.replies(0.1) if t == tag)
                if len(got) > before:
                    last = time.monotonic()
            elapsed = time.monotonic() - started
        return {"sent": sent, "replies": len(got), "seconds": elapsed}


# ---- the consumer side of the demo (runs unprivileged) ---------------------------------------------

def echo_consumer(socket_path: str, interface: str, queue: int, count: int, umem: int,
                  timeout: float = 20.0) -> dict[str, Any]:
    """Take a bound grant and answer `count` demo frames by sending each back to its sender."""
    ring = 1024
    started = time.perf_counter()
    grant = request(interface, [queue], geometry=Geometry(umem, 4096, 0, ring, ring, ring, ring),
                    socket_path=socket_path)
    latency_ms = (time.perf_counter() - started) * 1000
    with grant:
        xs = grant.sockets[0]
        result = Reflector([xs]).run(count, timeout)
        result["tags"] = result["tags"][str(queue)]
        result["xsk_stats"] = result["xsk_stats"][str(queue)]
        return {**result, "grant_latency_ms": latency_ms, "xdp_mode": grant.xdp_mode,
                "bind_mode": "zerocopy" if xs.bind_flags & XDP_ZEROCOPY else "copy",
                "consumer_uid": os.getuid(), "lease": grant.lease}


def readable_copy(dest: Path, subpackages: tuple[str, ...] = ("broker", "client", "policy", "wire", "common",
                                                               "testbed")) -> Path:
    """A copy of the xskbroker package under dest (dest/xskbroker) that an unprivileged uid can read, for
    processes that must import it from outside a checkout under a 0700 home. Put dest on their path."""
    root = Path(__file__).resolve().parent.parent
    pkg = dest / "xskbroker"
    pkg.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "xskbroker" / "__init__.py", pkg)  # no checkout beside it: only the copied folders
    for sub in subpackages:
        shutil.copytree(root / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest
