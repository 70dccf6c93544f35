"""The device-plugin endpoint: DPDK's af_xdp PMD (dp_path=, use_cni=) gets a per-queue map grant here.

One listener per configured (path, interface, queues, tenant), opt-in (`serve --device-plugin`). The peer
is who SO_PEERCRED/SO_PEERPIDFD say it is; the hostname it sends is recorded, never believed. The grant is
decided and taken at /connect, so that every refusal the broker can foresee is a /host_nak: DPDK reads
/fd_nak as success and goes on with fd 0. The lease is the peer process's (its exit ends it); its later
connections (DPDK makes one per queue) get the same map, reopened by id. Every socket is non-blocking and
replies are a few bytes: a peer that sends nothing costs a connection slot (the oldest goes when they run
out), one that reads nothing is dropped when its queue is full. fds a peer attaches are refused by the
kernel (SO_PASSRIGHTS=0) or closed on the untrusted closer's thread, never on the loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import pwd
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from xskbroker.broker import dpsocket
from xskbroker.broker import peer as peers
from xskbroker.broker.core import Deferred, quota_peer
from xskbroker.broker.holders import same_process
from xskbroker.broker.listener import (
    MAX_FDS_IN,
    MSG_CTRUNC,
    MSG_TRUNC,
    accept_with_spare,
    close_client,
    refuse_passed_fds,
)
from xskbroker.broker.server import Server
from xskbroker.common.records import field, record, replace
from xskbroker.wire import deviceplugin as dp
from xskbroker.wire import protocol as proto

DEFAULT_PATH = "/tmp/afxdp_dp/{iface}/afxdp.sock"  # DPDK's dp_path default
MAX_CONNECTIONS = 32  # per endpoint: DPDK makes one per queue, one after the other
# What DPDK sends after a /host_ok: counted with its /connect, so that a handshake is one request of the rate
# limit, as a client's grant is (per message, a queue_count=N DPDK spent 4N, and a 20 req/s quota cut its
# sixth queue short, after the lease was taken)
_HANDSHAKE_REST = frozenset({b"/version", b"/xsk_map_fd", b"/fin"})


@record(frozen=True)
class EndpointSpec:
    interface: str
    uid: int
    gid: int
    queues: tuple[int, ...] = ()  # () = every queue of the device
    path: str = ""

    @property
    def where(self) -> str:
        return self.path or DEFAULT_PATH.format(iface=self.interface)


def parse_spec(text: str) -> EndpointSpec:
    """`interface=eth1,user=dpdk[,group=G][,queues=2-3][,path=/tmp/afxdp_dp/eth1/afxdp.sock]` (ValueError)."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in ("interface", "user", "group", "queues", "path") or key in fields:
            raise ValueError(f"{item!r}: expected interface=, user=, group=, queues= or path=, each once")
        fields[key] = value
    if "interface" not in fields or "user" not in fields:
        raise ValueError("interface= and user= are required")
    bad = proto.ifname_problem(fields["interface"])
    if bad:
        raise ValueError(f"interface {fields['interface']!r}: {bad}")
    user = fields["user"]
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise ValueError(f"no user named {user!r}") from None
        uid = gid = int(user)  # a uid with no passwd entry (a container's, a test's)
    if "group" in fields:
        g = fields["group"]
        try:
            gid = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
        except KeyError:
            raise ValueError(f"no group named {g!r}") from None
    queues: tuple[int, ...] = ()
    if fields.get("queues"):
        lo, dash, hi = fields["queues"].partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or int(hi if dash else lo) < int(lo):
            raise ValueError(f"queues={fields['queues']!r}: expected N or N-M")
        queues = tuple(range(int(lo), int(hi if dash else lo) + 1))
    path = fields.get("path", "")
    if path and not path.startswith("/"):
        raise ValueError(f"path={path!r}: must be absolute")
    return EndpointSpec(fields["interface"], uid, gid, queues, path)


@record
class _Conn:
    sock: socket.socket
    who: peers.PeerInfo
    session: dp.Session
    since: float
    lease: str | None = None
    fresh: bool = False  # its /connect made the lease (else it reused a live one of its holder's)
    handed: int = 0  # maps handed out on it
    unpaid: set[bytes] = field(default_factory=lambda: set(_HANDSHAKE_REST))  # each once, after /host_ok


class Endpoint:
    def __init__(self, spec: EndpointSpec) -> None:
        self.spec = spec
        self.placed: dpsocket.Placed | None = None
        self.server: Server | None = None
        self.conns: dict[int, _Conn] = {}
        self.held: dict[int, str] = {}  # holder pid -> its lease from this endpoint

    def describe(self) -> dict[str, Any]:
        return {"path": self.spec.where, "interface": self.spec.interface, "uid": self.spec.uid,
                "queues": list(self.spec.queues) or "all"}

    def start(self, server: Server) -> None:
        """Listen (dpsocket.UnsafePath, OSError when it cannot) and serve on the server's loop."""
        self.placed = dpsocket.place(self.spec.where, self.spec.uid, self.spec.gid)
        # DPDK sends no fd; /config_busy_poll (another plugin client's) is not offered, so this blocks nothing
        refuse_passed_fds(self.placed.sock)
        self.server = server
        server.sel.register(self.placed.sock, selectors.EVENT_READ, self._accept)
        server.audit({"event": "dp-endpoint", "state": "listening", **self.describe()})

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._drop(c)
        if self.placed is not None:
            if self.server is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.server.sel.unregister(self.placed.sock)
                self.server.audit({"event": "dp-endpoint", "state": "removed", **self.describe()})
            self.placed.remove()
            self.placed = None

    # ---- connections ------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        server = self.server
        assert server is not None
        for _ in range(16):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                server.audit({"event": "dp-accept-failed", "path": self.spec.where, "error": str(e)})
                if e.errno not in (errno.EMFILE, errno.ENFILE) or server._spare is None:
                    return
                # out of fds the connection stays queued and the listener readable: the loop would spin. Taken
                # with the spare fd and closed (DPDK's handshake has no word for it: it sees the connection end)
                spare, server._spare = server._spare, None
                server._spare = accept_with_spare(listener, spare, lambda conn: conn.close())
                continue
            refuse_passed_fds(conn)
            conn.setblocking(False)
            who = server.identify(conn, functools.partial(self._unjudgeable, conn))
            if who is None:
                continue
            if len(self.conns) >= MAX_CONNECTIONS:
                oldest = min(self.conns.values(), key=lambda c: c.since)
                server.audit({"event": "dp-connection-evicted", "path": self.spec.where,
                              "peer": oldest.who.as_dict(), "for_pid": who.pid})
                self._drop(oldest)
            self.conns[conn.fileno()] = _Conn(conn, who, dp.Session(), time.monotonic())
            server.sel.register(conn, selectors.EVENT_READ, self._readable)

    def _unjudgeable(self, conn: socket.socket, who: peers.PeerInfo, why: str) -> None:
        assert self.server is not None
        self.server.audit({"event": "dp-refused", "path": self.spec.where, "peer": who.as_dict(), "reason": why})
        # DPDK's protocol has no word for it before /connect: it sees the connection end. What it queued is read
        # first: fds in it are closed off the loop (listener.close_client)
        close_client(conn, self.server.untrusted.close)

    def _drop(self, c: _Conn) -> None:
        self.conns.pop(c.sock.fileno(), None)
        if self.server is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.server.sel.unregister(c.sock)
            close_client(c.sock, self.server.untrusted.close)  # fds queued on it closed off the loop
        else:
            c.sock.close()

    def _readable(self, sock: socket.socket) -> None:
        server = self.server
        assert server is not None
        c = self.conns[sock.fileno()]
        try:
            self._serve(c, sock)
            server._prune_pidfds()  # as after a request on the broker's own socket: holders that let go
        except Exception as e:  # a bug must cost one connection, never the broker and everyone's leases
            server._internal_error(c.who, e)
            self._drop(c)

    def _serve(self, c: _Conn, sock: socket.socket) -> None:
        server = self.server
        assert server is not None
        try:
            data, anc, flags, _ = sock.recvmsg(dp.MAX_REQUEST + 1, socket.CMSG_SPACE(MAX_FDS_IN * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        nfds = server._discard_passed_fds(anc) + (1 if flags & MSG_CTRUNC else 0)
        if not data and not nfds:
            self._drop(c)  # orderly close
            return
        service = server.service
        limited = None
        if not _paid(c, data, nfds, flags):
            limited = service.limiter.allow(service.policy, quota_peer(c.who), service.clock())
        if limited:
            server.audit({"event": "rate-limited", "peer": c.who.as_dict(), "op": "device-plugin",
                          "code": limited.code, "reason": limited.reason})
            self._drop(c)
            return
        step = c.session.feed(data, truncated=bool(flags & MSG_TRUNC), fds=nfds)
        if step.refused:
            server.audit({"event": "dp-refused", "path": self.spec.where, "peer": c.who.as_dict(),
                          "reply": (step.reply or b"").decode(), "reason": step.refused})
        if step.ask is None:
            assert step.reply is not None
            self._send(c, step.reply)
            return
        if isinstance(step.ask, dp.Connect):
            self._connect(c, step.ask)
        elif isinstance(step.ask, dp.MapFd):
            self._map_fd(c, step.ask)
        else:  # not offered: it needs the XSK fd, which this endpoint's socket refuses (see start)
            server.audit({"event": "dp-busy-poll", "peer": c.who.as_dict(), "decision": "deny",
                          "reason": "not offered by this endpoint"})
            self._send(c, c.session.answer(False))

    def _send(self, c: _Conn, data: bytes, fd: int | None = None) -> bool:
        try:
            if fd is None:
                c.sock.send(data)
            else:
                socket.send_fds(c.sock, [data], [fd])
        except OSError:  # EAGAIN: it reads nothing and its queue is full; or it is gone
            self._drop(c)
            return False
        return True

    def regroup(self, groups_of: Callable[[frozenset[int]], frozenset[str]]) -> None:
        """Name the connected tenants' groups as groups_of does now (a reload names other groups)."""
        for c in self.conns.values():
            c.who = replace(c.who, groups=groups_of(c.who.gids))

    def _live(self, pid: int, who: peers.PeerInfo) -> str | None:
        """The live lease this process already took here, if any: of this very process (start time and pidfs
        inode), never of an exited one whose pid it reused within the start time's clock tick."""
        assert self.server is not None
        lease_id = self.held.get(pid)
        lease = self.server.service.leases.get(lease_id or "")
        if (lease is None or lease.revoked or lease.pid != pid or lease.pid_start != who.start
                or not same_process((lease.pid_start, lease.pid_ino), (who.start, who.ino))):
            self.held.pop(pid, None)
            return None
        return lease.id

    def _connect(self, c: _Conn, ask: dp.Connect) -> None:
        server = self.server
        assert server is not None
        record: dict[str, Any] = {"event": "dp-connect", "path": self.spec.where, "peer": c.who.as_dict(),
                                  "hostname": ask.hostname}
        lease_id = self._live(c.who.pid, c.who)
        fresh = False
        if lease_id is None:
            # _grant_now: the answer is needed here, so the interface's queue count, if not remembered, is read on the
            # loop (one ethtool ioctl: it waits for rtnl), not on a worker as a client's grant's is
            outcome = server.service._grant_now(c.who, proto.Grant(self.spec.interface, self.spec.queues, kind="map"))
            if isinstance(outcome, Deferred):  # map grants never wait; should one, it is not made
                outcome.cancel()
                lease_id, code = None, "internal-error"
            else:
                server.closer.close(outcome.fds)  # the map is handed out by id at /xsk_map_fd
                outcome.fds = []
                lease_id = outcome.lease_id
                code = "ok" if lease_id else str(getattr(outcome.reply, "code", "denied"))
                record["reason"] = getattr(outcome.reply, "message", None)
            fresh = lease_id is not None
        else:
            code, record["reused"] = "ok", True
        record.update(decision="allow" if lease_id else "deny", code=code, lease=lease_id)
        server.audit(record)
        c.lease, c.fresh = lease_id, fresh
        sent = self._send(c, c.session.answer(lease_id is not None))
        if not fresh or lease_id is None:
            return
        if not sent:
            server.service.abort(lease_id)  # it never learnt of it: nothing is held for it
            return
        if len(self.held) >= 4 * MAX_CONNECTIONS:  # holders that exited: their leases are gone
            self.held = {p: x for p, x in self.held.items() if server.service.leases.get(x) is not None}
        self.held[c.who.pid] = lease_id
        lease = server.service.leases.get(lease_id)
        server.watch_pid(c.who.pid, c.sock, lease.pid_start if lease else None, lease.pid_ino if lease else None)

    def _map_fd(self, c: _Conn, ask: dp.MapFd) -> None:
        server = self.server
        assert server is not None
        record: dict[str, Any] = {"event": "dp-map-fd", "path": self.spec.where, "peer": c.who.as_dict(),
                                  "interface": ask.interface, "lease": c.lease}
        lease = server.service.leases.get(c.lease or "")
        fd = None
        if ask.interface != self.spec.interface:
            why = f"this endpoint serves {self.spec.interface}"
        elif lease is None or lease.revoked:
            why = "the lease taken at /connect has ended"
        else:
            try:
                fd = server.service.kernel.map_fd(lease.map_id)
                why = ""
            except OSError as e:
                why = f"cannot reopen map {lease.map_id}: {e.strerror or e}"
        record.update(decision="allow" if fd is not None else "deny", **({"reason": why} if why else {}))
        if fd is not None and (c.handed or not c.fresh):
            record["reused"] = True  # the map handed out with the grant, again: summarised past a burst (audit)
        c.handed += fd is not None
        server.audit(record)
        try:
            self._send(c, c.session.answer(fd is not None), fd)
        finally:
            if fd is not None:
                server.closer.close([fd])


def _paid(c: _Conn, data: bytes, nfds: int, flags: int) -> bool:
    """Whether the message is the rest of a handshake whose /connect was counted: /version, /xsk_map_fd and
    /fin after its /host_ok, once each (anything else, or again, counts)."""
    word = data.split(b",", 1)[0]
    if c.session.state != "connected" or nfds or flags & MSG_TRUNC or word not in c.unpaid:
        return False
    c.unpaid.discard(word)
    return True


def start_all(specs: list[EndpointSpec], server: Server, warn: Callable[[str], None]) -> list[Endpoint]:
    """Start each endpoint; one that cannot start is reported and skipped (a link planted in /tmp must not
    keep the broker, and everyone else's grants, down)."""
    started = []
    for spec in specs:
        ep = Endpoint(spec)
        try:
            ep.start(server)
        except OSError as e:
            server.audit({"event": "dp-endpoint", "state": "failed", **ep.describe(),
                          "error": e.strerror or str(e), "errno": errno.errorcode.get(e.errno or 0)})
            warn(f"device-plugin endpoint {spec.where} not started: {e.strerror or e}")
            continue
        started.append(ep)
    return started
