"""Fair shares of the broker's connection table (policy.quota.admit_connection), pure."""

from __future__ import annotations

from xskbroker.policy.quota import admit_connection


def test_room_left_admits_without_eviction() -> None:
    assert admit_connection({1: 3}, 2, 16) == admit_connection({}, 2, 16)
    assert admit_connection({1: 3}, 2, 16).admit and admit_connection({1: 3}, 2, 16).evict_uid is None


def test_a_hog_makes_room_for_a_newcomer() -> None:
    got = admit_connection({4100: 480, 4101: 480}, 65534, 1024)  # 960 = the non-admin share (1024 - 64)
    assert got.admit and got.evict_uid == 4101


def test_equal_shares_are_not_taken_from_each_other() -> None:
    got = admit_connection({4100: 480, 4101: 480}, 4100, 1024)
    assert not got.admit and "4100" in got.reason


def test_two_hogs_converge_to_equal_shares() -> None:
    counts = {4100: 0, 4101: 0}
    for i in range(4000):  # both keep opening, alternately; evictions keep them within one of each other
        uid = 4100 + i % 2
        got = admit_connection(counts, uid, 64)
        if got.admit:
            counts[uid] += 1
            if got.evict_uid is not None:
                counts[got.evict_uid] -= 1
    assert sum(counts.values()) == 60 and abs(counts[4100] - counts[4101]) <= 1


def test_admins_keep_a_reserve_and_take_room_from_non_admins_only() -> None:
    full = {4100: 960}
    assert admit_connection(full, 4101, 1024).evict_uid == 4100
    assert admit_connection(full, 4100, 1024).admit is False  # the non-admin share is used up
    got = admit_connection(full, 0, 1024, admin=True, admins=frozenset({0}))
    assert got.admit and got.evict_uid is None  # the reserve
    table = {4100: 1000, 0: 24}
    got = admit_connection(table, 0, 1024, admin=True, admins=frozenset({0}))
    assert got.admit and got.evict_uid == 4100
    assert not admit_connection({0: 1024}, 7, 1024, admins=frozenset({0})).admit
