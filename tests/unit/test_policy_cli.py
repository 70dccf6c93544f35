"""`policy check` and `policy explain` through the argparse wiring the main CLI uses."""

import argparse
import json
import os
import pwd
import re
from pathlib import Path

import pytest

from xskbroker.policy.cli import add_policy_parser, resolve_peer
from xskbroker.policy.loader import load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
UNKNOWN_UID = "3999999"  # assumed to have no passwd entry

POLICY = """\
version = 1

[[allow]]
name = "root-veths"
users = ["root"]
interfaces = ["veth*"]
queues = ["0-3"]
max_queues = 2
max_umem = "1MiB"

[[allow]]
name = "group-4242"
groups = [4242]
interfaces = ["eth1"]
kinds = ["bare"]

[[deny]]
name = "never-eth0"
users = ["*"]
interfaces = ["eth0"]
"""


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xskbroker")
    add_policy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


def explain(policy_file: Path, *argv: str) -> int:
    return run(["policy", "explain", "--policy", str(policy_file), *argv])


# --- check -------------------------------------------------------------------------------------------


def test_check_ok(policy_file, capsys):
    assert run(["policy", "check", str(policy_file)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{policy_file}: OK (2 allow rules, 1 deny rules)\n"
    assert out.err == ""


def test_check_json_ok(policy_file, capsys):
    assert run(["policy", "check", str(policy_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["errors"] == [] and result["rules"] == 3
    assert result["sources"] == [str(policy_file)]


def test_check_errors_go_to_stderr(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text(
        'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["e"]\nqueues = ["3-1"]\nx = 1\n'
    )
    assert run(["policy", "check", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [
        f"{path}:6: rule 'a': queues: range '3-1' runs backwards (start > end)",
        f"{path}:7: rule 'a': unknown key 'x'",
    ]


def test_check_json_errors(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text("version = 3\n")
    assert run(["policy", "check", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "ok": False,
        "errors": [f"{path}:1: unsupported version 3 (this broker reads version 1)"],
        "rules": 0,
    }


def test_check_unreadable(tmp_path, capsys):
    assert run(["policy", "check", str(tmp_path / "missing.toml")]) == 1
    assert capsys.readouterr().err == f"{tmp_path / 'missing.toml'}: cannot read: {os.strerror(2)}\n"


def test_check_empty_policy_notes_default_deny(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text("version = 1\n")
    assert run(["policy", "check", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: OK (0 allow rules, 0 deny rules)\n"
    assert "every request is denied" in out.err


def test_check_counts_policy_d(policy_file, capsys):
    dropin = policy_file.parent / "policy.d"
    dropin.mkdir()
    (dropin / "extra.toml").write_text(
        'version = 1\n[[deny]]\nname = "d2"\ngroups = ["*"]\ninterfaces = ["lo"]\n'
    )
    assert run(["policy", "check", str(policy_file)]) == 0
    assert capsys.readouterr().out == f"{policy_file}: OK (2 allow rules, 2 deny rules)\n"


def test_example_policy_is_valid(capsys):
    example = ROOT / "deploy" / "policy.example.toml"
    assert run(["policy", "check", str(example)]) == 0
    assert capsys.readouterr().out.startswith(f"{example}: OK (")


def test_docs_example_is_valid():
    # The "complete example" in docs/policy.md must stay a policy that loads.
    text = (ROOT / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    assert parse_policy(blocks[0], "docs/policy.md").rules


# --- explain ------------------------------------------------------------------------------------------


def test_explain_allow(policy_file, capsys):
    assert explain(policy_file, "--user", "root", "--interface", "veth0", "--queue", "0", "--queue", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ALLOW by rule 'root-veths' ({policy_file}:3)"
    assert lines[1].startswith("  peer: uid 0 (root), groups: 0")


def test_explain_deny_codes(policy_file, capsys):
    base = ["--user", "0", "--group", "0"]
    cases = {
        ("--interface", "eth0", "--queue", "0"): "denied-by-rule",
        ("--interface", "eth1", "--queue", "0"): "interface-not-allowed",
        ("--interface", "veth0", "--queue", "0", "--kind", "map"): "kind-not-allowed",
        ("--interface", "veth0", "--queue", "9"): "queue-not-allowed",
        ("--interface", "veth0", "--queue", "0", "--queue", "1", "--queue", "2"): "too-many-queues",
        ("--interface", "veth0", "--queue", "0", "--umem", "2MiB"): "umem-too-large",
    }
    for argv, code in cases.items():
        assert explain(policy_file, *base, *argv) == 1
        assert capsys.readouterr().out.startswith(f"DENY ({code}): rule '")


@pytest.mark.parametrize("name", ["veth0:1", "veth0:", "veth 0", "veth/0", "..", "veth0123456789ab"])
def test_explain_refuses_a_name_the_kernel_never_gives(policy_file, capsys, name):
    # "veth0:1" matches "veth*" but name lookups cut it to veth0: the broker refuses it at decode (finding 2)
    assert explain(policy_file, "--user", "root", "--interface", name, "--queue", "0") == 2
    err = capsys.readouterr().err
    assert "not a valid interface name" in err and "bad-request" in err


def test_explain_reason_text(policy_file, capsys):
    assert explain(policy_file, "--user", "root", "--interface", "veth1", "--queue", "5") == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"DENY (queue-not-allowed): rule 'root-veths' ({policy_file}:3) allows queues 0-3, not 5"


def test_explain_unknown_uid_without_groups_is_not_allowed(policy_file, capsys):
    assert explain(policy_file, "--user", UNKNOWN_UID, "--interface", "eth1", "--queue", "0") == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY (user-not-allowed): no allow rule names uid 3999999 or any of its groups\n")
    assert "groups: none" in out


def test_explain_explicit_gid_matches_group_rule(policy_file, capsys):
    argv = ["--user", UNKNOWN_UID, "--group", "4242", "--interface", "eth1", "--queue", "3", "--kind", "bare"]
    assert explain(policy_file, *argv) == 0
    assert capsys.readouterr().out.startswith(f"ALLOW by rule 'group-4242' ({policy_file}:11)")


def test_explain_explicit_groups_replace_the_system_ones(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[[allow]]\nname = "g"\ngroups = ["root"]\ninterfaces = ["e"]\n')
    # root's own groups include "root"; --group replaces them, so this one is refused.
    assert explain(path, "--user", "root", "--interface", "e", "--queue", "0") == 0
    assert explain(path, "--user", "root", "--group", "4242", "--interface", "e", "--queue", "0") == 1
    capsys.readouterr()


def test_explain_json(policy_file, capsys):
    argv = ["--user", "root", "--interface", "veth0", "--queue", "1", "--umem", "4096", "--json"]
    assert explain(policy_file, *argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["allowed"] is True
    assert result["code"] == "ok"
    assert result["rule"] == "root-veths"
    assert result["source"] == f"{policy_file}:3"
    assert result["request"] == {"interface": "veth0", "queues": [1], "kind": "bound", "umem_bytes": 4096}
    assert result["peer"]["uid"] == 0 and result["peer"]["user"] == "root"


def test_explain_unknown_user_name(policy_file, capsys):
    assert explain(policy_file, "--user", "no-such-user-xsk", "--interface", "veth0", "--queue", "0") == 2
    assert "unknown user 'no-such-user-xsk'" in capsys.readouterr().err


def test_explain_unknown_group_name(policy_file, capsys):
    argv = ["--user", "root", "--group", "no-such-group-xsk", "--interface", "veth0", "--queue", "0"]
    assert explain(policy_file, *argv) == 2
    assert "unknown group 'no-such-group-xsk'" in capsys.readouterr().err


def test_explain_bad_policy(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text("version = 1\n[[allow]]\n")
    assert explain(path, "--user", "0", "--interface", "e", "--queue", "0") == 2
    assert capsys.readouterr().err.startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--user", "root", "--interface", "e"],  # no queue
        ["--user", "root", "--interface", "e", "--queue", "-1"],
        ["--user", "root", "--interface", "e", "--queue", "x"],
        ["--user", "root", "--interface", "e", "--queue", "0", "--umem", "lots"],
        ["--user", "root", "--interface", "e", "--queue", "0", "--kind", "weird"],
        ["--interface", "e", "--queue", "0"],  # no user
    ],
)
def test_explain_usage_errors_exit_2(policy_file, argv, capsys):
    with pytest.raises(SystemExit) as info:
        explain(policy_file, *argv)
    assert info.value.code == 2
    capsys.readouterr()


def test_help_teaches_with_examples(capsys):
    for sub in ("check", "explain"):
        with pytest.raises(SystemExit):
            run(["policy", sub, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_resolve_peer():
    root = resolve_peer("root")
    assert (root.uid, root.user) == (0, "root")
    assert pwd.getpwnam("root").pw_gid in root.gids
    assert resolve_peer("0") == root
    ghost = resolve_peer(UNKNOWN_UID, ["7", "4242"])
    assert (ghost.uid, ghost.user, ghost.gids) == (3999999, None, frozenset({7, 4242}))
    with pytest.raises(LookupError):
        resolve_peer("no-such-user-xsk")


def test_loads_what_it_checks(policy_file):
    assert [r.name for r in load_policy(policy_file).rules] == ["root-veths", "group-4242", "never-eth0"]


def test_explain_shows_the_umem_cap_in_force(policy_file, capsys):
    argv = ["--user", UNKNOWN_UID, "--group", "4242", "--interface", "eth1", "--queue", "3", "--kind", "bare"]
    assert explain(policy_file, *argv) == 0
    third = capsys.readouterr().out.splitlines()[2]
    assert third == "  max_umem: 256 MiB per grant (the default: the rule sets no max_umem)"
    assert explain(policy_file, *argv, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["max_umem"], result["max_umem_default"]) == (256 << 20, True)
    assert explain(policy_file, "--user", "root", "--interface", "veth0", "--queue", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["max_umem"], result["max_umem_default"]) == (1 << 20, False)
    assert explain(policy_file, "--user", "root", "--interface", "veth0", "--queue", "0", "--umem", "2MiB") == 1
    assert capsys.readouterr().out.splitlines()[2] == "  max_umem: 1 MiB per grant"
