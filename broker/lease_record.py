"""A lease and a memlock raise as the broker records them, and as their journal lines are read back: a line is
believed only when every value is of the type and range a lease has (recovery hands them to the kernel)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from xskbroker.common.records import field, record
from xskbroker.wire.replies import LeaseInfo


@record
class Lease:
    id: str
    uid: int
    pid: int
    ifindex: int
    ifname: str
    queues: tuple[int, ...]
    kind: str
    umem_bytes: int
    gids: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    pid_start: int | None = None
    created: float = field(default_factory=time.time)
    revoked: bool = False
    orphaned: bool = False  # its holder exited but passed the sockets on: held by a process we can't name
    pid_ino: int | None = None  # the holder's pidfs inode (see pidfd_ino), when the kernel has one
    misbound: int | None = None  # a bare socket found bound to this queue, not one it was granted
    map_id: int = 0  # map grants: the xsks_map handed out, whose program is detached when the lease ends
    cgroup: str | None = None  # the requester's cgroup v2 path: with uid, the principal that owns the lease
    # when its holder released it while its sockets were still open (wall clock): the kernel cannot close them,
    # so it stays charged to its quota until they close (the slots empty) or a new grant binds its queues
    released_at: float | None = None
    # bare grants: the holder's RLIMIT_MEMLOCK (soft, hard) before the broker raised it and (soft, hard) it was
    # raised to, journaled so that a restarted broker still restores it when the holder's last such lease ends
    memlock: tuple[int, int, int, int] | None = None
    # map grants under --pin-root: where its map was pinned, journaled: the pin keeps the interface's name at the
    # grant, which a rename since does not change, and a restarted broker removes it there
    map_pin: str | None = None

    def owned_by(self, uid: int, cgroup: str | None) -> bool:
        """Whether a peer of (uid, cgroup) is the principal that took this lease. Another cgroup of the same
        uid is another principal (another VM); a lease from an older journal, with no cgroup, is its uid's."""
        return uid == self.uid and (self.cgroup is None or cgroup == self.cgroup)

    def info(self) -> LeaseInfo:
        """The lease as a status reply lists it."""
        return LeaseInfo(self.id, self.uid, self.pid, self.ifname, self.ifindex, self.queues, self.kind,
                         self.umem_bytes, round(time.time() - self.created, 3), self.revoked, self.orphaned,
                         self.misbound, self.released_at is not None)

    def record(self) -> dict[str, Any]:
        """The journal form (dataclasses.asdict is several times slower, and this is on the grant path)."""
        return {"id": self.id, "uid": self.uid, "pid": self.pid, "ifindex": self.ifindex, "ifname": self.ifname,
                "queues": list(self.queues), "kind": self.kind, "umem_bytes": self.umem_bytes,
                "gids": list(self.gids), "groups": list(self.groups), "pid_start": self.pid_start,
                "created": self.created, "revoked": self.revoked, "orphaned": self.orphaned, "pid_ino": self.pid_ino,
                "misbound": self.misbound, "map_id": self.map_id, "cgroup": self.cgroup,
                "released_at": self.released_at, "memlock": self.memlock, "map_pin": self.map_pin}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Lease:
        """The lease a journal line records; ValueError for a line whose values are not a lease's (a garbled file
        that still parses): recovery hands these values to the kernel, and one of the wrong type there would stop
        every later broker from starting, not just lose the line."""
        rec = dict(rec)
        for key in ("queues", "gids", "groups"):
            value = rec.get(key, ())
            if not isinstance(value, list | tuple):
                raise ValueError(f"{key} {value!r}: not a list")
            rec[key] = tuple(value)
        if rec.get("memlock") is not None:
            if not isinstance(rec["memlock"], list | tuple):
                raise ValueError(f"memlock {rec['memlock']!r}: not a list")
            rec["memlock"] = tuple(rec["memlock"])
            if len(rec["memlock"]) != 4:
                raise ValueError(f"memlock {rec['memlock']!r}: expected (soft, hard) before and after the raise")
        for key, value in rec.items():
            check = _FIELD_CHECKS.get(key)
            if check is None or not check(value):
                raise ValueError(f"{key} {value!r}: not what a lease records")
        return cls(**rec)


def _int(low: int = 0, high: int = 1 << 64) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v < high  # bool is an int subclass: never a pid or a queue


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _each(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: all(check(x) for x in v)


def _str(v: Any) -> bool:
    return type(v) is str


def _number(v: Any) -> bool:
    return type(v) is int or (type(v) is float and math.isfinite(v))  # json reads NaN and Infinity too


def _flag(v: Any) -> bool:
    return type(v) is bool


_QUEUE = _int(0, 1 << 32)
_FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": _str, "uid": _int(0, 1 << 32), "pid": _int(1, 1 << 22), "ifindex": _int(1, 1 << 31), "ifname": _str,
    "queues": lambda v: bool(v) and all(_QUEUE(q) for q in v),
    "kind": lambda v: v in ("bound", "bare", "map"), "umem_bytes": _int(), "gids": _each(_int(0, 1 << 32)),
    "groups": _each(_str), "pid_start": _optional(_int()), "created": _number, "revoked": _flag,
    "orphaned": _flag, "pid_ino": _optional(_int()), "misbound": _optional(_QUEUE), "map_id": _int(),
    "cgroup": _optional(_str), "released_at": _optional(_number), "memlock": _optional(_each(_int())),
    "map_pin": _optional(_str),
}


@record
class MemlockRaiseRecord:
    """A memlock raise as the journal records it: the process, and (soft, hard) before and after."""

    pid: int
    pid_start: int | None
    pid_ino: int | None
    memlock: tuple[int, int, int, int]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> MemlockRaiseRecord:
        memlock = rec["memlock"]
        if not (isinstance(memlock, list) and len(memlock) == 4 and _each(_int())(memlock)):
            raise ValueError(f"memlock {memlock!r}: expected (soft, hard) before and after the raise")
        out = cls(rec["pid"], rec["pid_start"], rec["pid_ino"], (memlock[0], memlock[1], memlock[2], memlock[3]))
        if not (_FIELD_CHECKS["pid"](out.pid) and _FIELD_CHECKS["pid_start"](out.pid_start)
                and _FIELD_CHECKS["pid_ino"](out.pid_ino)):
            raise ValueError(f"raise {rec!r}: not a process")
        return out
