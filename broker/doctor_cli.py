"""`xskbroker doctor`: its options, and its checks (broker.doctor) printed as a table or JSON."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Any

from xskbroker.broker.doctor import DEGRADED, OK, UNKNOWN, UNUSABLE, Check, run_checks, verdict
from xskbroker.common.defaults import DEFAULT_SOCKET
from xskbroker.common.records import asdict
from xskbroker.policy.loader import DEFAULT_POLICY_PATH


def as_json(checks: list[Check]) -> str:
    word, code = verdict(checks)
    return json.dumps({"verdict": word, "exit": code, "uid": os.getuid(), "checks": [asdict(c) for c in checks]},
                      indent=1)


def as_table(checks: list[Check], width: int = 100) -> str:
    word, _ = verdict(checks)
    counts = {s: sum(c.status == s for c in checks) for s in (DEGRADED, UNUSABLE, UNKNOWN)}
    head = f"xskbroker doctor: {word}"
    parts = [f"{counts[DEGRADED]} limit(s)" if counts[DEGRADED] else "",
             f"{counts[UNUSABLE]} problem(s)" if counts[UNUSABLE] else "",
             f"{counts[UNKNOWN]} not visible as uid {os.getuid()}" if counts[UNKNOWN] else ""]
    if any(parts):
        head += " (" + ", ".join(p for p in parts if p) + ")"
    name_w = max((len(c.name) for c in checks), default=10)
    indent = " " * (10 + name_w + 2)
    lines = [head, ""]
    for c in checks:
        text = textwrap.wrap(c.found, max(width - len(indent), 40), break_on_hyphens=False) or [""]
        lines.append(f"{c.status:<10}{c.name:<{name_w}}  {text[0]}")
        lines += [indent + t for t in text[1:]]
        if c.fix and c.status != OK:
            lines += textwrap.wrap("fix: " + c.fix, max(width, len(indent) + 40), initial_indent=indent,
                                   subsequent_indent=indent + "     ", break_on_hyphens=False)
    if counts[UNKNOWN]:
        lines += ["", "unknown: this user may not look; run doctor as root for the whole picture"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    checks = run_checks(args.interface, args.socket, args.policy)
    print(as_json(checks) if args.json else as_table(checks))
    return verdict(checks)[1]


def _interface_name(text: str) -> str:
    """--interface's type=: a name no interface can have (empty, "eth0:1", past 15 bytes) is a usage error."""
    from xskbroker.wire.protocol import ifname_problem

    problem = ifname_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid interface name: {problem}")
    return text


def add_parser(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what this host can do for the broker, and how to fix what it cannot",
                       description="Check the kernel features, bpf(), libxdp, memlock limits, interfaces, the "
                       "socket and the policy. Changes nothing. Exit status: 0 ready, 1 degraded (works with "
                       "limits), 2 unusable. Run as root for the whole picture; as another user it says what "
                       "it cannot see.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n"
                       "  xskbroker doctor                          # every interface but lo\n"
                       "  xskbroker doctor --interface eth1 --json  # one interface: {\"verdict\", \"exit\", "
                       "\"uid\", \"checks\": [...]}\n"
                       "  xskbroker doctor --socket /run/xskbroker/broker.sock --policy /etc/xskbroker/policy.toml\n"
                       "\nsee docs/doctor.md for each check")
    d.add_argument("--interface", "-i", metavar="IF", type=_interface_name,
                   help="check only this interface (default: every one but lo)")
    d.add_argument("--json", action="store_true", help="print one JSON object: the checks and the verdict")
    d.add_argument("--socket", default=DEFAULT_SOCKET, help="the broker's socket (default: %(default)s)")
    d.add_argument("--policy", default=DEFAULT_POLICY_PATH, help="the policy file (default: %(default)s)")
    d.set_defaults(func=main)
