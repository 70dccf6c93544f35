"""The service's leases after their grant, against a fake Kernel (service_rig.py), without root: release,
revoke and holders' exits, interfaces that come and go, recovery after a restart, status and reload, the
fault hook, and the holders' pidfds the daemon signals through. Leases that really reach the kernel are
tested in tests/integration; here it is the wiring: which kernel calls a request makes, what it undoes,
what it audits and what it answers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import faults, lifecycle
from xskbroker.broker.lease_record import Lease
from xskbroker.broker.linkwatch import LinkEvent
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.service import Outcome
from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, BOB, POLICY, ROOT, Rig, make_rig

# ---- release, revoke, exits -------------------------------------------------------------------------------------

def test_release_ends_a_closed_lease_and_only_the_owner_or_an_admin_may(rig: Rig) -> None:
    reply, out = rig.grant(queues=(0, 1))
    lease = reply["lease"]
    denied, _ = rig.reply(BOB, proto.Release(lease))
    assert denied["error"]["code"] == "unknown-lease" and rig.service.leases.get(lease) is not None
    rig.kernel.holder_closes(out.fds)
    done, _ = rig.reply(ALICE, proto.Release(lease))
    assert done["ok"] and rig.service.leases.get(lease) is None
    assert not rig.kernel.slot_taken(7, 0) and not rig.kernel.slot_taken(7, 1)
    assert rig.events("release")[0]["lease"] == lease and not rig.events("release-kept")


def test_a_lease_released_with_open_sockets_stays_charged_until_they_close(rig: Rig) -> None:
    """Release and keep: the kernel cannot close the holder's sockets, so their queues and UMEM stay on its
    quota (and in status) until the kernel empties their slots; then the poll, or a grant over quota, ends it."""
    reply, out = rig.grant(queues=(0, 1))
    lease = reply["lease"]
    done, _ = rig.reply(ALICE, proto.Release(lease))
    kept = rig.service.leases.get(lease)
    # first looked at again (the open socket may be the broker's own copy, closing), then kept as released
    assert done["ok"] and kept is not None and kept.released_at is None and lease in rig.service.leases.settling
    assert not rig.service.settle_releases(rig.service.clock() + 1.0) and not rig.service.leases.settling
    assert kept.released_at is not None and kept.info().released
    assert rig.kernel.slot_taken(7, 0) and rig.events("release-kept")[0]["lease"] == lease
    assert any(h.queues == 2 for h in rig.service.holdings())
    again, _ = rig.reply(ALICE, proto.Release(lease))  # a second release says the same, changes nothing
    assert again["ok"] and rig.service.leases.get(lease) is kept
    rig.service.check_orphans()
    assert rig.service.leases.get(lease) is kept
    rig.kernel.holder_closes(out.fds)
    rig.service.check_orphans()
    assert rig.service.leases.get(lease) is None
    assert rig.events("lease-ended")[-1]["reason"] == "its sockets were closed after its release"


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


def test_a_holder_exit_ends_only_the_leases_of_that_process_not_of_the_next_with_its_pid(rig: Rig) -> None:
    """pids are reused: the exit of the process that started at 77 must not end a lease of the one at 78."""
    _, first = rig.grant()
    later = PeerInfo(ALICE.pid, ALICE.uid, ALICE.gid, ALICE.gids, ALICE.user, start=78)
    second, _ = rig.grant(later, queues=(1,))
    rig.kernel.holder_closes(first.fds)
    rig.service.holder_exited(ALICE.pid, 77, None)
    assert [x.id for x in rig.service.leases] == [second["lease"]]
    assert not rig.service.leases.get(second["lease"]).orphaned  # type: ignore[union-attr]


def test_a_holder_that_passed_its_sockets_on_leaves_an_orphan_until_they_close(rig: Rig) -> None:
    reply, out = rig.grant()
    rig.service.holder_exited(ALICE.pid)  # the sockets live on elsewhere: their slot is still taken
    lease = rig.service.leases.get(reply["lease"])
    # held by no pid at once; an orphan once the broker's own copy has had SETTLE_MAX to close
    assert lease is not None and lease.orphaned and not rig.events("lease-orphaned")
    rig.service.check_orphans()  # still settling: the orphan poll leaves it to settle_releases
    assert rig.service.leases.get(reply["lease"]) is not None and not rig.events("lease-ended")
    rig.service.settle_releases(rig.service.clock() + lifecycle.SETTLE_MAX)
    assert rig.events("lease-orphaned") and lease.id not in rig.service.leases.settling
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


@pytest.mark.parametrize("how", ["a-symlink", "a-second-link", "another-format"])
def test_a_lease_journal_refused_at_recovery_is_audited(tmp_path: Path, how: str) -> None:
    """A journal that is a link, not the broker's own file (a second name for it: anyone's hard link), or not a
    journal at all was not believed, rightly, but said nothing: the broker started with none of its leases, and the
    operator never learnt that they were forgotten."""
    first = make_rig(tmp_path)
    assert first.grant(queues=(0,))[0]["ok"]
    first.service.leases.close()
    journal = tmp_path / "leases.jsonl"
    if how == "a-symlink":
        journal.rename(tmp_path / "elsewhere.jsonl")
        journal.symlink_to(tmp_path / "elsewhere.jsonl")
        why = "is a symbolic link"
    elif how == "a-second-link":
        os.link(journal, tmp_path / "another-name")
        why = "with one link"
    else:
        journal.write_text('{"version": 99}\n')
        why = "not a lease journal of version 1"
    second = make_rig(tmp_path, kernel=first.kernel)
    assert second.service.recover() == []
    refused = second.events("lease-journal-refused")
    assert len(refused) == 1 and why in refused[0]["reason"] and str(journal) in refused[0]["reason"], refused
    second.service.close()


def test_no_lease_journal_at_a_first_start_is_not_a_refusal(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    assert rig.service.recover() == [] and not rig.events("lease-journal-refused")
    rig.service.close()


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
    start = time.monotonic()
    faults.from_spec("after-bind:pause=0.05")("after-bind")
    assert 0.05 <= time.monotonic() - start < 0.5
    with pytest.raises(ValueError):
        faults.from_spec("after-bind:pause=soon")
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


def test_holders_deliver_an_exit_the_kernel_reported_before_the_loop_reads_it() -> None:
    import selectors
    import subprocess

    from xskbroker.broker.holders import Holders
    from xskbroker.common.procfs import process_start

    child = subprocess.Popen(["sleep", "30"])
    sel = selectors.DefaultSelector()
    exited: list[int] = []
    try:
        holders = Holders()
        holders.attach(sel, lambda pid, *_: exited.append(pid))
        holders.watch(child.pid, start=process_start(child.pid))
        assert child.pid in holders.pidfds
        assert holders.deliver_exit(child.pid) is False  # running: nothing to deliver
        assert exited == [] and child.pid in holders.pidfds
        child.kill()
        child.wait(5)
        events = sel.select(0)  # the loop's round: the pidfd is readable
        assert [key.fd for key, _ in events] == [holders.pidfds[child.pid]]
        assert holders.deliver_exit(child.pid) is True  # handled before the loop reads its event
        assert exited == [child.pid] and holders.pidfds == {}
        assert sel.get_map().get(events[0][0].fd) is not events[0][0]  # the event is stale: the server skips it
        assert holders.deliver_exit(child.pid) is False and exited == [child.pid]
    finally:
        child.kill()
        child.wait()
        sel.close()


def test_a_lease_the_kernel_cannot_tell_about_at_recovery_is_dropped_and_the_broker_starts(tmp_path: Path) -> None:
    """A failed kernel read while one recorded lease was checked (its interface's queues or map slots) raised out
    of recover(): the broker could not start at all, for anyone, until the journal was edited by hand."""
    first = make_rig(tmp_path)
    kept = first.grant(queues=(0,))[0]["lease"]
    other = first.grant(interface="veth1", queues=(0,))[0]["lease"]
    kernel = first.kernel
    first.service.leases.close()
    real = kernel.occupied_slots

    def failing(map_fd: int, slots: Any) -> list[int]:
        veth1 = second.service.programs.get(8)
        if veth1 is not None and map_fd == veth1.map_fd:
            raise OSError(errno.EIO, "Input/output error")
        return real(map_fd, slots)

    second = make_rig(tmp_path, kernel=kernel)
    kernel.occupied_slots = failing  # type: ignore[method-assign]
    recovered = second.service.recover()
    assert [x.id for x in recovered] == [kept]
    reasons = {r["lease"]: r["reason"] for r in second.events("lease-dropped")}
    assert reasons == {other: "cannot be checked: Input/output error"}
    second.service.close()
