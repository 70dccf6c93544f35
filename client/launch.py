"""`xskbroker exec`: take a grant, hand its fds to a command by inheritance, and become that command.

The command (QEMU, a DPDK app, a test harness) then holds the sockets itself: when it exits, the kernel
frees the queues and the broker ends the lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import string
import sys
from collections.abc import Sequence
from typing import Any

# QEMU's af-xdp backend registers this much UMEM per queue; its home is qemu_support.py (named here for `exec`)
from xskbroker.client.qemu_support import AF_XDP_UMEM_BYTES as QEMU_UMEM_PER_QUEUE
from xskbroker.common.procfs import has_cap

__all__ = ["QEMU_UMEM_PER_QUEUE", "command_keeps_cap", "command_keeps_ipc_lock", "exec_with_grant", "grant_env",
           "keeps_cap", "keeps_ipc_lock", "map_consumer_warnings", "memlock_warning", "substitute", "substitutions"]


def grant_env(reply: dict[str, Any], fds: list[int], queues: Sequence[int] = ()) -> dict[str, Any]:
    """What XSKBROKER_GRANT says: the grant with real fd numbers in place of indexes.

    A map grant's reply names no queues (it has no sockets): `queues` are the ones asked for, every queue
    of its map (map_entries) when none were named."""
    sockets = []
    for s in reply.get("sockets", []):
        entry = {k: v for k, v in s.items() if k not in ("fd", "umem_fd")}
        entry["fd"] = fds[s["fd"]]
        if "umem_fd" in s:
            entry["umem_fd"] = fds[s["umem_fd"]]
        sockets.append(entry)
    out = {k: v for k, v in reply.items() if k not in ("v", "ok", "op", "id", "sockets", "map_fd")}
    out["sockets"] = sockets
    if "map_fd" in reply:
        out["map_fd"] = fds[reply["map_fd"]]
        out["queues"] = list(queues) or list(range(int(reply.get("map_entries") or 0)))
    return out


def substitutions(grant: dict[str, Any]) -> dict[str, str | None]:
    """Each placeholder's value; None for one this grant cannot fill (substitute says why if it is used)."""
    sockets = grant["sockets"]
    queues = [s["queue"] for s in sockets] or list(grant.get("queues", []))
    return {
        "sock_fds": ":".join(str(s["fd"]) for s in sockets),  # QEMU's sock-fds= syntax
        "umem_fds": ":".join(str(s["umem_fd"]) for s in sockets if "umem_fd" in s),
        "map_fd": str(grant.get("map_fd", "")),
        "map_path": grant.get("map_pin"),  # QEMU's map-path=, DPDK's use_pinned_map dp_path=
        "queues": str(len(queues)),
        "start_queue": str(min(queues) if queues else 0),
        "ifname": grant["interface"],
        "ifindex": str(grant["ifindex"]),
        "xdp_mode": grant["xdp_mode"],
        "lease": grant["lease"],
    }


def unfilled(name: str, grant: dict[str, Any]) -> str:
    """Why this grant has no value for placeholder `name`."""
    if name == "map_path" and grant.get("kind") != "map":
        return "{map_path} is the pin of a map grant: use --kind map"
    if name == "map_path":
        return (f"the broker pinned no map for this grant: it runs without --pin-root, or another live map "
                f"lease of this user on {grant.get('interface')} holds the pin (one per user and interface)")
    return f"this grant has no {{{name}}}"


def substitute(args: Sequence[str], values: dict[str, str | None], grant: dict[str, Any] | None = None) -> list[str]:
    """Replace {name} in each argument; an unknown {name}, or one the grant cannot fill (value None), is an
    error; {{ and }} are literal braces."""
    out = []
    for arg in args:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(arg) if field is not None]
        except ValueError:  # a lone { or }: format's own message does not say how to write one
            raise KeyError(f"unmatched brace in {arg!r}: write a literal {{ or }} as {{{{ or }}}}") from None
        for field in fields:
            if field not in values:
                known = ", ".join("{" + k + "}" for k in values)
                raise KeyError(f"unknown placeholder {{{field}}} in {arg!r}; known: {known}")
            if values[field] is None:
                raise KeyError(f"cannot fill {{{field}}} in {arg!r}: {unfilled(field, grant or {})}")
        try:
            out.append(arg.format(**values))
        except ValueError as e:  # a conversion or format spec a string does not take ({sock_fds!x}, {queues:d})
            raise KeyError(f"cannot substitute {arg!r}: {e}") from None
    return out


CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
VFS_CAP_FLAGS_EFFECTIVE = 0x000001


def file_grants_cap(xattr: bytes | None, cap: int) -> bool:
    """Whether a security.capability xattr (struct vfs_cap_data, v2 or v3) puts `cap` in the permitted
    and effective sets of whoever execs the file."""
    if not xattr or len(xattr) < 12:
        return False
    magic, permitted = int.from_bytes(xattr[0:4], "little"), int.from_bytes(xattr[4:8], "little")
    if len(xattr) >= 16 and cap >= 32:
        permitted, cap = int.from_bytes(xattr[12:16], "little"), cap - 32
    return bool(magic & VFS_CAP_FLAGS_EFFECTIVE) and bool(permitted >> cap & 1)


def keeps_cap(status_text: str, euid: int, file_xattr: bytes | None, cap: int) -> bool:
    """Whether the command this process execs runs with capability `cap`: an ambient capability, root
    (which keeps its capabilities across exec), or a file capability on the command's binary."""
    if has_cap(status_text, cap, "CapAmb"):
        return True
    if euid == 0 and has_cap(status_text, cap, "CapBnd"):
        return True
    return has_cap(status_text, cap, "CapBnd") and file_grants_cap(file_xattr, cap)


def keeps_ipc_lock(status_text: str, euid: int, file_xattr: bytes | None) -> bool:
    """keeps_cap for CAP_IPC_LOCK (then the kernel does not charge the command's UMEM to RLIMIT_MEMLOCK)."""
    return keeps_cap(status_text, euid, file_xattr, CAP_IPC_LOCK)


def command_keeps_ipc_lock(command: Sequence[str]) -> bool:
    """keeps_ipc_lock for this process and the binary `command` would run."""
    return command_keeps_cap(command, CAP_IPC_LOCK)


def command_keeps_cap(command: Sequence[str], cap: int) -> bool:
    """keeps_cap for this process and the binary `command` would run."""
    path = shutil.which(command[0]) if command else None
    xattr = None
    if path:
        with contextlib.suppress(OSError):
            xattr = os.getxattr(path, "security.capability")
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return False
    return keeps_cap(status, os.geteuid(), xattr, cap)


def memlock_warning(reply: dict[str, Any], command: Sequence[str] = ()) -> str | None:
    """What to tell the user when the broker says the command's memlock limit is short; None when it
    is not, or when the command will run with CAP_IPC_LOCK (its UMEM is then not charged to the limit)."""
    info = reply.get("memlock")
    if not info or info.get("ok") or (command and command_keeps_ipc_lock(command)):
        return None
    return (f"xskbroker exec: warning: RLIMIT_MEMLOCK is {info['soft']} bytes but the UMEM needs "
            f"{info['needed']}: {info.get('reason', '')}. To fix: {info.get('hint', '')}")


def map_consumer_warnings(command: Sequence[str], needed: int, memlock_soft: int | None,
                          net_raw: bool | None = None, ipc_lock: bool | None = None) -> list[str]:
    """What a map grant's consumer (QEMU's map-path=, DPDK) will lack, told before it runs: it creates its own
    AF_XDP sockets, which takes CAP_NET_RAW (no broker can lend a capability), and registers its own UMEM,
    which its RLIMIT_MEMLOCK must cover unless it has CAP_IPC_LOCK. memlock_soft None: unlimited."""
    net_raw = command_keeps_cap(command, CAP_NET_RAW) if net_raw is None else net_raw
    ipc_lock = command_keeps_ipc_lock(command) if ipc_lock is None else ipc_lock
    out = []
    if not net_raw:
        out.append("xskbroker exec: warning: the command will run without CAP_NET_RAW, and a map grant's consumer "
                   "creates its own AF_XDP sockets (socket(AF_XDP) fails with EPERM without it). To fix: give it "
                   "CAP_NET_RAW (AmbientCapabilities=CAP_NET_RAW in its unit, setpriv --ambient-caps +net_raw, or "
                   "setcap cap_net_raw+ep on the binary); or use a bare grant (sock-fds=), which needs none")
    if needed and not ipc_lock and memlock_soft is not None and memlock_soft < needed:
        out.append(f"xskbroker exec: warning: RLIMIT_MEMLOCK is {memlock_soft} bytes but the UMEM needs {needed}: "
                   "a map grant's consumer registers its own UMEM and the broker raises limits for bare grants only. "
                   f"To fix: LimitMEMLOCK={needed} in its unit, a memlock line in limits.conf, or CAP_IPC_LOCK")
    return out


def exec_with_grant(reply: dict[str, Any], fds: list[int], command: Sequence[str], queues: Sequence[int] = ()) -> None:
    """Make exactly the grant's fds inheritable, export XSKBROKER_GRANT, substitute and exec. No return.

    A grant fd numbered 0, 1 or 2 (this process was started with that one closed) is moved above them, in
    `fds` too (the caller closes those if the exec fails): the command would take it for stdin, stdout or stderr."""
    for i, fd in enumerate(fds):
        if fd <= 2:
            fds[i] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
    grant = grant_env(reply, fds, queues)
    argv = substitute(command, substitutions(grant), grant)
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, "XSKBROKER_GRANT": json.dumps(grant, separators=(",", ":"))}
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: this process was started with that fd closed
            stream.flush()
    os.execvpe(argv[0], argv, env)
