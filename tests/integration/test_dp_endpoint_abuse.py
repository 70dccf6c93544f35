"""The device-plugin endpoint's tenant as an attacker, on the real kernel: records it can have written at will
(allowed ones: its own live lease's map handed out again and again), and a broker out of fds.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged

from .conftest import CONSUMER_UID, ns_name, wait_for
from .loop_rig import _cpu_ticks
from .probe import RootProbe
from .test_dp_endpoint import POLICY, _broker, _endpoint, _events


def _map_fd_flood(path: str, asks: int, reconnects: int) -> dict[str, Any]:
    """Take the lease once, then ask for its map `asks` times on one connection and make `reconnects` more
    handshakes of the same live holder (each a reused /connect and one more map): all of them allowed."""
    t0 = time.monotonic()
    fds = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        s.send(b"/connect,h")
        assert s.recv(128) == b"/host_ok"
        for _ in range(asks):
            s.send(b"/xsk_map_fd,xsk0")
            msg, got, _, _ = socket.recv_fds(s, 128, 1)
            fds += msg == b"/fd_ack" and len(got) == 1
            for fd in got:
                os.close(fd)
        for _ in range(reconnects):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as again:
                again.settimeout(5)
                again.connect(path)
                again.send(b"/connect,h")
                assert again.recv(128) == b"/host_ok"
                again.send(b"/xsk_map_fd,xsk0")
                msg, got, _, _ = socket.recv_fds(again, 128, 1)
                fds += msg == b"/fd_ack" and len(got) == 1
                for fd in got:
                    os.close(fd)
    return {"fds": fds, "seconds": time.monotonic() - t0}


def test_a_tenant_cannot_flood_the_audit_with_its_own_lease_handed_out_again(veth: VethNamespace, base: str,
                                                                             figures: Any) -> None:
    """Each /xsk_map_fd, and each later handshake of a holder with a live lease, was an allowed record written in
    full: one connection wrote thousands a second (journald's default limit, 10,000 per 30 s, then drops every
    record of the broker's, others' grants and revokes included). They grant nothing new: past a small burst they
    are counted in the throttle's summary, while the grant itself and the first map handed out stay in full."""
    from xskbroker.broker.audit import BURST

    path = f"{base}/dp.sock"
    asks, reconnects = 2000, 100
    with BrokerProcess(veth.name, POLICY, _endpoint(path)) as b:
        got = spawn_unprivileged(_map_fd_flood, path, asks, reconnects, uid=CONSUMER_UID).result(60)
        assert got["fds"] == asks + reconnects, got  # every ask still answered with the map
        grants = [r for r in _events(b, "grant") if r.get("decision") == "allow"]
        assert len(grants) == 1  # one lease for all of it
        first = _events(b, "dp-map-fd")[0]
        assert first["decision"] == "allow" and not first.get("reused")  # the map handed out with the grant
        connects, maps = len(_events(b, "dp-connect")), len(_events(b, "dp-map-fd"))
        figures(dp_connect_records=connects, dp_map_fd_records=maps, flood_s=round(got["seconds"], 2))
        assert connects <= 1 + BURST and maps <= 1 + 2 * BURST, \
            f"{connects} dp-connect and {maps} dp-map-fd records in {got['seconds']:.2f} s"
        b.signal(signal.SIGTERM)  # the summary at stop counts what was left out
        assert b.proc is not None and b.proc.wait(10) == 0
        summary = b.records("suppressed")
        counted = sum(r["counts"].get("dp-map-fd", 0) for r in summary)
        assert counted + maps == asks + reconnects, summary


def test_out_of_fds_a_pending_dp_connection_does_not_make_the_loop_spin(veth: VethNamespace, base: str,
                                                                          figures: Any) -> None:
    """accept(2) on the endpoint's listener failing EMFILE left the connection queued and the listener readable:
    the loop woke at once, every round, for as long as the connection waited (the broker's own listener takes such
    a connection with a spare fd and closes it). The connector must see its connection end, the broker must idle,
    and serve the endpoint again once fds are free."""
    path = f"{base}/dp.sock"
    with _broker(veth, *_endpoint(path, uid=0)) as b:
        settled = b.settled_fds(quiet=0.5)
        os.system(f"prlimit --pid {b.pid} --nofile={settled}:{20000}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(3)
            s.connect(path)  # queued in the listener's backlog: the broker has no fd to take it with
            utime0 = _cpu_ticks(b.pid)
            time.sleep(2.0)
            cpu = (_cpu_ticks(b.pid) - utime0) / os.sysconf("SC_CLK_TCK") / 2.0
            try:
                s.send(b"/connect,h")
                ended = s.recv(128) == b""
            except OSError:
                ended = True
        finally:
            s.close()
        figures(broker_cpu_share=round(cpu, 2), dp_accept_failed=len(b.records("dp-accept-failed")))
        assert cpu < 0.5, f"the broker used {cpu:.0%} of a CPU while the endpoint's accept failed"
        assert ended, "the pending connection was neither served nor ended"
        os.system(f"prlimit --pid {b.pid} --nofile=4096:20000")
        wait_for(lambda: _handshake_ok(path), what="the endpoint to serve again")


def _handshake_ok(path: str) -> bool:
    from xskbroker.testbed.dpdk_like import handshake

    got = handshake(path, "xsk0", timeout=2.0)
    if got["fd"] is not None:
        os.close(got["fd"])
    return got.get("map") == b"/fd_ack"


def _hellos(path: str, stop: threading.Event, out: list[float]) -> None:
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto

    while not stop.is_set():
        started = time.perf_counter()
        with Connection(path, 10.0) as c:
            assert c.call(proto.Hello())[0]["ok"]
        out.append(time.perf_counter() - started)
        time.sleep(0.005)


def test_a_map_grant_of_many_queues_does_not_hold_the_loop_for_a_grace_period_per_queue(base: str,
                                                                                       figures: Any) -> None:
    """Each update of the outer map (ARRAY_OF_MAPS) waits for an RCU grace period in the kernel (~9 ms here), and
    a map grant placed its tenant map queue by queue, on the loop: the endpoint's default is every queue of the
    device, so on a 128-queue device each handshake of the tenant held every other client for over a second (the
    program's attach as long again, and the lease's end when the tenant exits). One batch update per grant, end or
    attach waits for one grace period."""
    queues = 128
    path = f"{base}/dp.sock"
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=queues) as veth, \
            _broker(veth, *_endpoint(path, queues=f"0-{queues - 2}")) as b:
        from xskbroker.testbed.dpdk_like import handshake

        stop, hellos = threading.Event(), []  # type: ignore[var-annotated]
        prober = threading.Thread(target=_hellos, args=(b.socket_path, stop, hellos))
        prober.start()
        try:
            for _ in range(3):  # each: attach (the first), grant, and the lease's end at the tenant's exit
                got = spawn_unprivileged(handshake, path, "xsk0", uid=CONSUMER_UID).result(60)
                assert got["map"] == b"/fd_ack", got
                wait_for(lambda: not b.leases(), timeout=30, what="the lease to end with its holder")
            probe = RootProbe(b.socket_path, queue=queues - 1).run(3).figures()
        finally:
            stop.set()
            prober.join()
        grants = [r["ms"] for r in _events(b, "grant") if r.get("decision") == "allow"]
        worst = max(hellos)
        figures(hello_max_ms=round(worst * 1000, 1), hellos=len(hellos), map_grant_ms=grants, **probe)
        assert worst < 0.5, f"a hello waited {worst * 1000:.0f} ms behind map grants of {queues - 1} queues"
