"""Creating AF_XDP sockets for grants: sealed-memfd UMEM, rings, bind, xsks_map slot.

This is the broker's only place that makes AF_XDP sockets. Every step is checked and every failure
unwinds what the earlier steps made: no fd, mapping, or map slot outlives a failed call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable

from xskbroker.broker import bpf
from xskbroker.common.libc import MAP_FAILED, PR_SET_PDEATHSIG, errno_error, libc
from xskbroker.common.procfs import pidfd_open
from xskbroker.common.records import record
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import (
    AF_XDP,
    SOCKADDR_XDP,
    SOL_XDP,
    XDP_COPY,
    XDP_OPTIONS,
    XDP_OPTIONS_ZEROCOPY,
    XDP_RX_RING,
    XDP_TX_RING,
    XDP_UMEM_COMPLETION_RING,
    XDP_UMEM_FILL_RING,
    XDP_UMEM_REG,
    XDP_UMEM_REG_STRUCT,
    XDP_USE_NEED_WAKEUP,
    XDP_ZEROCOPY,
)

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# A queue whose socket just closed answers EBUSY until the kernel's deferred release runs: 12-20 ms on a
# quiet machine, much longer under load. Waiting costs others nothing (the broker retries on a timer).
BUSY_RETRY_SECONDS = 1.0


def _no_fault(name: str) -> None:
    """The default fault hook: the crash tests pass one that kills or pauses at a named point."""


class QueueBusy(OSError):
    """The queue is held by a live socket (its xsks_map slot is taken)."""


@record
class BoundSocket:
    xsk_fd: int
    umem_fd: int
    queue: int
    bind_flags: int
    zerocopy: bool

    def close(self) -> None:
        for fd in (self.xsk_fd, self.umem_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.xsk_fd = self.umem_fd = -1


def sealed_memfd(size: int) -> int:
    """Shared memory for the UMEM that neither side can shrink or grow once handed out."""
    fd = os.memfd_create("xskbroker-umem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def register_umem(sock: socket.socket, umem_fd: int, g: Geometry) -> None:
    """XDP_UMEM_REG pins the memfd's pages; the broker's own mapping is not needed afterwards."""
    addr = libc.mmap(None, g.umem_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, umem_fd, 0)
    if addr in (None, MAP_FAILED):
        raise errno_error("mmap of UMEM memfd")
    try:
        reg = XDP_UMEM_REG_STRUCT.pack(addr, g.umem_size, g.frame_size, g.headroom, 0, 0)
        # through ctypes, which lets go of the GIL: socket.setsockopt holds it, and this call pins every
        # page (seconds for a GiB), so a broker thread doing it would stop the event loop all the same
        if libc.setsockopt(sock.fileno(), SOL_XDP, XDP_UMEM_REG, reg, len(reg)) != 0:
            raise errno_error("XDP_UMEM_REG")
    finally:
        libc.munmap(addr, g.umem_size)


def register_umem_apart(sock: socket.socket, umem_fd: int, g: Geometry,
                        watch: Callable[[int | None], None] = lambda pidfd: None) -> None:
    """register_umem in a child process, which exits once the pages are pinned (the pins stay with the
    socket). Pinning holds the caller's mmap_lock the whole time (seconds for a GiB): in the broker's own
    process, every mmap and munmap meanwhile, any other grant's or malloc's, would wait for it.
    watch(pidfd) lets the caller kill the child (SIGKILL ends the pinning at once) until watch(None)."""
    keep = sorted((sock.fileno(), umem_fd))
    last, parent = os.sysconf("SC_OPEN_MAX"), os.getpid()
    pid = os.fork()
    if pid == 0:  # only this until _exit: nothing that takes a lock another broker thread may have held
        code = 0
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the broker (this thread) gone: stop
            with contextlib.suppress(OSError):  # the unit's seccomp filter may refuse (~@resources)
                os.nice(19)  # others first: the pinning is slow anyway
            os.closerange(3, keep[0])  # no copy of another client's fds outlives the broker's own
            os.closerange(keep[0] + 1, keep[1])
            os.closerange(keep[1] + 1, last)
            if os.getppid() != parent:
                raise OSError(errno.ECANCELED, "the broker is gone")
            register_umem(sock, umem_fd, g)
        except OSError as e:
            code = e.errno or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code)
    try:
        pidfd = pidfd_open(pid)
    except OSError:  # out of fds: the child cannot be killed early, it is still reaped
        pidfd = None
    watch(pidfd)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        watch(None)
        if pidfd is not None:
            os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    if code:
        err = code if code > 0 else errno.EINTR  # killed by a signal
        raise OSError(err, f"XDP_UMEM_REG: {os.strerror(err)}")


def set_rings(sock: socket.socket, g: Geometry) -> None:
    for opt, size in ((XDP_UMEM_FILL_RING, g.fill), (XDP_UMEM_COMPLETION_RING, g.completion),
                      (XDP_RX_RING, g.rx), (XDP_TX_RING, g.tx)):
        sock.setsockopt(SOL_XDP, opt, size.to_bytes(4, "little"))


def bind(fd: int, ifindex: int, queue: int, flags: int) -> None:
    addr = SOCKADDR_XDP.pack(AF_XDP, flags, ifindex, queue, 0)
    if libc.bind(fd, addr, len(addr)) != 0:
        raise errno_error(f"bind to ifindex {ifindex} queue {queue}")


def bind_flags_for(bind_mode: str, need_wakeup: bool) -> int:
    flags = XDP_USE_NEED_WAKEUP if need_wakeup else 0
    # "auto" passes neither flag: the kernel tries zero-copy and falls back to copy by itself.
    return flags | {"auto": 0, "copy": XDP_COPY, "zerocopy": XDP_ZEROCOPY}[bind_mode]


def is_zerocopy(sock: socket.socket) -> bool:
    raw = sock.getsockopt(SOL_XDP, XDP_OPTIONS, 4)
    return bool(int.from_bytes(raw[:4], "little") & XDP_OPTIONS_ZEROCOPY)


def claim_slot(map_fd: int, queue: int, fd: int) -> None:
    """Put the socket in xsks_map[queue] only if the slot is free: an atomic claim on the queue."""
    try:
        bpf.map_update(map_fd, queue, fd, bpf.BPF_NOEXIST)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise QueueBusy(errno.EBUSY, f"queue {queue} is held by another socket") from None
        raise


@record
class PreparedSocket:
    """A socket with its slot claimed, UMEM registered and rings sized: everything but the bind.

    Split from the bind so that a broker can wait out EBUSY (a just-closed socket's queue is released
    12-20 ms later, longer under load) without stopping for everyone else. Made in two halves: claim()
    is cheap; add_umem() pins every UMEM page (seconds for a GiB), so a broker may run it on a thread.
    """

    sock: socket.socket
    umem_fd: int
    ifindex: int
    queue: int
    flags: int
    map_fd: int | None
    fault: Callable[[str], None] = _no_fault

    def add_umem(self, g: Geometry, memfd: Callable[[int], int] | None = None,
                 apart: Callable[[int | None], None] | None = None) -> None:
        """The expensive half: sealed memfd, UMEM registration (pins its pages; with apart, in a child
        process that apart is told of) and ring sizes."""
        self.umem_fd = (memfd or sealed_memfd)(g.umem_size)
        if apart is None:
            register_umem(self.sock, self.umem_fd, g)
        else:
            register_umem_apart(self.sock, self.umem_fd, g, apart)
        self.fault("after-umem-reg")
        set_rings(self.sock, g)

    def try_bind(self) -> bool:
        """Bind; False while the queue is still held by a socket being released (EBUSY)."""
        self.fault("before-bind")
        try:
            bind(self.sock.fileno(), self.ifindex, self.queue, self.flags)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise
        return True

    def finish(self) -> BoundSocket:
        self.fault("after-bind")
        zc = is_zerocopy(self.sock)
        flags = self.flags | (XDP_ZEROCOPY if zc else XDP_COPY)
        return BoundSocket(self.sock.detach(), self.umem_fd, self.queue, flags, zc)

    def abort(self, empty_slot: bool = True, close: Callable[[list[int]], None] | None = None) -> None:
        """Undo everything: empty the slot, close the socket and the UMEM memfd. Closing the socket
        empties its slot too: a worker thread that may outlive the map's fd passes empty_slot=False.
        close(fds), when given, closes them elsewhere: a bound socket's last close waits for a grace period."""
        if self.map_fd is not None and empty_slot:
            with contextlib.suppress(OSError):
                bpf.map_delete(self.map_fd, self.queue)
        if close is not None and self.sock.fileno() >= 0:
            close([self.sock.detach(), *([self.umem_fd] if self.umem_fd >= 0 else [])])
            self.umem_fd = -1
            return
        if self.umem_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.umem_fd)
            self.umem_fd = -1
        self.sock.close()


@record
class Unbound:
    """A socket made ahead of any request: fresh sealed memfd, UMEM registered (its pages pinned), rings
    sized. Not bound, in no map, never handed out: it depends on the geometry alone, so a grant of that
    geometry only claims a slot and binds it (claim_unbound)."""

    sock: socket.socket
    umem_fd: int
    geometry: Geometry

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.umem_fd)
        self.umem_fd = -1
        self.sock.close()


def make_unbound(g: Geometry, apart: Callable[[int | None], None] | None = None) -> Unbound:
    """An Unbound socket of geometry g (the pages are allocated first, so registration only pins them);
    with apart, pinned in a child process (see register_umem_apart). Nothing outlives a failure."""
    sock = socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    fd = -1
    try:
        fd = sealed_memfd(g.umem_size)
        os.posix_fallocate(fd, 0, g.umem_size)
        if apart is None:
            register_umem(sock, fd, g)
        else:
            register_umem_apart(sock, fd, g, apart)
        set_rings(sock, g)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        sock.close()
        raise
    return Unbound(sock, fd, g)


def claim_unbound(u: Unbound, ifindex: int, queue: int, map_fd: int, bind_mode: str = "auto",
                  need_wakeup: bool = True, fault: Callable[[str], None] = _no_fault) -> PreparedSocket:
    """A prepared socket for a grant from an Unbound one: its xsks_map[queue] claim is all that is left
    before the bind. A queue held by another socket (QueueBusy) left it as it was: still the caller's, to give
    back to the pool. On any other failure it is closed."""
    try:
        fault("after-socket")
        claim_slot(map_fd, queue, u.sock.fileno())
        fault("after-map-claim")
    except QueueBusy:
        raise
    except BaseException:
        u.close()
        raise
    return PreparedSocket(u.sock, u.umem_fd, ifindex, queue, bind_flags_for(bind_mode, need_wakeup), map_fd, fault)


def claim(ifindex: int, queue: int, map_fd: int | None, bind_mode: str = "auto",
          need_wakeup: bool = True, fault: Callable[[str], None] = _no_fault) -> PreparedSocket:
    """The cheap half of prepare_bound: the socket and its xsks_map[queue] claim, no UMEM yet."""
    sock = socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        fault("after-socket")
        if map_fd is not None:
            claim_slot(map_fd, queue, sock.fileno())
        fault("after-map-claim")
    except BaseException:
        sock.close()
        raise
    return PreparedSocket(sock, -1, ifindex, queue, bind_flags_for(bind_mode, need_wakeup), map_fd, fault)


def prepare_bound(ifindex: int, queue: int, map_fd: int | None, g: Geometry, bind_mode: str = "auto",
                  need_wakeup: bool = True, memfd: Callable[[int], int] | None = None) -> PreparedSocket:
    """Socket, xsks_map[queue] claim, UMEM and rings for a bound socket; bind() is the caller's next step.

    The map slot is claimed first with BPF_NOEXIST: a live holder makes this fail at once with
    QueueBusy. `memfd(size)` supplies the sealed UMEM memory (default: a fresh one). map_fd None makes a
    TX-only socket (a traffic generator) that claims no slot.
    """
    p = claim(ifindex, queue, map_fd, bind_mode, need_wakeup)
    try:
        p.add_umem(g, memfd)
    except BaseException:
        p.abort()
        raise
    return p


def create_bound(ifindex: int, queue: int, map_fd: int | None, g: Geometry, bind_mode: str = "auto",
                 need_wakeup: bool = True, memfd: Callable[[int], int] | None = None,
                 budget: float = BUSY_RETRY_SECONDS) -> BoundSocket:
    """A bound socket in one blocking call (for programs that own their thread, e.g. the benchmarks'
    direct baseline): prepare, bind retrying EBUSY for up to `budget` seconds, finish."""
    p = prepare_bound(ifindex, queue, map_fd, g, bind_mode, need_wakeup, memfd)
    try:
        deadline = time.monotonic() + budget
        delay = 0.001
        while not p.try_bind():
            if time.monotonic() + delay > deadline:
                raise OSError(errno.EBUSY, f"bind to ifindex {ifindex} queue {queue}: {os.strerror(errno.EBUSY)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        return p.finish()
    except BaseException:
        p.abort()
        raise


def create_bare(ifname: str, queue: int, map_fd: int) -> int:
    """An unbound socket confined to one device and placed in xsks_map[queue]: QEMU's sock-fds= input.

    SO_BINDTODEVICE is enforced at bind (kernel >= 6.5) and the consumer cannot clear it without
    CAP_NET_RAW; the queue is the consumer's to choose (the slot decides what it receives).
    """
    sock = socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        claim_slot(map_fd, queue, sock.fileno())
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def probe_socket() -> socket.socket:
    """An unbound AF_XDP socket for occupied_slots to probe with (it never binds, so it never holds a queue)."""
    return socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)


def occupied_slots(map_fd: int, slots: int | Iterable[int], probe: socket.socket | None = None) -> list[int]:
    """Slots that hold a socket. XSKMAP lookups are not allowed from user space, so each slot is
    probed with a BPF_NOEXIST insert of an unbound socket (`probe`, else a throw-away one), undone at once when
    it succeeds."""
    if probe is None:
        with probe_socket() as own:
            return occupied_slots(map_fd, slots, own)
    taken = []
    for q in range(slots) if isinstance(slots, int) else slots:
        try:
            bpf.map_update(map_fd, q, probe.fileno(), bpf.BPF_NOEXIST)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            taken.append(q)
        else:
            bpf.map_delete(map_fd, q)
    return taken


def kernel_enforces_bindtodevice() -> bool:
    """SO_BINDTODEVICE confines AF_XDP bind from Linux 6.5 on."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m[1]), int(m[2])) >= (6, 5)
