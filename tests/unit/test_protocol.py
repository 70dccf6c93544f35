"""The v1 wire protocol (client/protocol.py): encoding, every validation error and its code, replies, fuzzing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xskbroker.wire import protocol as proto
from xskbroker.wire.protocol import (
    MAX_QUEUES,
    MAX_REQUEST,
    MAX_RING,
    MAX_UMEM,
    BrokerError,
    Geometry,
    Grant,
    Hello,
    ProtocolError,
    Release,
    Revoke,
    Status,
    decode_reply,
    decode_request,
    encode_request,
)

DROP = object()  # a field value meaning "leave the field out"


def raw(**fields: Any) -> bytes:
    """A version 1 message with exactly these fields (DROP removes one); not validated."""
    return json.dumps({"v": 1, **{k: v for k, v in fields.items() if v is not DROP}}).encode()


def grant_msg(**fields: Any) -> bytes:
    base: dict[str, Any] = {"op": "grant", "id": 42, "interface": "eth0", "queues": [0]}
    return raw(**{**base, **fields})


def refused(data: bytes, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(data, **kw)
    return info.value


def bad_grant(**fields: Any) -> ProtocolError:
    """A grant that must be refused as bad-request, carrying op and id."""
    err = refused(grant_msg(**fields))
    assert err.code == "bad-request", (fields, err.code, err.message)
    assert (err.op, err.req_id) == ("grant", 42)
    assert err.message
    return err


def good_grant(**fields: Any) -> Grant:
    req = decode_request(grant_msg(**fields))
    assert isinstance(req, Grant)
    return req


# ---- encoding and round trips ------------------------------------------------------------------------

ROUND_TRIP = [
    Hello(),
    Hello(req_id=7),
    Hello(req_id="abc"),
    Status(),
    Status(req_id=0),
    Status(req_id=-(10**30)),
    Release("0974e0dc6c393213"),
    Release("", req_id="r1"),
    Release("0974e0dc6c393213", if_closed=True),
    Revoke(lease="0974e0dc6c393213"),
    Revoke(interface="eth0", req_id=4),
    Revoke(interface="eth0", queue=65535, signal=True, req_id="x"),
    Revoke(interface="any-name_at.all", queue=0),
    Grant("eth0", (0,)),
    Grant("veth12", (3, 1, 2), req_id=9),
    Grant("eth1", (65535,), kind="bare", bind_mode="copy", need_wakeup=False),
    Grant("eth1", (0, 1), kind="bare", memlock=64 << 20, req_id=3),
    Grant("eth1", (7,), kind="bare", memlock=proto.MAX_MEMLOCK),
    Grant("ens1f0np0", tuple(range(MAX_QUEUES)), bind_mode="zerocopy", req_id=""),
    Grant("eth3", (), kind="map", req_id="m"),
    Grant("é" * 7, (0,), geometry=Geometry(4096, 2048, 1792, 1, 2, 65536, 4)),
    Grant("eth0", (0, 1), geometry=Geometry(MAX_UMEM, 4096, 3840, MAX_RING, MAX_RING, MAX_RING, MAX_RING)),
]


@pytest.mark.parametrize("req", ROUND_TRIP, ids=lambda r: repr(r)[:60])
def test_round_trip(req: proto.Request) -> None:
    data = encode_request(req)
    assert len(data) <= MAX_REQUEST
    assert decode_request(data) == req


def test_encoding_is_compact_json_with_version_first_and_no_id_when_absent() -> None:
    assert encode_request(Hello()) == b'{"v":1,"op":"hello"}'
    assert encode_request(Status(req_id=3)) == b'{"v":1,"op":"status","id":3}'
    assert encode_request(Release("L", req_id="x")) == b'{"v":1,"op":"release","id":"x","lease":"L"}'
    assert encode_request(Release("L", if_closed=True)) == b'{"v":1,"op":"release","lease":"L","if_closed":true}'
    msg = json.loads(encode_request(Grant("eth0", (1, 2))))
    assert list(msg)[:2] == ["v", "op"] and "id" not in msg and "memlock" not in msg
    assert msg == {"v": 1, "op": "grant", "interface": "eth0", "queues": [1, 2], "kind": "bound",
                   "bind_mode": "auto", "need_wakeup": True,
                   "umem": {"size": 4 << 20, "frame_size": 4096, "headroom": 0},
                   "rings": {"fill": 2048, "completion": 2048, "rx": 2048, "tx": 2048}}


def test_minimal_grant_gets_the_defaults() -> None:
    req = decode_request(raw(op="grant", interface="eth0", queues=[0]))
    assert req == Grant("eth0", (0,), kind="bound", geometry=Geometry(), bind_mode="auto", need_wakeup=True)


def test_partial_geometry_keeps_the_other_defaults() -> None:
    req = good_grant(umem={"size": 8192}, rings={"rx": 64})
    assert req.geometry == Geometry(umem_size=8192, rx=64)


def test_map_grants_name_their_queues_or_none_for_all() -> None:
    req = decode_request(raw(op="grant", interface="eth3", kind="map"))
    assert req == Grant("eth3", (), kind="map")
    assert "queues" not in json.loads(encode_request(req))
    assert decode_request(raw(op="grant", interface="eth3", kind="map", queues=[2, 3])) == \
        Grant("eth3", (2, 3), kind="map")
    assert "queues" in bad_grant(kind="map", queues=[]).message


@pytest.mark.parametrize("kind", ["bound", "bare"])
def test_bound_and_bare_grants_need_queues(kind: str) -> None:
    assert "missing field 'queues'" in bad_grant(kind=kind, queues=DROP).message


@pytest.mark.parametrize("memlock", [0, 1, 32 << 20, proto.MAX_MEMLOCK])
def test_memlock(memlock: int) -> None:
    assert good_grant(kind="bare", memlock=memlock).memlock == memlock


@pytest.mark.parametrize("memlock", [-1, proto.MAX_MEMLOCK + 1])
def test_memlock_bounds(memlock: int) -> None:
    assert "memlock must be between 0 and" in bad_grant(kind="bare", memlock=memlock).message


@pytest.mark.parametrize("memlock", [True, 1.0, "64MiB", None])
def test_memlock_must_be_an_integer(memlock: Any) -> None:
    assert "'memlock'" in bad_grant(kind="bare", memlock=memlock).message


def test_hello_accepts_a_free_form_client_field() -> None:
    for client in ("my-app 0.3", 5, None, {"name": "x", "pids": [1]}):
        assert decode_request(raw(op="hello", id=1, client=client)) == Hello(1)


def test_queue_count_with_start_queue() -> None:
    assert good_grant(queues=3).queues == (0, 1, 2)
    assert good_grant(queues=3, start_queue=4).queues == (4, 5, 6)
    assert good_grant(queues=1, start_queue=65535).queues == (65535,)
    assert good_grant(queues=MAX_QUEUES, start_queue=65536 - MAX_QUEUES).queues[-1] == 65535


def test_queue_list_keeps_its_order_and_ignores_start_queue() -> None:
    assert good_grant(queues=[3, 1, 2]).queues == (3, 1, 2)
    assert good_grant(queues=[5], start_queue=9).queues == (5,)


def test_umem_bytes_counts_every_socket_of_a_bound_grant_only() -> None:
    assert Grant("eth0", (0, 1, 2), geometry=Geometry(umem_size=8192)).umem_bytes == 3 * 8192
    assert Grant("eth0", (0, 1), kind="bare").umem_bytes == 0
    assert Grant("eth0", (), kind="map").umem_bytes == 0


def test_queue_limit_fits_the_kernels_fd_limit_per_message() -> None:
    assert 2 * MAX_QUEUES <= proto.SCM_MAX_FD == 253


# ---- transport-level errors --------------------------------------------------------------------------

HELLO = encode_request(Hello(req_id=5))


def test_too_large() -> None:
    padded = HELLO[:-1] + b" " * (MAX_REQUEST - len(HELLO)) + b"}"
    assert len(padded) == MAX_REQUEST and decode_request(padded) == Hello(5)
    err = refused(HELLO[:-1] + b" " * (MAX_REQUEST + 1 - len(HELLO)) + b"}")
    assert (err.code, err.op, err.req_id) == ("too-large", None, None)
    assert str(MAX_REQUEST) in err.message


def test_too_large_when_the_kernel_truncated_the_message() -> None:
    err = refused(HELLO, truncated=True)
    assert (err.code, err.op, err.req_id) == ("too-large", None, None)


def test_too_large_comes_before_fds() -> None:
    assert refused(HELLO, truncated=True, fds=3).code == "too-large"


def test_fds_not_allowed_carries_op_and_id() -> None:
    err = refused(HELLO, fds=2)
    assert (err.code, err.op, err.req_id) == ("fds-not-allowed", "hello", 5)
    assert "2" in err.message


@pytest.mark.parametrize("data", [b"", b"   ", b"not json", b'{"v":1,"op":"hel', b"\xff", b"[]"])
def test_fds_not_allowed_whatever_the_message(data: bytes) -> None:
    err = refused(data, fds=1)
    assert (err.code, err.op, err.req_id) == ("fds-not-allowed", None, None)


@pytest.mark.parametrize("data", [
    b"\xff\xfe",
    b'{"v":1,"op":"hello","id":"\xe9"}',  # Latin-1, not UTF-8
    b"\xef\xbb\xbf" + HELLO,  # UTF-8 BOM
    b"not json",
    b"{'v': 1}",
    HELLO + b" x",
    HELLO + HELLO,
    b"[]",
    b"[1,2]",
    b"1",
    b'"hello"',
    b"null",
    b"NaN",
    b'{"v":1,"op":"hello","id":' + b"1" * 5000 + b"}",  # more digits than Python converts
    b"[" * 4000 + b"]" * 4000,  # deeper than the decoder's recursion limit
    b'{"a":' * 1300 + b"1" + b"}" * 1300,
    b"[" * MAX_REQUEST,
    b'{"v":1,"op":tru}',
])
def test_bad_json(data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.op, err.req_id) == ("bad-json", None, None), err.message


@pytest.mark.parametrize("data", [b"", b"  \n", b"{", b'{"v"', b'{"v":1', b'{"v":1,', b'{"v":1,"op":"hel',
                                  b'{"v":1,"op":"hello"', b'{"v":1,"op":"grant","queues":[0,'])
def test_truncated(data: bytes) -> None:
    err = refused(data)
    assert (err.code, err.op, err.req_id) == ("truncated", None, None)


@pytest.mark.parametrize("req", [Hello(req_id=7), Status(), Release("abc", req_id="x")], ids=repr)
def test_every_prefix_of_a_request_is_truncated(req: proto.Request) -> None:
    data = encode_request(req)
    for end in range(len(data)):
        assert refused(data[:end]).code == "truncated", data[:end]


def test_a_prefix_of_a_grant_is_truncated_except_inside_a_literal() -> None:
    data = encode_request(Grant("eth0", (0, 1), req_id=1))
    codes = [refused(data[:end]).code for end in range(len(data))]
    assert set(codes) <= {"truncated", "bad-json"}
    assert codes.count("bad-json") == len("tru")  # the prefixes "t", "tr", "tru" of need_wakeup's true


# ---- version, op, common fields ------------------------------------------------------------------------

@pytest.mark.parametrize("v", [DROP, 0, 2, -1, "1", True, 1.0, None, [1]])
def test_bad_version_carries_op_and_id(v: Any) -> None:
    data = json.dumps({k: x for k, x in {"v": v, "op": "status", "id": "s"}.items() if x is not DROP}).encode()
    err = refused(data)
    assert (err.code, err.op, err.req_id) == ("bad-version", "status", "s")


def test_version_comes_before_op() -> None:
    assert refused(b'{"v":2,"op":"steal"}').code == "bad-version"


@pytest.mark.parametrize(("op", "echoed"), [(DROP, None), ("steal", "steal"), ("", ""), ("Hello", "Hello"),
                                            (5, None), (None, None), (["hello"], None)])
def test_unknown_op(op: Any, echoed: Any) -> None:
    err = refused(raw(op=op, id=3))
    assert (err.code, err.op, err.req_id) == ("unknown-op", echoed, 3)
    assert "expected one of" in err.message
    assert all(name in err.message for name in ("grant", "hello", "release", "status"))


@pytest.mark.parametrize(("op", "extra"), [("hello", "lease"), ("status", "client"), ("status", "x"),
                                           ("release", "interface"), ("grant", "lease"), ("grant", "client"),
                                           ("revoke", "client"), ("revoke", "queues"),
                                           ("grant", "xdp_mode"), ("grant", "Interface")])
def test_unknown_field(op: str, extra: str) -> None:
    fields = {"op": op, "id": 1, "lease": "L", "interface": "eth0", "queues": [0]}
    allowed = {"hello": {"op", "id"}, "status": {"op", "id"}, "release": {"op", "id", "lease"},
               "grant": {"op", "id", "interface", "queues"}, "revoke": {"op", "id", "lease"}}[op]
    msg = {k: v for k, v in fields.items() if k in allowed}
    err = refused(raw(**msg, **{extra: 0}))
    assert (err.code, err.op, err.req_id) == ("bad-request", op, 1)
    assert repr(extra) in err.message


@pytest.mark.parametrize("req_id", [0, -1, 10**30, "", "abc", "é\U0001f600"])
def test_valid_ids_are_echoed(req_id: Any) -> None:
    assert decode_request(raw(op="hello", id=req_id)) == Hello(req_id)


@pytest.mark.parametrize("req_id", [None, 1.5, 1.0, True, False, [1], {"a": 1}])
def test_bad_id(req_id: Any) -> None:
    for op in ("hello", "status"):
        err = refused(raw(op=op, id=req_id))
        assert (err.code, err.op, err.req_id) == ("bad-request", op, None)
        assert "'id'" in err.message


def test_an_invalid_id_is_not_echoed() -> None:
    err = refused(b'{"v":9,"op":"hello","id":true}')
    assert (err.code, err.op, err.req_id) == ("bad-version", "hello", None)


# ---- release -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lease", [DROP, 5, None, True, ["L"], {"id": "L"}])
def test_release_needs_a_string_lease(lease: Any) -> None:
    err = refused(raw(op="release", id="r", lease=lease))
    assert (err.code, err.op, err.req_id) == ("bad-request", "release", "r")
    assert "'lease'" in err.message


# ---- revoke -------------------------------------------------------------------------------------------

def revoke_error(**fields: Any) -> ProtocolError:
    err = refused(raw(op="revoke", id=8, **fields))
    assert (err.code, err.op, err.req_id) == ("bad-request", "revoke", 8), err.message
    return err


def test_revoke_defaults() -> None:
    assert decode_request(raw(op="revoke", lease="L")) == Revoke(lease="L", signal=False)
    assert json.loads(encode_request(Revoke(lease="L"))) == {"v": 1, "op": "revoke", "lease": "L", "signal": False}


@pytest.mark.parametrize("fields", [{}, {"lease": "L", "interface": "eth0"}, {"queue": 1}, {"signal": True}])
def test_revoke_names_a_lease_or_an_interface(fields: dict[str, Any]) -> None:
    assert "revoke" in revoke_error(**fields).message


def test_revoke_of_a_queue_needs_its_interface() -> None:
    assert "needs its interface" in revoke_error(lease="L", queue=0).message


@pytest.mark.parametrize("queue", [-1, 65536, 2**40])
def test_revoke_queue_bounds(queue: int) -> None:
    assert "queue must be between 0 and 65535" in revoke_error(interface="eth0", queue=queue).message


@pytest.mark.parametrize(("name", "value"), [("lease", 5), ("lease", None), ("interface", ["eth0"]),
                                             ("interface", None), ("queue", True), ("queue", "1"), ("queue", 1.0),
                                             ("signal", 1), ("signal", "yes"), ("signal", None)])
def test_revoke_field_types(name: str, value: Any) -> None:
    others: dict[str, Any] = {"lease": {}, "interface": {"lease": "L"}}.get(name, {"interface": "eth0"})
    assert repr(name) in revoke_error(**others, **{name: value}).message


# ---- grant: interface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eth0", "a", "x" * 15, "vlan.100", "br-lan_2", "é" * 7, "ethé"])
def test_valid_interface_names(name: str) -> None:
    assert good_grant(interface=name).interface == name


@pytest.mark.parametrize("name", ["", "x" * 16, "é" * 8, "a/b", "/", " eth0", "eth0 ", "eth0\n", "\teth0",
                                  "eth0\u00a0", "eth0\x00", "\x00", "\ud800", "eth\udfff0",
                                  # the old alias syntax: ioctls cut at ':' and act on eth0 (finding 2)
                                  "eth0:1", "eth0:", ":", "eth 0", "eth\u20000", ".", ".."])
def test_invalid_interface_names(name: str) -> None:
    assert "interface name" in bad_grant(interface=name).message


@pytest.mark.parametrize("name", ["eth0:x", "a b", ".."])
def test_a_revoke_by_an_impossible_interface_name_is_refused(name: str) -> None:
    err = refused(raw(op="revoke", interface=name))
    assert err.code == "bad-request" and "not a valid interface name" in err.message


def test_a_lone_surrogate_in_the_json_text_is_refused() -> None:
    err = refused(b'{"v":1,"op":"grant","id":42,"interface":"\\ud800","queues":[0]}')
    assert (err.code, err.op, err.req_id) == ("bad-request", "grant", 42)


@pytest.mark.parametrize("name", [DROP, None, 5, True, ["eth0"], {"name": "eth0"}])
def test_interface_must_be_a_string(name: Any) -> None:
    assert "'interface'" in bad_grant(interface=name).message


# ---- grant: queues ------------------------------------------------------------------------------------

def test_queue_list_bounds() -> None:
    assert good_grant(queues=[0, 65535]).queues == (0, 65535)
    assert len(good_grant(queues=list(range(MAX_QUEUES))).queues) == MAX_QUEUES
    assert str(MAX_QUEUES) in bad_grant(queues=list(range(MAX_QUEUES + 1))).message


@pytest.mark.parametrize("queues", [[], [-1], [65536], [0, 2**64], [True], [False], [0, True], [1.0], ["0"],
                                    [None], [[0]], [{"q": 0}]])
def test_bad_queue_lists(queues: list[Any]) -> None:
    bad_grant(queues=queues)


@pytest.mark.parametrize("queues", [[1, 1], [0, 1, 2, 1], [7] * 3])
def test_duplicate_queues(queues: list[int]) -> None:
    assert "distinct" in bad_grant(queues=queues).message


@pytest.mark.parametrize("queues", [DROP, None, "all", "0", {"0": 1}, True, False, 1.0, 2.5])
def test_queues_must_be_a_list_or_a_count(queues: Any) -> None:
    assert "queues" in bad_grant(queues=queues).message


@pytest.mark.parametrize("count", [0, -1, MAX_QUEUES + 1, 2**40])
def test_queue_count_bounds(count: int) -> None:
    assert "queues must be between 1 and" in bad_grant(queues=count).message


@pytest.mark.parametrize(("count", "start"), [(1, -1), (1, 65536), (2, 65535), (MAX_QUEUES, 65536 - MAX_QUEUES + 1),
                                              (1, 2**40)])
def test_start_queue_bounds(count: int, start: int) -> None:
    assert "start_queue" in bad_grant(queues=count, start_queue=start).message


@pytest.mark.parametrize("start", [True, False, "1", 1.0, None, [1]])
def test_start_queue_must_be_an_integer(start: Any) -> None:
    assert "'start_queue'" in bad_grant(queues=1, start_queue=start).message


# ---- grant: kind, bind_mode, need_wakeup ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bound", "bare", "map"])
def test_kinds(kind: str) -> None:
    assert good_grant(kind=kind, queues=DROP if kind == "map" else [0]).kind == kind


@pytest.mark.parametrize("kind", ["Bound", "", "shared", 1, None, True])
def test_bad_kind(kind: Any) -> None:
    bad_grant(kind=kind)


@pytest.mark.parametrize("mode", ["auto", "copy", "zerocopy"])
def test_bind_modes(mode: str) -> None:
    assert good_grant(bind_mode=mode).bind_mode == mode


@pytest.mark.parametrize("mode", ["zero-copy", "native", "", None, 0])
def test_bad_bind_mode(mode: Any) -> None:
    bad_grant(bind_mode=mode)


@pytest.mark.parametrize("value", [True, False])
def test_need_wakeup(value: bool) -> None:
    assert good_grant(need_wakeup=value).need_wakeup is value


@pytest.mark.parametrize("value", [1, 0, "true", None, [True]])
def test_need_wakeup_must_be_a_boolean(value: Any) -> None:
    assert "'need_wakeup'" in bad_grant(need_wakeup=value).message


# ---- grant: umem ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umem", [[], 1, "4MiB", None, True])
def test_umem_must_be_an_object(umem: Any) -> None:
    assert "'umem'" in bad_grant(umem=umem).message


@pytest.mark.parametrize("frame", [2048, 4096])
def test_frame_sizes(frame: int) -> None:
    assert good_grant(umem={"frame_size": frame}).geometry.frame_size == frame


@pytest.mark.parametrize("frame", [0, 1024, 3072, 8192, 4096.0, "4096", True, None])
def test_bad_frame_size(frame: Any) -> None:
    assert "frame_size" in bad_grant(umem={"frame_size": frame}).message


@pytest.mark.parametrize(("size", "frame"), [(4096, 4096), (4096, 2048), (8192, 4096), (MAX_UMEM, 4096),
                                             (MAX_UMEM - 4096, 2048)])
def test_umem_sizes(size: int, frame: int) -> None:
    assert good_grant(umem={"size": size, "frame_size": frame}).geometry.umem_size == size


@pytest.mark.parametrize(("size", "frame"), [(0, 4096), (-4096, 4096), (2048, 4096), (2048, 2048), (4097, 4096),
                                             (6144, 2048), (MAX_UMEM + 4096, 4096), (2**80, 4096)])
def test_bad_umem_size(size: int, frame: int) -> None:
    assert "umem.size" in bad_grant(umem={"size": size, "frame_size": frame}).message


@pytest.mark.parametrize("size", [True, 4096.0, "4096", None])
def test_umem_size_must_be_an_integer(size: Any) -> None:
    assert "'size'" in bad_grant(umem={"size": size}).message


@pytest.mark.parametrize(("headroom", "frame"), [(0, 4096), (256, 4096), (3840, 4096), (1792, 2048)])
def test_headroom(headroom: int, frame: int) -> None:
    assert good_grant(umem={"headroom": headroom, "frame_size": frame}).geometry.headroom == headroom


@pytest.mark.parametrize(("headroom", "frame"), [(-1, 4096), (3841, 4096), (4096, 4096), (1793, 2048)])
def test_bad_headroom(headroom: int, frame: int) -> None:
    assert "umem.headroom" in bad_grant(umem={"headroom": headroom, "frame_size": frame}).message


@pytest.mark.parametrize("headroom", [False, 0.0, "0", None])
def test_headroom_must_be_an_integer(headroom: Any) -> None:
    assert "'headroom'" in bad_grant(umem={"headroom": headroom}).message


def test_unknown_umem_field() -> None:
    assert "umem.flags" in bad_grant(umem={"size": 8192, "flags": 0}).message


# ---- grant: rings ---------------------------------------------------------------------------------------

RINGS = ("fill", "completion", "rx", "tx")


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [1, 2, 64, 2048, MAX_RING])
def test_ring_sizes(ring: str, size: int) -> None:
    assert getattr(good_grant(rings={ring: size}).geometry, ring) == size


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [0, -2, 3, 1000, 2049, MAX_RING + 1, 2 * MAX_RING, 2**40])
def test_ring_size_must_be_a_power_of_two_up_to_the_limit(ring: str, size: int) -> None:
    assert f"rings.{ring}" in bad_grant(rings={ring: size}).message


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [True, 2048.0, "2048", None])
def test_ring_size_must_be_an_integer(ring: str, size: Any) -> None:
    assert repr(ring) in bad_grant(rings={ring: size}).message


@pytest.mark.parametrize("rings", [[], 2048, "2048", None])
def test_rings_must_be_an_object(rings: Any) -> None:
    assert "'rings'" in bad_grant(rings=rings).message


def test_unknown_ring() -> None:
    assert "rings.cq" in bad_grant(rings={"cq": 2048}).message


# ---- replies -----------------------------------------------------------------------------------------------

GRANT_REPLY = {
    "lease": "0974e0dc6c393213", "kind": "bound", "interface": "xdoc0", "ifindex": 3, "xdp_mode": "native",
    "xdp_prog_id": 464,
    "sockets": [{"queue": 0, "fd": 0, "umem_fd": 1, "bind_flags": 10, "zerocopy": False, **Geometry().to_wire()}],
}


def test_decode_ok_reply() -> None:
    reply = decode_reply(proto.ok_reply("grant", 2, **GRANT_REPLY))
    assert reply == {"v": 1, "ok": True, "op": "grant", "id": 2, **GRANT_REPLY}
    assert proto.geometry_from_wire(reply["sockets"][0]) == Geometry()
    assert "id" not in decode_reply(proto.ok_reply("status", leases=[], interfaces=[]))


def test_geometry_round_trips_through_the_wire_form() -> None:
    g = Geometry(8192, 2048, 256, 1, 2, 4, 8)
    assert proto.geometry_from_wire(g.to_wire()) == g


def test_decode_error_reply() -> None:
    data = proto.error_reply("kernel-error", "bind: busy", "grant", 11, errno="EBUSY")
    assert json.loads(data) == {"v": 1, "ok": False, "op": "grant", "id": 11,
                                "error": {"code": "kernel-error", "message": "bind: busy", "errno": "EBUSY"}}
    with pytest.raises(BrokerError) as info:
        decode_reply(data)
    assert (info.value.code, info.value.message) == ("kernel-error", "bind: busy")
    assert info.value.reply["error"]["errno"] == "EBUSY" and info.value.reply["id"] == 11
    assert str(info.value) == "kernel-error: bind: busy"


@pytest.mark.parametrize(("data", "kw", "op", "req_id"), [
    (b"nope", {}, None, None),
    (encode_request(Hello(req_id="h")), {"fds": 1}, "hello", "h"),
    (raw(op="grant", id=3, interface="eth0", queues=[]), {}, "grant", 3),
    (raw(op="steal"), {}, "steal", None),
])
def test_error_reply_for_a_protocol_error(data: bytes, kw: dict[str, Any], op: str | None, req_id: Any) -> None:
    err = refused(data, **kw)
    reply = json.loads(proto.error_reply_for(err))
    assert reply["v"] == 1 and reply["ok"] is False and reply["op"] == op
    assert reply["error"] == {"code": err.code, "message": err.message}
    assert reply.get("id") == req_id and ("id" in reply) == (req_id is not None)
    with pytest.raises(BrokerError) as info:
        decode_reply(proto.error_reply_for(err))
    assert info.value.code == err.code


@pytest.mark.parametrize("data", [b"", b"nope", b"\xff", b"[]", b"1", b"null", b'{"ok":true}', b'{"v":2,"ok":true}',
                                  b'{"v":"1","ok":true}',
                                  b'{"v":1,"id":' + b"9" * 5000 + b"}", b"[" * 5000 + b"]" * 5000, b'{"v":1,"ok":tr'])
def test_decode_reply_garbage(data: bytes) -> None:
    with pytest.raises(BrokerError) as info:
        decode_reply(data)
    assert info.value.code == "bad-reply"


@pytest.mark.parametrize(("msg", "code", "message"), [
    ({"v": 1}, "unknown", ""),
    ({"v": 1, "ok": False}, "unknown", ""),
    ({"v": 1, "ok": False, "error": "boom"}, "unknown", ""),
    ({"v": 1, "ok": False, "error": ["queue-busy"]}, "unknown", ""),
    ({"v": 1, "ok": False, "error": None}, "unknown", ""),
    ({"v": 1, "ok": False, "error": {"code": 7, "message": None}}, "7", "None"),
    ({"v": 1, "ok": 0, "error": {"code": "x"}}, "x", ""),
])
def test_decode_reply_odd_error_replies(msg: dict[str, Any], code: str, message: str) -> None:
    with pytest.raises(BrokerError) as info:
        decode_reply(json.dumps(msg).encode())
    assert (info.value.code, info.value.message) == (code, message)
    assert info.value.reply == msg


# ---- properties ------------------------------------------------------------------------------------------

# Example counts are sized to keep this file near 10 s: generating nested JSON costs far more than decoding it.
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_JSON = settings(FUZZ, max_examples=500)
FUZZ_GRANTS = settings(FUZZ, max_examples=500)
KNOWN = ["v", "op", "id", "client", "lease", "interface", "queues", "start_queue", "kind", "umem", "rings",
         "bind_mode", "need_wakeup", "memlock", "size", "frame_size", "headroom", "fill", "completion", "rx", "tx"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 70000) | st.floats()
           | st.text(max_size=10) | st.sampled_from(["grant", "hello", "bound", "copy", "eth0", "\ud800"]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8)


def _plausible(name: str) -> st.SearchStrategy[Any]:
    """Values near the edges of each field's rules, so generated requests reach every check."""
    ring = st.sampled_from([0, 1, 3, 2048, 65536, 65537]) | st.integers()
    return {
        "interface": st.text(max_size=18) | st.sampled_from(["eth0", "veth1", "a/b", " x", "x" * 16, "\ud800"]),
        "queues": st.lists(st.integers(-2, 70000), max_size=6) | st.integers(-2, 300),
        "start_queue": st.integers(-2, 70000),
        "kind": st.sampled_from(["bound", "bare", "map", "other"]),
        "bind_mode": st.sampled_from(["auto", "copy", "zerocopy", "fast"]),
        "need_wakeup": st.booleans(),
        "umem": st.fixed_dictionaries({}, optional={
            "size": st.integers(-1, 2**33) | st.sampled_from([4096, 8192, 2**32]),
            "frame_size": st.sampled_from([2048, 4096, 1000]), "headroom": st.integers(-1, 5000), "extra": scalars}),
        "rings": st.fixed_dictionaries({}, optional={k: ring for k in ("fill", "completion", "rx", "tx", "cq")}),
        "lease": st.text(max_size=20),
        "id": st.integers() | st.text(max_size=5),
        "memlock": st.integers(-1, 2**41),
        "queue": st.integers(-1, 70000),
        "signal": st.booleans(),
        "size": st.sampled_from([0, 2048, 4096, 4097, 8192, 2**32, 2**32 + 4096]) | st.integers(),
        "frame_size": st.sampled_from([2048, 4096, 1000, 8192]),
        "headroom": st.sampled_from([-1, 0, 1792, 1793, 3840, 3841]),
        **dict.fromkeys(("fill", "completion", "rx", "tx"), ring),
    }.get(name, json_values)


# every op the decoder knows, with any subset of its own fields
request_like = st.one_of(*(
    st.fixed_dictionaries({"v": st.just(1), "op": st.just(op)},
                          optional={name: _plausible(name) for name in sorted(fields - {"v", "op"})})
    for op, fields in sorted(proto._FIELDS.items())))


def _decode_or_protocol_error(data: bytes, **kw: Any) -> proto.Request | None:
    try:
        req = decode_request(data, **kw)
    except ProtocolError as e:
        # whatever went wrong, the broker can always send the error reply, and the client can read it
        with pytest.raises(BrokerError) as info:
            decode_reply(proto.error_reply_for(e))
        assert info.value.code == e.code and e.code in PROTOCOL_CODES
        return None
    # anything that decodes re-encodes to the same request
    assert decode_request(encode_request(req)) == req
    return req


PROTOCOL_CODES = {"too-large", "fds-not-allowed", "bad-json", "truncated", "bad-version", "unknown-op",
                  "bad-request"}


TRANSPORT = st.sampled_from([(False, 0)] * 6 + [(True, 0), (False, 1), (False, 17)])  # (truncated, fds)


@FUZZ
@given(st.binary(max_size=300), TRANSPORT)
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data: bytes, transport: tuple[bool, int]) -> None:
    _decode_or_protocol_error(data, truncated=transport[0], fds=transport[1])


@FUZZ_JSON
@given(st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=6), json_values, max_size=5))
def test_arbitrary_json_objects_never_raise_anything_but_protocol_error(msg: dict[str, Any]) -> None:
    _decode_or_protocol_error(json.dumps(msg).encode())


@FUZZ_JSON
@given(request_like)
def test_request_like_objects_never_raise_anything_but_protocol_error(msg: dict[str, Any]) -> None:
    _decode_or_protocol_error(json.dumps(msg).encode())


def _valid_interface(name: str) -> bool:
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return False
    return (0 < size < 16 and not any(c in "/:\0" or c.isspace() for c in name)
            and name not in (".", ".."))


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    frame = draw(st.sampled_from([2048, 4096]))
    ring = st.integers(0, 16).map(lambda e: 1 << e)
    return Geometry(umem_size=4096 * draw(st.integers(1, MAX_UMEM // 4096)), frame_size=frame,
                    headroom=draw(st.integers(0, frame - 256)), fill=draw(ring), completion=draw(ring),
                    rx=draw(ring), tx=draw(ring))


@st.composite
def valid_grants(draw: st.DrawFn) -> Grant:
    kind = draw(st.sampled_from(proto.KINDS))
    queues = (st.lists(st.integers(0, 65535), min_size=1, max_size=8, unique=True).map(tuple)
              | st.integers(1, MAX_QUEUES).flatmap(lambda n: st.integers(0, 65536 - n).map(
                  lambda start: tuple(range(start, start + n)))))
    return Grant(
        interface=draw(st.text(min_size=1, max_size=15).filter(_valid_interface)),
        queues=() if kind == "map" else draw(queues),
        kind=kind,
        geometry=draw(geometries()),
        bind_mode=draw(st.sampled_from(proto.BIND_MODES)),
        need_wakeup=draw(st.booleans()),
        memlock=draw(st.integers(0, proto.MAX_MEMLOCK)),
        req_id=draw(st.none() | st.integers() | st.text(max_size=10)),
    )


MUTABLE = ["id", "interface", "queues", "start_queue", "kind", "umem", "rings", "bind_mode", "need_wakeup", "memlock",
           "umem.size", "umem.frame_size", "umem.headroom", "umem.extra", "rings.fill", "rings.completion", "rings.rx",
           "rings.tx", "rings.cq", "unknown"]


@st.composite
def mutated_grants(draw: st.DrawFn) -> dict[str, Any]:
    """A valid grant with up to three fields replaced (by edge values or any JSON) or removed."""
    msg = json.loads(encode_request(draw(valid_grants())))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(MUTABLE))
        outer, _, inner = name.rpartition(".")
        target = msg.setdefault(outer, {}) if outer else msg
        if not isinstance(target, dict):
            continue
        action = draw(st.sampled_from(["edge", "edge", "json", "drop"]))
        if action == "drop":
            target.pop(inner, None)
        else:
            target[inner] = draw(_plausible(inner) if action == "edge" else json_values)
    return msg


@FUZZ_JSON
@given(mutated_grants())
def test_mutated_grants_never_raise_anything_but_protocol_error(msg: dict[str, Any]) -> None:
    _decode_or_protocol_error(json.dumps(msg).encode())


@FUZZ_JSON
@given(st.one_of(mutated_grants(), request_like), st.integers(0, 400), st.integers(0, 400), st.binary(max_size=8))
def test_damaged_requests_never_raise_anything_but_protocol_error(msg: dict[str, Any], at: int, cut: int,
                                                                   junk: bytes) -> None:
    data = json.dumps(msg).encode()
    at = min(at, len(data))
    _decode_or_protocol_error(data[:at] + junk + data[at + min(cut, 8):])
    _decode_or_protocol_error(data[:at])


@FUZZ_GRANTS
@given(valid_grants())
def test_any_valid_grant_round_trips_exactly(req: Grant) -> None:
    data = encode_request(req)
    assert len(data) <= MAX_REQUEST
    assert decode_request(data) == req


@settings(max_examples=300, deadline=None)
@given(st.integers(1, MAX_QUEUES), st.data())
def test_a_queue_count_decodes_to_the_list_it_means(count: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, 65536 - count))
    req = good_grant(queues=count, start_queue=start)
    assert req.queues == tuple(range(start, start + count))
    assert decode_request(encode_request(req)) == req


# ---- unknown fields: the error names the first one, in the message's own order ----------------------------

# Many unknown keys, so that an order chosen by string hashing (a set's, which varies per process) would
# name the first one only by chance; "zz" sorts after every known key and "a" before, so sorting is not
# what makes the answer either.
UNKNOWN = [f"zz{i}" for i in range(40, 0, -1)] + [f"a{i}" for i in range(40)]


def test_an_unknown_field_error_names_the_first_unknown_field() -> None:
    err = refused(raw(op="status", **dict.fromkeys(UNKNOWN, 0)))
    assert err.message == "unknown field 'zz40' in status request"
    err = refused(raw(op="grant", interface="eth0", queues=[0], **dict.fromkeys(UNKNOWN, 0)))
    assert err.message == "unknown field 'zz40' in grant request"


@pytest.mark.parametrize("where", ["umem", "rings"])
def test_an_unknown_umem_or_ring_key_error_names_the_first_one(where: str) -> None:
    assert bad_grant(**{where: dict.fromkeys(UNKNOWN, 1)}).message == f"unknown field '{where}.zz40'"
