"""The broker's own effective limits, as an operator needs them: reported at READY and in `status`, and
named in the error a grant meets when one runs out.

Memlock: XDP_UMEM_REG charges a bound grant's UMEM pages to the broker's user (its locked_vm) against the
broker's RLIMIT_MEMLOCK, unless the broker holds CAP_IPC_LOCK; over the limit it fails ENOBUFS. A unit's
LimitMEMLOCK=infinity can be lowered silently by the host (a container manager's own limit), so the value
in force is read, never assumed.
"""

from __future__ import annotations

import resource
from typing import Any

from xskbroker.broker.listener import connection_capacity
from xskbroker.common.procfs import own_caps
from xskbroker.policy.sizes import format_size

CAP_IPC_LOCK = 14


def _value(n: int) -> int | str:
    return "infinity" if n == resource.RLIM_INFINITY else n


def _size(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else format_size(n)


def ipc_lock() -> bool:
    """Whether this process holds CAP_IPC_LOCK (then no memlock limit applies to what it pins). Read once
    (own_caps): STATUS= asks at every grant."""
    caps = own_caps()
    return caps is not None and bool(caps >> CAP_IPC_LOCK & 1)


def effective(max_connections: int | None = None) -> dict[str, Any]:
    """The limits in force now (prlimit may change them under a running broker)."""
    mem_soft, mem_hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fd_soft, fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {
        "memlock": {"soft": _value(mem_soft), "hard": _value(mem_hard), "cap_ipc_lock": ipc_lock()},
        "nofile": {"soft": _value(fd_soft), "hard": _value(fd_hard)},
    }
    if max_connections is not None:
        out["max_connections"] = connection_capacity(max_connections)
    return out


def summary() -> str:
    """For STATUS=: e.g. "memlock 8 MiB, 4096 fds"."""
    mem_soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fd_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    memlock = "memlock not limited (CAP_IPC_LOCK)" if ipc_lock() else f"memlock {_size(mem_soft)}"
    return f"{memlock}, {'unlimited' if fd_soft == resource.RLIM_INFINITY else fd_soft} fds"


def memlock_exhausted() -> str | None:
    """What to tell a grant whose UMEM registration failed ENOBUFS/ENOMEM, when the broker's memlock limit
    is the likely cause (None when no limit applies: then it really is memory)."""
    if ipc_lock():
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return None
    return (f"the broker's locked-memory limit (RLIMIT_MEMLOCK {_size(soft)}) is too low to pin this "
            "grant's UMEM (pinned UMEM counts against it, summed over the broker user's grants): "
            "raise it with LimitMEMLOCK=infinity in the unit (systemctl edit xskbroker; a container's own "
            "limit caps it too) or `prlimit --memlock=unlimited --pid <broker>`")


def pool_budget(wanted: int) -> int:
    """The UMEM pool's budget: what the operator asked for, but at most a quarter of a limited memlock. What
    the pool pins counts against the same limit as every grant's UMEM: under LimitMEMLOCK=8M a 64 MiB pool
    made grants fail ENOBUFS."""
    if ipc_lock():
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return wanted if soft == resource.RLIM_INFINITY else min(wanted, soft // 4)
