"""The libvirt hook's worker: its plug sequence against a fake QEMU monitor and a fake broker (no root).

The hook's other pure parts: tests/unit/test_libvirt_hook.py. The worker against the real QEMU binary, a real
broker and a real libvirtd: tests/integration/test_libvirt.py.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from xskbroker.client import qemu_support
from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import identity as lvid
from xskbroker.client.libvirt import metadata as lvmeta
from xskbroker.client.libvirt import monitors as lvmon
from xskbroker.client.libvirt import state as lvstate
from xskbroker.client.libvirt import worker as lvworker
from xskbroker.wire import protocol as proto

from .test_qmp_client import FakeQemu


class FakeBroker:
    """Stands in for BrokerAgent: socketpair ends as the granted sockets; the other ends show who holds them."""

    def __init__(self, ident: lvid.Identity, socket_path: str, timeout: float, refuse: str | None = None) -> None:
        self.ident, self.socket_path, self.refuse = ident, socket_path, refuse
        self.peers: list[socket.socket] = []
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    def grant(self, interface: str, queues: int, start_queue: int, holder_pid: int,
              memlock: int) -> tuple[dict[str, Any], list[int]]:
        self.calls.append(("grant", (interface, queues, start_queue, holder_pid, memlock)))
        if self.refuse:
            raise proto.BrokerError(self.refuse, "no rule names uid 64055")
        pairs = [socket.socketpair() for _ in range(queues)]
        self.peers += [b for _, b in pairs]
        reply = {"lease": f"L{len(self.calls)}", "interface": interface, "xdp_mode": "skb",
                 "sockets": [{"queue": start_queue + i, "fd": i} for i in range(queues)]}
        if memlock:  # the broker answers about memlock only when asked
            reply["memlock"] = {"ok": False, "raised": False, "reason": "too low", "hint": "raise it"}
        return reply, [a.detach() for a, _ in pairs]

    def release(self, lease: str) -> dict[str, Any]:
        self.calls.append(("release", lease))
        return {"lease": lease}

    def close(self) -> None:
        self.closed = True


class FakeMonitor(lvmon.QMPMonitor):
    def pid(self) -> int:
        return os.getpid()  # the fake QEMU is this process


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[FakeQemu]:
    f = FakeQemu(str(tmp_path / "vm.qmp"))
    yield f
    f.close()


def worker(fake_qemu: FakeQemu, tmp_path: Path, interfaces: list[lvmeta.Interface], ipc_lock: bool = False,
           **broker: Any) -> tuple[dict[str, Any], list[FakeBroker], list[str]]:
    brokers: list[FakeBroker] = []

    def factory(ident: lvid.Identity, path: str, timeout: float) -> FakeBroker:
        brokers.append(FakeBroker(ident, path, timeout, **broker))
        return brokers[-1]

    lines: list[str] = []
    cfg = lvconf.Config(socket="/run/b.sock", state_dir=str(tmp_path), timeout=2.0)
    # the fake QEMU is this process: whether it "has" CAP_IPC_LOCK is the test's choice, not root's
    with mock.patch.object(qemu_support, "has_ipc_lock", lambda pid: ipc_lock):
        state = lvworker.run_worker("vm1", interfaces, cfg, FakeMonitor(str(tmp_path / "vm.qmp"), 2.0),
                                    lines.append, str(tmp_path / "vm1.json"), factory)
    assert state == lvstate.read_state(str(tmp_path / "vm1.json"))
    return state, brokers, lines


def test_worker_plugs_every_interface(fake_qemu: FakeQemu, tmp_path: Path) -> None:
    interfaces = [lvmeta.Interface("xdp0", "eth1", 2, 2, "virtio-net-pci", "52:54:00:00:00:01"),
                  lvmeta.Interface("xdp1", "eth2")]
    state, (broker,), lines = worker(fake_qemu, tmp_path, interfaces)
    me = lvid.Identity.of_process(os.getpid())
    assert broker.ident == me and broker.closed
    assert broker.calls == [("grant", ("eth1", 2, 2, os.getpid(), 64 << 20)), ("grant", ("eth2", 1, 0, os.getpid(),
                                                                                           32 << 20))]
    assert [c for c in fake_qemu.commands()] == ["getfd", "getfd", "netdev_add", "device_add", "getfd", "netdev_add"]
    netdev = {"type": "af-xdp", "id": "xdp0", "ifname": "eth1", "queues": 2, "start-queue": 2, "inhibit": True,
              "sock-fds": "xdp0-q2:xdp0-q3", "mode": "skb"}
    device = {"mac": "52:54:00:00:00:01", "mq": True, "vectors": 6, "driver": "virtio-net-pci", "netdev": "xdp0",
              "id": "xdp0-dev"}
    assert [a for c, a, _ in fake_qemu.log if c in ("netdev_add", "device_add")][:2] == [netdev, device]
    assert state["finished"] and state["qemu_pid"] == os.getpid() and state["identity"] == {
        "uid": me.uid, "gid": me.gid, "groups": list(me.groups)}
    a, b = state["interfaces"]
    assert (a["status"], a["lease"], a["netdev"], a["device_args"], a["released"]) == ("attached", "L1", netdev,
                                                                                        device, False)
    assert (b["status"], b["lease"], b["device_id"]) == ("attached", "L2", None)
    for s in broker.peers:  # QEMU (the fake) holds the sockets; the worker kept no copy
        s.settimeout(0.05)
        with pytest.raises(TimeoutError):
            s.recv(1)
    assert any("xdp0: warning: QEMU's RLIMIT_MEMLOCK looks too low for its UMEM: too low; raise it" in x for x in lines)
    assert lines[-1] == "done: 2 of 2 interface(s) attached"


def test_a_qemu_with_cap_ipc_lock_is_asked_no_memlock_and_not_warned(fake_qemu: FakeQemu, tmp_path: Path) -> None:
    # its UMEM is not charged to RLIMIT_MEMLOCK (libvirt's QEMU given the capability, docs/libvirt.md)
    state, (broker,), lines = worker(fake_qemu, tmp_path, [lvmeta.Interface("xdp0", "eth1")], ipc_lock=True)
    assert broker.calls == [("grant", ("eth1", 1, 0, os.getpid(), 0))]
    assert state["interfaces"][0]["status"] == "attached"
    assert any(x.endswith(", no memlock (QEMU has CAP_IPC_LOCK)") for x in lines), lines
    assert not any("RLIMIT_MEMLOCK" in x for x in lines), lines


def test_a_refused_device_add_is_unwound_and_released(fake_qemu: FakeQemu, tmp_path: Path) -> None:
    fake_qemu.fail["device_add"] = ("GenericError", "Bus 'pci.7' not found")
    state, (broker,), lines = worker(fake_qemu, tmp_path, [lvmeta.Interface("xdp0", "eth1", 1, 0, "virtio-net-pci")])
    (rec,) = state["interfaces"]
    assert rec["status"] == "failed" and rec["released"]
    assert rec["error"] == {"stage": "device_add", "qmp_class": "GenericError", "message": "Bus 'pci.7' not found",
                            "notes": ["unwound: deleted netdev 'xdp0' (QEMU closed its sockets)"]}
    assert broker.calls[-1] == ("release", "L1")
    assert fake_qemu.commands()[-1] == "netdev_del" and fake_qemu.netdevs == {"existing": []}
    broker.peers[0].settimeout(1)
    assert broker.peers[0].recv(1) == b""  # closed everywhere
    assert "xdp0: QEMU refused device_add: Bus 'pci.7' not found" in lines


def test_a_broker_refusal_is_recorded_and_qemu_is_not_touched(fake_qemu: FakeQemu, tmp_path: Path) -> None:
    state, _, lines = worker(fake_qemu, tmp_path, [lvmeta.Interface("xdp0", "eth1")], refuse="user-not-allowed")
    assert state["interfaces"][0]["error"] == {"stage": "grant", "code": "user-not-allowed",
                                               "message": "no rule names uid 64055"}
    assert fake_qemu.commands() == []
    assert "xdp0: the broker refused: user-not-allowed: no rule names uid 64055" in lines


def test_an_unreachable_monitor_is_recorded(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = lvconf.Config(state_dir=str(tmp_path), timeout=0.1)
    state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", "eth1")], cfg,
                                lvmon.QMPMonitor(str(tmp_path / "none"), 0.1), lines.append,
                                str(tmp_path / "vm1.json"), lambda *a: pytest.fail("the broker was asked"))
    assert state["finished"] and "No such file or directory" in state["error"] and state["interfaces"] == []
    assert json.loads((tmp_path / "vm1.json").read_text())["error"] == state["error"]


@pytest.mark.parametrize("greeting", [{"QMP": 1}, {"QMP": {"version": []}}, {"QMP": {"version": {"qemu": "x"}}}])
def test_a_monitor_that_greets_with_the_wrong_shapes_is_recorded_not_a_crash(greeting: Any, tmp_path: Path) -> None:
    # a QMP peer is whoever serves the configured socket: its greeting's shape is not to be trusted
    fake = FakeQemu(str(tmp_path / "vm.qmp"), greeting=greeting)
    try:
        lines: list[str] = []
        cfg = lvconf.Config(socket="/run/b.sock", state_dir=str(tmp_path), timeout=0.5)
        state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", "eth1")], cfg,
                                    FakeMonitor(str(tmp_path / "vm.qmp"), 0.5), lines.append, str(tmp_path / "s.json"))
    finally:
        fake.close()
    # open() tries again until its deadline (the fake serves one client): the error is then the timeout's
    assert state["finished"] and state["error"] and state["interfaces"] == []
    assert lines[-1].startswith(f"cannot reach QEMU through QMP socket {tmp_path / 'vm.qmp'}: ")
    assert lvstate.read_state(str(tmp_path / "s.json")) == state


class HostileSchema(FakeMonitor):
    def execute(self, command: str, arguments: Any = None, fds: Any = None) -> Any:
        if command == "query-qmp-schema":  # members that are not objects
            return [{"name": "netdev_add", "arg-type": "x"}, {"name": "x", "members": [1], "variants": [2]}]
        return super().execute(command, arguments, fds)


def test_a_schema_of_the_wrong_shapes_is_only_a_warning(fake_qemu: FakeQemu, tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = lvconf.Config(socket="/run/b.sock", state_dir=str(tmp_path), timeout=2.0)
    with mock.patch.object(qemu_support, "has_ipc_lock", lambda pid: False):
        state = lvworker.run_worker("vm1", [lvmeta.Interface("xdp0", "eth1")], cfg,
                                    HostileSchema(str(tmp_path / "vm.qmp"), 2.0), lines.append, None,
                                    lambda i, p, t: FakeBroker(i, p, t))
    assert state["finished"] and state["interfaces"][0]["status"] == "attached"
    assert any(x.startswith("could not read QEMU's netdev backends") for x in lines)
