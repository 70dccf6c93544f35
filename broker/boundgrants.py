"""Bound grants: the broker binds each socket to its queue itself. What the UMEM pool made ahead needs only a
slot and a bind; the rest is made on a worker (a large UMEM on one of the few that may pin for seconds). The bind
runs on a worker too (it takes rtnl, which any process can keep busy), and a queue still held by a released socket
is retried on the server's timer: the grant is a Deferred until its sockets are bound. Every failure undoes what
was made before it.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Any

from xskbroker.broker import squat
from xskbroker.broker.baregrants import BareGrants
from xskbroker.broker.core import Deferred, Outcome, Refused, refusal
from xskbroker.broker.kernel import BUSY_RETRY_SECONDS, Prepared, Program, QueueBusy
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.workers import Job
from xskbroker.policy import Holding, Rule
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import BoundSocket

# The event loop decodes, decides and replies; the kernel work of a bound grant (bind, and registration
# when the UMEM pool had no socket ready) runs on worker threads. Registering more than INLINE_UMEM (all
# the grant's sockets the pool could not give) is heavy: done on the few workers that may pin for seconds
# (1 GiB takes 2-3 s here), in a child process (broker.xsk.register_umem_apart), and limited per uid.
INLINE_UMEM = 4 << 20
# Large grants being made (running or queued for a worker) at once, in all and per uid: one user cannot
# keep every worker busy, and nobody can queue unbounded work.
MAX_JOBS = 16
INLINE_WAIT = 0.001  # seconds the loop may wait for a light job before deferring the grant
MAX_JOBS_PER_UID = 2
# A queue the kernel still holds this long after the last lease on it ended, its socket closed, is taken for a release
# the kernel is late to finish, not a squatter's (the grant itself waits BUSY_RETRY_SECONDS first)
FREED_LATELY = 10.0


class BoundGrants(BareGrants):
    def _make_bound(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome | Deferred:
        g = req.geometry
        # sockets the pool made ahead of time need only a slot and a bind; the others are made by a worker,
        # a heavy one (a large UMEM: seconds) by one of the few that may pin for long, in a child process
        heavy = (len(req.queues) - self.pool.ready(g)) * g.umem_size > INLINE_UMEM
        if heavy and (self.jobs[peer.principal] >= MAX_JOBS_PER_UID or self.jobs.total() >= MAX_JOBS):
            raise Refused(ErrorCode.GRANTS_IN_PROGRESS, f"the broker is already making {self.jobs.total()} large "
                          f"grants ({self.jobs[peer.principal]} for uid {peer.principal}); try again when one is done")
        ifindex, prog = self._target(req)
        ready = [self.pool.take(g, ifindex, wake=False) for _ in req.queues]  # taken for this grant: never pooled again
        prepared: list[Prepared] = []
        fresh: list[Prepared] = []  # claimed bare: the worker adds their UMEM
        bound: list[Prepared] = []  # bound by a worker
        waiting: list[Prepared] = []  # not bound yet (EBUSY: a released socket's queue, not free yet)
        where = [req.queues[0]]  # the queue a failure is about
        job: Job | None = None
        heavy_job = False
        deadline: float | None = None

        def abort(e: BaseException, queue: int) -> BaseException:
            now = self.clock()
            for p in bound:  # bound, then closed: the kernel lets go of its queue late, as after a lease's end
                self.freed[(ifindex, p.queue)] = (now, "")
            for p in prepared:  # a bound socket's close waits for a grace period
                p.abort(empty_slot=_open(prog), close=self.closer.close)
            for r in ready:
                if r is not None:  # untouched: still the pool's to give
                    self.pool.give_back(g, r)
            self.pool.refused(g, len(req.queues))
            self.pending.pop(id(prepared), None)
            if isinstance(e, OSError) and not isinstance(e, QueueBusy):
                self.net.forget_interface(ifindex)  # the kernel said no: perhaps the device changed unannounced
            return refusal(e, req.interface, queue)

        def work(job: Job) -> None:  # on a worker thread: nothing shared but these lists
            for p in fresh:
                if job.cancelled:
                    return
                where[0] = p.queue
                p.add_umem(g, apart=job.watch if heavy else None)
            rebind(job, prepared)

        def rebind(job: Job, which: list[Prepared]) -> None:  # the first bind too: zero-copy DMA-maps the UMEM
            for p in which:
                where[0] = p.queue
                if not job.cancelled and p.try_bind():
                    bound.append(p)

        def undo() -> None:  # a cancelled job, once the worker is done with it (on the worker)
            for p in prepared:
                p.abort(empty_slot=False)

        def job_over() -> None:
            nonlocal job, heavy_job
            if heavy_job:
                self.jobs[peer.principal] -= 1
                if not self.jobs[peer.principal]:
                    del self.jobs[peer.principal]
                heavy_job = False
            job = None

        try:
            for i, q in enumerate(req.queues):
                where[0] = q
                r, ready[i] = ready[i], None
                if r is None:
                    fresh.append(self.kernel.claim(ifindex, q, prog.map_fd, req.bind_mode, req.need_wakeup))
                    prepared.append(fresh[-1])
                else:
                    try:
                        prepared.append(self.kernel.claim_ready(r, ifindex, q, prog.map_fd, req.bind_mode,
                                                                req.need_wakeup))
                    except QueueBusy:
                        ready[i] = r  # left as it was: back to the pool with the others
                        raise
        except BaseException as e:
            raise abort(e, where[0]) from None
        # Claimed slots and pinned UMEM count against the quota from now on, while workers bind (and
        # make what the pool had not) and while a queue's deferred release is waited for on the timer.
        self.pending[id(prepared)] = Holding(peer.principal, peer.gids, peer.groups, len(req.queues), req.pinned_bytes)
        job = self._submit(Job(work, undo), heavy)
        if heavy:
            heavy_job = True
            self.jobs[peer.principal] += 1
        else:
            deadline = self.clock() + BUSY_RETRY_SECONDS
        checked = False  # whether a squatter was looked for
        # the queues the kernel says are bound, once a worker has looked (None: it cannot tell); the look
        # dumps the device's queues, which takes rtnl: never on the loop
        looked: list[set[int] | None] = []

        def look(job: Job) -> None:  # on a worker
            try:
                looked.append(self.kernel.bound_queues(ifindex))
            except OSError:
                looked.append(None)

        def step() -> Outcome | None:
            nonlocal job, deadline, checked
            if job is None:  # the retry timer: the binds again, on a worker
                job = self._submit(Job(lambda j: rebind(j, list(waiting)), undo), False)
                return None
            if not job.done:
                return None
            error, was_heavy = job.error, heavy_job
            job_over()
            if error is not None:
                raise abort(error, where[0]) from None
            if looked:  # the wait is over: refused, saying why the queue stayed busy
                raise abort(self._squatted(req.interface, prog, waiting[0].queue, looked[0]), waiting[0].queue)
            waiting[:] = [p for p in prepared if p not in bound]
            if not waiting:
                self.pending.pop(id(prepared), None)
                if not _open(prog):  # its map steers nothing on the interface now: the sockets would receive nothing
                    raise abort(Refused(ErrorCode.KERNEL_ERROR, f"the XDP program on {req.interface} was detached or "
                                        "replaced while the grant was being made; nothing was granted, try again"),
                                where[0]) from None
                return self._finish_bound(peer, req, ifindex, prog, prepared)
            if not checked or was_heavy:  # a bare socket squatting the queue will not let go: no point waiting
                checked = True
                for p in waiting:
                    culprit = self.squat.culprit(prog, self.leases.on_interface(prog.ifindex), p.queue)
                    if culprit:
                        raise abort(Refused(ErrorCode.QUEUE_SQUATTED, squat.squatter_message(
                            req.interface, p.queue, culprit), lease=culprit.id), p.queue)
                # the wait for a release starts when the sockets are made: at once, or after a large pin
                if deadline is None or was_heavy:
                    deadline = self.clock() + BUSY_RETRY_SECONDS
            if deadline is not None and self.clock() >= deadline:
                job = self._submit(Job(look, undo), False)  # undone like a bind if the broker stops meanwhile
            return None

        def cancel() -> None:  # the broker is stopping: the wait ends with nothing made
            if job is not None:  # a worker may still be at work: it undoes the job when it is done
                job.cancel()
                job_over()
                self.pending.pop(id(prepared), None)
                return
            abort(OSError(errno.ECANCELED, "the broker is stopping"), req.queues[0])

        deferred = Deferred(step, cancel, parked=lambda: job is not None and not job.done,
                            ready=lambda: job is not None and job.done)
        # A light job (a bind of sockets the pool made, a small registration) is usually done within
        # INLINE_WAIT: wait for it here (the GIL is released meanwhile) and answer at once, saving the
        # worker's wake-up of the loop, a select round and the connection's unregister/register. The loop
        # is held at most INLINE_WAIT: a bind stuck behind the kernel's rtnl lock waits on the timer instead.
        # Not when other clients' events wait in this round: the loop serves them while the worker binds.
        if job is not None and not heavy and not self.loop_busy and job.wait(INLINE_WAIT):
            return step() or deferred
        return deferred

    def _submit(self, job: Job, heavy: bool) -> Job | None:
        """Hand a grant's kernel work to a worker (typed Optional: the grant's job is None between jobs)."""
        return self.workers.submit(job, heavy=heavy)

    def _squatted(self, ifname: str, prog: Program, queue: int, bound: set[int] | None) -> BaseException:
        """Why a queue stayed EBUSY: a bare socket bound off its lease, a stranger's socket, or a slow release.
        bound: the queues the kernel said were bound (a worker asked it), None when it could not tell."""
        culprit = self.squat.culprit(prog, self.leases.on_interface(prog.ifindex), queue)
        if culprit or (bound is not None and queue in bound):
            freed = None if culprit else self.freed.get((prog.ifindex, queue))
            if freed is not None and (age := self.clock() - freed[0]) < FREED_LATELY:
                # the kernel says the queue still has a socket's pool, and the last lease on it ended with its
                # socket closed: that release has not finished (it is deferred, and a busy system runs it late).
                # Not a squatter, which would send an operator after a process that does not exist.
                # no lease id: a grant refused after binding it closed its socket
                who = f"lease {freed[1]} ended on it" if freed[1] else "a grant refused on it closed its socket"
                return Refused(ErrorCode.QUEUE_BUSY, f"{ifname} queue {queue} is still being let go of by the "
                               f"kernel: {who} {age:.1f} s ago with its socket closed, and "
                               f"the kernel has not finished releasing that socket after {BUSY_RETRY_SECONDS} s "
                               "(it defers that work; a busy system runs it late); try again shortly",
                               errno="EBUSY", **({"lease": freed[1]} if freed[1] else {}))
            return Refused(ErrorCode.QUEUE_SQUATTED, squat.squatter_message(ifname, queue, culprit), errno="EBUSY",
                           **({"lease": culprit.id} if culprit else {}))
        return OSError(errno.EBUSY, f"still bound by a released socket after {BUSY_RETRY_SECONDS} s")

    def _finish_bound(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: Program,
                      prepared: list[Prepared]) -> Outcome:
        made: list[Any] = []
        try:
            for p in prepared:
                made.append(p.finish())
            fds: list[int] = []
            sockets = []
            for s in made:
                sockets.append(BoundSocket.of(s.queue, len(fds), len(fds) + 1, s.bind_flags, s.zerocopy,
                                              req.geometry))
                fds += [s.xsk_fd, s.umem_fd]
            return self._lease(peer, req, ifindex, prog, fds, sockets=tuple(sockets))
        except BaseException:  # nothing granted: no slot, socket or memfd left (closes wait for a grace period)
            now = self.clock()
            for p in prepared:  # all bound, then closed: their queues are let go of late (_squatted)
                self.freed[(ifindex, p.queue)] = (now, "")
            for p in prepared[len(made):]:
                p.abort(empty_slot=_open(prog), close=self.closer.close)
            for s in made:
                with contextlib.suppress(OSError):
                    if _open(prog):
                        self.kernel.map_delete(prog.map_fd, s.queue)
                self.closer.close([s.xsk_fd, s.umem_fd])
            raise


def _open(prog: Program) -> bool:
    """Whether the grant's program still has its map fd. A program dropped while the grant waited (its interface
    removed, another program attached) closed it, and the number may be another map's since: emptying a slot
    through it would take a live lease's socket out. The closing socket leaves its slot by itself."""
    return prog.map_fd >= 0
