"""Quota decisions, pure: what peers hold now plus what they ask for, against the [[quota]] tables.

The broker supplies the holdings (from its leases and connections) and the clock; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

from xskbroker.common.records import field, record

from .decide import Decision, Peer, names_user
from .model import Policy, Quota
from .sizes import format_size

QUOTA_QUEUES = "quota-queues"
QUOTA_UMEM = "quota-umem"
QUOTA_CONNECTIONS = "quota-connections"
RATE_LIMITED = "rate-limited"


@record(frozen=True)
class Holding:
    """What one holder has now: its identity, the queues it holds and the UMEM pinned for it."""

    uid: int
    gids: frozenset[int] = frozenset()
    groups: frozenset[str] = frozenset()  # group names, as the caller resolved them
    queues: int = 0
    umem: int = 0
    connections: int = 0

    def in_group(self, group: str) -> bool:
        return group in self.groups or (group.isascii() and group.isdigit() and int(group) in self.gids)


Scope = tuple[str, str]  # ("user", "<uid>") or ("group", "<name or gid as the quota spells it>")


def scopes(quota: Quota, peer: Peer) -> list[Scope]:
    """The budgets of `quota` that `peer` draws on: its own as a user, and each matching group's."""
    out: list[Scope] = []
    if "*" in quota.users or names_user(quota.users, peer):
        out.append(("user", str(peer.uid)))
    me = Holding(peer.uid, peer.gids, peer.groups)
    for group in sorted(quota.groups):
        if group == "*":
            out += [("group", str(gid)) for gid in sorted(peer.gids) if ("group", str(gid)) not in out]
        elif me.in_group(group) and ("group", group) not in out:
            out.append(("group", group))
    return out


def group_entries(policy: Policy) -> frozenset[str] | None:
    """The group entries a quota of the policy may count holdings by (None: any gid, a quota names group "*")."""
    entries = frozenset(g for q in policy.quotas for g in q.groups)
    return None if "*" in entries else entries


def counts(scope: Scope, h: Holding) -> bool:
    """Whether holding h counts against the budget of scope."""
    kind, ident = scope
    return str(h.uid) == ident if kind == "user" else h.in_group(ident)


class Holdings:
    """Holdings by key (a lease, a grant being made), indexed by what a scope counts them by (uid; gid and group
    name), so that a scope's usage reads only the holdings it counts: the broker judges quotas on every grant
    and on each step of a grant that waits, and a walk of every lease there cost O(leases) each time.
    Iterating it gives the holdings; joined() is a read-only view of several as one (holding none itself)."""

    def __init__(self, items: Iterable[tuple[Hashable, Holding]] = (), parts: tuple[Holdings, ...] = ()) -> None:
        self._items: dict[Hashable, Holding] = {}
        self._index: dict[tuple[str, int | str], set[Hashable]] = {}
        self._parts = parts
        # the group entries indexed (watch): None, every gid and name; else only these (a peer chooses how many
        # groups it is in, up to 1,024 judged: indexing each cost every grant and every end that many entries)
        self._names: frozenset[str] | None = None
        self._gids: frozenset[int] = frozenset()
        for key, h in items:
            self[key] = h

    def joined(self, *others: Holdings) -> Holdings:
        return Holdings(parts=(self, *others))

    def watch(self, groups: Iterable[str] | None) -> None:
        """Index holdings by these group entries only, as quotas spell them (None: every gid and group name, as a
        quota's group "*" asks); a scope of any other group is counted by a walk (none is asked for)."""
        names = None if groups is None else frozenset(groups)
        for part in self._parts:
            part.watch(names)
        self._names = names
        self._gids = frozenset(int(g) for g in names or () if g.isascii() and g.isdigit())
        self._index = {}
        for key, h in self._items.items():
            for mark in self._marks(h):
                self._index.setdefault(mark, set()).add(key)

    def _marks(self, h: Holding) -> list[tuple[str, int | str]]:
        if self._names is None:
            return [("uid", str(h.uid)), *(("gid", g) for g in h.gids), *(("name", n) for n in h.groups)]
        return [("uid", str(h.uid)), *(("gid", g) for g in self._gids.intersection(h.gids)),
                *(("name", n) for n in self._names.intersection(h.groups))]

    def __setitem__(self, key: Hashable, h: Holding) -> None:
        if self._parts:
            raise TypeError("a joined view of holdings is read-only")
        self.pop(key)
        self._items[key] = h
        for mark in self._marks(h):
            self._index.setdefault(mark, set()).add(key)

    def pop(self, key: Hashable, default: Holding | None = None) -> Holding | None:
        h = self._items.pop(key, None)
        if h is None:
            return default
        for mark in self._marks(h):
            keys = self._index[mark]
            keys.discard(key)
            if not keys:
                del self._index[mark]
        return h

    def __len__(self) -> int:
        return len(self._items) + sum(len(p) for p in self._parts)

    def __iter__(self) -> Iterator[Holding]:
        return iter([*self._items.values(), *(h for p in self._parts for h in p)])

    def matching(self, scope: Scope) -> list[Holding]:
        """The holdings that count against scope's budget (as `counts` says), found through the index."""
        if self._parts:
            return [h for p in self._parts for h in p.matching(scope)]
        kind, ident = scope
        if kind != "user" and self._names is not None and ident not in self._names:  # not indexed: walked
            return [h for h in self._items.values() if counts(scope, h)]
        if kind == "user":  # str(h.uid) == ident
            keys = self._index.get(("uid", ident), ())
        else:  # h.in_group(ident): the group's name, or its gid spelled as a number
            by_name = self._index.get(("name", ident), ())
            by_gid = self._index.get(("gid", int(ident)), ()) if ident.isascii() and ident.isdigit() else ()
            keys = by_name | by_gid if by_name and by_gid else by_name or by_gid
        return [self._items[k] for k in keys]


def usage(scope: Scope, holdings: Iterable[Holding]) -> Holding:
    """What the holdings that count against scope's budget hold together (a Holdings is read by its index)."""
    mine = holdings.matching(scope) if isinstance(holdings, Holdings) else [h for h in holdings if counts(scope, h)]
    return Holding(-1, queues=sum(h.queues for h in mine), umem=sum(h.umem for h in mine),
                   connections=sum(h.connections for h in mine))


def check(policy: Policy, peer: Peer, holdings: Iterable[Holding], queues: int = 0, umem: int = 0,
          connections: int = 0) -> Decision | None:
    """None when every matching quota still fits after adding the request; else the first refusal."""
    held = holdings if isinstance(holdings, Holdings) else list(holdings)
    for quota in policy.quotas:
        for scope in scopes(quota, peer):
            used = usage(scope, held)
            who = f"{scope[0]} {scope[1]}"
            if quota.max_queues is not None and queues and used.queues + queues > quota.max_queues:
                return Decision(False, QUOTA_QUEUES, None,
                                f"{quota.describe()} allows {who} {quota.max_queues} queues at once; it holds "
                                f"{used.queues} and asks for {queues} more")
            if quota.max_umem is not None and umem and used.umem + umem > quota.max_umem:
                return Decision(False, QUOTA_UMEM, None,
                                f"{quota.describe()} allows {who} {format_size(quota.max_umem)} of UMEM at once; "
                                f"it holds {format_size(used.umem)} and asks for {format_size(umem)} more")
            if (quota.max_connections is not None and connections
                    and used.connections + connections > quota.max_connections):
                return Decision(False, QUOTA_CONNECTIONS, None,
                                f"{quota.describe()} allows {who} {quota.max_connections} connections at once")
    return None


@record
class RateLimiter:
    """Token buckets per (scope, quota): `rate` requests per second with a burst of one second's worth."""

    buckets: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)

    def allow(self, policy: Policy, peer: Peer, now: float) -> Decision | None:
        for quota in policy.quotas:
            rate = quota.max_requests_per_second
            if rate is None:
                continue
            for scope in scopes(quota, peer):
                key = (quota.name, *scope)
                # the bucket holds at least one request: one second's worth of 0.5/s never made a whole token,
                # so every message was refused for good
                burst = max(rate, 1.0)
                tokens, last = self.buckets.get(key, (burst, now))
                tokens = min(burst, tokens + (now - last) * rate)
                if tokens < 1.0:
                    self.buckets[key] = (tokens, now)
                    return Decision(False, RATE_LIMITED, None,
                                    f"{quota.describe()} allows {rate:g} requests per second; slow down")
                self.buckets[key] = (tokens - 1.0, now)
        return None

    def forget_idle(self, now: float, older_than: float = 60.0) -> None:
        """Drop buckets untouched for a while: they are full again anyway, and the table stays bounded."""
        self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < older_than}


TOO_MANY_CONNECTIONS = "too-many-connections"
ADMIN_RESERVE_FRACTION = 16  # 1/16 of the connection table is kept for admins


@record(frozen=True)
class Admission:
    """Whether a new connection is taken, and whose connection makes room for it (a uid, or None)."""

    admit: bool
    evict_uid: int | None = None
    reason: str = ""


def admit_connection(counts: dict[int, int], uid: int, capacity: int, *, admin: bool = False,
                     admins: frozenset[int] = frozenset()) -> Admission:
    """Max-min fair shares of the connection table: nobody can lock anybody out.

    Non-admins share `capacity` minus a reserve kept for admins. When their share is full, a newcomer whose uid
    holds fewer connections than the biggest holder takes one of that holder's (the server closes it), so every
    uid can always reach at least an equal share however many connections others opened. Admins may use the
    whole table and make room the same way, taking from non-admins only.
    """
    reserve = max(1, capacity // ADMIN_RESERVE_FRACTION)
    limit = capacity if admin else capacity - reserve
    counted = {u: n for u, n in counts.items() if n}
    total = sum(counted.values())
    non_admin_total = sum(n for u, n in counted.items() if u not in admins)
    if total < capacity and (admin or non_admin_total < limit):
        return Admission(True)
    mine = counted.get(uid, 0)
    candidates = {u: n for u, n in counted.items() if u not in admins}  # an admin's connection is never taken
    if candidates:
        hog, most = max(candidates.items(), key=lambda kv: (kv[1], kv[0]))
        if most > mine + 1:
            return Admission(True, hog)
    return Admission(False, None, f"the broker's connection table is full and uid {uid} already holds {mine} "
                     f"connection(s), as many as any other user")
