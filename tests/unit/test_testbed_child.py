"""The test bed's forked consumers are signalled only while their pid is theirs. A consumer reaped (by alive(),
or by a first kill()) frees its pid, which another process takes soon where pid_max is 32768: a later kill()
(result() kills, and teardown kills again) sent SIGKILL to whoever had it. In a parallel run that was another
test's keeper of a socket, and that test failed with its lease gone."""

from __future__ import annotations

import os
import signal
import time

import pytest

from xskbroker.testbed.sandbox import fork_child


def _sleeper() -> int:
    return os.getpid()


def _wait_reaped(child) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 5
    while child.alive():
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.005)


def test_a_reaped_child_is_never_signalled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    child = fork_child(lambda: None, os.getuid(), _sleeper)
    assert child.result() == child.pid  # result() kills and reaps it
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    child.kill()
    assert sent == [], "signalled a pid that may belong to another process by now"
    assert not child.alive()


def test_a_child_reaped_by_alive_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    child = fork_child(lambda: None, os.getuid(), _sleeper)
    _wait_reaped(child)
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    child.kill(signal.SIGTERM)
    assert sent == []


def test_a_live_child_is_killed_and_reaped() -> None:
    child = fork_child(lambda: None, os.getuid(), time.sleep, 60)
    assert child.alive()
    child.kill()
    assert not child.alive() and child.reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


def test_a_child_that_gives_no_result_is_killed_even_when_asked_not_to_reap() -> None:
    """reap=False keeps an exited child's pid: one still running when the wait times out is killed all the same."""
    child = fork_child(lambda: None, os.getuid(), time.sleep, 60)
    with pytest.raises(TimeoutError):
        child.result(timeout=0.2, reap=False)
    assert child.reaped and not child.alive()


def test_an_exited_child_not_reaped_keeps_its_pid_until_killed() -> None:
    child = fork_child(lambda: None, os.getuid(), _sleeper)
    assert child.result(reap=False) == child.pid
    assert not child.reaped and os.path.exists(f"/proc/{child.pid}")  # a zombie: the pid is still its own
    child.kill()
    assert child.reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)
