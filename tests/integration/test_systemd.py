"""The broker as systemd runs it: real socket activation (systemd-socket-activate), readiness on a
NOTIFY_SOCKET the test owns, idle exit and the next start, the unit's sandbox (its user kind, its
capabilities, no new privileges, no W+X memory, /proc subset=pid), and audit records as journal fields."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import helper_process
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import VethNamespace, in_netns, readable_copy, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, POLICY, wait_for
from .consumers import hold_grant, try_grant

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "deploy" / "systemd" / "xskbroker.service"
SANDBOX_UID = 61876  # in the range systemd gives DynamicUser= services; no account needed
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

pytestmark = pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                                reason="systemd-socket-activate is not installed (apt-get install systemd)")


def unit_capabilities() -> list[str]:
    """The capabilities xskbroker.service keeps, as setpriv names them (net_admin, ...)."""
    m = re.search(r"^CapabilityBoundingSet=(.*)$", SERVICE.read_text(), re.M)
    assert m
    return sorted(c.removeprefix("CAP_").lower() for c in m.group(1).split())


def cap_mask(names: list[str]) -> int:
    numbers = {"net_admin": 12, "net_raw": 13, "ipc_lock": 14, "sys_admin": 21, "perfmon": 38, "bpf": 39}
    return sum(1 << numbers[n] for n in names)


class Activation:
    """`systemd-socket-activate --seqpacket -l PATH ... python -m xskbroker.broker serve` in a namespace.

    The activator binds PATH and waits; the first connection makes it exec the broker with the socket
    as fd 3 (LISTEN_FDS=1), so the broker keeps the activator's pid. `sandbox` goes between the two, as
    the unit's sandboxing goes between systemd and ExecStart.
    """

    def __init__(self, netns: str, workdir: Path, serve_args: list[str], sandbox: list[str] | None = None,
                 python: str = sys.executable, pythonpath: Path = ROOT, preexec: Any = None,
                 wrapper: list[str] | None = None) -> None:
        self.netns, self.workdir = netns, workdir
        self.path = str(workdir / "broker.sock")
        self.log_path = workdir / f"broker-{time.monotonic_ns()}.log"
        self.notify_name = f"xskbroker-test-{os.getpid()}-{time.monotonic_ns()}"
        with in_netns(netns):  # abstract names are per network namespace: bind it where the broker is
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.notify.bind("\0" + self.notify_name)
        self.received: list[dict[str, str]] = []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket unit keeps its socket; the activator makes a new one each run
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        setenv = [f"PYTHONPATH={pythonpath}", "LIBXDP_SKIP_DISPATCHER=1", "PYTHONDONTWRITEBYTECODE=1",
                  f"NOTIFY_SOCKET=@{self.notify_name}"]
        cmd = ["ip", "netns", "exec", netns, *(wrapper or []), "systemd-socket-activate", "--seqpacket",
               "-l", self.path, *[a for e in setenv for a in ("-E", e)], *(sandbox or []),
               python, "-m", "xskbroker.broker", "serve", *serve_args]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                                     preexec_fn=preexec)
        wait_for(lambda: "Listening on" in self.text() or self.proc.poll() is not None, 10, "the activator")
        assert self.proc.poll() is None, self.text()
        os.chmod(self.path, 0o666)  # the activator makes it 0644; the unit says SocketMode= (the consumer is 65534)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def messages(self) -> list[dict[str, str]]:
        self.notify.setblocking(False)
        while True:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def wait_message(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        return wait_for(lambda: next((m for m in self.messages() if key in m), None), timeout, f"{key}= notification")

    def comm(self) -> str:
        return Path(f"/proc/{self.proc.pid}/comm").read_text().strip()

    def status(self) -> dict[str, str]:
        return dict(line.split(":\t", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                    if ":\t" in line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            helper_process.stop(self.proc, 10)
        self.log.close()
        self.notify.close()


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="xskbroker-sd-"))
    os.chmod(d, 0o711)  # the consumer reaches the socket by path
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_socket_activation_first_connection_starts_it_idle_exit_and_the_next_start(veth: VethNamespace,
                                                                                  figures) -> None:
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(wd), "--idle-timeout", "1", "--audit", "json"]
        runs = []
        for _ in range(2):
            act = Activation(veth.name, wd, args)
            try:
                # listening, and nothing started: the process is still the activator, nobody said READY
                assert act.comm().startswith("systemd-socket") and act.messages() == []
                started = time.monotonic()
                got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
                grant_s = time.monotonic() - started
                assert got["ok"] is True and got["queues"] == [0], (got, act.text())
                ready = act.wait_message("READY")
                assert ready["READY"] == "1" and ready["STATUS"].startswith("0 leases")
                assert act.comm().startswith("python")  # the activator exec'ed the broker: same pid
                rc = act.proc.wait(15)  # the consumer is gone and nothing is held: idle exit
                idle_s = time.monotonic() - started - grant_s
                records = act.records()
                statuses = [m["STATUS"] for m in act.messages() if "STATUS" in m]
                assert rc == 0, act.text()
                assert [r["event"] for r in records][-2:] == ["idle-exit", "stopped"], act.text()
                # STATUS= goes at most once a second (the lease lived a few ms): the last one says what happened
                assert act.messages()[-1]["STOPPING"] == "1" and "idle for 1.0s" in statuses[-1]
                assert "0 leases; 1 granted, 0 denied" in statuses[-1], statuses
                ready_rec = next(r for r in records if r["event"] == "ready")
                assert ready_rec["activated"] is True and ready_rec["socket"] == act.path
                runs.append({"grant_s": grant_s, "idle_s": idle_s,
                             "attached": [r for r in records if r["event"] == "xdp-attach"]})
            finally:
                act.stop()
        # the second start picked up where the first left: the program it attached is reused
        assert runs[0]["attached"] and not runs[1]["attached"]
        figures(first_activation_grant_ms=round(runs[0]["grant_s"] * 1000),
                second_activation_grant_ms=round(runs[1]["grant_s"] * 1000),
                idle_exit_after_s=round(runs[0]["idle_s"], 2))


def _readable_copy(dest: Path) -> Path:
    """The packages where an unprivileged uid can read them (the checkout may be under a 0700 home)."""
    return readable_copy(dest)


def _unit_like(caps: list[str]) -> list[str]:
    """What xskbroker.service does to ExecStart, as far as one can without systemd: another uid (as
    DynamicUser=), only these capabilities (CapabilityBoundingSet= and AmbientCapabilities=),
    NoNewPrivileges=."""
    c = ",".join(f"+{x}" for x in caps)
    return ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
            f"--bounding-set=-all,{c}", f"--inh-caps=-all,{c}", f"--ambient-caps=-all,{c}", "--no-new-privs", "--"]


def _private_proc(options: str) -> list[str]:
    """A private /proc mounted with these options: ProcSubset=pid is subset=pid, ProtectProc=invisible
    is hidepid=invisible (the unit keeps other users' processes visible: ProtectProc=default)."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'mount -t proc -o {options} proc /proc && exec "$@"', "sh"]


def _no_wx_memory() -> None:
    """MemoryDenyWriteExecute=: the kernel's own switch for it (6.3+), inherited by everything exec'ed after."""
    ctypes.CDLL(None).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)


def _kernel_has_mdwe() -> bool:
    probe = ("import ctypes, sys; "
             f"sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)")
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is not installed (apt-get install util-linux)")
def test_grant_and_adoption_with_only_the_units_capabilities(veth: VethNamespace, figures) -> None:
    caps = unit_capabilities()
    assert caps == ["net_admin", "net_raw", "sys_admin"]
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        (wd / "policy.toml").chmod(0o644)
        state = wd / "state"  # RuntimeDirectory=: owned by the service's user, 0700
        state.mkdir(mode=0o700)
        os.chown(state, SANDBOX_UID, SANDBOX_UID)
        code = _readable_copy(wd / "code")
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(state), "--audit", "json"]
        mdwe = _kernel_has_mdwe()

        def start(with_caps: list[str]) -> Activation:
            return Activation(veth.name, wd, args, sandbox=_unit_like(with_caps),
                              python=os.path.realpath(sys.executable), pythonpath=code,
                              preexec=_no_wx_memory if mdwe else None, wrapper=_private_proc("subset=pid"))

        outcomes = []
        for _ in ("attach", "adopt"):
            act = start(caps)
            try:
                got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
                assert got["ok"] is True, (got, act.text())
                act.wait_message("READY")
                st = act.status()
                assert st["Uid"].split()[0] == str(SANDBOX_UID) and st["NoNewPrivs"] == "1"
                assert int(st["CapEff"], 16) == int(st["CapBnd"], 16) == cap_mask(caps)
                mounts = Path(f"/proc/{act.proc.pid}/mountinfo").read_text()
                assert re.search(r" /proc .* proc proc \S*subset=pid", mounts)
                grant = next(r for r in act.records() if r["event"] == "grant")
                # what the unit's broker can tell about its peer: all but the executable, which needs
                # CAP_SYS_PTRACE (docs/systemd.md)
                assert grant["peer"]["uid"] == CONSUMER_UID and grant["peer"]["cgroup"] and grant["peer"]["exe"] is None
                outcomes.append([r for r in act.records() if r["event"] == "xdp-attach"])
            finally:
                act.stop()
            assert act.proc.returncode == 0, act.text()
        assert outcomes[0] and not outcomes[1]  # the second broker adopted what the first attached

        # Why the unit keeps CAP_SYS_ADMIN: adopting needs bpf_prog_get_fd_by_id, which CAP_BPF does not allow
        act = start(["bpf", "net_admin", "net_raw"])
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
        finally:
            act.stop()
        assert got["ok"] is False and got["code"] == "xdp-attach-failed", got
        assert "Operation not permitted" in got["message"], got
        figures(unit_capabilities=" ".join(caps), memory_deny_write_execute=mdwe, without_sys_admin=got["message"])


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is not installed (apt-get install util-linux)")
def test_revoke_signal_under_the_units_capabilities(veth: VethNamespace, figures) -> None:
    """The unit keeps no CAP_KILL, so the broker's dynamic user may not signal a holder of another uid:
    `revoke --signal` says so and signals nobody. With the drop-in docs/systemd.md shows (CAP_KILL), it
    signals the real holder."""
    caps = unit_capabilities()
    assert "kill" not in caps
    with workdir() as wd:
        policy = POLICY.format(uid=CONSUMER_UID) + '\n[admin]\nusers = [0]\nrevoke_signal = "SIGTERM"\n'
        (wd / "policy.toml").write_text(policy)
        (wd / "policy.toml").chmod(0o644)
        state = wd / "state"
        state.mkdir(mode=0o700)
        os.chown(state, SANDBOX_UID, SANDBOX_UID)
        code = _readable_copy(wd / "code")
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(state), "--audit", "json"]
        outcomes: dict[str, dict[str, Any]] = {}
        for name, with_caps in (("unit", caps), ("unit + CAP_KILL drop-in", sorted([*caps, "kill"]))):
            act = Activation(veth.name, wd, args, sandbox=_unit_like(with_caps),
                             python=os.path.realpath(sys.executable), pythonpath=code,
                             wrapper=_private_proc("subset=pid"))
            holder = spawn_unprivileged(hold_grant, act.path, veth.inside, [0], 30.0, uid=CONSUMER_UID)
            try:
                wait_for(lambda act=act: any(r.get("decision") == "allow" for r in act.records()), 10, "the grant")
                with Connection(act.path) as c:
                    reply, _ = c.call(proto.Revoke(interface=veth.inside, queue=0, signal=True))
                outcomes[name] = reply["revoked"][0]
                if "kill" in with_caps:
                    wait_for(lambda h=holder: not h.alive(), 5, "the signalled holder to exit")
                else:
                    time.sleep(0.3)
                    assert holder.alive(), "a holder the broker says it did not signal has exited"
            finally:
                holder.kill()
                act.stop()
        unit = outcomes["unit"]
        assert unit["signalled"] is False and "CAP_KILL" in unit["not_signalled"], unit
        assert outcomes["unit + CAP_KILL drop-in"]["signalled"] is True, outcomes
        figures(unit_revoke_signal=unit["not_signalled"])


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is not installed (apt-get install util-linux)")
@pytest.mark.parametrize(("proc_options", "holder_known"),
                         [("subset=pid", True), ("subset=pid,hidepid=invisible", False)],
                         ids=["ProtectProc=default", "ProtectProc=invisible"])
def test_a_lease_outlives_a_crash_of_the_sandboxed_broker(veth: VethNamespace, proc_options: str,
                                                          holder_known: bool) -> None:
    """Recovery recognises the holder by its /proc/PID/stat start time. hidepid=invisible hides other users'
    processes from the broker's user, so the holder could not be told from a stranger and the lease would
    only be kept as an orphan: the reason the unit leaves ProtectProc= at default."""
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        state = wd / "state"
        state.mkdir(mode=0o700)
        os.chown(state, SANDBOX_UID, SANDBOX_UID)
        code = _readable_copy(wd / "code")
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(state), "--audit", "json"]

        def start() -> Activation:
            return Activation(veth.name, wd, args, sandbox=_unit_like(unit_capabilities()),
                              python=os.path.realpath(sys.executable), pythonpath=code,
                              wrapper=_private_proc(proc_options))

        first = start()
        holder = spawn_unprivileged(hold_grant, first.path, veth.inside, [0], 20.0, uid=CONSUMER_UID)
        try:
            # the holder has its fds (the audit record comes before the reply is sent: killing the broker then
            # would leave a lease whose sockets never reached anyone)
            wait_for(lambda: _has_memfd(holder.pid), 10, "the grant's fds in the holder")
            first.proc.kill()  # a crash: no clean-up, the lease journal is all that is left
            first.stop()
            second = start()
            try:
                with Connection(second.path) as c:  # any connection starts it; recovery runs first
                    reply, _ = c.call(proto.Status())
            finally:
                second.stop()
            assert any(r["event"] == "lease-recovered" for r in second.records()), second.text()
            (lease,) = reply["leases"]
            assert lease["pid"] == holder.pid and lease["orphaned"] is (not holder_known), lease
        finally:
            holder.kill()


def _has_memfd(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:") for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


JOURNALD = "/lib/systemd/systemd-journald"
# A private journald: tmpfs over its directories in a mount namespace of the test's own, so neither the
# host's journal nor its files are touched. Then the broker, in the same mount namespace.
JOURNAL_SANDBOX = r"""
set -e
for d in /run/systemd /run/log /var/log/journal; do
    if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
done
mkdir -p /run/log/journal
"$JOURNALD" & echo $! > "$WORKDIR/journald.pid"
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.02; done
exec "$@"
"""


@pytest.mark.skipif(not (os.path.exists(JOURNALD) and shutil.which("journalctl") and shutil.which("nsenter")),
                    reason="systemd-journald/journalctl (apt-get install systemd) or nsenter are missing")
def test_audit_records_in_a_real_journal_answer_journalctl(veth: VethNamespace) -> None:
    """The broker with --audit auto and a journald of its own (the broker speaks its native protocol): the
    queries docs/systemd.md shows find the grant and the denial by their fields."""
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        path = str(wd / "broker.sock")
        log = open(wd / "broker.log", "wb")  # noqa: SIM115 - closed below
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "JOURNALD": JOURNALD,
               "WORKDIR": str(wd), "PYTHONPATH": str(ROOT), "LIBXDP_SKIP_DISPATCHER": "1"}
        broker = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", JOURNAL_SANDBOX, "sh",
             "ip", "netns", "exec", veth.name, "/usr/bin/python3", "-m", "xskbroker.broker", "serve", "--socket", path,
             "--socket-mode", "0666", "--policy", str(wd / "policy.toml"), "--state-dir", str(wd), "--audit", "auto"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)

        def journalctl(*args: str) -> str:
            done = subprocess.run(["nsenter", f"--mount=/proc/{broker.pid}/ns/mnt", "journalctl", "--no-pager",
                                   "-D", "/run/log/journal", "-t", "xskbroker", *args], capture_output=True,
                                  text=True, timeout=30, check=False)
            return done.stdout

        try:
            wait_for(lambda: os.path.exists(path) or broker.poll() is not None, 10, "the broker")
            assert broker.poll() is None, (wd / "broker.log").read_text()
            got = spawn_unprivileged(try_grant, path, veth.inside, [1], uid=CONSUMER_UID).result()
            denied = spawn_unprivileged(try_grant, path, veth.peer, [0], uid=CONSUMER_UID).result()
            assert got["ok"] is True and denied["code"] == "denied-by-rule", (got, denied)
            entries = wait_for(lambda: [json.loads(x) for x in journalctl("XSKBROKER_EVENT=grant", "-o", "json")
                                        .splitlines()] or None, 10, "grant entries in the journal")
            allow = next(e for e in entries if e["DECISION"] == "allow")
            assert {k: allow.get(k) for k in ("PEER_UID", "RULE", "LEASE", "REQUEST_INTERFACE", "REQUEST_QUEUES",
                                              "CODE", "PRIORITY")} == {
                "PEER_UID": str(CONSUMER_UID), "RULE": "tests", "LEASE": got["lease"], "REQUEST_INTERFACE": "xsk0",
                "REQUEST_QUEUES": "1", "CODE": "ok", "PRIORITY": "6"}
            assert allow["PEER_PID"] and allow["PEER_CGROUP"] and allow["PEER_EXE"]  # root broker: all known
            assert json.loads(allow["XSKBROKER_RECORD"])["lease"] == got["lease"]
            notices = journalctl("-p", "notice", "-o", "cat")
            assert f"grant denied for uid {CONSUMER_UID}" in notices and "denied-by-rule" in notices
            assert "grant allowed" not in notices
            by_lease = journalctl(f"LEASE={got['lease']}", "-o", "cat")
            assert "grant allowed" in by_lease and "release" in by_lease
            assert {"ready", "grant", "release"} <= set(journalctl("-F", "XSKBROKER_EVENT").split())
            assert "{" not in (wd / "broker.log").read_text()  # nothing fell back to JSON lines
        finally:
            broker.terminate()
            broker.wait(10)
            log.close()
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.kill(int((wd / "journald.pid").read_text()), signal.SIGTERM)


def _pin_dropin_capabilities() -> list[str]:
    """The capabilities docs/systemd.md's drop-in for serve --pin-root adds, as setpriv names them."""
    text = (ROOT / "docs" / "systemd.md").read_text()
    [block] = [b for b in re.findall(r"```ini\n(.*?)```", text, re.S) if "--pin-root" in b]
    m = re.search(r"^CapabilityBoundingSet=(.*)$", block, re.M)
    assert m
    return sorted(c.removeprefix("CAP_").lower() for c in m.group(1).split())


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is not installed (apt-get install util-linux)")
def test_map_pins_under_the_units_capabilities_and_the_drop_in(figures) -> None:  # type: ignore[no-untyped-def]
    """pins.pin as the unit runs it (another uid, the unit's capabilities; the system call filter is checked in
    test_systemd_units.py) for a tenant, in a root-owned bpffs directory as docs/dpdk.md says: refused with the
    unit's capabilities alone, the tenant's 0600 pin with the drop-in's added."""
    probe = ("import sys\nfrom xskbroker.broker import bpfsys, pins\nfd = bpfsys.map_create(2, 1, 'tenant_map')\n"
             "try:\n    print(pins.pin(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]), 'xsk0', fd))\n"
             "except OSError as e:\n    print(f'{type(e).__name__}: {e.strerror}')\n")
    with workdir() as wd:
        code = _readable_copy(wd / "code")
        root = wd / "bpf"
        root.mkdir(mode=0o755)
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=0755", "bpf", str(root)], check=True)
        try:
            outcomes = []
            for caps in (unit_capabilities(), sorted(set(unit_capabilities()) | set(_pin_dropin_capabilities()))):
                done = subprocess.run([*_unit_like(caps), os.path.realpath(sys.executable), "-c", probe, str(root),
                                       str(CONSUMER_UID)], capture_output=True, text=True, timeout=60, check=False,
                                      env={"PYTHONPATH": str(code), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                assert done.returncode == 0, done.stderr
                outcomes.append(done.stdout.strip())
            pin = root / str(CONSUMER_UID) / "xsk0" / "xsks_map"
            assert outcomes == ["PermissionError: Permission denied", str(pin)], outcomes
            st = pin.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (CONSUMER_UID, CONSUMER_UID, 0o600)
            figures(units_capabilities=outcomes[0], with_the_drop_in=" ".join(_pin_dropin_capabilities()))
        finally:
            subprocess.run(["umount", str(root)], check=False)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv is not installed (apt-get install util-linux)")
def test_a_device_plugin_socket_under_the_units_uid_and_the_drop_in(figures) -> None:  # type: ignore[no-untyped-def]
    """dpsocket.place as the unit runs it, at a path in a root 0755 directory as docs/dpdk.md says: every directory
    on the way is root's (the broker's uid is a dynamic user's), and the socket is the tenant's 0600 with the
    drop-in's capabilities; the unit's alone cannot make the directory or give the socket away."""
    probe = ("import sys\nfrom xskbroker.broker import dpsocket\n"
             "try:\n    print(dpsocket.place(sys.argv[1], int(sys.argv[2]), int(sys.argv[2])).path)\n"
             "except OSError as e:\n    print(f'{type(e).__name__}: {e.strerror}')\n")
    with workdir() as wd:
        code = _readable_copy(wd / "code")
        wd.chmod(0o755)  # the broker opens each directory on the way
        (wd / "afxdp").mkdir(mode=0o755)  # a root 0755 directory in ReadWritePaths=
        path = wd / "afxdp" / "xsk0" / "afxdp.sock"
        outcomes = []
        for caps in (unit_capabilities(), sorted(set(unit_capabilities()) | set(_pin_dropin_capabilities()))):
            done = subprocess.run([*_unit_like(caps), os.path.realpath(sys.executable), "-c", probe, str(path),
                                   str(CONSUMER_UID)], capture_output=True, text=True, timeout=60, check=False,
                                  env={"PYTHONPATH": str(code), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
            assert done.returncode == 0, done.stderr
            outcomes.append(done.stdout.strip())
        figures(units_capabilities=outcomes[0], with_the_drop_in=outcomes[1])
        assert outcomes == ["PermissionError: Permission denied", str(path)], outcomes
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (CONSUMER_UID, CONSUMER_UID, 0o600)
