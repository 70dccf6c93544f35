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
import time
from collections.abc import Callable
from typing import Any, Protocol

from xskbroker.broker import faults, linkwatch
from xskbroker.broker import peer as peers
from xskbroker.broker.admission import Connected, admit
from xskbroker.broker.audit import flush_due, seconds_to_summary
from xskbroker.broker.closer import Closer
from xskbroker.broker.holders import Holders
from xskbroker.broker.listener import (
    MAX_CONNECTIONS,
    MAX_FDS_IN,
    MSG_CTRUNC,
    MSG_TRUNC,
    accept_with_spare,
    close_client,
    open_spare,
    passed_fds,
    refuse_passed_fds,
    say_and_close,
)
from xskbroker.broker.sent_copies import HUNG_SECONDS, SentCopies
from xskbroker.broker.service import Deferred, Outcome, Service
from xskbroker.broker.systemd import Watchdog
from xskbroker.policy import Policy, PolicyError, load_policy
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode
from xskbroker.wire.replies import ErrorReply

ORPHAN_POLL_SECONDS = 2.0
RETRY_CAP = 0.002  # a waiting grant retries at least this often: the queue is released any moment
# ... when few wait. Each retry of a bound grant is a bind, which takes the kernel's rtnl lock, and so does the
# deferred work that frees a closed socket's queue: dozens of grants retrying every 2 ms each compete with it on a
# busy machine. Together they retry at most this often (docs/performance.md: the 200-client load test beside two CPU
# hogs had 125-644 grants refused after a 1 s wait for queues the kernel had not freed, and 0-80 with this).
RETRIES_PER_SECOND = 1000
# how long the broker keeps its copies of sent fds: a client that closes its own soon after (most do within
# a millisecond or two) then leaves the last close, and its grace period, to the broker's closing helper
KEEP_SENT = 0.005


class Endpoint(Protocol):
    """More listeners on the loop (broker.dpendpoint), closed (and their sockets removed) with the server."""

    def close(self) -> None: ...

    def regroup(self, groups_of: Callable[[frozenset[int]], frozenset[str]]) -> None: ...


def retry_cap(waiting: int) -> float:
    """The longest a waiting grant goes between retries, with `waiting` requests waiting in all."""
    return max(RETRY_CAP, waiting / RETRIES_PER_SECOND)


class Server:
    def __init__(self, listener: socket.socket, service: Service, audit: Callable[[dict[str, Any]], None],
                 policy_path: str | None = None, idle_timeout: float | None = None, *,
                 refuse_fds: bool = True, max_connections: int = MAX_CONNECTIONS, holders: Holders | None = None,
                 fault: faults.FaultHook = faults.none, watchdog: Watchdog | None = None,
                 policy_loader: Callable[[str], Policy] = load_policy) -> None:
        self.listener = listener
        self.watchdog = watchdog  # WATCHDOG=1 from this loop, so that a stuck loop sends none
        self.policy_loader = policy_loader  # reload: the daemon's keeps the last good copy
        self.idle_timeout = idle_timeout  # exit after this long with no connection and no lease
        self._idle_since: float | None = None
        # Refused at the socket, a client's fds never reach us; where the kernel can't (or for messages queued
        # before we set it on the listener), they are closed on a thread of their own, never on the loop.
        self.refuse_fds = refuse_fds and refuse_passed_fds(listener)
        self.untrusted = Closer(workers=1, name="untrusted", defuse=True)
        self.max_connections = max_connections
        # one fd kept spare: when accept fails for want of fds, freeing it lets us take the connection and say why
        self._spare: int | None = open_spare()
        self.service = service
        service.metrics.connections = lambda: len(self.conns)
        self.audit = audit
        self.policy_path = policy_path
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, tuple[socket.socket, peers.PeerInfo]] = {}
        self.connected = Connected()  # the peers of self.conns, tallied for admission
        self.group_names = peers.GroupNames()  # the policy's group names, and their gids as NSS last said
        self._named_by: Policy | None = None  # the policy group_names holds the names of
        # the lease holders' pidfds (pid -> pidfd), shared with the service's signal_holder when the daemon
        # gave both the same Holders
        self.holders = holders if holders is not None else Holders()
        self.holders.attach(self.sel, service.holder_exited)
        service.exit_sync = self.holders.deliver_exit
        self.fault = fault
        # requests waiting for the kernel: (when to retry, the request, its connection, its peer);
        # their connections are not read meanwhile, so each client still gets its replies in order
        self.waiting: list[tuple[float, Deferred, socket.socket, peers.PeerInfo]] = []
        # Connections with a request waiting stay registered (two epoll_ctl calls per deferred grant saved, each
        # a hand-over of the GIL to the broker's threads): one that turns readable meanwhile (a request sent
        # before the last was answered, or a close) is only then set aside, and taken back with the reply.
        self._in_flight: set[int] = set()
        self._set_aside: set[int] = set()
        self.stopping = False
        self._next_orphan_check = 0.0
        self.closer = SentCopies(on_hung=lambda pid: self.audit({
            "event": "closing-helper-hung", "helper_pid": pid, "after_s": HUNG_SECONDS,
            "detail": "killed (its exit closes the copies it held); the broker's threads close them from now on"}))
        service.sent_done = self.closer.expedite  # a lease that ends needs no copy of its fds kept
        service.closes_pending = self.closer.pending
        # leases' group names as this policy names them (recovered ones were named as the journal's policy did)
        self._name_groups_by(service.policy)
        service.groups_of = self.group_names.of
        service.regroup()
        self._wake_r, self._wake_w = socket.socketpair()
        self._armed: tuple[int, dict[int, Any]] | None = None  # the wake-up fd and handlers arm_signals replaced
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._signals)
        # a worker finished a request's kernel work: _retry_waiting (after the events) completes it
        self.sel.register(service.workers.wake, selectors.EVENT_READ, lambda _: service.workers.drain())
        self.links: linkwatch.LinkFeed | None = None
        self.endpoints: list[Endpoint] = []
        try:
            self.links = linkwatch.LinkFeed(self.sel, service.link_event, self._links_lost)
            service.watch_links()
            service.link_sync = self.links.sync
        except OSError as e:  # lifecycle tracking is lost, grants still work: say so and go on
            self.audit({"event": "linkwatch-unavailable", "error": str(e)})
        for lease in service.leases:
            if not lease.orphaned:  # an orphan's holder is gone: its pid may name anyone now
                self.watch_pid(lease.pid, start=lease.pid_start, ino=lease.pid_ino)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def arm_signals(self) -> None:
        """Take SIGTERM, SIGINT and SIGHUP through the wake-up socket (the loop reads them). Done before anyone is
        told the broker is ready: a reload sent right after READY=1 (or the ready record) found the default action
        of SIGHUP, which ends the process. Once; run() arms them itself if nobody did."""
        if self._armed is None:
            old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            self._armed = (old_fd, {s: signal.signal(s, lambda *_: None)
                                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)})

    def run(self) -> None:
        self.arm_signals()
        assert self._armed is not None
        old_fd, handlers = self._armed
        try:
            while not self.stopping:
                if self.watchdog is not None:
                    self.watchdog.beat()
                # orphaned and released leases give no event when their sockets close, nor does a bare socket
                # bound by its holder to a queue it was not granted: look at them every few seconds
                poll = self.service.poll_seconds(ORPHAN_POLL_SECONDS)
                # every round, not only after requests: a lease ended by a link event, a holder's exit or a settling
                # release (in poll_seconds) is no reason to keep watching its holder
                self._prune_pidfds()
                if poll is None and self.holders.unwatched:  # holders it had no fd to watch: looked at again
                    poll = ORPHAN_POLL_SECONDS
                due = [w[0] for w in self.waiting if not w[1].parked()]
                retry = max(0.0, min(due) - time.monotonic()) if due else None
                idle_left = self._idle_left()
                summary = seconds_to_summary(self.audit)
                ping = self.watchdog.timeout() if self.watchdog is not None else None
                closes = self.closer.watch()  # a closing helper that hangs is given up (its copies closed)
                timeout = min((t for t in (poll, idle_left, retry, summary, ping, closes) if t is not None),
                              default=None)
                events = self.sel.select(timeout)
                last = len(events) - 1
                registered = self.sel.get_map()
                for i, (key, _) in enumerate(events):
                    # an earlier event of this round may have closed this one's object (a release that ends the
                    # watch on its holder's pidfd, whose exit is in the same round; an evicted connection): its
                    # event is stale, and a new registration on the same fd has a key of its own
                    if registered.get(key.fd) is not key:
                        continue
                    self.service.loop_busy = i < last
                    key.data(key.fileobj)
                    # the copies of what it sent, and a lease's end, go to the closing helper now, not after a
                    # round of many requests: a released queue is wanted again
                    self.closer.flush()
                self.service.loop_busy = False
                if self.waiting:
                    self._retry_waiting()
                    self.closer.flush()
                self.service.compact_journal()  # between rounds of requests (their replies are out)
                if poll is not None and time.monotonic() >= self._next_orphan_check:
                    self._next_orphan_check = time.monotonic() + ORPHAN_POLL_SECONDS
                    self.service.check_orphans()
                    self.service.check_bare()  # what the polls end is let go of at the next round's prune
                if summary is not None:
                    flush_due(self.audit)
                if self._idle_left() == 0.0:
                    self.audit({"event": "idle-exit", "after_s": self.idle_timeout})
                    self.stopping = True
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in handlers.items():
                signal.signal(s, h)
            self._armed = None

    def idle(self) -> bool:
        """Nothing would be lost by exiting: no client connected, no lease to watch."""
        return not self.conns and not len(self.service.leases) and not self.waiting and not self.endpoints

    def _idle_left(self) -> float | None:
        """Seconds until an idle exit is due (0.0: now), None when there is none to come: only a configured
        timeout, counted from when the broker last became idle, ever ends it."""
        if self.idle_timeout is None or not self.idle():
            self._idle_since = None
            return None
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        return max(0.0, self._idle_since + self.idle_timeout - now)

    def close(self) -> None:
        for _, deferred, _, _ in self.waiting:  # nothing half-made survives the broker
            deferred.cancel()
        self.waiting = []
        for ep in self.endpoints:  # their listeners and directories go with the broker
            ep.close()
        self.endpoints = []
        for conn, _ in list(self.conns.values()):
            self._drop(conn)
        self.holders.close()
        if self.links is not None:
            self.links.close()
        self.closer.stop()
        self.untrusted.stop(wait=False)  # a close an attacker made block must not hold up our exit
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        flush = getattr(self.audit, "flush", None)
        if flush is not None:
            flush()
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
            policy = self.policy_loader(self.policy_path)
        except PolicyError as e:
            self.service.metrics.reloaded(False)
            self.audit({"event": "policy-reload-failed", "path": self.policy_path, "errors": e.errors,
                        "kept": "previous policy"})
            return
        # a peer connected before the reload was judged by the group names the old policy named: a rule or
        # quota naming a group first named now would never apply to it, however long it stayed connected
        self._name_groups_by(policy)
        self.connected.regroup(self.conns, self.group_names.of)
        for ep in self.endpoints:
            ep.regroup(self.group_names.of)
        self.service.reload(policy, self.policy_path)

    def _name_groups_by(self, policy: Policy) -> None:
        """Peers' (and leases') groups are named, from now on, as `policy` names them."""
        self._named_by = policy
        self.group_names.use(policy.group_names)

    # ---- connections ------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):  # a few per wake-up: a flood of connects must not starve the clients we have
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._spare is not None:
                    self._refuse_for_want_of_fds(listener, e)
                    continue
                self.audit({"event": "accept-failed", "error": str(e), "errno": e.errno})
                return
            self._admit(conn)

    def _refuse_for_want_of_fds(self, listener: socket.socket, e: OSError) -> None:
        assert self._spare is not None
        refusal = ErrorReply(ErrorCode.TOO_MANY_CONNECTIONS, "the broker has no file descriptors left for another "
                             "connection; try again later")
        spare, self._spare = self._spare, None
        self._spare = accept_with_spare(listener, spare, lambda conn: self._say_and_close(conn, refusal))
        self.audit({"event": "accept-failed", "error": str(e), "errno": e.errno})

    def _admit(self, conn: socket.socket) -> None:
        if self.refuse_fds:
            refuse_passed_fds(conn)  # inherited from the listener, but one accepted before we set it may not have
        conn.setblocking(False)

        def unjudgeable(who: peers.PeerInfo, why: str) -> None:
            self.audit({"event": "connection-refused", "peer": who.as_dict(), "code": ErrorCode.IDENTITY_UNREADABLE,
                        "reason": why})
            self._say_and_close(conn, ErrorReply(ErrorCode.IDENTITY_UNREADABLE,
                                                 f"the broker cannot judge this process: {why}"))

        who = self.identify(conn, unjudgeable, out_of_fds=lambda: self._say_and_close(conn, ErrorReply(
            ErrorCode.TOO_MANY_CONNECTIONS, "the broker has no file descriptors left to identify this process; try "
            "again later")))
        if who is None:
            return
        code, reason, evict = admit(self.service.policy, who, self.connected, self.max_connections)
        if code is not None:
            self.audit({"event": "connection-refused", "peer": who.as_dict(), "code": code, "reason": reason})
            self._say_and_close(conn, ErrorReply(code, reason))
            return
        if evict is not None:
            self._evict_one(evict, who)
        self.conns[conn.fileno()] = (conn, who)
        self.connected.add(who)
        self.sel.register(conn, selectors.EVENT_READ, self._readable)
        # a client connects and sends its request at once: it is usually there already, so read it now rather
        # than after another round of select (nothing there: recvmsg says EAGAIN, and select will tell)
        self._readable(conn)

    def identify(self, conn: socket.socket, refuse: Callable[[peers.PeerInfo, str], None],
                 out_of_fds: Callable[[], None] | None = None) -> peers.PeerInfo | None:
        """Who is at the other end of a new connection (the broker's or an endpoint's); None once the connection
        is closed: its peer is gone, its identity cannot be judged (refuse(peer, why) answers and closes), the
        broker has no fd for the peer's pidfd (out_of_fds() answers and closes), or a bug (recorded: it costs one
        connection, never the broker)."""
        if self.service.policy is not self._named_by:  # a reload: the names a peer's groups are judged by
            self._name_groups_by(self.service.policy)
        try:
            who = peers.identify(conn, self.group_names)
        except peers.Unjudgeable as e:
            refuse(e.peer, e.why)
            return None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE) and out_of_fds is not None:  # unjudged, so not served
                self.audit({"event": "connection-refused", "code": ErrorCode.TOO_MANY_CONNECTIONS, "error": str(e)})
                out_of_fds()
                return None
            close_client(conn, self.untrusted.close)
            return None
        except Exception as e:
            self._internal_error(None, e)
            close_client(conn, self.untrusted.close)
            return None
        if not peers.printable_cgroup(who.cgroup):  # no policy can name it (docs/security.md)
            refuse(who, f"its cgroup path {who.cgroup!r} is not valid UTF-8, so no policy can name it; run it in a "
                        "cgroup whose name is UTF-8")
            return None
        return who

    def _say_and_close(self, conn: socket.socket, reply: ErrorReply) -> None:
        say_and_close(conn, reply.encode(), self.untrusted.close)

    def _evict_one(self, uid: int, newcomer: peers.PeerInfo) -> None:
        """Close the oldest connection of uid that has no request in flight, to make room for another user."""
        busy = {id(w[2]) for w in self.waiting}
        for conn, who in self.conns.values():
            if who.principal == uid and id(conn) not in busy:
                self.audit({"event": "connection-evicted", "peer": who.as_dict(),
                            "code": ErrorCode.TOO_MANY_CONNECTIONS, "for_uid": newcomer.uid})
                self._forget(conn)
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(conn)
                self._say_and_close(conn, ErrorReply(
                    ErrorCode.TOO_MANY_CONNECTIONS, f"the connection table is full: this connection made room for "
                    f"another user's (uid {uid} held the most)"))
                return

    def _forget(self, conn: socket.socket) -> None:
        entry = self.conns.pop(conn.fileno(), None)
        if entry is not None:
            self.connected.remove(entry[1])

    def _drop(self, conn: socket.socket) -> None:
        self._in_flight.discard(conn.fileno())
        self._set_aside.discard(conn.fileno())
        self._forget(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        close_client(conn, self.untrusted.close)  # fds queued on it are closed off the loop, like any attached

    def _readable(self, conn: socket.socket) -> None:
        if conn.fileno() in self._in_flight:  # not read until its request is answered: replies stay in order
            self.sel.unregister(conn)
            self._set_aside.add(conn.fileno())
            return
        who = self.conns[conn.fileno()][1]
        try:
            data, anc, flags, _ = conn.recvmsg(proto.MAX_REQUEST + 1, socket.CMSG_SPACE(MAX_FDS_IN * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        nfds = self._discard_passed_fds(anc) + (1 if flags & MSG_CTRUNC else 0)
        if not data and not nfds:
            self._drop(conn)  # orderly close
            return
        try:
            outcome = self.service.handle(who, data, truncated=bool(flags & MSG_TRUNC), fds=nfds)
        except Exception as e:
            outcome = self._internal_error(who, e)
        if isinstance(outcome, Deferred):
            self._in_flight.add(conn.fileno())
            self.waiting.append((time.monotonic() + outcome.delay, outcome, conn, who))
            return
        self._reply(conn, outcome, who)

    def _internal_error(self, who: peers.PeerInfo | None, e: Exception) -> Outcome:
        """A bug must cost one request, never the broker and everyone's leases: record it, answer it."""
        import traceback  # here: only a bug needs it, and with textwrap it costs a cold start ~3 ms

        self.audit({"event": "internal-error", "pid": who.pid if who else None, "error": repr(e),
                    "trace": traceback.format_exc(limit=8)})
        return Outcome(ErrorReply(ErrorCode.INTERNAL_ERROR, f"the broker failed to handle this request: {e!r}"))

    def _retry_waiting(self) -> None:
        now = time.monotonic()
        cap = retry_cap(len(self.waiting))
        still = []
        for due, deferred, conn, who in self.waiting:
            if deferred.parked() or (due > now and not deferred.ready()):
                still.append((due, deferred, conn, who))
                continue
            try:
                outcome = deferred.step()
            except Exception as e:
                outcome = self._internal_error(who, e)
            if outcome is None:
                deferred.delay = min(deferred.delay * 2, cap)
                still.append((now + deferred.delay, deferred, conn, who))
                continue
            self._in_flight.discard(conn.fileno())
            if conn.fileno() in self._set_aside:
                self._set_aside.discard(conn.fileno())
                self.sel.register(conn, selectors.EVENT_READ, self._readable)
            self._reply(conn, outcome, who)
        self.waiting = still

    def _reply(self, conn: socket.socket, outcome: Outcome, who: peers.PeerInfo) -> None:
        try:
            data = outcome.reply.encode()  # the one place a request's reply becomes bytes
            self.fault("before-send")
            if outcome.fds:
                socket.send_fds(conn, [data], outcome.fds)
            else:
                conn.send(data)
        except Exception as e:  # the send failed, or a bug: either way nobody has the fds, and only this request pays
            if outcome.lease_id:
                self.service.abort(outcome.lease_id)
            self.audit({"event": "reply-failed", "pid": who.pid, "error": str(e)})
            self._drop(conn)
            outcome.keep = False  # nobody got them: nothing to keep them for
        else:
            if outcome.lease_id:
                self.fault("after-send")
                # SO_PEERPIDFD names the requester race-free; a holder it named gets pidfd_open, checked
                # against the start time the grant pinned it with
                lease = self.service.leases.get(outcome.lease_id)
                self.watch_pid(outcome.holder_pid or who.pid, conn if outcome.holder_pid in (0, who.pid) else None,
                               lease.pid_start if lease else None, lease.pid_ino if lease else None)
        finally:
            # the client has its own copies now (or none); ours would keep the sockets alive. Kept under the lease
            # (bare and map fds for the closer's shortest hold), so that its release has them closed at once
            self.closer.close_later(outcome.fds, KEEP_SENT if outcome.keep else 0.0, outcome.lease_id)
            outcome.fds = []
            self.service.pool.kick()  # refill what the grant took, now that its reply is out

    def watch_pid(self, pid: int, conn: socket.socket | None = None, start: int | None = None,
                  ino: int | None = None) -> None:
        """Learn when a lease holder exits (broker.holders.Holders.watch)."""
        self.holders.watch(pid, conn, start, ino)

    def _prune_pidfds(self) -> None:
        """Stop watching processes that no longer hold a lease (they released, or were revoked and ended)."""
        leases = self.service.leases
        self.holders.prune(leases.let_go(), leases.holds, leases.holder_count())

    def _discard_passed_fds(self, ancdata: list[tuple[int, int, bytes]]) -> int:
        """Count the fds a client attached and hand them to the untrusted closer: closing one can block for as
        long as its sender likes (a lingering socket that can never drain, a FUSE file)."""
        fds = passed_fds(ancdata)
        self.untrusted.close(fds)
        return len(fds)

    def _links_lost(self, e: OSError) -> None:
        """Link events were lost: forget what they might have changed."""
        self.audit({"event": "linkwatch-overrun", "error": str(e)})
        self.service.relearn_links()  # first: a removed interface's slots are emptied through its cached program
        self.service.forget_programs(keep_attached=True)
