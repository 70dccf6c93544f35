"""What the event-loop attack tests share: their policies, a bed (a veth namespace and a broker), and the probe's
raw connection."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, STRANGER_UID, ns_name
from .probe import PROBE_LIMIT

MiB = 1 << 20
ATTACKERS = (4100, 4101, 4102)
SMALL = proto.Geometry(umem_size=MiB, fill=512, completion=512, rx=512, tx=512)

POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [0, {CONSUMER_UID}, {STRANGER_UID}]
interfaces = ["xsk0"]
queues = ["0-1"]
kinds = ["bound"]
max_umem = "4MiB"
"""

RATE_POLICY = POLICY + f"""
[[quota]]
name = "slow"
users = [{CONSUMER_UID}]
max_requests_per_second = 5
"""


@contextmanager
def bed(policy: str = POLICY, extra: list[str] | None = None) -> Iterator[tuple[VethNamespace, BrokerProcess]]:
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, policy, extra_args=extra or []) as b:
        yield ns, b


def _probe_conn(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(PROBE_LIMIT)
    s.connect(path)
    return s


def _recv_reply(s: socket.socket) -> dict[str, Any]:
    return json.loads(s.recv(1 << 16))


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _hello_as(path: str) -> dict[str, Any]:
    """A hello, and the reply: to it, or the refusal the broker sent on connect (it may have closed the
    connection before the hello went out, which the send then reports; the refusal is still there to read)."""
    with _probe_conn(path) as s:
        with contextlib.suppress(BrokenPipeError):
            s.send(proto.encode_request(proto.Hello()))
        return _recv_reply(s)


def still_open(socks: list[socket.socket]) -> int:
    """How many of these connections the broker has not closed (it may close some to make room for others)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def tally(s: socket.socket, messages: Iterable[bytes]) -> dict[str, int]:
    """Send each message and read its reply: how many replies had each code ("ok" for a success)."""
    codes: dict[str, int] = {}
    for data in messages:
        s.send(data)
        reply = _recv_reply(s)
        code = "ok" if reply.get("ok") else reply["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    return codes


def stuck_tcp(netns: str) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on the namespace's loopback whose receiver never reads, with the sender's queue
    full: a lingering close of the sender blocks until the linger time runs out."""
    with in_netns(netns):
        os.system("ip link set lo up")
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        cli.connect(srv.getsockname())
    cli.setblocking(False)
    try:
        while True:
            cli.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return srv, cli
