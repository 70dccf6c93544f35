"""Release and keep, attacked through real sockets: an unprivileged holder that gets its own bare lease revoked
(by binding its socket off its queue) and then releases it, keeping the socket bound."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto
from xskbroker.wire.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name
from .qemu_like_consumer import bind, register_like_qemu

POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
queues = ["0-2"]
kinds = ["bare", "bound"]

[[allow]]
name = "others"
users = [{STRANGER_UID}]
interfaces = ["xsk0"]
queues = ["0-2"]
kinds = ["bound"]

[[quota]]
name = "one-queue"
users = [{CONSUMER_UID}]
max_queues = 1
"""
UMEM, RING = 1 << 20, 256


def misbind_release_and_grant(path: str) -> dict[str, Any]:
    """Unprivileged, under a quota of one queue: a bare grant of queue 0 bound to queue 1 instead; once the
    broker revokes it (bare-misbound), release it, keep the socket, and ask for queue 2."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the revoke's signal, if the policy sends one
    out: dict[str, Any] = {}
    reply, fds = request_fds("xsk0", [0], kind="bare", socket_path=path)
    _umem_fd, _area = register_like_qemu(fds[0], UMEM, RING)
    out["bind"] = bind(fds[0], reply["ifindex"], 1, XDP_USE_NEED_WAKEUP | XDP_COPY)
    with Connection(path) as conn:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            mine = [x for x in conn.call(proto.Status())[0]["leases"] if x["lease"] == reply["lease"]]
            if mine and mine[0]["revoked"]:
                break
            time.sleep(0.1)
        out["revoked"] = mine
        conn.call(proto.Release(reply["lease"]))
        time.sleep(0.2)  # any settling look is long done
        out["status_after_release"] = conn.call(proto.Status())[0]["leases"]
        try:  # queue 1 itself: still bound by the kept socket
            conn.call(proto.Grant("xsk0", (1,), geometry=proto.Geometry(umem_size=UMEM)))
            out["queue1"] = {"ok": True}
        except proto.BrokerError as e:
            out["queue1"] = {"ok": False, "code": e.code}
        try:
            more, more_fds = conn.call(proto.Grant("xsk0", (2,), geometry=proto.Geometry(umem_size=UMEM)))
            out["more"] = {"ok": True, "lease": more["lease"]}
            for fd in more_fds:
                os.close(fd)
        except proto.BrokerError as e:
            out["more"] = {"ok": False, "code": e.code}
    os.close(fds[0])
    return out


def test_a_holder_that_revokes_its_own_bare_lease_cannot_release_it_off_its_quota() -> None:
    """The docs (security.md, released with its sockets kept) let a revoked lease end at its release, as revoke
    is an admin's act; bare-misbound is a revoke the holder brings on itself. Under max_queues = 1 it holds
    queue 1 (its kept socket) and is granted queue 2 besides."""
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3) as ns, BrokerProcess(ns.name, POLICY) as b:
        got = spawn_unprivileged(misbind_release_and_grant, b.socket_path, uid=CONSUMER_UID).result(timeout=30)
        assert got["bind"] == "ok" and got["revoked"] and got["revoked"][0]["misbound"] == 1, got
        assert b.records("bare-misbound"), got
        # its kept socket holds queue 1 (squatted; with the lease kept on its quota, over the quota first)
        assert got["queue1"]["ok"] is False and got["queue1"]["code"] in ("queue-squatted", "quota-queues"), got
        # queue 1 bound by its kept socket, and a grant of queue 2 on top: 2 queues under a quota of 1
        assert not got["more"]["ok"], got
