"""`xskbroker qmp-attach` and `qmp-detach`: hot-plug broker-made AF_XDP sockets into a running QEMU over QMP.

Imports nothing privileged. Registered by broker/cli.py; also runs alone as `python -m xskbroker.client.qmp_cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from xskbroker.client import argtypes, hotplug, qemu_support
from xskbroker.client import qmp as q
from xskbroker.client.connection import DEFAULT_SOCKET
from xskbroker.policy.sizes import size_arg

ATTACH_DESCRIPTION = """\
Take a bare grant from the broker (unbound AF_XDP sockets already in the interface's xsks_map) and hand it to
a running QEMU over its QMP socket: getfd per socket (the fd travels with SCM_RIGHTS), then netdev_add of
type af-xdp naming those fds, then device_add with --device. QEMU then holds the only copies of the sockets:
they live until qmp-detach or QEMU's exit.

Before asking the broker, it checks with query-qmp-schema that this QEMU has the af-xdp backend (QEMU >= 8.2
built with libxdp) and refuses if not, unless --force. QEMU's own error text is shown as it is. On any
failure, QEMU is left holding nothing of the attempt and the grant is released.

QEMU registers its UMEM (32 MiB per queue for stock builds; --qemu-umem otherwise) in its own process: its
RLIMIT_MEMLOCK must allow that unless it has CAP_IPC_LOCK. The broker is asked to raise it where policy and
privilege allow; a warning gives its answer when the limit stays short."""

ATTACH_EPILOG = """\
examples:
  # QEMU started with: -qmp unix:/run/vm1.qmp,server=on,wait=off
  xskbroker qmp-attach --qmp /run/vm1.qmp --id xdp0 --interface eth1 --queues 1 --device virtio-net-pci
  xskbroker qmp-attach --qmp /run/vm1.qmp --id xdp1 -i eth1 -q 2 --start-queue 2 \\
      --device virtio-net-pci --device-props '{"mq": true, "vectors": 6}' --json
  xskbroker qmp-detach --qmp /run/vm1.qmp --id xdp1

what it sends (docs/qemu.md has the whole exchange):
  getfd {"fdname": "xdp1-q2"}   + the queue 2 socket (SCM_RIGHTS), then the same for xdp1-q3
  netdev_add {"type": "af-xdp", "id": "xdp1", "ifname": "eth1", "queues": 2, "start-queue": 2,
              "inhibit": true, "sock-fds": "xdp1-q2:xdp1-q3"}      (+ "mode": "skb" if XDP runs in skb mode)
  device_add {"mq": true, "vectors": 6, "driver": "virtio-net-pci", "netdev": "xdp1", "id": "xdp1-dev"}
"""

DETACH_DESCRIPTION = """\
Remove what qmp-attach plugged: device_del of ID-dev (if there is one), waiting up to --timeout seconds for
QEMU's DEVICE_DELETED event (the guest has to release a PCI device), then netdev_del of ID. QEMU then closes
the AF_XDP sockets and the kernel empties their xsks_map slots; qmp-detach then ends QEMU's leases whose
sockets are all closed (the broker checks), so the quota is free again at once. If the broker cannot be
reached, it sees the slots empty within a few seconds and ends the lease itself. A device the guest does not
release in time keeps its netdev; run qmp-detach again later."""

DETACH_EPILOG = """\
examples:
  xskbroker qmp-detach --qmp /run/vm1.qmp --id xdp0
  xskbroker qmp-detach --qmp /run/vm1.qmp --id xdp0 --timeout 30 --json
"""


def _props(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"mq\": true, \"vectors\": 6}'")
    return value


def add_qmp_parsers(sub: Any) -> None:
    a = sub.add_parser("qmp-attach", help="hot-plug a bare grant into a running QEMU as an af-xdp netdev (QMP)",
                       description=ATTACH_DESCRIPTION, epilog=ATTACH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--qmp", required=True, metavar="PATH", help="QEMU's QMP unix socket (-qmp unix:PATH,server=on)")
    a.add_argument("--id", required=True, help="netdev id; fds are named ID-qN and the device ID-dev")
    a.add_argument("--interface", "-i", required=True, help="host interface whose queues to hand over")
    a.add_argument("--queues", "-q", type=argtypes.queue_count, required=True, metavar="N", help="number of queues")
    a.add_argument("--start-queue", type=argtypes.non_negative, default=0, metavar="M", help="first queue (default: 0)")
    a.add_argument("--device", metavar="MODEL", help="also device_add a NIC of this model, e.g. virtio-net-pci")
    a.add_argument("--device-props", type=_props, metavar="JSON",
                   help="extra device_add properties as a JSON object, e.g. '{\"mq\": true, \"vectors\": 6}' "
                   "for a multi-queue virtio-net (vectors = 2*queues+2)")
    a.add_argument("--qemu-umem", type=size_arg, default=None, metavar="SIZE",
                   help="UMEM this QEMU registers per queue (default: what its version implies, 32MiB for every "
                   "af-xdp QEMU so far; a build with smaller libxdp rings needs less)")
    a.add_argument("--socket", default=DEFAULT_SOCKET, metavar="BROKER", help="broker socket (default: %(default)s)")
    a.add_argument("--force", action="store_true",
                   help="try even if this QEMU does not list the af-xdp backend, and show QEMU's own error")
    a.add_argument("--timeout", type=argtypes.timeout, default=q.DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for QEMU and for the broker (default: %(default)s)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=cmd_qmp_attach)

    d = sub.add_parser("qmp-detach", help="remove a netdev (and its device) that qmp-attach plugged into QEMU",
                       description=DETACH_DESCRIPTION, epilog=DETACH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--qmp", required=True, metavar="PATH", help="QEMU's QMP unix socket")
    d.add_argument("--id", required=True, help="the netdev id given to qmp-attach")
    d.add_argument("--device-id", help="device to remove first (default: ID-dev, skipped if absent)")
    d.add_argument("--socket", default=DEFAULT_SOCKET, metavar="BROKER", help="broker socket (default: %(default)s)")
    d.add_argument("--timeout", type=argtypes.timeout, default=q.DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for QEMU and for the guest to release the device (default: %(default)s)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_qmp_detach)


# ---- output --------------------------------------------------------------------------------------------

def _fail(as_json: bool, code: str, message: str, notes: Sequence[str] = (), **extra: Any) -> int:
    if as_json:
        err = {"code": code, "message": message, **extra}
        if notes:
            err["notes"] = list(notes)
        print(json.dumps({"ok": False, "error": err}))
    else:
        print(f"xskbroker: {message}", file=sys.stderr)
        for note in notes:
            print(f"  {note}", file=sys.stderr)
    return 1


def _fail_qmp(as_json: bool, e: BaseException, notes: Sequence[str] = (), **extra: Any) -> int:
    notes = [*getattr(e, "__notes__", ()), *notes]
    if isinstance(e, q.QMPError):
        # QEMU's desc goes out untouched: in JSON as the message, in text after the command it answered
        text = e.desc if as_json else f"QEMU refused {e.command}: {e.desc}"
        return _fail(as_json, "qmp-error", text, notes, command=e.command, qmp_class=e.error_class, **extra)
    code = "qmp-timeout" if isinstance(e, q.QMPTimeout) else "qmp-unreachable"
    return _fail(as_json, code, str(e), notes, **extra)


def _warn(as_json: bool, warnings: list[str], text: str) -> None:
    warnings.append(text)
    if not as_json:
        print(f"xskbroker: warning: {text}", file=sys.stderr)


def _seen(warnings: list[str]) -> dict[str, Any]:
    return {"warnings": list(warnings)} if warnings else {}


def _queues(queues: Sequence[int]) -> str:
    return str(queues[0]) if len(queues) == 1 else f"{queues[0]}-{queues[-1]}"


# ---- qmp-attach ----------------------------------------------------------------------------------------

def release_lease(socket_path: str, reply: Any, timeout: float, unwound: Sequence[str] = ()) -> str:
    """End the lease of an attempt that was undone. QEMU, its holder, lives on, so the broker would
    otherwise keep the lease (and its quota) until its own poll sees the slots empty. Returns a note.

    unwound: the unwind's notes. Where it could not delete the netdev or close an fd in QEMU, QEMU may still
    hold the sockets: the lease is then ended only if they are closed after all (if_closed), and kept otherwise."""
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto
    from xskbroker.wire.errors import ErrorCode

    held = hotplug.qemu_may_hold(unwound)
    closed = ("the grant's sockets were closed here, but QEMU may still hold them (the unwind could not remove them "
              "there)" if held else "the grant's sockets were closed here and in QEMU")
    lease = reply.get("lease") if isinstance(reply, dict) else None
    if not lease:
        return closed
    try:
        with Connection(socket_path, timeout=timeout) as conn:
            conn.call(proto.Release(str(lease), if_closed=held))
    except (proto.BrokerError, ConnectionError, OSError) as e:
        if held and isinstance(e, proto.BrokerError) and e.code == ErrorCode.LEASE_IN_USE:
            return (f"{closed}; lease {lease} is kept while they are open: the broker ends it once QEMU closes them "
                    "(or exits)")
        return (f"{closed}{'; ' if held else ', but '}releasing lease {lease} failed ({e}); the broker ends it once "
                "it sees the queues empty")
    if held:  # the broker found its slots empty: QEMU had closed them after all
        return (f"the grant's sockets were closed here, and lease {lease} was released: the broker found them closed "
                "in QEMU too")
    return f"{closed}, and lease {lease} was released"


def cmd_qmp_attach(args: argparse.Namespace) -> int:
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    as_json = args.json
    try:
        hotplug.check_id(args.id)
    except ValueError as e:
        return _fail(as_json, "bad-argument", str(e))
    if args.device_props and not args.device:
        return _fail(as_json, "bad-argument", "--device-props needs --device")
    try:
        qmp = q.QMP(args.qmp, args.timeout)
    except (q.QMPConnectionError, q.QMPTimeout, q.QMPError) as e:
        return _fail_qmp(as_json, e)
    warnings: list[str] = []
    with qmp:
        try:
            qmp.check_af_xdp()
        except qemu_support.AfXdpUnsupported as e:
            if not args.force:
                return _fail(as_json, "af-xdp-unsupported", str(e),
                             ["nothing was asked of the broker; --force tries anyway and shows QEMU's own error"],
                             qemu=str(qmp.version))
            _warn(as_json, warnings, f"{e}; trying anyway (--force)")
        except (q.QMPError, q.QMPTimeout, q.QMPConnectionError) as e:
            return _fail_qmp(as_json, e)
        per_queue = qemu_support.umem_per_queue(qmp.version, args.qemu_umem)
        # with CAP_IPC_LOCK QEMU's UMEM is not charged to its limit: nothing to ask for or warn about
        ask_memlock = qemu_support.umem_bytes(args.queues, per_queue) if qmp.pid and not \
            qemu_support.has_ipc_lock(qmp.pid) else 0
        try:
            # QEMU, not this command, will hold the sockets: the lease follows QEMU's pid, and so does the
            # memlock raise the broker makes where policy and privilege allow it
            reply, fds = request_fds(args.interface, args.queues, kind="bare", start_queue=args.start_queue,
                                     socket_path=args.socket, timeout=args.timeout, holder_pid=qmp.pid or 0,
                                     memlock=ask_memlock)
        except proto.BrokerError as e:
            return _fail(as_json, e.code, f"{e.code}: {e.message}", **_seen(warnings))
        except (ConnectionError, OSError) as e:
            return _fail(as_json, "connection-error", str(e), **_seen(warnings))
        # the broker's answer decides (it may have raised QEMU's limit); without one, QEMU's /proc is read
        answer = reply.get("memlock") if ask_memlock else None
        if isinstance(answer, dict):
            shortfall = qemu_support.broker_memlock_warning(answer, qmp.pid or 0)
        else:
            shortfall = qemu_support.memlock_shortfall(qmp.pid, args.queues, per_queue)
        if shortfall:
            _warn(as_json, warnings, shortfall)
        seen = _seen(warnings)  # JSON errors carry the warnings given so far
        try:  # closes this process's copies: QEMU has its own now (or the attempt was undone)
            att = hotplug.attach_grant(qmp, args.id, reply, fds, interface=args.interface,
                                       start_queue=args.start_queue, queues=args.queues, device=args.device,
                                       device_props=args.device_props)
        except ValueError as e:
            return _fail(as_json, "bad-reply", str(e), [release_lease(args.socket, reply, args.timeout)], **seen)
        except (q.QMPError, q.QMPTimeout, q.QMPConnectionError) as e:
            unwound = getattr(e, "__notes__", ())
            return _fail_qmp(as_json, e, [release_lease(args.socket, reply, args.timeout, unwound)], **seen)

    result = {"ok": True, "qemu": str(qmp.version), "qmp": args.qmp, "lease": reply.get("lease"),
              "interface": att.ifname, "queues": list(att.queues), "xdp_mode": reply.get("xdp_mode"),
              "fd_names": list(att.fd_names), "netdev": att.netdev, "device": att.device, "warnings": warnings}
    if as_json:
        print(json.dumps(result))
        return 0
    device = f", device {att.device_id!r} ({args.device})" if att.device_id else " (no device: add one with device_add)"
    print(f"QEMU {qmp.version} at {args.qmp}: af-xdp netdev {att.netdev_id!r} on {att.ifname} queue(s) "
          f"{_queues(att.queues)}, XDP {reply.get('xdp_mode')} mode{device}")
    print(f"lease {reply.get('lease')}: QEMU holds the only copies of the sockets; they are released by "
          f"`xskbroker qmp-detach --qmp {args.qmp} --id {att.netdev_id}` or when QEMU exits")
    return 0


# ---- qmp-detach ----------------------------------------------------------------------------------------

def release_closed_leases(socket_path: str, qemu_pid: int, timeout: float) -> tuple[list[str], str | None]:
    """End the bare leases QEMU held whose sockets are now all closed: netdev_del closed them, and QEMU lives
    on, so nothing else would end the lease until the broker's poll. QEMU says nothing of which lease a
    netdev came from; the broker decides per lease (if_closed), so a lease QEMU still uses is never ended.
    Returns the leases ended and a note when the broker could not be asked."""
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto
    from xskbroker.wire.errors import ErrorCode

    ended: list[str] = []
    try:
        with Connection(socket_path, timeout=timeout) as conn:
            status, _ = conn.call_typed(proto.Status())
            for lease in status.leases:
                if lease.pid != qemu_pid or lease.kind != "bare":
                    continue
                try:
                    conn.call(proto.Release(lease.lease, if_closed=True))
                except proto.BrokerError as e:
                    if e.code not in (ErrorCode.LEASE_IN_USE, ErrorCode.UNKNOWN_LEASE):
                        raise
                    continue
                ended.append(lease.lease)
    except (proto.BrokerError, ConnectionError, OSError) as e:
        return ended, f"the broker could not be asked to end the lease ({e}); it ends it once it sees the queues empty"
    return ended, None


def cmd_qmp_detach(args: argparse.Namespace) -> int:
    as_json = args.json
    try:
        hotplug.check_id(args.id)
        if args.device_id:
            hotplug.check_id(args.device_id)
    except ValueError as e:
        return _fail(as_json, "bad-argument", str(e))
    try:
        with q.QMP(args.qmp, args.timeout) as qmp:
            qemu_pid = qmp.pid  # read while connected (SO_PEERCRED of the monitor socket)
            done = hotplug.detach(qmp, args.id, device_id=args.device_id, timeout=args.timeout)
    except (q.QMPConnectionError, q.QMPTimeout, q.QMPError) as e:
        return _fail_qmp(as_json, e)
    ended, note = release_closed_leases(args.socket, qemu_pid, args.timeout) if qemu_pid else \
        ([], "QEMU's pid is unknown (no SO_PEERCRED): the broker ends the lease once it sees the queues empty")
    if as_json:
        print(json.dumps({"ok": True, "qmp": args.qmp, "netdev": done.netdev_id,
                          "device": done.device_id if done.device_removed else None, "leases_ended": ended,
                          "warnings": [note] if note else []}))
        return 0
    device = f"device {done.device_id!r} and " if done.device_removed else f"(no device {done.device_id!r}) "
    print(f"QEMU at {args.qmp}: removed {device}netdev {done.netdev_id!r}; QEMU closed its AF_XDP sockets")
    if ended:
        print(f"lease {', '.join(ended)} ended: its queues and quota are free")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xskbroker", description="QMP hot-plug of AF_XDP sockets into QEMU.")
    add_qmp_parsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
