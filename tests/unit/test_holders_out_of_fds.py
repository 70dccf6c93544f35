"""A broker out of fds cannot open a holder's pidfd: that says nothing about whether the holder lives.

Taking it for an exit ended (or orphaned) live holders' leases whenever the broker's fds ran out. Now the
pidfd calls raise, the holder is kept as unwatched and watched again once an fd is free; the processes and
the fd exhaustion here are real.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from xskbroker.broker.holders import Holders
from xskbroker.broker.kernel import LinuxKernel
from xskbroker.broker.peer import peer_pidfd
from xskbroker.common.procfs import pidfd_ino, pidfd_open, pinned_start

from ..fds import out_of_fds


@pytest.fixture
def child() -> Iterator[tuple[int, int, int | None]]:
    """A live process and its identity (pid, start time, pidfs inode)."""
    proc = subprocess.Popen(["sleep", "60"])
    pidfd = pidfd_open(proc.pid)
    assert pidfd is not None
    start, ino = pinned_start(pidfd, proc.pid), pidfd_ino(pidfd)
    os.close(pidfd)
    assert start is not None
    yield proc.pid, start, ino
    proc.kill()
    proc.wait()


class Watcher:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.exits: list[tuple[int, int | None, int | None]] = []
        self.holders = Holders()
        self.holders.attach(self.sel, lambda pid, start, ino: self.exits.append((pid, start, ino)))

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.exits and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.05):
                key.data(key.fd)


@pytest.fixture
def watcher() -> Iterator[Watcher]:
    w = Watcher()
    yield w
    w.holders.close()
    w.sel.close()


def test_pidfd_open_raises_when_out_of_fds_and_is_none_only_for_no_such_process() -> None:
    with out_of_fds(), pytest.raises(OSError) as e:
        pidfd_open(os.getpid())
    assert e.value.errno == 24  # EMFILE: not "no such process"
    fd = pidfd_open(os.getpid())
    assert fd is not None
    os.close(fd)


def test_a_bare_holder_is_kept_unwatched_not_ended_then_watched_when_fds_are_back(
        watcher: Watcher, child: tuple[int, int, int | None]) -> None:
    pid, start, ino = child
    with out_of_fds():
        watcher.holders.watch(pid, None, start, ino)
    assert watcher.exits == []  # it lives: its leases must stay
    assert watcher.holders.unwatched == {pid: (start, ino)}
    watcher.holders.prune([], lambda p: p == pid, 1)  # a request's prune, fds free again
    assert pid in watcher.holders.pidfds and not watcher.holders.unwatched
    os.kill(pid, signal.SIGKILL)
    watcher.run(5.0)
    assert watcher.exits == [(pid, start, ino)]  # and its exit is told once it happens


def test_the_peer_of_a_connection_is_kept_unwatched_when_so_peerpidfd_fails_for_want_of_fds(
        watcher: Watcher) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        own = pidfd_open(os.getpid())
        assert own is not None
        start, ino = pinned_start(own, os.getpid()), pidfd_ino(own)
        os.close(own)
        with out_of_fds(), pytest.raises(OSError):
            peer_pidfd(a, os.getpid())
        with out_of_fds():
            watcher.holders.watch(os.getpid(), a, start, ino)
        assert watcher.exits == []
        assert os.getpid() in watcher.holders.unwatched


def test_an_unwatched_holder_whose_pid_now_names_another_process_is_told_exited(
        watcher: Watcher, child: tuple[int, int, int | None]) -> None:
    pid, start, ino = child
    with out_of_fds():
        watcher.holders.watch(pid, None, start - 1, None)  # as recorded for an earlier process with this pid
    assert watcher.exits == []
    watcher.holders.watch(pid, None, start, ino)  # a lease of the process that has the pid now
    assert watcher.exits == [(pid, start - 1, None)]
    assert pid in watcher.holders.pidfds


def test_an_unwatched_holder_that_exited_meanwhile_is_told_at_the_next_prune(
        watcher: Watcher, child: tuple[int, int, int | None]) -> None:
    pid, start, ino = child
    with out_of_fds():
        watcher.holders.watch(pid, None, start, ino)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    watcher.holders.prune([], lambda p: p == pid, 1)
    assert watcher.exits == [(pid, start, ino)]
    assert not watcher.holders.unwatched and pid not in watcher.holders.pidfds


def test_the_kernel_layer_says_it_cannot_tell_rather_than_gone(child: tuple[int, int, int | None]) -> None:
    pid, start, ino = child
    kernel = LinuxKernel()
    assert kernel.holder_alive(pid, start, ino)
    with out_of_fds(), pytest.raises(OSError):
        kernel.holder_alive(pid, start, ino)
    with out_of_fds(), pytest.raises(OSError):
        kernel.holder(pid)
