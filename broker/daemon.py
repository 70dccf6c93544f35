"""`xskbroker serve`: load the policy, listen (or take the socket systemd passed), run the loop, clean up.

Under systemd it reports READY=1, a STATUS= line that follows the leases, and STOPPING=1; with
--idle-timeout it exits when nothing needs it, and the socket unit starts it again at the next connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import grp
import os
import resource
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xskbroker.broker import cpus, faults, lastgood, limits, pins, systemd
from xskbroker.broker.audit import AuditFn, AuditSetupError, Throttle, drain, flush_due, make_audit
from xskbroker.broker.holders import Holders
from xskbroker.broker.listener import MAX_CONNECTIONS, listen
from xskbroker.broker.server import Server
from xskbroker.broker.service import Service
from xskbroker.common import safefiles
from xskbroker.policy import PolicyError

if TYPE_CHECKING:
    import argparse


def _runtime_directory() -> str | None:
    """$RUNTIME_DIRECTORY, resolved where systemd made it a link: under DynamicUser= (systemd 252) it is
    /run/xskbroker/state -> ../private/xskbroker/state. Only a link root made in a directory closed to
    others is followed; any other link is left for private_dir to refuse."""
    path = os.environ.get("RUNTIME_DIRECTORY")
    if not path:
        return None
    try:
        link, parent = os.lstat(path), os.stat(os.path.dirname(path))
    except OSError:
        return path
    if stat.S_ISLNK(link.st_mode) and link.st_uid == 0 and parent.st_uid == 0 and not parent.st_mode & 0o022:
        return os.path.realpath(path)
    return path


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SystemExit(f"xskbroker: no group named {group!r}") from None


def serve(args: argparse.Namespace) -> int:
    try:
        sink = make_audit(getattr(args, "audit", "auto"), sys.stderr)
    except AuditSetupError as e:
        print(f"xskbroker: {e}", file=sys.stderr)
        return 1
    state_dir = getattr(args, "state_dir", None) or _runtime_directory() or "/run/xskbroker"
    try:  # the lease journal's directory: ours alone, or a planted link could make us write anywhere
        safefiles.private_dir(state_dir)
        lock = _lock_state(state_dir)
    except safefiles.UnsafePathError as e:
        print(f"xskbroker: {e}; not starting", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"xskbroker: cannot lock {os.path.join(state_dir, LOCK_FILE)}: {e.strerror or e}; not starting",
              file=sys.stderr)
        return 1
    if isinstance(lock, str):
        print(f"xskbroker: {lock}; not starting", file=sys.stderr)
        return 1
    try:
        return _serve(args, sink, state_dir)
    finally:
        os.close(lock)


LOCK_FILE = "broker.lock"


def _lock_state(state_dir: str) -> int | str:
    """The state directory's lock, held (an fd) for as long as this broker runs, or why it is not to be had. Two
    brokers on one journal (a manual start beside the activated one, two units) would each compact it under the
    other, whose appends then go to a file no longer there, and each would judge quotas by half of the leases."""
    path = os.path.join(state_dir, LOCK_FILE)
    fd = safefiles.private_opener(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return f"another broker (pid {holder}) runs on the state directory {state_dir}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def _serve(args: argparse.Namespace, sink: AuditFn, state_dir: str) -> int:
    notifier = systemd.Notifier()
    keeper = lastgood.PolicyKeeper(args.policy, state_dir)
    try:  # a broken file with a last good copy: run the copy, loudly (below); with none, nothing safe to run
        policy = keeper.start()
    except PolicyError as e:
        print("xskbroker: the policy has errors; not starting:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        notifier.send(STATUS=f"not starting: the policy has errors ({e.errors[0] if e.errors else ''})")
        return 1
    status = _Status(sink, notifier, keeper)
    audit: AuditFn = Throttle(status)
    keeper.audit = audit
    if keeper.save_error:  # at start the copy was written before there was an audit to tell
        audit({"event": "policy-lastgood-unsaved", "error": keeper.save_error})
    if keeper.fallback:
        print(f"xskbroker: {keeper.status_note()}", file=sys.stderr)
        audit({"event": "policy-fallback", "path": args.policy, "errors": keeper.errors,
               "copy": os.path.join(state_dir, lastgood.FILENAME), "copy_saved_at": keeper.copy_saved_at})
    pin_root = getattr(args, "pin_root", None)
    bad_root = pins.root_problem(pin_root) if pin_root else None
    if bad_root:  # before the socket file is made: a start refused after it left it behind
        print(f"xskbroker: --pin-root {pin_root}: {bad_root}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    try:
        listener = systemd.seqpacket_listener(systemd.listen_fds())
    except (ValueError, OSError, systemd.ActivationError) as e:
        print(f"xskbroker: socket activation: {e}", file=sys.stderr)
        return 1
    activated = listener is not None
    if listener is None:
        try:
            listener = listen(args.socket, args.socket_mode, _gid(args.socket_group))
        except OSError as e:
            print(f"xskbroker: cannot listen on {args.socket}: {e.strerror or e}", file=sys.stderr)
            return 1
    sock_path = _path_of(listener) or args.socket
    # the crash tests' fault points: a test-only variable, read here once and passed on as a hook
    fault = faults.from_spec(os.environ.get(faults.ENV, ""))
    holders = Holders()  # the server watches them, the service signals them on revoke
    # before the service starts its threads: each moves itself to its side of the split
    split = cpus.configure(getattr(args, "split_cpus", True))
    split_text = {"serving": sorted(split[0]), "background": sorted(split[1])} if split else None
    max_connections = getattr(args, "max_connections", MAX_CONNECTIONS)
    service: Service | None = None
    server: Server | None = None
    try:
        service = Service(policy, audit, args.xdp_mode, state_file=os.path.join(state_dir, "leases.jsonl"),
                          umem_pool=args.umem_pool, signal_holder=holders.signal, fault=fault, pin_root=pin_root)
        service.recover()
        usec = systemd.watchdog_usec()
        watchdog = systemd.Watchdog(notifier, usec) if usec is not None and notifier.enabled else None
        server = Server(listener, service, audit, args.policy, idle_timeout=getattr(args, "idle_timeout", None),
                        refuse_fds=not getattr(args, "accept_passed_fds", False), max_connections=max_connections,
                        holders=holders, fault=fault, watchdog=watchdog, policy_loader=keeper.reload)
        status.service = service
        if getattr(args, "device_plugin", None):  # imported only when configured: cold start pays for every import
            from xskbroker.broker import dpendpoint

            server.endpoints = list(dpendpoint.start_all(args.device_plugin, server,
                                                         lambda text: print(f"xskbroker: {text}", file=sys.stderr)))
    except BaseException:
        # a start that fails (the journal's compaction at recovery: a full /run) leaves no socket file behind,
        # nor an endpoint's: a client would find a socket nobody serves
        if server is not None:
            server.close()
        if service is not None:
            service.close()
        _unlisten(listener, activated, args.socket)
        raise
    service.describe = lambda admin: {"policy": keeper.describe(admin), "limits": limits.effective(max_connections),
                                      "cpus": split_text}
    server.arm_signals()  # before anyone is told it is ready: a reload right after must find the loop's handler
    audit({"event": "ready", "socket": sock_path, "activated": activated, "policy": list(policy.sources),
           "rules": len(policy.rules), "idle_timeout_s": server.idle_timeout, "pid": os.getpid(),
           "policy_fallback": keeper.fallback, "limits": limits.effective(max_connections),
           "watchdog_s": watchdog.interval * 2 if watchdog else None,
           "cpus": split_text})
    # What start-up made (modules, classes, the policy) lives as long as the broker: out of the collector's
    # sight, a full collection walks only what came after, instead of pausing a grant for milliseconds.
    # (`xskbroker serve` kept the collector off until now: start-up makes no garbage worth collecting.)
    gc.freeze()
    gc.enable()
    cpus.serving()  # the loop's thread, now that every other thread has started (cpus.configure)
    notifier.ready(status.text())
    fault("ready")
    try:
        server.run()
    finally:
        notifier.stopping(status.stopping_text())
        server.close()
        service.close()
        _unlisten(listener, activated, args.socket)
        audit({"event": "stopped"})
        drain(sink, AUDIT_DRAIN_SECONDS)
        notifier.close()
    return 0


def _unlisten(listener: socket.socket, activated: bool, path: str) -> None:
    listener.close()
    if not activated:  # an activated socket belongs to the manager, which keeps it for the next start
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _raise_fd_limit() -> None:
    """Use the whole fd limit we were given (the soft limit is often 1024 below a far higher hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _path_of(sock: socket.socket) -> str | None:
    with contextlib.suppress(OSError):
        name = sock.getsockname()
        if isinstance(name, str) and name:
            return name
    return None


AUDIT_DRAIN_SECONDS = 2.0  # at exit, for records a slow stderr reader has not taken yet: never a hung stop
STATUS_EVERY = 1.0  # seconds between two STATUS= lines at most: each wakes the service manager (PID 1)


class _Status:
    """The audit sink, plus a STATUS= line for the service manager kept current as leases come and go
    (`systemctl status xskbroker` shows it). Sent when it changed, at most every STATUS_EVERY seconds: one
    per audit record cost the loop a /proc read and a walk of every lease, and PID 1 a wake-up, per request
    (thousands a second under load). What changes meanwhile is sent when the event loop's timer says so
    (next_flush, flush_if_due: the audit throttle in front asks); what a policy reload changes, at once."""

    def __init__(self, sink: AuditFn, notifier: systemd.Notifier, keeper: lastgood.PolicyKeeper | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.notifier = notifier
        self.keeper = keeper
        self.service: Service | None = None
        self.allowed = self.denied = 0
        self.stop_reason = "stopping"
        self.clock = clock
        self._stale = False  # something changed since the last STATUS=
        self._next = 0.0  # when the next STATUS= may go

    def __call__(self, record: dict[str, Any]) -> None:
        self.sink(record)
        event = record.get("event")
        if event == "grant":
            if record.get("decision") == "allow":
                self.allowed += 1
            else:
                self.denied += 1
        elif event == "idle-exit":
            self.stop_reason = f"idle for {record.get('after_s')}s, exiting until the next connection"
        elif event == "stopping":
            self.stop_reason = f"stopping on {record.get('signal')}"
        if self.service is not None and self.notifier.enabled and event not in ("ready", "stopped"):
            self._stale = True
            if str(event).startswith("policy-"):  # a reload (or its failure) is told at once: an operator waits
                self._next = 0.0
            self.flush_if_due()

    def next_flush(self) -> float | None:
        """When a changed STATUS=, or what the sink holds back (an audit stream nobody reads), is due (None:
        nothing to send)."""
        sink_next = getattr(self.sink, "next_flush", None)
        due = (self._next if self._stale else None, sink_next() if sink_next is not None else None)
        return min((t for t in due if t is not None), default=None)

    def flush_if_due(self) -> None:
        flush_due(self.sink)
        if self._stale and self.clock() >= self._next:
            self._stale = False
            self._next = self.clock() + STATUS_EVERY
            self.notifier.status(self.text())

    def text(self) -> str:
        leases = list(self.service.leases) if self.service is not None else []
        where = sorted({lease.ifname for lease in leases})
        held = f"{len(leases)} lease{'' if len(leases) == 1 else 's'}" + (f" on {', '.join(where)}" if where else "")
        note = self.keeper.status_note() if self.keeper is not None else None
        # the policy warning first (loud: it is what `systemctl status` shows), the limits last
        return "; ".join(x for x in (note, f"{held}; {self.allowed} granted, {self.denied} denied since start",
                                     limits.summary()) if x)

    def stopping_text(self) -> str:
        return f"{self.stop_reason}; {self.text()}"
