"""Attacks on what a name or a handed-out fd means after the policy judged it (security findings 2, 4, 11).

- An alias name ("xsk0:x") or an altname passes the policy's globs while the kernel's name lookups act on
  the denied device: names are judged and resolved exactly.
- A map grant's xsks_map fd outlives its lease in a child the holder forked: the lease's end detaches the
  program using that map, so the next tenant gets a fresh program and map the leftover fd cannot touch.
- A map grant counts every queue against quotas; a memlock raise is undone when its lease ends; ring
  memory counts with the UMEM.

Every attacker runs unprivileged; a root probe measures the broker's latency while the attack runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

from xskbroker.broker import bpf, xdp_prog
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import (
    BrokerProcess,
    PacketPeer,
    VethNamespace,
    echo_consumer,
    in_netns,
    spawn_unprivileged,
)
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name, wait_for
from .probe import RootProbe

KiB, MiB = 1 << 10, 1 << 20
PROBE_RULE = """
[[allow]]
name = "root-probe"
users = [0]
interfaces = ["xskr"]
"""


# ---- shared helpers -------------------------------------------------------------------------------------

@contextlib.contextmanager
def bed(policy: str, queues: int = 1) -> Iterator[tuple[VethNamespace, BrokerProcess]]:
    """xsk0 (the attacked interface) and xskr (the root probe's), a broker with `policy` + the probe rule."""
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=queues) as ns:
        ns.add_veth("xskr", "xskrp")
        with BrokerProcess(ns.name, policy + PROBE_RULE) as b:
            yield ns, b
            assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p50 = ordered[max(0, math.ceil(len(ordered) / 2) - 1)] if ordered else math.nan
    return {"p50": round(p50 * 1000, 2), "max": round(max(ordered, default=math.nan) * 1000, 2)}


def xdp_prog_on(ns: VethNamespace, dev: str) -> int:
    with in_netns(ns.name):
        return xdp_prog.attached(socket.if_nametoindex(dev))[0]


def _status(b: BrokerProcess) -> dict[str, Any]:
    with Connection(b.socket_path) as c:
        return c.call(proto.Status())[0]


def _try(path: str, req: proto.Grant) -> dict[str, Any]:
    try:
        with Connection(path, 5.0) as c:
            reply, fds = c.call(req)
    except proto.BrokerError as e:
        return {"ok": False, "code": e.code, "message": e.message, "extra": e.reply.get("error", {})}
    for fd in fds:
        os.close(fd)
    return {"ok": True, "interface": reply["interface"], "ifindex": reply["ifindex"], "lease": reply["lease"]}


# ---- finding 2: alias names and altnames --------------------------------------------------------------

ALIAS_POLICY = f"""\
version = 1

[[allow]]
name = "anything-but-xsk0"
users = [{CONSUMER_UID}]
interfaces = ["*"]
kinds = ["bound", "bare"]

[[deny]]
name = "not-xsk0"
users = ["*"]
interfaces = ["xsk0"]
"""
ALTNAME = "xskalias0"


def alias_attack(path: str, seconds: float) -> dict[str, Any]:
    """Ask for the denied xsk0 under every other name that reaches it, bound and bare, for `seconds`."""
    names = ["xsk0:x", "xsk0:0", "xsk0:", ALTNAME, "xsk0"]
    codes: dict[str, dict[str, int]] = {}
    sample: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in names:
            for kind in ("bound", "bare"):
                got = _try(path, proto.Grant(name, (0,), kind=kind))
                key = f"{name}/{kind}"
                code = "ok" if got["ok"] else got["code"]
                codes.setdefault(key, {}).setdefault(code, 0)
                codes[key][code] += 1
                sample.setdefault(key, got)
    return {"codes": codes, "sample": sample}


def test_alias_and_altnames_cannot_bypass_a_deny(figures) -> None:  # type: ignore[no-untyped-def]
    with bed(ALIAS_POLICY) as (ns, b):
        ns.add_altname("xsk0", ALTNAME)
        attacker = spawn_unprivileged(alias_attack, b.socket_path, 3.0, uid=CONSUMER_UID)
        time.sleep(0.3)
        probe = RootProbe(b.socket_path, "xskr", 0).run(5, pause=0.05).figures()
        got = attacker.result(timeout=30)
        codes, sample = got["codes"], got["sample"]
        for kind in ("bound", "bare"):
            for alias in ("xsk0:x", "xsk0:0", "xsk0:"):
                assert set(codes[f"{alias}/{kind}"]) == {"bad-request"}, (alias, kind, codes, sample)
                assert "not a valid interface name" in sample[f"{alias}/{kind}"]["message"]
            assert set(codes[f"{ALTNAME}/{kind}"]) == {"not-canonical-name"}, (kind, codes, sample)
            refused = sample[f"{ALTNAME}/{kind}"]
            assert "'xsk0'" in refused["message"] and refused["extra"]["canonical"] == "xsk0", refused
            assert set(codes[f"xsk0/{kind}"]) == {"denied-by-rule"}, codes
        # nothing was attached to the denied interface, nothing is held
        assert xdp_prog_on(ns, "xsk0") == 0
        assert _status(b)["leases"] == []
        grants = [r for r in b.records() if r.get("event") == "grant"]
        assert not any(r["decision"] == "allow" and r["request"]["interface"] != "xskr" for r in grants)
        figures(attempts=sum(sum(c.values()) for c in codes.values()), **probe)


def test_an_altname_the_policy_allows_reaches_nothing_and_the_real_name_works() -> None:
    policy = f"""\
version = 1

[[allow]]
name = "alias-allowed"
users = [{CONSUMER_UID}]
interfaces = ["{ALTNAME}", "xsk0"]
"""
    with bed(policy) as (ns, b):
        ns.add_altname("xsk0", ALTNAME)
        by_alt = spawn_unprivileged(_try, b.socket_path, proto.Grant(ALTNAME, (0,)), uid=CONSUMER_UID).result()
        assert by_alt["code"] == "not-canonical-name" and by_alt["extra"]["canonical"] == "xsk0", by_alt
        assert xdp_prog_on(ns, "xsk0") == 0  # refused before anything was attached
        by_name = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (0,)), uid=CONSUMER_UID).result()
        assert by_name["ok"] and by_name["interface"] == "xsk0", by_name


def test_a_name_moved_to_another_device_is_followed_at_once() -> None:
    """The broker remembers xsk0's ifindex between link events: xsk0 renamed away and another device named
    xsk0 right before the next request must get that request judged and granted on the new device, and
    the old one, under its new name, refused."""
    policy = f"""\
version = 1

[[allow]]
name = "xsk0-only"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
"""
    with bed(policy) as (ns, b):
        first = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (0,)),
                                   uid=CONSUMER_UID).result()
        assert first["ok"], first
        ns.rename("xsk0", "xskold")
        ns.add_veth("xsk0", "xsknewp")
        with in_netns(ns.name):
            new_index = socket.if_nametoindex("xsk0")
        assert new_index != first["ifindex"]
        again = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (0,)),
                                   uid=CONSUMER_UID).result()
        assert again["ok"] and again["ifindex"] == new_index, (again, new_index)
        old = spawn_unprivileged(_try, b.socket_path, proto.Grant("xskold", (0,)),
                                 uid=CONSUMER_UID).result()
        assert old["code"] == "interface-not-allowed", old


# ---- finding 4: a map fd that outlives its lease ---------------------------------------------------------

MAP_POLICY = f"""\
version = 1

[[allow]]
name = "whole-interface"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
kinds = ["map"]
exclusive = true

[[allow]]
name = "next-tenant"
users = [{STRANGER_UID}]
interfaces = ["xsk0"]
kinds = ["bound"]
"""


def map_then_fork(path: str, go_r: int, res_w: int) -> dict[str, Any]:
    """Take a map grant, fork a child that keeps the map fd, and return (exit): the lease ends with us.
    The child waits for a byte on go_r, then empties slot 0 of its copy and reports on res_w."""
    reply, fds = request_fds("xsk0", [], kind="map", socket_path=path)
    map_fd = fds[reply["map_fd"]]
    pid = os.fork()
    if pid == 0:
        keep = {map_fd, go_r, res_w}
        for fd in range(3, 256):  # above all the result pipe: our parent's reader waits for its EOF
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        os.read(go_r, 1)
        try:
            result = "deleted" if bpf.map_delete(map_fd, 0) else "was-empty"
        except OSError as e:
            result = f"error {e.errno}"
        os.write(res_w, result.encode())
        os._exit(0)
    return {"lease": reply["lease"], "xdp_prog_id": reply["xdp_prog_id"], "keeper": pid}


def test_a_map_fd_left_in_a_child_cannot_touch_the_next_tenant(figures) -> None:  # type: ignore[no-untyped-def]
    count = 200
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    keeper = -1  # a pidfd: the keeper is not our child, init reaps it once it has reported, freeing its pid
    try:
        with bed(MAP_POLICY) as (ns, b):
            first = spawn_unprivileged(map_then_fork, b.socket_path, go_r, res_w, uid=CONSUMER_UID).result()
            keeper = os.pidfd_open(first["keeper"])  # alive: blocked on go_r until the test writes go_w
            wait_for(lambda: any(r.get("event") == "lease-ended" and r["lease"] == first["lease"]
                                 for r in b.records()), what="the map lease to end with its holder")
            peer = PacketPeer(ns.name, "xsk0p", ns.mac("xsk0"))
            tenant = spawn_unprivileged(echo_consumer, b.socket_path, "xsk0", 0, count, MiB, 20.0, uid=STRANGER_UID)
            try:
                peer.wait_ready()  # the new tenant receives and answers
                now = xdp_prog_on(ns, "xsk0")
                os.write(go_w, b"x")  # the leftover fd empties slot 0 of the map it has
                assert select.select([res_r], [], [], 5)[0], "the keeper never reported"
                attempt = os.read(res_r, 64).decode()
                probe = RootProbe(b.socket_path, "xskr", 0).run(5, pause=0.05).figures()
                moved = peer.exchange(count)
                result = tenant.result(timeout=30)
            finally:
                tenant.kill()
                peer.close()
            assert moved["replies"] == count and result["rx_packets"] == count, (attempt, moved, result)
            # the same per-queue program: the ended lease's map was taken out of it, out of the old fd's reach
            assert now == first["xdp_prog_id"]
            unplaced = [r for r in b.records() if r.get("event") == "map-unplaced"]
            assert unplaced and unplaced[0]["lease"] == first["lease"], unplaced
            figures(keeper_write=attempt, frames_after=moved["replies"],
                    **probe)
    finally:
        if keeper >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(keeper, signal.SIGKILL)
            os.close(keeper)
        for fd in (go_r, go_w, res_r, res_w):
            os.close(fd)


def hold_map(path: str, seconds: float) -> dict[str, Any]:
    reply, fds = request_fds("xsk0", [], kind="map", socket_path=path)
    time.sleep(seconds)
    return {"lease": reply["lease"], "fds": len(fds)}


def release_map_and_wait(path: str, seconds: float) -> dict[str, Any]:
    with Connection(path) as c:
        deadline = time.monotonic() + 5.0
        while True:  # the last tenant's socket may still be closing: its slot empties a moment later
            try:
                reply, fds = c.call(proto.Grant("xsk0", (), kind="map"))
                break
            except proto.BrokerError as e:
                if e.code != "queue-busy" or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        released, _ = c.call(proto.Release(reply["lease"]))
    time.sleep(seconds)  # still alive, fd still open: the lease has nonetheless ended
    return {"pending": released.get("pending"), "fds": fds}


def test_admin_revoke_and_release_end_a_map_lease_at_once() -> None:
    from .consumers import try_grant

    with bed(MAP_POLICY) as (ns, b):
        holder = spawn_unprivileged(hold_map, b.socket_path, 30.0, uid=CONSUMER_UID)
        try:
            lease = wait_for(lambda: next((x for x in _status(b)["leases"] if x["kind"] == "map"), None),
                             what="the map lease")
            blocked = spawn_unprivileged(try_grant, b.socket_path, "xsk0", [0], uid=STRANGER_UID).result()
            assert blocked["code"] == "queue-busy", blocked
            with Connection(b.socket_path) as c:  # root: an admin
                reply, _ = c.call(proto.Revoke(lease=lease["lease"]))
            assert reply["revoked"][0]["ended"] is True, reply
            assert _status(b)["leases"] == [] and xdp_prog_on(ns, "xsk0") != 0  # the map left the program
            assert holder.alive()
            got = spawn_unprivileged(try_grant, b.socket_path, "xsk0", [0], uid=STRANGER_UID).result()
            assert got["ok"], got
        finally:
            holder.kill()
        # release, too, ends it while its holder lives on with the fd
        releases = sum(r.get("event") == "release" for r in b.records())
        releaser = spawn_unprivileged(release_map_and_wait, b.socket_path, 30.0, uid=CONSUMER_UID)
        try:
            wait_for(lambda: sum(r.get("event") == "release" for r in b.records()) > releases,
                     what="the map lease's release")
            got = spawn_unprivileged(try_grant, b.socket_path, "xsk0", [0], uid=STRANGER_UID).result()
            assert got["ok"], got
            assert releaser.alive() and _status(b)["leases"] == []
        finally:
            releaser.kill()


# ---- finding 11: quotas, memlock, ring memory -----------------------------------------------------------

def test_a_map_grant_counts_every_queue_of_the_device_against_quotas() -> None:
    policy = MAP_POLICY + f"""
[[quota]]
name = "one-queue"
users = [{CONSUMER_UID}]
max_queues = 1
"""
    with bed(policy, queues=2) as (ns, b):
        got = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (), kind="map"), uid=CONSUMER_UID).result()
        assert got["ok"] is False and got["code"] == "quota-queues", got
        assert "asks for 2 more" in got["message"], got
        assert xdp_prog_on(ns, "xsk0") == 0 and _status(b)["leases"] == []


BARE_POLICY = f"""\
version = 1

[[allow]]
name = "bare-with-raise"
users = [{CONSUMER_UID}, 0]
interfaces = ["xsk0"]
kinds = ["bare"]
raise_memlock = "8MiB"
"""


def bare_memlock_cycle(path: str, limits: tuple[int, int], needed: int) -> dict[str, Any]:
    """Lower our own memlock limits, take a bare grant that needs `needed`, close and release it (a lease released
    with its sockets open lasts until they close): limits at each step."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, limits)
    with Connection(path) as c:
        reply, fds = c.call(proto.Grant("xsk0", (0,), kind="bare", memlock=needed))
        during = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        for fd in fds:
            os.close(fd)
        c.call(proto.Release(reply["lease"]))
    # the lease ends once its slot is seen empty: at the release, or (the broker's own copy still closing) when
    # the broker next looks, within milliseconds
    deadline = time.monotonic() + 1.0
    while resource.getrlimit(resource.RLIMIT_MEMLOCK) == during and time.monotonic() < deadline:
        time.sleep(0.002)
    return {"memlock": reply["memlock"], "during": during, "after": resource.getrlimit(resource.RLIMIT_MEMLOCK)}


def _in_child(fn: Any, *args: Any) -> Any:
    """fn(*args) in a forked child of the same (root) uid: prlimit on a process of one's own uid needs no
    CAP_SYS_RESOURCE unless it raises the hard limit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, pickle.dumps(fn(*args)))
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return pickle.loads(f.read())
    finally:
        os.waitpid(pid, 0)


def _can_raise_hard_limits() -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))  # CAP_SYS_RESOURCE, which the broker needs to raise another uid's limit


def test_a_memlock_raise_is_undone_when_its_lease_ends() -> None:
    with bed(BARE_POLICY) as (_ns, b):
        # the hard limit is already enough: only the soft one moves, and it moves back at release
        got = _in_child(bare_memlock_cycle, b.socket_path, (64 * KiB, 4 * MiB), MiB)
        assert got["memlock"]["raised"] is True, got
        assert got["during"] == (MiB, 4 * MiB) and got["after"] == (64 * KiB, 4 * MiB), got
        assert any(r.get("event") == "memlock-restored" for r in b.records())
        if not _can_raise_hard_limits():
            return  # this machine's root lacks CAP_SYS_RESOURCE: no raise for another uid can be tested
        got = spawn_unprivileged(bare_memlock_cycle, b.socket_path, (64 * KiB, 64 * KiB), MiB,
                                 uid=CONSUMER_UID).result()
        assert got["during"] == (MiB, MiB) and got["after"] == (64 * KiB, 64 * KiB), got


RING_POLICY = f"""\
version = 1

[[allow]]
name = "small"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
max_umem = "1MiB"
"""


def test_ring_memory_counts_with_the_umem() -> None:
    big_rings = proto.Geometry(umem_size=512 * KiB, fill=65536, completion=65536, rx=65536, tx=65536)
    with bed(RING_POLICY) as (_ns, b):
        # 512 KiB of UMEM but 3 MiB of rings: over the rule's 1 MiB
        refused = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (0,), geometry=big_rings),
                                     uid=CONSUMER_UID).result()
        assert refused["ok"] is False and refused["code"] == "umem-too-large", refused
        ok = spawn_unprivileged(_try, b.socket_path, proto.Grant("xsk0", (0,), geometry=proto.Geometry(512 * KiB)),
                                uid=CONSUMER_UID).result()
        assert ok["ok"], ok
