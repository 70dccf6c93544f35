"""`make bench`: run every benchmark, print one table, write bench/results.json and the latency plot."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.grant_latency import CPU_WAIT_MS

HERE = Path(__file__).resolve().parent


def _machine() -> str:
    return f"{platform.node() and 'this host'}: {os.cpu_count()} CPUs, Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


Row = tuple[str, str, str, str, str, str]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _near(value: float, bound: float) -> str:
    """value to two decimals, or three where two would print the goal's own bound (1.003 is not <= 1.00)."""
    two = f"{value:.2f}"
    return f"{value:.3f}" if two == f"{bound:.2f}" and value != bound else two


def _goal(value: float, bound: float, at_most: bool, fmt: str = "{:.2f}") -> tuple[str, str]:
    """The goal as text and whether VALUE meets it."""
    return ("≤ " if at_most else "≥ ") + fmt.format(bound), _met(value <= bound if at_most else value >= bound)


def _rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size, g in r.get("grant_latency", {}).items():
        if size == "floor":  # not a size: what any request costs here before its own work (grant_latency.floor)
            rows.append((f"… floor: a hello round trip after the grants' {g['pause_ms']:.0f} ms pause / back to back",
                         f"{g['hello_after_pause_ms']:.2f} / {g['hello_back_to_back_ms']:.2f} ms",
                         f"SEQPACKET ping-pong: {g['pingpong_after_pause_ms']:.3f} / "
                         f"{g['pingpong_back_to_back_ms']:.3f} ms", "", "", ""))
            continue
        d = g["direct_ms"]
        # two ways a client grants (bench.grant_latency): a new connection each time, or one kept open
        for way, key, pre in (("new connection", "brokered_ms", ""), ("one connection", "one_connection_ms",
                                                                       "one_connection_")):
            if key not in g:
                continue
            b = g[key]
            rows.append((f"grant latency {size} p50, {way}", f"{b['p50']:.2f} ms", f"{d['p50']:.2f} ms",
                         _near(g[pre + "ratio_p50"], 1.0), *_goal(g[pre + "ratio_p50"], 1.0, True)))
            rows.append((f"grant latency {size} p99, {way}", f"{b['p99']:.2f} ms", f"{d['p99']:.2f} ms",
                         f"{g[pre + 'ratio_p99']:.2f} (p99/p50 {_near(g[pre + 'p99_over_p50'], 1.5)})",
                         *_goal(g[pre + "p99_over_p50"], 1.5, True, "{:.1f} × p50")))
            tail = g.get(pre + "tail_cpu_wait")
            if tail and g[pre + "p99_over_p50"] > 1.5:  # a goal not met: say what held the slow ones up
                rows.append((f"… its tail: samples over 1.5 × p50 / of them, the broker's loop and the client kept "
                             f"from a CPU ≥ {CPU_WAIT_MS} ms", f"{tail['tail']} of {tail['of']} / {tail['held_up']}",
                             "", "", "", ""))
    for n, t in r.get("throughput", {}).items():
        if n == "hello_during_1gib_grant":
            h, big = t["hello_ms"], t["big_grant_ms"]
            rows.append(("others' hello during a 1 GiB grant, p50 / p99", f"{h['p50']:.2f} / {h['p99']:.2f} ms",
                         f"1 GiB grant {big['p50']:.0f} ms" if big else "", "",
                         *_goal(h["p99"], 5.0, True, "{:.0f} ms p99")))
            continue
        goal = _goal(t["ratio"], 0.9, False) if str(n) == "32" else ("", "")
        rows.append((f"grant+release, {n} clients", f"{t['brokered_grants_per_s']:.0f}/s",
                     f"{t['direct_grants_per_s']:.0f}/s", _near(t["ratio"], 0.9), *goal))
        cpu = t.get("brokered_cpu_ms_per_op")
        if cpu and str(n) == "32":
            rows.append(("… CPU per grant+release: clients / broker / its helpers (direct: its threads)",
                         f"{cpu['clients']:.2f} / {cpu['broker']:.2f} / {cpu['helpers']:.2f} ms",
                         f"{t['direct_cpu_ms_per_op']:.2f} ms", "", "", ""))
        bm, dm = t.get("brokered_machine"), t.get("direct_machine")
        if bm and dm and str(n) == "32":
            rows.append(("… the whole machine: CPUs busy / user + system ms per grant+release, every process and "
                         "kernel thread / taken by the host (steal)",
                         f"{bm['busy_share']:.0%} / {bm['user_ms_per_op']:.2f} + {bm['system_ms_per_op']:.2f} ms / "
                         f"{bm['steal_share']:.0%}",
                         f"{dm['busy_share']:.0%} / {dm['user_ms_per_op']:.2f} + {dm['system_ms_per_op']:.2f} ms / "
                         f"{dm['steal_share']:.0%}", "", "", ""))
    c = r.get("cold_start")
    if c:
        u = c.get("unit") or {}
        if "total_ms" in u:
            rows.append(("activation to first grant, shipped unit (systemd 252 PID 1)", f"{u['total_ms']:.1f} ms",
                         f"{u['total_min_ms']:.1f} ms (fastest of {len(u['rounds'])})", "",
                         *_goal(u["total_ms"], 100, True, "{:.0f} ms")))
            rows.append(("… its parts: connect→fork / sandbox / interpreter / imports / →READY / READY→grant",
                         f"{u['connect_to_fork_ms']:.0f} / {u['sandbox_setup_ms']:.0f} / "
                         f"{u['interpreter_start_ms']:.0f} / {u['imports_ms']:.0f} / "
                         f"{u['fork_to_ready_ms']:.0f} / {u['ready_to_granted_ms'] + u['granted_to_fds_ms']:.0f} ms",
                         "", "", "", ""))
            rows.append(("… the broker's CPU time to it (sandbox set-up included) / its wait for a CPU",
                         f"{u['broker_cpu_ms']:.0f} / {u['broker_run_delay_ms']:.0f} ms",
                         f"{u['total_less_run_delay_ms']:.1f} ms (wall less the wait)", "", "", ""))
        elif u:
            rows.append(("activation to first grant, shipped unit", f"skipped: {u.get('skipped')}", "", "",
                         "≤ 100 ms", "not measured"))
        rows.append(("start to READY=1 (no sandbox)", f"{c['start_to_ready_ms']:.1f} ms",
                     f"{c['interpreter_start_ms']:.1f} ms (python -c pass)", f"{c['ready_over_interpreter']:.2f}",
                     "", ""))
        rows.append(("socket activation to first grant, no sandbox (1 MiB)",
                     f"{c['activation_to_first_grant_ms']:.1f} ms", f"{c['warm_grant_ms']:.1f} ms (warm broker)",
                     f"{c['first_over_warm']:.2f}", "", ""))
    for way in ("rx_pps", "tx_pps"):
        d = r.get("datapath", {}).get(way)
        if not d:
            continue
        name = way[:2].upper()
        couples = len(d.get("pair_ratios", ())) // 2
        rows.append((f"{name} pps, brokered vs self-made socket (median of {couples} order-balanced couples of "
                     f"paired runs)",
                     f"{d['brokered']:,.0f}", f"{d['self_made']:,.0f}", f"{d['ratio']:.3f}",
                     *_goal(d["ratio"], 0.98, False)))
        if "c_ref" in d:
            rows.append((f"{name} pps, client library vs C (libxdp xsk.h)", f"{d['brokered']:,.0f}",
                         f"{d['c_ref']:,.0f}", f"{d['library_over_c']:.2f}", "reported", ""))
        elif "c_ref_missing" in r["datapath"]:  # said, not left out: the table claims a C reference
            rows.append((f"{name} pps, client library vs C (libxdp xsk.h)",
                         f"skipped: {r['datapath']['c_ref_missing']}", "", "", "reported", "not measured"))
        rows.append((f"{name} pps, client library vs AF_PACKET", f"{d['brokered']:,.0f}", f"{d['af_packet']:,.0f}",
                     f"{d['library_over_af_packet']:.2f}", "", ""))
    m = r.get("memory")
    if m:
        conn, lease = m["connections"], m["leases"]
        rows.append(("broker RSS, idle", f"{conn['idle']['VmRSS'] / 2**20:.1f} MiB", "", "", "", ""))
        rows.append((f"broker RSS per idle connection (slope to {conn['n']})",
                     f"{conn['per_connection']['VmRSS'] / 1024:.2f} KiB", "", "",
                     *_goal(conn["per_connection"]["VmRSS"] / 1024, 4, True, "{:.0f} KiB")))
        rows.append((f"broker RSS per lease (slope to {lease['n']})", f"{lease['per_lease']['VmRSS'] / 1024:.2f} KiB",
                     "", "", *_goal(lease["per_lease"]["VmRSS"] / 1024, 8, True, "{:.0f} KiB")))
    return rows


def table(r: dict[str, Any]) -> str:
    lines = ["| benchmark | measured | baseline (same run) | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(r)]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plot (pip install '.[bench]')", file=sys.stderr)
        return False
    sizes = [s for s in r["grant_latency"] if s != "floor"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True)
    for ax, size in zip(axes, sizes, strict=True):
        g = r["grant_latency"][size]
        for label, key in (("brokered, new connection", "samples_brokered"),
                           ("brokered, one connection", "samples_one_connection"), ("direct", "samples_direct")):
            if key not in g:
                continue
            xs = sorted(g[key])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
        ax.set_title(f"grant latency, UMEM {size}")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of grants")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, XDP, AF_XDP)", file=sys.stderr)
        return 2
    os.environ.setdefault("LIBXDP_SKIP_DISPATCHER", "1")
    from bench import cold_start, datapath, grant_latency, memory, throughput

    started = time.monotonic()
    results: dict[str, Any] = {"machine": _machine()}
    for name, fn in (("grant_latency", grant_latency.run), ("throughput", throughput.run),
                     ("cold_start", cold_start.run), ("datapath", datapath.run), ("memory", memory.run)):
        t = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()
        print(f"bench: {name} done in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    plotted = plot(results, HERE / "grant_latency.png")
    print(f"machine: {results['machine']}")
    print(table(results))
    print(f"\nwritten: bench/results.json{', bench/grant_latency.png' if plotted else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
