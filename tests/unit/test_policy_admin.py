"""policy.admin.is_admin: the [admin] table judged against a peer (pure; "*" is not a wildcard there)."""

from __future__ import annotations

import pytest

from xskbroker.policy import Admin, Peer, parse_policy
from xskbroker.policy.admin import is_admin

ADMIN = Admin(users=frozenset({"0", "alice"}), groups=frozenset({"netadmin", "2000"}))


@pytest.mark.parametrize(("peer", "expected"), [
    (Peer(0, frozenset({0})), True),  # by uid
    (Peer(1000, frozenset({1000}), user="alice"), True),  # by name
    (Peer(1001, frozenset({1001}), user="bob", groups=frozenset({"netadmin"})), True),  # by group name
    (Peer(1002, frozenset({1002, 2000})), True),  # by gid
    (Peer(1003, frozenset({1003}), user="bob", groups=frozenset({"users"})), False),
    (Peer(1004, frozenset({1004}), user=None), False),
])
def test_admins(peer: Peer, expected: bool) -> None:
    assert is_admin(ADMIN, peer) is expected


def test_a_star_is_a_name_not_a_wildcard() -> None:
    star = Admin(users=frozenset({"*"}), groups=frozenset({"*"}))
    assert not is_admin(star, Peer(1000, frozenset({1000}), user="alice", groups=frozenset({"alice"})))
    assert is_admin(star, Peer(1000, frozenset({1000}), user="*"))


def test_the_default_admin_is_root_only() -> None:
    policy = parse_policy("version = 1\n")
    assert is_admin(policy.admin, Peer(0, frozenset({0})))
    assert not is_admin(policy.admin, Peer(1000, frozenset({0})))  # gid 0 is not uid 0
