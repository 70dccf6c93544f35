"""Bare grants through `xskbroker exec`, consumed the way QEMU consumes them, and map grants."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from xskbroker.broker import cli as broker_cli
from xskbroker.client import launch
from xskbroker.testbed.sandbox import (
    BrokerProcess,
    PacketPeer,
    VethNamespace,
    drop_privileges,
    preload,
    readable_copy,
    setns,
    spawn_unprivileged,
)

from .conftest import CONSUMER_UID, ns_name
from .consumers import try_grant

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(os.sys.executable)
# `xskbroker exec` runs in children that dropped to a uid that may not read the clone: load it all here
preload("xskbroker.client", "xskbroker.policy")

BARE_POLICY = f"""\
version = 1

[[allow]]
name = "vm-launchers"
users = [{CONSUMER_UID}]
interfaces = ["xsk*"]
queues = ["1-2"]
kinds = ["bare", "bound"]
"""


def _readable_copy() -> str:
    """The consumer script and the client package where an unprivileged uid can read them."""
    where = tempfile.mkdtemp(prefix="xskbroker-consumer-")
    os.chmod(where, 0o755)
    shutil.copy(Path(__file__).with_name("qemu_like_consumer.py"), where)
    readable_copy(Path(where), ("client", "wire", "common", "testbed"))  # wire's records are common's
    return where


def _launch(netns: str, argv: list[str]) -> tuple[int, int]:
    """Fork; in the child: enter the namespace (where QEMU would run), drop to the consumer uid, then run
    `xskbroker exec` in-process, which execs the command. Returns (pid, fd of its stdout)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 127
        try:
            os.close(r)
            os.dup2(w, 1)
            os.close(w)
            setns(netns)
            drop_privileges(CONSUMER_UID)
            code = broker_cli.main(argv)
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _read_json_lines(fd: int, want: int, timeout: float) -> list[dict]:
    buf, out = b"", []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    return out


def test_qemu_like_consumer_through_exec_moves_packets_both_ways() -> None:
    # three queues; the peer sends from CPU 0 to queue 1 and from CPU 1 to queue 2, never to queue 0
    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3, xps={1: 0, 2: 1})
    if (os.cpu_count() or 1) < 2:
        pytest.skip("steering traffic to two queues by CPU needs two CPUs")
    where = _readable_copy()
    try:
        with ns, BrokerProcess(ns.name, BARE_POLICY) as b:
            argv = ["exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "2",
                    "--start-queue", "1", "--kind", "bare", "--",
                    PYTHON, f"{where}/qemu_like_consumer.py", "--ifname", "{ifname}", "--queues", "{queues}",
                    "--start-queue", "{start_queue}", "--sock-fds", "{sock_fds}", "--mode", "{xdp_mode}",
                    "--count", "400", "--other-ifname", ns.peer]
            pid, out = _launch(ns.name, argv)
            try:
                ready = _read_json_lines(out, 1, 15)
                assert ready == [{"ready": True}], b.log()
                peer = PacketPeer(ns.name, ns.peer, ns.mac(ns.inside))
                try:
                    for cpu in (0, 1):
                        peer.wait_ready(cpu=cpu)
                    t1 = peer.exchange(200, tag=b"QQ_1", cpu=0)
                    t2 = peer.exchange(200, tag=b"QQ_2", cpu=1)
                finally:
                    peer.close()
                (result,) = _read_json_lines(out, 1, 30)
            finally:
                os.close(out)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            grants = [r for r in b.records() if r.get("event") == "grant"]
    finally:
        shutil.rmtree(where)
    assert t1["replies"] == 200 and t2["replies"] == 200
    assert result["uid"] == CONSUMER_UID and result["euid"] == CONSUMER_UID
    assert result["rx_packets"] == 400 and result["tx_packets"] == 400
    assert result["tags"] == {"1": {"QQ_1": 200}, "2": {"QQ_2": 200}}
    # SO_BINDTODEVICE: the peer device is refused, the granted one binds
    assert result["binds"] == {"1": {"other_device": "EINVAL", "own_device": "ok"},
                               "2": {"other_device": "EINVAL", "own_device": "ok"}}
    g = result["grant"]
    assert g["kind"] == "bare" and [s["queue"] for s in g["sockets"]] == [1, 2]
    assert g["xdp_mode"] in ("native", "skb")
    # exactly the grant's fds were inherited (plus stdio and what the consumer opened itself)
    sock_fds = {s["fd"] for s in g["sockets"]}
    assert sock_fds <= set(result["inherited"])
    # memlock: 64 MiB asked for two QEMU queues; this machine's broker cannot raise it, and says why
    memlock = g["memlock"]
    assert memlock["needed"] == 64 << 20 and memlock["ok"] is False
    assert "LimitMEMLOCK" in memlock["hint"] and memlock["reason"]
    assert grants[-1]["decision"] == "allow" and grants[-1]["peer"]["uid"] == CONSUMER_UID


def test_exec_reports_refusals_and_runs_nothing(tmp_path: Path) -> None:
    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3)
    marker = tmp_path / "ran"
    os.chmod(tmp_path, 0o777)
    with ns, BrokerProcess(ns.name, BARE_POLICY) as b:
        pid, out = _launch(ns.name, ["exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "1",
                                     "--start-queue", "0", "--", "/usr/bin/touch", str(marker)])
        os.close(out)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
        assert not marker.exists()
        deny = [r for r in b.records() if r.get("event") == "grant"][-1]
        assert deny["code"] == "queue-not-allowed"


def test_exec_substitution_rejects_unknown_placeholders() -> None:
    values = launch.substitutions({"sockets": [{"queue": 1, "fd": 7}, {"queue": 2, "fd": 9}],
                                          "interface": "eth1", "ifindex": 3, "xdp_mode": "skb", "lease": "ab"})
    assert launch.substitute(["sock-fds={sock_fds},queues={queues},start-queue={start_queue},"
                                     "mode={xdp_mode}", "{{literal}}"], values) == \
        ["sock-fds=7:9,queues=2,start-queue=1,mode=skb", "{literal}"]
    with pytest.raises(KeyError, match="unknown placeholder"):
        launch.substitute(["{nope}"], values)


MAP_POLICY = f"""\
version = 1

[[allow]]
name = "shared"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
kinds = ["bound"]

[[allow]]
name = "dpdk-whole-interface"
users = [{CONSUMER_UID}]
interfaces = ["xsk1"]
kinds = ["map", "bound"]
exclusive = true
"""


def _map_grant(path: str, iface: str) -> dict:
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto

    try:
        with Connection(path) as c:
            reply, fds = c.call(proto.Grant(iface, (), kind="map"))
    except proto.BrokerError as e:
        return {"ok": False, "code": e.code, "message": e.message}
    for fd in fds:
        os.close(fd)
    return {"ok": True, "fds": len(fds), "entries": reply["map_entries"]}


def test_map_grants_need_a_rule_and_unused_queues() -> None:
    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2)
    with ns:
        ns.add_veth("xsk1", "xsk1p")
        with BrokerProcess(ns.name, MAP_POLICY) as b:
            refused = spawn_unprivileged(_map_grant, b.socket_path, "xsk0", uid=CONSUMER_UID).result()
            assert refused["ok"] is False and refused["code"] == "kind-not-allowed", refused
            ok = spawn_unprivileged(_map_grant, b.socket_path, "xsk1", uid=CONSUMER_UID).result()
            assert ok == {"ok": True, "fds": 1, "entries": 1, "capabilities": ok["capabilities"]}
            # A map lease ends when its holder exits (its map fd may live on in a child), which the broker learns
            # from the holder's pidfd; the test has the consumer's result before the consumer has exited. A
            # bound grant asked before then is rightly refused queue-busy (it failed so, on a loaded machine):
            # wait for the end.
            deadline = time.monotonic() + 5
            while not any(r.get("event") == "lease-ended" for r in b.records()):
                assert time.monotonic() < deadline, "the map lease did not end after its holder exited"
                time.sleep(0.01)
            # while someone holds a socket on the interface, its map is not handed out
            from .consumers import hold_grant
            holder = spawn_unprivileged(hold_grant, b.socket_path, "xsk1", [0], 30.0, uid=CONSUMER_UID)
            try:
                deadline = time.monotonic() + 5
                while not any(r.get("decision") == "allow" and r["request"]["kind"] == "bound"
                              for r in b.records() if r.get("event") == "grant"):
                    if not holder.alive():
                        holder.result()  # raises with the holder's own error (its grant was refused)
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                busy = spawn_unprivileged(_map_grant, b.socket_path, "xsk1", uid=CONSUMER_UID).result()
                assert busy["ok"] is False and busy["code"] == "queue-busy", busy
            finally:
                holder.kill()
            assert try_grant  # the bound path itself is covered in test_grants


def _hold_map(path: str, iface: str, seconds: float) -> dict:
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto

    with Connection(path) as c:
        reply, fds = c.call(proto.Grant(iface, (), kind="map"))
        released, _ = c.call(proto.Release(reply["lease"]))
        time.sleep(seconds)
    return {"pending": released.get("pending"), "fds": fds}


def test_a_map_lease_ends_at_release_and_its_map_leaves_the_program() -> None:
    from .consumers import try_grant as bound_grant

    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2)
    with ns:
        ns.add_veth("xsk1", "xsk1p", queues=2)
        with BrokerProcess(ns.name, MAP_POLICY) as b:
            holder = spawn_unprivileged(_hold_map, b.socket_path, "xsk1", 30.0, uid=CONSUMER_UID)
            try:
                deadline = time.monotonic() + 5
                while not any(r.get("event") == "release" for r in b.records()):
                    assert time.monotonic() < deadline and holder.alive()
                    time.sleep(0.01)
                # released while the holder keeps its map fd: its map left the outer map, so the next grant on
                # those queues is one the old fd cannot reach
                got = spawn_unprivileged(bound_grant, b.socket_path, "xsk1", [1], uid=CONSUMER_UID).result()
                assert got["ok"], got
                assert holder.alive()
            finally:
                holder.kill()
            releases = [r for r in b.records() if r.get("event") == "release"]
            assert "pending" not in releases[0]
            attaches = [r["prog_id"] for r in b.records()
                        if r.get("event") == "xdp-attach" and r["interface"] == "xsk1"]
            unplaced = [r["queues"] for r in b.records() if r.get("event") == "map-unplaced"]
            assert len(attaches) == 1 and unplaced == [[0, 1]], (attaches, unplaced)


def test_exec_require_memlock_runs_a_command_that_keeps_cap_ipc_lock(tmp_path: Path) -> None:
    """Root keeps CAP_IPC_LOCK across exec, so its UMEM is not charged to RLIMIT_MEMLOCK: the broker's
    "cannot raise" answer must neither warn nor stop --require-memlock (issue 10)."""
    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3)
    marker = tmp_path / "ran"
    policy = BARE_POLICY.replace(f"users = [{CONSUMER_UID}]", f"users = [0, {CONSUMER_UID}]")
    with ns, BrokerProcess(ns.name, policy) as b:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                os.close(r)
                os.dup2(w, 2)
                code = broker_cli.main(["exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "1",
                                        "--start-queue", "1", "--require-memlock", "--", "/usr/bin/touch",
                                        str(marker)])
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            err = f.read()
        _, status = os.waitpid(pid, 0)
        grant = [x for x in b.records() if x.get("event") == "grant"][-1]
    assert grant["decision"] == "allow" and grant["request"]["memlock"] == 32 << 20
    assert os.waitstatus_to_exitcode(status) == 0 and marker.exists(), err
    assert "RLIMIT_MEMLOCK" not in err


def test_exec_asks_for_the_qemu_umem_the_user_gave() -> None:
    ns = VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=3)
    policy = BARE_POLICY.replace(f"users = [{CONSUMER_UID}]", f"users = [0, {CONSUMER_UID}]")
    with ns, BrokerProcess(ns.name, policy) as b:
        pid = os.fork()
        if pid == 0:
            code = 127
            try:
                code = broker_cli.main(["exec", "--socket", b.socket_path, "--interface", ns.inside, "--queues", "2",
                                        "--start-queue", "1", "--qemu-umem", "4MiB", "--", "/bin/true"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        grant = [x for x in b.records() if x.get("event") == "grant"][-1]
    assert os.waitstatus_to_exitcode(status) == 0
    assert grant["decision"] == "allow" and grant["request"]["memlock"] == 8 << 20  # 2 queues of 4 MiB
