"""Who holds which queue: the broker's bookkeeping of grants (the kernel's map slots stay the truth).

Leases are kept in memory and mirrored to a journal in the runtime directory, so a broker that
crashed or was upgraded picks up where the last one was. The journal is JSON lines, one per change,
appended without a rename (a rename costs milliseconds on a disk-backed filesystem, more than the rest
of a grant); a torn last line from a crash is ignored, and the journal is compacted as it grows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from xskbroker.broker.lease_record import Lease, MemlockRaiseRecord
from xskbroker.broker.subids import principal
from xskbroker.common import safefiles
from xskbroker.policy.quota import Holding, Holdings

STATE_VERSION = 1
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one for every journal line: json.dumps makes one per call
COMPACT_LINES = 1000
JOURNAL_RETRY_SECONDS = 5.0  # how often a journal behind the table (a full file system) is rewritten until it can be


class LeaseTable:
    def __init__(self, state_file: str | None = None) -> None:
        self._by_id: dict[str, Lease] = {}
        self._by_slot: dict[tuple[int, int], str] = {}
        self._ended: dict[str, Lease] = {}  # out of the table, their on_end still to come (add, remove)
        # kept with the table, not derived per request: every grant judges quotas over all leases, and every
        # request prunes watched pids, so rebuilding these each time cost O(leases) on the grant path
        self._holdings = Holdings()
        # the leases of each holder pid, interface and uid (ids, in the order granted): a holder's exit, a grant's
        # look at its interface and a user's status find theirs without a walk of every lease (by pid: not orphans)
        self._by_pid: dict[int, dict[str, None]] = {}
        self._by_if: dict[int, dict[str, None]] = {}
        self._by_uid: dict[int, dict[str, None]] = {}
        self._let_go: set[int] = set()  # pids whose last lease ended since let_go() was last asked
        self._bare: set[str] = set()
        # orphaned and released leases (lingers()): looked at by every loop round and every step of a grant
        # waiting for a release, so kept here rather than found by a walk of every lease
        self._orphaned: set[str] = set()
        self._released: set[str] = set()
        # leases released while the broker's own copies of their sockets were closing: id -> (next look, last
        # look), monotonic; each ends once its slots are empty, or is kept as released (broker.lifecycle)
        self.settling: dict[str, tuple[float, float]] = {}
        self.state_file = state_file
        self._journal: TextIO | None = None
        self._lines = 0
        self._compact_after = COMPACT_LINES  # lines past the leases' own before compact_if_due compacts
        # every lease ends through remove(): the service undoes there what the lease did outside the table
        self.on_end: Callable[[Lease], None] = lambda lease: None
        # the journal could not be written (the error), or could again (None): the service audits it
        self.on_journal: Callable[[OSError | None], None] = lambda error: None
        self.unjournaled: OSError | None = None  # the journal on disk is behind the table (a full file system)
        self._retry_at = 0.0
        self.loaded_raises: list[MemlockRaiseRecord] = []  # the memlock raises load() found journaled
        # why load() believed none of the journal there (a link, another's file, unreadable, another format): its
        # leases are forgotten, and the operator must be told (None: there was none, or it was read)
        self.load_refused: str | None = None

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
            umem_bytes: int, gids: tuple[int, ...] = (), groups: tuple[str, ...] = (),
            pid_start: int | None = None, pid_ino: int | None = None, cgroup: str | None = None,
            counted_as: int | None = None, memlock: tuple[int, int, int, int] | None = None) -> Lease:
        # pid_start must have been read while the holder was pinned by a pidfd (broker.peer): read here,
        # from the bare pid, it could be the start time of a process that reused the pid
        lease = Lease(os.urandom(8).hex(), uid, pid, ifindex, ifname, queues, kind, umem_bytes, gids, groups,
                      pid_start, pid_ino=pid_ino, cgroup=cgroup, memlock=memlock)
        # A fresh grant on a slot proves the old holder's socket is gone (the kernel freed the slot), unless a
        # revoke emptied it: a misbound socket lives on bound off its slot, and its lease stays (on its quota)
        ended = []
        for q in queues:
            old = self.holder(ifindex, q)
            if old and not (old.revoked and old.misbound is not None):
                self._remove(old.id)
                ended.append({"end": old.id})
        self._insert(lease, counted_as)
        try:
            self._append(*ended, {"lease": lease.record()})  # one write for the grant, ends and all
        except OSError as e:  # not recorded, so not granted; the ends stand (the kernel freed those slots)
            self._remove(lease.id)
            del self._ended[lease.id]
            self._broken(e)
            for entry in ended:
                self.on_end(self._ended.pop(entry["end"]))
            raise OSError(e.errno, f"the lease journal {self.state_file} cannot be written: {e.strerror}") from e
        for entry in ended:
            self.on_end(self._ended.pop(entry["end"]))
        return lease

    def _insert(self, lease: Lease, counted_as: int | None = None) -> None:
        self._by_id[lease.id] = lease
        # a revoked misbound lease's revoke emptied its slots: one another lease holds is that lease's (recovery
        # takes misbound leases back last, after any lease granted their slots since)
        squatter = lease.revoked and lease.misbound is not None
        for q in lease.queues:
            if not (squatter and (lease.ifindex, q) in self._by_slot):
                self._by_slot[(lease.ifindex, q)] = lease.id
        # counted against the user whose subordinate uid it is, if it is one (broker.subids): as the grant's peer
        # was, or (recovered from the journal) as the uid is now
        who = counted_as if counted_as is not None else principal(lease.uid)
        self._holdings[lease.id] = Holding(who, frozenset(lease.gids), frozenset(lease.groups),
                                           len(lease.queues), lease.umem_bytes)
        for index, key in ((self._by_if, lease.ifindex), (self._by_uid, lease.uid)):
            index.setdefault(key, {})[lease.id] = None
        if not lease.orphaned:  # an orphan's holder has exited: its pid names nobody who holds it
            self._by_pid.setdefault(lease.pid, {})[lease.id] = None
        if lease.kind == "bare":
            self._bare.add(lease.id)
        if lease.orphaned:
            self._orphaned.add(lease.id)
        if lease.released_at is not None:
            self._released.add(lease.id)

    def remove(self, lease_id: str) -> Lease | None:
        lease = self._remove(lease_id)
        if lease:
            self._append_or_note({"end": lease_id})  # ended all the same: what it held is freed
            self.on_end(self._ended.pop(lease_id))
        return lease

    def _remove(self, lease_id: str) -> Lease | None:
        """Out of the table, not yet journaled nor ended (kept in _ended until the caller does both)."""
        lease = self._by_id.pop(lease_id, None)
        if lease:
            for q in lease.queues:
                if self._by_slot.get((lease.ifindex, q)) == lease_id:
                    del self._by_slot[(lease.ifindex, q)]
            self._holdings.pop(lease_id)
            for index, key in ((self._by_if, lease.ifindex), (self._by_uid, lease.uid)):
                ids = index[key]
                del ids[lease_id]
                if not ids:
                    del index[key]
            if not lease.orphaned:
                self._unhold(lease)
            self._bare.discard(lease_id)
            self._orphaned.discard(lease_id)
            self._released.discard(lease_id)
            self.settling.pop(lease_id, None)
            self._ended[lease_id] = lease
        return lease

    def holdings(self) -> Holdings:
        """What each lease holds, for the quotas (a lease's uid, groups, queues and UMEM never change)."""
        return self._holdings

    def regroup(self, groups_of: Callable[[frozenset[int]], frozenset[str]]) -> None:
        """Name each lease's groups by its gids as groups_of does now (a policy reload names other groups)."""
        for lease in self._by_id.values():
            names = tuple(sorted(groups_of(frozenset(lease.gids))))
            if names != lease.groups:
                lease.groups = names
                h = self._holdings.pop(lease.id)
                assert h is not None
                self._holdings[lease.id] = Holding(h.uid, h.gids, frozenset(names), h.queues, h.umem)

    def holds(self, pid: int) -> bool:
        """Whether pid holds a lease (an orphan is held by nobody: its holder has exited)."""
        return pid in self._by_pid

    def holder_count(self) -> int:
        """How many distinct pids hold a lease."""
        return len(self._by_pid)

    def let_go(self) -> set[int]:
        """The pids whose last lease ended since the last call (one may hold a new one since: ask holds())."""
        pids, self._let_go = self._let_go, set()
        return pids

    def has_bare(self) -> bool:
        return any(not self._by_id[i].revoked for i in self._bare)

    def lingers(self) -> bool:
        """Whether a lease waits for its sockets to close, which no event tells: an orphaned or released one."""
        return bool(self._orphaned or self._released)

    def orphaned(self) -> list[Lease]:
        """Leases whose holder exited after passing its sockets on."""
        return [self._by_id[i] for i in self._orphaned]

    def released(self) -> list[Lease]:
        """Leases kept released: their holders released them with their sockets open."""
        return [self._by_id[i] for i in self._released]

    def orphan(self, lease: Lease) -> None:
        """Its holder exited but passed its sockets on: it lingers until they close, held by no pid (one that
        reuses the pid is not its holder, and lets go when its own last lease ends)."""
        if not lease.orphaned:
            self._unhold(lease)
        lease.orphaned = True
        self._orphaned.add(lease.id)

    def _unhold(self, lease: Lease) -> None:
        ids = self._by_pid[lease.pid]
        del ids[lease.id]
        if not ids:
            del self._by_pid[lease.pid]
            self._let_go.add(lease.pid)

    def keep_released(self, lease: Lease, when: float) -> None:
        """Released with its sockets open (at `when`, wall clock): it lingers, on its quota, until they close."""
        lease.released_at = when
        self._released.add(lease.id)

    def released_lately(self, now: float, seconds: float) -> bool:
        """Whether a lease was released less than `seconds` ago with its sockets open, or is being settled."""
        return bool(self.settling) or any(0 <= now - (lease.released_at or 0.0) < seconds for lease in self.released())

    def of_pid(self, pid: int) -> list[Lease]:
        """The leases pid holds (not the orphans its pid once held)."""
        return [self._by_id[i] for i in self._by_pid.get(pid, ())]

    def on_interface(self, ifindex: int) -> list[Lease]:
        return [self._by_id[i] for i in self._by_if.get(ifindex, ())]

    def count_on(self, ifindex: int) -> int:
        return len(self._by_if.get(ifindex, ()))

    def of_uid(self, uid: int) -> list[Lease]:
        return [self._by_id[i] for i in self._by_uid.get(uid, ())]

    # ---- persistence -------------------------------------------------------------------------------

    def record(self, lease: Lease) -> None:
        """Journal a new or changed lease (a later record of the same id replaces the earlier one)."""
        self._append_or_note({"lease": lease.record()})

    def _append_or_note(self, entry: dict[str, Any]) -> None:
        """A change the table makes whatever the disk says (an end, an orphan, a revocation): a journal that
        cannot take it is behind, and is rewritten whole once it can (compact_if_due). A restart meanwhile
        recovers from the older journal, which recovery checks against the kernel."""
        try:
            self._append(entry)
        except OSError as e:
            self._broken(e)

    def _broken(self, error: OSError) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None  # the next write rewrites the whole journal (compact), and so catches up
        if self.unjournaled is None:
            self.on_journal(error)
        self.unjournaled = error

    def _append(self, *entries: dict[str, Any]) -> None:
        if not self.state_file:
            return
        # a journal grown past its bound is compacted between requests (compact_if_due), not here: rewriting
        # every lease cost the grant that crossed the bound ~2 ms
        if self._journal is None:
            self.compact()
            if all(e.get("end") or "lease" in e for e in entries):
                return  # the compacted journal already holds the current state
        assert self._journal is not None
        # one write(2) per call, no buffering layer: it is on the grant path
        data = "".join(_ENCODER.encode(e) + "\n" for e in entries).encode()
        if os.write(self._journal.fileno(), data) != len(data):
            # the file system's last page took part of it, with no error: refused as a full disk is, so that the
            # journal is rewritten whole (compact) before another line could be glued to the fragment
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._lines += len(entries)

    def compact_if_due(self, now: float | None = None) -> None:
        """Compact a journal grown past 1000 lines beyond what the leases need (the server calls it after each
        round of requests). A compaction that fails is tried again after another 1000 lines; a journal behind
        the table (unjournaled) is rewritten every few seconds until it can be."""
        if self.unjournaled is not None and self.state_file:
            now = time.monotonic() if now is None else now
            if now >= self._retry_at:
                self._retry_at = now + JOURNAL_RETRY_SECONDS
                try:
                    self.compact()
                except OSError as e:
                    self.unjournaled = e
            return
        if self._journal is not None and self._lines > self._compact_after + 4 * len(self._by_id):
            try:
                self.compact()
            except OSError:
                self._compact_after = self._lines + COMPACT_LINES
                raise

    def compact(self) -> None:
        """Rewrite the journal as the current leases only (temp file + rename: old or new, never half)."""
        if not self.state_file:
            return
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        tmp = f"{self.state_file}.tmp"
        f = os.fdopen(safefiles.create_new(tmp), "w")  # never through a link planted at the temp name
        try:
            f.write(json.dumps({"version": STATE_VERSION}) + "\n")
            for lease in self._by_id.values():
                f.write(json.dumps({"lease": lease.record()}, separators=(",", ":")) + "\n")
            f.flush()
            os.replace(tmp, self.state_file)  # replaces whatever entry was there, never follows it
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # appends go to the file just written, so nothing at the journal's name is ever opened
        self._journal = f
        self._lines = len(self._by_id)
        self._compact_after = COMPACT_LINES
        if self.unjournaled is not None:
            self.unjournaled = None
            self.on_journal(None)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def record_raise(self, raise_: MemlockRaiseRecord) -> None:
        """Journal a memlock raise before it is made (OSError when the journal cannot take it: then it is not made).
        The lease that rests on it is journaled after: a broker killed between the two leaves a raised limit that
        only this line tells the next broker to restore."""
        self._append({"raise": {"pid": raise_.pid, "pid_start": raise_.pid_start, "pid_ino": raise_.pid_ino,
                                "memlock": list(raise_.memlock)}})

    def load(self) -> list[Lease]:
        """The leases a previous broker's journal left; lines it cannot read (a torn tail) are skipped. A memlock
        raise it made for a lease it did not journal is left in loaded_raises."""
        self.loaded_raises = []
        self.load_refused = None
        if not self.state_file:
            return []
        leases: dict[str, Lease] = {}
        try:  # never through a link, and only our own file: a planted journal is not believed
            with open(self.state_file, opener=safefiles.private_opener) as f:
                first = f.readline()
                header = json.loads(first or "{}")
                if not isinstance(header, dict) or header.get("version") != STATE_VERSION:
                    if first:  # an empty file recorded nothing
                        self.load_refused = (f"{self.state_file}: not a lease journal of version {STATE_VERSION} "
                                             f"(its first line: {first[:80].rstrip()!r})")
                    return []
                # a raise is followed by its lease's line, or undone (its grant failed) before anything else is
                # written: only one on the last line read was made and left by a broker killed in between
                pending: MemlockRaiseRecord | None = None
                for line in f:
                    # RecursionError: a garbled line nested deeper than the parser goes costs that line only
                    with contextlib.suppress(ValueError, KeyError, TypeError, RecursionError):
                        entry = json.loads(line)
                        if "raise" in entry:
                            pending = MemlockRaiseRecord.from_record(entry["raise"])
                            continue
                        if "lease" in entry:
                            lease = Lease.from_record(entry["lease"])
                            leases[lease.id] = lease
                        elif "end" in entry:
                            leases.pop(entry["end"], None)
                        pending = None
                self.loaded_raises = [pending] if pending is not None else []
        except FileNotFoundError:  # none yet (a first start): nothing forgotten
            return []
        except safefiles.UnsafePathError as e:  # its message names the file and why
            self.load_refused = str(e)
            return []
        except OSError as e:
            self.load_refused = f"{self.state_file}: cannot be read: {e.strerror or e}"
            return []
        except (ValueError, RecursionError) as e:
            self.load_refused = f"{self.state_file}: cannot be read as a lease journal: {e}"
            return []
        return list(leases.values())

    def adopt(self, lease: Lease) -> None:
        self._insert(lease)
