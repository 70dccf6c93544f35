"""Map grants: a tenant gets an XSKMAP of its own that steers only the queues it was granted.

The interface runs the broker's per-queue program (broker.queue_prog): outer[q] points at the shared
XSKMAP of bound and bare grants, or at a map tenant's own XSKMAP. A map grant places a fresh tenant map at
outer[q] for each granted queue; however the lease ends (release, revoke, holder exit, interface gone), the
shared map goes back to those slots, so copies of the tenant's fd that live on steer nothing.

An interface still running libxdp's program is moved to the per-queue one only while nobody uses it (no
lease, no socket in its map): that detach would cut live sockets off. Otherwise the grant is refused and
says why.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from xskbroker.broker.core import Core, Outcome, Refused
from xskbroker.broker.kernel import ForeignProgram, Program
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.peer import PeerInfo
from xskbroker.policy import Rule
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode


class MapGrants(Core):
    pin_root: str | None  # a bpffs directory: map grants are pinned there for their tenant

    # defined by broker.grants
    def _checked(self, req: proto.Grant) -> tuple[int, int]:
        raise NotImplementedError

    def _lease(self, peer: PeerInfo, req: proto.Grant, ifindex: int, prog: Program, fds: list[int],
               queues: tuple[int, ...] | None = None, **fields: Any) -> Outcome:
        raise NotImplementedError

    def _make_map(self, peer: PeerInfo, req: proto.Grant, rule: Rule) -> Outcome:
        ifindex, nqueues = self._checked(req)
        queues = req.queues or tuple(range(nqueues))
        for q in queues:
            holder = self.leases.holder(ifindex, q)
            if holder and (holder.kind == "map" or holder.revoked) and self.exit_sync(holder.pid):
                holder = self.leases.holder(ifindex, q)  # its holder had exited: the lease may have ended
            if holder and (holder.kind == "map" or holder.revoked):
                raise Refused(ErrorCode.QUEUE_BUSY, f"{req.interface} queue {q} is held by lease {holder.id}")
        prog = self._queue_program(ifindex, req.interface, nqueues)
        over = [q for q in queues if q >= prog.max_entries]
        if over:
            raise Refused(ErrorCode.NO_SUCH_QUEUE, f"the XSK program on {req.interface} has {prog.max_entries} "
                          f"slots; queue {over[0]} is beyond it (the device grew after it was attached)")
        taken = self.kernel.occupied_slots(prog.map_fd, queues)
        if taken:
            raise Refused(ErrorCode.QUEUE_BUSY, f"{req.interface} queue {taken[0]} holds another grant's socket")
        tmap = self.kernel.tenant_map(prog.max_entries)
        placed = False
        pin: str | None = None
        try:
            map_id = self.kernel.map_id(tmap)
            placed = True  # a failure may have placed some: every queue goes back (none was another tenant's)
            self.kernel.place(prog.outer_fd, queues, tmap)  # one grace period on the loop, not one per queue
            if self.pin_root:
                pin = self._pin(peer, req.interface, tmap)
                self.fault("after-pin")
            out = self._lease(peer, req, ifindex, prog, [tmap], queues=queues, map_fd=0,
                              map_entries=prog.max_entries, **({"map_pin": pin} if pin else {}))
        except BaseException as e:
            if placed:
                with contextlib.suppress(OSError):
                    self.kernel.place(prog.outer_fd, queues, prog.map_fd)
            if pin and self.pin_root:
                self.kernel.unpin(self.pin_root, peer.uid, req.interface)
            self.kernel.close(tmap)
            if isinstance(e, OSError):
                raise Refused(ErrorCode.KERNEL_ERROR, f"{req.interface}: {e.strerror or e}") from None
            raise
        lease = self.leases.get(out.lease_id or "")
        if lease:  # the map whose outer slots are given back, and its pin removed, when the lease ends (restarts too)
            lease.map_id, lease.map_pin = map_id, pin
            self.leases.record(lease)
        return out

    def _pin(self, peer: PeerInfo, ifname: str, map_fd: int) -> str | None:
        """Pin the tenant's map where only it can open it; None when its (uid, interface) pin is taken."""
        assert self.pin_root
        try:
            return self.kernel.pin(self.pin_root, peer.uid, peer.gid, ifname, map_fd)
        except FileExistsError:
            if any(x.kind == "map" and x.map_pin and os.path.basename(os.path.dirname(x.map_pin)) == ifname
                   for x in self.leases.of_uid(peer.uid)):
                return None  # another live lease of this uid on this interface has the pin
        # no lease has it: a broker killed between pinning and journaling left it, a map that steers nothing
        self.kernel.unpin(self.pin_root, peer.uid, ifname)
        self.audit({"event": "map-pin-replaced", "uid": peer.uid, "interface": ifname,
                    "reason": "no lease held it (left by a broker that stopped before recording it)"})
        try:
            return self.kernel.pin(self.pin_root, peer.uid, peer.gid, ifname, map_fd)
        except FileExistsError:
            return None

    def _queue_program(self, ifindex: int, ifname: str, nqueues: int) -> Program:
        """The interface's per-queue program: attached when the interface has none, moved to from libxdp's
        program when nobody uses that one; refused over anything else."""
        cached = self.programs.get(ifindex)
        if cached is not None and cached.per_queue and self.link_events:
            return cached  # a change of program drops it as it happens: no query (it waits for rtnl)
        try:
            current = self.kernel.attached(ifindex)
        except ForeignProgram as e:
            raise Refused(ErrorCode.XDP_FOREIGN_PROGRAM, e.strerror or str(e)) from None
        prog = self._program(ifindex, ifname, nqueues) if current else None
        if prog is not None and prog.per_queue:
            return prog
        if prog is not None:
            users = [x.id for x in self.leases.on_interface(ifindex)]
            taken = self.kernel.occupied_slots(prog.map_fd, prog.max_entries) if not users else []
            if users or taken:
                why = f"leases {users}" if users else f"sockets on queues {taken}"
                raise Refused(ErrorCode.INTERFACE_BUSY, f"{ifname} runs libxdp's XSK program, which has one map for "
                              f"every queue, and {why} use it; map grants need the broker's per-queue program, and "
                              "replacing the program now would cut those sockets off: retry when they are gone")
            self.programs.pop(ifindex).close()
        try:
            made = self.kernel.attach_queues(ifindex, ifname, nqueues, self.xdp_mode, replace=prog is not None)
        except ForeignProgram as e:
            raise Refused(ErrorCode.XDP_FOREIGN_PROGRAM, e.strerror or str(e)) from None
        except OSError as e:
            raise Refused(ErrorCode.XDP_ATTACH_FAILED, e.strerror or str(e)) from None
        self.programs[ifindex] = made
        self.names[ifindex] = ifname
        self.audit({"event": "xdp-attach", "interface": ifname, "ifindex": ifindex, "prog_id": made.prog_id,
                    "mode": made.mode, "map_entries": made.max_entries, "per_queue": True,
                    **({"replaced": "xsk_def_prog"} if prog is not None else {})})
        return made

    def _end_map(self, lease: Lease, recovered: bool = False) -> None:
        """Give the lease's outer slots back to the shared map (only those still pointing at its map) and
        remove its pin (a lease a previous broker made with no pin journaled: whatever pin it had): no copy of its
        fd steers anything after this."""
        if self.pin_root and (lease.map_pin or recovered):
            # where it was pinned, under the interface's name at the grant: a rename since left the pin there
            ifname = os.path.basename(os.path.dirname(lease.map_pin)) if lease.map_pin else lease.ifname
            self.kernel.unpin(self.pin_root, lease.uid, ifname)
        # the cached program while link events are watched (its removal or replacement drops it as it happens): the
        # kernel's answer waits for rtnl, and every map lease's end would wait for it on the loop
        cached = self.programs.get(lease.ifindex) if self.link_events else None
        owned = cached is None or not cached.per_queue
        prog = self.kernel.queue_program(lease.ifindex) if owned else cached
        if prog is None:  # gone with its interface or with the broker that attached it
            return
        given_back = []
        try:
            for q in lease.queues:
                with contextlib.suppress(OSError):
                    if self.kernel.inner_id(prog.outer_fd, q) == lease.map_id:
                        given_back.append(q)
            try:
                self.kernel.place(prog.outer_fd, given_back, prog.map_fd)  # one grace period, not one per queue
            except OSError:
                given_back = []
        finally:
            if owned:
                prog.close()
        self.audit({"event": "map-unplaced", "lease": lease.id, "interface": lease.ifname, "queues": given_back})

    def _interface_gone(self, ifindex: int) -> None:
        with contextlib.suppress(OSError):
            self.kernel.forget_queues(ifindex)
