"""Audit records as journal fields (systemd-python's send, faked here) or JSON lines, and choosing between them."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import audit
from xskbroker.broker.audit import JournalAudit, JsonAudit, journal_fields, make_audit

GRANT = {
    "event": "grant",
    "peer": {"pid": 4242, "uid": 1000, "gid": 1000, "user": "alice", "exe": "/usr/bin/qemu-system-x86_64",
             "cgroup": "/user.slice/user-1000.slice/session-3.scope"},
    "request": {"interface": "eth1", "queues": [0, 1], "kind": "bound", "umem_bytes": 4194304},
    "rule": "vm-users", "decision": "allow", "code": "ok", "lease": "0123abcd", "ms": 4.2,
}
DENY = {"event": "grant", "peer": {"pid": 7, "uid": 1001, "gid": 1001, "user": None, "exe": None, "cgroup": None},
        "request": {"interface": "eth0", "queues": [0], "kind": "bound"}, "rule": "never-mgmt",
        "decision": "deny", "code": "denied-by-rule", "reason": "rule never-mgmt denies eth0"}


def test_a_grant_becomes_queryable_fields() -> None:
    f = journal_fields(GRANT)
    assert f["XSKBROKER_EVENT"] == "grant" and f["DECISION"] == "allow" and f["RULE"] == "vm-users"
    assert f["PEER_UID"] == "1000" and f["PEER_PID"] == "4242" and f["PEER_GID"] == "1000"
    assert f["PEER_EXE"] == "/usr/bin/qemu-system-x86_64"
    assert f["PEER_CGROUP"] == "/user.slice/user-1000.slice/session-3.scope"
    assert f["LEASE"] == "0123abcd" and f["CODE"] == "ok"
    assert f["REQUEST_INTERFACE"] == "eth1" and f["REQUEST_QUEUES"] == "0,1" and f["REQUEST_KIND"] == "bound"
    assert f["PRIORITY"] == "6" and f["SYSLOG_IDENTIFIER"] == "xskbroker"
    assert json.loads(f["XSKBROKER_RECORD"]) == GRANT  # the same record the JSON sink writes
    assert f["MESSAGE"] == ("grant allowed for uid 1000 pid 4242 /usr/bin/qemu-system-x86_64: bound eth1 queues 0,1 "
                            "by rule vm-users, lease 0123abcd")


def test_a_denial_is_a_notice_and_unknowns_are_absent() -> None:
    f = journal_fields(DENY)
    assert f["PRIORITY"] == "5" and f["DECISION"] == "deny" and f["CODE"] == "denied-by-rule"
    assert "PEER_EXE" not in f and "PEER_USER" not in f and "PEER_CGROUP" not in f
    assert f["MESSAGE"].startswith("grant denied for uid 1001 pid 7: bound eth0 queues 0: denied-by-rule")


def test_every_field_name_is_one_the_journal_accepts() -> None:
    record = {"event": "policy-reload-failed", "errors": ["a:1: x", "b:2: y"], "kept": "previous policy",
              "pid": 5, "message": "m", "9lives": True, "weird-Key.name": {"a": 1}}
    f = journal_fields(record)
    for name in f:
        assert name == audit.field_name(name) and not name.startswith("_"), name
    assert f["PRIORITY"] == "4" and f["ERRORS"] == "a:1: x,b:2: y" and f["X_9LIVES"] == "1"
    assert f["PEER_PID"] == "5" and f["ERROR_MESSAGE"] == "m"
    assert journal_fields({"event": "ready", "pid": 9})["BROKER_PID"] == "9"  # the broker's own pid


def test_journal_sink_sends_message_and_fields() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    sink = JournalAudit(lambda message, **fields: sent.append((message, fields)))
    sink(GRANT)
    (message, fields), = sent
    assert message.startswith("grant allowed") and "MESSAGE" not in fields and fields["PEER_UID"] == "1000"


def test_a_refused_journal_send_falls_back_to_a_json_line() -> None:
    def refuse(message: str, **fields: str) -> None:
        raise OSError(2, "No such file or directory")
    out = io.StringIO()
    JournalAudit(refuse, JsonAudit(out))(DENY)
    line = json.loads(out.getvalue())
    assert line["event"] == "grant" and line["code"] == "denied-by-rule" and "No such file" in line["journal_error"]


def test_json_lines() -> None:
    out = io.StringIO()
    JsonAudit(out)(GRANT)
    JsonAudit(out)(DENY)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["decision"] for x in lines] == ["allow", "deny"] and all("ts" in x for x in lines)


@pytest.fixture
def fake_systemd(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    journal = types.ModuleType("systemd.journal")
    journal.send = lambda message, **fields: sent.append((message, fields))  # type: ignore[attr-defined]
    package = types.ModuleType("systemd")
    package.journal = journal  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", journal)
    return sent


def test_choosing_the_sink(fake_systemd: list[Any], tmp_path: Path) -> None:
    journald = tmp_path / "socket"
    journald.touch()
    assert isinstance(make_audit("json"), JsonAudit)
    assert isinstance(make_audit("journal", journal_socket=str(tmp_path / "absent")), JournalAudit)
    assert isinstance(make_audit("auto", journal_socket=str(journald)), JournalAudit)
    assert isinstance(make_audit("auto", journal_socket=str(tmp_path / "absent")), JsonAudit)  # no journald
    make_audit("auto", journal_socket=str(journald))(GRANT)
    assert fake_systemd[0][1]["LEASE"] == "0123abcd"
    with pytest.raises(audit.AuditSetupError):
        make_audit("syslog")


def test_journal_mode_without_systemd_python_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "systemd", None)  # import fails
    assert isinstance(make_audit("auto"), JsonAudit)
    with pytest.raises(audit.AuditSetupError, match=r"xskbroker\[journal\]"):
        make_audit("journal")
