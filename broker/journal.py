"""Native journal entries, sent to journald's socket by the broker itself.

The protocol is one datagram of fields (systemd's "Native Journal Protocol", stable since systemd 38):
`NAME=value\\n`, or, for a value with a newline in it, `NAME\\n` + its length (64-bit little endian) + the value +
`\\n`. An entry too big for a datagram goes in a sealed memfd passed over SCM_RIGHTS instead. Speaking it
ourselves costs nothing at start-up; importing systemd-python for it cost ~10 ms (uuid, platform, logging),
on every socket activation. The socket never blocks: a journald that has fallen behind makes send() fail
at once (the caller writes the record elsewhere), it never stalls the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SNDBUF = 8 << 20  # as sd_journal_send asks for: most entries then fit a datagram (capped by wmem_max)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _bytes(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")  # a name read from the kernel keeps its own bytes
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def encode(fields: Mapping[str, str]) -> bytes:
    """One entry in the native protocol (pure). Names must be valid journal field names (audit.field_name)."""
    out = bytearray()
    for name, value in fields.items():
        data = _bytes(value)
        if b"\n" in data:
            out += name.encode("ascii") + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """send(message, **fields) writes one entry; OSError when journald cannot take it now."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, message: str, **fields: str) -> None:
        data = encode({"MESSAGE": message, **fields})
        sock = self._socket()
        try:
            sock.sendto(data, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_sealed(sock, data)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            with contextlib.suppress(OSError):  # else the default buffer: big entries go through a memfd
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            self._sock = sock
        return self._sock

    def _send_sealed(self, sock: socket.socket, data: bytes) -> None:
        """What journald reads from a memfd: sealed, so the sender can change nothing once it is sent."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            # sendmsg, not socket.send_fds: that one drops its address argument (Python 3.11)
            sock.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
