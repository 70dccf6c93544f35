"""Closing sent fds off the event loop.

When the client has already closed its copy, the broker's close is the last one, and releasing a bound
AF_XDP socket waits for an RCU grace period (synchronize_net: milliseconds). On the event loop that
would stall every other client; a thread does it instead (os.close releases the GIL).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading


class Closer:
    def __init__(self) -> None:
        self._fds: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="xskbroker-closer", daemon=True)
        self._thread.start()

    def close(self, fds: list[int]) -> None:
        if fds:
            self._fds.put(list(fds))

    def _run(self) -> None:
        while (batch := self._fds.get()) is not None:
            for fd in batch:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def stop(self) -> None:
        """Close whatever is still queued, then end the thread."""
        self._fds.put(None)
        self._thread.join()
