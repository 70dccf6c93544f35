"""QMP hot-plug against the real QEMU binary (Debian's qemu-system-x86, no KVM, machine paused with -S).

Debian 12's QEMU (7.2) has no af-xdp backend, so these tests prove what can be proved with it: fds really
reach QEMU through getfd, the capability check says af-xdp is absent, QEMU's own error text comes through
untouched, the unwind leaves QEMU holding nothing, and detach waits for the guest's DEVICE_DELETED. Whose lease a
hand-over leaves, and when it ends: tests/integration/test_qmp_leases.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import hotplug, qemu_support, qmp_cli
from xskbroker.client import qmp as q
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace

from .conftest import wait_for
from .paused_qemu import (
    BARE_POLICY,
    NOT_AF_XDP,
    SKIP,
    Qemu,
    binary_version,
    eof,
    held,
    inode,
    qemu,
    skip_unless_bare_is_supported,
)

pytestmark = SKIP



@pytest.fixture
def vm() -> Iterator[Qemu]:
    with qemu("-M", "none") as v:
        yield v


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


class LateDeviceAdd:
    """The real QEMU as attach's monitor, for the unwind of a device_add that lands after its timeout.

    This QEMU has no af-xdp: netdev_add becomes a hubport netdev of the same id that takes the named fds, as
    af-xdp's does (closefd, here). device_add is given no time to answer: it times out, then QEMU carries it out."""

    def __init__(self, m: q.QMP) -> None:
        self.m = m

    def execute(self, command: str, arguments: Any = None, fds: Any = None) -> Any:
        if command == "netdev_add":
            for name in arguments["sock-fds"].split(":"):
                self.m.execute("closefd", {"fdname": name})
            return self.m.execute("netdev_add", {"type": "hubport", "id": arguments["id"], "hubid": 0})
        return self.m.execute(command, arguments, fds, timeout=0 if command == "device_add" else None)


def test_a_device_add_that_lands_after_its_timeout_is_unwound_out_of_qemu() -> None:
    # usb-net unplugs without the guest; netdev_del alone would leave it plugged, its link dead
    (a, b), = [socket.socketpair()]
    with qemu("-M", "pc", "-device", "qemu-xhci,id=xhci") as v, v.connect() as m:
        before = sorted(v.fd_links())
        with pytest.raises(q.QMPTimeout, match="did not answer device_add"):
            hotplug.attach(LateDeviceAdd(m), "n0", "lo", [a.fileno()], device="usb-net")

        def peripherals() -> list[str]:
            return [p["name"] for p in m.execute("qom-list", {"path": "/machine/peripheral"})]

        wait_for(lambda: "n0-dev" not in peripherals(), 5.0, "QEMU to remove the late device")
        with pytest.raises(q.QMPError, match="Device 'n0' not found"):
            m.execute("netdev_del", {"id": "n0"})
        assert sorted(v.fd_links()) == before
    a.close()
    assert eof(b)


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
        skip_unless_bare_is_supported(out["error"]["code"], out["error"]["message"])
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
            skip_unless_bare_is_supported(e.code, e.message)
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
