"""deploy/install.sh into a temporary root: what it puts where, idempotence, the policy it never clobbers,
uninstall; and, as root, that systemd-sysusers and systemd-tmpfiles accept what it installed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_install_is_complete_and_idempotent(tmp_path: Path) -> None:
    (tmp_path / "etc/libvirt").mkdir(parents=True)  # libvirt is installed: the hook goes in
    run("--root", str(tmp_path))
    first = tree(tmp_path)
    assert set(first) == {
        "usr/local/lib/systemd/system/xskbroker.socket", "usr/local/lib/systemd/system/xskbroker.service",
        "usr/local/lib/sysusers.d/xskbroker.conf", "usr/local/lib/tmpfiles.d/xskbroker.conf",
        "usr/local/share/doc/xskbroker/systemd.md", "usr/local/share/doc/xskbroker/libvirt.md",
        "etc/xskbroker/policy.toml", "etc/libvirt/hooks/qemu.d/xskbroker", "etc/xskbroker/libvirt.conf"}
    hook = tmp_path / "etc/libvirt/hooks/qemu.d/xskbroker"
    assert oct(hook.stat().st_mode & 0o777) == "0o755"
    # no installed command to copy an interpreter from: the system's python3
    assert hook.read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert (tmp_path / "etc/xskbroker/policy.toml").read_text() == (ROOT / "deploy/policy.example.toml").read_text()
    assert (tmp_path / "etc/xskbroker/policy.d").is_dir()
    assert oct((tmp_path / "etc/xskbroker/policy.toml").stat().st_mode & 0o777) == "0o644"
    again = run("--root", str(tmp_path))
    assert tree(tmp_path) == first
    assert "installed" not in again.stdout  # nothing rewritten


def test_prefix_and_bindir_reach_the_units(tmp_path: Path) -> None:
    command = tmp_path / "opt/xskbroker/bin/xskbroker"
    command.parent.mkdir(parents=True)
    command.write_text("#!/opt/xskbroker/venv/bin/python\nimport sys\n")
    (tmp_path / "etc/libvirt").mkdir(parents=True)
    run("install", "--prefix", "/usr", "--bindir", "/opt/xskbroker/bin", "--root", str(tmp_path), "--quiet")
    # the libvirt hook runs with the interpreter the installed command uses
    hook = (tmp_path / "etc/libvirt/hooks/qemu.d/xskbroker").read_text()
    assert hook.splitlines()[0] == "#!/opt/xskbroker/venv/bin/python"
    service = (tmp_path / "usr/lib/systemd/system/xskbroker.service").read_text()
    assert "ExecStart=/opt/xskbroker/bin/xskbroker serve " in service
    assert "Documentation=file:/usr/share/doc/xskbroker/systemd.md" in service
    assert "/usr/local" not in service


def test_an_edited_policy_is_kept_and_an_unedited_one_removed(tmp_path: Path) -> None:
    run("--root", str(tmp_path))
    policy = tmp_path / "etc/xskbroker/policy.toml"
    policy.write_text("version = 1\n")
    assert "kept" in run("--root", str(tmp_path)).stdout
    assert policy.read_text() == "version = 1\n"
    out = run("uninstall", "--root", str(tmp_path)).stdout
    assert "kept" in out and policy.exists()
    assert tree(tmp_path) == {"etc/xskbroker/policy.toml": tree(tmp_path)["etc/xskbroker/policy.toml"]}
    policy.unlink()
    run("--root", str(tmp_path))
    run("uninstall", "--root", str(tmp_path))
    assert tree(tmp_path) == {} and not (tmp_path / "etc/xskbroker").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a group and root-owned directories needs root")
@pytest.mark.skipif(not shutil.which("systemd-sysusers") or not shutil.which("systemd-tmpfiles"),
                    reason="systemd-sysusers/systemd-tmpfiles are not installed (apt-get install systemd)")
def test_sysusers_and_tmpfiles_apply_in_the_installed_root(tmp_path: Path) -> None:
    run("--root", str(tmp_path), "--quiet")
    for cmd in (["systemd-sysusers", f"--root={tmp_path}"], ["systemd-tmpfiles", f"--root={tmp_path}", "--create"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    assert any(line.startswith("xskbroker:x:") for line in (tmp_path / "etc/group").read_text().splitlines())
    st = (tmp_path / "run/xskbroker").stat()
    assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o755"


def test_the_hook_runs_with_the_interpreter_of_a_pip_launcher(tmp_path: Path) -> None:
    """pip writes a /bin/sh launcher (`'''exec' "PYTHON" "$0" "$@"`) when the interpreter's path has a space or
    is too long for #!: the hook must run that Python too, never /bin/sh on Python code (libvirt runs the hook
    before every domain start, and a failing `prepare` stops them all)."""
    python = tmp_path / "my venv/bin/python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    command = tmp_path / "root/opt/xskbroker/bin/xskbroker"
    command.parent.mkdir(parents=True)
    command.write_text(f"#!/bin/sh\n'''exec' \"{python}\" \"$0\" \"$@\"\n' '''\n# -*- coding: utf-8 -*-\nimport sys\n")
    command.chmod(0o755)
    (tmp_path / "root/etc/libvirt").mkdir(parents=True)
    run("--bindir", "/opt/xskbroker/bin", "--root", str(tmp_path / "root"), "--quiet")
    hook = tmp_path / "root/etc/libvirt/hooks/qemu.d/xskbroker"
    conf = tmp_path / "libvirt.conf"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    bad = ("<domain type='qemu'><name>vm1</name><metadata><xsk:interfaces xmlns:xsk='urn:xskbroker:libvirt:1'>"
           "<xsk:interface id='xdp0' name='eth1' queues='many'/></xsk:interfaces></metadata></domain>")
    env = {**os.environ, "XSKBROKER_LIBVIRT_CONF": str(conf), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(hook), "vm1", "prepare", "begin", "-"], input=bad, text=True, capture_output=True,
                          env=env, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == "xskbroker: domain vm1: <xsk:interface id='xdp0'>: queues='many' is not a whole number " \
                          "from 1 to 126\n"
    assert "installed" not in run("--bindir", "/opt/xskbroker/bin", "--root", str(tmp_path / "root")).stdout
