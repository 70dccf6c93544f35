"""The libvirt hook's pure parts: the <metadata> declaration, the configuration, argv dispatch, virsh replies,
/proc parsing (no root). The worker's plug sequence against a fake QEMU monitor and a fake broker:
tests/unit/test_libvirt_worker.py.

The worker against the real QEMU binary, a real broker and a real libvirtd: tests/integration/test_libvirt.py.
"""

from __future__ import annotations

import ast
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import qmp as q
from xskbroker.client.libvirt import config as lvconf
from xskbroker.client.libvirt import hook as lvhook
from xskbroker.client.libvirt import identity as lvid
from xskbroker.client.libvirt import metadata as lvmeta
from xskbroker.client.libvirt import monitors as lvmon
from xskbroker.client.libvirt import state as lvstate
from xskbroker.common import procfs

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "deploy" / "libvirt" / "xskbroker"
NS = "urn:xskbroker:libvirt:1"


def domain(metadata: str = "", name: str = "vm1") -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"{f'<metadata>{metadata}</metadata>' if metadata else ''}<devices/></domain>")


def ours(*interfaces: str, ns: str = NS) -> str:
    return f'<xsk:interfaces xmlns:xsk="{ns}">{"".join(interfaces)}</xsk:interfaces>'


def iface(**attrs: str) -> str:
    attrs = {"id": "xdp0", "name": "eth1", **attrs}
    return "<xsk:interface " + " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items()) + "/>"


def error_of(xml: str) -> str:
    with pytest.raises(lvmeta.MetadataError) as e:
        lvmeta.parse_interfaces(xml)
    return str(e.value)


# ---- metadata ------------------------------------------------------------------------------------------

def test_the_documented_example_parses() -> None:
    xml = domain(ours('<xsk:interface id="xdp0" name="eth1" queues="2" start-queue="0" device="virtio-net-pci"/>'))
    (x,) = lvmeta.parse_interfaces(xml)
    assert x == lvmeta.Interface("xdp0", "eth1", 2, 0, "virtio-net-pci")
    assert list(x.queue_ids) == [0, 1]
    assert x.device_props() == {"mq": True, "vectors": 6}  # virtio-net multiqueue defaults


def test_defaults_several_interfaces_properties_and_other_metadata_left_alone() -> None:
    xml = domain(
        '<app:thing xmlns:app="http://example.org/app"><app:interface id="nope"/></app:thing>'
        + ours(iface(id="a", name="eth1"),
               '<xsk:interface id="b" name="eth1" queues="2" start-queue="1" device="e1000e" mac="52:54:00:AA:BB:01">'
               '<!-- a comment -->'
               '<xsk:property name="bus" value="pcie.1"/><xsk:property name="addr" value="0x0"/>'
               '<xsk:property name="x-flag" value="true"/><xsk:property name="n" value="-3"/>'
               '<xsk:property name="label" value="42" type="string"/>'
               '</xsk:interface>'))
    a, b = lvmeta.parse_interfaces(xml)
    assert a == lvmeta.Interface("a", "eth1")  # one queue from 0, no device, no mac
    assert a.device_props() == {}
    assert (b.queues, b.start_queue, b.device, b.mac) == (2, 1, "e1000e", "52:54:00:aa:bb:01")
    assert b.device_props() == {"mac": "52:54:00:aa:bb:01", "bus": "pcie.1", "addr": "0x0", "x-flag": True,
                                "n": -3, "label": "42"}  # not virtio: no mq defaults


def test_declared_properties_win_over_the_virtio_defaults() -> None:
    xml = domain(ours('<xsk:interface id="x" name="eth1" queues="4" device="virtio-net-pci">'
                      '<xsk:property name="vectors" value="4"/><xsk:property name="mq" value="false"/>'
                      '</xsk:interface>'))
    assert lvmeta.parse_interfaces(xml)[0].device_props() == {"mq": False, "vectors": 4}


@pytest.mark.parametrize("xml", [
    domain(),
    domain('<app:x xmlns:app="urn:other"/>'),
    "<domain><name>x</name></domain>",
    domain(ours()),  # declared, but empty
])
def test_no_declaration_means_no_interfaces(xml: str) -> None:
    assert lvmeta.parse_interfaces(xml) == []


@pytest.mark.parametrize(("xml", "message"), [
    ("<domain><metadata>", "the domain XML is not well-formed: no element found: line 1, column 18"),
    ("<network/>", "expected a <domain> document, got <network>"),
    (domain(ours(ns="urn:xskbroker:libvirt:2")),
     "<metadata> uses namespace 'urn:xskbroker:libvirt:2', which this hook does not know (it reads "
     "'urn:xskbroker:libvirt:1')"),
    (domain(ours() + '<y:interfaces xmlns:y="urn:xskbroker:libvirt:1"/>'),
     "<metadata> has more than one element in the xskbroker namespace: declare every <xsk:interface> inside a "
     "single <xsk:interfaces>"),
    (domain(f'<xsk:interface xmlns:xsk="{NS}" id="a" name="eth1"/>'),
     f'expected <xsk:interfaces xmlns:xsk="{NS}"> in <metadata>, got <xsk:interface>'),
    (domain(f'<xsk:interfaces xmlns:xsk="{NS}" socket="/x"/>'),
     "<xsk:interfaces>: unknown attribute socket (known: )"),
    (domain(ours("<xsk:nic/>")), "unexpected element <xsk:nic> in <xsk:interfaces>: only <xsk:interface> may "
     "appear there"),
    (domain(ours('<interface id="a" name="eth1"/>')), "unexpected element <interface> in <xsk:interfaces>: only "
     "<xsk:interface> may appear there"),
    (domain(ours('<xsk:interface name="eth1"/>')), "<xsk:interface> #1: id= is required (the QEMU netdev id, e.g. "
     'id="xdp0")'),
    (domain(ours(iface(id="a"), iface(id="0bad"))), "<xsk:interface> #2: id='0bad' is not a valid QEMU id: it must "
     "start with a letter and contain only letters, digits, '-', '.' and '_'"),
    (domain(ours('<xsk:interface id="a"/>')), "<xsk:interface id='a'>: name= is required (the host interface, "
     'e.g. name="eth1")'),
    (domain(ours(iface(id="a", name="a-very-long-ifname")), ), "<xsk:interface id='a'>: name='a-very-long-ifname' is "
     "not a valid interface name: it is 18 bytes long; the kernel allows 15"),
    (domain(ours(iface(queues="two"))), "<xsk:interface id='xdp0'>: queues='two' is not a whole number from 1 to "
     "126"),
    (domain(ours(iface(queues="0"))), "<xsk:interface id='xdp0'>: queues='0' is not a whole number from 1 to 126"),
    (domain(ours(iface(queues="127"))), "<xsk:interface id='xdp0'>: queues='127' is not a whole number from 1 to "
     "126"),
    (domain(ours(iface(queues=" 2"))), "<xsk:interface id='xdp0'>: queues=' 2' is not a whole number from 1 to 126"),
    (domain(ours(iface(start_queue="-1"))), "<xsk:interface id='xdp0'>: start-queue='-1' is not a whole number "
     "from 0 to 65535"),
    (domain(ours(iface(start_queue="65535", queues="2"))), "<xsk:interface id='xdp0'>: start-queue=65535 with "
     "queues=2 goes past queue 65535"),
    (domain(ours(iface(queue="2"))), "<xsk:interface id='xdp0'>: unknown attribute queue (known: id, name, queues, "
     "start-queue, device, mac)"),
    (domain(ours(iface(device="virtio net"))), "<xsk:interface id='xdp0'>: device='virtio net' is not a QEMU "
     "device model name (e.g. virtio-net-pci)"),
    (domain(ours(iface(mac="52:54:00:12:34"))), "<xsk:interface id='xdp0'>: mac='52:54:00:12:34' is not a MAC "
     "address like 52:54:00:12:34:56"),
    (domain(ours(iface(mac="01:00:5e:00:00:01"))), "<xsk:interface id='xdp0'>: mac='01:00:5e:00:00:01' is a "
     "multicast address: a NIC needs a unicast one"),
    (domain(ours('<xsk:interface id="a" name="eth1"><xsk:property name="bus" value="pci.0"/></xsk:interface>')),
     "<xsk:interface id='a'>: <xsk:property> sets device properties, but there is no device= to add"),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000"><xsk:property name="netdev" value="n"/>'
                 '</xsk:interface>')),
     "<xsk:interface id='a'>: property 'netdev' is set by the hook (driver from device=, netdev and id from id=)"),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000"><xsk:property name="x"/></xsk:interface>')),
     "<xsk:interface id='a'>: <xsk:property> needs both name= and value="),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000"><xsk:property name="x" value="y" type="bool"/>'
                 '</xsk:interface>')), "<xsk:interface id='a'>: property 'x': 'y' is not a bool (true or false)"),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000"><xsk:property name="x" value="1" type="u8"/>'
                 '</xsk:interface>')),
     "<xsk:interface id='a'>: property 'x': type='u8' is not one of string, int, bool"),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000"><xsk:property name="x" value="1"/>'
                 '<xsk:property name="x" value="2"/></xsk:interface>')),
     "<xsk:interface id='a'>: property 'x' is given more than once"),
    (domain(ours('<xsk:interface id="a" name="eth1" device="e1000" mac="52:54:00:00:00:01">'
                 '<xsk:property name="mac" value="52:54:00:00:00:02"/></xsk:interface>')),
     "<xsk:interface id='a'>: mac is given both as mac= and as an <xsk:property>"),
    (domain(ours('<xsk:interface id="a" name="eth1"><xsk:bus/></xsk:interface>')),
     "<xsk:interface id='a'>: unexpected element <xsk:bus>; only <xsk:property> may appear inside <xsk:interface>"),
    (domain(ours(iface(id="a"), iface(id="a", start_queue="1"))),
     "<xsk:interface> id 'a' is declared more than once"),
    (domain(ours(iface(id="a", queues="2"), iface(id="b", start_queue="1"))),
     "<xsk:interface id='a'> and <xsk:interface id='b'> both claim eth1 queue 1"),
    (domain(ours(iface(id="a", mac="52:54:00:00:00:01"), iface(id="b", name="eth2", mac="52:54:00:00:00:01"))),
     "<xsk:interface id='a'> and <xsk:interface id='b'> have the same mac 52:54:00:00:00:01"),
])
def test_bad_declarations_say_where_and_why(xml: str, message: str) -> None:
    assert error_of(xml) == message


def test_the_same_queues_of_different_interfaces_do_not_clash() -> None:
    xml = domain(ours(iface(id="a", name="eth1", queues="2"), iface(id="b", name="eth2", queues="2")))
    assert [x.name for x in lvmeta.parse_interfaces(xml)] == ["eth1", "eth2"]


# ---- configuration -------------------------------------------------------------------------------------

def test_config_defaults_and_a_full_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lvconf.CONFIG_ENV, raising=False)
    monkeypatch.setattr(lvconf, "DEFAULT_CONFIG", str(tmp_path / "absent.conf"))
    assert lvconf.load_config() == lvconf.Config()  # no file at the default path: the defaults
    conf = tmp_path / "libvirt.conf"
    conf.write_text('# the hook\nsocket = "/run/b.sock"\nstate_dir = "/run/s"\nmonitor = "qmp:/run/{domain}.qmp"\n'
                    'virsh = "/usr/bin/virsh"\nuri = "qemu+unix:///system"\npid_dir = "/run/p"\ntimeout = 7\n')
    want = lvconf.Config("/run/b.sock", "/run/s", "qmp:/run/{domain}.qmp", "/usr/bin/virsh", "qemu+unix:///system",
                     "/run/p", 7.0)
    assert lvconf.load_config(str(conf)) == want
    monkeypatch.setenv(lvconf.CONFIG_ENV, str(conf))
    assert lvconf.load_config() == want
    monkeypatch.setenv(lvconf.CONFIG_ENV, str(tmp_path / "missing.conf"))
    with pytest.raises(lvconf.ConfigError, match=r"missing\.conf: no such file"):
        lvconf.load_config()  # a file named explicitly must exist


@pytest.mark.parametrize(("text", "message"), [
    ("socket = ", "<config>: Invalid value (at end of document)"),
    ("sock = '/x'", "<config>: unknown key 'sock' (known: socket, state_dir, monitor, virsh, uri, pid_dir, "
     "timeout)"),
    ("timeout = '5'", "<config>: timeout must be a number, not '5'"),
    ("timeout = true", "<config>: timeout must be a number, not True"),
    ("timeout = 0", "<config>: timeout must be more than 0 and at most 3600 seconds"),
    ("socket = 5", "<config>: socket must be a string, not 5"),
    ("socket = 'broker.sock'", "<config>: socket must be an absolute path"),
    ("monitor = 'qmp:'", "<config>: monitor must be \"virsh\" or \"qmp:PATH\", not 'qmp:'"),
    ("monitor = 'ssh'", "<config>: monitor must be \"virsh\" or \"qmp:PATH\", not 'ssh'"),
])
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(lvconf.ConfigError) as e:
        lvconf.parse_config(text)
    assert str(e.value) == message


def test_make_monitor_picks_the_transport() -> None:
    v = lvmon.make_monitor(lvconf.Config(uri="qemu:///x", virsh="/v", pid_dir="/p", timeout=3), "vm1")
    assert isinstance(v, lvmon.VirshMonitor) and (v.domain, v.uri, v.virsh, v.pid_dir, v.timeout) == (
        "vm1", "qemu:///x", "/v", "/p", 3)
    m = lvmon.make_monitor(lvconf.Config(monitor="qmp:/run/{domain}/qmp.sock"), "vm1")
    assert isinstance(m, lvmon.QMPMonitor) and m.path == "/run/vm1/qmp.sock"


# ---- dispatch ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "sub", "action"), [
    ("prepare", "begin", "check"), ("start", "begin", None), ("started", "begin", "plug"),
    ("stopped", "end", "forget"), ("release", "end", "forget"), ("migrate", "begin", None),
    ("restore", "begin", None), ("reconnect", "begin", None), ("attach", "begin", None),
    ("started", "end", None), ("prepare", "end", None), ("", "", None),
])
def test_action_for_each_libvirt_operation(op: str, sub: str, action: str | None) -> None:
    assert lvhook.action_for(op, sub) == action


class Spawned:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[lvmeta.Interface], lvconf.Config]] = []
        self.more: list[tuple[Any, ...]] = []  # what main passes besides those (the domain's uuid)

    def __call__(self, domain: str, interfaces: Sequence[lvmeta.Interface], cfg: lvconf.Config, *more: Any) -> int:
        self.calls.append((domain, list(interfaces), cfg))
        self.more.append(more)
        return 4242


class Unreadable(io.StringIO):
    def read(self, *a: Any) -> str:
        raise AssertionError("stdin was read")


@pytest.fixture
def conf(tmp_path: Path) -> str:
    path = tmp_path / "libvirt.conf"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nsocket = "{tmp_path / "broker.sock"}"\n')
    return str(path)


def run_main(argv: list[str], stdin: str | io.StringIO, conf: str, spawn: Spawned,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    stream = io.StringIO(stdin) if isinstance(stdin, str) else stdin
    rc = lvhook.main(argv, stream, conf, spawn)
    out, err = capsys.readouterr()
    return rc, out, err


GOOD = domain(ours(iface(queues="2", device="virtio-net-pci")))
BAD = domain(ours(iface(queues="many")))


def test_started_spawns_the_worker_with_the_declaration(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    spawn = Spawned()
    assert run_main(["vm1", "started", "begin", "-"], GOOD, conf, spawn, capsys) == (0, "", "")
    ((name, interfaces, cfg),) = spawn.calls
    assert name == "vm1" and interfaces == lvmeta.parse_interfaces(GOOD) and cfg == lvconf.load_config(conf)


@pytest.mark.parametrize("name", ["7", "0", "6f0b0a4e-5d3c-4b7a-9e2f-1c2d3e4f5a6b"])
def test_virsh_reaches_the_domain_by_its_uuid_not_a_name_virsh_reads_as_an_id_or_uuid(
        name: str, conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    """virsh looks `--domain X` up as an ID first, then as a UUID, and only then as a name: a domain named "7" (or
    named after another domain's UUID) would have its sockets plugged into that other domain's QEMU."""
    uuid = "0f1e2d3c-4b5a-4678-9abc-def012345678"
    xml = GOOD.replace("<name>vm1</name>", f"<name>{name}</name><uuid>{uuid}</uuid>")
    spawn = Spawned()
    assert run_main([name, "started", "begin", "-"], xml, conf, spawn, capsys) == (0, "", "")
    ((domain_name, _, cfg),), (more,) = spawn.calls, spawn.more
    monitor = lvmon.make_monitor(cfg, domain_name, *more)
    argv = monitor.argv("query-status")
    assert argv[argv.index("--domain") + 1] == uuid
    assert monitor.describe() == f"libvirt's monitor of {name} (virsh -c qemu:///system)"


def test_undeclared_domains_and_other_operations_are_left_alone(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    spawn = Spawned()
    for op, sub in [("migrate", "begin"), ("restore", "begin"), ("reconnect", "begin"), ("attach", "begin"),
                    ("start", "begin"), ("started", "end")]:
        assert run_main(["vm1", op, sub, "-"], Unreadable(), conf, spawn, capsys) == (0, "", "")
    assert run_main(["vm1", "started", "begin", "-"], domain(), conf, spawn, capsys) == (0, "", "")
    assert run_main(["vm1", "prepare", "begin", "-"], domain(), "/nonexistent.conf", spawn, capsys) == (0, "", "")
    assert spawn.calls == []


def test_prepare_refuses_a_bad_declaration_with_the_reason(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    spawn = Spawned()
    rc, out, err = run_main(["vm1", "prepare", "begin", "-"], BAD, conf, spawn, capsys)
    assert (rc, out) == (1, "")
    assert err == "xskbroker: domain vm1: <xsk:interface id='xdp0'>: queues='many' is not a whole number from 1 " \
                  "to 126\n"
    assert run_main(["vm1", "prepare", "begin", "-"], GOOD, conf, spawn, capsys) == (0, "", "")
    rc, _, err = run_main(["vm1", "prepare", "begin", "-"], GOOD, conf + ".missing", spawn, capsys)
    assert rc == 1 and err == f"xskbroker: domain vm1: {conf}.missing: no such file\n"
    assert spawn.calls == []


def test_a_number_too_long_for_int_is_refused_with_the_reason(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    """int() refuses more than 4300 digits (ValueError): that is out of range, not a traceback."""
    for attr in ("queues", "start_queue"):
        huge = "1" * 5000
        rc, out, err = run_main(["vm1", "prepare", "begin", "-"], domain(ours(iface(**{attr: huge}))), conf,
                                Spawned(), capsys)
        assert (rc, out) == (1, "")
        assert err.startswith(f"xskbroker: domain vm1: <xsk:interface id='xdp0'>: {attr.replace('_', '-')}='1111")
        assert err.endswith("' is not a whole number from 1 to 126\n" if attr == "queues" else
                            "' is not a whole number from 0 to 65535\n")


def test_started_never_fails_the_domain(conf: str, capsys: pytest.CaptureFixture[str]) -> None:
    spawn = Spawned()
    rc, _, err = run_main(["vm1", "started", "begin", "-"], BAD, conf, spawn, capsys)
    assert rc == 0 and "queues='many'" in err and spawn.calls == []

    def broken(*a: Any) -> int:
        raise OSError(11, "Resource temporarily unavailable")

    rc = lvhook.main(["vm1", "started", "begin", "-"], io.StringIO(GOOD), conf, broken)
    assert rc == 0 and "cannot start the worker: [Errno 11]" in capsys.readouterr().err


def test_usage_without_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert lvhook.main([], io.StringIO(""), None, Spawned()) == 2
    assert capsys.readouterr().err.startswith("usage: ")


def test_release_without_state_is_quiet_and_creates_nothing(conf: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for op in ("stopped", "release"):
        assert run_main(["vm1", op, "end", "-"], GOOD, conf, Spawned(), capsys) == (0, "", "")
    assert not (tmp_path / "state").exists()


def test_release_forgets_the_state_of_a_finished_worker(conf: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    released = {"id": "xdp0", "lease": "aa", "released": True, "status": "failed"}
    lvstate.write_state(str(state_dir / "vm%2F1.json"), {"domain": "vm/1", "finished": True, "interfaces": [released],
                                                     "identity": {"uid": 0, "gid": 0, "groups": []}})
    assert run_main(["vm/1", "release", "end", "-"], GOOD, conf, Spawned(), capsys) == (0, "", "")
    assert sorted(p.name for p in state_dir.iterdir()) == ["vm%2F1.log"]  # no lease left to release
    assert (state_dir / "vm%2F1.log").read_text().rstrip().endswith("vm/1: release: state forgotten")


def test_domain_files_stay_in_the_state_dir() -> None:
    assert lvstate.domain_file("/run/s", "vm1", ".json") == "/run/s/vm1.json"
    assert lvstate.domain_file("/run/s", "../../etc/x", ".log") == "/run/s/..%2F..%2Fetc%2Fx.log"


def test_the_installed_hook_runs_main(tmp_path: Path, conf: str) -> None:
    """deploy/libvirt/xskbroker is executable and hands argv and stdin to main()."""
    assert os.access(HOOK, os.X_OK)
    env = {**os.environ, lvconf.CONFIG_ENV: conf, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(HOOK), "vm1", "prepare", "begin", "-"], input=BAD, text=True,
                          capture_output=True, env=env, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (1, "") and "queues='many'" in done.stderr
    done = subprocess.run([sys.executable, str(HOOK), "vm1", "migrate", "begin", "-"], input=GOOD, text=True,
                          capture_output=True, env=env, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    first = HOOK.read_text().splitlines()[0]
    assert first == "#!/usr/bin/python3"  # what install rewrites to the package's interpreter


def test_the_hook_steps_aside_when_the_package_is_missing(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-I", "-S", str(HOOK), "vm1", "prepare", "begin", "-"], input=BAD,
                          text=True, capture_output=True, timeout=30, check=False, cwd=tmp_path)
    assert done.returncode == 0
    assert "cannot import the xskbroker package: No module named 'xskbroker'" in done.stderr


# ---- virsh and /proc -----------------------------------------------------------------------------------

def test_virsh_command_line() -> None:
    v = lvmon.VirshMonitor("vm 1", virsh="/usr/bin/virsh", uri="qemu:///system")
    assert v.argv("getfd", {"fdname": "xdp0-q0"}, [7]) == [
        "/usr/bin/virsh", "-q", "-c", "qemu:///system", "qemu-monitor-command", "--domain", "vm 1", "--pass-fds",
        "7", "--cmd", '{"execute":"getfd","arguments":{"fdname":"xdp0-q0"}}']
    assert v.argv("query-status")[-2:] == ["--cmd", '{"execute":"query-status"}']
    assert "--pass-fds" not in v.argv("closefd", {"fdname": "a"}, [])
    assert v.argv("x", None, [3, 4])[7:9] == ["--pass-fds", "3,4"]


def test_virsh_replies_are_qemus_own() -> None:
    assert lvmon.parse_virsh_reply("query-status", '{"return":{"status":"running"},"id":"libvirt-410"}\n\n') == {
        "status": "running"}
    with pytest.raises(q.QMPError) as e:
        lvmon.parse_virsh_reply("netdev_add", '{"id":"libvirt-411","error":{"class":"GenericError","desc":'
                                           '"Parameter \'type\' does not accept value \'af-xdp\'"}}\n')
    assert (str(e.value), e.value.command, e.value.error_class) == (
        "Parameter 'type' does not accept value 'af-xdp'", "netdev_add", "GenericError")
    for junk in ("", "[]", "not json", '{"id": 1}'):
        with pytest.raises(q.QMPConnectionError):
            lvmon.parse_virsh_reply("x", junk)


def test_virsh_failures() -> None:
    busy = lvmon.virsh_failure("query-status", "error: Timed out during operation: cannot acquire state change lock "
                                            "(held by monitor=remoteDispatchDomainCreateXML)\n")
    assert isinstance(busy, q.QMPTimeout)
    gone = lvmon.virsh_failure("getfd", "error: failed to get domain 'vm1'\n")
    assert isinstance(gone, q.QMPConnectionError)
    assert str(gone) == "virsh qemu-monitor-command (getfd) failed: failed to get domain 'vm1'"


def test_a_fake_virsh_gets_the_fd(tmp_path: Path) -> None:
    """--pass-fds N names an fd that virsh really inherits: a stand-in virsh reads the socket's inode there."""
    fake = tmp_path / "virsh"
    fake.write_text('#!/bin/sh\nfd=$(echo "$@" | sed -n "s/.*--pass-fds \\([0-9]*\\).*/\\1/p")\n'
                    'ino=$(stat -L -c %i /proc/self/fd/$fd)\necho "{\\"return\\": {\\"ino\\": $ino}}"\n')
    fake.chmod(0o755)
    a, b = socket.socketpair()
    with a, b:
        got = lvmon.VirshMonitor("vm1", virsh=str(fake)).execute("getfd", {"fdname": "n"}, [a.fileno()])
        assert got == {"ino": os.fstat(a.fileno()).st_ino}


def test_proc_parsing() -> None:
    status = "Name:\tqemu\nUid:\t64055\t64055\t64055\t64055\nGid:\t64055\t64055\t64055\t64055\nGroups:\t108 64055 \n"
    assert lvid.identity_from_status(status) == lvid.Identity(64055, 64055, (108, 64055))
    # a set-group-id or set-user-id process is never QEMU (test_libvirt_qmp_peer.py: an exec'd setuid program)
    for ids in ("Uid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n", "Uid:\t7\t7\t7\t7\nGid:\t1000\t42\t42\t42\n"):
        with pytest.raises(ValueError, match="set-user-id or set-group-id"):
            lvid.identity_from_status(ids + "Groups:\n")
    assert lvid.identity_from_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n") == lvid.Identity(0, 0, ())
    with pytest.raises(ValueError):
        lvid.identity_from_status("Name: x\n")
    stat = "42 (qemu (x) 1) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 0 0"
    assert procfs.start_from_stat(stat) == 123456
    assert procfs.process_start(os.getpid()) == procfs.start_from_stat(Path("/proc/self/stat").read_text())
    assert lvid.same_process(os.getpid(), procfs.process_start(os.getpid()))
    assert not lvid.same_process(os.getpid(), 1) and not lvid.same_process(None, 1)


def test_the_example_config_documents_the_defaults() -> None:
    text = (ROOT / "deploy" / "libvirt" / "libvirt.conf").read_text()
    assert lvconf.parse_config(text) == lvconf.Config()
    settings = [line[1:] for line in text.splitlines() if line.startswith("#") and not line.startswith("# ")]
    assert lvconf.parse_config("\n".join(settings)) == lvconf.Config()
    assert [line.split(" = ")[0] for line in settings] == list(lvconf.CONFIG_TYPES)


def test_a_zombie_is_not_the_same_process() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        start = procfs.process_start(pid)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert start is not None and procfs.process_start(pid) == start  # a zombie keeps its pid and start time
        assert not lvid.same_process(pid, start)  # but it is no worker any more
    finally:
        os.waitpid(pid, 0)
    assert not lvid.same_process(pid, start)


def test_the_hook_imports_no_command_line_module() -> None:
    """Not even inside a function: the root-run hook shares code with the commands, not the commands."""
    hook_files = [*sorted((ROOT / "client" / "libvirt").glob("*.py")), ROOT / "client" / "libvirt_hook.py",
                  *(ROOT / "client" / f"{m}.py" for m in ("hotplug", "qmp", "qmp_codec", "qemu_support"))]
    for path in hook_files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.endswith(("_cli", ".cli")) or n in ("cli", "qmp_cli")]
            assert not bad, f"{path.name} imports {bad}"
