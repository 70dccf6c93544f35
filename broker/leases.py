"""Who holds which queue: the broker's bookkeeping of grants (the kernel's map slots stay the truth).

Leases are kept in memory and mirrored to a JSON file in the runtime directory, so a broker that
crashed or was upgraded picks up where the last one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

STATE_VERSION = 1


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields are counted after its last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


@dataclass
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

    def as_dict(self) -> dict[str, Any]:
        return {"lease": self.id, "uid": self.uid, "pid": self.pid, "interface": self.ifname,
                "ifindex": self.ifindex, "queues": list(self.queues), "kind": self.kind,
                "umem_bytes": self.umem_bytes, "age_s": round(time.time() - self.created, 3),
                "revoked": self.revoked}

    def holder_alive(self) -> bool:
        return self.pid_start is not None and process_start(self.pid) == self.pid_start

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Lease:
        rec = dict(rec)
        for key in ("queues", "gids", "groups"):
            rec[key] = tuple(rec.get(key, ()))
        return cls(**rec)


class LeaseTable:
    def __init__(self, state_file: str | None = None) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_slot: dict[tuple[int, int], str] = {}
        self.state_file = state_file

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._by_id.values()))

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def holder(self, ifindex: int, queue: int) -> Lease | None:
        lease_id = self._by_slot.get((ifindex, queue))
        return self._by_id.get(lease_id) if lease_id else None

    def add(self, uid: int, pid: int, ifindex: int, ifname: str, queues: tuple[int, ...], kind: str,
            umem_bytes: int, gids: tuple[int, ...] = (), groups: tuple[str, ...] = ()) -> Lease:
        lease = Lease(secrets.token_hex(8), uid, pid, ifindex, ifname, queues, kind, umem_bytes, gids, groups,
                      process_start(pid))
        # A fresh grant on a slot proves the old holder's socket is gone (the kernel freed the slot).
        for q in queues:
            old = self.holder(ifindex, q)
            if old:
                self.remove(old.id, save=False)
        self._insert(lease)
        self.save()
        return lease

    def _insert(self, lease: Lease) -> None:
        self._by_id[lease.id] = lease
        for q in lease.queues:
            self._by_slot[(lease.ifindex, q)] = lease.id

    def remove(self, lease_id: str, save: bool = True) -> Lease | None:
        lease = self._by_id.pop(lease_id, None)
        if lease:
            for q in lease.queues:
                if self._by_slot.get((lease.ifindex, q)) == lease_id:
                    del self._by_slot[(lease.ifindex, q)]
            if save:
                self.save()
        return lease

    def of_pid(self, pid: int) -> list[Lease]:
        return [lease for lease in self._by_id.values() if lease.pid == pid]

    def on_interface(self, ifindex: int) -> list[Lease]:
        return [lease for lease in self._by_id.values() if lease.ifindex == ifindex]

    # ---- persistence -------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the table atomically (temp file + rename): a crash leaves the old or the new file."""
        if not self.state_file:
            return
        tmp = f"{self.state_file}.tmp"
        data = {"version": STATE_VERSION, "leases": [asdict(lease) for lease in self._by_id.values()]}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.state_file)

    def load(self) -> list[Lease]:
        """The leases a previous broker recorded; unreadable state is reported as no leases."""
        if not self.state_file:
            return []
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            with open(self.state_file) as f:
                data = json.load(f)
            if data.get("version") == STATE_VERSION:
                return [Lease.from_record(rec) for rec in data["leases"]]
        return []

    def adopt(self, lease: Lease) -> None:
        self._insert(lease)
