"""Per-queue map grants on the real kernel: each tenant's XSKMAP steers only its own queues, a revoke takes
effect on copies of the fd the tenant kept, and map grants share an interface with bound grants.

Tenants run as unprivileged uids that kept CAP_NET_RAW only (as DPDK's PMD would), create and bind their
own AF_XDP sockets and write them into the map the broker gave them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from xskbroker.broker import xdp_prog
from xskbroker.client.connection import Connection
from xskbroker.testbed.links import in_netns
from xskbroker.testbed.sandbox import BrokerProcess, PacketPeer, VethNamespace, echo_consumer, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .tenants import spawn_tenant, tenant

OTHER_UID = 65532
MiB = 1 << 20
POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}, {OTHER_UID}]
interfaces = ["xsk0"]
kinds = ["map", "bound"]
max_umem = "16MiB"

[admin]
users = [0]
"""


@pytest.fixture
def broker(veth: VethNamespace) -> Iterator[BrokerProcess]:
    with BrokerProcess(veth.name, POLICY) as b:
        yield b


def _two_cpus() -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("steering traffic to two queues by CPU needs two CPUs")


def _status(b: BrokerProcess) -> dict:
    with Connection(b.socket_path) as c:
        reply, _ = c.call(proto.Status())
    return reply


def _program(veth: VethNamespace) -> tuple[int, str]:
    with in_netns(veth.name):
        prog_id, _ = xdp_prog.attached(socket.if_nametoindex(veth.inside))
        if not prog_id:
            return 0, ""
        from xskbroker.broker import bpf
        fd = bpf.prog_fd_by_id(prog_id)
        try:
            return prog_id, bpf.prog_info(fd)[0].name.decode()
        finally:
            os.close(fd)


def test_two_tenants_each_steer_only_their_own_queue(broker: BrokerProcess, veth: VethNamespace) -> None:
    _two_cpus()
    peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
    # each writes its socket into its own map's slot for the other's queue too: that must change nothing
    tenants = [spawn_tenant(tenant, broker.socket_path, veth.inside, q, 1 - q, 200, uid=uid, netns=veth.name)
               for q, uid in ((0, CONSUMER_UID), (1, OTHER_UID))]
    try:
        for q in (0, 1):
            peer.wait_ready(cpu=q)
        t0 = peer.exchange(200, tag=b"QQ_0", cpu=0)
        t1 = peer.exchange(200, tag=b"QQ_1", cpu=1)
        results = [t.result() for t in tenants]
    finally:
        for t in tenants:
            t.kill()
        peer.close()
    assert t0["replies"] == 200 and t1["replies"] == 200
    assert results[0]["first"] == {"QQ_0": 200} and results[1]["first"] == {"QQ_1": 200}
    assert results[0]["steal"] == results[1]["steal"] == "written"
    assert _program(veth)[1] == "xskb_queues"
    # the holders exited: their leases ended and the broker's program stays for the next tenants
    wait_for(lambda: not _status(broker)["leases"], what="the tenants' leases to end with them")


def test_a_revoked_tenants_map_fd_steers_nothing(broker: BrokerProcess, veth: VethNamespace) -> None:
    peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
    t = spawn_tenant(tenant, broker.socket_path, veth.inside, 0, None, 100, 50, uid=CONSUMER_UID, netns=veth.name)
    try:
        peer.wait_ready(cpu=0)
        before = peer.exchange(100, cpu=0)
        lease = wait_for(lambda: _status(broker)["leases"], what="the tenant's lease")[0]["lease"]
        with Connection(broker.socket_path) as c:
            revoked, _ = c.call(proto.Revoke(lease=lease))
        assert revoked["revoked"][0]["ended"] is True
        wait_for(lambda: any(r.get("event") == "map-unplaced" and r["queues"] == [0] for r in broker.records()),
                 what="the tenant map taken out of the outer map")
        after = peer.exchange(50, cpu=0, idle=1.5)
        result = t.result()
    finally:
        t.kill()
        peer.close()
    assert before["replies"] == 100 and result["first"] == {"XSKB": 100}
    assert result["rewritten"] is True  # the tenant wrote its slot again after the revoke...
    assert after["replies"] == 0 and result["after"] == {}  # ...and nothing reached it


def test_a_map_grant_and_a_bound_grant_share_an_interface(broker: BrokerProcess, veth: VethNamespace) -> None:
    _two_cpus()
    peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
    t = spawn_tenant(tenant, broker.socket_path, veth.inside, 1, 0, 200, uid=OTHER_UID, netns=veth.name)
    bound = None
    try:
        peer.wait_ready(cpu=1)
        bound = spawn_unprivileged(echo_consumer, broker.socket_path, veth.inside, 0, 200, 4 * MiB, uid=CONSUMER_UID)
        peer.wait_ready(cpu=0)
        t0 = peer.exchange(200, tag=b"QQ_0", cpu=0)
        t1 = peer.exchange(200, tag=b"QQ_1", cpu=1)
        b_result, t_result = bound.result(), t.result()
    finally:
        t.kill()
        if bound:
            bound.kill()
        peer.close()
    assert t0["replies"] == 200 and t1["replies"] == 200
    assert b_result["tags"] == {"QQ_0": 200}  # the tenant wrote its socket at slot 0 of its map: no effect
    assert t_result["first"] == {"QQ_1": 200}


def _bound_then_map(path: str, iface: str) -> dict:
    from xskbroker.client.grant import request

    with request(iface, [0], socket_path=path):
        try:
            with Connection(path) as c:
                c.call(proto.Grant(iface, (1,), kind="map"))
        except proto.BrokerError as e:
            return {"code": e.code, "message": e.message}
    return {"code": "ok"}


def test_libxdp_program_in_use_is_not_replaced(broker: BrokerProcess, veth: VethNamespace) -> None:
    got = spawn_unprivileged(_bound_then_map, broker.socket_path, veth.inside, uid=CONSUMER_UID).result()
    assert got["code"] == "interface-busy" and "libxdp" in got["message"] and "retry" in got["message"], got
    assert _program(veth)[1] == "xsk_def_prog"
    # unused, it is replaced: the map grant then succeeds
    wait_for(lambda: not _status(broker)["leases"], what="the bound lease to end")
    ok = spawn_tenant(_map_only, broker.socket_path, veth.inside, uid=CONSUMER_UID, netns=veth.name).result()
    assert ok["map_entries"] == 2 and ok["queues"] == [1], ok
    assert _program(veth)[1] == "xskb_queues"


def _map_only(path: str, iface: str) -> dict:
    with Connection(path) as c:
        reply, fds = c.call(proto.Grant(iface, (1,), kind="map"))
    for fd in fds:
        os.close(fd)
    return {"map_entries": reply["map_entries"], "queues": reply.get("queues", [1])}


def test_a_map_granted_queue_is_not_granted_again(broker: BrokerProcess, veth: VethNamespace) -> None:
    holder = spawn_tenant(tenant, broker.socket_path, veth.inside, 0, None, 10**6, uid=CONSUMER_UID, netns=veth.name)
    try:
        wait_for(lambda: _status(broker)["leases"], what="the tenant's lease")
        for kind in ("map", "bound"):
            got = spawn_unprivileged(_try_kind, broker.socket_path, veth.inside, kind, uid=OTHER_UID).result()
            assert got["code"] == "queue-busy", (kind, got)
    finally:
        holder.kill()


def _try_kind(path: str, iface: str, kind: str) -> dict:
    try:
        with Connection(path) as c:
            _, fds = c.call(proto.Grant(iface, (0,), kind=kind))
    except proto.BrokerError as e:
        return {"code": e.code}
    for fd in fds:
        os.close(fd)
    return {"code": "ok"}


def _open_pin(path: str) -> str:
    from xskbroker.broker import bpfsys
    try:
        os.close(bpfsys.obj_get(path))
    except OSError as e:
        return errno_name(e.errno)
    return "ok"


def errno_name(n: int | None) -> str:
    import errno
    return errno.errorcode.get(n or 0, str(n))


def test_a_pinned_map_opens_for_its_tenant_only_and_goes_with_the_lease(veth: VethNamespace) -> None:
    import subprocess
    import tempfile
    root = tempfile.mkdtemp(prefix="xskbroker-bpffs-")  # under /tmp: every uid can reach it
    os.chmod(root, 0o755)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0755", "bpf", root], check=True)
    try:
        with BrokerProcess(veth.name, POLICY, extra_args=["--pin-root", str(root)]) as b:
            holder = spawn_tenant(tenant, b.socket_path, veth.inside, 0, None, 10**6, uid=CONSUMER_UID, netns=veth.name)
            try:
                wait_for(lambda: _status(b)["leases"], what="the tenant's lease")
                pin = f"{root}/{CONSUMER_UID}/{veth.inside}/xsks_map"
                assert spawn_unprivileged(_open_pin, pin, uid=CONSUMER_UID).result() == "ok"
                assert spawn_unprivileged(_open_pin, pin, uid=OTHER_UID).result() == "EACCES"
            finally:
                holder.kill()
            wait_for(lambda: not _status(b)["leases"], what="the lease to end with its holder")
            wait_for(lambda: not os.path.exists(pin), what="the pin to be removed")
    finally:
        subprocess.run(["umount", root], check=False)
        os.rmdir(root)
