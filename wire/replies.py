"""Protocol v1 replies as typed values, both ways: encode() on the broker's side, decode_reply() on the client's.

Like h11's events: a reply is a frozen record (common.records), turned into bytes once, at the boundary, and read back
into the same type, validated. encode() gives exactly the bytes protocol.ok_reply / error_reply give for
the same content (it calls them), so the broker may build replies either way. Each record lists its
JSON keys in wire order; keys this client does not know are kept in `extra` (re-encoded at the end), so
a newer broker's additions pass through. `raw` holds the JSON object as received (not compared).
"""

from __future__ import annotations

import itertools
import json
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Union

from xskbroker.common import records
from xskbroker.common.records import field, record
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import BrokerError, ErrorCode


def _omit_if_none(value: Any, record: Any) -> bool:
    return value is None


def _opt(omit: Callable[[Any, Any], bool] = _omit_if_none) -> Any:
    """An optional key: None when absent, and left out of the message when omit(value, record) says so."""
    return field(default=None, metadata={"omit": omit})


# Records are frozen records whose ==, hash() and repr() are written once, in Record, exactly as record
# would generate them, instead of generated for every class (eq=False, repr=False below): a socket-activated
# broker pays for every class's generated code before its first grant.
@record(frozen=True, eq=False, repr=False)
class Record:
    """A JSON object with a known set of keys, in wire order; unknown keys ride along in `extra`."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _shape(type(self))[0]
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _shape(type(self))[1]))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)!r}" for n in _shape(type(self))[2])
        return f"{type(self).__qualname__}({values})"

    @classmethod
    def from_wire(cls, obj: Any, where: str = "reply", given: dict[str, Any] | None = None) -> typing.Self:
        """The record read from its JSON object; `given` are more fields, not from the object (a reply's id)."""
        if not isinstance(obj, dict):
            raise _bad(where, "an object")
        values: dict[str, Any] = given or {}
        for name, required, exact, check in _reader(cls):
            if name in obj:
                value = obj[name]
                # on every grant's path: a scalar of exactly its type needs no check (nor its message)
                values[name] = value if type(value) is exact else check(value, f"{where}.{name}")
            elif required:
                raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply: {where} lacks {name!r}")
        known = _KNOWN[cls]
        read = len(values) - (len(given) if given else 0)
        return cls(**values, extra={k: v for k, v in obj.items() if k not in known} if len(obj) > read else {})

    def to_wire(self) -> dict[str, Any]:
        # on the grant path: a precomputed (name, omit) list per class, scalars copied as they are
        out: dict[str, Any] = {}
        for name, omit in _plan(type(self)):
            value = getattr(self, name)
            if omit is None or not omit(value, self):
                out[name] = value if type(value) in _SCALARS else _to_json(value)
        if self.extra:
            out.update(self.extra)
        return out


_SHAPES: dict[type, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {}


def _shape(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The fields a record's ==, hash() and repr() would use, in field order (found once per class)."""
    got = _SHAPES.get(cls)
    if got is None:
        fields = records.fields(cls)
        got = _SHAPES[cls] = (tuple(f.name for f in fields if f.compare),
                              tuple(f.name for f in fields if f.compare),  # records have no hash= of their own
                              tuple(f.name for f in fields if f.repr))
    return got


_FIELDS: dict[type, tuple[tuple[records.Field, Any], ...]] = {}
_KNOWN: dict[type, frozenset[str]] = {}  # the names in _FIELDS[cls]
_EXACT = frozenset({int, str, bool})  # hints a JSON value of exactly that type satisfies as it is


def _wire_fields(cls: type) -> tuple[tuple[records.Field, Any], ...]:
    """A reply class's wire fields with their resolved type hints (resolved once per class)."""
    got = _FIELDS.get(cls)
    if got is None:
        hints = typing.get_type_hints(cls)
        got = _FIELDS[cls] = tuple((f, hints[f.name]) for f in records.fields(cls)
                                   if f.name not in ("extra", "req_id", "raw"))
        _KNOWN[cls] = frozenset(f.name for f, _ in got)
    return got


_READERS: dict[type, tuple[tuple[str, bool, type | None, Checker], ...]] = {}


def _reader(cls: type) -> tuple[tuple[str, bool, type | None, Checker], ...]:
    """What from_wire reads for a class: each wire field's name, whether it is required, the scalar type a value
    may have to be taken as it is (None: always checked), and its check (made once per class)."""
    got = _READERS.get(cls)
    if got is None:
        got = _READERS[cls] = tuple(
            (f.name, f.default is records.MISSING and f.default_factory is records.MISSING,
             hint if hint in _EXACT else None, _checker(hint)) for f, hint in _wire_fields(cls))
    return got


_PLANS: dict[type, tuple[tuple[str, Callable[[Any, Any], bool] | None], ...]] = {}
_SCALARS = frozenset({int, str, bool, float, type(None)})


def _plan(cls: type) -> tuple[tuple[str, Callable[[Any, Any], bool] | None], ...]:
    """What to_wire writes for a class: each wire field's name and its omit test (made once per class)."""
    got = _PLANS.get(cls)
    if got is None:
        got = _PLANS[cls] = tuple((f.name, f.metadata.get("omit")) for f, _ in _wire_fields(cls))
    return got


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _bad(where: str, what: str) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REPLY, f"broker reply: {where} must be {what}")


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


Checker = Callable[[Any, str], Any]
_CHECKERS: dict[Any, Checker] = {}


def _checker(hint: Any) -> Checker:
    """The check of one type hint, made from the hint once (typing's introspection is slow, and every grant reply a
    client reads goes through these): it returns the value as the hint says (lists become tuples, objects
    records), or raises BrokerError bad-reply."""
    got = _CHECKERS.get(hint)
    if got is None:
        got = _CHECKERS[hint] = _make_checker(hint)
    return got


def _make_checker(hint: Any) -> Checker:
    if hint is Any:
        return lambda value, where: value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        nullable = type(None) in args
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None, not None: X's own message says what is wrong inside it
            inner = _checker(options[0])
            return lambda value, where: None if value is None and nullable else inner(value, where)
        checks = [_checker(a) for a in args]
        names = " or ".join(_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args)

        def union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            for check in checks:
                try:
                    return check(value, where)
                except BrokerError:
                    continue
            raise _bad(where, names)
        return union
    if origin is tuple:
        item = _checker(typing.get_args(hint)[0])

        def items(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise _bad(where, "a list")
            return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
        return items
    if origin in (dict, Mapping):
        args = typing.get_args(hint)
        entry = _checker(args[1]) if args and args[1] is not Any else None

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise _bad(where, "an object")
            return value if entry is None else {k: entry(v, f"{where}.{k}") for k, v in value.items()}
        return mapping
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_wire
    if hint is float:  # a JSON number: 0 may come as an integer
        def ok(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:  # bool is an int subclass: never accept it where a number is meant
        def ok(value: Any) -> bool:
            return type(value) is int
    else:
        def ok(value: Any) -> bool:
            return isinstance(value, hint)
    what = _NAMES.get(hint, getattr(hint, "__name__", str(hint)))

    def scalar(value: Any, where: str) -> Any:
        if not ok(value):
            raise _bad(where, what)
        return value
    return scalar


# ---- the pieces of replies --------------------------------------------------------------------------------

@record(frozen=True, eq=False, repr=False)
class PeerCred(Record):
    """The caller as the kernel reported it (SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int


@record(frozen=True, eq=False, repr=False)
class UmemGeometry(Record):
    size: int
    frame_size: int
    headroom: int


@record(frozen=True, eq=False, repr=False)
class RingSizes(Record):
    fill: int
    completion: int
    rx: int
    tx: int


@record(frozen=True, eq=False, repr=False)
class BoundSocket(Record):
    """A bound grant's socket: fd and umem_fd are indexes into the reply's SCM_RIGHTS array."""

    queue: int
    fd: int
    umem_fd: int
    bind_flags: int
    zerocopy: bool
    umem: UmemGeometry
    rings: RingSizes

    @property
    def geometry(self) -> proto.Geometry:
        return proto.Geometry(self.umem.size, self.umem.frame_size, self.umem.headroom, self.rings.fill,
                              self.rings.completion, self.rings.rx, self.rings.tx)

    @classmethod
    def of(cls, queue: int, fd: int, umem_fd: int, bind_flags: int, zerocopy: bool,
           geometry: proto.Geometry) -> BoundSocket:
        g = geometry
        return cls(queue, fd, umem_fd, bind_flags, zerocopy, UmemGeometry(g.umem_size, g.frame_size, g.headroom),
                   RingSizes(g.fill, g.completion, g.rx, g.tx))


@record(frozen=True, eq=False, repr=False)
class BareSocket(Record):
    """A bare grant's unbound socket: fd is an index into the reply's SCM_RIGHTS array."""

    queue: int
    fd: int


@record(frozen=True, eq=False, repr=False)
class RevokedLease(Record):
    lease: str
    emptied_queues: tuple[int, ...]
    signalled: bool
    holder_pid: int
    ended: bool | None = _opt()  # a map lease: ended at once
    not_signalled: str | None = _opt()  # why a signal asked for was not sent


@record(frozen=True, eq=False, repr=False)
class LeaseInfo(Record):
    lease: str
    uid: int
    pid: int
    interface: str
    ifindex: int
    queues: tuple[int, ...]
    kind: str
    umem_bytes: int
    age_s: float
    revoked: bool
    orphaned: bool = False
    misbound: int | None = None


@record(frozen=True, eq=False, repr=False)
class InterfaceInfo(Record):
    ifindex: int
    interface: str | None  # None: the broker has not learnt the name
    xdp_prog_id: int
    xdp_mode: str
    map_entries: int
    leases: int = 0


@record(frozen=True, eq=False, repr=False)
class QuotaUsage(Record):
    quota: str
    scope: str
    queues: int
    max_queues: int | None
    umem: int
    max_umem: int | None


@record(frozen=True, eq=False, repr=False)
class HistogramInfo(Record):
    """A histogram as Prometheus keeps one: `buckets[i]` observations were at most `le[i]` (cumulative, `le`
    ascending); `count` is every observation (the +Inf bucket), `sum` their total."""

    le: tuple[float, ...]
    buckets: tuple[int, ...]
    sum: float
    count: int

    @classmethod
    def from_wire(cls, obj: Any, where: str = "reply", given: dict[str, Any] | None = None) -> typing.Self:
        h = super().from_wire(obj, where, given)
        counts = (*h.buckets, h.count)
        if len(h.le) != len(h.buckets) or list(h.le) != sorted(set(h.le)) or counts[0] < 0 or any(
                a > b for a, b in itertools.pairwise(counts)):
            raise _bad(where, "a histogram: one cumulative count per ascending bound, none above count")
        return h


@record(frozen=True, eq=False, repr=False)
class MetricsInfo(Record):
    """Broker-wide counters since the broker started, for admins only (see docs/protocol.md, `status`)."""

    version: str
    start_time: float  # Unix time the broker started
    uptime_s: float
    grants: int  # grants made
    refusals: dict[str, int]  # grant requests refused, by error code
    leases: dict[str, int]  # live leases by kind
    pinned_bytes: int  # UMEM and ring memory the live bound leases pin
    connections: int  # client connections open now
    reloads: dict[str, int]  # policy reloads: "ok", "failed"
    grant_seconds: dict[str, HistogramInfo]  # grant latency by decision: "allow", "deny"
    # the UMEM pool (sockets made ahead of grants): budget_bytes, pinned_bytes, sockets, made, taken, missed;
    # its memory is the broker's own, counted in no quota, bounded by the budget (serve --umem-pool)
    pool: dict[str, int] = field(default_factory=dict)
    rss_bytes: int | None = None  # the broker's own resident memory (UMEM it granted is not mapped in it)


# ---- replies ----------------------------------------------------------------------------------------------

@record(frozen=True, eq=False, repr=False)
class OkReply(Record):
    OP: ClassVar[str]
    req_id: int | str | None = field(default=None, kw_only=True)
    raw: dict[str, Any] | None = field(default=None, kw_only=True, compare=False, repr=False)

    @property
    def op(self) -> str:
        return self.OP

    def to_dict(self) -> dict[str, Any]:
        """The message as a dict, as protocol.decode_reply returns one (with "v")."""
        return json.loads(self.encode())  # type: ignore[no-any-return]

    def encode(self) -> bytes:
        return proto.ok_reply(self.OP, self.req_id, **self.to_wire())


@record(frozen=True, eq=False, repr=False)
class HelloReply(OkReply):
    OP = "hello"
    server: str
    versions: tuple[int, ...]
    peer: PeerCred


@record(frozen=True, eq=False, repr=False)
class GrantReply(OkReply):
    """Every kind of grant; sockets for bound and bare grants, map_fd and map_entries for map grants."""

    OP = "grant"
    lease: str
    kind: str
    interface: str
    ifindex: int
    xdp_mode: str
    xdp_prog_id: int
    holder_pid: int | None = _opt()
    sockets: tuple[BoundSocket, ...] | tuple[BareSocket, ...] | None = _opt()
    # a bare grant always says what it did about memlock (null: nothing was asked)
    memlock: dict[str, Any] | None = field(default=None, metadata={"omit": lambda value, reply: reply.kind != "bare"})
    bind_flags_hint: int | None = _opt()
    map_fd: int | None = _opt()
    map_entries: int | None = _opt()
    map_pin: str | None = _opt()  # map grants: where the tenant's map is pinned for it (bpffs), when it is

    @property
    def bound_sockets(self) -> tuple[BoundSocket, ...]:
        return tuple(s for s in self.sockets or () if isinstance(s, BoundSocket))

    def fd_count(self) -> int:
        """How many fds come with this reply, by the indexes it names."""
        indexes = [s.fd for s in self.sockets or ()] + [s.umem_fd for s in self.bound_sockets]
        if self.map_fd is not None:
            indexes.append(self.map_fd)
        return max(indexes, default=-1) + 1


@record(frozen=True, eq=False, repr=False)
class ReleaseReply(OkReply):
    OP = "release"
    lease: str


@record(frozen=True, eq=False, repr=False)
class RevokeReply(OkReply):
    OP = "revoke"
    revoked: tuple[RevokedLease, ...]
    note: str


@record(frozen=True, eq=False, repr=False)
class StatusReply(OkReply):
    OP = "status"
    leases: tuple[LeaseInfo, ...]
    interfaces: tuple[InterfaceInfo, ...]
    quotas: tuple[QuotaUsage, ...] = ()
    admin: bool = False
    # admins only; left out for everyone else
    metrics: MetricsInfo | None = field(default=None, metadata={"omit": _omit_if_none})
    # the policy in force (fallback: the file on disk is broken and the last good copy runs) and the broker's
    # effective memlock and fd limits; absent from older brokers
    policy: dict[str, Any] | None = field(default=None, metadata={"omit": _omit_if_none})
    limits: dict[str, Any] | None = field(default=None, metadata={"omit": _omit_if_none})


class StatusExtras(typing.TypedDict, total=False):
    """The optional fields of StatusReply, as the daemon supplies them."""

    policy: dict[str, Any]
    limits: dict[str, Any]


@record(frozen=True)
class ErrorReply:
    """An error reply. code is a plain string (a newer broker may send one this client does not know);
    details are the error object's other keys ("errno" with kernel-error, "canonical", "lease")."""

    code: str
    message: str
    op: str | None = None
    req_id: int | str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, err: proto.ProtocolError) -> ErrorReply:
        return cls(err.code, err.message, err.op, err.req_id)

    def encode(self) -> bytes:
        return proto.error_reply(self.code, self.message, self.op, self.req_id, **self.details)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.encode())  # type: ignore[no-any-return]

    def exception(self) -> BrokerError:
        return BrokerError(self.code, self.message, self.raw if self.raw is not None else self.to_dict())


Reply = HelloReply | GrantReply | ReleaseReply | RevokeReply | StatusReply | ErrorReply
OK_REPLIES: dict[str, type[OkReply]] = {c.OP: c for c in (HelloReply, GrantReply, ReleaseReply, RevokeReply,
                                                          StatusReply)}
_KIND_FIELDS = {"bound": ("sockets",), "bare": ("sockets", "bind_flags_hint"), "map": ("map_fd", "map_entries")}


def decode_reply(data: bytes) -> Reply:
    """Read one reply message into its typed form; an error reply is an ErrorReply (not raised).

    Raises BrokerError("bad-reply") when the message is not a protocol v1 reply of the documented shape.
    """
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply is not JSON: {e}") from None
    return reply_from_dict(msg)


def reply_from_dict(msg: Any) -> Reply:
    """The typed form of a reply already parsed from JSON (with its "v")."""
    if not isinstance(msg, dict) or type(msg.get("v")) is not int or msg["v"] != proto.VERSION:
        raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply has no version {proto.VERSION} object")
    op = msg.get("op")
    req_id = msg.get("id")
    good_id = isinstance(req_id, int | str) and not isinstance(req_id, bool)
    if not msg.get("ok"):
        # lenient by design: whatever else is wrong with an error reply, the caller learns it was refused
        given = msg.get("error")
        err: dict[str, Any] = given if isinstance(given, dict) else {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        return ErrorReply(str(err.get("code", ErrorCode.UNKNOWN)), str(err.get("message", "")),
                          op if isinstance(op, str) else None, req_id if good_id else None, details, raw=msg)
    if "id" in msg and not good_id:
        raise _bad("reply.id", "an integer or a string")
    if not isinstance(op, str) or op not in OK_REPLIES:
        raise _bad("reply.op", "one of " + ", ".join(OK_REPLIES))
    body = {k: v for k, v in msg.items() if k not in ("v", "ok", "op", "id")}
    reply = OK_REPLIES[op].from_wire(body, given={"req_id": req_id, "raw": msg})
    if isinstance(reply, GrantReply):
        _check_grant(reply)
    return reply  # type: ignore[return-value]


def _check_grant(reply: GrantReply) -> None:
    needed = _KIND_FIELDS.get(reply.kind)
    if needed is None:
        raise _bad("reply.kind", "one of " + ", ".join(_KIND_FIELDS))
    for name in needed:
        if getattr(reply, name) is None:
            raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply: a {reply.kind} grant lacks {name!r}")
    want = BoundSocket if reply.kind == "bound" else BareSocket
    if any(type(s) is not want for s in reply.sockets or ()):
        raise _bad("reply.sockets", f"{reply.kind} sockets")
