"""The v1 wire protocol (wire/protocol.py) message by message: encoding and round trips, transport-level errors
(too large, fds, bad JSON, truncated), the version, op and common fields with their codes, release and revoke
requests, and replies (decoded, error replies for a protocol error, garbage). A grant's own fields are checked
in test_protocol_grant_fields.py, fuzzing and properties in test_protocol_fuzz.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

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

from .protocol_helpers import DROP, bad_grant, good_grant, raw, refused

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
    assert encode_request(Grant("eth0", (1,), geometry=Geometry(8192, fill=64), req_id=7, holder_pid=9)) == (
        b'{"v":1,"op":"grant","id":7,"interface":"eth0","kind":"bound","bind_mode":"auto","need_wakeup":true,'
        b'"umem":{"size":8192,"frame_size":4096,"headroom":0},"rings":{"fill":64,"completion":2048,"rx":2048,'
        b'"tx":2048},"queues":[1],"holder_pid":9}')
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
