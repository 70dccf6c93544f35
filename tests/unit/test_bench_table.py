"""The benchmark table (bench/__main__.py): a ratio a hair's breadth over its goal must not print as the goal."""

from __future__ import annotations

from bench.__main__ import _goal, _near


def test_a_ratio_that_rounds_to_its_bound_gets_a_third_decimal() -> None:
    assert _near(1.0026, 1.0) == "1.003" and _goal(1.0026, 1.0, True)[1] == "**not met**"
    assert _near(0.9973, 1.0) == "0.997" and _goal(0.9973, 1.0, True)[1] == "met"
    assert _near(1.0, 1.0) == "1.00"  # exactly the bound: met, and two decimals say so
    assert _near(1.3503, 1.0) == "1.35" and _near(0.8951, 0.9) == "0.895" and _near(1.504, 1.5) == "1.504"
