"""Suite "grpc": Ferry's gRPC service beside its REST API and MLServer's gRPC
service, and Ferry as a gRPC gateway (called by bench.py --suite grpc).

No prebuilt gRPC load generator can be fetched here, so every figure of this
suite comes from one generator for all three, `ferry traffic` (tonic for
gRPC, reqwest for REST): closed loop with 16 and 64 streams for requests/s,
open loop at a fixed rate with latency counted from when each request was
due (oha's latency correction) for p50/p99. The request is the same hold-out
row as the serving suite's: JSON over REST, raw FP32 contents over gRPC.

Gateway figures: a front Ferry whose version lives on an upstream Ferry,
reached over gRPC (grpc://) or REST (http://), clients speaking the same
protocol to the front; the front's CPU time per routed request at a fixed rate.
"""

import json
import os
import subprocess

PORTS = {"grpc": 18941, "upstream_grpc": 18942}


def ferry(bench, args, tmp, name, grpc_port):
    """Starts a Ferry with its gRPC service on `grpc_port`; returns (proc, url, token)."""
    data = tmp / f"grpc-{name}"
    proc = bench.start(
        [args.ferry, "serve", "--listen", "127.0.0.1:0", "--grpc-listen", f"127.0.0.1:{grpc_port}", "--data-dir", str(data)],
        env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True,
    )
    url = proc.stdout.readline().strip().removeprefix("ferry listening on ")
    bench.wait_http(f"{url}/v2/health/ready")
    return proc, url, (data / "admin-token").read_text().strip()


def traffic(bench, args, server, rows, extra):
    """`ferry traffic` against `server` (pinned to the load CPUs); its JSON report."""
    cmd = [*bench.pinned(args.load_cpus, [args.ferry]), "--server", server, "-o", "json",
           "traffic", "cancer", "--data", str(rows), *extra]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    failed = sum(out["errors"].values())
    return {
        "rps": round(out["requests_per_second"], 1),
        "ok": out["ok"],
        "failed": failed,
        "p50_ms": out["latency_ms"]["p50"],
        "p99_ms": out["latency_ms"]["p99"],
    }


def serving(bench, args, server, rows, protocol, pid):
    dur = "3s" if args.quick else "10s"
    over = ["--grpc", protocol] if protocol else []
    traffic(bench, args, server, rows, [*over, "--concurrency", "16", "--duration", "2s"])  # warm-up
    out = {"saturation": {}, "fixed_rate": {}}
    for c in (16, 64):
        out["saturation"][f"c{c}"] = bench.repeated(
            args, lambda: traffic(bench, args, server, rows, [*over, "--concurrency", str(c), "--duration", dur]))
        bench.log(f"   c={c}: {out['saturation'][f'c{c}']}")
    for rate in args.rates:
        out["fixed_rate"][f"{rate}rps"] = bench.repeated(
            args, lambda: traffic(bench, args, server, rows, [*over, "--rps", str(rate), "--duration", dur]))
        bench.log(f"   {rate} req/s: {out['fixed_rate'][f'{rate}rps']}")
    out["rss_mib"] = round(bench.rss_kib(pid) / 1024, 1)
    return out


def gateway(bench, args, tmp, rows):
    """CPU per routed request of a front Ferry over a gRPC vs a REST upstream."""
    up, up_url, up_token = ferry(bench, args, tmp, "upstream", PORTS["upstream_grpc"])
    front, front_url, front_token = ferry(bench, args, tmp, "front", PORTS["grpc"])
    out = {}
    try:
        subprocess.run([args.ferry, "--server", up_url, "--token", up_token, "model", "add", "cancer", "1",
                        "--file", str(bench.ROOT / "examples/models/cancer-v1.onnx")], check=True, capture_output=True)
        cli = [args.ferry, "--server", front_url, "--token", front_token, "model", "add", "cancer"]
        subprocess.run([*cli, "grpc", "--url", f"grpc://127.0.0.1:{PORTS['upstream_grpc']}/cancer"], check=True, capture_output=True)
        subprocess.run([*cli, "rest", "--url", f"{up_url}/v2/models/cancer"], check=True, capture_output=True)
        dur = "3s" if args.quick else "10s"
        rate = args.gateway_rate
        for name, version, over in [("gRPC client > Ferry > gRPC upstream", "grpc", ["--grpc", f"127.0.0.1:{PORTS['grpc']}"]),
                                    ("REST client > Ferry > REST upstream", "rest", [])]:
            bench.api(front_url, front_token, "PUT", "/api/v1/models/cancer/route", {"stable": version})
            traffic(bench, args, front_url, rows, [*over, "--concurrency", "8", "--duration", "1s"])  # warm-up

            def once():
                before = bench.cpu_seconds(front.pid)
                r = traffic(bench, args, front_url, rows, [*over, "--rps", str(rate), "--duration", dur])
                r["cpu_us_per_request"] = round((bench.cpu_seconds(front.pid) - before) / max(r["ok"] + r["failed"], 1) * 1e6, 1)
                return r

            out[name] = bench.repeated(args, once)
            bench.log(f"   {name}: {out[name]}")
    finally:
        bench.stop(front)
        bench.stop(up)
    return out


def run(bench, args, tmp, body):
    rows = tmp / "grpc-rows.jsonl"
    rows.write_text(body.read_text() + "\n")
    out = {}
    proc, url, token = ferry(bench, args, tmp, "serving", PORTS["grpc"])
    try:
        subprocess.run([args.ferry, "--server", url, "--token", token, "model", "add", "cancer", "1",
                        "--file", str(bench.ROOT / "examples/models/cancer-v1.onnx")], check=True, capture_output=True)
        bench.log("== ferry gRPC")
        out["ferry gRPC"] = serving(bench, args, url, rows, f"127.0.0.1:{PORTS['grpc']}", proc.pid)
        bench.log("== ferry REST")
        out["ferry REST"] = serving(bench, args, url, rows, None, proc.pid)
    finally:
        bench.stop(proc)
    if not args.no_mlserver:
        ml = bench.start_mlserver(tmp, {})
        try:
            bench.log("== mlserver gRPC")
            out["mlserver gRPC"] = serving(bench, args, "http://127.0.0.1:18901", rows, "127.0.0.1:18902", ml.pid)
        finally:
            bench.stop(ml)
    bench.log("== gateway: gRPC vs REST upstream")
    out["gateway"] = gateway(bench, args, tmp, rows)
    return out
