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


# ---- the libvirt hook only where libvirt is; uninstall removes what install made and says what it kept ----

def uninstall(root: Path) -> str:
    done = subprocess.run(["sh", str(INSTALL), "uninstall", "--root", str(root)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def host(root: Path, *more: str) -> Path:
    """The folders every host has (and uninstall leaves), plus `more`."""
    for d in ("etc", "usr/local/lib", "usr/local/share/doc", *more):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def test_without_libvirt_no_hook_and_no_etc_libvirt(tmp_path: Path) -> None:
    before = everything(host(tmp_path))
    out = install(tmp_path)
    assert not (tmp_path / "etc/libvirt").exists()
    assert not (tmp_path / "etc/xskbroker/libvirt.conf").exists()  # the hook's own settings: no hook, none
    assert "skipped the libvirt hook" in out and "libvirt is not installed" in out
    uninstall(tmp_path)
    assert everything(tmp_path) == before


def test_with_libvirt_the_hook_goes_in_and_uninstall_leaves_libvirts_own_folders(tmp_path: Path) -> None:
    before = everything(host(tmp_path, "etc/libvirt/hooks"))  # as libvirt-daemon-system ships it
    out = install(tmp_path)
    hook = tmp_path / "etc/libvirt/hooks/qemu.d/xskbroker"
    assert hook.is_file() and os.access(hook, os.X_OK) and f"installed {hook}" in out
    assert (tmp_path / "etc/xskbroker/libvirt.conf").is_file()
    out = uninstall(tmp_path)
    assert f"removed {hook}" in out and "kept" not in out  # nothing edited: nothing kept
    assert everything(tmp_path) == before  # qemu.d went (ours), hooks/ stayed (libvirt's)


def test_uninstall_keeps_and_names_the_admins_files(tmp_path: Path) -> None:
    before = everything(host(tmp_path, "etc/libvirt/hooks"))
    install(tmp_path)
    conf = tmp_path / "etc/xskbroker"
    (conf / "policy.toml").write_text("version = 1\n")
    (conf / "policy.d/10-vms.toml").write_text("version = 1\n")
    (conf / "policy.d/.hidden.toml").write_text("version = 1\n")
    (conf / "libvirt.conf").write_text('socket = "/run/xskbroker/other.sock"\n')
    out = uninstall(tmp_path)
    kept = sorted(line.split()[1] for line in out.splitlines() if line.startswith("kept "))
    assert kept == sorted(str(conf / p) for p in ("policy.toml", "policy.d/10-vms.toml", "policy.d/.hidden.toml",
                                                  "libvirt.conf")), out
    assert "drop-in" in out and "edited" in out
    assert everything(tmp_path) - before == {
        "etc/xskbroker/", "etc/xskbroker/policy.toml", "etc/xskbroker/policy.d/", "etc/xskbroker/policy.d/10-vms.toml",
        "etc/xskbroker/policy.d/.hidden.toml", "etc/xskbroker/libvirt.conf"}
