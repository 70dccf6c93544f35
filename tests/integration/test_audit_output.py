"""Where the audit records go, against a hostile peer and a stuck reader.

A peer names its own executable (any bytes but '/' and NUL, up to PATH_MAX): in a real journald each
record stays one entry whose MESSAGE is one printable line, with the exact bytes in PEER_EXE. A stderr
that nobody reads (a pipe under a supervisor that stopped reading) never stops the broker serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .test_systemd import JOURNAL_SANDBOX, JOURNALD, ROOT, workdir

POLICY = """version = 1

[[allow]]
name = "tests"
users = [0]
interfaces = ["xsk0"]

[admin]
users = [0]
"""
# a directory name that, pasted into a journal MESSAGE, would be a second line that reads as a grant, then a
# terminal escape and a byte that is not UTF-8 (either makes journalctl print "[blob data]" for the line)
FORGED = "grant allowed for uid 0 pid 1 /usr/bin/qemu: bound xsk0 queues 0 by rule tests, lease 0000000000000000"
HOSTILE = b"peer\n" + FORGED.encode() + b"\x1b[2J\xff"
# a client that asks for a grant and holds it until its stdin closes
CLIENT = """
import sys
from xskbroker.client.connection import Connection
from xskbroker.wire import protocol as proto
with Connection(sys.argv[1]) as c:
    reply, fds = c.call(proto.Grant("xsk0", (0,), geometry=proto.Geometry(umem_size=1 << 20, fill=64, completion=64,
                                                                           rx=64, tx=64)))
    print(reply["lease"], flush=True)
    sys.stdin.read()
"""


def _hostile_python(where: Path) -> Path:
    """The system interpreter under a name a peer may choose: a hard link, so /proc/PID/exe names the link."""
    d = Path(os.fsdecode(os.fsencode(str(where)) + b"/" + HOSTILE))
    d.mkdir(parents=True)
    exe = d / "python3"
    try:
        os.link(os.path.realpath("/usr/bin/python3"), exe)
    except OSError:  # another file system: a copy names itself the same way
        shutil.copy2(os.path.realpath("/usr/bin/python3"), exe)
    return exe


@contextlib.contextmanager
def _broker_with_journald(netns: str, wd: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    (wd / "policy.toml").write_text(POLICY)
    path = str(wd / "broker.sock")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "JOURNALD": JOURNALD,
           "WORKDIR": str(wd), "PYTHONPATH": str(ROOT), "LIBXDP_SKIP_DISPATCHER": "1"}
    with open(wd / "broker.log", "wb") as log:
        broker = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", JOURNAL_SANDBOX, "sh",
             "ip", "netns", "exec", netns, "/usr/bin/python3", "-m", "xskbroker.broker", "serve", "--socket", path,
             "--socket-mode", "0666", "--policy", str(wd / "policy.toml"), "--state-dir", str(wd), "--audit",
             "journal", "--umem-pool", "0"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    try:
        wait_for(lambda: os.path.exists(path) or broker.poll() is not None, 10, "the broker")
        assert broker.poll() is None, (wd / "broker.log").read_text()
        yield broker, path
    finally:
        broker.terminate()
        broker.wait(10)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int((wd / "journald.pid").read_text()), signal.SIGTERM)


@pytest.mark.skipif(not (os.path.exists(JOURNALD) and shutil.which("journalctl") and shutil.which("nsenter")
                         and os.path.exists("/usr/bin/python3")),
                    reason="systemd-journald/journalctl (apt-get install systemd), nsenter or python3 are missing")
def test_a_peer_named_to_forge_a_journal_line_gets_one_printable_line(veth: VethNamespace) -> None:
    with workdir() as wd, _broker_with_journald(veth.name, wd) as (broker, path):
        exe = _hostile_python(wd / "exe")
        client = subprocess.Popen([str(exe), "-c", CLIENT, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env={"PYTHONPATH": str(ROOT)})
        assert client.stdout is not None and client.stdin is not None
        lease = client.stdout.readline().decode().strip()
        client.stdin.close()
        client.wait(10)
        assert lease, "no grant"

        def journalctl(*args: str) -> bytes:
            return subprocess.run(["nsenter", f"--mount=/proc/{broker.pid}/ns/mnt", "journalctl", "--no-pager",
                                   "-D", "/run/log/journal", "-t", "xskbroker", *args], capture_output=True,
                                  timeout=30, check=False).stdout

        entries = wait_for(lambda: [json.loads(x) for x in journalctl(f"LEASE={lease}", "XSKBROKER_EVENT=grant",
                                                                      "-o", "json").splitlines()] or None,
                           10, "the grant's entry")
        assert len(entries) == 1, entries
        # the exact bytes where they are matched on (journalctl gives a value that is not UTF-8 as its bytes)
        assert bytes(entries[0]["PEER_EXE"]) == os.fsencode(str(exe)), entries[0]["PEER_EXE"]
        assert json.loads(entries[0]["XSKBROKER_RECORD"])["peer"]["exe"] == str(exe)
        # for people: the grant is one line, shown, and nothing reads as a second grant
        lines = journalctl("-o", "cat").decode("utf-8", "replace").splitlines()
        grants = [x for x in lines if "grant allowed" in x]
        assert len(grants) == 1 and grants[0].startswith("grant allowed for uid 0 pid "), lines
        assert f"lease {lease}" in grants[0] and "\\x0a" + FORGED in grants[0] and "\\x1b[2J\\xff" in grants[0], grants
        short = journalctl().decode("utf-8", "replace")
        assert "blob data" not in short and f"lease {lease}" in short, short


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _lines_until(fd: int, event: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Records read from fd up to and including the first of `event`."""
    got, buf, deadline = [], b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _readable(fd, 0.1):
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"stderr closed before {event}: {buf!r}"
        buf += chunk
        *whole, buf = buf.split(b"\n")
        got += [json.loads(x) for x in whole]
        if any(r.get("event") == event for r in got):
            return got
    raise TimeoutError(f"no {event} record: {got}")


def _ask(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        s.send(data)
        return s.recv(65536)


BAD = [b"not json", b'{"v": 9, "op": "hello"}', b'{"v": 1, "op": "nope"}', b'{"v": 1, "op": "hello", "x": 1}',
       b" " * (proto.MAX_REQUEST + 1)]


def test_a_stderr_nobody_reads_never_stops_the_broker(veth: VethNamespace, tmp_path: Path) -> None:
    """JSON lines on a pipe of one page that the reader stopped reading: every request is still answered, and
    when the reader comes back every record arrives, whole and in order."""
    (tmp_path / "policy.toml").write_text(POLICY)
    os.chmod(tmp_path / "policy.toml", 0o644)
    path = str(tmp_path / "broker.sock")
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIBXDP_SKIP_DISPATCHER": "1"}
    broker = subprocess.Popen(["ip", "netns", "exec", veth.name, sys.executable, "-m", "xskbroker.broker", "serve",
                               "--socket", path, "--policy", str(tmp_path / "policy.toml"), "--state-dir",
                               str(tmp_path), "--audit", "json", "--umem-pool", "0"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=env)
    os.close(w)
    try:
        _lines_until(r, "ready")
        # the reader stops here: 5 records of each kind (the audit's burst) are far more than a page
        for data in BAD:
            for _ in range(5):
                reply = json.loads(_ask(path, data))
                assert reply["ok"] is False, reply
        with Connection(path) as c:  # still answering
            assert c.call(proto.Status())[0]["leases"] == []
        assert broker.poll() is None
        broker.send_signal(signal.SIGTERM)
        got = _lines_until(r, "stopped")
        bad = [x["code"] for x in got if x.get("event") == "bad-request"]
        assert bad == [c for c in ("bad-json", "bad-version", "unknown-op", "bad-request", "too-large")
                       for _ in range(5)], got
        assert broker.wait(10) == 0
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait(10)
        os.close(r)


def test_a_manager_that_does_not_read_its_notify_socket_never_stops_the_broker(veth: VethNamespace,
                                                                                tmp_path: Path) -> None:
    """$NOTIFY_SOCKET bound and never read, a watchdog ping every 10 ms: its queue is full within 0.1 s, and a
    blocking send then held the event loop (unix_wait_for_peer) until the manager read. It keeps answering."""
    (tmp_path / "policy.toml").write_text(POLICY)
    os.chmod(tmp_path / "policy.toml", 0o644)
    path = str(tmp_path / "broker.sock")
    name = f"xskbroker-test-{os.getpid()}-{time.monotonic_ns()}"
    with in_netns(veth.name):  # abstract names are per network namespace
        manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        manager.bind("\0" + name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIBXDP_SKIP_DISPATCHER": "1", "NOTIFY_SOCKET": "@" + name,
           "WATCHDOG_USEC": "20000"}
    with open(tmp_path / "broker.log", "wb") as log:
        broker = subprocess.Popen(["ip", "netns", "exec", veth.name, sys.executable, "-m", "xskbroker.broker",
                                   "serve", "--socket", path, "--policy", str(tmp_path / "policy.toml"), "--state-dir",
                                   str(tmp_path), "--audit", "json", "--umem-pool", "0"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    try:
        wait_for(lambda: os.path.exists(path) or broker.poll() is not None, 10, "the broker")
        time.sleep(0.5)  # fifty pings: the queue is long full
        for _ in range(3):
            with Connection(path, timeout=3) as c:
                assert c.call(proto.Status())[0]["leases"] == []
        manager.setblocking(False)
        first = manager.recv(4096)  # the manager reads again: what it had was the start, and pings still come
        assert first.startswith(b"READY=1\nSTATUS="), first
        manager.setblocking(True)
        manager.settimeout(5)
        assert any(manager.recv(4096) == b"WATCHDOG=1" for _ in range(20))
    finally:
        manager.close()  # first: a broker stuck sending to it is then refused, and can stop
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(10)
