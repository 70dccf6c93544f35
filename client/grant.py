"""The library call: ask the broker for sockets on an interface's queues and get them ready to use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from xskbroker.client.connection import DEFAULT_SOCKET, Connection
from xskbroker.client.xsk import XskSocket
from xskbroker.common.records import field, record
from xskbroker.wire import protocol as proto
from xskbroker.wire import replies
from xskbroker.wire.errors import ErrorCode


@record
class Grant:
    lease: str
    interface: str
    ifindex: int
    kind: str
    xdp_mode: str
    sockets: list[XskSocket]
    reply: dict[str, Any]  # as the broker sent it
    connection: Connection | None = field(default=None, repr=False)
    typed: replies.GrantReply | None = field(default=None, repr=False)  # the reply, typed
    owns_connection: bool = field(default=True, repr=False)  # False: the caller's, kept open on release

    def release(self) -> None:
        """Close the sockets (the kernel frees their queues) and end the lease at the broker."""
        for s in self.sockets:
            s.close()
        if self.connection is not None:
            _end_lease(self.connection, self.lease)
            if self.owns_connection:
                self.connection.close()
            self.connection = None

    def __enter__(self) -> Grant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _end_lease(conn: Connection, lease: str) -> None:
    """Best effort: the sockets are closed already, and a broker that cannot be told ends the lease when this
    process exits."""
    with contextlib.suppress(OSError, proto.BrokerError, ConnectionError):
        conn.call(proto.Release(lease))


def request(interface: str, queues: int | Sequence[int] = 1, *, start_queue: int = 0,
            geometry: proto.Geometry | None = None, bind_mode: str = "auto", need_wakeup: bool = True,
            socket_path: str = DEFAULT_SOCKET, timeout: float | None = 30.0,
            connection: Connection | None = None) -> Grant:
    """A bound grant on `queues` (a count from start_queue, or explicit ids), rings mapped.

    A program that grants repeatedly passes one open `connection` (it stays the caller's: release() does not
    close it): each grant then skips the connect and the broker's identification of a new peer, about half
    of a small grant's cost. Without one, the grant opens its own, closed on release().
    Raises protocol.BrokerError with the broker's code (e.g. "queue-not-allowed") when refused.
    """
    ids = tuple(range(start_queue, start_queue + queues)) if isinstance(queues, int) else tuple(queues)
    req = proto.Grant(interface=interface, queues=ids, geometry=geometry or proto.Geometry(),
                      bind_mode=bind_mode, need_wakeup=need_wakeup)
    conn = connection or Connection(socket_path, timeout)
    owned = connection is None
    try:
        reply, fds = conn.call_typed(req)
    except BaseException:
        if owned:
            conn.close()
        raise
    try:
        sockets = open_sockets(reply, fds)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        # a bound lease ends only by a release or this process's exit: closing its sockets leaves it holding
        # its queues and quota at the broker, so end it now, as release() would
        _end_lease(conn, reply.lease)
        if owned:
            conn.close()
        raise
    assert reply.raw is not None
    return Grant(reply.lease, reply.interface, reply.ifindex, reply.kind, reply.xdp_mode, sockets, reply.raw, conn,
                 reply, owned)


def request_fds(interface: str, queues: int | Sequence[int] = 1, *, kind: str = "bare", start_queue: int = 0,
                geometry: proto.Geometry | None = None, socket_path: str = DEFAULT_SOCKET,
                timeout: float | None = 30.0, memlock: int = 0,
                holder_pid: int = 0, connection: Connection | None = None) -> tuple[dict[str, Any], list[int]]:
    """A grant as raw material: the reply and its fds (the caller owns and must close them).

    For launchers that pass the fds on (QEMU's sock-fds=, QMP getfd) instead of using them.
    The lease ends when every process holding the sockets has closed them. An open `connection` is used
    (and left open) instead of a new one: see request().
    """
    ids = tuple(range(start_queue, start_queue + queues)) if isinstance(queues, int) else tuple(queues)
    req = proto.Grant(interface=interface, queues=ids, kind=kind, geometry=geometry or proto.Geometry(),
                      memlock=memlock, holder_pid=holder_pid)
    if connection is not None:
        return connection.call(req)
    with Connection(socket_path, timeout) as conn:
        return conn.call(req)


def open_sockets(reply: replies.GrantReply | dict[str, Any], fds: list[int]) -> list[XskSocket]:
    """Map every socket of a bound grant reply (typed, or the dict the broker sent); on failure nothing stays
    mapped (fds stay the caller's)."""
    if isinstance(reply, dict):
        typed = replies.reply_from_dict(reply)
        if not isinstance(typed, replies.GrantReply):
            raise proto.BrokerError(ErrorCode.BAD_REPLY, "not a grant reply")
        reply = typed
    if reply.kind != "bound":
        raise proto.BrokerError(ErrorCode.BAD_REPLY, f"a {reply.kind} grant has no sockets to map")
    out: list[XskSocket] = []
    try:
        for s in reply.bound_sockets:
            out.append(XskSocket(fds[s.fd], fds[s.umem_fd], s.queue, s.geometry, s.bind_flags))
    except BaseException:
        for x in out:
            x.detach()
        raise
    return out
