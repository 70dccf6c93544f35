"""The broker's counters for operators: grants, refusals by code, grant latency, policy reloads.

Plain ints, dicts and lists changed on the event loop's thread only (no locks; a grant pays one dict
increment and one bisect). Grant decisions are counted from the audit records the service writes (the
`tap`), so the metrics and the audit trail count the same events. Gauges (leases, pinned memory,
connections) are read when asked for. The status op hands admins a snapshot (wire.replies.MetricsInfo);
the client turns it into Prometheus text, so the broker opens no listener of its own.
"""

from __future__ import annotations

import bisect
import functools
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from xskbroker.wire.replies import HistogramInfo, MetricsInfo

if TYPE_CHECKING:
    from xskbroker.broker.lease_record import Lease

AuditFn = Callable[[dict[str, Any]], None]
# seconds: a small grant is made in 1-6 ms, a large UMEM pinned on a worker takes up to seconds
GRANT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
KINDS = ("bound", "bare", "map")
VERSION_FALLBACK = "0.1.0"  # a source checkout that was never installed has no package metadata


@functools.cache
def version() -> str:
    """The installed package's version (what `xskbroker --version` and the metrics report)."""
    from importlib import metadata  # only when asked: it costs milliseconds at import

    try:
        return metadata.version("xskbroker")
    except metadata.PackageNotFoundError:
        return VERSION_FALLBACK


class Histogram:
    """Observations counted into fixed buckets (per bucket here; cumulative in the snapshot)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = GRANT_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be distinct and ascending: {bounds}")
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        i = bisect.bisect_left(self.bounds, value)  # le: a value equal to a bound counts in that bucket
        if i < len(self.counts):
            self.counts[i] += 1

    def snapshot(self) -> HistogramInfo:
        cumulative, total = [], 0
        for n in self.counts:
            total += n
            cumulative.append(total)
        return HistogramInfo(self.bounds, tuple(cumulative), round(self.sum, 6), self.count)


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.monotonic = monotonic
        self.started, self._started_mono = clock(), monotonic()
        self.granted = 0
        self.refused: dict[str, int] = {}
        self.latency = {"allow": Histogram(), "deny": Histogram()}
        self.reloads = {"ok": 0, "failed": 0}
        self.connections: Callable[[], int] = lambda: 0  # the server, which holds the connections, sets it
        self.pool: Callable[[], dict[str, int]] = dict  # the service sets it: the UMEM pool's snapshot

    def tap(self, audit: AuditFn) -> AuditFn:
        """`audit`, counting each grant decision on its way through."""
        def tapped(record: dict[str, Any]) -> None:
            self.observe(record)
            audit(record)
        return tapped

    def observe(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "grant":
            ms = record.get("ms")
            if record.get("decision") == "allow":
                self.granted += 1
                hist = self.latency["allow"]
            else:
                self._refused(str(record.get("code")))
                hist = self.latency["deny"]
            if isinstance(ms, int | float):
                hist.observe(ms / 1000)
        elif event == "rate-limited" and record.get("op") == "grant":  # refused before any decision was made
            self._refused(str(record.get("code")))

    def _refused(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def snapshot(self, leases: Iterable[Lease]) -> MetricsInfo:
        kinds = dict.fromkeys(KINDS, 0)
        pinned = 0
        for lease in leases:
            kinds[lease.kind] = kinds.get(lease.kind, 0) + 1
            pinned += lease.umem_bytes
        return MetricsInfo(version(), self.started, round(self.monotonic() - self._started_mono, 3), self.granted,
                           dict(self.refused), kinds, pinned, self.connections(), dict(self.reloads),
                           {k: h.snapshot() for k, h in self.latency.items()}, self.pool(), _rss())


def _rss() -> int | None:
    """This process's resident memory in bytes (/proc/self/statm: pages)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
