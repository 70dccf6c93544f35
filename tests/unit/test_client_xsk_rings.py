"""XskSocket's ring arithmetic and frame accounting, against rings in plain memory with the test as the kernel.

Every index starts a few steps below 2^32, so each test crosses the u32 wrap.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterator
from itertools import pairwise

import pytest

from xskbroker.client.xsk import XskSocket, _Ring
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import XDP_RING_NEED_WAKEUP, RingOffsets

# the kernel's layout: producer and consumer on their own cache lines, flags after consumer
OFF = RingOffsets(producer=0, consumer=128, desc=256, flags=132)
START = (1 << 32) - 3
XDP_PACKET_HEADROOM = 256  # where the kernel puts a received packet in its frame (headroom 0)


def _ring(size: int, words: int) -> _Ring:
    fd = os.memfd_create("ring")
    try:
        os.ftruncate(fd, OFF.desc + size * 8 * words)
        ring = _Ring(fd, 0, OFF, size, words)
    finally:
        os.close(fd)
    ring.words[ring.prod_i] = ring.words[ring.cons_i] = START
    return ring


@pytest.fixture
def xs() -> Iterator[XskSocket]:
    g = Geometry(umem_size=16 * 4096, frame_size=4096, fill=4, completion=4, rx=8, tx=4)
    s = XskSocket.__new__(XskSocket)  # no socket: the rings are all there is to test
    s.geometry = g
    s.rx, s.tx, s.fr, s.cr = _ring(g.rx, 2), _ring(g.tx, 2), _ring(g.fill, 1), _ring(g.completion, 1)
    s._rings = [s.rx, s.tx, s.fr, s.cr]
    s.free = deque(range(0, g.umem_size, g.frame_size))
    yield s
    s._unmap()


# ---- the kernel's side ----------------------------------------------------------------------------------

def k_take(r: _Ring, n: int) -> list[int]:
    """Consume n entries of a producer ring (fill: addresses, TX: descriptor addresses)."""
    cons = r.consumer
    assert (r.producer - cons) & 0xFFFFFFFF >= n
    words = len(r.q) // r.size
    out = [r.q[((cons + i) & r.mask) * words] for i in range(n)]
    r.words[r.cons_i] = (cons + n) & 0xFFFFFFFF
    return out


def k_put(r: _Ring, entries: list[tuple[int, int]] | list[int]) -> None:
    """Produce into RX (addr, len) or completion (addr) and publish."""
    prod = r.producer
    for i, e in enumerate(entries):
        idx = (prod + i) & r.mask
        if isinstance(e, tuple):
            r.q[2 * idx], r.d[4 * idx + 2] = e[0], e[1]
        else:
            r.q[idx] = e
    r.words[r.prod_i] = (prod + len(entries)) & 0xFFFFFFFF


# ---- the tests --------------------------------------------------------------------------------------------

def test_fill_receive_recycle_across_the_wrap(xs: XskSocket) -> None:
    for _ in range(5):
        assert xs.fill() == 4  # the ring's room, never more
        frames = k_take(xs.fr, 4)
        k_put(xs.rx, [(a + XDP_PACKET_HEADROOM, 60) for a in frames])
        got = xs.receive(64)
        assert [a for a, _ in got] == [a + XDP_PACKET_HEADROOM for a in frames]
        xs.recycle([a for a, _ in got])
    assert xs.fr.producer < 100 and xs.rx.consumer < 100  # wrapped
    assert sorted(xs.free) == list(range(0, 16 * 4096, 4096))


def test_fill_stops_at_the_room_left_across_the_wrap(xs: XskSocket) -> None:
    assert xs.fill(3) == 3
    k_take(xs.fr, 2)  # the consumer passes 2^32
    assert xs.fill() == 3 and xs.fill() == 0
    assert len(xs.free) == 16 - 6
    assert len(set(k_take(xs.fr, 4)) | set(xs.free)) == 16 - 2


def test_transmit_complete_across_the_wrap(xs: XskSocket) -> None:
    for _ in range(4):
        out = [(xs.alloc(), 64) for _ in range(6)]
        assert xs.transmit(out) == 4  # TX has 4 slots
        sent = k_take(xs.tx, 4)
        assert sent == [a for a, _ in out[:4]]
        k_put(xs.cr, sent)
        assert xs.complete() == 4
        xs.recycle([a for a, _ in out[4:]])
    assert xs.tx.producer < 100 and xs.cr.consumer < 100
    assert sorted(xs.free) == list(range(0, 16 * 4096, 4096))


def test_recycle_rx_across_both_wraps(xs: XskSocket) -> None:
    xs.fill()
    first = sorted(_peek_fill(xs.fr))
    for _ in range(6):
        frames = [a & ~4095 for a in k_take(xs.fr, 4)]  # the kernel masks fill addresses to their frame
        assert sorted(frames) == first
        k_put(xs.rx, [(a + XDP_PACKET_HEADROOM, 60) for a in frames])
        assert xs.recycle_rx() == 4
        assert _peek_fill(xs.fr) == [a + XDP_PACKET_HEADROOM for a in frames]
    assert xs.rx.consumer < 100 and xs.fr.producer < 100


def _peek_fill(r: _Ring) -> list[int]:
    cons = r.consumer
    return [r.q[(cons + i) & r.mask] for i in range((r.producer - cons) & 0xFFFFFFFF)]


def test_a_forwarded_frame_comes_back_from_completion_as_a_whole_frame(xs: XskSocket) -> None:
    """Forwarding a received frame as is (the reflector's loop) sends its address with the packet's offset
    in the frame; the completion ring hands that same address back, and the free pool must get the frame."""
    xs.fill(1)
    (frame,) = k_take(xs.fr, 1)
    k_put(xs.rx, [(frame + XDP_PACKET_HEADROOM, 60)])
    got = xs.receive()
    assert xs.transmit(got) == 1
    k_put(xs.cr, k_take(xs.tx, 1))
    assert xs.complete() == 1
    fs = xs.geometry.frame_size
    allocated = sorted(a for a in iter(xs.alloc, None))
    overlaps = [(a, b) for a, b in pairwise(allocated) if a + fs > b]
    assert not overlaps, f"alloc() handed out overlapping {fs}-byte frames: {overlaps}"
    assert allocated == list(range(0, 16 * fs, fs))


class _KickSocket:
    """Stands in for the AF_XDP socket: records the RX kicks, failing them as the kernel can."""

    def __init__(self, err: int | None = None) -> None:
        self.kicks, self.err = 0, err

    def recv(self, size: int, flags: int) -> bytes:
        self.kicks += 1
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err))
        return b""


def test_rx_is_kicked_only_when_the_fill_ring_asks(xs: XskSocket) -> None:
    xs.sock = _KickSocket()  # type: ignore[assignment]
    xs.wake_rx()
    assert xs.sock.kicks == 0
    xs.fr.words[xs.fr.flags_i] = XDP_RING_NEED_WAKEUP
    xs.wake_rx()
    assert xs.sock.kicks == 1


def test_an_rx_kick_on_a_downed_queue_is_not_an_error(xs: XskSocket) -> None:
    """A zero-copy driver's wakeup fails with ENETDOWN while its queues are down (a link flap, a ring
    resize): like a TX kick, the RX kick must not turn that into an exception out of wait()."""
    xs.sock = _KickSocket(errno.ENETDOWN)  # type: ignore[assignment]
    xs.fr.words[xs.fr.flags_i] = XDP_RING_NEED_WAKEUP
    xs.wake_rx()
    assert xs.sock.kicks == 1
