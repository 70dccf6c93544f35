"""Cgroup (v2 path) and LSM label principals: the loader's checks, the decision, explain, lease ownership."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from xskbroker.broker.lease_record import Lease
from xskbroker.broker.leases import LeaseTable
from xskbroker.policy.cli import add_policy_parser
from xskbroker.policy.decide import USER_NOT_ALLOWED, Peer, Request, decide
from xskbroker.policy.loader import PolicyError, parse_policy

VM_A = "/machine.slice/machine-qemu\\x2d1\\x2dvm\\x2da.scope"
VM_B = "/machine.slice/machine-qemu\\x2d2\\x2dvm\\x2db.scope"

POLICY = r"""version = 1

[[allow]]
name = "vm-a"
users = ["*"]
cgroups = ["/machine.slice/machine-qemu\\x2d1*"]
interfaces = ["veth*"]
queues = [0]

[[allow]]
name = "vm-b"
users = ["1000"]
cgroups = ["/machine.slice/machine-qemu\\x2d2*", "/system.slice/vm-b.service"]
interfaces = ["veth*"]
queues = [1]

[[deny]]
users = ["*"]
labels = ["*:untrusted_t:*"]
interfaces = ["*"]
"""


def peer(cgroup: str | None, uid: int = 1000, label: str | None = None) -> Peer:
    return Peer(uid, frozenset({uid}), "alice", frozenset({"alice"}), cgroup, label)


def ask(cgroup: str | None, queue: int, **kw: object) -> tuple[bool, str, str | None, str]:
    d = decide(parse_policy(POLICY, "p.toml"), peer(cgroup, **kw), Request("veth0", (queue,)))  # type: ignore[arg-type]
    return d.allowed, d.code, d.rule.name if d.rule else None, d.reason


def test_each_cgroup_gets_its_own_queue_and_not_the_others() -> None:
    assert ask(VM_A, 0)[:3] == (True, "ok", "vm-a")
    assert ask(VM_B, 1)[:3] == (True, "ok", "vm-b")
    assert ask("/system.slice/vm-b.service", 1)[0]
    allowed, code, rule, reason = ask(VM_A, 1)
    assert not allowed and code == "queue-not-allowed" and rule == "vm-a" and "not 1" in reason
    allowed, code, rule, _ = ask(VM_B, 0)
    assert not allowed and code == "queue-not-allowed" and rule == "vm-b"


def test_cgroups_narrow_users_they_do_not_replace_them() -> None:
    # the cgroup matches rule vm-b, but uid 1001 is not among its users
    allowed, code, rule, reason = ask(VM_B, 1, uid=1001)
    assert not allowed and code == USER_NOT_ALLOWED
    assert rule == "vm-a" and "allows cgroups" in reason  # vm-a names everyone, but in another cgroup


def test_a_peer_in_no_named_cgroup_is_told_which_cgroups_the_rule_wants() -> None:
    allowed, code, rule, reason = ask("/user.slice/user-1000.slice/session-1.scope", 0)
    assert not allowed and code == USER_NOT_ALLOWED and rule in ("vm-a", "vm-b")
    assert "allows cgroups" in reason and "session-1.scope" in reason


def test_an_unknown_cgroup_matches_no_rule_that_names_cgroups() -> None:
    allowed, _, _, reason = ask(None, 0)
    assert not allowed and "an unknown cgroup" in reason


def test_glob_star_crosses_slashes_and_is_case_sensitive() -> None:
    assert ask(VM_A + "/vcpu0", 0)[0]  # a sub-cgroup of the scope (QEMU's threads under libvirt)
    assert not ask(VM_A.upper(), 0)[0]


def test_a_deny_rule_with_labels_applies_only_to_labelled_peers() -> None:
    allowed, code, _, _ = ask(VM_A, 0, label="system_u:untrusted_t:s0")
    assert not allowed and code == "denied-by-rule"
    assert ask(VM_A, 0, label="system_u:svirt_t:s0")[0]
    assert ask(VM_A, 0)[0]  # no LSM: a deny naming labels never applies


@pytest.mark.parametrize(("value", "message"), [
    ('["machine.slice"]', "bad cgroup 'machine.slice': use an absolute cgroup v2 path"),
    ("[]", "must be a non-empty list of cgroup v2 paths"),
    ('"/system.slice"', "must be a non-empty list of cgroup v2 paths"),
    ('["/system.slice/"]', "no empty, '.' or '..' parts and no trailing '/'"),
    ('["/a/../b"]', "no empty, '.' or '..' parts"),
    ('["/a//b"]', "no empty"),
    ("[7]", "bad cgroup 7"),
])
def test_bad_cgroups_are_reported_with_file_and_line(value: str, message: str) -> None:
    text = f'version = 1\n\n[[allow]]\nname = "x"\nusers = ["*"]\ncgroups = {value}\ninterfaces = ["veth0"]\n'
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.toml")
    assert len(e.value.errors) == 1
    assert e.value.errors[0].startswith("p.toml:6: rule 'x': cgroups: "), e.value.errors
    assert message in e.value.errors[0]


def test_bad_labels_and_a_rule_with_only_cgroups_are_reported() -> None:
    text = 'version = 1\n[[deny]]\ncgroups = ["/a"]\nlabels = ["has space"]\ninterfaces = ["*"]\n'
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.toml")
    assert "p.toml:2: [[deny]] #1: needs 'users' or 'groups'" in e.value.errors[0]
    assert e.value.errors[1].startswith("p.toml:4: [[deny]] #1: labels: bad label 'has space'")


def test_the_root_cgroup_is_a_valid_path() -> None:
    rule = parse_policy('version = 1\n[[allow]]\nname = "r"\nusers = ["*"]\ncgroups = ["/"]\ninterfaces = ["x"]\n')
    assert rule.rules[0].cgroups == ("/",)


def test_explain_takes_a_cgroup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    policy.chmod(0o644)

    def explain(*extra: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="xskbroker")
        add_policy_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["policy", "explain", "--policy", str(policy), "--user", "1000",
                                  "--interface", "veth0", *extra])
        rc = int(args.func(args))
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = explain("--queue", "0", "--cgroup", VM_A, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["allowed"] and got["rule"] == "vm-a" and got["peer"]["cgroup"] == VM_A
    rc, out, _ = explain("--queue", "1", "--cgroup", VM_A)
    assert rc != 0 and "allows queues 0, not 1" in out and f"in cgroup {VM_A}" in out
    rc, out, _ = explain("--queue", "0")
    assert rc != 0 and "not an unknown cgroup" in out
    rc, _, err = explain("--queue", "0", "--cgroup", "machine.slice")
    assert rc == 2 and "must be an absolute cgroup v2 path" in err


def test_a_lease_is_owned_by_its_uid_and_cgroup() -> None:
    lease = Lease("l", 1000, 5, 2, "veth0", (0,), "bound", 0, cgroup=VM_A)
    assert lease.owned_by(1000, VM_A)
    assert not lease.owned_by(1000, VM_B) and not lease.owned_by(1000, None) and not lease.owned_by(1001, VM_A)
    old = Lease("o", 1000, 5, 2, "veth0", (1,), "bound", 0)  # from a journal older than cgroups
    assert old.owned_by(1000, VM_B) and old.owned_by(1000, None) and not old.owned_by(1001, None)


def test_the_cgroup_is_journalled_and_an_old_journal_loads_without_it(tmp_path: Path) -> None:
    state = tmp_path / "leases"
    table = LeaseTable(str(state))
    lease = table.add(1000, 5, 2, "veth0", (0,), "bound", 0, cgroup=VM_A)
    table.close()
    [back] = LeaseTable(str(state)).load()
    assert back.id == lease.id and back.cgroup == VM_A
    # a journal written before the field existed
    rec = lease.record()
    del rec["cgroup"]
    state.write_text(json.dumps({"version": 1}) + "\n" + json.dumps({"lease": rec}) + "\n")
    state.chmod(0o600)
    [old] = LeaseTable(str(state)).load()
    assert old.cgroup is None and old.owned_by(1000, VM_B)


def test_a_deny_naming_cgroups_applies_to_an_unknown_cgroup() -> None:
    """A peer can make its cgroup unknown (its connector exits first): a deny naming cgroups must still apply."""
    text = POLICY + '\n[[deny]]\nname = "sandbox"\nusers = ["*"]\ncgroups = ["/sandbox*"]\ninterfaces = ["*"]\n'
    policy = parse_policy(text.replace('cgroups = ["/machine.slice/machine-qemu\\\\x2d1*"]\n', ""), "p.toml")
    assert decide(policy, peer(VM_A), Request("veth0", (0,))).allowed  # outside the sandbox: vm-a (any cgroup)
    assert not decide(policy, peer("/sandbox/x"), Request("veth0", (0,))).allowed
    d = decide(policy, peer(None), Request("veth0", (0,)))
    assert not d.allowed and d.code == "denied-by-rule" and d.rule is not None and d.rule.name == "sandbox"
    assert "its cgroup is unknown" in d.reason
