"""AF_XDP user ABI (linux/if_xdp.h): constants and struct layouts, shared by broker and client.

Pure data: nothing here touches the kernel.
"""

from __future__ import annotations

import struct

from xskbroker.common.records import record

AF_XDP = 44
SOL_XDP = 283

# setsockopt/getsockopt names
XDP_MMAP_OFFSETS = 1
XDP_RX_RING = 2
XDP_TX_RING = 3
XDP_UMEM_REG = 4
XDP_UMEM_FILL_RING = 5
XDP_UMEM_COMPLETION_RING = 6
XDP_STATISTICS = 7
XDP_OPTIONS = 8
XDP_OPTIONS_ZEROCOPY = 1

# sxdp_flags
XDP_SHARED_UMEM = 1 << 0
XDP_COPY = 1 << 1
XDP_ZEROCOPY = 1 << 2
XDP_USE_NEED_WAKEUP = 1 << 3

# ring flags word
XDP_RING_NEED_WAKEUP = 1 << 0

# mmap page offsets
XDP_PGOFF_RX_RING = 0
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_FILL_RING = 0x100000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000

SOCKADDR_XDP = struct.Struct("=HHIII")  # family, flags, ifindex, queue_id, shared_umem_fd
# addr, len, chunk_size, headroom, flags, tx_metadata_len: the 32-byte layout every kernel >= 5.4 accepts
XDP_UMEM_REG_STRUCT = struct.Struct("=QQIIII")
XDP_DESC = struct.Struct("=QII")  # addr, len, options
XDP_RING_OFFSET = struct.Struct("=QQQQ")  # producer, consumer, desc, flags
XDP_STATISTICS_STRUCT = struct.Struct("=6Q")


@record(frozen=True)
class RingOffsets:
    producer: int
    consumer: int
    desc: int
    flags: int


@record(frozen=True)
class MmapOffsets:
    rx: RingOffsets
    tx: RingOffsets
    fill: RingOffsets
    completion: RingOffsets

    @classmethod
    def unpack(cls, raw: bytes) -> MmapOffsets:
        size = XDP_RING_OFFSET.size
        if len(raw) < 4 * size:
            raise ValueError(f"XDP_MMAP_OFFSETS returned {len(raw)} bytes, expected {4 * size}")
        rings = [RingOffsets(*XDP_RING_OFFSET.unpack_from(raw, i * size)) for i in range(4)]
        return cls(*rings)

