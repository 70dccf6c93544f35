"""StrictModes for the policy: a file anyone but root (or the broker's uid) could rewrite is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_policy_cli import run
from xskbroker.policy import PolicyError, load_policy
from xskbroker.policy.trust import dir_chain_problems, problem

from .conftest import GOOD

ADMIN = 'version = 1\n[admin]\nusers = ["*"]\n'


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.errors


def test_a_private_policy_loads(home: Path) -> None:
    assert [r.name for r in load_policy(home / "policy.toml").rules] == ["a"]


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_group_or_world_writable_policy_is_refused(home: Path, mode: int) -> None:
    path = home / "policy.toml"
    path.chmod(mode)
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: unsafe: owned by uid {os.geteuid()}")
    assert f"mode {mode:04o}: group/world-writable" in errors[0]
    assert f"(fix: chmod go-w {path})" in errors[0]


def test_world_writable_policy_d_is_refused(home: Path) -> None:
    d = home / "policy.d"
    d.mkdir()
    (d / "admin.toml").write_text(ADMIN)
    d.chmod(0o777)
    errors = errors_of(home / "policy.toml")
    assert errors == [f"{d}: unsafe: owned by uid {os.geteuid()} ({_name()}), mode 0777: group/world-writable, "
                      f"so other users can rewrite it (fix: chmod go-w {d})"]


def test_world_writable_drop_in_is_refused_and_not_loaded(home: Path) -> None:
    d = home / "policy.d"
    d.mkdir(mode=0o755)
    (d / "admin.toml").write_text(ADMIN)
    (d / "admin.toml").chmod(0o666)
    (d / "fine.toml").write_text('version = 1\n[[deny]]\nusers = ["*"]\ninterfaces = ["eth9"]\n')
    errors = errors_of(home / "policy.toml")
    assert len(errors) == 1 and errors[0].startswith(f"{d / 'admin.toml'}: unsafe: ")


def test_writable_parent_directory_is_refused(home: Path) -> None:
    home.chmod(0o777)  # whoever can write it can replace policy.toml with a file of their own
    errors = errors_of(home / "policy.toml")
    assert errors == [f"{home}: unsafe: owned by uid {os.geteuid()} ({_name()}), mode 0777: group/world-writable, "
                      f"so other users can rewrite it (fix: chmod go-w {home})"]


def test_writable_grandparent_is_refused(home: Path) -> None:
    home.parent.chmod(0o775)
    assert any(e.startswith(f"{home.parent}: unsafe:") for e in errors_of(home / "policy.toml"))


def test_sticky_world_writable_parent_is_acceptable(home: Path) -> None:
    home.chmod(0o1777)  # like /tmp: only policy.toml's owner (checked) may replace it
    assert load_policy(home / "policy.toml").rules


def test_symlink_into_a_writable_directory_is_refused(home: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "real.toml").write_text(GOOD)
    shared.chmod(0o777)
    link = home / "link.toml"
    link.symlink_to(shared / "real.toml")
    assert any(e.startswith(f"{shared}: unsafe:") for e in errors_of(link))


def test_not_a_regular_file(home: Path) -> None:
    fifo = home / "fifo.toml"
    os.mkfifo(fifo, 0o644)
    assert errors_of(fifo) == [f"{fifo}: cannot read: not a regular file"]  # and no hang on the open


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_file_owned_by_another_user_is_refused(home: Path) -> None:
    path = home / "policy.toml"
    os.chown(path, 65534, 65534)
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: unsafe: owned by uid 65534")
    assert "only root may own it" in errors[0] and f"chown root {path}" in errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_directory_owned_by_another_user_is_refused(home: Path) -> None:
    os.chown(home, 65534, 65534)
    assert errors_of(home / "policy.toml")[0].startswith(f"{home}: unsafe: owned by uid 65534")


def test_problem_checks_the_stat_given() -> None:
    st = os.stat("/")
    assert problem("/", st, parent=True) is None
    assert problem("/tmp", os.stat("/tmp"), parent=True) is None  # sticky
    assert dir_chain_problems("/etc/xskbroker/policy.toml") == []


def test_policy_check_reports_the_same_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = home / "policy.toml"
    path.chmod(0o666)
    assert run(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: unsafe: ") and f"chmod go-w {path}" in err


def _name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
