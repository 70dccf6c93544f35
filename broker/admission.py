"""Whether a new connection may stay: the peer's quota of connections, then room in the connection table
(evicting another user's oldest connection where fairness says so). Judged from the peers already connected."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import NamedTuple

from xskbroker.broker import peer as peers
from xskbroker.broker.core import policy_peer, quota_peer
from xskbroker.broker.listener import connection_capacity
from xskbroker.common.records import replace
from xskbroker.policy import Holding, Peer, Policy
from xskbroker.policy import quota as quotas
from xskbroker.policy.admin import is_admin
from xskbroker.wire.errors import ErrorCode


class Admission(NamedTuple):
    code: ErrorCode | None  # None: admitted
    reason: str
    evict_uid: int | None  # admitted by closing this uid's oldest idle connection


# what admission knows of a connected peer: quotas and shares count by principal (its uid, or the owner of that
# subordinate uid: broker.subids) and groups, admins are named by uid, groups and name
Principal = tuple[int, int, frozenset[int], frozenset[str], str | None]


def _principal(who: peers.PeerInfo) -> Principal:
    return who.principal, who.uid, who.gids, who.groups, who.user


class Connected:
    """The peers connected now, tallied by principal: kept as connections come and go (add, remove), so that
    judging a newcomer costs the number of distinct principals, not of connections (it walked all 1,000 of a
    full table, 0.77 ms a connect, on the loop)."""

    def __init__(self, connected: Iterable[peers.PeerInfo] = ()) -> None:
        self._count: dict[Principal, int] = {}
        for p in connected:
            self.add(p)

    def add(self, who: peers.PeerInfo) -> None:
        key = _principal(who)
        self._count[key] = self._count.get(key, 0) + 1

    def remove(self, who: peers.PeerInfo) -> None:
        key = _principal(who)
        n = self._count.get(key, 0) - 1
        if n > 0:
            self._count[key] = n
        else:
            self._count.pop(key, None)

    def items(self) -> Iterable[tuple[Principal, int]]:
        return self._count.items()

    def regroup(self, conns: dict[int, tuple[socket.socket, peers.PeerInfo]],
                groups_of: Callable[[frozenset[int]], frozenset[str]]) -> None:
        """Name the connections' peers' groups as groups_of does now (a reload names other groups), in conns
        and in the tally."""
        for fd, (conn, who) in list(conns.items()):
            names = groups_of(who.gids)
            if names != who.groups:
                now = replace(who, groups=names)
                self.remove(who)
                self.add(now)
                conns[fd] = (conn, now)


def admit(policy: Policy, who: peers.PeerInfo, connected: Connected | Iterable[peers.PeerInfo],
          max_connections: int) -> Admission:
    tally = connected if isinstance(connected, Connected) else Connected(connected)
    peer = policy_peer(who)
    held = [Holding(principal, gids, groups, connections=n) for (principal, _, gids, groups, _), n in tally.items()]
    refused = quotas.check(policy, quota_peer(who), held, connections=1)
    if refused:
        return Admission(ErrorCode(refused.code), refused.reason, None)
    # shares are per principal: one user's subordinate uids share its one (they filled the table, one each)
    counts: dict[int, int] = {}
    admin_uid: dict[int, bool] = {}  # judged once per principal (its longest-connected peer), not per connection
    for (principal, uid, gids, groups, user), n in tally.items():
        counts[principal] = counts.get(principal, 0) + n
        if principal not in admin_uid:
            admin_uid[principal] = is_admin(policy.admin, Peer(uid, gids, user, groups))
    admins = {uid for uid, yes in admin_uid.items() if yes}
    # the fd limit may have been lowered under us (prlimit): read it now, a syscall is cheap
    capacity = connection_capacity(max_connections)
    admission = quotas.admit_connection(counts, who.principal, capacity, admin=is_admin(policy.admin, peer),
                                        admins=frozenset(admins))
    if not admission.admit:
        return Admission(ErrorCode.TOO_MANY_CONNECTIONS, admission.reason, None)
    return Admission(None, "", admission.evict_uid)
