"""The decision function: every code, deny wins, matching, and which allow rule a refusal names."""

import pytest

from xskbroker.policy.decide import CODES, Decision, Peer, Request, decide, interface_matches, principal_matches
from xskbroker.policy.loader import parse_policy
from xskbroker.policy.model import DEFAULT_MAX_UMEM, KINDS, Policy, QueueSet, Rule

ALICE = Peer(uid=1000, gids=frozenset({1000, 27}), user="alice", groups=frozenset({"alice", "sudo"}))

POLICY = parse_policy(
    """\
version = 1

[[allow]]
name = "ci-consumers"
users = ["alice"]
interfaces = ["veth*", "eth1"]
queues = ["0-3", 7]
kinds = ["bound", "bare"]
max_queues = 2
max_umem = "16MiB"

[[deny]]
name = "never-eth0"
users = ["*"]
interfaces = ["eth0"]
""",
    "/etc/x.toml",
)


def rule(name: str = "r", action: str = "allow", **kw) -> Rule:
    kw.setdefault("users", frozenset({"*"}))
    kw.setdefault("groups", frozenset())
    kw.setdefault("interfaces", ("eth1",))
    return Rule(name=name, action=action, source=f"f:{len(name)}", **kw)  # type: ignore[arg-type]


def check(policy: Policy, request: Request, peer: Peer = ALICE) -> Decision:
    decision = decide(policy, peer, request)
    assert decision.allowed == (decision.code == "ok")
    assert decision.code in CODES
    return decision


def test_ok():
    d = check(POLICY, Request("veth3", (0, 7), "bare", 16 << 20))
    assert d.allowed and d.code == "ok"
    assert d.rule is not None and d.rule.name == "ci-consumers"
    assert d.as_dict() == {
        "allowed": True,
        "code": "ok",
        "rule": "ci-consumers",
        "source": "/etc/x.toml:3",
        "reason": "rule 'ci-consumers' (/etc/x.toml:3) allows bare on veth3 queues 0,7 for uid 1000 (alice)",
    }


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (
            Request("eth0", (0,)),
            "denied-by-rule",
            "rule 'never-eth0' (/etc/x.toml:12) denies bound on eth0 queues 0 to uid 1000 (alice)",
        ),
        (
            Request("eth2", (0,)),
            "interface-not-allowed",
            "rule 'ci-consumers' (/etc/x.toml:3) allows interfaces veth*, eth1, not eth2",
        ),
        (
            Request("eth1", (0,), "map"),
            "kind-not-allowed",
            "rule 'ci-consumers' (/etc/x.toml:3) allows kinds bound, bare, not map",
        ),
        (
            Request("eth1", (1, 5)),
            "queue-not-allowed",
            "rule 'ci-consumers' (/etc/x.toml:3) allows queues 0-3,7, not 5",
        ),
        (
            Request("eth1", (0, 1, 2)),
            "too-many-queues",
            "rule 'ci-consumers' (/etc/x.toml:3) allows at most 2 queues per grant, not 3",
        ),
        (
            Request("eth1", (0,), umem_bytes=(16 << 20) + 1),
            "umem-too-large",
            "rule 'ci-consumers' (/etc/x.toml:3) allows at most 16 MiB of UMEM per grant, not 16777217 B",
        ),
    ],
)
def test_refusal_codes(request_, code, reason):
    d = check(POLICY, request_)
    assert not d.allowed
    assert d.code == code
    assert d.reason == reason
    assert d.as_dict()["rule"] == ("never-eth0" if code == "denied-by-rule" else "ci-consumers")


def test_user_not_allowed_names_no_rule():
    d = check(POLICY, Request("eth1", (0,)), Peer(uid=1001, gids=frozenset({1001}), user="bob"))
    assert (d.allowed, d.code, d.rule) == (False, "user-not-allowed", None)
    assert d.reason == "no allow rule names uid 1001 (bob) or any of its groups"
    assert d.as_dict()["source"] is None


def test_empty_policy_denies_everything():
    d = check(Policy(), Request("eth1", (0,)))
    assert (d.code, d.rule) == ("user-not-allowed", None)
    assert "no allow rules" in d.reason


def test_deny_wins_over_any_allow():
    allow = rule("everything", users=frozenset({"*"}), interfaces=("*",), kinds=frozenset(KINDS))
    deny = rule("no-eth1", "deny", users=frozenset({"alice"}), kinds=frozenset(KINDS))
    assert check(Policy((allow,)), Request("eth1", (0,))).allowed
    for rules in ((allow, deny), (deny, allow)):
        d = check(Policy(rules), Request("eth1", (0,)))
        assert (d.code, d.rule) == ("denied-by-rule", deny)


def test_first_matching_deny_is_reported():
    d1 = rule("d1", "deny", kinds=frozenset(KINDS))
    d2 = rule("d2", "deny", kinds=frozenset(KINDS))
    assert check(Policy((d1, d2)), Request("eth1", (0,))).rule == d1


def test_deny_narrowed_by_queues_and_kinds():
    allow = rule("all", interfaces=("*",), kinds=frozenset(KINDS))
    deny = rule("no-map-q5", "deny", queues=QueueSet(((5, 5),)), kinds=frozenset({"map"}))
    policy = Policy((allow, deny))
    assert check(policy, Request("eth1", (5,), "bound")).allowed  # kind not denied
    assert check(policy, Request("eth1", (4,), "map")).allowed  # queue not denied
    assert check(policy, Request("eth1", (4, 5), "map")).code == "denied-by-rule"  # any queue in it
    assert check(policy, Request("eth2", (5,), "map")).allowed  # interface not denied


def test_deny_only_for_its_principal():
    allow = rule("all", interfaces=("*",))
    deny = rule("no-bob", "deny", users=frozenset({"bob"}), kinds=frozenset(KINDS))
    assert check(Policy((allow, deny)), Request("eth1", (0,))).allowed
    # the deny does apply to the principal it names (else "alice is allowed" would prove nothing)
    bob = Peer(uid=1001, gids=frozenset({1001}), user="bob", groups=frozenset({"bob"}))
    denied = check(Policy((allow, deny)), Request("eth1", (0,)), bob)
    assert (denied.code, denied.rule) == ("denied-by-rule", deny)


def test_first_accepting_allow_rule_wins():
    narrow = rule("narrow", queues=QueueSet(((0, 0),)))
    wide = rule("wide")
    assert check(Policy((narrow, wide)), Request("eth1", (1,))).rule == wide
    assert check(Policy((narrow, wide)), Request("eth1", (0,))).rule == narrow


def test_furthest_failure_is_reported():
    # "wrong-iface" fails at step 2, "few-queues" at step 5: the latter explains the refusal better.
    wrong_iface = rule("wrong-iface", interfaces=("eth9",))
    few_queues = rule("few-queues", max_queues=1)
    wrong_user = rule("wrong-user", users=frozenset({"bob"}))
    policy = Policy((wrong_user, wrong_iface, few_queues))
    d = check(policy, Request("eth1", (0, 1)))
    assert (d.code, d.rule) == ("too-many-queues", few_queues)


def test_furthest_failure_ties_go_to_the_first_rule():
    first = rule("first", queues=QueueSet(((0, 0),)))
    second = rule("second", queues=QueueSet(((1, 1),)))
    d = check(Policy((first, second)), Request("eth1", (5,)))
    assert (d.code, d.rule) == ("queue-not-allowed", first)


def test_only_principal_failures_report_no_rule():
    policy = Policy(
        (rule("a", users=frozenset({"bob"})), rule("b", groups=frozenset({"wheel"}), users=frozenset()))
    )
    d = check(policy, Request("eth1", (0,)))
    assert (d.code, d.rule) == ("user-not-allowed", None)


def test_umem_limit_is_inclusive():
    capped = Policy((rule("capped", max_umem=4096),))
    assert check(capped, Request("eth1", (0,), umem_bytes=4096)).allowed
    assert check(capped, Request("eth1", (0,), umem_bytes=4097)).code == "umem-too-large"


def test_a_rule_without_max_umem_caps_a_grant_at_the_default():
    unset = Policy((rule("unset"),))
    assert rule("unset").umem_limit == DEFAULT_MAX_UMEM == 256 << 20
    assert check(unset, Request("eth1", tuple(range(64)), umem_bytes=DEFAULT_MAX_UMEM)).allowed
    d = check(unset, Request("eth1", tuple(range(126)), umem_bytes=126 << 32))  # 126 queues x 4 GiB
    assert d.code == "umem-too-large"
    assert "at most 256 MiB of UMEM per grant (the default: it sets no max_umem), not 504 GiB" in d.reason
    d = check(unset, Request("eth1", (0,), umem_bytes=DEFAULT_MAX_UMEM + 4096))
    assert d.code == "umem-too-large"


def test_a_rule_may_allow_more_umem_than_the_default():
    big = Policy((rule("big", max_umem=1 << 30),))
    assert rule("big", max_umem=1 << 30).umem_limit == 1 << 30
    assert check(big, Request("eth1", (0,), umem_bytes=1 << 30)).allowed
    assert check(big, Request("eth1", (0, 1), umem_bytes=2 << 30)).code == "umem-too-large"  # the total counts


def test_the_default_umem_cap_applies_to_files_that_omit_max_umem():
    policy = parse_policy('version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n', "p.toml")
    assert policy.rules[0].max_umem is None and policy.rules[0].umem_limit == DEFAULT_MAX_UMEM
    assert check(policy, Request("eth1", (0,), umem_bytes=1 << 30)).code == "umem-too-large"


def test_default_kind_is_bound_only():
    policy = Policy((rule("plain"),))
    assert check(policy, Request("eth1", (0,))).allowed
    assert check(policy, Request("eth1", (0,), "bare")).code == "kind-not-allowed"


@pytest.mark.parametrize(
    ("users", "groups", "peer", "matches"),
    [
        ({"*"}, set(), Peer(5, frozenset()), True),
        (set(), {"*"}, Peer(5, frozenset()), True),
        ({"alice"}, set(), ALICE, True),
        ({"1000"}, set(), ALICE, True),  # numeric uid
        ({"1000"}, set(), Peer(1000, frozenset()), True),  # uid with no name
        ({"alice"}, set(), Peer(1000, frozenset()), False),  # a name needs the caller to resolve it
        ({"bob"}, set(), ALICE, False),
        (set(), {"sudo"}, ALICE, True),  # group by name
        (set(), {"27"}, ALICE, True),  # group by gid
        (set(), {"27"}, Peer(5, frozenset({27})), True),  # gid with no name
        (set(), {"wheel", "4"}, ALICE, False),
        ({"bob"}, {"sudo"}, ALICE, True),  # users and groups are alternatives
    ],
)
def test_principal_matching(users, groups, peer, matches):
    r = rule(users=frozenset(users), groups=frozenset(groups))
    assert principal_matches(r, peer) is matches


@pytest.mark.parametrize(
    ("iface", "matches"),
    [("veth0", True), ("veth", True), ("eth1", True), ("eth10", False), ("VETH0", False), ("xveth0", False)],
)
def test_interface_globs(iface, matches):
    assert interface_matches(rule(interfaces=("veth*", "eth1")), iface) is matches


def test_glob_character_classes():
    r = rule(interfaces=("eth[0-3]", "ens?"))
    assert interface_matches(r, "eth2") and interface_matches(r, "ens5")
    assert not interface_matches(r, "eth4") and not interface_matches(r, "ens10")
