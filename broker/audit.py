"""Audit records: every decision and lifecycle event as one structured record.

Two sinks with the same content: JSON lines on stderr (any host), or native journal entries (broker.journal
speaks journald's protocol itself) where every field is queryable with journalctl:
MESSAGE for people, XSKBROKER_EVENT, PEER_UID, PEER_PID, PEER_EXE, PEER_CGROUP, DECISION, RULE, LEASE,
CODE, ... for matching, and XSKBROKER_RECORD with the whole record as the JSON line would carry it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from xskbroker.broker import auditstream
from xskbroker.broker.journal import JOURNAL_SOCKET, Journal

AuditFn = Callable[[dict[str, Any]], None]
MODES = ("auto", "journal", "json")

# syslog priorities: what an operator filters on with journalctl -p
INFO, NOTICE, WARNING, ERR = 6, 5, 4, 3
_PRIORITY = {
    "internal-error": ERR, "policy-reload-failed": WARNING, "accept-failed": WARNING, "reply-failed": WARNING,
    "linkwatch-unavailable": WARNING, "linkwatch-overrun": WARNING, "lease-orphaned": WARNING, "release-kept": WARNING,
    "journal-compact-failed": WARNING, "closing-helper-hung": WARNING,
    "bad-request": NOTICE, "rate-limited": NOTICE, "connection-refused": NOTICE, "revoke": NOTICE,
}
_FIELD_OK = re.compile(r"[^A-Z0-9_]")
# Top-level keys whose plain journal name would mislead: a record's "pid" is the peer's (the lease
# holder's), except in the broker's own lifecycle records; MESSAGE and PRIORITY are the journal's.
_RENAME = {"pid": "PEER_PID", "message": "ERROR_MESSAGE", "priority": "XSKBROKER_PRIORITY"}
_OWN_EVENTS = ("ready", "stopped", "stopping", "idle-exit")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # one for every record, not one per call


def _json_line(record: dict[str, Any]) -> str:
    return _ENCODER.encode(record)


class JsonAudit:
    """One JSON object per line: each decision, plus lifecycle events. On a stream that may stop taking them (a
    pipe, a socket, a terminal) never waits for it (broker.auditstream)."""

    def __init__(self, stream: TextIO = sys.stderr, backlog: int = auditstream.BACKLOG) -> None:
        self.stream = stream
        out = auditstream.nonblocking_writer(stream)
        self.lines = None if out is None else auditstream.Lines(out, _lost_line, backlog)

    def __call__(self, record: dict[str, Any]) -> None:
        line = _json_line({"ts": round(time.time(), 6), **record}) + "\n"
        if self.lines is None:
            self.stream.write(line)
            self.stream.flush()
        else:
            self.lines.write(line.encode("utf-8", "surrogateescape"))  # ASCII: the encoder escapes the rest

    def next_flush(self) -> float | None:
        return self.lines.next_flush() if self.lines is not None else None

    def flush_if_due(self) -> None:
        if self.lines is not None:
            self.lines.flush_if_due()

    def drain(self, seconds: float) -> bool:
        return self.lines.drain(seconds) if self.lines is not None else True


def _lost_line(n: int) -> bytes:
    return (_json_line({"ts": round(time.time(), 6), "event": "audit-lost", "records": n,
                        "reason": "the audit stream's reader fell behind and its backlog was full"}) + "\n").encode()


def field_name(*parts: str) -> str:
    """A valid journal field name: upper case, [A-Z0-9_], not starting with '_' or a digit, <= 64."""
    name = _FIELD_OK.sub("_", "_".join(parts).upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "X_" + name
    return name[:64]


def _value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(_value(v) for v in value)
    if isinstance(value, dict):
        return _json_line(value)
    if value is True or value is False:
        return "1" if value else "0"
    return str(value)


def journal_fields(record: dict[str, Any]) -> dict[str, str]:
    """The record as journal fields (pure): MESSAGE, PRIORITY and one upper-case field per value.

    Nested objects are flattened one level ({"peer": {"uid": 1}} -> PEER_UID=1); lists become
    comma-separated; null values are left out, so a missing field means "unknown", never "None".
    """
    fields: dict[str, str] = {
        "MESSAGE": one_line(message(record)),
        "PRIORITY": str(priority(record)),
        "SYSLOG_IDENTIFIER": "xskbroker",
        "XSKBROKER_EVENT": str(record.get("event", "")),
        "XSKBROKER_RECORD": _json_line(record),
    }
    for key, value in record.items():
        if key == "event" or value is None:
            continue
        if isinstance(value, dict) and key in ("peer", "request", "by"):
            for sub, v in value.items():
                if v is not None:
                    fields[field_name(key, sub)] = _value(v)
            continue
        if key == "pid" and record.get("event") in _OWN_EVENTS:
            fields["BROKER_PID"] = _value(value)
            continue
        fields[_RENAME.get(key) or field_name(key)] = _value(value)
    return fields


def priority(record: dict[str, Any]) -> int:
    event = record.get("event")
    if event in ("grant", "revoke") and record.get("decision") == "deny":
        return NOTICE
    return _PRIORITY.get(str(event), INFO)


def message(record: dict[str, Any]) -> str:
    """One line for people (journalctl's default output); the fields carry the detail."""
    event = str(record.get("event", "record"))
    peer = record.get("peer") if isinstance(record.get("peer"), dict) else None
    who = ""
    if peer:
        exe = f" {peer['exe']}" if peer.get("exe") else ""
        who = f" for uid {peer.get('uid')} pid {peer.get('pid')}{exe}"
    if event == "grant":
        req = record.get("request") or {}
        what = f"{req.get('kind', '?')} {req.get('interface', '?')} queues {_value(req.get('queues', []))}"
        if record.get("decision") == "allow":
            return f"grant allowed{who}: {what} by rule {record.get('rule')}, lease {record.get('lease')}"
        return (f"grant denied{who}: {what}: {record.get('code')}: {record.get('reason')}"
                + (f" (rule {record['rule']})" if record.get("rule") else ""))
    details = [f"{k}={_value(v)}" for k, v in record.items()
               if k not in ("event", "peer", "trace") and v is not None and not isinstance(v, dict)]
    return f"{event}{who}" + (f": {' '.join(details)}" if details else "")


def one_line(text: str) -> str:
    """text with every character a terminal or journalctl would not show as itself escaped (backslash too, so
    the escapes are unambiguous): a peer names its own executable and cgroup, and a newline in MESSAGE is a
    second line under `journalctl -o cat` or a syslog forwarder, a control character or an undecodable byte
    makes journalctl print "[blob data]" in its place. The fields keep the exact bytes."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    n = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): shown as that byte
        return f"\\x{n - 0xDC00:02x}"
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


class JournalAudit:
    """Native journal entries. A record the journal refuses goes to the fallback as a JSON line, so a
    decision is never lost because journald is down."""

    def __init__(self, send: Callable[..., None], fallback: AuditFn | None = None) -> None:
        self.send = send
        self.fallback = fallback or JsonAudit(sys.stderr)

    def __call__(self, record: dict[str, Any]) -> None:
        fields = journal_fields(record)
        text = fields.pop("MESSAGE")
        try:
            self.send(text, **fields)
        except (OSError, ValueError, TypeError) as e:
            self.fallback({**record, "journal_error": str(e)})

    def next_flush(self) -> float | None:
        fallback_next = getattr(self.fallback, "next_flush", None)
        return fallback_next() if fallback_next is not None else None

    def flush_if_due(self) -> None:
        flush_due(self.fallback)

    def drain(self, seconds: float) -> bool:
        return drain(self.fallback, seconds)


class AuditSetupError(Exception):
    pass


def make_audit(mode: str = "auto", stream: TextIO = sys.stderr, journal_socket: str = JOURNAL_SOCKET) -> AuditFn:
    """auto: the journal when journald is listening, else JSON lines; journal: the journal (a record it
    refuses becomes a JSON line); json: JSON lines on the stream."""
    if mode not in MODES:
        raise AuditSetupError(f"audit mode must be one of {', '.join(MODES)}")
    if mode == "journal" or (mode == "auto" and os.path.exists(journal_socket)):
        return JournalAudit(Journal(journal_socket).send, JsonAudit(stream))
    return JsonAudit(stream)


# Events a client can cause at will, many times a second. Past a small burst per (event, uid, code) in each
# window they are counted instead of written, and one "suppressed" record per window says how many were left
# out: journald's own rate limit (10,000 per 30 s by default) then never drops an allowed grant or a revoke.
# Denied decisions are as cheap to cause (a grant no rule allows: ~8,000 records a second from one client
# with no rate quota), so any record with decision "deny" is summarised the same way; an allow never is.
# The device-plugin endpoint's own refusals are as cheap (a tenant's garbage on one connection: ~5,000 a second),
# and so are its allowed records that only repeat a grant (`reused`: a live lease's map handed out again, ~6,000 a
# second from one connection); the grant, and the first map handed out with it, are written in full.
NOISY = frozenset({"bad-request", "rate-limited", "connection-refused", "accept-failed", "reply-failed",
                   "connection-evicted", "dp-refused", "dp-connection-evicted", "dp-accept-failed"})
BURST = 5
WINDOW = 10.0


class Throttle:
    """An audit sink in front of another: noisy events summarised per window, everything else passed on."""

    def __init__(self, sink: AuditFn, clock: Callable[[], float] = time.monotonic, burst: int = BURST,
                 window: float = WINDOW) -> None:
        self.sink, self.clock, self.burst, self.window = sink, clock, burst, window
        self.started = clock()
        self.seen: dict[tuple[str, Any, Any], int] = {}

    def __call__(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event in NOISY or record.get("decision") == "deny" or record.get("reused") is True:
            self.flush_if_due()
            peer = record.get("peer")
            # a subordinate uid's records share its owner's burst (broker.subids): one user, one burst
            uid = peer.get("owner", peer.get("uid")) if isinstance(peer, dict) else record.get("uid")
            key = (str(event), uid, record.get("code") or record.get("errno"))
            n = self.seen.get(key, 0) + 1
            self.seen[key] = n
            if n > self.burst:
                return
        self.sink(record)

    def next_flush(self) -> float | None:
        """When the current window's summary, or the sink's own delayed output (its next_flush), is due
        (None while nothing waits)."""
        ours = self.started + self.window if any(n > self.burst for n in self.seen.values()) else None
        sink_next = getattr(self.sink, "next_flush", None)
        theirs = sink_next() if sink_next is not None else None
        return min((t for t in (ours, theirs) if t is not None), default=None)

    def flush_if_due(self) -> None:
        if self.clock() - self.started >= self.window:
            self.flush()
        sink_flush = getattr(self.sink, "flush_if_due", None)
        if sink_flush is not None:
            sink_flush()

    def flush(self) -> None:
        """Write the summary of what the window left out, and start a new window."""
        left_out = [(k, n - self.burst) for k, n in self.seen.items() if n > self.burst]
        if left_out:
            counts: dict[str, int] = {}
            for (event, _, _), n in left_out:
                counts[event] = counts.get(event, 0) + n
            self.sink({"event": "suppressed", "window_s": round(self.clock() - self.started, 3), "counts": counts,
                       "detail": [{"event": e, "uid": u, "code": c, "left_out": n} for (e, u, c), n in left_out]})
        self.seen.clear()
        self.started = self.clock()


def drain(audit: AuditFn, seconds: float) -> bool:
    """At exit: give a sink up to `seconds` to write what it holds back; whether it all went."""
    finish = getattr(audit, "drain", None)
    return finish(seconds) if finish is not None else True


def flush_due(audit: AuditFn) -> None:
    """Write what a sink holds back once it is due: the throttle's summary of suppressed records when its window
    is over, the lines a slow stream's reader has not taken yet (any other sink: nothing)."""
    flush = getattr(audit, "flush_if_due", None)
    if flush is not None:
        flush()


def seconds_to_summary(audit: AuditFn) -> float | None:
    """Seconds until the audit throttle's next summary is due, if it has one to write."""
    next_flush = getattr(audit, "next_flush", None)
    due = next_flush() if next_flush is not None else None
    return None if due is None else max(0.0, due - time.monotonic())
