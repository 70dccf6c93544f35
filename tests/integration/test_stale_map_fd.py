"""A bound grant whose interface's program the broker dropped while the grant waited (its interface removed,
its program detached or replaced) must neither touch a map slot through the closed map fd nor be made.

The grant is held inside its bind (fault point "before-bind", on a worker) meanwhile. Removed interface: a grant
on another interface then adopts that one's program, and its map fd takes the number just closed; when the first
grant's bind failed (the device gone), its undo emptied "its" slot through the number it had kept, which was the
other interface's map, and took a live lease's socket out. Detached program: the bind succeeded and the grant was
made, its socket in the map of a program no longer attached (it receives nothing), the reply naming that program.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .grant_bed import ROOT_POLICY, SMALL, bound_queues, grant_held_in_bind, occupied_slots, release

XSKMAP = 17  # BPF_MAP_TYPE_XSKMAP


def _xsk_map_fds(pid: int) -> dict[int, int]:
    """fd -> map id of the xsks_maps the process holds."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:bpf-map":
                continue
            info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{name}").read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue
        if int(info.get("map_type", "-1")) == XSKMAP:
            out[int(name)] = int(info["map_id"])
    return out


def _lowest_free(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in itertools.count() if n not in used)


def test_a_grant_on_a_removed_interface_leaves_another_interfaces_slots_alone(veth: VethNamespace,
                                                                               tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    veth.add_veth("xsk1", "xsk1p", queues=2)
    with BrokerProcess(veth.name, ROOT_POLICY, env={"XSKBROKER_FAULT": f"before-bind:hold={gate}"}) as b:
        fds: list[int] = []
        with grant_held_in_bind(b, gate, "xsk0") as first:
            # xsk1 runs the XSK program already: the broker adopts it, opening its map by id as the lowest free fd
            occupied_slots(veth, "xsk1")
            with contextlib.ExitStack() as held_open:
                # connections fill the broker's free fd numbers below xsk0's map fd (each takes the lowest free):
                # the fd number that map fd frees is then the lowest, as on a broker with no holes below it
                before = _xsk_map_fds(b.pid)
                while _lowest_free(b.pid) < min(before):
                    spare = held_open.enter_context(Connection(b.socket_path, timeout=10))
                    spare.call(proto.Hello())
                c = held_open.enter_context(Connection(b.socket_path, timeout=10))
                c.call(proto.Hello())
                veth.delete_link("xsk0")
                wait_for(lambda: b.records("interface-removed"), what="the broker to see xsk0 go")
                reply, fds = request_fds("xsk1", [0], kind="bound", geometry=SMALL, connection=c)
            after = _xsk_map_fds(b.pid)
            # the case at hand: xsk1's map took the number xsk0's had
            assert list(after) == list(before) and after != before, (before, after)
            assert occupied_slots(veth, "xsk1") == [0]
        assert "error" in first, first
        # the held grant failed; the lease on xsk1 keeps its slot, whatever fd number its map took
        assert occupied_slots(veth, "xsk1") == [0], first
        release(b, reply, fds)
        assert b.leases() == []
        assert b.proc is not None and b.proc.poll() is None, b.log()


def test_a_grant_whose_program_was_replaced_while_it_bound_is_not_made(veth: VethNamespace, tmp_path: Path) -> None:
    """The interface's XSK program detached while the grant is inside its bind: the socket would sit in the map of
    a program no longer attached, receiving nothing, and the reply would name that program."""
    gate = str(tmp_path / "gate")
    with BrokerProcess(veth.name, ROOT_POLICY, env={"XSKBROKER_FAULT": f"before-bind:hold={gate}"}) as b:
        with grant_held_in_bind(b, gate, "xsk0") as first:
            veth.xdp_off("xsk0")
            wait_for(lambda: b.records("xdp-program-changed"), what="the broker to see the program go")
        error = first.get("error", {}).get("error", {})
        assert error.get("code") == "kernel-error" and "detached or replaced" in error.get("message", ""), first
        assert b.leases() == []
        wait_for(lambda: bound_queues(veth, "xsk0") == set(), what="the refused grant's socket closed")
        # the next grant attaches the program again, and is made
        reply, fds = request_fds("xsk0", [0], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)
        release(b, reply, fds)
        assert b.proc is not None and b.proc.poll() is None, b.log()
