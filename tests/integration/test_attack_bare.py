"""A bare holder binds its socket to a queue it was not granted (finding 10: bare sockets and their queue).

The kernel confines a bare socket to the device (SO_BINDTODEVICE), not to the queue: the holder of a bare
grant for queue 0 can bind queue 1, transmit there and keep the next tenant of queue 1 out. The broker
cannot refuse that bind; these tests show it names the squatter to that tenant at once and revokes the lease.
"""

from __future__ import annotations

import os
import time
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request, request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto
from xskbroker.wire.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name, wait_for
from .probe import RootProbe
from .qemu_like_consumer import bind, register_like_qemu

# queue 2 is the root probes' own, so they measure the broker and not the squatted queues
POLICY = f"""\
version = 1

[[allow]]
name = "vm-launchers"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
queues = ["0"]
kinds = ["bare"]

[[allow]]
name = "tenants"
users = [{STRANGER_UID}]
interfaces = ["xsk0"]
queues = ["0-1"]
kinds = ["bound"]

[[allow]]
name = "root-probe"
users = [0]
interfaces = ["xsk0"]
queues = ["2"]
kinds = ["bound"]
"""
UMEM, RING = 1 << 20, 256


def squatter(path: str, granted: int, squat: int, ready_w: int, stop_r: int) -> dict[str, Any]:
    """Unprivileged: take a bare grant of `granted`, register a UMEM as QEMU does, bind to `squat` instead,
    and hold the socket until told to stop."""
    reply, fds = request_fds("xsk0", [granted], kind="bare", socket_path=path)
    fd = fds[0]
    _umem_fd, _area = register_like_qemu(fd, UMEM, RING)  # kept until return: the socket holds the registration
    bound = bind(fd, reply["ifindex"], squat, XDP_USE_NEED_WAKEUP | XDP_COPY)
    os.write(ready_w, b"r")
    os.read(stop_r, 1)
    return {"lease": reply["lease"], "bind": bound}


def tenant_grant(path: str, queue: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with request("xsk0", [queue], geometry=proto.Geometry(umem_size=UMEM), socket_path=path) as g:
            out: dict[str, Any] = {"ok": True, "lease": g.lease}
    except proto.BrokerError as e:
        out = {"ok": False, "code": e.code, "message": e.message}
    out["seconds"] = time.perf_counter() - started
    return out


class _Squat:
    def __init__(self, b: BrokerProcess) -> None:
        self.ready_r, self.ready_w = os.pipe()
        self.stop_r, self.stop_w = os.pipe()
        self.child = spawn_unprivileged(squatter, b.socket_path, 0, 1, self.ready_w, self.stop_r, uid=CONSUMER_UID)
        assert os.read(self.ready_r, 1) == b"r"

    def stop(self) -> dict[str, Any]:
        os.write(self.stop_w, b"s")
        try:
            return dict(self.child.result(timeout=10))
        finally:
            for fd in (self.ready_r, self.ready_w, self.stop_r, self.stop_w):
                os.close(fd)


def _status(b: BrokerProcess) -> dict[str, Any]:
    with Connection(b.socket_path) as c:
        return c.call(proto.Status())[0]


def test_tenant_of_a_squatted_queue_is_told_who_squats_it(figures) -> None:  # type: ignore[no-untyped-def]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3) as ns, BrokerProcess(ns.name, POLICY) as b:
        squat = _Squat(b)
        try:
            lease = next(x["lease"] for x in _status(b)["leases"] if x["kind"] == "bare")
            got = spawn_unprivileged(tenant_grant, b.socket_path, 1, uid=STRANGER_UID).result(timeout=10)
            probes = RootProbe(b.socket_path, "xsk0", 2).run(5).figures()
        finally:
            held = squat.stop()
        assert held["bind"] == "ok", held  # the kernel let the holder of queue 0 bind queue 1
        figures(tenant_code=got.get("code"), tenant_ms=round(got["seconds"] * 1000, 2), **probes)
        assert got["ok"] is False and got["code"] == "queue-squatted", got
        assert f"queue 1 of xsk0 is bound by the bare socket of lease {lease} (uid {CONSUMER_UID}" in got["message"]
        assert "granted queue 0" in got["message"], got
        assert got["seconds"] < 0.5, got  # no bind-retry wait for a socket that will not let go


def test_broker_revokes_a_bare_lease_bound_off_its_queue(figures) -> None:  # type: ignore[no-untyped-def]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3) as ns, BrokerProcess(ns.name, POLICY) as b:
        squat = _Squat(b)
        try:
            started = time.monotonic()
            # no other grant comes in: the broker's own poll must find it
            record = wait_for(lambda: next(iter(b.records("bare-misbound")), None),
                              timeout=6, what="a bare-misbound audit record")
            found_s = time.monotonic() - started
            probes = RootProbe(b.socket_path, "xsk0", 2).run(5).figures()
            lease = next(x for x in _status(b)["leases"] if x["lease"] == record["lease"])
            revoke = next(r for r in b.records("revoke") if r.get("lease") == lease["lease"])
        finally:
            held = squat.stop()
        assert held["bind"] == "ok" and held["lease"] == record["lease"], held
        assert record["uid"] == CONSUMER_UID and record["granted_queues"] == [0] and record["bound_queue"] == 1
        assert lease["revoked"] is True and lease["misbound"] == 1, lease
        assert revoke["emptied_queues"] == [0], revoke
        figures(found_after_s=round(found_s, 2), **probes)
        # the holder exits: its lease ends, and queue 1 is free again
        wait_for(lambda: not _status(b)["leases"], timeout=5, what="the revoked lease to end")
        got = spawn_unprivileged(tenant_grant, b.socket_path, 1, uid=STRANGER_UID).result(timeout=10)
        assert got["ok"] is True, got
