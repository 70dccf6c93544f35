"""The decision: (policy, peer, request) -> Decision. Pure: no files, no pwd/grp, no clock.

Deny rules are checked first and any match wins. Otherwise the first allow rule that accepts the
whole request grants it; if none does, the answer explains the allow rule that came closest.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from xskbroker.common.records import field, record

from .model import KINDS, Policy, Rule
from .sizes import format_size

OK = "ok"
DENIED_BY_RULE = "denied-by-rule"
USER_NOT_ALLOWED = "user-not-allowed"
INTERFACE_NOT_ALLOWED = "interface-not-allowed"
KIND_NOT_ALLOWED = "kind-not-allowed"
QUEUE_NOT_ALLOWED = "queue-not-allowed"
TOO_MANY_QUEUES = "too-many-queues"
UMEM_TOO_LARGE = "umem-too-large"
CODES = (
    OK,
    DENIED_BY_RULE,
    USER_NOT_ALLOWED,
    INTERFACE_NOT_ALLOWED,
    KIND_NOT_ALLOWED,
    QUEUE_NOT_ALLOWED,
    TOO_MANY_QUEUES,
    UMEM_TOO_LARGE,
)


@record(frozen=True)
class Peer:
    """Who is asking, as the kernel reported it; names are resolved by the caller (or absent)."""

    uid: int
    gids: frozenset[int]  # primary and supplementary
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)
    cgroup: str | None = None  # its cgroup v2 path ("/system.slice/vm-a.service"); None: unknown
    label: str | None = None  # its LSM label (SO_PEERSEC); None: no LSM labels it

    def __str__(self) -> str:
        who = f"uid {self.uid} ({self.user})" if self.user else f"uid {self.uid}"
        return f"{who} in cgroup {self.cgroup}" if self.cgroup is not None else who


@record(frozen=True)
class Request:
    """What is asked for; the caller has already rejected malformed requests (e.g. no queues)."""

    interface: str
    queues: tuple[int, ...]
    kind: str = "bound"
    umem_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "queues": list(self.queues),
            "kind": self.kind,
            "umem_bytes": self.umem_bytes,
        }


@record(frozen=True)
class Decision:
    allowed: bool
    code: str
    rule: Rule | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "code": self.code,
            "rule": self.rule.name if self.rule else None,
            "source": self.rule.source if self.rule else None,
            "reason": self.reason,
        }


def principal_matches(rule: Rule, peer: Peer) -> bool:
    """The rule names the peer: by user or group, and (when the rule lists them) by cgroup and by label."""
    return user_matches(rule, peer) and cgroup_matches(rule, peer) and label_matches(rule, peer)


def cgroup_matches(rule: Rule, peer: Peer) -> bool:
    # fnmatch's "*" also crosses "/": "/machine.slice/*" covers the scopes' sub-cgroups too
    if not rule.cgroups:
        return True
    return peer.cgroup is not None and any(fnmatchcase(peer.cgroup, glob) for glob in rule.cgroups)


def label_matches(rule: Rule, peer: Peer) -> bool:
    if not rule.labels:
        return True
    return peer.label is not None and any(fnmatchcase(peer.label, glob) for glob in rule.labels)


def user_matches(rule: Rule, peer: Peer) -> bool:
    """Users and groups are alternatives: matching either list is enough."""
    if "*" in rule.users or "*" in rule.groups:
        return True
    return names_user(rule.users, peer) or in_groups(rule.groups, peer)


def names_user(entries: frozenset[str], peer: Peer) -> bool:
    """Whether the entries name the peer's uid (written as a number) or its user name. An entry that is a number
    is a uid only: `users = [1000]` must not also name a login called "1000" (another uid)."""
    return str(peer.uid) in entries or (peer.user is not None and peer.user in entries and _gid(peer.user) is None)


def in_groups(entries: frozenset[str], peer: Peer) -> bool:
    """Whether the peer is in a group the entries name: by name, or by gid written as a number ("106").
    Costs the entries, not the peer's groups: a peer chooses how many of those it has. An entry that is a number is
    a gid only (the broker resolves every entry as a name too, so a group named "1000" would reach peer.groups)."""
    return (any(g in entries and _gid(g) is None for g in peer.groups)
            or any(_gid(e) in peer.gids for e in entries))


def _gid(entry: str) -> int | None:
    """The gid a group entry writes as a plain decimal number (as str(gid) spells it), else None."""
    return int(entry) if entry.isascii() and entry.isdigit() and str(int(entry)) == entry else None


def interface_matches(rule: Rule, interface: str) -> bool:
    # Case-sensitive on every platform: interface names are.
    return any(fnmatchcase(interface, glob) for glob in rule.interfaces)


def _queue_list(queues: tuple[int, ...]) -> str:
    return ",".join(map(str, queues))


def _summary(request: Request) -> str:
    return f"{request.kind} on {request.interface} queues {_queue_list(request.queues)}"


def _hidden_from(rule: Rule, peer: Peer) -> bool:
    """The deny names cgroups and the peer's is unknown. A deny naming cgroups applies to an unknown cgroup too: one
    that stopped there would let through a process inside the denied cgroups that made its cgroup unknown (shown
    with a connection left by a connector that exited at once, which the broker now refuses outright)."""
    return bool(rule.cgroups) and peer.cgroup is None


def _deny_applies(rule: Rule, peer: Peer, request: Request) -> bool:
    return (
        user_matches(rule, peer)
        and (cgroup_matches(rule, peer) or _hidden_from(rule, peer))
        and label_matches(rule, peer)
        and interface_matches(rule, request.interface)
        and (rule.queues.is_any or any(rule.queues.contains(q) for q in request.queues))
        and request.kind in rule.kinds
    )


def _check_allow(rule: Rule, peer: Peer, request: Request) -> tuple[int, str, str]:
    """How far `rule` gets through the ordered checks: (checks passed, failure code, reason).

    A rule that passes all seven returns (7, OK, ...). A rule that names the user but not its cgroup or
    label counts as closer than one that names neither, so the explanation says which narrowing failed.
    """
    if not user_matches(rule, peer):
        return 0, USER_NOT_ALLOWED, f"{rule.describe()} does not name {peer} or its groups"
    if not cgroup_matches(rule, peer):
        where = "an unknown cgroup" if peer.cgroup is None else f"cgroup {peer.cgroup}"
        reason = f"{rule.describe()} allows cgroups {', '.join(rule.cgroups)}, not {where}"
        return 1, USER_NOT_ALLOWED, reason
    if not label_matches(rule, peer):
        what = "no LSM label" if peer.label is None else f"label {peer.label}"
        return 1, USER_NOT_ALLOWED, f"{rule.describe()} allows labels {', '.join(rule.labels)}, not {what}"
    if not interface_matches(rule, request.interface):
        globs = ", ".join(rule.interfaces)
        reason = f"{rule.describe()} allows interfaces {globs}, not {request.interface}"
        return 2, INTERFACE_NOT_ALLOWED, reason
    if request.kind not in rule.kinds:
        kinds = ", ".join(k for k in KINDS if k in rule.kinds)
        return 3, KIND_NOT_ALLOWED, f"{rule.describe()} allows kinds {kinds}, not {request.kind}"
    missing = rule.queues.missing(request.queues)
    if missing:
        reason = f"{rule.describe()} allows queues {rule.queues}, not {_queue_list(missing)}"
        return 4, QUEUE_NOT_ALLOWED, reason
    if rule.max_queues is not None and len(request.queues) > rule.max_queues:
        return (
            5,
            TOO_MANY_QUEUES,
            f"{rule.describe()} allows at most {rule.max_queues} queues per grant, not {len(request.queues)}",
        )
    if request.umem_bytes > rule.umem_limit:
        default = " (the default: it sets no max_umem)" if rule.max_umem is None else ""
        return (
            6,
            UMEM_TOO_LARGE,
            f"{rule.describe()} allows at most {format_size(rule.umem_limit)} of UMEM per grant{default}, "
            f"not {format_size(request.umem_bytes)}",
        )
    return 7, OK, f"{rule.describe()} allows {_summary(request)} for {peer}"


def decide(policy: Policy, peer: Peer, request: Request) -> Decision:
    for rule in policy.deny_rules:
        if _deny_applies(rule, peer, request):
            reason = f"{rule.describe()} denies {_summary(request)} to {peer}"
            if _hidden_from(rule, peer):
                reason += (f" (its cgroup is unknown, and a deny naming cgroups applies to an unknown cgroup: it "
                           f"might be in {', '.join(rule.cgroups)})")
            return Decision(False, DENIED_BY_RULE, rule, reason)

    best: tuple[int, str, str, Rule] | None = None
    for rule in policy.allow_rules:
        passed, code, reason = _check_allow(rule, peer, request)
        if code == OK:
            return Decision(True, OK, rule, reason)
        if best is None or passed > best[0]:  # strictly greater: ties go to the earlier rule
            best = (passed, code, reason, rule)

    if best is None:
        reason = "the policy has no allow rules, so everything is denied"
        return Decision(False, USER_NOT_ALLOWED, None, reason)
    passed, code, reason, rule = best
    if passed == 0:
        return Decision(False, USER_NOT_ALLOWED, None, f"no allow rule names {peer} or any of its groups")
    return Decision(False, code, rule, reason)
