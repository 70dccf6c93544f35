"""The libvirt hook against the real QEMU binary, a real broker and, where it can run here, a real libvirtd.

Debian 12's QEMU (7.2) has no af-xdp backend, so what is proved is everything up to QEMU's refusal of
netdev_add: the grant is really taken, as QEMU's user and naming QEMU as the holder; the fds really reach QEMU
through getfd (over a QMP socket, and through `virsh qemu-monitor-command --pass-fds` under libvirtd); QEMU's
error is reported as QEMU words it; the unwind leaves QEMU's fd table as it was and the lease ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import hotplug, qemu_support
from xskbroker.client.grant import request_fds
from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import identity as lvid
from xskbroker.client.libvirt import lifecycle as lvlife
from xskbroker.client.libvirt import metadata as lvmeta
from xskbroker.client.libvirt import monitors as lvmon
from xskbroker.client.libvirt import state as lvstate
from xskbroker.client.libvirt import worker as lvworker
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace

from .conftest import SYSTEM_PYTHON, readable_code, wait_for
from .libvirtd_rig import (
    HOOK,
    INSTALLED,
    LIBVIRT_USER,
    finished_state,
    gone,
    leases,
    libvirt_missing,
    libvirtd,
    transient_domain,
    virsh,
)
from .paused_qemu import NOT_AF_XDP, QEMU, SKIP, Qemu, qemu

pytestmark = SKIP

ROOT = Path(__file__).resolve().parents[2]
VM_UID = 65534  # QEMU runs unprivileged, as under libvirt

POLICY = """\
version = 1

[[allow]]
name = "vms"
users = [{users}]
interfaces = ["xsk*"]
queues = ["0-7"]
kinds = ["bare"]
max_queues = 2
"""


def policy(*users: int | str) -> str:
    return POLICY.format(users=", ".join(str(u) if isinstance(u, int) else f'"{u}"' for u in users))


def domain_xml(name: str, ifname: str, queues: int = 2, extra: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <metadata>
    <xsk:interfaces xmlns:xsk="urn:xskbroker:libvirt:1">
      <xsk:interface id="xdp0" name="{ifname}" queues="{queues}" start-queue="0" device="virtio-net-pci"{extra}/>
    </xsk:interfaces>
  </metadata>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{QEMU}</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def inode(fd: int) -> str:
    return f"socket:[{os.fstat(fd).st_ino}]"


def own_fds() -> set[str]:
    """This process's fds. Garbage is collected first: a file an earlier test in this worker left to the collector
    would close in the middle and look like a change."""
    gc.collect()
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return out


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans of our descendants (the hook's detached worker) become our children, so we can reap them."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"worker {pid} did not finish in {timeout} s")


SENT = re.compile(r'getfd \{"fdname":"([^"]+)"\} \+ fd \d+ (socket:\[\d+\]) \(SCM_RIGHTS\) -> ok$', re.M)


def sent_sockets(log: str) -> dict[str, str]:
    """fd name -> socket inode of every getfd QEMU accepted, from the worker's log."""
    return dict(SENT.findall(log))


class Spy:
    """The worker's monitor, watched: after each getfd, is the socket in QEMU's fd table, and whose lease is it?"""

    def __init__(self, inner: lvmon.QMPMonitor, vm: Qemu, broker_socket: str) -> None:
        self.inner, self.vm, self.broker_socket = inner, vm, broker_socket
        self.arrived: list[bool] = []
        self.leases_seen: list[dict[str, Any]] = []

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        value = self.inner.execute(command, arguments, fds)
        if command == "getfd" and fds:
            self.arrived.append(inode(fds[0]) in self.vm.fd_links())
            self.leases_seen = leases(self.broker_socket)
        return value

    def open(self, deadline: float) -> None:
        self.inner.open(deadline)

    def pid(self) -> int:
        return self.inner.pid()

    def confirm(self, pid: int, ident: lvid.Identity) -> None:
        self.inner.confirm(pid, ident)

    def version(self) -> qemu_support.QemuVersion:
        return self.inner.version()

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


# ---- the worker over a QMP socket: no libvirt needed ---------------------------------------------------

def test_worker_takes_a_grant_as_qemus_user_hands_it_to_qemu_and_unwinds_qemus_refusal(
        veth: VethNamespace, tmp_path: Path, figures: Any) -> None:
    with qemu("-M", "none", user=VM_UID) as vm, BrokerProcess(veth.name, policy(VM_UID, 0)) as broker:
        before, mine = sorted(vm.fd_links()), own_fds()
        cfg = lvconf.Config(socket=broker.socket_path, state_dir=str(tmp_path), timeout=5.0)
        spy = Spy(lvmon.QMPMonitor(vm.qmp_path, 5.0), vm, broker.socket_path)
        lines: list[str] = []
        started = time.perf_counter()
        state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", veth.inside, 2, 0, "virtio-net-pci")], cfg, spy,
                              lines.append, str(tmp_path / "vm1.json"))
        figures(worker_ms=round((time.perf_counter() - started) * 1000, 1))

        # the grant was really taken, by a process running as QEMU's user, for QEMU
        (grant,) = [r for r in broker.records() if r.get("event") == "grant"]
        assert grant["decision"] == "allow" and grant["peer"]["uid"] == VM_UID and grant["peer"]["pid"] != os.getpid()
        assert grant["request"] == {"interface": veth.inside, "queues": [0, 1], "kind": "bare", "umem_bytes": 0,
                                    "bind_mode": "auto", "memlock": 2 * qemu_support.AF_XDP_UMEM_BYTES}
        (lease,) = spy.leases_seen  # while QEMU held the fds: the lease is QEMU's
        assert (lease["lease"], lease["pid"], lease["uid"], lease["queues"]) == (grant["lease"], vm.pid, VM_UID,
                                                                                 [0, 1])
        # each socket really arrived in QEMU with its getfd
        assert spy.arrived == [True, True]

        # QEMU's own words, then the unwind, then the lease released at once
        (rec,) = state["interfaces"]
        assert rec["error"] == {"stage": "netdev_add", "qmp_class": "GenericError", "message": NOT_AF_XDP,
                                "notes": ["unwound: closed fd(s) xdp0-q0, xdp0-q1 in QEMU"]}
        assert (rec["status"], rec["lease"], rec["released"]) == ("failed", grant["lease"], True)
        assert f"xdp0: QEMU refused netdev_add: {NOT_AF_XDP}" in lines
        assert lines[-1] == "done: 0 of 1 interface(s) attached"
        assert state["qemu_pid"] == vm.pid and state["identity"] == {"uid": VM_UID, "gid": VM_UID, "groups": []}
        assert "has no af-xdp netdev backend" in state["af_xdp_warning"]
        assert [r["event"] for r in broker.records()][-1] == "release"
        assert leases(broker.socket_path) == []

        # QEMU's fd table is as it was (once it has dropped the monitor connection); the worker kept nothing
        wait_for(lambda: sorted(vm.fd_links()) == before, 3.0, "QEMU's fds back to what they were")
        assert own_fds() == mine
        # the slots are free: the same queues can be granted again
        reply, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path)
        hotplug.close_fds(fds)
        assert [s["queue"] for s in reply["sockets"]] == [0, 1]


def test_the_policy_judges_qemus_user_not_root(veth: VethNamespace, tmp_path: Path) -> None:
    with qemu("-M", "none", user=VM_UID) as vm, BrokerProcess(veth.name, policy(0)) as broker:
        before = sorted(vm.fd_links())
        cfg = lvconf.Config(socket=broker.socket_path, state_dir=str(tmp_path), timeout=5.0)
        lines: list[str] = []
        state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", veth.inside)], cfg,
                                    lvmon.QMPMonitor(vm.qmp_path, 5.0), lines.append)
        assert state["interfaces"][0]["error"]["code"] == "user-not-allowed"
        assert any(x.startswith("xdp0: the broker refused: user-not-allowed: ") for x in lines)
        wait_for(lambda: sorted(vm.fd_links()) == before, 3.0, "QEMU's fds back to what they were")


# ---- the hook as libvirt runs it (argv, XML on stdin, pipes), with a QMP-socket monitor ----------------

def run_hook(args: list[str], xml: str, conf: Path,
             hook: Path = HOOK) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    # the hook's forked agent drops to QEMU's user and still imports: it needs code that user can read
    done = subprocess.run([SYSTEM_PYTHON, str(hook), *args], input=xml, text=True, capture_output=True,
                          env={**os.environ, lvconf.CONFIG_ENV: str(conf), "PYTHONPATH": str(readable_code())},
                          cwd="/",
                          timeout=30, check=False)
    return done, time.monotonic() - started


def test_hook_returns_at_once_and_its_detached_worker_plugs_then_release_forgets(
        veth: VethNamespace, tmp_path: Path, figures: Any) -> None:
    state_dir = tmp_path / "state"
    with qemu("-M", "none", user=VM_UID) as vm, BrokerProcess(veth.name, policy(VM_UID)) as broker, subreaper():
        conf = tmp_path / "libvirt.conf"
        conf.write_text(f'socket = "{broker.socket_path}"\nstate_dir = "{state_dir}"\nmonitor = "qmp:{vm.qmp_path}"\n'
                        "timeout = 10\n")
        xml = domain_xml("vm1", veth.inside)
        before = sorted(vm.fd_links())
        with vm.connect():  # QEMU serves one QMP client: the worker has to wait for this one to leave
            done, took = run_hook(["vm1", "started", "begin", "-"], xml, conf)
            # libvirt reads the hook's stdout/stderr to EOF: run() returning proves the worker holds neither
            assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
            state = wait_for(lambda: lvstate.read_state(str(state_dir / "vm1.json")), 5.0, "the worker's state file")
            worker = state["worker_pid"]
            assert os.getsid(worker) not in (os.getsid(0), os.getsid(os.getpid()))  # its own session
            time.sleep(0.2)
            assert "qemu_pid" not in (lvstate.read_state(str(state_dir / "vm1.json")) or {})  # still waiting for QEMU
        figures(hook_ms=round(took * 1000, 1))
        state = finished_state(state_dir / "vm1.json")
        assert reap(worker) == 1  # reparented to us (subreaper); 1: not every interface was attached
        (rec,) = state["interfaces"]
        assert rec["error"]["message"] == NOT_AF_XDP and rec["released"]
        log = (state_dir / "vm1.log").read_text()
        assert f"vm1: xdp0: QEMU refused netdev_add: {NOT_AF_XDP}\n" in log
        assert len(sent_sockets(log)) == 2
        assert oct(os.stat(state_dir).st_mode & 0o777) == "0o700"
        assert oct(os.stat(state_dir / "vm1.json").st_mode & 0o777) == "0o600"
        wait_for(lambda: sorted(vm.fd_links()) == before, 3.0, "QEMU's fds back to what they were")
        assert leases(broker.socket_path) == []

        # operations the hook does nothing for: quiet, nothing touched
        size = (state_dir / "vm1.log").stat().st_size
        for op, sub in [("migrate", "begin"), ("reconnect", "begin"), ("start", "begin"), ("prepare", "begin")]:
            done, _ = run_hook(["vm1", op, sub, "-"], xml, conf)
            assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        assert (state_dir / "vm1.log").stat().st_size == size

        # stopped, then release: the state file goes (the lease was already released), the log says so
        for op in ("stopped", "release"):
            done, took = run_hook(["vm1", op, "end", "-"], xml, conf)
            assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        assert sorted(p.name for p in state_dir.iterdir()) == ["vm1.log"]
        assert (state_dir / "vm1.log").read_text().rstrip().endswith("vm1: stopped: state forgotten")


def test_stopped_ends_a_worker_that_is_still_waiting(veth: VethNamespace, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with qemu("-M", "none", user=VM_UID) as vm, BrokerProcess(veth.name, policy(VM_UID)) as broker, subreaper():
        conf = tmp_path / "libvirt.conf"
        conf.write_text(f'socket = "{broker.socket_path}"\nstate_dir = "{state_dir}"\nmonitor = "qmp:{vm.qmp_path}"\n'
                        "timeout = 10\n")
        xml = domain_xml("vm1", veth.inside)
        with vm.connect():  # the worker waits for QEMU's monitor…
            done, _ = run_hook(["vm1", "started", "begin", "-"], xml, conf)
            assert done.returncode == 0
            worker = wait_for(lambda: lvstate.read_state(str(state_dir / "vm1.json")), 5.0,
                              "the state file")["worker_pid"]
            done, took = run_hook(["vm1", "stopped", "end", "-"], xml, conf)  # …when the domain stops
            assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
            assert reap(worker, 1.0) == 143  # SIGTERM, handled: unwound and left
            assert took < 1.5, took  # the worker went at once: no wait for the SIGKILL deadline
        assert sorted(p.name for p in state_dir.iterdir()) == ["vm1.log"]
        log = (state_dir / "vm1.log").read_text()
        assert f"vm1: worker {worker} is still running: ending it\n" in log
        assert "vm1: terminated (the domain stopped)\n" in log
        assert log.rstrip().endswith("vm1: stopped: state forgotten")
        assert not [r for r in broker.records() if r.get("event") == "grant"]


def test_release_asks_the_broker_to_release_leases_still_recorded(veth: VethNamespace, tmp_path: Path) -> None:
    with BrokerProcess(veth.name, policy(0)) as broker:
        reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path)
        try:
            assert [x["lease"] for x in leases(broker.socket_path)] == [reply["lease"]]
            hotplug.close_fds(fds)  # QEMU has exited: a lease released with open sockets lasts until they close
            fds = []
            cfg = lvconf.Config(socket=broker.socket_path, state_dir=str(tmp_path))
            lvstate.write_state(lvstate.domain_file(str(tmp_path), "vm1", ".json"), {
                "domain": "vm1", "finished": True, "identity": {"uid": 0, "gid": 0, "groups": []},
                "interfaces": [{"id": "xdp0", "lease": reply["lease"], "status": "attached", "released": False},
                               {"id": "xdp1", "lease": "0123456789abcdef", "status": "attached", "released": False}]})
            assert lvlife.forget("vm1", cfg, "release") is not None
            assert leases(broker.socket_path) == []
            log = (tmp_path / "vm1.log").read_text()
            assert f"vm1: release: released lease {reply['lease']}\n" in log
            assert "vm1: release: lease 0123456789abcdef had already ended (QEMU exited)\n" in log
            assert not (tmp_path / "vm1.json").exists()
        finally:
            hotplug.close_fds(fds)


# ---- a real libvirtd -----------------------------------------------------------------------------------

def test_under_a_real_libvirtd(veth: VethNamespace, tmp_path: Path, figures: Any) -> None:
    missing = libvirt_missing()
    if missing:
        pytest.skip(missing)
    state_dir = tmp_path / "state"
    name = f"xsklv{os.getpid()}"
    qemu_user = pwd.getpwnam(LIBVIRT_USER)
    os.chmod(tmp_path, 0o755)  # the domain log and XML are read by libvirtd only, but keep the path walkable
    with BrokerProcess(veth.name, policy(LIBVIRT_USER)) as broker:
        conf = tmp_path / "libvirt.conf"
        conf.write_text(f'socket = "{broker.socket_path}"\nstate_dir = "{state_dir}"\ntimeout = 20\n')
        with libvirtd(tmp_path, conf):
            # a declaration that cannot work: the prepare hook makes libvirt refuse the start, with the reason
            bad = tmp_path / "bad.xml"
            bad.write_text(domain_xml(name, veth.inside, extra=' mac="01:00:5e:00:00:01"'))
            with transient_domain(name, bad) as done:
                assert done.returncode != 0
                assert (f"xskbroker: domain {name}: <xsk:interface id='xdp0'>: mac='01:00:5e:00:00:01' is a "
                        "multicast address: a NIC needs a unicast one") in done.stderr

            good = tmp_path / "good.xml"
            good.write_text(domain_xml(name, veth.inside))
            started = time.monotonic()
            with transient_domain(name, good) as done:
                assert done.returncode == 0, done.stderr
                figures(virsh_create_s=round(time.monotonic() - started, 2))
                qemu_pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
                state = finished_state(state_dir / f"{name}.json", 30.0)
                figures(worker_done_s=round(time.monotonic() - started, 2))
                wait_for(lambda: gone(state["worker_pid"]), 10.0, "the worker to exit")
                log = (state_dir / f"{name}.log").read_text()

                # the worker found QEMU, and asked as QEMU's user (libvirt-qemu, with its groups)
                assert state["qemu_pid"] == qemu_pid
                assert state["identity"]["uid"] == qemu_user.pw_uid
                assert state["identity"] == {"uid": lvid.Identity.of_process(qemu_pid).uid,
                                             "gid": lvid.Identity.of_process(qemu_pid).gid,
                                             "groups": list(lvid.Identity.of_process(qemu_pid).groups)}
                (grant,) = [r for r in broker.records() if r.get("event") == "grant"]
                assert grant["decision"] == "allow" and grant["peer"]["uid"] == qemu_user.pw_uid
                assert grant["peer"]["user"] == LIBVIRT_USER and grant["rule"] == "vms"
                # virsh --pass-fds delivered each socket: QEMU accepted getfd (it refuses one without an fd)
                # and held it under that name until the unwind closed it
                sent = sent_sockets(log)
                assert sorted(sent) == ["xdp0-q0", "xdp0-q1"], log
                for n in (0, 1):
                    assert f'xdp0: closefd {{"fdname":"xdp0-q{n}"}} -> ok\n' in log, log
                # and QEMU holds none of those sockets any more
                links = [os.readlink(f"/proc/{qemu_pid}/fd/{x}") for x in os.listdir(f"/proc/{qemu_pid}/fd")]
                assert not set(sent.values()) & set(links)
                assert f"xdp0: QEMU refused netdev_add: {NOT_AF_XDP}\n" in log
                assert f"at libvirt's monitor of {name} (virsh -c qemu:///system) has no af-xdp netdev backend" in log
                (rec,) = state["interfaces"]
                assert rec["error"]["message"] == NOT_AF_XDP and rec["released"]
                assert leases(broker.socket_path) == []
                virsh("destroy", name)
                # stopped and release ran: the state file is gone, the log says so
                wait_for(lambda: not (state_dir / f"{name}.json").exists(), 10.0, "the stopped/release hooks")
                log = (state_dir / f"{name}.log").read_text()
                assert f"{name}: stopped: state forgotten\n" in log
    assert not INSTALLED.exists()
