"""A real libvirtd (and virtlogd) run by a test, with the hook installed for its lifetime, and what its tests
read: leases, a detached worker's state and exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import helper_process
from xskbroker.client.connection import Connection
from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import state as lvstate
from xskbroker.wire import protocol as proto

from .conftest import SYSTEM_PYTHON, readable_code, wait_for

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "libvirt" / "xskbroker"


def leases(path: str) -> list[dict[str, Any]]:
    with Connection(path) as c:  # root: an admin by default, sees every lease
        return c.call(proto.Status())[0]["leases"]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts): the detached worker is init's child, not ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def finished_state(path: Path, timeout: float = 15.0) -> dict[str, Any]:
    return wait_for(lambda: (s := lvstate.read_state(str(path))) and s.get("finished") and s, timeout,
                    f"the worker to finish ({path})")


HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
INSTALLED = HOOKS_DIR / "xskbroker"
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
# the system libvirtd's socket, pid file and hook path are the machine's: tests in parallel workers take turns
TURN = Path("/run/xskbroker-test-libvirtd.lock")
LIBVIRT_USER = "libvirt-qemu"


def libvirt_missing() -> str | None:
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install libvirt-daemon-system libvirt-clients; `make test` does)"
    try:
        pwd.getpwnam(LIBVIRT_USER)
    except KeyError:
        return f"there is no {LIBVIRT_USER} user (libvirt-daemon-system makes it)"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        if s.connect_ex(LIBVIRT_SOCK) == 0:
            return "a libvirtd is already running: libvirt reads its hooks when it starts, and this test needs its own"
    if INSTALLED.exists():
        return f"{INSTALLED} is already installed: this test will not replace it"
    return None


def kvm_trap() -> str | None:
    """Why libvirtd needs /dev/kvm hidden, or None.

    libvirt 9.0 probes QEMU with KVM when /dev/kvm works for root, but counts KVM usable only if QEMU's user can
    open it. Here /dev/kvm is root's alone (0600, no udev rule), so the two never agree: every capabilities
    lookup re-probes QEMU (~4 s), ~36 s per domain start. Over an unusable /dev/kvm both say "no KVM".
    """
    if not os.path.exists("/dev/kvm"):
        return None
    user = pwd.getpwnam(LIBVIRT_USER)
    st = os.stat("/dev/kvm")
    groups = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if LIBVIRT_USER in g.gr_mem)}
    if st.st_uid == user.pw_uid and st.st_mode & 0o600 == 0o600:
        return None
    if (st.st_gid in groups and st.st_mode & 0o060 == 0o060) or st.st_mode & 0o006 == 0o006:
        return None
    return f"/dev/kvm is mode {oct(st.st_mode & 0o777)} uid {st.st_uid} gid {st.st_gid}: {LIBVIRT_USER} cannot open it"


@contextlib.contextmanager
def libvirtd(workdir: Path, conf: Path, netns: str | None = None, kvm_group: bool = False) -> Iterator[None]:
    """virtlogd and libvirtd in the foreground, as our children, with the hook installed where libvirt looks
    (/etc/libvirt/hooks/qemu.d: the path is built into libvirt) for their lifetime; all of it undone after.

    netns: libvirtd (and so every QEMU it starts) runs in that network namespace. kvm_group: in libvirtd's
    mount namespace /dev/kvm is root:kvm 0660, as Debian's udev rule makes it, so QEMU's user can use KVM.
    One at a time on the machine (TURN): a second would find the first's socket and talk to it, with its hook."""
    with open(TURN, "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # released when the file closes, after everything below is undone
        with _libvirtd(workdir, conf, netns, kvm_group):
            yield


@contextlib.contextmanager
def _libvirtd(workdir: Path, conf: Path, netns: str | None, kvm_group: bool) -> Iterator[None]:
    made: list[Path] = []
    for d in (HOOKS_DIR.parent, HOOKS_DIR):
        if not d.exists():
            d.mkdir(mode=0o755)
            made.append(d)
    # as an installer would: line 1 names the interpreter that has the package (here also the test's config,
    # since libvirt gives hooks no environment of ours)
    body = HOOK.read_text().split("\n", 1)[1]
    INSTALLED.write_text(f"#!/usr/bin/env -S {lvconf.CONFIG_ENV}={conf} PYTHONPATH={readable_code()} {SYSTEM_PYTHON}"
                         f"\n{body}")
    INSTALLED.chmod(0o755)
    daemon = ["libvirtd", "--pid-file", str(workdir / "libvirtd.pid")]
    if kvm_group:
        # a node of the namespace's own, on a tmpfs there: the host's /dev/kvm and filesystems stay as they are
        rdev = os.stat("/dev/kvm").st_rdev
        (workdir / "dev").mkdir()
        (workdir / "qemu.conf").write_text(Path("/etc/libvirt/qemu.conf").read_text() + "\nnamespaces = []\n")
        daemon = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount -t tmpfs -o mode=0755 xskbroker-dev "$0" '
                  f'&& mknod -m 0660 "$0/kvm" c {os.major(rdev)} {os.minor(rdev)} && chgrp kvm "$0/kvm" '
                  '&& mount --bind "$0/kvm" /dev/kvm && mount --bind "$1" /etc/libvirt/qemu.conf && shift && exec "$@"',
                  str(workdir / "dev"), str(workdir / "qemu.conf"), *daemon]
    elif kvm_trap():
        # In a mount namespace of its own: /dev/kvm is a plain empty file there, so probe and check agree on
        # "no KVM"; and its qemu.conf says namespaces = [], since libvirt cannot carry a file mount at /dev/kvm
        # into a domain's private /dev ("Unable to move … mount to /dev/kvm"). The host sees neither change.
        (workdir / "no-kvm").touch(mode=0o600)
        (workdir / "qemu.conf").write_text(Path("/etc/libvirt/qemu.conf").read_text() + "\nnamespaces = []\n")
        daemon = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount --bind "$0" /dev/kvm && mount --bind "$1" /etc/libvirt/qemu.conf && shift && exec "$@"',
                  str(workdir / "no-kvm"), str(workdir / "qemu.conf"), *daemon]
    if netns:
        daemon = ["nsenter", f"--net=/run/netns/{netns}", *daemon]  # not `ip netns exec`: it remounts /sys
    procs: list[subprocess.Popen[bytes]] = []
    log = open(workdir / "libvirt.log", "wb")  # noqa: SIM115 - closed below
    try:
        for argv in (["virtlogd", "--pid-file", str(workdir / "virtlogd.pid")], daemon):
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        deadline = time.monotonic() + 20
        while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                             check=False).returncode:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                pytest.skip(f"libvirtd could not start here: `{' '.join(daemon)}` exited or did not answer "
                            f"`virsh version`:\n{(workdir / 'libvirt.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield
    finally:
        for p in reversed(procs):
            p.terminate()
            helper_process.stop(p, 10)
        log.close()
        INSTALLED.unlink(missing_ok=True)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    if check and done.returncode:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def transient_domain(name: str, xml_path: Path, paused: bool = True) -> Iterator[subprocess.CompletedProcess[str]]:
    done = virsh("create", str(xml_path), *(["--paused"] if paused else []), check=False)
    try:
        yield done
    finally:
        if virsh("domstate", name, check=False).returncode == 0:
            virsh("destroy", name, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/var/log/libvirt/qemu/{name}.log")
