"""The worker's ways to QEMU's monitor: libvirt's own (`virsh qemu-monitor-command --pass-fds`, one virsh per
command) or a QMP socket of QEMU's own; both speak through qmp_codec and serve hotplug as its transport.
LoggedMonitor records every command and QEMU's answer in the domain's log."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from xskbroker.client.hotplug import Monitor
from xskbroker.client.libvirt.config import Config, read_trusted
from xskbroker.client.libvirt.identity import Identity
from xskbroker.client.qemu_support import QemuVersion
from xskbroker.client.qmp import QMP
from xskbroker.client.qmp_codec import QMPConnectionError, QMPError, QMPTimeout, command_json, reply_value
from xskbroker.common.procfs import SO_PEERPIDFD, has_exited

# ---- virsh replies (pure) ------------------------------------------------------------------------------

def parse_virsh_reply(command: str, stdout: str) -> Any:
    """`virsh qemu-monitor-command` prints QEMU's reply as it is: the `return` value, or QMPError(desc)."""
    try:
        msg = json.loads(stdout)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise QMPConnectionError(f"virsh printed no QMP reply to {command}: {stdout.strip()[:160]!r}")
    return reply_value(command, msg, lambda: f"virsh printed an unexpected reply to {command}: {stdout.strip()[:160]}")


def virsh_failure(command: str, stderr: str) -> Exception:
    """The exception for a virsh that exited non-zero (libvirt's own error, not QEMU's)."""
    text = " ".join(line.strip().removeprefix("error: ") for line in stderr.splitlines() if line.strip())
    text = text or "no message"
    if "cannot acquire state change lock" in text:  # the domain's job is still busy (it is starting)
        return QMPTimeout(f"libvirt is busy with the domain ({command}): {text}")
    return QMPConnectionError(f"virsh qemu-monitor-command ({command}) failed: {text}")


# ---- monitors: virsh (libvirt's own monitor) or a QMP socket -------------------------------------------

class WorkerMonitor(Monitor, Protocol):
    """What the worker needs of a monitor besides hot-plug's commands: reaching it, and QEMU's pid and version."""

    def open(self, deadline: float) -> None: ...
    def pid(self) -> int: ...
    def confirm(self, pid: int, ident: Identity) -> None: ...
    def version(self) -> QemuVersion: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class VirshMonitor:
    """QEMU's monitor through `virsh qemu-monitor-command`: the only way in while libvirt owns the monitor.

    One virsh per command; fds go with `--pass-fds`, which virsh sends to libvirtd and libvirtd to QEMU
    with the command. virsh prints QEMU's reply as it is, errors included (exit status 0). The domain is named
    to virsh by its uuid when known: virsh reads `--domain 7` as domain ID 7, and a 36-character name as a
    UUID, before it tries them as names, so the name could reach another domain.
    """

    def __init__(self, domain: str, *, uuid: str | None = None, virsh: str = "virsh", uri: str = "qemu:///system",
                 pid_dir: str = "/run/libvirt/qemu", timeout: float = 30.0) -> None:
        self.domain, self.virsh, self.uri, self.pid_dir, self.timeout = domain, virsh, uri, pid_dir, timeout
        self.uuid = uuid

    def argv(self, command: str, arguments: Mapping[str, Any] | None = None,
             fds: Sequence[int] | None = None) -> list[str]:
        argv = [self.virsh, "-q", "-c", self.uri, "qemu-monitor-command", "--domain", self.uuid or self.domain]
        if fds:
            argv += ["--pass-fds", ",".join(str(fd) for fd in fds)]
        return [*argv, "--cmd", command_json(command, arguments)]

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        try:
            done = subprocess.run(self.argv(command, arguments, fds), pass_fds=tuple(fds or ()),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise QMPTimeout(f"virsh did not answer {command} within {self.timeout:g} s") from None
        except OSError as e:
            raise QMPConnectionError(f"cannot run {self.virsh}: {e.strerror or e}") from None
        if done.returncode:
            raise virsh_failure(command, done.stderr)
        return parse_virsh_reply(command, done.stdout)

    def open(self, deadline: float) -> None:
        """Wait until libvirt lets a command through (it finishes starting the domain first)."""
        while True:
            try:
                self.execute("query-status")
                return
            except QMPTimeout:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def pid(self) -> int:
        path = os.path.join(self.pid_dir, f"{self.domain}.pid")
        try:
            pid = int(read_trusted(path).strip())  # who wrote it names whose identity the hook asks with
        except (OSError, ValueError) as e:
            raise QMPConnectionError(f"cannot read QEMU's pid from {path}: {e}") from None
        if not os.path.exists(f"/proc/{pid}"):
            raise QMPConnectionError(f"QEMU (pid {pid} from {path}) is not running")
        return pid

    def confirm(self, pid: int, ident: Identity) -> None:
        """Nothing to confirm: the pid is libvirt's own record of the QEMU it started."""

    def version(self) -> QemuVersion:
        return QemuVersion.from_wire(self.execute("query-version"))

    def describe(self) -> str:
        return f"libvirt's monitor of {self.domain} (virsh -c {self.uri})"

    def close(self) -> None:
        pass


class QMPMonitor:
    """A QMP socket of QEMU's own (`-qmp unix:PATH,server=on,wait=off`): for tests and QEMUs with a second
    monitor. QEMU serves one client per socket: open() waits for the greeting until the deadline."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self._m: QMP | None = None
        self._peer_pidfd: int | None = None  # the process that listens on the socket, pinned (SO_PEERPIDFD)

    def open(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            try:
                self._m = QMP(self.path, max(left, 0.01))
                self._m.timeout = self.timeout
                with contextlib.suppress(OSError):  # kernels before 6.5: the ids are compared all the same
                    self._peer_pidfd = self._m.sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
                return
            except QMPConnectionError:  # not there yet, or refused for a moment
                if left <= 0:
                    raise
                time.sleep(0.05)

    @property
    def m(self) -> QMP:
        if self._m is None:
            raise QMPConnectionError(f"the QMP socket {self.path} is not open")
        return self._m

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        return self.m.execute(command, arguments, fds=fds)

    def pid(self) -> int:
        pid = self.m.pid
        if not pid:
            raise QMPConnectionError(f"cannot tell QEMU's pid from the QMP socket {self.path}")
        return pid

    def confirm(self, pid: int, ident: Identity) -> None:
        """That `ident`, read from /proc/PID after pid(), is the identity of the process that listens on the
        socket. SO_PEERCRED keeps naming the pid of a listener that has exited, and that pid can be another
        user's process by now: the agent would ask the broker as that user, and the fds go to this socket."""
        pidfd = self._peer_pidfd
        # still running after the read: the pid named the listener while /proc was read
        if pidfd is not None and has_exited(pidfd):
            raise QMPConnectionError(f"the process that listens on the QMP socket {self.path} (pid {pid}) has "
                                     "exited: that pid is not QEMU's")
        _, uid, gid = struct.unpack("3i", self.m.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if (ident.uid, ident.gid) != (uid, gid):
            raise QMPConnectionError(f"pid {pid} runs as {ident}, but the QMP socket {self.path} was opened as uid "
                                     f"{uid} gid {gid}: that pid is not the process that listens on it")

    def version(self) -> QemuVersion:
        return self.m.version

    def describe(self) -> str:
        return f"QMP socket {self.path}"

    def close(self) -> None:
        if self._m is not None:
            self._m.close()
            self._m = None
        if self._peer_pidfd is not None:
            os.close(self._peer_pidfd)
            self._peer_pidfd = None


def make_monitor(cfg: Config, domain: str, uuid: str | None = None) -> WorkerMonitor:
    if cfg.monitor.startswith("qmp:"):
        return QMPMonitor(cfg.monitor[4:].replace("{domain}", domain), cfg.timeout)
    return VirshMonitor(domain, uuid=uuid, virsh=cfg.virsh, uri=cfg.uri, pid_dir=cfg.pid_dir, timeout=cfg.timeout)


def _fd_label(fd: int) -> str:
    try:
        return f"fd {fd} socket:[{os.fstat(fd).st_ino}]"
    except OSError:
        return f"fd {fd}"


class LoggedMonitor:
    """Logs every command and QEMU's answer: the record of what QEMU was given and said."""

    def __init__(self, inner: Monitor, log: Callable[[str], None], prefix: str = "") -> None:
        self.inner, self.log, self.prefix = inner, log, prefix

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        shown = command + (" " + json.dumps(dict(arguments), separators=(",", ":")) if arguments else "")
        if fds:
            shown += " + " + ", ".join(_fd_label(fd) for fd in fds) + " (SCM_RIGHTS)"
        try:
            value = self.inner.execute(command, arguments, fds=fds)
        except QMPError as e:
            self.log(f"{self.prefix}{shown} -> error {e.error_class}: {e.desc}")
            raise
        except (QMPTimeout, QMPConnectionError) as e:
            self.log(f"{self.prefix}{shown} -> {e}")
            raise
        self.log(f"{self.prefix}{shown} -> ok")
        return value
