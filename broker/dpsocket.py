"""Where a device-plugin endpoint listens: a socket at a path DPDK expects, made without following links.

DPDK's default (/tmp/afxdp_dp/<iface>/afxdp.sock) lies under /tmp, where anyone may plant a link or a
directory before the broker starts. So the path is walked from / with directory fds opened O_NOFOLLOW:
every directory on it must be root's (or the broker's own uid's) and closed to others' writes (a sticky one
such as /tmp may be open, except the socket's own); missing ones are made the broker's 0755; the socket is bound
through the fd of its directory (/proc/self/fd/N/name, which no link can redirect) and given to the tenant, 0600: the
tenant alone (and root) can connect. What is found wrong is refused, never followed, chmod-ed or removed.
Removal takes away only what was made here: the socket (if it is still the inode bound) and the
directories it made, if empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from xskbroker.common.records import field, record

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_NAME = 64  # the bound name (via /proc/self/fd/N/) must fit sun_path's 108 bytes


class UnsafePath(OSError):
    pass


@record
class Placed:
    path: str
    sock: socket.socket
    dirfd: int
    name: str
    ino: int
    made: list[tuple[int, str]] = field(default_factory=list)  # (parent fd, name) of directories made here

    def remove(self) -> None:
        """Close the listener, unlink its socket (only the inode bound here) and the directories made here."""
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False).st_ino == self.ino:
                os.unlink(self.name, dir_fd=self.dirfd)
        os.close(self.dirfd)
        self.dirfd = -1
        _unmake(self.made)
        self.made = []


def _unmake(made: list[tuple[int, str]]) -> None:
    for parent, name in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=parent)  # only when empty: another endpoint may share it
        os.close(parent)


def _components(path: str) -> tuple[list[str], str]:
    if not path.startswith("/"):
        raise UnsafePath(errno.EINVAL, f"{path}: not an absolute path")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafePath(errno.EINVAL, f"{path}: . or .. in the path")
    if len(parts[-1].encode()) > MAX_NAME:
        raise UnsafePath(errno.ENAMETOOLONG, f"{path}: the socket's name is over {MAX_NAME} bytes")
    return parts[:-1], parts[-1]


def _open_dir(parent: int, name: str, where: str, last: bool, made: list[tuple[int, str]]) -> int:
    created = False
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)  # 0700 until checked and set below
            created = True
        except FileExistsError:
            pass  # made meanwhile by someone: judged like any directory found
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except OSError as e:
            raise _refusal(e, parent, name, where) from None
    except OSError as e:
        raise _refusal(e, parent, name, where) from None
    try:
        st = os.fstat(fd)
        if created:
            os.fchmod(fd, 0o755)
            made.append((os.dup(parent), name))
        elif st.st_uid not in (0, os.geteuid()):  # root's too: the unit's broker is a dynamic user, / is root's
            raise UnsafePath(errno.EPERM, f"{where} belongs to uid {st.st_uid}, not to root or the broker: not used")
        elif st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
            raise UnsafePath(errno.EPERM, f"{where} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                             "not used")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(e: OSError, parent: int, name: str, where: str) -> UnsafePath:
    with contextlib.suppress(OSError):  # O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR (ELOOP without O_DIRECTORY)
        if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            return UnsafePath(errno.ELOOP, f"{where} is a symbolic link: not followed")
    if e.errno == errno.ELOOP:
        return UnsafePath(errno.ELOOP, f"{where} is a symbolic link: not followed")
    if e.errno == errno.ENOTDIR:
        return UnsafePath(errno.ENOTDIR, f"{where} is not a directory")
    return UnsafePath(e.errno or errno.EIO, f"{where}: {e.strerror or e}")


def place(path: str, uid: int, gid: int, backlog: int = 16) -> Placed:
    """Listen (SOCK_SEQPACKET) at path for uid: the socket is uid's, 0600. UnsafePath on anything found wrong."""
    dirs, name = _components(path)
    made: list[tuple[int, str]] = []
    fd = os.open("/", _DIR)
    where = ""
    sock: socket.socket | None = None
    try:
        for i, part in enumerate(dirs):
            where += "/" + part
            nxt = _open_dir(fd, part, where, i == len(dirs) - 1, made)
            os.close(fd)
            fd = nxt
        _clear_stale(fd, name, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777)  # unreachable until it is the tenant's
        try:
            sock.bind(f"/proc/self/fd/{fd}/{name}")
        finally:
            os.umask(old)
        node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            st = os.fstat(node)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise UnsafePath(errno.EEXIST, f"{path} was replaced while it was being made")
            os.chown(f"/proc/self/fd/{node}", uid, gid)
            os.chmod(f"/proc/self/fd/{node}", 0o600)
        finally:
            os.close(node)
        sock.listen(backlog)
        sock.setblocking(False)
        return Placed(path, sock, fd, name, st.st_ino, made)
    except BaseException:
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
        os.close(fd)
        _unmake(made)
        raise


def _clear_stale(dirfd: int, name: str, path: str) -> None:
    """A socket a stopped broker left is removed; anything else at the name is refused."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(errno.EEXIST, f"{path} exists and is not a socket: not followed, not removed")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(f"/proc/self/fd/{dirfd}/{name}")
    except ConnectionRefusedError:
        os.unlink(name, dir_fd=dirfd)
        return
    except OSError as e:
        raise UnsafePath(errno.EEXIST, f"{path} exists: {e.strerror or e}") from None
    finally:
        probe.close()
    raise UnsafePath(errno.EADDRINUSE, f"something already listens on {path}")
