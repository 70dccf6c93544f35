"""The broker's CPU split (broker/cpus.py, `serve --split-cpus`): its event loop and bind workers on some CPUs,
the threads and processes that close sockets and make or pin UMEMs on another, as the kernel reports each
thread's affinity; none of it with --no-split-cpus or with one CPU to run on, and grants work either way."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, child_pids
from xskbroker.wire import protocol as proto
from xskbroker.wire import replies

from ..threads import on_own_thread
from .conftest import POLICY, cpu_list, ns_name, wait_for


def affinity(pid: int) -> dict[int, frozenset[int]]:
    """Each thread of pid (tid -> the CPUs it may run on)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue  # ended while we looked
        out[int(tid)] = cpu_list(status.split("Cpus_allowed_list:")[1].split()[0])
    return out


def grant_and_release(b: BrokerProcess) -> None:
    """A bound grant from the UMEM pool's geometry, its fds closed: the pool starts its helper, a closer closes."""
    for _ in range(2):
        _, fds = request_fds("xsk0", [0], kind="bound", geometry=proto.Geometry(umem_size=1 << 20),
                             socket_path=b.socket_path, timeout=10)
        for fd in fds:
            os.close(fd)
        time.sleep(0.1)


def status(b: BrokerProcess) -> replies.StatusReply:
    with Connection(b.socket_path) as c:
        return c.call_typed(proto.Status())[0]


def ready(b: BrokerProcess) -> dict[str, Any]:
    return next(r for r in b.records() if r.get("event") == "ready")


ALLOWED = frozenset(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(ALLOWED) < 2, reason=f"the tests may run on one CPU only ({sorted(ALLOWED)}): "
                               "nothing to split")
POOL = "16MiB"


@needs_two
def test_the_loop_answers_on_its_cpus_while_closes_and_umem_making_run_on_the_last() -> None:
    serving, background = ALLOWED - {max(ALLOWED)}, frozenset({max(ALLOWED)})
    name = ns_name()
    with VethNamespace(name, inside="xsk0", peer="xsk0p"), \
            BrokerProcess(name, POLICY.format(uid=0), umem_pool=POOL) as b:
        grant_and_release(b)
        threads = affinity(b.pid)
        assert threads[b.pid] == serving, threads  # the event loop
        assert set(threads.values()) == {serving, background}, threads
        # closers, the pool's fillers, the heavy workers; the bind workers stay with the loop
        assert sum(cpus == background for cpus in threads.values()) >= 4, threads
        helpers = wait_for(lambda: child_pids(b.pid), what="the UMEM pool's helper process")
        for pid in helpers:
            assert set(affinity(pid).values()) == {background}, (pid, affinity(pid))
        split = {"serving": sorted(serving), "background": sorted(background)}
        assert ready(b)["cpus"] == split
        assert status(b).cpus == split


def test_no_split_when_told_or_with_one_cpu_and_grants_still_work() -> None:
    name = ns_name()
    with VethNamespace(name, inside="xsk0", peer="xsk0p"), \
            BrokerProcess(name, POLICY.format(uid=0), ["--no-split-cpus"], umem_pool=POOL) as b:
        grant_and_release(b)
        assert ready(b)["cpus"] is None and status(b).cpus is None
        assert set(affinity(b.pid).values()) == {ALLOWED}
    one = {min(ALLOWED)}

    def start_on_one_cpu() -> tuple[BrokerProcess, VethNamespace]:
        ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p").__enter__()
        try:
            return BrokerProcess(ns.name, POLICY.format(uid=0), umem_pool=POOL).__enter__(), ns
        except BaseException:
            ns.__exit__(None, None, None)
            raise

    b, ns = on_own_thread(start_on_one_cpu, one)
    try:
        grant_and_release(b)
        assert ready(b)["cpus"] is None
        assert set(affinity(b.pid).values()) == {frozenset(one)}
    finally:
        b.__exit__(None, None, None)
        ns.__exit__(None, None, None)
