"""The UMEM pool: sealed, zeroed, prefaulted memfds, bounded in bytes, refilled after each take."""

import fcntl
import os
import resource
import threading
import time

import pytest

from xskbroker.broker import umem_pool, xsk
from xskbroker.broker.umem_pool import PER_SIZE, UmemPool
from xskbroker.broker.xsk import SEALS

MiB = 1 << 20


def _wait(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_take_gives_a_sealed_memfd_and_the_pool_refills_it_prefaulted():
    pool = UmemPool(16 * MiB)
    try:
        first = pool.take(2 * MiB)  # nothing pooled yet: made on the spot
        assert os.fstat(first).st_size == 2 * MiB
        assert fcntl.fcntl(first, fcntl.F_GET_SEALS) & SEALS == SEALS
        os.close(first)
        _wait(lambda: pool.pooled_bytes == PER_SIZE * 2 * MiB)
        fd = pool.take(2 * MiB)
        st = os.fstat(fd)
        assert st.st_blocks * 512 >= 2 * MiB  # its pages exist already: registration only pins them
        assert os.pread(fd, 4096, 0) == bytes(4096)  # and they are zeros: never used by anyone
        os.close(fd)
    finally:
        pool.close()
    assert pool.pooled_bytes == 0


def test_the_pool_stays_within_its_bytes_and_forgets_old_sizes_first():
    pool = UmemPool(8 * MiB)
    try:
        os.close(pool.take(2 * MiB))
        _wait(lambda: pool.ready(2 * MiB) == PER_SIZE)  # 4 MiB pooled
        os.close(pool.take(4 * MiB))
        # PER_SIZE of the newest size fit only if every memfd of the older size went
        _wait(lambda: pool.ready(4 * MiB) == PER_SIZE)
        assert pool.ready(2 * MiB) == 0 and pool.pooled_bytes == 8 * MiB
        fd = pool.take(4 * MiB)
        assert os.fstat(fd).st_blocks * 512 >= 4 * MiB  # prefaulted: one the pool made
        os.close(fd)
    finally:
        pool.close()


def test_a_failed_refill_closes_none_of_the_pooled_memfds(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = threading.Event()
    real = xsk.sealed_memfd

    def sealed_memfd(size: int) -> int:  # the real one, telling when it failed on the pool's thread
        try:
            return real(size)
        except OSError:
            if threading.current_thread() is not threading.main_thread():
                failed.set()
            raise

    monkeypatch.setattr(umem_pool.xsk, "sealed_memfd", sealed_memfd)
    pool = UmemPool(16 * MiB)
    try:
        os.close(pool.take(2 * MiB))
        _wait(lambda: pool.ready(2 * MiB) == PER_SIZE)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.dup(0)
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))  # every fd below is taken: memfd_create fails
        try:
            with pytest.raises(OSError):
                pool.take(MiB)  # EMFILE here, and on the pool's thread, which tries to refill it
            assert failed.wait(5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(pool.take(3 * MiB))
        _wait(lambda: pool.ready(3 * MiB) == PER_SIZE)  # wants are served in order: the failed refill is over
        for _ in range(PER_SIZE):  # the memfds pooled before the failure are all still open, and still theirs
            fd = pool.take(2 * MiB)
            assert os.fstat(fd).st_size == 2 * MiB and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
            os.close(fd)
    finally:
        pool.close()


def test_a_disabled_pool_makes_every_memfd_on_the_spot():
    pool = UmemPool(0)
    fd = pool.take(MiB)
    assert os.fstat(fd).st_size == MiB and pool.pooled_bytes == 0
    os.close(fd)
    pool.close()
