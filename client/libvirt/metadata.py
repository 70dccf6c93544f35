"""The AF_XDP interfaces a domain declares in its <metadata> (pure): parsed and checked before anything is asked.

<metadata>
  <xsk:interfaces xmlns:xsk="urn:xskbroker:libvirt:1">
    <xsk:interface id="xdp0" name="eth1" queues="2" device="virtio-net-pci"/>
  </xsk:interfaces>
</metadata>

docs/libvirt.md describes every attribute.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from xskbroker.client.hotplug import QEMU_ID as _ID  # QEMU's id_wellformed(); also good enough for driver names
from xskbroker.common.records import record
from xskbroker.wire import protocol as proto

NS = "urn:xskbroker:libvirt:1"
NS_FAMILY = "urn:xskbroker:libvirt:"
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_UINT = re.compile(r"[0-9]+\Z")
_INT = re.compile(r"-?[0-9]+\Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
INTERFACE_ATTRS = ("id", "name", "queues", "start-queue", "device", "mac")
PROPERTY_ATTRS = ("name", "value", "type")
RESERVED_PROPS = ("driver", "netdev", "id")  # the hook sets these itself


class MetadataError(ValueError):
    """The xskbroker declaration in a domain's <metadata> cannot be used; the message says where and why."""


@record(frozen=True)
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
    try:
        value = int(text) if _UINT.match(text) else None
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits()): out of range anyway
        value = None
    if value is None or not lo <= value <= hi:
        raise MetadataError(f"{where}: {attr}={text!r} is not a whole number from {lo} to {hi}")
    return value


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


def domain_uuid(domain_xml: str) -> str | None:
    """The domain's <uuid> (libvirt's own, unique on the host), or None if the XML has none.

    virsh looks `--domain X` up as a domain ID first, then as a UUID, and only then as a name: a domain named
    "7", or after another domain's UUID, is reached by its UUID alone."""
    try:
        text = ET.fromstring(domain_xml).findtext("uuid")
    except ET.ParseError:
        return None
    text = (text or "").strip().lower()
    return text if _UUID.match(text) else None
