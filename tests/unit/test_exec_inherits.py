"""`xskbroker exec` end to end against a fake broker: the command it runs holds exactly the grant's fds, at the
numbers its arguments and XSKBROKER_GRANT name, however the launcher was started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xskbroker.wire import protocol as proto

from .. import fake_broker

BARE = proto.ok_reply("grant", None, lease="L1", kind="bare", interface="eth1", ifindex=7, xdp_mode="skb",
                      sockets=[{"queue": 0, "fd": 0}, {"queue": 1, "fd": 1}], memlock={"ok": True})
# the command: writes what it holds (each fd with the inode it refers to), its argv and XSKBROKER_GRANT to a file
REPORT = """
import json, os, sys
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[name] = os.stat(int(name)).st_ino
    except OSError:
        pass
with open(sys.argv[1], "w") as f:
    json.dump({"fds": fds, "argv": sys.argv[2:], "grant": json.loads(os.environ.get("XSKBROKER_GRANT", "null"))}, f)
"""


class FakeBroker(fake_broker.FakeBroker):
    """Answers one grant with BARE and two socketpair ends (their inodes kept, to know them in the command)."""

    def __init__(self, path: str) -> None:
        self.inodes: list[int] = []
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        while data := conn.recv(proto.MAX_REQUEST + 1):
            if json.loads(data)["op"] == "grant":
                pairs = [socket.socketpair() for _ in range(2)]
                self.inodes = [os.fstat(a.fileno()).st_ino for a, _ in pairs]
                socket.send_fds(conn, [BARE], [a.fileno() for a, _ in pairs])
                for a, b in pairs:
                    a.close()
                    b.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, FakeBroker]]:
    yield from fake_broker.serving(FakeBroker, tmp_path)


def run_exec(sock: str, command: list[str], closed: str = "") -> subprocess.CompletedProcess[str]:
    """`xskbroker exec` on `command`; `closed`: shell redirections closing some of the launcher's 0, 1, 2."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-m", "xskbroker.broker", "exec", "--socket", sock, "-i", "eth1", "--queues", "2",
            "--", *command]
    line = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    return subprocess.run(["sh", "-c", f"exec {line} {closed}"], env=env, capture_output=True, text=True,
                          timeout=30)


def report_command(out: Path, *args: str) -> list[str]:
    script = out.with_suffix(".py")
    script.write_text(REPORT)
    return [sys.executable, str(script), str(out), *args]


def test_the_command_holds_exactly_the_grants_fds(broker: tuple[str, FakeBroker], tmp_path: Path) -> None:
    path, fake = broker
    out = tmp_path / "report.json"
    r = run_exec(path, report_command(out, "sock-fds={sock_fds}"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    fds = [s["fd"] for s in rep["grant"]["sockets"]]
    assert rep["argv"] == ["sock-fds=" + ":".join(map(str, fds))]
    # the listing's own directory fd is closed by the time it is looked at: every fd named is one inherited
    held = {int(k): v for k, v in rep["fds"].items() if int(k) > 2}
    assert held == dict(zip(fds, fake.inodes, strict=True))


@pytest.mark.parametrize("closed", ["<&-", ">&- 2>&-", "<&- >&- 2>&-"])
def test_a_launcher_started_with_std_fds_closed_hands_over_the_grant(broker: tuple[str, FakeBroker],
                                                                    tmp_path: Path, closed: str) -> None:
    path, fake = broker
    out = tmp_path / "report.json"
    r = run_exec(path, report_command(out, "sock-fds={sock_fds}"), closed)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    fds = [s["fd"] for s in rep["grant"]["sockets"]]
    assert all(fd > 2 for fd in fds), fds  # 0, 1 and 2 are the command's stdin, stdout and stderr
    assert rep["argv"] == ["sock-fds=" + ":".join(map(str, fds))]
    assert [rep["fds"][str(fd)] for fd in fds] == fake.inodes


@pytest.mark.parametrize("arg", ["}", "{", "a}b", "{sock_fds", "{queues:d}", "{sock_fds!x}"])
def test_a_lone_brace_or_a_bad_format_is_a_clean_error(broker: tuple[str, FakeBroker], tmp_path: Path,
                                                        arg: str) -> None:
    path, _ = broker
    out = tmp_path / "report.json"
    r = run_exec(path, report_command(out, arg))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_braces_and_placeholders(broker: tuple[str, FakeBroker], tmp_path: Path) -> None:
    path, _ = broker
    out = tmp_path / "report.json"
    r = run_exec(path, report_command(out, "{{sock_fds}}", "x{queues}y{queues}", "{{}}", "{ifname}:{lease}"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["argv"] == ["{sock_fds}", "x2y2", "{}", "eth1:L1"]


def test_a_command_not_found_exits_127(broker: tuple[str, FakeBroker]) -> None:
    path, _ = broker
    r = run_exec(path, ["/nonexistent/cmd"])
    assert r.returncode == 127 and "cannot run" in r.stderr, r.stderr
