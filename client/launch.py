"""`xskbroker exec`: take a grant, hand its fds to a command by inheritance, and become that command.

The command (QEMU, a DPDK app, a test harness) then holds the sockets itself: when it exits, the kernel
frees the queues and the broker ends the lease.
"""

from __future__ import annotations

import json
import os
import string
import sys
from collections.abc import Sequence
from typing import Any

# QEMU's af-xdp backend registers this much UMEM per queue; its home is qemu_support.py (named here for `exec`)
from xskbroker.client.qemu_support import AF_XDP_UMEM_BYTES as QEMU_UMEM_PER_QUEUE

__all__ = ["QEMU_UMEM_PER_QUEUE", "exec_with_grant", "grant_env", "memlock_warning", "substitute", "substitutions"]


def grant_env(reply: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """What XSKBROKER_GRANT says: the grant with real fd numbers in place of indexes."""
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
    return out


def substitutions(grant: dict[str, Any]) -> dict[str, str]:
    sockets = grant["sockets"]
    queues = [s["queue"] for s in sockets]
    return {
        "sock_fds": ":".join(str(s["fd"]) for s in sockets),  # QEMU's sock-fds= syntax
        "umem_fds": ":".join(str(s["umem_fd"]) for s in sockets if "umem_fd" in s),
        "map_fd": str(grant.get("map_fd", "")),
        "queues": str(len(queues)),
        "start_queue": str(min(queues) if queues else 0),
        "ifname": grant["interface"],
        "ifindex": str(grant["ifindex"]),
        "xdp_mode": grant["xdp_mode"],
        "lease": grant["lease"],
    }


def substitute(args: Sequence[str], values: dict[str, str]) -> list[str]:
    """Replace {name} in each argument; an unknown {name} is an error, {{ and }} are literal braces."""
    out = []
    for arg in args:
        for _, field, _, _ in string.Formatter().parse(arg):
            if field is not None and field not in values:
                known = ", ".join("{" + k + "}" for k in values)
                raise KeyError(f"unknown placeholder {{{field}}} in {arg!r}; known: {known}")
        out.append(arg.format(**values))
    return out


def memlock_warning(reply: dict[str, Any]) -> str | None:
    info = reply.get("memlock")
    if not info or info.get("ok"):
        return None
    return (f"xskbroker exec: warning: RLIMIT_MEMLOCK is {info['soft']} bytes but the UMEM needs "
            f"{info['needed']}: {info.get('reason', '')}. To fix: {info.get('hint', '')}")


def exec_with_grant(reply: dict[str, Any], fds: list[int], command: Sequence[str]) -> None:
    """Make exactly the grant's fds inheritable, export XSKBROKER_GRANT, substitute and exec. No return."""
    grant = grant_env(reply, fds)
    argv = substitute(command, substitutions(grant))
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, "XSKBROKER_GRANT": json.dumps(grant, separators=(",", ":"))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
