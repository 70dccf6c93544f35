"""Floods against the event loop, each while a root probe measures the broker's answers (security findings 5 and
7): connections from several uids filling the table (and under a low fd limit, where accept fails with EMFILE),
malformed requests under a rate quota, refused connections, fds attached where SO_PASSRIGHTS refuses them. Every
attacker is a forked child that dropped to an unprivileged uid first.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from xskbroker.testbed.sandbox import spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID
from .loop_rig import (
    ATTACKERS,
    POLICY,
    RATE_POLICY,
    _cpu_ticks,
    _hello_as,
    _probe_conn,
    _recv_reply,
    bed,
    still_open,
    tally,
)
from .probe import RootProbe

# ---- 5. connection-table lockout -----------------------------------------------------------------------------

def connection_hog(path: str, limit: int, hold: float) -> dict[str, Any]:
    """Open as many connections as the broker accepts (up to limit) and hold them."""
    held, refused = [], 0
    for _ in range(limit):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(2.0)
        try:
            s.connect(path)
            s.send(proto.encode_request(proto.Hello()))
            reply = _recv_reply(s)
        except (OSError, ValueError):
            s.close()
            refused += 1
            continue
        if not reply.get("ok"):
            s.close()
            refused += 1
            continue
        held.append(s)
    time.sleep(hold)
    alive = still_open(held)
    for s in held:
        s.close()
    return {"held": len(held), "refused": refused, "alive_at_end": alive}


def test_two_uids_cannot_lock_everyone_out_of_the_connection_table(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        hogs = [spawn_unprivileged(connection_hog, b.socket_path, 700, 4.0, uid=u) for u in ATTACKERS[:2]]
        try:
            time.sleep(3.0)  # both hogs have opened what they can
            probe = RootProbe(b.socket_path).run(3)
            other = spawn_unprivileged(_hello_as, b.socket_path, uid=STRANGER_UID).result(10)
            results = [h.result(30) for h in hogs]
        finally:
            for h in hogs:
                h.kill()
        figures(**probe.figures(), hog_held=[r["held"] for r in results])
        assert other["ok"], other


def test_accept_under_a_low_fd_limit_neither_spins_nor_floods_the_log(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        os.system(f"prlimit --pid {b.pid} --nofile=64:64")
        utime0 = _cpu_ticks(b.pid)
        hog = spawn_unprivileged(connection_hog, b.socket_path, 120, 3.0, uid=ATTACKERS[0])
        try:
            time.sleep(2.0)
            cpu = (_cpu_ticks(b.pid) - utime0) / os.sysconf("SC_CLK_TCK") / 2.0
            probe = RootProbe(b.socket_path).run(3)
            hog.result(30)
        finally:
            hog.kill()
        records = [r for r in b.records() if r.get("event") in ("accept-failed", "connection-refused")]
        figures(**probe.figures(), broker_cpu_share=round(cpu, 2), refusal_records=len(records))
        assert cpu < 0.5, f"the broker used {cpu:.0%} of a CPU while accept failed"
        assert len(records) < 50, f"{len(records)} records for one flood"


# ---- 7. floods that bypass limits ----------------------------------------------------------------------------

def malformed_flood(path: str, count: int) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5.0)
    s.connect(path)
    started = time.monotonic()
    codes = tally(s, (b"{not json" if i % 2 else b'{"v":1,"op":"nope"}' for i in range(count)))
    s.close()
    return {"codes": codes, "seconds": time.monotonic() - started}


def test_malformed_requests_count_against_the_rate_limit_and_are_summarised(figures) -> None:  # type: ignore[no-untyped-def]
    with bed(RATE_POLICY) as (_, b):
        result = spawn_unprivileged(malformed_flood, b.socket_path, 2000, uid=CONSUMER_UID).result(60)
        probe = RootProbe(b.socket_path).run(3)
        codes = result["codes"]
        answered = sum(v for k, v in codes.items() if k != "rate-limited")
        allowed = 5 + 5 * result["seconds"] + 1  # a burst of one second's worth, then the rate
        records = b.records()
        noisy = [r for r in records if r.get("event") in ("bad-request", "rate-limited")]
        figures(**probe.figures(), answered=answered, rate_limited=codes.get("rate-limited", 0),
                records=len(noisy), flood_s=round(result["seconds"], 2))
        assert answered <= allowed, f"{answered} malformed requests judged in {result['seconds']:.1f}s: {codes}"
        assert len(noisy) < 100, f"{len(noisy)} audit records for one peer's flood"


def refused_connection_flood(path: str, count: int) -> dict[str, Any]:
    """Hold the one connection the quota allows, then knock count more times."""
    first = _probe_conn(path)
    refused = 0
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5.0)
            s.connect(path)
            reply = _recv_reply(s)  # refused on connect: the broker speaks first
            refused += not reply.get("ok")
    first.close()
    return {"refused": refused}


def test_refused_connections_are_summarised_not_logged_one_by_one(figures) -> None:  # type: ignore[no-untyped-def]
    policy = POLICY + f"""
[[quota]]
name = "none"
users = [{ATTACKERS[0]}]
max_connections = 1
"""
    with bed(policy) as (_, b):
        result = spawn_unprivileged(refused_connection_flood, b.socket_path, 2000, uid=ATTACKERS[0]).result(60)
        probe = RootProbe(b.socket_path).run(3)
        time.sleep(0.2)
        records = b.records("connection-refused")
        summaries = b.records("suppressed")
        figures(**probe.figures(), refused=result["refused"], records=len(records))
        assert result["refused"] == 2000
        assert len(records) < 50, f"{len(records)} records for 2000 refused connections"
        b.signal(signal.SIGTERM)  # the summary of what was left out is written at the latest when it stops
        assert b.proc is not None
        b.proc.wait(5)
        summaries = b.records("suppressed")
        counted = sum(s["counts"].get("connection-refused", 0) for s in summaries)
        assert counted + len(records) == 2000, (counted, len(records))


def denied_request_flood(path: str, grants: int, revokes: int) -> dict[str, Any]:
    """Requests the policy denies, as fast as they are answered: grants of a queue no rule gives this uid, and
    revokes by a non-admin."""
    s = _probe_conn(path)
    started = time.monotonic()
    grant = proto.encode_request(proto.Grant("xsk0", (0,)))
    revoke = proto.encode_request(proto.Revoke(interface="xsk0"))
    codes = tally(s, [grant] * grants + [revoke] * revokes)
    s.close()
    return {"codes": codes, "seconds": time.monotonic() - started}


def test_denied_requests_are_summarised_so_a_flood_cannot_hide_a_grant(figures) -> None:  # type: ignore[no-untyped-def]
    """Every denied grant and revoke was written in full: one client under a policy with no rate quota wrote
    ~6,000 records a second (10,000 in 1.6 s), and journald's default limit (10,000 per 30 s) then drops every
    record of the broker's for the rest of its interval, the grants that follow included."""
    with bed() as (_, b):
        result = spawn_unprivileged(denied_request_flood, b.socket_path, 2000, 200, uid=ATTACKERS[1]).result(60)
        probe = RootProbe(b.socket_path).run(3)
        granted = spawn_unprivileged(_grant_as, b.socket_path, uid=CONSUMER_UID).result(10)
        denials = [r for r in b.records() if r.get("decision") == "deny" and r["peer"]["uid"] == ATTACKERS[1]]
        figures(**probe.figures(), codes=result["codes"], flood_s=round(result["seconds"], 2), records=len(denials))
        assert sum(result["codes"].values()) == 2200 and "ok" not in result["codes"], result
        assert granted["ok"], granted
        allowed = [r for r in b.records() if r.get("event") == "grant" and r.get("decision") == "allow"
                   and r["peer"]["uid"] == CONSUMER_UID]
        assert len(allowed) == 1, "an allowed grant is always recorded"
        assert len(denials) <= 10, f"{len(denials)} records for one client's denied requests"
        b.signal(signal.SIGTERM)
        assert b.proc is not None
        b.proc.wait(5)
        summaries = b.records("suppressed")
        counted = sum(s["counts"].get("grant", 0) + s["counts"].get("revoke", 0) for s in summaries)
        assert counted + len(denials) == 2200, (counted, len(denials))


def _grant_as(path: str) -> dict[str, Any]:
    from xskbroker.client.grant import request

    with request("xsk0", [0], geometry=proto.Geometry(umem_size=1 << 20), socket_path=path, timeout=5.0) as g:
        return {"ok": bool(g.lease)}


def test_out_of_fds_the_broker_answers_refusals_and_does_not_spin(figures) -> None:  # type: ignore[no-untyped-def]
    """The fd limit lowered below what the broker already holds plus a few: accept fails with EMFILE. The
    listener stays readable; the broker must neither spin nor write a record per attempt, must tell each
    refused client why, and must serve again once fds are free."""
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        # five over what it holds idle: the probe's grant afterwards takes its connection, the holder's pidfd, the
        # socket and its UMEM memfd at once, and on a loaded host the round before may not have let go of all of
        # its own yet (with four, one full-suite run's probe grant failed with EMFILE)
        os.system(f"prlimit --pid {b.pid} --nofile={b.settled_fds() + 5}:{20000}")
        utime0 = _cpu_ticks(b.pid)
        hog = spawn_unprivileged(connection_hog, b.socket_path, 300, 2.5, uid=ATTACKERS[0])
        try:
            time.sleep(2.0)
            cpu = (_cpu_ticks(b.pid) - utime0) / os.sysconf("SC_CLK_TCK") / 2.0
            refused = _hello_as(b.socket_path)  # root too: there is no fd for it
            got = hog.result(30)
        finally:
            hog.kill()
        time.sleep(0.2)
        probe = RootProbe(b.socket_path).run(3)  # the hog is gone: its fds are free again
        # refused where accept fails, or right after it, where the peer's pidfd finds no fd (test below)
        records = b.records("accept-failed") + [r for r in b.records("connection-refused") if "peer" not in r]
        figures(**probe.figures(), broker_cpu_share=round(cpu, 2), refusal_records=len(records),
                hog_held=got["held"], hog_refused=got["refused"])
        assert refused["error"]["code"] == "too-many-connections", refused
        assert got["refused"] > 200, got
        assert cpu < 0.5, f"the broker used {cpu:.0%} of a CPU while accept failed"
        assert 0 < len(records) < 20, f"{len(records)} accept-failed and connection-refused records"


def test_a_connection_accepted_with_the_last_fd_is_refused_not_served_unidentified(figures) -> None:  # type: ignore[no-untyped-def]
    """Accept takes the last fd, so SO_PEERPIDFD fails EMFILE. That was taken for "a kernel without it": the peer
    was then judged and served with no start time, cgroup or pidfs inode (a cgroup rule never matched, its lease
    could not be told from a process that reused its pid). It is refused, with the reason, and served again once
    fds are free."""
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        b.settled_fds()
        held = {int(fd) for fd in os.listdir(f"/proc/{b.pid}/fd")}
        lowest_free = min(set(range(len(held) + 1)) - held)
        os.system(f"prlimit --pid {b.pid} --nofile={lowest_free + 1}:{20000}")  # one fd left: accept's
        try:
            refused = _hello_as(b.socket_path)
        finally:
            os.system(f"prlimit --pid {b.pid} --nofile=4096:20000")
        assert not refused["ok"] and refused["error"]["code"] == "too-many-connections", refused
        assert "identify" in refused["error"]["message"]
        assert _hello_as(b.socket_path)["ok"]
        figures(refusal=refused["error"]["message"])


def test_without_so_passrights_attached_fds_are_closed_and_refused(figures) -> None:  # type: ignore[no-untyped-def]
    """The fallback path: fds that do arrive are counted, closed (off the loop) and the request refused."""
    with bed(extra=["--accept-passed-fds"]) as (_, b):
        r, w = os.pipe()
        try:
            with _probe_conn(b.socket_path) as s:
                socket.send_fds(s, [proto.encode_request(proto.Hello())], [w])
                reply = _recv_reply(s)
        finally:
            os.close(w)
        try:
            os.set_blocking(r, False)
            # the broker closed its copy of the write end: the pipe has no writer left anywhere
            assert reply["error"]["code"] == "fds-not-allowed", reply
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    eof = os.read(r, 1) == b""
                except BlockingIOError:
                    eof = False
                if eof or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert eof, "the broker kept the fd it was sent"
        finally:
            os.close(r)
