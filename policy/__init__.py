"""xskbroker access policy: the model, the TOML loader, and the pure decision function.

    policy = load_policy("/etc/xskbroker/policy.toml")
    decision = decide(policy, Peer(uid=1000, gids=frozenset({1000})), Request("veth0", (0,)))

The CLI helpers live in policy.cli (they resolve names with pwd/grp, so they are not imported here).
"""

from .decide import (
    CODES,
    DENIED_BY_RULE,
    INTERFACE_NOT_ALLOWED,
    KIND_NOT_ALLOWED,
    OK,
    QUEUE_NOT_ALLOWED,
    TOO_MANY_QUEUES,
    UMEM_TOO_LARGE,
    USER_NOT_ALLOWED,
    Decision,
    Peer,
    Request,
    decide,
    interface_matches,
    principal_matches,
)
from .loader import DEFAULT_POLICY_PATH, PolicyError, load_policy, parse_policy
from .model import ANY_QUEUE, KINDS, Admin, Kind, Policy, QueueSet, Quota, Rule
from .quota import Holding, Holdings, RateLimiter
from .sizes import format_size, parse_size

__all__ = [
    "ANY_QUEUE",
    "CODES",
    "DEFAULT_POLICY_PATH",
    "DENIED_BY_RULE",
    "INTERFACE_NOT_ALLOWED",
    "KINDS",
    "KIND_NOT_ALLOWED",
    "OK",
    "QUEUE_NOT_ALLOWED",
    "TOO_MANY_QUEUES",
    "UMEM_TOO_LARGE",
    "USER_NOT_ALLOWED",
    "Admin",
    "Decision",
    "Holding",
    "Holdings",
    "Kind",
    "Peer",
    "Policy",
    "PolicyError",
    "QueueSet",
    "Quota",
    "RateLimiter",
    "Request",
    "Rule",
    "decide",
    "format_size",
    "interface_matches",
    "load_policy",
    "parse_policy",
    "parse_size",
    "principal_matches",
]
