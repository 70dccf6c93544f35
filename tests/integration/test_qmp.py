"""QMP hot-plug against the real QEMU binary (Debian's qemu-system-x86, no KVM, machine paused with -S).

Debian 12's QEMU (7.2) has no af-xdp backend, so these tests prove what can be proved with it: fds really
reach QEMU through getfd, the capability check says af-xdp is absent, QEMU's own error text comes through
untouched, the unwind leaves QEMU holding nothing, and detach waits for the guest's DEVICE_DELETED.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import hotplug, qemu_support, qmp_cli
from xskbroker.client import qmp as q
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace

from .conftest import wait_for

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(apt-get install qemu-system-x86; `make test` does)")

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
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start ({' '.join(cmd)}):\n{Path(log.name).read_text()}")
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
        yield vm
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def vm() -> Iterator[Qemu]:
    with qemu("-M", "none") as v:
        yield v


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


# ---- the QMP client against QEMU -----------------------------------------------------------------------

def test_greeting_version_and_pid_are_those_of_the_binary(vm: Qemu) -> None:
    with vm.connect() as m:
        assert f"{m.version.major}.{m.version.minor}.{m.version.micro}" == binary_version()
        assert m.pid == vm.pid  # from SO_PEERCRED: what the memlock check reads /proc of
        assert m.execute("query-status")["status"] == "prelaunch"


def test_getfd_really_hands_qemu_the_socket(vm: Qemu) -> None:
    a, b = socket.socketpair()
    with vm.connect() as m:
        before = len(vm.fd_links())  # with the monitor connection's own socket
        m.execute("getfd", {"fdname": "n0-q0"}, fds=[a.fileno()])
        assert len(vm.fd_links()) == before + 1 and inode(a) in vm.fd_links()
        a.close()
        assert held(b)  # QEMU's copy keeps the socket open after ours is gone
        m.execute("closefd", {"fdname": "n0-q0"})  # QEMU knows it by that name…
        assert eof(b) and len(vm.fd_links()) == before
        with pytest.raises(q.QMPError) as gone:  # …and by no other: a name it does not hold fails
            m.execute("closefd", {"fdname": "n0-q0"})
        assert str(gone.value) == "File descriptor named 'n0-q0' not found"
        with pytest.raises(q.QMPError, match="No file descriptor supplied via SCM_RIGHTS"):
            m.execute("getfd", {"fdname": "n0-q1"})  # the fd must come with the command itself


def test_af_xdp_is_reported_absent_with_a_clear_message(vm: Qemu) -> None:
    with vm.connect() as m:
        support = m.netdev_support()
        assert {"user", "tap", "socket", "hubport", "vhost-user"} <= support.types  # the enum really was read
        with pytest.raises(qemu_support.AfXdpUnsupported) as e:
            m.check_af_xdp()
        assert str(e.value) == (f"QEMU {m.version} at {vm.qmp_path} has no af-xdp netdev backend "
                                "(needs QEMU ≥ 8.2 built with libxdp)")
        assert str(m.version).startswith(binary_version())


def test_netdev_add_fails_with_qemus_own_text_and_the_unwind_leaves_no_fd(vm: Qemu) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    with vm.connect() as m:
        before = sorted(vm.fd_links())
        with pytest.raises(q.QMPError) as e:
            hotplug.attach(m, "xdp0", "lo", [a.fileno() for a, _ in pairs], start_queue=1, xdp_mode="skb",
                     device="virtio-net-pci")
        assert (str(e.value), e.value.command, e.value.error_class) == (NOT_AF_XDP, "netdev_add", "GenericError")
        assert e.value.__notes__ == ["unwound: closed fd(s) xdp0-q1, xdp0-q2 in QEMU"]
        for name in ("xdp0-q1", "xdp0-q2"):
            with pytest.raises(q.QMPError, match="not found"):
                m.execute("closefd", {"fdname": name})
        assert sorted(vm.fd_links()) == before
    for a, b in pairs:
        a.close()
        assert eof(b)


def test_detach_waits_for_qemus_device_deleted_event() -> None:
    # usb-net unplugs without the guest, and QEMU sends DEVICE_DELETED after device_del has answered
    with qemu("-M", "pc", "-device", "qemu-xhci,id=xhci") as v, v.connect() as m:
        m.execute("netdev_add", {"type": "hubport", "id": "n0", "hubid": 0})
        m.execute("device_add", {"driver": "usb-net", "netdev": "n0", "id": "n0-dev"})
        assert hotplug.detach(m, "n0", timeout=5) == hotplug.Detached("n0", "n0-dev", True)
        assert any(e["event"] == "DEVICE_DELETED" and e["data"].get("device") == "n0-dev" for _, e in m.events)
        assert "n0-dev" not in [p["name"] for p in m.execute("qom-list", {"path": "/machine/peripheral"})]
        with pytest.raises(q.QMPError, match="Device 'n0' not found"):
            m.execute("netdev_del", {"id": "n0"})


def test_detach_keeps_the_netdev_while_the_guest_holds_the_device() -> None:
    # a PCI NIC on i440fx needs the guest's ACPI ack, which a paused guest never gives
    with qemu("-M", "pc") as v, v.connect() as m:
        m.execute("netdev_add", {"type": "hubport", "id": "n0", "hubid": 0})
        m.execute("device_add", {"driver": "virtio-net-pci", "netdev": "n0", "id": "n0-dev"})
        with pytest.raises(q.QMPTimeout, match=r"'n0-dev' is still present 0\.3 s after device_del"):
            hotplug.detach(m, "n0", timeout=0.3)
        assert "n0-dev" in [p["name"] for p in m.execute("qom-list", {"path": "/machine/peripheral"})]
        with pytest.raises(q.QMPError, match="Duplicate ID 'n0'"):  # the netdev is still there
            m.execute("netdev_add", {"type": "hubport", "id": "n0", "hubid": 0})


# ---- the commands against QEMU -------------------------------------------------------------------------

def fake_grant(monkeypatch: pytest.MonkeyPatch, queues: list[int]) -> list[socket.socket]:
    """Stand in for the broker with socketpair ends; returns the other ends, to watch who holds the sockets."""
    pairs = [socket.socketpair() for _ in queues]
    fds = [a.detach() for a, _ in pairs]

    def request_fds(interface: str, count: int, **kw: Any) -> tuple[dict[str, Any], list[int]]:
        return ({"lease": "L1", "kind": "bare", "interface": interface, "xdp_mode": "skb",
                 "sockets": [{"queue": x, "fd": i} for i, x in enumerate(queues)]}, fds)

    monkeypatch.setattr("xskbroker.client.grant.request_fds", request_fds)
    return [b for _, b in pairs]


def test_qmp_attach_refuses_this_qemu_before_asking_the_broker(vm: Qemu, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xskbroker.client.grant.request_fds", lambda *a, **k: pytest.fail("the broker was asked"))
    rc = qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", "lo", "-q", "1"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert err[0].startswith(f"xskbroker: QEMU {binary_version()}")
    assert err[0].endswith(f"at {vm.qmp_path} has no af-xdp netdev backend (needs QEMU ≥ 8.2 built with libxdp)")
    assert "--force tries anyway" in err[1]


def test_qmp_attach_force_shows_qemus_error_and_qemu_keeps_nothing(
        vm: Qemu, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    peers = fake_grant(monkeypatch, [0, 1])
    before = sorted(vm.fd_links())
    rc = qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", "lo", "-q", "2", "--force",
                       "--device", "virtio-net-pci"])
    # (a root without CAP_IPC_LOCK also gets the memlock warning: that is tested below)
    err = [line for line in capsys.readouterr().err.splitlines() if "RLIMIT_MEMLOCK" not in line]
    assert rc == 1
    assert err[0].startswith("xskbroker: warning: QEMU ") and err[0].endswith("; trying anyway (--force)")
    assert err[1] == f"xskbroker: QEMU refused netdev_add: {NOT_AF_XDP}"
    assert err[2] == "  unwound: closed fd(s) xdp0-q0, xdp0-q1 in QEMU"
    assert err[3].startswith("  the grant's sockets were closed here and in QEMU") and len(err) == 4
    # QEMU drops the monitor connection's socket a moment after the command hangs up
    wait_for(lambda: sorted(vm.fd_links()) == before, 2.0, "QEMU's fds back to what they were")
    assert all(eof(b) for b in peers)  # neither the command nor QEMU holds a granted socket any more


def test_unprivileged_qemu_takes_fds_and_its_memlock_limit_is_flagged(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    peers = fake_grant(monkeypatch, [0])
    with qemu("-M", "none", user=65534) as v:
        status = Path(f"/proc/{v.pid}/status").read_text()
        assert "Uid:\t65534" in status and not qemu_support.has_cap(status, qemu_support.CAP_IPC_LOCK)
        rc = qmp_cli.main(["qmp-attach", "--qmp", v.qmp_path, "--id", "xdp0", "-i", "lo", "-q", "1", "--force",
                           "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 1 and out["error"]["message"] == NOT_AF_XDP and out["error"]["command"] == "netdev_add"
        assert eof(peers[0])
        limit = qemu_support.memlock_limit(Path(f"/proc/{v.pid}/limits").read_text())
        warnings = out["error"]["warnings"]
        assert "has no af-xdp netdev backend" in warnings[0]
        if limit is not None and limit < qemu_support.AF_XDP_UMEM_BYTES:  # 8 MiB on these machines
            assert warnings[1].startswith(f"QEMU (pid {v.pid}) may lock {limit >> 20} MiB (RLIMIT_MEMLOCK) but its "
                                          "af-xdp UMEM needs 32 MiB for 1 queue(s)")
            assert f"prlimit --pid {v.pid} --memlock=33554432:33554432" in warnings[1]


# ---- through a real broker -----------------------------------------------------------------------------

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


def test_qmp_attach_with_a_real_bare_grant(veth: VethNamespace, vm: Qemu, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(vm.fd_links())  # nobody connected yet
    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        # without --force: refused before the broker is asked
        assert qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", veth.inside, "-q", "2",
                             "--socket", broker.socket_path, "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "af-xdp-unsupported"
        assert not [r for r in broker.records() if r.get("event") == "grant"]

        rc = qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", veth.inside, "-q", "2",
                           "--socket", broker.socket_path, "--force", "--json"])
        out = json.loads(capsys.readouterr().out)
        if out["error"]["code"] == "unsupported-kind":
            pytest.skip(f"the broker does not make bare grants yet: {out['error']['message']}")
        assert rc == 1 and out["error"]["code"] == "qmp-error", out
        assert out["error"]["message"] == NOT_AF_XDP
        wait_for(lambda: sorted(vm.fd_links()) == before, 2.0, "QEMU's fds back to what they were")
        grant = [r for r in broker.records() if r.get("event") == "grant"][-1]
        assert grant["decision"] == "allow" and grant["request"]["kind"] == "bare"


def test_real_bare_sockets_reach_qemu_and_qemu_alone_keeps_them_in_the_map(veth: VethNamespace, vm: Qemu) -> None:
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        try:
            reply, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path)
        except proto.BrokerError as e:
            if e.code == "unsupported-kind":
                pytest.skip(f"the broker does not make bare grants yet: {e.message}")
            raise
        with vm.connect() as m:
            before = len(vm.fd_links())
            links = []
            for s in reply["sockets"]:
                fd = fds[s["fd"]]
                links.append(f"socket:[{os.fstat(fd).st_ino}]")
                m.execute("getfd", {"fdname": hotplug.fd_name("xdp0", s["queue"])}, fds=[fd])
            hotplug.close_fds(fds)
            assert len(vm.fd_links()) == before + 2 and set(links) <= set(vm.fd_links())
            # QEMU's copies alone keep the sockets in xsks_map: the queues are still taken
            with pytest.raises(proto.BrokerError) as busy:
                request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path)
            assert busy.value.code == "queue-busy", busy.value
            for s in reply["sockets"]:
                m.execute("closefd", {"fdname": hotplug.fd_name("xdp0", s["queue"])})
            assert len(vm.fd_links()) == before and not set(links) & set(vm.fd_links())
        # closed in QEMU too: the kernel emptied the slots, so the same queues can be granted again
        again, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path)
        hotplug.close_fds(fds)
        assert [s["queue"] for s in again["sockets"]] == [0, 1]


# ---- whose lease: the requester's, the holder it names, or an orphan -----------------------------------

def _status(path: str) -> list[dict]:
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto

    with Connection(path) as c:
        return c.call(proto.Status())[0]["leases"]


def _hand_to_qemu(qmp_path: str, reply: dict, fds: list[int]) -> None:
    with q.QMP(qmp_path, 5.0) as m:
        for s in reply["sockets"]:
            m.execute("getfd", {"fdname": hotplug.fd_name("xdp0", s["queue"])}, fds=[fds[s["fd"]]])
    hotplug.close_fds(fds)


def test_the_lease_follows_the_qemu_a_launcher_names_as_holder(veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, BARE_POLICY) as broker:
        reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        _hand_to_qemu(vm.qmp_path, reply, fds)
        assert reply["holder_pid"] == vm.pid
        (lease,) = _status(broker.socket_path)
        assert lease["pid"] == vm.pid and not lease["orphaned"]
        vm.proc.kill()
        vm.proc.wait()
        wait_for(lambda: not _status(broker.socket_path), 5.0, "the lease to end with QEMU")
        ended = [r for r in broker.records() if r.get("event") == "lease-ended"]
        assert ended[-1]["pid"] == vm.pid and ended[-1]["reason"] == "holder exited"


def test_a_launcher_that_exits_after_passing_the_sockets_leaves_an_orphan_until_they_close(
        veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, BARE_POLICY) as broker:
        pid = os.fork()
        if pid == 0:  # a launcher that names no holder, hands the sockets over and exits
            code = 1
            try:
                reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path)
                _hand_to_qemu(vm.qmp_path, reply, fds)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_for(lambda: [x for x in _status(broker.socket_path) if x["orphaned"]], 5.0, "the lease to be orphaned")
        with vm.connect() as m:
            m.execute("closefd", {"fdname": hotplug.fd_name("xdp0", 0)})
        wait_for(lambda: not _status(broker.socket_path), 10.0, "the orphan to end once QEMU closed the socket")
        reasons = [r["reason"] for r in broker.records() if r.get("event") in ("lease-orphaned", "lease-ended")]
        assert reasons == ["holder exited but its sockets are still open elsewhere", "its sockets were closed"]


def test_a_holder_of_another_user_is_refused(veth: VethNamespace) -> None:
    from xskbroker.testbed.sandbox import spawn_unprivileged

    def ask(path: str, iface: str) -> str:
        from xskbroker.client.grant import request_fds
        from xskbroker.wire import protocol as proto

        try:
            _, fds = request_fds(iface, 1, kind="bare", socket_path=path, holder_pid=1)
        except proto.BrokerError as e:
            return e.code
        hotplug.close_fds(fds)
        return "granted"

    with BrokerProcess(veth.name, BARE_POLICY.replace("users = [0]", "users = [0, 65534]")) as broker:
        assert spawn_unprivileged(ask, broker.socket_path, veth.inside, uid=65534).result() == "bad-holder"


# ---- the lease ends with the sockets, though QEMU lives on (issue 10) ----------------------------------

QUOTA_POLICY = BARE_POLICY + """
[[quota]]
name = "one-vm"
users = ["*"]
max_queues = 2
"""


def test_a_rolled_back_attach_releases_its_lease_so_a_retry_fits_the_quota(
        veth: VethNamespace, vm: Qemu, capsys: pytest.CaptureFixture[str]) -> None:
    with BrokerProcess(veth.name, QUOTA_POLICY) as broker:
        for _ in range(2):  # the second attempt reaches QEMU again: no stale lease holds the quota
            rc = qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", veth.inside, "-q", "2",
                               "--socket", broker.socket_path, "--force", "--json"])
            out = json.loads(capsys.readouterr().out)
            if out["error"]["code"] == "unsupported-kind":
                pytest.skip(f"the broker does not make bare grants yet: {out['error']['message']}")
            assert rc == 1 and out["error"]["code"] == "qmp-error", out
            assert any(n.endswith("was released") for n in out["error"]["notes"]), out
            assert not _status(broker.socket_path)
        assert len([r for r in broker.records() if r.get("event") == "release"]) == 2


def test_a_bare_lease_ends_when_its_living_holder_closes_the_sockets(veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, QUOTA_POLICY) as broker:
        reply, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        _hand_to_qemu(vm.qmp_path, reply, fds)
        time.sleep(2.5)  # at least one poll while QEMU holds them: the lease stays
        assert [x["lease"] for x in _status(broker.socket_path)] == [reply["lease"]]
        with vm.connect() as m:  # what netdev_del does: QEMU closes its sockets and lives on
            for s in reply["sockets"]:
                m.execute("closefd", {"fdname": hotplug.fd_name("xdp0", s["queue"])})
        wait_for(lambda: not _status(broker.socket_path), 6.0, "the lease to end once QEMU closed the sockets")
        ended = [r for r in broker.records() if r.get("event") == "lease-ended"]
        assert ended[-1]["lease"] == reply["lease"] and ended[-1]["pid"] == vm.pid
        assert ended[-1]["reason"] == "its sockets were closed while its holder lives"
        # a re-attach within the quota
        again, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        hotplug.close_fds(fds)
        assert again["lease"] != reply["lease"]


def test_a_requester_killed_mid_grant_leaves_no_socket_in_the_map(veth: VethNamespace) -> None:
    """A bare grant with memlock whose requester is SIGKILLed at once: whatever the broker got to, the
    queue is free again (no socket held by the broker itself, no lease), so the next grant succeeds."""

    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    c = Connection(broker.socket_path)
                    c.sock.send(proto.encode_request(proto.Grant(interface=veth.inside, queues=(0,), kind="bare",
                                                                 memlock=32 << 20)))
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.waitpid(pid, 0)
            wait_for(lambda: not _status(broker.socket_path), 5.0, "the dead requester's lease to end")
            _, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            wait_for(lambda: not _status(broker.socket_path), 5.0, "our own lease to end")
        assert not [r for r in broker.records() if r.get("event") == "internal-error"]


def test_a_grant_whose_reply_fails_frees_its_queue_for_the_very_next_grant(veth: VethNamespace) -> None:
    """The requester dies before its reply is sent: the grant is aborted, and its socket leaves the map slot
    then and there, not when a closer thread gets to close the broker's copy. The next grant was already
    waiting (sent while the broker paused before the failing send), so it is decided right after the abort:
    before the fix it found the aborted socket still in the slot and was refused `queue-busy`."""

    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    with BrokerProcess(veth.name, BARE_POLICY, env={"XSKBROKER_FAULT": "before-send:pause"}) as broker:
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                try:
                    c = Connection(broker.socket_path)
                    c.sock.send(proto.encode_request(proto.Grant(interface=veth.inside, queues=(0,), kind="bare")))
                    time.sleep(0.2)  # the broker has read it and sleeps before its reply
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.waitpid(pid, 0)
            _, fds = request_fds(veth.inside, [0], kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            wait_for(lambda: not _status(broker.socket_path), 10.0, "our own lease to end")
        aborted = [r for r in broker.records() if r.get("event") == "lease-aborted"]
        assert len(aborted) == 3, aborted


def test_a_bare_queue_is_free_as_soon_as_its_holder_closes_its_sockets(veth: VethNamespace) -> None:
    """The broker keeps no copy of a bare socket after its reply (a kept copy, however brief, left the slot
    taken after the holder closed its own: the very next grant got `queue-busy`)."""

    from xskbroker.client.grant import request_fds

    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        for _ in range(10):
            _, fds = request_fds(veth.inside, [0], kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            _, fds = request_fds(veth.inside, [0], kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)


# ---- QEMU's UMEM size and the broker's memlock answer (issue 10) ---------------------------------------

def test_qemu_umem_from_the_user_sets_what_the_memlock_check_needs(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_grant(monkeypatch, [0])
    with qemu("-M", "none", user=65534) as v:
        limit = qemu_support.memlock_limit(Path(f"/proc/{v.pid}/limits").read_text())
        if limit is None or limit < 4 << 20:
            pytest.skip(f"QEMU's memlock limit here is {limit}")
        rc = qmp_cli.main(["qmp-attach", "--qmp", v.qmp_path, "--id", "xdp0", "-i", "lo", "-q", "1", "--force",
                           "--qemu-umem", "4MiB", "--json"])
        out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["error"]["message"] == NOT_AF_XDP
    assert not [w for w in out["error"]["warnings"] if "RLIMIT_MEMLOCK" in w]  # a 4 MiB UMEM fits


MEMLOCK_POLICY = BARE_POLICY + """
[admin]
users = [0]
"""


def test_qmp_attach_tells_the_brokers_memlock_answer(veth: VethNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU runs as another uid (the admin names it as holder): the broker may not raise its limit (no
    raise_memlock), and the warning is the broker's answer, asked with the size the user gave."""
    with qemu("-M", "none", user=65534) as v, BrokerProcess(veth.name, MEMLOCK_POLICY) as broker:
        limit = qemu_support.memlock_limit(Path(f"/proc/{v.pid}/limits").read_text())
        if limit is None or limit >= 64 << 20:
            pytest.skip(f"QEMU's memlock limit here is {limit}")
        rc = qmp_cli.main(["qmp-attach", "--qmp", v.qmp_path, "--id", "xdp0", "-i", veth.inside, "-q", "1",
                           "--qemu-umem", "64MiB", "--socket", broker.socket_path, "--force", "--json"])
        out = json.loads(capsys.readouterr().out)
        grant = [r for r in broker.records() if r.get("event") == "grant"][-1]
    assert rc == 1 and out["error"]["code"] == "qmp-error", out
    assert grant["request"]["memlock"] == 64 << 20
    (warning,) = [w for w in out["error"]["warnings"] if "RLIMIT_MEMLOCK" in w]
    assert warning.startswith(f"QEMU (pid {v.pid}) may lock {limit >> 20} MiB (RLIMIT_MEMLOCK) but its af-xdp UMEM "
                              "needs 64 MiB, and the broker did not raise it: ")
    assert "allows no raise" in warning and "LimitMEMLOCK=67108864" in warning


def test_qemu_dying_during_a_command_is_said_plainly() -> None:
    """QEMU 10.0.2 segfaults in netdev_add when UMEM creation fails: the user must read that QEMU exited
    (and how), not "Connection reset by peer". Here QEMU is killed with SIGSEGV as the command is sent."""
    with qemu("-M", "none") as vm:
        with vm.connect() as m:
            vm.proc.send_signal(signal.SIGSEGV)
            with pytest.raises(q.QMPConnectionError) as e:
                for _ in range(50):  # until the death is seen
                    m.execute("query-status")
                    time.sleep(0.02)
        assert str(e.value).startswith(f"QEMU (pid {vm.pid}) exited during query-status (killed by SIGSEGV"), e.value
        assert "Connection reset" not in str(e.value) and "Broken pipe" not in str(e.value)
