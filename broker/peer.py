"""Who is on the other end of a connection, as the kernel says (never as the message says)."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass, field

from xskbroker.common.procfs import pidfd_ino, pidfd_open, pinned_start

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_UCRED = struct.Struct("=iII")
MAX_GROUPS = 65536


@dataclass(frozen=True)
class PeerInfo:
    pid: int
    uid: int
    gid: int
    gids: frozenset[int]
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)
    exe: str | None = None
    cgroup: str | None = None
    start: int | None = None  # start time, proven through a pidfd; None: this process can never be signalled
    ino: int | None = None  # its pidfs inode (common.procfs.pidfd_ino)

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "user": self.user, "exe": self.exe,
                "cgroup": self.cgroup}


def peer_groups(sock: socket.socket) -> frozenset[int]:
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            return frozenset(struct.unpack(f"={len(raw) // 4}I", raw))
        except OSError as e:
            # the list is longer than the buffer: grow it (bounded by NGROUPS_MAX)
            if e.errno != errno.ERANGE or size >= MAX_GROUPS * 4:
                raise
            size *= 4


def peer_pidfd(sock: socket.socket | None, pid: int) -> int | None:
    """A pidfd for the peer: SO_PEERPIDFD (race-free, kernel >= 6.5), else pidfd_open on its pid."""
    if sock is not None:
        with contextlib.suppress(OSError):
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
    return pidfd_open(pid)


NAME_TTL = 30.0  # seconds a resolved user/group name is trusted: NSS (files, LDAP, sssd) is slow to ask
_names: dict[tuple[str, int], tuple[float, str | None]] = {}


def _name(lookup, ident: int) -> str | None:  # type: ignore[no-untyped-def]
    key = (lookup.__name__, ident)
    now = time.monotonic()
    hit = _names.get(key)
    if hit and now - hit[0] < NAME_TTL:
        return hit[1]
    try:
        name: str | None = str(lookup(ident)[0])
    except KeyError:
        name = None
    if len(_names) > 4096:  # bounded: a flood of distinct ids cannot grow it without end
        _names.clear()
    _names[key] = (now, name)
    return name


def identify(sock: socket.socket) -> PeerInfo:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    gids = peer_groups(sock) | {gid}
    exe = cgroup = None
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
        # the unified (v2) hierarchy line "0::/path"; the audit trail names the service or scope
        cgroup = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    names = frozenset(n for n in (_name(grp.getgrgid, g) for g in gids) if n)
    return PeerInfo(pid, uid, gid, gids, _name(pwd.getpwuid, uid), names, exe, cgroup, *_peer_identity(sock, pid))


def _peer_identity(sock: socket.socket, pid: int) -> tuple[int | None, int | None]:
    """The connecting process's start time and pidfs inode, read through SO_PEERPIDFD (which names it
    race-free); no start time if it has exited (its pid may already name another process) or the kernel
    has no SO_PEERPIDFD (< 6.5)."""
    try:
        pidfd = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
    except OSError:
        return None, None
    try:
        return pinned_start(pidfd, pid), pidfd_ino(pidfd)
    finally:
        os.close(pidfd)
