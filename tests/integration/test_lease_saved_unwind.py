"""A bound grant that fails after its lease was recorded (and journaled) is not granted: the lease ends with it.

Fault point "after-lease-saved" raises (a bug standing in) between the lease's journal line and the reply.
broker.boundgrants' _finish_bound then closes the sockets and empties the slots, and the client is told of an
internal error. Before, the lease stayed in the table and the journal: a lease with no socket, on its holder's
quota until that holder exited (or a restart dropped it), and listed by `status`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .grant_bed import ROOT_POLICY, SMALL, bound_queues, occupied_slots, release

# root's policy, and a quota of one queue
POLICY = ROOT_POLICY + """
[[quota]]
name = "one-queue"
users = [0]
max_queues = 1
"""


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
        wait_for(lambda: occupied_slots(veth) == [] and bound_queues(veth) == set(),
                 what="the failed grant's socket gone")
        # its queue is on nobody's quota: another queue is granted under a quota of one
        reply, fds = request_fds("xsk0", [1], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)
        release(b, reply, fds)
        assert b.leases() == []
        assert b.proc is not None and b.proc.poll() is None, b.log()
