"""The last good policy: a validated copy in the broker's state directory, run when the file on disk is broken.

A bad edit followed by a stop (an idle exit, a crash, a reboot of the service) must not take the socket down:
the next start would exit on the broken file, Restart= would run into the start limit, and the socket unit
would fail with it. So each time a policy loads cleanly its texts are written to the state directory (0700,
ours: safefiles), and a start that finds the file broken or unsafe runs that copy instead, and says so
(PolicyKeeper.describe: the STATUS= line, a `policy-fallback` audit record, the `status` reply). With no copy
there is nothing safe to run: the start fails as before.

The copy holds each source file's text (the main file, then policy.d/*.toml), so what runs is re-parsed and
validated by the same loader as the files were; it is trusted because only this uid can write it. Beside each
text it keeps the TOML document parsed from it: a start whose files still read exactly so validates those
(the same checks) instead of importing tomllib and parsing again, ~6 ms of a socket-activated first grant.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from xskbroker.common import safefiles
from xskbroker.common.records import record
from xskbroker.policy import Policy, PolicyError
from xskbroker.policy.loader import Document, load_documents, parse_documents

FILENAME = "policy.lastgood.json"
FORMAT = 2
FORMATS = (1, 2)  # 1: the texts alone (a copy written before the parsed documents were kept)


class CopyError(Exception):
    """The copy exists but cannot be used (not ours, not JSON, not a valid policy)."""


@record(frozen=True)
class Copy:
    policy: Policy
    saved_at: float  # wall clock, seconds since the epoch
    path: str


def _json_only(value: object) -> bool:
    """Whether JSON gives back this very value: TOML's dates and times it cannot."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_only(v) for v in value)
    return isinstance(value, (str, int, float, bool))


def encode(documents: list[Document], saved_at: float) -> bytes:
    out = []
    for path, text, doc in documents:
        entry: dict[str, Any] = {"path": path, "text": text}
        if _json_only(doc):
            entry["toml"] = doc
        out.append(entry)
    return json.dumps({"format": FORMAT, "saved_at": saved_at, "documents": out}, indent=1).encode()


def _read(data: bytes) -> tuple[list[tuple[str, str]], dict[tuple[str, str], dict[str, Any]], float]:
    """The copy's (path, text) documents, the parsed TOML kept for each, and when it was saved. ValueError,
    KeyError or TypeError when it is not a copy."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("format") not in FORMATS:
        raise ValueError(f"not format {FORMAT}")
    documents = [(d["path"], d["text"]) for d in obj["documents"]]
    if not documents or not all(isinstance(p, str) and isinstance(t, str) for p, t in documents):
        raise ValueError("no documents")
    # only what TOML could have given (no null): the loader's checks then judge it as they judge any file
    docs = {(d["path"], d["text"]): d["toml"] for d in obj["documents"]
            if isinstance(d.get("toml"), dict) and _json_only(d["toml"])}
    return documents, docs, float(obj["saved_at"])


def decode(data: bytes, path: str) -> Copy:
    """The policy a copy holds, validated (CopyError says what is wrong with it)."""
    try:
        documents, docs, saved_at = _read(data)
    except (ValueError, KeyError, TypeError) as e:
        raise CopyError(f"{path}: unreadable ({e})") from None
    try:
        return Copy(parse_documents(documents, docs), saved_at, path)
    except PolicyError as e:
        raise CopyError(f"{path}: not a valid policy: {'; '.join(e.errors)}") from None


def known_documents(state_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The parsed TOML the copy keeps, by (path, text); empty without a usable copy."""
    data = safefiles.read_private(os.path.join(state_dir, FILENAME))
    if data is None:
        return {}
    try:
        return _read(data)[1]
    except (ValueError, KeyError, TypeError):
        return {}


def save(state_dir: str, documents: list[Document], now: float | None = None) -> str:
    """Write the documents a policy was loaded from (load_documents: the texts that run, never a later edit)
    as the last good copy, atomically: a new file, then renamed over the old one. Returns the copy's path.
    OSError when the state directory cannot be written."""
    path = os.path.join(state_dir, FILENAME)
    saved_at = time.time() if now is None else now
    old = safefiles.read_private(path)
    if old is not None:
        try:
            texts, docs, old_saved_at = _read(old)
        except (ValueError, KeyError, TypeError):
            pass
        else:
            if texts == [(p, t) for p, t, _ in documents]:
                if docs == {(p, t): d for p, t, d in documents if _json_only(d)}:
                    return path  # unchanged: keep its date (when this policy was first seen good)
                saved_at = old_saved_at  # the same texts, with their documents (new, or mended)
    tmp = path + ".tmp"
    fd = safefiles.create_new(tmp)  # O_EXCL|O_NOFOLLOW: a planted link is unlinked, never followed
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(documents, saved_at))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load(state_dir: str, owner: int | None = None) -> Copy | None:
    """The last good copy, None if there is none (a link, or a file of a uid other than this euid or `owner`,
    counts as none)."""
    path = os.path.join(state_dir, FILENAME)
    data = safefiles.read_private(path, owner)
    return None if data is None else decode(data, path)


class PolicyKeeper:
    """Loads the policy for the daemon (start) and the server (reload), keeps the copy current, and
    remembers what state the policy is in for STATUS= and the `status` reply."""

    def __init__(self, path: str, state_dir: str, audit: Callable[[dict[str, Any]], None] = lambda r: None
                 ) -> None:
        self.path = path
        self.state_dir = state_dir
        self.audit = audit
        self.fallback = False
        self.errors: list[str] = []  # what is wrong with the file on disk (when running the copy)
        self.reload_errors: list[str] = []  # the last reload that failed (the running policy was kept)
        self.copy_saved_at: float | None = None
        self.save_error: str | None = None

    def start(self) -> Policy:
        """The policy to start with: the file's, or the last good copy when the file is broken. PolicyError
        (the file's errors, plus why no copy could stand in) when there is nothing safe to run."""
        try:
            policy, documents = self._load()
        except PolicyError as e:
            try:
                copy = load(self.state_dir)
            except CopyError as bad:
                raise PolicyError([*e.errors, f"and the last good copy cannot stand in: {bad}"]) from None
            if copy is None:
                where = os.path.join(self.state_dir, FILENAME)
                raise PolicyError([*e.errors, f"and there is no last good copy ({where}): nothing safe to run"]
                                  ) from None
            self.fallback, self.errors, self.copy_saved_at = True, list(e.errors), copy.saved_at
            return copy.policy
        self._keep(documents)
        return policy

    def _load(self) -> tuple[Policy, list[Document]]:
        """The file's policy, from the documents the copy keeps where the texts still match; if those do not
        validate (a copy damaged on disk), parsed afresh: the file alone decides."""
        known = known_documents(self.state_dir)
        if known:
            with contextlib.suppress(PolicyError):
                return load_documents(self.path, known)
        return load_documents(self.path)

    def reload(self, path: str) -> Policy:
        """The server's loader for SIGHUP: a broken file raises (the running policy stays), a good one
        ends any fallback and becomes the new copy."""
        try:
            policy, documents = load_documents(path)
        except PolicyError as e:
            self.reload_errors = list(e.errors)
            raise
        self.fallback, self.errors, self.reload_errors = False, [], []
        self._keep(documents)
        return policy

    def _keep(self, documents: list[Document]) -> None:
        try:
            saved = save(self.state_dir, documents)
        except OSError as e:  # the broker still runs this policy; only the next broken start loses its net
            self.save_error = f"{os.path.join(self.state_dir, FILENAME)}: {e.strerror or e}"
            self.audit({"event": "policy-lastgood-unsaved", "error": self.save_error})
            return
        self.save_error = None
        self.copy_saved_at = os.stat(saved).st_mtime

    def describe(self, admin: bool = True) -> dict[str, Any]:
        """The `policy` field of the status reply. Errors quote the file, so only admins get them."""
        out: dict[str, Any] = {"source": self.path, "fallback": self.fallback}
        if self.fallback:
            out["copy"] = os.path.join(self.state_dir, FILENAME)
            out["copy_saved_at"] = self.copy_saved_at
        if self.errors:
            out["errors"] = self.errors if admin else len(self.errors)
        if self.reload_errors:
            out["reload_errors"] = self.reload_errors if admin else len(self.reload_errors)
        if self.save_error:
            out["copy_error"] = self.save_error if admin else True
        return out

    def status_note(self) -> str | None:
        """The loud part of STATUS= while the file on disk is not what runs."""
        if self.fallback:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.copy_saved_at or 0))
            first = f" ({self.errors[0]})" if self.errors else ""
            return (f"POLICY FALLBACK: {self.path} has {len(self.errors)} error(s){first}; "
                    f"serving the last good copy of {when}")
        if self.reload_errors:
            return f"policy reload failed ({len(self.reload_errors)} error(s)), previous policy kept"
        return None
