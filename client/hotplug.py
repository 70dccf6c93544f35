"""The af-xdp hot-plug sequence, whatever carries the commands to QEMU's monitor.

attach: `getfd` per socket (the fd travels with the command), `netdev_add` of type af-xdp naming them in
`sock-fds`, optional `device_add`; any failure unwinds what QEMU was given. detach: `device_del`, waiting
for DEVICE_DELETED, then `netdev_del`. The transport is a parameter (the Monitor protocol): a QMP socket
(qmp.QMP, for `xskbroker qmp-attach`/`qmp-detach`) or libvirt's monitor through `virsh qemu-monitor-command
--pass-fds` (the libvirt hook). See docs/qemu.md. Imports nothing privileged.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from xskbroker.client.qmp_codec import QMPConnectionError, QMPError, QMPTimeout
from xskbroker.common.records import record

QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed(): netdev and device ids


class Monitor(Protocol):
    """What attach() needs of a monitor: one command at a time, fds sent with the command."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                fds: Sequence[int] | None = None) -> Any: ...


class EventMonitor(Monitor, Protocol):
    """What detach() needs besides: QEMU's events (a device is gone only once DEVICE_DELETED says so)."""

    def event_mark(self) -> int: ...

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float | None = None, after: int = 0) -> dict[str, Any]: ...


# ---- names and arguments (pure) ------------------------------------------------------------------------

def check_id(netdev_id: str) -> str:
    """QEMU's rule for ids (id_wellformed); checked here so a bad id fails before any fd is sent."""
    if not QEMU_ID.match(netdev_id):
        raise ValueError(f"{netdev_id!r} is not a valid QEMU id: it must start with a letter and contain only "
                         "letters, digits, '-', '.' and '_'")
    return netdev_id


def fd_name(netdev_id: str, queue: int) -> str:
    return f"{netdev_id}-q{queue}"


def device_id_for(netdev_id: str) -> str:
    return f"{netdev_id}-dev"


def netdev_arguments(netdev_id: str, ifname: str, names: Sequence[str], start_queue: int = 0,
                     xdp_mode: str | None = None) -> dict[str, Any]:
    """netdev_add arguments for bare sockets already in xsks_map at start_queue+i."""
    if not names:
        raise ValueError("an af-xdp netdev needs at least one socket")
    args: dict[str, Any] = {"type": "af-xdp", "id": netdev_id, "ifname": ifname, "queues": len(names),
                            "start-queue": start_queue, "inhibit": True, "sock-fds": ":".join(names)}
    # QEMU 8.2-10.0 looks for a native-mode program unless told skb ("no XDP program loaded on …")
    if xdp_mode == "skb":
        args["mode"] = "skb"
    return args


def grant_fds(reply: Mapping[str, Any], fds: Sequence[int], start_queue: int, count: int) -> list[int]:
    """A bare grant's socket fds in queue order start_queue.., checked against what was asked."""
    try:
        by_queue = {int(s["queue"]): fds[int(s["fd"])] for s in reply["sockets"]}
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError("the broker's grant reply does not describe its sockets as expected") from None
    wanted = list(range(start_queue, start_queue + count))
    if sorted(by_queue) != wanted:
        raise ValueError(f"the broker granted queues {sorted(by_queue)}, not {wanted}")
    return [by_queue[x] for x in wanted]


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---- attach --------------------------------------------------------------------------------------------

@record(frozen=True)
class Attachment:
    netdev_id: str
    ifname: str
    queues: tuple[int, ...]
    fd_names: tuple[str, ...]
    netdev: dict[str, Any]  # the netdev_add arguments as sent
    device_id: str | None = None
    device: dict[str, Any] | None = None  # the device_add arguments as sent


def attach_grant(monitor: Monitor, netdev_id: str, reply: Mapping[str, Any], fds: Sequence[int], *,
                 interface: str, start_queue: int, queues: int, device: str | None = None,
                 device_props: Mapping[str, Any] | None = None) -> Attachment:
    """Plug a bare grant (the broker's reply and its fds) into QEMU as af-xdp netdev `netdev_id`.

    Always closes this process's copies of the fds: on success QEMU holds the only ones, on failure nothing
    of the attempt is left in QEMU (attach unwinds) and the sockets are gone. Raises ValueError for a reply
    that does not match what was asked (before QEMU is sent anything), else what attach() raises.
    """
    try:
        sockets = grant_fds(reply, fds, start_queue, queues)
        return attach(monitor, netdev_id, reply.get("interface", interface), sockets, start_queue=start_queue,
                      xdp_mode=reply.get("xdp_mode"), device=device, device_props=device_props)
    finally:
        close_fds(fds)  # QEMU holds its own copies now, or the attempt was undone


def attach(qmp: Monitor, netdev_id: str, ifname: str, fds: Sequence[int], *, start_queue: int = 0,
           xdp_mode: str | None = None, device: str | None = None,
           device_props: Mapping[str, Any] | None = None) -> Attachment:
    """Give QEMU bare sockets for queues start_queue.. and plug an af-xdp netdev (and a device) onto them.

    fds[i] must be the socket in xsks_map at start_queue+i. The caller keeps its own copies and should close
    them once this returns (QEMU then holds the only ones). On any failure QEMU is left holding nothing of
    this attempt: names it still has are closed (closefd), a netdev this call added is deleted; the original
    exception is raised with what was undone in its notes.
    """
    check_id(netdev_id)
    if not fds:
        raise ValueError("attach needs at least one socket fd")
    queues = tuple(range(start_queue, start_queue + len(fds)))
    names = tuple(fd_name(netdev_id, q) for q in queues)
    netdev_args = netdev_arguments(netdev_id, ifname, names, start_queue, xdp_mode)
    device_args: dict[str, Any] | None = None
    if device:
        device_args = {**(device_props or {}), "driver": device, "netdev": netdev_id, "id": device_id_for(netdev_id)}
    tried: list[str] = []  # every name a getfd was attempted for: one that timed out may still have landed
    sent = added = device_sent = False  # netdev_add sent; answered ok; device_add sent
    try:
        for name, fd in zip(names, fds, strict=True):
            tried.append(name)
            qmp.execute("getfd", {"fdname": name}, fds=[fd])
        sent = True
        qmp.execute("netdev_add", netdev_args)
        added = True
        if device_args:
            device_sent = True
            qmp.execute("device_add", device_args)
    except BaseException as e:
        # QEMU's own answer aside (a timeout, a lost transport, Ctrl-C while waiting), the command in flight may
        # land yet: the unwind looks for what it did before undoing it
        unanswered = not isinstance(e, QMPError)
        late = netdev_id if sent and not added and unanswered else None
        late_device = device_args["id"] if device_args and device_sent and unanswered else None
        for note in _unwind(qmp, netdev_id if added else None, [] if added else tried, late, late_device):
            e.add_note(note)
        raise
    return Attachment(netdev_id, ifname, queues, names, netdev_args, device_args["id"] if device_args else None,
                      device_args)


# how an unwind's notes say a step that would have closed QEMU's copies of the sockets failed
NOT_DELETED = "could not delete netdev"
NOT_CLOSED = "could not close fd"


def qemu_may_hold(notes: Iterable[str]) -> bool:
    """Whether an attach's unwind (its notes) may have left QEMU holding sockets of the attempt."""
    return any(n.startswith((NOT_DELETED, NOT_CLOSED)) for n in notes)


def _unwind(qmp: Monitor, netdev_id: str | None, names: Sequence[str], late_netdev: str | None = None,
            late_device: str | None = None) -> list[str]:
    """Best effort: undo a partial attach. Returns one note per step, for the error report.

    late_netdev: a netdev_add of that id went unanswered, so QEMU may have carried it out after all.
    late_device: a device_add of that id (onto netdev_id) went unanswered, likewise."""
    notes: list[str] = []
    if netdev_id and late_device:  # before netdev_del: that would leave the device in the guest, its link dead
        notes += _remove_late_device(qmp, netdev_id, late_device)
    if netdev_id:  # QEMU owns the fds once netdev_add succeeded; deleting the netdev closes them
        try:
            qmp.execute("netdev_del", {"id": netdev_id})
            notes.append(f"unwound: deleted netdev {netdev_id!r} (QEMU closed its sockets)")
        except (QMPError, QMPTimeout, QMPConnectionError) as e:
            notes.append(f"{NOT_DELETED} {netdev_id!r}: {e}")
    closed, taken, unsure = [], [], False
    for name in names:
        try:
            qmp.execute("closefd", {"fdname": name})
            closed.append(name)
        except QMPError:
            taken.append(name)  # never arrived, or netdev_add had already taken it
        except (QMPTimeout, QMPConnectionError) as e:
            notes.append(f"{NOT_CLOSED} {name!r} in QEMU: {e}")
            unsure = True
    if closed:
        notes.append(f"unwound: closed fd(s) {', '.join(closed)} in QEMU")
    if taken:
        notes.append(f"fd(s) {', '.join(taken)} were not in QEMU's monitor (never arrived, or taken by netdev_add)")
    # QEMU runs monitor commands in order: a name gone by the closefd after the timed-out netdev_add (every getfd
    # was answered) was taken by it, so it ran, and the netdev of that id, if any, is this attempt's (a duplicate
    # id is refused before any fd is taken, and then every closefd succeeds and nothing is deleted)
    if late_netdev and taken and not unsure:
        try:
            qmp.execute("netdev_del", {"id": late_netdev})
            notes.append(f"unwound: deleted netdev {late_netdev!r}, added after netdev_add went unanswered (QEMU "
                         "closed its sockets)")
        except QMPError as e:
            if e.error_class != "DeviceNotFound":  # not found: netdev_add took the fds but failed, nothing left
                notes.append(f"{NOT_DELETED} {late_netdev!r}: {e}")
        except (QMPTimeout, QMPConnectionError) as e:
            notes.append(f"{NOT_DELETED} {late_netdev!r}: {e}")
    return notes


def _remove_late_device(qmp: Monitor, netdev_id: str, device_id: str) -> list[str]:
    """device_del of a device whose device_add went unanswered, if QEMU carried it out after all.

    QEMU runs monitor commands in order, so the qom-get below answers after the device_add did. A device of
    that id on another netdev was there before (the device_add failed on its duplicate id) and is not touched;
    one on netdev_id, which this attach has just added, is this attempt's."""
    try:
        backend = qmp.execute("qom-get", {"path": f"/machine/peripheral/{device_id}", "property": "netdev"})
    except QMPError as e:
        if e.error_class in ("DeviceNotFound", "GenericError"):  # no such device, or not a NIC: not this one
            return []
        return [f"could not tell whether device {device_id!r} was added after device_add went unanswered: {e}"]
    except (QMPTimeout, QMPConnectionError) as e:
        return [f"could not tell whether device {device_id!r} was added after device_add went unanswered: {e}"]
    if backend != netdev_id:
        return []
    try:
        qmp.execute("device_del", {"id": device_id})
    except (QMPError, QMPTimeout, QMPConnectionError) as e:
        return [f"could not remove device {device_id!r}, added after device_add went unanswered: {e}"]
    return [f"unwound: removed device {device_id!r}, added after device_add went unanswered (a guest that takes "
            "part in unplug releases it)"]


# ---- detach --------------------------------------------------------------------------------------------

@record(frozen=True)
class Detached:
    netdev_id: str
    device_id: str
    device_removed: bool  # False: there was no such device


def detach(qmp: EventMonitor, netdev_id: str, *, device_id: str | None = None, timeout: float = 10.0) -> Detached:
    """device_del (waiting for DEVICE_DELETED), then netdev_del; QEMU then closes the sockets.

    A device the guest has not released within `timeout` keeps its netdev (deleting it under a live NIC
    would leave the guest a dead link): QMPTimeout says so, and detaching again later finishes the job.
    """
    check_id(netdev_id)
    dev = device_id or device_id_for(netdev_id)
    mark = qmp.event_mark()
    removed = True
    try:
        qmp.execute("device_del", {"id": dev})
    except QMPError as e:
        if e.error_class == "DeviceNotFound":
            removed = False
        elif "already in the process of unplug" not in e.desc:  # a retry while the guest still works on it
            raise
    if removed:
        path = f"/machine/peripheral/{dev}"
        try:
            qmp.wait_event("DEVICE_DELETED", lambda d: d.get("device") == dev or d.get("path") == path,
                           timeout=timeout, after=mark)
        except QMPTimeout:
            raise QMPTimeout(f"device {dev!r} is still present {timeout:g} s after device_del: the guest has not "
                             f"released it (a paused or still booting guest never does); netdev {netdev_id!r} is "
                             "kept so the device is not left without a backend; detach again later") from None
    qmp.execute("netdev_del", {"id": netdev_id})
    return Detached(netdev_id, dev, removed)
