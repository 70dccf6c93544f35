"""broker/cpus.py: which CPUs answer clients and which do the slow kernel work, and the threads that move."""

from __future__ import annotations

import os
from typing import Any

import pytest

from xskbroker.broker import cpus

from ..threads import on_own_thread


def test_the_last_cpu_does_the_background_work_and_one_cpu_is_not_split() -> None:
    assert cpus.split(frozenset({0, 1})) == (frozenset({0}), frozenset({1}))
    assert cpus.split(frozenset({2, 5, 7})) == (frozenset({2, 5}), frozenset({7}))  # a cpuset's own numbers
    assert cpus.split(frozenset({3})) is None
    assert cpus.split(frozenset()) is None


@pytest.fixture
def plan() -> Any:
    yield
    cpus.configure(False)  # the module's plan is process-wide: leave none behind


def test_threads_move_themselves_once_configured_and_the_caller_only_when_it_asks(plan: None) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"this machine lets the tests run on one CPU only ({sorted(allowed)}): nothing to split")
    serving, background = cpus.split(allowed) or (frozenset(), frozenset())

    def loop() -> tuple[Any, frozenset[int], frozenset[int], frozenset[int]]:
        got = cpus.configure(True)
        before = frozenset(os.sched_getaffinity(0))  # not moved yet: the threads it starts must not queue behind it
        there = on_own_thread(lambda: (cpus.background(), frozenset(os.sched_getaffinity(0)))[1])
        cpus.serving()
        return got, before, frozenset(os.sched_getaffinity(0)), there

    got, before, here, there = on_own_thread(loop)
    assert got == (serving, background)
    assert before == allowed and here == serving and there == background
    assert frozenset(os.sched_getaffinity(0)) == allowed  # only the threads that asked moved


def test_no_split_when_disabled_or_on_one_cpu(plan: None) -> None:
    def one_cpu() -> tuple[Any, frozenset[int]]:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        got = cpus.configure(True)
        cpus.background()  # no plan: a no-op
        return got, frozenset(os.sched_getaffinity(0))

    got, here = on_own_thread(one_cpu)
    assert got is None and len(here) == 1
    assert on_own_thread(lambda: cpus.configure(False)) is None
    everywhere = frozenset(os.sched_getaffinity(0))
    assert on_own_thread(lambda: (cpus.background(), frozenset(os.sched_getaffinity(0)))[1]) == everywhere
