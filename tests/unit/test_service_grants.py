"""The service's grants against a fake Kernel (service_rig.py), without root: bound grants (waiting out
EBUSY, made on a worker, undone on a failure), bare and map grants, denials that reach nothing in the kernel,
and quotas. Grants that really reach the kernel are tested in tests/integration; here it is the wiring: which
kernel calls a grant makes, in which order, what it undoes, what it audits and what it answers.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from xskbroker.broker import peer as peers
from xskbroker.broker.kernel import BUSY_RETRY_SECONDS
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.service import Deferred, Outcome
from xskbroker.common import procfs
from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, BOB, POLICY, SMALL, Rig, finish, make_rig, opcodes

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
    assert [h.queues for h in rig.service.pending] == [1]  # counted against quotas meanwhile
    assert not rig.events("grant")  # decided when the wait ends
    reply = finish(rig, out)
    assert reply["ok"] and rig.service.leases.get(reply["lease"]) is not None
    assert len(rig.service.pending) == 0 and rig.kernel.left() == {}
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
    assert len(rig.service.pending) == 0 and len(rig.service.leases) == 0
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
    assert len(rig.service.pending) == 0
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
    rig.kernel.holder_closes(out.fds)
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


@pytest.mark.parametrize("exited", [True, False])
@pytest.mark.parametrize("kind", ["bound", "map"])
def test_a_map_lease_whose_holder_has_exited_does_not_refuse_the_next_grant(tmp_path: Path, exited: bool,
                                                                            kind: str) -> None:
    """A map lease ends when its holder exits, which the loop learns from the holder's pidfd. A grant that
    meets the lease first asks the loop (exit_sync) for an exit the kernel already reported: if the holder is
    gone the lease ends now and the grant goes on; if it lives, the queue is busy."""
    policy = parse_policy(POLICY.replace('kinds = ["map"]', 'kinds = ["map", "bound"]'))
    r = make_rig(tmp_path, policy=policy)
    try:
        reply, _ = r.grant(interface="vmap0", queues=(), kind="map")
        assert reply["ok"]
        asked: list[int] = []

        def exit_sync(pid: int) -> bool:
            asked.append(pid)
            if exited:
                r.service.holder_exited(pid)
            return exited

        r.service.exit_sync = exit_sync
        successor = PeerInfo(pid=4343, uid=ALICE.uid, gid=ALICE.gid, gids=ALICE.gids, user="alice", start=99)
        again, _ = r.grant(peer=successor, interface="vmap0", queues=(0,) if kind == "bound" else (), kind=kind)
        assert asked[:1] == [ALICE.pid]
        if exited:
            assert again["ok"], again
            assert r.events("lease-ended")[0]["reason"] == "holder exited"
        else:
            assert again["error"]["code"] == "queue-busy" and r.service.leases.get(reply["lease"]) is not None
    finally:
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


def test_a_requester_of_unknown_cgroup_may_not_name_a_holder_of_a_known_one(rig: Rig) -> None:
    """Alice is pinned (a start time) but the kernel gave no cgroup path for her: a holder whose cgroup is known
    (here this test's own process, real) is in another cgroup than hers, as far as anyone can tell."""
    me, start = os.getpid(), procfs.process_start(os.getpid())
    assert start is not None and peers.cgroup_of(me, start) is not None
    rig.kernel.procs[me] = (ALICE.uid, start, None)
    reply, _ = rig.grant(holder_pid=me)
    assert reply["error"]["code"] == "bad-holder", reply
    assert "(unknown: the kernel would not give its path)" in reply["error"]["message"]
    # without SO_PEERPIDFD (no start time) no requester's cgroup is ever known: nothing to compare
    unpinned = PeerInfo(ALICE.pid, ALICE.uid, ALICE.gid, ALICE.gids, ALICE.user)
    reply, _ = rig.grant(peer=unpinned, holder_pid=me)
    assert reply["ok"], reply


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
    assert len(r.service.pending) == 0
    r.service.close()


def _journal_full(rig: Rig) -> None:
    def full(*entries: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    rig.service.leases._append = full  # type: ignore[method-assign]


def test_a_bare_grant_the_journal_refuses_leaves_the_holders_memlock_as_it_was(rig: Rig) -> None:
    """A grant that fails leaves no trace: _memlock raised the holder's limit before the lease could be
    recorded; the journal refused it, nothing was granted, and the limit stayed raised (and remembered
    with no lease to restore it), for the life of the process."""
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    _journal_full(rig)
    reply, _ = rig.grant(queues=(0,), kind="bare", memlock=32 << 20)
    assert not reply["ok"], reply
    assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20)
    assert not rig.service.raised


def test_a_grant_costs_no_more_for_a_peer_in_1024_groups_when_no_quota_names_a_group() -> None:
    """Holdings indexes every holding by each of its gids and group names: a peer in 1,024 groups (any user, in a
    user namespace of its own) made each grant insert and drop ~3,000 index entries on the loop (the grant being
    made, then its lease: 86,558 byte-code instructions against 6,209 before the index), though no quota of the
    policy counts a group. What is judged per group must cost what the policy asks about, not the peer's groups."""
    many = frozenset({1000, *range(100_000, 101_023)})
    work = []
    for gids in (frozenset({1000}), many):
        rig = make_rig()
        peer = PeerInfo(pid=ALICE.pid, uid=1000, gid=1000, gids=gids, user="alice", start=77)
        assert rig.grant(peer)[0]["ok"]
        work.append(opcodes(lambda rig=rig, peer=peer: rig.grant(peer, queues=(1,))))
        rig.service.close()
    assert work[1] < 2 * work[0], work
