"""xskbroker's libvirt hook: AF_XDP interfaces declared in a domain's <metadata>, hot-plugged when it starts.

libvirt runs /etc/libvirt/hooks/qemu.d/xskbroker (deploy/libvirt/xskbroker, which only calls main() here) as
root, with argv `DOMAIN OPERATION SUB-OPERATION EXTRA` and the domain XML on stdin. See docs/libvirt.md.

- `prepare begin`: check the declaration; a malformed one fails the start, with the reason.
- `started begin`: spawn a detached worker and return at once. libvirt holds the domain's job while a hook
  runs, so any call back into libvirt from the hook itself would wait for the hook: a deadlock. The worker
  finds QEMU's pid, takes bare grants from the broker through a child that runs as QEMU's user (so the
  policy judges the VM's user) naming QEMU as the holder, receives the fds from that child, and hot-plugs
  them through QEMU's monitor (`virsh qemu-monitor-command --pass-fds`): getfd per socket, netdev_add of
  type af-xdp, device_add. QEMU's errors are logged as QEMU words them, and a failed attempt is unwound.
- `stopped end`, `release end`: forget the domain's state file, releasing any lease still recorded (they
  normally ended with QEMU already).
- anything else: nothing, quietly.

The pure parts (metadata, config, dispatch, virsh replies, /proc parsing) come first, then the processes.
Imports nothing from broker/: the only privilege here is the hook's own, shed before the broker is asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote

from xskbroker.client import qmp as q
from xskbroker.common import safefiles
from xskbroker.policy import trust
from xskbroker.wire import protocol as proto

NS = "urn:xskbroker:libvirt:1"
NS_FAMILY = "urn:xskbroker:libvirt:"
DEFAULT_CONFIG = "/etc/xskbroker/libvirt.conf"
CONFIG_ENV = "XSKBROKER_LIBVIRT_CONF"  # for manual runs and tests: libvirt passes hooks no environment of ours
RELEASE_TIMEOUT = 5.0  # the stopped/release hooks run synchronously: libvirt waits for them
STOP_WORKER_WAIT = 2.0
USAGE = ("usage: xskbroker libvirt hook DOMAIN OPERATION SUB-OPERATION [EXTRA] (domain XML on stdin)\n"
         "installed as /etc/libvirt/hooks/qemu.d/xskbroker; see docs/libvirt.md")

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed(); also good enough for driver names
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_UINT = re.compile(r"[0-9]+\Z")
_INT = re.compile(r"-?[0-9]+\Z")
INTERFACE_ATTRS = ("id", "name", "queues", "start-queue", "device", "mac")
PROPERTY_ATTRS = ("name", "value", "type")
RESERVED_PROPS = ("driver", "netdev", "id")  # the hook sets these itself


class MetadataError(ValueError):
    """The xskbroker declaration in a domain's <metadata> cannot be used; the message says where and why."""


class ConfigError(ValueError):
    """The hook's configuration file cannot be used."""


# ---- the declaration in <metadata> (pure) --------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    """One <xsk:interface>: queues start_queue.. of host interface `name`, plugged as netdev `id`."""

    id: str
    name: str
    queues: int = 1
    start_queue: int = 0
    device: str | None = None  # device_add driver (virtio-net-pci, e1000e, …); None: the netdev only
    mac: str | None = None
    properties: tuple[tuple[str, Any], ...] = ()  # extra device_add properties, in document order

    @property
    def queue_ids(self) -> range:
        return range(self.start_queue, self.start_queue + self.queues)

    def device_props(self) -> dict[str, Any]:
        """device_add properties besides driver/netdev/id: mac, virtio-net multiqueue defaults, then the
        declared ones (which win)."""
        props: dict[str, Any] = {}
        if self.mac:
            props["mac"] = self.mac
        if self.device and self.device.startswith("virtio-net") and self.queues > 1:
            props.update(mq=True, vectors=2 * self.queues + 2)  # a vector per RX and TX queue, + config + control
        props.update(self.properties)
        return props


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _namespace(tag: str) -> str:
    return tag[1:].partition("}")[0] if tag.startswith("{") else ""


def _shown(tag: str) -> str:
    ns = _namespace(tag)
    return f"<xsk:{_local(tag)}>" if ns == NS else f"<{_local(tag)}>" + (f" (namespace {ns})" if ns else "")


def _attr_name(key: str) -> str:
    return f"{_local(key)} (namespace {_namespace(key)})" if key.startswith("{") else key


def _check_attrs(el: ET.Element, known: Sequence[str], where: str) -> None:
    unknown = [_attr_name(k) for k in el.attrib if k not in known]
    if unknown:
        raise MetadataError(f"{where}: unknown attribute{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)} (known: {', '.join(known)})")


def _uint(el: ET.Element, attr: str, default: int, lo: int, hi: int, where: str) -> int:
    text = el.get(attr)
    if text is None:
        return default
    if not _UINT.match(text) or not lo <= int(text) <= hi:
        raise MetadataError(f"{where}: {attr}={text!r} is not a whole number from {lo} to {hi}")
    return int(text)


def check_ifname(name: str) -> str:
    """The broker's rule for interface names (docs/protocol.md), checked before anything is asked."""
    problem = proto.ifname_problem(name)
    if problem:
        raise ValueError(f"{name!r} is not a valid interface name: {problem}")
    return name


def property_value(text: str, kind: str | None) -> Any:
    """A device_add property value: QMP wants real JSON types (6.2+ checks them), so guess unless `type` says."""
    if kind == "string":
        return text
    if kind == "bool" or (kind is None and text in ("true", "false")):
        if text not in ("true", "false"):
            raise ValueError(f"{text!r} is not a bool (true or false)")
        return text == "true"
    if kind == "int" or (kind is None and _INT.match(text)):
        if not _INT.match(text):
            raise ValueError(f"{text!r} is not an int")
        return int(text)
    if kind is not None:
        raise ValueError(f"type={kind!r} is not one of string, int, bool")
    return text


def _property(el: ET.Element, where: str) -> tuple[str, Any]:
    _check_attrs(el, PROPERTY_ATTRS, where)
    name, value = el.get("name"), el.get("value")
    if not name or value is None:
        raise MetadataError(f"{where}: <xsk:property> needs both name= and value=")
    if name in RESERVED_PROPS:
        raise MetadataError(f"{where}: property {name!r} is set by the hook (driver from device=, netdev and id "
                            "from id=)")
    try:
        return name, property_value(value, el.get("type"))
    except ValueError as e:
        raise MetadataError(f"{where}: property {name!r}: {e}") from None


def _interface(el: ET.Element, index: int) -> Interface:
    where = f"<xsk:interface> #{index}"
    netdev_id = el.get("id")
    if netdev_id is not None and _ID.match(netdev_id):
        where = f"<xsk:interface id={netdev_id!r}>"
    _check_attrs(el, INTERFACE_ATTRS, where)
    if not netdev_id:
        raise MetadataError(f"{where}: id= is required (the QEMU netdev id, e.g. id=\"xdp0\")")
    if not _ID.match(netdev_id):
        raise MetadataError(f"{where}: id={netdev_id!r} is not a valid QEMU id: it must start with a letter and "
                            "contain only letters, digits, '-', '.' and '_'")
    name = el.get("name")
    if not name:
        raise MetadataError(f"{where}: name= is required (the host interface, e.g. name=\"eth1\")")
    try:
        check_ifname(name)
    except ValueError as e:
        raise MetadataError(f"{where}: name={e}") from None
    queues = _uint(el, "queues", 1, 1, proto.MAX_QUEUES, where)
    start = _uint(el, "start-queue", 0, 0, 65535, where)
    if start + queues > 65536:
        raise MetadataError(f"{where}: start-queue={start} with queues={queues} goes past queue 65535")
    device = el.get("device")
    if device is not None and not _ID.match(device):
        raise MetadataError(f"{where}: device={device!r} is not a QEMU device model name (e.g. virtio-net-pci)")
    mac = el.get("mac")
    if mac is not None:
        if not _MAC.match(mac):
            raise MetadataError(f"{where}: mac={mac!r} is not a MAC address like 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise MetadataError(f"{where}: mac={mac!r} is a multicast address: a NIC needs a unicast one")
        mac = mac.lower()
    props: list[tuple[str, Any]] = []
    for child in el:
        if child.tag != f"{{{NS}}}property":
            raise MetadataError(f"{where}: unexpected element {_shown(child.tag)}; only <xsk:property> may appear "
                                "inside <xsk:interface>")
        props.append(_property(child, where))
    if props and not device:
        raise MetadataError(f"{where}: <xsk:property> sets device properties, but there is no device= to add")
    seen = [k for k, _ in props]
    if mac and "mac" in seen:
        raise MetadataError(f"{where}: mac is given both as mac= and as an <xsk:property>")
    dupes = sorted({k for k in seen if seen.count(k) > 1})
    if dupes:
        raise MetadataError(f"{where}: property {', '.join(map(repr, dupes))} is given more than once")
    return Interface(netdev_id, name, queues, start, device, mac, tuple(props))


def parse_interfaces(domain_xml: str) -> list[Interface]:
    """The interfaces declared in a domain XML's <metadata>; [] when it declares none.

    <metadata>
      <xsk:interfaces xmlns:xsk="urn:xskbroker:libvirt:1">
        <xsk:interface id="xdp0" name="eth1" queues="2" start-queue="0" device="virtio-net-pci"
                       mac="52:54:00:00:00:01">
          <xsk:property name="bus" value="pci.0"/>
        </xsk:interface>
      </xsk:interfaces>
    </metadata>
    """
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as e:
        raise MetadataError(f"the domain XML is not well-formed: {e}") from None
    if root.tag != "domain":
        raise MetadataError(f"expected a <domain> document, got {_shown(root.tag)}")
    ours = [el for md in root.findall("metadata") for el in md if _namespace(el.tag).startswith(NS_FAMILY)]
    if not ours:
        return []
    if len(ours) > 1:
        raise MetadataError("<metadata> has more than one element in the xskbroker namespace: declare every "
                            "<xsk:interface> inside a single <xsk:interfaces>")
    top = ours[0]
    if _namespace(top.tag) != NS:
        raise MetadataError(f"<metadata> uses namespace {_namespace(top.tag)!r}, which this hook does not know "
                            f"(it reads {NS!r})")
    if _local(top.tag) != "interfaces":
        raise MetadataError(f"expected <xsk:interfaces xmlns:xsk=\"{NS}\"> in <metadata>, got {_shown(top.tag)}")
    _check_attrs(top, (), "<xsk:interfaces>")
    out: list[Interface] = []
    for i, el in enumerate(top, 1):
        if el.tag != f"{{{NS}}}interface":
            raise MetadataError(f"unexpected element {_shown(el.tag)} in <xsk:interfaces>: only <xsk:interface> "
                                "may appear there")
        out.append(_interface(el, i))
    ids = [x.id for x in out]
    dupes = sorted({x for x in ids if ids.count(x) > 1})
    if dupes:
        raise MetadataError(f"<xsk:interface> id {', '.join(map(repr, dupes))} is declared more than once")
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if a.name == b.name and set(a.queue_ids) & set(b.queue_ids):
                both = sorted(set(a.queue_ids) & set(b.queue_ids))
                raise MetadataError(f"<xsk:interface id={a.id!r}> and <xsk:interface id={b.id!r}> both claim "
                                    f"{a.name} queue {both[0]}")
            if a.mac and a.mac == b.mac:
                raise MetadataError(f"<xsk:interface id={a.id!r}> and <xsk:interface id={b.id!r}> have the same "
                                    f"mac {a.mac}")
    return out


# ---- configuration (pure apart from reading the file) --------------------------------------------------

@dataclass(frozen=True)
class Config:
    socket: str = "/run/xskbroker/broker.sock"  # the broker
    state_dir: str = "/run/xskbroker-libvirt"  # DOMAIN.log and DOMAIN.json
    monitor: str = "virsh"  # or "qmp:PATH" (PATH may contain {domain}): a QMP socket of QEMU's own
    virsh: str = "virsh"
    uri: str = "qemu:///system"
    pid_dir: str = "/run/libvirt/qemu"  # where libvirt keeps DOMAIN.pid
    timeout: float = 30.0  # seconds for each broker call and monitor command


CONFIG_TYPES: dict[str, type] = {"socket": str, "state_dir": str, "monitor": str, "virsh": str, "uri": str,
                                 "pid_dir": str, "timeout": float}


def parse_config(text: str, source: str = "<config>") -> Config:
    """The hook's configuration: TOML, every key optional (see Config for the defaults)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = CONFIG_TYPES.get(key)
        if kind is None:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(CONFIG_TYPES)})")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a {'number' if kind is float else 'string'}, "
                              f"not {value!r}")
        values[key] = value
    cfg = Config(**values)
    if not 0 < cfg.timeout <= 3600:
        raise ConfigError(f"{source}: timeout must be more than 0 and at most 3600 seconds")
    if cfg.monitor != "virsh" and not (cfg.monitor.startswith("qmp:") and len(cfg.monitor) > 4):
        raise ConfigError(f"{source}: monitor must be \"virsh\" or \"qmp:PATH\", not {cfg.monitor!r}")
    for key in ("socket", "state_dir", "pid_dir"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{source}: {key} must be an absolute path")
    return cfg


def load_config(path: str | None = None) -> Config:
    """The file at `path` (or $XSKBROKER_LIBVIRT_CONF, or /etc/xskbroker/libvirt.conf); the defaults when
    the default file does not exist. A file named explicitly must exist."""
    explicit = path or os.environ.get(CONFIG_ENV)
    chosen = explicit or DEFAULT_CONFIG
    try:
        text = _read_trusted(chosen)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{chosen}: no such file") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"{chosen}: {e.strerror or e}") from None
    return parse_config(text, chosen)


def _read_trusted(path: str) -> str:
    """The file's text, if only root (or we) could have written it: it names programs run as root."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        unsafe = trust.problem(path, st) or next(iter(trust.dir_chain_problems(path)), None)
        if unsafe:
            raise ConfigError(unsafe)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        return f.read().decode()


# ---- what to do for a hook call (pure) -----------------------------------------------------------------

def action_for(operation: str, sub_operation: str) -> str | None:
    """"check", "plug", "forget" or None (nothing to do) for libvirt's qemu hook OPERATION SUB-OPERATION."""
    if (operation, sub_operation) == ("prepare", "begin"):
        return "check"
    if (operation, sub_operation) == ("started", "begin"):
        return "plug"
    if operation in ("stopped", "release") and sub_operation == "end":
        return "forget"
    return None


def domain_file(state_dir: str, domain: str, suffix: str) -> str:
    """state_dir/DOMAIN.suffix, with the name quoted so that no domain name can leave the directory."""
    return os.path.join(state_dir, quote(domain, safe="") + suffix)


# ---- virsh replies, /proc (pure) -----------------------------------------------------------------------

def parse_virsh_reply(command: str, stdout: str) -> Any:
    """`virsh qemu-monitor-command` prints QEMU's reply as it is: the `return` value, or QMPError(desc)."""
    try:
        msg = json.loads(stdout)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise q.QMPConnectionError(f"virsh printed no QMP reply to {command}: {stdout.strip()[:160]!r}")
    if "return" in msg:
        return msg["return"]
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise q.QMPError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
    raise q.QMPConnectionError(f"virsh printed an unexpected reply to {command}: {stdout.strip()[:160]}")


def virsh_failure(command: str, stderr: str) -> Exception:
    """The exception for a virsh that exited non-zero (libvirt's own error, not QEMU's)."""
    text = " ".join(line.strip().removeprefix("error: ") for line in stderr.splitlines() if line.strip())
    text = text or "no message"
    if "cannot acquire state change lock" in text:  # the domain's job is still busy (it is starting)
        return q.QMPTimeout(f"libvirt is busy with the domain ({command}): {text}")
    return q.QMPConnectionError(f"virsh qemu-monitor-command ({command}) failed: {text}")


@dataclass(frozen=True)
class Identity:
    """Who a process runs as: the effective ids and the supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of_process(cls, pid: int) -> Identity:
        return identity_from_status(Path(f"/proc/{pid}/status").read_text())

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid} groups {','.join(map(str, self.groups)) or '-'}"


def identity_from_status(status_text: str) -> Identity:
    fields = dict(line.split(":", 1) for line in status_text.splitlines() if ":" in line)
    try:
        uid = int(fields["Uid"].split()[1])  # real, effective, saved, fs: the broker sees the effective one
        gid = int(fields["Gid"].split()[1])
    except (KeyError, IndexError, ValueError):
        raise ValueError("no Uid/Gid lines in /proc/PID/status") from None
    return Identity(uid, gid, tuple(int(g) for g in fields.get("Groups", "").split()))


def start_time_from_stat(stat_text: str) -> int:
    """Field 22 of /proc/PID/stat (the process's start time in clock ticks): with the pid, a process's identity."""
    return int(stat_text.rpartition(")")[2].split()[19])


def process_start_time(pid: int) -> int | None:
    try:
        return start_time_from_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def same_process(pid: int | None, start: int | None) -> bool:
    """pid is still the process that had this start time, and has not exited (a zombie has)."""
    if not pid or start is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return start_time_from_stat(stat) == start and stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


# ---- state files ---------------------------------------------------------------------------------------

def read_state(path: str) -> dict[str, Any] | None:
    try:  # never through a link, and only root's own file: its pids get signalled
        state = json.loads(safefiles.read_private(path) or b"null")
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def write_state(path: str, state: Mapping[str, Any]) -> None:
    """Atomically (a reader sees the old or the new file), readable by root only."""
    tmp = f"{path}.tmp"
    with os.fdopen(safefiles.create_new(tmp), "w") as f:  # a link planted at the temp name is unlinked
        json.dump(state, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Log:
    """Timestamped lines for DOMAIN.log."""

    def __init__(self, stream: IO[str], domain: str) -> None:
        self.stream, self.domain = stream, domain

    def __call__(self, text: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{stamp} xskbroker-libvirt[{os.getpid()}] {self.domain}: {text}\n")
            self.stream.flush()


# ---- monitors: virsh (libvirt's own monitor) or a QMP socket -------------------------------------------

class WorkerMonitor(q.Monitor, Protocol):
    def open(self, deadline: float) -> None: ...
    def pid(self) -> int: ...
    def version(self) -> q.QemuVersion: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class VirshMonitor:
    """QEMU's monitor through `virsh qemu-monitor-command`: the only way in while libvirt owns the monitor.

    One virsh per command; fds go with `--pass-fds`, which virsh sends to libvirtd and libvirtd to QEMU
    with the command. virsh prints QEMU's reply as it is, errors included (exit status 0).
    """

    def __init__(self, domain: str, *, virsh: str = "virsh", uri: str = "qemu:///system",
                 pid_dir: str = "/run/libvirt/qemu", timeout: float = 30.0) -> None:
        self.domain, self.virsh, self.uri, self.pid_dir, self.timeout = domain, virsh, uri, pid_dir, timeout

    def argv(self, command: str, arguments: Mapping[str, Any] | None = None,
             fds: Sequence[int] | None = None) -> list[str]:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        argv = [self.virsh, "-q", "-c", self.uri, "qemu-monitor-command", "--domain", self.domain]
        if fds:
            argv += ["--pass-fds", ",".join(str(fd) for fd in fds)]
        return [*argv, "--cmd", json.dumps(msg, separators=(",", ":"))]

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        try:
            done = subprocess.run(self.argv(command, arguments, fds), pass_fds=tuple(fds or ()),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise q.QMPTimeout(f"virsh did not answer {command} within {self.timeout:g} s") from None
        except OSError as e:
            raise q.QMPConnectionError(f"cannot run {self.virsh}: {e.strerror or e}") from None
        if done.returncode:
            raise virsh_failure(command, done.stderr)
        return parse_virsh_reply(command, done.stdout)

    def open(self, deadline: float) -> None:
        """Wait until libvirt lets a command through (it finishes starting the domain first)."""
        while True:
            try:
                self.execute("query-status")
                return
            except q.QMPTimeout:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def pid(self) -> int:
        path = os.path.join(self.pid_dir, f"{self.domain}.pid")
        try:
            pid = int(_read_trusted(path).strip())  # who wrote it names whose identity the hook asks with
        except (OSError, ValueError) as e:
            raise q.QMPConnectionError(f"cannot read QEMU's pid from {path}: {e}") from None
        if not os.path.exists(f"/proc/{pid}"):
            raise q.QMPConnectionError(f"QEMU (pid {pid} from {path}) is not running")
        return pid

    def version(self) -> q.QemuVersion:
        return q.QemuVersion.from_wire(self.execute("query-version"))

    def describe(self) -> str:
        return f"libvirt's monitor of {self.domain} (virsh -c {self.uri})"

    def close(self) -> None:
        pass


class QMPMonitor:
    """A QMP socket of QEMU's own (`-qmp unix:PATH,server=on,wait=off`): for tests and QEMUs with a second
    monitor. QEMU serves one client per socket: open() waits for the greeting until the deadline."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self._m: q.QMP | None = None

    def open(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            try:
                self._m = q.QMP(self.path, max(left, 0.01))
                self._m.timeout = self.timeout
                return
            except q.QMPConnectionError:  # not there yet, or refused for a moment
                if left <= 0:
                    raise
                time.sleep(0.05)

    @property
    def m(self) -> q.QMP:
        if self._m is None:
            raise q.QMPConnectionError(f"the QMP socket {self.path} is not open")
        return self._m

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        return self.m.execute(command, arguments, fds=fds)

    def pid(self) -> int:
        pid = self.m.pid
        if not pid:
            raise q.QMPConnectionError(f"cannot tell QEMU's pid from the QMP socket {self.path}")
        return pid

    def version(self) -> q.QemuVersion:
        return self.m.version

    def describe(self) -> str:
        return f"QMP socket {self.path}"

    def close(self) -> None:
        if self._m is not None:
            self._m.close()
            self._m = None


def make_monitor(cfg: Config, domain: str) -> WorkerMonitor:
    if cfg.monitor.startswith("qmp:"):
        return QMPMonitor(cfg.monitor[4:].replace("{domain}", domain), cfg.timeout)
    return VirshMonitor(domain, virsh=cfg.virsh, uri=cfg.uri, pid_dir=cfg.pid_dir, timeout=cfg.timeout)


def _fd_label(fd: int) -> str:
    try:
        return f"fd {fd} socket:[{os.fstat(fd).st_ino}]"
    except OSError:
        return f"fd {fd}"


class LoggedMonitor:
    """Logs every command and QEMU's answer: the record of what QEMU was given and said."""

    def __init__(self, inner: q.Monitor, log: Callable[[str], None], prefix: str = "") -> None:
        self.inner, self.log, self.prefix = inner, log, prefix

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any:
        shown = command + (" " + json.dumps(dict(arguments), separators=(",", ":")) if arguments else "")
        if fds:
            shown += " + " + ", ".join(_fd_label(fd) for fd in fds) + " (SCM_RIGHTS)"
        try:
            value = self.inner.execute(command, arguments, fds=fds)
        except q.QMPError as e:
            self.log(f"{self.prefix}{shown} -> error {e.error_class}: {e.desc}")
            raise
        except (q.QMPTimeout, q.QMPConnectionError) as e:
            self.log(f"{self.prefix}{shown} -> {e}")
            raise
        self.log(f"{self.prefix}{shown} -> ok")
        return value


# ---- the broker, asked as QEMU's user ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def drop_to(ident: Identity) -> None:
    """Become ident for good: its groups, gid and uid, no new privileges, and (unless it is root) no capability."""
    if os.geteuid() != 0:
        if (os.geteuid(), os.getegid()) == (ident.uid, ident.gid):
            return
        raise PermissionError(f"only root can act as QEMU's user ({ident}); this runs as uid {os.geteuid()}")
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if ident.uid != 0:
        caps = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff:")]
        if not caps or int(caps[0].split()[1], 16):
            raise PermissionError(f"capabilities left after dropping to {ident}: {caps}")


def _serve_agent(sock: socket.socket, socket_path: str, timeout: float) -> int:
    """The agent's loop: one request from the worker per message, one answer (with any fds) per request."""
    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds

    while True:
        data = sock.recv(1 << 16)
        if not data:
            return 0
        cmd = json.loads(data)
        fds: list[int] = []
        try:
            if cmd["op"] == "grant":
                reply, fds = request_fds(cmd["interface"], cmd["queues"], kind="bare", start_queue=cmd["start_queue"],
                                         socket_path=socket_path, timeout=timeout, memlock=cmd["memlock"],
                                         holder_pid=cmd["holder_pid"])
            else:
                with Connection(socket_path, timeout) as conn:
                    reply, fds = conn.call(proto.Release(cmd["lease"]))
            out: dict[str, Any] = {"ok": True, "reply": reply}
        except proto.BrokerError as e:
            out = {"ok": False, "code": e.code, "message": e.message}
        except TimeoutError:
            out = {"ok": False, "code": "broker-timeout",
                   "message": f"the broker at {socket_path} did not answer within {timeout:g} s"}
        except OSError as e:  # ConnectionError included
            out = {"ok": False, "code": "connection-error", "message": str(e)}
        try:
            data = json.dumps(out).encode()
            if fds:
                socket.send_fds(sock, [data], fds)
            else:
                sock.send(data)
        finally:
            q.close_fds(fds)


class BrokerAgent:
    """A child process that asks the broker as `ident` (QEMU's user) and hands the fds back (SCM_RIGHTS).

    The broker's policy then judges the VM's user, not root, and the hook's root privileges are never
    presented to the broker. The child dies with its parent (PR_SET_PDEATHSIG).
    """

    def __init__(self, ident: Identity, socket_path: str, timeout: float) -> None:
        self.ident, self.socket_path, self.timeout = ident, socket_path, timeout
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        me = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                parent.close()
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != me:
                    os._exit(code)
                drop_to(ident)
                code = _serve_agent(child, socket_path, timeout)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        child.close()
        self.pid, self.sock = pid, parent

    def _call(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        self.sock.settimeout(self.timeout + 5)
        try:
            self.sock.send(json.dumps(msg).encode())
            data, fds, _, _ = socket.recv_fds(self.sock, proto.MAX_REPLY, proto.MAX_QUEUES)
        except OSError as e:
            raise proto.BrokerError("agent-failed", f"the process asking the broker as {self.ident} failed: "
                                    f"{e.strerror or e}") from None
        if not data:
            raise proto.BrokerError("agent-failed", f"the process asking the broker as {self.ident} exited "
                                    "(its traceback is in the log)")
        out = json.loads(data)
        if not out.get("ok"):
            q.close_fds(fds)
            raise proto.BrokerError(str(out.get("code")), str(out.get("message")))
        return out["reply"], fds

    def grant(self, interface: str, queues: int, start_queue: int, holder_pid: int,
              memlock: int) -> tuple[dict[str, Any], list[int]]:
        return self._call({"op": "grant", "interface": interface, "queues": queues, "start_queue": start_queue,
                           "holder_pid": holder_pid, "memlock": memlock})

    def release(self, lease: str) -> dict[str, Any]:
        reply, fds = self._call({"op": "release", "lease": lease})
        q.close_fds(fds)
        return reply

    def close(self) -> None:
        self.sock.close()
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)

    def __enter__(self) -> BrokerAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the worker ----------------------------------------------------------------------------------------

class Granter(Protocol):
    """What the worker needs of BrokerAgent (tests give it a fake)."""

    socket_path: str
    ident: Identity

    def grant(self, interface: str, queues: int, start_queue: int, holder_pid: int,
              memlock: int) -> tuple[dict[str, Any], list[int]]: ...

    def release(self, lease: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Terminated(BaseException):
    """SIGTERM (the stopped/release hook ends a worker whose QEMU is gone): unwind, write nothing more."""


def _queues_text(iface: Interface) -> str:
    last = iface.start_queue + iface.queues - 1
    return str(iface.start_queue) if iface.queues == 1 else f"{iface.start_queue}-{last}"


def _grant_fds(reply: dict[str, Any], fds: Sequence[int], start: int, count: int) -> list[int]:
    from xskbroker.client.qmp_cli import grant_fds

    return grant_fds(reply, fds, start, count)


def plug(iface: Interface, monitor: q.Monitor, agent: Granter, qemu_pid: int,
         log: Callable[[str], None]) -> dict[str, Any]:
    """Grant, then getfd/netdev_add/device_add; on failure unwind in QEMU and release. Returns the record."""
    rec: dict[str, Any] = {"id": iface.id, "interface": iface.name, "queues": list(iface.queue_ids),
                           "device": iface.device, "status": "failed", "lease": None, "released": False}
    memlock = q.AF_XDP_UMEM_BYTES * iface.queues
    log(f"{iface.id}: asking the broker at {agent.socket_path} as {agent.ident} for a bare grant of {iface.name} "
        f"queue(s) {_queues_text(iface)}, held by QEMU (pid {qemu_pid}), memlock {memlock >> 20} MiB")
    try:
        reply, fds = agent.grant(iface.name, iface.queues, iface.start_queue, qemu_pid, memlock)
    except proto.BrokerError as e:
        unasked = e.code in ("agent-failed", "connection-error", "broker-timeout")
        log(f"{iface.id}: {'could not ask the broker' if unasked else 'the broker refused'}: {e.code}: {e.message}")
        rec["error"] = {"stage": "grant", "code": e.code, "message": e.message}
        return rec
    lease = reply.get("lease")
    rec.update(lease=lease, xdp_mode=reply.get("xdp_mode"))
    log(f"{iface.id}: lease {lease}: {len(fds)} socket(s) on {reply.get('interface')}, XDP {reply.get('xdp_mode')} "
        "mode")
    ml = reply.get("memlock")
    if isinstance(ml, dict) and ml.get("raised"):
        log(f"{iface.id}: the broker raised QEMU's RLIMIT_MEMLOCK to {memlock} bytes")
    elif isinstance(ml, dict) and not ml.get("ok", True):
        log(f"{iface.id}: warning: QEMU's RLIMIT_MEMLOCK looks too low for its UMEM: {ml.get('reason')}; "
            f"{ml.get('hint')}")
    try:
        try:
            sockets = _grant_fds(reply, fds, iface.start_queue, iface.queues)
            att = q.attach(monitor, iface.id, reply.get("interface", iface.name), sockets,
                           start_queue=iface.start_queue, xdp_mode=reply.get("xdp_mode"), device=iface.device,
                           device_props=iface.device_props() or None)
        finally:
            q.close_fds(fds)  # QEMU holds its own copies now, or the attempt was undone
    except q.QMPError as e:
        notes = list(getattr(e, "__notes__", ()))
        log(f"{iface.id}: QEMU refused {e.command}: {e.desc}")
        rec["error"] = {"stage": e.command, "qmp_class": e.error_class, "message": e.desc, "notes": notes}
    except (q.QMPTimeout, q.QMPConnectionError, ValueError) as e:
        notes = list(getattr(e, "__notes__", ()))
        log(f"{iface.id}: {e}")
        rec["error"] = {"stage": "reply" if isinstance(e, ValueError) else "monitor", "message": str(e),
                        "notes": notes}
        rec["monitor_lost"] = isinstance(e, q.QMPConnectionError)
    else:
        rec.update(status="attached", netdev=att.netdev, device_id=att.device_id, device_args=att.device)
        dev = f", device {att.device_id!r} ({iface.device})" if att.device_id else " (no device)"
        log(f"{iface.id}: attached: af-xdp netdev {iface.id!r} on {iface.name} queue(s) {_queues_text(iface)}{dev}; "
            f"QEMU holds the only copies of the sockets: lease {lease} ends when QEMU exits")
        return rec
    for note in rec["error"]["notes"]:
        log(f"{iface.id}:   {note}")
    log(f"{iface.id}: this process closed its copies of the sockets")
    try:  # nothing of the grant is left anywhere: end the lease now, not when QEMU exits
        agent.release(str(lease))
        rec["released"] = True
        log(f"{iface.id}: released lease {lease}")
    except proto.BrokerError as e:
        log(f"{iface.id}: could not release lease {lease}: {e.code}: {e.message}")
    return rec


def warn_if_no_af_xdp(monitor: WorkerMonitor, log: Callable[[str], None]) -> str | None:
    """A warning (not a refusal: QEMU's own error will say it) when this QEMU lists no af-xdp backend."""
    try:
        version = monitor.version()
        support = q.netdev_support(monitor.execute("query-qmp-schema"))
    except (q.QMPError, q.QMPTimeout, q.QMPConnectionError) as e:
        log(f"could not read QEMU's netdev backends: {e}")
        return None
    reason = q.unsupported_message(version, monitor.describe(), support)
    if reason:
        log(f"warning: {reason}; trying anyway: QEMU's own error follows")
    return reason


def run_worker(domain: str, interfaces: Sequence[Interface], cfg: Config, monitor: WorkerMonitor,
               log: Callable[[str], None], state_path: str | None = None,
               agent_factory: Callable[[Identity, str, float], Granter] = BrokerAgent) -> dict[str, Any]:
    """Plug every interface into the domain's QEMU. Writes the state file after each step; returns the state."""
    state: dict[str, Any] = {"domain": domain, "worker_pid": os.getpid(),
                             "worker_start": process_start_time(os.getpid()), "monitor": monitor.describe(),
                             "socket": cfg.socket, "started_at": time.time(), "finished": False, "interfaces": []}

    def save() -> None:
        if state_path:
            write_state(state_path, state)

    save()
    log(f"worker started for {len(interfaces)} interface(s); monitor: {monitor.describe()}")
    try:
        monitor.open(time.monotonic() + 2 * cfg.timeout)
        pid = monitor.pid()
        ident = Identity.of_process(pid)
    except (q.QMPError, q.QMPTimeout, q.QMPConnectionError, OSError, ValueError) as e:
        log(f"cannot reach QEMU through {monitor.describe()}: {e}")
        state.update(finished=True, error=str(e))
        save()
        monitor.close()
        return state
    state.update(qemu_pid=pid, qemu_start=process_start_time(pid),
                 identity={"uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups)})
    save()
    log(f"QEMU pid {pid} runs as {ident}")
    try:
        state["af_xdp_warning"] = warn_if_no_af_xdp(monitor, log)
        agent = agent_factory(ident, cfg.socket, cfg.timeout)
        try:
            for iface in interfaces:
                rec = plug(iface, LoggedMonitor(monitor, log, f"{iface.id}: "), agent, pid, log)
                state["interfaces"].append(rec)
                save()
                if rec.get("monitor_lost"):
                    log("QEMU's monitor is gone: stopping")
                    break
        finally:
            agent.close()
    finally:
        monitor.close()
    attached = sum(r["status"] == "attached" for r in state["interfaces"])
    log(f"done: {attached} of {len(interfaces)} interface(s) attached")
    state["finished"] = True
    save()
    return state


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _worker_process(domain: str, interfaces: Sequence[Interface], cfg: Config, log_path: str,
                    state_path: str) -> None:
    """The detached worker's body: stdio to the log, no fd of libvirt's kept, then run_worker. Never returns."""
    code = 1
    try:
        out = safefiles.private_opener(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # libvirt reads the hook's stdout and stderr until EOF: keeping any of its fds would block it
        os.closerange(3, 1 << 20)
        os.chdir("/")
        os.umask(0o077)
        stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
        sys.stdout = sys.stderr = stream
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log = Log(stream, domain)
        try:
            state = run_worker(domain, interfaces, cfg, make_monitor(cfg, domain), log, state_path)
            code = 0 if all(r["status"] == "attached" for r in state["interfaces"]) and not state.get("error") else 1
        except Terminated:
            log("terminated (the domain stopped)")
            code = 143
        except BaseException:
            log("worker failed:\n" + traceback.format_exc())
    finally:
        os._exit(code)


def spawn_worker(domain: str, interfaces: Sequence[Interface], cfg: Config) -> int:
    """Double fork: the worker runs in its own session, reparented away from libvirt; returns its pid."""
    safefiles.private_dir(cfg.state_dir)  # ours alone: root writes here
    log_path = domain_file(cfg.state_dir, domain, ".log")
    state_path = domain_file(cfg.state_dir, domain, ".json")
    previous = read_state(state_path)
    if previous is not None:  # a previous start's, whose worker may still be waiting for a QEMU that is gone
        with open(log_path, "a", opener=safefiles.private_opener) as stream:
            _stop_worker(previous, Log(stream, domain))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            worker = os.fork()
            if worker == 0:
                os.close(w)
                _worker_process(domain, interfaces, cfg, log_path, state_path)
            os.write(w, str(worker).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return int(data or 0)


# ---- stopped / release ---------------------------------------------------------------------------------

def _stop_worker(state: Mapping[str, Any], log: Callable[[str], None]) -> None:
    pid, start = state.get("worker_pid"), state.get("worker_start")
    if not isinstance(pid, int) or not same_process(pid, start) or state.get("finished"):
        return
    log(f"worker {pid} is still running: ending it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WORKER_WAIT
    while same_process(pid, start) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if same_process(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def forget(domain: str, cfg: Config, operation: str = "release") -> dict[str, Any] | None:
    """Drop the domain's state file; release the leases it still records (as the user that took them).
    Returns the state that was forgotten, or None if there was none."""
    state_path = domain_file(cfg.state_dir, domain, ".json")
    state = read_state(state_path)
    if state is None:
        return None
    with open(domain_file(cfg.state_dir, domain, ".log"), "a", opener=safefiles.private_opener) as stream:
        log = Log(stream, domain)
        _stop_worker(state, log)
        state = read_state(state_path) or state  # the worker may have recorded more before it ended
        leases = [r["lease"] for r in state.get("interfaces", []) if r.get("lease") and not r.get("released")]
        ident = state.get("identity")
        if leases and isinstance(ident, dict):
            who = Identity(int(ident["uid"]), int(ident["gid"]), tuple(ident.get("groups", ())))
            with BrokerAgent(who, cfg.socket, min(cfg.timeout, RELEASE_TIMEOUT)) as agent:
                for lease in leases:
                    try:
                        agent.release(lease)
                        log(f"{operation}: released lease {lease}")
                    except proto.BrokerError as e:
                        if e.code == "unknown-lease":
                            log(f"{operation}: lease {lease} had already ended (QEMU exited)")
                        else:
                            log(f"{operation}: could not release lease {lease}: {e.code}: {e.message}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)
        log(f"{operation}: state forgotten")
    return state


# ---- the hook ------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None, config_path: str | None = None,
         spawn: Callable[[str, Sequence[Interface], Config], int] = spawn_worker) -> int:
    """libvirt's qemu hook: DOMAIN OPERATION SUB-OPERATION EXTRA, the domain XML on stdin.

    Exit status 1 only for `prepare` with a declaration (or configuration) that cannot work, which makes
    libvirt refuse to start the domain and show the message; every other case exits 0.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    domain, operation = args[0], args[1]
    sub_operation = args[2] if len(args) > 2 else "-"
    action = action_for(operation, sub_operation)
    if action is None:
        return 0
    xml_text = (sys.stdin if stdin is None else stdin).read()
    if action == "forget":
        try:
            forget(domain, load_config(config_path), operation)
        except (ConfigError, OSError) as e:
            print(f"xskbroker: domain {domain}: {operation}: {e}", file=sys.stderr)
        return 0
    fatal = action == "check"
    try:
        interfaces = parse_interfaces(xml_text)
        if not interfaces:
            return 0
        cfg = load_config(config_path)
    except (MetadataError, ConfigError) as e:
        print(f"xskbroker: domain {domain}: {e}", file=sys.stderr)
        return 1 if fatal else 0
    if action == "check":
        return 0
    try:
        spawn(domain, interfaces, cfg)
    except OSError as e:
        print(f"xskbroker: domain {domain}: cannot start the worker: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
