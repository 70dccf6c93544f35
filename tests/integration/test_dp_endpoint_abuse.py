"""The device-plugin endpoint under abuse, on the real kernel: a broker out of fds.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xskbroker.testbed.sandbox import VethNamespace

from .conftest import wait_for
from .loop_rig import _cpu_ticks
from .test_dp_endpoint import _broker, _endpoint


@pytest.fixture
def base() -> Iterator[str]:
    """A root-owned 0755 directory under /tmp (others may enter it, as DPDK must)."""
    d = tempfile.mkdtemp(prefix="xd-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_out_of_fds_a_pending_dp_connection_does_not_make_the_loop_spin(veth: VethNamespace, base: str,
                                                                          figures: Any) -> None:
    """accept(2) on the endpoint's listener failing EMFILE left the connection queued and the listener readable:
    the loop woke at once, every round, for as long as the connection waited (the broker's own listener takes such
    a connection with a spare fd and closes it). The connector must see its connection end, the broker must idle,
    and serve the endpoint again once fds are free."""
    path = f"{base}/dp.sock"
    with _broker(veth, *_endpoint(path, uid=0)) as b:
        settled = b.settled_fds(quiet=0.5)
        os.system(f"prlimit --pid {b.pid} --nofile={settled}:{20000}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(3)
            s.connect(path)  # queued in the listener's backlog: the broker has no fd to take it with
            utime0 = _cpu_ticks(b.pid)
            time.sleep(2.0)
            cpu = (_cpu_ticks(b.pid) - utime0) / os.sysconf("SC_CLK_TCK") / 2.0
            try:
                s.send(b"/connect,h")
                ended = s.recv(128) == b""
            except OSError:
                ended = True
        finally:
            s.close()
        figures(broker_cpu_share=round(cpu, 2), dp_accept_failed=len(b.records("dp-accept-failed")))
        assert cpu < 0.5, f"the broker used {cpu:.0%} of a CPU while the endpoint's accept failed"
        assert ended, "the pending connection was neither served nor ended"
        os.system(f"prlimit --pid {b.pid} --nofile=4096:20000")
        wait_for(lambda: _handshake_ok(path), what="the endpoint to serve again")


def _handshake_ok(path: str) -> bool:
    from xskbroker.testbed.dpdk_like import handshake

    got = handshake(path, "xsk0", timeout=2.0)
    if got["fd"] is not None:
        os.close(got["fd"])
    return got.get("map") == b"/fd_ack"
