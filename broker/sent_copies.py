"""The broker's own copies of the fds it sent: handed to a helper process that keeps them a moment and closes them.

After a reply the broker still holds a copy of every fd it sent. Whoever closes a bound AF_XDP socket last
waits out an RCU grace period (5-15 ms), so the copies are kept a moment (a client that closes its own soon
after leaves that wait to us, not to its own thread), then closed, or at once when their lease ends (expedite).

Kept and closed on the broker's own threads (broker.closer), they cost the event loop a share of every request:
each closer thread back from its close takes the GIL, and the loop then waits for it after a syscall of its
own. A helper process (this module run as `python -m`, nothing of the broker inherited) keeps and closes them
instead. After each request the loop sends what it has to hand over in one message (SCM_RIGHTS) and closes its
own copies at once: the message and then the helper hold them, so the loop's close is never the last. Copies
are always held a moment (NOW_DELAY even for those to close now), so the helper never closes one before the
loop has closed its own, which would make the loop's the last. The helper answers, every few milliseconds, how
many it has closed, so pending() still says whether a socket among them may still hold a queue.

Nothing waits on it: while it starts (its first answer says it reads), when a send would block (it is behind
or stopped), or once it has died, the copies go to the closer threads as before. It runs on the background CPU
(broker.cpus), exits when its socket reaches end of file (after its last closes) and gets SIGTERM if the broker
dies first.

A helper that hangs (stopped, stuck) would keep what it was sent open for as long as it hangs: released queues
busy, pending() true. The loop looks at its answers every LOOK_EVERY (watch()); one whose count stays short of
the fds due HUNG_SECONDS ago, on two looks in a row (the first may find answers it had no room to send yet), is
killed, and its death closes every copy it held. The closer threads take over for good, as when it dies: a
helper that hung once may again, and each hang costs HUNG_SECONDS of busy queues; the threads cost the loop a
share of its throughput (docs/performance.md), nothing more. Its fds count as closed once it has exited (its
exit closes them, a grace period each).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from xskbroker.broker import cpus
from xskbroker.broker.closer import WORKERS, Closer

if TYPE_CHECKING:
    import subprocess

PER_MESSAGE = 250  # fds per message: the kernel takes at most SCM_MAX_FD (253)
NOW_DELAY = 0.002  # seconds the helper holds even a copy to close now: the loop closes its own first
ANSWER_EVERY = 0.002  # seconds: the helper answers at most this often (pending() reads the answers when asked)
STOP_SECONDS = 2.0  # how long stop() waits for the helper's last closes before it kills it
# A helper that has not closed fds due this long ago is hung: it closes a due group within a grace period (5-15 ms),
# so this is ample for a loaded host, and bounds how long a hung one keeps released queues busy (about
# HUNG_SECONDS + 2 * LOOK_EVERY, then its exit's closes)
HUNG_SECONDS = 3.0
LOOK_EVERY = 0.25  # seconds: how often the loop reads the answers while fds are outstanding (watch())
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)  # a send that says the helper is gone
_COUNT = struct.Struct("=Q")  # an answer: how many fds the helper has closed so far
# one entry of a message: how many of its fds are the entry's (0: close now what is kept under the key),
# after how many microseconds to close them, and the key's length (the key follows)
_ENTRY = struct.Struct("=HIB")
MAX_KEY = 64


class SentCopies:
    """Used by the event loop alone: close, close_later and expedite only queue; flush() sends."""

    def __init__(self, helper: bool = True, on_hung: Callable[[int], None] | None = None) -> None:
        # (fds, delay, key) to hand over; fds empty: an expedite of key
        self._out: list[tuple[list[int], float, str | None]] = []
        self._kept: dict[str, float] = {}  # key -> when the helper closes it anyway (expedite needs no message after)
        self._sent = 0  # fds the helper was sent
        self._closed = 0  # of those, how many it says it has closed
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._broken = not helper  # no helper (it could not start, or it died): the closer threads close
        self._ready = False  # the helper has answered once: it is reading
        self._threads: Closer | None = None
        # when each message's fds are due and how many (a heap), until HUNG_SECONDS after; then counted in _owed
        self._due: list[tuple[float, int]] = []
        self._owed = 0  # fds sent that were due HUNG_SECONDS ago or more: the helper's count must have reached it
        self._short_since: float | None = None  # the look that first found its count short of _owed
        self._next_look = 0.0
        self._given_up = False  # killed for hanging
        self._on_hung = on_hung  # told the pid of a helper killed for hanging (the server's audit)

    def close(self, fds: list[int]) -> None:
        if fds:
            self._out.append((list(fds), NOW_DELAY, None))

    def close_later(self, fds: list[int], delay: float, key: str | None = None) -> None:
        """Close fds after `delay` seconds, or when expedite(key) says their holder is done with them."""
        if fds:
            self._out.append((list(fds), max(delay, NOW_DELAY), key))

    def expedite(self, key: str) -> None:
        """Close now what close_later keeps under `key` (a lease ended: its queue is free for the next grant)."""
        due = self._kept.pop(key, None)
        if (due is not None and due > time.monotonic()) or any(k == key for _, _, k in self._out):
            self._out.append(([], 0.0, key))  # one still queued: the helper reads the two in order
        if self._threads is not None:  # given to the threads while the helper started, or was behind
            self._threads.expedite(key)

    def flush(self) -> None:
        """Hand over what close, close_later and expedite queued (the event loop calls it after each event)."""
        if not self._out:
            return
        entries, self._out = self._out, []
        sock = self._started()
        if sock is not None and not self._ready:
            self._answers()
            # one still starting (about 30 ms) would hold the copies meanwhile: a holder that exits then would
            # leave its sockets open here, and its lease orphaned
            sock = self._sock if self._ready else None
        for chunk in _messages(entries):
            fds = [fd for group, _, _ in chunk for fd in group]
            if sock is not None:
                try:
                    socket.send_fds(sock, [_header(chunk)], fds)
                except OSError as e:
                    if e.errno in _GONE:
                        self._lost()
                        sock = None
                    # else the helper is behind (EAGAIN), or too many fds are in flight (ETOOMANYREFS: a user's
                    # limit, RLIMIT_NOFILE): these go to the threads, the next message tries it again
                else:
                    self._sent += len(fds)
                    if fds:
                        heapq.heappush(self._due, (time.monotonic() + max(d for _, d, _ in chunk), len(fds)))
                    for fd in fds:  # ours: the message holds them, then the helper, for at least NOW_DELAY
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    now = time.monotonic()
                    for group, delay, key in chunk:
                        if group and key is not None:
                            self._kept[key] = now + delay
                    continue
            self._to_threads(chunk)
        if len(self._kept) > 1024:  # keys whose copies are closed by now: no expedite needs them
            now = time.monotonic()
            self._kept = {k: due for k, due in self._kept.items() if due > now}

    def pending(self) -> bool:
        """Whether fds wait to be closed (queued, kept or closing): a socket among them may still hold a queue."""
        if self._sent > self._closed:
            self._answers()
            self._reaped()
        return bool(self._out or self._sent > self._closed or (self._threads is not None and self._threads.pending()))

    def stop(self) -> None:
        """Hand over what is queued, then end the helper once its closes are done (killed after STOP_SECONDS):
        what it keeps it closes at once when told to stop."""
        self.flush()
        if self._sock is not None:
            self._sock.close()  # end of file: the helper closes what it keeps and exits
            self._sock = None
        if self._proc is not None:
            from xskbroker.broker import helper_process

            helper_process.stop(self._proc, STOP_SECONDS)
            self._proc = None
        if self._threads is not None:
            self._threads.stop()

    def watch(self) -> float | None:
        """Kill a helper that keeps fds it should have closed (the loop calls it each round); the seconds until it
        wants to be called again, None when nothing is outstanding."""
        if self._sock is None:  # none, or lost: its fds are closed once it has exited (pending() looks too)
            return None if self._reaped() else LOOK_EVERY
        if self._sent <= self._closed:
            return None
        now = time.monotonic()
        if now < self._next_look:
            return self._next_look - now
        self._next_look = now + LOOK_EVERY
        self._answers()
        while self._due and self._due[0][0] <= now - HUNG_SECONDS:
            self._owed += heapq.heappop(self._due)[1]
        if self._broken:  # lost while its answers were read
            return LOOK_EVERY
        if self._closed >= self._owed:
            self._short_since = None
        elif self._short_since is None:
            self._short_since = now  # it may have had no room to answer: the next look reads what it sends now
        else:
            self._given_up = True
            if self._proc is not None:
                self._proc.kill()
                if self._on_hung is not None:
                    self._on_hung(self._proc.pid)
            self._lost()
            return LOOK_EVERY
        return LOOK_EVERY if self._sent > self._closed else None

    @property
    def given_up(self) -> bool:
        """Whether the helper was killed for hanging."""
        return self._given_up

    def helper_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def helper_ready(self) -> bool:
        """Whether the helper is reading (copies go to it, not to the closer threads)."""
        if self._sock is not None and not self._ready:
            self._answers()
        return self._sock is not None and self._ready

    def _to_threads(self, chunk: list[tuple[list[int], float, str | None]]) -> None:
        if self._threads is None:
            self._threads = Closer()
        for group, delay, key in chunk:
            if not group:
                if key is not None:
                    self._threads.expedite(key)
            elif delay > NOW_DELAY:
                self._threads.close_later(group, delay, key)
            else:
                self._threads.close(group)

    def _answers(self) -> None:
        """Read how many the helper has closed (each answer is its running total)."""
        while self._sock is not None:
            try:
                data = self._sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            if len(data) == _COUNT.size:
                self._ready = True
                self._closed = max(self._closed, _COUNT.unpack(data)[0])

    def _lost(self) -> None:
        """The helper is gone: its exit closes what it kept and what was queued to it."""
        self._kept.clear()
        self._due.clear()
        self._owed, self._short_since = 0, None
        self._broken = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reaped()

    def _reaped(self) -> bool:
        """Whether a lost helper has exited (reaped now if so): only then are its closes done. True if none."""
        if self._sock is not None:
            return self._proc is None
        if self._proc is not None:
            if self._proc.poll() is None:
                return False
            self._proc = None
        self._closed = self._sent
        return True

    def _started(self) -> socket.socket | None:
        if self._sock is not None or self._broken:
            return self._sock
        # here, not at import: the first grant's reply is out before its copies are handed over (a cold start)
        from xskbroker.broker import helper_process

        background = cpus.background_cpus()
        started = helper_process.start("xskbroker.broker.sent_copies",
                                       ",".join(map(str, sorted(background))) if background else "")
        if started is None:
            self._broken = True
            return None
        self._sock, self._proc = started
        self._sock.setblocking(False)
        return self._sock


Entry = tuple[list[int], float, str | None]


def _messages(entries: list[Entry]) -> list[list[Entry]]:
    """Entries packed into messages of at most PER_MESSAGE fds (a larger group is cut), in order."""
    out: list[list[Entry]] = [[]]
    room = PER_MESSAGE
    for group, delay, key in entries:
        parts = [group[at:at + PER_MESSAGE] for at in range(0, len(group), PER_MESSAGE)] or [[]]
        for part in parts:
            if len(part) > room or len(out[-1]) >= 255:
                out.append([])
                room = PER_MESSAGE
            out[-1].append((part, delay, key))
            room -= len(part)
    return [m for m in out if m]


def _header(chunk: list[Entry]) -> bytes:
    out = [bytes([len(chunk)])]
    for group, delay, key in chunk:
        k = (key or "").encode()[:MAX_KEY]
        out.append(_ENTRY.pack(len(group), int(delay * 1e6), len(k)) + k)
    return b"".join(out)


def sent_in(header: bytes) -> int:
    """How many fds the broker sent with a message, by its header (0 when it cannot be read)."""
    total, at = 0, 1
    try:
        for _ in range(header[0]):
            n, _, klen = _ENTRY.unpack_from(header, at)
            at += _ENTRY.size + klen
            total += n
    except (IndexError, struct.error):
        return 0
    return total


def parse(header: bytes, fds: list[int]) -> list[Entry]:
    """The helper's side of _header: each entry's fds, delay and key. A header that does not add up to the fds
    (never from our broker) closes every fd now."""
    out: list[Entry] = []
    try:
        at, count = 1, header[0]
        used = 0
        for _ in range(count):
            n, micros, klen = _ENTRY.unpack_from(header, at)
            at += _ENTRY.size
            key = header[at:at + klen].decode() if klen else None
            at += klen
            out.append((fds[used:used + n], micros / 1e6, key))
            used += n
        if used != len(fds) or at != len(header):
            raise ValueError("the header does not match the fds")
    except (IndexError, ValueError, struct.error, UnicodeDecodeError):
        return [([fd], 0.0, None) for fd in fds]
    return out


class _Helper:
    """The helper's side: one thread reads the broker's messages, keeps the copies until due (or expedited),
    hands each due group to a closer thread of its own, and answers how many are closed, at most every
    ANSWER_EVERY: no thread of its own for the timing or the answers, whose wake-ups cost the background CPU
    more than the closes' own bookkeeping."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._closed = 0  # fds the closer threads have closed (they add; this thread reads)
        self._lock = threading.Lock()
        self.closer = Closer(WORKERS, name="sent", on_closed=self._count)
        self.kept: list[tuple[float, int, list[int], str | None]] = []  # a heap by when due
        self._seq = 0  # keeps the heap from comparing fds
        self._told = -1  # the first answer (0) says the helper is reading
        self._next_answer = 0.0
        # the broker's end is full (it reads answers only when it asks pending()): wait until it has room,
        # not on a timer, or an idle helper would wake every ANSWER_EVERY for as long as the broker is idle
        self._blocked = False

    def _count(self, n: int) -> None:
        with self._lock:
            self._closed += n

    def serve(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        try:
            while True:
                timeout = self._due_work()
                if timeout is False:
                    return
                poller.modify(self.sock, select.POLLIN | (select.POLLOUT if self._blocked else 0))
                ready = poller.poll(None if timeout is None else max(1, int(timeout * 1000 + 0.999)))
                if not any(ev & ~select.POLLOUT for _, ev in ready):
                    continue  # a timer, or room for an answer: nothing to read
                try:
                    msg, fds, flags, _ = socket.recv_fds(self.sock, 1 + 255 * (_ENTRY.size + MAX_KEY), PER_MESSAGE)
                except OSError:
                    return
                if not msg and not fds:
                    return  # end of file: the broker is stopping
                if flags & socket.MSG_CTRUNC:  # out of fds here: the kernel closed those that did not fit
                    self._count(max(0, sent_in(msg) - len(fds)))
                self._take(parse(msg, fds))
        finally:
            for _, _, group, _ in self.kept:  # what is kept closes now, every close done before the exit says so
                self.closer.close(group)
            self.kept = []
            self.closer.stop(wait=True)

    def _take(self, entries: list[Entry]) -> None:
        now = time.monotonic()
        for group, delay, key in entries:
            if group:
                self._seq += 1
                heapq.heappush(self.kept, (now + delay, self._seq, group, key))
            elif key is not None:  # a lease ended: its copies close now
                found = [e for e in self.kept if e[3] == key]
                if found:
                    self.kept = [e for e in self.kept if e[3] != key]
                    heapq.heapify(self.kept)
                    for e in found:
                        self.closer.close(e[2])

    def _due_work(self) -> float | bool | None:
        """Close what is due and answer if it is time; the seconds until there is more to do (None: nothing
        until a message comes; False: the broker is gone)."""
        now = time.monotonic()
        while self.kept and self.kept[0][0] <= now:
            self.closer.close(heapq.heappop(self.kept)[2])  # each group on a closer thread of its own
        # pending first, then the count: a closer thread counts a batch before it stops being pending, so a
        # helper that finds nothing pending has the final count (read the other way round, a batch closed in
        # between was neither pending nor counted, and its count was never sent: pending() stayed true)
        busy = self.closer.pending()
        with self._lock:
            total = self._closed
        if total != self._told and now >= self._next_answer:
            try:
                self.sock.send(_COUNT.pack(total), socket.MSG_DONTWAIT)
            except BlockingIOError:  # the broker is behind reading answers: the next one carries this too
                self._blocked = True
            except OSError:
                return False
            else:
                self._told, self._next_answer, self._blocked = total, now + ANSWER_EVERY, False
        waits = [self.kept[0][0] - now] if self.kept else []
        if busy or (total != self._told and not self._blocked):  # answer again soon
            waits.append(ANSWER_EVERY)
        return max(0.0, min(waits)) if waits else None


def serve(sock: socket.socket) -> None:
    _Helper(sock).serve()


def main() -> None:
    from xskbroker.common.libc import PR_SET_PDEATHSIG, libc

    libc.prctl(PR_SET_PDEATHSIG, 15, 0, 0, 0)  # SIGTERM when the broker thread that started it is gone
    fd = int(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2]:
        cpus.pin(frozenset(int(c) for c in sys.argv[2].split(",")))  # its closer threads inherit it
    with contextlib.suppress(KeyboardInterrupt), socket.socket(fileno=fd) as sock:
        serve(sock)


if __name__ == "__main__":
    main()
