"""The UMEM pool's maker: a helper process that makes sockets ahead of grants and passes them over.

Making a socket is a dozen syscalls (socket, memfd, fallocate, mmap, XDP_UMEM_REG, rings). Made by a thread
of the broker, each one hands the GIL back and forth with the event loop, and the pinning holds the
broker's mmap_lock: on 2 CPUs that made a 1 MiB grant 1.4 ms in the broker instead of 0.6, and 32 clients
got half the grants. This process (the broker's own interpreter, run as `python -m` this module, so nothing
of the broker is inherited) does it all in its own address space: it reads a geometry, makes the socket
(broker.xsk.make_unbound), sends the socket and its memfd over SCM_RIGHTS and closes its copies. The
socket stays unbound and in no map; the pinned pages stay pinned by the socket, not by this process.

It dies with the broker: PR_SET_PDEATHSIG, and it exits when its socket reaches end of file. The broker
falls back to making sockets itself when it cannot start, dies or stops answering (reply_seconds); a UMEM over
APART_UMEM is then pinned in a child process of the broker's (broker.xsk.register_umem_apart), as a large
grant's is, not under the broker's own mmap_lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

from xskbroker.broker import helper_process, xsk
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import AF_XDP

_GEOMETRY = struct.Struct("=7Q")
_STATUS = struct.Struct("=i")
MAX_UMEM = 1 << 30  # what a pool socket may be at most (the pool keeps far smaller ones): a bound on mistakes
REPLY_SECONDS = 5.0  # a make's reply waited for at most this, plus the time to pin its UMEM at the rate below
PIN_BYTES_PER_SECOND = 64 << 20
# Made by the broker itself (no helper), a UMEM larger than this is pinned in a forked child: the pinning holds
# the mmap_lock of the process that pins (about 1 ms per MiB here), and every mmap or munmap of the broker's
# other threads, the event loop's allocations included, waits for it. A fork costs about 8 ms here (256 KiB:
# 0.35 ms in-process, 7.7 apart; 4 MiB: 4.4 and 12.8; 64 MiB: 69 and 90), and holds that lock while it copies
# the page tables, so smaller ones stay in-process: the pool makes them often.
APART_UMEM = 4 << 20


def _pack(g: Geometry) -> bytes:
    return _GEOMETRY.pack(g.umem_size, g.frame_size, g.headroom, g.fill, g.completion, g.rx, g.tx)


class Preparer:
    """The broker's end: make(g) asks the helper (started on first use) for one socket of geometry g."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one request in flight: replies come in order
        # guards closing _sock: stop() shuts it down from another thread while a make waits on it
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._broken = False  # it could not start, died or hung: the caller makes its own from then on
        self._stopping = False
        self._pinning: int | None = None  # the pidfd of a child pinning a UMEM for _make_here (stop() kills it)

    def make(self, g: Geometry) -> xsk.Unbound:
        with self._lock:
            if self._stopping:  # nothing pinned for a broker on its way out
                raise OSError(errno.ECANCELED, "the broker is stopping")
            sock = self._started()
            if sock is None:
                return self._make_here(g)
            try:
                # a helper that never answers (stopped, stuck) must not keep the pool waiting for good: its
                # socket would stay counted as being made, nothing refilled, and the broker's stop would wait on it
                sock.settimeout(reply_seconds(g))
                sock.sendall(_pack(g))
                data, fds, flags, _ = socket.recv_fds(sock, _STATUS.size, 2)
            except OSError:
                return self._lost(g)
            if flags & socket.MSG_CTRUNC and len(data) == _STATUS.size and not _STATUS.unpack(data)[0]:
                # the fds did not all fit here (the broker is out of fds; the kernel closed the others): this
                # socket is lost, not the helper
                for fd in fds:
                    os.close(fd)
                raise OSError(errno.EMFILE, "making a pool socket: no room for its fds")
            if len(data) != _STATUS.size or (not _STATUS.unpack(data)[0] and len(fds) != 2):
                for fd in fds:
                    os.close(fd)
                return self._lost(g)
            (err,) = _STATUS.unpack(data)
            if err:
                for fd in fds:
                    os.close(fd)
                raise OSError(err, f"making a pool socket: {os.strerror(err)}")
            # family and type given: an AF_XDP socket has no address for socket() to find them by
            return xsk.Unbound(socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=fds[0]), fds[1], g)

    def _lost(self, g: Geometry) -> xsk.Unbound:
        """The helper failed us (gone, hung, garbled): ended; the broker makes its own from now on."""
        self._stop_locked()
        if self._stopping:
            raise OSError(errno.ECANCELED, "the broker is stopping")
        self._broken = True
        return self._make_here(g)

    def _make_here(self, g: Geometry) -> xsk.Unbound:
        """A socket made by the broker itself (under self._lock); a large UMEM pinned in a child process."""
        if g.umem_size <= APART_UMEM:
            return xsk.make_unbound(g)
        return xsk.make_unbound(g, apart=self._watch)

    def _watch(self, pidfd: int | None) -> None:
        with self._sock_lock:
            self._pinning = pidfd
            if pidfd is not None and self._stopping:
                _kill(pidfd)

    def _started(self) -> socket.socket | None:
        if self._sock is not None or self._broken:
            return self._sock
        started = helper_process.start("xskbroker.broker.preparer")
        if started is None:
            self._broken = True
            return None
        with self._sock_lock:  # stop() shuts down whatever socket it finds here
            self._sock, self._proc = started
            if self._stopping:
                self._sock.shutdown(socket.SHUT_RDWR)
        return self._sock

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """End the helper; a make waiting for its reply gives up at once (the helper may never answer)."""
        with self._sock_lock:
            self._stopping = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            if self._pinning is not None:  # a make of its own: nothing pinned for a broker on its way out
                _kill(self._pinning)
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        with self._sock_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # end of file: it exits
        if self._proc is not None:
            helper_process.stop(self._proc, 2.0)
            self._proc = None


def _kill(pidfd: int) -> None:
    with contextlib.suppress(OSError):  # exited meanwhile
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def reply_seconds(g: Geometry) -> float:
    """How long a make may take in the helper before it is taken for hung: pinning runs at about 1 ms per MiB
    here; ample room for a loaded host."""
    return REPLY_SECONDS + g.umem_size / PIN_BYTES_PER_SECOND


def serve(sock: socket.socket) -> None:
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            return
        if not data:
            return
        try:
            if len(data) != _GEOMETRY.size:
                raise OSError(errno.EINVAL, "bad request")
            g = Geometry(*_GEOMETRY.unpack(data))
            if not 0 < g.umem_size <= MAX_UMEM:
                raise OSError(errno.EINVAL, "bad size")
            made = xsk.make_unbound(g)
        except OSError as e:
            sock.send(_STATUS.pack(e.errno or errno.EIO))
            continue
        except (ValueError, TypeError):
            sock.send(_STATUS.pack(errno.EINVAL))
            continue
        try:
            socket.send_fds(sock, [_STATUS.pack(0)], [made.sock.fileno(), made.umem_fd])
        except OSError:
            return
        finally:
            made.close()  # ours: the broker holds its own now (sent fds are references in flight)


def main() -> None:
    from xskbroker.common.libc import PR_SET_PDEATHSIG, libc

    libc.prctl(PR_SET_PDEATHSIG, 15, 0, 0, 0)  # SIGTERM when the broker thread that started it is gone
    fd = int(sys.argv[1])
    with contextlib.suppress(KeyboardInterrupt), socket.socket(fileno=fd) as sock:
        serve(sock)


if __name__ == "__main__":
    main()
