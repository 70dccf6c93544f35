"""Lease holders' pidfds: the server watches them for exits, the service signals a revoked holder through them.

Made by the daemon and given to both (the service as its signal_holder callback), so neither assigns into
the other. A pidfd is only used to signal a process proven to be the holder: the start time and pidfs
inode recorded at grant must match, so a process that reused the holder's pid is never signalled.
"""

from __future__ import annotations

import errno
import os
import signal

from xskbroker.broker.leases import Lease
from xskbroker.common.procfs import is_process, pidfd_open, pinned_start


class Holders:
    def __init__(self) -> None:
        self.pidfds: dict[int, int] = {}  # pid -> pidfd, kept by the server while the pid holds a lease

    def signal(self, lease: Lease, signame: str) -> str | None:
        """Signal a lease's holder through a pidfd proven to be it (the start time and pidfs inode recorded
        at grant): None when sent, else why nothing was sent."""
        pid, start = lease.pid, lease.pid_start
        if start is None:
            return f"no start time was recorded for holder pid {pid}: nothing was signalled"
        pidfd = self.pidfds.get(pid)
        opened = pidfd is None
        if pidfd is None:
            pidfd = pidfd_open(pid)
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
