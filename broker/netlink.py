"""Netlink framing, as the kernel lays it out (linux/netlink.h): messages and their attributes."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA = struct.Struct("=HH")  # len, type


def align(n: int) -> int:
    """Messages and attributes start on 4-byte boundaries (NLMSG_ALIGN, NLA_ALIGN)."""
    return (n + 3) & ~3


def attrs(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The netlink attributes in data[offset:end], by type (nested/byte-order flags masked off)."""
    out: dict[int, bytes] = {}
    end = len(data) if end is None else end
    while offset + NLA.size <= end:
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size or offset + length > end:
            break
        out[kind & 0x3FFF] = data[offset + NLA.size:offset + length]
        offset += align(length)
    return out


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in a datagram; an error message, or a dump's end carrying an error,
    raises its errno."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        payload = data[offset + NLMSGHDR.size:offset + length]
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, os.strerror(code))
        elif kind == NLMSG_DONE and len(payload) >= 4 and (code := -struct.unpack_from("=i", payload)[0]) > 0:
            # a dump that failed (its device gone: -ENODEV) ends with the errno in NLMSG_DONE, not in an NLMSG_ERROR
            raise OSError(code, os.strerror(code))
        else:
            yield kind, payload
        offset += align(length)
