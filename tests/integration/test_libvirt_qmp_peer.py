"""The libvirt hook's worker (running as root) against a hostile process behind its QMP socket.

The worker asks the broker as the user of the process behind the monitor socket and sends the granted sockets
down that socket. Whoever can bind the configured QMP path (QEMU's own user: QEMU binds it, so its directory is
that user's) chooses that process. Here a user listens, then execs a set-user-id root program (any will do:
su, passwd, sudo waiting for a password; a setuid copy of sleep stands in), so /proc names root as that
process's effective user. The worker must not ask the broker as root, and the user must get no socket.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import metadata as lvmeta
from xskbroker.client.libvirt import monitors as lvmon
from xskbroker.client.libvirt import worker as lvworker
from xskbroker.testbed.pids import PidTaken, fork_on, on_a_free_pid
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, fork_child

ATTACKER = 65534
AF_XDP = 44
SO_DOMAIN = 39
_libc = ctypes.CDLL(None, use_errno=True)

# root may have bare grants, and is admin as in deploy/policy.example.toml; the attacker has no rule at all
POLICY = """\
version = 1

[[allow]]
name = "root"
users = [0]
interfaces = ["xsk*"]
kinds = ["bare"]

[admin]
users = [0]
"""


def become_attacker() -> None:
    # a plain user: no no_new_privs, so a set-user-id program it execs runs as root, as on any system
    os.setgroups([])
    os.setresgid(ATTACKER, ATTACKER, ATTACKER)
    os.setresuid(ATTACKER, ATTACKER, ATTACKER)


def _euid(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])
    return None


def _domain(fd: int) -> int:
    """SO_DOMAIN of a socket fd (Python's socket() cannot wrap an AF_XDP one)."""
    value, size = ctypes.c_int(-1), ctypes.c_uint(4)
    _libc.getsockopt(fd, socket.SOL_SOCKET, SO_DOMAIN, ctypes.byref(value), ctypes.byref(size))
    return value.value


def serve_qmp(srv: socket.socket) -> dict[str, Any]:
    """Accept one connection and answer it like QEMU (without af-xdp), keeping every fd sent."""
    srv.settimeout(20)
    conn, _ = srv.accept()
    conn.settimeout(20)
    conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": ""}, '
                 b'"capabilities": []}}\n')
    got: list[int] = []
    buf = b""
    with contextlib.suppress(OSError):
        while True:
            fds = array.array("i")
            data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(64 * fds.itemsize))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
            got += fds.tolist()
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                cmd = json.loads(line)
                reply: dict[str, Any] = {"return": {}}
                if cmd["execute"] == "query-version":
                    reply = {"return": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": ""}}
                elif cmd["execute"] == "query-qmp-schema":
                    reply = {"return": []}
                elif cmd["execute"] == "netdev_add":
                    reply = {"error": {"class": "GenericError", "desc": "no"}}
                if "id" in cmd:
                    reply["id"] = cmd["id"]
                conn.sendall(json.dumps(reply).encode() + b"\n")
    xsk = [fd for fd in got if _domain(fd) == AF_XDP]
    return {"af_xdp_sockets": len(xsk), "fds": len(got)}


def fake_qmp_behind_setuid(path: str, setuid_program: str) -> dict[str, Any]:
    """Bind `path`, listen in a child that then execs the set-user-id program, and speak QMP to whoever
    connects, keeping every fd sent. Returns how many AF_XDP sockets arrived."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            srv.listen(4)  # SO_PEERCRED of every connection now names this process
            os.write(w, b"l")
            os.execv(setuid_program, [setuid_program, "60"])
        finally:
            os._exit(1)
    os.close(w)
    try:
        os.read(r, 1)
        deadline = time.monotonic() + 5
        while _euid(child) != 0:  # the exec is done: /proc now says root
            assert time.monotonic() < deadline, "the set-user-id program did not start"
            time.sleep(0.01)
        return serve_qmp(srv)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@contextlib.contextmanager
def attack_dir() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="xskqmp-peer-"))
    try:
        os.chmod(where, 0o777)
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_qmp_socket_whose_listener_became_setuid_root_gets_no_grant_as_root(veth: VethNamespace,
                                                                              tmp_path: Path) -> None:
    with attack_dir() as where, BrokerProcess(veth.name, POLICY) as broker:
        setuid_sleep = where / "setuid-sleep"
        shutil.copy(shutil.which("sleep") or "/bin/sleep", setuid_sleep)
        os.chown(setuid_sleep, 0, 0)
        os.chmod(setuid_sleep, 0o4755)
        path = str(where / "vm1.qmp")
        attacker = fork_child(become_attacker, ATTACKER, fake_qmp_behind_setuid, path, str(setuid_sleep))
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline and attacker.alive(), "the attacker did not bind its socket"
            time.sleep(0.01)
        cfg = lvconf.Config(socket=broker.socket_path, state_dir=str(tmp_path), timeout=5.0)
        lines: list[str] = []
        state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", veth.inside)], cfg,
                                    lvmon.QMPMonitor(path, 5.0), lines.append)
        got = attacker.result(30)

        assert got["af_xdp_sockets"] == 0, f"the attacker received root's grant: {lines}"
        assert not [r for r in broker.records() if r.get("event") == "grant" and r.get("decision") == "allow"]
        assert state["interfaces"] == [] and "set-user-id or set-group-id" in state["error"]


VICTIM = 1  # another user, whom the policy allows: its process takes the pid the listener left

VICTIM_POLICY = f"""\
version = 1

[[allow]]
name = "victim"
users = [{VICTIM}]
interfaces = ["xsk*"]
kinds = ["bare"]
"""


def fake_qmp_of_a_dead_listener(where: str) -> dict[str, Any]:
    """Bind where/vm1.qmp and listen in a child that exits at once (SO_PEERCRED keeps naming its pid), tell
    the test that pid in where/pid, wait for where/go (the pid is someone else's now), then speak QMP."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.path.join(where, "vm1.qmp"))
    child = os.fork()
    if child == 0:
        srv.listen(4)
        os._exit(0)
    os.waitpid(child, 0)
    Path(where, "pid.tmp").write_text(str(child))
    os.rename(os.path.join(where, "pid.tmp"), os.path.join(where, "pid"))
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(where, "go")):
        assert time.monotonic() < deadline, "no go"
        time.sleep(0.01)
    return serve_qmp(srv)


def start_victim_at(pid: int) -> int:
    """A process of uid VICTIM with exactly this pid (root may choose the next pid: testbed.pids)."""
    if fork_on(pid) == 0:
        try:
            os.setgroups([])
            os.setresgid(VICTIM, VICTIM, VICTIM)
            os.setresuid(VICTIM, VICTIM, VICTIM)
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


def test_a_qmp_socket_whose_listener_exited_gets_no_grant_as_whoever_took_its_pid(veth: VethNamespace,
                                                                                tmp_path: Path) -> None:
    def scenario() -> None:
        with attack_dir() as where, BrokerProcess(veth.name, VICTIM_POLICY) as broker:
            attacker = fork_child(become_attacker, ATTACKER, fake_qmp_of_a_dead_listener, str(where))
            deadline = time.monotonic() + 10
            while not (where / "pid").exists():
                assert time.monotonic() < deadline and attacker.alive(), "the attacker did not listen"
                time.sleep(0.01)
            try:
                victim = start_victim_at(int((where / "pid").read_text()))
            except PidTaken:
                attacker.kill()
                raise
            try:
                (where / "go").touch()
                cfg = lvconf.Config(socket=broker.socket_path, state_dir=str(tmp_path), timeout=5.0)
                lines: list[str] = []
                state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", veth.inside)], cfg,
                                            lvmon.QMPMonitor(str(where / "vm1.qmp"), 5.0), lines.append)
                got = attacker.result(30)
            finally:
                os.kill(victim, signal.SIGKILL)
                os.waitpid(victim, 0)

            assert got["af_xdp_sockets"] == 0, f"the attacker received uid {VICTIM}'s grant: {lines}"
            assert not [r for r in broker.records() if r.get("event") == "grant" and r.get("decision") == "allow"]
            assert state["interfaces"] == [] and "has exited" in state["error"]

    on_a_free_pid(scenario)
