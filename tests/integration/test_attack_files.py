"""Files trusted blindly: a policy others can rewrite, and links planted in the broker's state directory.

Each attack runs against a real broker in a private namespace; the attacker is uid 65534 with no
capabilities. After each, a root probe (hello, and a bound 1 MiB grant + release) shows the broker kept
serving. Latency under a file attack says nothing (the attack is one write), so the figures record that
the broker answered, and how fast, once the attack was over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from ..victim import SECRET, victim
from .conftest import CONSUMER_UID, wait_for
from .consumers import exchange_raw
from .probe import RootProbe

__all__ = ["victim"]  # a fixture

MiB = 1 << 20
ATTACKER = CONSUMER_UID  # nobody: a tenant the policy allows, and not an admin
POLICY = f"""\
version = 1

[[allow]]
name = "tenants"
users = [{ATTACKER}]
interfaces = ["xsk0"]
queues = ["0"]

[[allow]]
name = "root-probe"
users = [0]
interfaces = ["xsk0"]
queues = ["0-1"]
max_umem = "4MiB"
"""


# ---- helpers ------------------------------------------------------------------------------------------------

def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _grant_release(c: Connection, iface: str, queue: int = 1) -> None:
    reply, fds = c.call(proto.Grant(interface=iface, queues=(queue,), geometry=proto.Geometry(umem_size=MiB)))
    for fd in fds:
        os.close(fd)
    assert reply["ok"], reply
    released, _ = c.call(proto.Release(lease=reply["lease"]))
    assert released["ok"], released


@pytest.fixture
def unstarted(veth: VethNamespace) -> Iterator[BrokerProcess]:
    """A broker whose workdir and policy exist, not started: the test spoils something, then starts it."""
    b = BrokerProcess(veth.name, POLICY)
    b.workdir = tempfile.mkdtemp(prefix="xskbroker-")
    os.chmod(b.workdir, 0o711)
    Path(b.policy_path).write_text(POLICY)
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(b.workdir, ignore_errors=True)



# ---- attacker actions (run as uid 65534) -------------------------------------------------------------------

def make_self_admin(policy_path: str) -> dict[str, Any]:
    with open(policy_path, "a") as f:
        f.write(f"\n[admin]\nusers = [{ATTACKER}]\n")
    return {"uid": os.getuid()}


def plant_link(at: str, target: str) -> dict[str, Any]:
    os.symlink(target, at)
    return {"planted": at}


def as_attacker_status_and_revoke(path: str, lease: str) -> dict[str, Any]:
    with Connection(path, timeout=2.0) as c:
        status, _ = c.call(proto.Status())
        try:
            c.call(proto.Revoke(lease=lease))
            revoke = "ok"
        except proto.BrokerError as e:
            revoke = e.code
    return {"admin": status.get("admin"), "revoke": revoke}


# ---- (a) an unsafe policy at start-up ---------------------------------------------------------------------

def test_world_writable_policy_refuses_to_start(unstarted: BrokerProcess, figures) -> None:  # type: ignore[no-untyped-def]
    b = unstarted
    os.chmod(b.policy_path, 0o666)
    with pytest.raises(RuntimeError, match="broker exited with 1"):
        b.start()
    log = b.log()
    assert "the policy has errors; not starting" in log
    assert f"{b.policy_path}: unsafe: owned by uid 0 (root), mode 0666: group/world-writable" in log
    assert f"chmod go-w {b.policy_path}" in log
    assert not os.path.exists(b.socket_path)  # refused before listening: no trace
    os.chmod(b.policy_path, 0o644)  # the fix the message names
    b.start()
    figures(refused_with="chmod go-w", hello_ok_after=True, **RootProbe(b.socket_path, "xsk0").run(5).figures())


def test_world_writable_policy_d_refuses_to_start(unstarted: BrokerProcess, figures) -> None:  # type: ignore[no-untyped-def]
    b = unstarted
    dropin = Path(b.workdir) / "policy.d"
    dropin.mkdir()
    (dropin / "zz-admin.toml").write_text(f"version = 1\n[admin]\nusers = [{ATTACKER}]\n")
    dropin.chmod(0o777)
    with pytest.raises(RuntimeError, match="broker exited with 1"):
        b.start()
    assert f"{dropin}: unsafe: owned by uid 0 (root), mode 0777: group/world-writable" in b.log()
    dropin.chmod(0o755)
    b.start()
    figures(hello_ok_after=True, **RootProbe(b.socket_path, "xsk0").run(5).figures())


def test_state_dir_of_another_user_refuses_to_start(unstarted: BrokerProcess, figures) -> None:  # type: ignore[no-untyped-def]
    b = unstarted
    state = Path(b.workdir) / "state"
    state.mkdir(mode=0o700)
    os.chown(state, ATTACKER, ATTACKER)  # whoever owns it can plant links in it
    b.extra_args = ["--state-dir", str(state)]
    with pytest.raises(RuntimeError, match="broker exited with 1"):
        b.start()
    assert f"state directory {state}: owned by uid {ATTACKER}" in b.log()
    assert list(state.iterdir()) == [] and not os.path.exists(b.socket_path)
    b.extra_args = []
    b.start()
    figures(hello_ok_after=True, **RootProbe(b.socket_path, "xsk0").run(5).figures())


# ---- (b) a policy that became world-writable, rewritten, then SIGHUP ----------------------------------------

def test_rewritten_world_writable_policy_is_not_reloaded(veth: VethNamespace, figures) -> None:  # type: ignore[no-untyped-def]
    with BrokerProcess(veth.name, POLICY) as b:
        os.chmod(b.policy_path, 0o666)  # an admin's mistake
        assert spawn_unprivileged(make_self_admin, b.policy_path, uid=ATTACKER).result()["uid"] == ATTACKER
        b.signal(signal.SIGHUP)
        wait_for(lambda: b.records("policy-reload-failed") or b.records("policy-reloaded"), what="the reload")
        with Connection(b.socket_path) as c:  # a lease of root's, which only an admin could revoke
            reply, fds = c.call(proto.Grant(interface=veth.inside, queues=(1,),
                                            geometry=proto.Geometry(umem_size=MiB)))
            try:
                assert reply["ok"], reply
                got = spawn_unprivileged(as_attacker_status_and_revoke, b.socket_path, reply["lease"],
                                         uid=ATTACKER).result()
            finally:
                for fd in fds:
                    os.close(fd)
        assert got["admin"] is False and got["revoke"] == "not-admin", got
        assert not b.records("policy-reloaded")
        failed = b.records("policy-reload-failed")
        assert failed[0]["kept"] == "previous policy"
        assert any(e.startswith(f"{b.policy_path}: unsafe: ") and "chmod go-w" in e for e in failed[0]["errors"])
        figures(attacker_admin=got["admin"], attacker_revoke=got["revoke"],
                hello_ok_after=True, **RootProbe(b.socket_path, veth.inside).run(5).figures())


# ---- (c) a link planted at the journal's temp name ------------------------------------------------------------

@pytest.fixture
def state_dir(veth: VethNamespace) -> Iterator[Path]:
    """A state directory apart from the policy's (whose directory must stay closed to others)."""
    d = Path(tempfile.mkdtemp(prefix="xskf-state-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_link_at_journal_temp_name_survives_restart_compaction(veth: VethNamespace, victim: Path, state_dir: Path,
                                                                 figures) -> None:  # type: ignore[no-untyped-def]
    with BrokerProcess(veth.name, POLICY, extra_args=["--state-dir", str(state_dir)]) as b:
        b.proc.terminate()  # type: ignore[union-attr]
        b.proc.wait(5)  # type: ignore[union-attr]
        os.chmod(state_dir, 0o777)  # a state directory others could write, while no broker runs
        tmp = state_dir / "leases.jsonl.tmp"
        spawn_unprivileged(plant_link, str(tmp), str(victim), uid=ATTACKER).result()
        b.start()  # recover() compacts the journal through the temp name
        assert victim.read_text() == SECRET
        assert not os.path.lexists(tmp)
        journal = os.lstat(state_dir / "leases.jsonl")
        assert stat.S_ISREG(journal.st_mode) and journal.st_uid == 0
        assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o755  # ours: closed to others at start
        assert exchange_raw(b.socket_path, [proto.encode_request(proto.Hello())]) == ["ok"]
        figures(victim_intact=True, hello_ok_after=True, **RootProbe(b.socket_path, veth.inside).run(5).figures())


def test_link_at_journal_temp_name_survives_compaction_while_serving(veth: VethNamespace, victim: Path,
                                                                      state_dir: Path,
                                                                      figures) -> None:  # type: ignore[no-untyped-def]
    with BrokerProcess(veth.name, POLICY, extra_args=["--state-dir", str(state_dir)]) as b:
        os.chmod(state_dir, 0o777)  # opened up under a running broker
        tmp = state_dir / "leases.jsonl.tmp"
        spawn_unprivileged(plant_link, str(tmp), str(victim), uid=ATTACKER).result()
        # the journal compacts once it has grown past 1000 lines: one per grant and one per release
        t = time.monotonic()
        with Connection(b.socket_path) as c:
            for i in range(520):  # the queues in turn: each released socket has a cycle to go before its queue is asked
                _grant_release(c, veth.inside, i % 2)
        cycles_s = time.monotonic() - t
        assert not os.path.lexists(tmp)  # compaction happened, and replaced the planted entry
        assert victim.read_text() == SECRET
        assert stat.S_ISREG(os.lstat(state_dir / "leases.jsonl").st_mode)
        assert exchange_raw(b.socket_path, [proto.encode_request(proto.Hello())]) == ["ok"]
        figures(victim_intact=True, grant_release_cycles=520, cycles_s=round(cycles_s, 2),
                hello_ok_after=True, **RootProbe(b.socket_path, veth.inside).run(5).figures())


# ---- the listening socket's node, swapped for a link between bind() and chmod() ------------------------------

def test_socket_swapped_for_a_link_after_bind_is_not_chmodded_through(victim: Path, monkeypatch,
                                                                      figures) -> None:  # type: ignore[no-untyped-def]
    import socket

    from xskbroker.broker.listener import listen

    d = Path(tempfile.mkdtemp(prefix="xskf-sock-"))
    path = d / "broker.sock"
    real_bind = socket.socket.bind

    def bind_then_swap(self: socket.socket, address: Any) -> None:
        real_bind(self, address)
        # what an attacker who can write the directory does in the window: rename the node, plant a link
        os.rename(address, f"{address}.moved")
        os.symlink(victim, address)

    monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
    try:
        with pytest.raises(FileExistsError, match="was replaced while it was being created"):
            listen(str(path), 0o666, 65534)
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.stat().st_gid == 0
        assert victim.read_text() == SECRET
        figures(victim_mode=f"{stat.S_IMODE(victim.stat().st_mode):04o}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- a map grant's pin, swapped for a hard link between BPF_OBJ_PIN and the chown that gives it to its tenant ----

def swap_pin_for_link(pin: str, target: str) -> dict[str, Any]:
    """The tenant owns the pin's directory: it may unlink root's pin there and link another file in its place."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pin)
    os.link(target, pin)
    return {"linked": pin}


def open_map_pin(path: str) -> str:
    from xskbroker.broker import bpfsys
    try:
        os.close(bpfsys.obj_get(path))
    except OSError as e:
        return os.strerror(e.errno or 0)
    return "opened"


@pytest.fixture
def shared_bpffs() -> Iterator[Path]:
    """A bpffs every uid can traverse, holding another service's root-only pin next to the broker's pin root (as
    when --pin-root is a directory of the host's /sys/fs/bpf), with fs.protected_hardlinks=0: a tenant may then
    link any file it can reach, its owner's or not."""
    import subprocess

    from xskbroker.broker import bpfsys

    mnt = Path(tempfile.mkdtemp(prefix="xskf-bpffs-"))
    mnt.chmod(0o755)
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0755", "bpf", str(mnt)], check=True)
    sysctl = Path("/proc/sys/fs/protected_hardlinks")
    saved = sysctl.read_text()
    try:
        (mnt / "pins").mkdir(mode=0o755)
        (mnt / "other").mkdir(mode=0o755)
        fd = bpfsys.map_create(2, 1, "other_service")  # BPF_MAP_TYPE_ARRAY
        try:
            bpfsys.obj_pin(fd, str(mnt / "other/policy_map"))  # root's, 0600
        finally:
            os.close(fd)
        sysctl.write_text("0\n")
        yield mnt
    finally:
        sysctl.write_text(saved)
        subprocess.run(["umount", str(mnt)], check=False)
        os.rmdir(mnt)


def test_a_pin_swapped_for_a_hard_link_is_not_chowned_through(shared_bpffs: Path, monkeypatch,
                                                              figures) -> None:  # type: ignore[no-untyped-def]
    from xskbroker.broker import bpfsys, pins

    victim = shared_bpffs / "other/policy_map"
    real_pin = bpfsys.obj_pin

    def pin_then_swap(fd: int, path: str) -> None:
        real_pin(fd, path)
        # the tenant, in the window before the broker gives the pin to it
        spawn_unprivileged(swap_pin_for_link, f"{shared_bpffs}/pins/{ATTACKER}/xsk0/xsks_map", str(victim),
                           uid=ATTACKER).result()

    monkeypatch.setattr(bpfsys, "obj_pin", pin_then_swap)
    map_fd = bpfsys.map_create(2, 1, "tenant_map")
    try:
        pins.pin(str(shared_bpffs / "pins"), ATTACKER, ATTACKER, "xsk0", map_fd)
        outcome = "pinned"
    except FileExistsError:
        outcome = "refused: the pin's name is taken"
    finally:
        os.close(map_fd)
    st = victim.stat()
    attacker_open = spawn_unprivileged(open_map_pin, str(victim), uid=ATTACKER).result()
    figures(outcome=outcome, victim_owner=f"{st.st_uid}:{st.st_gid}", victim_mode=f"{stat.S_IMODE(st.st_mode):04o}",
            attacker_open=attacker_open)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert attacker_open == os.strerror(errno.EACCES)
    assert outcome.startswith("refused")
    assert not any((shared_bpffs / "pins" / pins.STAGING).iterdir())  # nothing of the grant left behind


def test_a_pin_is_its_tenants_with_nothing_left_staged(shared_bpffs: Path) -> None:
    from xskbroker.broker import bpfsys, pins

    root = shared_bpffs / "pins"
    map_fd = bpfsys.map_create(2, 1, "tenant_map")
    try:
        path = pins.pin(str(root), ATTACKER, ATTACKER, "xsk0", map_fd)
        with pytest.raises(FileExistsError):  # one pin per (uid, interface)
            pins.pin(str(root), ATTACKER, ATTACKER, "xsk0", map_fd)
    finally:
        os.close(map_fd)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (ATTACKER, ATTACKER, 0o600, 1)
    assert spawn_unprivileged(open_map_pin, path, uid=ATTACKER).result() == "opened"
    staging = root / pins.STAGING
    assert (staging.stat().st_uid, stat.S_IMODE(staging.stat().st_mode)) == (0, 0o700) and not any(staging.iterdir())
    assert pins.unpin(str(root), ATTACKER, "xsk0") and not os.path.exists(path)
