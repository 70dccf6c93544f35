"""The policy as data: frozen, validated values that the loader builds and `decide` reads.

Nothing here reads files or resolves names; see loader.py and decide.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from xskbroker.common.records import record

Kind = Literal["bound", "bare", "map"]
KINDS: tuple[Kind, ...] = ("bound", "bare", "map")
Action = Literal["allow", "deny"]

# The UMEM a grant may pin (all its sockets together) under an allow rule that sets no max_umem: 16 queues
# of the 16 MiB UMEM that libxdp's samples use, or 64 of the broker's default 4 MiB. Unbounded, one request
# could pin 126 x 4 GiB of the broker's (unlimited, root) memlock, and the pinning alone takes seconds.
DEFAULT_MAX_UMEM = 256 << 20


@record(frozen=True)
class QueueSet:
    """A set of queue ids as inclusive ranges; ``ranges=None`` means any queue."""

    ranges: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.ranges is None:
            return
        # Normalise once (sorted, merged) so equality, printing and membership stay simple.
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(self.ranges):
            if lo < 0 or lo > hi:
                raise ValueError(f"bad queue range {lo}-{hi}")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        object.__setattr__(self, "ranges", tuple(merged))

    @property
    def is_any(self) -> bool:
        return self.ranges is None

    def contains(self, queue: int) -> bool:
        if self.ranges is None:
            return True
        return any(lo <= queue <= hi for lo, hi in self.ranges)

    def covers(self, queues: Iterable[int]) -> bool:
        return all(self.contains(q) for q in queues)

    def missing(self, queues: Iterable[int]) -> tuple[int, ...]:
        """The queues (in the given order) that are not in the set."""
        return tuple(q for q in queues if not self.contains(q))

    def __str__(self) -> str:
        if self.ranges is None:
            return "any"
        if not self.ranges:
            return "none"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


ANY_QUEUE = QueueSet(None)


@record(frozen=True)
class Rule:
    """One [[allow]] or [[deny]] table.

    users/groups hold names, str(uid)/str(gid) for numbers, or "*" for anyone. cgroups and labels, when
    not empty, narrow that further: the peer must ALSO be in a matching cgroup v2 path (fnmatch glob) and
    carry a matching LSM label (SO_PEERSEC); a peer whose cgroup or label is unknown matches neither.
    """

    name: str
    action: Action
    users: frozenset[str]
    groups: frozenset[str]
    interfaces: tuple[str, ...]
    queues: QueueSet = ANY_QUEUE
    kinds: frozenset[str] = frozenset({"bound"})
    max_queues: int | None = None
    max_umem: int | None = None
    exclusive: bool = False
    raise_memlock: int | None = None  # RLIMIT_MEMLOCK the broker may raise a bare-grant holder to
    cgroups: tuple[str, ...] = ()  # globs on the peer's cgroup v2 path; () = any cgroup
    labels: tuple[str, ...] = ()  # globs on the peer's LSM label (SO_PEERSEC); () = any label, or none
    source: str = "<policy>"

    def describe(self) -> str:
        """How reasons and tools name this rule: "rule 'x' (file:line)"."""
        return f"rule {self.name!r} ({self.source})"

    @property
    def umem_limit(self) -> int:
        """The UMEM bytes one grant may have under this rule: max_umem, or the default when unset."""
        return DEFAULT_MAX_UMEM if self.max_umem is None else self.max_umem


@record(frozen=True)
class Quota:
    """One [[quota]] table: limits on what the peers it names hold at once.

    A quota that names users applies to each matching user separately; one that names groups is a
    budget shared by all members of each matching group. Every quota that matches a peer applies.
    """

    name: str
    users: frozenset[str]
    groups: frozenset[str]
    max_queues: int | None = None  # queues held at once
    max_umem: int | None = None  # UMEM bytes pinned at once
    max_connections: int | None = None  # broker connections open at once
    max_requests_per_second: float | None = None
    source: str = "<policy>"

    def describe(self) -> str:
        return f"quota {self.name!r} ({self.source})"


@record(frozen=True)
class Admin:
    """The [admin] table: who may revoke leases and see every lease, and how a revoked holder is told."""

    users: frozenset[str] = frozenset({"0"})
    groups: frozenset[str] = frozenset()
    revoke_signal: str | None = None  # e.g. "SIGTERM", sent through the holder's pidfd; None: no signal
    source: str = "<default>"


@record(frozen=True)
class Policy:
    """Rules in file order (main file first, then policy.d/*.toml sorted) and the files they came from."""

    rules: tuple[Rule, ...] = ()
    sources: tuple[str, ...] = ()
    quotas: tuple[Quota, ...] = ()
    admin: Admin = Admin()

    @property
    def allow_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.action == "allow")

    @property
    def deny_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.action == "deny")

    @property
    def group_names(self) -> frozenset[str]:
        """Every group entry of the rules, quotas and [admin]: the names a peer's groups are judged by."""
        return frozenset().union(*(r.groups for r in self.rules), *(q.groups for q in self.quotas),
                                 self.admin.groups)
