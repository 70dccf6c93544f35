"""QueueSet and size parsing/formatting."""

import pytest

from xskbroker.policy.model import ANY_QUEUE, Policy, QueueSet, Rule
from xskbroker.policy.sizes import format_size, parse_size


def test_any_queue_contains_everything():
    assert ANY_QUEUE.is_any
    assert ANY_QUEUE.contains(0) and ANY_QUEUE.contains(10**9)
    assert ANY_QUEUE.covers([1, 2, 3])
    assert str(ANY_QUEUE) == "any"


def test_ranges_are_sorted_and_merged():
    qs = QueueSet(((7, 7), (0, 3), (2, 5), (6, 6)))
    assert qs.ranges == ((0, 7),)
    assert str(QueueSet(((7, 7), (0, 3)))) == "0-3,7"
    assert QueueSet(((0, 3), (7, 7))) == QueueSet(((7, 7), (0, 1), (2, 3)))


def test_contains_covers_missing():
    qs = QueueSet(((0, 3), (7, 7)))
    assert qs.contains(0) and qs.contains(3) and qs.contains(7)
    assert not qs.contains(4) and not qs.contains(8)
    assert qs.covers([0, 7])
    assert not qs.covers([0, 5])
    assert qs.missing([5, 0, 9]) == (5, 9)


@pytest.mark.parametrize("bad", [((3, 1),), ((-1, 2),)])
def test_bad_ranges_rejected(bad):
    with pytest.raises(ValueError):
        QueueSet(bad)


def test_rule_defaults_and_policy_views():
    allow = Rule("a", "allow", frozenset({"*"}), frozenset(), ("eth1",), source="f:3")
    deny = Rule("d", "deny", frozenset({"*"}), frozenset(), ("eth0",), source="f:9")
    assert allow.kinds == frozenset({"bound"})
    assert allow.queues.is_any and allow.max_queues is None and allow.max_umem is None
    assert not allow.exclusive
    assert allow.describe() == "rule 'a' (f:3)"
    policy = Policy((allow, deny), ("f",))
    assert policy.allow_rules == (allow,)
    assert policy.deny_rules == (deny,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("1B", 1),
        ("2KiB", 2048),
        ("2K", 2048),
        ("16MiB", 16 << 20),
        ("16M", 16 << 20),
        ("1GiB", 1 << 30),
        ("3G", 3 << 30),
        (" 512 KiB ", 512 << 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, "-1", "1.5MiB", "16MB", "16mib", "MiB", "", "1 2", True, 1.0, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1000, "1000 B"), (2048, "2 KiB"), (16 << 20, "16 MiB"), (3 << 30, "3 GiB")]
)
def test_format_size(n, text):
    assert format_size(n) == text
