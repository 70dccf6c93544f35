"""`make bench`: run every benchmark, print one table, write bench/results.json and the latency plot."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _machine() -> str:
    return f"{platform.node() and 'this host'}: {os.cpu_count()} CPUs, Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


def _rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for size, g in r["grant_latency"].items():
        b, d = g["brokered_ms"], g["direct_ms"]
        rows.append((f"grant latency {size} p50", f"{b['p50']:.2f} ms", f"{d['p50']:.2f} ms", f"{g['ratio_p50']:.2f}"))
        rows.append((f"grant latency {size} p99", f"{b['p99']:.2f} ms", f"{d['p99']:.2f} ms",
                     f"{g['ratio_p99']:.2f} (p99/p50 {g['p99_over_p50']:.2f})"))
    for n, t in r["throughput"].items():
        if n == "hello_during_1gib_grant":
            h, g = t["hello_ms"], t["big_grant_ms"]
            rows.append(("others' hello during a 1 GiB grant, p50 / p99", f"{h['p50']:.2f} / {h['p99']:.2f} ms",
                         f"1 GiB grant {g['p50']:.0f} ms" if g else "", f"p99 {h['p99']:.2f} ms (goal 5)"))
            continue
        rows.append((f"grant+release, {n} clients", f"{t['brokered_grants_per_s']:.0f}/s",
                     f"{t['direct_grants_per_s']:.0f}/s", f"{t['ratio']:.2f}"))
    c = r.get("cold_start")
    if c:
        rows.append(("start to READY=1", f"{c['start_to_ready_ms']:.1f} ms",
                     f"{c['interpreter_start_ms']:.1f} ms (python -c pass)", f"{c['ready_over_interpreter']:.2f}"))
        rows.append(("import xskbroker.broker.daemon", f"{c['import_ms']:.1f} ms", "", ""))
        rows.append(("socket activation to first grant (1 MiB)", f"{c['activation_to_first_grant_ms']:.1f} ms",
                     f"{c['warm_grant_ms']:.1f} ms (warm broker)", f"{c['first_over_warm']:.2f}"))
    for way in ("rx_pps", "tx_pps"):
        d = r["datapath"][way]
        rows.append((f"{way[:2].upper()} pps, brokered vs self-made socket", f"{d['brokered']:,.0f}",
                     f"{d['self_made']:,.0f}", f"{d['ratio']:.3f}"))
        rows.append((f"{way[:2].upper()} pps, client library vs AF_PACKET", f"{d['brokered']:,.0f}",
                     f"{d['af_packet']:,.0f}", f"{d['library_over_af_packet']:.2f}"))
    return rows


def table(r: dict[str, Any]) -> str:
    lines = ["| benchmark | measured | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(r)]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no plot (pip install '.[bench]')", file=sys.stderr)
        return False
    sizes = list(r["grant_latency"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True)
    for ax, size in zip(axes, sizes, strict=True):
        g = r["grant_latency"][size]
        for label, key in (("brokered", "samples_brokered"), ("direct", "samples_direct")):
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
    from bench import cold_start, datapath, grant_latency, throughput

    started = time.monotonic()
    results: dict[str, Any] = {"machine": _machine()}
    for name, fn in (("grant_latency", grant_latency.run), ("throughput", throughput.run),
                     ("cold_start", cold_start.run), ("datapath", datapath.run)):
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
