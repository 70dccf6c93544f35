"""A bound grant that fails after its lease was recorded (and journaled) is not granted: the lease ends with it.

Fault point "after-lease-saved" raises (a bug standing in) between the lease's journal line and the reply.
broker.boundgrants' _finish_bound then closes the sockets and empties the slots, and the client is told of an
internal error. Before, the lease stayed in the table and the journal: a lease with no socket, on its holder's
quota until that holder exited (or a restart dropped it), and listed by `status`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xskbroker.broker import xdp_prog, xsk, xskdiag
from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import wait_for

POLICY = """\
version = 1

[[allow]]
name = "root"
users = [0]
interfaces = ["xsk*"]
kinds = ["bound"]
max_umem = "16MiB"

[[quota]]
name = "one-queue"
users = [0]
max_queues = 1

[admin]
users = [0]
"""
SMALL = proto.Geometry(umem_size=1 << 20, fill=64, completion=64, rx=64, tx=64)


def _slots(ns: VethNamespace) -> list[int]:
    with in_netns(ns.name):
        prog = xdp_prog.find_or_attach(ifindex("xsk0"), "xsk0", 2)
        try:
            return xsk.occupied_slots(prog.map_fd, 2)
        finally:
            prog.close()


def _bound(ns: VethNamespace) -> set[int]:
    with in_netns(ns.name):
        return xskdiag.xsk_queues(ifindex("xsk0"))


def test_a_grant_failing_after_its_lease_was_saved_leaves_no_lease(veth: VethNamespace, tmp_path: Path) -> None:
    bug = tmp_path / "bug"
    with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"after-lease-saved:raise={bug}"}) as b:
        bug.touch()
        with pytest.raises(proto.BrokerError) as failed, Connection(b.socket_path, timeout=10) as c:
            c.call(proto.Grant("xsk0", (0,), kind="bound", geometry=SMALL))
        assert failed.value.code == "internal-error", failed.value.reply
        bug.unlink()
        # no lease listed, none journaled live, nothing of it in the kernel
        assert b.leases() == []
        journal = [json.loads(line) for line in Path(b.workdir, "leases.jsonl").read_text().splitlines()]
        saved = [x["lease"]["id"] for x in journal if "lease" in x]
        assert len(saved) == 1 and {"end": saved[0]} in journal, journal
        wait_for(lambda: _slots(veth) == [] and _bound(veth) == set(), what="the failed grant's socket gone")
        # its queue is on nobody's quota: another queue is granted under a quota of one
        reply, fds = request_fds("xsk0", [1], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)
        for fd in fds:
            os.close(fd)
        with Connection(b.socket_path) as c:
            c.call(proto.Release(reply["lease"]))
        assert b.leases() == []
        assert b.proc is not None and b.proc.poll() is None, b.log()
