"""What /proc and pidfds say about a process: its start time, identity, capabilities and memlock limits.

Raw os calls where they sit on the grant path. Used by the broker (lease holders) and the launchers.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import select
import socket

from xskbroker.common.libc import libc

# Linux 6.5: getsockopt(SOL_SOCKET) gives a pidfd of a unix socket's peer (for a connecting socket, the process
# that listens); Python 3.11 has no name for it
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)

PIDFS_MAGIC = 0x50494446
_pidfs: bool | None = None  # whether pidfds live on pidfs (Linux 6.9+), found on first use


def pidfd_open(pid: int) -> int | None:
    """A pidfd for pid, or None when there is no such process (gone, or pid names a thread, not a process).

    Raises OSError when the broker cannot tell (out of fds, EMFILE/ENFILE; out of memory): a live holder must
    never be taken for one that exited because the broker ran out of fds.
    """
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.EINVAL):
            return None
        raise


def status_fields(status_text: str) -> dict[str, str]:
    """/proc/<pid>/status text as {"Uid": "1000\t1000\t1000\t1000", "CapEff": "0000000000000000", ...}."""
    fields = {}
    for line in status_text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def status_ids(status_text: str, field: str = "Uid") -> tuple[int, int, int, int]:
    """(real, effective, saved, filesystem) ids of the Uid or Gid line of /proc/<pid>/status text.

    Raises ValueError without such a line. SO_PEERCRED gives the effective one; "same user" means the real one.
    """
    try:
        real, effective, saved, fs = (int(v) for v in status_fields(status_text)[field].split())
    except (KeyError, ValueError):
        raise ValueError(f"no {field} line in /proc/PID/status") from None
    return real, effective, saved, fs


def has_cap(status_text: str, cap: int, field: str = "CapEff") -> bool:
    """Whether capability number `cap` is in the set `field` (CapEff, CapPrm, ...) of /proc/<pid>/status text."""
    value = status_fields(status_text).get(field)
    return value is not None and bool(int(value, 16) >> cap & 1)


@functools.cache  # the broker's capabilities do not change while it runs (it neither drops nor gains any)
def own_caps() -> int | None:
    """This process's effective capabilities (CapEff of /proc/self/status) as a bit mask; None when unreadable."""
    try:
        with open("/proc/self/status") as f:
            value = status_fields(f.read()).get("CapEff")
    except OSError:
        return None
    return int(value, 16) if value is not None else 0


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    try:  # raw os calls: this read is on the grant path, and text-mode open() doubles its cost
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    return start_from_stat(stat)


def start_from_stat(stat: str) -> int:
    """Field 22 of /proc/PID/stat text: the start time in clock ticks since boot."""
    # the command name may hold spaces and parentheses: fields are counted after its last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def pinned_start(pidfd: int, pid: int) -> int | None:
    """The start time of the process pidfd refers to (pid is its pid), or None if it has exited.

    A pidfd pins a process, not its pid number: once the process is reaped the pid can name another one.
    /proc/<pid>/stat is read first, then the pidfd is polled: still running after the read means the pid
    named the pinned process during the read, so the start time read is its own.
    """
    start = process_start(pid)
    if start is None or has_exited(pidfd):
        return None
    return start


def has_exited(pidfd: int) -> bool:
    """Whether the process a pidfd pins has exited: its pidfd is readable (a zombie, or reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def pidfd_ino(pidfd: int) -> int | None:
    """The pidfd's inode number on pidfs (Linux 6.9+): unique to one process for the whole boot, where a
    start time is only as fine as a clock tick (10 ms). None on older kernels (one shared anon inode)."""
    global _pidfs
    if _pidfs is None:
        buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field, a C long
        ok = libc.fstatfs(pidfd, buf) == 0
        _pidfs = ok and ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == PIDFS_MAGIC
    return os.fstat(pidfd).st_ino if _pidfs else None


def is_process(pidfd: int, pid: int, start: int | None, ino: int | None) -> bool:
    """Whether the live process pidfd pins is the one recorded as (pid, start, ino); never without a start."""
    if start is None or (ino is not None and pidfd_ino(pidfd) != ino):
        return False
    return pinned_start(pidfd, pid) == start


def memlock_limits(limits_text: str) -> tuple[int | None, int | None] | None:
    """(soft, hard) RLIMIT_MEMLOCK from /proc/<pid>/limits text, None for "unlimited"; None without the line.

    /proc is read because prlimit(2) on another user's process needs CAP_SYS_RESOURCE even to read.
    """
    for line in limits_text.splitlines():
        if line.startswith("Max locked memory"):
            fields = line[len("Max locked memory"):].split()
            soft, hard = fields[0], fields[1] if len(fields) > 1 else fields[0]
            return tuple(None if v == "unlimited" else int(v) for v in (soft, hard))  # type: ignore[return-value]
    return None
