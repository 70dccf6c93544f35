"""grant.request when the grant came but its sockets cannot be mapped (a CPU other than x86, an mmap that fails,
fds that are not AF_XDP sockets): the fds are closed, and the lease is released, not left holding its queues and
quota at the broker until this process exits (a bound lease ends only by a release or its holder's exit).
Against a fake broker: a SEQPACKET listener in a thread that answers with canned replies and keeps the requests."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import grant
from xskbroker.client.connection import Connection
from xskbroker.client.xsk import UnsupportedMachine
from xskbroker.wire import protocol as proto

from .. import fake_broker

G = proto.Geometry(8192, 2048, 256, 64, 128, 256, 512)
LEASE = "0974e0dc6c393213"
BOUND = proto.ok_reply("grant", None, lease=LEASE, kind="bound", interface="xdoc0", ifindex=3, xdp_mode="native",
                       xdp_prog_id=464, holder_pid=77,
                       sockets=[{"queue": 0, "fd": 0, "umem_fd": 1, "bind_flags": 10, "zerocopy": False,
                                 **G.to_wire()}])


class FakeBroker(fake_broker.FakeBroker):
    """Answers a grant with BOUND and two fds (not AF_XDP sockets: mapping them fails), a release with ok."""

    def __init__(self, path: str) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        while data := conn.recv(proto.MAX_REQUEST + 1):
            req = json.loads(data)
            self.requests.append(req)
            if req["op"] == "grant":
                fake_broker.send_null_fds(conn, BOUND, 2)
            else:
                conn.send(proto.ok_reply("release", req.get("id"), lease=req["lease"]))

    def ops(self) -> list[tuple[str, str | None]]:
        self.thread.join(5)  # the client's close ends the conversation
        return [(r["op"], r.get("lease")) for r in self.requests]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, FakeBroker]]:
    yield from fake_broker.serving(FakeBroker, tmp_path)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_grant_whose_sockets_cannot_be_mapped_is_released(broker: tuple[str, FakeBroker]) -> None:
    path, fake = broker
    before = open_fds()
    with pytest.raises((OSError, UnsupportedMachine)):  # ENOTSOCK on x86
        grant.request("xdoc0", 1, geometry=G, socket_path=path, timeout=5)
    assert fake.ops() == [("grant", None), ("release", LEASE)]
    assert open_fds() == before  # the grant's fds and the connection are closed


def test_a_grant_on_a_kept_connection_that_cannot_be_mapped_is_released(broker: tuple[str, FakeBroker]) -> None:
    path, fake = broker
    with Connection(path, timeout=5) as conn:
        assert fake.accepted.wait(5)  # the fake's end of the connection is open before counting
        before = open_fds()
        with pytest.raises((OSError, UnsupportedMachine)):
            grant.request("xdoc0", 1, geometry=G, connection=conn)
        assert open_fds() == before  # the grant's fds closed, the caller's connection kept
    assert fake.ops() == [("grant", None), ("release", LEASE)]
