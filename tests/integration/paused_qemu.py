"""A paused QEMU (Debian's qemu-system-x86, no KVM, -S) with a QMP socket, for the QMP tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xskbroker.broker import helper_process
from xskbroker.broker.xsk import kernel_enforces_bindtodevice
from xskbroker.client import qmp as q

from .conftest import wait_for

QEMU = shutil.which("qemu-system-x86_64")
SKIP = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(apt-get install qemu-system-x86; `make test` does)")


def skip_unless_bare_is_supported(code: str, message: str) -> None:
    """Skip on `unsupported-kind` only where the kernel really lacks what bare grants need (Linux < 6.5: an
    AF_XDP bind ignores SO_BINDTODEVICE). On a kernel that has it, the refusal is a broker bug: fail."""
    if code != "unsupported-kind":
        return
    if kernel_enforces_bindtodevice():
        pytest.fail(f"the broker refused a bare grant on {os.uname().release}, which confines AF_XDP binds "
                    f"(Linux 6.5+): {message}")
    pytest.skip(f"bare grants need Linux 6.5 or later ({os.uname().release}): {message}")


NOT_AF_XDP = "Parameter 'type' does not accept value 'af-xdp'"  # QEMU 7.2's own words for an unknown netdev type


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    qmp_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_links(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
        return out

    def connect(self, timeout: float = 5.0) -> q.QMP:
        return q.QMP(self.qmp_path, timeout)


@contextlib.contextmanager
def qemu(*machine: str, user: int | None = None) -> Iterator[Qemu]:
    """A paused QEMU with a QMP socket in a fresh directory (0777 when QEMU runs as `user`, to make it there)."""
    assert QEMU is not None
    workdir = tempfile.mkdtemp(prefix="xskqmp-")
    os.chmod(workdir, 0o777 if user is not None else 0o700)
    path = os.path.join(workdir, "vm.qmp")
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    cmd = [*prefix, QEMU, *machine, "-nodefaults", "-display", "none", "-S", "-qmp", f"unix:{path},server=on,wait=off"]
    log = open(os.path.join(workdir, "qemu.log"), "wb")  # noqa: SIM115 - closed in finally
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in (1, 2):
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                vm = _started(proc, path, cmd, log.name)
                break
            except q.QMPConnectionError:
                # Debian's QEMU 7.2 once died by SIGSEGV answering its first query-status, before any test
                # step: a crash of QEMU's own start-up, not of what the tests exercise. Start it once more.
                if attempt == 2 or proc.poll() is None or proc.returncode >= 0:  # alive, or exited itself
                    raise
                print(f"QEMU died at start-up (signal {-proc.returncode}): started again; its log:\n"
                      + Path(log.name).read_text(errors="replace")[-2000:])
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        yield vm
    finally:
        if proc is not None:
            proc.terminate()
            helper_process.stop(proc, 5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _started(proc: subprocess.Popen[bytes], path: str, cmd: list[str], log_name: str) -> Qemu:
    """QEMU up and answering on its QMP socket at path, the start-up connection gone."""
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"QEMU did not start ({' '.join(cmd)}):\n{Path(log_name).read_text()}")
        time.sleep(0.005)
    vm = Qemu(proc, path)
    # the socket exists before QEMU has finished starting (it makes more fds after): one answered
    # command proves it is up, then its connection's socket must be gone before tests count fds
    listening = [x for x in vm.fd_links() if x.startswith("socket:")]  # made before the file is bound
    while True:  # bound before it listens: ECONNREFUSED for a moment
        try:
            with vm.connect() as m:
                m.execute("query-status")
            break
        except q.QMPConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    wait_for(lambda: [x for x in vm.fd_links() if x.startswith("socket:")] == listening, 5.0,
             "QEMU to drop the start-up QMP connection")
    return vm


def binary_version() -> str:
    assert QEMU is not None
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"QEMU emulator version (\S+)", out)
    assert m, out
    return m.group(1)


def inode(s: socket.socket) -> str:
    return f"socket:[{os.fstat(s.fileno()).st_ino}]"


def eof(s: socket.socket) -> bool:
    """True once no process (this one or QEMU) holds the other end of the pair."""
    s.settimeout(2.0)
    return s.recv(1) == b""


def held(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        s.recv(1)
    except TimeoutError:
        return True
    return False


# the policy the QMP tests' real bare grants are judged by
BARE_POLICY = """\
version = 1

[[allow]]
name = "qmp-tests"
users = [0]
interfaces = ["xsk*"]
queues = ["0-7"]
kinds = ["bare"]
max_queues = 2
"""
