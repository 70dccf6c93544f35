"""Interface facts a grant would otherwise ask the kernel for every time: the exact name's ifindex and the
queue count.

Each lookup costs throwaway sockets and ioctls (three per grant, ~6 % of the loop). They change only when
the link does, and every such change (rename, altname, removal, XDP program, channel count on drivers that
reset the link) arrives as an rtnetlink link event: the server's link watcher empties the cache on any of
them, and the grant path drains the watcher's socket first (one recv), so a change the kernel made before
the request is never missed. Without the watcher nothing is cached.
"""

from __future__ import annotations


class NetCache:
    def __init__(self) -> None:
        self.ifindex: dict[str, int] = {}  # exact (canonical) name -> ifindex
        self.queues: dict[int, int] = {}  # ifindex -> queue count (ethtool channels)

    def forget(self) -> None:
        self.ifindex.clear()
        self.queues.clear()

    def forget_interface(self, ifindex: int) -> None:
        """Drop what is known of one interface (its grant failed in the kernel: perhaps it changed)."""
        self.queues.pop(ifindex, None)
        for name in [n for n, i in self.ifindex.items() if i == ifindex]:
            del self.ifindex[name]
