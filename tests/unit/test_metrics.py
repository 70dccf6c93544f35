"""The broker's metrics: the registry, its snapshot on the wire, and the two ways `status` prints it.

The exposition is read back with Prometheus's own text-format parser (prometheus_client), never by
hand; the service's counts are checked against a fake kernel (tests/unit/service_rig.py's rig).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xskbroker.broker.lease_record import Lease
from xskbroker.broker.metrics import GRANT_BUCKETS, Histogram, Metrics, version
from xskbroker.client import status_view
from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import BrokerError
from xskbroker.wire.replies import HistogramInfo, MetricsInfo, StatusReply, decode_reply

from .service_rig import ALICE, BOB, POLICY, ROOT, make_rig


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def lease(kind: str, umem: int) -> Lease:
    return Lease(f"{kind}{umem}", 1000, 1, 3, "veth0", (0,), kind, umem)


# ---- the registry ------------------------------------------------------------------------------------------

def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.le == (0.001, 0.01, 0.1)
    assert snap.buckets == (2, 3, 4)  # cumulative; 0.001 itself is "le 0.001"; 3.0 is only in +Inf
    assert snap.count == 5 and snap.sum == pytest.approx(3.0535)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.01), (0.1, 0.1)])
def test_histogram_bounds_must_ascend(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="ascending"):
        Histogram(bounds)


def test_the_tap_counts_grant_decisions_and_passes_every_record_on() -> None:
    seen: list[dict[str, Any]] = []
    m = Metrics()
    audit = m.tap(seen.append)
    records = [
        {"event": "grant", "decision": "allow", "code": "ok", "ms": 2.5},
        {"event": "grant", "decision": "deny", "code": "user-not-allowed", "ms": 0.1},
        {"event": "grant", "decision": "deny", "code": "user-not-allowed", "ms": 0.2},
        {"event": "rate-limited", "op": "grant", "code": "rate-limited"},
        {"event": "rate-limited", "op": "status", "code": "rate-limited"},  # not a grant: not counted
        {"event": "lease-ended"},
    ]
    for r in records:
        audit(r)
    assert seen == records
    assert m.granted == 1 and m.refused == {"user-not-allowed": 2, "rate-limited": 1}
    assert m.latency["allow"].count == 1 and m.latency["allow"].sum == pytest.approx(0.0025)
    assert m.latency["deny"].count == 2


def test_a_snapshot_reads_the_gauges_when_asked() -> None:
    clock = [100.0]
    m = Metrics(clock=lambda: 1_700_000_000.0, monotonic=lambda: clock[0])
    m.connections = lambda: 7
    m.reloaded(True)
    m.reloaded(False)
    m.reloaded(False)
    clock[0] = 160.5
    snap = m.snapshot([lease("bound", 4 << 20), lease("bound", 1 << 20), lease("bare", 0)])
    assert snap.start_time == 1_700_000_000.0 and snap.uptime_s == 60.5
    assert snap.leases == {"bound": 2, "bare": 1, "map": 0} and snap.pinned_bytes == 5 << 20
    assert snap.connections == 7 and snap.reloads == {"ok": 1, "failed": 2}
    assert snap.pool == {} and snap.rss_bytes is not None and snap.rss_bytes > 1 << 20
    m.pool = lambda: {"pinned_bytes": 48 << 20, "budget_bytes": 64 << 20}
    assert m.snapshot([]).pool["pinned_bytes"] == 48 << 20
    assert snap.version == version() and snap.grant_seconds["allow"].le == GRANT_BUCKETS


# ---- on the wire ---------------------------------------------------------------------------------------------

def _metrics() -> MetricsInfo:
    m = Metrics(clock=lambda: 1_700_000_000.25)
    for ms in (0.4, 0.9, 3.0):
        m.observe({"event": "grant", "decision": "allow", "code": "ok", "ms": ms})
    m.observe({"event": "grant", "decision": "deny", "code": "user-not-allowed", "ms": 0.05})
    m.reloaded(True)
    return m.snapshot([lease("bound", 4 << 20)])


def test_status_with_metrics_round_trips_and_an_old_reply_has_none() -> None:
    reply = StatusReply((), (), (), True, _metrics(), req_id=1)
    back = decode_reply(reply.encode())
    assert isinstance(back, StatusReply) and back.metrics == reply.metrics
    old = decode_reply(b'{"v":1,"ok":true,"op":"status","id":1,"leases":[],"interfaces":[]}')
    assert isinstance(old, StatusReply) and old.metrics is None
    assert "metrics" not in json.loads(StatusReply((), (), (), False).encode())  # non-admins: left out


@pytest.mark.parametrize("change, where", [
    ({"refusals": {"user-not-allowed": "2"}}, "metrics.refusals.user-not-allowed"),
    ({"grant_seconds": {"allow": {"le": [0.1, 0.01], "buckets": [1, 1], "sum": 0, "count": 1}}}, "histogram"),
    ({"grant_seconds": {"allow": {"le": [0.1], "buckets": [2], "sum": 0, "count": 1}}}, "histogram"),
    ({"grant_seconds": {"allow": {"le": [0.1], "buckets": [], "sum": 0, "count": 1}}}, "histogram"),
    ({"leases": []}, "metrics.leases must be an object"),
])
def test_malformed_metrics_are_a_bad_reply(change: dict[str, Any], where: str) -> None:
    body = StatusReply((), (), (), True, _metrics(), req_id=1).to_dict()
    body["metrics"].update(change)
    with pytest.raises(BrokerError, match=where) as e:
        decode_reply(json.dumps(body).encode())
    assert e.value.code == "bad-reply"


# ---- the exposition, read by Prometheus's parser ----------------------------------------------------------------

def test_the_exposition_parses_and_says_what_happened() -> None:
    text = status_view.prometheus(_metrics())
    fams = families(text)
    assert {name: f.type for name, f in fams.items()} == {
        "xskbroker_build_info": "gauge", "xskbroker_start_time_seconds": "gauge",
        "xskbroker_uptime_seconds": "gauge", "xskbroker_grants": "counter", "xskbroker_grant_refusals": "counter",
        "xskbroker_grant_duration_seconds": "histogram", "xskbroker_leases": "gauge",
        "xskbroker_pinned_umem_bytes": "gauge", "xskbroker_connections": "gauge",
        "xskbroker_policy_reloads": "counter", "xskbroker_resident_memory_bytes": "gauge"}
    assert all(f.documentation for f in fams.values())
    got = samples(text)
    assert got[("xskbroker_grants_total", ())] == 3
    assert got[("xskbroker_grant_refusals_total", (("code", "user-not-allowed"),))] == 1
    assert got[("xskbroker_leases", (("kind", "bound"),))] == 1 and got[("xskbroker_leases", (("kind", "map"),))] == 0
    assert got[("xskbroker_pinned_umem_bytes", ())] == 4 << 20
    assert got[("xskbroker_resident_memory_bytes", ())] > 1 << 20
    assert got[("xskbroker_policy_reloads_total", (("result", "ok"),))] == 1
    assert got[("xskbroker_policy_reloads_total", (("result", "failed"),))] == 0
    assert got[("xskbroker_start_time_seconds", ())] == 1_700_000_000.25
    allow = (("decision", "allow"),)
    assert got[("xskbroker_grant_duration_seconds_bucket", (*allow, ("le", "0.0005")))] == 1
    assert got[("xskbroker_grant_duration_seconds_bucket", (*allow, ("le", "0.001")))] == 2
    assert got[("xskbroker_grant_duration_seconds_bucket", (*allow, ("le", "0.005")))] == 3
    assert got[("xskbroker_grant_duration_seconds_bucket", (*allow, ("le", "+Inf")))] == 3
    assert got[("xskbroker_grant_duration_seconds_count", allow)] == 3
    assert got[("xskbroker_grant_duration_seconds_sum", allow)] == pytest.approx(0.0043)
    assert text.endswith("\n") and "\n\n" not in text


def test_the_exposition_format_line_by_line() -> None:
    lines = status_view.prometheus(_metrics()).splitlines()
    assert lines[:3] == ["# HELP xskbroker_build_info The broker's version (always 1).",
                         "# TYPE xskbroker_build_info gauge", f'xskbroker_build_info{{version="{version()}"}} 1']
    assert "# TYPE xskbroker_grants_total counter" in lines  # format 0.0.4: a counter's family ends in _total
    i = lines.index("# TYPE xskbroker_grant_duration_seconds histogram")
    allow = [x for x in lines[i + 1:] if 'decision="allow"' in x]
    assert len(allow) == len(GRANT_BUCKETS) + 3  # each bound, +Inf, _sum, _count
    assert allow[-3:] == ['xskbroker_grant_duration_seconds_bucket{decision="allow",le="+Inf"} 3',
                          'xskbroker_grant_duration_seconds_sum{decision="allow"} 0.0043',
                          'xskbroker_grant_duration_seconds_count{decision="allow"} 3']


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.observe({"event": "grant", "decision": "deny", "code": 'we"ird\\co\nde', "ms": 1})
    got = samples(status_view.prometheus(m.snapshot([])))
    assert got[("xskbroker_grant_refusals_total", (("code", 'we"ird\\co\nde'),))] == 1


# ---- the table ------------------------------------------------------------------------------------------------

def test_the_table_lines_up_leases_interfaces_and_quotas() -> None:
    rig = make_rig(policy=parse_policy(POLICY + '\n[[quota]]\nname = "per-user"\nusers = ["*"]\nmax_queues = 8\n'))
    try:
        rig.grant(queues=(0, 1))
        rig.grant(queues=(3,))
        reply = decode_reply(rig.ask(ROOT, proto.Status()).reply.encode())  # type: ignore[union-attr]
        assert isinstance(reply, StatusReply)
        text = status_view.table(reply)
    finally:
        rig.service.close()
    lines = text.splitlines()
    assert lines[0].startswith("Broker ") and "2 granted, 0 refused" in lines[1]
    head = next(x for x in lines if x.lstrip().startswith("LEASE"))
    rows = lines[lines.index(head) + 1:lines.index(head) + 3]
    assert [r.split()[4] for r in rows] == ["0-1", "3"] and all(r.split()[5] == "bound" for r in rows)
    assert head.index("QUEUES") == rows[0].index("0-1")  # columns line up
    assert any(x.split()[:2] == ["veth0", "7"] for x in lines)  # the interface row: name, ifindex
    assert any(x.split()[:3] == ["per-user", "user", "0"] and "0/8" in x for x in lines)  # the caller's usage


@pytest.mark.parametrize("queues, text", [((), "-"), ((3,), "3"), ((0, 1, 2, 5, 7, 8), "0-2,5,7-8")])
def test_queue_ranges(queues: tuple[int, ...], text: str) -> None:
    assert status_view.queue_ranges(queues) == text


def test_sizes_durations_and_the_coarse_quantile() -> None:
    assert [status_view.size(n) for n in (0, 512, 4 << 20, 3 << 29)] == ["0B", "512B", "4MiB", "1.5GiB"]
    assert [status_view.duration(s) for s in (5.9, 125, 7322, 90000)] == ["5s", "2m05s", "2h02m", "1d01h"]
    h = HistogramInfo((0.001, 0.01), (1, 3), 0.0, 4)
    assert status_view.quantile(h, 0.5) == 0.01 and math.isinf(status_view.quantile(h, 0.99))


# ---- the service ----------------------------------------------------------------------------------------------

def test_the_service_counts_and_only_admins_see_metrics(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        assert rig.grant()[0]["ok"]
        assert rig.grant(queues=(1,))[0]["ok"]
        for _ in range(2):
            assert rig.grant(BOB)[0]["error"]["code"] == "user-not-allowed"
        rig.service.reload(parse_policy(POLICY), "/etc/p.toml")
        mine, _ = rig.reply(ALICE, proto.Status())
        admin, _ = rig.reply(ROOT, proto.Status())
    finally:
        rig.service.close()
    assert "metrics" not in mine  # a user sees their own leases and quotas, not the broker's counters
    m = admin["metrics"]
    assert m["grants"] == 2 and m["refusals"] == {"user-not-allowed": 2}
    assert m["grant_seconds"]["allow"]["count"] == 2 and m["grant_seconds"]["deny"]["count"] == 2
    assert m["leases"]["bound"] == len(admin["leases"]) and m["reloads"] == {"ok": 1, "failed": 0}
    assert m["pinned_bytes"] == sum(x["umem_bytes"] for x in admin["leases"]) > 0
    assert m["connections"] == 0  # no server around the service: nobody to count
    assert m["pool"]["pinned_bytes"] == rig.service.pool.pooled_bytes and m["rss_bytes"] > 0


def test_version_names_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    from xskbroker.broker import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"xskbroker {version()}\n"
    assert version()[0].isdigit()
