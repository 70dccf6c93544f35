"""Serving requests: protocol in, policy decision, kernel work, reply and fds out.

No sockets here: the server loop hands in a peer and the request bytes and sends back what this
returns. Every decision is reported to the audit callback. The kernel work goes through one injected
Kernel (broker.kernel; the real one by default), so the whole service runs in unit tests against a fake.
The work is split by job: broker.grants makes grants, broker.lifecycle ends and recovers leases; this
module takes requests in and answers status, revoke and policy reloads.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable

from xskbroker.broker import faults, limits, squat
from xskbroker.broker.closer import Closer
from xskbroker.broker.core import (
    AuditFn,
    Deferred,
    MemlockRaise,
    Outcome,
    Refused,
    SignalFn,
    no_signals,
    policy_peer,
    quota_peer,
)
from xskbroker.broker.grants import Grants
from xskbroker.broker.kernel import Kernel, LinuxKernel, Program
from xskbroker.broker.leases import LeaseTable
from xskbroker.broker.lifecycle import Lifecycle
from xskbroker.broker.metrics import Metrics
from xskbroker.broker.netcache import NetCache
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.umem_pool import UmemPool
from xskbroker.broker.workers import Workers
from xskbroker.policy import Holdings, Policy, RateLimiter
from xskbroker.policy import quota as quotas
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import (
    ErrorReply,
    HelloReply,
    InterfaceInfo,
    PeerCred,
    QuotaUsage,
    RevokeReply,
    StatusExtras,
    StatusReply,
)

__all__ = ["SERVER_NAME", "AuditFn", "Deferred", "MemlockRaise", "Outcome", "Refused", "Service", "SignalFn",
           "policy_peer"]

SERVER_NAME = "xskbroker"
ABORT_CLOSERS = 8  # closes of failed grants' sockets in flight at most


class Service(Grants, Lifecycle):
    """The broker's decisions. `kernel` does the kernel work (LinuxKernel by default); `signal_holder` sends
    a revoked lease's holder its signal (the server, which holds the holders' pidfds, provides it); `fault`
    is the crash tests' hook (broker.faults); `link_events` says the server watches rtnetlink link events
    and calls link_event() (it may also say so later, with watch_links())."""

    def __init__(self, policy: Policy, audit: AuditFn, xdp_mode: str = "auto", state_file: str | None = None,
                 clock: Callable[[], float] = time.monotonic, umem_pool: int = 0, *, kernel: Kernel | None = None,
                 signal_holder: SignalFn = no_signals, link_events: bool = False,
                 fault: Callable[[str], None] = faults.none, pin_root: str | None = None) -> None:
        self.policy = policy
        self.metrics = Metrics()
        self.audit = self.metrics.tap(audit)  # grant decisions are counted as they are recorded
        self.xdp_mode = xdp_mode
        self.fault = fault
        self.kernel = kernel if kernel is not None else LinuxKernel(fault)
        self.leases = LeaseTable(state_file)
        self.leases.on_end = self._lease_ended
        self.leases.on_journal = lambda error: self.audit(
            {"event": "journal-write-failed", "path": state_file, "error": str(error),
             "effect": "grants are refused until it can be written; ends and changes are kept and written then"}
            if error is not None else {"event": "journal-written", "path": state_file})
        self.raised: dict[tuple[int, int | None, int | None], MemlockRaise] = {}
        self.programs: dict[int, Program] = {}
        self.names: dict[int, str] = {}
        self.limiter = RateLimiter()
        self._buckets_swept = 0.0
        self.clock = clock
        # sockets made ahead of grants, within the budget (and a quarter of a limited memlock: limits.pool_budget)
        self.pool = UmemPool(limits.pool_budget(umem_pool) if umem_pool else 0, self.kernel.make_ready)
        self.metrics.pool = self.pool.snapshot
        self.closer = Closer(ABORT_CLOSERS, name="abort")
        self.sent_done: Callable[[str], None] = lambda lease_id: None
        # whether the server's closer still has sent fds to close (set by the server): a queue busy meanwhile
        # may be held by one of them, and a bare grant waits a moment instead of refusing
        self.closes_pending: Callable[[], bool] = lambda: False
        self.pending = Holdings()
        self.judged = {}
        self.held = self.leases.holdings().joined(self.pending)  # a view of both, as they are when read
        self.held.watch(quotas.group_entries(policy))  # indexed by the groups quotas name only
        # the policy's group names a set of gids holds (the server's broker.peer.GroupNames.of, set with the
        # policy's names): a lease's group names are re-read by it at a reload (and once the server is made,
        # after recovery), or a group a new policy names would count none of the leases its members hold
        self.groups_of: Callable[[frozenset[int]], frozenset[str]] | None = None
        self.workers = Workers()
        self.loop_busy = False
        self.jobs: collections.Counter[int] = collections.Counter()
        self.bare_empty: set[str] = set()
        self.freed: dict[tuple[int, int], tuple[float, str]] = {}
        self.signal_holder = signal_holder
        self.pin_root = pin_root  # a bpffs directory where map grants are pinned for their tenants
        self.link_events = link_events
        self.net = NetCache()  # trusted only while link events are watched (link_events)
        self.counted = {}
        self.link_sync: Callable[[], None] = lambda: None  # the server: read the link events already queued
        self.exit_sync: Callable[[int], bool] = lambda pid: False  # the server: a holder's exit already reported
        self.squat = squat.SquatWatch(self.kernel.slot_probe)  # where bare sockets are bound (their holders bind)
        # the daemon's `policy` (last-good fallback) and `limits` fields of the status reply, given admin or not
        self.describe: Callable[[bool], StatusExtras] = lambda admin: {}

    def watch_links(self, watched: bool = True) -> None:
        """Link events are (or are no longer) delivered to link_event(): cached programs can be trusted."""
        self.link_events = watched
        self.net.forget()

    def reload(self, policy: Policy, source: str | None = None) -> None:
        """Judge every request from now on by `policy` (leases already granted stay)."""
        self.policy = policy
        self.held.watch(quotas.group_entries(policy))
        self.regroup()
        self.pool.flush()  # made for what was asked under the old policy: nothing made ahead outlives it
        self.metrics.reloaded(True)
        self.audit({"event": "policy-reloaded", "path": source, "rules": len(policy.rules)})

    def regroup(self) -> None:
        """Name each lease's groups as the policy in force does (groups_of): they were named as the policy the
        lease was granted (or recovered) under did, and a quota of a group first named since counted none."""
        if self.groups_of is not None:
            self.leases.regroup(self.groups_of)

    def compact_journal(self) -> None:
        """The lease journal's compaction, if due: called between rounds of requests, off every grant's path."""
        try:
            self.leases.compact_if_due()
        except OSError as e:  # kept appending to the old journal; tried again after another 1000 lines
            self.audit({"event": "journal-compact-failed", "error": str(e)})

    def forget_programs(self, keep_attached: bool = False) -> None:
        """Drop the cached XSK programs: the next grant on each interface finds its program anew. keep_attached (link
        events lost) keeps those the kernel says are still attached: their maps hold the leases' sockets, which
        release, revoke and the orphan poll find through them (dropped, a revoke emptied no slot and a lease released
        with its sockets open ended at the next look)."""
        for ifindex, prog in list(self.programs.items()):
            if keep_attached:
                with contextlib.suppress(OSError):  # gone, or someone else's now: dropped
                    if self.kernel.attached(ifindex) == prog.prog_id:
                        continue
            prog.close()
            del self.programs[ifindex]
        self.net.forget()

    def close(self) -> None:
        # releases still settling are settled now (the server has closed the broker's copies): their end, or their
        # release-kept, is journaled, so the next broker does not take them back as live leases
        self.settle_releases(float("inf"), all_due=True)
        self.forget_programs()
        self.leases.close()
        self.workers.stop()
        self.kernel.stop()  # first: a pool refill waiting on the helper that makes its sockets gives up at once
        self.pool.close()
        self.closer.stop()

    # ---- entry point ---------------------------------------------------------------------------

    def handle(self, peer: PeerInfo, data: bytes, *, truncated: bool = False, fds: int = 0) -> Outcome | Deferred:
        # every message counts against the peer's rate, malformed ones too
        bad: proto.ProtocolError | None = None
        try:
            req = proto.decode_request(data, truncated=truncated, fds=fds)
        except proto.ProtocolError as e:
            bad = e
        now = self.clock()
        if now - self._buckets_swept > 60.0:  # idle buckets are full again: drop them, the table stays small
            self.limiter.forget_idle(now)
            self._buckets_swept = now
        limited = self.limiter.allow(self.policy, quota_peer(peer), now)
        if limited:
            op, req_id = (bad.op, bad.req_id) if bad else (req.op, req.req_id)
            self.audit({"event": "rate-limited", "peer": peer.as_dict(), "op": op, "code": limited.code,
                        "reason": limited.reason})
            return Outcome(ErrorReply(ErrorCode(limited.code), limited.reason, op, req_id))
        if bad:
            self.audit({"event": "bad-request", "peer": peer.as_dict(), "code": bad.code, "message": bad.message})
            return Outcome(ErrorReply.of(bad))
        if isinstance(req, proto.Hello):
            return Outcome(HelloReply(SERVER_NAME, (proto.VERSION,), PeerCred(peer.uid, peer.gid, peer.pid),
                                      req_id=req.req_id))
        if isinstance(req, proto.Status):
            return self._status_settled(peer, req)
        if isinstance(req, proto.Release):
            return self._release(peer, req)
        if isinstance(req, proto.Revoke):
            return Outcome(self._revoke(peer, req))
        return self._grant(peer, req)

    # ---- revoke and status --------------------------------------------------------------------------

    def _revoke(self, peer: PeerInfo, req: proto.Revoke) -> RevokeReply | ErrorReply:
        if not self._admin(peer):
            self.audit({"event": "revoke", "peer": peer.as_dict(), "decision": "deny", "code": ErrorCode.NOT_ADMIN})
            return ErrorReply(ErrorCode.NOT_ADMIN, f"uid {peer.uid} is not an admin in the policy's [admin] table",
                              "revoke", req.req_id)
        if req.lease is not None:
            chosen = [x for x in [self.leases.get(req.lease)] if x is not None]
        else:
            chosen = [x for x in self.leases if x.ifname == req.interface
                      and (req.queue is None or req.queue in x.queues)]
        if not chosen:
            return ErrorReply(ErrorCode.UNKNOWN_LEASE, "no lease matches", "revoke", req.req_id)
        signal_name = self.policy.admin.revoke_signal if req.signal else None
        if req.signal and signal_name is None:
            return ErrorReply(ErrorCode.SIGNAL_NOT_ALLOWED, "the policy's [admin] table sets no revoke_signal",
                              "revoke", req.req_id)
        done = tuple(self.revoke_lease(lease, peer, signal_name) for lease in chosen)
        return RevokeReply(done, "RX stopped: the map slots are empty. The kernel cannot unbind a socket, so "
                           "a holder that keeps its fds can still transmit until it closes them.", req_id=req.req_id)

    def _status_settled(self, peer: PeerInfo, req: proto.Status) -> Outcome | Deferred:
        """Status once the releases made before it are settled (at most SETTLE_MAX, on the timer): a lease whose
        release the client has seen is not listed because the broker's own copy of its socket was still closing."""
        before = set(self.leases.settling)
        if not before:
            return Outcome(self._status(peer, req))

        def step() -> Outcome | None:
            self.settle_releases(self.clock(), all_due=True)
            return None if before.intersection(self.leases.settling) else Outcome(self._status(peer, req))

        return Deferred(step, lambda: None, delay=0.0005)

    def _status(self, peer: PeerInfo, req: proto.Status) -> StatusReply:
        self.end_closed_releases()  # released leases whose sockets closed since are not listed (nor counted)
        admin = self._admin(peer)
        # a user's own leases found through the table's index: any client may ask, and a walk of every lease cost it
        mine = self.leases if admin else self.leases.of_uid(peer.uid)
        leases = tuple(lease.info() for lease in mine if admin or lease.owned_by(peer.uid, peer.cgroup))
        interfaces = tuple(InterfaceInfo(p.ifindex, self.names.get(p.ifindex), p.prog_id, p.mode, p.max_entries,
                                         self.leases.count_on(p.ifindex)) for p in self.programs.values())
        me = quota_peer(peer)
        held = self.holdings()
        usage = []
        for q in self.policy.quotas:
            for scope in quotas.scopes(q, me):
                used = quotas.usage(scope, held)
                usage.append(QuotaUsage(q.name, f"{scope[0]} {scope[1]}", used.queues, q.max_queues, used.umem,
                                        q.max_umem))
        metrics = self.metrics.snapshot(self.leases) if admin else None  # broker-wide: admins only
        return StatusReply(leases, interfaces, tuple(usage), admin, metrics, req_id=req.req_id,
                           **self.describe(admin))
