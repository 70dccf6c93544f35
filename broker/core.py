"""What the service's parts share: the results a request ends in, and the state they all work on.

The service is split by job (broker.grants makes grants, broker.boundgrants, broker.baregrants and
broker.mapgrants the kernel work of each kind, broker.lifecycle ends and recovers leases, broker.service takes
requests in and answers status and revoke); `Core` declares the state they share, which broker.service.Service sets up.
"""

from __future__ import annotations

import collections
import errno
from collections.abc import Callable
from typing import Any

from xskbroker.broker import limits
from xskbroker.broker.closer import Closer
from xskbroker.broker.kernel import Kernel, Program, QueueBusy
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.leases import LeaseTable
from xskbroker.broker.netcache import NetCache
from xskbroker.broker.peer import PeerInfo, user_name
from xskbroker.broker.squat import SquatWatch
from xskbroker.broker.umem_pool import UmemPool
from xskbroker.broker.workers import Workers
from xskbroker.common.records import field, record
from xskbroker.policy import Holdings, Peer, Policy, Rule
from xskbroker.policy.admin import is_admin
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import ErrorReply, OkReply, RevokedLease

AuditFn = Callable[[dict[str, Any]], None]
# (lease, signal name) -> None when its holder was sent the signal, else why it was not
SignalFn = Callable[[Lease, str], str | None]


def no_signals(lease: Lease, signame: str) -> str | None:
    return "the broker has no way to signal processes"


@record
class Outcome:
    """A reply and the fds it carries; the server encodes and sends them, then closes its copies."""

    reply: OkReply | ErrorReply
    fds: list[int] = field(default_factory=list)
    lease_id: str | None = None
    holder_pid: int = 0  # whose exit ends the lease (the requester unless it named another process)
    # keep the broker's copies of the fds a moment after the reply (bound sockets: the last close waits for a
    # grace period, which the broker's closer then pays, not the client); bare and map fds are closed at once,
    # so a holder that closes its copies frees the queue without waiting on the broker's
    keep: bool = False


@record
class Deferred:
    """A request that waits for the kernel: the server calls step() on a timer until it returns the
    Outcome (step() may also end the wait with a refusal Outcome)."""

    step: Callable[[], Outcome | None]
    cancel: Callable[[], None]  # give up (the broker is stopping): undo what was made
    delay: float = 0.001  # first retry; the server backs off to server.retry_cap()
    # True while a worker thread does the request's kernel work: no timer, the worker's wake-up ends it
    parked: Callable[[], bool] = lambda: False
    # True once that work is done: stepped at once, not at the next timer
    ready: Callable[[], bool] = lambda: False


def then(ready: Callable[[], bool], make: Callable[[], Outcome | Deferred]) -> Deferred:
    """A request that first waits until ready() (stepped on the server's timer; it may raise Refused), then
    is make()'s: its Outcome, or its own Deferred stepped in place of this one."""
    inner: list[Deferred] = []

    def step() -> Outcome | None:
        if inner:
            return inner[0].step()
        if not ready():
            return None
        made = make()
        if isinstance(made, Outcome):
            return made
        inner.append(made)
        return None if not made.ready() else made.step()

    def cancel() -> None:
        if inner:
            inner[0].cancel()

    return Deferred(step, cancel, parked=lambda: bool(inner) and inner[0].parked(),
                    ready=lambda: bool(inner) and inner[0].ready())


@record
class MemlockRaise:
    """A holder's RLIMIT_MEMLOCK as it was before the broker raised it, restored when its last lease that
    needed the raise ends (if the process still runs and nobody changed the limit meanwhile)."""

    before: tuple[int, int]
    now: tuple[int, int]
    leases: set[str] = field(default_factory=set)


class Refused(Exception):
    """A request the broker will not serve; extra keys go into the error object ("errno", "lease", ...)."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra

    def reply(self, op: str, req_id: Any) -> ErrorReply:
        return ErrorReply(self.code, self.message, op, req_id, self.extra)


def policy_peer(peer: PeerInfo) -> Peer:
    return Peer(peer.uid, peer.gids, peer.user, peer.groups, peer.cgroup, peer.label)


def quota_peer(peer: PeerInfo) -> Peer:
    """The peer as per-user quotas and rate limits count it: a subordinate uid as its owner (broker.subids),
    so one user's thousands of uids draw on one budget. Never for decisions: a rule naming the owner does not
    allow its subordinate uids."""
    if peer.owner is None:
        return policy_peer(peer)
    return Peer(peer.owner, peer.gids, user_name(peer.owner), peer.groups, peer.cgroup, peer.label)


def refusal(e: BaseException, ifname: str, queue: int) -> BaseException:
    """A kernel failure making queue's socket, as the refusal the client reads (other exceptions unchanged)."""
    if isinstance(e, QueueBusy):
        return Refused(ErrorCode.QUEUE_BUSY, f"{ifname} queue {queue} is held by another socket")
    if isinstance(e, OSError):
        pinning = e.errno in (errno.ENOBUFS, errno.ENOMEM) and "XDP_UMEM_REG" in (e.strerror or "")
        why = limits.memlock_exhausted() if pinning else None  # else the bare "No buffer space available"
        message = f"{ifname} queue {queue}: {e.strerror or e}" + (f"; {why}" if why else "")
        return Refused(ErrorCode.KERNEL_ERROR, message,
                       errno=errno.errorcode.get(e.errno or 0, str(e.errno)))
    return e


class Core:
    """The state the service's parts share (set up by Service.__init__), and the calls they make across."""

    policy: Policy
    audit: AuditFn
    kernel: Kernel
    fault: Callable[[str], None]
    xdp_mode: str
    clock: Callable[[], float]
    leases: LeaseTable
    programs: dict[int, Program]
    names: dict[int, str]  # ifindex -> name as last seen, to notice renames
    # (pid, start, pidfs inode) -> its memlock limits before the broker raised them: by process, never by pid alone
    # (a pid reused by another process must never inherit a raise, nor be restored to another's limits)
    raised: dict[tuple[int, int | None, int | None], MemlockRaise]
    held: Holdings  # leases' and pending grants' holdings (a view of both)
    groups_of: Callable[[frozenset[int]], frozenset[str]] | None  # a peer's group names as the policy in force has them
    pending: Holdings  # grants waiting (for a queue's release, a worker), by identity
    # each grant being made, by id() of its request: (the request, what judges it again under a reloaded policy
    # and returns the rule now in force)
    judged: dict[int, tuple[proto.Grant, Callable[[], Rule | None]]]
    jobs: collections.Counter[int]  # large grants being made, by uid
    bare_empty: set[str]  # bare leases whose slots the last orphan poll found empty
    # (ifindex, queue) -> when a lease whose socket had closed last let it go, and its id: the kernel frees the
    # queue itself a moment later (much later on a busy system), and a grant that waited for it meanwhile is told so
    freed: dict[tuple[int, int], tuple[float, str]]
    pool: UmemPool
    workers: Workers
    # the server's loop has other events to handle in this round: a grant then never waits for its bind
    # inline (INLINE_WAIT), which would idle the loop while other clients' requests wait in line
    loop_busy: bool
    closer: Closer  # closes what a failed grant made, off the loop
    sent_done: Callable[[str], None]  # a lease ended: the server closes its copies of the lease's fds now
    closes_pending: Callable[[], bool]  # the server's closer still has sent fds to close
    squat: SquatWatch
    signal_holder: SignalFn
    # With link events watched, a change of XDP program drops the cached one as it happens, so a grant
    # need not ask the kernel again; without them every grant re-checks (a netlink round trip).
    link_events: bool
    net: NetCache  # interface facts kept between link events (broker.netcache)
    # interface name -> the queue count (or the error) a worker read for the grant being made now (broker.grants)
    counted: dict[str, int | OSError]
    link_sync: Callable[[], None]  # deliver the link events the kernel has queued, before net is trusted
    # a holder's exit the kernel has reported and the loop not yet read, handled now: True if it has exited
    exit_sync: Callable[[int], bool]

    def _admin(self, peer: PeerInfo) -> bool:
        return is_admin(self.policy.admin, policy_peer(peer))

    def holdings(self) -> Holdings:
        """What every lease and every grant being made holds, for the quotas."""
        return self.held

    def _rule_now(self, req: proto.Grant, rule: Rule | None) -> Rule | None:
        """The rule that allows req under the policy in force: judged again (its rules and its quotas) if the
        policy was reloaded since req was judged; raises Refused if it no longer allows it."""
        judged = self.judged.get(id(req))
        return judged[1]() if judged is not None and judged[0] is req else rule

    # defined by broker.grants and broker.lifecycle, called across them
    def _program(self, ifindex: int, ifname: str, nqueues: int) -> Program:
        raise NotImplementedError

    def revoke_lease(self, lease: Lease, by: PeerInfo | None, signal_name: str | None) -> RevokedLease:
        raise NotImplementedError

    def releases_closed(self) -> bool:
        raise NotImplementedError
