"""Link events from rtnetlink (RTMGRP_LINK): interfaces removed or renamed, XDP programs changed.

The parser is pure (bytes in, events out); `open_socket` and `LinkFeed` (the socket on the server's loop) are the
only I/O. Three attributes are all the broker needs, which is why this is not pulled in from a netlink library
(whose import alone would cost more than the broker's whole cold start).
"""

from __future__ import annotations

import select
import selectors
import socket
import struct
from collections.abc import Callable

from xskbroker.broker import netlink
from xskbroker.broker.netlink import NLMSGHDR, align
from xskbroker.common.records import record

NETLINK_ROUTE = 0
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME = 3
IFLA_XDP = 43
IFLA_XDP_PROG_ID = 4

_IFINFOMSG = struct.Struct("=BxHiII")


@record(frozen=True)
class LinkEvent:
    removed: bool
    ifindex: int
    name: str | None
    xdp_prog_id: int | None  # None when the message carries no XDP attribute


def parse(data: bytes) -> list[LinkEvent]:
    """Every RTM_NEWLINK/RTM_DELLINK in a datagram; anything else (or anything malformed) is skipped."""
    events = []
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            break
        body = pos + NLMSGHDR.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= pos + length:
            _, _, ifindex, _, _ = _IFINFOMSG.unpack_from(data, body)
            attrs = netlink.attrs(data, body + _IFINFOMSG.size, pos + length)
            name = attrs[IFLA_IFNAME].split(b"\0", 1)[0].decode(errors="replace") if IFLA_IFNAME in attrs else None
            prog_id = None
            if IFLA_XDP in attrs:
                xdp = netlink.attrs(attrs[IFLA_XDP])
                prog_id = struct.unpack("=I", xdp[IFLA_XDP_PROG_ID][:4])[0] if IFLA_XDP_PROG_ID in xdp else 0
            events.append(LinkEvent(kind == RTM_DELLINK, ifindex, name, prog_id))
        pos += align(length)
    return events


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                         NETLINK_ROUTE)
    try:
        sock.bind((0, RTMGRP_LINK))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    except BaseException:
        sock.close()
        raise
    return sock


class LinkFeed:
    """The link-event socket on the server's selector: each event goes to deliver(); a lost batch (the socket's
    buffer overran) to overrun(error), since whatever those events changed is unknown."""

    def __init__(self, sel: selectors.BaseSelector, deliver: Callable[[LinkEvent], None],
                 overrun: Callable[[OSError], None]) -> None:
        self.sock = open_socket()
        self._deliver, self._overrun = deliver, overrun
        self._queued = select.poll()  # one poll(2), no exception, when nothing is queued (the usual case)
        try:
            self._queued.register(self.sock, select.POLLIN)
            sel.register(self.sock, selectors.EVENT_READ, lambda _: self.read())
        except BaseException:
            self.sock.close()
            raise

    def sync(self) -> None:
        """Deliver the events already queued (a grant is about to trust what they would change)."""
        if self._queued.poll(0):
            self.read()

    def read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost
                self._overrun(e)
                return
            for ev in parse(data):
                self._deliver(ev)

    def close(self) -> None:
        self.sock.close()
