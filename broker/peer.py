"""Who is on the other end of a connection, as the kernel says (never as the message says)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Iterable

from xskbroker.broker.subids import owner_of
from xskbroker.common.procfs import (
    SO_PEERPIDFD,
    has_exited,
    is_process,
    own_caps,
    pidfd_ino,
    pidfd_open,
    pinned_start,
)
from xskbroker.common.records import field, record

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERSEC = getattr(socket, "SO_PEERSEC", 31)
MAX_LABEL = 4096  # the kernel's own bound on a security context handed out through SO_PEERSEC
_UCRED = struct.Struct("=iII")
MAX_GROUPS = 65536  # NGROUPS_MAX
# Supplementary groups a peer may have and still be judged. Any user with subordinate gids (newgidmap) can
# have 65,536 in a user namespace of its own, and what is judged per group (the policy's numeric group
# entries, a quota for each group "*", the lease journal's record) would then cost every client the loop's time.
MAX_PEER_GROUPS = 1024


@record(frozen=True)
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
    label: str | None = None  # its LSM label (SO_PEERSEC) when an LSM labels sockets, else None
    owner: int | None = None  # the user whose subordinate uid this is (broker.subids), else None

    @property
    def principal(self) -> int:
        """The uid its use is counted against: per-user quotas, shares, audit bursts (broker.subids)."""
        return self.uid if self.owner is None else self.owner

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"pid": self.pid, "uid": self.uid, "gid": self.gid, "user": self.user,
                                  "exe": self.exe, "cgroup": self.cgroup}
        if self.label is not None:
            out["label"] = self.label
        if self.owner is not None:
            out["owner"] = self.owner
        return out


PY_SOCKOPT_MAX = 1024  # Python's getsockopt refuses a larger buffer itself ("buflen out of range"), kernel unasked


def read_sockopt(sock: socket.socket, opt: int, size: int) -> bytes:
    """getsockopt(SOL_SOCKET, opt) into `size` bytes: through libc past the 1024 Python's own allows (a peer's
    supplementary groups past 256, an LSM label past 1 KiB). OSError carries the kernel's errno."""
    if size <= PY_SOCKOPT_MAX:
        return sock.getsockopt(socket.SOL_SOCKET, opt, size)
    import ctypes

    from xskbroker.common.libc import errno_error, libc

    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, opt, buf, ctypes.byref(length)) != 0:
        raise errno_error(f"getsockopt {opt}")
    return buf.raw[:length.value]


def peer_groups(sock: socket.socket, most: int = MAX_GROUPS) -> frozenset[int] | None:
    """The peer's supplementary groups as the kernel recorded them at connect(2); None if there are more than
    `most` of them (the list is never read past that)."""
    size = 64 * 4
    while True:
        try:
            raw = read_sockopt(sock, SO_PEERGROUPS, size)
            return frozenset(struct.unpack(f"={len(raw) // 4}I", raw[:len(raw) - len(raw) % 4]))
        except OSError as e:
            # the list is longer than the buffer: grow it, up to `most`
            if e.errno != errno.ERANGE:
                raise
            if size >= most * 4:
                return None
            size = min(size * 4, most * 4)


def so_peerpidfd(sock: socket.socket) -> int | None:
    """SO_PEERPIDFD's pidfd of the peer (race-free, kernel >= 6.5); None when the peer was reaped (peer_reaped): its
    pid may name another process now. Raises OSError otherwise: ENOPROTOOPT on a kernel without it, EMFILE out of
    fds (never taken for "the peer is gone")."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
    except OSError as e:
        if peer_reaped(e):
            return None
        raise


def peer_pidfd(sock: socket.socket | None, pid: int) -> int | None:
    """A pidfd for the peer: so_peerpidfd, else (a kernel without it) pidfd_open on its pid. None when the peer is
    gone; OSError when the broker cannot tell (out of fds)."""
    if sock is not None:
        try:
            return so_peerpidfd(sock)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT:
                raise
    return pidfd_open(pid)


def peer_reaped(e: OSError) -> bool:
    """Whether SO_PEERPIDFD failed because the peer has been reaped: ESRCH (Linux 6.16-6.17), EINVAL (6.5-6.15:
    pidfd_prepare finds no task behind the struct pid; flags are 0, so that is its only EINVAL). Linux 6.18
    gives a pidfd of the exited process instead."""
    return e.errno in (errno.ESRCH, errno.EINVAL)


NAME_TTL = 30.0  # seconds a resolved user/group name is trusted: NSS (files, LDAP, sssd) is slow to ask
_names: dict[tuple[str, int], tuple[float, str | None]] = {}


class GroupNames:
    """A peer's group names, as far as the policy can tell them apart: of the group names the policy names, those
    whose gid (NSS, asked at most once per NAME_TTL per name) the peer holds.

    Not NSS asked for the name of each of the peer's gids: that was one lookup per gid per new connection, on
    the loop, and the peer chooses its gids (65,536 of them froze every client for 5 s a connect)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(names)
        self._gids: dict[str, tuple[float, int | None]] = {}

    def use(self, names: frozenset[str]) -> None:
        """Judge by these names from now on (a policy reload); what is known of names kept stays."""
        if names != self.names:
            self.names = names
            self._gids = {n: v for n, v in self._gids.items() if n in names}

    def of(self, gids: frozenset[int]) -> frozenset[str]:
        now = time.monotonic()
        out = []
        for name in self.names:
            hit = self._gids.get(name)
            if hit is None or now - hit[0] >= NAME_TTL:
                try:
                    gid: int | None = grp.getgrnam(name).gr_gid
                except (KeyError, ValueError):  # no such group (ValueError: a name with a NUL)
                    gid = None
                hit = self._gids[name] = (now, gid)
            if hit[1] is not None and hit[1] in gids:
                out.append(name)
        return frozenset(out)


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


def user_name(uid: int) -> str | None:
    """uid's login name (NSS, cached as a peer's own is)."""
    return _name(pwd.getpwuid, uid)


CAP_SYS_PTRACE = 19


def _reads_exe_of_others() -> tuple[int, bool]:
    """(this process's euid, whether it holds CAP_SYS_PTRACE). /proc/<pid>/exe of another user's process is
    readable only with CAP_SYS_PTRACE (ptrace_may_access); unknown counts as readable: the readlink then says."""
    caps = own_caps()
    return os.geteuid(), caps is None or bool(caps >> CAP_SYS_PTRACE & 1)


def peer_exe(pid: int, uid: int) -> str | None:
    """The peer's executable for the audit, or None where the kernel would refuse it: a client of another uid
    when the broker has no CAP_SYS_PTRACE (the shipped unit) is never asked for, which cost each new connection
    a failing readlink (~60 µs from cold caches, against ~5 µs for the check)."""
    euid, ptrace = _reads_exe_of_others()
    if uid != euid and not ptrace:
        return None
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class Unjudgeable(Exception):
    """A peer the broker will not judge, and why (what the kernel recorded at connect is in peer)."""

    def __init__(self, peer: PeerInfo, why: str) -> None:
        super().__init__(why)
        self.peer, self.why = peer, why


def identify(sock: socket.socket, groups: GroupNames) -> PeerInfo:
    """Raises Unjudgeable for a peer that cannot be judged (its process has exited; too many groups), OSError
    when the socket fails."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    owner = owner_of(uid)
    supplementary = peer_groups(sock, MAX_PEER_GROUPS)
    if supplementary is None:
        raise Unjudgeable(PeerInfo(pid, uid, gid, frozenset({gid}), _name(pwd.getpwuid, uid), owner=owner),
                          f"it is in more than {MAX_PEER_GROUPS} supplementary groups, the most the broker judges; "
                          f"run it with fewer (setgroups)")
    gids = supplementary | {gid}
    exe = peer_exe(pid, uid)
    names = groups.of(gids)
    found = _peer_identity(sock, pid)
    if found is None:
        raise Unjudgeable(PeerInfo(pid, uid, gid, gids, _name(pwd.getpwuid, uid), names, owner=owner),
                          f"the process that connected (pid {pid}) has exited before the broker could read its "
                          "identity; a connection is judged as the process that made it, so connect from the "
                          "process that makes the requests")
    cgroup, start, ino = found
    return PeerInfo(pid, uid, gid, gids, _name(pwd.getpwuid, uid), names, exe, cgroup, start, ino, peer_label(sock),
                    owner)


def peer_label(sock: socket.socket) -> str | None:
    """The peer's LSM label (SELinux context, AppArmor profile) as the kernel recorded it at connect(2);
    None where no LSM labels sockets (ENOPROTOOPT) or the label is empty. Any other failure raises: a rule
    that denies by label must never be judged without it (the connection is refused)."""
    try:
        try:
            raw = read_sockopt(sock, SO_PEERSEC, PY_SOCKOPT_MAX)
        except OSError as e:
            if e.errno != errno.ERANGE:
                raise
            raw = read_sockopt(sock, SO_PEERSEC, MAX_LABEL)  # a long context (many MLS categories)
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise
    label = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return label or None


def read_cgroup(pid: int) -> str | None:
    """The cgroup v2 path in /proc/<pid>/cgroup's "0::" line (present on unified and hybrid hosts), or None.
    Bare: only a caller that then proves the pid still named its pinned process may believe it.

    A cgroup name is any bytes but '/' and newline, and whoever owns a delegated subtree names its own: the
    path is decoded losslessly (surrogateescape), never with an error a client could provoke at will."""
    try:  # raw os calls: this read is on every new connection's path
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:  # one read returns it all unless it fills the buffer (a short read is the end of a /proc file)
            chunks = [os.read(fd, 65536)]
            while len(chunks[-1]) == 65536:
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
    except OSError:
        return None
    text = b"".join(chunks)
    if text.startswith(b"0::"):
        at = 3
    else:
        at = text.find(b"\n0::") + 4
        if at < 4:
            return None
    return text[at:].split(b"\n", 1)[0].decode("utf-8", "surrogateescape")


def printable_cgroup(cgroup: str | None) -> bool:
    """Whether a cgroup path can be judged and recorded as it is: valid UTF-8 (a policy names cgroups in
    UTF-8, and audit records and replies carry them as text)."""
    if cgroup is None:
        return True
    try:
        cgroup.encode()
    except UnicodeEncodeError:
        return False
    return True


def cgroup_of(pid: int, start: int) -> str | None:
    """The cgroup of the process (pid, start) — e.g. a holder_pid checked by the kernel layer — read while
    a pidfd pins it: None if it is gone or the pid now names another process."""
    pidfd = pidfd_open(pid)
    if pidfd is None:
        return None
    try:
        cgroup = read_cgroup(pid)
        return cgroup if is_process(pidfd, pid, start, None) else None
    finally:
        os.close(pidfd)


def _peer_identity(sock: socket.socket, pid: int) -> tuple[str | None, int | None, int | None] | None:
    """The connecting process's cgroup, start time and pidfs inode, read through SO_PEERPIDFD (which
    names it race-free). The reads come before the pidfd is polled: still running after them means the pid
    named that process during them. None if it has exited: its pid may already name another process, and the
    connection it made may be in another's hands, which no identity of the connector's may judge (a process that
    left its connection to one in another cgroup would get its requests judged with no cgroup). (None, None,
    None) when the kernel has no SO_PEERPIDFD (< 6.5) or /proc hides the process: a rule that names cgroups then
    never allows."""
    try:
        pidfd = so_peerpidfd(sock)
    except OSError as e:
        if e.errno == errno.ENOPROTOOPT:
            return (None, None, None)
        raise  # out of fds: the peer is neither judged without its identity nor taken for gone
    if pidfd is None:  # reaped before a pidfd was made
        return None
    try:
        cgroup = read_cgroup(pid)
        start = pinned_start(pidfd, pid)
        if start is None:  # gone, or /proc would not tell
            return None if has_exited(pidfd) else (None, None, None)
        return cgroup, start, pidfd_ino(pidfd)
    finally:
        os.close(pidfd)
