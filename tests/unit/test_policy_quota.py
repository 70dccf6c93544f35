"""[[quota]] and [admin] tables: parsing with file:line errors, and the pure quota decisions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xskbroker.policy import Holding, Holdings, Peer, RateLimiter, parse_policy
from xskbroker.policy import quota as quotas
from xskbroker.policy.loader import PolicyError

BASE = 'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n'
ALICE = Peer(1000, frozenset({1000, 27}), "alice", frozenset({"alice", "xsk"}))
BOB = Peer(1001, frozenset({1001, 27}), "bob", frozenset({"bob", "xsk"}))


def test_quota_and_admin_tables_parse():
    policy = parse_policy(BASE + """
[[quota]]
name = "per-user"
users = ["*"]
max_queues = 4
max_umem = "64MiB"
max_connections = 2
max_requests_per_second = 2.5

[admin]
groups = ["netadmin"]
revoke_signal = "SIGUSR1"
""", "q.toml")
    (q,) = policy.quotas
    assert (q.max_queues, q.max_umem, q.max_connections, q.max_requests_per_second) == (4, 64 << 20, 2, 2.5)
    assert q.source == "q.toml:7"
    assert policy.admin.groups == frozenset({"netadmin"}) and policy.admin.revoke_signal == "SIGUSR1"
    assert policy.admin.users == frozenset({"0"})  # root stays admin unless users is given


def test_default_admin_is_root_without_a_signal():
    policy = parse_policy(BASE)
    assert policy.admin.users == frozenset({"0"}) and policy.admin.revoke_signal is None


@pytest.mark.parametrize(("table", "message"), [
    ('[[quota]]\nname = "q"\nusers = ["*"]\n', "q.toml:7: [[quota]] #1: sets no limit"),
    ('[[quota]]\nname = "q"\nmax_queues = 1\n', "q.toml:7: [[quota]] #1: needs 'users' or 'groups'"),
    ('[[quota]]\nname = "q"\nusers = ["*"]\nmax_queue = 1\n', "q.toml:10: [[quota]] #1: unknown key 'max_queue'"),
    ('[[quota]]\nname = "q"\nusers = ["*"]\nmax_requests_per_second = 0\n',
     "q.toml:10: [[quota]] #1: max_requests_per_second: must be a positive number"),
    ('[[quota]]\nname = "a"\nusers = ["*"]\nmax_queues = 1\n', "duplicate rule name 'a'"),
    ('[admin]\nrevoke_signal = "SIGSTOP"\n', "q.toml:8: [admin]: revoke_signal: must be one of SIGTERM"),
    ('[admin]\nuser = [0]\n', "q.toml:8: [admin]: unknown key 'user'"),
])
def test_quota_and_admin_errors_point_at_their_line(table, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(BASE + "\n" + table, "q.toml")
    assert any(message in e for e in info.value.errors), info.value.errors


def _policy(quota: str):
    return parse_policy(BASE + "\n[[quota]]\nname = \"q\"\n" + quota)


def test_user_quotas_are_per_user():
    policy = _policy('users = ["*"]\nmax_queues = 2\n')
    held = [Holding(1000, queues=2), Holding(1001, queues=1)]
    refused = quotas.check(policy, ALICE, held, queues=1)
    assert refused is not None and refused.code == quotas.QUOTA_QUEUES and "holds 2" in refused.reason
    assert quotas.check(policy, BOB, held, queues=1) is None  # bob's own budget still has room


def test_group_quotas_are_shared_by_members():
    policy = _policy('groups = ["xsk"]\nmax_umem = "8MiB"\n')
    held = [Holding(1000, frozenset({27}), frozenset({"xsk"}), umem=6 << 20)]
    refused = quotas.check(policy, BOB, held, umem=4 << 20)
    assert refused is not None and refused.code == quotas.QUOTA_UMEM
    assert quotas.check(policy, BOB, held, umem=2 << 20) is None
    outsider = Peer(2000, frozenset({2000}), "carol", frozenset({"carol"}))
    assert quotas.check(policy, outsider, held, umem=64 << 20) is None


def test_group_quota_by_gid_and_wildcard():
    by_gid = _policy('groups = ["27"]\nmax_queues = 1\n')
    assert quotas.check(by_gid, BOB, [Holding(1000, frozenset({27}), queues=1)], queues=1).code == "quota-queues"
    wildcard = _policy('groups = ["*"]\nmax_queues = 1\n')
    assert quotas.scopes(wildcard.quotas[0], ALICE) == [("group", "27"), ("group", "1000")]


def test_connection_quota():
    policy = _policy('users = [1000]\nmax_connections = 2\n')
    held = [Holding(1000, connections=1), Holding(1000, connections=1)]
    assert quotas.check(policy, ALICE, held, connections=1).code == quotas.QUOTA_CONNECTIONS
    assert quotas.check(policy, ALICE, held[:1], connections=1) is None


_IDS = st.sampled_from([0, 7, 27, 100, 1000, 1001])
_NAMES = st.sampled_from(["xsk", "alice", "27", "0100", "100", "é"])
_HOLDINGS = st.lists(st.builds(Holding, _IDS, st.frozensets(_IDS, max_size=3), st.frozensets(_NAMES, max_size=2),
                               st.integers(0, 4), st.integers(0, 1 << 30), st.integers(0, 3)), max_size=12)
_SCOPES = st.tuples(st.sampled_from(["user", "group"]),
                    st.one_of(_IDS.map(str), _NAMES, st.sampled_from(["007", "-1", "", "*"])))


@settings(max_examples=300, deadline=None)
@given(_HOLDINGS, _HOLDINGS, st.sets(st.integers(0, 11)), _SCOPES)
def test_an_index_of_holdings_counts_what_a_walk_of_them_counts(leases, pending, gone, scope):
    """The broker keeps its holdings indexed (Holdings) so that a quota judgement reads only what a scope counts;
    it must count exactly what a walk of every holding counts, however holdings come and go, and through a view
    joining two indexes (the leases' and the grants being made)."""
    table = Holdings(enumerate(leases))
    for i in gone:
        table.pop(i)
    replaced = Holding(1000, frozenset({100}), frozenset({"100"}), queues=2, umem=5)
    table[99] = Holding(27, frozenset({27}), frozenset({"xsk"}), queues=1)
    table[99] = replaced  # the first is no longer counted, under any of its marks
    waiting = Holdings((("w", i), h) for i, h in enumerate(pending))
    every = [*(h for i, h in enumerate(leases) if i not in gone), replaced, *pending]
    assert sorted(table.joined(waiting), key=repr) == sorted(every, key=repr)
    assert quotas.usage(scope, table.joined(waiting)) == quotas.usage(scope, every)


def test_rate_limiter_refills_with_time():
    policy = _policy('users = ["alice"]\nmax_requests_per_second = 2\n')
    limiter = RateLimiter()
    assert limiter.allow(policy, ALICE, 100.0) is None
    assert limiter.allow(policy, ALICE, 100.0) is None
    refused = limiter.allow(policy, ALICE, 100.0)
    assert refused is not None and refused.code == quotas.RATE_LIMITED
    assert limiter.allow(policy, BOB, 100.0) is None  # bob is not named by the quota
    assert limiter.allow(policy, ALICE, 100.5) is None  # half a second at 2/s buys one request
    limiter.forget_idle(1000.0)
    assert limiter.buckets == {}
