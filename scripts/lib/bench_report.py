#!/usr/bin/env python3
"""Summarise scripts/bench.sh runs: median per contender and workload, one markdown table,
a JSON summary and an SVG picture (latency percentile curves at equal offered load, and
throughput bars). Standard library only."""

import argparse
import json
import statistics
import sys
from html import escape

ORDER = ["direct", "ringway", "haproxy", "nginx"]
COLORS = {"direct": "#888888", "ringway": "#d62728", "haproxy": "#1f77b4", "nginx": "#2ca02c"}
PCTS = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")]

# (key, label, better) ; better: "high", "low" or None
ROWS = [
    ("rr_rps", "rr: requests/s (closed loop)", "high"),
    ("rr_p50", "rr: latency p50 (µs)", "low"),
    ("rr_p99", "rr: latency p99 (µs)", "low"),
    ("rr_p999", "rr: latency p99.9 (µs)", "low"),
    ("rate_p50", "fixed rate: latency p50 (µs)", "low"),
    ("rate_p99", "fixed rate: latency p99 (µs)", "low"),
    ("rate_p999", "fixed rate: latency p99.9 (µs)", "low"),
    ("rate_rps", "fixed rate: achieved requests/s", None),
    ("rate_late_pct", "fixed rate: sends >1 ms behind schedule (%)", "low"),
    ("connect_cps", "connect: connections/s", "high"),
    ("connect_p99", "connect: latency p99 (µs)", "low"),
    ("down_gbps", "bulk down: Gbit/s", "high"),
    ("up_gbps", "bulk up: Gbit/s", "high"),
    ("rr_cpu_per_m", "proxy CPU s per 1M requests (rr)", "low"),
    ("connect_cpu_per_m", "proxy CPU s per 1M connections", "low"),
    ("down_cpu_per_gb", "proxy CPU s per GB (bulk down)", "low"),
    ("up_cpu_per_gb", "proxy CPU s per GB (bulk up)", "low"),
    ("idle_bytes_per_flow", "proxy RSS per idle flow (bytes)", "low"),
    ("idle_failed", "idle flows failed after the hold", "low"),
    ("errors", "errors (all runs)", "low"),
    ("unfinished", "of which unfinished at the end of a run (all runs)", "low"),
]


def metrics_of(run):
    """Per-run metrics (a dict of key -> number)."""
    r, w, m = run["result"], run["workload"], {}
    lat = r.get("latency_us", {})
    cpu = run.get("cpu_s")
    if w == "rr":
        m["rr_rps"] = r.get("rps")
        for k in ("p50", "p99", "p999"):
            m[f"rr_{k}"] = lat.get(k)
        if cpu is not None and r.get("ok"):
            m["rr_cpu_per_m"] = cpu / r["ok"] * 1e6
    elif w == "rate":
        m["rate_rps"] = r.get("rps")
        if r.get("ok"):
            m["rate_late_pct"] = r.get("late_sends", 0) / r["ok"] * 100
        for k in ("p50", "p90", "p99", "p999", "max"):
            m[f"rate_{k}"] = lat.get(k)
    elif w == "connect":
        m["connect_cps"] = r.get("cps")
        m["connect_p99"] = lat.get("p99")
        if cpu is not None and r.get("ok"):
            m["connect_cpu_per_m"] = cpu / r["ok"] * 1e6
    elif w in ("bulk-down", "bulk-up"):
        d = "down" if w == "bulk-down" else "up"
        m[f"{d}_gbps"] = r.get("gbps")
        gb = (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e9
        if cpu is not None and gb > 0:
            m[f"{d}_cpu_per_gb"] = cpu / gb
    elif w == "idle":
        flows = run.get("flows") or r.get("flows")
        if flows and "rss_ready_kb" in run:
            m["idle_bytes_per_flow"] = (run["rss_ready_kb"] - run["rss_before_kb"]) * 1024 / flows
        if "failed" in r:
            m["idle_failed"] = r["failed"]
    return {k: v for k, v in m.items() if v is not None}


def fmt(v, key):
    if v is None:
        return "–"
    if key in ("errors", "unfinished", "idle_failed"):
        return f"{v:.0f}"
    if key.endswith("gbps"):
        return f"{v:.2f}"
    if "cpu_per" in key:
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def svg(summary, meta):
    contenders = [c for c in ORDER if c in summary] + [c for c in summary if c not in ORDER]
    W, H = 980, 430
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    # panel 1: latency percentiles at the fixed rate (log y)
    x0, y0, pw, ph = 60, 50, 360, 300
    rate = meta.get("rate", "?")
    out.append(f'<text x="{x0}" y="25" font-size="14" font-weight="bold">'
               f'Latency at {escape(str(rate))} req/s offered (µs, log scale)</text>')
    vals = [summary[c].get(f"rate_{k}") for c in contenders for k, _ in PCTS]
    vals = [v for v in vals if v and v > 0]
    import math
    lo = 10 ** math.floor(math.log10(min(vals))) if vals else 1
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 1000
    if hi <= lo:
        hi = lo * 10

    def ly(v):
        return y0 + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
    d = lo
    while d <= hi * 1.0001:
        y = ly(d)
        out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{d:g}</text>')
        d *= 10
    n = len(PCTS)
    for i, (_, label) in enumerate(PCTS):
        x = x0 + (i + 0.5) * pw / n
        out.append(f'<text x="{x:.1f}" y="{y0 + ph + 18}" text-anchor="middle">{label}</text>')
    for ci, c in enumerate(contenders):
        pts = []
        for i, (k, _) in enumerate(PCTS):
            v = summary[c].get(f"rate_{k}")
            if v and v > 0:
                pts.append((x0 + (i + 0.5) * pw / n, ly(v)))
        if pts:
            col = COLORS.get(c, "#9467bd")
            out.append('<polyline fill="none" stroke-width="2" stroke="%s" points="%s"/>'
                       % (col, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')
        ly_ = y0 + 15 + ci * 16
        out.append(f'<rect x="{x0 + 10}" y="{ly_ - 9}" width="10" height="10" fill="{COLORS.get(c, "#9467bd")}"/>'
                   f'<text x="{x0 + 25}" y="{ly_}">{escape(c)}</text>')
    # panel 2: throughput bars, one small chart per metric
    bars = [("rr_rps", "rr kreq/s", 1e-3), ("connect_cps", "connect kconn/s", 1e-3),
            ("down_gbps", "bulk down Gbit/s", 1), ("up_gbps", "bulk up Gbit/s", 1)]
    bx0, bw = 480, 110
    out.append(f'<text x="{bx0}" y="25" font-size="14" font-weight="bold">Throughput (median)</text>')
    for bi, (key, label, scale) in enumerate(bars):
        gx = bx0 + bi * (bw + 12)
        vals = [(c, summary[c].get(key)) for c in contenders]
        top = max([v for _, v in vals if v] or [1]) * scale
        out.append(f'<text x="{gx + bw / 2}" y="{y0 + ph + 18}" text-anchor="middle">{label}</text>')
        out.append(f'<line x1="{gx}" x2="{gx + bw}" y1="{y0 + ph}" y2="{y0 + ph}" stroke="#999"/>')
        slot = bw / max(1, len(vals))
        for i, (c, v) in enumerate(vals):
            if not v:
                continue
            h = v * scale / top * (ph - 20)
            x = gx + i * slot + 3
            out.append(f'<rect x="{x:.1f}" y="{y0 + ph - h:.1f}" width="{slot - 6:.1f}" height="{h:.1f}" '
                       f'fill="{COLORS.get(c, "#9467bd")}"/>')
            out.append(f'<text x="{x + (slot - 6) / 2:.1f}" y="{y0 + ph - h - 4:.1f}" text-anchor="middle" '
                       f'font-size="10">{v * scale:.1f}</text>')
    foot = (f'{meta.get("cpu", "")} ×{meta.get("ncpu", "?")}, kernel {meta.get("kernel", "")}; '
            f'{meta.get("workers", "?")} proxy worker(s) on CPU {meta.get("proxy_cpus", "?")}, load on CPU '
            f'{meta.get("client_cpus", "?")}; median of {meta.get("repeats", "?")} × {meta.get("duration_s", "?")} s')
    out.append(f'<text x="{x0}" y="{H - 20}" font-size="11" fill="#555">{escape(foot)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out-prefix", required=True)
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    meta = dict(m.split("=", 1) for m in a.meta)
    runs = [json.loads(l) for l in open(a.runs) if l.strip()]
    per = {}
    errors = {}
    unfinished = {}
    for run in runs:
        c = run["contender"]
        errors[c] = errors.get(c, 0) + int(run["result"].get("errors", 0) or 0)
        unfinished[c] = unfinished.get(c, 0) + int(run["result"].get("unfinished", 0) or 0)
        if run.get("rc", 0) != 0 and not run["result"]:
            errors[c] += 1
        for k, v in metrics_of(run).items():
            per.setdefault(c, {}).setdefault(k, []).append(v)
    summary = {c: {k: statistics.median(v) for k, v in ms.items()} for c, ms in per.items()}
    for c in errors:
        summary.setdefault(c, {})["errors"] = errors[c]
        summary[c]["unfinished"] = unfinished[c]
    contenders = [c for c in ORDER if c in summary] + [c for c in summary if c not in ORDER]
    ratios = []
    if "ringway" in summary:
        ratios = [o for o in ("haproxy", "nginx", "direct") if o in summary]

    head = ["metric"] + contenders + [f"Ringway/{o if o != 'haproxy' else 'HAProxy'}" for o in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in ROWS:
        if not any(key in summary[c] for c in contenders):
            continue
        row = [label] + [fmt(summary[c].get(key), key) for c in contenders]
        row += [ratio(summary["ringway"].get(key), summary[o].get(key)) for o in ratios]
        lines.append("| " + " | ".join(row) + " |")
    if "ringway" not in summary:
        lines.append("")
        lines.append("Ringway: pending (the binary was not available for this run).")
    table = "\n".join(lines)
    md = (f"Machine: {meta.get('cpu', '?')}, {meta.get('ncpu', '?')} vCPUs, kernel {meta.get('kernel', '?')}; "
          f"HAProxy {meta.get('haproxy', '?')}, nginx {meta.get('nginx', '?')}, ringway at {meta.get('ringway_rev', '?')}.\n"
          f"Proxy: {meta.get('workers', '?')} worker(s) pinned to CPU {meta.get('proxy_cpus', '?')}; load generator and "
          f"backends pinned to CPU {meta.get('client_cpus', '?')}. Median of {meta.get('repeats', '?')} runs of "
          f"{meta.get('duration_s', '?')} s per workload, contenders interleaved. rr: {meta.get('conns', '?')} connections, "
          f"64-byte echo; fixed rate: {meta.get('rate', '?')} req/s offered to every contender; bulk: "
          f"{meta.get('bulk_streams', '?')} streams; idle: {meta.get('idle_flows', '?')} flows from "
          f"{meta.get('sources', '?')}.\n\n{table}\n")
    with open(a.out_prefix + ".md", "w") as f:
        f.write(md)
    with open(a.out_prefix + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": len(runs)}, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(a.out_prefix + ".svg", "w") as f:
        f.write(svg(summary, meta))
    print(md)


if __name__ == "__main__":
    sys.exit(main())
