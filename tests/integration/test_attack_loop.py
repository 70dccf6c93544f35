"""Hostile clients against the event loop: each attack runs while a root probe measures the broker's answers.

Attacks (security findings 1 and 3, and the stale events of a round): an fd passed on a request whose close
would block (a lingering TCP socket that can never drain), a deferred grant abandoned to make a hand-started
broker idle out, a holder that releases and exits at once, a connection evicted while its request waits in the
round. Connection floods and floods of malformed requests: test_attack_floods.py. Every attacker is a forked
child that dropped to an unprivileged uid first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import time
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, wait_for
from .loop_rig import ATTACKERS, SMALL, _cpu_ticks, _hello_as, _recv_reply, bed, stuck_tcp
from .probe import RootProbe

# ---- 1. an fd whose close blocks -----------------------------------------------------------------------------

def lingering_fd_attack(path: str, tcp_fd: int, hellos: int) -> dict[str, Any]:
    """Queue many hellos, then attach a TCP socket that can never drain and lingers ~68 years on close."""
    tcp = socket.socket(fileno=tcp_fd)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2**31 - 1))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.setblocking(False)
    sent = 0
    for _ in range(hellos):
        try:
            s.send(proto.encode_request(proto.Hello()))
            sent += 1
        except BlockingIOError:
            break
    outcome = "sent"
    try:
        socket.send_fds(s, [proto.encode_request(proto.Hello())], [tcp.fileno()])
    except OSError as e:
        outcome = f"refused: {os.strerror(e.errno or 0)}"
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # our own close must not block
    tcp.close()  # the broker's copy (if it got one) is now the last: its close would block
    time.sleep(3.0)  # keep the connection while the root probe runs
    s.close()
    return {"hellos": sent, "fd": outcome}


def _lingering_attack_on(extra: list[str], figures) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The lingering-fd attack against a broker started with `extra`, a root probe meanwhile; the broker's fds
    must be back at their baseline afterwards."""
    with bed(extra=extra) as (ns, b):
        RootProbe(b.socket_path).run(1)  # the XSK program is attached and cached: what the broker holds from now on
        before = b.settled_fds()
        held = b.fd_targets()
        srv, cli = stuck_tcp(ns.name)
        try:
            attacker = spawn_unprivileged(lingering_fd_attack, b.socket_path, cli.fileno(), 100, uid=CONSUMER_UID)
            cli.close()
            time.sleep(0.5)  # the broker has read the queued hellos and the fd-carrying request by now
            probe = RootProbe(b.socket_path).run(3)
            result: dict[str, Any] = attacker.result(30)
        finally:
            srv.close()
        figures(**probe.figures(), attacker_fd=result["fd"], queued_hellos=result["hellos"])
        # a leak stays; what the broker holds for a moment after a release (its copy of a socket the kernel is
        # still letting go of) goes: fewer than the baseline is a transient fd the baseline caught
        try:
            wait_for(lambda: b.open_fds() <= before, timeout=10.0, what="the broker's fds back at the baseline")
        except AssertionError:
            now = b.fd_targets()
            raise AssertionError(f"broker fds {b.open_fds()} > {before}: new {sorted(set(now) - set(held))}, gone "
                                 f"{sorted(set(held) - set(now))}:\n" + "\n".join(now)) from None
    return result


def test_a_passed_fd_whose_close_blocks_cannot_freeze_the_broker(figures) -> None:  # type: ignore[no-untyped-def]
    result = _lingering_attack_on([], figures)
    assert result["fd"].startswith("refused"), result  # refused at the socket (SO_PASSRIGHTS)


def test_fds_queued_before_accept_are_closed_off_the_event_loop(figures) -> None:  # type: ignore[no-untyped-def]
    """Under a kernel without SO_PASSRIGHTS (the broker is told to act as if so) fds do arrive: closing one must
    still never stall the loop, nor the closer threads that release grant fds."""
    result = _lingering_attack_on(["--accept-passed-fds"], figures)
    assert result["fd"] == "sent", result


# ---- 3. idle exit --------------------------------------------------------------------------------------------

def _released_but_bound(path: str, timeout: float | None = None) -> tuple[socket.socket, list[int]]:
    """Take queue 0 and release it but keep its fds (the queue stays bound, so the next grant of it waits for the
    kernel): a connection to the broker, and those fds."""
    grant, fds = request_fds("xsk0", [0], kind="bound", geometry=SMALL, socket_path=path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    s.connect(path)
    s.send(proto.encode_request(proto.Release(grant["lease"])))
    _recv_reply(s)
    return s, fds


def abandoned_deferred_grant(path: str) -> dict[str, Any]:
    """Take queue 0, release it but keep the socket (the queue stays bound), ask again (the grant waits for the
    kernel) and hang up at once."""
    s, fds = _released_but_bound(path)
    s.send(proto.encode_request(proto.Grant("xsk0", (0,), geometry=SMALL)))
    time.sleep(0.05)
    s.close()
    time.sleep(2.0)  # the broker's bind retry gives up after a second; then nothing is left for it to do
    for fd in fds:
        os.close(fd)
    return {"ok": True}


def test_a_user_cannot_make_a_hand_started_broker_exit(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        spawn_unprivileged(abandoned_deferred_grant, b.socket_path, uid=CONSUMER_UID).result(30)
        time.sleep(0.5)
        assert b.proc is not None and b.proc.poll() is None, f"broker exited:\n{b.log()[-2000:]}"
        probe = RootProbe(b.socket_path).run(3)
        figures(**probe.figures())
        assert not [r for r in b.records() if r.get("event") == "idle-exit"]


def test_idle_exit_waits_for_the_whole_timeout(figures) -> None:  # type: ignore[no-untyped-def]
    with bed(extra=["--idle-timeout", "4"]) as (_, b):
        spawn_unprivileged(abandoned_deferred_grant, b.socket_path, uid=CONSUMER_UID).result(30)
        assert b.proc is not None
        b.proc.wait(10)
        records = b.records()
        # the broker became idle when the abandoned grant gave up and its reply found nobody
        last_work = next(r["ts"] for r in reversed(records) if r.get("event") == "reply-failed")
        idle_exit = next(r["ts"] for r in records if r.get("event") == "idle-exit")
        figures(exited_after_idle_s=round(idle_exit - last_work, 2))
        assert idle_exit - last_work >= 4.0 - 0.05, records[-4:]


def requests_behind_a_waiting_grant(path: str, extra: int, wait: float) -> dict[str, Any]:
    """Make a grant wait for the kernel (its queue is still bound by a socket this client keeps), send `extra`
    hellos behind it on the same connection without waiting, then free the queue after `wait` seconds: the
    replies must come back one per request, in the order asked."""
    s, fds = _released_but_bound(path, timeout=10)
    s.send(proto.encode_request(proto.Grant("xsk0", (0,), geometry=SMALL, req_id=0)))
    for i in range(extra):
        s.send(proto.encode_request(proto.Hello(req_id=i + 1)))
    time.sleep(wait)
    for fd in fds:  # the queue is released (a grace period later) and the waiting grant binds
        os.close(fd)
    got = []
    for _ in range(1 + extra):
        msg, more, _, _ = socket.recv_fds(s, 1 << 16, 8)
        for fd in more:
            os.close(fd)
        reply = json.loads(msg)
        got.append((reply["id"], reply["op"], reply["ok"]))
    s.close()
    return {"replies": got}


def test_requests_sent_behind_a_waiting_grant_are_answered_in_order_without_spinning(figures) -> None:  # type: ignore[no-untyped-def]
    """A connection whose grant waits stays registered with the loop; its next requests (and a readable socket
    is all they make it) must neither be answered before the grant nor keep the loop busy."""
    with bed() as (_, b):
        ticks = _cpu_ticks(b.pid)
        got = spawn_unprivileged(requests_behind_a_waiting_grant, b.socket_path, 3, 0.4, uid=CONSUMER_UID).result(30)
        cpu_s = (_cpu_ticks(b.pid) - ticks) / os.sysconf("SC_CLK_TCK")
        figures(replies=got["replies"], broker_cpu_s=round(cpu_s, 3))
        assert got["replies"] == [(0, "grant", True), (1, "hello", True), (2, "hello", True), (3, "hello", True)]
        assert cpu_s < 0.3, "the broker spun on the readable connection while its grant waited"
        probe = RootProbe(b.socket_path).run(1)
        figures(**probe.figures())


def _release_and_leave(path: str, queue: int) -> str:
    """Take a grant, send its release and exit without waiting for the answer: the broker then meets the
    release and the holder's exit (its pidfd turns readable) in one round of events."""
    c = Connection(path)
    reply, fds = c.call(proto.Grant("xsk0", (queue,), kind="bound", geometry=SMALL))
    for fd in fds:
        os.close(fd)
    c.sock.send(proto.encode_request(proto.Release(reply["lease"])))
    return str(reply["lease"])


def test_a_holder_that_releases_and_exits_at_once_cannot_crash_the_broker(figures) -> None:  # type: ignore[no-untyped-def]
    """Handling the release stops the watch on the holder's pidfd; the pidfd's own event, already in that round's
    list, must then be skipped, not handled for a pid no longer watched (it raised KeyError out of the loop and
    the broker exited: any client could stop it with one message)."""
    with bed() as (_, b):
        rounds = 0
        for i in range(40):
            holder = spawn_unprivileged(_release_and_leave, b.socket_path, i % 2, uid=CONSUMER_UID)
            try:
                holder.result()
            except RuntimeError:  # its grant met a broker that had exited: said below
                if b.proc.poll() is None:
                    raise
            assert b.proc.poll() is None, f"the broker exited after {rounds} holders:\n{b.log()[-2000:]}"
            rounds += 1
        time.sleep(0.2)  # the last holders' exits
        assert b.proc.poll() is None, f"the broker exited:\n{b.log()[-3000:]}"
        with Connection(b.socket_path, timeout=2.0) as c:
            assert c.call(proto.Hello())[0]["ok"] is True
        released = [r for r in b.records() if r.get("event") == "release"]
        assert len(released) == rounds
        figures(holders=rounds, releases_recorded=len(released))


def _fill(path: str, conns: list[socket.socket]) -> None:
    """Open connections until the broker refuses one."""
    for _ in range(1024):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(2.0)
        try:
            s.connect(path)
            s.send(proto.encode_request(proto.Hello()))
            ok = _recv_reply(s).get("ok")
        except (OSError, ValueError):
            ok = False
        if not ok:
            s.close()
            return
        conns.append(s)


def chatty_hog(path: str, seconds: float) -> dict[str, Any]:
    """Keep the connection table full (taking back what another user's connection made room for) and a hello
    in flight on every connection, so that most rounds of the broker's events hold one of them."""
    conns: list[socket.socket] = []
    _fill(path, conns)
    held, sent, lost = len(conns), 0, 0
    end = time.monotonic() + seconds
    while conns and time.monotonic() < end:
        for s in list(conns):
            try:
                s.send(proto.encode_request(proto.Hello()))
                sent += 1
                if _recv_reply(s).get("ok"):
                    continue
            except (OSError, ValueError):
                pass
            conns.remove(s)  # evicted for another user's connection
            s.close()
            lost += 1
        if len(conns) < held:
            _fill(path, conns)
    for s in conns:
        s.close()
    return {"held": held, "sent": sent, "lost": lost}


def test_a_connection_evicted_while_its_request_waits_in_the_round_cannot_crash_the_broker(figures) -> None:  # type: ignore[no-untyped-def]
    """Another user's connection evicts the hog's oldest; when that one's own request is in the same round of
    events, after the newcomer's, its event must be skipped (it read the closed connection's entry: KeyError out
    of the loop)."""
    with bed() as (_, b):
        os.system(f"prlimit --pid {b.pid} --nofile=256:256")  # a small connection table
        hog = spawn_unprivileged(chatty_hog, b.socket_path, 4.0, uid=ATTACKERS[0])
        try:
            time.sleep(1.0)
            answered = 0
            for _ in range(60):
                try:
                    answered += bool(spawn_unprivileged(_hello_as, b.socket_path, uid=STRANGER_UID).result(10)["ok"])
                except RuntimeError:  # no reply: said below if the broker is exiting
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        b.proc.wait(5)
                    if b.proc.poll() is None:
                        raise
                    break
            assert b.proc.poll() is None, f"the broker exited:\n{b.log()[-1500:]}"
            held = hog.result(30)
        finally:
            hog.kill()
        figures(hog_held=held["held"], hog_hellos=held["sent"], hog_evicted=held["lost"], stranger_answered=answered)
        assert held["lost"] >= 30 and answered == 60  # (the audit summarises evictions: the hog counts them)
