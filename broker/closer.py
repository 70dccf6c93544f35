"""Closing sent fds off the event loop.

When the client has already closed its copy, the broker's close is the last one, and releasing a bound
AF_XDP socket waits for an RCU grace period (synchronize_net: 5-15 ms here). On the event loop that
would stall every other client. A few threads do it instead (os.close releases the GIL): concurrent
waiters share grace periods, so closes keep pace with grants instead of queueing behind each other,
which would keep released queues busy long after their holders let go.

fds a client attached to a request are another matter: their close can block as long as the client likes
(a TCP socket lingering on a queue that never drains, a FUSE file whose flush never answers). They go to a
closer of their own, so they can stall neither the loop nor the closes of grant fds, and sockets among
them are defused first (SO_LINGER zero: the close resets instead of waiting).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading

WORKERS = 8


class Closer:
    def __init__(self, workers: int = WORKERS, name: str = "closer", defuse: bool = False) -> None:
        self._fds: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._defuse = defuse
        self._threads = [threading.Thread(target=self._run, name=f"xskbroker-{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def close(self, fds: list[int]) -> None:
        if fds:
            self._fds.put(list(fds))

    def _run(self) -> None:
        while (batch := self._fds.get()) is not None:
            for fd in batch:
                if self._defuse:
                    _no_linger(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def stop(self, wait: bool = True) -> None:
        """Close whatever is still queued, then end the threads (without waiting for a close that may never
        return, unless asked to)."""
        for _ in self._threads:
            self._fds.put(None)
        if wait:
            for t in self._threads:
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
