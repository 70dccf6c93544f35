"""Network namespaces, veth pairs and links for the demo and the test beds, over rtnetlink with pyroute2.

Only the test beds use pyroute2: the daemon keeps its own small rtnetlink parser (broker/netlink.py)
because importing pyroute2 costs 140-400 ms. Namespaces are the ones `ip netns` knows (/run/netns/NAME),
so `ip netns exec` and the tests' setns() find them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

from xskbroker.common.libc import CLONE_NEWNET, errno_error, libc

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def setns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise errno_error(f"setns into {name}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run a block inside a namespace; sockets made there keep it after the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(name)
        yield
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(home)


def create_netns(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):  # `ip netns add` refuses an existing name too
        raise FileExistsError(f"network namespace {name} exists already")
    netns.create(name)


def remove_netns(name: str) -> None:
    """Remove the namespace (its links go with it); a namespace already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


@contextlib.contextmanager
def rtnl(name: str | None) -> Iterator[Any]:
    """An rtnetlink socket inside namespace `name` (this one if None): the socket keeps the namespace."""
    with in_netns(name) if name else contextlib.nullcontext():
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise LookupError(f"no link named {dev}")
    return int(found[0])


def add_veth(name: str | None, dev: str, peer: str, queues: int = 1, up: bool = True,
             tx_queues: int | None = None) -> None:
    """A veth pair dev <-> peer in namespace `name`, each end with `queues` RX queues and as many TX queues
    unless told (`tx_queues`)."""
    tx = queues if tx_queues is None else tx_queues
    with rtnl(name) as ipr:
        ipr.link("add", ifname=dev, kind="veth", num_tx_queues=tx, num_rx_queues=queues,
                 peer={"ifname": peer, "num_tx_queues": tx, "num_rx_queues": queues})
        if up:
            for d in (dev, peer):
                ipr.link("set", index=_index(ipr, d), state="up")


def set_link(name: str | None, dev: str, *, up: bool | None = None, rename: str | None = None,
             xdp_off: bool = False) -> None:
    with rtnl(name) as ipr:
        index = _index(ipr, dev)
        if rename is not None:
            ipr.link("set", index=index, ifname=rename)
        if up is not None:
            ipr.link("set", index=index, state="up" if up else "down")
        if xdp_off:  # detach whatever XDP program is attached, as `ip link set DEV xdp off` does
            ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", -1)]})


def delete_link(name: str | None, dev: str) -> None:
    with rtnl(name) as ipr:
        ipr.link("del", index=_index(ipr, dev))


def add_altname(name: str | None, dev: str, altname: str) -> None:
    with rtnl(name) as ipr:
        ipr.link("property_add", index=_index(ipr, dev), altname=altname)


def mac(name: str | None, dev: str) -> bytes:
    with rtnl(name) as ipr:
        (link,) = ipr.get_links(_index(ipr, dev))
        return bytes.fromhex(str(link.get("address")).replace(":", ""))


def write_sysfs(name: str, writes: dict[str, str]) -> None:
    """Write /sys/class/net/... files of namespace `name`: sysfs shows the links of the namespace that
    mounted it, so a forked child enters the namespace, mounts its own sysfs privately and writes there."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            setns(name)
            if libc.unshare(CLONE_NEWNS) != 0:
                raise errno_error("unshare(CLONE_NEWNS)")
            if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing leaks to the host
                raise errno_error("mount --make-rprivate /")
            if libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0:
                raise errno_error("mount sysfs")
            for path, value in writes.items():
                with open(path, "w") as f:
                    f.write(value)
            code = 0
        except BaseException as e:
            os.write(2, f"write_sysfs in {name}: {e}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"writing {', '.join(writes)} in namespace {name} failed")
