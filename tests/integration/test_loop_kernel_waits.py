"""The event loop never waits on a kernel call that takes rtnl: another client's hello is answered meanwhile.

Any process can keep rtnl busy (creating and deleting links in a namespace of its own: 9-11 ms per call at p99 here,
against 0.1-0.2 ms idle), so a call that waits for it on the loop delays every client. The fault hook holds the
broker inside the call (a "hold" point), which stands in for rtnl held as long as the test likes, with no timing.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from xskbroker.broker import xsk
from xskbroker.broker.netdev import ifindex
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, in_netns
from xskbroker.wire import protocol as proto

from .conftest import wait_for
from .grant_bed import SMALL

POLICY = """\
version = 1

[[allow]]
name = "root"
users = [0]
interfaces = ["xsk*"]
kinds = ["bound"]
max_umem = "16MiB"
"""


def _grant(path: str, out: dict[str, Any]) -> None:
    try:
        with Connection(path, timeout=20) as c:
            out["reply"], fds = c.call(proto.Grant("xsk0", (0,), kind="bound", geometry=SMALL))
        for fd in fds:
            os.close(fd)
    except proto.BrokerError as e:
        out["error"] = e.reply["error"]


def _hello_while_held(b: BrokerProcess, gate: str, what: str) -> tuple[dict[str, Any], float, dict[str, Any], bool]:
    """A grant sent and held at the broker's hold point `gate` (inside a kernel call), another client's hello
    meanwhile, then the gate opened: (the hello's reply, {} if none came; how long it took; the grant's outcome;
    whether the grant is still unanswered)."""
    Path(gate + ".armed").touch()
    out: dict[str, Any] = {}
    asker = threading.Thread(target=_grant, args=(b.socket_path, out), daemon=True)
    asker.start()
    try:
        wait_for(lambda: os.path.exists(gate + ".held"), timeout=10, what=what)
        started = time.perf_counter()
        try:
            with Connection(b.socket_path, timeout=2) as c:
                hello = c.call(proto.Hello())[0]
        except TimeoutError:
            hello = {}
        waited = time.perf_counter() - started
    finally:
        Path(gate).touch()
        asker.join(10)
    return hello, waited, out, asker.is_alive()


def test_a_grant_whose_queue_stays_busy_asks_who_holds_it_off_the_loop(veth: VethNamespace, tmp_path: Path) -> None:
    """A socket the broker did not make holds queue 0: the grant retries its bind for BUSY_RETRY_SECONDS, then asks
    the kernel which queues are bound (a netdev queue dump, which takes rtnl on this kernel) to say why. Held inside
    that call, the broker still answers another client's hello, and the grant is then refused as squatted."""
    gate = str(tmp_path / "gate")
    with in_netns(veth.name):
        stranger = xsk.create_bound(ifindex("xsk0"), 0, None, SMALL)  # bound to queue 0, in no broker map
    try:
        with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"queue-look:hold={gate}"}) as b:
            hello, waited, out, unanswered = _hello_while_held(b, gate, "the look at the bound queues")
            assert hello.get("ok"), f"no hello while the grant's look at the kernel waited ({waited:.2f} s)"
            assert waited < 1.0, waited
            assert not unanswered
            error = out.get("error")
            assert error is not None and error["code"] == "queue-squatted", out
            assert "did not make" in error["message"], error
            assert b.leases() == [], b.leases()
            assert b.proc is not None and b.proc.poll() is None, b.log()
    finally:
        stranger.close()


def test_a_grant_asks_for_the_queue_count_off_the_loop(veth: VethNamespace, tmp_path: Path) -> None:
    """The first grant on an interface (or the first after any link event, which forgets every count) asks the kernel
    for its queue count (ethtool channels, an ioctl that takes rtnl). Held inside that call, the broker still answers
    another client's hello, and the grant is then made."""
    gate = str(tmp_path / "gate")
    with BrokerProcess(veth.name, POLICY, env={"XSKBROKER_FAULT": f"queue-count:hold={gate}"}) as b:
        hello, waited, out, unanswered = _hello_while_held(b, gate, "the grant asking for the queue count")
        assert hello.get("ok"), f"no hello while the grant's queue count waited ({waited:.2f} s)"
        assert waited < 1.0, waited
        assert not unanswered
        reply = out.get("reply")
        assert reply is not None and reply["ok"], out
        assert [x["lease"] for x in b.leases()] == [reply["lease"]], b.leases()
        assert b.proc is not None and b.proc.poll() is None, b.log()
