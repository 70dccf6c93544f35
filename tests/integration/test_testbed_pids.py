"""The pid-reuse attack tests land a process on a chosen pid (testbed.pids). Another process may take that pid
between the write of ns_last_pid and the fork (the other test worker forks all the time) and keep it: a CI run
once failed after 20,000 forks at a pid another test's process kept. Now that is told apart at once and the
scenario starts again on a new pid."""

from __future__ import annotations

import os
import signal
import time

import pytest

from xskbroker.testbed import pids
from xskbroker.testbed.pids import PidTaken, fork_on, fork_on_with_pipe, on_a_free_pid


def _free_pid() -> int:
    """A pid that was just used and is free now."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    return child


def test_a_child_lands_on_the_pid_asked_for() -> None:
    # This test too once lost its pid to the other test worker's process (CI, stop 37): it retries on a new one.
    def scenario() -> tuple[int, int]:
        pid = _free_pid()
        child, r, w = fork_on_with_pipe(pid)
        if child == 0:
            os.write(w, str(os.getpid()).encode())
            os._exit(0)
        os.close(w)
        try:
            return pid, int(os.read(r, 32))
        finally:
            os.close(r)
            os.waitpid(pid, 0)

    asked, landed = on_a_free_pid(scenario)
    assert landed == asked


def test_a_pid_another_process_keeps_is_given_up_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pids, "TAKEN_FOR", 0.3)
    keeper = os.fork()  # stands for another test's long-lived process that took the pid first
    if keeper == 0:
        time.sleep(60)
        os._exit(0)
    try:
        started = time.monotonic()
        with pytest.raises(PidTaken, match=f"pid {keeper} was taken by another process"):
            fork_on(keeper)
        assert time.monotonic() - started < 5.0
    finally:
        os.kill(keeper, signal.SIGKILL)
        os.waitpid(keeper, 0)


def test_a_scenario_whose_pid_was_taken_runs_again() -> None:
    runs: list[int] = []

    def scenario() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise PidTaken("taken")
        return "done"

    assert on_a_free_pid(scenario) == "done"
    assert len(runs) == 3


def test_a_scenario_whose_pid_is_always_taken_fails() -> None:
    def scenario() -> None:
        raise PidTaken("taken")

    with pytest.raises(AssertionError, match="taken by another process in each of 3 attempts"):
        on_a_free_pid(scenario)
