"""Making grants: the policy's decision, the quota, the interface and its XSK program, then the kernel work of
each kind (broker.boundgrants, broker.baregrants, broker.mapgrants) and the lease it is recorded as.

A grant that waits for the kernel (a queue released late, a large UMEM pinned on a worker) is a Deferred the
server steps on a timer; its quota is charged meanwhile. Every failure undoes what was made before it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

from xskbroker.broker.boundgrants import INLINE_WAIT, BoundGrants
from xskbroker.broker.core import Deferred, Outcome, Refused, policy_peer, quota_peer, then
from xskbroker.broker.kernel import (
    BUSY_RETRY_SECONDS,
    ForeignProgram,
    NoSuchInterface,
    NotCanonical,
    Program,
    bpf_blocked,
)
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.peer import PeerInfo, cgroup_of
from xskbroker.broker.workers import Job
from xskbroker.policy import Holding, Request, Rule, decide
from xskbroker.policy import quota as quotas
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import GrantReply

# how long a grant over quota waits for a lease released with its sockets open to end: the broker's own copies of
# them close within milliseconds of the release; a holder that kept them keeps the charge
RELEASE_SETTLE_SECONDS = 0.1


class Grants(BoundGrants):
    def _grant(self, peer: PeerInfo, req: proto.Grant) -> Outcome | Deferred:
        """A grant whose interface's queue count is not known asks the kernel on a worker first: ethtool's
        channels ioctl takes rtnl, which any process can keep busy, and the count is forgotten at every link
        event (a host that makes and removes links is the one whose rtnl is busy)."""
        if not self._count_needed(req):
            return self._grant_now(peer, req)
        started = time.perf_counter()
        name = req.interface
        got: list[int | OSError] = []

        def count(job: Job) -> None:  # on a worker
            try:
                got.append(self.kernel.queue_count(name))
            except OSError as e:
                got.append(e)  # raised where the loop would have asked the kernel itself

        job = self.workers.submit(Job(count, lambda: None), heavy=False)
        inner: list[Deferred] = []

        def counted() -> Outcome | Deferred:
            self.counted[name] = got[0]  # read by _queue_count during this call only: the loop runs nothing between
            try:
                return self._grant_now(peer, req, started)
            finally:
                self.counted.pop(name, None)

        def step() -> Outcome | None:
            if inner:
                return inner[0].step()
            if not job.done:
                return None
            made = counted()
            if isinstance(made, Outcome):
                return made
            inner.append(made)
            return made.step() if made.ready() else None

        def cancel() -> None:
            if inner:
                inner[0].cancel()
            else:
                job.cancel()  # nothing made yet: the count is dropped

        if not self.loop_busy and job.wait(INLINE_WAIT):  # usually done at once: answered without a timer round
            return counted()
        return Deferred(step, cancel, parked=lambda: inner[0].parked() if inner else not job.done,
                        ready=lambda: inner[0].ready() if inner else job.done)

    def _count_needed(self, req: proto.Grant) -> bool:
        """Whether the grant needs the interface's queue count from the kernel: not remembered (or it would
        refuse a requested queue, which a remembered count never does). False for a name that is no interface's,
        which is refused without it (if_nametoindex and if_indextoname take no rtnl)."""
        if req.interface in self.counted:
            return False
        if self.link_events:
            self.link_sync()
        ifindex = self.net.ifindex.get(req.interface) if self.link_events else None
        if ifindex is None:
            try:
                ifindex = self.kernel.resolve(req.interface)
            except NoSuchInterface:
                return False
        known = self.net.queues.get(ifindex) if self.link_events else None
        return known is None or any(q >= known for q in req.queues)

    def _queue_count(self, name: str) -> int:
        """The queue count a worker just read for this grant, else the kernel's (on the loop: see _grant)."""
        counted = self.counted.get(name)
        if counted is None:
            return self.kernel.queue_count(name)
        if isinstance(counted, OSError):
            raise counted
        return counted

    def _grant_now(self, peer: PeerInfo, req: proto.Grant, started: float | None = None) -> Outcome | Deferred:
        if started is None:  # the audit's ms: from the request, a queue count read first included
            started = time.perf_counter()
        record: dict[str, Any] = {"event": "grant", "peer": peer.as_dict(), "request": describe(req)}
        # a map grant is judged on every queue of the device (a deny on any of them applies)
        queues = req.queues or self._all_queues(req.interface)
        who = policy_peer(peer)
        asked = Request(req.interface, queues, req.kind, req.pinned_bytes)
        judged_under = self.policy
        decision = decide(judged_under, who, asked)
        record["rule"] = decision.rule.name if decision.rule else None
        rule_now = decision.rule

        def rejudged() -> Rule | None:
            # a grant that waited (a queue let go of late, a large pin) across a reload is judged again before its
            # lease is made, as it was first: a deny (or a rule taken away) and a quota added or tightened in the
            # policy now in force win over the old decision; what it makes (a memlock raise) follows the new rule
            nonlocal judged_under, rule_now
            if self.policy is judged_under:
                return rule_now
            again = decide(self.policy, who, asked)
            record["rule"] = again.rule.name if again.rule else None
            if not again.allowed or again.rule is None:
                raise Refused(ErrorCode(again.code), f"{again.reason} (the policy was reloaded while the grant "
                              "waited; nothing was granted)")
            try:
                within_quota()  # its own charge while it waited is no longer pending: counted once, here
            except Refused as e:
                raise Refused(e.code, f"{e.message} (the policy was reloaded while the grant waited; nothing was "
                              "granted)") from None
            judged_under, rule_now = self.policy, again.rule
            return rule_now

        self.judged[id(req)] = (req, rejudged)

        def settle(result: Outcome | Deferred | None = None, refused: Refused | None = None) -> Outcome:
            self.judged.pop(id(req), None)
            ms = round((time.perf_counter() - started) * 1000, 3)
            if refused is not None:
                record.update(decision="deny", code=refused.code, reason=refused.message, ms=ms)
                self.audit(record)
                return Outcome(refused.reply("grant", req.req_id))
            assert isinstance(result, Outcome)
            record.update(decision="allow", code="ok", lease=result.lease_id, ms=ms)
            self.audit(record)
            return result

        def within_quota() -> None:
            # a map grant holds every queue of the device: it counts them all (req.queues is empty)
            over = quotas.check(self.policy, quota_peer(peer), self.holdings(), queues=len(queues),
                                umem=req.pinned_bytes)
            if over and self.releases_closed():  # released leases whose sockets closed since hold nothing
                over = quotas.check(self.policy, quota_peer(peer), self.holdings(), queues=len(queues),
                                    umem=req.pinned_bytes)
            if over:
                record["quota"] = over.reason
                raise Refused(ErrorCode(over.code), over.reason)

        def make() -> Outcome | Deferred:
            assert decision.rule is not None
            holder = self._holder(peer, req.holder_pid) if req.holder_pid else peer
            maker = {"bound": self._make_bound, "bare": self._make_bare, "map": self._make_map}[req.kind]
            try:
                return maker(holder, req, decision.rule)
            except Refused as e:
                # a released lease's socket still in the queue's slot: maybe only the broker's copy, closing now
                released = self._released_on(req) if e.code == ErrorCode.QUEUE_BUSY else None
                if released is None:
                    raise
                return self._charged(peer, req, len(queues), self._slots_freed(released, req), make)

        try:
            if not decision.allowed or decision.rule is None:
                raise Refused(ErrorCode(decision.code), decision.reason)
            try:
                within_quota()
            except Refused:
                # a lease released a moment ago may still have open sockets that are only the broker's own
                # copies, closing now: judge again shortly rather than refuse (the loop is not held meanwhile)
                if not self.leases.released_lately(time.time(), RELEASE_SETTLE_SECONDS):
                    raise
                result: Outcome | Deferred = then(self._settled(within_quota), make)
            else:
                result = make()
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

    def _settled(self, check: Callable[[], None]) -> Callable[[], bool]:
        """check() passes (True), fails for good (raises), or is worth a retry (False) while a release settles,
        for up to RELEASE_SETTLE_SECONDS (others' releases must not keep it waiting)."""
        deadline = self.clock() + RELEASE_SETTLE_SECONDS

        def step() -> bool:
            try:
                check()
            except Refused:
                if self.clock() < deadline and self.leases.released_lately(time.time(), RELEASE_SETTLE_SECONDS):
                    return False
                raise
            return True
        return step

    def _charged(self, peer: PeerInfo, req: proto.Grant, nqueues: int, ready: Callable[[], bool],
                 make: Callable[[], Outcome | Deferred]) -> Deferred:
        """then(ready, make), the grant counted against the quota while it waits, as a bound grant waiting for
        its binds is: its quota was judged before the wait, and another grant of the same principal decided
        meanwhile must see it (else the two together exceed the quota). make() counts its own."""
        token = [req]
        self.pending[id(token)] = Holding(peer.principal, peer.gids, peer.groups, nqueues, req.pinned_bytes)

        def charged() -> bool:
            try:
                done = ready()
            except BaseException:
                self.pending.pop(id(token), None)
                raise
            if done:
                self.pending.pop(id(token), None)
            return done

        waiting = then(charged, make)
        cancel = waiting.cancel

        def cancelled() -> None:
            self.pending.pop(id(token), None)
            cancel()

        waiting.cancel = cancelled
        return waiting

    def _released_on(self, req: proto.Grant) -> Lease | None:
        """A lease released with its sockets open that holds one of the requested queues."""
        wanted = set(req.queues)
        settling = (x for x in map(self.leases.get, self.leases.settling) if x is not None)
        return next((x for x in (*self.leases.released(), *settling)
                     if x.ifname == req.interface and wanted.intersection(x.queues)), None)

    def _slots_freed(self, lease: Lease, req: proto.Grant) -> Callable[[], bool]:
        """Whether the released lease's sockets closed (it ends, and the grant is made again), for up to
        BUSY_RETRY_SECONDS; then the grant is refused naming it."""
        deadline = self.clock() + BUSY_RETRY_SECONDS

        def freed() -> bool:
            self.releases_closed()
            if self.leases.get(lease.id) is None:
                return True
            if self.clock() < deadline:
                return False
            queue = next(q for q in req.queues if q in lease.queues)
            raise Refused(ErrorCode.QUEUE_BUSY, f"{req.interface} queue {queue} is still bound by a socket of lease "
                          f"{lease.id}, which its holder (pid {lease.pid}) released but keeps open; it is free "
                          "once that socket is closed", lease=lease.id)
        return freed

    def _all_queues(self, ifname: str) -> tuple[int, ...]:
        try:
            self.kernel.resolve(ifname)  # the exact name only: an altname's device is not the one the policy judges
        except NoSuchInterface:
            return (0,)  # judged as if for one queue; the grant then fails as no-such-interface
        return tuple(range(self._queue_count(ifname)))

    def _holder(self, peer: PeerInfo, pid: int) -> PeerInfo:
        """The process a launcher hands the sockets to (QEMU behind a QMP socket): it must be the
        requester's own (same real uid), so nobody can pin a lease or a memlock raise on someone else's.
        The process is pinned by a pidfd first: its uid and start time are then read from the process
        itself, never from one that took its pid in between."""
        try:
            found = self.kernel.holder(pid)
        except OSError as e:
            raise _unpinnable(pid, e) from None
        if found is None:
            raise Refused(ErrorCode.BAD_HOLDER, f"holder_pid {pid} is not a running process")
        uid, start, ino = found
        admin = self._admin(peer)
        if uid != peer.uid and not admin:
            raise Refused(ErrorCode.BAD_HOLDER,
                          f"holder_pid {pid} belongs to uid {uid}, not to the requester (uid {peer.uid})")
        # same uid is not enough: another VM of the same user is another principal (its own cgroup). A requester
        # pinned (start known) whose cgroup is unknown all the same (its /proc/PID/cgroup failed, or has no v2
        # line) may name only a holder whose cgroup is unknown too. Without SO_PEERPIDFD (no start) no
        # requester's cgroup is ever known, and there is nothing to compare.
        judged = not admin and (peer.cgroup is not None or peer.start is not None)
        try:
            theirs = cgroup_of(pid, start) if judged else None
        except OSError as e:
            raise _unpinnable(pid, e) from None
        if judged and theirs != peer.cgroup:
            mine = peer.cgroup if peer.cgroup is not None else "unknown: the kernel would not give its path"
            raise Refused(ErrorCode.BAD_HOLDER, f"holder_pid {pid} is not in the requester's cgroup "
                          f"({mine}): only a process of its own cgroup may hold its lease")
        # the lease stays the REQUESTER's (its identity was judged); only pid, start and inode are the holder's
        return PeerInfo(pid, peer.uid, peer.gid, peer.gids, peer.user, peer.groups, peer.exe, peer.cgroup, start, ino,
                        peer.label, peer.owner)

    def _checked(self, req: proto.Grant) -> tuple[int, int]:
        """The interface's index and queue count, after every check that changes nothing in the kernel:
        the name is the interface's own (the one the policy judged), every requested queue exists, and no
        map lease holds a requested queue (its socket is in the tenant's map, where claim() cannot see it)."""
        ifindex, nqueues = self._interface(req.interface)
        if any(q >= nqueues for q in req.queues) and nqueues == self.net.queues.get(ifindex):
            self.net.queues.pop(ifindex)  # a remembered count never refuses: ask the kernel again
            ifindex, nqueues = self._interface(req.interface)
        bad = [q for q in req.queues if q >= nqueues]
        if bad:
            raise Refused(ErrorCode.NO_SUCH_QUEUE, f"{req.interface} has {nqueues} queue(s) (0-{nqueues - 1}); "
                          f"queue {bad[0]} does not exist")
        for q in req.queues if req.kind != "map" else ():
            held = self.leases.holder(ifindex, q)
            if held and held.kind == "map" and self.exit_sync(held.pid):
                held = self.leases.holder(ifindex, q)  # its holder had exited: the lease may have ended
            if held and held.kind == "map":
                raise Refused(ErrorCode.QUEUE_BUSY, f"{req.interface} queue {q} is held by lease {held.id} (a map "
                              f"grant to uid {held.uid}) until it ends")
        return ifindex, nqueues

    def _interface(self, name: str) -> tuple[int, int]:
        """The ifindex of the interface whose own name is `name`, and its queue count: remembered between
        link events (broker.netcache) once the events the kernel has queued are read."""
        if self.link_events:
            self.link_sync()
        net = self.net if self.link_events else None
        ifindex = net.ifindex.get(name) if net else None
        if ifindex is None:
            try:
                ifindex = self.kernel.resolve(name)
            except NotCanonical as e:
                raise Refused(ErrorCode.NOT_CANONICAL_NAME, str(e), canonical=e.canonical) from None
            except NoSuchInterface as e:
                raise Refused(ErrorCode.NO_SUCH_INTERFACE, str(e)) from None
        nqueues = net.queues.get(ifindex) if net else None
        if nqueues is None:
            nqueues = self._queue_count(name)
        if net and self.link_events:  # still watched: link_sync may have lost the watch (an overrun)
            net.ifindex[name], net.queues[ifindex] = ifindex, nqueues
        return ifindex, nqueues

    def _still_named(self, name: str, ifindex: int) -> None:
        """The interface still bears the name the policy judged: a grant that waited (for a bind, a large pin) may see
        it renamed, and another interface given that name; its sockets would be on an interface the policy may refuse,
        and its lease named after another one."""
        if self.link_events:
            self.link_sync()
        if self.link_events:  # a rename or removal since is in names (set when the grant found the program)
            now: str | None = self.names.get(ifindex)
        else:
            try:
                now = self.kernel.ifname(ifindex)
            except NoSuchInterface:
                now = None
        if now != name:
            became = f"renamed {now!r}" if now else "removed"
            raise Refused(ErrorCode.NO_SUCH_INTERFACE, f"interface {name!r} (ifindex {ifindex}) was {became} while the "
                          "grant was being made; nothing was granted")

    def _target(self, req: proto.Grant) -> tuple[int, Program]:
        """The interface's index and XSK program (attached now if need be) once every check has passed."""
        ifindex, nqueues = self._checked(req)
        prog = self._program(ifindex, req.interface, nqueues)
        self.check_bare(prog)
        over = [q for q in req.queues if q >= prog.max_entries]
        if over:
            raise Refused(ErrorCode.NO_SUCH_QUEUE, f"the XSK program on {req.interface} has {prog.max_entries} "
                          f"map slots; queue {over[0]} is beyond it (the device grew after it was attached)")
        return ifindex, prog

    def _lease(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: Program, fds: list[int],
               queues: tuple[int, ...] | None = None, raised: tuple[int, int, int, int] | None = None,
               **fields: Any) -> Outcome:
        # recorded (and persisted) before the fds leave: a crash after this line leaves a record that
        # recovery checks against the kernel, never a socket nobody accounts for
        # Holders are watched and ended by pid: an earlier holder of this pid that has exited, its exit not yet
        # read by the loop, is ended now, or that exit would end (or orphan) this lease and leave it unwatched
        self._rule_now(req, None)
        self._still_named(req.interface, ifindex)
        self.exit_sync(peer.pid)
        # named as the policy in force names them: a grant that waited (for a bind, a large pin) across a reload
        # has the groups its peer was named with before it, and a quota of a group first named then never counted it
        groups = self.groups_of(peer.gids) if self.groups_of is not None else peer.groups
        try:
            lease = self.leases.add(peer.uid, peer.pid, ifindex, req.interface, queues or req.queues, req.kind,
                                    req.pinned_bytes, tuple(sorted(peer.gids)), tuple(sorted(groups)),
                                    peer.start, peer.ino, peer.cgroup, peer.principal, raised)
        except OSError as e:  # a lease that cannot be recorded is not granted (the caller undoes what it made)
            raise Refused(ErrorCode.KERNEL_ERROR, f"{e.strerror}; nothing was granted",
                          errno=errno.errorcode.get(e.errno or 0, str(e.errno))) from None
        try:
            self.fault("after-lease-saved")
            reply = GrantReply(lease.id, req.kind, req.interface, ifindex, prog.mode, prog.prog_id,
                               holder_pid=peer.pid, req_id=req.req_id, **fields)
        except BaseException:  # not granted after all: the lease ends (journaled) as the caller undoes its sockets
            self.leases.remove(lease.id)
            raise
        return Outcome(reply, fds, lease.id, peer.pid, keep=req.kind == "bound")

    def _program(self, ifindex: int, ifname: str, nqueues: int) -> Program:
        """The cached XSK program of the interface, re-found when someone changed what is attached."""
        cached = self.programs.get(ifindex)
        if cached and self.link_events:
            return cached
        try:
            current = self.kernel.attached(ifindex)
            if cached and cached.prog_id == current:
                return cached
            if cached:
                cached.close()
                del self.programs[ifindex]
            prog = self.kernel.find_or_attach(ifindex, ifname, nqueues, self.xdp_mode)
        except ForeignProgram as e:
            raise Refused(ErrorCode.XDP_FOREIGN_PROGRAM, e.strerror or str(e)) from None
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno in (errno.EPERM, errno.ENOSYS) and bpf_blocked():
                why = (f"bpf() is not permitted here: a seccomp filter refuses it ({why}); allow the bpf system "
                       "call (SystemCallFilter=bpf, systemd-nspawn --system-call-filter=bpf, a container's profile)")
            raise Refused(ErrorCode.XDP_ATTACH_FAILED, why) from None
        self.programs[ifindex] = prog
        self.names[ifindex] = ifname
        if prog.attached_now:
            self.audit({"event": "xdp-attach", "interface": ifname, "ifindex": ifindex, "prog_id": prog.prog_id,
                        "mode": prog.mode, "map_entries": prog.max_entries})
        return prog


def describe(req: proto.Grant) -> dict[str, Any]:
    return {"interface": req.interface, "queues": list(req.queues), "kind": req.kind,
            "umem_bytes": req.umem_bytes, "bind_mode": req.bind_mode, "memlock": req.memlock}


def _unpinnable(pid: int, e: OSError) -> Refused:
    return Refused(ErrorCode.KERNEL_ERROR, f"cannot pin holder_pid {pid} with a pidfd ({e.strerror}): the broker is "
                   "short of file descriptors; try again later")
