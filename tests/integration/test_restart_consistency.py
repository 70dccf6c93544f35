"""Restarts after a crash: what a previous broker left (its journal, another broker on the same state) is judged
against the kernel, and nothing it left keeps the next broker from starting or serving."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xskbroker.client.connection import Connection
from xskbroker.testbed import sandbox
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, fork_child, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, wait_for
from .consumers import hold_grant, try_grant

BASE = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{CONSUMER_UID}, 65532]
interfaces = ["xsk*"]
kinds = ["bound", "map"]
max_umem = "64MiB"

[[quota]]
name = "one"
users = [{CONSUMER_UID}]
max_queues = 1

[admin]
users = [0]
"""


def _leases(b: BrokerProcess) -> list[dict]:
    with Connection(b.socket_path) as c:
        return list(c.call(proto.Status())[0]["leases"])


def _kill(b: BrokerProcess) -> None:
    assert b.proc is not None
    b.proc.kill()
    b.proc.wait()


def test_a_journal_line_with_values_of_the_wrong_type_is_skipped_not_fatal(veth: VethNamespace) -> None:
    """A garbled line that still parses as JSON (a queue that is a string, a pid that is a list) must cost that line,
    not the start of every later broker (socket activation would restart it into the same crash forever), nor the
    live leases beside it."""
    with BrokerProcess(veth.name, BASE) as b:
        child = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [0], 60.0, uid=CONSUMER_UID)
        try:
            wait_for(lambda: _leases(b), what="the holder's lease")
            lease = _leases(b)[0]["lease"]
            _kill(b)
            journal = Path(b.workdir, "leases.jsonl")
            good = json.loads(journal.read_text().splitlines()[-1])["lease"]
            bad = [dict(good, id="a" * 16, queues=["1"]), dict(good, id="b" * 16, pid=[1]),
                   dict(good, id="c" * 16, ifindex="2"), dict(good, id="d" * 16, uid="0"),
                   dict(good, id="e" * 16, pid_start="1"), dict(good, id="f" * 16, kind=7),
                   dict(good, id=["x"]), dict(good, id="0" * 16, umem_bytes="9"), dict(good, id="1" * 16, gids=[None]),
                   dict(good, id="2" * 16, created=float("-inf"))]
            with journal.open("a") as f:
                for rec in bad:
                    f.write(json.dumps({"lease": rec}) + "\n")
                f.write("[" * 100_000 + "\n")  # parses deeper than the interpreter's recursion limit
            b.start()
            assert [x["lease"] for x in _leases(b)] == [lease], b.log()
            # the quota still counts the live lease
            more = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], uid=CONSUMER_UID).result()
            assert more["code"] == "quota-queues", more
        finally:
            child.kill()


def test_a_journal_whose_header_is_garbled_costs_the_journal_not_the_start(veth: VethNamespace) -> None:
    with BrokerProcess(veth.name, BASE) as b:
        _kill(b)
        Path(b.workdir, "leases.jsonl").write_text("[1]\n")
        b.start()
        assert _leases(b) == []


def _map_holder(path: str, iface: str, queue: int, seconds: float) -> dict[str, Any]:
    with Connection(path) as c:
        reply, fds = c.call(proto.Grant(iface, (queue,), kind="map"))
    time.sleep(seconds)
    return {"lease": reply["lease"], "fds": fds}


def test_a_live_bound_lease_survives_a_crash_that_took_the_per_queue_program_with_it(veth: VethNamespace) -> None:
    """On an interface running the broker's per-queue program (a map grant made it), the program goes with the broker
    that linked it. A bound lease there whose holder lives still holds its bound queue: the next broker attaches a
    program with an empty map, which says nothing of that socket, and must keep the lease (its quota, its queue)."""
    with BrokerProcess(veth.name, BASE) as b:
        tenant = spawn_unprivileged(_map_holder, b.socket_path, veth.inside, 1, 60.0, uid=65532)
        holder = None
        try:
            wait_for(lambda: _leases(b), what="the map lease")
            holder = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [0], 60.0, uid=CONSUMER_UID)
            wait_for(lambda: len(_leases(b)) == 2 or not holder.alive(), what="the bound lease")
            assert holder.alive()
            bound = next(x["lease"] for x in _leases(b) if x["kind"] == "bound")
            _kill(b)
            b.start()
            assert [x["lease"] for x in _leases(b)] == [bound], b.records("lease-dropped")
            # its holder's second queue is over its quota, and its queue is not another's
            more = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], uid=CONSUMER_UID).result()
            assert more["code"] == "quota-queues", more
            again = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=65532).result()
            assert again["ok"] is False, again
            holder.kill()
            wait_for(lambda: not _leases(b), what="the recovered lease to end with its holder")
        finally:
            tenant.kill()
            if holder is not None:
                holder.kill()


def test_a_second_broker_on_the_same_state_directory_refuses_to_start(veth: VethNamespace) -> None:
    """A second broker on the journal of a running one (a manual start beside the activated one) compacted it under
    the first, whose later grants then went to a file no longer there: lost at the next restart."""
    with BrokerProcess(veth.name, BASE) as b:
        first = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [0], 60.0, uid=CONSUMER_UID)
        second = None
        try:
            wait_for(lambda: _leases(b), what="the first lease")
            other = os.path.join(b.workdir, "other.sock")
            cmd = ["ip", "netns", "exec", veth.name, sys.executable, "-m", "xskbroker.broker", "serve", "--socket",
                   other, "--policy", b.policy_path, "--state-dir", b.workdir, "--audit", "json"]
            env = {**os.environ, "PYTHONPATH": str(Path(sandbox.__file__).resolve().parent.parent),
                   "LIBXDP_SKIP_DISPATCHER": "1"}
            two = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            try:
                wait_for(lambda: two.poll() is not None or os.path.exists(other), timeout=10,
                         what="the second broker to start or refuse")
            finally:
                two.kill()
                out = two.communicate()[0].decode()
            assert not os.path.exists(other) and "another broker" in out, out
            second = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [1], 60.0, uid=65532)
            wait_for(lambda: len(_leases(b)) == 2 or not second.alive(), what="the second lease")
            held = sorted(x["lease"] for x in _leases(b))
            _kill(b)
            b.start()
            assert sorted(x["lease"] for x in _leases(b)) == held, b.records("lease-dropped")
        finally:
            first.kill()
            if second is not None:
                second.kill()


def _map_grant_pin(path: str, iface: str) -> dict[str, Any]:
    from xskbroker.broker import bpf, bpfsys

    try:
        with Connection(path) as c:
            reply, fds = c.call(proto.Grant(iface, (0,), kind="map"))
    except (ConnectionError, OSError, proto.BrokerError) as e:
        return {"error": str(e)}
    try:
        granted = bpf.map_info(fds[0]).id
        pinned = bpfsys.obj_get(reply["map_pin"]) if reply.get("map_pin") else -1
        try:
            return {"map_pin": reply.get("map_pin"), "granted": granted,
                    "pinned": bpf.map_info(pinned).id if pinned >= 0 else None}
        finally:
            if pinned >= 0:
                os.close(pinned)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_pin_left_by_a_broker_killed_before_its_journal_line_is_replaced(veth: VethNamespace) -> None:
    """Killed between pinning a tenant's map and journaling the lease: nothing recorded the pin, which stayed in
    bpffs, and every later map grant of that tenant on that interface was told no pin (taken), its consumer
    opening by path a map that steers nothing."""
    root = tempfile.mkdtemp(prefix="xskbroker-bpffs-")
    os.chmod(root, 0o755)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0755", "bpf", root], check=True)
    try:
        with BrokerProcess(veth.name, BASE, extra_args=["--pin-root", root],
                           env={"XSKBROKER_FAULT": "after-pin"}) as b:
            got = spawn_unprivileged(_map_grant_pin, b.socket_path, veth.inside, uid=CONSUMER_UID).result()
            assert b.proc is not None and b.proc.wait(5) == -signal.SIGKILL, (got, b.log())
            b.env = {}
            b.start()
            got = spawn_unprivileged(_map_grant_pin, b.socket_path, veth.inside, uid=CONSUMER_UID).result()
            assert got["map_pin"] == f"{root}/{CONSUMER_UID}/{veth.inside}/xsks_map", got
            assert got["pinned"] == got["granted"], got
    finally:
        subprocess.run(["umount", root], check=False)
        os.rmdir(root)


BARE = """\
version = 1

[[allow]]
name = "bare-with-raise"
users = [0]
interfaces = ["xsk*"]
kinds = ["bare"]
raise_memlock = "8MiB"
"""


def _bare_with_raise(path: str, iface: str, limits: tuple[int, int], needed: int, until: str) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, limits)
    try:
        with Connection(path) as c:
            c.call(proto.Grant(iface, (0,), kind="bare", memlock=needed))
        got = "granted"
    except (ConnectionError, OSError, proto.BrokerError) as e:
        got = str(e)
    during = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    while not os.path.exists(until):
        time.sleep(0.01)
    return {"got": got, "during": during, "after": resource.getrlimit(resource.RLIMIT_MEMLOCK)}


def test_a_memlock_raise_made_by_a_broker_killed_before_the_lease_was_journaled_is_restored(
        veth: VethNamespace, tmp_path: Path) -> None:
    """The broker raised the holder's RLIMIT_MEMLOCK for a bare grant and was killed before it journaled the lease
    that the raise was for: nothing granted, and the next broker, knowing nothing of the raise, left the process
    with a limit no lease of it justifies. (Root's own process: prlimit on another uid's needs CAP_SYS_RESOURCE,
    which this machine's root may lack; the broker's logic is the same for any uid.)"""
    until = str(tmp_path / "done")
    KiB, MiB = 1 << 10, 1 << 20
    with BrokerProcess(veth.name, BARE, env={"XSKBROKER_FAULT": "after-memlock-raise"}) as b:
        child = fork_child(lambda: None, 0, _bare_with_raise, b.socket_path, veth.inside, (64 * KiB, 4 * MiB), MiB,
                           until)
        try:
            assert b.proc is not None and b.proc.wait(10) == -signal.SIGKILL, b.log()
            b.env = {}
            b.start()
            wait_for(lambda: b.records("memlock-restored"), what="the raise to be undone")
        finally:
            Path(until).touch()
        got = child.result()
        assert got["during"] == (MiB, 4 * MiB) and got["after"] == (64 * KiB, 4 * MiB), got
