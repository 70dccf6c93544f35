"""What unprivileged consumers do in the integration tests. Each runs in a child that has already
dropped to an unprivileged uid with no capabilities (xskbroker.testbed.sandbox.spawn_unprivileged)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from xskbroker.broker import xsk as kernel_xsk  # only its thin bind() wrapper is used, unprivileged
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request
from xskbroker.wire import protocol as proto
from xskbroker.wire.xdp_abi import (
    AF_XDP,
    SOL_XDP,
    XDP_RX_RING,
    XDP_UMEM_REG,
    XDP_UMEM_REG_STRUCT,
)


def try_grant(path: str, iface: str, queues: list[int], umem: int = 4 << 20) -> dict[str, Any]:
    try:
        with request(iface, queues, geometry=proto.Geometry(umem_size=umem), socket_path=path) as g:
            return {"ok": True, "lease": g.lease, "queues": [s.queue for s in g.sockets], "uid": os.getuid()}
    except proto.BrokerError as e:
        return {"ok": False, "code": e.code, "message": e.message, "uid": os.getuid()}
    except (ConnectionError, OSError) as e:
        return {"ok": False, "code": "connection-error", "message": str(e), "uid": os.getuid()}


def grants_on_one_connection(path: str, iface: str) -> dict[str, Any]:
    """Grant, release, grant again, be refused and grant once more, all on one kept connection."""
    out: dict[str, Any] = {"leases": [], "refused": None}
    with Connection(path) as conn:
        for queues in ([0], [1], [0, 1, 2], [1]):  # three queues is over the policy's max_queues
            try:
                with request(iface, queues, geometry=proto.Geometry(umem_size=1 << 20), connection=conn) as g:
                    out["leases"].append(g.lease)
            except proto.BrokerError as e:
                out["refused"] = e.code
        out["hello"] = conn.call(proto.Hello())[0]["ok"]  # still open: release() left it to its owner
    return out


def hold_grant(path: str, iface: str, queues: list[int], seconds: float) -> dict[str, Any]:
    with request(iface, queues, socket_path=path) as g:
        time.sleep(seconds)
        return {"lease": g.lease}


def _errno_of(fn) -> str:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "allowed"


def attempt_escapes(path: str, iface: str, queue: int) -> dict[str, str]:
    """With a bound grant in hand, try everything a consumer must not be able to do."""
    with request(iface, [queue], socket_path=path) as g:
        xs = g.sockets[0]
        other = 1 - queue
        ifindex = g.ifindex
        reg = XDP_UMEM_REG_STRUCT.pack(0, 4096 * 16, 4096, 0, 0, 0)
        results = {
            "rebind_same_queue": _errno_of(lambda: kernel_xsk.bind(xs.fd, ifindex, queue, 0)),
            "rebind_other_queue": _errno_of(lambda: kernel_xsk.bind(xs.fd, ifindex, other, 0)),
            "reregister_umem": _errno_of(lambda: xs.sock.setsockopt(SOL_XDP, XDP_UMEM_REG, reg)),
            "resize_rx_ring": _errno_of(lambda: xs.sock.setsockopt(SOL_XDP, XDP_RX_RING, (64).to_bytes(4, "little"))),
            "own_af_xdp_socket": _errno_of(lambda: socket.socket(AF_XDP, socket.SOCK_RAW).close()),
            "grow_umem_memfd": _errno_of(lambda: os.ftruncate(xs.umem_fd, xs.geometry.umem_size * 2)),
            "shrink_umem_memfd": _errno_of(lambda: os.ftruncate(xs.umem_fd, 4096)),
        }
        return results


@contextlib.contextmanager
def _connections(path: str, count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(s)
            s.connect(path)  # blocking: a full accept backlog makes it wait its turn, not fail
            s.settimeout(5)
        yield socks
    finally:
        for s in socks:
            s.close()


def _ask(s: socket.socket, msg: bytes) -> str:
    """The reply's error code (or "ok"), or "closed" when the broker hung up. A refused connection has its
    error reply queued and is closed: the send may fail (EPIPE), the reply is still there to read."""
    with contextlib.suppress(OSError):
        s.send(msg)
    try:
        data = s.recv(1 << 20)
    except OSError:
        data = b""
    if not data:
        return "closed"
    reply = json.loads(data)
    return "ok" if reply["ok"] else reply["error"]["code"]


def exchange_raw(path: str, messages: list[bytes], connections: int = 1) -> list[str]:
    """Open `connections` connections, send every message on the last one; the error code (or "ok") of each
    reply, or "closed" (and no more) when the broker hung up."""
    codes: list[str] = []
    with _connections(path, connections) as socks:
        for msg in messages:
            codes.append(_ask(socks[-1], msg))
            if codes[-1] == "closed":
                break
    return codes


def probe_connections(path: str, count: int) -> list[str]:
    """Open `count` connections at once and say hello on each: what each one answers."""
    hello = proto.encode_request(proto.Hello())
    with _connections(path, count) as socks:
        return [_ask(s, hello) for s in socks]


def release_and_keep(path: str, iface: str) -> dict[str, Any]:
    """Under a quota of one queue: take queue 0, release it but keep its sockets, ask for queue 1; then close them
    and ask again; then the library's order (close, release) and at once queue 0 again."""
    out: dict[str, Any] = {}

    def ask(conn: Connection, queue: int) -> tuple[dict[str, Any], list[int]]:
        started = time.monotonic()
        try:
            reply, fds = conn.call(proto.Grant(iface, (queue,), geometry=proto.Geometry(umem_size=1 << 20)))
        except proto.BrokerError as e:
            return {"ok": False, "code": e.code, "message": e.message, "s": time.monotonic() - started}, []
        return {**reply, "s": time.monotonic() - started}, fds

    with Connection(path) as conn:
        first, kept = ask(conn, 0)
        conn.call(proto.Release(first["lease"]))
        mine = [x for x in conn.call(proto.Status())[0]["leases"] if x["lease"] == first["lease"]]
        out["status_while_kept"] = mine
        out["kept"], fds = ask(conn, 1)
        for fd in kept + fds:
            os.close(fd)
        if out["kept"].get("ok"):
            conn.call(proto.Release(out["kept"]["lease"]))
        for step, queue in (("closed", 1), ("after_library_order", 0)):
            out[step], fds = ask(conn, queue)
            for fd in fds:
                os.close(fd)
            if out[step].get("ok"):
                conn.call(proto.Release(out[step]["lease"]))
    return out
