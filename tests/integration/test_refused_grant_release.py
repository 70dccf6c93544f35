"""A queue a refused bound grant had bound is not blamed on a squatter, on the real kernel.

The grant binds its socket, then fails in broker.boundgrants' _finish_bound (fault point "after-bind", inside
the socket's finish): the broker closes the socket, and the kernel lets go of the queue in deferred work, which a
busy system runs late. The next grant of the queue that waits that out must be told the queue is still being let
go of (queue-busy), not sent after "an AF_XDP socket the broker did not make" (queue-squatted).

The late release is the kernel's own: the test holds a copy of the broker's socket (pidfd_getfd of a socket the
UMEM pool made ahead, which the grant then takes and binds), so the socket the broker closed stays bound until
the test closes its copy, as the kernel's release would hold it on a loaded machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .grant_bed import ROOT_POLICY, SMALL, bound_queues, occupied_slots, pool_metrics, release

AF_XDP = 44
SO_DOMAIN = 39
SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def _grant(b: BrokerProcess, queue: int) -> tuple[dict[str, Any], list[int]]:
    return request_fds("xsk0", [queue], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)


def _copy_xdp_sockets(pid: int) -> list[int]:
    """Copies (pidfd_getfd) of every AF_XDP socket the process holds."""
    pidfd = os.pidfd_open(pid)
    out: list[int] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue  # closed meanwhile
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)  # the family is only read below
            if s.getsockopt(socket.SOL_SOCKET, SO_DOMAIN) == AF_XDP:
                out.append(s.detach())
            else:
                s.close()
    finally:
        os.close(pidfd)
    return out


@pytest.fixture
def bed(veth: VethNamespace, tmp_path: Path) -> Iterator[tuple[VethNamespace, BrokerProcess, Path]]:
    bug = tmp_path / "bug"
    with BrokerProcess(veth.name, ROOT_POLICY, umem_pool="16MiB",
                       env={"XSKBROKER_FAULT": f"after-bind:raise={bug}"}) as b:
        yield veth, b, bug
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"


def test_a_queue_a_grant_refused_in_its_finish_bound_is_busy_not_squatted(bed) -> None:  # type: ignore[no-untyped-def]
    ns, b, bug = bed
    # the pool learns the geometry on queue 1 (a lease that ends on queue 0 would be named for it instead)
    reply, fds = _grant(b, 1)
    release(b, reply, fds)
    wait_for(lambda: pool_metrics(b)["sockets"] >= 2, timeout=10, what="the pool making sockets ahead")
    wait_for(lambda: b.leases() == [] and bound_queues(ns) == set(), what="queue 1's lease over, its socket closed")
    copies = _copy_xdp_sockets(b.pid)
    try:
        assert copies, b.fd_targets()
        taken = pool_metrics(b)["taken"]
        bug.touch()
        with pytest.raises(proto.BrokerError) as refused, Connection(b.socket_path, timeout=10) as c:
            c.call(proto.Grant("xsk0", (0,), kind="bound", geometry=SMALL))
        assert "fault injected at after-bind" in str(refused.value.reply), refused.value.reply
        bug.unlink()
        assert pool_metrics(b)["taken"] == taken + 1, "the refused grant did not bind a socket the pool made"
        # the broker closed its socket and emptied its slot; the kernel still holds the queue for it
        wait_for(lambda: occupied_slots(ns) == [], what="the refused grant's slot emptied")
        assert bound_queues(ns) == {0}
        with pytest.raises(proto.BrokerError) as busy:
            _grant(b, 0)
        error = busy.value.reply["error"]
        assert error["code"] == "queue-busy" and error.get("errno") == "EBUSY", error
        assert "a grant refused on it closed its socket" in error["message"], error
        assert "did not make" not in error["message"] and "lease" not in error, error
    finally:
        for fd in copies:
            os.close(fd)
    # the release done, the queue is granted again, and nothing of the refused grants is left
    wait_for(lambda: bound_queues(ns) == set(), what="the queue let go of")
    reply, fds = _grant(b, 0)
    release(b, reply, fds)
    assert b.leases() == [] and occupied_slots(ns) == []
