"""What the protocol fuzzer sends (test_fuzz.py): hypothesis strategies for one message and the fds it carries.

Mostly structure-aware mutants of valid requests (a field set, dropped or given a hostile value, the JSON
written in an unusual encoding, bytes cut, flipped or inserted), some oversized messages and raw token soup,
so that the generator reaches deep into the protocol: real grants of each kind as well as every refusal.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from xskbroker.wire import protocol as proto

KiB, MiB = 1 << 10, 1 << 20


_PATHS = ("v", "op", "id", "client", "interface", "kind", "queues", "start_queue", "bind_mode", "need_wakeup",
          "memlock", "holder_pid", "umem", "rings", "lease", "queue", "signal", "umem.size", "umem.frame_size",
          "umem.headroom", "rings.fill", "rings.completion", "rings.rx", "rings.tx", "queues.0")

_TEMPLATES: tuple[dict[str, Any], ...] = (
    {"v": 1, "op": "hello", "id": 1, "client": "fuzz"},
    {"v": 1, "op": "status", "id": "s"},
    {"v": 1, "op": "release", "id": 3, "lease": "0123456789abcdef"},
    {"v": 1, "op": "revoke", "id": 4, "lease": "0123456789abcdef"},
    {"v": 1, "op": "revoke", "interface": "xsk0", "queue": 1, "signal": False},
    {"v": 1, "op": "grant", "id": 6, "interface": "xsk0", "kind": "bound", "queues": [0], "bind_mode": "copy",
     "need_wakeup": True, "umem": {"size": 64 * KiB, "frame_size": 4096, "headroom": 0},
     "rings": {"fill": 64, "completion": 64, "rx": 64, "tx": 64}},
    {"v": 1, "op": "grant", "id": 7, "interface": "xsk0", "queues": 2, "start_queue": 0,
     "umem": {"size": 256 * KiB, "frame_size": 2048}, "rings": {"fill": 128, "completion": 128, "rx": 128,
                                                                "tx": 128}},
    {"v": 1, "op": "grant", "id": "b", "interface": "xsk0", "kind": "bare", "queues": [1], "memlock": MiB},
    {"v": 1, "op": "grant", "interface": "xsk1", "kind": "map"},  # on its own veth: it holds it till we exit
    # valid requests the policy or the kernel refuse, each for its own reason
    {"v": 1, "op": "grant", "interface": "xsk0", "queues": [5], "umem": {"size": 64 * KiB}},
    {"v": 1, "op": "grant", "interface": "xsk0", "queues": [9], "umem": {"size": 64 * KiB}},
    {"v": 1, "op": "grant", "interface": "xsk0", "queues": 3, "umem": {"size": 64 * KiB}},
    {"v": 1, "op": "grant", "interface": "xsk0", "queues": [1], "umem": {"size": 4 * MiB}},
    {"v": 1, "op": "grant", "interface": "xsk0p", "queues": [0]},
    {"v": 1, "op": "grant", "interface": "nope0", "queues": [0]},
    {"v": 1, "op": "grant", "interface": "xsk0", "queues": [0], "bind_mode": "zerocopy", "umem": {"size": 64 * KiB}},
    {"v": 1, "op": "grant", "interface": "xsk0", "kind": "bare", "queues": [0], "holder_pid": 1},
)

_SPECIAL: list[Any] = [
    None, True, False, 0, 1, -1, 2, 1.0, 0.5, -0.0, 1e308, 126, 127, 2048, 4096, 8192, 65535, 65536, 2**22,
    2**22 + 1, 2**31 - 1, 2**31, 2**32, 2**32 + 4096, 2**40, 2**40 + 1, 2**63, 2**64, -(2**63), 10**100,
    float("inf"), float("-inf"), float("nan"),
    "", "1", "0x10", "xsk0", "xsk0p", "xsk1", "lo", "eth0", "x" * 15, "x" * 16, "xsk0 ", " xsk0", "xs/k0",
    "xs\x00k", "\ud800", "é", "日本語の名前", "💥", "bound", "bare", "map", "auto", "copy", "zerocopy", "grant",
    "hello", "release", "revoke", "status",
    [], {}, [0], [0, 0], [0, 1], [1, 0], [65535], [65536], [-1], [True], [0.0], ["0"], list(range(127)),
    {"size": 4096}, {"fill": 3}, {"size": 4096, "frame_size": 4096}, {"rx": 1, "tx": 1, "fill": 1, "completion": 1},
]

_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | st.sampled_from(_SPECIAL))
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(_PATHS),
                                                                 inner, max_size=4),
    max_leaves=10)
# raw JSON text for what json.dumps cannot write: nesting past the recursion limit, numbers past 4300 digits,
# literals Python accepts and strict JSON does not, and things that are not JSON at all
_raw_text = st.one_of(
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 2500).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.sampled_from(["NaN", "-Infinity", "1e999", "-0", "01", "1.", ".5", "0x1", "nul", "tru", '"\\ud800"',
                     '"\\udc00\\ud800"', '"\\u0000"', '"\\x41"', "[1,]", "{,}", "1_000", '"' + "\\\\" * 3000 + '"']),
)
_RAW = "\x00raw-{}\x00"
_set = st.tuples(st.just("set"), st.sampled_from(_PATHS), _json_values)
_mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(_PATHS)),
    _set, _set, _set,
    st.tuples(st.just("extra"), st.text(max_size=12), _json_values),  # a field nobody defined
    st.tuples(st.just("raw"), st.sampled_from(_PATHS), _raw_text),
)
_ENCODINGS = ("compact",) * 12 + ("spaced", "unicode", "bom", "trailing-space", "trailing-junk",
              "two-objects", "nul-terminated")
_byte_edit = st.tuples(st.sampled_from(["cut", "flip", "insert"]), st.integers(0, 1 << 20),
                       st.binary(min_size=1, max_size=4))


def _set_path(msg: dict[str, Any], path: str, value: Any, drop: bool = False) -> None:
    """Set (or drop) a field, or a field inside umem/rings or the first queue, making the parent if it must."""
    *parents, leaf = path.split(".")
    node: Any = msg
    for name in parents:
        child = node.get(name) if isinstance(node, dict) else None
        if not isinstance(child, dict | list):
            child = [] if leaf.isdigit() else {}
            node[name] = child
        node = child
    if isinstance(node, list):
        if drop:
            del node[:1]
        elif node:
            node[0] = value
        else:
            node.append(value)
    elif drop:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def _encode(msg: Any, encoding: str, raws: list[str] | None = None) -> bytes:
    if encoding == "unicode":
        text = json.dumps(msg, ensure_ascii=False)
    elif encoding == "spaced":
        text = json.dumps(msg, indent=1)
    else:
        text = json.dumps(msg, separators=(",", ":"))
    for i, raw in enumerate(raws or []):
        text = text.replace(json.dumps(_RAW.format(i)), raw)
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
    extra = {"bom": (b"\xef\xbb\xbf", b""), "trailing-space": (b"", b" \n\t\r "), "trailing-junk": (b"", b"x"),
             "two-objects": (b"", data), "nul-terminated": (b"", b"\x00")}.get(encoding, (b"", b""))
    return extra[0] + data + extra[1]


@st.composite
def _mutant(draw: st.DrawFn) -> bytes:
    """A valid request of some op, then wrong types, missing or extra fields, odd values, odd bytes."""
    msg = json.loads(json.dumps(draw(st.sampled_from(_TEMPLATES))))
    raws: list[str] = []
    for op in draw(st.lists(_mutation, min_size=(n := draw(st.sampled_from([0, 1, 1, 2, 3, 4]))), max_size=n)):
        if op[0] == "drop":
            _set_path(msg, op[1], None, drop=True)
        elif op[0] == "set":
            _set_path(msg, op[1], op[2])
        elif op[0] == "extra":
            msg[op[1]] = op[2]
        else:
            _set_path(msg, op[1], _RAW.format(len(raws)))
            raws.append(op[2])
    data = _encode(msg, draw(st.sampled_from(_ENCODINGS)), raws)
    for kind, at, junk in draw(st.lists(_byte_edit, max_size=2)) if draw(st.integers(0, 4)) == 0 else ():
        at %= len(data) + 1
        if kind == "cut":
            data = data[:at]
        elif kind == "flip":
            data = data[:at] + bytes([junk[0]]) + data[at + 1:]
        else:
            data = data[:at] + junk + data[at:]
    return data


@st.composite
def _oversized(draw: st.DrawFn) -> bytes:
    """Requests near and far past MAX_REQUEST: padded with whitespace (still valid JSON), in a free-form
    field (hello's client), or in a field nobody defined."""
    msg = json.loads(json.dumps(draw(st.sampled_from(_TEMPLATES))))
    size = draw(st.one_of(st.integers(proto.MAX_REQUEST - 40, proto.MAX_REQUEST + 40), st.integers(0, 70_000)))
    how = draw(st.sampled_from(["whitespace", "client", "unknown-field"]))
    if how == "whitespace":
        data = _encode(msg, "compact")
        return data + b" " * max(0, size - len(data))
    if how == "client":
        msg = {"v": 1, "op": "hello", "client": ""}
    else:
        msg["pad"] = ""
    data = _encode(msg, "compact")
    msg["client" if how == "client" else "pad"] = "x" * max(0, size - len(data))
    return _encode(msg, "compact")


_TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"1", b"-", b"e", b"0", b".", b"null", b"true", b'"v"',
           b'"op"', b'"id"', b'"grant"', b'"hello"', b" ", b"\\", b"\\u", b"\\ud800", b"\x00", b"\xff", b"\xc3",
           b"\xed\xa0\x80", b'"interface"', b'"xsk0"', b'"queues"']
_structured = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, "1", True, 1.0, None]),
     "op": st.sampled_from(["hello", "status", "grant", "release", "revoke", "steal", "", "HELLO", 1, None])},
    optional={k: _json_values for k in ("id", "interface", "queues", "kind", "lease", "umem", "rings", "client",
                                          "queue", "signal", "memlock", "holder_pid", "start_queue")})
_message_body = st.one_of(  # mostly structure-aware mutants; repeating a branch weighs it
    _mutant(), _mutant(), _mutant(), _mutant(), _mutant(),
    st.tuples(_structured, st.sampled_from(_ENCODINGS)).map(lambda x: _encode(x[0], x[1])),
    _oversized(),
    st.tuples(_json_values, st.sampled_from(_ENCODINGS)).map(lambda x: _encode(x[0], x[1])),
    st.binary(min_size=1, max_size=200),
    st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=40).map(b"".join),
    st.just(b""),  # reads as end-of-file: the broker closes the connection without a reply
)
# most messages carry no fds; some carry a few, 16 (all the broker takes), or more (the kernel cuts: MSG_CTRUNC)
_fd_counts = st.sampled_from([0] * 45 + [1, 2, 16, 17, 20])
MESSAGES = st.tuples(_message_body, _fd_counts)
