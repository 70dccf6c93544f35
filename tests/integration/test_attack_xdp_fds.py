"""fds the broker opens while it looks at an interface's XDP program must all be closed, refusals included.

A program named like libxdp's dispatcher ("xdp_dispatcher": what xdp-loader, xdp-filter and any libxdp
multi-program user attach) is looked into through libxdp (xdp_multiprog__get_from_ifindex), whose
program-by-id objects leave a program fd open after they are closed (libxdp 1.x). The broker refuses such
an interface (a foreign program) on every grant asked there: any client that may ask can make it.

The program here is a plain XDP_PASS program named xdp_dispatcher, linked by root (the admin's): this
kernel refuses libxdp's real dispatcher (EOPNOTSUPP), and the name is all the broker goes by.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from xskbroker.broker import bpf, bpfsys
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import in_netns, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID
from .test_attack_names import bed

POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
max_umem = "16MiB"

[admin]
users = [0]
"""


def _grants(path: str, iface: str, count: int) -> dict[str, Any]:
    codes: dict[str, int] = {}
    with Connection(path) as c:
        for _ in range(count):
            try:
                c.call(proto.Grant(iface, (0,)))
                codes["ok"] = codes.get("ok", 0) + 1
            except proto.BrokerError as e:
                codes[e.code] = codes.get(e.code, 0) + 1
    return codes


def test_grants_refused_for_a_dispatcher_leak_no_fd() -> None:
    with bed(POLICY) as (ns, b):
        with in_netns(ns.name):
            i = bpfsys.insn
            prog = bpfsys.prog_load_xdp(i(0xb7, 0, 0, 0, 2) + i(0x95), "xdp_dispatcher")  # r0 = XDP_PASS; exit
            link = bpfsys.link_create_xdp(prog, socket.if_nametoindex(ns.inside), bpf.XDP_FLAGS_DRV_MODE)
        try:
            spawn_unprivileged(_grants, b.socket_path, ns.inside, 1, uid=CONSUMER_UID).result()  # warm
            before = b.settled_fds()
            codes = spawn_unprivileged(_grants, b.socket_path, ns.inside, 200, uid=CONSUMER_UID).result()
            assert codes["xdp-foreign-program"] == 200 and "ok" not in codes, codes
            after = b.settled_fds()
            assert after == before, (f"200 refused grants left {after - before} fds open in the broker: "
                                     f"{[t for t in b.fd_targets() if 'bpf' in t][-5:]}")
        finally:
            os.close(link)
            os.close(prog)
