"""Does with broker-made bare sockets exactly what QEMU's net/af-xdp.c does with inhibit=on,sock-fds=.

Run by `xskbroker exec` as an unprivileged uid, from a copy of this file beside a copy of the client
package (an unprivileged uid may not be able to read the source tree). For each fd of --sock-fds:
XDP_UMEM_REG on the passed fd (4 KiB frames), fill/completion/RX/TX ring sizes, mmap, then bind with
XDP_USE_NEED_WAKEUP (plus XDP_COPY in skb mode, as QEMU does) to queue start_queue + i. Before the real
bind it tries another device, which SO_BINDTODEVICE must refuse. Then it answers test frames and prints
one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xskbroker.client.xsk import XskSocket
from xskbroker.testbed.echo import Reflector
from xskbroker.wire.protocol import Geometry
from xskbroker.wire.xdp_abi import (
    AF_XDP,
    SOCKADDR_XDP,
    SOL_XDP,
    XDP_COPY,
    XDP_RX_RING,
    XDP_TX_RING,
    XDP_UMEM_COMPLETION_RING,
    XDP_UMEM_FILL_RING,
    XDP_UMEM_REG,
    XDP_UMEM_REG_STRUCT,
    XDP_USE_NEED_WAKEUP,
)

libc = ctypes.CDLL(None, use_errno=True)
libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
RING = 512  # QEMU uses 2048; scaled so two queues fit the 8 MiB RLIMIT_MEMLOCK of the test machines
UMEM = 2 << 20


def bind(fd: int, ifindex: int, queue: int, flags: int) -> str:
    addr = SOCKADDR_XDP.pack(AF_XDP, flags, ifindex, queue, 0)
    if libc.bind(fd, addr, len(addr)) == 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), "?")


def register_like_qemu(fd: int, umem: int = UMEM, ring: int = RING) -> tuple[int, mmap.mmap]:
    """What QEMU does with a bare socket before it binds: its own UMEM (a memfd, 4 KiB frames) and four rings.
    Returns the UMEM's memfd and the mapping the registration refers to (keep it as long as the socket)."""
    umem_fd = os.memfd_create("umem", os.MFD_CLOEXEC)
    os.ftruncate(umem_fd, umem)
    area = mmap.mmap(umem_fd, umem)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    sock = socket.socket(AF_XDP, socket.SOCK_RAW, 0, fileno=os.dup(fd))
    sock.setsockopt(SOL_XDP, XDP_UMEM_REG, XDP_UMEM_REG_STRUCT.pack(addr, umem, 4096, 0, 0, 0))
    for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING, XDP_TX_RING):
        sock.setsockopt(SOL_XDP, opt, ring.to_bytes(4, "little"))
    sock.close()
    return umem_fd, area


def setup(fd: int, ifindex: int, other_ifindex: int, queue: int, mode: str) -> tuple[XskSocket, str, str]:
    umem_fd, area = register_like_qemu(fd)
    flags = XDP_USE_NEED_WAKEUP | (XDP_COPY if mode == "skb" else 0)
    other = bind(fd, other_ifindex, queue, flags)
    mine = bind(fd, ifindex, queue, flags)
    xs = XskSocket(fd, umem_fd, queue, Geometry(UMEM, 4096, 0, RING, RING, RING, RING), flags)
    xs._area = area  # type: ignore[attr-defined]  # the registration's own mapping lives as long as the socket
    return xs, other, mine


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--ifname", "--sock-fds", "--mode", "--other-ifname"):
        p.add_argument(name, required=True)
    for name in ("--queues", "--start-queue", "--count"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args()
    fds = [int(x) for x in a.sock_fds.split(":")]
    grant = json.loads(os.environ["XSKBROKER_GRANT"])
    assert len(fds) == a.queues and [s["fd"] for s in grant["sockets"]] == fds
    ifindex, other = socket.if_nametoindex(a.ifname), socket.if_nametoindex(a.other_ifname)
    sockets, binds = [], {}
    for i, fd in enumerate(fds):
        xs, other_bind, bind_result = setup(fd, ifindex, other, a.start_queue + i, a.mode)
        sockets.append(xs)
        binds[str(a.start_queue + i)] = {"other_device": other_bind, "own_device": bind_result}
    print(json.dumps({"ready": True}), flush=True)
    result = Reflector(sockets).run(a.count, timeout=20)
    result.update(binds=binds, uid=os.getuid(), euid=os.geteuid(), grant=grant,
                  inherited=sorted(int(x) for x in os.listdir("/proc/self/fd")))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
