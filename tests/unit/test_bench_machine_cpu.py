"""bench/throughput.py's whole-machine CPU figures, read from /proc/stat around a run: what says whether the
CPUs were the limit of the brokered or the direct rate."""

from __future__ import annotations

import pytest

from bench.throughput import machine_cpu, stat_times


def test_stat_times_folds_nice_irq_softirq_and_iowait_into_their_kind() -> None:
    #                     user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  100 5 40 800 20 3 7 25 0 0"
    assert stat_times(line) == (105, 50, 820, 25)


def test_stat_times_reads_an_old_kernels_shorter_line() -> None:
    assert stat_times("cpu  1 2 3 4") == (3, 3, 4, 0)


def test_stat_times_refuses_a_single_cpus_line() -> None:
    with pytest.raises(ValueError, match="all-CPU"):
        stat_times("cpu0 1 2 3 4 5 6 7 8")


def test_machine_cpu_shares_and_per_operation_times() -> None:
    before = (1000, 500, 4000, 100)
    # 2 CPUs for 1 s at 100 ticks/s: 200 ticks, of which 90 user, 60 system, 40 idle, 10 stolen
    after = (1090, 560, 4040, 110)
    got = machine_cpu(before, after, ops=300, hz=100)
    assert got == {"busy_share": 0.75, "steal_share": 0.05,
                   "user_ms_per_op": 3.0, "system_ms_per_op": 2.0}


def test_machine_cpu_of_an_idle_interval_is_zero_not_an_error() -> None:
    same = (10, 10, 10, 0)
    assert machine_cpu(same, same, ops=0, hz=100) == {"busy_share": 0.0, "steal_share": 0.0,
                                                      "user_ms_per_op": 0.0, "system_ms_per_op": 0.0}


def test_this_machines_stat_line_parses() -> None:
    with open("/proc/stat") as f:
        user, system, idle, steal = stat_times(f.readline())
    assert user > 0 and system > 0 and idle > 0 and steal >= 0


def test_rounds_combine_into_one_rate_and_cpu_per_operation() -> None:
    from bench.throughput import ROUND_ORDER, Round, combine

    # the machine slows linearly over the four rounds (B D D B): each kind's rounds straddle the same midpoint,
    # so the drift cancels and two equal rates stay equal
    speed = [1.0, 0.9, 0.8, 0.7]
    rounds: dict[str, list[Round]] = {"brokered": [], "direct": []}
    for kind, s in zip(ROUND_ORDER, speed, strict=True):
        rounds[kind].append(Round(int(1000 * s), 1.0, {"clients": 100.0 * s}, (10, 5, 5, 0)))
    b_rate, b_cpu, b_machine = combine(rounds["brokered"])
    d_rate, _, _ = combine(rounds["direct"])
    assert ROUND_ORDER == ("brokered", "direct", "direct", "brokered")
    assert b_rate == pytest.approx(850) and b_rate / d_rate == pytest.approx(1.0)
    assert b_cpu == {"clients": pytest.approx(0.1)}
    assert b_machine["busy_share"] == pytest.approx(0.75)
