"""A connection the broker closes with messages still queued on it: the fds those messages carry must not be closed
on the loop's thread. Closing a unix socket frees its queue in the closing thread, and each fd in it is closed
there; a client chooses fds whose close blocks (a TCP socket lingering on a queue that never drains). Where the
kernel cannot refuse fds at the socket (SO_PASSRIGHTS, Linux 6.16; `refuse_fds=False` acts as if so) they reach
the queue, and the broker's drop of a connection (a 0-byte message read as the end, a failed reply) or a refusal
at connect (more than the 64 messages it used to read) froze the loop for as long as the client liked."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xskbroker.broker.server import Server
from xskbroker.policy import parse_policy
from xskbroker.testbed import links
from xskbroker.wire import protocol as proto

from ..unit.service_rig import POLICY, make_rig
from .conftest import ns_name
from .loop_rig import stuck_tcp

LINGER = 3  # seconds a close of the stuck socket blocks (the attack uses ~68 years)


@pytest.fixture
def stuck() -> Iterator[socket.socket]:
    """A TCP socket whose send queue can never drain (its peer never reads) and that lingers LINGER s on close, on
    the loopback of a namespace of the test's own."""
    name = ns_name()
    links.create_netns(name)
    try:
        srv, cli = stuck_tcp(name)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
        try:
            yield cli
        finally:
            cli.close()
            srv.close()
    finally:
        links.remove_netns(name)


def _server(tmp_path: Path, policy: str = POLICY) -> tuple[Server, socket.socket, str]:
    rig = make_rig(tmp_path, policy=parse_policy(policy))
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    return Server(listener, rig.service, lambda record: None, refuse_fds=False), listener, path


def _timed_accept(server: Server, listener: socket.socket) -> float:
    started = time.monotonic()
    server._accept(listener)
    return time.monotonic() - started


def test_a_connection_dropped_with_fds_queued_does_not_close_them_on_the_loop(
        tmp_path: Path, stuck: socket.socket) -> None:
    """A 0-byte message reads as the end of the connection, which the broker closes: the fd-carrying message queued
    behind it was freed, and its lingering socket closed, on the loop (3.2 s here; before: for as long as the client
    set)."""
    server, listener, path = _server(tmp_path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(path)
    client.send(b"")
    socket.send_fds(client, [proto.encode_request(proto.Hello())], [stuck.fileno()])
    stuck.close()  # the broker's copy is the last: its close is the one that lingers
    took = _timed_accept(server, listener)
    assert not server.conns
    assert took < 1.0, f"the loop was held {took:.1f} s closing a client's fd"
    client.close()
    server.close()
    server.service.close()


def test_a_refused_connection_with_many_messages_queued_does_not_close_their_fds_on_the_loop(
        tmp_path: Path, stuck: socket.socket) -> None:
    """A connection refused at connect (here its quota of connections) had at most 64 messages read off it before
    its close: the 101st carried the fd, which was closed on the loop, and the client read ECONNRESET, not why."""
    server, listener, path = _server(tmp_path, POLICY + '\n[[quota]]\nname = "one"\nusers = ["*"]\n'
                                     'max_connections = 1\n')
    first = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first.connect(path)
    server._accept(listener)
    assert len(server.conns) == 1
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(path)
    for _ in range(100):
        client.send(proto.encode_request(proto.Hello()))
    socket.send_fds(client, [proto.encode_request(proto.Hello())], [stuck.fileno()])
    stuck.close()
    took = _timed_accept(server, listener)
    assert len(server.conns) == 1
    assert took < 1.0, f"the loop was held {took:.1f} s closing a client's fd"
    client.settimeout(1.0)
    with pytest.raises(proto.BrokerError) as refused:
        proto.decode_reply(client.recv(proto.MAX_REPLY))
    assert refused.value.code == "quota-connections"
    client.close()
    first.close()
    server.close()
    server.service.close()
