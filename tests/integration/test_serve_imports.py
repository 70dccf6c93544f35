"""What a real `xskbroker serve` imports up to its first grant (issue 13, cold start): the unit test's list
checked against the whole run, imports made at run time included (a lazy import inside serve, the first
request's handling), as PYTHONPROFILEIMPORTTIME reports them on the broker's stderr."""

from __future__ import annotations

import json
import os
import re

from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire.protocol import Geometry

from ..unit.test_cold_imports import NOT_ON_SERVE_PATH

POLICY = """\
version = 1

[[allow]]
name = "root"
users = [0]
interfaces = ["xsk*"]
kinds = ["bound"]
"""


def _imported_before_first_grants(log: str) -> list[list[str]]:
    """For each start in the log, the module names from the importtime lines that precede its first `grant` audit
    record, less the interpreter's start (`site` and what it imported: an editable install's hook brings
    pathlib)."""
    starts: list[list[str]] = []
    names: list[str] | None = []
    for line in log.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \| (\s*)(\S+)$", line)
        if m:
            if (m.group(1), m.group(2)) == ("", "site"):
                names = []
            elif names is not None:
                names.append(m.group(2))
        elif line.startswith("{") and json.loads(line).get("event") == "grant" and names is not None:
            starts.append(names)
            names = None  # what it imports after its first grant is not the cold start's
    assert starts, f"no grant record in the broker's log:\n{log[-2000:]}"
    return starts


def _grant(veth: VethNamespace, broker: BrokerProcess) -> None:
    reply, fds = request_fds(veth.inside, [0], kind="bound", geometry=Geometry(umem_size=1 << 20),
                             socket_path=broker.socket_path)
    for fd in fds:
        os.close(fd)
    assert reply["ok"] and reply["kind"] == "bound"


def test_serve_imports_nothing_it_does_not_need_before_its_first_grant(veth: VethNamespace) -> None:
    # with the UMEM pool, as shipped: its filler starts the preparer (subprocess, a helper process) only once the
    # first grant's reply is out (a first take of a geometry waits for the kick), never while that grant is made
    with BrokerProcess(veth.name, POLICY, env={"PYTHONPROFILEIMPORTTIME": "1"}, umem_pool="64MiB") as broker:
        _grant(veth, broker)
        # the next start (an idle exit, a restart) finds the policy's texts in its last good copy, parsed
        assert broker.proc is not None
        broker.proc.terminate()
        broker.proc.wait(10)
        broker.start()
        _grant(veth, broker)
        first, again = _imported_before_first_grants(broker.log())
    for loaded in (first, again):
        assert "xskbroker.broker.daemon" in loaded and "xskbroker.broker.xsk" in loaded
        assert sorted(set(loaded).intersection(NOT_ON_SERVE_PATH)) == []
    assert "tomllib" in first and "tomllib" not in again
