"""Two VMs of one uid told apart by their cgroups: each gets its own queue, and neither can take the
other's queue, see its lease, release it, or name the other's process as holder. First with stand-in
consumers (every check from inside each VM's own process), then with two real af-xdp QEMUs started by
`xskbroker exec` from inside their cgroups, moving frames on their own queues only.

The host may mount cgroup v2 beside v1 (hybrid: /sys/fs/cgroup/unified); the broker reads the "0::" line of
/proc/<pid>/cgroup, which is the path in that unified hierarchy. Each consumer is moved into its cgroup by
this (root) process before it is let go to connect.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request, request_fds
from xskbroker.testbed.sandbox import BrokerProcess, Child, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, ns_name, wait_for
from .consumers import try_grant
from .real_qemu import (
    AF_XDP_EXEC,
    DataPath,
    RealQemu,
    qemu_args,
    qemu_binary,
    run_qemu,
    steer_to_queue,
    unprivileged,
    xskbroker,
)


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
    with open("/proc/self/cgroup") as f:
        cgroup = next(line[3:].strip() for line in f if line.startswith("0::"))
    with request(iface, [queue], socket_path=path) as g:
        other_lease, other_pid = lines.readline().split()
        # its own queue (the policy allows it), but held by the other VM's process
        out = _against_the_other(path, iface, queue, other_queue, other_lease, int(other_pid), "bound")
        return {"cgroup": cgroup, "lease": g.lease, **out}


def _against_the_other(path: str, iface: str, own_queue: int, other_queue: int, other_lease: str, other_pid: int,
                       kind: str) -> dict[str, Any]:
    """What a process of one VM's uid and cgroup tries against the other VM: take its queue, see and release
    its lease, and name its process as the holder of a queue of its own."""
    out: dict[str, Any] = {"other_queue": try_grant(path, iface, [other_queue])}
    with Connection(path) as c:
        out["seen"] = [lease["lease"] for lease in c.call(proto.Status())[0]["leases"]]
        try:
            c.call(proto.Release(other_lease))
            out["release_other"] = "released"
        except proto.BrokerError as e:
            out["release_other"] = e.code
    try:
        _, fds = request_fds(iface, [own_queue], kind=kind, socket_path=path, holder_pid=other_pid)
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


# ---- two real QEMUs ---------------------------------------------------------------------------------------

def _cgroup_policy(path_a: str, path_b: str) -> str:
    """Queue 0 to whatever runs in VM A's cgroup, queue 1 to VM B's; the uid alone gets nothing."""
    return "version = 1\n" + "".join(f"""
[[allow]]
name = "vm-{name}"
users = [{CONSUMER_UID}]
cgroups = ["{path}"]
interfaces = ["xsk0"]
queues = [{queue}]
kinds = ["bare", "bound"]
max_queues = 1
""" for name, path, queue in (("a", path_a, 0), ("b", path_b, 1)))


def _in_cgroup(d: Path, argv: list[str]) -> list[str]:
    """Run argv in cgroup `d`: the (root) shell moves itself there, then execs, so everything after it,
    down to QEMU, keeps its pid and starts inside the cgroup, before it ever connects to the broker."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(d / "cgroup.procs"), *argv]


def _neighbour(gate: int, path: str, iface: str, own_queue: int, other_queue: int, other_lease: str,
               other_pid: int) -> dict[str, Any]:
    """Another process of the VM's uid in the VM's cgroup (a compromised QEMU would be one): everything it
    tries against the other VM (a bare queue its own rule allows, for the other VM's QEMU to hold)."""
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    return _against_the_other(path, iface, own_queue, other_queue, other_lease, other_pid, "bare")


def _from_cgroup(d: Path, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    rfd, wfd = os.pipe()
    child = spawn_unprivileged(fn, rfd, *args, uid=CONSUMER_UID)
    os.close(rfd)
    try:
        (d / "cgroup.procs").write_text(str(child.pid))  # before it connects: it waits for "go"
        os.write(wfd, b"go\n")
        return dict(child.result())
    finally:
        child.kill()
        os.close(wfd)


FRAMES = 100


def test_two_real_qemus_of_one_uid_in_two_cgroups(cgroups: tuple[Path, Path], figures) -> None:  # type: ignore[no-untyped-def]
    binary = qemu_binary()  # first: a missing build fails here, before anything is made
    root = cgroups[0].parent
    names = ["/" + str(d.relative_to(root)) for d in cgroups]
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, _cgroup_policy(*names)) as b, contextlib.ExitStack() as stack:
        vms: list[RealQemu] = []
        paths: list[DataPath] = []
        holding_ms: list[float] = []
        for queue, (d, tag) in enumerate(zip(cgroups, (b"XQVA", b"XQVB"), strict=True)):
            path = DataPath(ns.name, ns.peer, ns.mac(ns.inside), ns.mac(ns.peer), tag=tag)
            stack.callback(path.close)
            prefix = _in_cgroup(d, [*unprivileged(ns.name, ipc_lock=True), *xskbroker(
                "exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "1", "--start-queue",
                str(queue), "--kind", "bare", "--")])
            started = time.monotonic()
            vm = stack.enter_context(run_qemu(prefix, lambda qmp, p=path: qemu_args(binary, qmp,
                                                                                    [*p.netdevs(), *AF_XDP_EXEC])))
            vm.wait_up()  # QEMU made its af-xdp netdev from the inherited fds before it opens QMP
            holding_ms.append(round((time.monotonic() - started) * 1000, 1))
            vms.append(vm)
            paths.append(path)
        pids = [vm.proc.pid for vm in vms]
        for pid, name in zip(pids, names, strict=True):  # the QEMUs themselves: one uid, two cgroups
            assert f"0::{name}\n" in Path(f"/proc/{pid}/cgroup").read_text()
            assert f"Uid:\t{CONSUMER_UID}\t" in Path(f"/proc/{pid}/status").read_text()

        # an admin (root) sees both leases, each held by its QEMU on its own queue
        by_pid = {lease["pid"]: lease for lease in _status(b)["leases"]}
        assert sorted(by_pid) == sorted(pids), b.log()
        assert [(by_pid[p]["kind"], by_pid[p]["queues"]) for p in pids] == [("bare", [0]), ("bare", [1])]
        grants = [r for r in b.records() if r.get("event") == "grant" and r.get("decision") == "allow"]
        assert [r["peer"]["cgroup"] for r in grants] == names
        lease_ids = [by_pid[p]["lease"] for p in pids]

        # from each VM's cgroup, the same uid cannot reach the other VM
        for me, other in ((0, 1), (1, 0)):
            res = _from_cgroup(cgroups[me], _neighbour, b.socket_path, ns.inside, me, other, lease_ids[other],
                               pids[other])
            assert not res["other_queue"]["ok"] and res["other_queue"]["code"] == "queue-not-allowed", res
            assert res["seen"] == [lease_ids[me]], res  # its own VM's lease only
            assert res["release_other"] == "unknown-lease", res
            assert res["holder_other"].startswith("bad-holder: ") and "cgroup" in res["holder_other"], res
        assert sorted(lease["lease"] for lease in _status(b)["leases"]) == sorted(lease_ids)

        # frames both ways, each QEMU on its own queue only: what the peer sends to one queue never
        # reaches the other VM's QEMU
        for queue in (0, 1):
            steer_to_queue(ns, queue)
            mine, other = paths[queue], paths[1 - queue]
            mine.first_frame()
            assert (mine.to_qemu(FRAMES), mine.from_qemu(FRAMES)) == (FRAMES, FRAMES), vms[queue].log()
            assert other.to_qemu(FRAMES) == 0, vms[1 - queue].log()
        assert all(vm.proc.poll() is None for vm in vms)

        # each lease ends with its own QEMU
        for gone, vm in enumerate(vms):
            assert vm.quit() == 0, vm.log()
            wait_for(lambda gone=gone: [x["lease"] for x in _status(b)["leases"]] == lease_ids[gone + 1:],
                     what=f"VM {'ab'[gone]}'s lease to end with its QEMU, and only it")
        ended = [r["lease"] for r in b.records() if r.get("event") == "lease-ended"
                 and r.get("reason") == "holder exited"]
        assert ended == lease_ids, ended
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"
    figures(exec_to_qemu_holding_fds_ms=" ".join(map(str, holding_ms)), frames_each_way_each_vm=FRAMES)
