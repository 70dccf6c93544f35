"""Who binds a queue: naming the bare socket (or the stranger) that squats a queue it was not granted.

A bare grant's holder binds the socket itself, and the kernel lets it bind any queue of the device
(SO_BINDTODEVICE pins the device, nothing pins the queue). The broker cannot stop that bind; it can see
it: the socket stays in the lease's xsks_map slot, and broker.xskdiag.SlotProbe reads the queue it is
bound to. A socket bound to queue 0 reads like an unbound one (queue_id 0): only other queues are told.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from xskbroker.broker import xskdiag
from xskbroker.broker.kernel import Program, SlotProbe
from xskbroker.broker.lease_record import Lease


class SquatWatch:
    """Loads the slot probe for each look (about 60 us) and closes it after: the broker keeps no fd for it,
    and looks only while bare leases live."""

    def __init__(self, open_probe: Callable[[int], SlotProbe] = xskdiag.SlotProbe) -> None:
        self.open_probe = open_probe  # map fd -> probe (the service passes its Kernel's)

    def probe(self, prog: Program) -> SlotProbe | None:
        try:
            return self.open_probe(prog.map_fd)
        except OSError:
            return None

    def misbound(self, prog: Program, leases: Iterable[Lease]) -> list[tuple[Lease, int, int]]:
        """(lease, granted slot, queue it is bound to) for the live bare sockets bound off their slot."""
        bare = [x for x in leases if x.kind == "bare" and not x.revoked and x.ifindex == prog.ifindex]
        probe = self.probe(prog) if bare else None
        if probe is None:
            return []
        out = []
        try:
            for lease in bare:
                for slot in lease.queues:
                    with contextlib.suppress(OSError):
                        queue = probe.queue_of(slot)
                        if queue is not None and queue not in (0, slot):
                            out.append((lease, slot, queue))
        finally:
            probe.close()
        return out

    def culprit(self, prog: Program, leases: Iterable[Lease], queue: int) -> Lease | None:
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
