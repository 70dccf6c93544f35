"""What the integration tests that grant as root on a veth bed share: their policies, a small geometry, a grant and
its release, a grant held inside its bind, and looks at the kernel (the queues bound, the XSK map's slots) and at the
broker (its UMEM pool)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xskbroker.broker import xdp_prog, xsk, xskdiag
from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for

MiB = 1 << 20
SMALL = proto.Geometry(umem_size=MiB, fill=64, completion=64, rx=64, tx=64)


def root_policy(kinds: tuple[str, ...] = ("bound",)) -> str:
    """root may have grants of these kinds on xsk*, up to 16 MiB of UMEM, and is admin."""
    return f"""\
version = 1

[[allow]]
name = "root"
users = [0]
interfaces = ["xsk*"]
kinds = {json.dumps(list(kinds))}
max_umem = "16MiB"

[admin]
users = [0]
"""


ROOT_POLICY = root_policy()

# root and the consumer may have bound grants on any queue up to 7 of xsk*
TESTS_POLICY = f"""\
version = 1

[[allow]]
name = "tests"
users = [0, {CONSUMER_UID}]
interfaces = ["xsk*"]
queues = ["0-7"]
kinds = ["bound"]
max_umem = "16MiB"
"""


def release(b: BrokerProcess, reply: dict[str, Any], fds: list[int]) -> None:
    """Close a grant's fds and release its lease."""
    for fd in fds:
        os.close(fd)
    with Connection(b.socket_path) as c:
        c.call(proto.Release(reply["lease"]))


def grant_release(b: BrokerProcess, geometry: proto.Geometry, queue: int = 1) -> None:
    """A bound grant of one queue of xsk0, released at once."""
    reply, fds = request_fds("xsk0", [queue], kind="bound", geometry=geometry, socket_path=b.socket_path)
    release(b, reply, fds)


def pool_metrics(b: BrokerProcess) -> dict[str, int]:
    """The UMEM pool's figures in `status`."""
    with Connection(b.socket_path) as c:
        return dict(c.call(proto.Status())[0]["metrics"]["pool"])


def umem_memfds(pid: int) -> list[int]:
    """Sizes of the UMEM memfds the process holds (a broker at rest: only its pool's)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:xskbroker-umem"):
                out.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            continue
    return out


def bound_queues(ns: VethNamespace, dev: str = "xsk0") -> set[int]:
    """The queues of the interface an AF_XDP socket is bound to, as the kernel says."""
    with in_netns(ns.name):
        return xskdiag.xsk_queues(ifindex(dev))


def occupied_slots(ns: VethNamespace, dev: str = "xsk0") -> list[int]:
    """The slots of the interface's XSK map that hold a socket (its program attached if it had none)."""
    with in_netns(ns.name):
        prog = xdp_prog.find_or_attach(ifindex(dev), dev, 2)
        try:
            return xsk.occupied_slots(prog.map_fd, 2)
        finally:
            prog.close()


@contextmanager
def grant_held_in_bind(b: BrokerProcess, gate: str, dev: str) -> Iterator[dict[str, Any]]:
    """A bound grant of queue 0 of `dev`, asked on a thread of a broker started with the fault point
    "before-bind:hold=<gate>", held inside its bind while the body runs, then let go and waited for. Yields what it
    came to, once the block is left: its "reply" and "fds", or its "error" (the refusal's whole reply)."""
    with open(gate + ".armed", "w"):
        pass
    first: dict[str, Any] = {}

    def held() -> None:
        try:
            first["reply"], first["fds"] = request_fds(dev, [0], kind="bound", geometry=SMALL,
                                                       socket_path=b.socket_path, timeout=20)
        except proto.BrokerError as e:
            first["error"] = e.reply

    t = threading.Thread(target=held)
    t.start()
    try:
        wait_for(lambda: os.path.exists(gate + ".held"), what="the grant inside its bind")
        yield first
    finally:
        with open(gate, "w"):
            pass
        t.join(20)
