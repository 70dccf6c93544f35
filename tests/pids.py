"""Choosing the next pid (root: /proc/sys/kernel/ns_last_pid), one test process at a time.

Four test files land a child on a chosen pid by writing pid - 1 there right before a fork, retried until it
lands. Two xdist workers doing it at once overwrite each other's choice between the write and the fork, and
can take each other's pids: one such loop ran out of its 20,000 tries in a full parallel run."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

LOCK = "/run/xskbroker-test-ns_last_pid.lock"


@contextlib.contextmanager
def choosing_pids() -> Iterator[None]:
    """Held while this process writes ns_last_pid and forks. A POSIX record lock: the children forked under it
    do not inherit it, so a landed child that lives on does not keep the others waiting."""
    with open(LOCK, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
