"""`xskbroker` command line: one entry point, subcommands imported only when used.

Consumer-side commands (request, status) load only the client package; serve and demo load the
privileged code.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

EPILOG = """\
examples:
  xskbroker serve --socket /run/xskbroker/broker.sock --policy /etc/xskbroker/policy.toml
  xskbroker request --interface eth1 --queues 2 --json
  xskbroker policy check /etc/xskbroker/policy.toml
  xskbroker policy explain --policy /etc/xskbroker/policy.toml --user qemu --interface eth1 --queue 0
  xskbroker doctor --interface eth1
  xskbroker demo --packets 1000
"""


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _endpoint(text: str) -> object:
    from xskbroker.broker.dpendpoint import parse_spec

    try:
        return parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (with bz2 and lzma ~2 ms of a cold start:
    argparse makes a formatter, which reads the width, for every add_argument)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns


class _Formatter(argparse.HelpFormatter):
    """argparse's, with the width as argparse would take it (less 2), read by _columns()."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _RawFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Version(argparse.Action):
    """--version: the package's version, looked up only when asked (importlib.metadata costs milliseconds)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from xskbroker.broker.metrics import version

        print(f"xskbroker {version()}")
        parser.exit()


def build_parser(only_serve: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; with ONLY_SERVE just `serve`'s, which then imports no other command's module
    (a socket-activated start pays for every import before its first grant)."""
    from xskbroker.client.connection import DEFAULT_SOCKET
    from xskbroker.policy.sizes import size_arg

    p = argparse.ArgumentParser(
        prog="xskbroker", formatter_class=_RawFormatter, epilog=EPILOG,
        description="Hand AF_XDP sockets to unprivileged programs, as a policy allows.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the broker in the foreground (root)", formatter_class=_Formatter,
                       description="Run the broker in the foreground. Every decision is one audit record: a "
                       "JSON line on stderr, or a journal entry (--audit). SIGHUP reloads the policy (a bad file "
                       "keeps the old one); SIGTERM/SIGINT stop it. Started by systemd socket activation it "
                       "serves the passed socket and notifies the manager (READY=1, STATUS=, STOPPING=1).")
    s.add_argument("--socket", default=DEFAULT_SOCKET,
                   help="listening socket path, unless systemd passed one (default: %(default)s)")
    s.add_argument("--policy", default="/etc/xskbroker/policy.toml",
                   help="policy file; policy.d/*.toml beside it is merged (default: %(default)s)")
    s.add_argument("--socket-mode", type=_mode, default=0o660, help="socket file mode (default: 0660)")
    s.add_argument("--socket-group", help="group owning the socket file (name or gid)")
    s.add_argument("--state-dir", help="where leases are recorded for restart recovery "
                   "(default: $RUNTIME_DIRECTORY or /run/xskbroker); created 0700, and must be the broker's "
                   "own and closed to others")
    s.add_argument("--umem-pool", type=size_arg, default=64 << 20, metavar="SIZE",
                   help="budget of the UMEM pool: sockets made ahead for the geometries recently asked for "
                   "(a fresh zeroed UMEM registered, rings sized; unbound, in no map), so a grant only claims a "
                   "slot and binds. Pinned by the broker, counted in no quota, shown by `status`; 0 turns it "
                   "off (default: 64MiB)")
    s.add_argument("--xdp-mode", choices=("auto", "native", "skb"), default="auto",
                   help="how to attach the XSK program: native with fallback to skb (auto), or only one")
    s.add_argument("--pin-root", metavar="DIR",
                   help="a bpffs directory (root's, not writable by others) where each map grant is pinned for its "
                   "tenant at DIR/<uid>/<interface>/xsks_map, for DPDK's use_pinned_map and QEMU's map-path "
                   "(default: no pins)")
    s.add_argument("--device-plugin", action="append", type=_endpoint, metavar="SPEC",
                   help="answer the AF_XDP device plugin's handshake (DPDK's af_xdp dp_path=) with a map grant: "
                   "SPEC is interface=IF,user=U[,group=G][,queues=N[-M]][,path=P]; the socket at P (default "
                   "/tmp/afxdp_dp/IF/afxdp.sock) is U's alone; repeat for more (see docs/dpdk.md)")
    s.add_argument("--idle-timeout", type=_seconds, metavar="SECONDS",
                   help="exit after this long with no connection and no lease (for socket activation; "
                   "default: never)")
    s.add_argument("--split-cpus", action=argparse.BooleanOptionalAction, default=True,
                   help="with two CPUs or more to run on, do the slow kernel work (closing sockets, whose UMEM the "
                   "kernel then releases on the closing CPU; making UMEMs ahead; pinning large ones) on the last of "
                   "them and answer clients on the others, so that no grant waits behind it (default: split)")
    s.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="client connections open at once, shared fairly between users, 1/16 kept for admins; "
                   "lowered to what the fd limit (LimitNOFILE) leaves room for (default: %(default)s)")
    # Tests only: act as on a kernel without SO_PASSRIGHTS, where clients' fds do arrive and must be discarded.
    s.add_argument("--accept-passed-fds", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--audit", choices=("auto", "journal", "json"), default="auto",
                   help="audit records as native journal entries or JSON lines on stderr; "
                   "auto: the journal when journald runs (default: auto)")
    s.set_defaults(func=_serve)
    if only_serve:
        return p

    from xskbroker.broker.doctor import add_parser as add_doctor_parser
    from xskbroker.client.cli import add_client_parsers
    from xskbroker.client.qmp_cli import add_qmp_parsers
    from xskbroker.policy.cli import add_policy_parser
    add_client_parsers(sub)
    add_qmp_parsers(sub)
    add_policy_parser(sub)
    add_doctor_parser(sub)

    d = sub.add_parser("demo", help="prove it works: a private namespace, a broker, an unprivileged consumer",
                       description="Make a network namespace with a veth pair, start a broker on a private "
                       "socket, run a consumer that dropped to an unprivileged uid before connecting, send it "
                       "frames from the peer and capture its replies. Cleans up on success, failure and Ctrl-C.")
    d.add_argument("--packets", type=int, default=1000, help="frames to send (default: %(default)s)")
    d.add_argument("--uid", type=int, default=65534, help="consumer uid (default: %(default)s, nobody)")
    d.add_argument("--umem", default="4MiB", help="UMEM size (default: %(default)s)")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    d.add_argument("--keep-logs", action="store_true", help="print the broker's log at the end")
    d.set_defaults(func=_demo)
    return p


def _serve(args: argparse.Namespace) -> int:
    from xskbroker.broker.daemon import serve
    return serve(args)


def _demo(args: argparse.Namespace) -> int:
    from xskbroker.testbed.demo import main
    return main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # start-up allocates thousands of long-lived objects (modules, classes, the policy) and no garbage worth
        # a collection: collecting them meanwhile only delays a socket-activated first grant (serve freezes
        # them out of the collector's sight, then turns it back on, before it says READY)
        gc.disable()
    try:
        args = build_parser(only_serve=argv[:1] == ["serve"]).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    finally:
        gc.enable()  # a serve that never got to READY (or a caller of main in-process) has it back


if __name__ == "__main__":
    sys.exit(main())
