"""Every request prunes the watched holders: it must look at the pids that let a lease go, not at every holder.

With thousands of holders a walk of every watched pid per request (a hello, a status) cost the loop O(holders)
each time. The pidfds here are real (of this process), watched under made-up pids: the table and the watcher go
by pid, and no process has to exist for each.
"""

from __future__ import annotations

import os
import selectors
from collections.abc import Iterator

import pytest

from xskbroker.broker.holders import Holders
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.leases import LeaseTable
from xskbroker.common.procfs import pidfd_open

PIDS = range(20_000, 21_000)


class Watched:
    def __init__(self) -> None:
        self.table = LeaseTable(None)
        self.holders = Holders()
        self.sel = selectors.DefaultSelector()
        self.holders.attach(self.sel, lambda pid, start, ino: None)
        self.asked: list[int] = []
        own = pidfd_open(os.getpid())
        assert own is not None
        self.leases: dict[int, Lease] = {}
        try:
            for i, pid in enumerate(PIDS):
                self.leases[pid] = self.table.add(1000, pid, 7, "veth0", (i,), "bound", 1 << 20)
                self.watch(pid, os.dup(own))
        finally:
            os.close(own)
        self.table.let_go()  # nothing let go yet

    def watch(self, pid: int, pidfd: int) -> None:
        # what Holders.watch does once it has proven the pidfd is the holder's
        self.holders.pidfds[pid] = pidfd
        self.holders._who[pid] = (None, None)
        self.sel.register(pidfd, selectors.EVENT_READ)

    def held(self, pid: int) -> bool:
        self.asked.append(pid)
        return self.table.holds(pid)

    def prune(self) -> list[int]:
        """What a request's prune asks about."""
        self.asked = []
        self.holders.prune(self.table.let_go(), self.held, self.table.holder_count())
        return self.asked

    def close(self) -> None:
        for fd in self.holders.pidfds.values():
            os.close(fd)
        self.sel.close()


@pytest.fixture
def watched() -> Iterator[Watched]:
    w = Watched()
    yield w
    w.close()


def test_a_request_with_nothing_let_go_asks_about_no_holder(watched: Watched) -> None:
    assert watched.prune() == []
    assert len(watched.holders.pidfds) == len(PIDS)


def test_a_release_prunes_its_holder_alone(watched: Watched) -> None:
    gone = PIDS[10]
    fd = watched.holders.pidfds[gone]
    watched.table.remove(watched.leases[gone].id)
    assert watched.prune() == [gone]
    assert gone not in watched.holders.pidfds and len(watched.holders.pidfds) == len(PIDS) - 1
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_a_holder_that_let_go_and_took_again_stays_watched(watched: Watched) -> None:
    pid = PIDS[3]
    watched.table.remove(watched.leases[pid].id)
    watched.table.add(1000, pid, 8, "veth1", (0,), "bound", 1 << 20)
    assert watched.prune() == [pid]
    assert pid in watched.holders.pidfds


def test_a_holder_with_two_leases_stays_watched_until_both_end(watched: Watched) -> None:
    pid = PIDS[5]
    second = watched.table.add(1000, pid, 8, "veth1", (0,), "bound", 1 << 20)
    watched.table.remove(watched.leases[pid].id)
    assert watched.prune() == [] and pid in watched.holders.pidfds
    watched.table.remove(second.id)
    assert watched.prune() == [pid] and pid not in watched.holders.pidfds


def test_a_process_that_reuses_an_orphans_pid_is_pruned_when_its_own_last_lease_ends(watched: Watched) -> None:
    """An orphan's holder has exited: its pid holds nothing. The orphan kept the pid "holding", so a process that
    took the pid, was granted and released stayed watched (its pidfd open) until it exited."""
    pid = PIDS[7]
    watched.table.orphan(watched.leases[pid])  # its holder exited, its sockets live on elsewhere
    assert not watched.table.holds(pid) and watched.table.of_pid(pid) == []
    watched.table.add(1000, pid, 8, "veth1", (0,), "bound", 1 << 20)  # the pid's next process, granted
    assert watched.prune() == [pid] and pid in watched.holders.pidfds  # watched while it holds its own
    watched.table.remove(watched.table.of_pid(pid)[0].id)
    assert watched.prune() == [pid] and pid not in watched.holders.pidfds
    watched.table.remove(watched.leases[pid].id)  # the orphan's sockets close: it ends, no pid to let go of
    assert watched.prune() == []


def test_a_pid_watched_without_a_lease_is_still_pruned(watched: Watched) -> None:
    """A watch that came after its lease was undone: no lease let it go, but more pids are watched than hold."""
    own = pidfd_open(os.getpid())
    assert own is not None
    watched.watch(99_999, own)
    asked = watched.prune()
    assert 99_999 not in watched.holders.pidfds and 99_999 in asked
    assert watched.prune() == []  # and back to looking at nothing
