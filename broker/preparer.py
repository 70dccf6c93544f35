"""The UMEM pool's maker: a helper process that makes sockets ahead of grants and passes them over.

Making a socket is a dozen syscalls (socket, memfd, fallocate, mmap, XDP_UMEM_REG, rings). Made by a thread
of the broker, each one hands the GIL back and forth with the event loop, and the pinning holds the
broker's mmap_lock: on 2 CPUs that made a 1 MiB grant 1.4 ms in the broker instead of 0.6, and 32 clients
got half the grants. This process (the broker's own interpreter, run as `python -m` this module, so nothing
of the broker is inherited) does it all in its own address space: it reads a geometry, makes the socket
(broker.xsk.make_unbound), sends the socket and its memfd over SCM_RIGHTS and closes its copies. The
socket stays unbound and in no map; the pinned pages stay pinned by the socket, not by this process.

It dies with the broker: PR_SET_PDEATHSIG, and it exits when its socket reaches end of file. The broker
falls back to making sockets itself when it cannot start or it dies.
"""

from __future__ import annotations

import contextlib
import errno
import os
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


def _pack(g: Geometry) -> bytes:
    return _GEOMETRY.pack(g.umem_size, g.frame_size, g.headroom, g.fill, g.completion, g.rx, g.tx)


class Preparer:
    """The broker's end: make(g) asks the helper (started on first use) for one socket of geometry g."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one request in flight: replies come in order
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._broken = False  # it could not start or it died: the caller makes its own from then on

    def make(self, g: Geometry) -> xsk.Unbound:
        with self._lock:
            sock = self._started()
            if sock is None:
                return xsk.make_unbound(g)
            try:
                sock.sendall(_pack(g))
                data, fds, _, _ = socket.recv_fds(sock, _STATUS.size, 2)
            except OSError:
                self._stop_locked()
                self._broken = True
                return xsk.make_unbound(g)
            if len(data) != _STATUS.size or (not _STATUS.unpack(data)[0] and len(fds) != 2):
                for fd in fds:
                    os.close(fd)
                self._stop_locked()
                self._broken = True
                return xsk.make_unbound(g)
            (err,) = _STATUS.unpack(data)
            if err:
                for fd in fds:
                    os.close(fd)
                raise OSError(err, f"making a pool socket: {os.strerror(err)}")
            # family and type given: an AF_XDP socket has no address for socket() to find them by
            return xsk.Unbound(socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=fds[0]), fds[1], g)

    def _started(self) -> socket.socket | None:
        if self._sock is not None or self._broken:
            return self._sock
        started = helper_process.start("xskbroker.broker.preparer")
        if started is None:
            self._broken = True
            return None
        self._sock, self._proc = started
        return self._sock

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()  # end of file: it exits
            self._sock = None
        if self._proc is not None:
            helper_process.stop(self._proc, 2.0)
            self._proc = None


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
