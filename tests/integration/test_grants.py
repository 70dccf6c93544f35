"""Bound grants through a real broker, to consumers that dropped privileges before connecting."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xskbroker.broker import bpf
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import (
    BrokerProcess,
    PacketPeer,
    VethNamespace,
    echo_consumer,
    in_netns,
    preload,
    spawn_unprivileged,
)
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, wait_for
from .consumers import attempt_escapes, grants_on_one_connection, hold_grant, try_grant

# the command line imports its subcommands lazily: load them here, since the children that run it have dropped
# to a uid that may not read the clone
preload("xskbroker.client", "xskbroker.policy")

MiB = 1 << 20


def _status(broker: BrokerProcess) -> dict:
    with Connection(broker.socket_path) as c:
        reply, _ = c.call(proto.Status())
    return reply


def test_packets_both_ways_through_an_unprivileged_consumer(veth: VethNamespace, broker: BrokerProcess) -> None:
    peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
    child = spawn_unprivileged(echo_consumer, broker.socket_path, veth.inside, 0, 1000, 4 * MiB, uid=CONSUMER_UID)
    try:
        peer.wait_ready(cpu=0)
        traffic = peer.exchange(1000, cpu=0)
        result = child.result()
    finally:
        child.kill()
        peer.close()
    assert result["consumer_uid"] == CONSUMER_UID
    assert int(result["capabilities"]["CapEff"], 16) == 0 and int(result["capabilities"]["CapPrm"], 16) == 0
    assert result["rx_packets"] == 1000
    assert result["tx_packets"] == 1000 and result["tx_completed"] >= 1000
    assert traffic == {"sent": 1000, "replies": 1000, "seconds": traffic["seconds"]}
    assert result["xdp_mode"] in ("native", "skb")
    grants = [r for r in broker.records() if r.get("event") == "grant"]
    assert grants[0]["decision"] == "allow" and grants[0]["peer"]["uid"] == CONSUMER_UID
    assert grants[0]["rule"] == "tests"


def test_consumer_cannot_rebind_reregister_or_make_its_own(broker: BrokerProcess, veth: VethNamespace) -> None:
    got = spawn_unprivileged(attempt_escapes, broker.socket_path, veth.inside, 0, uid=CONSUMER_UID).result()
    assert int(got.pop("capabilities")["CapEff"], 16) == 0
    assert got == {
        "rebind_same_queue": "EBUSY",
        "rebind_other_queue": "EBUSY",
        "reregister_umem": "EBUSY",
        "resize_rx_ring": "EBUSY",
        "own_af_xdp_socket": "EPERM",
        "grow_umem_memfd": "EPERM",
        "shrink_umem_memfd": "EPERM",
    }


DENIALS = [
    (STRANGER_UID, "xsk0", [0], 4 * MiB, "user-not-allowed"),
    (CONSUMER_UID, "eth0", [0], 4 * MiB, "interface-not-allowed"),
    (CONSUMER_UID, "xsk0p", [0], 4 * MiB, "denied-by-rule"),
    (CONSUMER_UID, "xsk0", [9], 4 * MiB, "queue-not-allowed"),
    (CONSUMER_UID, "xsk0", [0, 1], 12 * MiB, "umem-too-large"),
    (CONSUMER_UID, "xsk0", [0, 1, 2], 1 * MiB, "too-many-queues"),
    (CONSUMER_UID, "xsk9", [0], 4 * MiB, "no-such-interface"),
    (CONSUMER_UID, "xsk0", [5], 4 * MiB, "no-such-queue"),
]


@pytest.mark.parametrize(("uid", "iface", "queues", "umem", "code"), DENIALS)
def test_each_denial_has_its_own_code_and_leaves_nothing(broker: BrokerProcess, veth: VethNamespace, uid: int,
                                                          iface: str, queues: list[int], umem: int,
                                                          code: str) -> None:
    fds_before = broker.settled_fds()
    got = spawn_unprivileged(try_grant, broker.socket_path, iface, queues, umem, uid=uid).result()
    assert got["ok"] is False and got["code"] == code, got
    assert got["message"]
    deny = [r for r in broker.records() if r.get("event") == "grant"][-1]
    assert deny["decision"] == "deny" and deny["code"] == code and deny["peer"]["uid"] == uid
    # nothing left behind: no lease, no fd, and queue 0 is immediately grantable
    assert _status(broker)["leases"] == []
    wait_for(lambda: broker.open_fds() == fds_before, what=f"broker fd count back at {fds_before}")
    ok = spawn_unprivileged(try_grant, broker.socket_path, "xsk0", [0], uid=CONSUMER_UID).result()
    assert ok["ok"] is True, ok


def test_denial_codes_are_distinct() -> None:
    codes = [d[-1] for d in DENIALS]
    assert len(set(codes)) == len(codes)


def _raw_exchange(path: str, payload: bytes, fds: list[int] | None = None) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        if fds:
            socket.send_fds(s, [payload], fds)
        else:
            s.send(payload)
        return json.loads(s.recv(proto.MAX_REPLY))


def test_bad_messages_get_errors_and_leave_the_broker_healthy(broker: BrokerProcess) -> None:
    hello = proto.encode_request(proto.Hello())
    _raw_exchange(broker.socket_path, hello)  # warm-up: libraries and caches loaded once
    fds_before = broker.settled_fds()
    r, w = os.pipe()
    try:
        cases = {
            "bad-json": _raw_exchange(broker.socket_path, b"this is not json"),
            "bad-version": _raw_exchange(broker.socket_path, b'{"v": 99, "op": "hello"}'),
            "too-large": _raw_exchange(broker.socket_path, b'{"v":1,"op":"hello","pad":"' + b"x" * 70000 + b'"}'),
            "truncated": _raw_exchange(broker.socket_path, hello[:-7]),
            "unknown-op": _raw_exchange(broker.socket_path, b'{"v":1,"op":"steal"}'),
            "bad-request": _raw_exchange(broker.socket_path, b'{"v":1,"op":"grant","interface":"xsk0","queues":"all"}'),
        }
        # fds are refused at the socket (SO_PASSRIGHTS=0): the sender learns it at once, nothing reaches the broker
        with pytest.raises(PermissionError):
            _raw_exchange(broker.socket_path, hello, [r, w])
    finally:
        os.close(r)
        os.close(w)
    for code, reply in cases.items():
        assert reply["ok"] is False and reply["error"]["code"] == code, (code, reply)
        assert reply["error"]["message"]
    assert _raw_exchange(broker.socket_path, hello)["ok"] is True
    wait_for(lambda: broker.open_fds() == fds_before,
             what=f"broker fd count back at {fds_before}: {broker.fd_targets()}")
    # the fds the client attached were closed by the broker: the pipe has no writer left anywhere
    assert broker.proc is not None and broker.proc.poll() is None


def test_two_consumers_on_two_queues_see_only_their_own_traffic(broker: BrokerProcess, veth: VethNamespace) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("steering traffic to two queues by CPU needs two CPUs")
    peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
    consumers = [spawn_unprivileged(echo_consumer, broker.socket_path, veth.inside, q, 300, 4 * MiB,
                                    uid=CONSUMER_UID) for q in (0, 1)]
    try:
        for q in (0, 1):
            peer.wait_ready(cpu=q)
        t0 = peer.exchange(300, tag=b"QQ_0", cpu=0)
        t1 = peer.exchange(300, tag=b"QQ_1", cpu=1)
        results = [c.result() for c in consumers]
    finally:
        for c in consumers:
            c.kill()
        peer.close()
    assert t0["replies"] == 300 and t1["replies"] == 300
    assert results[0]["tags"] == {"QQ_0": 300}
    assert results[1]["tags"] == {"QQ_1": 300}


def test_queue_is_granted_again_after_its_holder_exits(broker: BrokerProcess, veth: VethNamespace) -> None:
    holder = spawn_unprivileged(hold_grant, broker.socket_path, veth.inside, [0], 60.0, uid=CONSUMER_UID)
    try:
        wait_for(lambda: _status(broker)["leases"], what="the holder's lease")
        busy = spawn_unprivileged(try_grant, broker.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        assert busy["ok"] is False and busy["code"] == "queue-busy"
        # a two-queue grant that hits the held queue unwinds the queue it had already made
        partial = spawn_unprivileged(try_grant, broker.socket_path, veth.inside, [1, 0], uid=CONSUMER_UID).result()
        assert partial["ok"] is False and partial["code"] == "queue-busy"
        assert spawn_unprivileged(try_grant, broker.socket_path, veth.inside, [1], uid=CONSUMER_UID).result()["ok"]
    finally:
        holder.kill(signal.SIGKILL)
    wait_for(lambda: not _status(broker)["leases"], what="the lease to end with its holder")
    again = spawn_unprivileged(try_grant, broker.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
    assert again["ok"] is True, again
    ended = [r for r in broker.records() if r.get("event") == "lease-ended"]
    assert ended and ended[0]["reason"] == "holder exited"


def test_release_ends_the_lease_and_frees_the_queue(broker: BrokerProcess, veth: VethNamespace) -> None:
    for _ in range(3):
        got = spawn_unprivileged(try_grant, broker.socket_path, veth.inside, [0, 1], uid=CONSUMER_UID).result()
        assert got["ok"] is True and got["queues"] == [0, 1], got
    assert _status(broker)["leases"] == []
    assert len([r for r in broker.records() if r.get("event") == "release"]) == 3


def test_a_kept_connection_grants_again_and_again(broker: BrokerProcess, veth: VethNamespace) -> None:
    """request(connection=...): every grant on it is judged and released like one on its own connection."""
    got = spawn_unprivileged(grants_on_one_connection, broker.socket_path, veth.inside, uid=CONSUMER_UID).result()
    assert len(set(got["leases"])) == 3 and got["refused"] == "too-many-queues" and got["hello"], got
    assert _status(broker)["leases"] == []
    assert len([r for r in broker.records() if r.get("event") == "release"]) == 3


def test_a_foreign_xdp_program_is_refused_and_kept(veth: VethNamespace) -> None:
    foreign_id = _attach_foreign_program(veth.name, veth.inside)
    with BrokerProcess(veth.name, f'version = 1\n[[allow]]\nname = "t"\nusers = [{CONSUMER_UID}]\n'
                       'interfaces = ["xsk0"]\n') as b:
        got = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        assert got["ok"] is False and got["code"] == "xdp-foreign-program", got
        assert "never replaces" in got["message"]
    with in_netns(veth.name):
        assert bpf.xdp_query(socket.if_nametoindex(veth.inside)).prog_id == foreign_id


def _attach_foreign_program(netns: str, dev: str) -> int:
    """Someone else's XDP program: two instructions (r0 = XDP_PASS; exit), attached in skb mode."""
    insns = (ctypes.c_uint64 * 2)(0x00000002_000000B7, 0x95)  # BPF_MOV64_IMM(r0, 2); BPF_EXIT
    lib = bpf.libbpf()
    lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_void_p]
    prog_fd = bpf.check(lib.bpf_prog_load(6, b"not_ours", b"GPL", insns, 2, None), "load foreign program")
    try:
        with in_netns(netns):
            ifindex = socket.if_nametoindex(dev)
            bpf.check(lib.bpf_xdp_attach(ifindex, prog_fd, bpf.XDP_FLAGS_SKB_MODE, None), "attach foreign")
            return bpf.xdp_query(ifindex).prog_id
    finally:
        os.close(prog_fd)


def test_a_second_broker_reuses_the_attached_program(veth: VethNamespace) -> None:
    policy = f'version = 1\n[[allow]]\nname = "t"\nusers = [{CONSUMER_UID}]\ninterfaces = ["xsk0"]\n'
    prog_ids = []
    for _ in range(2):
        with BrokerProcess(veth.name, policy) as b:
            assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]
            attaches = [r for r in b.records() if r.get("event") == "xdp-attach"]
            prog_ids.append(attaches[0]["prog_id"] if attaches else None)
    assert prog_ids[0] is not None and prog_ids[1] is None  # the second broker attached nothing new


def test_demo_command_reports_every_packet_both_ways() -> None:
    done = subprocess.run([sys.executable, "-m", "xskbroker.broker", "demo", "--json", "--packets", "300"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rx_packets"] == result["tx_packets"] == result["peer_captured"] == 300
    assert result["consumer_uid"] != 0 and result["ok"] is True
    assert result["grant_latency_ms"] > 0
    with contextlib.suppress(FileNotFoundError):
        assert result["namespace"] not in os.listdir("/run/netns")


def _cli_json(argv: list[str]) -> dict:
    """Run the xskbroker command line in-process (this child has already dropped privileges)."""
    import contextlib as _contextlib
    import io

    from xskbroker.broker import cli as broker_cli


    out = io.StringIO()
    with _contextlib.redirect_stdout(out):
        code = broker_cli.main(argv)
    return {"code": code, "reply": json.loads(out.getvalue())}


def test_request_command_prints_the_grant_as_json(broker: BrokerProcess, veth: VethNamespace) -> None:
    got = spawn_unprivileged(_cli_json, ["request", "--socket", broker.socket_path, "--interface", veth.inside,
                                         "--queues", "2", "--umem", "2MiB", "--json"], uid=CONSUMER_UID).result()
    assert got["code"] == 0
    reply = got["reply"]
    assert reply["ok"] is True and reply["kind"] == "bound" and reply["latency_ms"] > 0
    assert [s["queue"] for s in reply["sockets"]] == [0, 1]
    assert all(s["umem"]["size"] == 2 << 20 for s in reply["sockets"])
    refused = spawn_unprivileged(_cli_json, ["request", "--socket", broker.socket_path, "--interface", "eth0",
                                             "--json"], uid=CONSUMER_UID).result()
    assert refused["code"] == 1 and refused["reply"]["error"]["code"] == "interface-not-allowed"


def test_demo_cleans_up_its_namespace_when_interrupted() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "xskbroker.broker", "demo", "--packets", "100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = f"xskdemo-{proc.pid}"
    deadline = time.monotonic() + 20
    while not os.path.exists(f"/run/netns/{name}"):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.5)  # let the broker and the consumer get going
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode in (1, 130)
    assert not os.path.exists(f"/run/netns/{name}")
