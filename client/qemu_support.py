"""What this client knows of QEMU itself: its version, whether it has the af-xdp netdev backend (from
query-qmp-schema), and what its af-xdp UMEM needs of the process's RLIMIT_MEMLOCK. Pure, apart from reading
/proc for memlock_shortfall."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from xskbroker.common.procfs import has_cap, memlock_limits
from xskbroker.common.records import record

AF_XDP_UMEM_BYTES = 32 << 20  # QEMU's af-xdp UMEM per queue: (2048 + 2048) * 2 frames of 4 KiB
CAP_IPC_LOCK = 14


class AfXdpUnsupported(Exception):
    """The QEMU behind the monitor has no af-xdp netdev backend (or one without sock-fds)."""


def umem_per_queue(version: QemuVersion | None = None, given: int | None = None) -> int:
    """The UMEM one af-xdp queue of this QEMU registers: what the user said (--qemu-umem: a QEMU built
    with other ring sizes), else what QEMU's version implies. Every QEMU with af-xdp so far (8.2 to 10.x)
    sizes it from libxdp's compile-time default rings: (2048 + 2048) * 2 frames of 4 KiB."""
    if given is not None:
        return given
    return AF_XDP_UMEM_BYTES


def umem_bytes(queues: int, per_queue: int | None = None) -> int:
    """The UMEM QEMU registers (and locks) in its own process for an af-xdp netdev of `queues` queues."""
    return (AF_XDP_UMEM_BYTES if per_queue is None else per_queue) * queues


@record(frozen=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    package: str = ""

    @classmethod
    def from_wire(cls, v: Mapping[str, Any]) -> QemuVersion:
        q = v.get("qemu", {})
        try:
            return cls(int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)),
                       str(v.get("package", "")))
        except OverflowError:  # json reads 1e999 as inf: a wrong shape, as callers treat ValueError
            raise ValueError(f"QEMU's version is not a number: {q!r:.80}") from None

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.micro}"
        return f"{text} ({self.package.strip()})" if self.package.strip() else text

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


@record(frozen=True)
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


# ---- the process behind the monitor --------------------------------------------------------------------

def memlock_limit(limits_text: str) -> int | None:
    """The soft RLIMIT_MEMLOCK from /proc/<pid>/limits text; None for unlimited or not found."""
    limits = memlock_limits(limits_text)
    return limits[0] if limits else None


def memlock_shortfall(pid: int | None, queues: int, per_queue: int | None = None) -> str | None:
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
    needed = umem_bytes(queues, per_queue)
    if limit is None or limit >= needed:
        return None
    return (f"QEMU (pid {pid}) may lock {_mib(limit)} (RLIMIT_MEMLOCK) but its af-xdp UMEM needs "
            f"{_mib(needed)} for {queues} queue(s), on top of what its user already has pinned; netdev_add "
            "will likely fail with \"failed to create umem … No buffer space available\". Raise it: "
            f"`prlimit --pid {pid} --memlock={needed}:{needed}` "
            "(root), or LimitMEMLOCK= in QEMU's systemd unit")


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


def has_ipc_lock(pid: int | None) -> bool:
    """Whether QEMU (pid) has CAP_IPC_LOCK: its UMEM is then not charged to RLIMIT_MEMLOCK at all."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return has_cap(f.read(), CAP_IPC_LOCK)
    except OSError:
        return False


def broker_memlock_warning(info: Mapping[str, Any], pid: int) -> str | None:
    """The broker's `memlock` answer for QEMU (pid) in words: None when the limit is enough (or the broker
    raised it), else what it found and what is missing."""
    if info.get("ok"):
        return None
    soft = info.get("soft")
    have = f"may lock {_mib(soft)}" if isinstance(soft, int) else "has a limit the broker could not read"
    needed = int(info.get("needed", 0))
    return (f"QEMU (pid {pid}) {have} (RLIMIT_MEMLOCK) but its af-xdp UMEM needs {_mib(needed)}, and the broker "
            f"did not raise it: {info.get('reason', 'no reason given')}; netdev_add will likely fail with "
            "\"failed to create umem … No buffer space available\". "
            f"To fix: {info.get('hint') or f'prlimit --pid {pid} --memlock={needed}:{needed} (root)'}")
