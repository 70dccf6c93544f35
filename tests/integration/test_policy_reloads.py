"""SIGHUP on a real broker: a file that fails to load keeps the running policy and says why (a policy nested too
deeply ended the broker: RecursionError escaped the reload handler), and what a reload does to the leases a new
policy no longer allows is what docs/policy.md says ("Reloading the policy")."""

from __future__ import annotations

import signal
from pathlib import Path

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged

from .conftest import CONSUMER_UID, wait_for
from .consumers import hold_grant, try_grant
from .test_leases import BASE, _status


def test_a_reload_of_a_policy_nested_too_deeply_keeps_the_running_one(veth: VethNamespace) -> None:
    with BrokerProcess(veth.name, BASE) as b:
        Path(b.policy_path).write_text("version = 1\nx = " + "[" * 2000 + "]" * 2000 + "\n")
        b.signal(signal.SIGHUP)
        assert b.proc is not None
        failed = wait_for(lambda: b.records("policy-reload-failed") or b.proc.poll() is not None,
                          what="the failed reload")
        assert b.proc.poll() is None, b.log()
        assert failed[0]["errors"] == [f"{b.policy_path}:2: TOML nested too deeply (arrays or inline tables inside "
                                       "one another)"]
        assert _status(b)["policy"]["reload_errors"] == failed[0]["errors"]  # root is the default admin
        assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]


def test_a_lease_a_reload_no_longer_allows_is_kept_and_new_grants_are_refused(veth: VethNamespace) -> None:
    """docs/policy.md: a reload judges every request from then on; leases granted before it stay until they end
    (release, holder exit, an admin's revoke)."""
    with BrokerProcess(veth.name, BASE) as b:
        holder = spawn_unprivileged(hold_grant, b.socket_path, veth.inside, [0], 60.0, uid=CONSUMER_UID)
        try:
            wait_for(lambda: b.leases() or not holder.alive(), what="the holder's lease")
            [lease] = b.leases()
            Path(b.policy_path).write_text("version = 1\n")
            b.signal(signal.SIGHUP)
            wait_for(lambda: b.records("policy-reloaded"), what="the reload")
            assert [x["lease"] for x in b.leases()] == [lease["lease"]] and holder.alive()
            denied = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [1], uid=CONSUMER_UID).result()
            assert denied["code"] == "user-not-allowed", denied
        finally:
            holder.kill()
        wait_for(lambda: not b.leases(), what="the lease's end with its holder")
