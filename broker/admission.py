"""Whether a new connection may stay: the peer's quota of connections, then room in the connection table
(evicting another user's oldest connection where fairness says so). Judged from the peers already connected."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from xskbroker.broker import peer as peers
from xskbroker.broker.core import policy_peer
from xskbroker.broker.listener import connection_capacity
from xskbroker.policy import Holding, Policy
from xskbroker.policy import quota as quotas
from xskbroker.policy.admin import is_admin
from xskbroker.wire.errors import ErrorCode


class Admission(NamedTuple):
    code: ErrorCode | None  # None: admitted
    reason: str
    evict_uid: int | None  # admitted by closing this uid's oldest idle connection


def admit(policy: Policy, who: peers.PeerInfo, connected: Iterable[peers.PeerInfo], max_connections: int) -> Admission:
    connected = list(connected)
    peer = policy_peer(who)
    held = [Holding(p.uid, p.gids, p.groups, connections=1) for p in connected]
    refused = quotas.check(policy, peer, held, connections=1)
    if refused:
        return Admission(ErrorCode(refused.code), refused.reason, None)
    counts: dict[int, int] = {}
    admin_uid: dict[int, bool] = {}  # judged once per uid, not once per connection
    for p in connected:
        counts[p.uid] = counts.get(p.uid, 0) + 1
        if p.uid not in admin_uid:
            admin_uid[p.uid] = is_admin(policy.admin, policy_peer(p))
    admins = {uid for uid, yes in admin_uid.items() if yes}
    # the fd limit may have been lowered under us (prlimit): read it now, a syscall is cheap
    capacity = connection_capacity(max_connections)
    admission = quotas.admit_connection(counts, who.uid, capacity, admin=is_admin(policy.admin, peer),
                                        admins=frozenset(admins))
    if not admission.admit:
        return Admission(ErrorCode.TOO_MANY_CONNECTIONS, admission.reason, None)
    return Admission(None, "", admission.evict_uid)
