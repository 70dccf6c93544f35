"""Talking to the broker: one SEQPACKET connection, one request per message, fds in replies."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import Any

from xskbroker.wire import protocol as proto

DEFAULT_SOCKET = os.environ.get("XSKBROKER_SOCKET", "/run/xskbroker/broker.sock")
MAX_FDS = 2 * proto.MAX_QUEUES
SMALL_REPLY = 1 << 16  # any reply but status: a grant of MAX_QUEUES sockets is about 32 KiB


class Connection:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # A Python timeout would make connect non-blocking, and a full accept backlog (a busy or
            # flooded broker) would then fail at once with EAGAIN. A blocking connect waits its turn,
            # bounded by SO_SNDTIMEO.
            if timeout is not None:
                sec = int(timeout)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                     struct.pack("ll", sec, int((timeout - sec) * 1e6)))
            self.sock.connect(path)
            self.sock.settimeout(timeout)
        except OSError as e:
            self.sock.close()
            raise ConnectionError(f"cannot reach the broker at {path}: {e.strerror or e}") from e

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, request: proto.Request) -> tuple[dict[str, Any], list[int]]:
        """Send a request; return the reply and the fds it carried (the caller owns them)."""
        # only a status reply (every lease) can be large; a 1 MiB receive buffer costs a page-mapping
        # round trip per call, which a grant need not pay
        size = proto.MAX_REPLY if isinstance(request, proto.Status) else SMALL_REPLY
        return self.call_raw(proto.encode_request(request), size)

    def call_raw(self, data: bytes, reply_size: int = proto.MAX_REPLY) -> tuple[dict[str, Any], list[int]]:
        self.sock.send(data)
        msg, fds, flags, _ = socket.recv_fds(self.sock, reply_size, MAX_FDS)
        try:
            if not msg:
                raise ConnectionError("the broker closed the connection without a reply")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise proto.BrokerError("bad-reply", "broker reply was truncated")
            return proto.decode_reply(msg), fds
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
