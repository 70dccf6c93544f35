"""deploy/install.sh leaves nothing another user could rewrite, whatever umask it runs under."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from xskbroker.policy import load_policy

INSTALL = Path(__file__).resolve().parents[2] / "deploy" / "install.sh"


def install(root: Path) -> str:
    done = subprocess.run(["sh", str(INSTALL), "--root", str(root)], capture_output=True, text=True, timeout=60,
                          check=False, preexec_fn=lambda: os.umask(0))  # the point of the test
    assert done.returncode == 0, done.stderr
    return done.stdout


def writable_by_others(root: Path) -> list[str]:
    return [f"{p}: {stat.S_IMODE(p.lstat().st_mode):04o}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.lstat().st_mode & 0o022]


def test_install_under_umask_0_leaves_nothing_group_or_world_writable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    install(root)
    assert writable_by_others(root) == []
    assert load_policy(root / "etc/xskbroker/policy.toml").rules  # the broker's StrictModes accept it


def test_install_tightens_an_existing_writable_policy_and_policy_d(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/xskbroker/policy.d").mkdir(parents=True)
    (root / "etc/xskbroker/policy.toml").write_text("version = 1\n")
    (root / "etc/xskbroker/policy.d/a.toml").write_text("version = 1\n")
    for p in ("etc/xskbroker", "etc/xskbroker/policy.d", "etc/xskbroker/policy.toml", "etc/xskbroker/policy.d/a.toml"):
        (root / p).chmod(0o777)
    out = install(root)
    assert (root / "etc/xskbroker/policy.toml").read_text() == "version = 1\n"  # kept
    for p in ("etc/xskbroker", "etc/xskbroker/policy.d"):
        assert stat.S_IMODE((root / p).stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc/xskbroker/policy.toml").stat().st_mode) == 0o755
    assert "group/world write removed" in out
    load_policy(root / "etc/xskbroker/policy.toml")
