"""Sockets made ahead of time: the part of a bound grant that does not depend on the request.

A bound socket costs a fresh sealed memfd (its pages allocated and zeroed), the UMEM registration (every
page pinned) and four rings; only the map slot and the bind depend on the interface and queue. The pool
keeps a few such sockets (broker.xsk.Unbound) of each geometry recently asked for, made by background
threads (the syscalls release the GIL), so a grant of a common geometry only claims a slot and binds.

What a pooled socket may hold, and what it may not (docs/security.md): a memfd no one else has ever seen
(all zeros, sealed), its registration and rings. It is bound to nothing, in no map, and handed out once:
take() removes it for good, and a grant that fails closes it. The pool is bounded in bytes (UMEM and rings,
the same figure a grant counts against quotas), least recently asked geometries evicted first (and not
made again until asked again); its pinned memory is the broker's own and shown in `status`. Geometries
are learned per interface: when the last interface that asked for one goes away, or on a policy reload,
its sockets are closed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from xskbroker.broker import cpus
from xskbroker.wire.protocol import Geometry

PER_GEOMETRY = 2  # sockets kept per geometry at first; a take that then finds none doubles it (a burst)
MAX_PER_GEOMETRY = 32  # at most: 32 clients at once find theirs ready
MAX_SOCKETS = 96  # two fds each: bounded whatever the budget
# geometries remembered with nothing ready nor being made: every distinct geometry a client asks for (any
# multiple of 4 KiB up to 4 GiB, any headroom and rings) was remembered for good, ~1 KiB each, so one allowed
# client asking a new one each time (even refused, queue busy) grew the broker without end
MAX_GEOMETRIES = MAX_SOCKETS
FILLERS = 1  # the helper process makes one at a time
# Making a socket right after a take competes with the grant that took it (2 CPUs here), even in the helper
# process that makes them (broker.preparer): 1 MiB grants took 1.4 ms in the broker instead of 0.6. So a
# geometry with at least half its target ready is refilled only once takes have paused this long; one
# running low (a burst) is refilled at once.
REFILL_DELAY = 0.005


class Ready(Protocol):
    """A socket made ahead of time (broker.xsk.Unbound through the service's Kernel)."""

    def close(self) -> None: ...


def cost(g: Geometry) -> int:
    """What one pooled socket pins: its UMEM and its rings (as a grant counts it)."""
    return g.umem_size + g.ring_bytes


class _Kind:
    """The sockets of one geometry: those ready, those being made, how many to keep, and who asked."""

    __slots__ = ("asks", "interfaces", "making", "ready", "target")

    def __init__(self) -> None:
        self.ready: list[Ready] = []
        self.making = 0
        self.target = PER_GEOMETRY
        self.interfaces: set[int] = set()
        self.asks = 0  # takes of it since it was first asked (refused() forgets one no grant but a refused asked)


class UmemPool:
    """`make(g)` makes one socket of geometry g (the service's Kernel.make_ready)."""

    def __init__(self, max_bytes: int, make: Callable[[Geometry], Ready], fillers: int = FILLERS) -> None:
        self.max_bytes = max_bytes
        self._make = make
        self._kinds: OrderedDict[Geometry, _Kind] = OrderedDict()  # least recently asked first
        self._bytes = 0  # ready sockets and those being made
        self._sockets = 0
        self._made = self._taken = self._missed = self._failed = 0
        self._lock = threading.Condition()
        self._last_take = 0.0
        self._kick = False  # a take(wake=False) left the refilling thread asleep
        self._stopping = False
        # dropped (flush, interface gone, given back to no room) and closed by the filler, counted until then: the
        # last close of a UMEM's memfd frees its pages, ~0.2 ms per MiB here, which on the event loop stalled every
        # client
        self._closing: list[tuple[Geometry, Ready]] = []
        self._threads = [threading.Thread(target=self._fill, name=f"xskbroker-umem-pool-{i}", daemon=True)
                         for i in range(fillers if max_bytes > 0 else 0)]
        for t in self._threads:
            t.start()

    def fits(self, g: Geometry) -> bool:
        return 0 < cost(g) * PER_GEOMETRY <= self.max_bytes

    def take(self, g: Geometry, ifindex: int, wake: bool = True) -> Ready | None:
        """A ready socket of geometry g, now, or None (the caller makes one). Either way g is wanted
        (on behalf of interface ifindex) and refilled in the background. wake=False: a socket taken leaves
        the refilling thread asleep until kick() (the server's, once the reply is out), so that it does not
        compete with the grant for the CPU and the GIL; a miss wakes it at once, unless g is fresh."""
        if not self._threads or not self.fits(g):
            return None
        with self._lock:
            kind = self._kinds.get(g)
            # none ready for a geometry never asked for, or one that gave way (_evict) or failed since, is no
            # burst: it gets the first target again, not twice it (a one-off 16 MiB grant would otherwise have
            # the pool want four of its kind, 64 MiB, evicting every other geometry to make them)
            fresh = kind is None or kind.target < PER_GEOMETRY
            if kind is None:
                kind = self._kinds[g] = _Kind()
                self._forget_unused(keep=g)
            self._kinds.move_to_end(g)
            kind.asks += 1
            kind.interfaces.add(ifindex)
            self._last_take = time.monotonic()
            kind.target = max(kind.target, PER_GEOMETRY)
            got = kind.ready.pop() if kind.ready else None
            if got is None:
                self._missed += 1
                if not fresh:
                    kind.target = min(MAX_PER_GEOMETRY, kind.target * 2)
            else:
                self._taken += 1
                self._bytes -= cost(g)
                self._sockets -= 1
            # a miss wakes it at once, to make the next ones while the grant makes its own; not a miss of a fresh
            # geometry (never asked, or given way), which is no burst: a broker's first make starts the helper
            # process (an import and a spawn under the GIL), which a socket-activated start's first grant must not
            # wait behind
            if wake or (got is None and not fresh):
                self._lock.notify_all()
            else:
                self._kick = True
        return got

    def refused(self, g: Geometry, takes: int) -> None:
        """A grant of g that made `takes` take() calls was refused: if those were all g was ever asked (nothing
        ready nor being made for it), g is forgotten. A refused request teaches the pool nothing: a client asking
        a held queue with a new geometry each time had the helper pin two sockets of each, nobody's to take."""
        with self._lock:
            kind = self._kinds.get(g)
            if kind is not None and kind.asks <= takes and not kind.ready and not kind.making:
                del self._kinds[g]

    def give_back(self, g: Geometry, ready: Ready) -> None:
        """A socket take() gave for a grant that then failed before using it (its queue was held by another
        socket): ready again, as if never taken. A client asking for a busy queue over and over would otherwise
        cost the pool a socket, and its helper a refill, each time."""
        with self._lock:
            kind = self._kinds.get(g)
            # only if it still fits: a miss among the grant's takes woke the filler, which may have counted the
            # next one meanwhile, and nothing evicts unless a make follows (a client retrying a busy queue with
            # one queue more each time had the pool pin many times its budget)
            if (kind is not None and not self._stopping and self._bytes + cost(g) <= self.max_bytes
                    and self._sockets < MAX_SOCKETS):
                kind.ready.append(ready)
                self._bytes += cost(g)
                self._sockets += 1
                self._taken -= 1
                return
            if self._threads and not self._stopping:  # forgotten or no room meanwhile: closed by the filler
                self._closing.append((g, ready))
                self._bytes += cost(g)
                self._sockets += 1
                self._lock.notify_all()
                return
        ready.close()  # stopping

    def _forget_unused(self, keep: Geometry) -> None:
        """Past MAX_GEOMETRIES, forget the least recently asked geometries (but `keep`) that hold no socket (under
        the lock). Those holding one stay, MAX_SOCKETS + FILLERS of them at most: their sockets are closed off the
        loop, by _evict or a flush."""
        excess = len(self._kinds) - MAX_GEOMETRIES
        if excess <= 0:
            return
        unused = [g for g, kind in self._kinds.items() if not kind.ready and not kind.making and g != keep]
        for g in unused[:excess]:
            del self._kinds[g]

    def kick(self) -> None:
        """Wake the refilling thread for what take(wake=False) took."""
        if self._kick:
            with self._lock:
                self._kick = False
                self._lock.notify_all()

    def ready(self, g: Geometry) -> int:
        with self._lock:
            kind = self._kinds.get(g)
            return len(kind.ready) if kind else 0

    def _wanted(self) -> tuple[Geometry, _Kind] | float | None:
        """The most recently asked geometry short of its target that fits the budget, or how long to wait
        before one is refilled (under the lock)."""
        wait = None
        for g in reversed(self._kinds):
            kind = self._kinds[g]
            have = len(kind.ready) + kind.making
            if have < kind.target and self._sockets < MAX_SOCKETS and self._room(g):
                quiet = self._last_take + REFILL_DELAY - time.monotonic()
                if 2 * have < kind.target or quiet <= 0:
                    return g, kind
                wait = quiet if wait is None else min(wait, quiet)
        return wait

    def _room(self, g: Geometry) -> bool:
        """Whether a socket of g fits, counting what less recently asked geometries would give up."""
        free = self.max_bytes - self._bytes
        for other, kind in self._kinds.items():
            if free >= cost(g) or other == g:
                break
            free += cost(other) * len(kind.ready)
        return free >= cost(g)

    def _fill(self) -> None:
        cpus.background()  # zeroing and pinning pages: its helper process, started from here, inherits the CPU
        while True:
            with self._lock:
                while not self._stopping and not self._closing and not isinstance(wanted := self._wanted(), tuple):
                    self._lock.wait(wanted)
                closing, self._closing = self._closing, []
                if not closing:
                    if self._stopping or not isinstance(wanted, tuple):
                        return
                    g, kind = wanted
                    kind.making += 1
                    self._bytes += cost(g)  # counted while it is made: its pages are being pinned
                    self._sockets += 1
                    evicted = self._evict()
            if closing:  # before any make: the budget counts them until they are closed
                self._close(closing)
                continue
            for u in evicted:
                u.close()
            made = None
            with contextlib.suppress(OSError):  # out of memory or memlock: a grant makes its own and says why
                made = self._make(g)
            self._settle(g, kind, made)

    def _settle(self, g: Geometry, kind: _Kind, made: Ready | None) -> None:
        with self._lock:
            kind.making -= 1
            if made is not None and not self._stopping and self._kinds.get(g) is kind:
                kind.ready.append(made)
                self._made += 1
                return
            self._bytes -= cost(g)
            self._sockets -= 1
            if made is None:  # failed: keep what is ready, try again when a take asks (no spinning on ENOMEM)
                self._failed += 1
                kind.target = len(kind.ready) + kind.making
        if made is not None:  # flushed, forgotten or stopping while it was made
            made.close()

    def _evict(self) -> list[Ready]:
        """Over budget: the least recently asked geometries' ready sockets go (under the lock). One that
        gave way keeps what is left as its target until it is asked again: refilled at once (empty) right
        after the next take elsewhere, it would only be evicted again by that take's refill."""
        out: list[Ready] = []
        for g, kind in self._kinds.items():
            while self._bytes > self.max_bytes and kind.ready:
                out.append(kind.ready.pop(0))
                self._bytes -= cost(g)
                self._sockets -= 1
                kind.target = len(kind.ready) + kind.making
        return out

    def forget_interface(self, ifindex: int) -> None:
        """The interface went away: close the sockets of geometries no other interface asked for."""
        def unwanted(kind: _Kind) -> bool:
            kind.interfaces.discard(ifindex)
            return not kind.interfaces

        self._drop(unwanted)

    def flush(self) -> None:
        """Close every ready socket and forget every geometry (a policy reload: what was asked may be no more)."""
        self._drop(lambda kind: True)

    def _drop(self, which: Callable[[_Kind], bool]) -> None:
        with self._lock:
            for g in [g for g, kind in self._kinds.items() if which(kind)]:
                kind = self._kinds.pop(g)
                # one being made is closed by its filler (_settle)
                self._closing += [(g, u) for u in kind.ready]
            if not self._closing:
                return
            if self._threads and not self._stopping:  # the caller is the event loop: the filler closes them
                self._lock.notify_all()
                return
            closing, self._closing = self._closing, []
        self._close(closing)

    def _close(self, closing: list[tuple[Geometry, Ready]]) -> None:
        for _, u in closing:
            u.close()
        with self._lock:
            for g, _ in closing:
                self._bytes -= cost(g)
                self._sockets -= 1

    @property
    def pooled_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def snapshot(self) -> dict[str, Any]:
        """For `status`: the budget, what the pool pins now (UMEM and rings, sockets being made included)."""
        with self._lock:
            return {"budget_bytes": self.max_bytes, "pinned_bytes": self._bytes, "sockets": self._sockets,
                    "geometries": len(self._kinds), "made": self._made, "taken": self._taken,
                    "missed": self._missed, "failed": self._failed}

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        self.flush()  # with what a filler left to close
