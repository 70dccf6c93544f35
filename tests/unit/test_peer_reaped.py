"""A connector reaped before the broker reads its identity, as Linux 6.5-6.15 tell it: SO_PEERPIDFD fails EINVAL
(pidfd_prepare: the struct pid has no task any more). Linux 6.16 made it ESRCH, 6.18 gives a pidfd of the
exited process; this machine's kernel can no longer say EINVAL, so the socket here answers as those kernels do
(measured on 6.8: "reaped peer: rc=-1 errno=22"), and the pid SO_PEERCRED named is a live process: the one that
took the pid since.

Either way the connector has exited: it must be refused as exited (never judged with no cgroup and no start
time, which lifts the cgroup check on holder_pid), and its pid never opened bare in its place.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from xskbroker.broker import peer
from xskbroker.common.procfs import SO_PEERPIDFD


class ReapedPeerSocket:
    """Answers SO_PEERPIDFD as Linux 6.5-6.15 do for a peer that has been reaped."""

    def getsockopt(self, level: int, opt: int, size: int = 0) -> bytes:
        if level == socket.SOL_SOCKET and opt == SO_PEERPIDFD:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        raise AssertionError(f"unexpected getsockopt {level} {opt}")


@pytest.fixture
def new_owner() -> Iterator[int]:
    """A live process: the one that took the connector's pid."""
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_reaped_connector_is_judged_as_exited(new_owner: int) -> None:
    assert peer._peer_identity(ReapedPeerSocket(), new_owner) is None  # type: ignore[arg-type]


def test_a_reaped_connectors_pid_is_never_opened_in_its_place(new_owner: int) -> None:
    pidfd = peer.peer_pidfd(ReapedPeerSocket(), new_owner)  # type: ignore[arg-type]
    if pidfd is not None:
        os.close(pidfd)
    assert pidfd is None, f"a pidfd of pid {new_owner}'s new owner was taken for the reaped connector"
