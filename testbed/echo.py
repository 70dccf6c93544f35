"""A reflector: answers each test frame by sending it back where it came from.

Used by `xskbroker demo`, the integration tests and the benchmarks as the consumer's packet loop. The
frames are Ethernet with the local-experimental ethertype 0x88B5: a 4-byte tag, a sequence number and
a direction byte, which the reflector flips after swapping the MAC addresses.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Sequence
from typing import Any

from xskbroker.client.xsk import XskSocket

ETH_P_DEMO = 0x88B5
FRAME = struct.Struct("!6s6sH4sIB")  # dst, src, ethertype, tag, seq, direction
MAGIC = b"XSKB"
PING = b"PING"  # readiness probe: answered like data, never counted
TO_CONSUMER, TO_PEER = 0, 1
_ETHERTYPE = struct.pack("!H", ETH_P_DEMO)
_DIRECTION = FRAME.size - 1


class Reflector:
    def __init__(self, sockets: Sequence[XskSocket]) -> None:
        self.sockets = list(sockets)
        self.rx = self.tx = self.done = self.foreign = self.probes = 0
        self.tags: dict[int, dict[str, int]] = {xs.queue: {} for xs in self.sockets}

    def _serve(self, xs: XskSocket) -> int:
        descs = xs.receive(64)
        if not descs:
            self.done += xs.complete()
            xs.fill()
            return 0
        out = []
        tags = self.tags[xs.queue]
        for addr, length in descs:
            f = xs.frame(addr, length)
            if length >= FRAME.size and f[12:14] == _ETHERTYPE:
                f[0:12] = bytes(f[6:12]) + bytes(f[0:6])
                f[_DIRECTION] = TO_PEER
                out.append((addr, length))
                tag = bytes(f[14:18])
                if tag == PING:
                    self.probes += 1
                else:
                    self.rx += 1
                    key = tag.decode(errors="replace")
                    tags[key] = tags.get(key, 0) + 1
            else:
                self.foreign += 1
                xs.recycle([addr])
            del f
        while out:  # the TX ring has room for the batch once completions are reaped
            sent = xs.transmit(out)
            self.tx += sent
            out = out[sent:]
            xs.kick()
            self.done += xs.complete()
        xs.fill()
        return len(descs)

    def run(self, count: int, timeout: float = 20.0) -> dict[str, Any]:
        """Answer until `count` data frames came in (or timeout), then until every reply left."""
        for xs in self.sockets:
            xs.fill()
        poller = select.poll()
        for xs in self.sockets:
            poller.register(xs.fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while self.rx < count and time.monotonic() < deadline:
            if not sum(self._serve(xs) for xs in self.sockets):
                for xs in self.sockets:
                    xs.wake_rx()
                poller.poll(50)
        settle = time.monotonic() + 2
        while self.done < self.tx and time.monotonic() < settle:
            progress = 0
            for xs in self.sockets:
                xs.kick()
                progress += xs.complete()
            self.done += progress
            if not progress:
                time.sleep(0.001)
        return {"rx_packets": self.rx, "tx_packets": self.tx - self.probes, "probes_answered": self.probes,
                "foreign_packets": self.foreign, "tx_completed": self.done,
                "tags": {str(q): t for q, t in self.tags.items()},
                "xsk_stats": {str(xs.queue): xs.statistics() for xs in self.sockets}}
