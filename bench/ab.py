"""Back-to-back A/B of Ferry builds, for "then make it fast" work: the same
load on nginx (the reference, in the gateway modes) and on each build given,
interleaved round by round so a noisy machine moves them all alike. Prints
per target and round: CPU µs per request (the server's own accounting),
p50 / p99 ms, voluntary / involuntary context switches per request, and
resident memory (VmRSS, all the target's processes) after the round.

    python3 bench/ab.py [--mode stable|split|shadow|local] [--rate 2000]
                        [--seconds 5] [--rounds 3] [--perf] [--syscalls] [--allocs]
                        FERRY_BINARY...

Modes: `stable`, `split` (90/10) and `shadow` (100 %, compared on label)
put each build in front of two fixed-response nginx upstreams as
bench/gateways.py does, beside nginx `split_clients` (or `mirror` for
`shadow`); `local` serves cancer-v1 in-process (no nginx). In `shadow` mode each
gateway is also measured with the shadow off (nginx: a server without
`mirror`; Ferry: a second model routed to the same upstream, in the same
process), interleaved, and the primary's p99 on / off is printed.
`--rate 0` runs
at saturation (64 connections). `--perf` records a profile of each target
(`perf record -g`, into the temporary directory, printed at the end);
`--syscalls` counts each target's system calls per request by name
(`perf stat` on the syscall tracepoints, the ones a request path makes);
`--allocs` counts heap allocations per request (probes on libc's `malloc`,
`calloc`, `realloc`, `posix_memalign`; exact, so unmoved by a noisy host).
Servers run on CPU 0 and oha on CPU 1, as in bench/run.sh (`--upstreams-cpu
1` moves the two upstreams beside oha); run that once
first (it installs oha and builds Ferry).
"""

import argparse
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import bench
import gateways

ROOT = pathlib.Path(__file__).resolve().parent.parent


def switches(pids):
    """Voluntary and involuntary context switches of every thread of `pids`."""
    total = [0, 0]
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            for line in open(status):
                if line.startswith("voluntary_ctxt"):
                    total[0] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt"):
                    total[1] += int(line.split()[1])
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--mode", choices=["stable", "split", "shadow", "local"], default="stable")
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--syscalls", action="store_true",
                    help="count each target's system calls per request, by name (perf stat)")
    ap.add_argument("--perf-event", help="with --perf: record every EVENT (e.g. probe_libc:malloc, after a run "
                                         "with --allocs made the probe) instead of sampling cycles")
    ap.add_argument("--allocs", action="store_true",
                    help="count each target's heap allocations per request (perf probes on libc's malloc family)")
    ap.add_argument("--upstreams-cpu", default="0",
                    help="the CPU of the two fixed-response upstreams (default 0, beside the gateways; 1 puts "
                         "them beside the load generator, so a gateway's core runs the gateway alone)")
    ap.add_argument("--oha", default=str(ROOT / "bench/.tools/bin/oha"))
    args = ap.parse_args()
    args.sut_cpus, args.load_cpus = "0", "1"
    bench.ARGS = args
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ferry-ab-"))
    row = json.loads((ROOT / "examples/models/cancer-holdout.jsonl").read_text().splitlines()[0])
    row.pop("label")
    body = tmp / "body.json"
    body.write_text(json.dumps(row))
    procs, targets = [], []
    ferry_urls = set()

    def dropped_copies(url):
        """Shadow copies Ferry dropped so far (`ferry_shadow_dropped_total`),
        for a Ferry target in `shadow` mode; None otherwise."""
        base, _, path = url.partition("/v2/models/")
        if args.mode != "shadow" or not path.startswith("cancer/") or base not in ferry_urls:
            return None
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            # One series per version (the stable's is 0): their sum.
            return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith("ferry_shadow_dropped_total{") and 'model="cancer"' in line)

    def rss_kib(pid):
        """Resident memory of a process, KiB (VmRSS)."""
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def measure(url, pids):
        dropped_before = dropped_copies(url)
        before_switches = switches(pids)
        before = sum(bench.cpu_seconds(p) for p in pids)
        if args.rate:
            load = ["-c", "8", "-q", str(args.rate), "--latency-correction", "-z", f"{args.seconds}s"]
        else:
            load = ["-c", "64", "-z", f"{args.seconds}s"]
        r = bench.oha(args, url, body, load)
        cpu = sum(bench.cpu_seconds(p) for p in pids) - before
        after = switches(pids)
        n = max(r["ok"], 1)
        result = {
            "cpu_us": round(cpu / n * 1e6, 1), "rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "switches": (round((after[0] - before_switches[0]) / n, 2), round((after[1] - before_switches[1]) / n, 2)),
            "rss_mib": round(sum(rss_kib(p) for p in pids) / 1024, 1),
        }
        if dropped_before is not None:
            result["copies_dropped_pct"] = round((dropped_copies(url) - dropped_before) / n * 100, 1)
        return result

    try:
        if args.mode != "local":
            ua, ub = gateways.free_port(), gateways.free_port()
            args.sut_cpus = args.upstreams_cpu
            ups = gateways.start_nginx(bench, tmp, "upstreams", gateways.upstream_server(ua, "a", tmp / "a.log")
                                       + gateways.upstream_server(ub, "b", tmp / "b.log"))
            args.sut_cpus = "0"
            procs.append(ups)
            bench.wait_http(f"http://127.0.0.1:{ua}/v2/models/cancer/ready")
            gp = gateways.free_port()
            pools = f"""
  upstream a {{ server 127.0.0.1:{ua}; keepalive 64; }}
  upstream b {{ server 127.0.0.1:{ub}; keepalive 64; }}"""
            proxy = 'proxy_http_version 1.1; proxy_set_header Connection "";'
            if args.mode == "shadow":
                off = gateways.free_port()
                conf = pools + f"""
  server {{ listen 127.0.0.1:{gp};
    location / {{ mirror /mirror; mirror_request_body on; proxy_pass http://a; {proxy} }}
    location = /mirror {{ internal; proxy_pass http://b$request_uri; {proxy} }} }}
  server {{ listen 127.0.0.1:{off}; location / {{ proxy_pass http://a; {proxy} }} }}"""
            else:
                split = "90% a; * b;" if args.mode == "split" else "* a;"
                conf = pools + f"""
  split_clients "$request_id" $pool {{ {split} }}
  server {{ listen 127.0.0.1:{gp}; location / {{ proxy_pass http://$pool; {proxy} }} }}"""
            nginx = gateways.start_nginx(bench, tmp, "gateway", conf)
            procs.append(nginx)
            time.sleep(0.5)
            workers = subprocess.run(["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()
            targets.append(("nginx", f"http://127.0.0.1:{gp}/v2/models/cancer/infer", [nginx.pid, *map(int, workers)]))
            if args.mode == "shadow":
                targets.append(("nginx (shadow off)", f"http://127.0.0.1:{off}/v2/models/cancer/infer",
                                [nginx.pid, *map(int, workers)]))
        for i, binary in enumerate(args.binaries):
            data = tmp / f"data{i}"
            ferry = bench.start([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                                env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True)
            procs.append(ferry)
            url = ferry.stdout.readline().strip().removeprefix("ferry listening on ")
            bench.wait_http(f"{url}/v2/health/ready")
            cli = [binary, "--server", url, "--token", (data / "admin-token").read_text().strip()]

            def add(version, *source, model="cancer"):
                subprocess.run([*cli, "model", "add", model, version, *source], check=True, capture_output=True)

            if args.mode == "local":
                add("1", "--file", str(ROOT / "examples/models/cancer-v1.onnx"))
            else:
                add("a", "--url", f"http://127.0.0.1:{ua}")
                add("b", "--url", f"http://127.0.0.1:{ub}")
                policy = {
                    "stable": {"stable": "a"},
                    "split": {"stable": "a", "candidate": {"version": "b", "weight": 10}},
                    "shadow": {"stable": "a", "shadow": {"version": "b", "percent": 100, "compare": {"output": "label"}}},
                }[args.mode]
                bench.api(url, (data / "admin-token").read_text().strip(), "PUT", "/api/v1/models/cancer/route", policy)
            targets.append((f"{i}: {binary}", f"{url}/v2/models/cancer/infer", [ferry.pid]))
            ferry_urls.add(url)
            if args.mode == "shadow":
                add("a", "--url", f"http://127.0.0.1:{ua}/v2/models/cancer", model="off")
                bench.api(url, (data / "admin-token").read_text().strip(), "PUT", "/api/v1/models/off/route",
                          {"stable": "a"})
                targets.append((f"{i}: {binary} (shadow off)", f"{url}/v2/models/off/infer", [ferry.pid]))
        for _, url, _ in targets:
            bench.oha(args, url, body, ["-c", "8", "-z", "1s"])  # warm-up
        runs = {name: [] for name, _, _ in targets}
        for _ in range(args.rounds):
            for name, url, pids in targets:
                runs[name].append(measure(url, pids))
        for name, results in runs.items():
            cpu = statistics.median(r["cpu_us"] for r in results)
            print(f"{name}: CPU {cpu} µs per request (median of {len(results)})", flush=True)
            for r in results:
                print(f"    {r}", flush=True)
        if args.mode == "shadow":
            for name, _, _ in targets:
                if f"{name} (shadow off)" in runs:
                    on = statistics.median(r["p99_ms"] for r in runs[name])
                    off = statistics.median(r["p99_ms"] for r in runs[f"{name} (shadow off)"])
                    print(f"{name}: primary p99 with the shadow on / off {on} / {off} ms ({(on / off - 1) * 100:+.0f} %)",
                          flush=True)
        def count(what, events, short):
            """Counts `events` per request for each target (perf stat)."""
            for name, url, pids in targets:
                out = tmp / f"{what}-{len(name)}-{pids[0]}.csv"
                rec = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events),
                                        "-p", ",".join(map(str, pids))],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                r = measure(url, pids)
                rec.send_signal(2)
                rec.wait()
                n = max(r["rps"] * args.seconds, 1)
                counts = {}
                for line in out.read_text().splitlines():
                    cols = line.split(",")
                    if len(cols) > 2 and cols[0].strip().isdigit():
                        counts[short(cols[2])] = int(cols[0])
                total = sum(counts.values()) / n
                shown = ", ".join(f"{c} {v / n:.2f}" for c, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v / n >= 0.01)
                print(f"{name}: {total:.2f} {what} per request: {shown}", flush=True)

        if args.syscalls:
            calls = ["epoll_wait", "recvfrom", "recvmsg", "read", "readv", "sendto", "write", "writev", "futex",
                     "epoll_ctl", "getpid", "getsockopt", "accept4", "close"]
            count("system calls", [f"syscalls:sys_enter_{c}" for c in calls],
                  lambda e: e.removeprefix("syscalls:sys_enter_"))
        if args.allocs:
            # User-space probes on the C library's allocator (what Ferry's
            # default build and nginx allocate with): exact counts, unmoved
            # by a noisy host, unlike CPU time.
            libc = subprocess.run(["sh", "-c", "ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}'"],
                                  capture_output=True, text=True).stdout.strip() or "/lib/x86_64-linux-gnu/libc.so.6"
            fns = ["malloc", "calloc", "realloc", "posix_memalign"]
            for fn in fns:
                subprocess.run(["perf", "probe", "-q", "-x", libc, "--add", fn], capture_output=True)
            count("allocations", [f"probe_libc:{fn}" for fn in fns], lambda e: e.removeprefix("probe_libc:"))
        if args.perf:
            for name, url, pids in targets:
                out = tmp / f"perf-{len(name)}-{pids[0]}.data"
                event = ["-e", args.perf_event, "-c", "1", "--call-graph", "dwarf,8192"] if args.perf_event else ["-F", "4999", "-g"]
                rec = subprocess.Popen(["perf", "record", *event, "-o", str(out), "-p", ",".join(map(str, pids))],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                measure(url, pids)
                rec.send_signal(2)
                rec.wait()
                print(f"{name}: profile in {out} (perf report -i {out})", flush=True)
    finally:
        for p in procs:
            bench.stop(p)


if __name__ == "__main__":
    sys.exit(main())
