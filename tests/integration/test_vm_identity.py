"""Two "VMs" of one uid told apart by their cgroups: each gets its own queue, and neither can take the
other's queue, see its lease, release it, or name the other's process as holder.

The host may mount cgroup v2 beside v1 (hybrid: /sys/fs/cgroup/unified); the broker reads the "0::" line of
/proc/<pid>/cgroup, which is the path in that unified hierarchy. Each consumer is moved into its cgroup by
this (root) process before it is let go to connect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request, request_fds
from xskbroker.testbed.sandbox import BrokerProcess, Child, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .consumers import try_grant


def _unified() -> Path | None:
    """The cgroup v2 hierarchy: /sys/fs/cgroup itself on a unified host, /sys/fs/cgroup/unified on a hybrid one."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", *mounts):
        if path in mounts:
            return Path(path)
    return None


@pytest.fixture
def cgroups() -> Iterator[tuple[Path, Path]]:
    root = _unified()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    made = [root / f"xskt{os.getpid()}-vm-{x}" for x in "ab"]
    for d in made:
        d.mkdir()
    try:
        yield made[0], made[1]
    finally:
        for d in made:
            d.rmdir()  # empty by now: every child was killed and reaped


def _vm(path: str, iface: str, gate: int, queue: int, other_queue: int) -> dict[str, Any]:
    """One VM: wait to be placed in its cgroup, take its queue, then (told the other's lease and pid) try
    everything that belongs to the other VM."""
    lines = os.fdopen(gate, "r")
    if lines.readline().strip() != "go":
        raise RuntimeError("no go")
    out: dict[str, Any] = {}
    with open("/proc/self/cgroup") as f:
        out["cgroup"] = next(line[3:].strip() for line in f if line.startswith("0::"))
    with request(iface, [queue], socket_path=path) as g:
        out["lease"] = g.lease
        other_lease, other_pid = lines.readline().split()
        out["other_queue"] = try_grant(path, iface, [other_queue])
        with Connection(path) as c:
            out["seen"] = [lease["lease"] for lease in c.call(proto.Status())[0]["leases"]]
            try:
                c.call(proto.Release(other_lease))
                out["release_other"] = "released"
            except proto.BrokerError as e:
                out["release_other"] = e.code
        try:  # its own queue (the policy allows it), but held by the other VM's process
            _, fds = request_fds(iface, [queue], kind="bound", socket_path=path, holder_pid=int(other_pid))
            for fd in fds:
                os.close(fd)
            out["holder_other"] = "granted"
        except proto.BrokerError as e:
            out["holder_other"] = f"{e.code}: {e.message}"
    return out


def _status(b: BrokerProcess) -> dict[str, Any]:
    with Connection(b.socket_path) as c:  # as root, an admin: every lease
        return c.call(proto.Status())[0]


def test_two_vms_of_one_uid_in_two_cgroups(veth: VethNamespace, cgroups: tuple[Path, Path], figures) -> None:  # type: ignore[no-untyped-def]
    root = cgroups[0].parent
    path_a, path_b = ("/" + str(d.relative_to(root)) for d in cgroups)
    policy = f"""version = 1

[[allow]]
name = "vm-a"
users = [{CONSUMER_UID}]
cgroups = ["{path_a}"]
interfaces = ["xsk*"]
queues = [0]

[[allow]]
name = "vm-b"
users = [{CONSUMER_UID}]
cgroups = ["{path_b}*"]
interfaces = ["xsk*"]
queues = [1]
"""
    with BrokerProcess(veth.name, policy) as b:
        children: list[Child] = []
        gates: list[int] = []
        try:
            for d, queue in zip(cgroups, (0, 1), strict=True):
                rfd, wfd = os.pipe()
                child = spawn_unprivileged(_vm, b.socket_path, veth.inside, rfd, queue, 1 - queue, uid=CONSUMER_UID)
                os.close(rfd)
                children.append(child)
                gates.append(wfd)
                (d / "cgroup.procs").write_text(str(child.pid))  # before it connects: it waits for "go"
                os.write(wfd, b"go\n")
            wait_for(lambda: len(_status(b)["leases"]) == 2 or not all(c.alive() for c in children),
                     what="both VMs' leases")
            by_pid = {lease["pid"]: lease for lease in _status(b)["leases"]}
            assert set(by_pid) == {c.pid for c in children}, b.log()
            assert [by_pid[c.pid]["queues"] for c in children] == [[0], [1]]
            for me, other in ((0, 1), (1, 0)):
                them = children[other]
                os.write(gates[me], f"{by_pid[them.pid]['lease']} {them.pid}\n".encode())
            results = [c.result() for c in children]
            # a process of the same uid outside both cgroups: no rule names it
            stranger = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        finally:
            for c in children:
                c.kill()
            for fd in gates:
                os.close(fd)
        for me, (res, d) in enumerate(zip(results, (path_a, path_b), strict=True)):
            mine, theirs = by_pid[children[me].pid], by_pid[children[1 - me].pid]
            assert res["cgroup"] == d
            assert res["lease"] == mine["lease"]
            assert not res["other_queue"]["ok"] and res["other_queue"]["code"] == "queue-not-allowed", res
            assert res["seen"] == [mine["lease"]], res  # its own lease only, never the other VM's
            assert res["release_other"] == "unknown-lease", res
            assert res["holder_other"].startswith("bad-holder: "), res
            assert "not in the requester's cgroup" in res["holder_other"]
            assert theirs["lease"] not in res["seen"]
        assert not stranger["ok"] and stranger["code"] == "user-not-allowed", stranger
        assert "allows cgroups" in stranger["message"]
        grants = [r for r in b.records() if r.get("event") == "grant" and r.get("decision") == "allow"]
        assert sorted(r["peer"]["cgroup"] for r in grants) == [path_a, path_b]
        figures(vms=2, uid=CONSUMER_UID, cgroups=f"{path_a} {path_b}", hierarchy=str(root))
