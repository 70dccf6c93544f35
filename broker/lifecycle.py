"""How leases end and come back: release, holder exit and orphans, revoke, interfaces that change, and
recovery from the journal a previous broker left. Whatever a lease did outside the table (a map grant's
program, a raised memlock limit) is undone in _lease_ended, however the lease ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

from xskbroker.broker.core import MemlockRaise, Outcome, Refused
from xskbroker.broker.holders import same_process
from xskbroker.broker.kernel import NoSuchInterface
from xskbroker.broker.lease_record import Lease, MemlockRaiseRecord
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.broker.mapgrants import MapGrants
from xskbroker.broker.peer import PeerInfo
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import ErrorReply, ReleaseReply, RevokedLease

SETTLE_STEP = 0.003  # seconds between looks at a lease released while the broker's copies were closing
SETTLE_MAX = 0.05  # how long those copies may take to close (their helper runs late on a busy CPU)
FREED_MAX = 4096  # (interface, queue) pairs remembered as let go of lately (Service.freed)


class Lifecycle(MapGrants):
    def abort(self, lease_id: str) -> None:
        """The reply carrying a lease's fds never reached the client: forget the lease, and empty its slots
        now: the sockets in them close on a closer thread, and the queue must be free for the next grant."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        self._empty_slots(lease)
        self.leases.remove(lease_id)
        self.audit({"event": "lease-aborted", "lease": lease_id})

    def _empty_slots(self, lease: Lease) -> list[int]:
        """Take a bound or bare lease's sockets out of its map slots (a map lease's map is unplugged as it ends): the
        slots it holds only, as the table says. A revoked misbound lease stays, and the slot its revoke emptied may be
        another lease's since, with that lease's socket in it. The queues emptied."""
        prog = self.programs.get(lease.ifindex)
        if prog is None or lease.kind == "map":
            return []
        emptied = []
        for q in lease.queues:
            if self.leases.holder(lease.ifindex, q) is lease:
                with contextlib.suppress(OSError):
                    if self.kernel.map_delete(prog.map_fd, q):
                        emptied.append(q)
        return emptied

    def _release(self, peer: PeerInfo, req: proto.Release) -> Outcome:
        lease = self.leases.get(req.lease)
        # another cgroup of the same uid (another VM) is told the same as a stranger: no such lease of its own
        if lease is None or (not lease.owned_by(peer.uid, peer.cgroup) and not self._admin(peer)):
            whose = f"uid {peer.uid}" + (f" in cgroup {peer.cgroup}" if peer.cgroup is not None else "")
            return Outcome(ErrorReply(ErrorCode.UNKNOWN_LEASE, f"no lease {req.lease!r} held by {whose}",
                                      "release", req.req_id))
        if req.if_closed and not self._slots_empty(lease):
            return Outcome(ErrorReply(ErrorCode.LEASE_IN_USE, f"lease {lease.id} still has open sockets in its "
                                      "map slots", "release", req.req_id))
        if lease.kind == "map" or not self._still_held(lease):  # a revoked lease's emptied slots say nothing
            return Outcome(self._end_released(peer, req, lease))
        # A socket is still in a slot. The kernel cannot close the holder's, and a queue and UMEM kept bound must
        # stay on its quota: the lease lingers, its slots kept (their emptying is how the close is seen), until
        # they close or a new grant binds its queues. It may be only the broker's own copy, kept a moment after
        # the reply (or already closing): that closes now, and the lease is looked at again shortly
        # (settle_releases). The reply does not wait: the helper that closes the copy can take milliseconds to
        # run (grant+release, 1 client: 131/s against 1,770/s when the release waited for it).
        self.sent_done(lease.id)
        if lease.released_at is None and lease.id not in self.leases.settling:
            now = self.clock()
            self.leases.settling[lease.id] = (now + SETTLE_STEP, now + SETTLE_MAX)
        self.audit({"event": "release", "peer": peer.as_dict(), "lease": lease.id})
        return Outcome(ReleaseReply(lease.id, req_id=req.req_id))

    def settle_releases(self, now: float, all_due: bool = False) -> bool:
        """Look at the leases released (or whose holder exited) while the broker's copies of their sockets were
        closing, those due (all of them with all_due): one whose slots are empty ends (as its release said, or as
        its holder's exit); one whose sockets are still open after SETTLE_MAX is kept, released (or an orphan).
        True if any ended."""
        ended = False
        for lease_id, (due, last) in list(self.leases.settling.items()):
            lease = self.leases.get(lease_id)
            if lease is None or (due > now and not all_due):
                continue
            if not self._still_held(lease):
                if lease.orphaned:  # its holder exited, and only the broker's copy was left
                    self._exit_ended(lease)
                else:
                    self.leases.remove(lease_id)
                ended = True
            elif now >= last:
                del self.leases.settling[lease_id]
                if lease.orphaned:
                    self.audit({"event": "lease-orphaned", "lease": lease.id, "pid": lease.pid,
                                "reason": "holder exited but its sockets are still open elsewhere"})
                else:
                    self._keep_released(lease, {})
            else:
                self.leases.settling[lease_id] = (now + SETTLE_STEP, last)
        return ended

    def releases_closed(self) -> bool:
        """Look at every released lease now, settling or kept: those whose sockets have closed end. True if any."""
        settled = self.settle_releases(self.clock(), all_due=True)
        return self.end_closed_releases() or settled

    def poll_seconds(self, orphans: float) -> float | None:
        """Seconds until leases that no event tells about are looked at (None: none are): released ones being
        settled soon (settled here when due), orphaned, released and bare ones every `orphans` seconds."""
        if self.leases.settling:
            now = self.clock()
            self.settle_releases(now)
            if self.leases.settling:  # looked at when the loop runs anyway; woken for it only at the last look
                return max(0.0, min(last for _, last in self.leases.settling.values()) - now)
        return orphans if self.leases.lingers() or self.leases.has_bare() else None

    def _keep_released(self, lease: Lease, said: dict[str, Any]) -> None:
        """The lease stays, released, on its quota: its holder keeps its sockets open."""
        if lease.released_at is None:
            self.leases.keep_released(lease, time.time())
            self.leases.record(lease)
        self.audit({"event": "release-kept", **said, "lease": lease.id, "pid": lease.pid,
                    "reason": "released with its sockets still open: it holds its queues and counts against its "
                              "quota until they are closed"})

    def _end_released(self, peer: PeerInfo, req: proto.Release, lease: Lease) -> ReleaseReply:
        self._empty_slots(lease)
        self.leases.remove(lease.id)
        self.audit({"event": "release", "peer": peer.as_dict(), "lease": lease.id})
        return ReleaseReply(lease.id, req_id=req.req_id)

    def end_closed_releases(self) -> bool:
        """End the released leases whose sockets have closed since (their slots are empty); True if any."""
        ended = False
        for lease in self.leases.released():
            if not self._still_held(lease):  # kept, closed (or revoked since)
                self.leases.remove(lease.id)
                self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid,
                            "reason": "its sockets were closed after its release"})
                ended = True
        return ended

    def _lease_ended(self, lease: Lease) -> None:
        """Undo what a lease did outside the table, however it ended (release, exit, revoke, link gone)."""
        self.sent_done(lease.id)
        if not lease.revoked and lease.kind != "map":  # a revoked lease's socket may live on, bound (a squatter)
            if len(self.freed) >= FREED_MAX:
                self.freed.clear()  # what it loses is only the wording of a refusal
            now = self.clock()
            for q in lease.queues:
                self.freed[(lease.ifindex, q)] = (now, lease.id)
        if lease.kind == "map":
            self._end_map(lease)
        key = (lease.pid, lease.pid_start, lease.pid_ino)
        raised = self.raised.get(key)
        if raised and lease.id in raised.leases:
            raised.leases.discard(lease.id)
            # a grant that rests on this raise ends the lease that held its slot (LeaseTable.add) before it joins the
            # raise: a live lease of this process recorded with a raise (memlock) keeps it
            raised.leases.update(x.id for x in self.leases.of_pid(lease.pid)
                                 if x.memlock is not None and (x.pid_start, x.pid_ino) == key[1:])
            if not raised.leases:
                del self.raised[key]
                self._restore_memlock(key, raised)

    def _restore_memlock(self, key: tuple[int, int | None, int | None], raised: MemlockRaise) -> None:
        pid, start, ino = key
        try:
            if not self.kernel.holder_alive(pid, start, ino):
                return
            if self.kernel.memlock(pid) != raised.now:  # changed since by someone else: theirs to keep
                return
            self.kernel.set_memlock(pid, raised.before)
        except OSError:
            return
        self.audit({"event": "memlock-restored", "pid": pid, "to": raised.before[0], "hard": raised.before[1]})

    def holder_exited(self, pid: int, start: int | None = None, ino: int | None = None) -> None:
        """A holder is gone. Its sockets usually died with it (and the kernel emptied their slots), but it
        may have passed them on (a launcher to QEMU over QMP): a slot still taken means they live on. With
        its start time and pidfs inode, only its own leases: another process may hold leases under its pid."""
        for lease in self.leases.of_pid(pid):
            if lease.orphaned or not same_process((lease.pid_start, lease.pid_ino), (start, ino)):
                continue
            if self._still_held(lease):
                # Held by no pid from now on. It may be only the broker's own copy, kept a moment after the reply:
                # that closes now, and the lease settles as a release does (settle_releases), so that a grant of its
                # quota or its queue made right after the exit (a VM restarted) waits those milliseconds instead of
                # being refused. Still held after SETTLE_MAX, it is an orphan: its sockets live on elsewhere.
                self.leases.orphan(lease)
                self.leases.record(lease)
                self.sent_done(lease.id)
                now = self.clock()
                self.leases.settling[lease.id] = (now + SETTLE_STEP, now + SETTLE_MAX)
                continue
            self._exit_ended(lease)

    def _exit_ended(self, lease: Lease) -> None:
        self.leases.remove(lease.id)
        self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid, "reason": "holder exited"})

    def check_orphans(self) -> None:
        """End the orphaned leases whose sockets have finally been closed, and the bare leases whose
        sockets were all closed while their holder lives (QEMU after netdev_del or a rolled-back attach):
        the holder gives no event then, and the lease would hold its queues and quota until it exits.
        Called periodically."""
        self.end_closed_releases()
        for lease in self.leases.orphaned():
            if lease.id in self.leases.settling:
                continue  # its holder exited a moment ago: settle_releases says how it ended
            if not self._still_held(lease):
                self.leases.remove(lease.id)
                self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid,
                            "reason": "its sockets were closed"})
        # A bare lease is ended only when its slots were empty at two polls in a row: a holder that closes its
        # sockets and then releases (the client library's order) must find its lease there to release.
        seen, self.bare_empty = self.bare_empty, set()
        for lease in list(self.leases):
            if lease.kind != "bare" or lease.orphaned or lease.revoked or not self._slots_empty(lease):
                continue
            try:
                if not self.kernel.holder_alive(lease.pid, lease.pid_start, lease.pid_ino):
                    continue  # its exit is being told (holder_exited ends the lease with the right reason)
            except OSError:
                continue  # cannot tell now (out of fds): the next poll looks again
            if lease.id not in seen:
                self.bare_empty.add(lease.id)
                continue
            self.leases.remove(lease.id)
            self.audit({"event": "lease-ended", "lease": lease.id, "pid": lease.pid,
                        "reason": "its sockets were closed while its holder lives"})

    def _occupied(self, lease: Lease, queues: Iterable[int]) -> list[int] | None:
        """Which of `queues`' slots on the lease's interface hold a socket; None when unknown (no program cached for
        the interface, or a failed read)."""
        prog = self.programs.get(lease.ifindex)
        if prog is None:
            return None
        try:
            return self.kernel.occupied_slots(prog.map_fd, queues)
        except OSError:
            return None

    def _slots_empty(self, lease: Lease) -> bool:
        """True only when the kernel says every slot of the lease is empty (an unknown program or a failed
        read says nothing: the lease is kept)."""
        return self._occupied(lease, lease.queues) == []

    def _still_held(self, lease: Lease) -> bool:
        # a revoked lease's slots were emptied on purpose: they tell nothing about its sockets, but a bare lease
        # revoked for a socket bound off its queue (bare-misbound, which its holder brings on itself) holds that
        # queue while the kernel says it is bound, and nobody's lease holds its slot since
        if lease.kind == "map":
            return False
        if lease.revoked:
            return lease.misbound is not None and self._misbound_still_bound(lease)
        return bool(self._occupied(lease, lease.queues))

    def _misbound_still_bound(self, lease: Lease) -> bool:
        assert lease.misbound is not None
        other = self.leases.holder(lease.ifindex, lease.misbound)
        # granted since and bound there: the kernel freed the queue for it. A bare grant's slot proves nothing
        # (granted with the queue still bound; its holder binds later): only its socket read bound to the queue.
        # Nor does a bound lease whose socket is no longer in its slot (closed while its holder lives: the lease
        # stays, and the squatter may have bound the queue after it)
        if other is not None and other.id != lease.id and self._bound_in_slot(other, lease.misbound):
            return False
        try:
            return lease.misbound in self.kernel.bound_queues(lease.ifindex)
        except OSError:
            return False  # unknown (no netdev queue attributes): as before, the revoke said nothing

    def _bound_in_slot(self, lease: Lease, queue: int) -> bool:
        """Whether the socket in the lease's slot for queue is bound to that queue: a bound lease's socket is, while
        it is in the slot; a bare one's when the slot probe says so."""
        if lease.kind == "bound":
            return bool(self._occupied(lease, [queue]))
        prog = self.programs.get(lease.ifindex)
        probe = self.squat.probe(prog) if prog is not None else None
        if probe is None:
            return False
        try:
            return probe.queue_of(queue) == queue
        except OSError:
            return False
        finally:
            probe.close()

    def revoke_lease(self, lease: Lease, by: PeerInfo | None, signal_name: str | None) -> RevokedLease:
        """Empty the lease's map slots so RX stops, and mark it revoked; it ends when the holder closes."""
        if lease.kind == "map":  # ends at once: its outer slots go back to the shared map, its fd steers nothing
            self.leases.remove(lease.id)
            why_not = self._signal(lease, signal_name)
            said = {"not_signalled": why_not} if why_not else {}
            signalled = signal_name is not None and why_not is None
            self.audit({"event": "revoke", "peer": by.as_dict() if by else None, "decision": "allow",
                        "lease": lease.id, "holder_pid": lease.pid, "ended": True, "signal": signal_name,
                        "signalled": signalled, **said})
            return RevokedLease(lease.id, (), signalled, lease.pid, ended=True, not_signalled=why_not or None)
        # journaled revoked before its slots are emptied: a broker killed between the two must not leave a journal
        # that says live a lease whose slots are empty (recovery drops that, and its holder's sockets live on
        # charged to nobody); recovery finishes a revoke it finds half done
        lease.revoked = True
        self.leases.record(lease)
        self.fault("mid-revoke")
        emptied = self._empty_slots(lease)
        why_not = self._signal(lease, signal_name)
        signalled = signal_name is not None and why_not is None
        said = {"not_signalled": why_not} if why_not else {}
        self.audit({"event": "revoke", "peer": by.as_dict() if by else None, "decision": "allow", "lease": lease.id,
                    "holder_pid": lease.pid, "emptied_queues": emptied, "signal": signal_name,
                    "signalled": signalled, **said})
        return RevokedLease(lease.id, tuple(emptied), signalled, lease.pid, not_signalled=why_not or None)

    def _signal(self, lease: Lease, signal_name: str | None) -> str | None:
        """Send the revoke signal to the lease's holder: None when sent (or none asked), else why not."""
        if not signal_name:
            return None
        return _unsignallable(lease) or self.signal_holder(lease, signal_name)

    # ---- interfaces come and go ------------------------------------------------------------------------

    def link_event(self, ev: LinkEvent) -> None:
        self.net.forget()  # names, queue counts, bind modes: any of them may have changed
        old_name = self.names.get(ev.ifindex)
        if ev.removed:
            # an interface moved to another namespace is removed here but lives on there, its program and map with
            # it: a socket left in a slot (unbound by the move, its lease ended) would hold that queue if it comes back
            for lease in self.leases.on_interface(ev.ifindex):
                self._empty_slots(lease)
            prog = self.programs.pop(ev.ifindex, None)
            if prog:
                prog.close()
            self._interface_gone(ev.ifindex)
            self.names.pop(ev.ifindex, None)
            self.pool.forget_interface(ev.ifindex)  # what it asked for is made ahead no more
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

    def relearn_links(self) -> None:
        """Link events were lost: the renames and removals they may have told of, for every interface the broker
        knows (its programs' and its leases'), are asked of the kernel. An interface removed and another given its
        ifindex since (moved in from another namespace, or made with that index) reads as a rename."""
        for lease in self.leases:
            self.names.setdefault(lease.ifindex, lease.ifname)
        for ifindex in sorted(self.names):
            try:
                name = self.kernel.ifname(ifindex)
            except NoSuchInterface:
                self.link_event(LinkEvent(True, ifindex, None, None))
                continue
            self.link_event(LinkEvent(False, ifindex, name, None))

    # ---- restart recovery -----------------------------------------------------------------------------

    def recover(self) -> list[Lease]:
        """Take back the leases a previous broker recorded whose holders still hold their sockets."""
        kept = []
        loaded = self.leases.load()
        if self.leases.load_refused is not None:
            # the broker starts with none of its leases (and compact() below writes a journal in its place): the
            # operator is told, or a lease forgotten shows only as a queue held by nobody the broker knows
            self.audit({"event": "lease-journal-refused", "reason": self.leases.load_refused,
                        "leases_recovered": 0})
        raises = _memlock_raises(loaded, self.leases.loaded_raises)
        # misbound leases last: a lease granted their queue since, taken back first, says the queue is not theirs
        for lease in sorted(loaded, key=lambda x: x.revoked and x.misbound is not None):
            try:
                why = self._stale(lease)
            except OSError as e:  # one lease the kernel will not tell about must not keep the broker from starting
                why = f"cannot be checked: {e.strerror or e}"
            if why:
                self.audit({"event": "lease-dropped", "lease": lease.id, "reason": why})
                if lease.kind == "map":
                    self._end_map(lease, recovered=True)
                continue
            self.leases.adopt(lease)
            kept.append(lease)
            if lease.memlock is not None:
                raises[(lease.pid, lease.pid_start, lease.pid_ino)].leases.add(lease.id)
            self.audit({"event": "lease-recovered", "lease": lease.id, "pid": lease.pid, "interface": lease.ifname,
                        "queues": list(lease.queues)})
        for key, raised in raises.items():  # kept with a lease that needs it, else restored as its last one ended
            if raised.leases:
                self.raised[key] = raised
            else:
                self._restore_memlock(key, raised)
        self.leases.compact()
        return kept

    def _stale(self, lease: Lease) -> str | None:
        try:
            alive = self.kernel.holder_alive(lease.pid, lease.pid_start, lease.pid_ino)
        except OSError:  # cannot tell (out of fds): judged as alive, so a live holder's lease is never dropped
            alive = True
        if lease.kind == "map":  # its tenant map was placed by the per-queue program of the broker that made it
            return "a map grant ends with the broker that made it (its bpf_link held the per-queue program)"
        misbound = lease.revoked and lease.misbound is not None
        gone = not alive and lease.revoked and not misbound
        with contextlib.suppress(OSError):  # no XDP program there: no slot of it to empty, and none attached for it
            if gone and not self.kernel.attached(lease.ifindex):
                return f"holder pid {lease.pid} is gone"
        try:
            name = self.kernel.ifname(lease.ifindex)
        except NoSuchInterface:
            return f"interface {lease.ifname} (ifindex {lease.ifindex}) is gone"
        lease.ifname = name
        self.names[lease.ifindex] = name
        try:
            prog = self._program(lease.ifindex, name, self.kernel.queue_count(name))
        except Refused as e:
            return e.message
        if lease.revoked:  # a revoke its broker was killed in the middle of is finished (journaled first)
            for q in lease.queues:  # a slot granted since (a misbound lease's) is another lease's now
                if self.leases.holder(lease.ifindex, q) is None:
                    with contextlib.suppress(OSError):
                        self.kernel.map_delete(prog.map_fd, q)
            if gone:
                return f"holder pid {lease.pid} is gone"
        if misbound:  # its revoke emptied its slots; its socket, bound off them, holds its queue while bound there
            if not self._misbound_still_bound(lease):
                return f"queue {lease.misbound}, its socket's, is bound no more"
        elif lease.revoked and lease.released_at is None:
            # its revoke emptied its slots, so they say nothing of its sockets: as before the restart, it lasts
            # until its holder (alive, or it was dropped above) releases or exits
            pass
        elif not self.kernel.occupied_slots(prog.map_fd, lease.queues):
            if not (alive and prog.attached_now and lease.released_at is None and self._bound_off_map(lease)):
                return "none of its queues holds a socket any more"
            self.audit({"event": "lease-unsteered", "lease": lease.id, "pid": lease.pid, "interface": name,
                        "queues": list(lease.queues),
                        "reason": "the XDP program that steered to its sockets went with the previous broker (its "
                                  "per-queue program); they are still bound, and receive nothing until closed"})
        if not alive:
            lease.orphaned = True  # passed on before the holder exited; polled until the sockets close
        return None

    def _bound_off_map(self, lease: Lease) -> bool:
        """Whether a live holder's queues are still bound although the interface had no program to hold its sockets
        in a slot (recovery attached one, with an empty map): the broker's per-queue program goes with the broker
        that linked it, and the sockets in its shared map stay bound. Unknown (no netdev queue attributes) counts
        as bound: the lease is kept until its holder releases or exits, rather than dropped off its quota."""
        try:
            bound = self.kernel.bound_queues(lease.ifindex)
        except OSError:
            return True
        return all(q in bound for q in lease.queues)


def _memlock_raises(leases: list[Lease], journaled: Iterable[MemlockRaiseRecord] = ()
                    ) -> dict[tuple[int, int | None, int | None], MemlockRaise]:
    """The memlock raises the journaled leases took part in, by process: the limit before the first raise (each
    lease of a process records that one) and the highest it was raised to (a later lease may have raised it more).
    Raises journaled on their own (made, and the broker killed before the lease's line) are among them: with no
    lease kept that rests on them, recovery restores them."""
    raises: dict[tuple[int, int | None, int | None], MemlockRaise] = {}
    made: list[Lease | MemlockRaiseRecord] = [*leases, *journaled]
    for lease in made:
        if lease.memlock is not None:
            key = (lease.pid, lease.pid_start, lease.pid_ino)
            before, now = lease.memlock[:2], lease.memlock[2:]
            found = raises.get(key)
            if found is None or now[0] > found.now[0]:
                raises[key] = MemlockRaise(found.before if found else before, now)
    return raises


def _unsignallable(lease: Lease) -> str | None:
    """Why the lease's holder must not be signalled whatever its pid names now, or None."""
    if lease.orphaned:
        return (f"holder pid {lease.pid} has exited and its sockets live on in a process the broker cannot "
                "name: nothing was signalled")
    if lease.pid_start is None:
        return (f"the lease recorded no start time for holder pid {lease.pid}, so the holder cannot be told "
                "from a process that reused its pid: nothing was signalled")
    return None


