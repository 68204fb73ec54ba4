"""Prints the tables of BENCHMARKS.md from bench/results/*.json: each figure
as its median over the runs, with the runs' range in brackets when it was
measured more than once.

    python3 bench/summary.py [suite ...]
"""

import json
import pathlib
import statistics
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def get(d, path):
    for k in path.split("."):
        d = d[k]
    return d


def fig(d, path, unit="", digits=None):
    """The median at `path` in `d`, and the range over `d["runs"]`."""
    def fmt(v):
        if digits is not None:
            v = round(v, digits)
        if isinstance(v, float) and v.is_integer() and digits in (None, 0):
            v = int(v)
        return f"{v:,}" if isinstance(v, int) else f"{v}"
    median = get(d, path)
    runs = d.get("runs") or []
    if len(runs) > 1:
        values = [get(r, path) for r in runs]
        return f"{fmt(median)}{unit} ({fmt(min(values))}–{fmt(max(values))})"
    return f"{fmt(median)}{unit}"


def serving(d):
    print(f"Run of {d['machine']['date']}, {d['machine']['cpu']}, {d['machine']['cores']} cores\n")
    print("| measure | Ferry | MLServer | ratio (medians) |\n|---|---|---|---|")
    f, m = d["ferry"], d.get("mlserver")
    for c in ("c16", "c64"):
        fs, ms = f["saturation"][c], m["saturation"][c] if m else None
        ratio = f"**{fs['rps'] / ms['rps']:.1f}×**" if ms else ""
        print(f"| requests/s, {c[1:]} connections | {fig(fs, 'rps', digits=0)} | {fig(ms, 'rps', digits=0) if ms else ''} | {ratio} |")
    for rate, fr in f["fixed_rate"].items():
        mr = m["fixed_rate"][rate] if m else None
        ratio = f"{mr['p50_ms'] / fr['p50_ms']:.1f}× (p50)" if mr else ""
        print(f"| p50 / p99 at {rate[:-3]} req/s | {fig(fr, 'p50_ms')} / {fig(fr, 'p99_ms')} ms | "
              f"{(fig(mr, 'p50_ms') + ' / ' + fig(mr, 'p99_ms') + ' ms') if mr else ''} | {ratio} |")
    print(f"| resident memory after the run | {f['rss_mib']} MiB | {m['rss_mib'] if m else ''} MiB | "
          f"{m['rss_mib'] / f['rss_mib']:.1f}× less |" if m else "")


def routing(d):
    print(f"Run of {d['machine']['date']}, fixed rate {d['rate']} req/s\n")
    print("| route | CPU per request | p50 / p99 |\n|---|---|---|")
    for name, r in d["setups"].items():
        print(f"| {name} | {fig(r, 'cpu_us_per_request', ' µs')} | {fig(r, 'p50_ms')} / {fig(r, 'p99_ms')} ms |")


def gateways(d):
    print(f"Run of {d['machine']['date']}, fixed rate {d['rate']} req/s\n")
    print("| gateway | CPU per request | vs nginx | p50 / p99 | requests/s at 64 connections | upstream a / b |\n|---|---|---|---|---|---|")
    setups = d["setups"]
    nginx = {"split": setups.get("nginx split_clients 90/10"), "mirror": setups.get("nginx mirror 100%")}
    for name, r in setups.items():
        if not isinstance(r, dict) or "fixed_rate" not in r:
            continue
        ref = nginx["mirror"] if ("mirror" in name or "shadow" in name) else nginx["split"]
        vs = f"{r['cpu_us_per_request'] / ref['cpu_us_per_request']:.2f}×" if ref and "direct" not in name else ""
        fr = {**r["fixed_rate"], "runs": [x["fixed_rate"] for x in r.get("runs", [])]}
        a, b = r["upstream_a"], r["upstream_b"]
        split = f"{a:,.0f} / {b:,.0f} ({100 * b / max(a + b, 1):.1f} %)"
        if "body_lengths" in r:
            lengths = {k: v for side in r["body_lengths"].values() for k, v in side.items()}
            split += ", bodies " + ", ".join(f"{k} B ×{v:,}" for k, v in sorted(lengths.items()))
        print(f"| {name} | {fig(r, 'cpu_us_per_request', ' µs')} | {vs} | {fig(fr, 'p50_ms')} / {fig(fr, 'p99_ms')} ms | "
              f"{fig(r, 'saturation_c64_rps', digits=0)} | {split} |")


def batching(d):
    print(f"Run of {d['machine']['date']}\n")
    print("| server, batching | requests/s, 64 connections | CPU per request at saturation | p50 / p99 at 1,000 req/s |\n|---|---|---|---|")
    for name, r in d["setups"].items():
        s, f = r["saturation_c64"], r["fixed_1000rps"]
        print(f"| {name} | {fig(s, 'rps', digits=0)} | {fig(s, 'cpu_us_per_request', ' µs')} | {fig(f, 'p50_ms')} / {fig(f, 'p99_ms')} ms |")


def scale(d):
    f = d["figures"]
    print(f"Run of {d['machine']['date']}\n")
    one, many = f["one_model"], f["with_all_models"]
    sat = lambda x: fig(x["saturation_c64"], "rps", digits=0) if "saturation_c64" in x else f"{x['rps_c64']:,.0f}"
    print(f"| requests/s on one model, 64 connections: alone / among {f['models']:,} | {sat(one)} / {sat(many)} ({f['throughput_ratio']}×) |")
    print(f"| p50 / p99 at 1,000 req/s: alone / among all | {fig(one['fixed_1000rps'], 'p50_ms')} / {fig(one['fixed_1000rps'], 'p99_ms')} ms; "
          f"{fig(many['fixed_1000rps'], 'p50_ms')} / {fig(many['fixed_1000rps'], 'p99_ms')} ms |")
    for k in ("register_all_s", "mib_per_loaded_version", "kib_per_serving_version_windows_and_recent_ids", "restart_to_ready_s"):
        print(f"| {k} | {f[k]} |")


def control(d):
    print(f"Run of {d['machine']['date']}\n")
    f = d["figures"]
    for k, v in f.items():
        if k != "runs":
            print(f"| {k} | {fig(f, k) if isinstance(v, (int, float)) else v} |")


SUITES = {"serving": serving, "routing": routing, "gateways": gateways, "batching": batching, "scale": scale, "control": control}

if __name__ == "__main__":
    for suite in sys.argv[1:] or SUITES:
        path = RESULTS / f"{suite}.json"
        if not path.exists():
            continue
        print(f"\n### {suite}\n")
        SUITES[suite](json.loads(path.read_text()))
