"""Release and keep, attacked through real sockets: an unprivileged holder that gets its own bare lease revoked
(by binding its socket off its queue) and then releases it, keeping the socket bound."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import tempfile
import time
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto
from xskbroker.wire.xdp_abi import XDP_COPY, XDP_USE_NEED_WAKEUP

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name, wait_for
from .consumers import hold_grant
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


def misbound_bare(path: str) -> tuple[dict[str, Any], int, int, mmap.mmap, dict[str, Any]]:
    """Unprivileged: a bare grant of queue 0, registered as QEMU does and bound to queue 1 instead (the broker then
    revokes it, bare-misbound; its signal, if the policy sends one, is ignored). The reply, the socket, its UMEM's
    memfd and mapping, and what happened so far (out["bind"])."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reply, fds = request_fds("xsk0", [0], kind="bare", socket_path=path)
    umem_fd, area = register_like_qemu(fds[0], UMEM, RING)
    return reply, fds[0], umem_fd, area, {"bind": bind(fds[0], reply["ifindex"], 1, XDP_USE_NEED_WAKEUP | XDP_COPY)}


def misbind_release_and_grant(path: str) -> dict[str, Any]:
    """Unprivileged, under a quota of one queue: a bare grant of queue 0 bound to queue 1 instead; once the
    broker revokes it (bare-misbound), release it, keep the socket, and ask for queue 2."""
    reply, sock, _umem_fd, _area, out = misbound_bare(path)
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
    os.close(sock)
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


def misbind_wait_and_release(path: str, flag: str) -> dict[str, Any]:
    """Unprivileged: a bare grant of queue 0 bound to queue 1 (revoked: its slot emptied, the lease kept); once
    `flag` says another tenant holds queue 0, close the socket, release the lease, and ask for queue 0 bare."""
    reply, sock, umem_fd, area, out = misbound_bare(path)
    with Connection(path) as conn:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not out.get("revoked"):
            out["revoked"] = [x for x in conn.call(proto.Status())[0]["leases"] if x["revoked"]]
            time.sleep(0.05)
        open(flag + ".revoked", "w").close()
        deadline = time.monotonic() + 10
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        area.close()
        os.close(umem_fd)
        os.close(sock)
        time.sleep(0.5)  # queue 1 unbound (the kernel releases a closed socket's queue within ~20 ms)
        out["release"] = conn.call(proto.Release(reply["lease"]))[0]["ok"]
        try:
            _, again_fds = conn.call(proto.Grant("xsk0", (0,), kind="bare"))
            out["bare0"] = {"ok": True}
            for fd in again_fds:
                os.close(fd)
        except proto.BrokerError as e:
            out["bare0"] = {"ok": False, "code": e.code}
    return out


def test_a_misbound_holder_cannot_cut_the_next_tenant_of_its_queue_off_by_releasing() -> None:
    """The misbound lease stays (charged) with its slot, queue 0, emptied by its revoke; another tenant is granted
    queue 0. The holder unbinds and releases: the release emptied queue 0's slot, the other tenant's socket in it
    (its RX stopped), and the holder's bare grant of queue 0 then ended that tenant's lease."""
    where = tempfile.mkdtemp(prefix="xskt-flag-")  # the unprivileged holder reads and writes it
    os.chmod(where, 0o777)
    flag = os.path.join(where, "victim-holds")
    policy = POLICY + "\n[admin]\nusers = [0]\n"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, where, True)
        ns = cleanup.enter_context(VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3))
        b = cleanup.enter_context(BrokerProcess(ns.name, policy))
        attacker = spawn_unprivileged(misbind_wait_and_release, b.socket_path, flag, uid=CONSUMER_UID)
        wait_for(lambda: os.path.exists(flag + ".revoked"), timeout=15, what="the misbound lease revoked")
        victim = spawn_unprivileged(hold_grant, b.socket_path, "xsk0", [0], 30.0, uid=STRANGER_UID)
        try:
            wait_for(lambda: _victim(b), what="the other tenant's lease of queue 0")
            lease = _victim(b)["lease"]
            open(flag, "w").close()
            got = attacker.result(timeout=30)
            assert got["bind"] == "ok" and got["revoked"] and got["release"], got
            assert got["bare0"] == {"ok": False, "code": "queue-busy"}, got
            assert (_victim(b) or {}).get("lease") == lease, b.records("lease-ended")
        finally:
            victim.kill()


def _victim(b: BrokerProcess) -> dict[str, Any] | None:
    with Connection(b.socket_path) as c:
        leases = c.call(proto.Status())[0]["leases"]
    return next((x for x in leases if x["uid"] == STRANGER_UID), None)


def close_own_queue_then_squat_it(path: str) -> dict[str, Any]:
    """Unprivileged, under a quota of two queues: a bound lease of queue 1 whose sockets it closes (the lease stays
    while it lives), its bare socket of queue 0 bound to queue 1 instead (revoked as misbound), both released;
    then two more queues asked for."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out: dict[str, Any] = {}
    with Connection(path) as conn:
        own, own_fds = conn.call(proto.Grant("xsk0", (1,), geometry=proto.Geometry(umem_size=UMEM)))
        reply, fds = conn.call(proto.Grant("xsk0", (0,), kind="bare"))
        for fd in own_fds:
            os.close(fd)
        umem_fd, area = register_like_qemu(fds[0], UMEM, RING)
        deadline = time.monotonic() + 2
        while (out.get("bind") != "ok") and time.monotonic() < deadline:  # queue 1 free once its socket is released
            out["bind"] = bind(fds[0], reply["ifindex"], 1, XDP_USE_NEED_WAKEUP | XDP_COPY)
            time.sleep(0.01)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not out.get("revoked"):
            out["revoked"] = [x for x in conn.call(proto.Status())[0]["leases"] if x["revoked"]]
            time.sleep(0.05)
        out["released"] = [conn.call(proto.Release(x))[0]["ok"] for x in (reply["lease"], own["lease"])]
        time.sleep(0.2)
        try:
            _, more_fds = conn.call(proto.Grant("xsk0", (0, 2), geometry=proto.Geometry(umem_size=UMEM)))
            out["more"] = {"ok": True}
            for fd in more_fds:
                os.close(fd)
        except proto.BrokerError as e:
            out["more"] = {"ok": False, "code": e.code}
    area.close()
    os.close(umem_fd)
    os.close(fds[0])
    return out


def test_a_squatter_of_its_own_closed_queue_stays_on_its_quota() -> None:
    """A lease on the squatted queue proved the kernel freed the queue (and the misbound lease ended) though its
    own socket had closed: under max_queues = 2 the holder kept queue 1 bound and was granted 2 more."""
    policy = POLICY.replace("max_queues = 1", "max_queues = 2")
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3) as ns, BrokerProcess(ns.name, policy) as b:
        got = spawn_unprivileged(close_own_queue_then_squat_it, b.socket_path, uid=CONSUMER_UID).result(timeout=30)
        assert got["bind"] == "ok" and got["revoked"] and got["released"] == [True, True], got
        assert got["more"] == {"ok": False, "code": "quota-queues"}, got
