"""Writing audit lines to stderr without ever waiting for its reader.

stderr is whatever the broker was started with: a file, journald's stream socket (systemd), a pipe to a
supervisor's logger, a terminal. A reader that stops reading (a logger that hangs, a terminal stopped with ^S)
fills a pipe in 64 KiB, and from then on each write would block the event loop: the broker would answer no
one. Here a line the stream cannot take now waits in a bounded backlog and goes as the stream takes it (the
event loop's timer asks: next_flush, flush_if_due); past the backlog, records are counted, and one
"audit-lost" record says how many as soon as there is room. A line is only ever written whole and in order.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import TextIO

BACKLOG = 4 << 20  # bytes of lines kept while the stream takes none: thousands of records
RETRY = 0.05  # seconds between two tries while lines wait
Write = Callable[[bytes], int]  # writes what it can now, returns how much (0: nothing now); OSError when it never will


def nonblocking_writer(stream: TextIO) -> Write | None:
    """A writer for the stream's fd that never waits; None where writing through the stream itself never waits
    for a reader (a regular file) or there is no fd (an in-memory stream)."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    if stat.S_ISREG(mode):
        return None
    stream.flush()
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))  # send flags, not the fd's O_NONBLOCK: that is shared

        def send(data: bytes) -> int:
            try:
                return sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return 0
        return send
    try:
        # an open file description of our own: O_NONBLOCK on the inherited one would change it for every process
        # that shares it (the supervisor, its other services)
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        own = None

    def write(data: bytes) -> int:
        try:
            if own is not None:
                return os.write(own, data)
            # no description of our own: what poll says fits (a pipe with a free page takes PIPE_BUF bytes whole)
            if not select.select([], [fd], [], 0)[1]:
                return 0
            return os.write(fd, data[:select.PIPE_BUF])
        except (BlockingIOError, InterruptedError):
            return 0
    return write


class Lines:
    """Whole lines to a Write, in order, never waiting; what cannot go now waits (up to `backlog` bytes) for
    flush_if_due, what does not fit is counted in `lost` until `lost_line` can say so."""

    def __init__(self, out: Write, lost_line: Callable[[int], bytes], backlog: int = BACKLOG,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.lost_line, self.backlog, self.clock = out, lost_line, backlog, clock
        self.waiting: collections.deque[tuple[bytes, int]] = collections.deque()  # (line, records it stands for)
        self.waiting_bytes = 0
        self.lost = 0
        self._next = 0.0

    def write(self, line: bytes) -> None:
        """Queue one line and write what the stream takes now. OSError when the stream is broken (its reader
        gone): what waited, and this line, are counted lost."""
        try:
            self._drain()
        except OSError:
            self.lost += 1
            raise
        if not self._fits(len(line) + (len(self.lost_line(self.lost)) if self.lost else 0)):
            self.lost += 1
        else:
            self._say_lost()
            self._append(line, 1)
        self._drain()

    def _say_lost(self) -> None:
        if self.lost:
            self._append(self.lost_line(self.lost), self.lost)  # lost again with it, they are counted again
            self.lost = 0

    def _fits(self, n: int) -> bool:
        return not self.waiting or self.waiting_bytes + n <= self.backlog

    def _append(self, line: bytes, records: int) -> None:
        if not self.waiting:
            self._next = self.clock() + RETRY
        self.waiting.append((line, records))
        self.waiting_bytes += len(line)

    def _drain(self) -> None:
        try:
            while self.waiting:
                head, records = self.waiting[0]
                n = self.out(head)
                self.waiting_bytes -= n
                if n < len(head):
                    if n:  # the rest of a line started goes first, whatever comes
                        self.waiting[0] = (head[n:], records)
                    return
                self.waiting.popleft()
        except OSError:
            self.lost += sum(records for _, records in self.waiting)
            self.waiting.clear()
            self.waiting_bytes = 0
            raise

    def next_flush(self) -> float | None:
        """When the next try is due (None: nothing waits)."""
        return self._next if self.waiting or self.lost else None

    def flush_if_due(self) -> None:
        if (self.waiting or self.lost) and self.clock() >= self._next:
            self._next = self.clock() + RETRY
            try:
                self._drain()
                if not self.waiting:  # said now, not with the next record, which may be long in coming
                    self._say_lost()
                    self._drain()
            except OSError:  # the timer has no one to tell (the next record's write raises): try again later
                self._next = self.clock() + 1.0

    def drain(self, seconds: float) -> bool:
        """At exit: keep writing what waits for up to `seconds`; whether all of it went."""
        deadline = self.clock() + seconds
        while self.waiting or self.lost:
            self._next = 0.0
            self.flush_if_due()
            if not (self.waiting or self.lost) or self.clock() >= deadline:
                break
            time.sleep(0.01)
        return not (self.waiting or self.lost)
