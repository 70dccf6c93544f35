"""The UMEM pool: sockets made ahead per geometry, each handed out once, bounded in bytes, refilled after
each take, dropped on flush, on interface removal (when no other interface wants them) and at close.
The real sockets are the integration tests' (tests/integration/test_prepared.py); here a fake maker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from xskbroker.broker.umem_pool import MAX_PER_GEOMETRY, PER_GEOMETRY, UmemPool, cost
from xskbroker.wire.protocol import Geometry

MiB = 1 << 20
SMALL = Geometry(umem_size=1 * MiB, fill=64, completion=64, rx=64, tx=64)
OTHER = Geometry(umem_size=2 * MiB, fill=64, completion=64, rx=64, tx=64)


class Made:
    count = 0

    def __init__(self, g: Geometry) -> None:
        Made.count += 1
        self.n, self.geometry, self.closed = Made.count, g, False

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


class Maker:
    def __init__(self) -> None:
        self.made: list[Made] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.kind: type[Made] = Made

    def __call__(self, g: Geometry) -> Made:
        self.gate.wait(5)
        if self.fail:
            raise OSError(12, "Cannot allocate memory")
        m = self.kind(g)
        self.made.append(m)
        return m

    def open(self) -> list[Made]:
        return [m for m in self.made if not m.closed]


def _wait(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_take_learns_the_geometry_and_later_takes_get_fresh_sockets_never_the_same_twice() -> None:
    maker = Maker()
    pool = UmemPool(16 * MiB, maker)
    try:
        assert pool.take(SMALL, 1) is None  # nothing made yet: the grant makes its own
        _wait(lambda: pool.ready(SMALL) >= PER_GEOMETRY)
        got = [pool.take(SMALL, 1) for _ in range(3)]
        assert all(isinstance(x, Made) for x in got[:2])
        assert len({id(x) for x in got if x is not None}) == len([x for x in got if x is not None])
        _wait(lambda: pool.ready(SMALL) >= 1)
        again = pool.take(SMALL, 1)
        assert again is not None and again not in got
    finally:
        pool.close()
    taken = [x for x in [*got, again] if x is not None]
    assert [m for m in maker.open() if m not in taken] == [], "close() leaves nothing of its own open"
    assert pool.pooled_bytes == 0


def test_the_budget_bounds_what_is_pinned_and_old_geometries_make_room() -> None:
    maker = Maker()
    budget = 3 * cost(OTHER)
    pool = UmemPool(budget, maker)
    try:
        for _ in range(4):  # misses double the target: more than the budget holds
            pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) >= 2)
        time.sleep(0.05)
        assert pool.pooled_bytes <= budget
        pool.take(OTHER, 1)  # asked more recently: SMALL gives way
        _wait(lambda: pool.ready(OTHER) >= PER_GEOMETRY)
        time.sleep(0.05)
        assert pool.pooled_bytes <= budget
        assert pool.snapshot()["pinned_bytes"] == sum(cost(m.geometry) for m in maker.open())
    finally:
        pool.close()
    assert not maker.open()


def test_a_geometry_over_half_the_budget_is_never_pooled() -> None:
    maker = Maker()
    pool = UmemPool(cost(SMALL), maker)
    try:
        assert pool.take(SMALL, 1) is None
        time.sleep(0.05)
        assert not maker.made
    finally:
        pool.close()


def test_a_burst_raises_the_target_up_to_its_cap() -> None:
    maker = Maker()
    pool = UmemPool(1 << 30, maker)
    try:
        for _ in range(10):
            pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) == MAX_PER_GEOMETRY)
    finally:
        pool.close()


def test_flush_and_interface_removal_close_what_is_ready_and_what_was_being_made() -> None:
    maker = Maker()
    pool = UmemPool(64 * MiB, maker)
    try:
        pool.take(SMALL, 1)
        pool.take(OTHER, 2)
        pool.take(OTHER, 1)
        _wait(lambda: pool.ready(SMALL) >= 2 and pool.ready(OTHER) >= 2)
        pool.forget_interface(2)  # OTHER is still wanted by interface 1
        assert pool.ready(OTHER) >= 2
        pool.forget_interface(1)
        assert pool.ready(SMALL) == pool.ready(OTHER) == 0
        _wait(lambda: not maker.open())
        maker.gate.clear()  # the next one is held while being made
        pool.take(SMALL, 3)
        _wait(lambda: pool.snapshot()["sockets"] >= 1)
        pool.flush()
        maker.gate.set()  # made after the flush: closed, not pooled
        _wait(lambda: pool.snapshot()["sockets"] == 0)
        _wait(lambda: not maker.open())
        assert pool.ready(SMALL) == 0 and pool.pooled_bytes == 0
    finally:
        pool.close()


def test_a_failure_to_make_one_stops_the_refill_until_the_next_take() -> None:
    maker = Maker()
    maker.fail = True
    pool = UmemPool(64 * MiB, maker)
    try:
        pool.take(SMALL, 1)
        _wait(lambda: pool.snapshot()["failed"] >= 1)
        time.sleep(0.05)
        failed = pool.snapshot()["failed"]
        assert failed <= 2, "it keeps trying"
        maker.fail = False
        pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) >= 1)
        assert pool.snapshot()["pinned_bytes"] == pool.ready(SMALL) * cost(SMALL)
    finally:
        pool.close()


def test_an_empty_budget_makes_nothing() -> None:
    maker = Maker()
    pool = UmemPool(0, maker)
    assert pool.take(SMALL, 1) is None
    pool.close()
    assert not maker.made


def test_a_take_without_wake_refills_only_after_the_kick() -> None:
    """The server takes with wake=False (the refilling thread must not compete with the grant) and kicks once
    the reply is out: nothing is made in between, everything after."""
    maker = Maker()
    pool = UmemPool(16 * MiB, maker)
    try:
        pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) >= PER_GEOMETRY)
        time.sleep(0.05)  # the filler has nothing left to do: it sleeps until told
        made = len(maker.made)
        assert pool.take(SMALL, 1, wake=False) is not None
        time.sleep(0.05)
        assert len(maker.made) == made, "no refill before the kick"
        pool.kick()
        _wait(lambda: len(maker.made) > made)
    finally:
        pool.close()


def test_the_first_take_of_a_geometry_without_wake_makes_nothing_before_the_kick() -> None:
    """A socket-activated start's first grant misses: the filler's first make would start the helper process
    (an import and a spawn holding the GIL) while that grant is made. It waits for the reply's kick."""
    maker = Maker()
    pool = UmemPool(16 * MiB, maker)
    try:
        assert pool.take(SMALL, 1, wake=False) is None
        time.sleep(0.05)
        assert maker.made == [], "nothing made before the first grant's reply is out"
        pool.kick()
        _wait(lambda: pool.ready(SMALL) >= PER_GEOMETRY)
    finally:
        pool.close()


def test_a_geometry_that_gave_way_is_not_refilled_until_it_is_asked_again() -> None:
    """An older geometry's sockets evicted to make room for a newer one must not be made again while only
    the newer one is asked for: each would be made right after a take of the newer (there is room again, and
    an empty geometry is refilled at once) and evicted by the newer's refill moments later, pinning and
    zeroing pages for nothing on a CPU the grant's client wants (the bench's 16 MiB grants after 1 MiB ones
    had the helper making a 1 MiB socket during each reply)."""
    maker = Maker()
    budget = 3 * cost(OTHER) + cost(SMALL) // 2
    pool = UmemPool(budget, maker)
    taken: list[Made] = []
    try:
        pool.take(SMALL, 1)  # learned first, then asked no more
        _wait(lambda: pool.ready(SMALL) >= PER_GEOMETRY)
        maker.gate.clear()
        pool.take(OTHER, 1)  # learned: PER_GEOMETRY wanted
        pool.take(OTHER, 1)  # none ready yet, a burst: OTHER's target doubles past what the budget holds
        maker.gate.set()
        _wait(lambda: pool.ready(OTHER) >= 3)
        time.sleep(0.05)
        assert pool.ready(SMALL) == 0, "SMALL gave way"
        small_made = sum(m.geometry == SMALL for m in maker.made)
        for _ in range(6):  # takes of OTHER alone, each followed by its refill
            got = pool.take(OTHER, 1)
            assert isinstance(got, Made)
            taken.append(got)
            _wait(lambda: pool.ready(OTHER) >= 3)
            time.sleep(0.02)
        assert sum(m.geometry == SMALL for m in maker.made) == small_made, "SMALL made only to be evicted"
        assert pool.pooled_bytes <= budget
        pool.take(SMALL, 1)  # asked again: refilled again
        _wait(lambda: sum(m.geometry == SMALL for m in maker.made) > small_made)
    finally:
        pool.close()
        for m in taken:
            m.close()
    assert not maker.open()


def test_the_first_take_of_a_geometry_is_no_burst() -> None:
    """Nothing is ready for a geometry never asked for: that miss keeps the first target (a one-off 16 MiB
    grant must not have the pool want four of them, evicting every other geometry); a miss once it is
    known doubles it."""
    maker = Maker()
    pool = UmemPool(64 * MiB, maker)
    try:
        assert pool.take(SMALL, 1) is None
        _wait(lambda: pool.ready(SMALL) >= PER_GEOMETRY)
        time.sleep(0.05)
        assert pool.ready(SMALL) == PER_GEOMETRY
        assert len(maker.made) == PER_GEOMETRY
        maker.gate.clear()
        taken = [pool.take(SMALL, 1) for _ in range(PER_GEOMETRY + 1)]  # the last finds none: a burst
        maker.gate.set()
        assert taken[-1] is None
        _wait(lambda: pool.ready(SMALL) >= 2 * PER_GEOMETRY)
        for m in taken:
            if m is not None:
                m.close()
    finally:
        pool.close()


def test_sockets_given_back_while_the_filler_made_more_stay_within_the_budget() -> None:
    """A grant refused at a busy queue gives back what it took, in the same turn of the loop; a miss among its
    takes (more queues than sockets ready) has woken the filler, which meanwhile counted the next one against
    the budget. Given back on top of it, the pool pinned more than the budget, for good (no make, so no
    eviction, ever follows), and a client asking again with one queue more each time ratcheted it up."""
    maker = Maker()
    budget = PER_GEOMETRY * cost(SMALL)
    pool = UmemPool(budget, maker)
    try:
        pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) == PER_GEOMETRY)
        for _ in range(3):
            maker.gate.clear()  # the filler's next make is held once it has counted it
            ready = pool.ready(SMALL)
            got = [pool.take(SMALL, 1, wake=False) for _ in range(ready + 1)]  # the last misses: the filler wakes
            assert got[-1] is None
            _wait(lambda: pool.snapshot()["sockets"] >= 1)  # being made
            for m in got[:-1]:
                assert m is not None
                pool.give_back(SMALL, m)  # the first queue was busy: the grant gives back what it took
            maker.gate.set()
            _wait(lambda: pool.snapshot()["sockets"] == pool.ready(SMALL))
            time.sleep(0.05)
            snap = pool.snapshot()
            assert snap["pinned_bytes"] <= budget, snap
            assert snap["pinned_bytes"] == sum(cost(m.geometry) for m in maker.open())
    finally:
        pool.close()
    assert not maker.open()


class Slow(Made):
    """One whose close takes a while, as the last close of a pinned UMEM's memfd does (it frees every page: about
    0.2 ms per MiB here, 90 ms for two 256 MiB sockets): held until `opened`; it says which thread closed it."""

    opened = threading.Event()

    def close(self) -> None:
        self.by = threading.current_thread()
        Slow.opened.wait(1)
        super().close()


def test_a_flush_or_an_interface_gone_never_closes_the_pool_on_the_callers_thread() -> None:
    maker = Maker()
    maker.kind = Slow
    Slow.opened.clear()
    pool = UmemPool(64 * MiB, maker)
    try:
        pool.take(SMALL, 1)
        pool.take(OTHER, 2)
        _wait(lambda: pool.ready(SMALL) >= 2 and pool.ready(OTHER) >= 2)
        before = pool.snapshot()
        pool.forget_interface(2)  # the event loop's calls (a link event, SIGHUP): they must not wait for closes
        pool.flush()
        closers = {getattr(m, "by", None) for m in maker.made}
        assert threading.current_thread() not in closers, "the caller closed the pool's sockets itself"
        assert pool.ready(SMALL) == pool.ready(OTHER) == 0
        # still counted until they are closed: what status shows is what is pinned
        assert pool.snapshot()["pinned_bytes"] == before["pinned_bytes"]
        Slow.opened.set()
        _wait(lambda: not maker.open())
        _wait(lambda: pool.snapshot()["pinned_bytes"] == pool.snapshot()["sockets"] == 0)
    finally:
        Slow.opened.set()
        pool.close()



def test_a_socket_given_back_to_a_full_pool_is_not_closed_on_the_callers_thread() -> None:
    maker = Maker()
    maker.kind = Slow
    Slow.opened.clear()
    pool = UmemPool(PER_GEOMETRY * cost(SMALL), maker)
    try:
        pool.take(SMALL, 1)
        _wait(lambda: pool.ready(SMALL) == PER_GEOMETRY)
        got = [pool.take(SMALL, 1, wake=False) for _ in range(PER_GEOMETRY)]
        pool.kick()  # refilled to the budget meanwhile: no room for what the grant gives back
        _wait(lambda: pool.ready(SMALL) == PER_GEOMETRY)
        for m in got:
            assert m is not None
            pool.give_back(SMALL, m)
            assert getattr(m, "by", None) is not threading.current_thread(), "closed on the caller's thread"
        Slow.opened.set()
        _wait(lambda: all(m.closed for m in got if m is not None))
        _wait(lambda: pool.snapshot()["pinned_bytes"] == PER_GEOMETRY * cost(SMALL))
    finally:
        Slow.opened.set()
        pool.close()
