"""sd_notify over $NOTIFY_SOCKET (file and abstract addresses), and what the daemon tells the manager."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xskbroker.broker.systemd import Notifier, format_state, notify_address

ROOT = Path(__file__).resolve().parents[2]


def _receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(notify_address(address))
    s.settimeout(5)
    return s


def _messages(sock: socket.socket, expect: int = 0) -> list[dict[str, str]]:
    """What has arrived, or (expect > 0) the first `expect` messages, waiting up to 5 s for them."""
    out: list[dict[str, str]] = []
    sock.settimeout(5 if expect else 0.001)
    while not expect or len(out) < expect:
        try:
            data = sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            break
        out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
    return out


def test_addresses() -> None:
    assert notify_address("@abc") == b"\0abc"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None and notify_address(None) is None
    assert notify_address("vsock:2:1234") is None


def test_status_is_one_line_and_bounded() -> None:
    assert format_state(READY=1, STATUS="a\nb  c") == b"READY=1\nSTATUS=a b c"
    assert len(format_state(STATUS="x" * 5000)) < 600


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_ready_status_stopping_reach_the_socket(tmp_path: Path, kind: str) -> None:
    address = f"@xskbroker-test-{os.getpid()}-{time.monotonic_ns()}" if kind == "abstract" else str(tmp_path / "n")
    rx = _receiver(address)
    try:
        n = Notifier({"NOTIFY_SOCKET": address})
        assert n.enabled
        assert n.ready("0 leases")
        assert n.status("1 lease") and not n.status("1 lease")  # unchanged: not sent again
        assert n.stopping("idle")
        n.close()
        assert _messages(rx, 3) == [{"READY": "1", "STATUS": "0 leases"}, {"STATUS": "1 lease"},
                                      {"STOPPING": "1", "STATUS": "idle"}]
    finally:
        rx.close()


def test_without_a_manager_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier({}).ready("x")
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and not gone.ready("x")  # refused: reported, never raised


POLICY = 'version = 1\n[[allow]]\nname = "t"\nusers = [65534]\ninterfaces = ["xsk*"]\n'


def test_daemon_on_a_passed_socket_notifies_and_exits_when_idle(tmp_path: Path) -> None:
    """`xskbroker serve` as a socket unit starts it: READY=1, STATUS= as it goes, STOPPING=1 on idle exit,
    and the manager's socket file is left in place for the next start. Needs no privilege: nothing is
    granted."""
    (tmp_path / "policy.toml").write_text(POLICY)
    sock_path = tmp_path / "broker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(sock_path))
    listener.listen()
    address = f"@xskbroker-unit-{os.getpid()}-{time.monotonic_ns()}"
    rx = _receiver(address)
    script = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=broker exec "$@"'
    cmd = ["sh", "-c", script, "sh", sys.executable, "-m", "xskbroker.broker", "serve", "--socket",
           str(tmp_path / "unused"), "--policy", str(tmp_path / "policy.toml"), "--state-dir", str(tmp_path),
           "--idle-timeout", "0.3", "--audit", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": address}
    try:
        started = time.monotonic()
        done = subprocess.run(cmd, stdin=listener.fileno(), capture_output=True, text=True, timeout=30, env=env,
                              cwd=ROOT, check=False)
        elapsed = time.monotonic() - started
        messages = _messages(rx)
    finally:
        rx.close()
        listener.close()
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    ready = next(r for r in records if r["event"] == "ready")
    assert ready["activated"] is True and ready["socket"] == str(sock_path) and ready["idle_timeout_s"] == 0.3
    assert [r["event"] for r in records][-2:] == ["idle-exit", "stopped"]
    assert messages[0]["READY"] == "1" and messages[0]["STATUS"].startswith("0 leases")
    assert messages[-1]["STOPPING"] == "1" and "idle for 0.3s" in messages[-1]["STATUS"]
    assert sock_path.exists() and not (tmp_path / "unused").exists()  # the manager's socket stays
    assert elapsed < 10


def test_daemon_refuses_a_passed_socket_of_the_wrong_kind(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "s"))
    stream.listen()
    script = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    done = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-m", "xskbroker.broker", "serve", "--policy",
                           str(tmp_path / "policy.toml"), "--state-dir", str(tmp_path), "--audit", "json"],
                          stdin=stream.fileno(), capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    stream.close()
    assert done.returncode == 1
    assert "ListenSequentialPacket" in done.stderr


def test_watchdog_usec_as_sd_watchdog_enabled() -> None:
    from xskbroker.broker.systemd import watchdog_usec
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
    assert watchdog_usec(dict(env), pid=42) == 30_000_000
    assert watchdog_usec(dict(env), pid=43) is None  # inherited, meant for another process
    assert watchdog_usec({"WATCHDOG_USEC": "30000000"}, pid=43) == 30_000_000  # no pid given: ours
    for bad in ({"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "x"}, {"WATCHDOG_USEC": "-5"}, {}):
        assert watchdog_usec(dict(bad), pid=1) is None
    mine = dict(env)
    watchdog_usec(mine, pid=42)
    assert mine == {}  # removed: nothing the broker starts thinks the manager watches it


def test_watchdog_pings_every_half_of_the_timeout(tmp_path: Path) -> None:
    from xskbroker.broker.systemd import Watchdog
    rx = _receiver(str(tmp_path / "n"))
    now = [100.0]
    try:
        dog = Watchdog(Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")}), 10_000_000, clock=lambda: now[0])
        assert dog.interval == 5.0 and dog.timeout() == 0.0
        dog.beat()  # the first turn of the loop
        assert dog.timeout() == 5.0
        now[0] = 103.0
        dog.beat()  # not due: nothing sent
        assert dog.timeout() == 2.0
        now[0] = 105.5
        dog.beat()
        assert dog.sent == 2 and dog.timeout() == 5.0
        assert _messages(rx, 2) == [{"WATCHDOG": "1"}, {"WATCHDOG": "1"}]
    finally:
        rx.close()


def test_status_goes_at_most_once_a_second_and_the_last_change_is_sent_when_due() -> None:
    """One STATUS= per audit record cost the loop a walk of every lease and PID 1 a wake-up per request: a
    burst of grants now sends the first at once and the rest as one line when the loop's timer is due."""
    from types import SimpleNamespace

    from xskbroker.broker.audit import Throttle
    from xskbroker.broker.daemon import STATUS_EVERY, _Status

    address = f"@xskbroker-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = _receiver(address)
    now = [100.0]
    try:
        status = _Status(lambda record: None, Notifier({"NOTIFY_SOCKET": address}), clock=lambda: now[0])
        status.service = SimpleNamespace(leases=[])  # type: ignore[assignment]
        audit = Throttle(status, clock=lambda: now[0])
        for _ in range(50):
            audit({"event": "grant", "decision": "allow"})
        got = _messages(rx)
        assert len(got) == 1 and "1 granted" in got[0]["STATUS"]  # the first at once, then no more for now
        assert audit.next_flush() == 100.0 + STATUS_EVERY  # what the loop's select waits for
        audit.flush_if_due()
        assert _messages(rx) == []  # not yet due
        now[0] += STATUS_EVERY
        audit.flush_if_due()
        got = _messages(rx, 1)
        assert "50 granted" in got[0]["STATUS"]  # the last change, once
        assert audit.next_flush() is None  # nothing changed since
        audit({"event": "grant", "decision": "allow"})
        audit({"event": "policy-reloaded"})  # what an operator who just reloaded waits to see: at once
        assert "51 granted" in _messages(rx, 1)[0]["STATUS"]  # the grant before it rides along
        assert _messages(rx) == [] and audit.next_flush() is None
    finally:
        rx.close()


def test_a_manager_that_does_not_read_never_blocks_the_loop() -> None:
    """Its queue (net.unix.max_dgram_qlen datagrams) full, a blocking send stopped the broker's event loop until the
    manager read: every client waited (a real broker was seen stuck in unix_wait_for_peer, answering no one)."""
    import threading

    address = f"@xskbroker-test-{os.getpid()}-{time.monotonic_ns()}"
    rx = _receiver(address)
    try:
        n = Notifier({"NOTIFY_SOCKET": address})
        results: list[bool] = []

        def pings() -> None:
            results.extend(n.send(WATCHDOG=1) for _ in range(200))
            results.append(n.status("changed"))
        t = threading.Thread(target=pings, daemon=True)  # a blocking send hangs it, not the test
        t.start()
        t.join(5)
        assert not t.is_alive(), "a notification waited for a manager that does not read"
        assert results[0] and not results[-1]  # the queue took the first ones, then refused at once
        started = time.monotonic()
        assert not n.send(0.2, READY=1)  # READY=1 waits, but only as long as it is told
        assert 0.15 < time.monotonic() - started < 2
        _messages(rx)  # the manager reads again
        assert n.status("changed")  # the one its full queue refused goes now
        assert _messages(rx, 1)[-1] == {"STATUS": "changed"}
    finally:
        rx.close()
