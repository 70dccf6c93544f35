"""xskbroker's libvirt hook: AF_XDP interfaces declared in a domain's <metadata>, hot-plugged when it starts.

libvirt runs /etc/libvirt/hooks/qemu.d/xskbroker (deploy/libvirt/xskbroker, which only calls main() here) as
root, with argv `DOMAIN OPERATION SUB-OPERATION EXTRA` and the domain XML on stdin. See docs/libvirt.md.

- `prepare begin`: check the declaration; a malformed one fails the start, with the reason.
- `started begin`: spawn a detached worker (lifecycle.py) and return at once: libvirt holds the domain's job
  while a hook runs, so any call back into libvirt from the hook itself would wait for the hook, a deadlock.
- `stopped end`, `release end`: forget the domain's state file, releasing any lease still recorded.
- anything else: nothing, quietly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO

from xskbroker.client.libvirt.config import Config, ConfigError, load_config
from xskbroker.client.libvirt.lifecycle import forget, spawn_worker
from xskbroker.client.libvirt.metadata import Interface, MetadataError, domain_uuid, parse_interfaces

USAGE = ("usage: xskbroker libvirt hook DOMAIN OPERATION SUB-OPERATION [EXTRA] (domain XML on stdin)\n"
         "installed as /etc/libvirt/hooks/qemu.d/xskbroker; see docs/libvirt.md")


def action_for(operation: str, sub_operation: str) -> str | None:
    """"check", "plug", "forget" or None (nothing to do) for libvirt's qemu hook OPERATION SUB-OPERATION."""
    if (operation, sub_operation) == ("prepare", "begin"):
        return "check"
    if (operation, sub_operation) == ("started", "begin"):
        return "plug"
    if operation in ("stopped", "release") and sub_operation == "end":
        return "forget"
    return None


def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None, config_path: str | None = None,
         spawn: Callable[[str, Sequence[Interface], Config, str | None], int] = spawn_worker) -> int:
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
        spawn(domain, interfaces, cfg, domain_uuid(xml_text))
    except OSError as e:
        print(f"xskbroker: domain {domain}: cannot start the worker: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
