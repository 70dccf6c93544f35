"""The UMEM pool's helper process (broker.preparer) hung, dead or misbehaving, on the real kernel: the broker stops
in bounded time and leaves no process, the pool's accounting stays true, and no fd leaks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, child_pids
from xskbroker.wire import protocol as proto

from .conftest import ns_name, wait_for
from .grant_bed import TESTS_POLICY, MiB, grant_release, pool_metrics, umem_memfds

G = proto.Geometry(umem_size=4 * MiB, fill=256, completion=256, rx=256, tx=256)


@pytest.fixture
def bed() -> Iterator[tuple[VethNamespace, BrokerProcess]]:
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY, umem_pool="64MiB") as b:
        yield ns, b


def _helpers(b: BrokerProcess) -> list[int]:
    out = []
    for p in child_pids(b.pid):
        with contextlib.suppress(FileNotFoundError):
            if b"xskbroker.broker.preparer" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
    return out


def _helper(b: BrokerProcess) -> int:
    helpers = _helpers(b)
    assert len(helpers) == 1, helpers
    return helpers[0]


def _stopped_helper(b: BrokerProcess) -> int:
    """The pool taught G and making sockets ahead, its helper stopped (SIGSTOP): it reads and answers nothing."""
    grant_release(b, G)
    wait_for(lambda: umem_memfds(b.pid).count(G.umem_size) >= 2, timeout=10, what="the pool making sockets ahead")
    helper = _helper(b)
    os.kill(helper, signal.SIGSTOP)
    return helper


def _refill_under_way(b: BrokerProcess) -> None:
    """One ready, one being made: counted, never answered."""
    wait_for(lambda: pool_metrics(b)["sockets"] == 2 and umem_memfds(b.pid).count(G.umem_size) == 1,
             what="a refill under way")


def _refilled_by_the_broker(b: BrokerProcess) -> dict[str, int]:
    """The pool's figures once the broker has made its own sockets ahead (the helper gone)."""
    wait_for(lambda: umem_memfds(b.pid).count(G.umem_size) >= 2, timeout=10, what="the pool refilled by the broker")
    time.sleep(0.2)
    return pool_metrics(b)


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_broker_whose_pool_helper_hangs_mid_make_still_stops(bed: Any) -> None:
    _, b = bed
    helper = _stopped_helper(b)
    try:
        grant_release(b, G)  # takes a pooled socket: the refill asks the stopped helper, and waits for its reply
        _refill_under_way(b)
        time.sleep(0.3)
        b.signal(signal.SIGTERM)
        assert b.proc is not None
        try:
            b.proc.wait(8)
        except subprocess.TimeoutExpired:
            raise AssertionError("the broker did not stop: its pool waits for a helper that never answers") from None
        wait_for(lambda: _stat(helper) in ("gone", "Z"), what="the helper gone with the broker")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)


def test_a_pool_helper_that_stops_answering_is_given_up_and_the_pool_carries_on_true_to_its_count(bed: Any) -> None:
    _, b = bed
    helper = _stopped_helper(b)
    try:
        grant_release(b, G)  # the refill of what it took waits on the stopped helper
        # given up on after preparer.reply_seconds (about 5 s at this size): killed, and the broker makes its own
        wait_for(lambda: _stat(helper) in ("gone", "Z"), timeout=15, what="the hung helper ended")
        pool = _refilled_by_the_broker(b)
        assert pool["pinned_bytes"] == sum(umem_memfds(b.pid)) + pool["sockets"] * G.ring_bytes, \
            (pool, umem_memfds(b.pid))
        assert pool["sockets"] == len(umem_memfds(b.pid))
        grant_release(b, G, 0)  # and grants go on, from the pool
        assert pool_metrics(b)["taken"] == pool["taken"] + 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)


def test_a_pool_helper_killed_mid_make_leaves_no_fd_and_the_pool_true_to_its_count(bed: Any) -> None:
    _, b = bed
    helper = _stopped_helper(b)
    try:
        grant_release(b, G)
        _refill_under_way(b)
    finally:
        os.kill(helper, signal.SIGKILL)  # it dies with the request read or not, the reply never sent
    wait_for(lambda: _stat(helper) in ("gone", "Z"), what="the helper dead")
    pool = _refilled_by_the_broker(b)
    assert pool["sockets"] == len(umem_memfds(b.pid)) and pool["pinned_bytes"] == \
        sum(umem_memfds(b.pid)) + pool["sockets"] * G.ring_bytes, (pool, umem_memfds(b.pid))
    assert not _helpers(b)  # the broker makes its own now: no helper started again


def _open_fds() -> set[int]:
    """This process's fds (not the one listing /proc/self/fd opens meanwhile)."""
    out = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        out.add(fd)
    return out


def test_a_broker_out_of_fds_loses_that_socket_not_its_pool_helper() -> None:
    """The helper's reply carries two fds; with room for one (RLIMIT_NOFILE), the kernel truncates it (MSG_CTRUNC).
    Nothing is left open, and the helper, which did nothing wrong, keeps making the next ones (given up, every pool
    socket from then on would be pinned by the broker itself, under its own mmap_lock)."""
    from xskbroker.broker.preparer import Preparer

    p = Preparer()
    try:
        p.make(G).close()  # starts the helper
        helper = p.pid()
        assert helper is not None
        before = _open_fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = max(before) + 2
        filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(limit - 1 - len(before))]
        assert max(_open_fds()) == limit - 2 and len(_open_fds()) == limit - 1  # one fd number left: limit - 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with contextlib.suppress(OSError):  # EMFILE: that socket is lost (its fds closed by the kernel)
                p.make(G).close()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in filler:
                os.close(fd)
        assert p.pid() == helper, "the helper was given up for the broker's own shortage of fds"
        assert _open_fds() == before, "a truncated reply left an fd open"
        made = p.make(G)
        made.close()
        assert p.pid() == helper
    finally:
        p.stop()


def test_no_pool_helper_is_started_once_the_kernel_layer_has_stopped() -> None:
    """The broker's stop ends the helper before it joins the pool's filler (which may be waiting on it): a filler
    making its first socket after that must not start a helper nobody would end."""
    from xskbroker.broker.kernel import LinuxKernel

    k = LinuxKernel()
    k.stop()
    before = set(child_pids(os.getpid()))
    with pytest.raises(OSError) as e:
        k.make_ready(G)
    assert e.value.errno == errno.ECANCELED
    assert set(child_pids(os.getpid())) == before


def test_a_large_socket_made_without_the_pool_helper_is_pinned_apart_from_the_broker(figures: Any) -> None:
    """With its helper gone, the broker makes pool sockets itself. Pinning a UMEM holds the mmap_lock of the process
    that pins (about 1 ms per MiB): pinned in the broker, every mmap and munmap of its other threads (the event
    loop's allocations) waited for the whole pinning. A large one is pinned in a child process: another thread's
    mmap and munmap here go on meanwhile."""
    import mmap
    import threading

    from xskbroker.broker.preparer import APART_UMEM, Preparer
    from xskbroker.common.libc import libc

    big = proto.Geometry(umem_size=512 * MiB, fill=256, completion=256, rx=256, tx=256)
    assert big.umem_size > APART_UMEM
    p = Preparer()
    try:
        p.make(G).close()  # starts the helper
        helper = p.pid()
        assert helper is not None
        os.kill(helper, signal.SIGKILL)
        wait_for(lambda: _stat(helper) in ("gone", "Z"), what="the helper dead")
        made: list[Any] = []
        t = threading.Thread(target=lambda: made.append(p.make(big)))  # finds the helper gone: makes its own
        start = time.monotonic()
        t.start()
        worst = 0.0
        calls = 0
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        while t.is_alive():  # what a thread's allocations do: mmap and munmap, each under the mmap_lock
            before = time.monotonic()
            addr = libc.mmap(None, 1 << 20, prot, flags, -1, 0)
            libc.munmap(addr, 1 << 20)
            worst = max(worst, time.monotonic() - before)
            calls += 1
            time.sleep(0.001)
        took = time.monotonic() - start
        t.join()
        assert made and p.pid() is None  # made by the broker's side, the helper given up
        made[0].close()
        figures(make_s=f"{took:.3f}", worst_mmap_ms=f"{worst * 1e3:.1f}", mmap_calls=calls)
        assert took > 0.2, f"the make took {took:.3f} s: too short to tell"
        assert worst < 0.1, f"an mmap waited {worst * 1e3:.0f} ms while a {big.umem_size >> 20} MiB UMEM was " \
            f"pinned ({took:.3f} s, {calls} calls)"
    finally:
        p.stop()


def test_a_large_socket_the_broker_pins_itself_does_not_hold_up_its_stop() -> None:
    """The child pinning a UMEM for the broker (its helper gone) is killed by the stop: nothing pinned for a broker on
    its way out, and its stop does not wait seconds for the pinning."""
    import threading

    from xskbroker.broker.preparer import Preparer

    big = proto.Geometry(umem_size=1 << 30, fill=256, completion=256, rx=256, tx=256)
    p = Preparer()
    p.make(G).close()
    helper = p.pid()
    assert helper is not None
    os.kill(helper, signal.SIGKILL)
    wait_for(lambda: _stat(helper) in ("gone", "Z"), what="the helper dead")
    errors: list[BaseException] = []

    def make() -> None:
        try:
            p.make(big).close()
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=make)
    t.start()
    wait_for(lambda: any(c != helper for c in child_pids(os.getpid())), what="the pinning child forked")
    started = time.monotonic()
    p.stop()
    took = time.monotonic() - started
    t.join(10)
    assert not t.is_alive()
    assert errors, "the make was not cut short by the stop"
    assert took < 0.5, f"the stop waited {took:.2f} s for the pinning"
    assert not [c for c in child_pids(os.getpid()) if c != helper]
