"""A real af-xdp QEMU (built by tests/realclients/build-qemu.sh) as an unprivileged uid: exec and QMP hot-plug
end to end, frames both ways, and the lease following QEMU's netdev and its process.

QEMU runs as uid 65534 and, for the passing runs, with CAP_IPC_LOCK as its only capability (ambient): stock
QEMU registers 32 MiB of UMEM per queue, over the 8 MiB memlock limit here, and the broker's policy grants no
memlock raise. That is what a user with Debian's limits has to do; a QEMU rebuilt with smaller libxdp rings
would need nothing, but is not the QEMU users run. The run without the capability shows what the user is told.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, ns_name, wait_for
from .real_qemu import (
    AF_XDP_EXEC,
    MEMLOCK,
    DataPath,
    RealQemu,
    qemu_args,
    qemu_binary,
    run_qemu,
    unprivileged,
    xskbroker,
)

FRAMES = 200
# one queue at a time for the consumer: a re-attach fits only if detach really ended the first lease
POLICY = f"""\
version = 1

[[allow]]
name = "vm"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
queues = ["0"]
kinds = ["bare"]
max_queues = 1
"""


@pytest.fixture
def bed() -> Iterator[tuple[VethNamespace, BrokerProcess, DataPath, str]]:
    binary = qemu_binary()  # first: a missing build fails here, before anything is made
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=1) as ns, \
            BrokerProcess(ns.name, POLICY) as b:
        path = DataPath(ns.name, ns.peer, ns.mac(ns.inside), ns.mac(ns.peer))
        try:
            yield ns, b, path, binary
        finally:
            path.close()
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"



def run_cli(ns: VethNamespace, *args: str, ipc_lock: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*unprivileged(ns.name, ipc_lock), *xskbroker(*args)], capture_output=True, text=True,
                          timeout=60)


def exec_prefix(ns: VethNamespace, b: BrokerProcess, ipc_lock: bool) -> list[str]:
    return [*unprivileged(ns.name, ipc_lock),
            *xskbroker("exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "1", "--kind", "bare",
                       "--")]


def test_exec_runs_unprivileged_qemu_frames_both_ways_and_the_lease_ends_with_it(bed, figures) -> None:
    ns, b, path, binary = bed
    started = time.monotonic()
    with run_qemu(exec_prefix(ns, b, ipc_lock=True),
                  lambda qmp: qemu_args(binary, qmp, [*path.netdevs(), *AF_XDP_EXEC])) as vm:
        vm.wait_up()  # QEMU made its af-xdp netdev from the inherited fds before it opens QMP
        holding_ms = (time.monotonic() - started) * 1000
        path.first_frame()
        first_ms = (time.monotonic() - started) * 1000
        status = Path(f"/proc/{vm.proc.pid}/status").read_text()
        assert f"Uid:\t{CONSUMER_UID}\t{CONSUMER_UID}" in status and "CapEff:\t0000000000004000" in status
        held = b.leases()
        assert [(x["pid"], x["kind"], x["queues"]) for x in held] == [(vm.proc.pid, "bare", [0])], held
        to_qemu, from_qemu = path.to_qemu(FRAMES), path.from_qemu(FRAMES)
        assert (to_qemu, from_qemu) == (FRAMES, FRAMES), vm.log()
        assert vm.quit() == 0, vm.log()
    wait_for(lambda: not b.leases(), what="the lease to end with QEMU")
    assert any(r.get("event") == "lease-ended" and r.get("reason") == "holder exited" for r in b.records())
    figures(exec_to_qemu_holding_fds_ms=round(holding_ms, 1), exec_first_frame_ms=round(first_ms, 1),
            frames_each_way=FRAMES)


def _attach(ns: VethNamespace, b: BrokerProcess, vm: RealQemu) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    done = run_cli(ns, "qmp-attach", "--socket", b.socket_path, "--qmp", vm.qmp_path, "--id", "xdp0",
                   "--interface", ns.inside, "--queues", "1", "--json")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout), took


def _join_hub(vm: RealQemu) -> None:
    with vm.qmp() as m:
        m.execute("netdev_add", {"type": "hubport", "id": "hub-xdp0", "hubid": 0, "netdev": "xdp0"})


def _leave_hub(vm: RealQemu) -> None:
    with vm.qmp() as m:
        m.execute("netdev_del", {"id": "hub-xdp0"})


def test_qmp_attach_detach_reattach_into_a_running_unprivileged_qemu(bed, figures) -> None:
    ns, b, path, binary = bed
    with run_qemu(unprivileged(ns.name, ipc_lock=True), lambda qmp: qemu_args(binary, qmp, path.netdevs())) as vm:
        vm.wait_up()
        attached, took = _attach(ns, b, vm)
        assert attached["warnings"] == [] and attached["queues"] == [0]
        _join_hub(vm)
        assert (path.to_qemu(FRAMES), path.from_qemu(FRAMES)) == (FRAMES, FRAMES), vm.log()
        assert [x["lease"] for x in b.leases()] == [attached["lease"]]

        detached = run_cli(ns, "qmp-detach", "--socket", b.socket_path, "--qmp", vm.qmp_path, "--id", "xdp0",
                           "--json")
        assert detached.returncode == 0, detached.stdout + detached.stderr
        out = json.loads(detached.stdout)
        # qmp-detach ended the lease itself, at once: not the broker's poll seconds later
        assert out["leases_ended"] == [attached["lease"]] and out["warnings"] == [], out
        assert b.leases() == []
        ended = [r for r in b.records() if r.get("lease") == attached["lease"] and r.get("event") in
                 ("release", "lease-ended")]
        assert [(r["event"], r.get("peer", {}).get("uid")) for r in ended] == [("release", CONSUMER_UID)], ended
        assert vm.proc.poll() is None

        # the same QEMU again, within max_queues = 1: fits only because the first lease is gone
        _leave_hub(vm)
        again, _ = _attach(ns, b, vm)
        assert again["lease"] != attached["lease"]
        _join_hub(vm)
        assert (path.to_qemu(20), path.from_qemu(20)) == (20, 20), vm.log()
        assert vm.quit() == 0, vm.log()
    wait_for(lambda: not b.leases(), what="the re-attached lease to end with QEMU")
    figures(qmp_attach_ms=round(took * 1000, 1))


def test_qmp_detach_ends_only_the_lease_whose_sockets_qemu_closed(bed) -> None:
    """Two netdevs would need two queues; here one stays attached while the other's release is refused:
    a lease QEMU still holds is never ended by if_closed, so a stray qmp-detach cannot cut a live netdev."""
    ns, b, path, binary = bed
    with run_qemu(unprivileged(ns.name, ipc_lock=True), lambda qmp: qemu_args(binary, qmp, path.netdevs())) as vm:
        vm.wait_up()
        attached, _ = _attach(ns, b, vm)
        missing = run_cli(ns, "qmp-detach", "--socket", b.socket_path, "--qmp", vm.qmp_path, "--id", "xdp9",
                          "--json")
        assert missing.returncode != 0, missing.stdout  # no such netdev: QEMU's error, nothing released
        with Connection(b.socket_path) as c, pytest.raises(proto.BrokerError) as e:
            c.call(proto.Release(attached["lease"], if_closed=True))
        assert e.value.code == "lease-in-use"
        assert [x["lease"] for x in b.leases()] == [attached["lease"]]
        _join_hub(vm)
        assert path.to_qemu(20) == 20, vm.log()


def test_stock_qemu_without_ipc_lock_is_told_why_it_cannot_register_its_umem(bed) -> None:
    ns, b, path, binary = bed
    with run_qemu(exec_prefix(ns, b, ipc_lock=False),
                  lambda qmp: qemu_args(binary, qmp, [*path.netdevs(), *AF_XDP_EXEC])) as vm:
        code = vm.proc.wait(20)
        log = vm.log()
    assert code != 0, log
    # before QEMU ran, exec said what will fail and what to do, in plain words
    assert f"RLIMIT_MEMLOCK is {MEMLOCK} bytes but the UMEM needs {32 << 20}" in log, log
    assert "CAP_IPC_LOCK" in log, log
    wait_for(lambda: not b.leases(), what="the lease to end with the QEMU that failed")

    with run_qemu(unprivileged(ns.name, ipc_lock=False), lambda qmp: qemu_args(binary, qmp, path.netdevs())) as vm:
        vm.wait_up()
        done = run_cli(ns, "qmp-attach", "--socket", b.socket_path, "--qmp", vm.qmp_path, "--id", "xdp0",
                       "--interface", ns.inside, "--queues", "1")
        assert done.returncode != 0, done.stdout
        assert "RLIMIT_MEMLOCK" in done.stderr and "CAP_IPC_LOCK" in done.stderr, done.stderr
        assert b.leases() == [], done.stderr
