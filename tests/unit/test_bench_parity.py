"""Data-path parity (bench/datapath.py): pairs run in alternating order, and the figure cancels an order effect."""

from __future__ import annotations

import statistics

import pytest

from bench.datapath import balanced_ratio


def _pairs(true_ratio: float, first_penalty: float, n: int) -> list[float]:
    """Pair ratios (brokered / self-made) where whichever socket runs first in a pair is slowed by the penalty:
    brokered first in the even pairs, as _compare runs them."""
    return [true_ratio * (first_penalty if i % 2 == 0 else 1 / first_penalty) for i in range(n)]


@pytest.mark.parametrize("penalty", [0.9, 0.95, 1.05])
def test_an_order_effect_cancels(penalty: float) -> None:
    ratios = _pairs(1.0, penalty, 20)
    assert balanced_ratio(ratios) == pytest.approx(1.0)
    # the raw ratios' median lands wherever the two orders meet: here between them, but with an odd count of
    # pairs, or noise, on one side
    assert statistics.median(ratios[:-1]) == pytest.approx(penalty)


def test_a_real_difference_is_kept() -> None:
    assert balanced_ratio(_pairs(0.9, 0.95, 20)) == pytest.approx(0.9)
    assert balanced_ratio([0.8, 1.25, 0.9, 1.0]) == pytest.approx(statistics.median([1.0, 0.9 ** 0.5]))


def test_an_odd_pair_left_over_is_not_counted() -> None:
    assert balanced_ratio([1.0, 1.0, 2.0]) == pytest.approx(1.0)
