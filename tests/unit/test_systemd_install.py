"""deploy/install.sh into a temporary root: what it puts where, idempotence, the policy it never clobbers,
uninstall; and, as root, that systemd-sysusers and systemd-tmpfiles accept what it installed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

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


# ---- paths with characters that mean something to systemd's unit syntax or to install.sh's sed ----

def systemd_exec(line: str) -> tuple[str, list[str]]:
    """(executable path, argv) as systemd 252 reads a command line (config_parse_exec, exec_child): words split on
    whitespace outside quotes and unquoted; prefix characters taken off the first; % specifiers expanded in each
    word (only %% is expected here); then, without the ":" prefix, ${X} and $$ substituted in argv (never in the
    executable's path)."""
    words: list[str] = []
    word: list[str] | None = None
    quote = ""
    chars = iter(line)
    for c in chars:
        if c == "\\":
            c = next(chars)
            assert c in "\\\"'", f"escape \\{c} in {line!r}"
        elif quote:
            if c == quote:
                quote = ""
                continue
        elif c in "\"'":
            quote = c
            word = word if word is not None else []
            continue
        elif c.isspace():
            if word is not None:
                words.append("".join(word))
                word = None
            continue
        word = (word if word is not None else []) + [c]
    assert not quote, f"unterminated quote in {line!r}"
    if word is not None:
        words.append("".join(word))
    prefix = re.match(r"[-@:+!]*", words[0])
    assert prefix is not None
    words[0] = words[0][prefix.end():]

    def specifiers(w: str) -> str:
        assert re.fullmatch(r"([^%]|%%)*", w), f"a specifier in {w!r}"
        return w.replace("%%", "%")

    words = [specifiers(w) for w in words]
    path = words[0]
    if ":" not in prefix.group():
        words = [re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", w).replace("$$", "$") for w in words]
    return path, words


def unit_lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


UNIT_SYNTAX = {
    "space": "my tools",
    "percent": "100%n",
    "dollar": "$HOME${USER}$$",
    "sed": "a&b|c",
    "semicolon-hash-utf8": "; #é=,+@~:",
}


@pytest.mark.parametrize("name", UNIT_SYNTAX, ids=list(UNIT_SYNTAX))
def test_bindir_and_prefix_with_unit_syntax_reach_the_units_exactly(tmp_path: Path, name: str) -> None:
    """ExecStart=/ExecReload= run exactly BINDIR/xskbroker with the unit's arguments, and Documentation= is a
    file: URL of the installed notes, whatever unit syntax (whitespace, %, $) or sed syntax (&, |) the paths hold."""
    weird = UNIT_SYNTAX[name]
    bindir = f"{tmp_path}/opt/{weird}/bin"  # outside --root: where systemd-analyze looks for it
    prefix = f"/usr/{weird}"
    root = tmp_path / "root"
    command = Path(f"{bindir}/xskbroker")
    command.parent.mkdir(parents=True)
    command.write_text(f"#!{sys.executable}\nimport sys\n")
    command.chmod(0o755)
    Path(f"{root}{bindir}").mkdir(parents=True)
    Path(f"{root}{bindir}/xskbroker").symlink_to(command)
    (root / "etc/libvirt").mkdir(parents=True)
    run("--prefix", prefix, "--bindir", bindir, "--root", str(root), "--quiet")
    units = Path(f"{root}{prefix}/lib/systemd/system")
    service = (units / "xskbroker.service").read_text()
    [start] = unit_lines(service, "ExecStart")
    assert systemd_exec(start) == (f"{bindir}/xskbroker", [f"{bindir}/xskbroker", "serve", "--policy",
                                                           "/etc/xskbroker/policy.toml", "--idle-timeout", "60"])
    reload_path, reload_argv = systemd_exec(unit_lines(service, "ExecReload")[0])
    assert reload_path == f"{bindir}/xskbroker" and reload_argv[1:] == ["policy", "check", "/etc/xskbroker/policy.toml"]
    for text in (service, (units / "xskbroker.socket").read_text()):
        [doc] = unit_lines(text, "Documentation")
        assert " " not in doc and re.fullmatch(r"([^%]|%%)*", doc), doc
        assert unquote(doc.replace("%%", "%").removeprefix("file:")) == f"{prefix}/share/doc/xskbroker/systemd.md"
        assert Path(f"{root}{unquote(doc.replace('%%', '%').removeprefix('file:'))}").is_file()
    # the unit snippet in the installed notes, too
    notes = Path(f"{root}{prefix}/share/doc/xskbroker/systemd.md").read_text()
    snippet = [line for line in notes.splitlines() if line.startswith("ExecStart=") and "status" in line]
    assert snippet and all(systemd_exec(line.split("=", 1)[1])[0] == f"{bindir}/xskbroker" for line in snippet)
    assert Path(f"{root}/etc/libvirt/hooks/qemu.d/xskbroker").read_text().startswith(f"#!{sys.executable}\n")
    if shutil.which("systemd-analyze"):
        # systemd's own reading: verify fails unless each command names an executable that exists, path for path
        for unit_name in ("xskbroker.socket", "xskbroker.service"):
            shutil.copy(units / unit_name, tmp_path / unit_name)
        done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "xskbroker.socket"),
                               str(tmp_path / "xskbroker.service")], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr


REFUSED = {
    "quote": ("/opt/it's/bin", "must not contain ' \" or \\"),
    "double-quote": ('/opt/a"b/bin', "must not contain ' \" or \\"),
    "backslash": ("/opt/a\\b/bin", "must not contain ' \" or \\"),
    "newline": ("/opt/a\nExecStartPre=/bin/true\n/bin", "must not contain a newline"),
    "tab": ("/opt/a\tb/bin", "must not contain a control character"),
    "relative": ("opt/bin", "must be absolute"),
    "not-utf8": ("/opt/caf\udce9/bin", "must be UTF-8"),
}


@pytest.mark.parametrize("name", REFUSED, ids=list(REFUSED))
def test_a_bindir_no_unit_can_run_is_refused_before_anything_is_installed(tmp_path: Path, name: str) -> None:
    """systemd refuses an executable path with a quote or backslash (a fatal unit error) and ignores a line that
    is not UTF-8; a newline would end the line early (and start another directive): refused, saying why."""
    bindir, why = REFUSED[name]
    done = subprocess.run(["sh", str(INSTALL), "--bindir", bindir,
                           "--root", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False,
                          errors="surrogateescape")
    assert done.returncode == 2, done.stdout
    assert why in done.stderr and "--bindir" in done.stderr, done.stderr
    assert tree(tmp_path) == {}
