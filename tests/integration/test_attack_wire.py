"""Hostile bytes and fds on the wire, against a live broker, from clients that dropped to an unprivileged uid:
requests sent one byte a message, slowly, from many connections; sizes at MAX_REQUEST +-1; JSON the decoder
finds odd (deep nesting, huge numbers, NaN, lone surrogates, duplicate keys, every field of the wrong type);
odd fds attached where the kernel does not refuse them; SCM_CREDENTIALS naming another process; a client that
shuts its side down or never reads its replies. After each: no traceback or internal error in the broker's
log, another client's hello answered in time, the broker's fds back at their baseline, no lease left.
"""

from __future__ import annotations

import array
import collections
import contextlib
import ctypes
import json
import os
import select
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st

from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, wait_for
from .loop_rig import SMALL, bed
from .probe import RootProbe
from .robustness import alive, assert_fds_back, census, close_all, connect, rss_kib, status

if TYPE_CHECKING:
    from .test_fuzz import FuzzClient

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _reply(s: socket.socket) -> dict[str, Any]:
    data, fds, _, _ = socket.recv_fds(s, proto.MAX_REPLY, 2 * proto.MAX_QUEUES + 1)
    close_all(fds)
    return json.loads(data) if data else {"closed": True}


def _code(reply: dict[str, Any]) -> str:
    if reply.get("closed"):
        return "closed"
    return "ok" if reply.get("ok") else reply["error"]["code"]


def _clean(b: BrokerProcess, before: Any) -> None:
    """What every attack must leave: a live broker without a traceback or an internal error, answering a hello
    and a grant in time, no lease, its fds as before."""
    alive(b)
    RootProbe(b.socket_path).run(1)
    wait_for(lambda: not status(b)["leases"], what="no lease left")
    assert_fds_back(b, before, exact=False)
    assert "Traceback" not in b.log(), b.log()[-3000:]
    bugs = b.records("internal-error")
    assert not bugs, bugs[:3]


# ---- one byte a message, slowly, from many connections ---------------------------------------------------------

def slow_bytes(path: str, conns: int, interval: float, read: bool) -> dict[str, Any]:
    """Each byte of a hello as a message of its own, one round over every connection per interval; then the
    whole hello on each. With read, each reply is read as it comes; else all of them at the end."""
    socks = [connect(path, 30.0) for _ in range(conns)]
    msg = proto.encode_request(proto.Hello(req_id="whole"))
    codes: collections.Counter[str] = collections.Counter()
    for i in range(len(msg)):
        for s in socks:
            s.send(msg[i:i + 1])
        if read:
            for s in socks:
                codes[_code(_reply(s))] += 1
        time.sleep(interval)
    last = []
    for s in socks:
        s.send(msg)
        if not read:
            for _ in range(len(msg)):
                codes[_code(_reply(s))] += 1
        last.append(_reply(s))
        s.close()
    assert all(r.get("ok") and r.get("id") == "whole" for r in last), last[:3]
    return {"codes": dict(codes), "bytes": len(msg)}


def test_one_byte_messages_sent_slowly_from_many_connections(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        rss = rss_kib(b.pid)
        kids = [spawn_unprivileged(slow_bytes, b.socket_path, 100, 0.1, read, uid=uid)
                for read, uid in ((True, CONSUMER_UID), (False, STRANGER_UID))]
        try:
            time.sleep(0.5)
            probe = RootProbe(b.socket_path).run(3, pause=0.3)
            got = [k.result(60) for k in kids]
        finally:
            for k in kids:
                k.kill()
        _clean(b, before)
        grown = rss_kib(b.pid) - rss
        figures(**probe.figures(), codes=got[0]["codes"], rss_grown_kib=grown)
        for g in got:
            assert sum(g["codes"].values()) == 100 * g["bytes"], g
            assert set(g["codes"]) <= {"truncated", "bad-json"}, g
        assert grown < 8 * 1024, f"the broker grew {grown} KiB"


# ---- edge messages ---------------------------------------------------------------------------------------------

def _edge_messages() -> list[bytes]:
    hello = b'{"v":1,"op":"hello","id":7,"client":"%s"}'
    pad = len(hello) - 2
    out = [hello % (b"x" * (n - pad)) for n in (proto.MAX_REQUEST - 1, proto.MAX_REQUEST, proto.MAX_REQUEST + 1,
                                                 proto.MAX_REQUEST + 2)]
    out += [b'{"v":1,"op":"hello"}' + b" " * (proto.MAX_REQUEST - 20 + d) for d in (-1, 0, 1)]
    # nesting up to what fits in MAX_REQUEST, in every field
    for depth in (900, 990, 1000, 1100, 4000):
        deep = b"[" * depth + b"]" * depth
        deep_obj = b'{"a":' * min(depth, 1300) + b"1" + b"}" * min(depth, 1300)
        for field in (b"v", b"op", b"id", b"client", b"queues", b"umem", b"interface", b"kind", b"lease"):
            for inner in (deep, deep_obj):
                out.append(b'{"v":1,"op":"grant","interface":"xsk0","queues":[1],"' + field + b'":' + inner + b"}")
    for digits in (4299, 4300, 4301):
        n = b"9" * digits
        out += [b'{"v":1,"op":"hello","id":' + n + b"}", b'{"v":' + n + b',"op":"hello"}',
                b'{"v":1,"op":"grant","interface":"xsk0","queues":[' + n + b"]}",
                b'{"v":1,"op":"revoke","interface":"xsk0","queue":-' + n + b"}"]
    for odd in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"1E400", b"-1e-400", b'"\\ud800"',
                b'"\\udfff\\ud800"', b'"x\\u0000y"', b'"' + b"\\ud83d" * 1000 + b'"'):
        for field in (b"v", b"id", b"op", b"interface", b"queues", b"lease", b"kind", b"memlock", b"holder_pid"):
            out.append(b'{"v":1,"op":"grant","interface":"xsk0","queues":[1],"' + field + b'":' + odd + b"}")
        out.append(b'{"v":1,"op":"hello",' + odd + b":1}" if odd.startswith(b'"') else b"[" + odd + b"]")
        out.append(b'{"v":1,"op":"hello","\\ud800":' + odd + b"}")
    # duplicate keys: the last wins
    out += [b'{"v":1,"op":"grant","op":"hello","id":1,"id":"two"}', b'{"v":2,"v":1,"op":"hello"}',
            b'{"v":1,"op":"release","lease":"0123456789abcdef","lease":["x"]}']
    return out


# every field of every request, given every type it must not have
_WRONG: list[Any] = [None, True, False, 0, -1, 1.5, 2**64, "", "x" * 300, "\ud800", [], [1], {}, {"size": 4096}]
_FIELDS = {"hello": ("v", "op", "id", "client"), "status": ("v", "op", "id"),
           "release": ("v", "op", "id", "lease", "if_closed"),
           "revoke": ("v", "op", "id", "lease", "interface", "queue", "signal"),
           "grant": ("v", "op", "id", "interface", "queues", "start_queue", "kind", "umem", "rings", "bind_mode",
                     "need_wakeup", "memlock", "holder_pid")}
_BASE = {"hello": {}, "status": {}, "release": {"lease": "0123456789abcdef"},
         "revoke": {"interface": "xsk0", "queue": 1},
         "grant": {"interface": "xsk0", "queues": [1], "umem": {"size": 65536}, "rings": {"fill": 64}}}


def _wrong_typed() -> list[bytes]:
    out = []
    for op, fields in _FIELDS.items():
        for name in (*fields, "umem.size", "umem.frame_size", "umem.headroom", "rings.fill", "rings.rx"):
            for value in _WRONG:
                msg: dict[str, Any] = {"v": 1, "op": op, **json.loads(json.dumps(_BASE[op]))}
                parent, _, leaf = name.rpartition(".")
                (msg.setdefault(parent, {}) if parent else msg)[leaf or name] = value
                out.append(json.dumps(msg).encode("utf-8", "surrogatepass"))
    return out


def _exchange_all(client: FuzzClient, payloads: list[bytes]) -> None:
    """Each message, its reply checked; what a grant among them held released at once; then the batch's checks."""
    for payload in payloads:
        client.exchange(payload)
        if client.held:
            client.release(*client.held)
            client.held = None
    client.end_batch(0)


def send_each(path: str, payloads: list[bytes], docs: str) -> dict[str, Any]:
    """Each message, its reply checked as the fuzzer checks it (one well-formed reply; never internal-error)."""
    from .test_fuzz import FuzzClient  # in the child: the checks the fuzzer makes

    client = FuzzClient(path, docs)
    try:
        _exchange_all(client, payloads)
    finally:
        client.close()
    return {"codes": dict(client.codes), "messages": client.counts["messages"]}


def test_edge_messages_and_every_field_of_the_wrong_type(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        payloads = _edge_messages() + _wrong_typed()
        got = spawn_unprivileged(send_each, b.socket_path, payloads, DOCS.read_text(), uid=CONSUMER_UID).result(120)
        _clean(b, before)
        figures(messages=got["messages"], codes=got["codes"])
        assert got["messages"] == len(payloads)


# a compact fuzz (fixed seed, bounded examples): messages of the edge kinds above, mutated, cut at any byte

_pieces = st.sampled_from(_edge_messages() + _wrong_typed())


@st.composite
def _edge_mutant(draw: st.DrawFn) -> bytes:
    data = draw(_pieces)
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["whole", "whole", "cut", "tail", "splice"]))
    if how == "cut":
        return data[:at] or b" "
    if how == "tail":
        return data[at:] or b"{"
    if how == "splice":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data


def compact_fuzz(path: str, examples: int, docs: str) -> dict[str, Any]:
    from .test_fuzz import FuzzClient

    client = FuzzClient(path, docs)

    @seed(20261202)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(st.lists(_edge_mutant(), min_size=10, max_size=10))
    def run(msgs: list[bytes]) -> None:
        _exchange_all(client, msgs)

    try:
        run()
    finally:
        client.close()
    return {"codes": dict(client.codes), "messages": client.counts["messages"]}


def test_compact_wire_fuzz(figures) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        got = spawn_unprivileged(compact_fuzz, b.socket_path, 100, DOCS.read_text(), uid=CONSUMER_UID).result(60)
        _clean(b, before)
    figures(seconds=round(time.monotonic() - started, 1), **got)
    assert got["messages"] >= 1000


# ---- odd fds, where the kernel does not refuse them -------------------------------------------------------------

_KEEP: list[Any] = []


def _odd_fds(path: str, xsk_fds: list[int], where: str) -> list[tuple[str, list[int]]]:
    libc = ctypes.CDLL(None, use_errno=True)
    fifo = os.path.join(where, "fifo")
    os.mkfifo(fifo)
    fifo_r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fifo_w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fifo_w, b"x" * 4096)
    fifo_lonely = os.open(os.path.join(where, "fifo"), os.O_RDONLY | os.O_NONBLOCK)
    a, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(a, [b"cycle"], [a.fileno(), c.fileno()])  # each end in flight inside the other's queue
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(os.path.join(where, "l"))
    listening.listen()
    inner = connect(path)  # a connection to the broker itself
    ep = select.epoll()
    ep.register(inner.fileno(), select.EPOLLIN)
    _KEEP.extend((a, c, listening, inner, ep))  # open until the child exits
    out = [("epoll", [ep.fileno()]), ("pidfd", [os.pidfd_open(os.getpid())]), ("eventfd", [os.eventfd(0)]),
           ("inotify", [libc.inotify_init1(os.O_CLOEXEC)]), ("fifo", [fifo_r, fifo_w, fifo_lonely]),
           ("unix-cycle", [a.fileno(), c.fileno()]), ("listening", [listening.fileno()]),
           ("its-own-connection", [inner.fileno()]), ("memfd", [os.memfd_create("x")]),
           ("253-fds", [os.open(os.devnull, os.O_RDONLY)] * 253), ("af-xdp-and-umem", xsk_fds)]
    ring = libc.syscall(425, 4, ctypes.create_string_buffer(120))  # io_uring_setup
    if ring >= 0:
        out.append(("io_uring", [ring]))
    return out


def _brokers_own(pid: int) -> str:
    """The broker's own fds through /proc: what a client gets when it tries to open or connect to one."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(f"/proc/{pid}/fd/{fd}")
        return "reached"
    except OSError as e:
        return f"errno {e.errno}"


def send_odd_fds(path: str, broker_pid: int) -> dict[str, Any]:
    reply, fds = request_fds("xsk0", [1], kind="bound", geometry=SMALL, socket_path=path)
    where = tempfile.TemporaryDirectory()
    kinds = _odd_fds(path, fds, where.name)
    codes: dict[str, str] = {"brokers-own-fds": _brokers_own(broker_pid)}
    with connect(path) as s:
        for name, sent in kinds:
            try:
                s.sendmsg([proto.encode_request(proto.Hello())],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", sent))])
            except OSError as e:  # the kernel passes no io_uring fd (EINVAL)
                codes[name] = f"errno {e.errno}"
                continue
            codes[name] = _code(_reply(s))
        try:
            s.sendmsg([b"{}"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0] * 254))])
            codes["254-fds"] = "sent"
        except OSError as e:
            codes["254-fds"] = f"errno {e.errno}"
    # the granted sockets are still the client's own: its lease ends only once it lets go
    close_all(fds)
    with connect(path) as s:
        s.send(proto.encode_request(proto.Release(reply["lease"])))
        codes["release"] = _code(_reply(s))
    for name, sent in kinds:
        if name != "af-xdp-and-umem":
            close_all(sorted(set(sent)))
    where.cleanup()
    return codes


def test_odd_fds_attached_are_closed_off_the_loop(figures) -> None:  # type: ignore[no-untyped-def]
    with bed(extra=["--accept-passed-fds"]) as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        got = spawn_unprivileged(send_odd_fds, b.socket_path, b.pid, uid=CONSUMER_UID).result(30)
        got.pop("capabilities")
        _clean(b, before)
        figures(**got)
        assert got.pop("254-fds") == "errno 22", got
        assert got.pop("release") == "ok", got
        assert got.pop("brokers-own-fds") == "errno 13", got
        assert got.pop("io_uring", "errno 22") == "errno 22", got
        assert set(got.values()) == {"fds-not-allowed"}, got


# ---- credentials, shutdowns and replies nobody reads --------------------------------------------------------------

_UCRED = struct.Struct("iII")


def claim_credentials(path: str) -> dict[str, Any]:
    out = {}
    hello = proto.encode_request(proto.Hello())
    for name, cred in (("own", (os.getpid(), os.getuid(), os.getgid())), ("pid-1", (1, os.getuid(), os.getgid())),
                       ("root", (os.getpid(), 0, 0))):
        with connect(path) as s:
            try:
                s.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, _UCRED.pack(*cred))])
            except OSError as e:
                out[name] = f"errno {e.errno}"
                continue
            r = _reply(s)
            out[name] = r["peer"]["uid"] if r.get("ok") else _code(r)
    return out


def _answered_before_drop(path: str, payloads: list[bytes]) -> int:
    """Send every payload, reading nothing until the end; then how many replies came before the broker hung up."""
    s = connect(path)
    with contextlib.suppress(OSError):
        for p in payloads:
            s.send(p)
    time.sleep(0.3)
    n = 0
    with contextlib.suppress(OSError):
        while _reply(s).get("v") == 1:
            n += 1
    s.close()
    return n


def half_closed(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    grant = proto.encode_request(proto.Grant("xsk0", (1,), geometry=SMALL))
    # a grant, then no more writing: the reply (and its fds) still comes, the lease ends with this process
    s = connect(path)
    s.send(grant)
    s.shutdown(socket.SHUT_WR)
    data, fds, _, _ = socket.recv_fds(s, 1 << 16, 8)
    granted = json.loads(data)
    out["shut-wr"] = (granted["ok"], len(fds))
    out["shut-wr-then"] = s.recv(1)  # and then the broker closes
    close_all(fds)
    s.close()
    with connect(path) as s:
        s.send(proto.encode_request(proto.Release(granted["lease"])))
        out["released"] = _code(_reply(s))
    # a grant from a connection that reads no more: the reply cannot be sent, nobody holds the lease
    s = connect(path)
    s.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        s.send(proto.encode_request(proto.Grant("xsk0", (0,), geometry=SMALL)))
    time.sleep(0.3)
    s.close()
    # replies never read, then a grant whose reply is the first that no longer fits the broker's send buffer
    big = proto.encode_request(proto.Hello(req_id="x" * 7000))
    small = proto.encode_request(proto.Hello(req_id="y"))
    n_big = _answered_before_drop(path, [big] * 200)
    n_small = _answered_before_drop(path, [big] * n_big + [small] * 400) - n_big
    out["unread"] = (n_big, n_small)
    out["grant-answered"] = _answered_before_drop(path, [big] * n_big + [small] * n_small + [grant]) \
        - n_big - n_small
    return out


def connect_send_exit(path: str, n: int) -> dict[str, Any]:
    """n processes that each connect, send a grant and exit at once, some before the broker can read who they
    are, some after it has read their grant; their pids are free for others to take."""
    grant = proto.encode_request(proto.Grant("xsk0", (1,), geometry=SMALL))
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(path)
                s.send(grant)
                if i % 3 == 0:
                    time.sleep(0.002)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    return {"exited": n}


def test_credentials_shutdowns_and_unread_replies(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        creds = spawn_unprivileged(claim_credentials, b.socket_path, uid=CONSUMER_UID).result(30)
        creds.pop("capabilities")
        assert creds == {"own": CONSUMER_UID, "pid-1": "errno 1", "root": "errno 1"}, creds
        got = spawn_unprivileged(half_closed, b.socket_path, uid=CONSUMER_UID).result(30)
        got.pop("capabilities")
        assert got["shut-wr"] == (True, 2) and got["released"] == "ok", got
        assert got["grant-answered"] == 0, got
        # the grant of the connection shut for reading, and the one whose reply did not fit
        assert len(b.records("lease-aborted")) == 2, b.records("lease-aborted")
        spawn_unprivileged(connect_send_exit, b.socket_path, 200, uid=CONSUMER_UID).result(60)
        time.sleep(0.5)  # its last grants may still be in flight, their queue taken until their replies fail
        _clean(b, before)
        figures(**got, **{f"cred_{k}": v for k, v in creds.items()})


# ---- a thousand connections at once from one uid; a client that refuses the reply's fds -----------------------------

def thousand_at_once(path: str, n: int, gate_r: int, done_w: int) -> dict[str, Any]:
    socks = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            socks.append(connect(path, 5.0))
    hello = proto.encode_request(proto.Hello())
    for s in socks:
        with contextlib.suppress(OSError):
            s.send(hello)
    codes: collections.Counter[str] = collections.Counter()
    for s in socks:
        try:
            codes[_code(_reply(s))] += 1
        except OSError as e:
            codes[f"errno {e.errno}"] += 1
    os.write(done_w, b"d")
    select.select([gate_r], [], [], 30)  # held until the other uid has been answered
    for s in socks:
        s.close()
    return {"connected": len(socks), "codes": dict(codes)}


def timed_hello(path: str) -> dict[str, Any]:
    started = time.monotonic()
    with connect(path, 5.0) as s:
        s.send(proto.encode_request(proto.Hello()))
        reply = _reply(s)
    return {"code": _code(reply), "seconds": time.monotonic() - started}


def refuse_reply_fds(path: str) -> dict[str, Any]:
    """A grant asked on a connection that refuses fds (SO_PASSRIGHTS 0): the broker cannot send the reply."""
    with connect(path) as s:
        s.setsockopt(socket.SOL_SOCKET, 83, 0)
        s.send(proto.encode_request(proto.Grant("xsk0", (1,), geometry=SMALL)))
        try:
            return {"reply": _code(_reply(s))}
        except OSError as e:
            return {"reply": f"errno {e.errno}"}


def test_a_thousand_connections_from_one_uid_and_a_reply_whose_fds_are_refused(figures) -> None:  # type: ignore[no-untyped-def]
    with bed() as (_, b):
        RootProbe(b.socket_path).run(1)
        before = census(b)
        refused = spawn_unprivileged(refuse_reply_fds, b.socket_path, uid=CONSUMER_UID).result(30)
        assert refused["reply"] in ("closed", "errno 104"), refused
        assert b.records("lease-aborted"), "the grant whose reply was refused was not aborted"
        gate_r, gate_w = os.pipe()
        done_r, done_w = os.pipe()
        hog = spawn_unprivileged(thousand_at_once, b.socket_path, 1000, gate_r, done_w, uid=STRANGER_UID)
        try:
            assert select.select([done_r], [], [], 60)[0], "the hog never finished connecting"
            other = spawn_unprivileged(timed_hello, b.socket_path, uid=CONSUMER_UID).result(10)
            os.write(gate_w, b"g")
            held = hog.result(30)
        finally:
            hog.kill()
            for fd in (gate_r, gate_w, done_r, done_w):
                os.close(fd)
        _clean(b, before)
        figures(hog=held["codes"], other_hello_ms=round(other["seconds"] * 1000, 1), refused_reply=refused["reply"])
        assert other["code"] == "ok" and other["seconds"] < 2.0, other
