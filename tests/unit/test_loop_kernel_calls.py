"""Kernel calls that wait for rtnl run on a worker, never on the thread that serves requests (the event loop):
the queue count (ethtool channels) and the look at which queues are bound (a netdev queue dump)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from xskbroker.broker.kernel import BUSY_RETRY_SECONDS
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, SMALL, FakeKernel, FakeProgram, Rig, finish, make_rig

VETH0 = 7  # FakeKernel's ifindex of veth0


class WatchedKernel(FakeKernel):
    """Records the thread of every call that waits for rtnl on a real kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.rtnl_calls: list[tuple[str, str]] = []
        self.program_queries = 0  # which XDP program is attached (a netlink query that waits for rtnl too)

    def queue_count(self, name: str) -> int:
        self.rtnl_calls.append(("queue_count", threading.current_thread().name))
        return super().queue_count(name)

    def bound_queues(self, ifindex: int) -> set[int]:
        self.rtnl_calls.append(("bound_queues", threading.current_thread().name))
        return super().bound_queues(ifindex)

    def attached(self, ifindex: int) -> int:
        self.program_queries += 1
        return super().attached(ifindex)

    def queue_program(self, ifindex: int) -> FakeProgram | None:
        self.program_queries += 1  # the real one asks which program is attached
        return super().queue_program(ifindex)


@pytest.fixture(name="rig")
def watched_rig(tmp_path: Path) -> Iterable[Rig]:
    r = make_rig(tmp_path, kernel=WatchedKernel())
    yield r
    r.service.close()


def _on_loop(rig: Rig) -> list[str]:
    assert isinstance(rig.kernel, WatchedKernel)
    loop = threading.current_thread().name
    return [call for call, thread in rig.kernel.rtnl_calls if thread == loop]


def test_the_queue_count_is_read_on_a_worker(rig: Rig) -> None:
    assert rig.grant(queues=(0,))[0]["ok"]
    assert rig.service.net.queues == {VETH0: 4}  # remembered: the next grant asks nobody
    assert rig.grant(queues=(1,))[0]["ok"]
    assert isinstance(rig.kernel, WatchedKernel)
    assert [call for call, _ in rig.kernel.rtnl_calls] == ["queue_count"]
    rig.service.link_event(LinkEvent(False, 99, "other0", None))  # any link event forgets every count
    assert rig.grant(queues=(2,))[0]["ok"]
    assert [call for call, _ in rig.kernel.rtnl_calls] == ["queue_count"] * 2
    assert _on_loop(rig) == []


def test_a_queue_past_the_remembered_count_is_counted_again_on_a_worker(rig: Rig) -> None:
    assert rig.grant(queues=(0,))[0]["ok"]
    rig.service.net.queues[VETH0] = 2  # stale: the device has 4 (a driver that sent no event)
    reply, _ = rig.grant(queues=(3,))
    assert reply["ok"], reply
    assert rig.service.net.queues[VETH0] == 4
    reply, _ = rig.grant(queues=(5,))  # counted again, and refused on the fresh count
    assert reply["error"]["code"] == "no-such-queue", reply
    assert _on_loop(rig) == []


def test_a_map_grant_of_every_queue_is_judged_on_a_count_read_on_a_worker(rig: Rig) -> None:
    reply, _ = rig.grant(queues=(), kind="map")
    assert "lease" in reply or "error" in reply, reply
    assert isinstance(rig.kernel, WatchedKernel) and rig.kernel.rtnl_calls
    assert _on_loop(rig) == []


def test_the_look_at_a_squatted_queue_runs_on_a_worker(rig: Rig) -> None:
    rig.kernel.stuck.add(0)
    rig.kernel.bound_elsewhere.add(0)
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    rig.now[0] += BUSY_RETRY_SECONDS + 0.1
    reply = finish(rig, out)
    assert reply["error"]["code"] == "queue-squatted" and "did not make" in reply["error"]["message"]
    assert rig.kernel.left() == {} and len(rig.service.pending) == 0
    assert isinstance(rig.kernel, WatchedKernel) and ("bound_queues" in [c for c, _ in rig.kernel.rtnl_calls])
    assert _on_loop(rig) == []


def test_a_grant_stopped_while_its_look_runs_undoes_what_it_made(rig: Rig) -> None:
    rig.kernel.stuck.add(0)
    gate = threading.Event()
    looking = threading.Event()
    plain = rig.kernel.bound_queues

    def slow(ifindex: int) -> set[int]:
        looking.set()
        gate.wait(5)
        return plain(ifindex)

    rig.kernel.bound_queues = slow  # type: ignore[method-assign]
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    assert not isinstance(out, dict)
    for _ in range(50):
        if looking.is_set():
            break
        rig.now[0] += BUSY_RETRY_SECONDS / 10
        rig.service.workers.drain()
        if not out.parked():  # type: ignore[union-attr]
            assert out.step() is None  # type: ignore[union-attr]
        looking.wait(0.05)
    assert looking.is_set(), "the grant never looked at the bound queues"
    out.cancel()  # type: ignore[union-attr]  # the broker stops while a worker looks
    assert len(rig.service.pending) == 0
    gate.set()
    for _ in range(100):
        if rig.kernel.left() == {}:
            break
        threading.Event().wait(0.01)
    assert rig.kernel.left() == {}, rig.kernel.left()


def test_map_grants_and_their_ends_ask_nothing_of_a_cached_per_queue_program(rig: Rig) -> None:
    """The first map grant on an interface attaches the per-queue program (and asks what is attached: once); later
    map grants and every map lease's end use the cached program, which a link event drops if it changes."""
    first, _ = rig.grant(interface="vmap0", queues=(0,), kind="map")
    assert first["ok"], first
    assert isinstance(rig.kernel, WatchedKernel)
    before = rig.kernel.program_queries
    second, _ = rig.grant(interface="vmap0", queues=(1,), kind="map")
    assert second["ok"], second
    for reply in (first, second):
        out, _ = rig.reply(ALICE, proto.Release(reply["lease"]))
        assert out["ok"], out
    assert len(rig.service.leases) == 0
    assert rig.kernel.program_queries == before
    vmap0 = rig.kernel.ifaces["vmap0"][0]
    assert set(rig.kernel.outer[vmap0].values()) == {rig.kernel.attached_progs[vmap0][1]}  # every slot given back
