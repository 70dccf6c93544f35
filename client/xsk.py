"""A granted AF_XDP socket, ready to use from Python: the four rings and the UMEM, mmapped.

Single-producer/single-consumer rings shared with the kernel. Reading a ring needs the producer index
loaded with acquire order (before the descriptors), writing one needs the descriptors stored before the
index with release order; the kernel side supplies its own barriers. Pure Python has no barriers, only
plain loads and stores, and those have exactly that order on x86 (total store order) and nowhere else
(arm64, POWER and RISC-V reorder them): so XskSocket runs on x86 only and refuses anything else.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import platform
import select
import socket
from collections import deque

from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import (
    AF_XDP,
    SOL_XDP,
    XDP_MMAP_OFFSETS,
    XDP_PGOFF_RX_RING,
    XDP_PGOFF_TX_RING,
    XDP_RING_NEED_WAKEUP,
    XDP_STATISTICS,
    XDP_STATISTICS_STRUCT,
    XDP_UMEM_PGOFF_COMPLETION_RING,
    XDP_UMEM_PGOFF_FILL_RING,
    MmapOffsets,
    RingOffsets,
)

_U32 = 0xFFFFFFFF
# the machines whose plain loads and stores give the ring its acquire/release order (see above)
STRONGLY_ORDERED = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")
# sendto()/recvfrom() kicks can fail transiently (TX ring draining, queue down): those are not errors
_KICK_TRANSIENT = (errno.EAGAIN, errno.EBUSY, errno.ENOBUFS, errno.ENETDOWN)


class UnsupportedMachine(RuntimeError):
    """The CPU may reorder plain loads and stores, which the rings' index protocol cannot survive."""

    code = ErrorCode.UNSUPPORTED_MACHINE


def check_machine() -> None:
    """Refuse a CPU whose memory order is weaker than x86's (see the module's docstring)."""
    machine = platform.machine()
    if machine.lower() not in STRONGLY_ORDERED:
        raise UnsupportedMachine(
            f"the AF_XDP rings in xskbroker.client.xsk need x86 memory ordering (this CPU is {machine or 'unknown'}):"
            " without acquire/release barriers, which Python cannot issue, descriptors could be read before the "
            "kernel wrote them; use a C AF_XDP library (libxdp) on this machine")


class _Ring:
    """Indices and descriptor array of one ring. `desc_words` is 1 for u64 addresses, 2 for xdp_desc."""

    def __init__(self, fd: int, pgoff: int, off: RingOffsets, size: int, desc_words: int) -> None:
        length = off.desc + size * 8 * desc_words
        self.mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=pgoff)
        view = memoryview(self.mm)
        self.words = view.cast("I")
        self.prod_i, self.cons_i, self.flags_i = off.producer // 4, off.consumer // 4, off.flags // 4
        self.q = view[off.desc:length].cast("Q")  # addr of entry i at q[i * desc_words]
        self.d = view[off.desc:length].cast("I")  # len of xdp_desc i at d[4 * i + 2]
        self.size = size
        self.mask = size - 1
        self.views = [view, self.words, self.q, self.d]

    @property
    def producer(self) -> int:
        return self.words[self.prod_i]

    @property
    def consumer(self) -> int:
        return self.words[self.cons_i]

    def needs_wakeup(self) -> bool:
        return bool(self.words[self.flags_i] & XDP_RING_NEED_WAKEUP)

    def close(self) -> None:
        for v in reversed(self.views):
            v.release()
        self.mm.close()


class XskSocket:
    """One granted socket: fill/RX/TX/completion rings plus the UMEM frames, with batch operations.

    x86 only: raises UnsupportedMachine elsewhere (the rings' ordering, in the module's docstring)."""

    def __init__(self, xsk_fd: int, umem_fd: int, queue: int, geometry: Geometry, bind_flags: int = 0) -> None:
        check_machine()  # before anything is mapped: the caller still owns both fds when this refuses
        self.fd = xsk_fd
        self.umem_fd = umem_fd
        self.queue = queue
        self.geometry = geometry
        self.bind_flags = bind_flags
        self.sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=xsk_fd)
        self._rings: list[_Ring] = []
        try:
            off = MmapOffsets.unpack(self.sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
            g = geometry
            self.rx = self._map(XDP_PGOFF_RX_RING, off.rx, g.rx, 2)
            self.tx = self._map(XDP_PGOFF_TX_RING, off.tx, g.tx, 2)
            self.fr = self._map(XDP_UMEM_PGOFF_FILL_RING, off.fill, g.fill, 1)
            self.cr = self._map(XDP_UMEM_PGOFF_COMPLETION_RING, off.completion, g.completion, 1)
            self.umem = mmap.mmap(umem_fd, g.umem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._unmap()
            self.sock.detach()
            raise
        self.frames = memoryview(self.umem)
        self.free: deque[int] = deque(range(0, g.umem_size - g.frame_size + 1, g.frame_size))

    def _map(self, pgoff: int, off: RingOffsets, size: int, words: int) -> _Ring:
        ring = _Ring(self.fd, pgoff, off, size, words)
        self._rings.append(ring)
        return ring

    def _unmap(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings = []

    def detach(self) -> None:
        """Unmap everything but leave both fds open: their owner closes them."""
        if self.fd < 0:
            return
        self.frames.release()
        with contextlib.suppress(BufferError):  # a caller still holds a frame view: unmapped when it goes
            self.umem.close()
        self._unmap()
        self.sock.detach()
        self.fd = self.umem_fd = -1

    def close(self) -> None:
        """Unmap everything and close both fds: the kernel then frees the queue and its map slot."""
        fds = (self.fd, self.umem_fd)
        self.detach()
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> XskSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- producer rings: fill and TX ----------------------------------------------------------------

    def fill(self, count: int | None = None) -> int:
        """Give up to `count` free frames (all free ones by default) to the kernel for RX."""
        r = self.fr
        prod = r.producer
        room = r.size - ((prod - r.consumer) & _U32)
        n = min(room, len(self.free) if count is None else min(count, len(self.free)))
        q, mask, free = r.q, r.mask, self.free
        for i in range(n):
            q[(prod + i) & mask] = free.popleft()
        r.words[r.prod_i] = (prod + n) & _U32
        return n

    def transmit(self, descs: list[tuple[int, int]]) -> int:
        """Queue (addr, len) frames for TX; returns how many fit. Call kick() afterwards."""
        r = self.tx
        prod = r.producer
        n = min(len(descs), r.size - ((prod - r.consumer) & _U32))
        q, d, mask = r.q, r.d, r.mask
        for i in range(n):
            idx = (prod + i) & mask
            addr, length = descs[i]
            q[2 * idx] = addr
            d[4 * idx + 2] = length
            d[4 * idx + 3] = 0
        r.words[r.prod_i] = (prod + n) & _U32
        return n

    def kick(self) -> None:
        """Tell the kernel there is TX work (copy mode needs it for every batch)."""
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno not in _KICK_TRANSIENT:
                raise

    # ---- consumer rings: RX and completion ------------------------------------------------------------

    def receive(self, max_count: int = 64) -> list[tuple[int, int]]:
        """Take up to max_count received (addr, len) descriptors. Return frames with recycle()."""
        r = self.rx
        cons = r.consumer
        n = min(max_count, (r.producer - cons) & _U32)
        q, d, mask = r.q, r.d, r.mask
        out = []
        for i in range(n):
            idx = (cons + i) & mask
            out.append((q[2 * idx], d[4 * idx + 2]))
        r.words[r.cons_i] = (cons + n) & _U32
        return out

    def complete(self, max_count: int | None = None) -> int:
        """Reap finished TX frames back into the free pool; returns how many."""
        r = self.cr
        cons = r.consumer
        avail = (r.producer - cons) & _U32
        n = avail if max_count is None else min(max_count, avail)
        # a completion is the TX descriptor's address, which may point into its frame (a received frame
        # sent back as is): the pool keeps frame starts. Frame sizes are powers of two: & -size rounds down
        q, mask, free, start = r.q, r.mask, self.free, -self.geometry.frame_size
        for i in range(n):
            free.append(q[(cons + i) & mask] & start)
        r.words[r.cons_i] = (cons + n) & _U32
        return n

    # ---- bulk operations: whole batches move as slice copies, no per-packet Python work ------------------

    def recycle_rx(self, max_count: int = 1 << 16) -> int:
        """Move received frames straight back to the fill ring (a packet sink); returns how many."""
        rx, fr = self.rx, self.fr
        rcons, fprod = rx.consumer, fr.producer
        n = min(max_count, (rx.producer - rcons) & _U32, fr.size - ((fprod - fr.consumer) & _U32))
        if n:
            _copy(rx.q, 2, rcons & rx.mask, rx.size, fr.q, 1, fprod & fr.mask, fr.size, n)
            fr.words[fr.prod_i] = (fprod + n) & _U32
            rx.words[rx.cons_i] = (rcons + n) & _U32
        return n

    def prime_tx(self, length: int) -> list[int]:
        """Point every TX slot at a frame of its own (taken from the free pool) holding `length` bytes.

        For traffic generators: write the frames once, then resend() and reap() move whole batches.
        """
        r = self.tx
        if len(self.free) < r.size:
            raise ValueError(f"priming {r.size} TX slots needs as many free frames, have {len(self.free)}")
        addrs = [self.free.popleft() for _ in range(r.size)]
        base = r.producer
        for i, addr in enumerate(addrs):
            idx = (base + i) & r.mask
            r.q[2 * idx] = addr
            r.d[4 * idx + 2] = length
            r.d[4 * idx + 3] = 0
        return addrs

    def resend(self, max_count: int = 1 << 16) -> int:
        """Publish up to max_count primed TX slots again (their descriptors are unchanged); returns how many."""
        r = self.tx
        prod = r.producer
        n = min(max_count, r.size - ((prod - r.consumer) & _U32))
        r.words[r.prod_i] = (prod + n) & _U32
        return n

    def reap(self) -> int:
        """Count and drop TX completions (for primed frames, which stay where they are)."""
        r = self.cr
        cons = r.consumer
        n = (r.producer - cons) & _U32
        r.words[r.cons_i] = (cons + n) & _U32
        return n

    # ---- frames -------------------------------------------------------------------------------------

    def frame(self, addr: int, length: int) -> memoryview:
        return self.frames[addr:addr + length]

    def recycle(self, addrs: list[int]) -> None:
        """Return frames (by address, offsets within a frame allowed) to the free pool."""
        base = self.geometry.frame_size
        self.free.extend(a - a % base for a in addrs)

    def alloc(self) -> int | None:
        return self.free.popleft() if self.free else None

    def wake_rx(self) -> None:
        """Wake the kernel's RX processing when the fill ring asks for it (need-wakeup)."""
        if self.fr.needs_wakeup():
            try:
                self.sock.recv(0, socket.MSG_DONTWAIT)
            except OSError as e:  # a zero-copy driver's wakeup fails with ENETDOWN while its queues are down
                if e.errno not in _KICK_TRANSIENT:
                    raise

    def wait(self, timeout: float | None) -> bool:
        """Sleep until RX data is ready (poll), waking the kernel first if the fill ring asks for it."""
        self.wake_rx()
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(None if timeout is None else int(timeout * 1000)))

    def statistics(self) -> dict[str, int]:
        raw = self.sock.getsockopt(SOL_XDP, XDP_STATISTICS, XDP_STATISTICS_STRUCT.size)
        names = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                 "rx_fill_ring_empty_descs", "tx_ring_empty_descs")
        return dict(zip(names, XDP_STATISTICS_STRUCT.unpack(raw.ljust(XDP_STATISTICS_STRUCT.size, b"\0")),
                        strict=True))


def _copy(src: memoryview, src_stride: int, s: int, src_size: int, dst: memoryview, dst_stride: int, d: int,
          dst_size: int, n: int) -> None:
    """Copy n u64 entries between rings, each a circular array with its own stride; at most three slices."""
    while n:
        chunk = min(n, src_size - s, dst_size - d)
        src_slice = src[s * src_stride:(s + chunk) * src_stride:src_stride]
        dst[d * dst_stride:(d + chunk) * dst_stride:dst_stride] = src_slice
        n -= chunk
        s = (s + chunk) % src_size
        d = (d + chunk) % dst_size
