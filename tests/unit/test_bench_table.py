"""The benchmark table (bench/__main__.py): a ratio a hair's breadth over its goal must not print as the goal."""

from __future__ import annotations

from bench.__main__ import _goal, _near


def test_a_ratio_that_rounds_to_its_bound_gets_a_third_decimal() -> None:
    assert _near(1.0026, 1.0) == "1.003" and _goal(1.0026, 1.0, True)[1] == "**not met**"
    assert _near(0.9973, 1.0) == "0.997" and _goal(0.9973, 1.0, True)[1] == "met"
    assert _near(1.0, 1.0) == "1.00"  # exactly the bound: met, and two decimals say so
    assert _near(1.3503, 1.0) == "1.35" and _near(0.8951, 0.9) == "0.895" and _near(1.504, 1.5) == "1.504"


def test_a_missing_c_reference_is_said_not_left_out() -> None:
    from bench.__main__ import _rows

    d = {"brokered": 1.0, "self_made": 1.0, "ratio": 1.0, "pair_ratios": [1.0, 1.0], "af_packet": 1.0,
         "library_over_af_packet": 1.0}
    rows = _rows({"datapath": {"rx_pps": d, "tx_pps": d, "c_ref_missing": "build/bench/xsk_ref is not built"}})
    c_rows = [r for r in rows if "vs C" in r[0]]
    assert len(c_rows) == 2 and all("not built" in r[1] and r[5] == "not measured" for r in c_rows)
