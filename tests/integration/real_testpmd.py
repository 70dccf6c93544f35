"""A real DPDK testpmd (Debian trixie's 24.11 binaries) for the tests, run in its cached trixie root tree.

The tree comes from tests/realclients/build-testpmd.sh, which `make test` runs first (once per machine,
into /var/cache/xskbroker-test). A missing tree fails the test with the command that makes it.

testpmd runs in the test's network namespace, in a private mount namespace where the tree is bound
read-only over itself, with /dev, /proc and the namespace's /sys bound in, a fresh tmpfs on /tmp (its
XDG_RUNTIME_DIR is there: a non-root EAL needs a writable one) and the endpoint's socket directory bound at
/tmp/dp. Then chroot, and the tree's own setpriv drops to the tenant uid with CAP_NET_RAW as its only
capability (socket(AF_XDP)). Memory: 2 MiB hugepages through memfd (--in-memory: no hugetlbfs mount),
reserved while the test runs (hugepages_reserved, which says why not on demand), and 2600 mbufs (the PMD
takes 2048 for its fill ring at once), so its UMEM fits the 8 MiB memlock limit (a limit, not a
capability). Interactive (-i): the test types commands on its stdin and reads the stats back (stdbuf -oL:
testpmd's printf output would otherwise sit in stdio's pipe buffer while its prompt, written directly, runs
ahead).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "realclients" / "build-testpmd.sh"
# Debian's default, explicit. The UMEM is the mempool's memory: 2600 mbufs of 2112 bytes (5.2 MiB) on
# hugepages fit; with --no-huge each mbuf takes a 4 KiB page of its own (no object crosses a page) and 2048
# of them alone are 8 MiB, so --no-huge needs CAP_IPC_LOCK on top.
MEMLOCK = 8 << 20
PROMPT = b"testpmd> "
CAP_NET_RAW = 1 << 13


def dpdk_tree() -> Path:
    """The trixie tree; fails (not skips) the test, with the way to make it, when it is missing."""
    where = subprocess.run([str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True)
    tree = Path(where.stdout.strip())
    if not os.access(tree / "usr/bin/dpdk-testpmd", os.X_OK):
        pytest.fail(f"the DPDK testpmd these tests run is not there: {tree} is missing. `make test` makes it "
                    f"before the tests (debootstrap + apt, once per machine); by hand: {BUILD_SCRIPT}", pytrace=False)
    return tree


# Runs as root in the test's netns, in a mount namespace of its own: $1 tree, $2 socket dir or "",
# $3 uid ("" = stay root), $4 caps for setpriv, $5 hostname ("" = the host's), then testpmd's arguments.
_LAUNCH = r"""
set -eu
T=$1 DP=$2 U=$3 CAPS=$4 H=$5; shift 5
if [ -n "$H" ]; then printf %s "$H" > /proc/sys/kernel/hostname; fi   # in a UTS namespace of its own
mount --bind "$T" "$T" && mount -o remount,bind,ro "$T"
mount --rbind /dev "$T/dev" && mount --rbind /proc "$T/proc" && mount --rbind /sys "$T/sys"
mount -t tmpfs -o mode=1777,size=64m tmpfs "$T/tmp"
mount -t tmpfs -o mode=0755,size=8m tmpfs "$T/run"   # a root EAL's runtime directory
if [ -n "$DP" ]; then mkdir "$T/tmp/dp" && mount --bind "$DP" "$T/tmp/dp"; fi
mkdir -m 0700 "$T/tmp/run"
if [ -z "$U" ]; then
  mount -t bpf bpf "$T/sys/fs/bpf"   # libxdp of a root testpmd pins its dispatcher there
  exec chroot "$T" env XDG_RUNTIME_DIR=/tmp/run stdbuf -oL dpdk-testpmd "$@"
fi
chown "$U:$U" "$T/tmp/run"
exec chroot "$T" setpriv --reuid="$U" --regid="$U" --clear-groups --inh-caps="$CAPS" --bounding-set="$CAPS" \
  --ambient-caps="$CAPS" -- env XDG_RUNTIME_DIR=/tmp/run stdbuf -oL dpdk-testpmd "$@"
"""


def launch_argv(netns: str, tree: Path, eal: Sequence[str], app: Sequence[str], uid: int | None,
                 sockdir: str | None = None, caps: str = "-all,+net_raw", hostname: str = "") -> list[str]:
    uts = ["--uts"] if hostname else []
    return ["ip", "netns", "exec", netns, "prlimit", f"--memlock={MEMLOCK}:{MEMLOCK}", "--",
            "unshare", "--mount", *uts, "--propagation", "private", "--", "sh", "-c", _LAUNCH, "testpmd",
            str(tree), sockdir or "", "" if uid is None else str(uid), caps, hostname, *eal, "--", *app]


def af_xdp_vdev(iface: str, queue: int, dp_path: str | None) -> str:
    # 24.11 reads dp_path only with use_cni=1 (or use_pinned_map=1): dp_path alone fails the probe
    extra = f",use_cni=1,dp_path={dp_path}" if dp_path else ""
    return f"net_af_xdp0,iface={iface},start_queue={queue},queue_count=1{extra}"


def eal_args(prefix: str, vdev: str, lcores: str = "0,1") -> list[str]:
    # --in-memory: hugepages from memfd (no hugetlbfs mount, nothing shared on disk)
    return ["-l", lcores, "--in-memory", "-m", "32", "--no-pci",
            f"--file-prefix={prefix}", "--vdev", vdev, "--log-level=pmd.net.af_xdp:debug"]


class RunningPmd:
    """testpmd -i, driven through its stdin; its whole output is kept for a failure's message."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.output = b""
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def read_until(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """Output up to and including the next `marker` (from what was not yet consumed)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        start = len(self.output) - len(self._pending)
        while marker not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"testpmd: no {marker!r} within {timeout}s:\n{self.text()}")
            if select.select([self.proc.stdout], [], [], min(left, 0.2))[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:  # end of output: it exited
                    raise AssertionError(f"testpmd: no {marker!r} (exit {self.proc.wait()}):\n{self.text()}")
                self.output += chunk
        end = self.output.index(marker, start) + len(marker)
        self._consumed = end
        return self.output[start:end]

    _consumed = 0

    @property
    def _pending(self) -> bytes:
        return self.output[self._consumed:]

    def ready(self, timeout: float = 30.0) -> RunningPmd:
        """Up to the first prompt, with its port started (testpmd prompts even when no port works)."""
        head = self.read_until(PROMPT, timeout)
        if b"Start ports failed" in head or b"No probed ethernet devices" in head:
            raise AssertionError(f"testpmd started no port:\n{self.text()}")
        return self

    def cmd(self, line: str, timeout: float = 10.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read_until(PROMPT, timeout).decode(errors="replace")

    def stats(self) -> dict[str, int]:
        """Port 0's counters (RX-packets, TX-packets, ...) and pps since the last call."""
        out = self.cmd("show port stats 0")
        got = {k.lower().replace("-", "_"): int(v) for k, v in re.findall(r"([A-Za-z-]+):\s+(\d+)", out)}
        return got

    def text(self) -> str:
        return self.output.decode(errors="replace")[-6000:]

    def close(self, timeout: float = 10.0) -> int:
        """quit, then wait; killed if it hangs. Returns its exit status (again when called again)."""
        assert self.proc.stdout is not None
        if self.proc.stdout.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                self.output += chunk
        self.proc.stdout.close()
        return self.proc.returncode


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def hugepages_reserved(pages: int = 128) -> Iterator[None]:
    """At least `pages` 2 MiB hugepages in the pool while the block runs; the previous count comes back after
    (pages still in use then are given back as they are freed).

    Reserved, not made on demand (nr_overcommit_hugepages): EAL counts a NUMA node's free hugepages when the
    node reports any, and only those, so with pages made on demand a testpmd starting while another process
    had made pages and not yet used them saw just those (2 MB) and gave up."""
    before = int(NR_HUGEPAGES.read_text())
    NR_HUGEPAGES.write_text(str(max(before, pages)))
    try:
        yield
    finally:
        NR_HUGEPAGES.write_text(str(before))


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[RunningPmd]:
    t = RunningPmd(argv)
    try:
        yield t
    finally:
        t.close()
