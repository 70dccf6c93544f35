"""The broker operated as a system daemon: it survives a broken policy file on its last good copy, its event
loop feeds the service manager's watchdog (and stops when the loop stops), and running out of lockable memory
says whose limit and how to raise it. Real broker processes, real socket activation, a NOTIFY_SOCKET the test
owns."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, POLICY, wait_for
from .consumers import try_grant
from .test_systemd import SANDBOX_UID, Activation, _readable_copy, _unit_like, unit_capabilities, workdir

pytestmark = pytest.mark.skipif(not shutil.which("systemd-socket-activate") or not shutil.which("setpriv"),
                                reason="needs systemd-socket-activate and setpriv (apt-get install systemd util-linux)")


def _status(path: str) -> dict[str, object]:
    with Connection(path, 10) as c:
        reply, _ = c.call(proto.Status())
    return reply


def _serve(veth: VethNamespace, wd: Path, extra_env: list[str] | None = None, idle: str = "30") -> Activation:
    args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(wd / "state"), "--audit", "json",
            "--idle-timeout", idle]
    sandbox = ["env", *extra_env] if extra_env else None
    return Activation(veth.name, wd, args, sandbox=sandbox)


def _grant_and_stop(act: Activation, veth: VethNamespace) -> dict[str, object]:
    try:
        got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
        act.wait_message("READY")
        return got
    finally:
        act.stop()


@pytest.mark.parametrize("damage", ["syntax-error", "world-writable"])
def test_a_broken_policy_file_starts_on_the_last_good_copy_and_says_so(veth: VethNamespace, damage: str,
                                                                        figures) -> None:
    with workdir() as wd:
        policy = wd / "policy.toml"
        policy.write_text(POLICY.format(uid=CONSUMER_UID))
        policy.chmod(0o644)
        # a good start: it serves, and leaves its copy behind
        first = _serve(veth, wd)
        got = _grant_and_stop(first, veth)
        assert got["ok"] is True, (got, first.text())
        assert (wd / "state" / "policy.lastgood.json").stat().st_mode & 0o777 == 0o600
        if damage == "syntax-error":
            policy.write_text(POLICY.format(uid=CONSUMER_UID) + "\n[[allow]\n")
        else:
            policy.chmod(0o666)
        # the next start: the file is refused, the copy runs, and everyone is told
        act = _serve(veth, wd)
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert got["ok"] is True, (got, act.text())
            ready = act.wait_message("READY")
            assert ready["STATUS"].startswith(f"POLICY FALLBACK: {policy}"), ready
            fallback = next(r for r in act.records() if r["event"] == "policy-fallback")
            assert fallback["path"] == str(policy) and fallback["errors"]
            assert next(r for r in act.records() if r["event"] == "ready")["policy_fallback"] is True
            status = _status(act.path)  # errors: a list for an admin, a count for others
            assert status["policy"]["fallback"] is True and status["policy"]["source"] == str(policy), status
            assert status["policy"]["errors"], status
            # a reload with the file still broken keeps serving the copy
            act.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any(r["event"] == "policy-reload-failed" for r in act.records()), 10, "reload")
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [1], uid=CONSUMER_UID).result()
            assert got["ok"] is True, (got, act.text())
            # fixed: a reload ends the fallback
            policy.write_text(POLICY.format(uid=CONSUMER_UID))
            policy.chmod(0o644)
            act.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: any(r["event"] == "policy-reloaded" for r in act.records()), 10, "reload")
            assert _status(act.path)["policy"] == {"source": str(policy), "fallback": False}
            assert not act.messages()[-1]["STATUS"].startswith("POLICY FALLBACK")
        finally:
            act.stop()
        assert act.proc.returncode == 0, act.text()
        figures(damage=damage, fallback_error=fallback["errors"][0][:100])


def test_with_no_copy_a_broken_policy_still_refuses_to_start(veth: VethNamespace) -> None:
    with workdir() as wd:
        (wd / "policy.toml").write_text("version = 1\n[[allow]\n")
        (wd / "policy.toml").chmod(0o644)
        act = _serve(veth, wd)
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert act.proc.wait(10) == 1
            said = act.messages()
        finally:
            act.stop()
        assert got["ok"] is False and "nothing safe to run" in act.text()
        assert any(m.get("STATUS", "").startswith("not starting: the policy has errors") for m in said), said


def test_the_watchdog_is_fed_from_the_loop_and_starves_when_the_loop_stops(veth: VethNamespace, figures) -> None:
    usec = 400_000  # WatchdogSec=0.4s: a ping every 0.2 s
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        (wd / "policy.toml").chmod(0o644)
        act = _serve(veth, wd, [f"WATCHDOG_USEC={usec}"])
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert got["ok"] is True, (got, act.text())
            act.wait_message("READY")

            def pings(seconds: float) -> list[float]:
                times: list[float] = []
                end = time.monotonic() + seconds
                act.notify.setblocking(True)
                while (left := end - time.monotonic()) > 0:
                    act.notify.settimeout(left)
                    try:
                        data = act.notify.recv(4096)
                    except TimeoutError:
                        break
                    if b"WATCHDOG=1" in data.split(b"\n"):
                        times.append(time.monotonic())
                return times

            act.messages()  # drain what came before
            running = pings(2.0)
            gaps = [b - a for a, b in itertools.pairwise(running)]
            assert len(running) >= 7 and max(gaps) < usec / 1e6, (len(running), gaps)  # every half, never late
            os.kill(act.proc.pid, signal.SIGSTOP)
            try:
                stopped = pings(1.5)
            finally:
                os.kill(act.proc.pid, signal.SIGCONT)
            assert stopped == [], stopped  # systemd would restart it after 0.4 s of this
            resumed = pings(1.0)
            assert len(resumed) >= 3
            assert next(r for r in act.records() if r["event"] == "ready")["watchdog_s"] == usec / 1e6
        finally:
            act.stop()
        figures(watchdog_pings_per_s=round(len(running) / 2.0, 1), max_gap_ms=round(max(gaps) * 1000))


def test_out_of_lockable_memory_names_the_brokers_limit_and_the_fix(veth: VethNamespace, figures) -> None:
    """The unit's user without CAP_IPC_LOCK and with RLIMIT_MEMLOCK at 64 KiB (a host that lowered
    LimitMEMLOCK=): a 4 MiB UMEM cannot be pinned."""
    caps = unit_capabilities()
    assert "ipc_lock" not in caps
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        (wd / "policy.toml").chmod(0o644)
        state = wd / "state"
        state.mkdir(mode=0o700)
        os.chown(state, SANDBOX_UID, SANDBOX_UID)
        code = _readable_copy(wd / "code")
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(state), "--audit", "json",
                "--umem-pool", "0"]
        sandbox = ["prlimit", "--memlock=65536:65536", *_unit_like(caps)]
        act = Activation(veth.name, wd, args, sandbox=sandbox, python=os.path.realpath(sys.executable),
                         pythonpath=code)
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
            ready = act.wait_message("READY")
            record = next(r for r in act.records() if r["event"] == "ready")
            status = _status(act.path)
        finally:
            act.stop()
        assert got["ok"] is False and got["code"] == "kernel-error", got
        assert "No buffer space available" in got["message"]
        assert "locked-memory limit (RLIMIT_MEMLOCK 64 KiB) is too low" in got["message"], got
        assert "LimitMEMLOCK=infinity" in got["message"]
        assert "memlock 64 KiB" in ready["STATUS"], ready
        assert record["limits"]["memlock"] == {"soft": 65536, "hard": 65536, "cap_ipc_lock": False}
        assert status["limits"]["memlock"]["soft"] == 65536 and status["limits"]["nofile"]["soft"] > 0
        figures(memlock_error=got["message"])


# A seccomp filter answering bpf(2) with EPERM, as a container runtime's default profile does; then exec the
# rest of the command line (the broker).
_EXEC_WITH_FILTER = """
import ctypes, os, struct, sys
nr = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS (the syscall number), BPF_JMP|BPF_JEQ|BPF_K, BPF_RET
prog = [(ld, 0, 0, 0), (jeq, 0, 1, nr), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x7FFF0000)]  # ERRNO(EPERM), ALLOW
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code)))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fprog)), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    sys.exit(f"seccomp: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="syscall number for this machine")
def test_a_seccomp_filter_blocking_bpf_is_named(veth: VethNamespace, figures) -> None:
    with workdir() as wd:
        (wd / "policy.toml").write_text(POLICY.format(uid=CONSUMER_UID))
        (wd / "policy.toml").chmod(0o644)
        args = ["--policy", str(wd / "policy.toml"), "--state-dir", str(wd / "state"), "--audit", "json"]
        # the activator (and netns exec before it) run first: the filter is set for the broker alone
        act = Activation(veth.name, wd, args, sandbox=[sys.executable, "-c", _EXEC_WITH_FILTER])
        try:
            got = spawn_unprivileged(try_grant, act.path, veth.inside, [0], uid=CONSUMER_UID).result()
        finally:
            act.stop()
        assert got["ok"] is False and got["code"] == "xdp-attach-failed", (got, act.text())
        assert got["message"].startswith("bpf() is not permitted here: a seccomp filter refuses it"), got
        figures(bpf_blocked_error=got["message"])



def test_reload_runs_policy_check_first() -> None:
    """ExecReload= checks the file before the broker is told: `systemctl reload` fails on a broken file."""
    text = (Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "xskbroker.service").read_text()
    reloads = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecReload=")]
    assert reloads[0].split()[1:3] == ["policy", "check"] and reloads[-1] == "/bin/kill -HUP $MAINPID"
    bad = subprocess.run([sys.executable, "-m", "xskbroker.broker", "policy", "check", "/nonexistent/policy.toml"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "cannot read" in bad.stderr
