"""Lease holders' pidfds: the server watches them for exits, the service signals a revoked holder through them.

Made by the daemon and given to both (the service as its signal_holder callback), so neither assigns into
the other. A pidfd is only used to signal a process proven to be the holder: the start time and pidfs
inode recorded at grant must match, so a process that reused the holder's pid is never signalled.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
from collections.abc import Callable, Iterable

from xskbroker.broker.lease_record import Lease
from xskbroker.broker.peer import peer_pidfd
from xskbroker.common.procfs import has_exited, is_process, pidfd_open, pinned_start

# a process as a lease records it: (start time, pidfs inode), either unknown (None)
Identity = tuple[int | None, int | None]
ExitedFn = Callable[[int, int | None, int | None], None]


def same_process(a: Identity, b: Identity) -> bool:
    """Whether two identities of one pid may be the same process (what either does not know matches)."""
    return all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


class Holders:
    def __init__(self) -> None:
        self.pidfds: dict[int, int] = {}  # pid -> pidfd, kept by the server while the pid holds a lease
        self._who: dict[int, Identity] = {}  # pid -> the identity of the process its pidfd pins
        # pid -> identity of holders the broker could not open a pidfd for (out of fds): still holders, never taken
        # for exited; watched at the next prune that can
        self.unwatched: dict[int, Identity] = {}
        self._sel: selectors.BaseSelector | None = None
        self._exited: ExitedFn = lambda pid, start, ino: None

    def attach(self, sel: selectors.BaseSelector, exited: ExitedFn) -> None:
        """Watch the pidfds through the server's selector; exited(pid, start, ino) once a holder is gone: pids are
        reused, so it ends only the leases of that process, not those of another process with its pid."""
        self._sel, self._exited = sel, exited

    def watch(self, pid: int, conn: socket.socket | None = None, start: int | None = None,
              ino: int | None = None) -> None:
        """Learn when a lease holder exits: its pidfd becomes readable. Without the connection, the pid is
        opened bare: it is the holder only if the process has the start time (and inode) the lease recorded."""
        was = self.unwatched.pop(pid, None)
        if was is not None and not same_process(was, (start, ino)):
            self._exited(pid, *was)  # the pid names another process now: the unwatched holder is gone
        watched = self.pidfds.get(pid)
        if watched is not None:
            if same_process(self._who[pid], (start, ino)):
                return
            # the pid names two processes: the watched one exited and its pid was reused (its exit is handled
            # now, for its own leases), or this lease's holder exited before it could be watched
            if not has_exited(watched):
                self._exited(pid, start, ino)
                return
            self._on_exit(pid)
        try:
            pidfd = peer_pidfd(conn, pid) if conn is not None else pidfd_open(pid)
        except OSError:  # out of fds: whether it lives is unknown, and it keeps its leases until it can be told
            self.unwatched[pid] = (start, ino)
            return
        if pidfd is not None and conn is None and not is_process(pidfd, pid, start, ino):
            os.close(pidfd)  # the holder exited and the pid names another process
            pidfd = None
        if pidfd is None:
            self._exited(pid, start, ino)  # already gone
            return
        self.pidfds[pid] = pidfd
        self._who[pid] = (start, ino)
        assert self._sel is not None, "attach() first"
        self._sel.register(pidfd, selectors.EVENT_READ, lambda fd, pid=pid: self._on_exit(pid))

    def deliver_exit(self, pid: int) -> bool:
        """Whether holder pid has exited: if the kernel already says so (its pidfd is readable) but the loop
        has not yet read that event, the exit is handled now (exited(pid)), so that a lease it ended never
        refuses a request that came in the same round. The event itself is then stale, and skipped."""
        pidfd = self.pidfds.get(pid)
        if pidfd is None or not has_exited(pidfd):
            return False
        self._on_exit(pid)
        return True

    def prune(self, let_go: Iterable[int], held: Callable[[int], bool], holders: int) -> None:
        """Stop watching the processes that no longer hold a lease (held(pid) says): those that let their last
        one go (let_go), looked at alone, since every round of the loop prunes; all of them only when more pids are
        watched than hold a lease (holders), which a pid watched after its lease was undone can cause."""
        for pid in let_go:
            if pid in self.pidfds and not held(pid):
                self._forget(pid)
        for pid, (start, ino) in list(self.unwatched.items()):  # a few, and only while fds ran out
            if held(pid):
                self.watch(pid, None, start, ino)  # opened bare: proven to be the holder by its start and inode
            else:
                del self.unwatched[pid]
        if len(self.pidfds) > holders:
            for pid in [p for p in self.pidfds if not held(p)]:
                self._forget(pid)

    def _on_exit(self, pid: int) -> None:
        start, ino = self._who[pid]
        self._forget(pid)
        self._exited(pid, start, ino)

    def _forget(self, pid: int) -> None:
        pidfd = self.pidfds.pop(pid)
        del self._who[pid]
        if self._sel is not None:
            self._sel.unregister(pidfd)
        os.close(pidfd)

    def signal(self, lease: Lease, signame: str) -> str | None:
        """Signal a lease's holder through a pidfd proven to be it (the start time and pidfs inode recorded
        at grant): None when sent, else why nothing was sent."""
        pid, start = lease.pid, lease.pid_start
        if start is None:
            return f"no start time was recorded for holder pid {pid}: nothing was signalled"
        pidfd = self.pidfds.get(pid)
        opened = pidfd is None
        if pidfd is None:
            try:
                pidfd = pidfd_open(pid)
            except OSError as e:
                return f"cannot open a pidfd for holder pid {pid} ({e.strerror}): nothing was signalled"
            if pidfd is None:
                return f"holder pid {pid} has exited: nothing was signalled"
        try:
            if pinned_start(pidfd, pid) is None:
                return f"holder pid {pid} has exited: nothing was signalled"
            if not is_process(pidfd, pid, start, lease.pid_ino):
                return (f"holder pid {pid} has exited and the pid now names another process (another start time "
                        "or pidfs inode): nothing was signalled")
            signal.pidfd_send_signal(pidfd, signal.Signals[signame])
        except OSError as e:
            if e.errno == errno.EPERM:
                return (f"the broker (uid {os.geteuid()}) may not signal holder pid {pid} of another user: that needs "
                        "CAP_KILL, which the shipped systemd unit does not keep (docs/systemd.md)")
            return f"pidfd_send_signal to holder pid {pid} failed: {e.strerror}"
        finally:
            if opened:
                os.close(pidfd)
        return None

    def close(self) -> None:
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()
        self._who.clear()
        self.unwatched.clear()
