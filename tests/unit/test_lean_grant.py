"""The grant path's shortcuts keep every check: interface facts remembered between link events are re-read
after any (and the events the kernel queued are read before a grant trusts them); the loop waits a moment
for a light job (a pooled socket's bind) and answers at once, but never longer than INLINE_WAIT, and an
EBUSY still waits on the timer."""

from __future__ import annotations

import select
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from xskbroker.broker import boundgrants
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.broker.service import Deferred, Outcome, Service
from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, POLICY, SMALL, FakeKernel, FakePrepared, Rig, finish, make_rig

VETH0 = 7  # FakeKernel's ifindex of veth0


@pytest.fixture(name="rig")
def plain_rig(tmp_path: Path) -> Iterable[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.service.close()


@pytest.fixture
def pooled(tmp_path: Path) -> Iterable[Rig]:
    """A rig whose service makes sockets ahead (the fake kernel's), for the SMALL geometry."""
    records: list[dict[str, object]] = []
    now = [1000.0]
    k = FakeKernel()
    svc = Service(parse_policy(POLICY), records.append, state_file=str(tmp_path / "leases.jsonl"),
                  clock=lambda: now[0], umem_pool=16 << 20, kernel=k, link_events=True)
    r = Rig(k, svc, records, now)
    yield r
    svc.close()


def ask(rig: Rig, queue: int, interface: str = "veth0") -> Outcome | Deferred:
    return rig.service.handle(ALICE, proto.encode_request(proto.Grant(interface, (queue,), geometry=SMALL)))


def wait_pooled(rig: Rig) -> None:
    rig.service.pool.kick()  # as the server does once a reply is out: a first take waits for it to refill
    deadline = time.monotonic() + 5
    while not rig.service.pool.ready(SMALL) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rig.service.pool.ready(SMALL)


def test_a_pooled_socket_bound_within_the_inline_wait_is_answered_at_once(pooled: Rig,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # what is tested is that a job done within the wait is answered at once, not how long the wait is: 1 ms
    # ran out under a loaded machine (one full run of the suite), so the wait is made long enough here
    monkeypatch.setattr(boundgrants, "INLINE_WAIT", 1.0)
    assert finish(pooled, ask(pooled, 0))["ok"]  # the pool learns the geometry
    wait_pooled(pooled)
    out = ask(pooled, 1)
    assert isinstance(out, Outcome), "a light job done within INLINE_WAIT needs no timer nor loop wake-up"
    assert out.lease_id and len(out.fds) == 2
    assert pooled.events("grant")[-1]["decision"] == "allow"
    assert not _readable(pooled), "the worker did not wake the loop: it was waiting"


def _readable(rig: Rig, within: float = 0.05) -> bool:
    """Whether a worker woke the loop within `within` seconds."""
    return bool(select.select([rig.service.workers.wake], [], [], within)[0])


def test_the_loop_never_waits_longer_than_the_inline_wait(pooled: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    assert finish(pooled, ask(pooled, 0))["ok"]
    wait_pooled(pooled)
    slow = FakePrepared.try_bind

    def held(self: FakePrepared) -> bool:  # a bind behind someone's rtnl lock
        time.sleep(0.5)  # long, so that a loop that waited for it cannot pass for a slow machine
        return slow(self)

    monkeypatch.setattr(FakePrepared, "try_bind", held)
    t = time.monotonic()
    out = ask(pooled, 1)
    assert time.monotonic() - t < 0.25 and isinstance(out, Deferred)
    # a 50 ms job's wake-up came later than a 50 ms look on a loaded machine (CI, two workers): the look is
    # long, since what is tested is that the wake-up comes at all
    assert _readable(pooled, within=5.0), "a job the loop stopped waiting for wakes it when done"
    assert finish(pooled, out)["ok"]


def test_an_ebusy_still_waits_for_the_release(pooled: Rig) -> None:
    assert finish(pooled, ask(pooled, 0))["ok"]
    wait_pooled(pooled)
    pooled.kernel.busy[2] = 2  # a just-closed socket's queue: two EBUSY answers, then free
    out = ask(pooled, 2)
    assert isinstance(out, Deferred)
    reply = finish(pooled, out)
    assert reply["ok"], reply
    assert pooled.kernel.log.count("bind 2") == 3


def test_a_rename_queued_before_the_grant_is_seen(rig: Rig) -> None:
    assert rig.grant(queues=(0,))[0]["ok"]
    assert rig.service.net.ifindex == {"veth0": VETH0}  # remembered between link events
    # veth0 is renamed; its event is queued at the watcher when the next request is read
    rig.kernel.ifaces["other0"] = rig.kernel.ifaces.pop("veth0")
    queued = [LinkEvent(False, VETH0, "other0", None)]
    rig.service.link_sync = lambda: [rig.service.link_event(e) for e in queued] and queued.clear()  # type: ignore[func-returns-value]
    reply, _ = rig.grant(queues=(1,))
    assert not reply["ok"] and reply["error"]["code"] == "no-such-interface", reply


def test_without_link_events_nothing_is_remembered(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        rig.service.watch_links(False)
        assert rig.grant(queues=(0,))[0]["ok"]
        assert not rig.service.net.ifindex and not rig.service.net.queues
        rig.kernel.ifaces["other0"] = rig.kernel.ifaces.pop("veth0")  # and no event says so
        reply, _ = rig.grant(queues=(1,))
        assert reply["error"]["code"] == "no-such-interface"
    finally:
        rig.service.close()


def test_a_remembered_queue_count_never_refuses(rig: Rig) -> None:
    assert rig.grant(queues=(0,))[0]["ok"]
    assert rig.service.net.queues[VETH0] == 4
    rig.service.net.queues[VETH0] = 2  # stale: the device has 4 (a driver that sent no event)
    reply, _ = rig.grant(queues=(3,))
    assert reply["ok"], reply
    assert rig.service.net.queues[VETH0] == 4


@pytest.mark.parametrize("removed", [False, True])
def test_an_interface_renamed_or_removed_while_a_bare_grant_is_made_is_not_granted(rig: Rig, removed: bool) -> None:
    """The link event arrives after the grant found the interface's program (an attach takes milliseconds): the
    socket, bound to the device by name, would be on whatever bears the name now, and the lease on an ifindex that
    is another interface's, or no interface's (kept, on its quota, until its holder exits)."""
    event = LinkEvent(True, VETH0, None, None) if removed else LinkEvent(False, VETH0, "veth9", None)
    fired = [False]

    def sync() -> None:
        if VETH0 in rig.service.programs and not fired[0]:  # arrived once the grant had found the program
            fired[0] = True
            rig.kernel.ifaces.pop("veth0")
            rig.service.link_event(event)
    rig.service.link_sync = sync
    reply, _ = rig.grant(queues=(0,), kind="bare")
    assert not reply["ok"] and reply["error"]["code"] == "no-such-interface", reply
    assert "removed" in reply["error"]["message"] if removed else "renamed 'veth9'" in reply["error"]["message"]
    assert len(rig.service.leases) == 0
    assert not any(what != "map" for what in rig.kernel.left().values()), rig.kernel.left()
