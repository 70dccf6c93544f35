"""The last good policy: a validated copy in the broker's state directory, run when the file on disk is broken.

A bad edit followed by a stop (an idle exit, a crash, a reboot of the service) must not take the socket down:
the next start would exit on the broken file, Restart= would run into the start limit, and the socket unit
would fail with it. So each time a policy loads cleanly its texts are written to the state directory (0700,
ours: safefiles), and a start that finds the file broken or unsafe runs that copy instead, and says so
(PolicyKeeper.describe: the STATUS= line, a `policy-fallback` audit record, the `status` reply). With no copy
there is nothing safe to run: the start fails as before.

The copy holds each source file's text (the main file, then policy.d/*.toml), so what runs is re-parsed and
validated by the same loader as the files were; it is trusted because only this uid can write it.
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
from xskbroker.policy import Policy, PolicyError, load_policy
from xskbroker.policy.loader import parse_documents

FILENAME = "policy.lastgood.json"
FORMAT = 1


class CopyError(Exception):
    """The copy exists but cannot be used (not ours, not JSON, not a valid policy)."""


@record(frozen=True)
class Copy:
    policy: Policy
    saved_at: float  # wall clock, seconds since the epoch
    path: str


def snapshot(policy: Policy) -> list[tuple[str, str]] | None:
    """(path, text) of each of policy's files, if they still parse to this very policy; None when they
    changed (or vanished) since it was loaded: the copy must hold what runs, not a later edit."""
    documents = []
    for source in policy.sources:
        try:
            with open(source, encoding="utf-8") as f:
                documents.append((source, f.read()))
        except (OSError, UnicodeDecodeError):
            return None
    try:
        again = parse_documents(documents)
    except PolicyError:
        return None
    return documents if again == policy else None


def encode(documents: list[tuple[str, str]], saved_at: float) -> bytes:
    return json.dumps({"format": FORMAT, "saved_at": saved_at,
                       "documents": [{"path": p, "text": t} for p, t in documents]}, indent=1).encode()


def decode(data: bytes, path: str) -> Copy:
    """The policy a copy holds, validated (CopyError says what is wrong with it)."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not format {FORMAT}")
        documents = [(d["path"], d["text"]) for d in obj["documents"]]
        if not documents or not all(isinstance(p, str) and isinstance(t, str) for p, t in documents):
            raise ValueError("no documents")
        saved_at = float(obj["saved_at"])
    except (ValueError, KeyError, TypeError) as e:
        raise CopyError(f"{path}: unreadable ({e})") from None
    try:
        return Copy(parse_documents(documents), saved_at, path)
    except PolicyError as e:
        raise CopyError(f"{path}: not a valid policy: {'; '.join(e.errors)}") from None


def save(state_dir: str, policy: Policy, now: float | None = None) -> str | None:
    """Write policy's texts as the last good copy (atomically: a new file, then renamed over the old one).
    Returns the copy's path, or None when the files changed since the policy was loaded. OSError when the
    state directory cannot be written."""
    documents = snapshot(policy)
    if documents is None:
        return None
    path = os.path.join(state_dir, FILENAME)
    old = safefiles.read_private(path)
    if old is not None:
        try:
            if [(d["path"], d["text"]) for d in json.loads(old)["documents"]] == documents:
                return path  # unchanged: keep its date (when this policy was first seen good)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path + ".tmp"
    fd = safefiles.create_new(tmp)  # O_EXCL|O_NOFOLLOW: a planted link is unlinked, never followed
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(documents, time.time() if now is None else now))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load(state_dir: str) -> Copy | None:
    """The last good copy, None if there is none (a link or another uid's file counts as none)."""
    path = os.path.join(state_dir, FILENAME)
    data = safefiles.read_private(path)
    return None if data is None else decode(data, path)


class PolicyKeeper:
    """Loads the policy for the daemon (start) and the server (reload), keeps the copy current, and
    remembers what state the policy is in for STATUS= and the `status` reply."""

    def __init__(self, path: str, state_dir: str, audit: Callable[[dict[str, Any]], None] = lambda r: None,
                 loader: Callable[[str], Policy] = load_policy) -> None:
        self.path = path
        self.state_dir = state_dir
        self.audit = audit
        self.loader = loader
        self.fallback = False
        self.errors: list[str] = []  # what is wrong with the file on disk (when running the copy)
        self.reload_errors: list[str] = []  # the last reload that failed (the running policy was kept)
        self.copy_saved_at: float | None = None
        self.save_error: str | None = None

    def start(self) -> Policy:
        """The policy to start with: the file's, or the last good copy when the file is broken. PolicyError
        (the file's errors, plus why no copy could stand in) when there is nothing safe to run."""
        try:
            policy = self.loader(self.path)
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
        self._keep(policy)
        return policy

    def reload(self, path: str) -> Policy:
        """The server's loader for SIGHUP: a broken file raises (the running policy stays), a good one
        ends any fallback and becomes the new copy."""
        try:
            policy = self.loader(path)
        except PolicyError as e:
            self.reload_errors = list(e.errors)
            raise
        self.fallback, self.errors, self.reload_errors = False, [], []
        self._keep(policy)
        return policy

    def _keep(self, policy: Policy) -> None:
        try:
            saved = save(self.state_dir, policy)
        except OSError as e:  # the broker still runs this policy; only the next broken start loses its net
            self.save_error = f"{os.path.join(self.state_dir, FILENAME)}: {e.strerror or e}"
            self.audit({"event": "policy-lastgood-unsaved", "error": self.save_error})
            return
        self.save_error = None
        if saved is not None:
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
