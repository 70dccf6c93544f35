"""Under a real systemd: PID 1 of a booted container (testbed/container.py), driven through systemctl.

deploy/install.sh installs the units into the container, systemd creates the group from sysusers.d and
listens; an unprivileged member of that group gets a grant on a veth inside the container's network
namespace. Then what an administrator meets: idle exit and the next activation, `kill -9` with a live
lease, a broken policy, a stuck event loop, uninstall. One container serves the module, in this order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.testbed import container
from xskbroker.testbed.container import OPT, SRC, Container

from .conftest import cpu_list

ROOT = Path(__file__).resolve().parents[2]
USER = "alice"  # a member of the socket group
STRANGER = "mallory"  # not a member
XSK = f"{OPT}/bin/xskbroker"
UNIT = "xskbroker.service"
SOCKET = "xskbroker.socket"
IDLE = 3  # seconds: the unit's --idle-timeout, shortened so idle exits happen within a test
DROPIN = f"/etc/systemd/system/{UNIT}.d/test.conf"
HOLDER = "holder.service"

POLICY = """\
version = 1

[[allow]]
name = "socket-group"
groups = ["xskbroker"]
interfaces = ["xsk*"]
queues = ["0-1"]
kinds = ["bound"]
max_queues = 2
max_umem = "16MiB"

[admin]
users = [0]
"""
BROKEN = "version = 1\n[[allow]\nname = \n"


pytestmark = pytest.mark.skipif(container.host_missing() is not None, reason=str(container.host_missing()))


def put(box: Container, path: str, text: str, mode: str = "0644") -> None:
    box.run("install", "-D", "-m", mode, "/dev/stdin", path, input=text)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


BOOT: dict[str, float] = {}  # the container's boot (and first build), reported with the first grant's figures


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    with tempfile.TemporaryDirectory(prefix="xskt-pid1-") as tmp:
        built = not container.tree_path().exists()
        t0 = time.monotonic()
        with container.booted(ROOT, Path(tmp), f"xskt-pid1-{os.getpid()}") as b:
            if built:
                BOOT["tree_build_s"] = round(time.monotonic() - t0 - b.boot_seconds, 1)
            BOOT["boot_s"] = round(b.boot_seconds, 2)
            setup(b)
            yield b


def setup(box: Container) -> None:
    out = box.run("sh", f"{SRC}/deploy/install.sh", "--bindir", f"{OPT}/bin").stdout
    assert "next: systemctl enable --now xskbroker.socket" in out, out
    # the group comes from sysusers.d, made by install.sh through systemd-sysusers
    assert box.run("getent", "group", "xskbroker").stdout.startswith("xskbroker:")
    box.run("useradd", "--no-create-home", "--groups", "xskbroker", USER)
    box.run("useradd", "--no-create-home", STRANGER)
    box.host_ip("link", "add", "xsk0", "numtxqueues", "2", "numrxqueues", "2", "type", "veth",
                "peer", "name", "xsk0p", "numtxqueues", "2", "numrxqueues", "2")
    box.host_ip("link", "set", "xsk0", "up")
    box.host_ip("link", "set", "xsk0p", "up")
    put(box, "/etc/xskbroker/policy.toml", POLICY)
    # the installed ExecStart=, with a short idle timeout
    unit = box.run("systemctl", "cat", UNIT).stdout
    start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert start, unit
    command = re.sub(r"--idle-timeout \S+", f"--idle-timeout {IDLE}", start.group(1))
    put(box, DROPIN, f"[Service]\nExecStart=\nExecStart={command}\n")
    put(box, f"/etc/systemd/system/{HOLDER}",
        f"[Service]\nUser={USER}\nExecStart={XSK} request --interface xsk0 --hold 600\n")
    box.systemctl("daemon-reload")
    box.systemctl("enable", "--now", SOCKET)


def journal(box: Container, lines: int = 40) -> str:
    return box.run("journalctl", "-u", UNIT, "-n", str(lines), "--no-pager", "-o", "short-monotonic",
                   check=False).stdout


def request(box: Container, user: str = USER, queue: int = 0, timeout: float = 30.0) -> dict[str, Any]:
    """A bound grant as USER through the CLI; the reply (or the error) as JSON. Released on exit."""
    done = box.run("runuser", "-u", user, "--", XSK, "request", "--interface", "xsk0", "--start-queue", str(queue),
                   "--json", check=False, timeout=timeout)
    try:
        reply: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"request as {user}: exit {done.returncode}: {done.stdout}{done.stderr}\n"
                             f"{journal(box)}") from None
    return reply


def granted(box: Container, queue: int = 0) -> dict[str, Any]:
    reply = request(box, queue=queue)
    assert reply.get("ok") and reply.get("lease"), f"{reply}\n{journal(box)}"
    return reply


def leases(box: Container) -> list[dict[str, Any]]:
    done = box.run(XSK, "status", "--json")
    found: list[dict[str, Any]] = json.loads(done.stdout)["leases"]
    return found


def main_pid(box: Container) -> int:
    return int(box.show(UNIT, "MainPID") or 0)


def restarts(box: Container) -> int:
    return int(box.show(UNIT, "NRestarts") or 0)


def idle_exit(box: Container) -> None:
    wait_for("the broker's idle exit", lambda: box.show(UNIT, "ActiveState") == "inactive", timeout=IDLE + 15)


def recover(box: Container) -> None:
    """What an operator does after a crash loop (docs/systemd.md): fix the file, clear, start the socket."""
    put(box, "/etc/xskbroker/policy.toml", POLICY)
    box.systemctl("stop", UNIT, check=False)
    box.systemctl("reset-failed", UNIT, SOCKET, check=False)
    box.systemctl("restart", SOCKET)


def test_socket_activation_and_a_grant_for_a_member_of_the_socket_group(box: Container, figures) -> None:  # type: ignore[no-untyped-def]
    assert box.show(SOCKET, "ActiveState") == "active"
    sock = box.run("stat", "-c", "%U %G %a %F", "/run/xskbroker/broker.sock").stdout.split(None, 3)
    assert sock == ["root", "xskbroker", "660", "socket\n"], sock
    assert box.show(UNIT, "ActiveState") == "inactive", "the service runs before anyone asked"
    t0 = time.monotonic()
    reply = granted(box)
    figures(**BOOT, first_grant_ms=round((time.monotonic() - t0) * 1000))
    assert reply["interface"] == "xsk0"
    assert box.show(UNIT, "ActiveState") == "active"
    # the unit's identity and sandbox, as systemd set them up
    pid = main_pid(box)
    status = box.run("cat", f"/proc/{pid}/status").stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    assert 61184 <= uid <= 65519, f"not a dynamic user: {uid}"
    assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
    assert re.search(r"^Seccomp:\s+2", status, re.M)
    assert "READY=1" not in box.show(UNIT, "StatusText")
    # the CPU split took effect under the unit's system call filter (sched_setaffinity allowed by name)
    lists = box.run("sh", "-c", f"grep -h Cpus_allowed_list /proc/{pid}/task/*/status").stdout.split()[1::2]
    allowed = set().union(*map(cpu_list, lists))
    if len(allowed) > 1:
        main = cpu_list(re.search(r"^Cpus_allowed_list:\s+(\S+)", status, re.M).group(1))  # type: ignore[union-attr]
        assert main == allowed - {max(allowed)} and {max(allowed)} in map(cpu_list, lists), lists


def test_kernel_tunables_are_out_of_the_brokers_reach(box: Container) -> None:
    """What ProtectKernelTunables= would guard, in the running broker's own mount namespace: /sys and every
    mount under it read-only (ReadOnlyPaths=/sys), /proc/sys and the other kernel files of /proc absent
    (ProcSubset=pid), while its clients' /proc/PID entries stay readable."""
    # the container's own /sys is read-only already: a writable mount under it, made before the broker
    # starts, shows whether the unit makes /sys read-only itself (a host's /sys is writable)
    box.systemctl("stop", UNIT)
    spot = next(d for d in ("/sys/kernel/config", "/sys/fs/fuse/connections", "/sys/kernel/tracing", "/sys/fs/bpf")
                if box.run("test", "-d", d, check=False).returncode == 0)
    box.run("mount", "-t", "tmpfs", "-o", "size=64k", "xsktest", spot)
    try:
        granted(box)
        pid = main_pid(box)
        mounts = [line.split() for line in box.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()]
    finally:
        box.systemctl("stop", UNIT)
        box.run("umount", spot)
    under_sys = dict((m[4], m[5]) for m in mounts if m[4] == "/sys" or m[4].startswith("/sys/"))
    assert "/sys" in under_sys and spot in under_sys, under_sys
    assert all("ro" in opts.split(",") for opts in under_sys.values()), under_sys
    granted(box)
    pid = main_pid(box)
    root = f"/proc/{pid}/root"
    for hidden in ("proc/sys", "proc/sysrq-trigger", "proc/kcore", "proc/kallsyms", "proc/irq", "proc/fs",
                   "proc/acpi", "proc/latency_stats", "proc/timer_list"):
        assert box.run("test", "-e", f"{root}/{hidden}", check=False).returncode != 0, hidden
    assert box.run("test", "-r", f"{root}/proc/1/stat", check=False).returncode == 0
    assert box.run("test", "-d", f"{root}/sys/class/net/xsk0", check=False).returncode == 0  # read, as it must


def test_a_user_outside_the_socket_group_cannot_connect(box: Container) -> None:
    done = box.run("runuser", "-u", STRANGER, "--", XSK, "request", "--interface", "xsk0", "--json", check=False)
    assert done.returncode != 0
    assert "ermission denied" in done.stdout + done.stderr, done.stdout + done.stderr


def test_idle_exit_then_the_next_connection_starts_it_again(box: Container) -> None:
    granted(box)
    first = main_pid(box)
    idle_exit(box)
    assert box.show(SOCKET, "ActiveState") == "active"
    granted(box)
    assert main_pid(box) not in (0, first)


def test_kill_9_with_a_live_lease_then_recovery(box: Container) -> None:
    box.systemctl("start", HOLDER)
    try:
        (held,) = wait_for("the holder's lease", lambda: leases(box))
        before, count = main_pid(box), restarts(box)
        box.run("sh", "-c", f"kill -9 {before}")
        wait_for("the restart after kill -9", lambda: restarts(box) > count and main_pid(box) not in (0, before))
        (after,) = leases(box)
        assert (after["lease"], after["pid"]) == (held["lease"], held["pid"])
        assert box.show(HOLDER, "ActiveState") == "active"
        granted(box, queue=1)  # alongside the recovered lease
    finally:
        box.systemctl("stop", HOLDER, check=False)
    wait_for("the lease to end with its holder", lambda: not leases(box))


def test_reload_with_a_broken_policy_keeps_serving(box: Container) -> None:
    box.systemctl("start", HOLDER)  # keeps the broker up across the reload
    try:
        wait_for("the holder's lease", lambda: leases(box))
        pid = main_pid(box)
        put(box, "/etc/xskbroker/policy.toml", BROKEN)
        # ExecReload= runs `policy check` first: the operator's reload fails and says why, the broker is untouched
        reload = box.systemctl("reload", UNIT, check=False)
        assert reload.returncode != 0, reload
        assert main_pid(box) == pid and box.show(UNIT, "ActiveState") == "active"
        granted(box, queue=1)
        # a SIGHUP that bypasses the check meets the broker's own validation: it keeps the running policy
        box.run("sh", "-c", f"kill -HUP {pid}")
        wait_for("the failed reload in STATUS=", lambda: "policy" in box.show(UNIT, "StatusText").lower())
        assert main_pid(box) == pid
        granted(box, queue=1)
    finally:
        box.systemctl("stop", HOLDER, check=False)
        recover(box)


def test_the_next_start_after_idle_exit_with_a_broken_policy_uses_the_last_good_one(box: Container) -> None:
    try:
        granted(box)  # started with a good policy: that one is kept
        put(box, "/etc/xskbroker/policy.toml", BROKEN)
        idle_exit(box)
        for _ in range(3):  # every later client too, not only the one that started it
            granted(box)
        assert box.show(SOCKET, "ActiveState") == "active"
        box.run("test", "-S", "/run/xskbroker/broker.sock")
        assert box.show(UNIT, "ActiveState") == "active"
    finally:
        recover(box)


def _timespan(text: str) -> float:
    """Seconds in a value `systemctl show` prints: plain microseconds or a span like "1min 30s" / "500ms"."""
    text = text.strip()
    if not text or text == "infinity":
        return 0.0 if not text else float("inf")
    if text.isdigit():
        return int(text) / 1e6
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(number) * units[part[len(number):]]
    return total


def test_a_stuck_event_loop_is_restarted_by_the_watchdog(box: Container) -> None:
    watchdog = _timespan(box.show(UNIT, "WatchdogUSec"))
    assert watchdog > 0, "no WatchdogSec= in the unit"
    abort = _timespan(box.show(UNIT, "TimeoutAbortUSec"))
    budget = watchdog + abort + 15
    assert budget < 120, f"WatchdogSec={watchdog} s + TimeoutAbortSec={abort} s: too slow to test (and to recover)"
    box.systemctl("start", HOLDER)
    stuck = 0
    try:
        wait_for("the holder's lease", lambda: leases(box))
        stuck, count = main_pid(box), restarts(box)
        box.run("sh", "-c", f"kill -STOP {stuck}")
        wait_for("the watchdog's restart", lambda: restarts(box) > count and main_pid(box) not in (0, stuck),
                 timeout=budget)
        wait_for("the lease, recovered", lambda: leases(box))
    finally:
        if stuck and box.run("sh", "-c", f"kill -0 {stuck}", check=False).returncode == 0:
            box.run("sh", "-c", f"kill -9 {stuck}", check=False)
        box.systemctl("stop", HOLDER, check=False)
        recover(box)


def test_uninstall_removes_the_units_and_the_socket(box: Container) -> None:
    box.run("rm", "-rf", f"/etc/systemd/system/{UNIT}.d", f"/etc/systemd/system/{HOLDER}")
    out = box.run("sh", f"{SRC}/deploy/install.sh", "uninstall").stdout
    assert "kept /etc/xskbroker/policy.toml" in out, out  # edited: an operator's file is never removed
    assert box.systemctl("list-unit-files", "xskbroker*", "--no-legend", check=False).stdout.strip() == ""
    assert box.show(SOCKET, "ActiveState") == "inactive"
    assert box.run("test", "-e", "/run/xskbroker/broker.sock", check=False).returncode != 0
    left = box.run("sh", "-c", "ls -d /usr/local/lib/systemd/system/xskbroker* /usr/local/lib/sysusers.d/xskbroker* "
                   "/usr/local/lib/tmpfiles.d/xskbroker* 2>/dev/null", check=False).stdout
    assert left == "", f"left behind: {shlex.split(left)}"


def test_the_mirror_is_read_from_apts_sources(tmp_path: Path) -> None:
    one = tmp_path / "a.list"
    one.write_text("# deb http://old/ bookworm main\n"
                   "deb [arch=amd64 signed-by=/k.gpg] http://one/debian bookworm main\n")
    deb822 = tmp_path / "b.sources"
    deb822.write_text("Types: deb\nURIs: http://two/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
                      "Types: deb deb-src\nURIs: http://two/debian\nSuites: bookworm bookworm-updates\n"
                      "Components: main contrib\n")
    assert container.debian_mirror([deb822, one]) == "http://two/debian"
    assert container.debian_mirror([one]) == "http://one/debian"
    with pytest.raises(container.Unavailable, match="no apt source"):
        container.debian_mirror([tmp_path / "missing.list"])
