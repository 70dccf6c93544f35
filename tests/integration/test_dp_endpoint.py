"""The device-plugin endpoint on the real kernel: a client that speaks DPDK's handshake byte for byte, as an
unprivileged uid with CAP_NET_RAW only, gets its map fd there, makes its own AF_XDP socket, writes it into
the map and moves frames both ways; its exit ends the lease. And the attacks: a uid the policy denies,
links planted where the socket goes, silent and slow peers, garbage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any

from xskbroker.testbed.dpdk_like import handshake
from xskbroker.testbed.sandbox import BrokerProcess, PacketPeer, VethNamespace, spawn_unprivileged

from .conftest import CONSUMER_UID, STRANGER_UID, wait_for
from .probe import RootProbe
from .tenants import spawn_tenant, tenant

POLICY = f"""\
version = 1

[[allow]]
name = "dpdk"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
kinds = ["map"]

[[allow]]
name = "probe"
users = [0]
interfaces = ["xsk0"]
kinds = ["bound", "map"]
max_umem = "16MiB"

[admin]
users = [0]
"""


def _endpoint(path: str, uid: int = CONSUMER_UID, queues: str = "0") -> list[str]:
    return ["--device-plugin", f"interface=xsk0,user={uid},queues={queues},path={path}"]


@contextlib.contextmanager
def _broker(veth: VethNamespace, *args: str) -> Iterator[BrokerProcess]:
    with BrokerProcess(veth.name, POLICY, list(args)) as b:
        yield b
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"



def _events(b: BrokerProcess, name: str) -> list[dict[str, Any]]:
    return [r for r in b.records() if r.get("event") == name]


def dpdk_tenant(path: str, iface: str, queue: int, count: int) -> dict[str, Any]:
    """DPDK's PMD in small: the handshake, then its own socket written into the map it got; echoes frames."""
    hs = handshake(path, iface)
    fd = hs.pop("fd")
    if fd is None:
        return {"handshake": hs}
    out = tenant("", iface, queue, None, count, map_fd=fd)
    out["handshake"] = hs
    with open("/proc/self/status") as f:
        out["capeff"] = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return out


def test_a_dpdk_client_gets_its_map_and_moves_frames_both_ways(veth: VethNamespace, base: str) -> None:
    path = f"{base}/afxdp_dp/xsk0/afxdp.sock"
    with _broker(veth, *_endpoint(path)) as b:
        st, parent = os.stat(path), os.stat(os.path.dirname(path))
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == CONSUMER_UID and stat.S_IMODE(st.st_mode) == 0o600
        assert parent.st_uid == 0 and stat.S_IMODE(parent.st_mode) == 0o755
        peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
        t = spawn_tenant(dpdk_tenant, path, "xsk0", 0, 100, uid=CONSUMER_UID, netns=veth.name)
        try:
            peer.wait_ready(cpu=0)
            got = peer.exchange(100, cpu=0)
            result = t.result()
        finally:
            t.kill()
            peer.close()
        hs = result["handshake"]
        assert (hs["connect"], hs["version"], hs["map"], hs["fin"]) == (b"/host_ok", b"0.1", b"/fd_ack", b"/fin_ack")
        assert int(result["capeff"], 16) == 1 << 13  # CAP_NET_RAW, nothing else
        assert result["first"] == {"XSKB": 100} and got["replies"] == 100  # received, and transmitted back
        connect = _events(b, "dp-connect")[-1]
        assert connect["decision"] == "allow" and connect["peer"]["uid"] == CONSUMER_UID
        assert connect["hostname"] == socket.gethostname()  # recorded; the identity is the peer's uid
        assert _events(b, "dp-map-fd")[-1]["decision"] == "allow"
        # the holder exited: its lease ends, its queue goes back to the shared map
        wait_for(lambda: not b.leases(), what="the lease to end with its holder")
        wait_for(lambda: _events(b, "map-unplaced"), what="the tenant map taken out")
    # stopped: the socket and the directories the broker made are gone, the one it found stays
    assert not os.path.exists(f"{base}/afxdp_dp") and os.path.isdir(base)


def _two_handshakes(path: str) -> dict[str, Any]:
    """DPDK with queue_count=2 (one connection per queue) gets the same map twice, under one lease."""
    from xskbroker.broker import bpf

    a, b = handshake(path, "xsk0"), handshake(path, "xsk0")
    ids = [bpf.map_info(x["fd"]).id if x["fd"] is not None else None for x in (a, b)]
    return {"ids": ids, "maps": [a["map"], b["map"]]}


def test_one_lease_per_holder_however_many_handshakes(veth: VethNamespace, base: str) -> None:
    path = f"{base}/dp.sock"
    with _broker(veth, *_endpoint(path, queues="0-1")) as b:
        # a first holder attaches the per-queue program (fds the broker keeps); then the broker's fds are counted
        spawn_tenant(handshake, path, "xsk0", uid=CONSUMER_UID, netns=veth.name).result()
        wait_for(lambda: not b.leases(), what="the first holder's lease to end")
        before = b.settled_fds()
        got = spawn_tenant(_two_handshakes, path, uid=CONSUMER_UID, netns=veth.name).result()
        assert got["maps"] == [b"/fd_ack", b"/fd_ack"] and got["ids"][0] == got["ids"][1] is not None
        grants = [r for r in _events(b, "grant") if r.get("decision") == "allow"]
        assert len(grants) == 2 and grants[1]["request"]["queues"] == [0, 1]
        wait_for(lambda: not b.leases(), what="the lease to end with its holder")
        assert b.settled_fds() == before, b.fd_targets()  # no map, connection or pidfd left behind


def _raw(path: str, messages: list[bytes], fds: bool = False) -> list[Any]:
    """Send each message on one connection and collect each reply (or the error the send got)."""
    out: list[Any] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        for m in messages:
            try:
                if fds:
                    r, w = os.pipe()
                    try:
                        socket.send_fds(s, [m], [r, w])
                    finally:
                        os.close(r)
                        os.close(w)
                else:
                    s.send(m)
            except OSError as e:
                out.append(f"errno {e.errno}")
                continue
            msg, anc, _, _ = s.recvmsg(128, socket.CMSG_SPACE(4))
            out.append(msg)
            assert not anc, (m, msg)  # no fd comes with any refusal
    return out


def test_a_uid_the_policy_denies_is_refused_at_host_nak(veth: VethNamespace, base: str) -> None:
    path = f"{base}/stranger/afxdp.sock"
    with _broker(veth, *_endpoint(path, uid=STRANGER_UID)) as b:
        got = spawn_unprivileged(handshake, path, "xsk0", uid=STRANGER_UID).result()
        assert got["connect"] == b"/host_nak" and got["fd"] is None and "map" not in got
        # a client that goes on anyway (DPDK would not) gets no map either
        after = spawn_unprivileged(_raw, path, [b"/connect,h", b"/xsk_map_fd,xsk0"], uid=STRANGER_UID).result()
        assert after == [b"/host_nak", b"/fd_nak"]
        deny = _events(b, "dp-connect")[-1]
        assert deny["decision"] == "deny" and deny["peer"]["uid"] == STRANGER_UID and deny["code"] == "user-not-allowed"
        assert not b.leases()
        # and another uid cannot even connect: the socket is the tenant's, 0600
        assert spawn_unprivileged(_connect_only, path, uid=CONSUMER_UID).result() == "EACCES"


def test_a_hostname_linux_allows_but_few_use_still_gets_the_map(veth: VethNamespace, base: str) -> None:
    """gethostname() gives whatever sethostname(2) took (any byte but NUL): the name identifies nobody, so it
    refuses nothing. Refused with /nak (which DPDK reads as /host_ok, sorting after it) DPDK went on and got
    /fd_nak, which it reads as success too, with fd 0 as its map."""
    path = f"{base}/odd/afxdp.sock"
    with _broker(veth, *_endpoint(path)) as b:
        for host, recorded in (("dpdk host", "dpdk host"), ("hôte\t1", "h\\xc3\\xb4te\\x091")):
            got = spawn_unprivileged(handshake, path, "xsk0", 10.0, host, uid=CONSUMER_UID).result()
            assert (got["connect"], got["map"], got["fd"] is not None) == (b"/host_ok", b"/fd_ack", True), got
            connect = _events(b, "dp-connect")[-1]
            assert connect["decision"] == "allow" and connect["hostname"] == recorded, connect
            wait_for(lambda: not b.leases(), what="the lease to end with its holder")


def _handshakes(path: str, count: int) -> list[Any]:
    """DPDK with queue_count=COUNT: one handshake per queue, one after the other, in one process."""
    out = []
    for _ in range(count):
        got = handshake(path, "xsk0")
        out.append((got["connect"], got.get("map"), got["fd"] is not None))
    return out


def test_a_dpdk_handshake_costs_one_request_of_the_rate_limit(veth: VethNamespace, base: str) -> None:
    """A handshake is /connect, /version, /xsk_map_fd, /fin: one request's worth, as a client's grant is.
    Counted per message, a queue_count=N DPDK spent 4N, and a 20 req/s quota (docs/policy.md's example) cut
    its sixth queue's handshake short, after the lease was taken."""
    path = f"{base}/rate/afxdp.sock"
    quota = f"""
[[quota]]
name = "rate"
users = [{CONSUMER_UID}]
max_requests_per_second = 4
"""
    with BrokerProcess(veth.name, POLICY + quota, _endpoint(path)) as b:
        got = spawn_unprivileged(_handshakes, path, 4, uid=CONSUMER_UID).result()
        assert got == [(b"/host_ok", b"/fd_ack", True)] * 4, got
        assert not _events(b, "rate-limited")
        # outside a handshake every message counts: the connection is cut off
        more = spawn_unprivileged(_raw, path, [b"/version"] * 20, uid=CONSUMER_UID).result()
        assert b"" in more or any(isinstance(x, str) for x in more), more
        assert _events(b, "rate-limited")


def _connect_only(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(path)
        except OSError as e:
            return errno.errorcode[e.errno or 0]
    return "connected"


def test_planted_links_are_not_followed(veth: VethNamespace, base: str) -> None:
    """A tenant (any local user, in /tmp) plants links and a directory of its own where the endpoints go."""
    victim = f"{base}/victim"
    os.mkdir(victim)
    os.chown(victim, CONSUMER_UID, CONSUMER_UID)
    os.symlink(victim, f"{base}/linked")  # a link where a directory goes
    os.mkdir(f"{base}/real", 0o755)
    os.symlink(f"{victim}/target", f"{base}/real/afxdp.sock")  # a link where the socket goes
    os.mkdir(f"{base}/theirs")
    os.chown(f"{base}/theirs", CONSUMER_UID, CONSUMER_UID)  # a directory someone else owns
    good = f"{base}/good/afxdp.sock"
    with _broker(veth, *_endpoint(f"{base}/linked/xsk0/afxdp.sock"), *_endpoint(f"{base}/real/afxdp.sock"),
                 *_endpoint(f"{base}/theirs/afxdp.sock"), *_endpoint(good)) as b:
        failed = {r["path"]: r["error"] for r in _events(b, "dp-endpoint") if r["state"] == "failed"}
        assert "symbolic link" in failed[f"{base}/linked/xsk0/afxdp.sock"]
        assert "not a socket" in failed[f"{base}/real/afxdp.sock"]
        assert "belongs to uid" in failed[f"{base}/theirs/afxdp.sock"]
        assert os.listdir(victim) == [] and os.listdir(f"{base}/theirs") == []
        assert os.readlink(f"{base}/real/afxdp.sock") == f"{victim}/target"
        # the others still serve, and so does the broker's own socket
        got = spawn_tenant(handshake, good, "xsk0", uid=CONSUMER_UID, netns=veth.name).result()
        assert got["map"] == b"/fd_ack"
    assert not os.path.exists(good)


def test_silent_and_slow_peers_do_not_stall_anyone(veth: VethNamespace, base: str, figures: Any) -> None:
    path = f"{base}/dp.sock"
    with _broker(veth, *_endpoint(path, uid=0)) as b:
        silent = []
        for _ in range(40):  # more than an endpoint keeps: the oldest are let go
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            silent.append(s)
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # writes and never reads
        deaf.connect(path)
        deaf.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
            for _ in range(2000):
                deaf.send(b"/version")
                sent += 1
        half = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # /connect, then silence
        half.connect(path)
        half.send(b"/connect,x")
        # answered before the probe's bound grants: the map grant attaches the per-queue program, which serves
        # both (a bound grant first attaches libxdp's program, and map grants are then refused while it is used)
        half.settimeout(10)
        assert half.recv(64) == b"/host_ok"
        try:
            probes = RootProbe(b.socket_path, "xsk0", 1).run(5).figures()
            started = time.perf_counter()
            got = handshake(path, "xsk0", timeout=2.0)
            ms = (time.perf_counter() - started) * 1000
        finally:
            for s in [*silent, deaf, half]:
                s.close()
        why = [r.get("reason") for r in _events(b, "dp-connect")]
        assert got.get("map") == b"/fd_ack" and ms < 1000, (got, ms, why)
        os.close(got["fd"])
        assert _events(b, "dp-connection-evicted")
        figures(dp_handshake_under_attack_ms=round(ms, 2), deaf_sent=sent, **probes)


def test_garbage_gets_nak_and_leaves_no_trace(veth: VethNamespace, base: str) -> None:
    path = f"{base}/dp.sock"
    with _broker(veth, *_endpoint(path, uid=0)) as b:
        _raw(path, [b"/version"])
        before = b.settled_fds()
        got = _raw(path, [b"/connect," + b"h" * 200, b"\x00\xff garbage", "/connect,hé".encode(), b"/connect,a\0",
                          b"/xsk_map_fd,xsk0", b"/nope", b"/config_busy_poll,10,64"])
        # a /connect is refused with /host_nak whatever is wrong with it (DPDK would read /nak as /host_ok)
        assert got == [b"/host_nak", b"/nak", b"/nak", b"/nak", b"/fd_nak", b"/nak", b"/config_busy_poll_nak"]
        # fds attached: the kernel refuses them at the send (SO_PASSRIGHTS=0, Linux 6.16); an older kernel
        # delivers them and the broker closes them off its loop and refuses the message
        with_fds = _raw(path, [b"/connect,h", b"/config_busy_poll,10,64"], fds=True)
        assert with_fds in (["errno 1", "errno 1"], [b"/host_nak", b"/config_busy_poll_nak"]), with_fds
        assert b.settled_fds() == before, b.fd_targets()
        assert not b.leases()
        refused = _events(b, "dp-refused")  # past a burst, counted in the throttle's summary (audit.NOISY)
        assert len(refused) >= 5 and all(r["reason"] for r in refused)


def _garbage(path: str, count: int) -> dict[str, Any]:
    """The endpoint's tenant sends `count` unknown requests on one connection, each answered /nak."""
    t0 = time.monotonic()
    got = _raw(path, [b"/nope"] * count)
    return {"naks": sum(1 for g in got if g == b"/nak"), "seconds": time.monotonic() - t0}


def test_a_tenant_sending_garbage_cannot_flood_the_audit(veth: VethNamespace, base: str) -> None:
    """Each refused message is a dp-refused record: as cheap to cause as a bad request on the broker's own
    socket, so it is summarised past a small burst in the same way (audit.Throttle), or a tenant writes the
    journal full (journald's rate limit then drops everyone's grants and revokes)."""
    from xskbroker.broker.audit import BURST

    path = f"{base}/dp.sock"
    count = 2000
    with _broker(veth, *_endpoint(path)) as b:
        got = spawn_unprivileged(_garbage, path, count, uid=CONSUMER_UID).result()
        assert got["naks"] == count, got
        refused = _events(b, "dp-refused")
        assert len(refused) <= BURST, \
            f"{len(refused)} dp-refused records for {count} messages in {got['seconds']:.2f} s"
