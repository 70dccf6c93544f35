"""The libvirt hook end to end with a real af-xdp QEMU (10.2.2, tests/realclients/build-qemu.sh) as the
domain's emulator under a real libvirtd (Debian 12's 9.0): domain start -> the hook's grant as QEMU's user ->
netdev_add af-xdp through libvirt's monitor -> frames both ways -> virsh destroy -> the lease ends.

What it takes here, each for a reason libvirt or this machine gives (docs/libvirt.md, "With a QEMU that has
af-xdp"):
- a real machine type: libvirt drops `none` from the machines it accepts, so the build has the `pc` board;
- KVM: that build has no TCG, and libvirt runs a `type='qemu'` domain only with TCG. libvirtd gets /dev/kvm as
  Debian's udev rule makes it (root:kvm 0660) in a mount namespace of its own; here it is 0600 root;
- CAP_IPC_LOCK for QEMU: its UMEM is 32 MiB, the hard memlock limit here is 8 MiB, and nothing here has
  CAP_SYS_RESOURCE, so neither the broker (`raise_memlock`) nor libvirt (`<memtune><hard_limit>`) can raise
  it. libvirt starts QEMU with no capability, so the emulator is a wrapper that execs QEMU with CAP_IPC_LOCK
  as its only (ambient) one, from a copy of setpriv that has that file capability.
The guest is SeaBIOS with nothing to boot; the data path is guest-less as in real_qemu.py: the af-xdp netdev
joins a hub with a `dgram` netdev on loopback, and libvirtd runs in the test's network namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace

from .conftest import ns_name, wait_for
from .libvirtd_rig import LIBVIRT_USER, finished_state, gone, leases, libvirt_missing, libvirtd, transient_domain, virsh
from .real_qemu import DataPath, qemu_binary

SEABIOS = "/usr/share/seabios/bios-256k.bin"
LIBVIRT_CAPS_CACHE = "/var/cache/libvirt/qemu/capabilities"
FRAMES = 200
CAP_IPC_LOCK = 1 << 14
# one queue for QEMU's user: the lease has to end for the queue to be granted again
POLICY = f"""\
version = 1

[[allow]]
name = "vms"
users = ["{LIBVIRT_USER}"]
interfaces = ["xsk0"]
queues = ["0"]
kinds = ["bare"]
max_queues = 1
"""


def kvm_missing() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm: libvirt runs a QEMU without TCG only as a KVM domain"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return f"/dev/kvm does not open for root: {e}"
    return None


def domain_xml(name: str, emulator: str, ifname: str, netdevs: list[str]) -> str:
    args = "\n".join(f"    <qemu:arg value='{a}'/>" for a in netdevs)
    return f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <metadata>
    <xsk:interfaces xmlns:xsk="urn:xskbroker:libvirt:1">
      <xsk:interface id="xdp0" name="{ifname}" queues="1"/>
    </xsk:interfaces>
  </metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader type='rom' readonly='yes'>{SEABIOS}</loader>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
{args}
  </qemu:commandline>
</domain>
"""


@contextlib.contextmanager
def ipc_lock_emulator(qemu: str) -> Iterator[str]:
    """An emulator that runs `qemu` with CAP_IPC_LOCK (ambient, so it survives the exec; no secure-exec, so
    QEMU's $ORIGIN rpath to its libxdp still counts). Only QEMU's user's group may run the capable setpriv."""
    where = tempfile.mkdtemp(prefix="xskbroker-lvq-")
    try:
        os.chmod(where, 0o755)
        setpriv = os.path.join(where, "setpriv")
        shutil.copy(shutil.which("setpriv") or "/usr/bin/setpriv", setpriv)
        os.chown(setpriv, 0, pwd.getpwnam(LIBVIRT_USER).pw_gid)
        os.chmod(setpriv, 0o750)
        subprocess.run(["setcap", "cap_ipc_lock+ep", setpriv], check=True)
        wrapper = os.path.join(where, "qemu")
        Path(wrapper).write_text(f'#!/bin/sh\nexec {setpriv} --inh-caps=+ipc_lock --ambient-caps=+ipc_lock -- '
                                 f'{qemu} "$@"\n')
        os.chmod(wrapper, 0o755)
        yield wrapper
    finally:
        shutil.rmtree(where, ignore_errors=True)
        # libvirtd's probe of this emulator, cached under the hash of its path: a path no run uses again
        digest = hashlib.sha256(os.path.join(where, "qemu").encode()).hexdigest()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{LIBVIRT_CAPS_CACHE}/{digest}.xml")


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for {pid}")


def test_a_libvirt_domain_with_af_xdp_qemu_gets_its_netdev_from_the_hook_and_frames_flow(
        tmp_path: Path, figures: Any) -> None:
    binary = qemu_binary()  # first: a missing build fails, it is never skipped
    missing = libvirt_missing() or kvm_missing() or (None if os.path.exists(SEABIOS) else
                                                     f"no {SEABIOS} (apt-get install seabios)")
    if missing:
        pytest.skip(missing)
    state_dir = tmp_path / "state"
    name = f"xsklvq{os.getpid()}"
    qemu_user = pwd.getpwnam(LIBVIRT_USER)
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=1) as ns, \
            BrokerProcess(ns.name, POLICY) as broker, ipc_lock_emulator(binary) as emulator:
        path = DataPath(ns.name, ns.peer, ns.mac(ns.inside), ns.mac(ns.peer))
        try:
            conf = tmp_path / "libvirt.conf"
            conf.write_text(f'socket = "{broker.socket_path}"\nstate_dir = "{state_dir}"\ntimeout = 20\n')
            xml = tmp_path / "domain.xml"
            xml.write_text(domain_xml(name, emulator, ns.inside, path.netdevs()))
            with libvirtd(tmp_path, conf, netns=ns.name, kvm_group=True):
                started = time.monotonic()
                with transient_domain(name, xml, paused=False) as done:  # paused, QEMU's net layer sends nothing
                    assert done.returncode == 0, done.stderr
                    figures(virsh_create_s=round(time.monotonic() - started, 2))
                    qemu_pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
                    state = finished_state(state_dir / f"{name}.json", 60.0)
                    figures(worker_done_s=round(time.monotonic() - started, 2))
                    wait_for(lambda: gone(state["worker_pid"]), 10.0, "the worker to exit")
                    log = (state_dir / f"{name}.log").read_text()

                    # QEMU as libvirt runs it: its user, CAP_IPC_LOCK alone (from the wrapper)
                    assert os.readlink(f"/proc/{qemu_pid}/exe") == binary
                    assert os.stat(f"/proc/{qemu_pid}").st_uid == qemu_user.pw_uid
                    assert cap_eff(qemu_pid) == CAP_IPC_LOCK
                    # the hook's worker attached it: af-xdp accepted by QEMU through libvirt's monitor
                    assert state["af_xdp_warning"] is None, log
                    (rec,) = state["interfaces"]
                    assert rec["status"] == "attached", log
                    assert "xdp0: netdev_add {\"type\":\"af-xdp\"" in log and log.rstrip().endswith(
                        "done: 1 of 1 interface(s) attached"), log
                    # asked as QEMU's user, held by QEMU
                    (grant,) = [r for r in broker.records() if r.get("event") == "grant"]
                    assert grant["decision"] == "allow" and grant["peer"]["user"] == LIBVIRT_USER
                    # QEMU's UMEM is not charged to its limit: no memlock asked, no false warning
                    assert grant["request"]["memlock"] == 0 and "RLIMIT_MEMLOCK" not in log, log
                    (lease,) = leases(broker.socket_path)
                    assert (lease["lease"], lease["pid"], lease["uid"], lease["queues"]) == (
                        rec["lease"], qemu_pid, qemu_user.pw_uid, [0])

                    # frames both ways through QEMU's af-xdp netdev, joined to the dgram netdev's hub
                    virsh("qemu-monitor-command", name, '{"execute":"netdev_add","arguments":{"type":"hubport",'
                          '"id":"hub-xdp0","hubid":0,"netdev":"xdp0"}}')
                    first = path.first_frame()
                    assert (path.to_qemu(FRAMES), path.from_qemu(FRAMES)) == (FRAMES, FRAMES)
                    figures(first_frame_s=round(first, 3), frames_each_way=FRAMES)

                    # destroy: QEMU exits, the lease ends, stopped/release forget the domain
                    virsh("destroy", name)
                    wait_for(lambda: gone(qemu_pid), 10.0, "QEMU to exit")
                    wait_for(lambda: not leases(broker.socket_path), 10.0, "the lease to end")
                    wait_for(lambda: not (state_dir / f"{name}.json").exists(), 10.0, "the stopped/release hooks")
                    ended = [r for r in broker.records() if r.get("lease") == rec["lease"]
                             and r.get("event") in ("lease-ended", "release")]
                    assert ended, broker.records()
                    assert f"{name}: stopped: state forgotten\n" in (state_dir / f"{name}.log").read_text()
        finally:
            path.close()
