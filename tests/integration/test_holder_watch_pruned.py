"""A holder's pidfd is kept while it holds a lease and closed once it holds none, whatever ended the last one: a
lease ended by a link event or a settling release (nothing a request does) left its holder's pidfd open until some
later request came, for as long as none did."""

from __future__ import annotations

import contextlib
import os
import subprocess

from xskbroker.client.grant import request
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .loop_rig import MiB, bed


def _pidfds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
    return n


def test_a_holder_whose_interface_went_is_no_longer_watched() -> None:
    with bed() as (ns, b):
        before = _pidfds(b.pid)
        with request("xsk0", [0], geometry=proto.Geometry(umem_size=MiB), socket_path=b.socket_path,
                     timeout=5.0) as g:
            assert g.lease
            wait_for(lambda: _pidfds(b.pid) == before + 1, timeout=5.0, what="this process watched as a holder")
            subprocess.run(["ip", "-n", ns.name, "link", "del", "xsk0"], check=True)
            wait_for(lambda: any(r["lease"] == g.lease for r in b.records("lease-ended")), timeout=5.0,
                     what="the lease ended by the link's removal")
            # no request after it: the round that ended it lets go of the holder's pidfd
            wait_for(lambda: _pidfds(b.pid) == before, timeout=3.0, what="the holder's pidfd closed")
