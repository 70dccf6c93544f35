"""Serving requests: protocol in, policy decision, kernel work, reply and fds out.

No sockets here: the server loop hands in a peer and the request bytes and sends back what this
returns. Every decision is reported to the audit callback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import bpf, netdev, xdp_prog, xsk
from broker.leases import LeaseTable
from broker.peer import PeerInfo
from client import protocol as proto
from client.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP
from policy import Peer, Policy, Request, Rule, decide

SERVER_NAME = "xskbroker"
AuditFn = Callable[[dict[str, Any]], None]


@dataclass
class Outcome:
    reply: bytes
    fds: list[int] = field(default_factory=list)
    lease_id: str | None = None

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class Refused(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


class Service:
    def __init__(self, policy: Policy, audit: AuditFn, xdp_mode: str = "auto") -> None:
        self.policy = policy
        self.audit = audit
        self.xdp_mode = xdp_mode
        self.leases = LeaseTable()
        self.programs: dict[int, xdp_prog.XskProgram] = {}

    def close(self) -> None:
        for prog in self.programs.values():
            prog.close()
        self.programs.clear()

    # ---- entry point ---------------------------------------------------------------------------

    def handle(self, peer: PeerInfo, data: bytes, *, truncated: bool = False, fds: int = 0) -> Outcome:
        try:
            req = proto.decode_request(data, truncated=truncated, fds=fds)
        except proto.ProtocolError as e:
            self.audit({"event": "bad-request", "peer": peer.as_dict(), "code": e.code, "message": e.message})
            return Outcome(proto.error_reply_for(e))
        if isinstance(req, proto.Hello):
            return Outcome(proto.ok_reply("hello", req.req_id, server=SERVER_NAME, versions=[proto.VERSION],
                                          peer={"uid": peer.uid, "gid": peer.gid, "pid": peer.pid}))
        if isinstance(req, proto.Status):
            return Outcome(self._status(peer, req))
        if isinstance(req, proto.Release):
            return Outcome(self._release(peer, req))
        return self._grant(peer, req)

    # ---- grant -----------------------------------------------------------------------------------

    def _grant(self, peer: PeerInfo, req: proto.Grant) -> Outcome:
        record: dict[str, Any] = {"event": "grant", "peer": peer.as_dict(), "request": _describe(req)}
        # a map grant is judged on every queue of the device (a deny on any of them applies)
        queues = req.queues or _all_queues(req.interface)
        decision = decide(self.policy, Peer(peer.uid, peer.gids, peer.user, peer.groups),
                          Request(req.interface, queues, req.kind, req.umem_bytes))
        record["rule"] = decision.rule.name if decision.rule else None
        try:
            if not decision.allowed or decision.rule is None:
                raise Refused(decision.code, decision.reason)
            maker = {"bound": self._make_bound, "bare": self._make_bare, "map": self._make_map}[req.kind]
            outcome = maker(peer, req, decision.rule)
        except Refused as e:
            record.update(decision="deny", code=e.code, reason=e.message)
            self.audit(record)
            return Outcome(proto.error_reply(e.code, e.message, "grant", req.req_id, **e.extra))
        record.update(decision="allow", code="ok", lease=outcome.lease_id)
        self.audit(record)
        return outcome

    def _target(self, req: proto.Grant) -> tuple[int, xdp_prog.XskProgram]:
        """The interface's index and XSK program, after checking every requested queue exists."""
        try:
            ifindex = netdev.ifindex(req.interface)
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
        prog = self._program(ifindex, req.interface, nqueues)
        over = [q for q in req.queues if q >= prog.max_entries]
        if over:
            raise Refused("no-such-queue", f"the XSK program on {req.interface} has {prog.max_entries} "
                          f"map slots; queue {over[0]} is beyond it (the device grew after it was attached)")
        return ifindex, prog

    def _make_bound(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        ifindex, prog = self._target(req)
        made: list[xsk.BoundSocket] = []
        try:
            for q in req.queues:
                made.append(xsk.create_bound(ifindex, q, prog.map_fd, req.geometry, req.bind_mode,
                                             req.need_wakeup))
        except BaseException as e:
            for s in made:
                bpf.map_delete(prog.map_fd, s.queue)
                s.close()
            raise _refusal(e, req.interface, q) from None
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
        return self._lease(peer, req, ifindex, prog, fds, sockets=sockets, memlock=memlock,
                           bind_flags_hint=XDP_USE_NEED_WAKEUP | (XDP_COPY if prog.mode == "skb" else 0))

    def _make_map(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        if not rule.exclusive:  # the loader already insists on it; a decision must never rely on that alone
            raise Refused("kind-not-allowed", f"{rule.describe()} is not exclusive: map grants need the whole "
                          "interface")
        ifindex, prog = self._target(req)
        others = [lease for lease in self.leases if lease.ifindex == ifindex]
        taken = xsk.occupied_slots(prog.map_fd, prog.max_entries)
        if others or taken:
            raise Refused("interface-busy", f"{req.interface} is in use (leases {[x.id for x in others]}, occupied "
                          f"queues {taken}); a map grant needs it unused")
        fd = os.dup(prog.map_fd)
        return self._lease(peer, req, ifindex, prog, [fd], map_fd=0, map_entries=prog.max_entries)

    def _lease(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: xdp_prog.XskProgram, fds: list[int],
               **fields: Any) -> Outcome:
        lease = self.leases.add(peer.uid, peer.pid, ifindex, req.interface, req.queues, req.kind, req.umem_bytes)
        reply = proto.ok_reply("grant", req.req_id, lease=lease.id, kind=req.kind, interface=req.interface,
                               ifindex=ifindex, xdp_mode=prog.mode, xdp_prog_id=prog.prog_id, **fields)
        return Outcome(reply, fds, lease.id)

    def _memlock(self, peer: PeerInfo, needed: int, rule: Rule) -> dict[str, Any]:
        """Give a bare-grant holder the RLIMIT_MEMLOCK its own UMEM needs, where policy and privilege allow.

        Never lowers a limit. When it cannot raise it, the reply says exactly what is missing.
        """
        soft, hard = _memlock_of(peer.pid)
        info: dict[str, Any] = {"needed": needed, "soft": soft, "hard": hard, "raised": False}
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return {**info, "ok": True}
        hint = (f"raise the limit of the process that will register the UMEM to at least {needed} bytes: "
                f"LimitMEMLOCK={needed} in its systemd unit, `prlimit --pid {peer.pid} --memlock={needed}:{needed}` "
                f"as root, a memlock line in limits.conf, or CAP_IPC_LOCK")
        if rule.raise_memlock is None or needed > rule.raise_memlock:
            allowed = "no raise" if rule.raise_memlock is None else f"raises up to {rule.raise_memlock} bytes"
            return {**info, "ok": False, "reason": f"{rule.describe()} allows {allowed}", "hint": hint}
        try:
            resource.prlimit(peer.pid, resource.RLIMIT_MEMLOCK,
                             (needed, hard if hard == resource.RLIM_INFINITY else max(hard, needed)))
        except OSError as e:
            reason = ("the broker lacks CAP_SYS_RESOURCE to raise another process's hard limit"
                      if e.errno == errno.EPERM else f"prlimit failed: {e.strerror}")
            return {**info, "ok": False, "reason": reason, "hint": hint}
        self.audit({"event": "memlock-raised", "pid": peer.pid, "from": soft, "to": needed})
        return {**info, "ok": True, "raised": True}

    def _program(self, ifindex: int, ifname: str, nqueues: int) -> xdp_prog.XskProgram:
        """The cached XSK program of the interface, re-found when someone changed what is attached."""
        cached = self.programs.get(ifindex)
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
        if lease is None or (lease.uid != peer.uid and peer.uid != 0):
            return proto.error_reply("unknown-lease", f"no lease {req.lease!r} held by uid {peer.uid}",
                                     "release", req.req_id)
        prog = self.programs.get(lease.ifindex)
        if prog:
            for q in lease.queues:
                with contextlib.suppress(OSError):
                    bpf.map_delete(prog.map_fd, q)
        self.leases.remove(lease.id)
        self.audit({"event": "release", "peer": peer.as_dict(), "lease": lease.id})
        return proto.ok_reply("release", req.req_id, lease=lease.id)

    def holder_exited(self, pid: int) -> None:
        # The kernel already emptied the slots when the sockets closed; only bookkeeping is left.
        for lease in self.leases.of_pid(pid):
            self.leases.remove(lease.id)
            self.audit({"event": "lease-ended", "lease": lease.id, "pid": pid, "reason": "holder exited"})

    def _status(self, peer: PeerInfo, req: proto.Status) -> bytes:
        leases = [lease.as_dict() for lease in self.leases if peer.uid in (0, lease.uid)]
        interfaces = [{"ifindex": p.ifindex, "xdp_prog_id": p.prog_id, "xdp_mode": p.mode,
                       "map_entries": p.max_entries} for p in self.programs.values()]
        return proto.ok_reply("status", req.req_id, leases=leases, interfaces=interfaces)


def _memlock_of(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_MEMLOCK of a process. /proc is read because prlimit(2) on another user's
    process needs CAP_SYS_RESOURCE even to read."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max locked memory"):
                soft, hard = line[len("Max locked memory"):].split()[:2]
                return tuple(resource.RLIM_INFINITY if v == "unlimited" else int(v)  # type: ignore[return-value]
                             for v in (soft, hard))
    raise OSError(errno.ENOENT, f"no memlock limit in /proc/{pid}/limits")


def _all_queues(ifname: str) -> tuple[int, ...]:
    try:
        netdev.ifindex(ifname)
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
