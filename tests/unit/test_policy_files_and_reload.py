"""Loading and reloading the policy, and `policy explain` against the broker: a policy nested too deeply
escaped the loader as RecursionError (a reload ended the broker, a start never fell back to the last good copy); a
drop-in linked into a directory anyone may write was believed; a file under an unsafe directory was opened all the
same; a huge file was read whole; and explain said ALLOW (or DENY) where the broker decides otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.unit.test_policy_cli import run
from tests.unit.test_policy_trust import errors_of
from xskbroker.broker import lastgood
from xskbroker.broker.peer import PeerInfo
from xskbroker.broker.service import Deferred
from xskbroker.policy import PolicyError, load_policy, parse_policy
from xskbroker.policy import loader as policy_loader
from xskbroker.policy.decide import CODES
from xskbroker.wire import protocol as proto

from .conftest import GOOD
from .service_rig import ALICE, POLICY, SMALL, Rig, finish, make_rig

NESTED = "version = 1\nx = " + "[" * 2000 + "]" * 2000 + "\n"


# ---- a policy nested too deeply --------------------------------------------------------------------------------

def test_a_deeply_nested_policy_is_a_policy_error_not_a_crash(home: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(NESTED, "p.toml")
    assert info.value.errors == ["p.toml:2: TOML nested too deeply (arrays or inline tables inside one another)"]
    (home / "policy.toml").write_text(NESTED)
    assert run(["policy", "check", str(home / "policy.toml")]) == 1
    assert "nested too deeply" in capsys.readouterr().err


def test_a_deeply_nested_policy_starts_the_last_good_copy_and_a_reload_keeps_the_running_one(
        home: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    keeper = lastgood.PolicyKeeper(str(home / "policy.toml"), str(state))
    assert [r.name for r in keeper.start().rules] == ["a"]
    (home / "policy.toml").write_text(NESTED)
    with pytest.raises(PolicyError):  # the server's reload handler keeps the running policy on PolicyError alone
        keeper.reload(str(home / "policy.toml"))
    assert keeper.describe()["reload_errors"][0].endswith("TOML nested too deeply (arrays or inline tables inside "
                                                         "one another)")
    restarted = lastgood.PolicyKeeper(str(home / "policy.toml"), str(state))
    assert [r.name for r in restarted.start().rules] == ["a"] and restarted.fallback


# ---- what the loader opens -------------------------------------------------------------------------------------

def test_a_drop_in_linked_into_a_writable_directory_is_refused(home: Path, tmp_path: Path) -> None:
    """docs/policy.md: every directory above a drop-in must be trusted. The link's target's were not checked: whoever
    could write them could swap the file it names (another root-owned policy, a device, a mount that hangs)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("admin.toml", "more.toml"):
        (shared / name).write_text('version = 1\n[admin]\nusers = ["*"]\n' if name == "admin.toml" else
                                   'version = 1\n[[deny]]\nusers = ["*"]\ninterfaces = ["eth9"]\n')
        (shared / name).chmod(0o644)
    shared.chmod(0o777)
    dropin = home / "policy.d"
    dropin.mkdir(mode=0o755)
    (dropin / "admin.toml").symlink_to(shared / "admin.toml")
    (dropin / "more.toml").symlink_to(shared / "more.toml")
    errors = errors_of(home / "policy.toml")
    assert len(errors) == 1 and errors[0].startswith(f"{shared}: unsafe: "), errors  # named once for both links


@pytest.mark.parametrize("middle", ["world-writable", "sticky-with-anothers-link"])
def test_a_drop_in_linked_through_a_link_in_a_writable_directory_is_refused(home: Path, tmp_path: Path,
                                                                             middle: str) -> None:
    """policy.d/admin.toml -> hop/admin.toml -> safe/admin.toml: only the directories above the first link and
    above the file were checked, and whoever can write hop (or owns the link there) points the chain anywhere."""
    safe, hop = tmp_path / "safe", tmp_path / "hop"
    safe.mkdir()
    safe.chmod(0o755)
    (safe / "admin.toml").write_text('version = 1\n[admin]\nusers = ["*"]\n')
    (safe / "admin.toml").chmod(0o644)
    hop.mkdir()
    (hop / "admin.toml").symlink_to(safe / "admin.toml")
    if middle == "world-writable":
        hop.chmod(0o777)
        expected = f"{hop}: unsafe: "
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a link to another uid")
        hop.chmod(0o1777)
        os.lchown(hop / "admin.toml", 65534, 65534)
        expected = f"{hop / 'admin.toml'}: unsafe: a symbolic link owned by uid 65534"
    dropin = home / "policy.d"
    dropin.mkdir(mode=0o755)
    (dropin / "admin.toml").symlink_to(hop / "admin.toml")
    errors = errors_of(home / "policy.toml")
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_a_drop_in_linked_through_links_in_trusted_directories_is_read(home: Path, tmp_path: Path) -> None:
    safe = tmp_path / "safe"
    safe.mkdir()
    safe.chmod(0o755)
    (safe / "more.toml").write_text('version = 1\n[[deny]]\nusers = ["*"]\ninterfaces = ["eth9"]\n')
    (safe / "more.toml").chmod(0o644)
    (safe / "hop.toml").symlink_to("more.toml")  # relative, resolved from the link's own directory
    (safe / "sub").mkdir(mode=0o755)
    (safe / "sub" / "hop2.toml").symlink_to("../hop.toml")
    dropin = home / "policy.d"
    dropin.mkdir(mode=0o755)
    (dropin / "more.toml").symlink_to(safe / "sub" / "hop2.toml")
    assert len(load_policy(home / "policy.toml").rules) == 2  # the main file's allow, the drop-in's deny


def test_nothing_under_an_unsafe_directory_is_opened(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can write a directory above the policy chooses what its path names: a device whose open does
    something, a FUSE file whose open never returns (the broker's loop, as root). The policy is refused anyway."""
    (home / "policy.d").mkdir(mode=0o755)
    (home / "policy.d" / "x.toml").write_text(GOOD.replace('"a"', '"b"'))
    home.chmod(0o777)
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(policy_loader.os, "open", spy)
    errors = errors_of(home / "policy.toml")
    assert errors == [e for e in errors if e.startswith(f"{home}: unsafe: ")] and errors
    assert not [p for p in opened if p.endswith(".toml") or p.endswith("policy.d")], opened


def test_a_huge_policy_file_is_refused_unread(home: Path) -> None:
    path = home / "policy.toml"
    with path.open("a") as f:
        f.write(("# " + "x" * 1000 + "\n") * (policy_loader.MAX_FILE_BYTES // 1000 + 1))
    errors = errors_of(path)
    assert errors == [f"{path}: larger than {policy_loader.MAX_FILE_BYTES >> 20} MiB, which no policy needs: not "
                      "read"]


# ---- explain decides as the broker does -------------------------------------------------------------------------

DIFF_POLICY = """\
version = 1
[[allow]]
name = "any-queue"
users = [1000]
interfaces = ["veth0"]
kinds = ["bound", "bare"]
max_umem = "2MiB"
[[allow]]
name = "vm"
users = [1001]
cgroups = ["/machine.slice/vm-a*"]
interfaces = ["veth1"]
queues = [0]
kinds = ["bare", "bound"]
[[allow]]
name = "maps"
groups = [1000]
interfaces = ["vmap*"]
kinds = ["map"]
[[deny]]
name = "no-q3"
users = ["*"]
interfaces = ["veth0"]
queues = [3]
[[deny]]
name = "not-vm-b"
users = ["*"]
cgroups = ["/machine.slice/vm-b*"]
interfaces = ["veth1"]
"""

VM_A = "/machine.slice/vm-a.scope"
CASES = [  # (uid, cgroup, interface, queues, kind, umem_size)
    (1000, None, "veth0", (0,), "bound", 1 << 20),
    (1000, None, "veth0", (0, 1), "bound", 1 << 20),  # over 2 MiB with its rings
    (1000, None, "veth0", (0, 3), "bound", 1 << 20),  # denied queue 3
    (1000, None, "veth0", (0, 1), "bare", 4 << 20),  # a bare grant pins nothing of the broker's
    (1000, None, "veth0", (0, 0), "bare", 256 << 10),  # duplicate queues: not a request the broker takes
    (1000, None, "veth0", (70000,), "bound", 256 << 10),  # no such queue id
    (1000, None, "veth1", (0,), "bound", 1 << 20),
    (1001, None, "veth1", (0,), "bare", 1 << 20),  # cgroup unknown
    (1001, VM_A, "veth1", (0,), "bare", 8 << 20),
    (1001, VM_A, "veth1", (1,), "bare", 1 << 20),
    (1001, "/machine.slice/vm-b.scope", "veth1", (0,), "bare", 1 << 20),
    (1000, None, "vmap0", (0,), "map", 1 << 20),
    (1000, None, "vmap0", (0,), "bound", 1 << 20),
    (1002, None, "veth0", (0,), "bound", 1 << 20),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}-{c[1]}" for c in CASES])
def test_explain_decides_as_the_broker_does(case: tuple, tmp_path: Path,  # type: ignore[type-arg]
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The same peer and request, asked of the broker (its service, on a fake kernel) and of `policy explain` with the
    request's bytes as its help says to count them: the broker's policy answer (ok, a policy code, or bad-request
    when it never gets that far) is explain's. Explain ALLOWed a bare grant's UMEM nobody pins, refused it as
    too large, and ALLOWed queue ids the broker never takes."""
    uid, cgroup, interface, queues, kind, umem_size = case
    path = tmp_path / "policy.toml"
    path.write_text(DIFF_POLICY)
    geometry = proto.Geometry(umem_size=umem_size, fill=SMALL.fill, completion=SMALL.completion, rx=SMALL.rx,
                              tx=SMALL.tx)
    peer = PeerInfo(pid=4242, uid=uid, gid=uid, gids=frozenset({uid}), cgroup=cgroup, start=77)
    rig = make_rig(policy=load_policy(path))
    rig.kernel.procs[4242] = (uid, 77, None)
    try:
        reply, _ = rig.reply(peer, proto.Grant(interface, queues, kind=kind, geometry=geometry))
    finally:
        rig.service.close()
    broker = "ok" if reply["ok"] else reply["error"]["code"]
    assert broker in CODES or broker == "bad-request", reply  # a policy answer, not the fake kernel's

    pinned = (umem_size + geometry.ring_bytes) * len(queues)
    argv = ["policy", "explain", "--policy", str(path), "--user", str(uid), "--group", str(uid),
            "--interface", interface, "--kind", kind, "--umem", str(pinned), "--json"]
    argv += [a for q in queues for a in ("--queue", str(q))]
    argv += ["--cgroup", cgroup] if cgroup else []
    try:
        status = run(argv)
    except SystemExit as e:  # refused by an option's type: argparse's usage error
        status = e.code
    out = capsys.readouterr().out
    if broker == "bad-request":
        assert status == 2 and not out, out
    else:
        assert json.loads(out)["code"] == broker
        assert status == (0 if broker == "ok" else 1)


# ---- a grant in flight across a reload -------------------------------------------------------------------------

DENY_ALICE_VETH0 = POLICY + '\n[[deny]]\nname = "no-alice"\nusers = ["alice"]\ninterfaces = ["veth0"]\n'


@pytest.mark.parametrize("new", [DENY_ALICE_VETH0, "version = 1\n"], ids=["a-deny-added", "every-rule-gone"])
def test_a_grant_waiting_across_a_reload_that_denies_it_is_refused(new: str) -> None:
    """A bound grant waits for its queue (a socket the kernel lets go of late); meanwhile a reload denies it. It was
    judged once, before the wait, and granted after the reload: the new deny lost to the old decision."""
    rig = make_rig()
    rig.kernel.busy[0] = 3  # EBUSY three times: the grant waits on the server's timer
    try:
        out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
        assert isinstance(out, Deferred)
        rig.service.reload(parse_policy(new))
        reply = finish(rig, out)
        assert not reply["ok"] and reply["error"]["code"] in ("denied-by-rule", "user-not-allowed"), reply
        assert "reloaded while the grant waited" in reply["error"]["message"]
        assert len(rig.service.leases) == 0 and rig.kernel.left() == {} and not rig.kernel.slot_taken(7, 0)
        assert rig.events("grant")[-1]["decision"] == "deny"
    finally:
        rig.service.close()


def test_a_grant_waiting_across_a_reload_that_still_allows_it_is_made() -> None:
    rig = make_rig()
    rig.kernel.busy[0] = 3
    try:
        out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
        assert isinstance(out, Deferred)
        rig.service.reload(parse_policy(POLICY.replace('name = "alice-veths"', 'name = "renamed"')))
        reply = finish(rig, out)
        assert reply["ok"], reply
        assert rig.events("grant")[-1]["rule"] == "renamed" and not rig.service.judged
    finally:
        rig.service.close()


ONE_QUEUE_EACH = POLICY + '\n[[quota]]\nname = "one-each"\nusers = ["*"]\nmax_queues = 1\n'


def test_a_grant_waiting_across_a_reload_that_adds_a_quota_it_exceeds_is_refused() -> None:
    """Judged again after the wait by the new policy's rules, it was never judged by the quota the reload added:
    alice held one queue, the new quota allows one, and the grant that waited made it two."""
    rig = make_rig()
    try:
        assert rig.grant(interface="veth1")[0]["ok"]
        rig.kernel.busy[0] = 3
        out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
        assert isinstance(out, Deferred)
        rig.service.reload(parse_policy(ONE_QUEUE_EACH))
        reply = finish(rig, out)
        assert not reply["ok"] and reply["error"]["code"] == "quota-queues", reply
        assert "reloaded while the grant waited" in reply["error"]["message"]
        assert len(rig.service.leases) == 1 and len(rig.service.pending) == 0
        assert rig.events("grant")[-1]["decision"] == "deny" and rig.events("grant")[-1]["quota"]
    finally:
        rig.service.close()


def _bare_waiting(rig: Rig, memlock: int = 0) -> Deferred:
    """A bare grant of queues 0 and 1 on veth0 waiting on the timer: a slot held by a socket the broker closes."""
    first, _ = rig.grant(queues=(0,), kind="bare")
    rig.service.leases.remove(first["lease"])
    rig.service.closes_pending = lambda: True
    out = rig.ask(ALICE, proto.Grant("veth0", (0, 1), kind="bare", memlock=memlock))
    assert isinstance(out, Deferred) and out.step() is None
    rig.kernel.slots.pop((rig.kernel.maps[rig.service.programs[7].map_fd], 0))  # the broker's close is done
    return out


def test_a_bare_grant_waiting_across_a_reload_raises_memlock_only_as_far_as_the_new_rule_allows() -> None:
    """The raise was the old rule's (64 MiB) though the policy now in force allows 16 MiB; a quota that allows
    exactly what the grant asks for lets it through (its own queues counted once, not again as pending)."""
    rig = make_rig()
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    try:
        out = _bare_waiting(rig, memlock=32 << 20)
        rig.service.reload(parse_policy(POLICY.replace('raise_memlock = "64MiB"', 'raise_memlock = "16MiB"')
                                        + '\n[[quota]]\nname = "two"\nusers = ["*"]\nmax_queues = 2\n'))
        reply = finish(rig, out)
        assert reply["ok"], reply
        assert not reply["memlock"]["ok"] and "allows raises up to 16777216" in reply["memlock"]["reason"], reply
        assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20) and not rig.service.raised
        assert len(rig.service.pending) == 0
    finally:
        rig.service.close()


def test_a_bare_grant_waiting_across_a_reload_that_adds_a_quota_it_exceeds_is_refused() -> None:
    rig = make_rig()
    rig.kernel.memlocks[ALICE.pid] = (8 << 20, 8 << 20)
    try:
        out = _bare_waiting(rig, memlock=32 << 20)
        rig.service.reload(parse_policy(ONE_QUEUE_EACH))
        reply = finish(rig, out)
        assert not reply["ok"] and reply["error"]["code"] == "quota-queues", reply
        assert len(rig.service.leases) == 0 and len(rig.service.pending) == 0
        assert rig.kernel.memlocks[ALICE.pid] == (8 << 20, 8 << 20) and not rig.service.raised
        assert not rig.kernel.slot_taken(7, 1)
    finally:
        rig.service.close()


@pytest.mark.parametrize("what", ["a-link-to-nothing", "a-file"])
def test_a_policy_d_that_is_no_directory_is_an_error_not_an_empty_one(home: Path, tmp_path: Path, what: str) -> None:
    """policy.d linked to a directory not there (a mount not made yet) or not a directory: its deny rules were
    dropped without a word, and the main file's allow rules granted what they deny."""
    dropin = home / "policy.d"
    if what == "a-link-to-nothing":
        dropin.symlink_to(tmp_path / "not-mounted")
        reason = "No such file or directory"
    else:
        dropin.write_text('version = 1\n[[deny]]\nusers = ["*"]\ninterfaces = ["eth1"]\n')
        reason = "Not a directory"
    assert errors_of(home / "policy.toml") == [f"{dropin}: cannot read: {reason}"]
