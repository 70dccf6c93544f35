"""A client chooses parts of its own identity: whoever owns a delegated cgroup v2 subtree (every user's
systemd session does) names cgroups with any bytes but '/' and newline. The broker reads that name on every
connection; one that is not UTF-8 must get a clear refusal, never an exception in the accept path, which
would end the broker (and every other client's service) at each connect."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.peer import MAX_PEER_GROUPS
from xskbroker.client.connection import Connection
from xskbroker.common.privileges import drop_to
from xskbroker.testbed.sandbox import BrokerProcess, Child, VethNamespace, fork_child, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .test_vm_identity import _unified

POLICY = f"""version = 1

[[allow]]
name = "consumer"
users = [{CONSUMER_UID}]
interfaces = ["xsk*"]
"""


def _connect_when_placed(path: str, gate: int) -> dict[str, Any]:
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    with open("/proc/self/cgroup", "rb") as f:
        cgroup = next(line[3:].strip() for line in f if line.startswith(b"0::"))
    try:
        with Connection(path) as c:
            reply, _ = c.call(proto.Hello())
        return {"cgroup": cgroup, "ok": True, "reply": reply}
    except proto.BrokerError as e:
        return {"cgroup": cgroup, "ok": False, "code": e.code, "message": e.message}
    except ConnectionError as e:
        return {"cgroup": cgroup, "ok": False, "code": "connection-error", "message": str(e)}


@contextlib.contextmanager
def _bad_cgroup() -> Iterator[Path]:
    root = _unified()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    bad = Path(os.fsdecode(os.fsencode(str(root)) + f"/xskt{os.getpid()}-".encode() + b"\xff\xfe"))
    bad.mkdir()
    try:
        yield bad
    finally:
        bad.rmdir()  # empty by now: the child was reaped


def _run_in(cgroup: Path, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args, gate) as the consumer uid, placed in cgroup before it is let go."""
    rfd, wfd = os.pipe()
    child = spawn_unprivileged(fn, *args, rfd, uid=CONSUMER_UID)
    os.close(rfd)
    try:
        (cgroup / "cgroup.procs").write_text(str(child.pid))
        os.write(wfd, b"go\n")
        result: dict[str, Any] = child.result()
    finally:
        child.kill()
        os.close(wfd)
    return result


def test_a_cgroup_named_with_bytes_that_are_not_utf8_is_refused_clearly_and_the_broker_lives_on(
        veth: VethNamespace) -> None:
    with _bad_cgroup() as bad, BrokerProcess(veth.name, POLICY) as b:
        result = _run_in(bad, _connect_when_placed, b.socket_path)
        assert result["cgroup"].endswith(b"\xff\xfe"), result
        assert not result["ok"], result
        assert result["code"] == "identity-unreadable", result
        assert "not valid UTF-8" in result["message"]
        # the broker is alive and serves the next client (root: an admin)
        assert b.proc is not None and b.proc.poll() is None, b.log()
        with Connection(b.socket_path) as c:
            assert c.call(proto.Status())[0]["leases"] == []
        refused = [r for r in b.records() if r.get("event") == "connection-refused"]
        assert refused and refused[-1]["code"] == "identity-unreadable", b.log()


def _dp_connect_when_placed(path: str, gate: int) -> dict[str, Any]:
    """DPDK's first message to a device-plugin endpoint; what comes back (nothing: the connection closed)."""
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.send(b"/connect,host")
        try:
            return {"reply": s.recv(4096)}
        except OSError as e:
            return {"reply": b"", "error": e.strerror}


def test_the_device_plugin_endpoint_refuses_it_too(veth: VethNamespace) -> None:
    base = tempfile.mkdtemp(prefix="xd-", dir="/tmp")
    os.chmod(base, 0o755)
    path = f"{base}/afxdp_dp/xsk0/afxdp.sock"
    try:
        endpoint = ["--device-plugin", f"interface=xsk0,user={CONSUMER_UID},path={path}"]
        with _bad_cgroup() as bad, BrokerProcess(veth.name, POLICY, endpoint) as b:
            result = _run_in(bad, _dp_connect_when_placed, path)
            assert result["reply"] == b"", result  # dropped before any answer: no lease, no map
            refused = wait_for(lambda: [r for r in b.records() if r.get("event") == "dp-refused"], what="a record")
            assert "not valid UTF-8" in refused[-1]["reason"], refused
            assert b.proc is not None and b.proc.poll() is None, b.log()
            with Connection(b.socket_path) as c:
                assert c.call(proto.Status())[0]["leases"] == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_member_of_more_than_256_groups_is_identified_with_all_of_them(tmp_path: Path) -> None:
    """SO_PEERGROUPS past 256 groups needs a buffer over 1 KiB, which Python's getsockopt refuses before the
    kernel is asked ("buflen out of range"): such a client's every connection was dropped unanswered. The LSM
    label (SO_PEERSEC) is read the same way: a rule that denies by label must see labels past 1 KiB too."""
    from xskbroker.broker import peer

    groups = list(range(200_000, 200_300))
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        pid = os.fork()
        if pid == 0:  # the child: 300 supplementary groups, then connect and wait to be read
            try:
                os.setgroups(groups)
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                    c.connect(path)
                    c.recv(1)
            finally:
                os._exit(0)
        try:
            conn, _ = listener.accept()
            with conn:
                assert peer.peer_groups(conn) == frozenset(groups)
                who = peer.identify(conn, peer.GroupNames())
                assert who.pid == pid and frozenset(groups) <= who.gids
                try:  # the kernel is asked with a buffer past Python's 1 KiB: its own answer comes back
                    label = peer.read_sockopt(conn, peer.SO_PEERSEC, peer.MAX_LABEL)
                except OSError as e:
                    assert e.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP), e  # no LSM labels sockets here
                    assert who.label is None
                else:
                    assert who.label == (label.split(b"\0", 1)[0].decode(errors="replace").strip() or None)
                conn.send(b"x")
        finally:
            os.waitpid(pid, 0)


# ---- a deny naming the client's cgroup, escaped by making that cgroup unknown -------------------------------

BOUND_POLICY = f"""version = 1

[[allow]]
name = "consumer"
users = [{CONSUMER_UID}]
interfaces = ["xsk*"]
kinds = ["bound"]
max_umem = "4MiB"
"""
DENY_POLICY = BOUND_POLICY + """
[[deny]]
name = "not-from-the-sandbox"
users = ["*"]
cgroups = ["/xskt*-sandbox"]
interfaces = ["*"]
"""
SMALL = proto.Geometry(umem_size=1 << 20, fill=64, completion=64, rx=64, tx=64)
TRIES = 200  # before the fix the broker lost the race to the connector's exit within ~15 tries here


def _ask(s: socket.socket, request: proto.Request) -> dict[str, Any]:
    """Send, and receive the reply (its fds closed). A connection whose connector has exited is refused at once:
    the refusal is sent and the connection closed, maybe before this send (EPIPE) or just after it (the request
    left unread, so the first receive fails ECONNRESET): the refusal is still there to read."""
    with contextlib.suppress(BrokenPipeError):
        s.send(proto.encode_request(request))
    try:
        data, fds, _, _ = socket.recv_fds(s, 1 << 16, 8)
    except ConnectionResetError:
        data, fds, _, _ = socket.recv_fds(s, 1 << 16, 8)
    for fd in fds:
        os.close(fd)
    reply: dict[str, Any] = json.loads(data)
    return reply


def _through_left_connections(path: str, request: proto.Request, tries: int) -> dict[str, Any]:
    """Up to `tries` times: a child connects and exits at once, leaving the connection (the same open socket) to
    this process, in the same cgroup, which sends the request. When the broker reads the connector's identity only
    after that exit, its cgroup is unknown. The first grant ends it."""
    codes: list[str] = []
    for attempt in range(tries):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            connector = os.fork()
            if connector == 0:
                try:
                    s.connect(path)
                finally:
                    os._exit(0)
            os.waitpid(connector, 0)
            reply = _ask(s, request)
        if reply["ok"]:
            return {"granted_at": attempt, "lease": reply["lease"], "codes": codes}
        codes.append(reply["error"]["code"])
    return {"granted_at": None, "codes": codes}


def _grant_through_a_connection_its_connector_left(path: str, tries: int, gate: int) -> dict[str, Any]:
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    return _through_left_connections(path, proto.Grant("xsk0", (0,), geometry=SMALL), tries)


def test_a_deny_naming_the_clients_cgroup_cannot_be_escaped_by_hiding_the_cgroup(veth: VethNamespace,
                                                                                 figures) -> None:  # type: ignore[no-untyped-def]
    """A deny that names cgroups did not apply to a peer whose cgroup the broker could not read, and a client can
    make its own unreadable: its connection made by a child that exits before the broker identifies it. The
    process in the denied cgroup then got bound sockets the policy denies it."""
    root = _unified()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    sandbox = root / f"xskt{os.getpid()}-sandbox"
    sandbox.mkdir()
    try:
        with BrokerProcess(veth.name, DENY_POLICY) as b:
            result = _run_in(sandbox, _grant_through_a_connection_its_connector_left, b.socket_path, TRIES)
            grants = [r for r in b.records() if r.get("event") == "grant"]
            unknown = [r for r in grants if r["peer"]["cgroup"] is None]
            figures(tries=len(grants), cgroup_unknown=len(unknown))
            assert result["granted_at"] is None, (result, unknown[:1])
            # denied, or refused at once when the broker saw the connector had exited (identity-unreadable)
            assert set(result["codes"]) <= {"denied-by-rule", "identity-unreadable"}, result
            assert all(r["decision"] == "deny" for r in grants)
            assert not unknown or "its cgroup is unknown" in unknown[0]["reason"]
    finally:
        sandbox.rmdir()


# ---- a holder in another cgroup, named through a connection whose connector has exited -----------------------

def _hold(gate: int, ours: int) -> dict[str, Any]:
    """A process of the consumer's uid in another cgroup (another VM's QEMU): lives until the gate closes."""
    os.close(ours)  # the test's end, inherited at the fork
    with os.fdopen(gate, "r") as f:
        f.read()
    return {}


def _name_a_holder(path: str, holder: int, tries: int, gate: int) -> dict[str, Any]:
    """From a live connection first (the broker knows this cgroup), then from connections whose connector exited
    at once (the broker may not), ask for a grant held by `holder`."""
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    grant = proto.Grant("xsk0", (0,), geometry=SMALL, holder_pid=holder)
    try:
        with Connection(path) as c:
            c.call(grant)
        live = "granted"
    except proto.BrokerError as e:
        live = e.code
    return {"live": live, **_through_left_connections(path, grant, tries)}


def test_a_holder_in_another_cgroup_cannot_be_named_by_hiding_the_requesters_cgroup(veth: VethNamespace,
                                                                                   figures) -> None:  # type: ignore[no-untyped-def]
    """Same uid is not enough to hold a lease: a holder must be in the requester's cgroup (another VM of the same
    user is another principal). That check was skipped when the requester's cgroup was unknown, which a client
    makes so at will (its connection made by a child that exits before the broker identifies it)."""
    root = _unified()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    mine, theirs = root / f"xskt{os.getpid()}-vm-a", root / f"xskt{os.getpid()}-vm-b"
    mine.mkdir()
    theirs.mkdir()
    rfd, wfd = os.pipe()
    holder = spawn_unprivileged(_hold, rfd, wfd, uid=CONSUMER_UID)
    os.close(rfd)
    try:
        (theirs / "cgroup.procs").write_text(str(holder.pid))
        with BrokerProcess(veth.name, BOUND_POLICY) as b:
            result = _run_in(mine, _name_a_holder, b.socket_path, holder.pid, TRIES)
            # read once the broker has stopped: past a burst, refusals and denials are counted in the summary it
            # writes then (broker.audit.Throttle), not one record each
            b.signal(signal.SIGTERM)
            assert b.proc is not None
            b.proc.wait(5)
            records = b.records()
        grants = [r for r in records if r.get("event") == "grant"]
        gone = [r for r in records if r.get("event") == "connection-refused"]
        counted = sum(r["counts"].get("connection-refused", 0) for r in records if r.get("event") == "suppressed")
        figures(tries=len(result["codes"]) + 1, refusals_written=len(gone), refusals_counted=counted,
                **{f"code_{c}": result["codes"].count(c) for c in set(result["codes"])})
        # each connection refused at once was one whose connector had exited, and says so
        assert len(gone) + counted == result["codes"].count("identity-unreadable"), (counted, gone)
        assert all("has exited before the broker could read its identity" in r["reason"] for r in gone), gone
        assert result["live"] == "bad-holder", result
        assert result["granted_at"] is None, (result, [g for g in grants if g["decision"] != "deny"][:1])
        assert all(g["decision"] == "deny" for g in grants)
    finally:
        os.close(wfd)
        holder.kill()
        mine.rmdir()
        theirs.rmdir()


# ---- a client in very many groups ------------------------------------------------------------------------------

MANY_GROUPS_POLICY = """version = 1

[[allow]]
name = "staff"
groups = ["staff"]
interfaces = ["xsk*"]
kinds = ["bound"]
max_umem = "4MiB"

[[quota]]
name = "each-group"
groups = ["*"]
max_queues = 4
"""


def _connect_in_groups(path: str, gate: int) -> dict[str, Any]:
    if os.fdopen(gate, "r").readline().strip() != "go":
        raise RuntimeError("no go")
    started = time.monotonic()
    try:
        with Connection(path) as c:
            _, fds = c.call(proto.Grant("xsk0", (1,), geometry=SMALL))
        for fd in fds:
            os.close(fd)
        return {"code": "ok", "s": time.monotonic() - started}
    except proto.BrokerError as e:
        return {"code": e.code, "message": e.message, "s": time.monotonic() - started}


def _in_groups(path: str, gids: list[int]) -> Child:
    """The consumer uid with these supplementary groups (set while still root, as a user namespace with
    subordinate gids would let the user itself), asking for a grant."""
    rfd, wfd = os.pipe()
    child = fork_child(lambda: drop_to(CONSUMER_UID, CONSUMER_UID, gids), CONSUMER_UID, _connect_in_groups, path,
                       rfd)
    os.close(rfd)
    os.write(wfd, b"go\n")
    os.close(wfd)
    return child


@pytest.mark.parametrize("count", [65536, 1024])
def test_a_client_in_very_many_groups_stalls_nobody(veth: VethNamespace, count: int,
                                                    figures) -> None:  # type: ignore[no-untyped-def]
    """The broker asked NSS for the name of each of a peer's groups, on the loop: a client in 65,536 groups (any
    user with subordinate gids can be, in a user namespace of its own) froze every client for ~5 s per connect.
    Now a peer's group names are those the policy names, and a peer in more groups than the broker judges is
    refused at once. A member of 1024, one of them named in the policy, is judged by that name."""
    gids = [grp.getgrnam("staff").gr_gid, *range(400_000, 400_000 + count - 1)]
    with BrokerProcess(veth.name, MANY_GROUPS_POLICY) as b, Connection(b.socket_path) as probe:
        child = _in_groups(b.socket_path, gids)
        worst = 0.0
        while child.alive():
            t = time.monotonic()
            probe.call(proto.Hello())
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.005)
        result = child.result()
    figures(groups=count, code=result["code"], client_s=round(result["s"], 3),
            worst_probe_hello_ms=round(worst * 1e3, 1))
    assert worst < 0.5, (worst, result)
    if count > MAX_PEER_GROUPS:
        assert result["code"] == "identity-unreadable", result
        assert f"more than {MAX_PEER_GROUPS} supplementary groups" in result["message"], result
    else:
        assert result["code"] == "ok", result  # by the name "staff", one of its 1024 groups
