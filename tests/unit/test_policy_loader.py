"""Loading policy TOML: every key, every error with its file:line, policy.d merging."""

import os
import textwrap

import pytest

from xskbroker.policy.loader import PolicyError, load_policy, parse_policy
from xskbroker.policy.model import KINDS, QueueSet

FULL = """\
version = 1

[[allow]]
name = "ci-consumers"
users = ["nobody", 1000]
groups = ["xsk", 27]
interfaces = ["veth*", "eth1"]
queues = ["0-3", 7]
kinds = ["bound", "bare"]
max_queues = 2
max_umem = "16MiB"
raise_memlock = "64MiB"

[[deny]]
name = "never-eth0"
users = ["*"]
interfaces = ["eth0"]

[[deny]]
groups = ["*"]
interfaces = ["eth1"]
queues = [5]
kinds = ["map"]
"""


def errors_of(text: str, filename: str = "p.toml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), filename)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def test_every_key_parsed():
    policy = parse_policy(FULL, "/etc/x.toml")
    assert policy.sources == ("/etc/x.toml",)
    allow, deny, narrow = policy.rules
    assert allow.name == "ci-consumers" and allow.action == "allow"
    assert allow.users == frozenset({"nobody", "1000"})
    assert allow.groups == frozenset({"xsk", "27"})
    assert allow.interfaces == ("veth*", "eth1")
    assert allow.queues == QueueSet(((0, 3), (7, 7)))
    assert allow.kinds == frozenset({"bound", "bare"})
    assert allow.max_queues == 2
    assert allow.max_umem == 16 << 20
    assert allow.exclusive is False
    assert allow.raise_memlock == 64 << 20
    assert allow.source == "/etc/x.toml:3"

    assert deny.name == "never-eth0" and deny.action == "deny"
    assert deny.users == frozenset({"*"}) and deny.groups == frozenset()
    assert deny.queues.is_any
    assert deny.kinds == frozenset(KINDS)  # a deny without kinds covers every kind
    assert deny.source == "/etc/x.toml:14"

    assert narrow.name == "deny@/etc/x.toml:19"  # unnamed deny rules get a name from their location
    assert narrow.queues == QueueSet(((5, 5),))
    assert narrow.kinds == frozenset({"map"})


def test_defaults():
    policy = parse_policy('version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n')
    (rule,) = policy.rules
    assert rule.queues.is_any
    assert rule.kinds == frozenset({"bound"})
    assert rule.max_queues is None and rule.max_umem is None and rule.exclusive is False
    assert rule.groups == frozenset()
    assert rule.source == "<policy>:2"


def test_max_umem_as_int_and_short_suffix():
    base = 'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["e"]\nmax_umem = {}\n'
    assert parse_policy(base.format("4096")).rules[0].max_umem == 4096
    assert parse_policy(base.format('"2G"')).rules[0].max_umem == 2 << 30


def test_empty_policy_is_valid():
    assert parse_policy("version = 1\n").rules == ()


def test_rules_keep_file_order_across_allow_and_deny():
    text = (
        'version = 1\n[[deny]]\nname = "d"\nusers = ["*"]\ninterfaces = ["eth0"]\n'
        '[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n'
    )
    assert [r.name for r in parse_policy(text).rules] == ["d", "a"]


def test_header_with_spaces_and_comment():
    text = 'version = 1\n\n  [[ allow ]]  # ci\nname = "a"\nusers = ["*"]\ninterfaces = ["e"]\n'
    assert parse_policy(text, "f").rules[0].source == "f:3"


def test_every_rule_error_points_at_its_key_line():
    errors = errors_of(
        """\
        version = 1

        [[allow]]
        name = "a"
        users = "alice"
        interfaces = []
        queues = ["5-3"]
        kinds = ["bound", "weird"]
        max_queues = 0
        max_umem = "0"
        exclusive = "yes"
        queue = 1
        """
    )
    assert errors == [
        "p.toml:5: rule 'a': users: must be a list of user names or numeric ids, "
        'e.g. ["xsk", 1000], or ["*"]',
        "p.toml:6: rule 'a': interfaces: must be a non-empty list of interface names or globs, "
        'e.g. ["veth*", "eth1"]',
        "p.toml:7: rule 'a': queues: range '5-3' runs backwards (start > end)",
        "p.toml:8: rule 'a': kinds: unknown kind 'weird' (known: bound, bare, map)",
        "p.toml:9: rule 'a': max_queues: must be a positive integer, got 0",
        "p.toml:10: rule 'a': max_umem: must be more than zero bytes (omit it for the default)",
        "p.toml:11: rule 'a': exclusive: must be true or false, got 'yes'",
        "p.toml:12: rule 'a': unknown key 'queue' (did you mean 'queues'?)",
    ]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("queues = [-1]", "queue -1 is negative"),
        ('queues = ["-1"]', "bad queue '-1'"),
        ('queues = ["1-"]', "bad queue '1-'"),
        ("queues = [true]", "bad queue True"),
        ("queues = []", "must be a non-empty list"),
        ("kinds = []", "must be a non-empty list"),
        ('kinds = "bound"', "must be a non-empty list"),
        ("max_queues = -2", "must be a positive integer"),
        ("max_queues = true", "must be a positive integer"),
        ('max_queues = "2"', "must be a positive integer"),
        ("max_umem = -5", "must not be negative"),
        ('max_umem = "16MB"', "bad size '16MB'"),
        ("max_umem = 1.5", "expected a size"),
        ("exclusive = 1", "must be true or false"),
        ("name = 3", "must be a non-empty string"),
        ('interfaces = [""]', "bad interface ''"),
        ('interfaces = ["eth 0"]', "bad interface 'eth 0'"),
        ('interfaces = ["averyveryverylongname"]', "longer than 15 characters"),
        ("interfaces = [1]", "bad interface 1"),
        ("users = [-1]", "bad user -1"),
        ('users = [""]', "bad user ''"),
        ("users = [1.5]", "bad user 1.5"),
        ("groups = [true]", "bad group True"),
    ],
)
def test_wrong_values(line, fragment):
    key = line.split()[0]
    keys = {"name": '"r"', "users": '["*"]', "interfaces": '["e"]'}
    keys.pop(key, None)
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    (error,) = errors_of(f"version = 1\n[[allow]]\n{body}{line}\n")
    assert error.startswith(f"p.toml:{2 + len(keys) + 1}: ")
    assert f": {key}: " in error
    assert fragment in error


def test_missing_required_keys_point_at_header():
    errors = errors_of(
        """\
        version = 1
        [[allow]]
        name = "ok"
        users = ["*"]
        interfaces = ["e"]

        [[allow]]
        queues = [1]
        """
    )
    assert errors == [
        "p.toml:7: [[allow]] #2: missing required key 'name'",
        "p.toml:7: [[allow]] #2: needs 'users' or 'groups' (users = [\"*\"] means anyone)",
        "p.toml:7: [[allow]] #2: missing required key 'interfaces'",
    ]


def test_empty_principals_are_an_error():
    errors = errors_of('version = 1\n[[allow]]\nname = "a"\nusers = []\ngroups = []\ninterfaces = ["e"]\n')
    assert errors == ["p.toml:2: rule 'a': 'users' and 'groups' are empty, so the rule matches no one"]


def test_empty_users_with_groups_is_fine():
    policy = parse_policy(
        'version = 1\n[[allow]]\nname = "a"\nusers = []\ngroups = ["g"]\ninterfaces = ["e"]\n'
    )
    assert policy.rules[0].groups == frozenset({"g"})


def test_deny_rejects_allow_only_keys():
    errors = errors_of(
        """\
        version = 1
        [[deny]]
        users = ["*"]
        interfaces = ["eth0"]
        max_umem = 5
        exclusive = true
        """
    )
    assert errors == [
        "p.toml:5: [[deny]] #1: 'max_umem' is only valid in [[allow]] rules",
        "p.toml:6: [[deny]] #1: 'exclusive' is only valid in [[allow]] rules",
    ]


def test_duplicate_names_point_at_second_name_line():
    errors = errors_of(
        """\
        version = 1
        [[allow]]
        name = "x"
        users = ["*"]
        interfaces = ["e"]
        [[deny]]
        users = ["*"]
        name = "x"
        interfaces = ["e"]
        """
    )
    assert errors == ["p.toml:8: duplicate rule name 'x' (first defined at p.toml:3)"]


def test_top_level_errors():
    errors = errors_of(
        """\
        # comment
        version = 2
        vesion = 1
        [allow]
        name = "x"
        """
    )
    assert errors == [
        "p.toml:2: unsupported version 2 (this broker reads version 1)",
        "p.toml:3: unknown top-level key 'vesion' (did you mean 'version'?)",
        "p.toml:4: 'allow' must be written as [[allow]] tables",
    ]


def test_missing_version():
    assert errors_of('[[deny]]\nusers = ["*"]\ninterfaces = ["e"]\n') == [
        "p.toml:1: missing 'version = 1' at the top of the file"
    ]


@pytest.mark.parametrize("version", ['"1"', "true", "1.0"])
def test_version_wrong_type(version):
    assert errors_of(f"version = {version}\n")[0].startswith("p.toml:1: unsupported version")


def test_unknown_top_level_table_points_at_header():
    assert errors_of("version = 1\n\n[[allw]]\nname = 1\n") == [
        "p.toml:3: unknown top-level key 'allw' (did you mean 'allow'?)"
    ]


def test_syntax_error_uses_tomllib_line():
    assert errors_of('version = 1\n[[allow]]\nname = "a"\nusers = [\n"x",\n  oops\n]\n') == [
        "p.toml:6: TOML syntax error: Invalid value (column 3)"
    ]


def test_syntax_error_at_end_of_document():
    (error,) = errors_of("version = 1\nname =\n")
    assert error.startswith("p.toml:2: TOML syntax error: ")


def test_errors_in_several_rules_are_all_reported():
    errors = errors_of(
        """\
        version = 1
        [[allow]]
        name = "a"
        users = ["*"]
        interfaces = ["e"]
        kinds = ["nope"]
        [[allow]]
        name = "b"
        users = ["*"]
        interfaces = ["e"]
        queues = ["9-1"]
        """
    )
    assert [e.split(":")[1] for e in errors] == ["6", "11"]


# --- load_policy -------------------------------------------------------------------------------------

RULE = 'version = 1\n[[allow]]\nname = "{name}"\nusers = ["*"]\ninterfaces = ["{iface}"]\n'


def test_load_single_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(RULE.format(name="a", iface="eth1"))
    policy = load_policy(path)
    assert [r.name for r in policy.rules] == ["a"]
    assert policy.sources == (str(path),)
    assert policy.rules[0].source == f"{path}:2"


def test_policy_d_merged_in_sorted_order(tmp_path):
    main = tmp_path / "policy.toml"
    main.write_text(RULE.format(name="main", iface="eth1"))
    dropin = tmp_path / "policy.d"
    dropin.mkdir()
    (dropin / "20-b.toml").write_text(RULE.format(name="b", iface="eth2"))
    (dropin / "10-a.toml").write_text(RULE.format(name="a", iface="eth3"))
    (dropin / "ignored.conf").write_text("not toml at all [")
    (dropin / ".hidden.toml").write_text("not toml at all [")
    policy = load_policy(str(main))
    assert [r.name for r in policy.rules] == ["main", "a", "b"]
    assert policy.sources == (str(main), str(dropin / "10-a.toml"), str(dropin / "20-b.toml"))
    assert policy.rules[1].source == f"{dropin / '10-a.toml'}:2"


def test_policy_d_duplicate_names_across_files(tmp_path):
    main = tmp_path / "policy.toml"
    main.write_text(RULE.format(name="same", iface="eth1"))
    (tmp_path / "policy.d").mkdir()
    other = tmp_path / "policy.d" / "x.toml"
    other.write_text("# extra\n" + RULE.format(name="same", iface="eth2"))
    with pytest.raises(PolicyError) as info:
        load_policy(main)
    assert info.value.errors == [f"{other}:4: duplicate rule name 'same' (first defined at {main}:3)"]


def test_errors_from_every_file_are_reported(tmp_path):
    main = tmp_path / "policy.toml"
    main.write_text("version = 1\nbogus = 1\n")
    (tmp_path / "policy.d").mkdir()
    bad = tmp_path / "policy.d" / "a.toml"
    bad.write_text("version = 1\n[[allow]]\n")
    with pytest.raises(PolicyError) as info:
        load_policy(main)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{main}:2", f"{bad}:2", f"{bad}:2", f"{bad}:2"]


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert info.value.errors == [f"{missing}: cannot read: {os.strerror(2)}"]


def test_directory_is_unreadable(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert info.value.errors[0].startswith(f"{tmp_path}: cannot read: ")


def test_not_utf8(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_bytes(b"version = 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.errors == [f"{path}:2: not valid UTF-8 (byte 17)"]


def test_policy_error_from_string():
    assert PolicyError("f: cannot read: x").errors == ["f: cannot read: x"]


def test_map_kind_needs_no_exclusive_rule():
    # a map grant's tenant map steers only its own queues (broker.queue_prog): no need to give it the interface
    assert parse_policy(textwrap.dedent("""\
        version = 1
        [[allow]]
        name = "dpdk"
        users = ["*"]
        interfaces = ["eth1"]
        queues = ["2-3"]
        kinds = ["map"]
        """), "p.toml").rules[0].kinds == frozenset({"map"})


def test_exclusive_rule_cannot_narrow_queues():
    errors = errors_of("""\
        version = 1
        [[allow]]
        name = "dpdk"
        users = ["*"]
        interfaces = ["eth1"]
        kinds = ["map"]
        exclusive = true
        queues = [0]
        """)
    assert errors == ["p.toml:8: rule 'dpdk': an exclusive rule gives whole interfaces; drop 'queues'"]
    policy = parse_policy('version = 1\n[[allow]]\nname = "d"\nusers = ["*"]\ninterfaces = ["e"]\n'
                          'kinds = ["map"]\nexclusive = true\n')
    assert policy.rules[0].exclusive and policy.rules[0].kinds == frozenset({"map"})
