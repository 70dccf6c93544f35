"""A client chooses parts of its own identity: whoever owns a delegated cgroup v2 subtree (every user's
systemd session does) names cgroups with any bytes but '/' and newline. The broker reads that name on every
connection; one that is not UTF-8 must get a clear refusal, never an exception in the accept path, which
would end the broker (and every other client's service) at each connect."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID
from .test_vm_identity import _unified

POLICY = f"""version = 1

[[allow]]
name = "consumer"
users = [{CONSUMER_UID}]
interfaces = ["xsk*"]
"""


def _connect_when_placed(path: str, gate: int) -> dict[str, Any]:
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    with open("/proc/self/cgroup", "rb") as f:
        cgroup = next(line[3:].strip() for line in f if line.startswith(b"0::"))
    try:
        with Connection(path) as c:
            reply, _ = c.call(proto.Hello())
        return {"cgroup": cgroup, "ok": True, "reply": reply}
    except proto.BrokerError as e:
        return {"cgroup": cgroup, "ok": False, "code": e.code, "message": e.message}
    except ConnectionError as e:
        return {"cgroup": cgroup, "ok": False, "code": "connection-error", "message": str(e)}


def test_a_cgroup_named_with_bytes_that_are_not_utf8_is_refused_clearly_and_the_broker_lives_on(
        veth: VethNamespace) -> None:
    root = _unified()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    bad = Path(os.fsdecode(os.fsencode(str(root)) + f"/xskt{os.getpid()}-".encode() + b"\xff\xfe"))
    bad.mkdir()
    try:
        with BrokerProcess(veth.name, POLICY) as b:
            rfd, wfd = os.pipe()
            child = spawn_unprivileged(_connect_when_placed, b.socket_path, rfd, uid=CONSUMER_UID)
            os.close(rfd)
            try:
                (bad / "cgroup.procs").write_text(str(child.pid))  # placed before it connects
                os.write(wfd, b"go\n")
                result = child.result()
            finally:
                child.kill()
                os.close(wfd)
            assert result["cgroup"].endswith(b"\xff\xfe"), result
            assert not result["ok"], result
            assert result["code"] == "identity-unreadable", result
            assert "not valid UTF-8" in result["message"]
            # the broker is alive and serves the next client (root: an admin)
            assert b.proc is not None and b.proc.poll() is None, b.log()
            with Connection(b.socket_path) as c:
                assert c.call(proto.Status())[0]["leases"] == []
            refused = [r for r in b.records() if r.get("event") == "connection-refused"]
            assert refused and refused[-1]["code"] == "identity-unreadable", b.log()
    finally:
        bad.rmdir()
