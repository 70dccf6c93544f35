"""Who binds a queue: naming the bare socket (or the stranger) that squats a queue it was not granted.

A bare grant's holder binds the socket itself, and the kernel lets it bind any queue of the device
(SO_BINDTODEVICE pins the device, nothing pins the queue). The broker cannot stop that bind; it can see
it: the socket stays in the lease's xsks_map slot, and broker.xskdiag.SlotProbe reads the queue it is
bound to. A socket bound to queue 0 reads like an unbound one (queue_id 0): only other queues are told.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from broker import xdp_prog, xskdiag
from broker.leases import Lease


class SquatWatch:
    def __init__(self) -> None:
        self._probes: dict[int, tuple[int, xskdiag.SlotProbe | None]] = {}  # ifindex -> (prog id, probe)

    def probe(self, prog: xdp_prog.XskProgram) -> xskdiag.SlotProbe | None:
        """The slot probe of the interface's current XSK program; None where it cannot be loaded."""
        cached = self._probes.get(prog.ifindex)
        if cached and cached[0] == prog.prog_id:
            return cached[1]
        if cached and cached[1]:
            cached[1].close()
        probe: xskdiag.SlotProbe | None = None
        with contextlib.suppress(OSError):
            probe = xskdiag.SlotProbe(prog.map_fd)
        self._probes[prog.ifindex] = (prog.prog_id, probe)
        return probe

    def drop(self, ifindex: int) -> None:
        _, probe = self._probes.pop(ifindex, (0, None))
        if probe:
            probe.close()

    def close(self) -> None:
        for _, probe in self._probes.values():
            if probe:
                probe.close()
        self._probes.clear()

    def misbound(self, prog: xdp_prog.XskProgram, leases: Iterable[Lease]) -> list[tuple[Lease, int, int]]:
        """(lease, granted slot, queue it is bound to) for the live bare sockets bound off their slot."""
        probe = self.probe(prog)
        out = []
        for lease in leases:
            if probe is None or lease.kind != "bare" or lease.revoked or lease.ifindex != prog.ifindex:
                continue
            for slot in lease.queues:
                try:
                    queue = probe.queue_of(slot)
                except OSError:
                    continue
                if queue is not None and queue not in (0, slot):
                    out.append((lease, slot, queue))
        return out

    def culprit(self, prog: xdp_prog.XskProgram, leases: Iterable[Lease], queue: int) -> Lease | None:
        """The bare lease whose socket is bound to queue though it was granted another, if the broker can tell."""
        leases = list(leases)
        for lease in leases:  # found earlier: revoked, its slot emptied, but the socket may still be bound
            if lease.ifindex == prog.ifindex and lease.misbound == queue:
                return lease
        for lease, _, bound in self.misbound(prog, leases):
            if bound == queue:
                return lease
        return None


def squatter_message(ifname: str, queue: int, lease: Lease | None) -> str:
    if lease is None:
        return (f"queue {queue} of {ifname} is bound by an AF_XDP socket the broker did not make (or one its "
                "holder kept open after the lease ended); it stays bound until that socket is closed")
    granted = ", ".join(str(q) for q in lease.queues)
    return (f"queue {queue} of {ifname} is bound by the bare socket of lease {lease.id} (uid {lease.uid}, "
            f"pid {lease.pid}), granted queue {granted}")
