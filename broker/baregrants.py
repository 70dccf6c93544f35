"""Bare grants: an unbound socket in the queue's slot of the shared XSKMAP, which its holder binds itself
with a UMEM of its own (libxdp's shared-socket path). The broker raises the holder's RLIMIT_MEMLOCK for that
UMEM where a rule allows, and revokes a bare lease whose socket was bound to a queue it was not granted.
"""

from __future__ import annotations

import contextlib
import errno
from resource import RLIM_INFINITY
from typing import Any

from xskbroker.broker.core import Deferred, MemlockRaise, Outcome, Refused, refusal
from xskbroker.broker.kernel import Program
from xskbroker.broker.lease_record import MemlockRaiseRecord
from xskbroker.broker.mapgrants import MapGrants
from xskbroker.broker.peer import PeerInfo
from xskbroker.policy import Holding, Rule
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import BareSocket
from xskbroker.wire.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP

# How long a bare grant waits for a busy slot while the broker's closer still has sent fds to close: a
# closer thread needs the GIL, which the loop may hold for a switch interval (5 ms) per request.
CLOSING_WAIT_SECONDS = 0.1


class BareGrants(MapGrants):
    # defined by broker.grants
    def _target(self, req: proto.Grant) -> tuple[int, Program]:
        raise NotImplementedError

    def check_bare(self, prog: Program | None = None) -> None:
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
        return self.leases.has_bare()

    def _make_bare(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome | Deferred:
        """A busy slot while the broker still closes sent fds may be held by one of them (a holder that just
        closed its copies): retried on the timer for a moment, never waited for on the loop."""
        try:
            return self._make_bare_now(peer, req, rule)
        except Refused as e:
            if e.code != ErrorCode.QUEUE_BUSY or not self.closes_pending():
                raise
        deadline = self.clock() + CLOSING_WAIT_SECONDS
        # the queues count against the quota while the grant waits, as a bound grant's do: another grant of
        # the same principal decided meanwhile must see them
        token = [req]
        self.pending[id(token)] = Holding(peer.principal, peer.gids, peer.groups, len(req.queues), req.pinned_bytes)

        def step() -> Outcome | None:
            # uncharged while it is tried: a policy reloaded meanwhile judges its quotas again, its own queues
            # counted once (as asked for), not twice
            charge = self.pending.pop(id(token), None)
            try:
                return self._make_bare_now(peer, req, rule)
            except Refused as e:
                if e.code == ErrorCode.QUEUE_BUSY and self.clock() < deadline and self.closes_pending():
                    if charge is not None:
                        self.pending[id(token)] = charge
                    return None
                raise

        def cancel() -> None:  # nothing else is held between steps: a step that fails undoes itself
            self.pending.pop(id(token), None)

        return Deferred(step, cancel)

    def _make_bare_now(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        # a grant that waited across a reload: judged again now, before anything is made, and its memlock raise is
        # the new rule's
        rule = self._rule_now(req, rule) or rule
        unsupported = self.kernel.bare_supported()
        if unsupported:
            raise Refused(ErrorCode.UNSUPPORTED_KIND, unsupported)
        ifindex, prog = self._target(req)
        fds: list[int] = []
        try:
            for q in req.queues:
                fds.append(self.kernel.create_bare(req.interface, q, prog.map_fd))
        except BaseException as e:
            for q_done, fd in zip(req.queues, fds, strict=False):
                self.kernel.map_delete(prog.map_fd, q_done)
                self.kernel.close(fd)
            raise refusal(e, req.interface, q) from None
        sockets = tuple(BareSocket(q, i) for i, q in enumerate(req.queues))
        key = (peer.pid, peer.start, peer.ino)
        earlier = self.raised.get(key)
        memlock = None
        try:  # the holder may die here (its /proc is read): any failure must take the sockets back out
            memlock = self._memlock(peer, req.memlock, rule) if req.memlock else None
            made = self.raised.get(key) if memlock and memlock["ok"] else None
            # this grant's raise, or an earlier lease's of this process that its need rests on (the limit before that
            # raise was short of it): either is kept until this lease ends too
            if made is not None and memlock and not memlock["raised"] and not _short(made.before[0], req.memlock):
                made = None
            out = self._lease(peer, req, ifindex, prog, fds, raised=(*made.before, *made.now) if made else None,
                              sockets=sockets, memlock=memlock,
                              bind_flags_hint=XDP_USE_NEED_WAKEUP | (XDP_COPY if prog.mode == "skb" else 0))
        except BaseException:
            if memlock and memlock["raised"]:  # nothing granted: the raise made for it is undone too
                self._unraise(peer, (memlock["soft"], memlock["hard"]), earlier)
            for q_done, fd in zip(req.queues, fds, strict=True):
                if prog.map_fd >= 0:  # dropped with its interface meanwhile: the closing socket leaves its slot
                    with contextlib.suppress(OSError):
                        self.kernel.map_delete(prog.map_fd, q_done)
                self.kernel.close(fd)
            raise
        raised = self.raised.get(key)
        if made is not None and out.lease_id and raised is not None:
            raised.leases.add(out.lease_id)  # restored when the last such lease ends
        return out

    def _memlock(self, peer: PeerInfo, needed: int, rule: Rule) -> dict[str, Any]:
        """Give a bare-grant holder the RLIMIT_MEMLOCK its own UMEM needs, where policy and privilege allow.

        Never lowers a limit. When it cannot raise it, the reply says exactly what is missing.

        The limit is read and raised by pid: only while that pid names the process judged (its start time and
        pidfs inode, checked before and after), never one that took the pid of a requester that has exited (a
        connection its connector left to another process) or of a holder gone since.
        """
        try:
            alive = self.kernel.holder_alive(peer.pid, peer.start, peer.ino)
        except OSError as e:
            return {"needed": needed, "ok": False, "raised": False,
                    "reason": f"cannot pin process {peer.pid} with a pidfd ({e.strerror}): its limit is neither read "
                              "nor raised"}
        if not alive:
            return {"needed": needed, "ok": False, "raised": False,
                    "reason": f"process {peer.pid} has exited (or cannot be told from another process with its pid): "
                              "its limit is neither read nor raised"}
        try:
            soft, hard = self.kernel.memlock(peer.pid)
        except OSError as e:  # the holder is gone: its sockets are made, so answer rather than fail the grant
            return {"needed": needed, "ok": False, "raised": False, "reason": f"cannot read its limit: {e}"}
        info: dict[str, Any] = {"needed": needed, "soft": soft, "hard": hard, "raised": False}
        if soft == RLIM_INFINITY or soft >= needed:
            return {**info, "ok": True}
        hint = (f"raise the limit of the process that will register the UMEM to at least {needed} bytes: "
                f"LimitMEMLOCK={needed} in its systemd unit, `prlimit --pid {peer.pid} --memlock={needed}:{needed}` "
                f"as root, a memlock line in limits.conf, or CAP_IPC_LOCK")
        if rule.raise_memlock is None or needed > rule.raise_memlock:
            allowed = "no raise" if rule.raise_memlock is None else f"raises up to {rule.raise_memlock} bytes"
            return {**info, "ok": False, "reason": f"{rule.describe()} allows {allowed}", "hint": hint}
        # only what is needed: the soft limit to `needed`, the hard one only when it is below (soft <= hard)
        new = (needed, hard if hard == RLIM_INFINITY else max(hard, needed))
        earlier = self.raised.get((peer.pid, peer.start, peer.ino))
        try:  # journaled first: a broker killed before the lease's own line is journaled leaves it to be restored
            self.leases.record_raise(MemlockRaiseRecord(peer.pid, peer.start, peer.ino,
                                                        (*(earlier.before if earlier else (soft, hard)), *new)))
        except OSError as e:
            return {**info, "ok": False, "reason": f"the lease journal cannot be written: {e.strerror or e}",
                    "hint": hint}
        try:
            self.kernel.set_memlock(peer.pid, new)
        except OSError as e:
            reason = ("the broker lacks CAP_SYS_RESOURCE to raise another process's hard limit"
                      if e.errno == errno.EPERM else f"prlimit failed: {e.strerror}")
            return {**info, "ok": False, "reason": reason, "hint": hint}
        self.fault("after-memlock-raise")
        try:
            alive = self.kernel.holder_alive(peer.pid, peer.start, peer.ino)
        except OSError:
            alive = True  # cannot tell (out of fds): recorded as made, so the lease's end restores it (checked then)
        if not alive:  # gone meanwhile: nothing to restore
            return {**info, "ok": False, "reason": f"process {peer.pid} exited while its limit was raised"}
        key = (peer.pid, peer.start, peer.ino)
        earlier = self.raised.get(key)
        self.raised[key] = MemlockRaise(earlier.before if earlier else (soft, hard), new,
                                        earlier.leases if earlier else set())
        self.audit({"event": "memlock-raised", "pid": peer.pid, "from": soft, "to": needed, "hard": new[1]})
        return {**info, "ok": True, "raised": True}

    def _unraise(self, peer: PeerInfo, before: tuple[int, int], earlier: MemlockRaise | None) -> None:
        """Undo a raise made for a grant that failed: the limit goes back to what _memlock read (if nobody
        changed it since, and the pid still names the process), and the raise remembered is the earlier one."""
        key = (peer.pid, peer.start, peer.ino)
        made = self.raised.pop(key, None)
        if earlier is not None:
            self.raised[key] = earlier
        if made is None:
            return
        with contextlib.suppress(OSError):  # gone, or cannot be told (out of fds): nothing is lowered
            if not self.kernel.holder_alive(peer.pid, peer.start, peer.ino):
                return
            if self.kernel.memlock(peer.pid) == made.now:
                self.kernel.set_memlock(peer.pid, before)
                self.audit({"event": "memlock-restored", "pid": peer.pid, "to": before[0], "hard": before[1],
                            "reason": "the grant it was raised for failed"})


def _short(soft: int, needed: int) -> bool:
    """Whether a soft RLIMIT_MEMLOCK is below what a UMEM needs."""
    return soft != RLIM_INFINITY and soft < needed
