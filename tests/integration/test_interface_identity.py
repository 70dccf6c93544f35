"""What a grant's interface name means over time: an interface renamed, removed or moved while a grant on it is
being made or while its leases live. Leases follow the ifindex; a grant is made only on the interface that still
bears the name the policy judged.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.client.grant import request_fds
from xskbroker.testbed import links
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import ns_name, wait_for
from .grant_bed import SMALL, grant_held_in_bind, release, root_policy

POLICY = root_policy(("bound", "bare", "map"))


def _index(ns: VethNamespace, dev: str) -> int:
    with in_netns(ns.name):
        return ifindex(dev)


def test_a_grant_whose_interface_was_renamed_while_it_bound_is_not_made(veth: VethNamespace, tmp_path: Path) -> None:
    """xsk1 is renamed away (to a name no rule allows) and another interface renamed to xsk1 while a grant on xsk1
    is inside its bind: the socket would be bound to the interface the policy now refuses, and its lease would say
    xsk1 (status, and a revoke of xsk1, naming the wrong interface)."""
    gate = str(tmp_path / "gate")
    veth.add_veth("xsk1", "xsk1p", queues=2)
    veth.add_veth("oth2", "oth2p", queues=2)
    judged = _index(veth, "xsk1")
    with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"before-bind:hold={gate}"}) as b:
        with grant_held_in_bind(b, gate, "xsk1") as first:
            veth.rename("xsk1", "oth1")
            veth.rename("oth2", "xsk1")
            wait_for(lambda: b.records("interface-renamed"), what="the broker to see the rename")
        for fd in first.get("fds", []):
            os.close(fd)
        leases = b.leases()
        # never a lease on the interface now called oth1 under the name xsk1
        assert not any(x["ifindex"] == judged and x["interface"] == "xsk1" for x in leases), (first, leases)
        error = first.get("error", {}).get("error", {})
        assert error.get("code") == "no-such-interface" and "renamed" in error.get("message", ""), first
        assert leases == []
        # the interface that bears the name now is granted as any other
        reply, fds = request_fds("xsk1", [0], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)
        assert reply["ifindex"] == _index(veth, "xsk1") != judged
        release(b, reply, fds)
        assert b.proc is not None and b.proc.poll() is None, b.log()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _grant(path: str, kind: str) -> tuple[dict[str, Any], list[int]]:
    if kind == "map":
        with Connection(path, timeout=10) as c:
            return c.call(proto.Grant("xsk1", (0,), kind="map"))
    return request_fds("xsk1", [0], kind=kind, geometry=SMALL, socket_path=path, timeout=10)


@pytest.mark.parametrize("kind", ["bound", "bare", "map"])
def test_an_interface_moved_to_another_namespace_and_back_is_granted_afresh(veth: VethNamespace, kind: str) -> None:
    """A lease's interface moved to another namespace ends its lease (its sockets are unbound by the move); moved
    back, it comes with the same ifindex and the program the broker had adopted, the old socket perhaps still in its
    slot: the next grant on it must neither find a lease of the old one nor a queue held by it."""
    other = ns_name()
    links.create_netns(other)
    try:
        veth.add_veth("xsk1", "xsk1p", queues=2)
        index = _index(veth, "xsk1")
        with BrokerProcess(veth.name, POLICY) as b:
            _, old_fds = _grant(b.socket_path, kind)
            try:
                _ip("-n", veth.name, "link", "set", "xsk1", "netns", other)
                wait_for(lambda: b.leases() == [], what="the lease to end with its interface's move")
                _ip("-n", other, "link", "set", "xsk1", "netns", veth.name)
                _ip("-n", veth.name, "link", "set", "xsk1", "up")
                assert _index(veth, "xsk1") == index
                again, fds = _grant(b.socket_path, kind)
                for fd in fds:
                    os.close(fd)
                (lease,) = b.leases()
                assert lease["lease"] == again["lease"] and lease["interface"] == "xsk1" and lease["ifindex"] == index
            finally:
                for fd in old_fds:
                    os.close(fd)
            assert b.proc is not None and b.proc.poll() is None, b.log()
    finally:
        links.remove_netns(other)


def test_a_rename_lost_with_an_overrun_of_link_events_is_learnt_from_the_kernel(veth: VethNamespace,
                                                                                 tmp_path: Path) -> None:
    """The broker's loop is held while link events flood its socket; a lease's interface is renamed and another
    interface takes its name once the socket is full, so both events are lost (ENOBUFS). The lease must not go on
    saying the old name: status would name the wrong interface and a revoke of that name hit the renamed one's."""
    gate = str(tmp_path / "gate")
    veth.add_veth("xsk1", "xsk1p", queues=2)
    veth.add_veth("fl0", "fl0p")
    with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"before-send:hold={gate}"}) as b:
        _, fds = request_fds("xsk1", [0], kind="bound", geometry=SMALL, socket_path=b.socket_path, timeout=10)
        try:
            with open(gate + ".armed", "w"):
                pass
            t = threading.Thread(target=b.leases)  # its reply holds the loop
            t.start()
            try:
                wait_for(lambda: os.path.exists(gate + ".held"), what="the loop held")
                with links.rtnl(veth.name) as ipr:
                    index = ipr.link_lookup(ifname="fl0")[0]
                    for i in range(3000):
                        ipr.link("set", index=index, state="up" if i % 2 else "down")
                veth.rename("xsk1", "oth1")
                veth.add_veth("xsk1", "xsk1q")
            finally:
                with open(gate, "w"):
                    pass
                t.join(20)
            wait_for(lambda: b.records("linkwatch-overrun"), what="the overrun to be seen")
            (lease,) = b.leases()
            assert lease["interface"] == "oth1", lease
            with Connection(b.socket_path) as c, pytest.raises(proto.BrokerError) as refused:
                c.call(proto.Revoke(interface="xsk1"))
            assert refused.value.code == "unknown-lease", refused.value
        finally:
            for fd in fds:
                os.close(fd)
        assert b.proc is not None and b.proc.poll() is None, b.log()
