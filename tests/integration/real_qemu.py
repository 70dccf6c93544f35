"""A real af-xdp QEMU for the tests, run guest-less as an unprivileged uid, and a data path through it.

The binary comes from tests/realclients/build-qemu.sh (QEMU and libxdp from Debian's source packages),
which `make test` runs first: it is built once per machine into /var/cache/xskbroker-test. A missing
build fails the test with the command that makes it; it is never skipped.

QEMU runs with `-machine none -accel qtest` (no guest, no /dev/kvm): its af-xdp netdev is joined through
a hub to a `dgram` netdev on 127.0.0.1 in the test's namespace, so a frame the veth peer sends comes out
of QEMU as a UDP datagram to the test, and a datagram the test sends goes out of the AF_XDP socket to the
peer: frames both ways, through QEMU's own af-xdp code, with no guest.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xskbroker.client import qmp as q
from xskbroker.testbed import links
from xskbroker.testbed.links import in_netns
from xskbroker.testbed.sandbox import VethNamespace

from .conftest import CONSUMER_UID, SYSTEM_PYTHON, readable_code

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "realclients" / "build-qemu.sh"
ETH_P_TEST = 0x88B6
TAG = b"XQMU"
FRAME = struct.Struct("!6s6sH4sI")  # dst, src, ethertype, tag, seq


def qemu_binary() -> str:
    """The built QEMU; fails (not skips) the test, with the way to build it, when it is missing."""
    where = subprocess.run([str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True)
    binary = Path(where.stdout.strip()) / "bin" / "qemu-system-x86_64"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"the af-xdp QEMU these tests run is not built: {binary} is missing. `make test` builds it "
                    f"before the tests (about 5 minutes, once per machine); by hand: {BUILD_SCRIPT}", pytrace=False)
    return str(binary)


MEMLOCK = 8 << 20  # Debian's default limit, set explicitly: the same on a machine whose limit differs


def unprivileged(netns: str, ipc_lock: bool, net_raw: bool = False) -> list[str]:
    """Run in the namespace as the consumer uid under an 8 MiB memlock limit, with no capability, or with
    CAP_IPC_LOCK (and, for a QEMU that makes its own sockets, CAP_NET_RAW) as the only ones (ambient, so
    they survive exec into QEMU): stock QEMU's UMEM is 32 MiB per queue, and CAP_IPC_LOCK exempts it from
    the limit without any other privilege."""
    kept = [name for name, on in (("ipc_lock", ipc_lock), ("net_raw", net_raw)) if on]
    caps = ",".join(["-all", *(f"+{c}" for c in kept)])
    return ["ip", "netns", "exec", netns, "prlimit", f"--memlock={MEMLOCK}:{MEMLOCK}", "--",
            "setpriv", f"--reuid={CONSUMER_UID}", f"--regid={CONSUMER_UID}",
            "--clear-groups", f"--inh-caps={caps}", f"--bounding-set={caps}",
            *([f"--ambient-caps={caps}"] if kept else []), "--"]


def xskbroker(*args: str) -> list[str]:
    """The xskbroker command, runnable by the consumer uid (a readable copy of the code, Debian's python)."""
    return ["env", f"PYTHONPATH={readable_code()}", SYSTEM_PYTHON, "-m", "xskbroker.broker", *args]


def free_udp_port(netns: str) -> int:
    with in_netns(netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DataPath:
    """Both ends of the path through QEMU: the veth peer (raw) and the dgram netdev's far end (UDP)."""

    netns: str
    peer_dev: str
    inside_mac: bytes
    peer_mac: bytes
    qemu_port: int = 0
    tag: bytes = TAG  # 4 bytes; two paths on one peer each count only their own frames
    raw: socket.socket = field(init=False)
    udp: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        with in_netns(self.netns):
            self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
            self.raw.bind((self.peer_dev, ETH_P_TEST))
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
        self.qemu_port = free_udp_port(self.netns)

    @property
    def test_port(self) -> int:
        return int(self.udp.getsockname()[1])

    def netdevs(self) -> list[str]:
        """QEMU's side: the dgram netdev on hub 0 (an af-xdp netdev joins the hub through its own hubport)."""
        return ["-netdev", f"dgram,id=udp0,local.type=inet,local.host=127.0.0.1,local.port={self.qemu_port},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={self.test_port}",
                "-netdev", "hubport,id=hub-udp0,hubid=0,netdev=udp0"]

    def close(self) -> None:
        self.raw.close()
        self.udp.close()

    def _frame(self, dst: bytes, src: bytes, seq: int) -> bytes:
        return FRAME.pack(dst, src, ETH_P_TEST, self.tag, seq).ljust(64, b"\0")

    def _seqs(self, sock: socket.socket, timeout: float, raw: bool) -> list[int]:
        out = []
        ready = select.select([sock], [], [], timeout)[0]
        while ready:
            try:
                data, addr = sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if raw and addr[2] == socket.PACKET_OUTGOING:
                continue
            if len(data) >= FRAME.size:
                _, _, ethertype, tag, seq = FRAME.unpack_from(data)
                if ethertype == ETH_P_TEST and tag == self.tag:
                    out.append(seq)
        return out

    def to_qemu(self, count: int) -> int:
        """Frames from the veth peer, into the AF_XDP socket, out of QEMU's dgram netdev: how many arrived."""
        return self._exchange(count, lambda seq: self.raw.send(self._frame(self.inside_mac, self.peer_mac, seq)),
                              lambda t: self._seqs(self.udp, t, raw=False))

    def from_qemu(self, count: int) -> int:
        """Datagrams into QEMU's dgram netdev, out of the AF_XDP socket to the veth peer: how many arrived."""
        return self._exchange(count, lambda seq: self.udp.sendto(self._frame(self.peer_mac, self.inside_mac, seq),
                                                                 ("127.0.0.1", self.qemu_port)),
                              lambda t: self._seqs(self.raw, t, raw=True))

    @staticmethod
    def _exchange(count: int, send: Callable[[int], object], receive: Callable[[float], list[int]],
                  window: int = 32, idle: float = 2.0) -> int:
        sent, got = 0, set[int]()
        last = time.monotonic()
        while len(got) < count and time.monotonic() - last < idle:
            while sent < count and sent - len(got) < window:
                send(sent)
                sent += 1
            before = len(got)
            got.update(s for s in receive(0.05) if s < count)
            if len(got) > before:
                last = time.monotonic()
        return len(got)

    def first_frame(self, timeout: float = 10.0, interval: float = 0.02) -> float:
        """Seconds until a frame from the peer first comes out of QEMU (the path is up), sending one frame
        every `interval` until then."""
        started = time.monotonic()
        seq = 1 << 30
        while time.monotonic() - started < timeout:
            self.raw.send(self._frame(self.inside_mac, self.peer_mac, seq))
            if any(s >= 1 << 30 for s in self._seqs(self.udp, interval, raw=False)):  # any of them: it came out
                return time.monotonic() - started
            seq += 1
        raise TimeoutError(f"no frame came through QEMU within {timeout} s")


@dataclass
class RealQemu:
    proc: subprocess.Popen[bytes]
    qmp_path: str
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def qmp(self, timeout: float = 5.0) -> q.QMP:
        return q.QMP(self.qmp_path, timeout)

    def wait_up(self, timeout: float = 20.0) -> float:
        """Seconds until QEMU has made its netdevs and listens on QMP (it exits if a netdev fails)."""
        started = time.monotonic()
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"QEMU did not open its QMP socket within {timeout} s:\n{self.log()}")
            time.sleep(0.002)
        return time.monotonic() - started

    def quit(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(q.QMPError, q.QMPConnectionError, q.QMPTimeout, OSError), self.qmp() as m:
                m.execute("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


AF_XDP_EXEC = ["-netdev", "af-xdp,id=xdp0,ifname={ifname},queues={queues},start-queue={start_queue},inhibit=on,"
               "sock-fds={sock_fds},mode={xdp_mode}", "-netdev", "hubport,id=hub-xdp0,hubid=0,netdev=xdp0"]


def steer_to_queue(ns: VethNamespace, queue: int) -> None:
    """Every frame the peer sends, from any CPU, on its tx queue `queue`: it arrives on the inside's rx queue
    `queue` (veth keeps the queue)."""
    ncpu = os.cpu_count() or 1
    links.write_sysfs(ns.name, {f"/sys/class/net/{ns.peer}/queues/tx-{q}/xps_cpus":
                                format((1 << ncpu) - 1, "x") if q == queue else "0" for q in range(ns.queues)})


def qemu_args(binary: str, qmp_path: str, netdevs: Sequence[str]) -> list[str]:
    return [binary, "-machine", "none", "-accel", "qtest", "-nodefaults", "-display", "none",
            *netdevs, "-qmp", f"unix:{qmp_path},server=on,wait=off"]


@contextlib.contextmanager
def run_qemu(prefix: Sequence[str], argv_for: Callable[[str], list[str]]) -> Iterator[RealQemu]:
    """Start `prefix + argv_for(qmp_path)` in a fresh directory the consumer uid can write; quit it after."""
    workdir = tempfile.mkdtemp(prefix="xq-qemu-")
    os.chmod(workdir, 0o777)
    qmp_path, log_path = os.path.join(workdir, "vm.qmp"), os.path.join(workdir, "qemu.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*prefix, *argv_for(qmp_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    vm = RealQemu(proc, qmp_path, log_path)
    try:
        yield vm
    finally:
        vm.quit()
        with contextlib.suppress(OSError):
            for name in os.listdir(workdir):
                os.unlink(os.path.join(workdir, name))
            os.rmdir(workdir)
