"""A DPDK endpoint's /connect reuses the live lease its process took before: only of that very process.

Start times tick at 10 ms, so a process that exited and one that took its pid within the tick look alike by
(pid, start); the pidfs inode tells them apart, as it does for every other holder check.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from xskbroker.broker.dpendpoint import Endpoint, EndpointSpec
from xskbroker.broker.leases import LeaseTable
from xskbroker.broker.peer import PeerInfo


def endpoint_with(table: LeaseTable) -> Endpoint:
    ep = Endpoint(EndpointSpec("veth0", 1000, 1000))
    ep.server = cast(Any, SimpleNamespace(service=SimpleNamespace(leases=table)))
    return ep


def peer(start: int | None, ino: int | None) -> PeerInfo:
    return PeerInfo(pid=4242, uid=1000, gid=1000, gids=frozenset({1000}), user="dpdk", start=start, ino=ino)


def test_a_lease_is_reused_by_its_own_process_only() -> None:
    table = LeaseTable(None)
    lease = table.add(1000, 4242, 7, "veth0", (0,), "map", 0, pid_start=77, pid_ino=5001)
    ep = endpoint_with(table)
    ep.held[4242] = lease.id
    assert ep._live(4242, peer(77, 5001)) == lease.id
    assert ep._live(4242, peer(77, 5002)) is None  # same pid and tick, another process
    assert 4242 not in ep.held  # and forgotten
    ep.held[4242] = lease.id
    assert ep._live(4242, peer(78, 5001)) is None
    ep.held[4242] = lease.id
    assert ep._live(4242, peer(77, None)) == lease.id  # a kernel without pidfs: the start time is all there is
