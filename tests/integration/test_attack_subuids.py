"""One user, thousands of uids: a user with subordinate uids (/etc/subuid, what newuidmap maps into a user
namespace of its own: useradd gives every user 65,536) connects as any of them. Counted per uid, it took the whole
connection table with one connection per uid (every other user's equal share was then 0), and drew every per-user
quota and audit burst once per uid. The attacker here is really unprivileged: uid 4200 makes a user namespace, root
writes its uid_map as newuidmap would for `4200:300000:65536`, and the attacker then connects as those uids."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import STRANGER_UID, ns_name
from .loop_rig import POLICY, _hello_as, _recv_reply, still_open
from .probe import RootProbe

OWNER = 4200
FIRST = 300_000  # the owner's subordinate range, as /etc/subuid gives it
CLONE_NEWUSER = 0x10000000


@contextlib.contextmanager
def subuid_bed(policy: str, extra: list[str] | None = None) -> Iterator[BrokerProcess]:
    """A broker that reads a root-owned subuid file naming the owner's range, instead of the host's."""
    with tempfile.NamedTemporaryFile("w", prefix="xskt-subuid-", delete=False) as f:
        f.write(f"{OWNER}:{FIRST}:65536\n")
    os.chmod(f.name, 0o644)
    try:
        with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
                BrokerProcess(ns.name, policy, extra_args=extra or [], env={"XSKBROKER_SUBUID": f.name}) as b:
            yield b
    finally:
        os.unlink(f.name)


def _as_many_uids(path: str, uids: int, per_uid: int, requests: int, go: int, ready: int, done: int) -> dict[str, Any]:
    """In a user namespace of its own (mapped by root after the go byte): connect `per_uid` times as each of
    `uids` uids, send `requests` hellos on each connection, and hold what was admitted until told."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.write(ready, b"u")
    if os.read(go, 1) != b"m":
        raise RuntimeError("not mapped")
    held, codes = [], {}  # type: ignore[var-annotated]
    for k in range(1, uids + 1):
        os.setresuid(0, k, 0)  # the euid is what the kernel records at connect(2)
        for _ in range(per_uid):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5.0)
            try:
                s.connect(path)
                for _ in range(requests):
                    s.send(proto.encode_request(proto.Hello()))
                    reply = _recv_reply(s)
                    code = "ok" if reply.get("ok") else reply["error"]["code"]
                    codes[code] = codes.get(code, 0) + 1
                    if not reply.get("ok") and reply.get("op") is None:
                        break  # refused at connect
            except OSError as e:
                codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
                s.close()
                continue
            if reply.get("ok") or reply.get("op") is not None:
                held.append(s)
            else:
                s.close()
        os.setresuid(0, 0, 0)
    os.write(ready, b"h")
    os.read(done, 1)
    return {"codes": codes, "alive": still_open(held)}


@contextlib.contextmanager
def attacker(b: BrokerProcess, uids: int, per_uid: int = 1, requests: int = 1) -> Iterator[Any]:
    """The attacker, holding its connections while the body runs; yields a function returning its result."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    child = spawn_unprivileged(_as_many_uids, b.socket_path, uids, per_uid, requests, go_r, ready_w, done_r, uid=OWNER)
    try:
        assert os.read(ready_r, 1) == b"u", "the attacker could not make a user namespace"
        with open(f"/proc/{child.pid}/uid_map", "w") as f:  # what newuidmap writes for it
            f.write(f"0 {FIRST} {uids + 1}\n")
        os.write(go_w, b"m")
        assert os.read(ready_r, 1) == b"h", "the attacker died"
        yield lambda: (os.write(done_w, b"x"), child.result(60))[1]
    finally:
        child.kill()
        for fd in (ready_r, ready_w, go_r, go_w, done_r, done_w):
            os.close(fd)


def _attackers_records(b: BrokerProcess) -> list[dict[str, Any]]:
    return [r for r in b.records() if (r.get("peer") or {}).get("uid", 0) >= FIRST]


def test_one_user_with_subordinate_uids_cannot_lock_others_out_of_the_connection_table(figures) -> None:  # type: ignore[no-untyped-def]
    # a table of 128 (120 for non-admins) and 200 subordinate uids: before, 120 of them held one connection
    # each, and another user's newcomer was refused ("already holds 0 connection(s), as many as any other")
    with subuid_bed(POLICY, ["--max-connections", "128"]) as b:
        with attacker(b, 200) as finish:
            probe = RootProbe(b.socket_path).run(2)
            other = spawn_unprivileged(_hello_as, b.socket_path, uid=STRANGER_UID).result(10)
            result = finish()
        refusals = [r for r in _attackers_records(b) if r.get("event") == "connection-refused"]
        figures(**probe.figures(), attacker=result, refusal_records=len(refusals))
        assert other.get("ok"), other
        assert all(r.get("peer", {}).get("owner") == OWNER for r in refusals), refusals[:2]
        # one user, one burst of records: 80 refused uids wrote 80 records before
        assert len(refusals) <= 5, f"{len(refusals)} connection-refused records for one user's flood"


QUOTA_POLICY = POLICY + """
[[quota]]
name = "per-user"
users = ["*"]
max_connections = 8
max_requests_per_second = 5
"""


def test_per_user_quotas_count_a_users_subordinate_uids_as_that_user(figures) -> None:  # type: ignore[no-untyped-def]
    # the example policy's kind of quota: 8 connections and 5 requests a second per user; before, each of 300
    # uids had its own 8 and its own 5 (all 300 connections and 900 hellos answered)
    with subuid_bed(QUOTA_POLICY) as b:
        started = time.monotonic()
        with attacker(b, 300, per_uid=1, requests=3) as finish:
            result = finish()
        seconds = time.monotonic() - started
        codes = result["codes"]
        figures(attacker=codes, seconds=round(seconds, 2))
        assert result["alive"] <= 8, result
        answered = codes.get("ok", 0)
        assert answered <= 5 + 5 * seconds + 1, (answered, seconds, codes)
