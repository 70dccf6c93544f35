"""One list of error codes: the ErrorCode enum, the tables in docs/protocol.md and the codes the sources send
must all agree. The policy package cannot import the enum (layering), so its constants are checked here."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import CLIENT_ONLY, NOT_A_REPLY, BrokerError, ErrorCode

ROOT = Path(__file__).resolve().parents[2]
# by module path: the policy package exports a function named decide, which hides the module
decide = importlib.import_module("xskbroker.policy.decide")
quota = importlib.import_module("xskbroker.policy.quota")
CODE = r"[a-z]+(?:-[a-z]+)*"


def _documented() -> list[str]:
    """The codes in the first column of every table under the protocol document's "## Errors" heading."""
    text = (ROOT / "docs/protocol.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^\| `({CODE})` \|", section, re.MULTILINE)


def test_the_enum_is_the_documented_table() -> None:
    documented = _documented()
    assert len(documented) == len(set(documented)), "a code is documented twice"
    assert set(documented) == {c.value for c in ErrorCode}


def test_members_equal_their_strings_on_the_wire() -> None:
    code = ErrorCode.QUEUE_BUSY
    assert code == "queue-busy" and str(code) == "queue-busy" and f"{code}" == "queue-busy"
    assert json.dumps({"code": code}) == '{"code": "queue-busy"}'
    assert proto.error_reply(code, "m") == proto.error_reply("queue-busy", "m")
    assert str(BrokerError(code, "m")) == "queue-busy: m"


def test_every_policy_and_quota_code_is_a_member() -> None:
    # decide.OK ("ok") is the allow decision, written in audit records: not an error code
    policy_codes = {c for c in decide.CODES if c != decide.OK}
    quota_codes = {quota.QUOTA_QUEUES, quota.QUOTA_UMEM, quota.QUOTA_CONNECTIONS, quota.RATE_LIMITED,
                   quota.TOO_MANY_CONNECTIONS}
    assert len(policy_codes) == len(decide.CODES) - 1
    missing = {c for c in policy_codes | quota_codes if c not in set(ErrorCode)}
    assert not missing


# A code literal handed to whatever makes an error: the broker's Refused and ErrorReply (or error_reply), the
# client's BrokerError, and the protocol decoder's ProtocolError (possibly with the literal on the next line).
MAKERS = re.compile(rf"\b(?:Refused|ErrorReply|error_reply|BrokerError|ProtocolError)\(\s*\"({CODE})\"")
SOURCES = [p for d in ("broker", "client", "wire") for p in sorted((ROOT / d).rglob("*.py"))]


def _literals() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        for code in MAKERS.findall(path.read_text()):
            found.setdefault(code, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_the_grep_finds_what_it_looks_for() -> None:
    # guards the pattern itself: these literals are known to be in the sources today
    found = _literals()
    assert {"agent-failed", "bad-reply"} <= set(found)
    assert MAKERS.findall('raise Refused(\n    "queue-busy", "m")\nErrorReply("not-admin", "m")') == [
        "queue-busy", "not-admin"]


def test_the_broker_names_its_codes_by_member() -> None:
    # every code the broker sends is an ErrorCode member, never a string spelled again
    sent = {code: files for code, files in _literals().items() if any(f.startswith("broker/") for f in files)}
    assert not sent


def test_every_code_literal_in_the_broker_and_client_is_a_member() -> None:
    unknown = {code: files for code, files in _literals().items() if code not in set(ErrorCode)}
    assert not unknown, f"codes not in ErrorCode (add them, and to docs/protocol.md): {unknown}"


@pytest.mark.parametrize("code", sorted(CLIENT_ONLY))
def test_the_broker_never_sends_a_client_only_code(code: ErrorCode) -> None:
    # the sets are built from members, so membership needs no test; what they promise does: the broker's
    # sources never name a client-only code, by member or by string
    by_member = re.compile(rf"\bErrorCode\.{code.name}\b")
    by_string = re.compile(rf"\b(?:Refused|ErrorReply|error_reply)\(\s*\"{re.escape(code.value)}\"")
    named = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "broker").rglob("*.py"))
             if by_member.search(p.read_text()) or by_string.search(p.read_text())]
    assert not named, f"the broker sends the client-only code {code.value}: {named}"


def test_the_subsets_are_disjoint() -> None:
    # a code the broker sends unprompted is the broker's: it cannot be client-only as well
    assert not CLIENT_ONLY & NOT_A_REPLY


def test_the_decoder_raises_only_members() -> None:
    # the request decoder's codes are the first seven, in the order the broker reports them
    order = list(ErrorCode)[:7]
    assert order == ["too-large", "fds-not-allowed", "bad-json", "truncated", "bad-version", "unknown-op",
                     "bad-request"]
    source = (ROOT / "wire/protocol.py").read_text()
    used = set(re.findall(r"ProtocolError\(ErrorCode\.([A-Z_]+)", source))
    assert {ErrorCode[name] for name in used} == set(order)
