"""Who a process is and runs as: QEMU's identity from /proc (the broker is asked as that user), a process named
by pid and start time for good, and the hook's one privilege drop (to QEMU's user, in the broker agent)."""

from __future__ import annotations

import os
from pathlib import Path

from xskbroker.common import privileges, procfs
from xskbroker.common.records import record


@record(frozen=True)
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
    """The ids a process runs as; ValueError for a set-user-id or set-group-id one (its ids differ).

    QEMU never is one, but whoever listens on a QMP socket can exec one (su, passwd, sudo waiting for a
    password) and so make /proc name root as "QEMU's" user: the agent would then ask the broker as root."""
    uids, gids = procfs.status_ids(status_text, "Uid"), procfs.status_ids(status_text, "Gid")
    if len(set(uids)) != 1 or len(set(gids)) != 1:
        raise ValueError(f"the process runs set-user-id or set-group-id (uids {uids}, gids {gids}): it is not QEMU")
    uid, gid = uids[1], gids[1]  # all four are equal: the effective ones are those the broker sees
    groups = procfs.status_fields(status_text).get("Groups", "")
    return Identity(uid, gid, tuple(int(g) for g in groups.split()))


def same_process(pid: int | None, start: int | None) -> bool:
    """pid is still the process that had this start time, and has not exited (a zombie has)."""
    if not pid or start is None:
        return False
    pidfd = procfs.pidfd_open(pid)
    if pidfd is None:
        return False
    try:  # the pidfd pins the process while its start time is read, and says whether it has exited
        return procfs.is_process(pidfd, pid, start, None)
    finally:
        os.close(pidfd)


def drop_to(ident: Identity) -> None:
    """Become ident for good: its groups, gid and uid, no new privileges, and (unless it is root) no capability."""
    if os.geteuid() != 0:
        if (os.geteuid(), os.getegid()) == (ident.uid, ident.gid):
            return
        raise PermissionError(f"only root can act as QEMU's user ({ident}); this runs as uid {os.geteuid()}")
    privileges.drop_to(ident.uid, ident.gid, ident.groups)
