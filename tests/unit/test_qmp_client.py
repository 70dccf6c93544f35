"""client/qmp.py and the qmp-attach/qmp-detach commands against a small fake QMP monitor (no root, no QEMU).

The fake keeps QEMU's relevant semantics: getfd takes the fd that came with the command, netdev_add takes the
fds it names (monitor_fd_param), netdev_del closes them (and, under a device, leaves that device in place with
a dead link), device_del may answer before DEVICE_DELETED, qom-get reads a device's netdev. The real QEMU binary
is exercised in tests/integration/test_qmp.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import hotplug, qemu_support, qmp_cli
from xskbroker.client import qmp as q
from xskbroker.wire.errors import BrokerError

from .test_qmp_pure import SCHEMA_7_2, SCHEMA_AF_XDP

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "fake"},
                    "capabilities": ["oob"]}}
EVENT = {"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}


class FakeQemu:
    def __init__(self, path: str, af_xdp: bool = True, greeting: Any = GREETING) -> None:
        self.af_xdp, self.greeting = af_xdp, greeting
        self.fds: dict[str, int] = {}
        self.netdevs: dict[str, list[int]] = {"existing": []}
        self.devices: dict[str, str] = {}  # device id -> the netdev it was plugged onto
        self.fail: dict[str, tuple[str, str]] = {}  # command -> (class, desc)
        self.delay: dict[str, float] = {}  # command -> seconds before answering
        self.unplug = "async"  # device_del: "async" (event after the answer) or "never" (guest never acks)
        self.log: list[tuple[str, dict[str, Any], list[int]]] = []  # command, arguments, inodes of its fds
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def commands(self) -> list[str]:
        return [c for c, _, _ in self.log if c not in ("qmp_capabilities", "query-qmp-schema")]

    def close(self) -> None:
        self.listener.close()
        for fd in [*self.fds.values(), *(f for fds in self.netdevs.values() for f in fds)]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _send(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        conn.sendall(json.dumps(msg).encode() + b"\r\n")

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            if self.greeting is not None:
                conn.sendall(json.dumps(self.greeting).encode() + b"\r\n")
            buf, pending = b"", []
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 16)
                except OSError:
                    return
                if not data:
                    return
                pending += fds  # fds belong to the command whose bytes came with them, as in QEMU
                buf += data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    self._handle(conn, json.loads(line), pending)
                    pending = []

    def _handle(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> None:
        cmd, args, cid = msg["execute"], msg.get("arguments", {}), msg.get("id")
        self.log.append((cmd, args, [os.fstat(fd).st_ino for fd in fds]))
        time.sleep(self.delay.get(cmd, 0))
        self._send(conn, EVENT)  # an event before every answer: the client must skip and keep it
        after: list[dict[str, Any]] = []
        try:
            if cmd in self.fail:
                raise _Err(*self.fail[cmd])
            ret = self._do(cmd, args, fds, after)
            reply: dict[str, Any] = {"return": ret}
        except _Err as e:
            for fd in fds:
                os.close(fd)
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        if cid is not None:
            reply["id"] = cid
        self._send(conn, reply)
        for ev in after:
            time.sleep(0.02)
            self._send(conn, ev)

    def _do(self, cmd: str, args: dict[str, Any], fds: list[int], after: list[dict[str, Any]]) -> Any:
        if cmd == "qmp_capabilities":
            return {}
        if cmd == "query-qmp-schema":
            return SCHEMA_AF_XDP if self.af_xdp else SCHEMA_7_2
        if cmd == "getfd":
            if not fds:
                raise _Err("GenericError", "No file descriptor supplied via SCM_RIGHTS")
            if args["fdname"] in self.fds:
                os.close(self.fds[args["fdname"]])
            self.fds[args["fdname"]] = fds[0]
            return {}
        if cmd == "closefd":
            if args["fdname"] not in self.fds:
                raise _Err("GenericError", f"File descriptor named '{args['fdname']}' not found")
            os.close(self.fds.pop(args["fdname"]))
            return {}
        if cmd == "netdev_add":
            if not self.af_xdp:
                raise _Err("GenericError", "Parameter 'type' does not accept value 'af-xdp'")
            if args["id"] in self.netdevs:
                raise _Err("GenericError", f"Duplicate ID '{args['id']}' for netdev")
            taken = []
            for name in args["sock-fds"].split(":"):
                if name not in self.fds:
                    raise _Err("GenericError", f"File descriptor named '{name}' not found")
                taken.append(self.fds.pop(name))
            self.netdevs[args["id"]] = taken
            return {}
        if cmd == "netdev_del":
            if args["id"] not in self.netdevs:
                raise _Err("DeviceNotFound", f"Device '{args['id']}' not found")
            for fd in self.netdevs.pop(args["id"]):
                os.close(fd)
            return {}
        if cmd == "device_add":
            if args["netdev"] not in self.netdevs:
                raise _Err("GenericError", f"Property 'virtio-net-device.netdev' can't find value '{args['netdev']}'")
            if args["id"] in self.devices:
                raise _Err("GenericError", f"Duplicate device ID '{args['id']}'")
            self.devices[args["id"]] = args["netdev"]
            return {}
        if cmd == "qom-get":
            dev = args["path"].removeprefix("/machine/peripheral/")
            if dev not in self.devices:
                raise _Err("DeviceNotFound", f"Device '{args['path']}' not found")
            if args["property"] != "netdev":
                raise _Err("GenericError", f"Property 'virtio-net-pci.{args['property']}' not found")
            return self.devices[dev]
        if cmd == "device_del":
            if args["id"] not in self.devices:
                raise _Err("DeviceNotFound", f"Device '{args['id']}' not found")
            if self.unplug == "async":
                del self.devices[args["id"]]
                after.append({"event": "DEVICE_DELETED", "data": {"path": f"/machine/peripheral/{args['id']}/x"}})
                after.append({"event": "DEVICE_DELETED",
                              "data": {"device": args["id"], "path": f"/machine/peripheral/{args['id']}"}})
            return {}
        raise _Err("CommandNotFound", f"The command {cmd} has not been found")


class _Err(Exception):
    def __init__(self, cls: str, desc: str) -> None:
        self.cls, self.desc = cls, desc


@pytest.fixture
def qmp_path(tmp_path: Path) -> str:
    return str(tmp_path / "vm.qmp")


@pytest.fixture
def fake(qmp_path: str) -> Iterator[FakeQemu]:
    f = FakeQemu(qmp_path)
    yield f
    f.close()


def socketpairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(n)]


def peer_closed(s: socket.socket) -> bool:
    """True once no process holds the other end any more (recv sees EOF)."""
    s.settimeout(1.0)
    return s.recv(1) == b""


# ---- the client ----------------------------------------------------------------------------------------

def test_greeting_negotiation_and_events_skipped_but_kept(fake: FakeQemu, qmp_path: str) -> None:
    with q.QMP(qmp_path) as m:
        assert m.version == qemu_support.QemuVersion(10, 0, 0, "fake")
        assert m.execute("query-qmp-schema") == SCHEMA_AF_XDP
        assert [e["event"] for _, e in m.events] == ["RESUME", "RESUME"]  # one per command, capabilities included
        assert m.pid == os.getpid()  # SO_PEERCRED of the monitor socket: here the fake is this process
    assert fake.log[0][0] == "qmp_capabilities"


def test_qemu_error_desc_is_raised_untouched(fake: FakeQemu, qmp_path: str) -> None:
    with q.QMP(qmp_path) as m, pytest.raises(q.QMPError) as e:
        m.execute("no-such-command")
    assert (str(e.value), e.value.error_class) == ("The command no-such-command has not been found", "CommandNotFound")


def test_fds_travel_with_the_command_that_names_them(fake: FakeQemu, qmp_path: str) -> None:
    a, _b = socket.socketpair()
    with q.QMP(qmp_path) as m:
        m.execute("getfd", {"fdname": "x"}, fds=[a.fileno()])
        with pytest.raises(q.QMPError, match="No file descriptor supplied via SCM_RIGHTS"):
            m.execute("getfd", {"fdname": "y"})
    assert fake.log[1] == ("getfd", {"fdname": "x"}, [os.fstat(a.fileno()).st_ino])
    assert fake.log[2] == ("getfd", {"fdname": "y"}, [])


def test_a_timeout_leaves_the_connection_usable(fake: FakeQemu, qmp_path: str) -> None:
    fake.delay["slow"] = 0.3
    with q.QMP(qmp_path) as m:
        started = time.monotonic()
        with pytest.raises(q.QMPTimeout, match=r"did not answer slow within 0\.1 s"):
            m.execute("slow", timeout=0.1)
        assert time.monotonic() - started < 0.25
        assert m.execute("qmp_capabilities") == {}  # the late error for "slow" is recognised by id and dropped


def test_no_greeting_is_a_clear_timeout(qmp_path: str) -> None:
    f = FakeQemu(qmp_path, greeting=None)
    try:
        with pytest.raises(q.QMPTimeout, match=r"no QMP greeting .* one QMP client per monitor socket"):
            q.QMP(qmp_path, timeout=0.2)
    finally:
        f.close()


def test_not_a_monitor(qmp_path: str) -> None:
    f = FakeQemu(qmp_path, greeting={"hello": 1})
    try:
        with pytest.raises(q.QMPConnectionError, match="did not greet like a QMP monitor"):
            q.QMP(qmp_path)
    finally:
        f.close()


@pytest.mark.parametrize("major", [float("inf"), float("nan")])
def test_a_greeting_with_a_version_that_is_no_number_is_not_a_monitor(qmp_path: str, major: float) -> None:
    # json reads 1e999 (or Infinity) as inf, and int(inf) raises OverflowError: not the documented error
    f = FakeQemu(qmp_path, greeting={"QMP": {"version": {"qemu": {"major": major, "minor": 0, "micro": 0}}}})
    try:
        with pytest.raises(q.QMPConnectionError, match="did not greet like a QMP monitor"):
            q.QMP(qmp_path)
    finally:
        f.close()


def test_an_event_whose_data_is_no_object_is_skipped_not_matched() -> None:
    # QEMU's data is always an object; a monitor that sends another shape must not crash the caller's match
    ours, theirs = socket.socketpair()
    lines = [GREETING, {"return": {}, "id": "xsk1"}, {"event": "DEVICE_DELETED", "data": 5},
             {"event": "DEVICE_DELETED", "data": {"device": "n-dev"}}]
    theirs.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in lines))
    with q.QMP.from_socket(ours, timeout=1.0) as m:
        ev = m.wait_event("DEVICE_DELETED", lambda d: d.get("device") == "n-dev")
    assert ev["data"] == {"device": "n-dev"}
    theirs.close()


@pytest.mark.parametrize("schema", [5, [{"name": "netdev_add", "arg-type": []}]])
def test_a_schema_not_shaped_like_qemus_is_a_connection_error(schema: Any) -> None:
    # qmp-attach catches the QMP errors around check_af_xdp: any other exception would be a traceback
    ours, theirs = socket.socketpair()
    lines = [GREETING, {"return": {}, "id": "xsk1"}, {"return": schema, "id": "xsk2"}]
    theirs.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in lines))
    with q.QMP.from_socket(ours, timeout=1.0) as m, pytest.raises(q.QMPConnectionError, match="query-qmp-schema"):
        m.check_af_xdp()
    theirs.close()


def test_unreachable_monitor(tmp_path: Path) -> None:
    with pytest.raises(q.QMPConnectionError, match=r"cannot reach QEMU's QMP socket at .*nothing"):
        q.QMP(str(tmp_path / "nothing"))


def test_connection_closed_mid_command(qmp_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(qmp_path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(json.dumps(GREETING).encode() + b"\n")
        conn.recv(1000)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(q.QMPConnectionError, match="QEMU closed the QMP connection"):
        q.QMP(qmp_path)
    listener.close()


def test_capability_check(qmp_path: str) -> None:
    f = FakeQemu(qmp_path, af_xdp=False)
    try:
        with q.QMP(qmp_path) as m, pytest.raises(qemu_support.AfXdpUnsupported) as e:
            m.check_af_xdp()
        assert str(e.value) == (f"QEMU 10.0.0 (fake) at {qmp_path} has no af-xdp netdev backend (this one was built "
                                "without libxdp) (needs QEMU ≥ 8.2 built with libxdp)")
    finally:
        f.close()


# ---- attach / detach -----------------------------------------------------------------------------------

def test_attach_sends_one_getfd_per_queue_then_netdev_add_then_device_add(fake: FakeQemu, qmp_path: str) -> None:
    pairs = socketpairs(2)
    with q.QMP(qmp_path) as m:
        att = hotplug.attach(m, "xdp1", "eth1", [a.fileno() for a, _ in pairs], start_queue=2, xdp_mode="skb",
                       device="virtio-net-pci", device_props={"mq": True, "vectors": 6})
    inodes = [os.fstat(a.fileno()).st_ino for a, _ in pairs]
    assert fake.log[1:] == [
        ("getfd", {"fdname": "xdp1-q2"}, [inodes[0]]),
        ("getfd", {"fdname": "xdp1-q3"}, [inodes[1]]),
        ("netdev_add", {"type": "af-xdp", "id": "xdp1", "ifname": "eth1", "queues": 2, "start-queue": 2,
                        "inhibit": True, "sock-fds": "xdp1-q2:xdp1-q3", "mode": "skb"}, []),
        ("device_add", {"mq": True, "vectors": 6, "driver": "virtio-net-pci", "netdev": "xdp1", "id": "xdp1-dev"}, []),
    ]
    assert (att.queues, att.fd_names, att.device_id) == ((2, 3), ("xdp1-q2", "xdp1-q3"), "xdp1-dev")
    assert "mode" not in hotplug.netdev_arguments("n", "eth1", ["n-q0"], 0, "native")
    assert fake.netdevs["xdp1"] and not fake.fds


def test_netdev_add_failure_closes_every_fd_in_qemu(fake: FakeQemu, qmp_path: str) -> None:
    fake.fail["netdev_add"] = ("GenericError",
                               "failed to create umem for eth1 queue_index: 0: No buffer space available")
    pairs = socketpairs(2)
    with q.QMP(qmp_path) as m, pytest.raises(q.QMPError) as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno() for a, _ in pairs], device="virtio-net-pci")
    assert str(e.value) == "failed to create umem for eth1 queue_index: 0: No buffer space available"
    assert e.value.__notes__ == ["unwound: closed fd(s) n0-q0, n0-q1 in QEMU"]
    assert fake.commands() == ["getfd", "getfd", "netdev_add", "closefd", "closefd"]
    for a, b in pairs:
        a.close()
        assert peer_closed(b)  # neither this process nor the "QEMU" holds the socket any more


def test_duplicate_netdev_id_never_deletes_the_existing_netdev(fake: FakeQemu, qmp_path: str) -> None:
    (a, _), = socketpairs(1)
    with q.QMP(qmp_path) as m, pytest.raises(q.QMPError, match="Duplicate ID 'existing' for netdev"):
        hotplug.attach(m, "existing", "eth1", [a.fileno()])
    assert "netdev_del" not in fake.commands() and "existing" in fake.netdevs and not fake.fds


def test_getfd_failure_midway_closes_the_ones_sent(fake: FakeQemu, qmp_path: str) -> None:
    pairs = socketpairs(3)
    real_do = fake._do

    def second_getfd_fails(cmd: str, args: dict[str, Any], fds: list[int], after: list[dict[str, Any]]) -> Any:
        if cmd == "getfd" and args["fdname"] == "n0-q1":
            raise _Err("GenericError", "Too many open files")
        return real_do(cmd, args, fds, after)

    fake._do = second_getfd_fails  # type: ignore[method-assign]
    with q.QMP(qmp_path) as m, pytest.raises(q.QMPError, match="Too many open files") as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno() for a, _ in pairs])
    assert fake.commands() == ["getfd", "getfd", "closefd", "closefd"]
    assert e.value.__notes__ == ["unwound: closed fd(s) n0-q0 in QEMU",
                                 "fd(s) n0-q1 were not in QEMU's monitor (never arrived, or taken by netdev_add)"]
    assert not fake.fds


def test_device_add_failure_deletes_the_netdev_it_added(fake: FakeQemu, qmp_path: str) -> None:
    fake.fail["device_add"] = ("GenericError", "No 'PCI' bus found for device 'virtio-net-pci'")
    (a, b), = socketpairs(1)
    with q.QMP(qmp_path) as m, pytest.raises(q.QMPError, match="No 'PCI' bus found") as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="virtio-net-pci")
    assert fake.commands() == ["getfd", "netdev_add", "device_add", "netdev_del"]
    assert e.value.__notes__ == ["unwound: deleted netdev 'n0' (QEMU closed its sockets)"]
    a.close()
    assert peer_closed(b) and "n0" not in fake.netdevs


def test_bad_id_fails_before_anything_is_sent(fake: FakeQemu, qmp_path: str) -> None:
    with q.QMP(qmp_path) as m, pytest.raises(ValueError, match="not a valid QEMU id"):
        hotplug.attach(m, "n:0", "eth1", [0])
    assert fake.commands() == []


def test_detach_waits_for_device_deleted_then_deletes_the_netdev(fake: FakeQemu, qmp_path: str) -> None:
    (a, b), = socketpairs(1)
    with q.QMP(qmp_path) as m:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="e1000")
        a.close()
        done = hotplug.detach(m, "n0", timeout=2)
    assert done == hotplug.Detached("n0", "n0-dev", True)
    assert fake.commands()[-2:] == ["device_del", "netdev_del"] and not fake.devices and "n0" not in fake.netdevs
    assert peer_closed(b)


def test_detach_without_a_device(fake: FakeQemu, qmp_path: str) -> None:
    (a, _), = socketpairs(1)
    with q.QMP(qmp_path) as m:
        hotplug.attach(m, "n0", "eth1", [a.fileno()])
        assert hotplug.detach(m, "n0") == hotplug.Detached("n0", "n0-dev", False)
        with pytest.raises(q.QMPError, match="Device 'n0' not found"):
            hotplug.detach(m, "n0")


def test_detach_keeps_the_netdev_when_the_guest_does_not_release_the_device(fake: FakeQemu, qmp_path: str) -> None:
    fake.unplug = "never"
    (a, _), = socketpairs(1)
    with q.QMP(qmp_path) as m:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="virtio-net-pci")
        with pytest.raises(q.QMPTimeout, match=r"'n0-dev' is still present 0\.2 s after device_del.*'n0' is kept"):
            hotplug.detach(m, "n0", timeout=0.2)
    assert "netdev_del" not in fake.commands() and "n0" in fake.netdevs


# ---- the commands --------------------------------------------------------------------------------------

def _grant(monkeypatch: pytest.MonkeyPatch, queues: list[int], xdp_mode: str = "native") -> list[socket.socket]:
    """Stand in for the broker: a bare grant reply whose fds are one end of fresh socketpairs."""
    pairs = socketpairs(len(queues))
    fds = [a.detach() for a, _ in pairs]

    def request_fds(interface: str, count: int, **kw: Any) -> tuple[dict[str, Any], list[int]]:
        assert kw["kind"] == "bare" and count == len(queues)
        reply = {"lease": "L1", "kind": "bare", "interface": interface, "xdp_mode": xdp_mode,
                 "sockets": [{"queue": x, "fd": i} for i, x in enumerate(queues)]}
        return reply, fds

    monkeypatch.setattr("xskbroker.client.grant.request_fds", request_fds)
    # the "QEMU" here is this process, whose memlock limit and capabilities vary by who runs the tests
    monkeypatch.setattr(qemu_support, "memlock_shortfall", lambda pid, queues, per_queue=None: None)
    return [b for _, b in pairs]


def test_qmp_attach_refuses_without_af_xdp_and_asks_nothing_of_the_broker(
        qmp_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    f = FakeQemu(qmp_path, af_xdp=False)
    monkeypatch.setattr("xskbroker.client.grant.request_fds", lambda *a, **k: pytest.fail("the broker was asked"))
    try:
        rc = qmp_cli.main(["qmp-attach", "--qmp", qmp_path, "--id", "n0", "-i", "eth1", "-q", "1", "--json"])
    finally:
        f.close()
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["error"]["code"] == "af-xdp-unsupported"
    assert "has no af-xdp netdev backend" in out["error"]["message"]


def test_qmp_attach_and_detach_end_to_end(fake: FakeQemu, qmp_path: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    peers = _grant(monkeypatch, [1, 2], "skb")
    rc = qmp_cli.main(["qmp-attach", "--qmp", qmp_path, "--id", "xdp0", "-i", "eth1", "-q", "2", "--start-queue",
                       "1", "--device", "virtio-net-pci", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["netdev"]["sock-fds"] == "xdp0-q1:xdp0-q2" and out["netdev"]["mode"] == "skb"
    assert out["device"]["id"] == "xdp0-dev" and out["lease"] == "L1" and out["queues"] == [1, 2]
    assert len(fake.netdevs["xdp0"]) == 2 and not fake.fds
    for b in peers:  # this process closed its copies: only the "QEMU" holds the sockets now
        b.settimeout(0.05)
        with pytest.raises(TimeoutError):
            b.recv(1)
    f2 = FakeQemu(qmp_path + "2")
    f2.devices, f2.netdevs = fake.devices, fake.netdevs  # QEMU serves one client per monitor: use a new fake one
    try:
        rc = qmp_cli.main(["qmp-detach", "--qmp", qmp_path + "2", "--id", "xdp0"])
    finally:
        f2.close()
    assert rc == 0 and "removed device 'xdp0-dev' and netdev 'xdp0'" in capsys.readouterr().out
    assert all(peer_closed(b) for b in peers)


def test_qmp_attach_shows_qemus_error_as_is_and_releases_the_grant(
        fake: FakeQemu, qmp_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake.fail["netdev_add"] = ("GenericError", "no XDP program loaded on 'eth1', ifindex: 3: Success")
    peers = _grant(monkeypatch, [0])
    rc = qmp_cli.main(["qmp-attach", "--qmp", qmp_path, "--id", "n0", "-i", "eth1", "-q", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.splitlines()
    assert lines[:2] == [
        "xskbroker: QEMU refused netdev_add: no XDP program loaded on 'eth1', ifindex: 3: Success",
        "  unwound: closed fd(s) n0-q0 in QEMU"]
    # no broker behind this fake grant: the release is tried and its failure said
    assert lines[2].startswith("  the grant's sockets were closed here and in QEMU, but releasing lease ")
    assert lines[2].endswith("the broker ends it once it sees the queues empty") and len(lines) == 3
    assert peer_closed(peers[0])


def test_qmp_attach_whose_unwind_could_not_delete_the_netdev_does_not_say_qemu_closed_the_sockets(
        fake: FakeQemu, qmp_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """device_add failed and so did the netdev_del that would have closed QEMU's copies: QEMU may still hold the
    sockets, yet the note said they were closed here and in QEMU."""
    fake.fail["device_add"] = ("GenericError", "No 'PCI' bus found for device 'virtio-net-pci'")
    fake.fail["netdev_del"] = ("GenericError", "netdev busy")
    _grant(monkeypatch, [0])
    rc = qmp_cli.main(["qmp-attach", "--qmp", qmp_path, "--id", "n0", "-i", "eth1", "-q", "1",
                       "--device", "virtio-net-pci"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 1 and lines[1] == "  could not delete netdev 'n0': netdev busy", lines
    assert lines[2].startswith("  the grant's sockets were closed here, but QEMU may still hold them"), lines
    assert "in QEMU, " not in lines[2] and len(fake.netdevs["n0"]) == 1


class _Broker:
    """Stands in for the broker's connection: records the release asked for and answers with `error`."""

    def __init__(self, asked: list[Any], error: str | None) -> None:
        self.asked, self.error = asked, error

    def __call__(self, path: str, timeout: float) -> _Broker:
        return self

    def __enter__(self) -> _Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def call(self, req: Any) -> dict[str, Any]:
        self.asked.append(req)
        if self.error:
            raise BrokerError(self.error, "its sockets are not all closed")
        return {"ok": True}


@pytest.mark.parametrize("error", [None, "lease-in-use"])
def test_release_lease_after_an_unwind_that_left_sockets_in_qemu_ends_the_lease_only_if_they_are_closed(
        monkeypatch: pytest.MonkeyPatch, error: str | None) -> None:
    asked: list[Any] = []
    monkeypatch.setattr("xskbroker.client.connection.Connection", _Broker(asked, error))
    note = qmp_cli.release_lease("/nowhere", {"lease": "L1"}, 1.0, ["could not delete netdev 'n0': timed out"])
    assert [(r.lease, r.if_closed) for r in asked] == [("L1", True)]
    if error:
        assert note == ("the grant's sockets were closed here, but QEMU may still hold them (the unwind could not "
                        "remove them there); lease L1 is kept while they are open: the broker ends it once QEMU "
                        "closes them (or exits)")
    else:
        assert "lease L1 was released: the broker found them closed in QEMU too" in note
    asked.clear()
    assert qmp_cli.release_lease("/nowhere", {"lease": "L2"}, 1.0, ["unwound: closed fd(s) n0-q0 in QEMU"]) in (
        "the grant's sockets were closed here and in QEMU, and lease L2 was released",
        "the grant's sockets were closed here and in QEMU, but releasing lease L2 failed (lease-in-use: its sockets "
        "are not all closed); the broker ends it once it sees the queues empty")
    assert [(r.lease, r.if_closed) for r in asked] == [("L2", False)]


def test_qmp_attach_rejects_a_grant_for_other_queues(
        fake: FakeQemu, qmp_path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    peers = _grant(monkeypatch, [5])
    rc = qmp_cli.main(["qmp-attach", "--qmp", qmp_path, "--id", "n0", "-i", "eth1", "-q", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["error"]["code"] == "bad-reply" and fake.commands() == []
    assert peer_closed(peers[0])


def test_qmp_attach_reports_an_unreachable_monitor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = qmp_cli.main(["qmp-attach", "--qmp", str(tmp_path / "none"), "--id", "n0", "-i", "eth1", "-q", "1"])
    assert rc == 1 and "cannot reach QEMU's QMP socket at" in capsys.readouterr().err


def test_attach_grant_plugs_in_queue_order_and_closes_this_process_copies(fake: FakeQemu, qmp_path: str) -> None:
    pairs = socketpairs(2)
    inodes = [os.fstat(a.fileno()).st_ino for a, _ in pairs]
    fds = [a.detach() for a, _ in pairs]
    reply = {"interface": "eth1", "xdp_mode": "skb", "sockets": [{"queue": 4, "fd": 1}, {"queue": 3, "fd": 0}]}
    with q.QMP(qmp_path) as m:
        att = hotplug.attach_grant(m, "xdp0", reply, fds, interface="eth1", start_queue=3, queues=2)
    assert att.fd_names == ("xdp0-q3", "xdp0-q4") and att.netdev["mode"] == "skb"
    assert [(a["fdname"], i) for c, a, i in fake.log if c == "getfd"] == [("xdp0-q3", [inodes[0]]),
                                                                          ("xdp0-q4", [inodes[1]])]
    fake.close()  # the fake QEMU held the only copies left: this process kept none
    assert all(peer_closed(b) for _, b in pairs)


def test_attach_grant_closes_the_fds_of_a_reply_for_other_queues(fake: FakeQemu, qmp_path: str) -> None:
    pairs = socketpairs(1)
    fds = [a.detach() for a, _ in pairs]
    with q.QMP(qmp_path) as m, pytest.raises(ValueError, match=r"granted queues \[5\], not \[0\]"):
        hotplug.attach_grant(m, "xdp0", {"sockets": [{"queue": 5, "fd": 0}]}, fds, interface="eth1", start_queue=0,
                             queues=1)
    assert fake.commands() == [] and peer_closed(pairs[0][1])
