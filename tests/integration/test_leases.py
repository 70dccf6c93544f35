"""Leases over time: quotas, restart recovery, revocation, interfaces that change, faults mid-grant."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, PacketPeer, VethNamespace, echo_consumer, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .consumers import exchange_raw, hold_grant, probe_connections, release_and_keep, try_grant

MiB = 1 << 20
BASE = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}]
interfaces = ["xsk*"]
max_umem = "64MiB"
"""


def _status(b: BrokerProcess) -> dict:
    with Connection(b.socket_path) as c:
        return c.call(proto.Status())[0]



def _hold(b: BrokerProcess, iface: str, queues: list[int], seconds: float = 60.0):  # type: ignore[no-untyped-def]
    before = len(_status(b)["leases"])
    child = spawn_unprivileged(hold_grant, b.socket_path, iface, queues, seconds, uid=CONSUMER_UID)
    wait_for(lambda: len(_status(b)["leases"]) > before or not child.alive(), what="the holder's lease")
    assert child.alive(), "holder could not take its grant"
    return child


# ---- quotas ----------------------------------------------------------------------------------------------

def test_queue_and_umem_quotas_count_what_is_held(veth: VethNamespace, figures) -> None:  # type: ignore[no-untyped-def]
    policy = BASE + f"""
[[quota]]
name = "per-tenant"
users = [{CONSUMER_UID}]
max_queues = 1
max_umem = "6MiB"
"""
    with BrokerProcess(veth.name, policy) as b:
        holder = _hold(b, veth.inside, [0])  # 4 MiB, one queue
        try:
            more_queues = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], 1 * MiB,
                                             uid=CONSUMER_UID).result()
            assert more_queues["code"] == "quota-queues", more_queues
            status = _status(b)
            assert status["quotas"] == [] or status["admin"] is True  # root asked: its own scope has no quota
        finally:
            holder.kill()
        wait_for(lambda: not _status(b)["leases"], what="the lease to end")
        ok = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], 4 * MiB, uid=CONSUMER_UID).result()
        assert ok["ok"], ok
        too_much = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], 8 * MiB, uid=CONSUMER_UID).result()
        assert too_much["code"] == "quota-umem" and "6 MiB" in too_much["message"], too_much
        figures(quota_refusals=2)


def test_a_lease_released_with_its_sockets_kept_still_counts_against_the_quota(veth: VethNamespace,  # type: ignore[no-untyped-def]
                                                                                 figures) -> None:
    """Release and keep: the holder's sockets stay bound (the kernel cannot close them for it), so the lease stays
    on its quota, listed as released, until they close. Before, the release freed the quota at once and a user
    under a quota of one queue held two."""
    policy = BASE + f"""
[[quota]]
name = "one-queue"
users = [{CONSUMER_UID}]
max_queues = 1
"""
    with BrokerProcess(veth.name, policy) as b:
        got = spawn_unprivileged(release_and_keep, b.socket_path, veth.inside, uid=CONSUMER_UID).result(30)
        assert [x["released"] for x in got["status_while_kept"]] == [True], got
        assert got["kept"].get("code") == "quota-queues", got["kept"]
        assert got["closed"].get("ok"), got["closed"]
        assert got["after_library_order"].get("ok"), got["after_library_order"]
        figures(**{f"{step}_ms": round(got[step]["s"] * 1000, 2) for step in ("kept", "closed", "after_library_order")})
        ended = [r for r in b.records("lease-ended") if r["reason"] == "its sockets were closed after its release"]
        assert ended, b.records("lease-ended")
        wait_for(lambda: not _status(b)["leases"], what="every lease to end")


def test_connection_quota_and_rate_limit(veth: VethNamespace) -> None:
    policy = BASE + f"""
[[quota]]
name = "conns"
users = [{CONSUMER_UID}]
max_connections = 3

[[quota]]
name = "rate"
groups = ["65534"]
max_requests_per_second = 5
"""
    with BrokerProcess(veth.name, policy) as b:
        answers = spawn_unprivileged(probe_connections, b.socket_path, 5, uid=CONSUMER_UID).result()
        assert answers[:3] == ["ok", "ok", "ok"] and set(answers[3:]) == {"quota-connections"}, answers
        hello = proto.encode_request(proto.Hello())
        time.sleep(1.1)  # the hellos above drew on the same bucket: let it refill
        codes = spawn_unprivileged(exchange_raw, b.socket_path, [hello] * 20, uid=CONSUMER_UID).result()
        assert codes[:5] == ["ok"] * 5 and "rate-limited" in codes, codes
        # root is in no group the quota names, so it is never limited
        assert set(exchange_raw(b.socket_path, [hello] * 20)) == {"ok"}


# ---- restart recovery --------------------------------------------------------------------------------------

def test_live_consumer_keeps_working_across_a_broker_crash(veth: VethNamespace, figures) -> None:  # type: ignore[no-untyped-def]
    with BrokerProcess(veth.name, BASE) as b:
        peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
        child = spawn_unprivileged(echo_consumer, b.socket_path, veth.inside, 0, 600, 4 * MiB, 30.0,
                                   uid=CONSUMER_UID)
        try:
            peer.wait_ready(cpu=0)
            before = peer.exchange(300, cpu=0)
            lease = _status(b)["leases"][0]["lease"]
            b.proc.kill()  # type: ignore[union-attr]
            b.proc.wait()  # type: ignore[union-attr]
            b.start()
            assert b.records("lease-recovered")[-1]["lease"] == lease
            assert [x["lease"] for x in _status(b)["leases"]] == [lease]
            # the held queue is not granted twice by the new broker
            busy = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert busy["code"] == "queue-busy"
            after = peer.exchange(300, cpu=0)
            result = child.result()
        finally:
            child.kill()
            peer.close()
        assert before["replies"] == 300 and after["replies"] == 300 and result["rx_packets"] == 600
        # the recovered lease ends when its holder exits, watched by the new broker
        wait_for(lambda: not _status(b)["leases"], what="the recovered lease to end")
        assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]
        figures(packets_before_crash=300, packets_after_restart=300)


FAULT_POINTS = ["after-socket", "after-map-claim", "after-umem-reg", "after-bind", "after-lease-saved",
                "before-send", "after-send"]


def test_broker_killed_at_every_step_of_a_grant_leaves_nothing_stale(veth: VethNamespace,
                                                                       figures) -> None:  # type: ignore[no-untyped-def]
    for point in FAULT_POINTS:
        with BrokerProcess(veth.name, BASE, env={"XSKBROKER_FAULT": point}) as b:
            got = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert b.proc.wait(5) == -signal.SIGKILL, (point, b.log())  # type: ignore[union-attr]
            if point == "after-send":
                assert got["ok"] is True  # the fds had left; the consumer then closed them
            else:
                assert got["ok"] is False, (point, got)
            b.env = {}
            b.start()
            assert _status(b)["leases"] == [], (point, b.log())
            # no stale slot, no lost queue: the queue is granted at once, and only once
            first = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [0], 30.0, uid=CONSUMER_UID)
            try:
                wait_for(lambda: _status(b)["leases"], what=f"a grant after a crash at {point}")
                again = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
                assert again["code"] == "queue-busy", (point, again)
            finally:
                first.kill()
    figures(faults_injected=len(FAULT_POINTS))


def test_a_broker_killed_mid_revoke_still_charges_the_revoked_lease(veth: VethNamespace,
                                                                    figures) -> None:  # type: ignore[no-untyped-def]
    """SIGKILLed between a revoke's journal line and the emptying of its slot (the journal said live a lease whose
    slot was empty, and the next broker dropped it): the holder's bound socket must stay on its quota."""
    policy = BASE + f'\n[[quota]]\nname = "one"\nusers = [{CONSUMER_UID}]\nmax_queues = 1\n\n[admin]\nusers = [0]\n'
    with BrokerProcess(veth.name, policy, env={"XSKBROKER_FAULT": "mid-revoke"}) as b:
        child = _hold(b, veth.inside, [0])
        try:
            lease = _status(b)["leases"][0]["lease"]
            try:
                with Connection(b.socket_path) as c:
                    c.call(proto.Revoke(lease=lease))
            except (ConnectionError, OSError, proto.BrokerError):
                pass  # killed before it answered
            assert b.proc.wait(5) == -signal.SIGKILL, b.log()  # type: ignore[union-attr]
            b.env = {}
            b.start()
            leases = _status(b)["leases"]
            assert [(x["lease"], x["revoked"]) for x in leases] == [(lease, True)], (leases, b.records("lease-dropped"))
            more = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], uid=CONSUMER_UID).result()
            assert more["code"] == "quota-queues", more
        finally:
            child.kill()
        wait_for(lambda: not _status(b)["leases"], what="the revoked lease to end with its holder")
        figures(refused_after_restart=more["code"])


def test_interface_deleted_mid_grant(veth: VethNamespace) -> None:
    veth.add_veth("xsk1", "xsk1p")
    with BrokerProcess(veth.name, BASE, env={"XSKBROKER_FAULT": "after-map-claim:pause"}) as b:
        baseline = b.settled_fds()
        child = spawn_unprivileged(try_grant, b.socket_path, "xsk1", [0], uid=CONSUMER_UID)
        wait_for(lambda: b.records("xdp-attach"), what="the grant to reach the kernel")
        veth.delete_link("xsk1")
        got = child.result()
        assert got["ok"] is False and got["code"] in ("kernel-error", "no-such-interface"), got
        assert b.proc.poll() is None  # type: ignore[union-attr]
        wait_for(lambda: not _status(b)["leases"], what="no lease on a deleted interface")
        assert b.settled_fds() <= baseline + 0, b.fd_targets()
        assert b.records("interface-removed")


def test_a_bug_while_replying_costs_the_request_not_the_broker(veth: VethNamespace, tmp_path: Path) -> None:
    """An exception between the grant and its send (here injected where the reply is sent) must not stop the loop
    with everyone's leases: the request's lease is undone, its fds closed, and the next client is served."""
    bug = tmp_path / "bug"
    with BrokerProcess(veth.name, BASE, env={"XSKBROKER_FAULT": f"before-send:raise={bug}"}) as b:
        # the interface's program and map, which the first grant loads, stay: count from after one
        assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]
        baseline = b.settled_fds()
        bug.touch()
        for _ in range(3):
            got = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
            assert got["ok"] is False, got
            assert b.proc.poll() is None, b.log()  # type: ignore[union-attr]
        bug.unlink()
        assert _status(b)["leases"] == []
        assert b.settled_fds() <= baseline, b.fd_targets()
        failed = b.records("reply-failed")
        assert len(failed) == 3 and "fault injected at before-send" in failed[0]["error"], failed


# ---- revocation ----------------------------------------------------------------------------------------------

def test_revoke_stops_rx_and_is_admin_only(veth: VethNamespace) -> None:
    policy = BASE + '\n[admin]\nusers = [0]\nrevoke_signal = "SIGTERM"\n'
    with BrokerProcess(veth.name, policy) as b:
        peer = PacketPeer(veth.name, veth.peer, veth.mac(veth.inside))
        child = spawn_unprivileged(echo_consumer, b.socket_path, veth.inside, 0, 10_000, 4 * MiB, 30.0,
                                   uid=CONSUMER_UID)
        try:
            peer.wait_ready(cpu=0)
            assert peer.exchange(100, cpu=0)["replies"] == 100
            lease = _status(b)["leases"][0]["lease"]
            denied = spawn_unprivileged(exchange_raw, b.socket_path,
                                        [proto.encode_request(proto.Revoke(lease=lease))], uid=CONSUMER_UID).result()
            assert denied == ["not-admin"]
            with Connection(b.socket_path) as c:
                reply, _ = c.call(proto.Revoke(lease=lease))
            assert reply["revoked"][0]["emptied_queues"] == [0] and "transmit" in reply["note"]
            assert peer.exchange(50, cpu=0, idle=0.5)["replies"] == 0  # RX stopped
            status = _status(b)
            assert status["leases"][0]["revoked"] is True  # held (and counted) until the holder closes
            with Connection(b.socket_path) as c:
                reply, _ = c.call(proto.Revoke(interface=veth.inside, queue=0, signal=True))
            assert reply["revoked"][0]["signalled"] is True
            wait_for(lambda: not child.alive(), what="the signalled holder to exit")
        finally:
            child.kill()
            peer.close()
        wait_for(lambda: not _status(b)["leases"], what="the revoked lease to end")


def test_revoke_cli_prints_what_happened(veth: VethNamespace) -> None:
    with BrokerProcess(veth.name, BASE) as b:
        holder = _hold(b, veth.inside, [0])
        try:
            done = subprocess.run(["xskbroker" if False else os.sys.executable, "-m", "xskbroker.broker", "revoke",
                                   "--socket", b.socket_path, "--interface", veth.inside, "--queue", "0"],
                                  capture_output=True, text=True, timeout=30, check=False,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
            assert done.returncode == 0, done.stderr
            assert "emptied queues [0]" in done.stdout and "transmit" in done.stdout
            shown = subprocess.run([os.sys.executable, "-m", "xskbroker.broker", "status", "--socket", b.socket_path],
                                   capture_output=True, text=True, timeout=30, check=False,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
            assert "REVOKED" in shown.stdout, shown.stdout
        finally:
            holder.kill()


# ---- interfaces that change ------------------------------------------------------------------------------

def test_interface_removed_ends_its_leases(veth: VethNamespace) -> None:
    veth.add_veth("xsk1", "xsk1p")
    with BrokerProcess(veth.name, BASE) as b:
        holder = _hold(b, "xsk1", [0])
        try:
            veth.delete_link("xsk1")
            wait_for(lambda: not _status(b)["leases"], what="the lease to end with its interface")
        finally:
            holder.kill()
        ended = b.records("lease-ended")
        assert ended and "removed" in ended[0]["reason"]
        assert b.records("interface-removed")[0]["interface"] == "xsk1"


def test_rename_keeps_leases_and_new_grants_follow_policy_by_name(veth: VethNamespace) -> None:
    veth.add_veth("xsk1", "xsk1p", queues=2)
    with BrokerProcess(veth.name, BASE) as b:
        holder = _hold(b, "xsk1", [0])
        try:
            veth.rename("xsk1", "other1")
            wait_for(lambda: b.records("interface-renamed"), what="the rename to be noticed")
            (lease,) = _status(b)["leases"]
            assert lease["interface"] == "other1"
            refused = spawn_unprivileged(try_grant, b.socket_path, "other1", [1], uid=CONSUMER_UID).result()
            assert refused["code"] == "interface-not-allowed"
            veth.rename("other1", "xsk9")
            ok = spawn_unprivileged(try_grant, b.socket_path, "xsk9", [1], uid=CONSUMER_UID).result()
            assert ok["ok"], ok
            assert _status(b)["leases"][0]["interface"] == "xsk9"
        finally:
            holder.kill()


def test_xdp_program_removed_by_someone_else_is_reported(veth: VethNamespace) -> None:
    with BrokerProcess(veth.name, BASE) as b:
        holder = _hold(b, veth.inside, [0])
        try:
            veth.xdp_off(veth.inside)
            changed = wait_for(lambda: b.records("xdp-program-changed"), what="the change to be reported")
            assert changed[0]["now"] is None and changed[0]["leases"]
        finally:
            holder.kill()


# ---- policy reload ----------------------------------------------------------------------------------------------

def test_corrupted_policy_on_reload_keeps_the_old_one(veth: VethNamespace) -> None:
    with BrokerProcess(veth.name, BASE) as b:
        Path(b.policy_path).write_text("version = 1\n[[allow]\nname = broken")
        b.signal(signal.SIGHUP)
        failed = wait_for(lambda: b.records("policy-reload-failed"), what="the failed reload")
        assert any(":2:" in e for e in failed[0]["errors"]), failed
        assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]
        Path(b.policy_path).write_text("version = 1\n")
        b.signal(signal.SIGHUP)
        wait_for(lambda: b.records("policy-reloaded"), what="the good reload")
        denied = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        assert denied["code"] == "user-not-allowed"


def test_a_reload_asked_right_after_ready_reloads_and_never_ends_the_broker(veth: VethNamespace) -> None:
    """The ready record and READY=1 went out before the loop took SIGHUP: a reload sent in between (systemd's
    ExecReload right after a start, a test's first SIGHUP) met SIGHUP's default action and ended the broker. The
    "ready" fault point holds the start there, so the window is certain."""
    with BrokerProcess(veth.name, BASE, env={"XSKBROKER_FAULT": "ready:pause=0.5"}) as b:
        Path(b.policy_path).write_text("version = 1\n")
        b.signal(signal.SIGHUP)
        wait_for(lambda: b.records("policy-reloaded"), what="the reload")
        assert b.proc is not None and b.proc.poll() is None, b.log()
        denied = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        assert denied["code"] == "user-not-allowed"


def test_one_user_cannot_take_every_connection(veth: VethNamespace) -> None:
    # a 64-connection table: 4 kept for admins, the other 60 shared fairly (tests/integration/test_attack_loop.py
    # floods it from several uids)
    with BrokerProcess(veth.name, BASE, extra_args=["--max-connections", "64"]) as b:
        answers = spawn_unprivileged(probe_connections, b.socket_path, 63, uid=CONSUMER_UID).result(60)
        assert answers[:60] == ["ok"] * 60
        assert answers[60:] == ["too-many-connections"] * 3
        # meanwhile everyone else is served: root from the admins' reserve
        assert exchange_raw(b.socket_path, [proto.encode_request(proto.Hello())]) == ["ok"]
