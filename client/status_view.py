"""`xskbroker status` for people (a table) and for Prometheus (text exposition format 0.0.4).

Pure: both take the typed status reply and return text. The exposition is made here, on the client's
side, from the reply's `metrics` (admins only), so the broker needs no listener of its own: a timer runs
`xskbroker status --format prometheus --output FILE` for node_exporter's textfile collector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from xskbroker.wire.replies import HistogramInfo, LeaseInfo, MetricsInfo, StatusReply

# ---- the table -------------------------------------------------------------------------------------------


def table(reply: StatusReply) -> str:
    out: list[str] = []
    if reply.metrics is not None:
        out += [summary(reply.metrics), ""]
    out.append(f"Interfaces with the XSK program: {len(reply.interfaces)}")
    if reply.interfaces:
        out += _columns(("INTERFACE", "IFINDEX", "PROGRAM", "MODE", "SLOTS", "LEASES"),
                        [(i.interface or "?", i.ifindex, i.xdp_prog_id, i.xdp_mode, i.map_entries, i.leases)
                         for i in reply.interfaces])
    out += ["", f"Leases ({'all' if reply.admin else 'yours'}): {len(reply.leases)}"]
    if reply.leases:
        out += _columns(("LEASE", "UID", "PID", "INTERFACE", "QUEUES", "KIND", "PINNED", "AGE", "STATE"),
                        [(x.lease, x.uid, x.pid, x.interface, queue_ranges(x.queues), x.kind, size(x.umem_bytes),
                          duration(x.age_s), _state(x)) for x in reply.leases])
    if reply.quotas:
        out += ["", "Quotas (what applies to you):"]
        out += _columns(("QUOTA", "SCOPE", "QUEUES", "PINNED"),
                        [(q.quota, q.scope, f"{q.queues}/{'-' if q.max_queues is None else q.max_queues}",
                          f"{size(q.umem)}/{'-' if q.max_umem is None else size(q.max_umem)}") for q in reply.quotas])
    return "\n".join(out)


def summary(m: MetricsInfo) -> str:
    refused = sum(m.refusals.values())
    codes = ", ".join(f"{code} {n}" for code, n in sorted(m.refusals.items(), key=lambda kv: (-kv[1], kv[0])))
    allow = m.grant_seconds.get("allow")
    latency = f"; grant latency p50 {_ms(quantile(allow, 0.5))}, p99 {_ms(quantile(allow, 0.99))}" \
        if allow and allow.count else ""
    return (f"Broker {m.version}, up {duration(m.uptime_s)}; {m.connections} connection(s); policy reloads "
            f"{m.reloads.get('ok', 0)} ok, {m.reloads.get('failed', 0)} failed\n"
            f"Grants since start: {m.grants} granted, {refused} refused{f' ({codes})' if codes else ''}{latency}; "
            f"{size(m.pinned_bytes)} pinned now" + (f"; broker resident {size(m.rss_bytes)}" if m.rss_bytes else "") + (
                f"\nUMEM pool: {m.pool.get('sockets', 0)} socket(s) made ahead, {size(m.pool.get('pinned_bytes', 0))} "
                f"pinned of a {size(m.pool.get('budget_bytes', 0))} budget" if m.pool else ""))


def _state(x: LeaseInfo) -> str:
    """"held", or what an operator should notice, in capitals."""
    states = [s for s, on in (("REVOKED", x.revoked), ("ORPHANED", x.orphaned), ("RELEASED-OPEN", x.released)) if on]
    if x.misbound is not None:
        states.append(f"MISBOUND@{x.misbound}")
    return ",".join(states) or "held"


def _columns(head: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    cells = [list(head), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def queue_ranges(queues: Sequence[int]) -> str:
    """0,1,2,5 -> "0-2,5"."""
    runs: list[list[int]] = []
    for q in sorted(set(queues)):
        if runs and q == runs[-1][1] + 1:
            runs[-1][1] = q
        else:
            runs.append([q, q])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def quantile(h: HistogramInfo, q: float) -> float:
    """The upper bound of the bucket that holds the q-quantile (inf past the last bound): coarse, honest."""
    rank = q * h.count
    for le, n in zip(h.le, h.buckets, strict=True):
        if n >= rank:
            return le
    return math.inf


def _ms(seconds: float) -> str:
    return "beyond the last bucket" if math.isinf(seconds) else f"<={seconds * 1000:g} ms"


# ---- Prometheus text exposition format 0.0.4 -------------------------------------------------------------

def prometheus(m: MetricsInfo) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {_escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            out.append(f"{sample}{_labels(labels)} {_number(value)}")

    family("xskbroker_build_info", "gauge", "The broker's version (always 1).", [
        ("xskbroker_build_info", {"version": m.version}, 1)])
    family("xskbroker_start_time_seconds", "gauge", "When the broker started, in seconds since the Unix epoch.", [
        ("xskbroker_start_time_seconds", {}, m.start_time)])
    family("xskbroker_uptime_seconds", "gauge", "Seconds since the broker started.", [
        ("xskbroker_uptime_seconds", {}, m.uptime_s)])
    family("xskbroker_grants_total", "counter", "Grants made since the broker started.", [
        ("xskbroker_grants_total", {}, m.grants)])
    family("xskbroker_grant_refusals_total", "counter",
           "Grant requests refused since the broker started, by error code (docs/protocol.md).",
           [("xskbroker_grant_refusals_total", {"code": code}, n) for code, n in sorted(m.refusals.items())])
    family("xskbroker_grant_duration_seconds", "histogram",
           "Time from a grant request's arrival to the broker's decision, by decision (allow or deny).",
           [s for decision, h in sorted(m.grant_seconds.items()) for s in _histogram(
               "xskbroker_grant_duration_seconds", {"decision": decision}, h)])
    family("xskbroker_leases", "gauge", "Live leases, by kind (revoked ones last until their holder lets go).",
           [("xskbroker_leases", {"kind": kind}, n) for kind, n in sorted(m.leases.items())])
    family("xskbroker_pinned_umem_bytes", "gauge", "Memory the live bound leases pin: their UMEM and rings.", [
        ("xskbroker_pinned_umem_bytes", {}, m.pinned_bytes)])
    if m.pool:
        family("xskbroker_pool_pinned_bytes", "gauge",
               "Memory the UMEM pool's sockets made ahead of grants pin (the broker's own, in no quota).", [
                   ("xskbroker_pool_pinned_bytes", {}, m.pool.get("pinned_bytes", 0))])
        family("xskbroker_pool_budget_bytes", "gauge", "The UMEM pool's budget (serve --umem-pool).", [
            ("xskbroker_pool_budget_bytes", {}, m.pool.get("budget_bytes", 0))])
    if m.rss_bytes is not None:
        family("xskbroker_resident_memory_bytes", "gauge", "The broker process's own resident memory.", [
            ("xskbroker_resident_memory_bytes", {}, m.rss_bytes)])
    family("xskbroker_connections", "gauge", "Client connections open now.", [
        ("xskbroker_connections", {}, m.connections)])
    family("xskbroker_policy_reloads_total", "counter",
           "Policy reloads (SIGHUP) since the broker started, by result (ok, or failed: the old policy was kept).",
           [("xskbroker_policy_reloads_total", {"result": r}, n) for r, n in sorted(m.reloads.items())])
    return "\n".join(out) + "\n"


def _histogram(name: str, labels: dict[str, str], h: HistogramInfo) -> list[tuple[str, dict[str, str], float]]:
    rows: list[tuple[str, dict[str, str], float]] = [
        (f"{name}_bucket", {**labels, "le": _number(le)}, n) for le, n in zip(h.le, h.buckets, strict=True)]
    rows += [(f"{name}_bucket", {**labels, "le": "+Inf"}, h.count), (f"{name}_sum", labels, h.sum),
             (f"{name}_count", labels, h.count)]
    return rows


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + text + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
