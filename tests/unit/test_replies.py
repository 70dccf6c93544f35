"""Typed replies: each encodes to exactly the bytes protocol.ok_reply / error_reply give for what the broker
builds today, decodes back to itself, and a reply of the wrong shape is bad-reply."""

from __future__ import annotations

import functools
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.lease_record import Lease
from xskbroker.client.connection import Connection
from xskbroker.client.grant import open_sockets
from xskbroker.common import records
from xskbroker.wire import protocol as proto
from xskbroker.wire import replies as r
from xskbroker.wire.errors import BrokerError, ErrorCode

from ..fake_broker import fake_broker, null_fds

__all__ = ["fake_broker"]  # a fixture

G = proto.Geometry(8192, 2048, 256, 64, 128, 256, 512)
MEMLOCK = {"needed": 67108864, "soft": 8388608, "hard": 8388608, "raised": False, "ok": False,
           "reason": "the broker lacks CAP_SYS_RESOURCE", "hint": "raise the limit"}
NOTE = "RX stopped: the map slots are empty."
LEASE = Lease("63f0169167eb5aa8", 1000, 25763, 3, "xdoc0", (0, 1), "bound", 4194304, created=1.0, misbound=None)
LEASE_INFO = LEASE.info()  # once: its age_s is read from the clock
# the lease as status replies have always listed it
LEASE_DICT = {"lease": "63f0169167eb5aa8", "uid": 1000, "pid": 25763, "interface": "xdoc0", "ifindex": 3,
              "queues": [0, 1], "kind": "bound", "umem_bytes": 4194304, "age_s": LEASE_INFO.age_s, "revoked": False,
              "orphaned": False, "misbound": None, "released": False}

# (typed reply, the same reply as the broker builds it with ok_reply, mirroring broker/service.py)
CASES: list[tuple[r.OkReply, bytes]] = [
    (r.HelloReply("xskbroker", (1,), r.PeerCred(0, 0, 10106), req_id=1),
     proto.ok_reply("hello", 1, server="xskbroker", versions=[1], peer={"uid": 0, "gid": 0, "pid": 10106})),
    (r.GrantReply("0974e0dc6c393213", "bound", "xdoc0", 3, "native", 464, holder_pid=77,
                  sockets=(r.BoundSocket.of(0, 0, 1, 10, False, G), r.BoundSocket.of(5, 2, 3, 12, True, G)),
                  req_id="x"),
     proto.ok_reply("grant", "x", lease="0974e0dc6c393213", kind="bound", interface="xdoc0", ifindex=3,
                    xdp_mode="native", xdp_prog_id=464, holder_pid=77,
                    sockets=[{"queue": 0, "fd": 0, "umem_fd": 1, "bind_flags": 10, "zerocopy": False, **G.to_wire()},
                             {"queue": 5, "fd": 2, "umem_fd": 3, "bind_flags": 12, "zerocopy": True, **G.to_wire()}])),
    (r.GrantReply("ed83008341dbbee5", "bare", "xdoc0", 3, "skb", 1337, holder_pid=9,
                  sockets=(r.BareSocket(0, 0), r.BareSocket(1, 1)), memlock=MEMLOCK, bind_flags_hint=10),
     proto.ok_reply("grant", None, lease="ed83008341dbbee5", kind="bare", interface="xdoc0", ifindex=3,
                    xdp_mode="skb", xdp_prog_id=1337, holder_pid=9,
                    sockets=[{"queue": 0, "fd": 0}, {"queue": 1, "fd": 1}], memlock=MEMLOCK, bind_flags_hint=10)),
    (r.GrantReply("ed83008341dbbee5", "bare", "x", 3, "native", 1, holder_pid=9, sockets=(r.BareSocket(7, 0),),
                  bind_flags_hint=8, req_id=0),
     proto.ok_reply("grant", 0, lease="ed83008341dbbee5", kind="bare", interface="x", ifindex=3, xdp_mode="native",
                    xdp_prog_id=1, holder_pid=9, sockets=[{"queue": 7, "fd": 0}], memlock=None, bind_flags_hint=8)),
    (r.GrantReply("8d234e03127b9bfe", "map", "xdoc1", 2, "native", 1339, holder_pid=9, map_fd=0, map_entries=2,
                  req_id=2),
     proto.ok_reply("grant", 2, lease="8d234e03127b9bfe", kind="map", interface="xdoc1", ifindex=2, xdp_mode="native",
                    xdp_prog_id=1339, holder_pid=9, map_fd=0, map_entries=2)),
    (r.ReleaseReply("8d234e03127b9bfe", req_id=3), proto.ok_reply("release", 3, lease="8d234e03127b9bfe")),
    (r.RevokeReply((r.RevokedLease("a", (0,), False, 25763),
                    r.RevokedLease("b", (), False, 1, not_signalled="holder pid 1 has exited"),
                    r.RevokedLease("c", (), True, 2, ended=True)), NOTE, req_id=4),
     proto.ok_reply("revoke", 4, revoked=[
         {"lease": "a", "emptied_queues": [0], "signalled": False, "holder_pid": 25763},
         {"lease": "b", "emptied_queues": [], "signalled": False, "holder_pid": 1,
          "not_signalled": "holder pid 1 has exited"},
         {"lease": "c", "emptied_queues": [], "signalled": True, "holder_pid": 2, "ended": True}], note=NOTE)),
    (r.StatusReply((LEASE_INFO,),
                   (r.InterfaceInfo(3, "xdoc0", 3032, "native", 2, 1), r.InterfaceInfo(4, None, 1, "skb", 8, 0)),
                   (r.QuotaUsage("root-budget", "user 0", 1, 1, 4194304, None),), True, req_id=3),
     proto.ok_reply("status", 3, leases=[LEASE_DICT],
                    interfaces=[{"ifindex": 3, "interface": "xdoc0", "xdp_prog_id": 3032, "xdp_mode": "native",
                                 "map_entries": 2, "leases": 1},
                                {"ifindex": 4, "interface": None, "xdp_prog_id": 1, "xdp_mode": "skb",
                                 "map_entries": 8, "leases": 0}],
                    quotas=[{"quota": "root-budget", "scope": "user 0", "queues": 1, "max_queues": 1, "umem": 4194304,
                             "max_umem": None}], admin=True)),
]


@pytest.mark.parametrize(("typed", "data"), CASES, ids=lambda c: getattr(c, "OP", ""))
def test_typed_replies_encode_to_the_brokers_bytes(typed: r.OkReply, data: bytes) -> None:
    assert typed.encode() == data
    decoded = r.decode_reply(data)
    assert decoded == typed and decoded.raw == json.loads(data) == typed.to_dict()
    assert decoded.encode() == data


def test_lease_info_is_what_the_broker_always_sent() -> None:
    assert LEASE_INFO.to_wire() == LEASE_DICT and r.LeaseInfo.from_wire(LEASE_DICT) == LEASE_INFO


def test_bound_socket_geometry() -> None:
    sock = r.BoundSocket.of(1, 0, 1, 10, False, G)
    assert sock.geometry == G == proto.geometry_from_wire(sock.to_wire())


@pytest.mark.parametrize(("typed", "data"), [
    (r.ErrorReply("queue-busy", "xdoc0 queue 0 is held", "grant", 4),
     proto.error_reply("queue-busy", "xdoc0 queue 0 is held", "grant", 4)),
    (r.ErrorReply(ErrorCode.KERNEL_ERROR, "bind: busy", "grant", 11, {"errno": "EBUSY"}),
     proto.error_reply("kernel-error", "bind: busy", "grant", 11, errno="EBUSY")),
    (r.ErrorReply("not-canonical-name", "altname", "grant", None, {"canonical": "eth0"}),
     proto.error_reply("not-canonical-name", "altname", "grant", canonical="eth0")),
    (r.ErrorReply("too-many-connections", "full"), proto.error_reply("too-many-connections", "full")),
    (r.ErrorReply("unknown-op", "what", "steal", "i"), proto.error_reply("unknown-op", "what", "steal", "i")),
])
def test_error_replies_encode_to_the_brokers_bytes(typed: r.ErrorReply, data: bytes) -> None:
    assert typed.encode() == data
    decoded = r.decode_reply(data)
    assert decoded == typed and decoded.raw == json.loads(data)
    err = decoded.exception()
    assert (err.code, err.message, err.reply) == (typed.code, typed.message, json.loads(data))


def test_an_error_reply_from_a_protocol_error() -> None:
    with pytest.raises(proto.ProtocolError) as info:
        proto.decode_request(b'{"v":1,"op":"grant","id":3,"interface":"eth0","queues":[]}')
    assert r.ErrorReply.of(info.value).encode() == proto.error_reply_for(info.value)


def test_unknown_fields_ride_along_in_order() -> None:
    data = proto.ok_reply("release", 1, lease="ab", later={"x": 1}, more=2)
    reply = r.decode_reply(data)
    assert reply == r.ReleaseReply("ab", req_id=1, extra={"later": {"x": 1}, "more": 2})
    assert reply.encode() == data


def _records(value: Any) -> Iterator[r.Record]:
    """value and every record inside it (sockets, peers, leases, ...)."""
    if isinstance(value, r.Record):
        yield value
        for f in records.fields(value):
            yield from _records(getattr(value, f.name))
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _records(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _records(v)


@functools.cache
def _generated_class(cls: type) -> Any:
    """cls, its ==, hash() and repr() made by record (the default; tests/unit/test_records.py checks those
    against dataclasses')."""
    return records.record(frozen=True)(type(cls.__name__, (cls,), {"__qualname__": cls.__qualname__}))


def _generated(record: r.Record) -> Any:
    return _generated_class(type(record))(**{f.name: getattr(record, f.name) for f in records.fields(record)})


def _hash(value: Any) -> Any:
    try:
        return hash(value)
    except TypeError as e:
        return str(e)


def test_records_compare_hash_and_print_as_generated_ones_would() -> None:
    # Record writes ==, hash() and repr() once instead of record generating them per class (cold start)
    samples = [typed for typed, _ in CASES]
    samples += [r.PeerCred(1, 2, 3), r.UmemGeometry(1, 2, 3), r.UmemGeometry(1, 2, 4), r.RingSizes(1, 2, 3, 4),
                r.ReleaseReply("a", req_id=1, raw={"x": 1}), r.ReleaseReply("a", req_id=1, raw=None),
                r.MetricsInfo("1", 2.0, 3.0, 4, {}, {"bound": 1}, 5, 6, {},
                              {"allow": r.HistogramInfo((0.1,), (1,), 0.5, 2)})]
    samples = [x for sample in samples for x in _records(sample)]
    assert {type(x) for x in samples} >= {c for c in vars(r).values() if isinstance(c, type) and
                                          issubclass(c, r.Record) and c not in (r.Record, r.OkReply)}
    for a in samples:
        ga = _generated(a)
        assert repr(a) == repr(ga) and _hash(a) == _hash(ga)
        assert a.__eq__(object()) is NotImplemented and a == records.replace(a)
        for b in samples:
            if type(a) is type(b):
                assert (a == b) == (ga == _generated(b))
    for hashable in (r.UmemGeometry(1, 2, 3, extra=frozenset()), r.ReleaseReply("a", raw={}, extra=frozenset())):
        assert hash(hashable) == hash(_generated(hashable))  # raw is not hashed
    assert r.ReleaseReply("a", raw={"x": 1}) == r.ReleaseReply("a")  # raw is not compared
    for cls in (r.GrantReply, r.BoundSocket, r.StatusReply):  # and none of them made its own
        assert not {"__eq__", "__hash__", "__repr__"} & set(vars(cls))


GRANT = json.loads(CASES[1][1])


def _grant(**changes: Any) -> bytes:
    msg = {**GRANT, **changes}
    return json.dumps({k: v for k, v in msg.items() if v is not ...}).encode()


@pytest.mark.parametrize("data", [
    _grant(ifindex="3"), _grant(ifindex=True), _grant(ifindex=3.0), _grant(lease=...), _grant(op="steal"),
    _grant(op=None), _grant(id=None), _grant(id=1.5), _grant(id=False), _grant(kind="other"),
    _grant(sockets=...), _grant(sockets=[{"queue": 0, "fd": 0}]), _grant(sockets={}), _grant(sockets=[1]),
    _grant(sockets=[{**GRANT["sockets"][0], "umem": {"size": 1}}]), _grant(kind="map"),
    _grant(kind="bare", sockets=GRANT["sockets"], bind_flags_hint=8),
    _grant(kind="bare", sockets=[{"queue": 0, "fd": 0}]),  # no bind_flags_hint
    proto.ok_reply("status", leases=[{"lease": "x"}], interfaces=[]),
    proto.ok_reply("status", leases=[], interfaces=[], admin="yes"),
    proto.ok_reply("hello", server="xskbroker", versions=[True], peer={"uid": 0, "gid": 0, "pid": 1}),
    proto.ok_reply("revoke", revoked=[], note=None),
    b'{"v":true,"ok":true,"op":"release","lease":"x"}', b'{"v":1.0,"ok":true,"op":"release","lease":"x"}',
])
def test_replies_of_the_wrong_shape_are_bad_replies(data: bytes) -> None:
    with pytest.raises(BrokerError) as info:
        r.decode_reply(data)
    assert info.value.code == ErrorCode.BAD_REPLY
    with pytest.raises(BrokerError):  # the dict form validates as much
        proto.decode_reply(data)


def test_defaults_for_fields_an_older_broker_left_out() -> None:
    reply = r.decode_reply(proto.ok_reply("status", leases=[], interfaces=[]))
    assert isinstance(reply, r.StatusReply) and reply.quotas == () and reply.admin is False


def test_fd_count() -> None:
    assert [typed.fd_count() for typed, _ in CASES if isinstance(typed, r.GrantReply)] == [4, 2, 1, 1]


def test_open_sockets_refuses_a_reply_that_is_not_a_bound_grant() -> None:
    for bad in (r.decode_reply(CASES[2][1]), json.loads(CASES[4][1]), json.loads(CASES[5][1])):
        with pytest.raises(BrokerError):
            open_sockets(bad, [])  # type: ignore[arg-type]


# ---- the client's Connection over a fake broker (a socket that answers with canned replies) ---------------

def test_connection_call_returns_the_dict_and_call_typed_the_type(fake_broker: Any) -> None:
    path, script = fake_broker
    status = CASES[-1][1]
    script += [(status, 0), (status, 0), (CASES[4][1], 1), (CASES[4][1], 0), (CASES[5][1], 0),
               (proto.error_reply("kernel-error", "busy", "grant", errno="EBUSY"), 0)]
    with Connection(path, timeout=5) as conn:
        reply, fds = conn.call(proto.Status())
        assert reply == json.loads(status) and fds == []
        typed, _ = conn.call_typed(proto.Status())
        assert typed == CASES[-1][0]
        granted, fds = conn.call_typed(proto.Grant("xdoc1", (), kind="map"))
        assert granted.map_fd == 0 and len(fds) == 1
        os.close(fds[0])
        with pytest.raises(BrokerError, match="names 1 fds but carried 0"):
            conn.call(proto.Grant("xdoc1", (), kind="map"))
        with pytest.raises(BrokerError, match="answered a status request with a release reply"):
            conn.call(proto.Status())
        with pytest.raises(BrokerError) as info:
            conn.call_typed(proto.Grant("x", (0,)))
        assert info.value.code == "kernel-error" and info.value.reply["error"]["errno"] == "EBUSY"


def test_a_broker_that_never_answers_times_out_with_the_timeout_it_was_given(tmp_path: Path) -> None:
    # the timeout is the kernel's (SO_RCVTIMEO), not Python's: its EAGAIN must still read as a timeout
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        with Connection(path, timeout=0.3) as conn:
            peer, _ = listener.accept()
            with peer:
                started = time.monotonic()
                with pytest.raises(TimeoutError, match=r"did not answer within 0\.3 s"):
                    conn.call(proto.Hello())
                assert 0.25 <= time.monotonic() - started < 3
                assert peer.recv(proto.MAX_REQUEST)  # the request itself went out


def test_a_refusal_on_arrival_is_read_though_the_close_left_the_request_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker refusing a connection on arrival sends its refusal, drains what came, and closes. A request that
    came after the drain is left unread, and the kernel then fails the client's receive with ECONNRESET ahead of
    the refusal queued for it: the client must still say the broker's reason, not "connection reset"."""
    path = str(tmp_path / "refusing.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen()
        with Connection(path, timeout=5) as conn:
            peer, _ = listener.accept()
            peer.send(proto.error_reply("too-many-connections", "the connection table is full", None))

            def close_once_the_request_is_there() -> None:
                select.select([peer], [], [], 5)
                peer.close()  # unread

            closer = threading.Thread(target=close_once_the_request_is_there)
            closer.start()
            real = socket.recv_fds

            def after_the_close(*args: Any) -> Any:  # the client's receive comes after the close: the race's loser
                closer.join()
                return real(*args)

            monkeypatch.setattr("xskbroker.client.connection.socket.recv_fds", after_the_close)
            try:
                with pytest.raises(BrokerError) as info:
                    conn.call(proto.Hello())
            finally:
                closer.join()
    assert info.value.code == "too-many-connections" and "table is full" in info.value.message


def test_grant_fds_counts_what_every_kind_names_and_refuses_what_a_launcher_could_not_use() -> None:
    from xskbroker.client.connection import grant_fds

    assert [grant_fds(json.loads(data)) for typed, data in CASES if isinstance(typed, r.GrantReply)] == \
        [typed.fd_count() for typed, _ in CASES if isinstance(typed, r.GrantReply)]
    # a map fd beside a grant's sockets counts as the typed reading counts it
    assert grant_fds({**GRANT, "map_fd": 6}) == r.reply_from_dict({**GRANT, "map_fd": 6}).fd_count() == 7
    for bad in (_grant(map_fd="6"), _grant(v=2), _grant(op="status"), _grant(lease=...), _grant(lease=5),
                _grant(kind="other"),
                _grant(sockets=...), _grant(sockets={}), _grant(sockets=[1]),
                _grant(sockets=[{"queue": 0, "fd": 0}]),  # a bound socket without its UMEM's fd
                _grant(sockets=[{**GRANT["sockets"][0], "fd": "0"}]),
                _grant(sockets=[{**GRANT["sockets"][0], "fd": -1}]),
                _grant(sockets=[{**GRANT["sockets"][0], "umem_fd": True}]), _grant(kind="map")):
        with pytest.raises(BrokerError) as info:
            grant_fds(json.loads(bad))
        assert info.value.code == ErrorCode.BAD_REPLY, bad


def test_request_fds_over_the_lean_path_gives_the_dict_and_closes_fds_of_a_reply_it_refuses(fake_broker: Any) -> None:
    from xskbroker.client.grant import request_fds

    path, script = fake_broker
    script += [(CASES[1][1], 4), (CASES[1][1], 3), (b"not json", 2),
               (proto.error_reply("queue-busy", "held", "grant"), 0), (CASES[5][1], 1)]
    with Connection(path, timeout=5) as conn:
        reply, fds = request_fds("xdoc0", [0, 5], kind="bound", socket_path=path, connection=conn)
        assert reply == json.loads(CASES[1][1]) and len(fds) == 4
        for fd in fds:
            os.close(fd)
        before = null_fds()
        with pytest.raises(BrokerError, match="names 4 fds but carried 3"):
            request_fds("xdoc0", [0, 5], kind="bound", socket_path=path, connection=conn)
        with pytest.raises(BrokerError) as info:
            request_fds("xdoc0", [0], socket_path=path, connection=conn)
        assert info.value.code == ErrorCode.BAD_REPLY
        with pytest.raises(BrokerError) as info:
            request_fds("xdoc0", [0], socket_path=path, connection=conn)
        assert info.value.code == "queue-busy"
        with pytest.raises(BrokerError) as info:  # an ok reply to something else
            request_fds("xdoc0", [0], socket_path=path, connection=conn)
        assert info.value.code == ErrorCode.BAD_REPLY
        assert null_fds() == before  # every fd of a refused reply closed (the fake broker sends /dev/null's)
