"""`xskbroker serve`'s options: one table for its argparse parser (broker/parser.py) and for the plain parse a
socket-activated start does without argparse.

Importing argparse (with gettext and locale) and building serve's parser took ~4 ms of every socket-activated
start, before its first grant. A unit's command line is plain (`--name VALUE`, `--name=VALUE`, flags), so
`quick_parse` reads those spellings to the very namespace argparse would give, and returns None for anything
else (help, an abbreviation, a value it cannot convert, an unknown option), which argparse then parses and
explains. tests/unit/test_serve_options.py holds the two to the same result.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

Option = tuple[str, dict[str, Any]]  # (flag, add_argument's keywords); action "bool" is BooleanOptionalAction


def _usage_error(text: str) -> Exception:
    import argparse  # only on the way to argparse's own error message

    return argparse.ArgumentTypeError(text)


def mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise _usage_error(f"{text!r} is not an octal mode such as 0660") from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise _usage_error(f"{text!r} is not a positive number of seconds")
    return value


def endpoint(text: str) -> object:
    from xskbroker.broker.dpendpoint import parse_spec

    try:
        return parse_spec(text)
    except ValueError as e:
        raise _usage_error(str(e)) from None


def options() -> list[Option]:
    from xskbroker.common.defaults import DEFAULT_SOCKET
    from xskbroker.policy.loader import DEFAULT_POLICY_PATH
    from xskbroker.policy.sizes import size_arg

    return [
        ("--socket", {"default": DEFAULT_SOCKET,
                      "help": "listening socket path, unless systemd passed one (default: %(default)s)"}),
        ("--policy", {"default": DEFAULT_POLICY_PATH,
                      "help": "policy file; policy.d/*.toml beside it is merged (default: %(default)s)"}),
        ("--socket-mode", {"type": mode, "default": 0o660, "help": "socket file mode (default: 0660)"}),
        ("--socket-group", {"help": "group owning the socket file (name or gid)"}),
        ("--state-dir", {"help": "where leases are recorded for restart recovery (default: $RUNTIME_DIRECTORY or "
                         "/run/xskbroker); created 0700, and must be the broker's own and closed to others"}),
        ("--umem-pool", {"type": size_arg, "default": 64 << 20, "metavar": "SIZE",
                         "help": "budget of the UMEM pool: sockets made ahead for the geometries recently asked for "
                         "(a fresh zeroed UMEM registered, rings sized; unbound, in no map), so a grant only claims "
                         "a slot and binds. Pinned by the broker, counted in no quota, shown by `status`; 0 turns it "
                         "off (default: 64MiB)"}),
        ("--xdp-mode", {"choices": ("auto", "native", "skb"), "default": "auto",
                        "help": "how to attach the XSK program: native with fallback to skb (auto), or only one"}),
        ("--pin-root", {"metavar": "DIR",
                        "help": "a bpffs directory (root's, not writable by others) where each map grant is pinned "
                        "for its tenant at DIR/<uid>/<interface>/xsks_map, for DPDK's use_pinned_map and QEMU's "
                        "map-path (default: no pins)"}),
        ("--device-plugin", {"action": "append", "type": endpoint, "metavar": "SPEC",
                             "help": "answer the AF_XDP device plugin's handshake (DPDK's af_xdp dp_path=) with a map "
                             "grant: SPEC is interface=IF,user=U[,group=G][,queues=N[-M]][,path=P]; the socket at P "
                             "(default /tmp/afxdp_dp/IF/afxdp.sock) is U's alone; repeat for more (see docs/dpdk.md)"}),
        ("--idle-timeout", {"type": seconds, "metavar": "SECONDS",
                            "help": "exit after this long with no connection and no lease (for socket activation; "
                            "default: never)"}),
        ("--split-cpus", {"action": "bool", "default": True,
                          "help": "with two CPUs or more to run on, do the slow kernel work (closing sockets, whose "
                          "UMEM the kernel then releases on the closing CPU; making UMEMs ahead; pinning large ones) "
                          "on the last of them and answer clients on the others, so that no grant waits behind it "
                          "(default: split)"}),
        ("--max-connections", {"type": int, "default": 1024, "metavar": "N",
                               "help": "client connections open at once (at least 16), shared fairly between users, "
                               "1/16 kept for admins; lowered to what the fd limit (LimitNOFILE) leaves room for "
                               "(default: %(default)s)"}),
        # Tests only: act as on a kernel without SO_PASSRIGHTS, where clients' fds do arrive and must be discarded.
        ("--accept-passed-fds", {"action": "store_true", "help": None}),
        ("--audit", {"choices": ("auto", "journal", "json"), "default": "auto",
                     "help": "audit records as native journal entries or JSON lines on stderr; auto: the journal when "
                     "journald runs (default: auto)"}),
    ]


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def quick_parse(args: list[str]) -> SimpleNamespace | None:
    """serve's arguments (those after "serve") as argparse would read them, or None unless every one is a plain
    spelling of a known option with a value its type accepts."""
    table = dict(options())
    values: dict[str, Any] = {}
    for flag, keywords in table.items():
        values[dest(flag)] = keywords.get("default", False if keywords.get("action") == "store_true" else None)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        kw = table.get(name)
        if kw is None and name.startswith("--no-") and table.get("--" + name[5:], {}).get("action") == "bool":
            if eq:
                return None
            values[dest("--" + name[5:])] = False
            i += 1
            continue
        if kw is None:
            return None
        action = kw.get("action")
        if action in ("store_true", "bool"):
            if eq:
                return None
            values[dest(name)] = True
            i += 1
            continue
        if not eq:
            if i + 1 == len(args) or args[i + 1].startswith("-"):
                return None  # argparse decides what a value that looks like an option means
            value = args[i + 1]
            i += 1
        i += 1
        try:
            converted = kw.get("type", str)(value)
        except Exception:
            return None
        if "choices" in kw and converted not in kw["choices"]:
            return None
        values[dest(name)] = [*(values[dest(name)] or []), converted] if action == "append" else converted
    return SimpleNamespace(command="serve", **values)
