"""A small synchronous QMP client: QEMU's JSON monitor protocol over a unix stream socket.

A greeting, `qmp_capabilities`, then one command at a time, each answered by a `return` or an `error`, with
asynchronous events interleaved. File descriptors go to QEMU with SCM_RIGHTS on the same sendmsg as the
`getfd` command that names them. The wire format is qmp_codec's; the af-xdp hot-plug sequence that runs over
this client (or over libvirt's monitor) is hotplug's, re-exported here as this module's documented API
(docs/qemu.md). Imports nothing privileged.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xskbroker.client import qmp_codec as codec
from xskbroker.client.hotplug import Attachment, Detached, Monitor, attach, attach_grant, close_fds, detach
from xskbroker.client.qemu_support import (
    AfXdpUnsupported,
    NetdevSupport,
    QemuVersion,
    netdev_support,
    unsupported_message,
)
from xskbroker.client.qmp_codec import QMPConnectionError, QMPError, QMPTimeout

__all__ = ["DEFAULT_TIMEOUT", "QMP", "AfXdpUnsupported", "Attachment", "Detached", "Monitor", "NetdevSupport",
           "QMPConnectionError", "QMPError", "QMPTimeout", "QemuVersion", "attach", "attach_grant", "close_fds",
           "detach"]

DEFAULT_TIMEOUT = 10.0
MAX_EVENTS = 1024  # events kept for wait_event; older ones are dropped


# ---- the client ----------------------------------------------------------------------------------------

class QMP:
    """One QMP session. Not thread-safe: one command at a time, as QMP itself serves them."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise QMPConnectionError(f"cannot reach QEMU's QMP socket at {path}: {e.strerror or e}") from None
        self._setup(sock, path, timeout)

    @classmethod
    def from_socket(cls, sock: socket.socket, path: str = "<socket>", timeout: float = DEFAULT_TIMEOUT) -> QMP:
        """Use a connected stream socket (tests, or a launcher that holds the monitor's other end)."""
        self = cls.__new__(cls)
        self._setup(sock, path, timeout)
        return self

    def _setup(self, sock: socket.socket, path: str, timeout: float) -> None:
        self.sock, self.path, self.timeout = sock, path, timeout
        self._pidfd: int | None = None  # QEMU pinned: its exit is told apart from a dropped connection
        self._qemu_pid = self.pid
        with contextlib.suppress(OSError):
            # (a monitor served by this very process, as in tests, is never "QEMU exited")
            if self._qemu_pid and self._qemu_pid != os.getpid():
                self._pidfd = os.pidfd_open(self._qemu_pid)
        self._framer = codec.Framer(path)
        self._next_id = 0
        self._event_seq = 0
        self.events: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=MAX_EVENTS)
        self._schema: list[dict[str, Any]] | None = None
        try:
            try:
                greeting = self._read(time.monotonic() + timeout, "the QMP greeting")
            except QMPTimeout:
                raise QMPTimeout(f"no QMP greeting from {path} within {timeout:g} s; QEMU serves one QMP client "
                                 "per monitor socket: is another one connected?") from None
            try:  # whoever serves the socket chose these shapes: a wrong one is a peer that is not QEMU
                self.greeting: dict[str, Any] = greeting["QMP"]
                self.version = QemuVersion.from_wire(self.greeting.get("version", {}))
            except (KeyError, AttributeError, TypeError, ValueError):
                raise QMPConnectionError(f"{path} did not greet like a QMP monitor: "
                                         f"{json.dumps(greeting)[:120]}") from None
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _exited(self, command: str, e: QMPConnectionError) -> QMPConnectionError:
        """The error for a connection lost during `command`: plainly that QEMU exited (and how, where this
        process can still see it) when it did, rather than "Connection reset by peer"."""
        pidfd = self._pidfd
        if pidfd is None:
            return e
        # QEMU's sockets close before its exit is signalled on the pidfd: give it a moment
        if not select.select([pidfd], [], [], 1.0)[0]:
            return e
        pid = self._qemu_pid
        how = _exit_status(pid) if pid else None
        status = f" ({how})" if how else " (its exit status is not known here: it is not this command's child)"
        return QMPConnectionError(f"QEMU (pid {pid or '?'}) exited during {command}{status}; the QMP connection at "
                                  f"{self.path} died with it")

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """QEMU's pid as the kernel reports it for the monitor socket (None if from another pid namespace)."""
        with contextlib.suppress(OSError):
            pid = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            return pid or None
        return None

    # -- wire --

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        """The next message; events are queued and returned too (callers filter)."""
        while (msg := self._framer.next()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"QEMU at {self.path} sent no {what} within the timeout")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise QMPTimeout(f"QEMU at {self.path} sent no {what} within the timeout") from None
            except OSError as e:
                raise QMPConnectionError(f"QMP connection to {self.path} failed: {e.strerror or e}") from None
            if not chunk:
                raise QMPConnectionError(f"QEMU closed the QMP connection at {self.path} (did it exit?)")
            self._framer.feed(chunk)
        if codec.is_event(msg):
            self._event_seq += 1
            self.events.append((self._event_seq, msg))
        return msg

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, fds: Sequence[int] | None = None,
                timeout: float | None = None) -> Any:
        """Run one command; return its `return` value or raise QMPError with QEMU's desc.

        fds travel with SCM_RIGHTS in the same sendmsg as the command's first byte, which is where QEMU looks
        for them when the command asks (getfd, add-fd).
        """
        self._next_id += 1
        cmd_id = f"xsk{self._next_id}"
        data = codec.encode_command(command, arguments, cmd_id)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except TimeoutError:
            raise QMPTimeout(f"QEMU at {self.path} did not take the {command} command in time") from None
        except OSError as e:
            raise self._exited(command, QMPConnectionError(
                f"cannot send {command} to QEMU at {self.path}: {e.strerror or e}")) from None
        while True:
            try:
                msg = self._read(deadline, f"answer to {command}")
            except QMPConnectionError as e:
                raise self._exited(command, e) from None
            except QMPTimeout:
                raise QMPTimeout(f"QEMU at {self.path} did not answer {command} within "
                                 f"{self.timeout if timeout is None else timeout:g} s") from None
            if codec.is_event(msg) or ("id" in msg and msg["id"] != cmd_id):
                continue  # an event, or a late answer to a command that timed out
            return codec.reply_value(command, msg,
                               lambda m=msg: f"unexpected QMP message from {self.path}: {json.dumps(m)[:120]}")

    # -- events --

    def event_mark(self) -> int:
        """A point in the event stream: wait_event(after=mark) ignores events seen before it."""
        return self._event_seq

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = None, after: int = 0) -> dict[str, Any]:
        def hit(seq: int, ev: dict[str, Any]) -> bool:
            data = ev.get("data", {})  # the peer's shape: match() is given an object or nothing matches
            return seq > after and ev.get("event") == name and (match is None or
                                                                 (isinstance(data, dict) and match(data)))

        for seq, ev in self.events:
            if hit(seq, ev):
                return ev
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._read(deadline, f"{name} event")
            if codec.is_event(msg) and hit(self._event_seq, msg):
                return msg

    # -- capability --

    def schema(self) -> list[dict[str, Any]]:
        if self._schema is None:
            self._schema = list(self.execute("query-qmp-schema"))
        return self._schema

    def netdev_support(self) -> NetdevSupport:
        try:
            return netdev_support(self.schema())
        except (AttributeError, TypeError, ValueError) as e:  # the peer's shapes: a wrong one is not a crash
            raise QMPConnectionError(f"{self.path} answered query-qmp-schema unlike QEMU: {e}") from None

    def check_af_xdp(self) -> NetdevSupport:
        """Raise AfXdpUnsupported with a one-line reason unless this QEMU has af-xdp with sock-fds."""
        support = self.netdev_support()
        reason = unsupported_message(self.version, self.path, support)
        if reason:
            raise AfXdpUnsupported(reason)
        return support


def _exit_status(pid: int) -> str | None:
    """How a process that has exited ended, read from its /proc entry while it is a zombie (its parent has
    not reaped it yet); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] not in ("Z", "X") or len(fields) < 50:
        return None
    code = int(fields[49])  # field 52: the exit code in waitpid() form
    if code & 0x7F:
        try:
            name = signal.Signals(code & 0x7F).name
        except ValueError:
            name = f"signal {code & 0x7F}"
        return f"killed by {name}" + (", core dumped" if code & 0x80 else "")
    return f"exit status {code >> 8}"
