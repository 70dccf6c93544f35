"""The service (decisions -> kernel work) against a fake Kernel, without root.

The fake keeps the kernel's relevant facts (interfaces, xsks_map slots, the fds the broker holds, processes)
and records what was made and closed, so a test can check that a failure leaves nothing behind. Grants
that really reach the kernel are tested in tests/integration; here it is the wiring: which kernel calls a
request makes, in which order, what it undoes, what it audits and what it answers.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import faults
from xskbroker.broker.kernel import (
    BUSY_RETRY_SECONDS,
    BoundSocket,
    ForeignProgram,
    NoSuchInterface,
    NotCanonical,
    QueueBusy,
)
from xskbroker.broker.leases import Lease
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.service import Deferred, Outcome, Service
from xskbroker.policy import Policy, parse_policy
from xskbroker.wire import protocol as proto

POLICY = """
version = 1
[[allow]]
name = "alice-veths"
users = ["alice"]
interfaces = ["veth*"]
queues = ["0-7"]
kinds = ["bound", "bare"]
max_queues = 4
raise_memlock = "64MiB"
[[allow]]
name = "alice-map"
users = ["alice"]
interfaces = ["vmap*"]
kinds = ["map"]
exclusive = true
[[deny]]
name = "never-mgmt"
users = ["*"]
interfaces = ["veth9"]
[admin]
users = ["root"]
revoke_signal = "SIGTERM"
"""
SMALL = proto.Geometry(umem_size=1 << 20, fill=64, completion=64, rx=64, tx=64)
ALICE = PeerInfo(pid=4242, uid=1000, gid=1000, gids=frozenset({1000}), user="alice", start=77)
BOB = PeerInfo(pid=5353, uid=1001, gid=1001, gids=frozenset({1001}), user="bob", start=88)
ROOT = PeerInfo(pid=1, uid=0, gid=0, gids=frozenset({0}), user="root", start=1)


# ---- the fake kernel --------------------------------------------------------------------------------------

@dataclass
class FakeProgram:
    kernel: FakeKernel
    ifindex: int
    prog_id: int
    map_fd: int
    mode: str
    max_entries: int
    attached_now: bool
    per_queue: bool = False
    outer_fd: int = -1

    def close(self) -> None:
        for fd in (self.map_fd, self.outer_fd):
            if fd >= 0:
                self.kernel.close(fd)
        self.map_fd = self.outer_fd = -1


@dataclass
class FakePrepared:
    kernel: FakeKernel
    sock: int
    ifindex: int
    queue: int
    map_fd: int
    umem_fd: int = -1

    def add_umem(self, g: proto.Geometry, memfd: Callable[[int], int] | None = None,
                 apart: Callable[[int | None], None] | None = None) -> None:
        self.kernel.step("umem", self.queue)
        self.umem_fd = self.kernel.new_fd("umem")

    def try_bind(self) -> bool:
        self.kernel.step("bind", self.queue)
        if self.queue in self.kernel.stuck:
            return False
        if self.kernel.busy.get(self.queue, 0) > 0:
            self.kernel.busy[self.queue] -= 1
            return False
        self.kernel.bound_to[self.sock] = self.queue
        return True

    def finish(self) -> BoundSocket:
        self.kernel.handed.update((self.sock, self.umem_fd))
        return BoundSocket(self.sock, self.umem_fd, self.queue, 0, False)

    def abort(self, empty_slot: bool = True, close: Callable[[list[int]], None] | None = None) -> None:
        if empty_slot:
            self.kernel.map_delete(self.map_fd, self.queue)
        if self.umem_fd >= 0:
            self.kernel.close(self.umem_fd)
        self.kernel.close(self.sock)


@dataclass
class FakeReady:
    kernel: FakeKernel
    sock: int
    umem_fd: int

    def close(self) -> None:
        self.kernel.close(self.umem_fd)
        self.kernel.close(self.sock)


class FakeProbe:
    def __init__(self, kernel: FakeKernel, map_fd: int) -> None:
        self.kernel, self.map = kernel, kernel.maps[map_fd]

    def queue_of(self, slot: int) -> int | None:
        sock = self.kernel.slots.get((self.map, slot))
        return None if sock is None else self.kernel.bound_to.get(sock, 0)

    def close(self) -> None:
        pass


class FakeKernel:
    """What the broker's Kernel sees. `open` is every fd the broker holds (a test checks it is back to the
    cached programs' map fds after a failure); `handed` the fds that went out in replies."""

    def __init__(self) -> None:
        self.ifaces: dict[str, tuple[int, int]] = {"veth0": (7, 4), "veth1": (8, 2), "vmap0": (9, 2)}
        self.altnames = {"veth0alt": "veth0"}
        self.foreign: set[int] = set()  # ifindexes with someone else's XDP program
        self._fds = itertools.count(100)
        self._ids = itertools.count(500)
        self.open: dict[int, str] = {}  # fd -> what it is
        self.handed: set[int] = set()
        self.maps: dict[int, int] = {}  # map fd -> map id
        self.slots: dict[tuple[int, int], int] = {}  # (map id, slot) -> socket fd
        self.attached_progs: dict[int, tuple[int, int, int]] = {}  # ifindex -> (prog id, map id, entries)
        self.outer = {}
        self.bound_to: dict[int, int] = {}  # socket -> queue it is bound to
        self.busy: dict[int, int] = {}  # queue -> EBUSY answers before the bind succeeds
        self.stuck: set[int] = set()  # queues that never stop answering EBUSY
        self.bound_elsewhere: set[int] = set()  # queues a socket the broker did not make is bound to
        self.fail: dict[tuple[str, int], OSError] = {}  # (step, queue) -> the error that step raises
        self.procs: dict[int, tuple[int, int, int | None]] = {ALICE.pid: (1000, 77, None), BOB.pid: (1001, 88, None)}
        self.memlocks: dict[int, tuple[int, int]] = {}
        self.may_prlimit = True
        self.bare_reason: str | None = None
        self.detached: list[tuple[int, int]] = []
        self.log: list[str] = []

    # bookkeeping
    def new_fd(self, what: str) -> int:
        fd = next(self._fds)
        self.open[fd] = what
        return fd

    def step(self, name: str, queue: int) -> None:
        self.log.append(f"{name} {queue}")
        err = self.fail.get((name, queue))
        if err is not None:
            raise err

    def left(self) -> dict[int, str]:
        """The fds the broker still holds besides its cached programs' maps and the ones it handed out."""
        return {fd: what for fd, what in self.open.items() if what != "map" and fd not in self.handed}

    def holder_closes(self, fds: Iterable[int]) -> None:
        """The holder closes the sockets it was handed: the kernel empties their slots."""
        for fd in fds:
            self.handed.discard(fd)
            self.open.pop(fd, None)
            for key in [k for k, v in self.slots.items() if v == fd]:
                del self.slots[key]

    def _map_of(self, ifindex: int) -> int:
        return self.attached_progs[ifindex][1]

    def slot_taken(self, ifindex: int, queue: int) -> bool:
        return (self._map_of(ifindex), queue) in self.slots if ifindex in self.attached_progs else False

    # the Kernel interface
    def resolve(self, name: str) -> int:
        if name in self.altnames:
            raise NotCanonical(name, self.altnames[name], self.ifaces[self.altnames[name]][0])
        if name not in self.ifaces:
            raise NoSuchInterface(f"no interface named {name!r}")
        return self.ifaces[name][0]

    def ifname(self, ifindex: int) -> str:
        for name, (index, _) in self.ifaces.items():
            if index == ifindex:
                return name
        raise NoSuchInterface(f"no interface with index {ifindex}")

    def queue_count(self, name: str) -> int:
        return self.ifaces[name][1]

    def attached(self, ifindex: int) -> int:
        return self.attached_progs[ifindex][0] if ifindex in self.attached_progs else 0

    # the per-queue program: outer[ifindex] maps queue -> the id of the map at that slot
    outer: dict[int, dict[int, int]]

    def _per_queue(self, ifindex: int) -> FakeProgram:
        prog_id, map_id, entries = self.attached_progs[ifindex]
        fd, ofd = self.new_fd("map"), self.new_fd("map")
        self.maps[fd] = map_id
        self.maps[ofd] = -ifindex  # the outer map: names its interface
        return FakeProgram(self, ifindex, prog_id, fd, "skb", entries, False, True, ofd)

    def attach_queues(self, ifindex: int, ifname: str, queues: int, mode: str, replace: bool) -> FakeProgram:
        if replace:
            self.detached.append((ifindex, self.attached_progs.pop(ifindex)[1]))
        self.attached_progs[ifindex] = (next(self._ids), next(self._ids), queues)
        self.outer[ifindex] = dict.fromkeys(range(queues), self.attached_progs[ifindex][1])
        self.log.append(f"attach-queues {ifname}")
        return self._per_queue(ifindex)

    def queue_program(self, ifindex: int) -> FakeProgram | None:
        return self._per_queue(ifindex) if ifindex in self.outer and ifindex in self.attached_progs else None

    def forget_queues(self, ifindex: int) -> None:
        self.outer.pop(ifindex, None)

    def tenant_map(self, entries: int) -> int:
        fd = self.new_fd("map")
        self.maps[fd] = next(self._ids)
        return fd

    def place(self, outer_fd: int, queue: int, map_fd: int) -> None:
        self.outer[-self.maps[outer_fd]][queue] = self.maps[map_fd]

    def inner_id(self, outer_fd: int, queue: int) -> int | None:
        return self.outer[-self.maps[outer_fd]].get(queue)

    def map_fd(self, map_id: int) -> int:
        fd = self.new_fd("map")
        self.maps[fd] = map_id
        return fd

    def pin(self, root: str, uid: int, gid: int, ifname: str, map_fd: int) -> str:
        return f"{root}/{uid}/{ifname}/xsks_map"

    def unpin(self, root: str, uid: int, ifname: str) -> bool:
        return True

    def find_or_attach(self, ifindex: int, ifname: str, queues: int, mode: str) -> FakeProgram:
        if ifindex in self.outer:
            return self._per_queue(ifindex)
        if ifindex in self.foreign:
            raise ForeignProgram(errno.EEXIST, f"{ifname} has another XDP program")
        now = ifindex not in self.attached_progs
        if now:
            self.attached_progs[ifindex] = (next(self._ids), next(self._ids), queues)
            self.log.append(f"attach {ifname}")
        prog_id, map_id, entries = self.attached_progs[ifindex]
        fd = self.new_fd("map")
        self.maps[fd] = map_id
        return FakeProgram(self, ifindex, prog_id, fd, "skb", entries, now)

    def detach(self, ifindex: int, map_id: int) -> int:
        prog = self.attached_progs.get(ifindex)
        if prog is None or (map_id and prog[1] != map_id):
            return 0
        del self.attached_progs[ifindex]
        self.detached.append((ifindex, prog[1]))
        return prog[0]

    def map_id(self, map_fd: int) -> int:
        return self.maps[map_fd]

    def map_delete(self, map_fd: int, key: int) -> bool:
        return self.slots.pop((self.maps[map_fd], key), None) is not None

    def occupied_slots(self, map_fd: int, slots: int | Iterable[int]) -> list[int]:
        wanted = range(slots) if isinstance(slots, int) else slots
        return [q for q in wanted if (self.maps[map_fd], q) in self.slots]

    def dup(self, fd: int) -> int:
        new = self.new_fd(self.open[fd])
        if fd in self.maps:
            self.maps[new] = self.maps[fd]
        return new

    def close(self, fd: int) -> None:
        if fd not in self.open:
            raise OSError(errno.EBADF, f"fd {fd} closed twice")
        del self.open[fd]
        for key in [k for k, v in self.slots.items() if v == fd]:  # a closed socket leaves its slot
            del self.slots[key]

    def _claim_slot(self, map_fd: int, queue: int, sock: int) -> None:
        key = (self.maps[map_fd], queue)
        if key in self.slots:
            self.close(sock)
            raise QueueBusy(errno.EBUSY, f"queue {queue} is held by another socket")
        self.slots[key] = sock

    def claim(self, ifindex: int, queue: int, map_fd: int, bind_mode: str, need_wakeup: bool) -> FakePrepared:
        sock = self.new_fd("xsk")
        try:
            self.step("claim", queue)
        except OSError:
            self.close(sock)
            raise
        self._claim_slot(map_fd, queue, sock)
        return FakePrepared(self, sock, ifindex, queue, map_fd)

    def stop(self) -> None:
        pass

    def make_ready(self, g: proto.Geometry) -> FakeReady:
        return FakeReady(self, self.new_fd("xsk"), self.new_fd("umem"))

    def claim_ready(self, ready: Any, ifindex: int, queue: int, map_fd: int, bind_mode: str,
                    need_wakeup: bool) -> FakePrepared:
        try:
            self.step("claim", queue)
        except OSError:
            ready.close()
            raise
        self._claim_slot(map_fd, queue, ready.sock)
        return FakePrepared(self, ready.sock, ifindex, queue, map_fd, ready.umem_fd)

    def create_bare(self, ifname: str, queue: int, map_fd: int) -> int:
        sock = self.new_fd("xsk")
        try:
            self.step("bare", queue)
        except OSError:
            self.close(sock)
            raise
        self._claim_slot(map_fd, queue, sock)
        self.handed.add(sock)
        return sock

    def bare_supported(self) -> str | None:
        return self.bare_reason

    def bound_queues(self, ifindex: int) -> set[int]:
        return set(self.bound_elsewhere)

    def slot_probe(self, map_fd: int) -> FakeProbe:
        return FakeProbe(self, map_fd)

    def holder(self, pid: int) -> tuple[int, int, int | None] | None:
        return self.procs.get(pid)

    def holder_alive(self, pid: int, start: int | None, ino: int | None) -> bool:
        proc = self.procs.get(pid)
        return proc is not None and start is not None and proc[1] == start

    def memlock(self, pid: int) -> tuple[int, int]:
        if pid not in self.memlocks:
            raise OSError(errno.ENOENT, f"no process {pid}")
        return self.memlocks[pid]

    def set_memlock(self, pid: int, limits: tuple[int, int]) -> None:
        if not self.may_prlimit:
            raise OSError(errno.EPERM, "Operation not permitted")
        self.memlocks[pid] = limits


# ---- the service under test ---------------------------------------------------------------------------------

@dataclass
class Rig:
    kernel: FakeKernel
    service: Service
    records: list[dict[str, Any]]
    now: list[float]
    signals: list[tuple[str, str]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == name]

    def ask(self, peer: PeerInfo, req: proto.Request) -> Outcome | Deferred:
        return self.service.handle(peer, proto.encode_request(req))

    def reply(self, peer: PeerInfo, req: proto.Request) -> tuple[dict[str, Any], Outcome]:
        out = self.ask(peer, req)
        for _ in range(50):  # bound grants bind on a worker: stepped as the server would
            if isinstance(out, Outcome):
                break
            deadline = time.monotonic() + 5
            while out.parked() and time.monotonic() < deadline:
                time.sleep(0.001)
            self.service.workers.drain()
            done = out.step()
            if done is not None:
                out = done
        assert isinstance(out, Outcome), out
        return json.loads(out.reply.encode()), out

    def grant(self, peer: PeerInfo = ALICE, interface: str = "veth0", queues: tuple[int, ...] = (0,),
              **kw: Any) -> tuple[dict[str, Any], Outcome]:
        kw.setdefault("geometry", SMALL)
        return self.reply(peer, proto.Grant(interface, queues, **kw))


def make_rig(tmp_path: Path | None = None, policy: Policy | None = None, kernel: FakeKernel | None = None,
             signal: Callable[[Lease, str], str | None] | None = None,
             fault: Callable[[str], None] = faults.none) -> Rig:
    records: list[dict[str, Any]] = []
    now = [1000.0]
    k = kernel or FakeKernel()
    sent: list[tuple[str, str]] = []

    def signal_holder(lease: Lease, signame: str) -> str | None:
        sent.append((lease.id, signame))
        return None

    state = str(tmp_path / "leases.jsonl") if tmp_path else None
    svc = Service(policy or parse_policy(POLICY), records.append, state_file=state, clock=lambda: now[0],
                  kernel=k, signal_holder=signal or signal_holder, link_events=True, fault=fault)
    return Rig(k, svc, records, now, sent)


@pytest.fixture
def rig(tmp_path: Path) -> Iterable[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.service.close()


def finish(rig: Rig, out: Outcome | Deferred, steps: int = 50) -> dict[str, Any]:
    """Step a deferred grant as the server would (the fake clock advances 1 ms a step) until it answers."""
    for _ in range(steps):
        if isinstance(out, Outcome):
            return dict(json.loads(out.reply.encode()))
        deadline = time.monotonic() + 5
        while out.parked() and time.monotonic() < deadline:  # a worker thread does the kernel work
            time.sleep(0.001)
        rig.service.workers.drain()
        rig.now[0] += 0.001
        done = out.step()
        if done is not None:
            out = done
    raise AssertionError("the grant never finished")


# ---- bound grants ---------------------------------------------------------------------------------------------

def test_a_bound_grant_claims_binds_records_and_hands_out_the_fds(rig: Rig) -> None:
    reply, out = rig.grant(queues=(0, 1))
    assert reply["ok"] and reply["kind"] == "bound" and reply["interface"] == "veth0" and reply["ifindex"] == 7
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.queues == (0, 1) and lease.pid == ALICE.pid and lease.pid_start == 77
    assert [s["queue"] for s in reply["sockets"]] == [0, 1]
    assert len(out.fds) == 4 and set(out.fds) == rig.kernel.handed  # socket + UMEM memfd per queue
    assert out.lease_id == lease.id and out.holder_pid == ALICE.pid
    assert rig.kernel.slot_taken(7, 0) and rig.kernel.slot_taken(7, 1)
    assert rig.kernel.log == ["attach veth0", "claim 0", "claim 1", "umem 0", "umem 1", "bind 0", "bind 1"]
    assert rig.kernel.left() == {}
    [record] = rig.events("grant")
    assert record["decision"] == "allow" and record["rule"] == "alice-veths" and record["lease"] == lease.id
    assert rig.events("xdp-attach")[0]["interface"] == "veth0"


def test_a_second_grant_reuses_the_cached_program(rig: Rig) -> None:
    rig.grant(queues=(0,))
    rig.grant(queues=(1,))
    assert rig.kernel.log.count("attach veth0") == 1 and len(rig.service.programs) == 1
    assert len(rig.events("xdp-attach")) == 1


def test_a_queue_held_by_a_live_socket_is_refused_at_once_and_leaves_nothing(rig: Rig) -> None:
    rig.grant(queues=(1,))
    reply, _ = rig.grant(peer=ALICE, queues=(0, 1))
    assert not reply["ok"] and reply["error"]["code"] == "queue-busy"
    assert rig.kernel.left() == {} and not rig.kernel.slot_taken(7, 0)
    assert len(rig.service.leases) == 1


def test_a_deferred_grant_waits_out_ebusy_and_then_binds(rig: Rig) -> None:
    rig.kernel.busy[0] = 3  # a just-closed socket's queue, released a little later
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    assert isinstance(out, Deferred)
    assert [h.queues for h in rig.service.pending.values()] == [1]  # counted against quotas meanwhile
    assert not rig.events("grant")  # decided when the wait ends
    reply = finish(rig, out)
    assert reply["ok"] and rig.service.leases.get(reply["lease"]) is not None
    assert rig.service.pending == {} and rig.kernel.left() == {}
    assert rig.events("grant")[0]["decision"] == "allow"


def test_a_deferred_grant_times_out_and_undoes_everything(rig: Rig) -> None:
    rig.kernel.stuck.add(0)
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    assert isinstance(out, Deferred)
    assert out.step() is None
    rig.now[0] += BUSY_RETRY_SECONDS + 0.1
    reply = finish(rig, out)
    assert not reply["ok"] and reply["error"]["code"] == "kernel-error" and reply["error"]["errno"] == "EBUSY"
    assert rig.kernel.left() == {} and not rig.kernel.slot_taken(7, 0)
    assert rig.service.pending == {} and len(rig.service.leases) == 0
    assert rig.events("grant")[0]["decision"] == "deny"


def test_a_queue_bound_by_a_stranger_is_named_squatted_when_the_wait_ends(rig: Rig) -> None:
    rig.kernel.stuck.add(0)
    rig.kernel.bound_elsewhere.add(0)
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    rig.now[0] += BUSY_RETRY_SECONDS + 0.1
    reply = finish(rig, out)
    assert reply["error"]["code"] == "queue-squatted" and "did not make" in reply["error"]["message"]
    assert rig.kernel.left() == {}


def test_a_cancelled_wait_undoes_what_was_made(rig: Rig) -> None:
    rig.kernel.stuck.add(0)
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    assert isinstance(out, Deferred)
    out.cancel()
    assert rig.service.pending == {}
    deadline = time.monotonic() + 5  # a worker binding meanwhile undoes it when it is done
    while rig.kernel.left() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rig.kernel.left() == {} and not rig.kernel.slot_taken(7, 0)


def test_a_large_grant_is_made_on_a_worker_and_completed_by_the_loop(rig: Rig) -> None:
    big = proto.Geometry(umem_size=8 << 20, fill=64, completion=64, rx=64, tx=64)
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=big))
    assert isinstance(out, Deferred) and rig.service.jobs[ALICE.uid] == 1
    reply = finish(rig, out)
    assert reply["ok"] and rig.service.jobs.total() == 0 and rig.kernel.left() == {}


@pytest.mark.parametrize("step", ["claim", "umem", "bind"])
def test_a_failure_on_the_second_queue_undoes_the_first(rig: Rig, step: str) -> None:
    rig.kernel.fail[(step, 1)] = OSError(errno.ENOMEM, "Cannot allocate memory")
    reply, out = rig.grant(queues=(0, 1))
    assert not reply["ok"] and reply["error"]["code"] == "kernel-error" and reply["error"]["errno"] == "ENOMEM"
    assert "queue 1" in reply["error"]["message"] and out.fds == []
    assert rig.kernel.left() == {} and rig.kernel.handed == set()
    assert not rig.kernel.slot_taken(7, 0) and not rig.kernel.slot_taken(7, 1)
    assert len(rig.service.leases) == 0


def test_the_lease_is_saved_before_the_fault_point_and_the_fds_leave(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []
    holder: list[Rig] = []

    def fault(name: str) -> None:
        seen.append((name, len(holder[0].service.leases)))

    r = make_rig(tmp_path, fault=fault)
    holder.append(r)
    r.grant()
    assert seen == [("after-lease-saved", 1)]
    assert '"lease"' in (tmp_path / "leases.jsonl").read_text().splitlines()[-1]
    r.service.close()


# ---- bare and map grants ------------------------------------------------------------------------------------

def test_a_bare_grant_places_unbound_sockets_and_raises_memlock_within_the_rule(rig: Rig) -> None:
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    reply, out = rig.grant(queues=(0, 1), kind="bare", memlock=32 << 20)
    assert reply["ok"] and reply["memlock"]["raised"] and len(out.fds) == 2
    assert rig.kernel.memlocks[ALICE.pid] == (32 << 20, 32 << 20)
    assert rig.kernel.slot_taken(7, 0) and rig.kernel.slot_taken(7, 1)
    rig.reply(ALICE, proto.Release(reply["lease"]))
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)  # restored with the last lease that needed it
    assert [r["event"] for r in rig.records if r["event"].startswith("memlock")] == ["memlock-raised",
                                                                                     "memlock-restored"]


def test_a_bare_holder_that_closes_its_sockets_then_releases_finds_its_lease(rig: Rig) -> None:
    """The client library closes the sockets, then releases: an orphan poll in between must not end the lease
    (it did: the release got unknown-lease). Slots empty at two polls in a row end it."""
    reply, out = rig.grant(kind="bare")
    rig.kernel.holder_closes(out.fds)
    rig.service.check_orphans()  # the poll lands between the close and the release
    ended, _ = rig.reply(ALICE, proto.Release(reply["lease"]))
    assert ended["ok"], ended
    again, out = rig.grant(kind="bare")  # a holder that closes and never releases: ended at the next poll
    rig.kernel.holder_closes(out.fds)
    rig.service.check_orphans()
    assert rig.service.leases.get(again["lease"]) is not None
    rig.service.check_orphans()
    assert rig.service.leases.get(again["lease"]) is None
    assert rig.events("lease-ended")[-1]["reason"] == "its sockets were closed while its holder lives"


def test_a_bare_grant_says_why_memlock_was_not_raised(rig: Rig) -> None:
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    rig.kernel.may_prlimit = False
    reply, _ = rig.grant(kind="bare", memlock=32 << 20)
    assert reply["ok"] and not reply["memlock"]["ok"] and "CAP_SYS_RESOURCE" in reply["memlock"]["reason"]
    reply, _ = rig.grant(queues=(1,), kind="bare", memlock=128 << 20)
    assert "allows raises up to" in reply["memlock"]["reason"]


def test_a_bare_failure_on_the_second_queue_closes_the_first(rig: Rig) -> None:
    rig.kernel.fail[("bare", 1)] = OSError(errno.EPERM, "Operation not permitted")
    reply, _ = rig.grant(queues=(0, 1), kind="bare")
    assert reply["error"]["code"] == "kernel-error"
    assert {fd for fd, what in rig.kernel.open.items() if what == "xsk"} == set()
    assert not rig.kernel.slot_taken(7, 0) and len(rig.service.leases) == 0


def test_a_bare_grant_whose_holder_breaks_the_memlock_check_leaves_nothing(rig: Rig) -> None:
    """The memlock check reads /proc of a holder that may be dying: whatever it raises, the sockets already
    in the map are taken out and closed (else the broker itself holds the queue: queue-busy for good)."""
    def broken(pid: int) -> tuple[int, int]:
        raise ValueError("garbled /proc/<pid>/limits of a dying process")

    rig.kernel.memlock = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError):
        rig.grant(queues=(0, 1), kind="bare", memlock=32 << 20)
    assert {fd for fd, what in rig.kernel.open.items() if what == "xsk"} == set()
    assert not rig.kernel.slot_taken(7, 0) and not rig.kernel.slot_taken(7, 1) and len(rig.service.leases) == 0
    del rig.kernel.memlock
    reply, _ = rig.grant(queues=(0, 1), kind="bare")
    assert reply["ok"]


def test_bare_grants_where_the_kernel_cannot_confine_them(rig: Rig) -> None:
    rig.kernel.bare_reason = "bare grants need Linux 6.5 or later"
    reply, _ = rig.grant(kind="bare")
    assert reply["error"]["code"] == "unsupported-kind" and rig.kernel.log == []


def test_a_map_grant_places_a_tenant_map_and_its_end_gives_the_slots_back(rig: Rig) -> None:
    reply, out = rig.grant(interface="vmap0", queues=(), kind="map")
    assert reply["ok"] and len(out.fds) == 1 and rig.kernel.open[out.fds[0]] == "map"
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.queues == (0, 1) and lease.map_id
    assert rig.kernel.outer[9] == {0: lease.map_id, 1: lease.map_id}
    again, _ = rig.grant(interface="vmap0", queues=(0,))
    assert again["error"]["code"] in ("queue-busy", "kind-not-allowed", "interface-not-allowed")
    rig.reply(ALICE, proto.Release(lease.id))
    shared = rig.kernel.attached_progs[9][1]
    assert rig.kernel.outer[9] == {0: shared, 1: shared} and rig.kernel.detached == []
    assert rig.events("map-unplaced")[0]["queues"] == [0, 1]


def test_a_map_grant_needs_the_interface_unused(rig: Rig) -> None:
    policy = parse_policy(POLICY.replace('interfaces = ["vmap*"]', 'interfaces = ["vmap*", "veth1"]'))
    r = make_rig(policy=policy)
    r.grant(interface="veth1", queues=(0,))
    reply, _ = r.grant(interface="veth1", queues=(), kind="map")
    assert reply["error"]["code"] == "interface-busy" and r.kernel.left() == {}
    assert "libxdp" in reply["error"]["message"] and r.kernel.detached == []
    r.service.close()


# ---- denials: nothing reaches the kernel ------------------------------------------------------------------------

@pytest.mark.parametrize(("peer", "interface", "queues", "code"), [
    (BOB, "veth0", (0,), "user-not-allowed"),
    (ALICE, "veth9", (0,), "denied-by-rule"),
    (ALICE, "veth7", (0,), "no-such-interface"),
    (ALICE, "veth0", (5,), "no-such-queue"),
    (ALICE, "veth0alt", (0,), "not-canonical-name"),
])
def test_denials(rig: Rig, peer: PeerInfo, interface: str, queues: tuple[int, ...], code: str) -> None:
    rig.kernel.ifaces["veth9"] = (10, 1)
    reply, out = rig.grant(peer=peer, interface=interface, queues=queues)
    assert not reply["ok"] and reply["error"]["code"] == code, reply
    assert out.fds == [] and rig.kernel.open == {} and rig.kernel.attached_progs == {}
    assert rig.events("grant")[0]["decision"] == "deny"
    if code == "not-canonical-name":
        assert reply["error"]["canonical"] == "veth0"


def test_a_foreign_xdp_program_is_never_clobbered(rig: Rig) -> None:
    rig.kernel.foreign.add(7)
    reply, _ = rig.grant()
    assert reply["error"]["code"] == "xdp-foreign-program" and rig.kernel.open == {}


def test_a_holder_of_another_user_is_refused(rig: Rig) -> None:
    reply, _ = rig.grant(holder_pid=BOB.pid)
    assert reply["error"]["code"] == "bad-holder" and "uid 1001" in reply["error"]["message"]
    reply, _ = rig.grant(holder_pid=999999)
    assert reply["error"]["code"] == "bad-holder" and "not a running process" in reply["error"]["message"]
    assert rig.kernel.open == {}


def test_an_own_holder_gets_the_lease(rig: Rig) -> None:
    rig.kernel.procs[6000] = (ALICE.uid, 99, 12)
    reply, out = rig.grant(holder_pid=6000)
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and (lease.pid, lease.pid_start, lease.pid_ino) == (6000, 99, 12)
    assert out.holder_pid == 6000


# ---- quotas ------------------------------------------------------------------------------------------------

QUOTA = POLICY + """
[[quota]]
name = "per-user"
users = ["*"]
max_queues = 2
max_umem = "3MiB"
"""


def test_the_queue_quota_counts_leases() -> None:
    r = make_rig(policy=parse_policy(QUOTA))
    assert r.grant(queues=(0,))[0]["ok"]
    reply, _ = r.grant(queues=(1, 2))
    assert not reply["ok"] and "queue" in reply["error"]["message"] and r.kernel.left() == {}
    assert r.events("grant")[-1]["quota"]
    r.service.close()


def test_the_umem_quota_counts_pinned_bytes() -> None:
    r = make_rig(policy=parse_policy(QUOTA))
    big = proto.Geometry(umem_size=4 << 20, fill=64, completion=64, rx=64, tx=64)
    reply, _ = r.grant(geometry=big)
    assert not reply["ok"] and r.kernel.log == []
    r.service.close()


def test_a_grant_in_flight_counts_against_the_quota() -> None:
    r = make_rig(policy=parse_policy(QUOTA))
    r.kernel.stuck.add(0)
    waiting = r.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    assert isinstance(waiting, Deferred)
    reply, _ = r.grant(queues=(1, 2))
    assert not reply["ok"] and reply["error"]["code"] == r.events("grant")[-1]["code"]
    waiting.cancel()
    assert r.grant(queues=(1, 2))[0]["ok"]
    r.service.close()


# ---- release, revoke, exits -------------------------------------------------------------------------------------

def test_release_empties_the_slots_and_only_the_owner_or_an_admin_may(rig: Rig) -> None:
    reply, _ = rig.grant(queues=(0, 1))
    lease = reply["lease"]
    denied, _ = rig.reply(BOB, proto.Release(lease))
    assert denied["error"]["code"] == "unknown-lease" and rig.service.leases.get(lease) is not None
    done, _ = rig.reply(ALICE, proto.Release(lease))
    assert done["ok"] and rig.service.leases.get(lease) is None
    assert not rig.kernel.slot_taken(7, 0) and not rig.kernel.slot_taken(7, 1)
    assert rig.events("release")[0]["lease"] == lease


def test_release_if_closed_ends_a_bare_lease_only_once_its_sockets_are_closed(rig: Rig) -> None:
    """qmp-detach's release: it cannot tell which of QEMU's leases its netdev_del closed, so the broker
    refuses to end one whose sockets are still in their slots (still in use)."""
    reply, out = rig.grant(queues=(0, 1), kind="bare")
    lease = reply["lease"]
    busy, _ = rig.reply(ALICE, proto.Release(lease, if_closed=True))
    assert busy["error"]["code"] == "lease-in-use" and rig.service.leases.get(lease) is not None
    assert rig.kernel.slot_taken(7, 0) and rig.events("release") == []
    rig.kernel.holder_closes(out.fds)
    done, _ = rig.reply(ALICE, proto.Release(lease, if_closed=True))
    assert done["ok"] and rig.service.leases.get(lease) is None and rig.events("release")[0]["lease"] == lease


def test_revoke_is_for_admins_and_empties_the_slots(rig: Rig) -> None:
    reply, _ = rig.grant(queues=(0, 1))
    denied, _ = rig.reply(ALICE, proto.Revoke(lease=reply["lease"]))
    assert denied["error"]["code"] == "not-admin"
    done, _ = rig.reply(ROOT, proto.Revoke(interface="veth0", queue=1, signal=True))
    [revoked] = done["revoked"]
    assert revoked["emptied_queues"] == [0, 1] and revoked["signalled"]
    assert rig.signals == [(reply["lease"], "SIGTERM")]
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.revoked  # it ends when the holder closes the sockets


def test_revoke_does_not_signal_a_holder_it_cannot_name(rig: Rig) -> None:
    reply, _ = rig.grant()
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None
    lease.pid_start = None
    done, _ = rig.reply(ROOT, proto.Revoke(lease=lease.id, signal=True))
    assert not done["revoked"][0]["signalled"] and "no start time" in done["revoked"][0]["not_signalled"]
    assert rig.signals == []


def test_revoking_a_map_lease_ends_it_and_signals_its_holder(rig: Rig) -> None:
    # the holder was once signalled by pid where the callback takes the lease: the revoke failed
    reply, _ = rig.grant(interface="vmap0", queues=(), kind="map")
    done, _ = rig.reply(ROOT, proto.Revoke(lease=reply["lease"], signal=True))
    assert done["ok"], done
    [revoked] = done["revoked"]
    assert revoked["ended"] and revoked["signalled"] is True
    assert rig.signals == [(reply["lease"], "SIGTERM")]
    assert rig.service.leases.get(reply["lease"]) is None and rig.events("map-unplaced")


def test_a_signal_the_policy_does_not_set_is_refused(rig: Rig) -> None:
    r = make_rig(policy=parse_policy(POLICY.replace('revoke_signal = "SIGTERM"\n', "")))
    r.grant()
    done, _ = r.reply(ROOT, proto.Revoke(interface="veth0", signal=True))
    assert done["error"]["code"] == "signal-not-allowed"
    r.service.close()


def test_holder_exit_ends_its_leases(rig: Rig) -> None:
    _, out = rig.grant()
    rig.kernel.holder_closes(out.fds)  # its sockets died with it
    rig.service.holder_exited(ALICE.pid)
    assert len(rig.service.leases) == 0
    assert rig.events("lease-ended")[0]["reason"] == "holder exited"


def test_a_holder_that_passed_its_sockets_on_leaves_an_orphan_until_they_close(rig: Rig) -> None:
    reply, out = rig.grant()
    rig.service.holder_exited(ALICE.pid)  # the sockets live on elsewhere: their slot is still taken
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.orphaned and rig.events("lease-orphaned")
    rig.service.check_orphans()
    assert rig.service.leases.get(reply["lease"]) is not None
    rig.kernel.holder_closes(out.fds)
    rig.service.check_orphans()
    assert len(rig.service.leases) == 0 and rig.events("lease-ended")[0]["reason"] == "its sockets were closed"


def test_an_aborted_reply_forgets_the_lease(rig: Rig) -> None:
    reply, _ = rig.grant()
    rig.service.abort(reply["lease"])
    assert len(rig.service.leases) == 0 and rig.events("lease-aborted")


def test_a_bare_socket_bound_to_another_queue_is_revoked(rig: Rig) -> None:
    reply, out = rig.grant(kind="bare")
    rig.kernel.bound_to[out.fds[0]] = 3  # its holder bound it to queue 3, granted queue 0
    rig.service.check_bare()
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.revoked and lease.misbound == 3
    assert rig.events("bare-misbound")[0]["bound_queue"] == 3 and rig.signals == [(lease.id, "SIGTERM")]


# ---- interfaces come and go ------------------------------------------------------------------------------------

def test_a_removed_interface_ends_its_leases_and_drops_its_program(rig: Rig) -> None:
    rig.grant()
    rig.service.link_event(LinkEvent(True, 7, "veth0", None))
    assert len(rig.service.leases) == 0 and rig.service.programs == {}
    assert rig.kernel.left() == {} and "map" not in rig.kernel.open.values()
    assert rig.events("interface-removed")[0]["interface"] == "veth0"


def test_a_renamed_interface_keeps_its_leases_under_the_new_name(rig: Rig) -> None:
    reply, _ = rig.grant()
    rig.service.link_event(LinkEvent(False, 7, "veth5", None))
    lease = rig.service.leases.get(reply["lease"])
    assert lease is not None and lease.ifname == "veth5" and rig.events("interface-renamed")


def test_a_changed_xdp_program_is_dropped_from_the_cache(rig: Rig) -> None:
    rig.grant()
    rig.service.link_event(LinkEvent(False, 7, "veth0", 12345))
    assert rig.service.programs == {} and rig.events("xdp-program-changed")[0]["now"] == 12345


def test_without_link_events_every_grant_asks_the_kernel_which_program_is_attached() -> None:
    r = make_rig()
    r.service.watch_links(False)
    r.grant(queues=(0,))
    r.kernel.attached_progs[7] = (999, 998, 4)  # someone replaced it
    r.grant(queues=(1,))
    assert r.service.programs[7].prog_id == 999
    r.service.close()


# ---- recovery, status, reload --------------------------------------------------------------------------------------

def test_recovery_keeps_held_leases_and_drops_the_rest(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    kept = first.grant(queues=(0,))[0]["lease"]
    _, closed = first.grant(queues=(1,))
    gone_if = first.grant(interface="veth1", queues=(0,))[0]["lease"]
    first.kernel.holder_closes(closed.fds)  # its slot is empty: nothing to take back
    map_lease = first.grant(interface="vmap0", queues=(), kind="map")[0]["lease"]
    kernel = first.kernel
    first.service.leases.close()  # the broker dies: no orderly close, the kernel keeps what the holders hold
    del kernel.ifaces["veth1"]
    kernel.procs.pop(ALICE.pid)  # the map lease's holder is gone too
    kernel.open = {fd: what for fd, what in kernel.open.items() if fd in kernel.handed}  # the old broker's fds

    second = make_rig(tmp_path, kernel=kernel)
    recovered = second.service.recover()
    assert [x.id for x in recovered] == [kept]
    assert recovered[0].orphaned  # the holder exited, its sockets live on: polled until they close
    reasons = {r["lease"]: r["reason"] for r in second.events("lease-dropped")}
    assert set(reasons) == {closed.lease_id, gone_if, map_lease}
    assert "none of its queues" in reasons[str(closed.lease_id)] and "is gone" in reasons[gone_if]
    assert "ends with the broker" in reasons[map_lease]  # its per-queue program went with the old broker
    # compacted: the journal holds exactly the recovered lease
    lines = [json.loads(x) for x in (tmp_path / "leases.jsonl").read_text().splitlines()]
    assert lines[0] == {"version": 1} and [x["lease"]["id"] for x in lines[1:]] == [kept]
    second.service.close()


def test_status_shows_own_leases_and_admins_see_all(rig: Rig) -> None:
    rig.grant()
    mine, _ = rig.reply(ALICE, proto.Status())
    theirs, _ = rig.reply(BOB, proto.Status())
    admin, _ = rig.reply(ROOT, proto.Status())
    assert len(mine["leases"]) == 1 and theirs["leases"] == [] and len(admin["leases"]) == 1
    assert admin["admin"] and not mine["admin"]
    assert mine["interfaces"][0]["interface"] == "veth0" and mine["interfaces"][0]["leases"] == 1


def test_reload_swaps_the_policy_and_audits(rig: Rig) -> None:
    rig.service.reload(parse_policy(POLICY.replace('users = ["alice"]', 'users = ["carol"]')), "/etc/p.toml")
    assert rig.events("policy-reloaded") == [{"event": "policy-reloaded", "path": "/etc/p.toml", "rules": 3}]
    reply, _ = rig.grant()
    assert reply["error"]["code"] == "user-not-allowed"


def test_hello_and_bad_requests(rig: Rig) -> None:
    hello, _ = rig.reply(ALICE, proto.Hello())
    assert hello["ok"] and hello["server"] == "xskbroker"
    out = rig.service.handle(ALICE, b"{not json")
    assert isinstance(out, Outcome) and not json.loads(out.reply.encode())["ok"] and rig.events("bad-request")


def test_close_releases_every_cached_program(rig: Rig) -> None:
    rig.grant()
    rig.grant(interface="veth1")
    assert list(rig.kernel.open.values()).count("map") == 2
    rig.service.close()
    assert rig.kernel.left() == {} and "map" not in rig.kernel.open.values()


# ---- the fault hook -----------------------------------------------------------------------------------------

def test_the_fault_hook_from_a_spec() -> None:
    assert faults.from_spec("") is faults.none
    hook = faults.from_spec("after-bind:pause")
    start = time.monotonic()
    hook("after-socket")  # another point: no pause, no kill
    assert time.monotonic() - start < 0.5
    pid = os.fork()
    if pid == 0:  # the child kills itself at the armed point
        faults.from_spec("after-bind")("after-bind")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_the_kernel_layer_never_reads_the_fault_variable() -> None:
    from xskbroker.broker import kernel, umem_pool, xsk

    for module in (xsk, umem_pool, kernel, faults):
        source = Path(str(module.__file__)).read_text()
        assert "os.environ" not in source and "getenv" not in source, module.__name__


# ---- the holders' pidfds (what the daemon passes the service as signal_holder) ------------------------------------

def test_holders_signal_only_the_process_the_lease_recorded() -> None:
    import subprocess

    from xskbroker.broker.holders import Holders
    from xskbroker.common.procfs import process_start

    child = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start(child.pid)
        lease = Lease("a" * 16, os.getuid(), child.pid, 7, "veth0", (0,), "bound", 0, pid_start=start)
        holders = Holders()
        wrong = Lease("b" * 16, os.getuid(), child.pid, 7, "veth0", (0,), "bound", 0, pid_start=(start or 0) + 1)
        assert "another process" in str(holders.signal(wrong, "SIGTERM"))
        unnamed = Lease("c" * 16, os.getuid(), child.pid, 7, "veth0", (0,), "bound", 0)
        assert "no start time" in str(holders.signal(unnamed, "SIGTERM"))
        assert child.poll() is None
        assert holders.signal(lease, "SIGTERM") is None
        assert child.wait(5) == -signal.SIGTERM
        assert "has exited" in str(holders.signal(lease, "SIGTERM"))
    finally:
        child.kill()
        child.wait()


def test_a_bare_grant_waiting_for_the_brokers_own_closes_counts_against_the_quota() -> None:
    """A bare grant that finds a slot still held by a socket the broker is closing waits on the timer; its
    queues count against the quota meanwhile, so a second grant of the same user cannot slip past it."""
    r = make_rig(policy=parse_policy(QUOTA))
    first, _ = r.grant(queues=(0,), kind="bare")
    r.service.leases.remove(first["lease"])  # its socket is still in slot 0, closing on the broker's closer
    r.service.closes_pending = lambda: True
    waiting = r.ask(ALICE, proto.Grant("veth0", (0, 1), kind="bare"))
    assert isinstance(waiting, Deferred) and waiting.step() is None
    over, _ = r.grant(interface="veth1", queues=(0,), kind="bare")  # 2 waiting + 1 > max_queues = 2
    assert not over["ok"] and over["error"]["code"] == r.events("grant")[-1]["code"], over
    r.kernel.slots.pop((r.kernel.maps[r.service.programs[7].map_fd], 0))  # the broker's close is done
    done = waiting.step()
    assert isinstance(done, Outcome) and json.loads(done.reply.encode())["ok"]
    assert r.service.pending == {}
    r.service.close()
