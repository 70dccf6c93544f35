"""The two small systemd protocols the broker speaks, without libsystemd.

Socket activation: the service manager passes listening sockets as fds 3.. with LISTEN_FDS (count),
LISTEN_PID (who they are for) and LISTEN_FDNAMES (colon-separated names). Readiness: datagrams of
KEY=VALUE lines (READY=1, STATUS=..., STOPPING=1) to the AF_UNIX socket named by $NOTIFY_SOCKET, where
a leading '@' means the abstract namespace. Both are stable, documented interfaces (sd_listen_fds(3),
sd_notify(3)); on a host without systemd nothing is set and every function here does nothing.
The watchdog (WatchdogSec=): the manager sets WATCHDOG_USEC (and WATCHDOG_PID) and restarts the service
when no WATCHDOG=1 arrives within that time; the event loop sends one every half of it (sd_watchdog_enabled(3)).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping

from xskbroker.common.records import record

LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
WATCHDOG_VARS = ("WATCHDOG_USEC", "WATCHDOG_PID")
MAX_STATUS = 512  # STATUS= is shown by `systemctl status`: one line, kept short
# seconds READY=1 and STOPPING=1 may wait for a manager whose queue is full (a lost READY=1 fails the start);
# STATUS= and WATCHDOG=1 never wait: the event loop sends them, and the next one follows
READY_WAIT, STOPPING_WAIT = 5.0, 1.0


@record(frozen=True)
class PassedFd:
    fd: int
    name: str


def parse_listen_env(env: Mapping[str, str], pid: int) -> list[PassedFd]:
    """The fds the environment says were passed to process pid (pure: nothing is opened or closed).

    As sd_listen_fds: nothing when LISTEN_PID is unset or names another process (the variables were
    inherited, not meant for us); ValueError when they are malformed.
    """
    if "LISTEN_PID" not in env or "LISTEN_FDS" not in env:
        return []
    try:
        for_pid = int(env["LISTEN_PID"])
        count = int(env["LISTEN_FDS"])
    except ValueError:
        raise ValueError(f"malformed LISTEN_PID={env['LISTEN_PID']!r} / LISTEN_FDS={env['LISTEN_FDS']!r}") from None
    if for_pid != pid:
        return []
    if count < 0 or count > 4096:
        raise ValueError(f"LISTEN_FDS={count} is out of range")
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES has {len(names)} name(s) for {count} fd(s)")
    return [PassedFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def listen_fds(env: MutableMapping[str, str] | None = None, unset: bool = True) -> list[PassedFd]:
    """The fds passed to this process, marked close-on-exec; the variables are removed (unset=True) so
    that nothing this process starts mistakes them for its own."""
    env = os.environ if env is None else env
    passed = parse_listen_env(env, os.getpid())
    if unset:
        for name in LISTEN_VARS:
            env.pop(name, None)
    for p in passed:
        flags = fcntl.fcntl(p.fd, fcntl.F_GETFD)  # EBADF here means the manager lied: let it raise
        fcntl.fcntl(p.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return passed


def is_listening_socket(fd: int, family: int, kind: int) -> bool:
    """As sd_is_socket: fd is a socket of that family and type, and listening."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return (s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == family
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == kind
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False
    finally:
        s.close()


class ActivationError(Exception):
    pass


def seqpacket_listener(passed: Iterable[PassedFd], prefer: tuple[str, ...] = ("broker",)) -> socket.socket | None:
    """The passed AF_UNIX SOCK_SEQPACKET listening socket, None when nothing was passed.

    Several candidates are told apart by name (FileDescriptorName= in the socket unit); any other passed
    fd is left alone.
    """
    passed = list(passed)
    if not passed:
        return None
    fits = [p for p in passed if is_listening_socket(p.fd, socket.AF_UNIX, socket.SOCK_SEQPACKET)]
    if len(fits) > 1:
        named = [p for p in fits if p.name in prefer]
        if len(named) != 1:
            raise ActivationError(f"{len(fits)} SOCK_SEQPACKET listeners were passed "
                                  f"({', '.join(p.name for p in fits)}); name the broker's one "
                                  f"{' or '.join(prefer)} (FileDescriptorName=)")
        fits = named
    if not fits:
        raise ActivationError("socket activation passed no listening AF_UNIX SOCK_SEQPACKET socket "
                              f"(fds: {', '.join(f'{p.fd}={p.name}' for p in passed)}): "
                              "the socket unit needs ListenSequentialPacket=")
    return socket.socket(fileno=fits[0].fd)


def notify_address(value: str | None) -> str | bytes | None:
    """The sockaddr for a $NOTIFY_SOCKET value: '@name' is abstract, '/path' a file; else None."""
    if not value:
        return None
    if value[0] == "@":
        return b"\0" + value[1:].encode()
    if value[0] == "/":
        return value
    return None  # vsock: and other transports of newer managers: not used by a local service


def format_state(**fields: str | int) -> bytes:
    """KEY=VALUE lines; STATUS text is flattened to one line (a newline would start a new key)."""
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).split()) if key == "STATUS" else str(value)
        if key == "STATUS" and len(text) > MAX_STATUS:
            text = text[:MAX_STATUS - 1] + "…"
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """sd_notify for a long-running process: one datagram socket, reconnected when a send fails."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.raw = env.get("NOTIFY_SOCKET")
        self.address = notify_address(self.raw)
        self._sock: socket.socket | None = None
        self.last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, wait: float = 0.0, **fields: str | int) -> bool:
        """Send one state update; False when there is no manager to tell, it cannot be reached, or its queue is
        still full after `wait` seconds (a manager that does not read: a blocking send would stop the event loop
        until it does, and the queue holds only net.unix.max_dgram_qlen datagrams, 10 by default).

        Never raises: a lost notification must not take the broker down.
        """
        if self.address is None:
            return False
        data = format_state(**fields)
        for _ in range(2):
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.connect(self.address)
                self._sock.settimeout(wait)  # 0: never waits (EAGAIN); else waits at most that long
                self._sock.send(data)
                return True
            except (BlockingIOError, TimeoutError):
                return False  # its queue is full: the socket is fine, the manager is behind
            except OSError:
                self.close()  # the manager may have re-created its socket: one fresh try
        return False

    def ready(self, status: str) -> bool:
        self.last_status = status
        return self.send(READY_WAIT, READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """STATUS=, sent only when it changed (one the manager's full queue refused goes with the next call)."""
        if status == self.last_status:
            return False
        sent = self.send(STATUS=status)
        if sent:
            self.last_status = status
        return sent

    def stopping(self, status: str) -> bool:
        self.last_status = status
        return self.send(STOPPING_WAIT, STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def watchdog_usec(env: MutableMapping[str, str] | None = None, pid: int | None = None,
                  unset: bool = True) -> int | None:
    """As sd_watchdog_enabled: the watchdog timeout in microseconds when the manager asked this process
    for pings, else None (unset, malformed, zero, or meant for another pid). The variables are removed
    (unset=True): a child must not think the manager watches it."""
    env = os.environ if env is None else env
    usec_text, pid_text = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if unset:
        for name in WATCHDOG_VARS:
            env.pop(name, None)
    try:
        usec = int(usec_text) if usec_text is not None else 0
        for_pid = int(pid_text) if pid_text is not None else None
    except ValueError:
        return None
    if usec <= 0 or (for_pid is not None and for_pid != (os.getpid() if pid is None else pid)):
        return None
    return usec


class Watchdog:
    """WATCHDOG=1 every half of the manager's timeout, sent by the event loop when it comes round: a loop
    stuck in a kernel call (or a stopped process) sends none, and the manager restarts the service."""

    def __init__(self, notifier: Notifier, usec: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.interval = usec / 2e6
        self.clock = clock
        self.due = clock()  # the first ping goes with the first turn of the loop
        self.sent = 0

    def timeout(self) -> float:
        """Seconds the loop may sleep before the next ping is due."""
        return max(0.0, self.due - self.clock())

    def beat(self) -> None:
        now = self.clock()
        if now >= self.due:
            self.notifier.send(WATCHDOG=1)
            self.sent += 1
            self.due = now + self.interval
