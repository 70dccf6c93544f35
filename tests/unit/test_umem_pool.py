"""The UMEM pool: sealed, zeroed, prefaulted memfds, bounded in bytes, refilled after each take."""

import fcntl
import os
import time

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
        _wait(lambda: pool.pooled_bytes == 4 * MiB)
        os.close(pool.take(4 * MiB))
        _wait(lambda: pool.pooled_bytes >= 6 * MiB)
        time.sleep(0.05)
        assert pool.pooled_bytes <= 8 * MiB
        fd = pool.take(4 * MiB)  # the newest size survived the eviction
        assert os.fstat(fd).st_blocks * 512 >= 4 * MiB
        os.close(fd)
    finally:
        pool.close()


def test_a_disabled_pool_makes_every_memfd_on_the_spot():
    pool = UmemPool(0)
    fd = pool.take(MiB)
    assert os.fstat(fd).st_size == MiB and pool.pooled_bytes == 0
    os.close(fd)
    pool.close()
