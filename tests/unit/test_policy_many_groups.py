"""A peer chooses how many supplementary groups it has (65,536 in a user namespace with subordinate gids; the
broker judges at most broker.peer.MAX_PEER_GROUPS): matching the policy's group entries must cost the entries,
not the peer's groups, and give what it gave before; a peer's group names are the policy's it holds."""

from __future__ import annotations

import grp
import time

from hypothesis import given
from hypothesis import strategies as st

from xskbroker.broker.peer import GroupNames
from xskbroker.policy import Holding, Peer
from xskbroker.policy.admin import is_admin
from xskbroker.policy.decide import in_groups
from xskbroker.policy.model import Admin

ENTRIES = st.frozensets(st.sampled_from(["0", "7", "007", "70", "staff", "x", "²", "1000", " 7", "+7"]) |
                        st.integers(0, 80).map(str), max_size=6)
GIDS = st.frozensets(st.integers(0, 80), max_size=12)
NAMES = st.frozensets(st.sampled_from(["staff", "x", "7", "kvm"]), max_size=3)


@given(ENTRIES, GIDS, NAMES)
def test_group_entries_match_as_they_did_when_every_gid_was_spelled_out(entries: frozenset[str],
                                                                        gids: frozenset[int],
                                                                        names: frozenset[str]) -> None:
    peer = Peer(1000, gids, "u", names)
    # a numeric entry is a gid only, never also a group named so (test_policy_review_findings)
    before = (any(g in entries and not (g.isascii() and g.isdigit() and str(int(g)) == g) for g in peer.groups)
              or any(str(g) in entries for g in peer.gids))
    assert in_groups(entries, peer) == before
    assert is_admin(Admin(users=frozenset(), groups=entries), peer) == before


def test_a_peer_in_65536_groups_costs_a_decision_its_entries_only() -> None:
    peer = Peer(1000, frozenset(range(100_000, 165_536)), "u", frozenset())
    # this thread's CPU time, not the wall clock: a loaded CI machine may take the CPU away mid-loop
    started = time.thread_time()
    for _ in range(100):
        assert in_groups(frozenset({"7", "staff"}), peer) is False
    assert time.thread_time() - started < 0.05  # spelling out 65,536 gids took ~10 ms a call


def test_group_names_are_the_policys_the_peer_holds() -> None:
    staff = grp.getgrnam("staff").gr_gid
    names = GroupNames({"root", "staff", "no-such-group-xs", "0"})
    assert names.of(frozenset({0, staff, 400_000})) == {"root", "staff"}
    assert names.of(frozenset({400_000})) == frozenset()
    names.use(frozenset({"staff"}))  # a reload
    assert names.of(frozenset({0, staff})) == {"staff"}


def test_a_quota_group_entry_of_unicode_digits_is_a_name_not_a_crash() -> None:
    assert not Holding(1, frozenset({2})).in_group("²")  # isdigit() says yes, int() raised ValueError
