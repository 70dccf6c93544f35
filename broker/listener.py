"""The broker's unix socket: made without a window for planted links, its room in the fd limit, and the
fds clients attach (refused by the kernel where it can, found in a message where it cannot)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import stat
import sys
from collections.abc import Callable

from xskbroker.broker.umem_pool import MAX_SOCKETS as MAX_POOLED

# fds a client might attach where the kernel cannot refuse them: room for all of them (SCM_MAX_FD), because
# any the buffer cannot hold are closed by the kernel in the receiving thread, and such a close can block
MAX_FDS_IN = 253
MAX_CONNECTIONS = 1024
FDS_PER_CONNECTION = 2  # a connection, plus room for what its holder may need (a pidfd, fds in flight)
# listener, netlink, wake-up pair, journal, grants being made, and the UMEM pool's sockets (two fds each)
FD_HEADROOM = 64 + 2 * MAX_POOLED
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)  # Linux 6.16: refuse SCM_RIGHTS at the socket
# recvmsg's flags tested as plain ints: `flags & socket.MSG_TRUNC` runs enum.IntFlag's __rand__ in Python (four
# calls into enum per request)
MSG_TRUNC, MSG_CTRUNC = int(socket.MSG_TRUNC), int(socket.MSG_CTRUNC)


def connection_capacity(limit: int = MAX_CONNECTIONS) -> int:
    """Connections the fd limit leaves room for (RLIMIT_NOFILE, as systemd's LimitNOFILE= sets it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(16, min(limit, (soft - FD_HEADROOM) // FDS_PER_CONNECTION))


def refuse_passed_fds(sock: socket.socket) -> bool:
    """Make the kernel refuse fds sent to this socket (the sender gets EPERM); False where it can't."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def listen(path: str, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """A SEQPACKET listener at path; a stale socket file left by a dead broker is replaced."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise FileExistsError(errno.EADDRINUSE, f"a broker is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777)  # no window where the socket is reachable with the default mode
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        # by the inode just made, never by name: a link swapped in for it (in a directory others can
        # write) would make root chmod/chown the link's target
        node = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(node)
            # one link: a hard link to another root-owned socket (fs.protected_hardlinks off) is ours too
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise FileExistsError(errno.EEXIST, f"{path} was replaced while it was being created")
            os.chmod(f"/proc/self/fd/{node}", mode)
            if group is not None:
                os.chown(f"/proc/self/fd/{node}", -1, group)
        finally:
            os.close(node)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4)]
    return fds


def open_spare() -> int | None:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def accept_with_spare(listener: socket.socket, spare: int, refuse: Callable[[socket.socket], None]) -> int | None:
    """Out of fds, the listener stays readable and accept keeps failing: a loop that only logged would spin.
    Free the spare fd, take the connection, refuse(conn) (tell it why, close it), and take the spare back."""
    os.close(spare)
    try:
        conn, _ = listener.accept()
    except OSError:
        conn = None
    if conn is not None:
        conn.setblocking(False)
        refuse(conn)
    return open_spare()


# a message's fds and, with SO_PASSCRED, its sender's credentials (struct ucred)
_DRAIN_ANC = socket.CMSG_SPACE(MAX_FDS_IN * 4) + socket.CMSG_SPACE(12)


def close_client(conn: socket.socket, close_fds: Callable[[list[int]], None]) -> None:
    """Close a client's connection, every message still queued on it read and dropped first, their fds handed to
    close_fds (the untrusted closer): closing a unix socket frees its queue in the closing thread (the loop), which
    closes each fd in it there, and a client's fd can make its close block (a lingering TCP socket). Shut for
    reading, the queue takes no more (the sender gets EPIPE); with SO_PASSCRED every message carries its sender's
    credentials, so a 0-byte message is told from the end of the queue. Unread data left would also make the
    peer's recv fail ECONNRESET before it reads a last reply."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RD)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        while True:
            _, anc, _, _ = conn.recvmsg(1, _DRAIN_ANC, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
            close_fds(passed_fds(anc))
            if not anc:  # no message left
                break
    conn.close()


def say_and_close(conn: socket.socket, last_words: bytes, close_fds: Callable[[list[int]], None]) -> None:
    """Send a last (unsolicited) reply and close (close_client: what the client sent is dropped unread)."""
    with contextlib.suppress(OSError):
        conn.send(last_words)
    close_client(conn, close_fds)
