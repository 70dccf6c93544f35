"""Protocol v1 replies as typed values, both ways: encode() on the broker's side, decode_reply() on the client's.

Like h11's events: a reply is a frozen record (wire.json_record.Record), turned into bytes once, at the boundary,
and read back into the same type, validated. encode() gives exactly the bytes protocol.ok_reply / error_reply give
for the same content (it calls them), so the broker may build replies either way. Each record lists its
JSON keys in wire order; keys this client does not know are kept in `extra` (re-encoded at the end), so
a newer broker's additions pass through. `raw` holds the JSON object as received (not compared).
"""

from __future__ import annotations

import itertools
import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from xskbroker.common.records import field, record
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import BrokerError, ErrorCode
from xskbroker.wire.json_record import Record, bad_reply, optional

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
    ended: bool | None = optional()  # a map lease: ended at once
    not_signalled: str | None = optional()  # why a signal asked for was not sent


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
    released: bool = False  # released by its holder with its sockets still open: charged until they close


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
            raise bad_reply(where, "a histogram: one cumulative count per ascending bound, none above count")
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
    holder_pid: int | None = optional()
    sockets: tuple[BoundSocket, ...] | tuple[BareSocket, ...] | None = optional()
    # a bare grant always says what it did about memlock (null: nothing was asked)
    memlock: dict[str, Any] | None = field(default=None, metadata={"omit": lambda value, reply: reply.kind != "bare"})
    bind_flags_hint: int | None = optional()
    map_fd: int | None = optional()
    map_entries: int | None = optional()
    map_pin: str | None = optional()  # map grants: where the tenant's map is pinned for it (bpffs), when it is

    @property
    def bound_sockets(self) -> tuple[BoundSocket, ...]:
        return tuple(s for s in self.sockets or () if isinstance(s, BoundSocket))

    def fd_indexes(self) -> list[int]:
        """The indexes into the reply's fds it names."""
        indexes = [s.fd for s in self.sockets or ()] + [s.umem_fd for s in self.bound_sockets]
        if self.map_fd is not None:
            indexes.append(self.map_fd)
        return indexes

    def fd_count(self) -> int:
        """How many fds come with this reply, by the indexes it names."""
        return max(self.fd_indexes(), default=-1) + 1


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
    metrics: MetricsInfo | None = optional()
    # the policy in force (fallback: the file on disk is broken and the last good copy runs) and the broker's
    # effective memlock and fd limits; absent from older brokers
    policy: dict[str, Any] | None = optional()
    limits: dict[str, Any] | None = optional()
    # which CPUs answer clients and which do the slow kernel work (serve --split-cpus); None: not split
    cpus: dict[str, Any] | None = optional()


class StatusExtras(typing.TypedDict, total=False):
    """The optional fields of StatusReply, as the daemon supplies them."""

    policy: dict[str, Any]
    limits: dict[str, Any]
    cpus: dict[str, Any] | None


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
    ok = msg.get("ok")
    if not ok:
        # lenient by design: whatever else is wrong with an error reply, the caller learns it was refused
        given = msg.get("error")
        err: dict[str, Any] = given if isinstance(given, dict) else {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        return ErrorReply(str(err.get("code", ErrorCode.UNKNOWN)), str(err.get("message", "")),
                          op if isinstance(op, str) else None, req_id if good_id else None, details, raw=msg)
    if ok is not True:  # as Connection.call reads it: 1 or "no" is not success
        raise bad_reply("reply.ok", "true or false")
    if "id" in msg and not good_id:
        raise bad_reply("reply.id", "an integer or a string")
    if not isinstance(op, str) or op not in OK_REPLIES:
        raise bad_reply("reply.op", "one of " + ", ".join(OK_REPLIES))
    body = {k: v for k, v in msg.items() if k not in ("v", "ok", "op", "id")}
    reply = OK_REPLIES[op].from_wire(body, given={"req_id": req_id, "raw": msg})
    if isinstance(reply, GrantReply):
        _check_grant(reply)
    return reply  # type: ignore[return-value]


def _check_grant(reply: GrantReply) -> None:
    needed = _KIND_FIELDS.get(reply.kind)
    if needed is None:
        raise bad_reply("reply.kind", "one of " + ", ".join(_KIND_FIELDS))
    for name in needed:
        if getattr(reply, name) is None:
            raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply: a {reply.kind} grant lacks {name!r}")
    want = BoundSocket if reply.kind == "bound" else BareSocket
    if any(type(s) is not want for s in reply.sockets or ()):
        raise bad_reply("reply.sockets", f"{reply.kind} sockets")
    if any(i < 0 for i in reply.fd_indexes()):  # fds[-1] would be another of the reply's fds
        raise bad_reply("reply fd indexes", "0 or more")
