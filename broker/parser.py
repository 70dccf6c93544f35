"""Every command's argparse parser (`xskbroker --help`); imported only when a command line needs it: a
socket-activated `serve` reads its plain options without it (broker/serve_options.py)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from xskbroker.broker import serve_options

EPILOG = """\
examples:
  xskbroker serve --socket /run/xskbroker/broker.sock --policy /etc/xskbroker/policy.toml
  xskbroker request --interface eth1 --queues 2 --json
  xskbroker policy check /etc/xskbroker/policy.toml
  xskbroker policy explain --policy /etc/xskbroker/policy.toml --user qemu --interface eth1 --queue 0
  xskbroker doctor --interface eth1
  xskbroker demo --packets 1000
"""


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


class _ExamplesFormatter(_Formatter):
    """_Formatter's wrapped description, with an epilog of examples kept as written (lines of commands)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Version(argparse.Action):
    """--version: the package's version, looked up only when asked (importlib.metadata costs milliseconds)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from xskbroker.broker.metrics import version

        print(f"xskbroker {version()}")
        parser.exit()


def _at_least(low: int) -> Callable[[str], int]:
    """An integer option's type=: a count or an id below LOW (or past a uid's 32 bits) is a usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= 0xFFFFFFFE:
            raise argparse.ArgumentTypeError(f"must be between {low} and {0xFFFFFFFE}, not {value}")
        return value
    return parse


def build_parser(serve: Callable[[argparse.Namespace], int], demo: Callable[[argparse.Namespace], int],
                 only_serve: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; with ONLY_SERVE just `serve`'s, which then imports no other command's module
    (a socket-activated start pays for every import before its first grant)."""
    p = argparse.ArgumentParser(
        prog="xskbroker", formatter_class=_RawFormatter, epilog=EPILOG,
        description="Hand AF_XDP sockets to unprivileged programs, as a policy allows.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the broker in the foreground (root)", formatter_class=_ExamplesFormatter,
                       epilog="examples:\n"
                       "  xskbroker serve --socket /run/xskbroker/broker.sock --policy /etc/xskbroker/policy.toml "
                       "--socket-group xskbroker\n"
                       "  xskbroker serve --policy ./policy.toml --socket /tmp/xsk.sock --audit json   # try one out\n"
                       "\nunder systemd: deploy/install.sh, then systemctl enable --now xskbroker.socket "
                       "(docs/systemd.md)",
                       description="Run the broker in the foreground. Every decision is one audit record: a "
                       "JSON line on stderr, or a journal entry (--audit). SIGHUP reloads the policy (a bad file "
                       "keeps the old one); SIGTERM/SIGINT stop it. Started by systemd socket activation it "
                       "serves the passed socket and notifies the manager (READY=1, STATUS=, STOPPING=1).")
    for flag, kw in serve_options.options():
        kw = dict(kw)
        if kw.get("action") == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        if "help" in kw and kw["help"] is None:
            kw["help"] = argparse.SUPPRESS
        s.add_argument(flag, **kw)
    s.set_defaults(func=serve)
    if only_serve:
        return p

    from xskbroker.broker.doctor_cli import add_parser as add_doctor_parser
    from xskbroker.client.cli import add_client_parsers
    from xskbroker.client.qmp_cli import add_qmp_parsers
    from xskbroker.policy.cli import add_policy_parser
    from xskbroker.policy.sizes import size_arg
    add_client_parsers(sub)
    add_qmp_parsers(sub)
    add_policy_parser(sub)
    add_doctor_parser(sub)

    d = sub.add_parser("demo", help="prove it works: a private namespace, a broker, an unprivileged consumer",
                       description="Make a network namespace with a veth pair, start a broker on a private "
                       "socket, run a consumer that dropped to an unprivileged uid before connecting, send it "
                       "frames from the peer and capture its replies. Cleans up on success, failure and Ctrl-C. "
                       "Exit status: 0 every frame went both ways, 1 not, 2 a usage error (or no root).",
                       formatter_class=_ExamplesFormatter,
                       epilog="examples (as root):\n  xskbroker demo\n  xskbroker demo --packets 10000 --umem 16MiB "
                       "--json   # rx_packets, tx_packets, peer_captured, grant_latency_ms, ...")
    d.add_argument("--packets", type=_at_least(1), default=1000, help="frames to send (default: %(default)s)")
    d.add_argument("--uid", type=_at_least(0), default=65534, help="consumer uid (default: %(default)s, nobody)")
    d.add_argument("--umem", type=size_arg, default="4MiB", help="UMEM size (default: %(default)s)")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    d.add_argument("--keep-logs", action="store_true", help="print the broker's log at the end")
    d.set_defaults(func=demo)
    return p
