"""Audit records as journal fields (in journald's native protocol, read back from a socket of the test's own) or
JSON lines, and choosing between them."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker import audit, journal
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


def _journald(path: Path) -> socket.socket:
    """A datagram socket where journald's would be: what the broker sends is read back as it arrives."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def _entry(data: bytes) -> dict[str, bytes]:
    """Parse one native-protocol entry, as journald does."""
    fields: dict[str, bytes] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, data
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:
            name, size = line, int.from_bytes(rest[:8], "little")
            value, data = rest[8:8 + size], rest[8 + size:]
            assert data[:1] == b"\n", data[:16]
            data = data[1:]
        fields[name.decode()] = value
    return fields


def test_choosing_the_sink(tmp_path: Path) -> None:
    with _journald(tmp_path / "socket") as journald:
        assert isinstance(make_audit("json"), JsonAudit)
        assert isinstance(make_audit("journal", journal_socket=str(tmp_path / "absent")), JournalAudit)
        assert isinstance(make_audit("auto", journal_socket=str(tmp_path / "socket")), JournalAudit)
        assert isinstance(make_audit("auto", journal_socket=str(tmp_path / "absent")), JsonAudit)  # no journald
        make_audit("auto", journal_socket=str(tmp_path / "socket"))(GRANT)
        got = _entry(journald.recv(1 << 16))
    assert got["LEASE"] == b"0123abcd" and got["MESSAGE"].startswith(b"grant allowed for uid 1000")
    assert json.loads(got["XSKBROKER_RECORD"])["request"]["queues"] == [0, 1]
    with pytest.raises(audit.AuditSetupError):
        make_audit("syslog")


def test_native_protocol_encoding() -> None:
    assert journal.encode({"MESSAGE": "hi", "A": "1"}) == b"MESSAGE=hi\nA=1\n"
    # a value with a newline goes with its length, so it cannot forge another field
    assert journal.encode({"TRACE": "x\nPRIORITY=0"}) == b"TRACE\n" + (12).to_bytes(8, "little") + b"x\nPRIORITY=0\n"
    assert _entry(journal.encode({"A": "x\nPRIORITY=0", "B": "2"})) == {"A": b"x\nPRIORITY=0", "B": b"2"}
    # a name the kernel gave as bytes that are not UTF-8 (os.fsdecode's surrogates) keeps its own bytes
    assert journal.encode({"EXE": "/tmp/\udcff"}) == b"EXE=/tmp/\xff\n"


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(tmp_path: Path) -> None:
    big = "x" * (journal.SNDBUF + 1)  # more than any datagram the socket may send
    with _journald(tmp_path / "socket") as journald:
        sink = journal.Journal(str(tmp_path / "socket"))
        sink.send("big", TRACE=big)
        data, fds, _, _ = socket.recv_fds(journald, 1 << 16, 1)
        sink.close()
    assert data == b"" and len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        got = _entry(os.pread(fds[0], os.fstat(fds[0]).st_size, 0))  # as journald reads it: from the start
    finally:
        os.close(fds[0])
    assert got == {"MESSAGE": b"big", "TRACE": big.encode()}


def test_a_journald_that_has_fallen_behind_never_blocks_the_broker(tmp_path: Path) -> None:
    """Its queue full, a send fails at once and the record becomes a JSON line: the loop never waits."""
    out = io.StringIO()
    with _journald(tmp_path / "socket"):  # never read
        sink = make_audit("journal", stream=out, journal_socket=str(tmp_path / "socket"))

        def flood() -> None:
            for _ in range(2000):
                sink(GRANT)
        sender = threading.Thread(target=flood, daemon=True)  # a blocking send would hang it, not the test
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "a send blocked on a journald that does not read"
    fell_back = [json.loads(line) for line in out.getvalue().splitlines()]
    assert fell_back and all(r["lease"] == "0123abcd" and "journal_error" in r for r in fell_back)


def _read_all(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_stream_nobody_reads_never_blocks_and_says_what_it_lost(kind: str) -> None:
    """A pipe (or a stream socket, as journald's stdout stream) whose reader stopped: each record returns at once;
    what the backlog cannot hold is counted, and said in one record when the reader is back; every line is whole
    and in order; the inherited fd stays blocking (its open file description is shared with others)."""
    if kind == "pipe":
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        r, w = b.detach(), a.detach()
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    stream = open(w, "w", closefd=True)  # noqa: SIM115 - closed below
    try:
        sink = audit.JsonAudit(stream, backlog=20000)
        sent = threading.Event()

        def flood() -> None:
            for i in range(500):
                sink({**GRANT, "lease": f"{i:016x}"})
            sent.set()
        threading.Thread(target=flood, daemon=True).start()
        assert sent.wait(10), "a record waited for a reader that does not read"
        assert sink.lines is not None and sink.lines.lost > 0 and sink.next_flush() is not None
        assert fcntl.fcntl(w, fcntl.F_GETFL) == flags
        got = b""
        for _ in range(1000):  # the reader is back: the loop's timer writes what waits
            got += _read_all(r)
            time.sleep(0.002)
            sink.lines._next = 0.0
            sink.flush_if_due()
            if sink.next_flush() is None:
                break
        got += _read_all(r)
        sink({**GRANT, "lease": "after"})
        got += _read_all(r)
    finally:
        stream.close()
        os.close(r)
    records = [json.loads(x) for x in got.decode().splitlines()]  # every line whole
    leases = [x["lease"] for x in records if x["event"] == "grant"]
    lost = [x for x in records if x["event"] == "audit-lost"]
    assert leases == [*sorted(leases[:-1]), "after"] and leases[0] == f"{0:016x}", leases
    assert len(lost) == 1 and lost[0]["records"] + len(leases) == 501, lost
    assert records.index(lost[0]) == len(records) - 2  # after what waited, before the next record


def test_a_regular_file_is_written_as_before(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as f:
        sink = audit.JsonAudit(f)
        sink(GRANT)
        assert sink.lines is None and sink.next_flush() is None
    assert json.loads((tmp_path / "log").read_text())["lease"] == "0123abcd"


def test_the_journal_sinks_fallback_is_drained_by_the_loops_timer(tmp_path: Path) -> None:
    """journald behind (its queue full) and stderr's reader behind too: the records wait for the timer, not the loop."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    with open(w, "w") as stream, _journald(tmp_path / "socket") as journald:  # never read until the end
        sink = make_audit("journal", stream=stream, journal_socket=str(tmp_path / "socket"))
        for _ in range(100):
            sink(GRANT)
        assert isinstance(sink, JournalAudit) and sink.next_flush() is not None
        got = b""
        for _ in range(100):
            got += _read_all(r)
            if audit.drain(sink, 0.01):
                break
        got += _read_all(r)
        journald.setblocking(False)
        entries = 0
        with contextlib.suppress(BlockingIOError):
            while journald.recv(1 << 16):
                entries += 1
    os.close(r)
    fell_back = [json.loads(x) for x in got.decode().splitlines()]
    assert all("journal_error" in x for x in fell_back) and len(fell_back) + entries == 100, (len(fell_back), entries)


def test_a_peer_chosen_name_is_one_printable_line_in_message_and_exact_in_its_field() -> None:
    exe = "/tmp/x\ngrant allowed for uid 0\x1b[2J\udcff\\x0a\u202e/qemu"
    f = journal_fields({**GRANT, "peer": {**GRANT["peer"], "exe": exe}})
    assert f["PEER_EXE"] == exe and json.loads(f["XSKBROKER_RECORD"])["peer"]["exe"] == exe
    assert f["MESSAGE"].isprintable(), f["MESSAGE"]
    assert "/tmp/x\\x0agrant allowed for uid 0\\x1b[2J\\xff\\\\x0a\\u202e/qemu: bound eth1" in f["MESSAGE"]
    assert b"MESSAGE=grant allowed" in journal.encode(f)  # the plain form: it has no newline
