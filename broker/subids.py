"""Whose a uid is: a subordinate uid (/etc/subuid, what newuidmap lets a user map into a user namespace of its
own) counts as the user it was given to, for everything the broker shares out per user.

Any user with a subordinate range (useradd gives 65,536) can connect as thousands of distinct uids. Counted per
uid, that user filled the connection table with one connection per uid, which left every other user none (an
equal share of it was 0), and drew each per-user quota (connections, requests per second, queues, UMEM) and
audit burst once per uid. Policy decisions still judge the uid itself: a rule naming a user never allows its
subordinate uids.
"""

from __future__ import annotations

import bisect
import os
import pwd
import stat
import time
from collections.abc import Callable

SUBUID = "/etc/subuid"
RECHECK = 30.0  # seconds between looks at the file (a stat): ranges change when users are added


def parse(text: str, uid_of: dict[str, int | None]) -> list[tuple[int, int, int]]:
    """(first, last, owner uid) for each `owner:first:count` line, sorted; owners named by login are looked up
    in uid_of (None: unknown, the line is skipped). Malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or line.lstrip().startswith("#"):
            continue
        name, first, count = parts
        try:
            lo, n = int(first), int(count)
        except ValueError:
            continue
        owner = int(name) if name.isdigit() else uid_of.get(name)
        if owner is not None and n > 0 and lo >= 0:
            out.append((lo, lo + n - 1, owner))
    out.sort()
    return out


def _lookup(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError):
        return None


class Owners:
    """uid -> the uid it counts as. The file is read again when it changes (looked at once per RECHECK), and
    believed only if root owns it and no one else may write it; its owners' names are resolved once per read."""

    def __init__(self, path: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path if path is not None else os.environ.get("XSKBROKER_SUBUID", SUBUID)
        self.clock = clock
        self._checked = float("-inf")
        self._stamp: tuple[int, int, int, int, int] | None = None
        self._ranges: list[tuple[int, int, int]] = []
        self._firsts: list[int] = []

    def owner(self, uid: int) -> int | None:
        """The user whose subordinate uid this is, or None (its own)."""
        self._refresh()
        i = bisect.bisect_right(self._firsts, uid) - 1
        if i < 0:
            return None
        # the range starting nearest below uid decides (ranges given to two users overlap only by mistake)
        _, hi, owner = self._ranges[i]
        return owner if uid <= hi and owner != uid else None

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._checked < RECHECK:
            return
        self._checked = now
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            self._stamp, self._ranges, self._firsts = None, [], []
            return
        try:
            st = os.fstat(fd)
            # the mode too: a chmod that makes a refused file safe changes neither its content nor its mtime
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_uid, st.st_mode)
            if stamp == self._stamp:
                return
            # root's file, written by no one else, and a regular one (a FIFO would block the loop)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022 or st.st_size > 1 << 22:
                self._stamp, self._ranges, self._firsts = stamp, [], []
                return
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(fd)
        text = b"".join(chunks).decode("utf-8", "replace")
        names = {line.split(":", 1)[0] for line in text.splitlines() if ":" in line}
        ranges = parse(text, {n: _lookup(n) for n in names if not n.isdigit()})
        self._stamp, self._ranges, self._firsts = stamp, ranges, [r[0] for r in ranges]


_owners: Owners | None = None


def owner_of(uid: int) -> int | None:
    """The user whose subordinate uid this is (the host's /etc/subuid), or None."""
    global _owners
    if _owners is None:
        _owners = Owners()
    return _owners.owner(uid)


def principal(uid: int) -> int:
    """The uid that uid's use is counted against."""
    owner = owner_of(uid)
    return uid if owner is None else owner
