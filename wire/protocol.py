"""xskbroker wire protocol v1, sans-IO: bytes in, typed requests/replies out, and back.

Transport (not handled here): AF_UNIX SOCK_SEQPACKET, one JSON object per message, fds only in replies
via SCM_RIGHTS. Both the broker and the client use this module; it does no I/O. See docs/protocol.md.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from xskbroker.common.records import field, record

# re-exported: callers know them as protocol.BrokerError and protocol.ProtocolError
from xskbroker.wire.errors import BrokerError as BrokerError
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.errors import ProtocolError as ProtocolError

VERSION = 1
MAX_REQUEST = 8192  # bytes; a larger request is refused unread
MAX_REPLY = 1 << 20
SCM_MAX_FD = 253  # the kernel refuses an SCM_RIGHTS message with more fds (EINVAL)
MAX_QUEUES = SCM_MAX_FD // 2  # a bound socket takes two fds (socket, UMEM memfd): 126 per grant
MAX_UMEM = 1 << 32
MAX_RING = 1 << 16
MAX_MEMLOCK = 1 << 40
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
IFNAMSIZ = 16  # with the terminating NUL: 15 bytes of name at most
KINDS = ("bound", "bare", "map")
BIND_MODES = ("auto", "copy", "zerocopy")


@record(frozen=True)
class Geometry:
    """UMEM and ring sizes of one bound socket."""

    umem_size: int = 4 << 20
    frame_size: int = 4096
    headroom: int = 0
    fill: int = 2048
    completion: int = 2048
    rx: int = 2048
    tx: int = 2048

    @property
    def ring_bytes(self) -> int:
        """Kernel memory of the four rings: 8-byte addresses (fill, completion), 16-byte descriptors (rx, tx).
        Not charged to anyone's memlock by the kernel (65536-entry rings are 3 MiB a socket): the broker
        counts it with the UMEM."""
        return 8 * (self.fill + self.completion) + 16 * (self.rx + self.tx)

    def to_wire(self) -> dict[str, Any]:
        return {"umem": {"size": self.umem_size, "frame_size": self.frame_size, "headroom": self.headroom},
                "rings": {"fill": self.fill, "completion": self.completion, "rx": self.rx, "tx": self.tx}}


@record(frozen=True)
class Hello:
    req_id: Any = None
    op: str = "hello"


@record(frozen=True)
class Status:
    req_id: Any = None
    op: str = "status"


@record(frozen=True)
class Release:
    lease: str
    req_id: Any = None
    op: str = "release"
    # only if every socket of the lease is closed (its map slots empty): a launcher that closed them
    # through QEMU (qmp-detach) ends the lease it cannot name for sure, never one still in use
    if_closed: bool = False


@record(frozen=True)
class Revoke:
    """Admin: end leases by id, or every lease on an interface (optionally one queue of it)."""

    lease: str | None = None
    interface: str | None = None
    queue: int | None = None
    signal: bool = False
    req_id: Any = None
    op: str = "revoke"


@record(frozen=True)
class Grant:
    interface: str
    queues: tuple[int, ...]
    kind: str = "bound"
    geometry: Geometry = field(default_factory=Geometry)
    bind_mode: str = "auto"
    need_wakeup: bool = True
    memlock: int = 0  # bare grants: RLIMIT_MEMLOCK the holder needs for its own UMEM (0: don't ask)
    holder_pid: int = 0  # the process that will hold the sockets, when not the requester (0: the requester)
    req_id: Any = None
    op: str = "grant"

    @property
    def umem_bytes(self) -> int:
        return self.geometry.umem_size * len(self.queues) if self.kind == "bound" else 0

    @property
    def pinned_bytes(self) -> int:
        """What the grant makes the kernel hold: UMEM plus ring memory; rule max_umem and quotas count this."""
        return (self.geometry.umem_size + self.geometry.ring_bytes) * len(self.queues) if self.kind == "bound" else 0


Request = Hello | Status | Release | Revoke | Grant


# ---- interface names ---------------------------------------------------------------------------------

# The kernel's rule (net/core/dev.c dev_valid_name). A name it would never give an interface must never
# reach a policy glob or a name lookup: "eth0:1" matches "eth*", and the ioctl paths cut it at ':' (old
# alias syntax) to "eth0", so a deny on eth0 would be judged on one name while the kernel acts on another.
def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be a real interface's name, or None when it can."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate: no name, and a lookup would raise
        return "it is not valid UTF-8"
    if size == 0:
        return "it is empty"
    if size >= IFNAMSIZ:
        return f"it is {size} bytes long; the kernel allows {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "'.' and '..' are not interface names"
    for c in name:
        if c in "/:\0" or c.isspace():
            return f"it contains {c!r}, which the kernel forbids in interface names"
    return None


# ---- encoding ---------------------------------------------------------------------------------------

# one encoder for every message: json.dumps with separators= would build one per call
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode({"v": VERSION, **message}).encode()


def encode_request(req: Request) -> bytes:
    msg: dict[str, Any] = {"op": req.op}
    if req.req_id is not None:
        msg["id"] = req.req_id
    if isinstance(req, Release):
        msg["lease"] = req.lease
        if req.if_closed:
            msg["if_closed"] = True
    elif isinstance(req, Revoke):
        msg.update({k: v for k, v in (("lease", req.lease), ("interface", req.interface), ("queue", req.queue))
                    if v is not None}, signal=req.signal)
    elif isinstance(req, Grant):
        msg.update(interface=req.interface, kind=req.kind, bind_mode=req.bind_mode,
                   need_wakeup=req.need_wakeup, **req.geometry.to_wire())
        if req.queues:
            msg["queues"] = list(req.queues)
        if req.memlock:
            msg["memlock"] = req.memlock
        if req.holder_pid:
            msg["holder_pid"] = req.holder_pid
    return encode(msg)


def ok_reply(op: str, req_id: Any = None, **fields: Any) -> bytes:
    msg: dict[str, Any] = {"ok": True, "op": op}
    if req_id is not None:
        msg["id"] = req_id
    msg.update(fields)
    return encode(msg)


def error_reply(code: str, message: str, op: str | None = None, req_id: Any = None,
                **extra: Any) -> bytes:
    msg: dict[str, Any] = {"ok": False, "op": op, "error": {"code": code, "message": message, **extra}}
    if req_id is not None:
        msg["id"] = req_id
    return encode(msg)


def error_reply_for(err: ProtocolError) -> bytes:
    return error_reply(err.code, err.message, err.op, err.req_id)


# ---- decoding (broker side) ------------------------------------------------------------------------

def _field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in msg:
        if default is ...:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field {name!r}")
        return default
    value = msg[name]
    if type(value) is kind:  # the usual case, first: JSON gives exact types (never a subclass)
        return value
    # bool is an int subclass: never accept it where a number is meant
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field {name!r} must be {_type_name(kind)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _bounded(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be between {lo} and {hi}, not {value}")
    return value


def _power_of_two(name: str, value: int, hi: int) -> int:
    if not 1 <= value <= hi:
        _bounded(name, value, 1, hi)
    if value & (value - 1):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a power of two, not {value}")
    return value


def _queues(msg: dict[str, Any]) -> tuple[int, ...]:
    if "queues" in msg:
        raw = msg["queues"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            count = _bounded("queues", raw, 1, MAX_QUEUES)
            start = _bounded("start_queue", _field(msg, "start_queue", int, 0), 0, 65536 - count)
            return tuple(range(start, start + count))
        if not isinstance(raw, list) or not raw:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "queues must be a non-empty list of queue ids or a count")
        if len(raw) > MAX_QUEUES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"at most {MAX_QUEUES} queues per grant")
        if any(not isinstance(q, int) or isinstance(q, bool) or not 0 <= q <= 65535 for q in raw):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "queue ids must be integers between 0 and 65535")
        if len(set(raw)) != len(raw):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "queue ids must be distinct")
        return tuple(raw)
    raise ProtocolError(ErrorCode.BAD_REQUEST, "missing field 'queues'")


def _geometry(msg: dict[str, Any]) -> Geometry:
    d = Geometry()
    umem = _field(msg, "umem", dict, {})
    rings = _field(msg, "rings", dict, {})
    frame = _field(umem, "frame_size", int, d.frame_size)
    if frame not in (2048, 4096):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"umem.frame_size must be 2048 or 4096, not {frame}")
    size = _bounded("umem.size", _field(umem, "size", int, d.umem_size), frame, MAX_UMEM)
    if size % 4096:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "umem.size must be a multiple of 4096 (the page size)")
    headroom = _bounded("umem.headroom", _field(umem, "headroom", int, d.headroom), 0, frame - 256)
    ring = [_power_of_two(f"rings.{k}", _field(rings, k, int, getattr(d, k)), MAX_RING) for k in _RINGS]
    if not umem.keys() <= _UMEM_KEYS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field 'umem.{_first_unknown(umem, _UMEM_KEYS)}'")
    if not rings.keys() <= _RING_KEYS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field 'rings.{_first_unknown(rings, _RING_KEYS)}'")
    return Geometry(size, frame, headroom, *ring)


_RINGS = ("fill", "completion", "rx", "tx")  # Geometry's order
_RING_KEYS = frozenset(_RINGS)
_UMEM_KEYS = frozenset(("size", "frame_size", "headroom"))


def _first_unknown(msg: dict[str, Any], known: Collection[str]) -> str | None:
    """The first key of msg, in the message's own order, that is not in known: the error names the same
    field every time (a set difference would name one chosen by string hashing, which varies per process)."""
    return next((key for key in msg if key not in known), None)


_GRANT_FIELDS = {"v", "op", "id", "interface", "queues", "start_queue", "kind", "umem", "rings",
                 "bind_mode", "need_wakeup", "memlock", "holder_pid"}
_FIELDS = {"hello": {"v", "op", "id", "client"}, "status": {"v", "op", "id"},
           "release": {"v", "op", "id", "lease", "if_closed"}, "grant": _GRANT_FIELDS,
           "revoke": {"v", "op", "id", "lease", "interface", "queue", "signal"}}


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"request is not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        # a message cut short fails at its very end, or inside a string that never closes
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise ProtocolError(ErrorCode.TRUNCATED, f"request ends in the middle of a JSON value: {e.msg}") from None
        raise ProtocolError(ErrorCode.BAD_JSON, f"request is not JSON: {e.msg} at character {e.pos}") from None
    except (ValueError, RecursionError):  # an integer of more than 4300 digits; nesting deeper than the stack
        raise ProtocolError(ErrorCode.BAD_JSON, "request has a number too long or nesting too deep") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "a request must be a JSON object")
    return msg


def decode_request(data: bytes, *, truncated: bool = False, fds: int = 0) -> Request:
    """Validate one request message. Raises ProtocolError with the code to reply with."""
    if truncated or len(data) > MAX_REQUEST:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"requests are limited to {MAX_REQUEST} bytes")
    fds_error = ProtocolError(ErrorCode.FDS_NOT_ALLOWED, f"requests carry no file descriptors ({fds} received, closed)")
    try:
        msg = _parse_json(data)
    except ProtocolError:
        if fds:  # the fds are the first thing wrong with a message that has them, JSON or not
            raise fds_error from None
        raise
    op = msg.get("op") if isinstance(msg.get("op"), str) else None
    raw_id = msg.get("id")
    req_id = raw_id if isinstance(raw_id, int | str) and not isinstance(raw_id, bool) else None
    try:
        if fds:
            raise fds_error
        if type(msg.get("v")) is not int or msg["v"] != VERSION:  # not true, not 1.0
            raise ProtocolError(ErrorCode.BAD_VERSION, f"unsupported protocol version {msg.get('v')!r}; this broker "
                                f"speaks version {VERSION}")
        if op not in _FIELDS:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {msg.get('op')!r}; expected one of "
                                + ", ".join(sorted(_FIELDS)))
        if not msg.keys() <= _FIELDS[op]:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field {_first_unknown(msg, _FIELDS[op])!r} in {op} "
                                "request")
        if "id" in msg and req_id is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'id' must be an integer or a string")
        if op == "hello":
            return Hello(req_id)
        if op == "status":
            return Status(req_id)
        if op == "release":
            return Release(_field(msg, "lease", str), req_id, if_closed=_field(msg, "if_closed", bool, False))
        if op == "revoke":
            return _revoke(msg, req_id)
        return _grant(msg, req_id)
    except ProtocolError as e:
        e.op, e.req_id = op, req_id
        raise


def _revoke(msg: dict[str, Any], req_id: Any) -> Revoke:
    lease = _field(msg, "lease", str, None)
    interface = _interface(msg, None)
    queue = _field(msg, "queue", int, None)
    if (lease is None) == (interface is None):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "revoke names either a lease or an interface")
    if queue is not None and interface is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "revoke of a queue needs its interface")
    if queue is not None:
        _bounded("queue", queue, 0, 65535)
    return Revoke(lease, interface, queue, _field(msg, "signal", bool, False), req_id)


def _interface(msg: dict[str, Any], default: Any = ...) -> Any:
    interface = _field(msg, "interface", str, default)
    problem = None if interface is None else ifname_problem(interface)
    if problem:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{interface!r} is not a valid interface name: {problem}")
    return interface


def _grant(msg: dict[str, Any], req_id: Any) -> Grant:
    interface = _interface(msg)
    kind = _field(msg, "kind", str, "bound")
    if kind not in KINDS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    bind_mode = _field(msg, "bind_mode", str, "auto")
    if bind_mode not in BIND_MODES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"bind_mode must be one of {', '.join(BIND_MODES)}")
    # a map grant without queues asks for every queue of the interface
    queues = () if kind == "map" and "queues" not in msg else _queues(msg)
    memlock = _bounded("memlock", _field(msg, "memlock", int, 0), 0, MAX_MEMLOCK)
    holder_pid = _bounded("holder_pid", _field(msg, "holder_pid", int, 0), 0, PID_MAX)
    return Grant(interface=interface, queues=queues, kind=kind, geometry=_geometry(msg),
                 bind_mode=bind_mode, need_wakeup=_field(msg, "need_wakeup", bool, True), memlock=memlock,
                 holder_pid=holder_pid, req_id=req_id)


# ---- decoding (client side) ------------------------------------------------------------------------

def decode_reply(data: bytes) -> dict[str, Any]:
    """Parse a reply into the dict the broker sent; raise BrokerError for an error reply.

    The dict form, kept for its callers: replies.decode_reply gives the typed, validated reply.
    """
    from xskbroker.wire import replies  # at call time: replies builds on this module

    reply = replies.decode_reply(data)
    if isinstance(reply, replies.ErrorReply):
        raise reply.exception()
    assert reply.raw is not None
    return reply.raw


def geometry_from_wire(sock: dict[str, Any]) -> Geometry:
    umem, rings = sock["umem"], sock["rings"]
    return Geometry(umem["size"], umem["frame_size"], umem["headroom"], rings["fill"], rings["completion"],
                    rings["rx"], rings["tx"])
