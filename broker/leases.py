"""Who holds which queue: the broker's bookkeeping of grants (the kernel's map slots stay the truth)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field


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
    created: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, object]:
        return {"lease": self.id, "uid": self.uid, "pid": self.pid, "interface": self.ifname,
                "ifindex": self.ifindex, "queues": list(self.queues), "kind": self.kind,
                "umem_bytes": self.umem_bytes, "age_s": round(time.time() - self.created, 3)}


class LeaseTable:
    def __init__(self) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_slot: dict[tuple[int, int], str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._by_id.values()))

    def get(self, lease_id: str) -> Lease | None:
        return self._by_id.get(lease_id)

    def holder(self, ifindex: int, queue: int) -> Lease | None:
        lease_id = self._by_slot.get((ifindex, queue))
        return self._by_id.get(lease_id) if lease_id else None

    def add(self, uid: int, pid: int, ifindex: int, ifname: str, queues: tuple[int, ...], kind: str,
            umem_bytes: int) -> Lease:
        lease = Lease(secrets.token_hex(8), uid, pid, ifindex, ifname, queues, kind, umem_bytes)
        # A fresh grant on a slot proves the old holder's socket is gone (the kernel freed the slot).
        for q in queues:
            old = self.holder(ifindex, q)
            if old:
                self.remove(old.id)
        self._by_id[lease.id] = lease
        for q in queues:
            self._by_slot[(ifindex, q)] = lease.id
        return lease

    def remove(self, lease_id: str) -> Lease | None:
        lease = self._by_id.pop(lease_id, None)
        if lease:
            for q in lease.queues:
                if self._by_slot.get((lease.ifindex, q)) == lease_id:
                    del self._by_slot[(lease.ifindex, q)]
        return lease

    def of_pid(self, pid: int) -> list[Lease]:
        return [lease for lease in self._by_id.values() if lease.pid == pid]
