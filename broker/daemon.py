"""`xskbroker serve`: load the policy, listen, run the loop, clean up."""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import sys

from broker.audit import JsonAudit
from broker.server import Server, listen
from broker.service import Service
from policy import PolicyError, load_policy


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SystemExit(f"xskbroker: no group named {group!r}") from None


def serve(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        print("xskbroker: the policy has errors; not starting:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    audit = JsonAudit(sys.stderr)
    try:
        listener = listen(args.socket, args.socket_mode, _gid(args.socket_group))
    except OSError as e:
        print(f"xskbroker: cannot listen on {args.socket}: {e.strerror or e}", file=sys.stderr)
        return 1
    state_dir = getattr(args, "state_dir", None) or os.environ.get("RUNTIME_DIRECTORY", "/run/xskbroker")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    service = Service(policy, audit, args.xdp_mode, state_file=os.path.join(state_dir, "leases.jsonl"))
    service.recover()
    server = Server(listener, service, audit, args.policy)
    audit({"event": "ready", "socket": args.socket, "policy": list(policy.sources), "rules": len(policy.rules),
           "pid": os.getpid()})
    try:
        server.run()
    finally:
        server.close()
        service.close()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        audit({"event": "stopped"})
    return 0
