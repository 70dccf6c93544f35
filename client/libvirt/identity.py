"""Who a process is and runs as: QEMU's identity from /proc (the broker is asked as that user), a process named
by pid and start time for good, and the hook's one privilege drop (to QEMU's user, in the broker agent)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from xskbroker.common import procfs


@dataclass(frozen=True)
class Identity:
    """Who a process runs as: the effective ids and the supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_process(cls, pid: int) -> Identity:
        return identity_from_status(Path(f"/proc/{pid}/status").read_text())

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid} groups {','.join(map(str, self.groups)) or '-'}"


def identity_from_status(status_text: str) -> Identity:
    fields = dict(line.split(":", 1) for line in status_text.splitlines() if ":" in line)
    try:
        uid = int(fields["Uid"].split()[1])  # real, effective, saved, fs: the broker sees the effective one
        gid = int(fields["Gid"].split()[1])
    except (KeyError, IndexError, ValueError):
        raise ValueError("no Uid/Gid lines in /proc/PID/status") from None
    return Identity(uid, gid, tuple(int(g) for g in fields.get("Groups", "").split()))


def same_process(pid: int | None, start: int | None) -> bool:
    """pid is still the process that had this start time, and has not exited (a zombie has)."""
    if not pid or start is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:  # the pidfd pins the process while its start time is read, and says whether it has exited
        return procfs.pinned_start(pidfd, pid) == start
    finally:
        os.close(pidfd)


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38


def drop_to(ident: Identity) -> None:
    """Become ident for good: its groups, gid and uid, no new privileges, and (unless it is root) no capability."""
    if os.geteuid() != 0:
        if (os.geteuid(), os.getegid()) == (ident.uid, ident.gid):
            return
        raise PermissionError(f"only root can act as QEMU's user ({ident}); this runs as uid {os.geteuid()}")
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if ident.uid != 0:
        caps = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:")]
        if not caps or int(caps[0].split()[1], 16):
            raise PermissionError(f"capabilities left after dropping to {ident}: {caps}")
