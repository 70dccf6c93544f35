"""Closing sent fds off the event loop.

When the client has already closed its copy, the broker's close is the last one, and releasing a bound
AF_XDP socket waits for an RCU grace period (synchronize_net: 5-15 ms here). On the event loop that
would stall every other client. A few threads do it instead (os.close releases the GIL): concurrent
waiters share grace periods, so closes keep pace with grants instead of queueing behind each other,
which would keep released queues busy long after their holders let go. Each close of a bound socket holds
its thread for a grace period, so the pool grows with the work (one thread per close in flight, up to
`workers`: 32 clients releasing at once need 32 waiting closes) and shrinks back when idle.

Whoever closes a bound socket last waits for the grace period: a client that closes its copy right after
the reply (grant, use, release in quick succession) waited ~10 ms in its own thread whenever the broker's
closer had been quicker, which cut one client's grant+release rate to a sixth. So the broker keeps its
copies of sent fds a moment longer (close_later), and its closer threads pay the wait instead.

fds a client attached to a request are another matter: their close can block as long as the client likes
(a TCP socket lingering on a queue that never drains, a FUSE file whose flush never answers). They go to a
closer of their own, so they can stall neither the loop nor the closes of grant fds, and sockets among
them are defused first (SO_LINGER zero: the close resets instead of waiting).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

from xskbroker.broker import cpus

WORKERS = 64  # closes in flight at most: each waits ~10 ms, so 64 keep pace with ~6,000 closes a second
IDLE_SECONDS = 5.0  # a thread with nothing to close for this long ends (the first one stays)


class Closer:
    def __init__(self, workers: int = WORKERS, name: str = "closer", defuse: bool = False,
                 on_closed: Callable[[int], None] | None = None) -> None:
        self._fds: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._on_closed = on_closed  # told how many fds each batch closed (broker.sent_copies' helper counts them)
        self._defuse = defuse
        self._max, self._name = workers, name
        self._lock = threading.Lock()
        # threads waiting for work less batches queued for them: below zero, batches wait for a thread (clamped
        # at zero, a thread started for a batch counted itself idle as it took it, and the next batch waited)
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._later: collections.deque[tuple[float, list[int], str | None]] = collections.deque()  # due in order
        self._later_wake = threading.Condition(self._lock)
        self._later_thread: threading.Thread | None = None
        self._in_flight = 0  # fds handed to close() and not closed yet
        self._moving = 0  # fds taken from _later (due, expedited) and not yet handed to close(): pending all the same
        self._spawn(keep=True)

    def close_later(self, fds: list[int], delay: float, key: str | None = None) -> None:
        """Close fds after `delay` seconds (all callers pass the same delay: the queue stays in due order), or
        when expedite(key) says their holder is done with them (a lease released)."""
        if not fds:
            return
        with self._lock:
            if self._stopping:
                later = False
            else:
                later = True
                self._later.append((time.monotonic() + delay, list(fds), key))
                if self._later_thread is None:
                    self._later_thread = threading.Thread(target=self._run_later, name=f"xskbroker-{self._name}-later",
                                                          daemon=True)
                    self._later_thread.start()
                if len(self._later) == 1:  # else the thread already waits for an earlier one: no wake-up (and
                    self._later_wake.notify()  # no thread switch) per grant
        if not later:
            self.close(fds)

    def _run_later(self) -> None:
        cpus.background()
        while True:
            with self._lock:
                while not self._stopping and (not self._later or self._later[0][0] > time.monotonic()):
                    self._later_wake.wait(self._later[0][0] - time.monotonic() if self._later else None)
                if self._stopping:
                    return
                _, fds, _ = self._later.popleft()
                self._moving += len(fds)
            self._hand_over(fds)

    def _hand_over(self, fds: list[int]) -> None:
        """close() what was taken from _later (counted in _moving meanwhile)."""
        try:
            self.close(fds)
        finally:
            with self._lock:
                self._moving -= len(fds)

    def expedite(self, key: str) -> None:
        """Close now what close_later keeps under `key` (a released lease's socket is free for its next grant)."""
        with self._lock:
            found = [entry for entry in self._later if entry[2] == key]
            for entry in found:
                self._later.remove(entry)
                self._moving += len(entry[1])
        for _, fds, _ in found:
            self._hand_over(fds)

    def _spawn(self, keep: bool = False) -> None:
        t = threading.Thread(target=self._run, args=(keep,), name=f"xskbroker-{self._name}-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def close(self, fds: list[int]) -> None:
        if not fds:
            return
        with self._lock:
            grow = self._idle <= 0 and not self._stopping and self._live() < self._max
            self._idle -= 1  # the one this batch will wake, or one more batch waiting for a thread
            self._in_flight += len(fds)
        if grow:
            self._spawn()
        self._fds.put(list(fds))

    def pending(self) -> bool:
        """Whether fds wait to be closed (kept, queued or closing): a socket among them may still hold a map slot."""
        with self._lock:
            return self._in_flight > 0 or self._moving > 0 or bool(self._later)

    def _live(self) -> int:
        self._threads = [t for t in self._threads if t.is_alive()]
        return len(self._threads)

    @property
    def threads(self) -> int:
        with self._lock:
            return self._live()

    def _run(self, keep: bool) -> None:
        cpus.background()  # a socket's last close queues the kernel's release of its UMEM on this CPU
        while True:
            with self._lock:
                self._idle += 1
            try:
                batch = self._fds.get(timeout=None if keep else IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                return
            if batch is None:
                return
            for fd in batch:
                if self._defuse:
                    _no_linger(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
            # counted before it stops being pending: whoever sees pending() false sees this batch counted
            if self._on_closed is not None:
                self._on_closed(len(batch))
            with self._lock:
                self._in_flight -= len(batch)

    def stop(self, wait: bool = True) -> None:
        """Close whatever is still queued, then end the threads (without waiting for a close that may never
        return, unless asked to)."""
        with self._lock:
            self._stopping = True
            later, self._later = list(self._later), collections.deque()
            self._later_wake.notify()
        if self._later_thread is not None:  # a batch it took just before is queued ahead of the threads' ends
            self._later_thread.join()  # (it only queues: never blocks)
        with self._lock:
            threads = list(self._threads)
        for _, fds, _ in later:  # before the threads' ends: they close these first
            self._fds.put(fds)
        for _ in threads:
            self._fds.put(None)
        if wait:
            for t in threads:
                t.join()


_LINGER_OFF = struct.pack("ii", 1, 0)


def _no_linger(fd: int) -> None:
    """If fd is a socket, make its close abortive: no waiting for unsent data to drain."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # not a socket
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    finally:
        sock.detach()
