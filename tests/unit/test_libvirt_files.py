"""The libvirt hook runs as root: its configuration must be root's, its state files are never followed."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from xskbroker.client import qmp as q
from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import lifecycle as lvlife
from xskbroker.client.libvirt import monitors as lvmon
from xskbroker.client.libvirt import state as lvstate


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def test_a_world_writable_config_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt.conf"
    conf.write_text('virsh = "/tmp/evil"\n')  # the hook would run it as root
    conf.chmod(0o666)
    with pytest.raises(lvconf.ConfigError) as info:
        lvconf.load_config(str(conf))
    assert str(info.value).startswith(f"{conf}: unsafe: ") and f"chmod go-w {conf}" in str(info.value)


def test_a_config_in_a_writable_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "libvirt.conf").write_text('virsh = "/tmp/evil"\n')
    d.chmod(0o777)
    with pytest.raises(lvconf.ConfigError, match=f"{d}: unsafe: "):
        lvconf.load_config(str(d / "libvirt.conf"))


def test_a_private_config_loads(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt.conf"
    conf.write_text("timeout = 5\n")
    assert lvconf.load_config(str(conf)).timeout == 5.0


def test_write_state_does_not_follow_a_link_at_the_temp_name(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "vm1.json.tmp").symlink_to(victim)
    lvstate.write_state(str(tmp_path / "vm1.json"), {"domain": "vm1"})
    assert victim.read_text() == "precious\n"
    assert lvstate.read_state(str(tmp_path / "vm1.json")) == {"domain": "vm1"}


def test_a_planted_state_link_is_not_read(tmp_path: Path) -> None:
    forged = tmp_path / "forged.json"
    forged.write_text('{"worker_pid": 1, "worker_start": 0}')  # the hook would signal that pid
    (tmp_path / "vm1.json").symlink_to(forged)
    assert lvstate.read_state(str(tmp_path / "vm1.json")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_state_file_of_another_uid_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "vm1.json").write_text('{"worker_pid": 1, "worker_start": 0}')
    os.chown(tmp_path / "vm1.json", 65534, 65534)
    assert lvstate.read_state(str(tmp_path / "vm1.json")) is None


def test_forget_does_not_append_through_a_planted_log_link(tmp_path: Path, victim: Path) -> None:
    cfg = lvconf.Config(socket=str(tmp_path / "none.sock"), state_dir=str(tmp_path))
    lvstate.write_state(str(tmp_path / "vm1.json"), {"domain": "vm1", "finished": True, "interfaces": []})
    (tmp_path / "vm1.log").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        lvlife.forget("vm1", cfg)
    assert victim.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_spawn_worker_refuses_a_state_dir_of_another_uid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)  # nobody's: it could have planted anything in there
    with pytest.raises(OSError, match="owned by uid 65534"):
        lvlife.spawn_worker("vm1", [], lvconf.Config(state_dir=str(state)))
    assert list(state.iterdir()) == []


def test_a_pid_file_others_could_write_is_not_believed(tmp_path: Path) -> None:
    pidfile = tmp_path / "vm1.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    assert lvmon.VirshMonitor("vm1", pid_dir=str(tmp_path)).pid() == os.getpid()
    pidfile.chmod(0o666)  # anyone could point the hook at a process of another user
    with pytest.raises(q.QMPConnectionError, match=f"{pidfile}: unsafe: .*chmod go-w"):
        lvmon.VirshMonitor("vm1", pid_dir=str(tmp_path)).pid()


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent drops to the recorded user: root's own here")
def test_forget_waits_for_a_broker_that_does_not_answer_once_not_once_per_lease(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt waits for the stopped/release hook with the domain's job held: a broker that accepts and never
    answers costs one RELEASE_TIMEOUT, not one per lease (the leases end with QEMU, which has exited)."""
    monkeypatch.setattr(lvlife, "RELEASE_TIMEOUT", 1.0)
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hung.bind(str(tmp_path / "broker.sock"))
    hung.listen(16)  # never accepted: every request waits for its timeout
    cfg = lvconf.Config(socket=str(tmp_path / "broker.sock"), state_dir=str(tmp_path))
    leases = [f"{i:032x}" for i in range(1, 5)]
    lvstate.write_state(str(tmp_path / "vm1.json"), {
        "domain": "vm1", "finished": True, "identity": {"uid": 0, "gid": 0, "groups": []},
        "interfaces": [{"id": f"x{i}", "lease": lease, "released": False, "status": "attached"}
                       for i, lease in enumerate(leases)]})
    start = time.monotonic()
    try:
        lvlife.forget("vm1", cfg, "stopped")
    finally:
        hung.close()
    assert time.monotonic() - start < 2.5
    log = (tmp_path / "vm1.log").read_text()
    assert f"could not release lease {leases[0]}: broker-timeout" in log
    assert f"not asked to release {', '.join(leases[1:])}" in log
    assert not (tmp_path / "vm1.json").exists()
