"""`xskbroker status` against a real broker after real grants, refusals and reloads: the Prometheus text it
prints is read by Prometheus's own parser and must count exactly what happened; a user who is not an admin
gets no broker-wide metrics; the table names the live lease."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from xskbroker.broker import cli as broker_cli
from xskbroker.client import status_view  # noqa: F401 - loaded before a child drops privileges
from xskbroker.testbed.sandbox import BrokerProcess, spawn_unprivileged

from .conftest import CONSUMER_UID, STRANGER_UID, wait_for
from .consumers import hold_grant, try_grant

broker_cli.build_parser()  # the subcommands' modules too: an unprivileged child may not read this tree

ROOT = Path(__file__).resolve().parents[2]


def _xskbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xskbroker.broker", *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _status_as_user(path: str, *args: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = broker_cli.main(["status", "--socket", path, *args])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _reload(b: BrokerProcess, event: str) -> None:
    before = sum(r.get("event") == event for r in b.records())
    b.signal(signal.SIGHUP)
    wait_for(lambda: sum(r.get("event") == event for r in b.records()) > before, what=event)


def test_scraped_metrics_count_what_happened(broker: BrokerProcess, tmp_path: Path, figures) -> None:  # type: ignore[no-untyped-def]
    started = time.time()
    for queue in (0, 1):  # two grants, each released when the consumer is done
        assert spawn_unprivileged(try_grant, broker.socket_path, "xsk0", [queue], uid=CONSUMER_UID).result()["ok"]
    for _ in range(2):
        refused = spawn_unprivileged(try_grant, broker.socket_path, "xsk0", [0], uid=STRANGER_UID).result()
        assert refused["code"] == "user-not-allowed"
    holder = spawn_unprivileged(hold_grant, broker.socket_path, "xsk0", [0], 30.0, uid=CONSUMER_UID)
    try:
        wait_for(lambda: sum(r.get("event") == "grant" for r in broker.records()) == 5, what="the third grant")
        wait_for(lambda: len(json.loads(_xskbroker("status", "--json", "--socket", broker.socket_path).stdout)
                             ["leases"]) == 1, what="only the held lease left")
        _reload(broker, "policy-reloaded")
        policy = Path(broker.policy_path)
        good = policy.read_text()
        policy.write_text("version = 1\n[[allow]\n")  # broken TOML: the reload fails, the old policy stays
        _reload(broker, "policy-reload-failed")
        policy.write_text(good)

        scrape = _xskbroker("status", "--format", "prometheus", "--socket", broker.socket_path)
        assert scrape.returncode == 0, scrape.stderr
        got = _samples(scrape.stdout)  # raises on anything Prometheus's parser would not take
        status = json.loads(_xskbroker("status", "--json", "--socket", broker.socket_path).stdout)
        out_file = tmp_path / "xsk12m-metrics.prom"
        written = _xskbroker("status", "--format", "prometheus", "--output", str(out_file),
                             "--socket", broker.socket_path)
        assert written.returncode == 0 and written.stdout == "", written.stderr
        table = _xskbroker("status", "--socket", broker.socket_path)
        as_user = spawn_unprivileged(_status_as_user, broker.socket_path, "--format", "prometheus",
                                     uid=CONSUMER_UID).result()
        own = spawn_unprivileged(_status_as_user, broker.socket_path, uid=CONSUMER_UID).result()
    finally:
        holder.kill()

    assert got[("xskbroker_grants_total", ())] == 3
    assert got[("xskbroker_grant_refusals_total", (("code", "user-not-allowed"),))] == 2
    assert sum(v for (name, _), v in got.items() if name == "xskbroker_grant_refusals_total") == 2
    assert got[("xskbroker_leases", (("kind", "bound"),))] == 1
    assert got[("xskbroker_leases", (("kind", "bare"),))] == 0 and got[("xskbroker_leases", (("kind", "map"),))] == 0
    (lease,) = status["leases"]
    assert got[("xskbroker_pinned_umem_bytes", ())] == lease["umem_bytes"] > 4 << 20  # UMEM and rings
    assert got[("xskbroker_connections", ())] >= 1  # the scrape's own, and the holder's if it kept one open
    assert got[("xskbroker_grant_duration_seconds_count", (("decision", "allow"),))] == 3
    assert got[("xskbroker_grant_duration_seconds_bucket", (("decision", "allow"), ("le", "+Inf")))] == 3
    assert got[("xskbroker_grant_duration_seconds_count", (("decision", "deny"),))] == 2
    assert 0 < got[("xskbroker_grant_duration_seconds_sum", (("decision", "allow"),))] < 3
    assert got[("xskbroker_policy_reloads_total", (("result", "ok"),))] == 1
    assert got[("xskbroker_policy_reloads_total", (("result", "failed"),))] == 1
    assert started - 30 < got[("xskbroker_start_time_seconds", ())] <= started
    assert got[("xskbroker_uptime_seconds", ())] > 0
    # the audit trail and the metrics count the same decisions
    decisions = [r for r in broker.records() if r.get("event") == "grant"]
    assert sum(r["decision"] == "allow" for r in decisions) == 3 and len(decisions) == 5

    assert _samples(out_file.read_text())[("xskbroker_grants_total", ())] == 3
    assert oct(out_file.stat().st_mode & 0o777) == "0o644"
    assert not [p for p in tmp_path.iterdir() if p != out_file]  # no temporary file left beside it

    assert table.returncode == 0 and lease["lease"] in table.stdout and "LEASE" in table.stdout
    assert "3 granted, 2 refused (user-not-allowed 2)" in table.stdout

    assert as_user["code"] == 1 and as_user["out"] == "" and "not-admin" in as_user["err"]
    assert own["code"] == 0 and "Leases (yours): 1" in own["out"] and "Broker" not in own["out"]
    figures(grants=3, refusals=2, live_leases=1, scrape_lines=len(scrape.stdout.splitlines()),
            grant_latency_sum_ms=round(got[("xskbroker_grant_duration_seconds_sum", (("decision", "allow"),))]
                                       * 1000, 3))

