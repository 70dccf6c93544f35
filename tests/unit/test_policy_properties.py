"""Hypothesis properties of the decision function and the value types."""

from hypothesis import given
from hypothesis import strategies as st

from xskbroker.policy.decide import CODES, Peer, Request, decide
from xskbroker.policy.model import KINDS, Policy, QueueSet, Rule
from xskbroker.policy.sizes import format_size, parse_size

NAMES = st.sampled_from(["alice", "bob", "xsk", "0", "1000", "27", "*"])
IFACES = st.sampled_from(["eth0", "eth1", "veth0", "veth12", "lo"])
GLOBS = st.sampled_from(["eth0", "eth*", "veth?", "veth*", "*", "e[a-z]h1"])
QUEUE = st.integers(min_value=0, max_value=16)
RANGES = st.lists(st.tuples(QUEUE, QUEUE).map(sorted).map(tuple), min_size=1, max_size=3)
QUEUE_SETS = st.one_of(st.just(QueueSet(None)), RANGES.map(lambda r: QueueSet(tuple(r))))
KIND_SETS = st.sets(st.sampled_from(KINDS), min_size=1).map(frozenset)


@st.composite
def rules(draw, action=None):
    action = action or draw(st.sampled_from(["allow", "deny"]))
    return Rule(
        name=f"r{draw(st.integers(0, 10**6))}",
        action=action,
        users=frozenset(draw(st.sets(NAMES, max_size=2))),
        groups=frozenset(draw(st.sets(NAMES, max_size=2))),
        interfaces=tuple(draw(st.lists(GLOBS, min_size=1, max_size=2))),
        queues=draw(QUEUE_SETS),
        kinds=draw(KIND_SETS),
        max_queues=draw(st.none() | st.integers(1, 4)) if action == "allow" else None,
        max_umem=draw(st.none() | st.integers(1, 1 << 20)) if action == "allow" else None,
        source="f:1",
    )


policies = st.lists(rules(), max_size=6).map(lambda rs: Policy(tuple(rs)))
peers = st.builds(
    Peer,
    uid=st.sampled_from([0, 27, 1000, 4242]),
    gids=st.sets(st.sampled_from([0, 27, 1000]), max_size=2).map(frozenset),
    user=st.none() | st.sampled_from(["alice", "bob"]),
    groups=st.sets(st.sampled_from(["xsk", "sudo"]), max_size=2).map(frozenset),
)
requests = st.builds(
    Request,
    interface=IFACES,
    queues=st.lists(QUEUE, min_size=1, max_size=5).map(tuple),
    kind=st.sampled_from([*KINDS, "bogus"]),
    umem_bytes=st.integers(0, 1 << 21),
)


@given(policies, peers, requests)
def test_decide_is_total_and_consistent(policy, peer, request):
    d = decide(policy, peer, request)
    assert d.allowed == (d.code == "ok")
    assert d.code in CODES
    assert (d.rule is None) == (d.code == "user-not-allowed")
    if d.rule is not None:
        assert d.rule in policy.rules
        assert d.rule.action == ("deny" if d.code == "denied-by-rule" else "allow")
        assert d.rule.name in d.reason and d.rule.source in d.reason
    assert set(d.as_dict()) == {"allowed", "code", "rule", "source", "reason"}


def matching_deny(peer: Peer, request: Request) -> Rule:
    return Rule(
        name="deny-it",
        action="deny",
        users=frozenset({str(peer.uid)}),
        groups=frozenset(),
        interfaces=(request.interface,),
        queues=QueueSet(((request.queues[0], request.queues[0]),)),
        kinds=frozenset({request.kind}),
        source="g:1",
    )


@given(policies, peers, requests, st.integers(0, 6))
def test_a_matching_deny_always_denies(policy, peer, request, position):
    deny = matching_deny(peer, request)
    rules = list(policy.rules)
    rules.insert(min(position, len(rules)), deny)
    d = decide(Policy(tuple(rules)), peer, request)
    assert not d.allowed and d.code == "denied-by-rule"


@given(policies, st.lists(rules("deny"), max_size=3), peers, requests)
def test_adding_deny_rules_never_turns_a_deny_into_an_allow(policy, denies, peer, request):
    before = decide(policy, peer, request)
    after = decide(Policy(policy.rules + tuple(denies)), peer, request)
    if not before.allowed:
        assert not after.allowed


@given(policies, st.lists(rules("allow"), max_size=3), peers, requests)
def test_appending_allow_rules_never_turns_an_allow_into_a_deny(policy, allows, peer, request):
    before = decide(policy, peer, request)
    after = decide(Policy(policy.rules + tuple(allows)), peer, request)
    if before.allowed:
        assert after.allowed and after.rule == before.rule


@given(RANGES, st.lists(QUEUE, max_size=8))
def test_queue_set_normalisation_keeps_membership(ranges, queues):
    qs = QueueSet(tuple(ranges))
    for q in [*queues, 0, 16, 17]:
        assert qs.contains(q) == any(lo <= q <= hi for lo, hi in ranges)
    assert qs.covers(queues) == (not qs.missing(queues))
    # The printed form is what a policy file would say, so it must denote the same set.
    reparsed = QueueSet(
        tuple((int(part.split("-")[0]), int(part.split("-")[-1])) for part in str(qs).split(","))
    )
    assert reparsed == qs


@given(st.integers(0, 1 << 40))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n).replace(" ", "")) == n
