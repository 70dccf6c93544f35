"""Talking to the broker: one SEQPACKET connection, one request per message, fds in replies."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import Any, overload

from xskbroker.wire import protocol as proto
from xskbroker.wire import replies
from xskbroker.wire.errors import ErrorCode

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

    @overload
    def call_typed(self, request: proto.Hello) -> tuple[replies.HelloReply, list[int]]: ...
    @overload
    def call_typed(self, request: proto.Grant) -> tuple[replies.GrantReply, list[int]]: ...
    @overload
    def call_typed(self, request: proto.Release) -> tuple[replies.ReleaseReply, list[int]]: ...
    @overload
    def call_typed(self, request: proto.Revoke) -> tuple[replies.RevokeReply, list[int]]: ...
    @overload
    def call_typed(self, request: proto.Status) -> tuple[replies.StatusReply, list[int]]: ...

    def call_typed(self, request: proto.Request) -> tuple[replies.OkReply, list[int]]:
        """Send a request; return its typed reply and the fds it carried (the caller owns them).

        Raises BrokerError for an error reply, and "bad-reply" for a reply that is not the answer to it.
        """
        # only a status reply (every lease) can be large; a 1 MiB receive buffer costs a page-mapping
        # round trip per call, which a grant need not pay
        size = proto.MAX_REPLY if isinstance(request, proto.Status) else SMALL_REPLY
        return self._exchange(proto.encode_request(request), size, replies.OK_REPLIES[request.op])

    def call(self, request: proto.Request) -> tuple[dict[str, Any], list[int]]:
        """Send a request; return the reply as the dict the broker sent, and the fds it carried (the caller
        owns them). call_typed gives the reply typed."""
        reply, fds = self.call_typed(request)
        assert reply.raw is not None
        return reply.raw, fds

    def call_raw(self, data: bytes, reply_size: int = proto.MAX_REPLY) -> tuple[dict[str, Any], list[int]]:
        """Send any bytes as a request (tests send malformed ones); return the reply dict and its fds."""
        reply, fds = self._exchange(data, reply_size)
        assert reply.raw is not None
        return reply.raw, fds

    def _queued_refusal(self) -> proto.BrokerError | None:
        try:
            msg = self.sock.recv(SMALL_REPLY, socket.MSG_DONTWAIT)
            reply = replies.decode_reply(msg) if msg else None
        except (OSError, proto.BrokerError):
            return None
        return reply.exception() if isinstance(reply, replies.ErrorReply) else None

    def _exchange(self, data: bytes, reply_size: int,
                  expected: type[replies.OkReply] | None = None) -> tuple[replies.OkReply, list[int]]:
        try:
            self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            # a connection the broker refused on arrival (too many connections, an identity it cannot judge)
            # has that refusal queued before the close: say why, not "broken pipe"
            refusal = self._queued_refusal()
            if refusal is not None:
                raise refusal from None
            raise ConnectionError(f"the broker closed the connection: {e.strerror or e}") from e
        msg, fds, flags, _ = socket.recv_fds(self.sock, reply_size, MAX_FDS)
        try:
            if not msg:
                raise ConnectionError("the broker closed the connection without a reply")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise proto.BrokerError(ErrorCode.BAD_REPLY, "broker reply was truncated")
            reply = replies.decode_reply(msg)
            if isinstance(reply, replies.ErrorReply):
                raise reply.exception()
            if expected is not None and type(reply) is not expected:
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker answered a {expected.OP} request with a "
                                        f"{reply.op} reply")
            if isinstance(reply, replies.GrantReply) and reply.fd_count() > len(fds):
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply names {reply.fd_count()} fds but "
                                        f"carried {len(fds)}")
            return reply, fds
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
