"""The v1 wire protocol (wire/protocol.py) fuzzed with hypothesis: arbitrary bytes, JSON objects, request-like
and mutated or damaged grants never raise anything but ProtocolError (whose error reply the client can read),
whatever decodes re-encodes to itself, and any valid grant or queue count round-trips exactly.
"""

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
    MAX_UMEM,
    BrokerError,
    Geometry,
    Grant,
    ProtocolError,
    decode_reply,
    decode_request,
    encode_request,
)

from .protocol_helpers import good_grant

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
