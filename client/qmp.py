"""A small synchronous QMP client, and the af-xdp hot-plug sequence built on it.

QMP is QEMU's JSON monitor protocol over a stream socket: a greeting, `qmp_capabilities`, then one command
at a time, each answered by a `return` or an `error`, with asynchronous events interleaved. File descriptors
go to QEMU with SCM_RIGHTS on the same sendmsg as the `getfd` command that names them.

Hot-plug of bare sockets (see docs/qemu.md): `getfd` per socket, `netdev_add` of type af-xdp naming them in
`sock-fds`, optional `device_add`; any failure unwinds what QEMU was given. Imports nothing privileged.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from xskbroker.common.procfs import memlock_limits

DEFAULT_TIMEOUT = 10.0
MAX_MESSAGE = 64 << 20  # query-qmp-schema is ~0.3 MiB on QEMU 7.2-10.0; anything huge is a broken peer
MAX_EVENTS = 1024  # events kept for wait_event; older ones are dropped
AF_XDP_UMEM_BYTES = 32 << 20  # QEMU's af-xdp UMEM per queue: (2048 + 2048) * 2 frames of 4 KiB
CAP_IPC_LOCK = 14
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed(): netdev and device ids


class QMPError(Exception):
    """QEMU answered a command with an error. str() is QEMU's own `desc`, untouched."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(ConnectionError):
    """The monitor is unreachable, closed the connection, or sent something that is not QMP."""


class QMPTimeout(TimeoutError):
    """No answer (or no awaited event) in time. The connection stays usable: a late reply is discarded."""


class AfXdpUnsupported(Exception):
    """The QEMU behind the monitor has no af-xdp netdev backend (or one without sock-fds)."""


# ---- pure parts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    package: str = ""

    @classmethod
    def from_wire(cls, v: Mapping[str, Any]) -> QemuVersion:
        q = v.get("qemu", {})
        return cls(int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)), str(v.get("package", "")))

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.micro}"
        return f"{text} ({self.package.strip()})" if self.package.strip() else text

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


@dataclass(frozen=True)
class NetdevSupport:
    """What query-qmp-schema says about netdev_add: the backend types and the af-xdp options."""

    types: frozenset[str]
    af_xdp_options: frozenset[str]  # members of the af-xdp variant (ifname, sock-fds, mode, …); empty if absent

    @property
    def af_xdp(self) -> bool:
        return "af-xdp" in self.types

    @property
    def sock_fds(self) -> bool:
        return "sock-fds" in self.af_xdp_options


def _enum_values(entry: Mapping[str, Any]) -> list[str]:
    # "values" is deprecated in newer QEMU in favour of "members": [{"name": …}]
    if isinstance(entry.get("members"), list):
        return [m["name"] for m in entry["members"] if isinstance(m, dict) and "name" in m]
    return [v for v in entry.get("values", []) if isinstance(v, str)]


def netdev_support(schema: Iterable[Mapping[str, Any]]) -> NetdevSupport:
    """Find netdev_add's backend enum (NetClientDriver) and the af-xdp variant in a query-qmp-schema reply.

    Type names in query-qmp-schema are masked (numbers), so the enum is reached through the netdev_add
    command: its argument type is the Netdev union, whose tag member ("type") has the enum as its type.
    """
    by_name = {e.get("name"): e for e in schema if isinstance(e, Mapping)}
    union = by_name.get(by_name.get("netdev_add", {}).get("arg-type"), {})
    tag = union.get("tag", "type")
    enum_name = next((m.get("type") for m in union.get("members", []) if m.get("name") == tag), None)
    types = set(_enum_values(by_name.get(enum_name, {})))
    if not types:  # an unexpected layout: fall back to any enum that lists the classic backends
        for e in by_name.values():
            values = _enum_values(e) if e.get("meta-type") == "enum" else []
            if {"tap", "user", "socket", "hubport"} <= set(values) or ("tap" in values and "af-xdp" in values):
                types |= set(values)
    variants = union.get("variants", [])
    if not variants:
        variants = [v for e in by_name.values() for v in e.get("variants", []) if v.get("case") == "af-xdp"]
    af_type = next((v.get("type") for v in variants if v.get("case") == "af-xdp"), None)
    options = {m.get("name") for m in by_name.get(af_type, {}).get("members", []) if m.get("name")}
    return NetdevSupport(frozenset(types), frozenset(options))


def unsupported_message(version: QemuVersion, path: str, support: NetdevSupport) -> str | None:
    """None if af-xdp with sock-fds is there; else why not, in one sentence."""
    if support.af_xdp and support.sock_fds:
        return None
    if support.af_xdp:
        return f"QEMU {version} at {path} has an af-xdp netdev backend without sock-fds, so it cannot use sockets " \
               "made by the broker"
    built = " (this one was built without libxdp)" if version.at_least(8, 2) else ""
    return f"QEMU {version} at {path} has no af-xdp netdev backend{built} (needs QEMU ≥ 8.2 built with libxdp)"


def check_id(netdev_id: str) -> str:
    """QEMU's rule for ids (id_wellformed); checked here so a bad id fails before any fd is sent."""
    if not _ID.match(netdev_id):
        raise ValueError(f"{netdev_id!r} is not a valid QEMU id: it must start with a letter and contain only "
                         "letters, digits, '-', '.' and '_'")
    return netdev_id


def fd_name(netdev_id: str, queue: int) -> str:
    return f"{netdev_id}-q{queue}"


def device_id_for(netdev_id: str) -> str:
    return f"{netdev_id}-dev"


def netdev_arguments(netdev_id: str, ifname: str, names: Sequence[str], start_queue: int = 0,
                     xdp_mode: str | None = None) -> dict[str, Any]:
    """netdev_add arguments for bare sockets already in xsks_map at start_queue+i."""
    if not names:
        raise ValueError("an af-xdp netdev needs at least one socket")
    args: dict[str, Any] = {"type": "af-xdp", "id": netdev_id, "ifname": ifname, "queues": len(names),
                            "start-queue": start_queue, "inhibit": True, "sock-fds": ":".join(names)}
    # QEMU 8.2-10.0 looks for a native-mode program unless told skb ("no XDP program loaded on …")
    if xdp_mode == "skb":
        args["mode"] = "skb"
    return args


def encode_command(command: str, arguments: Mapping[str, Any] | None = None, cmd_id: Any = None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = dict(arguments)
    if cmd_id is not None:
        msg["id"] = cmd_id
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def parse_message(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise QMPConnectionError(f"the monitor sent something that is not JSON: {line[:80]!r} ({e})") from None
    if not isinstance(msg, dict):
        raise QMPConnectionError(f"the monitor sent a JSON {type(msg).__name__}, not an object")
    return msg


def memlock_limit(limits_text: str) -> int | None:
    """The soft RLIMIT_MEMLOCK from /proc/<pid>/limits text; None for unlimited or not found."""
    limits = memlock_limits(limits_text)
    return limits[0] if limits else None


def has_cap(status_text: str, cap: int, field: str = "CapEff") -> bool:
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


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
        self._buf = b""
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
            if "QMP" not in greeting:
                raise QMPConnectionError(f"{path} did not greet like a QMP monitor: {json.dumps(greeting)[:120]}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.version = QemuVersion.from_wire(self.greeting.get("version", {}))
            self.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

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
        while b"\n" not in self._buf:
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
            self._buf += chunk
            if len(self._buf) > MAX_MESSAGE:
                raise QMPConnectionError(f"a QMP message from {self.path} exceeds {MAX_MESSAGE} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        if not line.strip():
            return self._read(deadline, what)
        msg = parse_message(line)
        if "event" in msg:
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
        data = encode_command(command, arguments, cmd_id)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sent = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except TimeoutError:
            raise QMPTimeout(f"QEMU at {self.path} did not take the {command} command in time") from None
        except OSError as e:
            raise QMPConnectionError(f"cannot send {command} to QEMU at {self.path}: {e.strerror or e}") from None
        while True:
            try:
                msg = self._read(deadline, f"answer to {command}")
            except QMPTimeout:
                raise QMPTimeout(f"QEMU at {self.path} did not answer {command} within "
                                 f"{self.timeout if timeout is None else timeout:g} s") from None
            if "event" in msg or ("id" in msg and msg["id"] != cmd_id):
                continue  # an event, or a late answer to a command that timed out
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QMPError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
            raise QMPConnectionError(f"unexpected QMP message from {self.path}: {json.dumps(msg)[:120]}")

    # -- events --

    def event_mark(self) -> int:
        """A point in the event stream: wait_event(after=mark) ignores events seen before it."""
        return self._event_seq

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = None, after: int = 0) -> dict[str, Any]:
        def hit(seq: int, ev: dict[str, Any]) -> bool:
            return seq > after and ev.get("event") == name and (match is None or match(ev.get("data", {})))

        for seq, ev in self.events:
            if hit(seq, ev):
                return ev
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._read(deadline, f"{name} event")
            if "event" in msg and hit(self._event_seq, msg):
                return msg

    # -- capability --

    def schema(self) -> list[dict[str, Any]]:
        if self._schema is None:
            self._schema = list(self.execute("query-qmp-schema"))
        return self._schema

    def netdev_support(self) -> NetdevSupport:
        return netdev_support(self.schema())

    def check_af_xdp(self) -> NetdevSupport:
        """Raise AfXdpUnsupported with a one-line reason unless this QEMU has af-xdp with sock-fds."""
        support = self.netdev_support()
        reason = unsupported_message(self.version, self.path, support)
        if reason:
            raise AfXdpUnsupported(reason)
        return support


# ---- hot-plug ------------------------------------------------------------------------------------------

class Monitor(Protocol):
    """What attach() needs of a monitor: QMP above, or another transport (the libvirt hook's virsh)."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any: ...


@dataclass(frozen=True)
class Attachment:
    netdev_id: str
    ifname: str
    queues: tuple[int, ...]
    fd_names: tuple[str, ...]
    netdev: dict[str, Any]  # the netdev_add arguments as sent
    device_id: str | None = None
    device: dict[str, Any] | None = None  # the device_add arguments as sent


def attach(qmp: Monitor, netdev_id: str, ifname: str, fds: Sequence[int], *, start_queue: int = 0,
           xdp_mode: str | None = None, device: str | None = None,
           device_props: Mapping[str, Any] | None = None) -> Attachment:
    """Give QEMU bare sockets for queues start_queue.. and plug an af-xdp netdev (and a device) onto them.

    fds[i] must be the socket in xsks_map at start_queue+i. The caller keeps its own copies and should close
    them once this returns (QEMU then holds the only ones). On any failure QEMU is left holding nothing of
    this attempt: names it still has are closed (closefd), a netdev this call added is deleted; the original
    exception is raised with what was undone in its notes.
    """
    check_id(netdev_id)
    if not fds:
        raise ValueError("attach needs at least one socket fd")
    queues = tuple(range(start_queue, start_queue + len(fds)))
    names = tuple(fd_name(netdev_id, q) for q in queues)
    netdev_args = netdev_arguments(netdev_id, ifname, names, start_queue, xdp_mode)
    device_args: dict[str, Any] | None = None
    if device:
        device_args = {**(device_props or {}), "driver": device, "netdev": netdev_id, "id": device_id_for(netdev_id)}
    tried: list[str] = []  # every name a getfd was attempted for: one that timed out may still have landed
    added = False
    try:
        for name, fd in zip(names, fds, strict=True):
            tried.append(name)
            qmp.execute("getfd", {"fdname": name}, fds=[fd])
        qmp.execute("netdev_add", netdev_args)
        added = True
        if device_args:
            qmp.execute("device_add", device_args)
    except BaseException as e:
        for note in _unwind(qmp, netdev_id if added else None, [] if added else tried):
            e.add_note(note)
        raise
    return Attachment(netdev_id, ifname, queues, names, netdev_args, device_args and device_args["id"], device_args)


def _unwind(qmp: Monitor, netdev_id: str | None, names: Sequence[str]) -> list[str]:
    """Best effort: undo a partial attach. Returns one note per step, for the error report."""
    notes: list[str] = []
    if netdev_id:  # QEMU owns the fds once netdev_add succeeded; deleting the netdev closes them
        try:
            qmp.execute("netdev_del", {"id": netdev_id})
            notes.append(f"unwound: deleted netdev {netdev_id!r} (QEMU closed its sockets)")
        except (QMPError, QMPTimeout, QMPConnectionError) as e:
            notes.append(f"could not delete netdev {netdev_id!r}: {e}")
    closed, taken = [], []
    for name in names:
        try:
            qmp.execute("closefd", {"fdname": name})
            closed.append(name)
        except QMPError:
            taken.append(name)  # never arrived, or netdev_add had already taken it
        except (QMPTimeout, QMPConnectionError) as e:
            notes.append(f"could not close fd {name!r} in QEMU: {e}")
    if closed:
        notes.append(f"unwound: closed fd(s) {', '.join(closed)} in QEMU")
    if taken:
        notes.append(f"fd(s) {', '.join(taken)} were not in QEMU's monitor (never arrived, or taken by netdev_add)")
    return notes


@dataclass(frozen=True)
class Detached:
    netdev_id: str
    device_id: str
    device_removed: bool  # False: there was no such device


def detach(qmp: QMP, netdev_id: str, *, device_id: str | None = None, timeout: float = 10.0) -> Detached:
    """device_del (waiting for DEVICE_DELETED), then netdev_del; QEMU then closes the sockets.

    A device the guest has not released within `timeout` keeps its netdev (deleting it under a live NIC
    would leave the guest a dead link): QMPTimeout says so, and detaching again later finishes the job.
    """
    check_id(netdev_id)
    dev = device_id or device_id_for(netdev_id)
    mark = qmp.event_mark()
    removed = True
    try:
        qmp.execute("device_del", {"id": dev})
    except QMPError as e:
        if e.error_class == "DeviceNotFound":
            removed = False
        elif "already in the process of unplug" not in e.desc:  # a retry while the guest still works on it
            raise
    if removed:
        path = f"/machine/peripheral/{dev}"
        try:
            qmp.wait_event("DEVICE_DELETED", lambda d: d.get("device") == dev or d.get("path") == path,
                           timeout=timeout, after=mark)
        except QMPTimeout:
            raise QMPTimeout(f"device {dev!r} is still present {timeout:g} s after device_del: the guest has not "
                             f"released it (a paused or still booting guest never does); netdev {netdev_id!r} is "
                             "kept so the device is not left without a backend; detach again later") from None
    qmp.execute("netdev_del", {"id": netdev_id})
    return Detached(netdev_id, dev, removed)


# ---- the process behind the monitor --------------------------------------------------------------------

def memlock_shortfall(pid: int | None, queues: int) -> str | None:
    """Why QEMU (pid) will likely fail to register af-xdp UMEM for `queues` queues, or None if it should not.

    The kernel charges AF_XDP UMEM to RLIMIT_MEMLOCK of the registering process (QEMU) unless it has
    CAP_IPC_LOCK. Only a warning: the limit is read, not changed, and QEMU's own error decides.
    """
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/limits") as f:
            limit = memlock_limit(f.read())
        with open(f"/proc/{pid}/status") as f:
            if has_cap(f.read(), CAP_IPC_LOCK):
                return None
    except OSError:
        return None
    needed = AF_XDP_UMEM_BYTES * queues
    if limit is None or limit >= needed:
        return None
    return (f"QEMU (pid {pid}) may lock {limit >> 20} MiB (RLIMIT_MEMLOCK) but its af-xdp UMEM needs "
            f"{needed >> 20} MiB for {queues} queue(s), on top of what its user already has pinned; netdev_add "
            "will likely fail with \"failed to create umem … No buffer space available\". Raise it: "
            f"`prlimit --pid {pid} --memlock={needed}:{needed}` "
            "(root), or LimitMEMLOCK= in QEMU's systemd unit")


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
