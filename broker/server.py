"""The broker's event loop: accept, read one request, reply (with fds), watch lease holders.

Single-threaded over selectors; every socket is non-blocking, so a silent or half-written client
never stalls the others. All decisions live in broker.service.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from broker import faults, linkwatch
from broker import peer as peers
from broker.closer import Closer
from broker.service import Deferred, Outcome, Service, policy_peer
from client import protocol as proto
from policy import Holding, PolicyError, load_policy
from policy import quota as quotas

MAX_FDS_IN = 16  # fds a client might (wrongly) attach; more are dropped and closed by the kernel
MAX_CONNECTIONS = 1024
# Without a [[quota]] max_connections, one user could still take every connection and lock the others
# out: no single non-admin uid gets more than half.
MAX_CONNECTIONS_PER_UID = MAX_CONNECTIONS // 2
ORPHAN_POLL_SECONDS = 2.0
RETRY_CAP = 0.002  # a waiting grant retries at least this often: the queue is released any moment


def listen(path: str, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """A SEQPACKET listener at path; a stale socket file left by a dead broker is replaced."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise FileExistsError(errno.EADDRINUSE, f"a broker is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777)  # no window where the socket is reachable with the default mode
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        # by the inode just made, never by name: a link swapped in for it (in a directory others can
        # write) would make root chmod/chown the link's target
        node = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(node)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise FileExistsError(errno.EEXIST, f"{path} was replaced while it was being created")
            os.chmod(f"/proc/self/fd/{node}", mode)
            if group is not None:
                os.chown(f"/proc/self/fd/{node}", -1, group)
        finally:
            os.close(node)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    def __init__(self, listener: socket.socket, service: Service, audit: Callable[[dict[str, Any]], None],
                 policy_path: str | None = None, idle_timeout: float | None = None) -> None:
        self.listener = listener
        self.idle_timeout = idle_timeout  # exit after this long with no connection and no lease
        self.service = service
        self.audit = audit
        self.policy_path = policy_path
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, tuple[socket.socket, peers.PeerInfo]] = {}
        self.pidfds: dict[int, int] = {}  # pid -> pidfd
        # requests waiting for the kernel: (when to retry, the request, its connection, its peer);
        # their connections are not read meanwhile, so each client still gets its replies in order
        self.waiting: list[tuple[float, Deferred, socket.socket, peers.PeerInfo]] = []
        self.stopping = False
        self._next_orphan_check = 0.0
        self.closer = Closer()
        self._wake_r, self._wake_w = socket.socketpair()
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._signals)
        service.signal_holder = self.signal_holder
        self.links: socket.socket | None = None
        try:
            self.links = linkwatch.open_socket()
            self.sel.register(self.links, selectors.EVENT_READ, self._link_events)
            service.link_events = True
        except OSError as e:  # lifecycle tracking is lost, grants still work: say so and go on
            self.audit({"event": "linkwatch-unavailable", "error": str(e)})
        for lease in service.leases:
            self.watch_pid(lease.pid)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> None:
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            while not self.stopping:
                # orphaned leases give no event when their sockets close: look at them every few seconds
                poll = ORPHAN_POLL_SECONDS if self.service.leases.orphans() else None
                retry = max(0.0, min(w[0] for w in self.waiting) - time.monotonic()) if self.waiting else None
                timeout = min((t for t in (poll, self.idle_timeout, retry) if t is not None), default=None)
                events = self.sel.select(timeout)
                for key, _ in events:
                    key.data(key.fileobj)
                if self.waiting:
                    self._retry_waiting()
                if poll is not None and time.monotonic() >= self._next_orphan_check:
                    self._next_orphan_check = time.monotonic() + ORPHAN_POLL_SECONDS
                    self.service.check_orphans()
                if not events and self.idle():
                    self.audit({"event": "idle-exit", "after_s": self.idle_timeout})
                    self.stopping = True
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in handlers.items():
                signal.signal(s, h)

    def idle(self) -> bool:
        """Nothing would be lost by exiting: no client connected, no lease to watch."""
        return not self.conns and not len(self.service.leases) and not self.waiting

    def close(self) -> None:
        for _, deferred, _, _ in self.waiting:  # nothing half-made survives the broker
            deferred.cancel()
        self.waiting = []
        for conn, _ in list(self.conns.values()):
            self._drop(conn)
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()
        if self.links is not None:
            self.links.close()
        self.closer.stop()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _signals(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.audit({"event": "stopping", "signal": signal.Signals(signum).name})
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        if not self.policy_path:
            return
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as e:
            self.audit({"event": "policy-reload-failed", "path": self.policy_path, "errors": e.errors,
                        "kept": "previous policy"})
            return
        self.service.policy = policy
        self.audit({"event": "policy-reloaded", "path": self.policy_path, "rules": len(policy.rules)})

    # ---- connections ------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and friends: keep serving the connections we have
            self.audit({"event": "accept-failed", "error": str(e)})
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        try:
            who = peers.identify(conn)
        except OSError:
            conn.close()
            return
        held = [Holding(p.uid, p.gids, p.groups, connections=1) for _, p in self.conns.values()]
        refused = quotas.check(self.service.policy, policy_peer(who), held, connections=1)
        code, reason = (refused.code, refused.reason) if refused else ("", "")
        if not refused and not self.service.is_admin(who) \
                and sum(1 for h in held if h.uid == who.uid) >= MAX_CONNECTIONS_PER_UID:
            code = "too-many-connections"
            reason = f"uid {who.uid} already has {MAX_CONNECTIONS_PER_UID} connections open to the broker"
        if code:
            self.audit({"event": "connection-refused", "peer": who.as_dict(), "code": code, "reason": reason})
            with contextlib.suppress(OSError):
                conn.send(proto.error_reply(code, reason))
            conn.close()
            return
        self.conns[conn.fileno()] = (conn, who)
        self.sel.register(conn, selectors.EVENT_READ, self._readable)

    def _drop(self, conn: socket.socket) -> None:
        self.conns.pop(conn.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        conn.close()

    def _readable(self, conn: socket.socket) -> None:
        who = self.conns[conn.fileno()][1]
        try:
            data, anc, flags, _ = conn.recvmsg(proto.MAX_REQUEST + 1, socket.CMSG_SPACE(MAX_FDS_IN * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        nfds = _close_passed_fds(anc) + (1 if flags & socket.MSG_CTRUNC else 0)
        if not data and not nfds:
            self._drop(conn)  # orderly close
            return
        try:
            outcome = self.service.handle(who, data, truncated=bool(flags & socket.MSG_TRUNC), fds=nfds)
            self._prune_pidfds()
        except Exception as e:
            outcome = self._internal_error(who, e)
        if isinstance(outcome, Deferred):
            self.sel.unregister(conn)
            self.waiting.append((time.monotonic() + outcome.delay, outcome, conn, who))
            return
        self._reply(conn, outcome, who)

    def _internal_error(self, who: peers.PeerInfo, e: Exception) -> Outcome:
        """A bug must cost one request, never the broker and everyone's leases: record it, answer it."""
        self.audit({"event": "internal-error", "pid": who.pid, "error": repr(e),
                    "trace": traceback.format_exc(limit=8)})
        return Outcome(proto.error_reply("internal-error", f"the broker failed to handle this request: {e!r}"))

    def _retry_waiting(self) -> None:
        now = time.monotonic()
        still = []
        for due, deferred, conn, who in self.waiting:
            if due > now:
                still.append((due, deferred, conn, who))
                continue
            try:
                outcome = deferred.step()
            except Exception as e:
                outcome = self._internal_error(who, e)
            if outcome is None:
                deferred.delay = min(deferred.delay * 2, RETRY_CAP)
                still.append((now + deferred.delay, deferred, conn, who))
                continue
            self.sel.register(conn, selectors.EVENT_READ, self._readable)
            self._reply(conn, outcome, who)
        self.waiting = still

    def _reply(self, conn: socket.socket, outcome: Outcome, who: peers.PeerInfo) -> None:
        try:
            faults.point("before-send")
            if outcome.fds:
                socket.send_fds(conn, [outcome.reply], outcome.fds)
            else:
                conn.send(outcome.reply)
        except OSError as e:
            if outcome.lease_id:
                self.service.abort(outcome.lease_id)
            self.audit({"event": "reply-failed", "pid": who.pid, "error": str(e)})
            self._drop(conn)
        else:
            if outcome.lease_id:
                faults.point("after-send")
                # SO_PEERPIDFD names the requester race-free; a holder it named gets pidfd_open
                self.watch_pid(outcome.holder_pid or who.pid, conn if outcome.holder_pid in (0, who.pid) else None)
        finally:
            # the client has its own copies now; ours would keep the sockets alive
            self.closer.close(outcome.fds)
            outcome.fds = []

    def watch_pid(self, pid: int, conn: socket.socket | None = None) -> None:
        """Learn when a lease holder exits: its pidfd becomes readable."""
        if pid in self.pidfds:
            return
        pidfd = peers.peer_pidfd(conn, pid) if conn is not None else _pidfd_open(pid)
        if pidfd is None:
            self.service.holder_exited(pid)  # already gone
            return
        self.pidfds[pid] = pidfd
        self.sel.register(pidfd, selectors.EVENT_READ, lambda fd, pid=pid: self._exited(pid))

    def _prune_pidfds(self) -> None:
        """Stop watching processes that no longer hold a lease (they released, or were revoked and ended)."""
        held = {lease.pid for lease in self.service.leases}
        for pid in [p for p in self.pidfds if p not in held]:
            pidfd = self.pidfds.pop(pid)
            self.sel.unregister(pidfd)
            os.close(pidfd)

    def _exited(self, pid: int) -> None:
        pidfd = self.pidfds.pop(pid)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        self.service.holder_exited(pid)

    def signal_holder(self, pid: int, signame: str) -> bool:
        pidfd = self.pidfds.get(pid)
        if pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.Signals[signame])
        except OSError:
            return False
        return True

    def _link_events(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: events were lost: forget what they might have changed
                self.audit({"event": "linkwatch-overrun", "error": str(e)})
                self.service.forget_programs()
                return
            for ev in linkwatch.parse(data):
                self.service.link_event(ev)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _close_passed_fds(ancdata: list[tuple[int, int, bytes]]) -> int:
    count = 0
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            for i in range(0, usable, 4):
                with contextlib.suppress(OSError):
                    os.close(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True))
                count += 1
    return count
