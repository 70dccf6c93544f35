"""State files of root-run code: a link planted in the state directory is never followed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from xskbroker.broker.lease_record import Lease
from xskbroker.broker.leases import LeaseTable
from xskbroker.common import safefiles

FORGED = '{"version": 1}\n' + json.dumps({"lease": Lease("forged", 0, 1, 7, "eth1", (0,), "map", 0).record()}) + "\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file the attacker wants destroyed (root's, in the real attack)."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def journal(tmp_path: Path) -> tuple[LeaseTable, Path]:
    state = tmp_path / "state"
    safefiles.private_dir(str(state))
    return LeaseTable(str(state / "leases.jsonl")), state


def test_compaction_does_not_follow_a_link_at_the_temp_name(tmp_path: Path, victim: Path) -> None:
    table, state = journal(tmp_path)
    (state / "leases.jsonl.tmp").symlink_to(victim)
    table.add(1000, os.getpid(), 7, "eth1", (0,), "bound", 1 << 20)  # the first append compacts
    assert victim.read_text() == "precious\n"
    assert not (state / "leases.jsonl.tmp").exists() and not (state / "leases.jsonl.tmp").is_symlink()
    lines = (state / "leases.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"version": 1} and len(lines) == 2
    table.close()


def test_a_link_at_the_journal_name_is_neither_read_nor_written_through(tmp_path: Path, victim: Path) -> None:
    table, state = journal(tmp_path)
    victim.write_text(FORGED)
    (state / "leases.jsonl").symlink_to(victim)
    assert table.load() == []
    lease = table.add(1000, os.getpid(), 7, "eth1", (0,), "bound", 1 << 20)
    table.remove(lease.id)
    assert victim.read_text() == FORGED
    assert not (state / "leases.jsonl").is_symlink()
    assert (state / "leases.jsonl").read_text().count("\n") == 3  # header, (compacted) lease, end
    table.close()


def test_a_hard_link_at_the_journal_name_is_not_believed(tmp_path: Path) -> None:
    table, state = journal(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(FORGED)
    os.link(other, state / "leases.jsonl")
    assert table.load() == []


def test_private_dir_is_made_0700(tmp_path: Path) -> None:
    safefiles.private_dir(str(tmp_path / "a" / "b"))
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700


def test_private_dir_of_ours_loses_group_and_world_write(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o777)
    safefiles.private_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


def test_private_dir_refuses_a_shared_sticky_directory(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o1777)
    with pytest.raises(safefiles.UnsafePathError, match=r"shared .*use a private directory"):
        safefiles.private_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777  # not "fixed": it may be /tmp


def test_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(safefiles.UnsafePathError, match="symbolic link"):
        safefiles.private_dir(str(tmp_path / "link"))


def test_private_dir_refuses_a_writable_parent(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(safefiles.UnsafePathError, match=r"open: unsafe: .*mode 0777"):
        safefiles.private_dir(str(tmp_path / "open" / "state"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_private_dir_refuses_a_directory_of_another_uid(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(safefiles.UnsafePathError, match=r"owned by uid 65534.*not by this process's uid 0"):
        safefiles.private_dir(str(d))


def test_create_new_replaces_a_planted_link(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "x.tmp").symlink_to(victim)
    fd = safefiles.create_new(str(tmp_path / "x.tmp"))
    os.write(fd, b"new")
    os.close(fd)
    assert victim.read_text() == "precious\n" and (tmp_path / "x.tmp").read_text() == "new"
    assert stat.S_IMODE(os.stat(tmp_path / "x.tmp").st_mode) == 0o600


def test_private_opener_refuses_links_and_fifos(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "log").symlink_to(victim)
    with pytest.raises(safefiles.UnsafePathError, match="symbolic link"), \
            open(tmp_path / "log", "a", opener=safefiles.private_opener):
        pass
    os.mkfifo(tmp_path / "fifo")
    assert safefiles.read_private(str(tmp_path / "fifo")) is None  # and no hang
    assert victim.read_text() == "precious\n"
