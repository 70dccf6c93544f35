"""Consumer-side subcommands: request and status. Imports nothing privileged."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

from xskbroker.client import argtypes
from xskbroker.client.connection import DEFAULT_SOCKET, Connection
from xskbroker.policy.sizes import size_arg
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode


def _grant_target(parser: argparse.ArgumentParser, queues_default: int | None = 1,
                  queues_help: str = "number of queues (default: 1)") -> None:
    """What a grant is for and where the broker is: the arguments request and exec share."""
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="broker socket (default: %(default)s)")
    parser.add_argument("--interface", "-i", required=True, help="interface name")
    parser.add_argument("--queues", "-q", type=argtypes.queue_count, default=queues_default, help=queues_help)
    parser.add_argument("--start-queue", type=argtypes.non_negative, default=0, help="first queue id (default: 0)")


def add_client_parsers(sub: Any) -> None:
    r = sub.add_parser(
        "request", help="ask the broker for bound AF_XDP sockets and print the grant",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the broker for a bound grant and print it. The sockets are released when the "
        "command exits (after --hold seconds); programs use the library (client.grant.request) or "
        "`xskbroker exec` to keep them.",
        epilog="example:\n  xskbroker request --interface eth1 --queues 2 --start-queue 0 --umem 8MiB --json")
    _grant_target(r)
    r.add_argument("--umem", type=size_arg, default=4 << 20, help="UMEM bytes per socket (default: 4MiB)")
    r.add_argument("--frame-size", type=int, choices=(2048, 4096), default=4096)
    r.add_argument("--ring-size", type=argtypes.power_of_two, default=2048, help="entries of each of the four rings")
    r.add_argument("--bind-mode", choices=proto.BIND_MODES, default="auto",
                   help="zero-copy when the driver can (auto), or force copy/zerocopy")
    r.add_argument("--hold", type=argtypes.duration, default=0.0, help="seconds to hold the grant before releasing")
    r.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
    r.set_defaults(func=cmd_request)

    e = sub.add_parser(
        "exec", help="take a grant and run a command that inherits the sockets (QEMU, an app)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Take a grant, make exactly its fds inheritable, substitute placeholders in the command's "
        "arguments, export XSKBROKER_GRANT (JSON with every fd) and exec the command, which then holds the "
        "sockets: the lease ends when it exits.\n\nplaceholders: {sock_fds} (colon-separated socket fds, "
        "QEMU's sock-fds=), {umem_fds}, {map_fd}, {map_path} (a map grant's pin: serve --pin-root), {queues}, "
        "{start_queue}, {ifname}, {ifindex}, {xdp_mode}, {lease}; {{ and }} are literal braces.",
        epilog="example (QEMU >= 8.2, no capabilities needed):\n"
        "  xskbroker exec --interface eth1 --queues 2 --start-queue 0 -- \\\n"
        "    qemu-system-x86_64 ... -netdev af-xdp,id=n0,ifname={ifname},queues={queues},"
        "start-queue={start_queue},inhibit=on,sock-fds={sock_fds},mode={xdp_mode} \\\n"
        "    -device virtio-net-pci,netdev=n0\n"
        "example (QEMU >= 10.1 map-path=, needs CAP_NET_RAW; QEMU writes slot queue + map-start-index):\n"
        "  xskbroker exec --kind map --interface eth1 --queues 2 --start-queue 2 -- \\\n"
        "    qemu-system-x86_64 ... -netdev af-xdp,id=n0,ifname={ifname},queues={queues},"
        "start-queue={start_queue},inhibit=on,map-path={map_path},map-start-index={start_queue}")
    _grant_target(e, None, "number of queues (default: 1; --kind map: every queue of the interface)")
    e.add_argument("--kind", choices=("bare", "bound", "map"), default="bare",
                   help="bare: unbound sockets for QEMU/libxdp (default); bound: ready sockets + UMEM memfds; "
                   "map: an XSKMAP of the user's own that steers only the granted queues (the command makes its "
                   "own sockets: CAP_NET_RAW)")
    e.add_argument("--umem", type=size_arg, default=4 << 20, help="bound kind: UMEM bytes per socket (default 4MiB)")
    e.add_argument("--memlock", type=size_arg, default=None,
                   help="bare kind: RLIMIT_MEMLOCK the command needs for its own UMEM (default: --qemu-umem per queue, "
                   "what QEMU registers; 0: don't ask); the broker raises it where policy and privilege allow. "
                   "map kind: only checked against this process's limit (the broker raises none for map grants)")
    e.add_argument("--qemu-umem", type=size_arg, default=None, metavar="SIZE",
                   help="bare and map kinds: UMEM the command (QEMU) registers per queue, for the default --memlock "
                   "(default: 32MiB, stock QEMU's libxdp rings)")
    e.add_argument("--require-memlock", action="store_true",
                   help="fail instead of warning when the broker could not provide the memlock limit")
    e.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    e.set_defaults(func=cmd_exec)

    v = sub.add_parser(
        "revoke", help="admin: take back a lease, every lease on an interface, or those holding one of its queues",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Empty the map slots of the chosen leases so they receive nothing more, and mark them "
        "revoked. The kernel cannot unbind an AF_XDP socket: a holder that keeps its fds can still transmit "
        "until it closes them, and the lease (and its quota) lasts until then. --signal also sends the "
        "policy's [admin] revoke_signal to the holder through its pidfd.",
        epilog="examples:\n  xskbroker revoke --lease 3f2a9c0d4e5b6a71\n  xskbroker revoke --interface eth1 --queue 2 "
        "--signal")
    target = v.add_mutually_exclusive_group(required=True)
    target.add_argument("--lease", help="lease id (see `xskbroker status`)")
    target.add_argument("--interface", "-i", help="every lease on this interface")
    v.add_argument("--queue", type=argtypes.non_negative, help="with --interface: only leases holding this queue")
    v.add_argument("--signal", action="store_true", help="also signal the holder (policy's revoke_signal)")
    v.add_argument("--socket", default=DEFAULT_SOCKET, help="broker socket (default: %(default)s)")
    v.add_argument("--json", action="store_true", help="print the broker's reply as JSON")
    v.set_defaults(func=cmd_revoke)

    s = sub.add_parser(
        "status", help="show the leases this user holds (admins: all), attached programs, quotas and metrics",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the broker what it holds. Everyone sees their own leases and quota usage; an admin (the "
        "policy's [admin] table, root by default) sees every lease and the broker-wide metrics, which "
        "--format prometheus prints in Prometheus's text format (for node_exporter's textfile collector).",
        epilog="example (a timer for node_exporter, as root):\n  xskbroker status --format prometheus "
        "--output /var/lib/prometheus/node-exporter/xskbroker.prom")
    s.add_argument("--socket", default=DEFAULT_SOCKET, help="broker socket (default: %(default)s)")
    s.add_argument("--format", choices=("table", "json", "prometheus"), default="table",
                   help="table for people (default), the broker's reply as JSON, or Prometheus text exposition "
                   "(admins only)")
    s.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    s.add_argument("--output", "-o", metavar="FILE",
                   help="write to FILE (replaced whole, atomically, so a collector never reads half of it) "
                   "instead of standard output; on any error FILE is left as it was")
    s.set_defaults(func=cmd_status)


def _fail(err: Exception, as_json: bool) -> int:
    code = getattr(err, "code", ErrorCode.CONNECTION_ERROR)
    message = getattr(err, "message", str(err))
    if as_json:
        print(json.dumps({"ok": False, "error": {"code": code, "message": message}}))
    else:
        print(f"xskbroker: {code}: {message}", file=sys.stderr)
    return 1


def _refused_here(req: proto.Request, as_json: bool) -> bool:
    """Whether the request is one the broker would refuse as malformed (a ring size that is not a power of two, a
    UMEM that is not whole pages, an interface name no interface can have): said now, by the codec the broker
    decodes with, in its words, with no broker asked (and whether or not one is running)."""
    try:
        proto.decode_request(proto.encode_request(req))
    except proto.ProtocolError as e:
        _fail(e, as_json)
        return True
    return False


def cmd_request(args: argparse.Namespace) -> int:
    from xskbroker.client.grant import request
    from xskbroker.client.xsk import UnsupportedMachine, check_machine

    try:  # before any grant: this command maps the rings, which this CPU cannot use safely
        check_machine()
    except UnsupportedMachine as e:
        return _fail(e, args.json)

    ring = args.ring_size
    geometry = proto.Geometry(args.umem, args.frame_size, 0, ring, ring, ring, ring)
    ids = tuple(range(args.start_queue, args.start_queue + args.queues))
    if _refused_here(proto.Grant(args.interface, ids, geometry=geometry, bind_mode=args.bind_mode), args.json):
        return 2
    started = time.perf_counter()
    try:
        grant = request(args.interface, ids, geometry=geometry, bind_mode=args.bind_mode, socket_path=args.socket)
    except (proto.BrokerError, ConnectionError, OSError) as e:
        return _fail(e, args.json)
    elapsed = (time.perf_counter() - started) * 1000
    with grant:
        if args.json:
            print(json.dumps({**grant.reply, "latency_ms": round(elapsed, 3)}))
        else:
            print(f"lease {grant.lease}: {grant.interface} (ifindex {grant.ifindex}), XDP {grant.xdp_mode} mode, "
                  f"{len(grant.sockets)} socket(s) in {elapsed:.1f} ms")
            assert grant.typed is not None
            for s in grant.typed.bound_sockets:
                mode = "zero-copy" if s.zerocopy else "copy"
                print(f"  queue {s.queue}: {mode}, UMEM {s.umem.size} bytes ({s.umem.frame_size}-byte frames), "
                      f"rings {s.rings.to_wire()}")
        sys.stdout.flush()
        if args.hold > 0:
            time.sleep(args.hold)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from xskbroker.client import status_view

    as_json = args.format == "json"
    try:
        with Connection(args.socket) as conn:
            reply, _ = conn.call_typed(proto.Status())
    except (proto.BrokerError, ConnectionError, OSError) as e:
        return _fail(e, as_json)
    if args.format == "prometheus":
        if reply.metrics is None:
            why = ("broker-wide metrics are for admins (the policy's [admin] table); `xskbroker status` shows "
                   "your own leases and quotas" if not reply.admin else "this broker sends no metrics (older version)")
            return _fail(proto.BrokerError(ErrorCode.NOT_ADMIN if not reply.admin else ErrorCode.BAD_REPLY, why),
                         False)
        text = status_view.prometheus(reply.metrics)
    else:
        text = json.dumps(reply.raw) + "\n" if as_json else status_view.table(reply) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        _replace_file(args.output, text)
    except OSError as e:
        print(f"xskbroker status: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _replace_file(path: str, text: str) -> None:
    """Write a new file beside path and rename it over path: readers see the old file or the new, whole."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            # a collector running as another user reads it; by the fd, never by name: whoever else can write
            # the directory could swap a link in for the temp file and have root chmod the link's target
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_exec(args: argparse.Namespace) -> int:
    from xskbroker.client.grant import request_fds
    from xskbroker.client.launch import exec_with_grant, map_consumer_warnings, memlock_warning
    from xskbroker.client.qemu_support import umem_bytes, umem_per_queue

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("xskbroker exec: no command given (put it after --)", file=sys.stderr)
        return 2
    # a map grant on no named queues is for every queue of the interface (the map has a slot for each)
    queues = args.queues if args.queues is not None else (0 if args.kind == "map" else 1)
    ids = list(range(args.start_queue, args.start_queue + queues))
    per_queue = umem_per_queue(None, args.qemu_umem)
    memlock = args.memlock
    if memlock is None:
        memlock = umem_bytes(queues, per_queue) if args.kind == "bare" else 0
    geometry = proto.Geometry(umem_size=args.umem)
    asked = memlock if args.kind == "bare" else 0  # only a bare grant's holder makes its own UMEM
    if _refused_here(proto.Grant(args.interface, tuple(ids), args.kind, geometry, memlock=asked), False):
        return 2
    try:
        reply, fds = request_fds(args.interface, ids, kind=args.kind, geometry=geometry, socket_path=args.socket,
                                 memlock=asked)
    except (proto.BrokerError, ConnectionError, OSError) as e:
        return _fail(e, False)
    if args.kind == "map":  # the consumer makes its own sockets and UMEM: the broker cannot help, say what it lacks
        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        needed = memlock if args.memlock is not None else umem_bytes(queues or reply.get("map_entries") or 1, per_queue)
        warnings = map_consumer_warnings(command, needed, None if soft == resource.RLIM_INFINITY else soft)
        short = any("RLIMIT_MEMLOCK" in w for w in warnings)
    else:
        warning = memlock_warning(reply, command)  # None when the command keeps CAP_IPC_LOCK
        warnings, short = ([warning], True) if warning else ([], False)
    try:
        for w in warnings:
            print(w, file=sys.stderr)
        if short and args.require_memlock:
            return 1
        exec_with_grant(reply, fds, command, ids)
    except KeyError as e:
        print(f"xskbroker exec: {e.args[0]}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"xskbroker exec: cannot run {command[0]!r}: {e.strerror or e}", file=sys.stderr)
        return 127
    finally:
        for fd in fds:  # reached only when exec failed: nothing may keep the sockets alive
            with contextlib.suppress(OSError):
                os.close(fd)
    return 127


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.queue is not None and not args.interface:
        print("xskbroker revoke: --queue needs --interface", file=sys.stderr)
        return 2
    req = proto.Revoke(args.lease, args.interface, args.queue, args.signal)
    if _refused_here(req, args.json):
        return 2
    try:
        with Connection(args.socket) as conn:
            reply, _ = conn.call_typed(req)
    except (proto.BrokerError, ConnectionError, OSError) as e:
        return _fail(e, args.json)
    if args.json:
        print(json.dumps(reply.raw))
        return 0
    for r in reply.revoked:
        signalled = ", holder signalled" if r.signalled else ""
        if r.not_signalled:
            signalled = f", holder NOT signalled: {r.not_signalled}"
        print(f"revoked {r.lease} (pid {r.holder_pid}): emptied queues {list(r.emptied_queues)}{signalled}")
    print(reply.note)
    return 0
