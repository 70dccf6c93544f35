"""Sockets made ahead of grants (the UMEM pool) and kernel work off the event loop, on the real kernel.

A pooled socket is handed out once, fresh (a sealed all-zero memfd nobody saw), and bound by the grant to the
queue asked for; the pool stays within its budget and shows it in `status`; a grant that fails after taking
one leaves nothing; a policy reload, an interface's removal and the broker's stop close what the pool made;
and binds run on workers, so grants of different queues overlap (proved with a grant held inside its bind).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import cli, xdp_prog, xsk, xskdiag
from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import (
    BrokerProcess,
    PacketPeer,
    VethNamespace,
    child_pids,
    echo_consumer,
    in_netns,
    spawn_unprivileged,
)
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .grant_bed import TESTS_POLICY, MiB, pool_metrics, release, umem_memfds

RING = 1024
G = proto.Geometry(umem_size=4 * MiB, fill=RING, completion=RING, rx=RING, tx=RING)  # echo_consumer's at 4 MiB
SMALL = proto.Geometry(umem_size=1 * MiB, fill=64, completion=64, rx=64, tx=64)
_ids = itertools.count()


def _ns() -> str:
    return f"xg{os.getpid()}-{next(_ids)}"


@pytest.fixture
def bed() -> Iterator[tuple[VethNamespace, BrokerProcess]]:
    with VethNamespace(_ns(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY, umem_pool="64MiB") as b:
        yield ns, b
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"


def _grant(b: BrokerProcess, queue: int, g: proto.Geometry, **kw: Any) -> tuple[dict[str, Any], list[int]]:
    return request_fds("xsk0", [queue], kind="bound", geometry=g, socket_path=b.socket_path, **kw)


def _learn(b: BrokerProcess, g: proto.Geometry, queue: int = 1) -> None:
    """One grant of g teaches the pool the geometry; wait until it has made some ahead."""
    reply, fds = _grant(b, queue, g)
    release(b, reply, fds)
    wait_for(lambda: sorted(umem_memfds(b.pid)).count(g.umem_size) >= 2, timeout=10,
             what="the pool making sockets ahead")


def test_a_pooled_socket_is_fresh_bound_to_its_queue_and_carries_traffic(bed) -> None:  # type: ignore[no-untyped-def]
    ns, b = bed
    _learn(b, G)
    before = pool_metrics(b)
    reply, fds = _grant(b, 1, G)
    try:
        assert pool_metrics(b)["taken"] == before["taken"] + 1, "the grant did not take a pooled socket"
        umem = fds[reply["sockets"][0]["umem_fd"]]
        # fresh: sealed against resizing, its size the geometry's, every byte zero (nobody wrote it)
        seals = fcntl.fcntl(umem, fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == \
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert os.fstat(umem).st_size == G.umem_size
        with mmap.mmap(umem, G.umem_size, prot=mmap.PROT_READ) as m:
            assert m[:].count(0) == G.umem_size
        with in_netns(ns.name):  # the kernel's own account: the socket is bound to queue 1 of xsk0
            assert 1 in xskdiag.xsk_queues(ifindex("xsk0"))
    finally:
        release(b, reply, fds)
    # and an unprivileged consumer's pooled socket carries traffic both ways on the queue it asked for
    wait_for(lambda: pool_metrics(b)["sockets"] >= 1, what="the pool refilled")
    taken = pool_metrics(b)["taken"]
    peer = PacketPeer(ns.name, ns.peer, ns.mac(ns.inside))
    child = spawn_unprivileged(echo_consumer, b.socket_path, ns.inside, 0, 200, G.umem_size, uid=CONSUMER_UID)
    try:
        try:
            peer.wait_ready(cpu=0)
        except TimeoutError:
            raise AssertionError(f"consumer: {child.result(5)!r}") from None
        traffic = peer.exchange(200, cpu=0)
        result = child.result()
    finally:
        child.kill()
        peer.close()
    assert pool_metrics(b)["taken"] == taken + 1
    assert result["rx_packets"] == 200 and traffic["replies"] == 200


def test_the_pool_stays_within_its_budget_and_status_shows_it() -> None:
    budget = 8 * MiB
    with VethNamespace(_ns(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY, umem_pool="8MiB") as b:
        for _ in range(3):  # misses raise the geometry's target past what the budget holds
            reply, fds = _grant(b, 0, SMALL)
            release(b, reply, fds)
            time.sleep(0.05)
        wait_for(lambda: len(umem_memfds(b.pid)) >= 2, what="sockets made ahead")
        time.sleep(0.3)
        pool = pool_metrics(b)
        assert pool["budget_bytes"] == budget
        assert pool["pinned_bytes"] == sum(umem_memfds(b.pid)) + pool["sockets"] * SMALL.ring_bytes <= budget, pool
        bigger = proto.Geometry(umem_size=3 * MiB, fill=64, completion=64, rx=64, tx=64)
        reply, fds = _grant(b, 1, bigger)  # asked more recently: the 1 MiB ones make room
        release(b, reply, fds)
        wait_for(lambda: umem_memfds(b.pid).count(bigger.umem_size) >= 2, what="the newer geometry made ahead")
        time.sleep(0.3)
        pool = pool_metrics(b)
        assert pool["pinned_bytes"] <= budget and sum(umem_memfds(b.pid)) <= budget, (pool, umem_memfds(b.pid))
        over = proto.Geometry(umem_size=5 * MiB, fill=64, completion=64, rx=64, tx=64)  # over half the budget
        reply, fds = _grant(b, 0, over)
        release(b, reply, fds)
        time.sleep(0.3)
        assert over.umem_size not in umem_memfds(b.pid), "a geometry over half the budget was pooled"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["status", "--socket", b.socket_path]) == 0
        assert "UMEM pool:" in out.getvalue() and "budget" in out.getvalue(), out.getvalue()


def test_a_failure_mid_grant_leaves_no_trace(bed) -> None:  # type: ignore[no-untyped-def]
    ns, b = bed
    _learn(b, G)
    held, held_fds = _grant(b, 0, G)  # queue 0 taken: a second grant of it fails at the slot claim
    try:
        taken = pool_metrics(b)["taken"]
        with pytest.raises(proto.BrokerError) as busy:
            _grant(b, 0, G)
        assert busy.value.code == "queue-busy"
        # a bind the kernel refuses (veth has no zero-copy): after the claim, on a worker
        with pytest.raises(proto.BrokerError) as refused, Connection(b.socket_path) as c:
            c.call(proto.Grant("xsk0", (1,), kind="bound", geometry=G, bind_mode="zerocopy"))
        assert refused.value.code == "kernel-error", refused.value
        # the busy queue's grant gave its pooled socket back (never placed); the refused bind's was placed: taken
        assert pool_metrics(b)["taken"] == taken + 1, \
            "the refused bind took a pooled socket, the busy queue's gave it back"
        with in_netns(ns.name):
            prog = xdp_prog.find_or_attach(ifindex("xsk0"), "xsk0", 2)
            try:
                wait_for(lambda: xsk.occupied_slots(prog.map_fd, 2) == [0], what="only the held slot occupied")
            finally:
                prog.close()
            wait_for(lambda: xskdiag.xsk_queues(ifindex("xsk0")) == {0}, what="no socket left bound")
        # the placed socket is closed, never pooled again: what the broker holds is the pool's, as it says
        wait_for(lambda: len(umem_memfds(b.pid)) == pool_metrics(b)["sockets"], what="no memfd but the pool's")
        leases = [x["lease"] for x in Connection(b.socket_path).call(proto.Status())[0]["leases"]]
        assert leases == [held["lease"]]
    finally:
        release(b, held, held_fds)


def test_sighup_interface_removal_and_stop_free_the_pool() -> None:
    with VethNamespace(_ns(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY, umem_pool="64MiB") as b:
        _learn(b, G)
        b.signal(signal.SIGHUP)  # a reload: nothing made for the old policy's requests outlives it
        wait_for(lambda: not umem_memfds(b.pid) and pool_metrics(b)["sockets"] == 0, what="the pool emptied by SIGHUP")
        assert pool_metrics(b)["pinned_bytes"] == 0
        # a second interface: what only it asked for goes with it
        subprocess.run(["ip", "-n", ns.name, "link", "add", "xsk1", "numtxqueues", "2", "numrxqueues", "2",
                        "type", "veth", "peer", "name", "xsk1p"], check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "xsk1", "up"], check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "xsk1p", "up"], check=True)
        _learn(b, G)  # xsk0 wants G
        reply, fds = request_fds("xsk1", [0], kind="bound", geometry=SMALL, socket_path=b.socket_path)
        release(b, reply, fds)
        wait_for(lambda: umem_memfds(b.pid).count(SMALL.umem_size) >= 2, what="xsk1's geometry made ahead")
        subprocess.run(["ip", "-n", ns.name, "link", "del", "xsk1"], check=True)
        wait_for(lambda: SMALL.umem_size not in umem_memfds(b.pid), what="xsk1's sockets closed with it")
        assert umem_memfds(b.pid).count(G.umem_size) >= 2, "xsk0's were closed too"
        # stop: the helper that makes them exits with the broker, and the broker's sockets go with it
        helpers = [p for p in child_pids(b.pid) if b"xskbroker.broker.preparer" in
                   Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(helpers) == 1, helpers
        b.signal(signal.SIGTERM)
        assert b.proc is not None
        b.proc.wait(10)
        wait_for(lambda: not os.path.exists(f"/proc/{helpers[0]}"), what="the helper gone with the broker")
        stopped = [r for r in b.records() if r.get("event") == "stopped"]
        assert stopped or b.proc.returncode == 0, b.log()


def test_grants_of_different_queues_overlap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A grant held inside its bind (fault point "before-bind", first grant once armed) must not hold up a
    grant of another queue, nor a hello: no timing involved, the first is provably still inside its bind."""
    gate = str(tmp_path / "release")
    with VethNamespace(_ns(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY, umem_pool="64MiB",
                          env={"XSKBROKER_FAULT": f"before-bind:hold={gate}"}) as b:
        _learn(b, SMALL)  # both grants below take sockets made ahead: only the slot and the bind are left
        with open(gate + ".armed", "w"):
            pass
        first: dict[str, Any] = {}

        def held() -> None:
            first["reply"], first["fds"] = _grant(b, 0, SMALL)

        t = threading.Thread(target=held)
        t.start()
        try:
            wait_for(lambda: os.path.exists(gate + ".held"), what="the first grant inside its bind")
            with Connection(b.socket_path, timeout=5) as c:
                assert c.call(proto.Hello())[0]["ok"]
            taken = pool_metrics(b)["taken"]
            reply, fds = _grant(b, 1, SMALL, timeout=5)  # another queue: made while the first still binds
            assert reply["ok"] and not os.path.exists(gate) and "reply" not in first
            assert pool_metrics(b)["taken"] == taken + 1
            release(b, reply, fds)
        finally:
            with open(gate, "w"):
                pass
            t.join(10)
        assert first["reply"]["ok"]
        release(b, first["reply"], first["fds"])
