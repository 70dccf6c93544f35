"""Serving requests: protocol in, policy decision, kernel work, reply and fds out.

No sockets here: the server loop hands in a peer and the request bytes and sends back what this
returns. Every decision is reported to the audit callback.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xskbroker.broker import bpf, faults, netdev, squat, xdp_prog, xsk, xskdiag
from xskbroker.broker.leases import Lease, LeaseTable
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.umem_pool import UmemPool
from xskbroker.broker.workers import Job, Workers
from xskbroker.common.procfs import memlock_limits, pidfd_ino, pinned_start
from xskbroker.policy import Holding, Peer, Policy, RateLimiter, Request, Rule, decide
from xskbroker.policy import quota as quotas
from xskbroker.wire import protocol as proto
from xskbroker.wire.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP

SERVER_NAME = "xskbroker"
# A grant whose UMEM (all its sockets together) is at most INLINE_UMEM, or INLINE_POOLED when the UMEM pool
# has every memfd it needs prefaulted, is made on the event loop: that pins in about 3 or 6 ms, while a
# worker and the child process that pins (broker.xsk.register_umem_apart) add 2-5 ms to the grant. Larger
# ones (1 GiB takes seconds) are made on a worker thread while the loop serves everyone else.
INLINE_UMEM = 4 << 20
INLINE_POOLED = 16 << 20
# Large grants being made (running or queued for a worker) at once, in all and per uid: one user cannot
# keep every worker busy, and nobody can queue unbounded work.
MAX_JOBS = 16
MAX_JOBS_PER_UID = 2
AuditFn = Callable[[dict[str, Any]], None]


@dataclass
class Outcome:
    """A reply and the fds it carries; the server sends them and then closes its copies."""

    reply: bytes
    fds: list[int] = field(default_factory=list)
    lease_id: str | None = None
    holder_pid: int = 0  # whose exit ends the lease (the requester unless it named another process)


@dataclass
class Deferred:
    """A request that waits for the kernel: the server calls step() on a timer until it returns the
    Outcome (step() may also end the wait with a refusal Outcome)."""

    step: Callable[[], Outcome | None]
    cancel: Callable[[], None]  # give up (the broker is stopping): undo what was made
    delay: float = 0.001  # first retry; the server backs off to RETRY_CAP
    # True while a worker thread does the request's kernel work: no timer, the worker's wake-up ends it
    parked: Callable[[], bool] = lambda: False


@dataclass
class MemlockRaise:
    """A holder's RLIMIT_MEMLOCK as it was before the broker raised it, restored when its last lease that
    needed the raise ends (if the process still runs and nobody changed the limit meanwhile)."""

    before: tuple[int, int]
    now: tuple[int, int]
    leases: set[str] = field(default_factory=set)


class Refused(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


# (lease, signal name) -> None when its holder was sent the signal, else why it was not
SignalFn = Callable[[Lease, str], str | None]


class Service:
    def __init__(self, policy: Policy, audit: AuditFn, xdp_mode: str = "auto", state_file: str | None = None,
                 clock: Callable[[], float] = time.monotonic, umem_pool: int = 0) -> None:
        self.policy = policy
        self.audit = audit
        self.xdp_mode = xdp_mode
        self.leases = LeaseTable(state_file)
        self.leases.on_end = self._lease_ended
        self.raised: dict[int, MemlockRaise] = {}  # pid -> its memlock limits before the broker raised them
        self.programs: dict[int, xdp_prog.XskProgram] = {}
        self.names: dict[int, str] = {}  # ifindex -> name as last seen, to notice renames
        self.limiter = RateLimiter()
        self._buckets_swept = 0.0
        self.clock = clock
        self.pool = UmemPool(umem_pool)
        self.pending: dict[int, Holding] = {}  # grants waiting (for a queue's release, a worker), by identity
        self.workers = Workers()
        self.jobs: collections.Counter[int] = collections.Counter()  # large grants being made, by uid
        # the server, which holds the pidfds, sets it
        self.signal_holder: SignalFn = lambda lease, sig: "the broker has no way to signal processes"
        # With link events watched, a change of XDP program drops the cached one as it happens, so a grant
        # need not ask the kernel again; without them every grant re-checks (a netlink round trip).
        self.link_events = False
        self.squat = squat.SquatWatch()  # reads where bare sockets are bound (their holders bind them)

    def forget_programs(self) -> None:
        """Drop the cached XSK programs: the next grant on each interface finds its program anew."""
        for prog in self.programs.values():
            prog.close()
        self.programs.clear()

    def close(self) -> None:
        self.forget_programs()
        self.leases.close()
        self.workers.stop()
        self.pool.close()

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
        limited = self.limiter.allow(self.policy, policy_peer(peer), now)
        if limited:
            op, req_id = (bad.op, bad.req_id) if bad else (req.op, req.req_id)
            self.audit({"event": "rate-limited", "peer": peer.as_dict(), "op": op, "code": limited.code,
                        "reason": limited.reason})
            return Outcome(proto.error_reply(limited.code, limited.reason, op, req_id))
        if bad:
            self.audit({"event": "bad-request", "peer": peer.as_dict(), "code": bad.code, "message": bad.message})
            return Outcome(proto.error_reply_for(bad))
        if isinstance(req, proto.Hello):
            return Outcome(proto.ok_reply("hello", req.req_id, server=SERVER_NAME, versions=[proto.VERSION],
                                          peer={"uid": peer.uid, "gid": peer.gid, "pid": peer.pid}))
        if isinstance(req, proto.Status):
            return Outcome(self._status(peer, req))
        if isinstance(req, proto.Release):
            return Outcome(self._release(peer, req))
        if isinstance(req, proto.Revoke):
            return Outcome(self._revoke(peer, req))
        return self._grant(peer, req)

    # ---- grant -----------------------------------------------------------------------------------

    def _grant(self, peer: PeerInfo, req: proto.Grant) -> Outcome | Deferred:
        started = time.perf_counter()
        record: dict[str, Any] = {"event": "grant", "peer": peer.as_dict(), "request": _describe(req)}
        # a map grant is judged on every queue of the device (a deny on any of them applies)
        queues = req.queues or _all_queues(req.interface)
        who = policy_peer(peer)
        decision = decide(self.policy, who, Request(req.interface, queues, req.kind, req.pinned_bytes))
        record["rule"] = decision.rule.name if decision.rule else None

        def settle(result: Outcome | Deferred | None = None, refused: Refused | None = None) -> Outcome:
            ms = round((time.perf_counter() - started) * 1000, 3)
            if refused is not None:
                record.update(decision="deny", code=refused.code, reason=refused.message, ms=ms)
                self.audit(record)
                return Outcome(proto.error_reply(refused.code, refused.message, "grant", req.req_id, **refused.extra))
            assert isinstance(result, Outcome)
            record.update(decision="allow", code="ok", lease=result.lease_id, ms=ms)
            self.audit(record)
            return result

        try:
            if not decision.allowed or decision.rule is None:
                raise Refused(decision.code, decision.reason)
            # a map grant holds every queue of the device: it counts them all (req.queues is empty)
            over = quotas.check(self.policy, who, self.holdings(), queues=len(queues), umem=req.pinned_bytes)
            if over:
                record["quota"] = over.reason
                raise Refused(over.code, over.reason)
            holder = self._holder(peer, req.holder_pid) if req.holder_pid else peer
            maker = {"bound": self._make_bound, "bare": self._make_bare, "map": self._make_map}[req.kind]
            result = maker(holder, req, decision.rule)
        except Refused as e:
            return settle(refused=e)
        if isinstance(result, Outcome):
            return settle(result)
        # waiting for the kernel to release a queue: the decision is recorded when the wait ends
        inner = result.step

        def step() -> Outcome | None:
            try:
                done = inner()
            except Refused as e:
                return settle(refused=e)
            return None if done is None else settle(done)

        result.step = step
        return result  # its cancel() needs no record: nobody was granted or told anything

    def _holder(self, peer: PeerInfo, pid: int) -> PeerInfo:
        """The process a launcher hands the sockets to (QEMU behind a QMP socket): it must be the
        requester's own (same real uid), so nobody can pin a lease or a memlock raise on someone else's.
        The process is pinned by a pidfd first: its uid and start time are then read from the process
        itself, never from one that took its pid in between."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise Refused("bad-holder", f"holder_pid {pid} is not a running process") from None
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            start = pinned_start(pidfd, pid)  # after the uid: still running then, so both reads were its own
            ino = pidfd_ino(pidfd)
        except (OSError, StopIteration, ValueError):
            start = None
        finally:
            os.close(pidfd)
        if start is None:
            raise Refused("bad-holder", f"holder_pid {pid} is not a running process")
        if uid != peer.uid and not self.is_admin(peer):
            raise Refused("bad-holder", f"holder_pid {pid} belongs to uid {uid}, not to the requester (uid {peer.uid})")
        return PeerInfo(pid, peer.uid, peer.gid, peer.gids, peer.user, peer.groups, peer.exe, peer.cgroup, start, ino)

    def _checked(self, req: proto.Grant) -> tuple[int, int]:
        """The interface's index and queue count, after every check that changes nothing in the kernel:
        the name is the interface's own (the one the policy judged), every requested queue exists, and no
        map lease holds the interface whole."""
        try:
            ifindex = netdev.resolve(req.interface)
        except netdev.NotCanonical as e:
            raise Refused("not-canonical-name", str(e), canonical=e.canonical) from None
        except netdev.NoSuchInterface as e:
            raise Refused("no-such-interface", str(e)) from None
        nqueues = netdev.queue_count(req.interface)
        bad = [q for q in req.queues if q >= nqueues]
        if bad:
            raise Refused("no-such-queue", f"{req.interface} has {nqueues} queue(s) (0-{nqueues - 1}); "
                          f"queue {bad[0]} does not exist")
        sole = next((lease for lease in self.leases if lease.ifindex == ifindex and lease.kind == "map"), None)
        if sole:
            raise Refused("interface-exclusive", f"{req.interface} is held whole by lease {sole.id} (a map grant "
                          f"to uid {sole.uid}) until it ends")
        return ifindex, nqueues

    def _target(self, req: proto.Grant) -> tuple[int, xdp_prog.XskProgram]:
        """The interface's index and XSK program (attached now if need be) once every check has passed."""
        ifindex, nqueues = self._checked(req)
        prog = self._program(ifindex, req.interface, nqueues)
        self.check_bare(prog)
        over = [q for q in req.queues if q >= prog.max_entries]
        if over:
            raise Refused("no-such-queue", f"the XSK program on {req.interface} has {prog.max_entries} "
                          f"map slots; queue {over[0]} is beyond it (the device grew after it was attached)")
        return ifindex, prog

    def _make_bound(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome | Deferred:
        big = req.umem_bytes > INLINE_UMEM and not (
            req.umem_bytes <= INLINE_POOLED and self.pool.ready(req.geometry.umem_size) >= len(req.queues))
        if big and (self.jobs[peer.uid] >= MAX_JOBS_PER_UID or self.jobs.total() >= MAX_JOBS):
            raise Refused("grants-in-progress", f"the broker is already making {self.jobs.total()} large grants "
                          f"({self.jobs[peer.uid]} for uid {peer.uid}); try again when one is done")
        ifindex, prog = self._target(req)
        prepared: list[xsk.PreparedSocket] = []
        bound: list[xsk.PreparedSocket] = []  # bound by the worker
        where = [req.queues[0]]  # the queue a failure is about

        def abort(e: BaseException, queue: int) -> BaseException:
            for p in prepared:
                p.abort()
            self.pending.pop(id(prepared), None)
            return _refusal(e, req.interface, queue)

        def work(job: Job) -> None:  # on a worker thread: nothing shared but `prepared`
            for p in prepared:
                if job.cancelled:
                    return
                where[0] = p.queue
                p.add_umem(req.geometry, self.pool.take, apart=job.watch)
            for p in prepared:  # the first bind too: zero-copy maps every UMEM page for DMA there
                where[0] = p.queue
                if not job.cancelled and p.try_bind():
                    bound.append(p)

        job: Job | None = None
        try:
            for p_queue in req.queues:
                where[0] = p_queue
                prepared.append(xsk.claim(ifindex, p_queue, prog.map_fd, req.bind_mode, req.need_wakeup))
            if big:
                job = self.workers.submit(Job(work, lambda: [p.abort(empty_slot=False) for p in prepared]))
                self.jobs[peer.uid] += 1
                waiting = []
            else:
                for p in prepared:
                    where[0] = p.queue
                    p.add_umem(req.geometry, self.pool.take)
                waiting = [p for p in prepared if not p.try_bind()]
        except BaseException as e:
            raise abort(e, where[0]) from None
        if job is None and not waiting:
            return self._finish_bound(peer, req, ifindex, prog, prepared)
        for p in waiting:  # a bare socket squatting the queue will not let go: no point in waiting for it
            culprit = self.squat.culprit(prog, self.leases, p.queue)
            if culprit:
                raise abort(Refused("queue-squatted", squat.squatter_message(req.interface, p.queue, culprit),
                                    lease=culprit.id), p.queue)
        # A queue whose last socket just closed answers EBUSY until the kernel's deferred release runs.
        # The grant waits for it on the server's timer, never in the event loop, and its claimed slots
        # and pinned UMEM count against the quota meanwhile (as they do while a worker makes them).
        self.pending[id(prepared)] = Holding(peer.uid, peer.gids, peer.groups, len(req.queues), req.pinned_bytes)
        deadline = self.clock() + xsk.BUSY_RETRY_SECONDS

        def job_over() -> None:
            nonlocal job
            if job is not None:
                self.jobs[peer.uid] -= 1
                if not self.jobs[peer.uid]:
                    del self.jobs[peer.uid]
                job = None

        def step() -> Outcome | None:
            nonlocal deadline
            if job is not None:
                if not job.done:
                    return None
                error = job.error
                job_over()
                if error is not None:
                    raise abort(error, where[0]) from None
                waiting[:] = [p for p in prepared if p not in bound]
                deadline = self.clock() + xsk.BUSY_RETRY_SECONDS
            try:
                waiting[:] = [p for p in waiting if not p.try_bind()]
            except BaseException as e:
                raise abort(e, waiting[0].queue) from None
            if waiting:
                if self.clock() < deadline:
                    return None
                raise abort(self._squatted(req.interface, prog, waiting[0].queue), waiting[0].queue)
            self.pending.pop(id(prepared), None)
            return self._finish_bound(peer, req, ifindex, prog, prepared)

        def cancel() -> None:  # the broker is stopping: the wait ends with nothing made
            if job is not None:  # the worker may still be pinning: it undoes the job when it is done
                job.cancel()
                job_over()
                self.pending.pop(id(prepared), None)
                return
            abort(OSError(errno.ECANCELED, "the broker is stopping"), req.queues[0])

        return Deferred(step, cancel, parked=lambda: job is not None and not job.done)

    def _squatted(self, ifname: str, prog: xdp_prog.XskProgram, queue: int) -> BaseException:
        """Why a queue stayed EBUSY: a bare socket bound off its lease, a stranger's socket, or a slow release."""
        culprit = self.squat.culprit(prog, self.leases, queue)
        with contextlib.suppress(OSError):
            if culprit or queue in xskdiag.xsk_queues(prog.ifindex):
                return Refused("queue-squatted", squat.squatter_message(ifname, queue, culprit), errno="EBUSY",
                               **({"lease": culprit.id} if culprit else {}))
        return OSError(errno.EBUSY, f"still bound by a released socket after {xsk.BUSY_RETRY_SECONDS} s")

    def check_bare(self, prog: xdp_prog.XskProgram | None = None) -> None:
        """Revoke the bare leases whose sockets are bound to a queue they were not granted (squatting it).

        Called on each grant on the interface and on the server's poll timer while bare leases live;
        costs loading a probe program (about 60 us) and one BPF_PROG_TEST_RUN (about 3 us) per bare slot."""
        for p in [prog] if prog else list(self.programs.values()):
            bare = [x for x in self.leases.on_interface(p.ifindex) if x.kind == "bare" and not x.revoked]
            if not bare:
                continue
            for lease, slot, queue in self.squat.misbound(p, bare):
                if lease.revoked:
                    continue  # two misbound slots of one lease: revoked once
                lease.misbound = queue
                self.audit({"event": "bare-misbound", "lease": lease.id, "uid": lease.uid, "pid": lease.pid,
                            "interface": lease.ifname, "granted_queues": list(lease.queues), "slot": slot,
                            "bound_queue": queue})
                self.revoke_lease(lease, None, self.policy.admin.revoke_signal)

    def has_bare(self) -> bool:
        return any(x.kind == "bare" and not x.revoked for x in self.leases)

    def _finish_bound(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: xdp_prog.XskProgram,
                      prepared: list[xsk.PreparedSocket]) -> Outcome:
        made = [p.finish() for p in prepared]
        fds: list[int] = []
        sockets = []
        for s in made:
            sockets.append({"queue": s.queue, "fd": len(fds), "umem_fd": len(fds) + 1,
                            "bind_flags": s.bind_flags, "zerocopy": s.zerocopy, **req.geometry.to_wire()})
            fds += [s.xsk_fd, s.umem_fd]
        return self._lease(peer, req, ifindex, prog, fds, sockets=sockets)

    def _make_bare(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        if not xsk.kernel_enforces_bindtodevice():
            raise Refused("unsupported-kind", f"bare grants need Linux 6.5 or later, where SO_BINDTODEVICE confines "
                          f"an AF_XDP bind to the device; this is {os.uname().release}")
        ifindex, prog = self._target(req)
        fds: list[int] = []
        try:
            for q in req.queues:
                fds.append(xsk.create_bare(req.interface, q, prog.map_fd))
        except BaseException as e:
            for q_done, fd in zip(req.queues, fds, strict=False):
                bpf.map_delete(prog.map_fd, q_done)
                os.close(fd)
            raise _refusal(e, req.interface, q) from None
        sockets = [{"queue": q, "fd": i} for i, q in enumerate(req.queues)]
        memlock = self._memlock(peer, req.memlock, rule) if req.memlock else None
        out = self._lease(peer, req, ifindex, prog, fds, sockets=sockets, memlock=memlock,
                          bind_flags_hint=XDP_USE_NEED_WAKEUP | (XDP_COPY if prog.mode == "skb" else 0))
        if memlock and memlock["raised"] and out.lease_id and peer.pid in self.raised:
            self.raised[peer.pid].leases.add(out.lease_id)  # restored when the last such lease ends
        return out

    def _make_map(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        if not rule.exclusive:  # the loader already insists on it; a decision must never rely on that alone
            raise Refused("kind-not-allowed", f"{rule.describe()} is not exclusive: map grants need the whole "
                          "interface")
        ifindex, nqueues = self._checked(req)
        others = [lease for lease in self.leases if lease.ifindex == ifindex]
        if others:  # checked before anything is attached
            raise Refused("interface-busy", f"{req.interface} is in use (leases {[x.id for x in others]}); a map "
                          "grant needs it unused")
        prog = self._program(ifindex, req.interface, nqueues)
        taken = xsk.occupied_slots(prog.map_fd, prog.max_entries)
        if taken:
            raise Refused("interface-busy", f"{req.interface} is in use (occupied queues {taken}); a map grant "
                          "needs it unused")
        map_id = bpf.map_info(prog.map_fd).id
        fd = os.dup(prog.map_fd)
        # every slot is the holder's to write: the lease (and the quota) counts them all
        out = self._lease(peer, req, ifindex, prog, [fd], queues=tuple(range(prog.max_entries)), map_fd=0,
                          map_entries=prog.max_entries)
        lease = self.leases.get(out.lease_id or "")
        if lease:  # the map whose program is detached when the lease ends, even after a broker restart
            lease.map_id = map_id
            self.leases.record(lease)
        return out

    def _lease(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: xdp_prog.XskProgram, fds: list[int],
               queues: tuple[int, ...] | None = None, **fields: Any) -> Outcome:
        # recorded (and persisted) before the fds leave: a crash after this line leaves a record that
        # recovery checks against the kernel, never a socket nobody accounts for
        lease = self.leases.add(peer.uid, peer.pid, ifindex, req.interface, queues or req.queues, req.kind,
                                req.pinned_bytes, tuple(sorted(peer.gids)), tuple(sorted(peer.groups)), peer.start,
                                peer.ino)
        faults.point("after-lease-saved")
        reply = proto.ok_reply("grant", req.req_id, lease=lease.id, kind=req.kind, interface=req.interface,
                               ifindex=ifindex, xdp_mode=prog.mode, xdp_prog_id=prog.prog_id, holder_pid=peer.pid,
                               **fields)
        return Outcome(reply, fds, lease.id, peer.pid)

    def _memlock(self, peer: PeerInfo, needed: int, rule: Rule) -> dict[str, Any]:
        """Give a bare-grant holder the RLIMIT_MEMLOCK its own UMEM needs, where policy and privilege allow.

        Never lowers a limit. When it cannot raise it, the reply says exactly what is missing.
        """
        try:
            soft, hard = _memlock_of(peer.pid)
        except OSError as e:  # the holder is gone: its sockets are made, so answer rather than fail the grant
            return {"needed": needed, "ok": False, "raised": False, "reason": f"cannot read its limit: {e}"}
        info: dict[str, Any] = {"needed": needed, "soft": soft, "hard": hard, "raised": False}
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return {**info, "ok": True}
        hint = (f"raise the limit of the process that will register the UMEM to at least {needed} bytes: "
                f"LimitMEMLOCK={needed} in its systemd unit, `prlimit --pid {peer.pid} --memlock={needed}:{needed}` "
                f"as root, a memlock line in limits.conf, or CAP_IPC_LOCK")
        if rule.raise_memlock is None or needed > rule.raise_memlock:
            allowed = "no raise" if rule.raise_memlock is None else f"raises up to {rule.raise_memlock} bytes"
            return {**info, "ok": False, "reason": f"{rule.describe()} allows {allowed}", "hint": hint}
        # only what is needed: the soft limit to `needed`, the hard one only when it is below (soft <= hard)
        new = (needed, hard if hard == resource.RLIM_INFINITY else max(hard, needed))
        try:
            resource.prlimit(peer.pid, resource.RLIMIT_MEMLOCK, new)
        except OSError as e:
            reason = ("the broker lacks CAP_SYS_RESOURCE to raise another process's hard limit"
                      if e.errno == errno.EPERM else f"prlimit failed: {e.strerror}")
            return {**info, "ok": False, "reason": reason, "hint": hint}
        earlier = self.raised.get(peer.pid)
        self.raised[peer.pid] = MemlockRaise(earlier.before if earlier else (soft, hard), new,
                                             earlier.leases if earlier else set())
        self.audit({"event": "memlock-raised", "pid": peer.pid, "from": soft, "to": needed, "hard": new[1]})
        return {**info, "ok": True, "raised": True}

    def _program(self, ifindex: int, ifname: str, nqueues: int) -> xdp_prog.XskProgram:
        """The cached XSK program of the interface, re-found when someone changed what is attached."""
        cached = self.programs.get(ifindex)
        if cached and self.link_events:
            return cached
        try:
            current, _ = xdp_prog.attached(ifindex)
            if cached and cached.prog_id == current:
                return cached
            if cached:
                cached.close()
                del self.programs[ifindex]
            prog = xdp_prog.find_or_attach(ifindex, ifname, nqueues, self.xdp_mode)
        except xdp_prog.ForeignProgram as e:
            raise Refused("xdp-foreign-program", e.strerror or str(e)) from None
        except OSError as e:
            raise Refused("xdp-attach-failed", e.strerror or str(e)) from None
        self.programs[ifindex] = prog
        self.names[ifindex] = ifname
        if prog.attached_now:
            self.audit({"event": "xdp-attach", "interface": ifname, "ifindex": ifindex, "prog_id": prog.prog_id,
                        "mode": prog.mode, "map_entries": prog.max_entries})
        return prog

    def abort(self, lease_id: str) -> None:
        """The reply carrying a lease's fds never reached the client: forget the lease."""
        lease = self.leases.remove(lease_id)
        if lease:
            self.audit({"event": "lease-aborted", "lease": lease_id})

    # ---- release, exit, status --------------------------------------------------------------------

    def _release(self, peer: PeerInfo, req: proto.Release) -> bytes:
        lease = self.leases.get(req.lease)
        if lease is None or (lease.uid != peer.uid and not self.is_admin(peer)):
            return proto.error_reply("unknown-lease", f"no lease {req.lease!r} held by uid {peer.uid}",
                                     "release", req.req_id)
        prog = self.programs.get(lease.ifindex)
        if prog and lease.kind != "map":  # a map lease's program is detached as it ends (_lease_ended)
            for q in lease.queues:
                with contextlib.suppress(OSError):
                    bpf.map_delete(prog.map_fd, q)
        self.leases.remove(lease.id)
        self.audit({"event": "release", "peer": peer.as_dict(), "lease": lease.id})
        return proto.ok_reply("release", req.req_id, lease=lease.id)

    def _lease_ended(self, lease: Lease) -> None:
        """Undo what a lease did outside the table, however it ended (release, exit, revoke, link gone)."""
        if lease.kind == "map":
            self._detach_map(lease)
        raised = self.raised.get(lease.pid)
        if raised and lease.id in raised.leases:
            raised.leases.discard(lease.id)
            if not raised.leases:
                self._restore_memlock(lease, raised)

    def _detach_map(self, lease: Lease) -> None:
        """The broker cannot take back a map fd, and its holder may have passed it on: detach the program
        that uses the map, so leftover copies redirect nothing. The next grant attaches a fresh program with
        a fresh map (the cached one is dropped here)."""
        prog = self.programs.pop(lease.ifindex, None)
        map_id = lease.map_id or (bpf.map_info(prog.map_fd).id if prog else 0)
        if prog:
            prog.close()
        try:
            detached = xdp_prog.detach(lease.ifindex, map_id)
        except OSError as e:  # ForeignProgram included
            if e.errno != errno.ENODEV:  # the interface is gone, and its program with it
                self.audit({"event": "xdp-detach-failed", "lease": lease.id, "ifindex": lease.ifindex,
                            "interface": lease.ifname, "error": str(e)})
            return
        if detached:
            self.audit({"event": "xdp-detach", "interface": lease.ifname, "ifindex": lease.ifindex,
                        "prog_id": detached, "lease": lease.id, "reason": "map lease ended"})

    def _restore_memlock(self, lease: Lease, raised: MemlockRaise) -> None:
        del self.raised[lease.pid]
        if not lease.holder_alive():
            return
        try:
            if _memlock_of(lease.pid) != raised.now:  # changed since by someone else: theirs to keep
                return
            resource.prlimit(lease.pid, resource.RLIMIT_MEMLOCK, raised.before)
        except OSError:
            return
        self.audit({"event": "memlock-restored", "pid": lease.pid, "to": raised.before[0], "hard": raised.before[1]})

    def holder_exited(self, pid: int) -> None:
        """A holder is gone. Its sockets usually died with it (and the kernel emptied their slots), but it
        may have passed them on (a launcher to QEMU over QMP): a slot still taken means they live on."""
        for lease in self.leases.of_pid(pid):
            if lease.orphaned:
                continue
            if self._still_held(lease):
                lease.orphaned = True
                self.leases.record(lease)
                self.audit({"event": "lease-orphaned", "lease": lease.id, "pid": pid,
                            "reason": "holder exited but its sockets are still open elsewhere"})
                continue
            self.leases.remove(lease.id)
            self.audit({"event": "lease-ended", "lease": lease.id, "pid": pid, "reason": "holder exited"})

    def check_orphans(self) -> None:
        """End the orphaned leases whose sockets have finally been closed (called periodically)."""
        for lease in self.leases.orphans():
            if not self._still_held(lease):
                self.leases.remove(lease.id)
                self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid,
                            "reason": "its sockets were closed"})

    def _still_held(self, lease: Lease) -> bool:
        # a revoked lease's slots were emptied on purpose: they tell nothing about its sockets
        if lease.kind == "map" or lease.revoked:
            return False
        prog = self.programs.get(lease.ifindex)
        if prog is None:
            return False
        try:
            return bool(xsk.occupied_slots(prog.map_fd, lease.queues))
        except OSError:
            return False

    def holdings(self) -> list[Holding]:
        return [*(Holding(lease.uid, frozenset(lease.gids), frozenset(lease.groups), len(lease.queues),
                          lease.umem_bytes) for lease in self.leases), *self.pending.values()]

    def is_admin(self, peer: PeerInfo) -> bool:
        admin = self.policy.admin
        return (str(peer.uid) in admin.users or (peer.user is not None and peer.user in admin.users)
                or any(g in admin.groups for g in peer.groups) or any(str(g) in admin.groups for g in peer.gids))

    # ---- revoke ----------------------------------------------------------------------------------------

    def _revoke(self, peer: PeerInfo, req: proto.Revoke) -> bytes:
        if not self.is_admin(peer):
            self.audit({"event": "revoke", "peer": peer.as_dict(), "decision": "deny", "code": "not-admin"})
            return proto.error_reply("not-admin", f"uid {peer.uid} is not an admin in the policy's [admin] table",
                                     "revoke", req.req_id)
        if req.lease is not None:
            chosen = [x for x in [self.leases.get(req.lease)] if x is not None]
        else:
            chosen = [x for x in self.leases if x.ifname == req.interface
                      and (req.queue is None or req.queue in x.queues)]
        if not chosen:
            return proto.error_reply("unknown-lease", "no lease matches", "revoke", req.req_id)
        signal_name = self.policy.admin.revoke_signal if req.signal else None
        if req.signal and signal_name is None:
            return proto.error_reply("signal-not-allowed", "the policy's [admin] table sets no revoke_signal",
                                     "revoke", req.req_id)
        done = []
        for lease in chosen:
            done.append(self.revoke_lease(lease, peer, signal_name))
        return proto.ok_reply("revoke", req.req_id, revoked=done,
                              note="RX stopped: the map slots are empty. The kernel cannot unbind a socket, so "
                              "a holder that keeps its fds can still transmit until it closes them.")

    def revoke_lease(self, lease: Lease, by: PeerInfo | None, signal_name: str | None) -> dict[str, Any]:
        """Empty the lease's map slots so RX stops, and mark it revoked; it ends when the holder closes."""
        if lease.kind == "map":  # ends at once: its program is detached, the map fd left redirects nothing
            self.leases.remove(lease.id)
            signalled = self.signal_holder(lease.pid, signal_name) if signal_name else False
            self.audit({"event": "revoke", "peer": by.as_dict() if by else None, "decision": "allow",
                        "lease": lease.id, "holder_pid": lease.pid, "ended": True, "signal": signal_name,
                        "signalled": signalled})
            return {"lease": lease.id, "emptied_queues": [], "signalled": signalled, "holder_pid": lease.pid,
                    "ended": True}
        prog = self.programs.get(lease.ifindex)
        emptied = []
        if prog:
            for q in lease.queues:
                with contextlib.suppress(OSError):
                    if bpf.map_delete(prog.map_fd, q):
                        emptied.append(q)
        lease.revoked = True
        self.leases.record(lease)
        why_not = None
        if signal_name:
            why_not = _unsignallable(lease) or self.signal_holder(lease, signal_name)
        signalled = signal_name is not None and why_not is None
        said = {"not_signalled": why_not} if why_not else {}
        self.audit({"event": "revoke", "peer": by.as_dict() if by else None, "decision": "allow", "lease": lease.id,
                    "holder_pid": lease.pid, "emptied_queues": emptied, "signal": signal_name,
                    "signalled": signalled, **said})
        return {"lease": lease.id, "emptied_queues": emptied, "signalled": signalled, "holder_pid": lease.pid, **said}

    # ---- interfaces come and go ------------------------------------------------------------------------

    def link_event(self, ev: LinkEvent) -> None:
        old_name = self.names.get(ev.ifindex)
        if ev.removed:
            prog = self.programs.pop(ev.ifindex, None)
            if prog:
                prog.close()
            self.names.pop(ev.ifindex, None)
            for lease in self.leases.on_interface(ev.ifindex):
                self.leases.remove(lease.id)
                self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid,
                            "reason": f"interface {lease.ifname} removed"})
            if prog or old_name:
                self.audit({"event": "interface-removed", "ifindex": ev.ifindex, "interface": old_name})
            return
        if ev.name and old_name and ev.name != old_name:
            self.names[ev.ifindex] = ev.name
            for lease in self.leases.on_interface(ev.ifindex):
                lease.ifname = ev.name  # leases follow the ifindex; new grants follow policy by the new name
                self.leases.record(lease)
            self.audit({"event": "interface-renamed", "ifindex": ev.ifindex, "from": old_name, "to": ev.name})
        prog = self.programs.get(ev.ifindex)
        if prog and ev.xdp_prog_id is not None and ev.xdp_prog_id != prog.prog_id:
            self.programs.pop(ev.ifindex).close()
            self.audit({"event": "xdp-program-changed", "ifindex": ev.ifindex, "interface": ev.name or old_name,
                        "expected": prog.prog_id, "now": ev.xdp_prog_id or None,
                        "leases": [x.id for x in self.leases.on_interface(ev.ifindex)]})

    # ---- restart recovery -----------------------------------------------------------------------------

    def recover(self) -> list[Lease]:
        """Take back the leases a previous broker recorded whose holders still hold their sockets."""
        kept = []
        for lease in self.leases.load():
            why = self._stale(lease)
            if why:
                self.audit({"event": "lease-dropped", "lease": lease.id, "reason": why})
                if lease.kind == "map":
                    self._detach_map(lease)
                continue
            self.leases.adopt(lease)
            kept.append(lease)
            self.audit({"event": "lease-recovered", "lease": lease.id, "pid": lease.pid, "interface": lease.ifname,
                        "queues": list(lease.queues)})
        self.leases.compact()
        return kept

    def _stale(self, lease: Lease) -> str | None:
        alive = lease.holder_alive()
        if not alive and (lease.kind == "map" or lease.revoked):
            return f"holder pid {lease.pid} is gone"
        try:
            name = netdev.ifname(lease.ifindex)
        except netdev.NoSuchInterface:
            return f"interface {lease.ifname} (ifindex {lease.ifindex}) is gone"
        lease.ifname = name
        self.names[lease.ifindex] = name
        if lease.kind == "map":
            return None
        try:
            prog = self._program(lease.ifindex, name, netdev.queue_count(name))
        except Refused as e:
            return e.message
        if not xsk.occupied_slots(prog.map_fd, lease.queues):
            return "none of its queues holds a socket any more"
        if not alive:
            lease.orphaned = True  # passed on before the holder exited; polled until the sockets close
        return None

    def _status(self, peer: PeerInfo, req: proto.Status) -> bytes:
        admin = self.is_admin(peer)
        leases = [lease.as_dict() for lease in self.leases if admin or lease.uid == peer.uid]
        interfaces = []
        for p in self.programs.values():
            interfaces.append({"ifindex": p.ifindex, "interface": self.names.get(p.ifindex), "xdp_prog_id": p.prog_id,
                               "xdp_mode": p.mode, "map_entries": p.max_entries,
                               "leases": len(self.leases.on_interface(p.ifindex))})
        me = policy_peer(peer)
        held = self.holdings()
        usage = []
        for q in self.policy.quotas:
            for scope in quotas.scopes(q, me):
                used = quotas.usage(scope, held)
                usage.append({"quota": q.name, "scope": f"{scope[0]} {scope[1]}", "queues": used.queues,
                              "max_queues": q.max_queues, "umem": used.umem, "max_umem": q.max_umem})
        return proto.ok_reply("status", req.req_id, leases=leases, interfaces=interfaces, quotas=usage,
                              admin=admin)


def policy_peer(peer: PeerInfo) -> Peer:
    return Peer(peer.uid, peer.gids, peer.user, peer.groups)


def _memlock_of(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_MEMLOCK of a process, RLIM_INFINITY for unlimited."""
    with open(f"/proc/{pid}/limits") as f:
        limits = memlock_limits(f.read())
    if limits is None:
        raise OSError(errno.ENOENT, f"no memlock limit in /proc/{pid}/limits")
    soft, hard = (resource.RLIM_INFINITY if v is None else v for v in limits)
    return soft, hard


def _unsignallable(lease: Lease) -> str | None:
    """Why the lease's holder must not be signalled whatever its pid names now, or None."""
    if lease.orphaned:
        return (f"holder pid {lease.pid} has exited and its sockets live on in a process the broker cannot "
                "name: nothing was signalled")
    if lease.pid_start is None:
        return (f"the lease recorded no start time for holder pid {lease.pid}, so the holder cannot be told "
                "from a process that reused its pid: nothing was signalled")
    return None


def _all_queues(ifname: str) -> tuple[int, ...]:
    try:
        netdev.resolve(ifname)  # the exact name only: an altname's device is not the one the policy judges
    except netdev.NoSuchInterface:
        return (0,)  # judged as if for one queue; the grant then fails as no-such-interface
    return tuple(range(netdev.queue_count(ifname)))


def _refusal(e: BaseException, ifname: str, queue: int) -> BaseException:
    if isinstance(e, xsk.QueueBusy):
        return Refused("queue-busy", f"{ifname} queue {queue} is held by another socket")
    if isinstance(e, OSError):
        return Refused("kernel-error", f"{ifname} queue {queue}: {e.strerror or e}",
                       errno=errno.errorcode.get(e.errno or 0, str(e.errno)))
    return e


def _describe(req: proto.Grant) -> dict[str, Any]:
    return {"interface": req.interface, "queues": list(req.queues), "kind": req.kind,
            "umem_bytes": req.umem_bytes, "bind_mode": req.bind_mode, "memlock": req.memlock}
