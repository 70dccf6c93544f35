"""`xskbroker policy check` and `xskbroker policy explain`.

broker/cli.py calls add_policy_parser(subparsers) and then args.func(args); each command returns the
process exit status.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import sys
from collections.abc import Iterable

from xskbroker.common import records

from .decide import Decision, Peer, Request, decide
from .loader import DEFAULT_POLICY_PATH, PolicyError, load_policy
from .model import KINDS, Policy
from .sizes import format_size, size_arg

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2
MAX_QUEUE_ID = 65535  # wire.protocol's bound on a queue id
MAX_UID = 0xFFFFFFFE  # (uid_t)-1 means "no uid": no peer has it

_POLICY_EPILOG = """\
examples:
  xskbroker policy check /etc/xskbroker/policy.toml
  xskbroker policy explain --user alice --interface veth0 --queue 0 --queue 1

The policy file also pulls in policy.d/*.toml next to it. See docs/policy.md for the format.
"""

_CHECK_EPILOG = f"""\
Reads FILE and every policy.d/*.toml beside it, and reports every problem as FILE:LINE: message.
Exit status: 0 if the policy is valid, 1 if not.

examples:
  xskbroker policy check                      # checks {DEFAULT_POLICY_PATH}
  xskbroker policy check ./policy.toml --json
"""

_EXPLAIN_EPILOG = """\
Shows which rule decides a hypothetical grant request, exactly as the broker would decide it.
Without --group, the user's groups come from the system (primary and supplementary); with --group,
exactly the groups given are used (names or numeric gids, repeat the option for several).
Exit status: 0 allowed, 1 denied, 2 bad arguments or an invalid policy.

examples:
  xskbroker policy explain --user alice --interface veth0 --queue 0
  xskbroker policy explain --policy ./policy.toml --user 1000 --group xsk \\
      --interface eth1 --queue 0 --queue 1 --kind bare --umem 64MiB --json
"""


def _queue(text: str) -> int:
    try:
        queue = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a queue number: {text!r}") from None
    if queue < 0:
        raise argparse.ArgumentTypeError(f"queue must not be negative: {text}")
    if queue > MAX_QUEUE_ID:  # the broker refuses it at decode (bad-request), before any rule: say so
        raise argparse.ArgumentTypeError(f"queue ids are 0 to {MAX_QUEUE_ID} (the broker refuses others), not {text}")
    return queue


def add_policy_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy check` and `policy explain` to the main CLI; each sets args.func."""
    raw = argparse.RawDescriptionHelpFormatter
    policy = subparsers.add_parser(
        "policy",
        help="check a policy file or explain a decision",
        description="Validate the broker's access policy, or see how it decides a request.",
        epilog=_POLICY_EPILOG,
        formatter_class=raw,
    )
    sub = policy.add_subparsers(dest="policy_command", metavar="{check,explain}", required=True)

    check = sub.add_parser(
        "check",
        help="validate a policy file (and its policy.d/)",
        description="Validate a policy file.",
        epilog=_CHECK_EPILOG,
        formatter_class=raw,
    )
    check.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        default=DEFAULT_POLICY_PATH,
        help=f"policy file (default: {DEFAULT_POLICY_PATH})",
    )
    check.add_argument("--json", action="store_true", help='print {"ok", "errors", "rules", ...} as JSON')
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser(
        "explain",
        help="show which rule allows or denies a request",
        description="Decide a hypothetical grant request against a policy and say why.",
        epilog=_EXPLAIN_EPILOG,
        formatter_class=raw,
    )
    explain.add_argument(
        "--policy",
        metavar="FILE",
        default=DEFAULT_POLICY_PATH,
        help=f"policy file (default: {DEFAULT_POLICY_PATH})",
    )
    explain.add_argument("--user", metavar="U", required=True, help="user name or numeric uid asking")
    explain.add_argument(
        "--group",
        metavar="G",
        action="append",
        dest="groups",
        help="a group of the asker, name or gid; repeat for several (default: the user's groups)",
    )
    explain.add_argument(
        "--cgroup",
        metavar="PATH",
        help='the asker\'s cgroup v2 path as /proc/PID/cgroup\'s "0::" line shows it (default: unknown, '
        "which no rule with cgroups matches)",
    )
    explain.add_argument("--label", metavar="L", help="the asker's LSM label (SO_PEERSEC) (default: none)")
    explain.add_argument("--interface", "-i", metavar="I", required=True, help="interface name, e.g. veth0")
    explain.add_argument(
        "--queue",
        metavar="Q",
        type=_queue,
        action="append",
        dest="queues",
        required=True,
        help="queue id; repeat for several",
    )
    explain.add_argument("--kind", choices=KINDS, default="bound", help="grant kind (default: bound)")
    explain.add_argument(
        "--umem",
        metavar="SIZE",
        type=size_arg,
        default=0,
        help="the bytes the grant pins, as max_umem counts them: (UMEM size + ring bytes) x queues, e.g. 16MiB "
        "(default: 0); `request --umem` is per socket, without the rings. Only a bound grant pins any: with "
        "another kind it counts as 0",
    )
    explain.add_argument("--json", action="store_true", help="print the decision and request as JSON")
    explain.set_defaults(func=cmd_explain)


def _counts(policy: Policy) -> tuple[int, int]:
    return len(policy.allow_rules), len(policy.deny_rules)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as e:
        if args.json:
            print(json.dumps({"ok": False, "errors": e.errors, "rules": 0}))
        else:
            for line in e.errors:
                print(line, file=sys.stderr)
        return 1
    allow, deny = _counts(policy)
    if args.json:
        result = {
            "ok": True,
            "errors": [],
            "rules": allow + deny,
            "allow": allow,
            "deny": deny,
            "quotas": len(policy.quotas),
            "sources": list(policy.sources),
        }
        print(json.dumps(result))
        return 0
    quotas = f", {len(policy.quotas)} quotas" if policy.quotas else ""
    print(f"{args.file}: OK ({allow} allow rules, {deny} deny rules{quotas})")
    if not allow:
        print(f"{args.file}: note: there are no allow rules, so every request is denied", file=sys.stderr)
    return 0


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None  # a gid without a name still matches rules by number


def _held_names(names: Iterable[str], gids: set[int]) -> frozenset[str]:
    """Of these group names, those whose gid (NSS, asked by name) is among gids: how the broker names a peer's groups
    (broker.peer.GroupNames). getgrgid gives one name per gid, so a gid with two names (an alias, a local group and
    its LDAP twin) lost the other, and a rule naming that one was judged unlike the broker judges it."""
    held: set[str] = set()
    for name in names:
        try:
            if grp.getgrnam(name).gr_gid in gids:
                held.add(name)
        except (KeyError, ValueError):  # no such group (ValueError: a name with a NUL), as the broker takes it
            pass
    return frozenset(held)


def resolve_peer(user: str, groups: list[str] | None = None, policy_groups: Iterable[str] = ()) -> Peer:
    """Build the Peer the broker would see for `user` (name or uid).

    Groups come from the system unless `groups` is given. Raises LookupError for unknown names. `policy_groups`:
    the group names the policy mentions, which the broker names a peer's groups by.
    """
    entry: pwd.struct_passwd | None
    if user.isascii() and user.isdigit():
        try:
            entry = pwd.getpwuid(int(user))
        except KeyError:
            entry = None  # a uid with no account is still a valid peer
        uid = int(user)
        if uid > MAX_UID:
            raise LookupError(f"uid {user} is out of range: uids are 0 to {MAX_UID}")
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise LookupError(
                f"unknown user {user!r} (give a numeric uid for one that does not exist here)"
            ) from None
        uid = entry.pw_uid

    gids: set[int] = set()
    if groups is not None:
        for group in groups:
            if group.isascii() and group.isdigit():
                if int(group) > MAX_UID:
                    raise LookupError(f"gid {group} is out of range: gids are 0 to {MAX_UID}")
                gids.add(int(group))
                continue
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                raise LookupError(f"unknown group {group!r} (give a numeric gid instead)") from None
    elif entry is not None:
        gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    # the names shown (getgrgid's) and the policy's, each kept only if it names a held gid, as the broker does
    names = _held_names({*policy_groups, *(n for n in map(_group_name, gids) if n is not None)}, gids)
    return Peer(uid=uid, gids=frozenset(gids), user=_user_name(uid), groups=names)


def _user_name(uid: int) -> str | None:
    # the broker names a peer by its uid (getpwuid), never by the login name typed: "toor" is uid 0, named "root"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _describe_peer(peer: Peer) -> str:
    named = ((gid, _group_name(gid)) for gid in sorted(peer.gids))
    groups = ", ".join(f"{gid} ({name})" if name else str(gid) for gid, name in named)
    label = f", label: {peer.label}" if peer.label is not None else ""
    return f"{peer}, groups: {groups or 'none'}{label}"


def _print_decision(decision: Decision, peer: Peer, request: Request, as_json: bool) -> None:
    if as_json:
        out = decision.as_dict()
        out["request"] = request.as_dict()
        out["peer"] = {
            "uid": peer.uid,
            "user": peer.user,
            "gids": sorted(peer.gids),
            "groups": sorted(peer.groups),
            "cgroup": peer.cgroup,
            "label": peer.label,
        }
        rule = decision.rule
        if rule is not None and rule.action == "allow":  # the UMEM cap in force, a default one included
            out["max_umem"], out["max_umem_default"] = rule.umem_limit, rule.max_umem is None
        print(json.dumps(out))
        return
    if decision.allowed and decision.rule is not None:
        print(f"ALLOW by rule {decision.rule.name!r} ({decision.rule.source})")
    else:
        print(f"DENY ({decision.code}): {decision.reason}")
    # Group membership is the usual surprise, so show what the decision was based on.
    print(f"  peer: {_describe_peer(peer)}")
    if decision.rule is not None and decision.rule.action == "allow":
        default = " (the default: the rule sets no max_umem)" if decision.rule.max_umem is None else ""
        print(f"  max_umem: {format_size(decision.rule.umem_limit)} per grant{default}")


def _queues_problem(queues: list[int], most: int) -> str | None:
    """Why the broker's decoder refuses these queue ids together, or None."""
    if len(queues) > most:
        return f"at most {most} queues per grant, not {len(queues)}"
    if len(set(queues)) != len(queues):
        return "queue ids must be distinct"
    return None  # a queue id past the largest is refused by --queue's type already


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    try:
        peer = resolve_peer(args.user, args.groups, policy.group_names)
    except LookupError as e:
        print(f"xskbroker policy explain: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if args.cgroup is not None and not args.cgroup.startswith("/"):
        print(f"xskbroker policy explain: --cgroup {args.cgroup!r} must be an absolute cgroup v2 path, e.g. "
              "/system.slice/vm-a.service", file=sys.stderr)
        return EXIT_USAGE
    peer = records.replace(peer, cgroup=args.cgroup, label=args.label)
    # the broker refuses a name the kernel never gives ("veth0:1" matches "veth*") before any rule sees it
    from xskbroker.wire.protocol import MAX_QUEUES, ifname_problem

    problem = ifname_problem(args.interface)
    if problem:
        print(f"xskbroker policy explain: {args.interface!r} is not a valid interface name: {problem}; the broker "
              "refuses it (bad-request) before any rule is consulted", file=sys.stderr)
        return EXIT_USAGE
    # and queues it could never be asked for, as its decoder does: a rule with no max_queues or queues would
    # otherwise ALLOW what the broker refuses
    problem = _queues_problem(args.queues, MAX_QUEUES)
    if problem:
        print(f"xskbroker policy explain: {problem}; the broker refuses it (bad-request) before any rule is "
              "consulted", file=sys.stderr)
        return EXIT_USAGE
    # max_umem counts what the broker pins, which only a bound grant does (a bare or map holder pins its own)
    umem = args.umem if args.kind == "bound" else 0
    request = Request(interface=args.interface, queues=tuple(args.queues), kind=args.kind, umem_bytes=umem)
    decision = decide(policy, peer, request)
    _print_decision(decision, peer, request, args.json)
    return EXIT_ALLOW if decision.allowed else EXIT_DENY
