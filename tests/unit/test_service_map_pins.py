"""Pinned map grants (serve --pin-root) against the fake kernel: a lease's pin goes with the lease, however it ends,
even when its interface was renamed after the pin was made (the pin stays at the name it was made under)."""

from __future__ import annotations

import errno
from pathlib import Path

from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, FakeKernel, make_rig

ROOT_DIR = "/sys/fs/bpf/xskbroker"


class PinKernel(FakeKernel):
    """The fake kernel, with bpffs pins by path: <root>/<uid>/<iface>/xsks_map -> the map's id."""

    def __init__(self) -> None:
        super().__init__()
        self.pins: dict[str, int] = {}

    def pin(self, root: str, uid: int, gid: int, ifname: str, map_fd: int) -> str:
        path = f"{root}/{uid}/{ifname}/xsks_map"
        if path in self.pins:
            raise FileExistsError(errno.EEXIST, f"{path} exists")
        self.pins[path] = self.maps[map_fd]
        return path

    def unpin(self, root: str, uid: int, ifname: str) -> bool:
        return self.pins.pop(f"{root}/{uid}/{ifname}/xsks_map", None) is not None


def _rename(kernel: FakeKernel, old: str, new: str) -> LinkEvent:
    kernel.ifaces[new] = kernel.ifaces.pop(old)
    return LinkEvent(False, kernel.ifaces[new][0], new, None)


def test_a_pinned_map_lease_of_a_renamed_interface_leaves_no_pin_when_released(tmp_path: Path) -> None:
    r = make_rig(tmp_path, kernel=PinKernel())
    r.service.pin_root = ROOT_DIR
    kernel = r.kernel
    assert isinstance(kernel, PinKernel)
    try:
        reply, _ = r.grant(interface="vmap0", queues=(), kind="map")
        assert reply["ok"] and reply["map_pin"] == f"{ROOT_DIR}/{ALICE.uid}/vmap0/xsks_map"
        r.service.link_event(_rename(kernel, "vmap0", "vmap5"))
        assert r.events("interface-renamed")
        done, _ = r.reply(ALICE, proto.Release(reply["lease"]))
        assert done["ok"] and r.service.leases.get(reply["lease"]) is None
        assert kernel.pins == {}, "the ended lease's pin is left behind"
        # a new interface takes the old name: the tenant's next map grant there is pinned at the path it is told,
        # not refused the pin for the stale one (whose map steers the renamed interface's queues)
        kernel.ifaces["vmap0"] = (10, 2)
        again, _ = r.grant(interface="vmap0", queues=(), kind="map")
        lease = r.service.leases.get(again["lease"])
        assert lease is not None and again.get("map_pin") == reply["map_pin"]
        assert kernel.pins == {reply["map_pin"]: lease.map_id}
    finally:
        r.service.close()


def test_a_pinned_map_lease_of_a_renamed_interface_leaves_no_pin_after_a_restart(tmp_path: Path) -> None:
    first = make_rig(tmp_path, kernel=PinKernel())
    first.service.pin_root = ROOT_DIR
    kernel = first.kernel
    assert isinstance(kernel, PinKernel)
    reply, _ = first.grant(interface="vmap0", queues=(), kind="map")
    assert reply["ok"] and kernel.pins
    first.service.link_event(_rename(kernel, "vmap0", "vmap5"))
    first.service.leases.close()  # the broker dies; its per-queue program (and so the map grant) with it

    second = make_rig(tmp_path, kernel=kernel)
    second.service.pin_root = ROOT_DIR
    try:
        second.service.recover()
        assert [x["lease"] for x in second.events("lease-dropped")] == [reply["lease"]]
        assert kernel.pins == {}, "the dropped lease's pin is left behind"
    finally:
        second.service.close()
