"""The pure parts of client/qmp.py and client/qmp_cli.py: schema reading, messages, arguments, limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from xskbroker.client import hotplug, qmp_codec
from xskbroker.client import qemu_support as qs
from xskbroker.client import qmp as q
from xskbroker.client.qmp_cli import build_parser

# query-qmp-schema as QEMU 7.2 answers it (the relevant entries, names masked as QEMU does)
SCHEMA_7_2 = [
    {"name": "netdev_add", "ret-type": "0", "meta-type": "command", "arg-type": "100"},
    {"name": "100", "tag": "type", "meta-type": "object",
     "members": [{"name": "id", "type": "str"}, {"name": "type", "type": "347"}],
     "variants": [{"case": "user", "type": "349"}, {"case": "tap", "type": "350"}, {"case": "none", "type": "0"}]},
    {"name": "347", "meta-type": "enum",
     "members": [{"name": n} for n in ("none", "nic", "user", "tap", "socket", "hubport", "vhost-vdpa")],
     "values": ["none", "nic", "user", "tap", "socket", "hubport", "vhost-vdpa"]},
    {"name": "349", "meta-type": "object", "members": [{"name": "hostname", "type": "str", "default": None}]},
]

# the same from an af-xdp build (8.2+): the NetClientDriver member and the NetdevAFXDPOptions variant
AF_XDP_MEMBERS = ["ifname", "mode", "force-copy", "queues", "start-queue", "inhibit", "sock-fds"]
SCHEMA_AF_XDP = [
    {"name": "netdev_add", "ret-type": "0", "meta-type": "command", "arg-type": "101"},
    {"name": "101", "tag": "type", "meta-type": "object",
     "members": [{"name": "id", "type": "str"}, {"name": "type", "type": "360"}],
     "variants": [{"case": "tap", "type": "350"}, {"case": "af-xdp", "type": "363"}]},
    {"name": "360", "meta-type": "enum", "members": [{"name": n} for n in ("nic", "user", "tap", "af-xdp")]},
    {"name": "363", "meta-type": "object", "members": [{"name": m, "type": "str"} for m in AF_XDP_MEMBERS]},
]

V72 = qs.QemuVersion(7, 2, 22, "Debian 1:7.2+dfsg-7+deb12u18+b3")


def test_schema_of_qemu_7_2_has_no_af_xdp_but_its_backends_are_found() -> None:
    s = qs.netdev_support(SCHEMA_7_2)
    assert {"tap", "user", "socket", "hubport"} <= s.types  # the enum really was reached, so "absent" is real
    assert not s.af_xdp and not s.sock_fds and s.af_xdp_options == frozenset()


def test_schema_with_af_xdp_and_its_options() -> None:
    s = qs.netdev_support(SCHEMA_AF_XDP)
    assert s.af_xdp and s.sock_fds and s.af_xdp_options == frozenset(AF_XDP_MEMBERS)
    assert qs.unsupported_message(V72, "/run/vm.qmp", s) is None


def test_enum_given_only_as_legacy_values() -> None:
    schema = json.loads(json.dumps(SCHEMA_AF_XDP))
    schema[2] = {"name": "360", "meta-type": "enum", "values": ["tap", "af-xdp"]}
    assert qs.netdev_support(schema).af_xdp


def test_unexpected_layout_falls_back_to_the_backend_enum() -> None:
    schema = [e for e in SCHEMA_AF_XDP if e["name"] != "netdev_add"]
    schema[0] = {**schema[0], "name": "102"}
    schema[1] = {"name": "360", "meta-type": "enum", "members": [{"name": n} for n in ("tap", "af-xdp")]}
    s = qs.netdev_support(schema)
    assert s.af_xdp and s.sock_fds


def test_messages_name_the_version_the_path_and_what_is_needed() -> None:
    s = qs.netdev_support(SCHEMA_7_2)
    assert qs.unsupported_message(V72, "/run/vm.qmp", s) == (
        "QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3) at /run/vm.qmp has no af-xdp netdev backend "
        "(needs QEMU ≥ 8.2 built with libxdp)")
    built_without = qs.unsupported_message(qs.QemuVersion(10, 0, 2), "/q", s)
    assert built_without == ("QEMU 10.0.2 at /q has no af-xdp netdev backend (this one was built without libxdp) "
                             "(needs QEMU ≥ 8.2 built with libxdp)")
    no_fds = qs.NetdevSupport(frozenset({"af-xdp"}), frozenset({"ifname"}))
    assert "without sock-fds" in (qs.unsupported_message(qs.QemuVersion(8, 1, 0), "/q", no_fds) or "")


def test_version_from_the_greeting() -> None:
    v = qs.QemuVersion.from_wire({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian x"})
    assert (v, str(v), v.at_least(7, 2), v.at_least(8, 2)) == (qs.QemuVersion(7, 2, 22, "Debian x"),
                                                              "7.2.22 (Debian x)", True, False)
    assert str(qs.QemuVersion.from_wire({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""})) == "10.0.0"


def test_a_version_that_is_no_number_is_a_value_error() -> None:
    # the worker reads query-version's reply through from_wire and treats ValueError as a wrong shape
    for wire in ({"qemu": {"major": 1e999}}, json.loads('{"qemu": {"minor": -1e999}}')):
        with pytest.raises(ValueError):
            qs.QemuVersion.from_wire(wire)


def test_netdev_arguments_are_exactly_what_qemu_expects() -> None:
    names = [hotplug.fd_name("xdp1", 2), hotplug.fd_name("xdp1", 3)]
    assert hotplug.netdev_arguments("xdp1", "eth1", names, 2, "native") == {
        "type": "af-xdp", "id": "xdp1", "ifname": "eth1", "queues": 2, "start-queue": 2, "inhibit": True,
        "sock-fds": "xdp1-q2:xdp1-q3"}
    assert hotplug.netdev_arguments("n", "eth1", ["n-q0"], 0, "skb")["mode"] == "skb"
    with pytest.raises(ValueError):
        hotplug.netdev_arguments("n", "eth1", [], 0)
    assert hotplug.device_id_for("xdp1") == "xdp1-dev"


@pytest.mark.parametrize("good", ["n0", "xdp.1", "A-b_c"])
def test_ids_qemu_accepts(good: str) -> None:
    assert hotplug.check_id(good) == good


@pytest.mark.parametrize("bad", ["", "0n", "-n", "n:0", "n 0", "n/0", "n0\n", "é"])
def test_ids_qemu_refuses_are_refused_before_any_fd_is_sent(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid QEMU id"):
        hotplug.check_id(bad)


def test_command_encoding_and_message_parsing() -> None:
    assert qmp_codec.encode_command("getfd", {"fdname": "n-q0"}, "xsk1") == \
        b'{"execute":"getfd","arguments":{"fdname":"n-q0"},"id":"xsk1"}\n'
    assert qmp_codec.encode_command("qmp_capabilities") == b'{"execute":"qmp_capabilities"}\n'
    assert qmp_codec.parse_message(b'{"return": {}}\r') == {"return": {}}
    with pytest.raises(q.QMPConnectionError, match="not JSON"):
        qmp_codec.parse_message(b"{nope")
    with pytest.raises(q.QMPConnectionError, match="JSON list"):
        qmp_codec.parse_message(b"[1]")


def test_qmp_error_text_is_qemus_own() -> None:
    e = q.QMPError("netdev_add", "GenericError", "Parameter 'type' does not accept value 'af-xdp'")
    assert str(e) == "Parameter 'type' does not accept value 'af-xdp'"
    assert (e.command, e.error_class) == ("netdev_add", "GenericError")


LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max processes             95737                95737                processes
Max locked memory         8388608              16777216             bytes
"""


def test_memlock_and_capability_parsing() -> None:
    assert qs.memlock_limit(LIMITS) == 8 << 20
    assert qs.memlock_limit(LIMITS.replace("8388608 ", "unlimited")) is None
    assert qs.memlock_limit("") is None
    assert qs.has_cap("CapEff:\t0000000000004000\n", qs.CAP_IPC_LOCK)
    assert not qs.has_cap("CapEff:\t0000000000000000\n", qs.CAP_IPC_LOCK)
    assert qs.AF_XDP_UMEM_BYTES == 32 << 20  # (2048 + 2048) * 2 frames of 4 KiB, QEMU's fixed geometry


def test_grant_fds_orders_by_queue_and_checks_the_reply() -> None:
    reply = {"sockets": [{"queue": 3, "fd": 0}, {"queue": 2, "fd": 1}]}
    assert hotplug.grant_fds(reply, [10, 11], 2, 2) == [11, 10]
    with pytest.raises(ValueError, match=r"granted queues \[2, 3\], not \[0, 1\]"):
        hotplug.grant_fds(reply, [10, 11], 0, 2)
    with pytest.raises(ValueError, match="does not describe its sockets"):
        hotplug.grant_fds({"sockets": [{"queue": 0, "fd": 5}]}, [10], 0, 1)
    with pytest.raises(ValueError, match="does not describe its sockets"):
        hotplug.grant_fds({}, [], 0, 1)


def test_help_shows_examples_and_the_qmp_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("qmp-attach", "qmp-detach"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"xskbroker {cmd} --qmp" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["qmp-attach", "--help"])
    out = capsys.readouterr().out
    assert '"sock-fds": "xdp1-q2:xdp1-q3"' in out and "--force" in out


@pytest.mark.parametrize("argv, error", [
    (["--queues", "0"], "must be at least 1"),
    (["--queues", "1", "--start-queue", "-1"], "must be 0 or more"),
    (["--queues", "1", "--device-props", "[1]"], "must be a JSON object"),
    (["--queues", "1", "--device-props", "{"], "not JSON"),
])
def test_bad_arguments_are_usage_errors(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["qmp-attach", "--qmp", "/q", "--id", "n0", "-i", "eth1", *argv])
    assert exc.value.code == 2 and error in capsys.readouterr().err


def test_the_codec_frames_a_stream_and_reads_replies() -> None:
    f = qmp_codec.Framer("vm.qmp")
    assert f.next() is None
    f.feed(b'{"return": {}}\r\n\r\n{"event": "RESUME"')
    assert f.next() == {"return": {}}
    assert f.next() is None  # the blank line is skipped; the event is not whole yet
    f.feed(b"}\n")
    msg = f.next()
    assert msg == {"event": "RESUME"} and qmp_codec.is_event(msg)
    assert qmp_codec.command_json("getfd", {"fdname": "a"}) == '{"execute":"getfd","arguments":{"fdname":"a"}}'
    assert qmp_codec.reply_value("x", {"return": [1]}, lambda: "unused") == [1]
    with pytest.raises(qmp_codec.QMPError) as e:
        qmp_codec.reply_value("device_add", {"error": {"class": "GenericError", "desc": "Bus 'x' not found"}},
                              lambda: "unused")
    assert (e.value.command, e.value.error_class, str(e.value)) == ("device_add", "GenericError", "Bus 'x' not found")
    with pytest.raises(qmp_codec.QMPConnectionError, match="odd reply"):
        qmp_codec.reply_value("x", {"id": 1}, lambda: "odd reply")


def test_the_codec_refuses_a_huge_message() -> None:
    f = qmp_codec.Framer("vm.qmp")
    with pytest.raises(qmp_codec.QMPConnectionError, match="exceeds"):
        f.feed(b"x" * (qmp_codec.MAX_MESSAGE + 1))


class ScanCounter(bytearray):
    """A framer buffer that counts the bytes each search for a line end walks over."""

    walked = 0

    def _walk(self, start: int = 0) -> None:
        self.walked += max(len(self) - max(start, 0), 0)

    def __contains__(self, item: object) -> bool:
        self._walk()
        return super().__contains__(item)  # type: ignore[operator]

    def find(self, sub: Any, start: Any = 0, end: Any = None) -> int:
        self._walk(start or 0)
        return super().find(sub, start, end)

    def index(self, sub: Any, start: Any = 0, end: Any = None) -> int:
        self._walk(start or 0)
        return super().index(sub, start, end)

    def partition(self, sep: Any) -> tuple[bytearray, bytearray, bytearray]:
        self._walk()
        return super().partition(sep)


def test_the_codec_reads_a_long_line_in_small_chunks_in_linear_work() -> None:
    # a peer that trickles a long line made every chunk rescan all it had sent: quadratic up to MAX_MESSAGE
    f = qmp_codec.Framer("vm.qmp")
    f._buf = buf = ScanCounter()
    body = b'{"return": "' + b"x" * (1 << 20) + b'"}'
    for i in range(0, len(body), 1024):
        f.feed(body[i:i + 1024])
        assert f.next() is None
    f.feed(b"\r\n")
    assert f.next() == {"return": "x" * (1 << 20)} and f.next() is None
    walked = buf.walked
    assert walked <= 2 * len(body), f"{walked} bytes searched for {len(body)} fed"


def test_one_home_for_qemus_umem_per_queue() -> None:
    from xskbroker.client.launch import QEMU_UMEM_PER_QUEUE

    assert QEMU_UMEM_PER_QUEUE is qs.AF_XDP_UMEM_BYTES and qs.umem_bytes(3) == 3 * qs.AF_XDP_UMEM_BYTES


# ---- exec's memlock check honours CAP_IPC_LOCK (issue 10) ----------------------------------------------

def _status(amb: int = 0, bnd: int = (1 << 41) - 1) -> str:
    return f"Name:\tx\nCapInh:\t0\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t{bnd:016x}\nCapAmb:\t{amb:016x}\n"


def _vfs_cap(permitted: int, effective: bool = True) -> bytes:
    magic = 0x02000000 | (1 if effective else 0)  # VFS_CAP_REVISION_2
    return b"".join(v.to_bytes(4, "little") for v in (magic, permitted, 0, 0, 0))


def test_the_command_keeps_cap_ipc_lock_ambient_as_root_or_from_its_file() -> None:
    from xskbroker.client.launch import keeps_ipc_lock

    ipc_lock = 1 << 14
    assert keeps_ipc_lock(_status(amb=ipc_lock), 65534, None)  # setpriv --ambient-caps +ipc_lock
    assert keeps_ipc_lock(_status(), 0, None)  # root keeps its capabilities across exec
    assert not keeps_ipc_lock(_status(bnd=0), 0, None)  # ... unless the bounding set dropped them
    assert keeps_ipc_lock(_status(), 65534, _vfs_cap(ipc_lock))  # setcap cap_ipc_lock+ep qemu
    assert not keeps_ipc_lock(_status(), 65534, _vfs_cap(ipc_lock, effective=False))
    assert not keeps_ipc_lock(_status(), 65534, _vfs_cap(1 << 13))  # another capability
    assert not keeps_ipc_lock(_status(bnd=0), 65534, _vfs_cap(ipc_lock))
    assert not keeps_ipc_lock(_status(), 65534, None)


def test_no_memlock_warning_for_a_command_that_keeps_cap_ipc_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    from xskbroker.client import launch

    reply = {"memlock": {"ok": False, "needed": 32 << 20, "soft": 8 << 20, "reason": "no raise", "hint": "h"}}
    monkeypatch.setattr(launch, "command_keeps_ipc_lock", lambda command: True)
    assert launch.memlock_warning(reply, ["qemu-system-x86_64"]) is None
    monkeypatch.setattr(launch, "command_keeps_ipc_lock", lambda command: False)
    assert "RLIMIT_MEMLOCK is 8388608 bytes" in (launch.memlock_warning(reply, ["qemu-system-x86_64"]) or "")
