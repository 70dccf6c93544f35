"""Waiting grants retry their binds (each takes the kernel's rtnl lock, as does the deferred work that frees a
closed socket's queue) at most RETRIES_PER_SECOND times a second together: every 2 ms each, dozens of them starved
that work on a busy machine, and the queues they waited for stayed busy past the 1 s wait (the 200-client load
test beside two CPU hogs: 125-644 refusals in five runs; 0-80 in four with the retries spread)."""

from __future__ import annotations

from xskbroker.broker.server import RETRIES_PER_SECOND, RETRY_CAP, retry_cap


def test_one_waiting_grant_still_retries_every_couple_of_milliseconds() -> None:
    assert retry_cap(1) == RETRY_CAP == 0.002  # a just-closed queue is re-granted within ~2 ms of its release


def test_many_waiting_grants_together_stay_under_the_retry_rate() -> None:
    for waiting in (1, 6, 7, 64, 200, 1024):
        assert waiting / retry_cap(waiting) <= RETRIES_PER_SECOND + 1e-9, waiting
    assert retry_cap(64) > 0.02  # the spacing measured to let the kernel's release through, 64 queues waiting
