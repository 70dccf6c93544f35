"""Talking to the broker: one SEQPACKET connection, one request per message, fds in replies."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from typing import Any, overload

from xskbroker.common.defaults import DEFAULT_SOCKET as DEFAULT_SOCKET  # re-exported: the client's modules use it
from xskbroker.wire import protocol as proto
from xskbroker.wire import replies
from xskbroker.wire.errors import ErrorCode

MAX_FDS = 2 * proto.MAX_QUEUES
SMALL_REPLY = 1 << 16  # any reply but status: a grant of MAX_QUEUES sockets is about 32 KiB
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)  # a plain int: a test on an IntFlag runs enum code


class Connection:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # The timeout is the kernel's (SO_SNDTIMEO, SO_RCVTIMEO) on a blocking socket, not Python's: a
            # Python timeout makes connect non-blocking, and a full accept backlog (a busy or flooded broker)
            # would then fail at once with EAGAIN, where a blocking connect waits its turn; and it costs a
            # poll(2) before every send and every receive.
            if timeout is not None:
                sec = int(timeout)
                tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.connect(path)
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
        """Send a request; return the reply as the dict the broker sent, and the fds it carried (the caller owns
        them). Raises BrokerError for an error reply, and "bad-reply" for one that is not this request's.

        Checked as far as a caller of the dict relies on it: the protocol version, the outcome, that it answers
        this request's op and, for a grant, its kind, its lease and every fd index it names within the fds that
        came. call_typed reads every field into its type; that reading cost a 1 MiB grant a tenth of its time.
        """
        size = proto.MAX_REPLY if isinstance(request, proto.Status) else SMALL_REPLY
        msg, fds = self._send_receive(proto.encode_request(request), size)
        try:
            try:
                reply = json.loads(msg)
            except (ValueError, RecursionError):
                reply = None
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                refused = replies.decode_reply(msg)  # an error reply (raised below), or bad-reply
                if isinstance(refused, replies.ErrorReply):
                    raise refused.exception()
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply to a {request.op} request is not an "
                                        "error and not ok")
            if type(reply.get("v")) is not int or reply["v"] != proto.VERSION:  # as decode_reply: not true, not 1.0
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply has no version {proto.VERSION}")
            if reply.get("op") != request.op:
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker answered a {request.op} request with a "
                                        f"{reply.get('op')} reply")
            _keep_named(fds, grant_fds(reply) if request.op == "grant" else 0)
            return reply, fds
        except BaseException:
            _close_all(fds)
            raise

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

    def _timed_out(self, what: str) -> TimeoutError:
        return TimeoutError(f"the broker at {self.path} did not {what} within {self.timeout} s")

    def _send_receive(self, data: bytes, reply_size: int) -> tuple[bytes, list[int]]:
        """One request out, one reply in: the reply's bytes and fds (closed here if the reply is unusable)."""
        try:
            self.sock.send(data)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            raise self._timed_out("take the request") from None
        except (BrokenPipeError, ConnectionResetError) as e:
            # a connection the broker refused on arrival (too many connections, an identity it cannot judge)
            # has that refusal queued before the close: say why, not "broken pipe"
            refusal = self._queued_refusal()
            if refusal is not None:
                raise refusal from None
            raise ConnectionError(f"the broker closed the connection: {e.strerror or e}") from e
        except OSError as e:
            if self.sock.fileno() < 0:  # closed by an earlier call's timeout
                raise ConnectionError(f"the connection to the broker at {self.path} was closed after a timeout") from e
            raise
        try:
            msg, fds, flags, _ = socket.recv_fds(self.sock, reply_size, MAX_FDS)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            # the reply may still come: close, or the next call would take it (and its fds) for its own answer
            self.sock.close()
            raise self._timed_out("answer") from None
        except ConnectionResetError as e:
            # refused on arrival, and closed with this request unread (it came after the broker had drained
            # what was there): the kernel reports the reset before the refusal queued ahead of it
            refusal = self._queued_refusal()
            if refusal is not None:
                raise refusal from None
            raise ConnectionError(f"the broker closed the connection: {e.strerror or e}") from e
        if not msg or flags & _TRUNCATED:
            _close_all(fds)
            if not msg:
                raise ConnectionError("the broker closed the connection without a reply")
            raise proto.BrokerError(ErrorCode.BAD_REPLY, "broker reply was truncated")
        return msg, fds

    def _exchange(self, data: bytes, reply_size: int,
                  expected: type[replies.OkReply] | None = None) -> tuple[replies.OkReply, list[int]]:
        msg, fds = self._send_receive(data, reply_size)
        try:
            reply = replies.decode_reply(msg)
            if isinstance(reply, replies.ErrorReply):
                raise reply.exception()
            if expected is not None and type(reply) is not expected:
                raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker answered a {expected.OP} request with a "
                                        f"{reply.op} reply")
            _keep_named(fds, reply.fd_count() if isinstance(reply, replies.GrantReply) else 0)
            return reply, fds
        except BaseException:
            _close_all(fds)
            raise


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _keep_named(fds: list[int], needed: int) -> None:
    """Refuse a reply carrying fewer fds than it names (only a grant names any); close those past the named ones:
    callers keep only those."""
    if needed > len(fds):
        raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply names {needed} fds but carried {len(fds)}")
    _close_all(fds[needed:])
    del fds[needed:]


def grant_fds(reply: dict[str, Any]) -> int:
    """How many fds an ok grant reply (the dict) needs by the indexes it names; BrokerError("bad-reply") for one
    that is not a version-1 grant reply with a lease and its kind's fd indexes."""
    kind = reply.get("kind")
    if (reply.get("v") != proto.VERSION or reply.get("op") != "grant" or not isinstance(reply.get("lease"), str)
            or kind not in ("bound", "bare", "map")):
        raise proto.BrokerError(ErrorCode.BAD_REPLY, "broker reply is not a version-1 grant reply with a lease and "
                                "a kind of bound, bare or map")
    indexes: list[Any] = []
    if kind != "map":
        sockets = reply.get("sockets")
        if not isinstance(sockets, list) or not all(isinstance(s, dict) for s in sockets):
            raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply: a {kind} grant's sockets are not a list of "
                                    "objects")
        keys = ("fd", "umem_fd") if kind == "bound" else ("fd",)
        indexes = [s.get(k) for s in sockets for k in keys]
    if kind == "map" or reply.get("map_fd") is not None:  # as GrantReply.fd_count counts it, for every kind
        indexes.append(reply.get("map_fd"))
    checked = [i for i in indexes if type(i) is int and 0 <= i < MAX_FDS]
    if len(checked) != len(indexes):
        raise proto.BrokerError(ErrorCode.BAD_REPLY, f"broker reply: a {kind} grant names an fd index that is not "
                                f"an integer from 0 to {MAX_FDS - 1}")
    return max(checked, default=-1) + 1
