"""A real QEMU 10.2.2 as a map consumer: `-netdev af-xdp,…,inhibit=on,map-path=<pin>,map-start-index=N`
opens the tenant map the broker pinned for it and writes its own AF_XDP sockets into slot queue_index + N.

QEMU runs through `xskbroker exec --kind map` (QEMU's pid is the lease holder) as uid 65534 with exactly the
capabilities its map-path mode needs (net/af-xdp.c in 10.2.2: it creates its UMEM and sockets itself, so
socket(AF_XDP) takes CAP_NET_RAW; its 32 MiB UMEM per queue is over the 8 MiB memlock limit, so
CAP_IPC_LOCK; bpf_obj_get of the pin and the map update need no capability on Linux >= 5.19, only the
pin's file permissions). Queue 1 of a two-queue veth, so map-start-index must be the start queue: the
broker's per-queue program redirects to slot rx_queue_index of the queue's map.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, ns_name, wait_for
from .real_qemu import DataPath, RealQemu, qemu_args, qemu_binary, run_qemu, steer_to_queue, unprivileged, xskbroker

OTHER_UID = 65532
QUEUE = 1
FRAMES = 200
POLICY = f"""\
version = 1

[[allow]]
name = "vm-map"
users = [{CONSUMER_UID}, {OTHER_UID}]
interfaces = ["xsk0"]
queues = ["{QUEUE}"]
kinds = ["map"]
max_queues = 1

[admin]
users = [0]
"""
AF_XDP_MAP = ["-netdev", "af-xdp,id=xdp0,ifname={ifname},queues={queues},start-queue={start_queue},inhibit=on,"
              "map-path={map_path},map-start-index={start_queue}", "-netdev", "hubport,id=hub-xdp0,hubid=0,netdev=xdp0"]


@dataclass
class Bed:
    ns: VethNamespace
    broker: BrokerProcess
    path: DataPath
    binary: str
    pin_root: str

    @property
    def pin(self) -> str:
        return f"{self.pin_root}/{CONSUMER_UID}/{self.ns.inside}/xsks_map"

    def leases(self) -> list[dict[str, Any]]:
        with Connection(self.broker.socket_path) as c:
            return list(c.call(proto.Status())[0]["leases"])

    def exec_prefix(self, net_raw: bool = True) -> list[str]:
        return [*unprivileged(self.ns.name, ipc_lock=True, net_raw=net_raw),
                *xskbroker("exec", "--socket", self.broker.socket_path, "--kind", "map", "--interface",
                           self.ns.inside, "--queues", "1", "--start-queue", str(QUEUE), "--")]

    def qemu(self, net_raw: bool = True) -> Any:
        return run_qemu(self.exec_prefix(net_raw),
                        lambda qmp: qemu_args(self.binary, qmp, [*self.path.netdevs(), *AF_XDP_MAP]))


@pytest.fixture
def bed() -> Iterator[Bed]:
    binary = qemu_binary()  # first: a missing build fails here, before anything is made
    root = tempfile.mkdtemp(prefix="xp-bpffs-")  # under /tmp: every uid can reach it; the pins inside are 0700
    os.chmod(root, 0o755)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0755", "bpf", root], check=True)
    try:
        with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
                BrokerProcess(ns.name, POLICY, extra_args=["--pin-root", root]) as b:
            steer_to_queue(ns, QUEUE)
            path = DataPath(ns.name, ns.peer, ns.mac(ns.inside), ns.mac(ns.peer))
            try:
                yield Bed(ns, b, path, binary, root)
            finally:
                path.close()
            assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"
    finally:
        subprocess.run(["umount", root], check=False)
        os.rmdir(root)


def _open_pin(path: str) -> str:
    import errno

    from xskbroker.broker import bpfsys
    try:
        os.close(bpfsys.obj_get(path))
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def _grant_record(b: BrokerProcess) -> dict[str, Any]:
    return next(r for r in b.records() if r.get("event") == "grant" and r.get("decision") == "allow")


def _start(bed: Bed, vm: RealQemu) -> float:
    """Wait for QEMU's first frame, sending one every 2 ms from the moment it starts: ms from the grant (its
    audit record's wall-clock time, written once the tenant map is placed) to that frame."""
    bed.path.first_frame(timeout=20.0, interval=0.002)
    arrived = time.time()
    assert vm.proc.poll() is None, vm.log()
    return (arrived - _grant_record(bed.broker)["ts"]) * 1000


def test_qemu_opens_its_pinned_map_and_moves_frames_both_ways_and_the_lease_ends_with_it(bed: Bed, figures) -> None:
    launched = time.time()
    with bed.qemu() as vm:
        grant_to_frame = _start(bed, vm)
        exec_to_frame = (time.time() - launched) * 1000
        status = Path(f"/proc/{vm.proc.pid}/status").read_text()
        # uid 65534 with CAP_NET_RAW (13) and CAP_IPC_LOCK (14) only
        assert f"Uid:\t{CONSUMER_UID}\t{CONSUMER_UID}" in status and "CapEff:\t0000000000006000" in status, status
        held = bed.leases()
        assert [(x["pid"], x["kind"], x["queues"]) for x in held] == [(vm.proc.pid, "map", [QUEUE])], held
        assert (bed.path.to_qemu(FRAMES), bed.path.from_qemu(FRAMES)) == (FRAMES, FRAMES), vm.log()

        st = os.stat(bed.pin)  # the tenant's, 0600, in its 0700 directory: another uid cannot open it
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (CONSUMER_UID, 0o600)
        assert spawn_unprivileged(_open_pin, bed.pin, uid=OTHER_UID).result() == "EACCES"
        assert spawn_unprivileged(_open_pin, bed.pin, uid=CONSUMER_UID).result() == "ok"
        assert vm.quit() == 0, vm.log()
        log = vm.log()
    wait_for(lambda: not bed.leases(), what="the lease to end with QEMU")
    ended = [r for r in bed.broker.records() if r.get("event") == "lease-ended"]
    assert [r.get("reason") for r in ended] == ["holder exited"], ended
    assert not os.path.exists(bed.pin) and os.listdir(f"{bed.pin_root}/{CONSUMER_UID}") == []
    assert "unable to remove" not in log, log  # QEMU's own cleanup deleted its slot
    figures(map_grant_ms=_grant_record(bed.broker)["ms"], grant_to_qemu_first_frame_ms=round(grant_to_frame, 1),
            exec_to_qemu_first_frame_ms=round(exec_to_frame, 1), frames_each_way=FRAMES)


def test_a_revoke_leaves_qemus_queue_steering_nothing(bed: Bed) -> None:
    with bed.qemu() as vm:
        _start(bed, vm)
        assert bed.path.to_qemu(50) == 50, vm.log()
        lease = bed.leases()[0]["lease"]
        with Connection(bed.broker.socket_path) as c:
            revoked, _ = c.call(proto.Revoke(lease=lease))
        assert revoked["revoked"][0]["ended"] is True, revoked
        assert [r["queues"] for r in bed.broker.records() if r.get("event") == "map-unplaced"] == [[QUEUE]]
        assert bed.leases() == [] and not os.path.exists(bed.pin)
        # QEMU lives on with its sockets and its copy of the map, which no longer steers anything
        assert bed.path.to_qemu(50) == 0 and vm.proc.poll() is None, vm.log()
        # the kernel cannot unbind a socket: QEMU can still transmit until it closes it (as for every kind)
        assert bed.path.from_qemu(20) == 20, vm.log()
        assert vm.quit() == 0, vm.log()


def test_without_map_start_index_qemu_writes_slot_0_and_its_queue_steers_nothing(bed: Bed) -> None:
    """QEMU writes slot queue_index + map-start-index, not the absolute queue (start-queue is not added): for
    queue 1 without map-start-index=1 its socket sits in slot 0 of its map, which queue 1 never looks at (and
    the map is only at outer[1], so queue 0 does not see it either). The recipe needs both."""
    netdev = [AF_XDP_MAP[0], AF_XDP_MAP[1].replace(",map-start-index={start_queue}", ""), *AF_XDP_MAP[2:]]
    with run_qemu(bed.exec_prefix(), lambda qmp: qemu_args(bed.binary, qmp, [*bed.path.netdevs(), *netdev])) as vm:
        vm.wait_up()
        assert [x["pid"] for x in bed.leases()] == [vm.proc.pid]
        assert bed.path.to_qemu(50) == 0 and vm.proc.poll() is None, vm.log()
        assert vm.quit() == 0, vm.log()


def test_qemu_without_cap_net_raw_is_told_before_it_runs_and_fails_cleanly(bed: Bed) -> None:
    """map-path= makes QEMU create its own AF_XDP sockets: that takes CAP_NET_RAW, which no broker can lend."""
    with bed.qemu(net_raw=False) as vm:
        code = vm.proc.wait(20)
        log = vm.log()
    # socket(AF_XDP) fails with EPERM (strace), and QEMU 10.2.2 then crashes in its own error path (it frees
    # the UMEM buffer in af_xdp_umem_create and again in af_xdp_cleanup) before printing anything: exec's
    # warning, before QEMU ran, is the only explanation the user gets
    assert code == -signal.SIGSEGV, (code, log)
    assert "without CAP_NET_RAW" in log and "bare grant" in log, log
    assert "RLIMIT_MEMLOCK" not in log, log  # it has CAP_IPC_LOCK: no false alarm
    wait_for(lambda: not bed.leases(), what="the lease to end with the QEMU that failed")
    assert not os.path.exists(bed.pin)


def test_map_path_without_a_pin_is_refused_before_qemu_runs(bed: Bed) -> None:
    """A broker without --pin-root pins nothing: exec says so, does not start QEMU, and leaves no lease."""
    with BrokerProcess(bed.ns.name, POLICY) as b:
        done = subprocess.run([*unprivileged(bed.ns.name, ipc_lock=True, net_raw=True),
                               *xskbroker("exec", "--socket", b.socket_path, "--kind", "map", "--interface",
                                          bed.ns.inside, "--queues", "1", "--start-queue", str(QUEUE), "--",
                                          "/bin/true", "map-path={map_path}")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done
        assert "cannot fill {map_path}" in done.stderr and "--pin-root" in done.stderr, done.stderr
        with Connection(b.socket_path) as c:
            wait_for(lambda: not c.call(proto.Status())[0]["leases"], what="the lease to end with exec")
