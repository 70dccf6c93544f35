"""The broker's own memory per idle connection and per lease stays small: measured as bench/memory.py does
(the RSS slope from N/4 to N items), bounded here. With the connection cap (1024) and the bounds below, a
broker's own memory stays under ~20 MiB idle + 4 MiB of connections + 8 KiB a lease (README, Performance).
UMEM is not in it: the broker does not keep a granted UMEM mapped (RssShmem stays 0)."""

from __future__ import annotations

import os
import time

from bench import memory
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

# Measured: ~1.3 KiB a connection, ~1.1 KiB a lease. A buffer kept per connection (64 KiB) or a UMEM left
# mapped (64 KiB at the smallest) would be far above these.
PER_CONNECTION = 4096
PER_LEASE = 8192


def test_an_idle_connection_costs_the_broker_little() -> None:
    r = memory.connections(400)
    assert r["per_connection"]["VmRSS"] <= PER_CONNECTION, r


def test_a_lease_costs_the_broker_little_and_its_umem_is_not_mapped() -> None:
    r = memory.leases(64)
    assert r["per_lease"]["VmRSS"] <= PER_LEASE, r
    assert r["rss"]["RssShmem"] == 0, r


def test_status_shows_the_umem_pools_memory_and_the_brokers_own() -> None:
    name = f"xskt{os.getpid()}-pool"
    with VethNamespace(name, inside="xsk0", peer="xsk0p"), \
            BrokerProcess(name, memory.ROOT_POLICY + "\n[admin]\nusers = [0]\n", umem_pool="16MiB") as broker:
        _, fds = request_fds("xsk0", [0], kind="bound", geometry=proto.Geometry(umem_size=1 << 20),
                             socket_path=broker.socket_path)
        for fd in fds:
            os.close(fd)
        deadline = time.monotonic() + 10
        while True:  # the pool refills the size just taken, on its own thread
            reply, _ = Connection(broker.socket_path).call_typed(proto.Status())
            m = reply.metrics
            assert m is not None and m.rss_bytes is not None and m.rss_bytes > 1 << 20
            if m.pool.get("pinned_bytes"):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        pooled = m.pool["pinned_bytes"]
        assert pooled >= 1 << 20 and pooled <= m.pool["budget_bytes"] <= 16 << 20
