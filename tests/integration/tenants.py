"""A map-grant tenant as DPDK's af_xdp PMD is one: it gets an XSKMAP fd, creates its own AF_XDP socket
(CAP_NET_RAW, nothing else), registers its own UMEM, binds its queue and writes its socket into the map.

Runs forked, as an unprivileged uid that kept only CAP_NET_RAW (spawn_tenant).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from xskbroker.broker import bpfsys
from xskbroker.client.connection import Connection
from xskbroker.client.xsk import XskSocket
from xskbroker.common.libc import PR_SET_NO_NEW_PRIVS, libc
from xskbroker.testbed.echo import Reflector
from xskbroker.testbed.links import setns
from xskbroker.testbed.sandbox import Child, fork_child
from xskbroker.wire import protocol as proto
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import AF_XDP, XDP_COPY, XDP_USE_NEED_WAKEUP

from .qemu_like_consumer import RING, UMEM, bind, register_like_qemu

PR_SET_KEEPCAPS = 8
CAP_NET_RAW = 13
_CAP_V3 = 0x20080522


def drop_keeping_net_raw(uid: int) -> str:
    """Become uid with CAP_NET_RAW as the only capability (what DPDK's PMD needs to make AF_XDP sockets)."""
    libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    hdr = ctypes.create_string_buffer(struct.pack("II", _CAP_V3, 0))
    data = ctypes.create_string_buffer(struct.pack("6I", 1 << CAP_NET_RAW, 1 << CAP_NET_RAW, 0, 0, 0, 0))
    if libc.capset(hdr, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    with open("/proc/self/status") as f:
        eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    if int(eff, 16) != 1 << CAP_NET_RAW:
        raise PermissionError(f"CapEff {eff}")
    return eff


def spawn_tenant(fn: Callable[..., Any], *args: Any, uid: int, netns: str) -> Child:
    """Fork a tenant into the interface's namespace (its sockets bind there), then drop to uid + CAP_NET_RAW."""
    def become() -> None:
        setns(netns)
        drop_keeping_net_raw(uid)

    return fork_child(become, uid, fn, *args)


def own_socket(ifname: str, queue: int) -> XskSocket:
    """An AF_XDP socket made, registered and bound by the tenant itself (copy mode: veth)."""
    fd = socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0).detach()
    umem_fd, area = register_like_qemu(fd)
    flags = XDP_USE_NEED_WAKEUP | XDP_COPY
    got = bind(fd, socket.if_nametoindex(ifname), queue, flags)
    if got != "ok":
        raise OSError(f"bind to {ifname} queue {queue}: {got}")
    xs = XskSocket(fd, umem_fd, queue, Geometry(UMEM, 4096, 0, RING, RING, RING, RING), flags)
    xs._area = area  # type: ignore[attr-defined]
    return xs


def map_grant(path: str, ifname: str, queues: tuple[int, ...]) -> tuple[dict[str, Any], int]:
    with Connection(path) as c:
        reply, fds = c.call(proto.Grant(ifname, queues, kind="map"))
    return reply, fds[0]


def _leases(path: str) -> list[dict[str, Any]]:
    with Connection(path) as c:
        reply, _ = c.call(proto.Status())
    return list(reply["leases"])


def tenant(path: str, ifname: str, queue: int, steal: int | None, count: int, after_revoke: int = 0,
           map_fd: int | None = None) -> dict[str, Any]:
    """Take a map grant for `queue` (unless handed map_fd), bind a socket there, write it into the map's
    slot for its queue, try to steer `steal` (another tenant's queue) to it too, then answer `count` frames.
    With after_revoke, wait until the lease is revoked, write the slot again and answer what still comes."""
    reply: dict[str, Any] = {}
    if map_fd is None:
        reply, map_fd = map_grant(path, ifname, (queue,))
    xs = own_socket(ifname, queue)
    bpfsys.map_update(map_fd, queue, xs.fd)
    stolen = None
    if steal is not None:  # the map is the tenant's to write: this succeeds, and must change nothing
        bpfsys.map_update(map_fd, steal, xs.fd)
        stolen = "written"
    out: dict[str, Any] = {"grant": reply, "steal": stolen, "uid": os.getuid()}
    out["first"] = Reflector([xs]).run(count, timeout=20)["tags"][str(queue)]
    if after_revoke:
        deadline = time.monotonic() + 20
        while _leases(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        bpfsys.map_update(map_fd, queue, xs.fd)  # the leftover fd is still writable: it must steer nothing
        out["rewritten"] = True
        out["after"] = Reflector([xs]).run(after_revoke, timeout=4)["tags"][str(queue)]
    return out
