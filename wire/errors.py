"""Every error code of protocol v1, and the two exceptions that carry one.

`error.code` is the stable part of an error reply (docs/protocol.md, "Errors"): one enum lists them all, so
a code that is sent, documented or matched on is spelled once. ErrorCode is a StrEnum: a member equals
its string ("queue-busy"), JSON-encodes as that string, and formats as it, so passing members where
strings went changes no byte on the wire. The policy package keeps its own string constants (it imports
nothing of ours); tests check they are all members here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # the decoder: in the order the broker reports them when a request has several problems
    TOO_LARGE = "too-large"
    FDS_NOT_ALLOWED = "fds-not-allowed"
    BAD_JSON = "bad-json"
    TRUNCATED = "truncated"
    BAD_VERSION = "bad-version"
    UNKNOWN_OP = "unknown-op"
    BAD_REQUEST = "bad-request"
    # quotas and the connection table (policy/quota.py)
    RATE_LIMITED = "rate-limited"
    QUOTA_CONNECTIONS = "quota-connections"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    IDENTITY_UNREADABLE = "identity-unreadable"  # the peer's identity cannot be judged (a cgroup path not UTF-8)
    QUOTA_QUEUES = "quota-queues"
    QUOTA_UMEM = "quota-umem"
    # the policy's decision (policy/decide.py)
    DENIED_BY_RULE = "denied-by-rule"
    USER_NOT_ALLOWED = "user-not-allowed"
    INTERFACE_NOT_ALLOWED = "interface-not-allowed"
    KIND_NOT_ALLOWED = "kind-not-allowed"
    QUEUE_NOT_ALLOWED = "queue-not-allowed"
    TOO_MANY_QUEUES = "too-many-queues"
    UMEM_TOO_LARGE = "umem-too-large"
    # making a grant
    UNSUPPORTED_KIND = "unsupported-kind"
    NO_SUCH_INTERFACE = "no-such-interface"
    NOT_CANONICAL_NAME = "not-canonical-name"
    NO_SUCH_QUEUE = "no-such-queue"
    INTERFACE_EXCLUSIVE = "interface-exclusive"
    BAD_HOLDER = "bad-holder"
    INTERFACE_BUSY = "interface-busy"
    XDP_FOREIGN_PROGRAM = "xdp-foreign-program"
    XDP_ATTACH_FAILED = "xdp-attach-failed"
    QUEUE_BUSY = "queue-busy"
    QUEUE_SQUATTED = "queue-squatted"
    GRANTS_IN_PROGRESS = "grants-in-progress"
    KERNEL_ERROR = "kernel-error"
    # release, revoke, and any request
    UNKNOWN_LEASE = "unknown-lease"
    LEASE_IN_USE = "lease-in-use"
    NOT_ADMIN = "not-admin"
    SIGNAL_NOT_ALLOWED = "signal-not-allowed"
    INTERNAL_ERROR = "internal-error"
    # reported by the client side only: the broker never sends these
    BAD_REPLY = "bad-reply"
    UNKNOWN = "unknown"
    CONNECTION_ERROR = "connection-error"
    AGENT_FAILED = "agent-failed"
    BROKER_TIMEOUT = "broker-timeout"
    UNSUPPORTED_MACHINE = "unsupported-machine"


CLIENT_ONLY = frozenset({ErrorCode.BAD_REPLY, ErrorCode.UNKNOWN, ErrorCode.CONNECTION_ERROR,
                         ErrorCode.AGENT_FAILED, ErrorCode.BROKER_TIMEOUT, ErrorCode.UNSUPPORTED_MACHINE})
# sent unprompted on a new (or evicted) connection, which is then closed: never the answer to a request
NOT_A_REPLY = frozenset({ErrorCode.QUOTA_CONNECTIONS, ErrorCode.TOO_MANY_CONNECTIONS})


class ProtocolError(Exception):
    """A request that cannot be served as sent; code is one of the documented error codes."""

    def __init__(self, code: str, message: str, op: str | None = None, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.op = op
        self.req_id = req_id


class BrokerError(Exception):
    """An error reply, as the client sees it. code is a plain string: a newer broker may send codes this
    client does not know (compare it with ErrorCode members, which equal their strings)."""

    def __init__(self, code: str, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply or {}
