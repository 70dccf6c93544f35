"""Policy files that loaded without error but meant something else, and `policy explain` judging a peer other than
the broker would (review findings; each test failed before its fix)."""

from __future__ import annotations

import argparse
import grp
import pwd
from pathlib import Path

import pytest

from xskbroker.broker.peer import GroupNames
from xskbroker.policy import Peer, PolicyError, RateLimiter, Request, decide, parse_policy
from xskbroker.policy.admin import is_admin
from xskbroker.policy.cli import add_policy_parser
from xskbroker.policy.model import Admin

BASE = 'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n'
ALICE = Peer(1000, frozenset({1000}), "alice", frozenset({"alice"}))
UNKNOWN_UID = "3999999"  # assumed to have no passwd entry


def _rate_policy(rate: str) -> str:
    return BASE + f'[[quota]]\nname = "q"\nusers = ["*"]\nmax_requests_per_second = {rate}\n'


# --- max_requests_per_second ------------------------------------------------------------------------------------

def test_a_rate_below_one_per_second_still_lets_requests_through() -> None:
    # 0.5/s is one request every two seconds; a bucket of "one second's worth" (0.5 token) never held a whole one,
    # so every message of every peer the quota names was refused, forever
    policy = parse_policy(_rate_policy("0.5"))
    limiter = RateLimiter()
    assert limiter.allow(policy, ALICE, 100.0) is None
    refused = limiter.allow(policy, ALICE, 100.5)
    assert refused is not None and refused.code == "rate-limited"
    assert limiter.allow(policy, ALICE, 102.0) is None  # two seconds buy one more
    assert limiter.allow(policy, ALICE, 102.0) is not None  # and no burst beyond one request


@pytest.mark.parametrize("rate", ["nan", "inf", "+inf", "-nan"])
def test_a_rate_that_is_not_a_finite_number_is_refused(rate: str) -> None:
    # TOML floats include nan and inf: nan compared false with everything, so it passed "> 0" and then limited nothing
    with pytest.raises(PolicyError, match="max_requests_per_second"):
        parse_policy(_rate_policy(rate))


# --- numeric entries are ids, not names -------------------------------------------------------------------------

def test_a_numeric_user_entry_is_a_uid_not_a_login_named_so() -> None:
    # users = [1000] is uid 1000; a login *named* "1000" (uid 2000) is someone else
    policy = parse_policy('version = 1\n[[allow]]\nname = "a"\nusers = [1000]\ninterfaces = ["eth1"]\n')
    named_1000 = Peer(2000, frozenset({2000}), "1000")
    assert not decide(policy, named_1000, Request("eth1", (0,))).allowed
    assert decide(policy, Peer(1000, frozenset({1000}), "alice"), Request("eth1", (0,))).allowed
    assert not is_admin(Admin(users=frozenset({"1000"})), named_1000)


def test_a_numeric_group_entry_is_a_gid_not_a_group_named_so() -> None:
    # groups = [1000] is gid 1000; the broker resolves the policy's group entries as names too, so a group named
    # "1000" (gid 2000) reached the peer's names and matched
    policy = parse_policy('version = 1\n[[allow]]\nname = "a"\ngroups = [1000]\ninterfaces = ["eth1"]\n')
    in_named_1000 = Peer(3000, frozenset({2000}), "bob", frozenset({"1000"}))
    assert not decide(policy, in_named_1000, Request("eth1", (0,))).allowed
    assert decide(policy, Peer(3000, frozenset({1000}), "bob"), Request("eth1", (0,))).allowed
    assert not is_admin(Admin(users=frozenset(), groups=frozenset({"1000"})), in_named_1000)


# --- policy explain judges the peer the broker would -----------------------------------------------------------

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xskbroker")
    add_policy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_explain_names_groups_as_the_broker_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # two group names for one gid (a local group and its LDAP twin, an alias): NSS gives "xsk" for gid 4243, and
    # "xsk-ci" resolves to 4243 as well. The broker names a peer's groups by the policy's names (GroupNames), so a
    # deny on "xsk-ci" refuses a member of 4243; explain named the gids back (getgrgid) and said ALLOW
    entries = {"xsk": 4243, "xsk-ci": 4243}

    def getgrnam(name: str) -> grp.struct_group:
        if name not in entries:
            raise KeyError(name)
        return grp.struct_group((name, "x", entries[name], []))

    def getgrgid(gid: int) -> grp.struct_group:
        if gid != 4243:
            raise KeyError(gid)
        return grp.struct_group(("xsk", "x", gid, []))

    monkeypatch.setattr(grp, "getgrnam", getgrnam)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[[allow]]\nname = "all"\nusers = ["*"]\ninterfaces = ["eth1"]\n'
                    '[[deny]]\nname = "not-ci"\ngroups = ["xsk-ci"]\ninterfaces = ["eth1"]\n')
    policy = parse_policy(path.read_text(), str(path))
    gids = frozenset({4243})
    broker_peer = Peer(int(UNKNOWN_UID), gids, None, GroupNames(policy.group_names).of(gids))
    assert decide(policy, broker_peer, Request("eth1", (0,))).code == "denied-by-rule"
    argv = ["policy", "explain", "--policy", str(path), "--user", UNKNOWN_UID, "--group", "4243",
            "--interface", "eth1", "--queue", "0"]
    assert _run(argv) == 1
    assert "not-ci" in capsys.readouterr().out


def test_explain_names_the_user_as_the_broker_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # two login names for one uid ("toor" beside "root"): the broker names a peer by its uid (getpwuid), so a rule
    # naming "toor" never names it; explain took the name typed and said ALLOW
    real_getpwnam, real_getpwuid = pwd.getpwnam, pwd.getpwuid
    root = real_getpwuid(0)
    toor = pwd.struct_passwd(("toor", *root[1:]))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: toor if name == "toor" else real_getpwnam(name))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: root if uid == 0 else real_getpwuid(uid))
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[[allow]]\nname = "toor-only"\nusers = ["toor"]\ninterfaces = ["eth1"]\n')
    policy = parse_policy(path.read_text(), str(path))
    broker_peer = Peer(0, frozenset({0}), pwd.getpwuid(0).pw_name)
    assert not decide(policy, broker_peer, Request("eth1", (0,))).allowed
    argv = ["policy", "explain", "--policy", str(path), "--user", "toor", "--interface", "eth1", "--queue", "0"]
    assert _run(argv) == 1
    assert "user-not-allowed" in capsys.readouterr().out


# --- huge numbers -----------------------------------------------------------------------------------------------

HUGE = "9" * 4301  # past Python's limit on converting decimal text to int (and back)
HUGE_HEX = "0x" + "f" * 4000  # TOML reads hex without that limit; printing it in decimal then hits it


@pytest.mark.parametrize("extra", [f"queues = [{HUGE}]", f'queues = ["{HUGE}"]', f'queues = ["0-{HUGE}"]',
                                   f"users = [{HUGE_HEX}]", f"max_queues = {HUGE}"])
def test_a_huge_number_is_a_policy_error_not_a_crash(extra: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # a ValueError out of the loader is no PolicyError: `policy check` died with a traceback, the broker's start did
    # not fall back to its last good copy, and a SIGHUP reload escaped the handler that keeps the running policy
    text = 'version = 1\n[[allow]]\nname = "a"\ngroups = ["*"]\ninterfaces = ["eth1"]\n' + extra + "\n"
    with pytest.raises(PolicyError):
        parse_policy(text, "p.toml")
    path = tmp_path / "policy.toml"
    path.write_text(text)
    assert _run(["policy", "check", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:")


@pytest.mark.parametrize("who_and_queues", [
    f'users = ["*"]\nqueues = [0, {HUGE_HEX}]\n',  # loaded; a refusal printing the rule's queues raised ValueError
    f'groups = ["{HUGE}"]\nqueues = [0]\n',  # loaded; matching read the entry as a gid, int() of 4301 digits
])
def test_a_policy_that_loads_decides_every_request(who_and_queues: str) -> None:
    try:
        policy = parse_policy('version = 1\n[[allow]]\nname = "a"\ninterfaces = ["eth1"]\n' + who_and_queues)
    except PolicyError:
        return  # refusing it at load is as good
    assert not decide(policy, ALICE, Request("eth1", (5,))).allowed


def test_explain_prints_every_cap_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a max_umem written in hex loaded, and explain's "max_umem: N B" raised ValueError printing it
    path = tmp_path / "policy.toml"
    path.write_text(BASE + f"max_umem = {HUGE_HEX}\n")
    argv = ["policy", "explain", "--policy", str(path), "--user", UNKNOWN_UID, "--interface", "eth1", "--queue", "0"]
    assert _run(argv) in (0, 2)  # decided, or the policy refused as invalid: never a traceback
    capsys.readouterr()


@pytest.mark.parametrize("text", [
    BASE + f"kinds = [{HUGE_HEX}]\n",  # the message printed repr() of the bad kind
    BASE + f'[[quota]]\nname = "q"\nusers = ["*"]\nmax_requests_per_second = {HUGE_HEX}\n',  # float() overflowed
    f"version = {HUGE_HEX}\n",  # "unsupported version" printed it
])
def test_an_integer_over_64_bits_is_a_policy_error(text: str) -> None:
    # TOML says an integer that does not fit 64 bits is an error; tomllib reads hex of any length, and the messages
    # that print a bad value, or float() of a rate, then raised instead of reporting it
    with pytest.raises(PolicyError, match="64 bits"):
        parse_policy(text, "p.toml")
