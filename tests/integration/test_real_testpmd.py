"""A real DPDK testpmd (Debian trixie's 24.11.8, af_xdp PMD with dp_path=) through the broker's device-plugin
endpoint, on the real kernel: as uid 65534 with CAP_NET_RAW only it gets its map at the endpoint and moves
frames both ways (macswap: every frame the veth peer sends comes back with its addresses swapped); a revoke
stops frames reaching it; two tenants on two queues of one interface each see only their own queue's
frames; a root testpmd's exit does not take the broker's program off the interface (its bpf_link holds it).

testpmd runs in the trixie tree made by tests/realclients/build-testpmd.sh (see real_testpmd.py).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xskbroker.broker import xdp_prog
from xskbroker.client.connection import Connection
from xskbroker.testbed.links import in_netns
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name, wait_for
from .real_testpmd import CAP_NET_RAW, RunningPmd, af_xdp_vdev, dpdk_tree, eal_args, hugepages_reserved, launch_argv

OTHER_UID = 65532
ETH_P = 0x88B5  # local experimental
HEAD = struct.Struct("!6s6sH4sI")  # dst, src, ethertype, tag, seq
POLICY = f"""\
version = 1

[[allow]]
name = "dpdk"
users = [{CONSUMER_UID}, {OTHER_UID}, 0]
interfaces = ["xsk0"]
kinds = ["map"]

[admin]
users = [0]
"""


class Peer:
    """A raw socket on the veth's far end: sends tagged frames to the interface from a given CPU (so they
    reach the RX queue that CPU maps to) and counts what comes back with the addresses swapped."""

    def __init__(self, veth: VethNamespace) -> None:
        with in_netns(veth.name):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P))
            self.sock.bind((veth.peer, ETH_P))
        self.mac = self.sock.getsockname()[4]
        self.dst = veth.mac(veth.inside)
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    @contextlib.contextmanager
    def on_cpu(self, cpu: int) -> Iterator[None]:
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            yield
        finally:
            os.sched_setaffinity(0, old)

    def send(self, tag: bytes, seq: int) -> None:
        self.sock.send(HEAD.pack(self.dst, self.mac, ETH_P, tag, seq).ljust(64, b"\0"))

    def back(self, timeout: float) -> list[tuple[bytes, int]]:
        """(tag, seq) of each swapped frame that arrives before the first lull of `timeout`."""
        out = []
        while select.select([self.sock], [], [], timeout)[0]:
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING or len(data) < HEAD.size:
                continue
            dst, src, _, tag, seq = HEAD.unpack_from(data)
            if dst == self.mac and src == self.dst:  # macswap's reply
                out.append((tag, seq))
        return out

    def first_reply(self, cpu: int, timeout: float = 30.0) -> float:
        """Probe every millisecond until a probe comes back; the wall-clock time of that reply."""
        deadline = time.monotonic() + timeout
        seq = 0
        with self.on_cpu(cpu):
            while time.monotonic() < deadline:
                self.send(b"PING", seq)
                seq += 1
                if any(t == b"PING" for t, _ in self.back(0.001)):
                    when = time.time()
                    self.back(0.2)  # probes still on their way: not counted by what follows
                    return when
        raise AssertionError(f"no probe from CPU {cpu} came back within {timeout}s")

    def exchange(self, count: int, tag: bytes, cpu: int, idle: float = 0.5) -> dict[bytes, int]:
        """Send `count` frames (paced by the replies, 32 in flight) and count what comes back, per tag."""
        got: dict[bytes, int] = {}
        with self.on_cpu(cpu):
            sent = 0
            while sent < count:
                for _ in range(min(32, count - sent)):
                    self.send(tag, sent)
                    sent += 1
                for t, _ in self.back(0.02):
                    got[t] = got.get(t, 0) + 1
            for t, _ in self.back(idle):
                got[t] = got.get(t, 0) + 1
        got.pop(b"PING", None)  # late probes
        return got


@pytest.fixture(autouse=True)
def hugepages() -> Iterator[None]:
    with hugepages_reserved():
        yield


@pytest.fixture
def veth() -> Iterator[VethNamespace]:
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns:
        # no IPv6 on the pair: its router solicitations and reports would land in testpmd's counters
        subprocess.run(["ip", "netns", "exec", ns.name, "sh", "-c", "for d in all default xsk0 xsk0p; do "
                        "sysctl -qw net.ipv6.conf.$d.disable_ipv6=1; done"], check=True)
        yield ns


def _endpoint(base: str, uid: int, queue: int) -> tuple[list[str], str]:
    sockdir = f"{base}/q{queue}"
    return ["--device-plugin", f"interface=xsk0,user={uid},queues={queue},path={sockdir}/afxdp.sock"], sockdir




def _program(veth: VethNamespace) -> int:
    with in_netns(veth.name):
        return xdp_prog.attached(socket.if_nametoindex(veth.inside))[0]


def _tenant(veth: VethNamespace, sockdir: str | None, queue: int, uid: int | None, mode: str = "macswap",
            iface: str = "xsk0", lcores: str | None = None, hostname: str = "") -> RunningPmd:
    """testpmd on IFACE's queue: through the endpoint in SOCKDIR, or (None) loading its own program."""
    dp_path = "/tmp/dp/afxdp.sock" if sockdir else None
    eal = eal_args(f"xt{iface}{queue}", af_xdp_vdev(iface, queue, dp_path), lcores=lcores or f"{queue},{1 - queue}")
    app = ["-i", "--total-num-mbufs=2600", "--no-mlockall", f"--forward-mode={mode}", "--auto-start"]
    return RunningPmd(launch_argv(veth.name, dpdk_tree(), eal, app, uid, sockdir, hostname=hostname))


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_unprivileged_testpmd_moves_frames_both_ways_until_revoked(veth: VethNamespace, base: str,
                                                                    figures: Any) -> None:
    args, sockdir = _endpoint(base, CONSUMER_UID, 0)
    with BrokerProcess(veth.name, POLICY, args) as b:
        peer = Peer(veth)
        t = _tenant(veth, sockdir, 0, CONSUMER_UID)
        try:
            t.ready()
            first = peer.first_reply(cpu=0)
            # the process the broker leased to is testpmd itself (every launcher step exec'ed), with the uid
            # and the one capability it was given
            st = _status(t.proc.pid)
            assert st["Name"] == "dpdk-testpmd" and st["Uid"].split()[0] == str(CONSUMER_UID), st
            assert int(st["CapEff"], 16) == CAP_NET_RAW, st
            connect = b.records("dp-connect")[-1]
            assert connect["decision"] == "allow" and connect["peer"]["uid"] == CONSUMER_UID
            assert b.records("dp-map-fd")[-1]["decision"] == "allow"
            (lease,) = b.leases()
            assert lease["pid"] == t.proc.pid, lease

            t.cmd("clear port stats 0")
            got = peer.exchange(200, b"TPMD", cpu=0)
            stats = t.stats()
            assert got == {b"TPMD": 200}, (got, t.text())
            assert stats["rx_packets"] == 200 and stats["tx_packets"] == 200, stats

            # revoke: the tenant map leaves the outer map; testpmd lives on and sees nothing more
            with Connection(b.socket_path) as c:
                revoked, _ = c.call(proto.Revoke(lease=lease["lease"]))
            assert revoked["revoked"][0]["ended"] is True
            wait_for(lambda: any(r["queues"] == [0] for r in b.records("map-unplaced")),
                     what="the tenant map taken out")
            t.cmd("clear port stats 0")
            after = peer.exchange(100, b"TPMD", cpu=0)
            assert after == {} and t.stats()["rx_packets"] == 0 and t.proc.poll() is None
        finally:
            status = t.close()
            peer.close()
            print(t.text())  # shown when the test fails
        assert status == 0, t.text()
        figures(handshake_to_first_frame_ms=round((first - connect["ts"]) * 1000, 1))


MAP_HUGETLB = 0x40000  # Linux's value; Python 3.11's mmap module has no name for it


def test_a_testpmd_starts_while_hugepages_made_for_another_process_are_still_free(veth: VethNamespace,
                                                                                  base: str) -> None:
    """EAL counts a NUMA node's free hugepages when the node reports any, and only those. With pages made on
    demand (surplus pages), a second testpmd that started while the first had made pages it had not used yet
    saw 2 MB and gave up ("Not enough memory available", once in CI). An untouched MAP_HUGETLB mapping
    leaves a page made and free in the same way: the tenant must start regardless."""
    args, sockdir = _endpoint(base, CONSUMER_UID, 0)
    held = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        with BrokerProcess(veth.name, POLICY, args):
            t = _tenant(veth, sockdir, 0, CONSUMER_UID)
            try:
                t.ready()  # raises when testpmd started no port
            finally:
                status = t.close()
                print(t.text())
            assert status == 0, t.text()
    finally:
        held.close()


def test_a_refused_testpmd_gets_nothing_and_the_broker_carries_on(veth: VethNamespace, base: str) -> None:
    """A uid the policy does not name is refused at /connect (/host_nak). DPDK 24.11.8 logs it, then its
    xsk_configure returns success anyway (the error path keeps ret = 0) and the port starts on a deleted
    socket: testpmd crashes (SIGSEGV here). Whatever it does, it gets no map and no lease."""
    args, sockdir = _endpoint(base, STRANGER_UID, 0)
    with BrokerProcess(veth.name, POLICY, args) as b:
        t = _tenant(veth, sockdir, 0, STRANGER_UID)
        try:
            with contextlib.suppress(AssertionError):
                t.ready(timeout=10)
            assert "Unexpected response [/host_nak]" in t.text()
        finally:
            status = t.close()
            print(f"testpmd exit status {status}:", t.text())
        deny = b.records("dp-connect")[-1]
        assert deny["decision"] == "deny" and deny["code"] == "user-not-allowed" and not b.leases()
        assert not b.records("dp-map-fd")


def test_a_testpmd_on_a_host_named_with_a_space_gets_its_map(veth: VethNamespace, base: str) -> None:
    """DPDK sends gethostname() as it is, and Linux takes any name (the plugin drops the spaces and goes on).
    Refused with /nak, testpmd read it as /host_ok (its check is strncmp(reply, "/host_ok", 8) < 0), then read
    /fd_nak as success too and went on with fd 0 as its map: "Failed to insert xsk in map", no port."""
    args, sockdir = _endpoint(base, CONSUMER_UID, 0)
    with BrokerProcess(veth.name, POLICY, args) as b:
        peer = Peer(veth)
        t = _tenant(veth, sockdir, 0, CONSUMER_UID, hostname="dpdk host")
        try:
            t.ready()
            peer.first_reply(cpu=0)
            got = peer.exchange(50, b"HOST", cpu=0)
            assert got == {b"HOST": 50}, (got, t.text())
            connect = b.records("dp-connect")[-1]
            assert connect["decision"] == "allow" and connect["hostname"] == "dpdk host", connect
        finally:
            status = t.close()
            peer.close()
            print(t.text())
        assert status == 0, t.text()


def test_a_testpmd_under_a_one_request_a_second_quota_gets_its_map(veth: VethNamespace, base: str) -> None:
    """testpmd's handshake (/connect, /version, /xsk_map_fd, /fin) is one request of the rate limit, as a
    client's grant is: counted per message, a 1 req/s quota cut it off at /version ("Read error 0")."""
    quota = f"""
[[quota]]
name = "rate"
users = [{CONSUMER_UID}]
max_requests_per_second = 1
"""
    args, sockdir = _endpoint(base, CONSUMER_UID, 0)
    with BrokerProcess(veth.name, POLICY + quota, args) as b:
        peer = Peer(veth)
        t = _tenant(veth, sockdir, 0, CONSUMER_UID)
        try:
            t.ready()
            peer.first_reply(cpu=0)
            got = peer.exchange(50, b"RATE", cpu=0)
            assert got == {b"RATE": 50}, (got, t.text())
            assert not b.records("rate-limited")
        finally:
            status = t.close()
            peer.close()
            print(t.text())
        assert status == 0, t.text()


def test_two_testpmd_tenants_each_see_only_their_own_queue(veth: VethNamespace, base: str) -> None:
    a0, dir0 = _endpoint(base, CONSUMER_UID, 0)
    a1, dir1 = _endpoint(base, OTHER_UID, 1)
    with BrokerProcess(veth.name, POLICY, a0 + a1) as b:
        peer = Peer(veth)
        tenants = [_tenant(veth, dir0, 0, CONSUMER_UID), _tenant(veth, dir1, 1, OTHER_UID)]
        try:
            for q, t in enumerate(tenants):
                t.ready()
                peer.first_reply(cpu=q)
            for t in tenants:
                t.cmd("clear port stats 0")
            got = [peer.exchange(100, b"QQ_0", cpu=0), peer.exchange(150, b"QQ_1", cpu=1)]
            rx = [t.stats()["rx_packets"] for t in tenants]
            leases = b.leases()
        finally:
            for t in tenants:
                t.close()
            peer.close()
            print(*(t.text() for t in tenants), sep="\n----\n")
        # each queue's frames reached its own tenant only (and came back through it)
        assert got == [{b"QQ_0": 100}, {b"QQ_1": 150}] and rx == [100, 150], (got, rx)
        assert sorted((x["uid"], x["pid"]) for x in leases) == sorted(
            (uid, t.proc.pid) for uid, t in zip((CONSUMER_UID, OTHER_UID), tenants, strict=True))
        wait_for(lambda: not b.leases(), what="both leases to end with their testpmd")


def test_a_root_testpmds_exit_leaves_the_brokers_program(veth: VethNamespace, base: str) -> None:
    """DPDK detaches the interface's XDP program when it closes a port, dp_path or not; as root it may. The
    broker's program is held by a bpf_link: the detach gets EBUSY and the other tenant keeps its frames."""
    a0, dir0 = _endpoint(base, CONSUMER_UID, 0)
    a1, dir1 = _endpoint(base, 0, 1)
    with BrokerProcess(veth.name, POLICY, a0 + a1) as b:
        peer = Peer(veth)
        tenant = _tenant(veth, dir0, 0, CONSUMER_UID)
        root = _tenant(veth, dir1, 1, None)
        try:
            tenant.ready()
            root.ready()
            peer.first_reply(cpu=1)  # the root testpmd works too
            before = _program(veth)
            assert root.close() == 0
            assert "bpf_xdp_detach failed" in root.text()  # it tried
            assert _program(veth) == before != 0
            peer.first_reply(cpu=0)
            tenant.cmd("clear port stats 0")
            assert peer.exchange(100, b"KEEP", cpu=0) == {b"KEEP": 100}
            assert tenant.stats()["rx_packets"] == 100
        finally:
            tenant.close()
            root.close()
            peer.close()
            print(tenant.text(), root.text(), sep="\n----\n")
        wait_for(lambda: not b.leases(), what="both leases to end with their testpmd")


def _rate(t: RunningPmd, key: str, seconds: float = 1.0) -> float:
    a, t0 = t.stats()[key], time.monotonic()
    time.sleep(seconds)
    b, t1 = t.stats()[key], time.monotonic()
    return (b - a) / (t1 - t0)


def _rx_tx_pps(veth: VethNamespace, iface: str, peer: str, sockdir: str | None, uid: int | None) -> tuple[float, float]:
    """RX pps of a testpmd (rxonly) fed by a root testpmd in txonly on the peer, then its own TX pps (txonly)."""
    rx = _tenant(veth, sockdir, 0, uid, mode="rxonly", iface=iface, lcores="0,1")
    gen = None
    try:
        rx.ready()
        gen = _tenant(veth, None, 0, None, mode="txonly", iface=peer, lcores="1,0").ready()
        rx_pps = _rate(rx, "rx_packets")
        gen.close()
        rx.cmd("stop")
        rx.cmd("set fwd txonly")
        rx.cmd("start")
        tx_pps = _rate(rx, "tx_packets")
    finally:
        rx.close()
        if gen:
            gen.close()
    assert rx_pps > 1000 and tx_pps > 1000, (rx.text(), gen.text() if gen else "")
    return rx_pps, tx_pps


def test_testpmd_pps_brokered_vs_its_own_program(veth: VethNamespace, base: str, figures: Any) -> None:
    """Figures for docs/dpdk.md: the same testpmd through a broker map grant (uid 65534, CAP_NET_RAW) and as
    root with its own libxdp program on a second veth pair; fed by a root testpmd in txonly on the peer."""
    veth.add_veth("xsk1", "xsk1p", queues=1)
    args, sockdir = _endpoint(base, CONSUMER_UID, 0)
    with BrokerProcess(veth.name, POLICY, args):
        brokered = _rx_tx_pps(veth, "xsk0", "xsk0p", sockdir, CONSUMER_UID)
    own = _rx_tx_pps(veth, "xsk1", "xsk1p", None, None)
    figures(brokered_rx_pps=round(brokered[0]), own_rx_pps=round(own[0]),
            rx_ratio=round(brokered[0] / own[0], 2), brokered_tx_pps=round(brokered[1]), own_tx_pps=round(own[1]),
            tx_ratio=round(brokered[1] / own[1], 2))
