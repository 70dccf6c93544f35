"""Closing sent fds off the event loop.

When the client has already closed its copy, the broker's close is the last one, and releasing a bound
AF_XDP socket waits for an RCU grace period (synchronize_net: 5-15 ms here). On the event loop that
would stall every other client. A few threads do it instead (os.close releases the GIL): concurrent
waiters share grace periods, so closes keep pace with grants instead of queueing behind each other,
which would keep released queues busy long after their holders let go.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading

WORKERS = 8


class Closer:
    def __init__(self, workers: int = WORKERS) -> None:
        self._fds: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"xskbroker-closer-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def close(self, fds: list[int]) -> None:
        if fds:
            self._fds.put(list(fds))

    def _run(self) -> None:
        while (batch := self._fds.get()) is not None:
            for fd in batch:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def stop(self) -> None:
        """Close whatever is still queued, then end the threads."""
        for _ in self._threads:
            self._fds.put(None)
        for t in self._threads:
            t.join()
