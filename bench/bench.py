"""Runs Ferry's benchmarks (called by bench/run.sh; standard library only).

Method: each figure is measured --repeat times (3) and reported as the median
with the runs kept for the spread; the servers under test run on --sut-cpus and
the load generator on --load-cpus (taskset; by default the first and second
half of the machine's CPUs).

Suite "routing" (Ferry alone): the same model with the gateway's routing
features switched on one at a time — a 90/10 weighted split, a sticky split,
a failover chain, a 100 % shadow mirror — against the plain stable route, at
a fixed rate: latency and the server's CPU time per request (from
/proc/PID/stat, the figure least disturbed by a noisy shared machine).

Suite "serving": the example model cancer-v1 (scaler + logistic regression on
breast cancer, 30 features) served in-process by Ferry and, for comparison,
the same scikit-learn pipeline served by MLServer's scikit-learn runtime, with
the same single-row V2 JSON request, one server at a time on this machine:
  * requests/s at saturation with 16 and 64 connections,
  * p50/p99/p99.9 at a fixed rate well below saturation (oha with latency
    correction, so a stall is not hidden by coordinated omission),
  * resident memory after the run.
"""

import argparse
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MLSERVER_VENV = ROOT / "bench" / ".venv"
MLSERVER_PACKAGES = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "scikit-learn==1.9.1"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


def rss_kib(pid):
    """Resident memory of a process and its children, KiB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in out]
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def pinned(cpus, cmd):
    """`cmd` run on the given CPUs (taskset), or as is when not pinning."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def repeated(args, once):
    """Runs a measurement `args.repeat` times. Returns the first run's shape
    with every number replaced by the median over the runs, plus `runs` (each
    run's figures) so the spread can be reported."""
    runs = [once() for _ in range(args.repeat)]

    def merge(values):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values if k in v]) for k in values[0] if k != "runs"}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            m = statistics.median(values)
            return round(m, 3) if isinstance(m, float) else m
        return values[0]

    out = merge(runs)
    if args.repeat > 1:
        out["runs"] = runs
    return out


def oha(args, url, body, extra):
    cmd = [
        *pinned(args.load_cpus, [args.oha]), "--no-tui", "--output-format", "json", "-m", "POST", "-D", str(body),
        "-T", "application/json", *extra, url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    codes = d.get("statusCodeDistribution", {})
    # oha cuts the requests still running when the duration ends; those are
    # not failures of the server.
    errors = {k: v for k, v in d.get("errorDistribution", {}).items() if "aborted due to deadline" not in k}
    ok = codes.get("200", 0)
    total = sum(codes.values()) + sum(errors.values())
    p = d["latencyPercentiles"]
    if p["p50"] is None:
        raise SystemExit(f"no successful request to {url}: {codes} {errors}")
    return {
        "rps": round(d["summary"]["requestsPerSec"], 1),
        "ok": ok,
        "failed": total - ok,
        "p50_ms": round(p["p50"] * 1000, 3),
        "p99_ms": round(p["p99"] * 1000, 3),
        "p999_ms": round(p["p99.9"] * 1000, 3),
        "errors": errors,
    }


def measure(args, name, url, body, pid):
    log(f"== {name}: saturation")
    result = {"saturation": {}, "fixed_rate": {}}
    dur = "3s" if args.quick else "10s"
    oha(args, url, body, ["-c", "16", "-z", "2s"])  # warm-up
    for c in (16, 64):
        result["saturation"][f"c{c}"] = repeated(args, lambda: oha(args, url, body, ["-c", str(c), "-z", dur]))
        log(f"   c={c}: {result['saturation'][f'c{c}']}")
    for rate in args.rates:
        r = repeated(args, lambda: oha(args, url, body, ["-c", "8", "-q", str(rate), "--latency-correction", "-z", dur]))
        result["fixed_rate"][f"{rate}rps"] = r
        log(f"   {rate} req/s: {r}")
    result["rss_mib"] = round(rss_kib(pid) / 1024, 1)
    return result


def start(cmd, cwd=None, env=None, read_stdout=False):
    # Only Ferry's one line of stdout is read; anything else goes nowhere, so
    # a chatty server never blocks on a full pipe. Systems under test run on
    # their own CPUs (--sut-cpus), apart from the load generator's.
    return subprocess.Popen(
        pinned(ARGS.sut_cpus, cmd), cwd=cwd, env=env, stdout=subprocess.PIPE if read_stdout else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api(url, token, method, path, body=None):
    req = urllib.request.Request(
        f"{url}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def run_routing(args, tmp, body):
    data = tmp / "ferry-routing"
    proc = start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)], env={**os.environ, "FERRY_LOG": "warn"}, read_stdout=True)
    try:
        url = proc.stdout.readline().strip().removeprefix("ferry listening on ")
        wait_http(f"{url}/v2/health/ready")
        token = (data / "admin-token").read_text().strip()
        for version, file in [("1", "cancer-v1.onnx"), ("2", "cancer-v2.onnx")]:
            subprocess.run(
                [args.ferry, "--server", url, "--token", token, "model", "add", "cancer", version,
                 "--file", str(ROOT / "examples/models" / file)],
                check=True, capture_output=True,
            )
        setups = [
            ("stable only", {"stable": "1"}, []),
            ("90/10 split", {"stable": "1", "candidate": {"version": "2", "weight": 10}}, []),
            ("90/10 sticky split", {"stable": "1", "candidate": {"version": "2", "weight": 10, "sticky_header": "x-user-id"}},
             ["-H", "x-user-id: user-42"]),
            ("failover chain 1 > 2", {"stable": "1", "failover": ["2"]}, []),
            ("shadow 100% to 2", {"stable": "1", "shadow": {"version": "2", "percent": 100, "compare": {"output": "label"}}}, []),
        ]
        rate = args.routing_rate
        dur = "3s" if args.quick else "10s"
        out = {}
        for name, policy, extra in setups:
            api(url, token, "PUT", "/api/v1/models/cancer/route", policy)
            oha(args, f"{url}/v2/models/cancer/infer", body, ["-c", "8", "-z", "1s", *extra])  # warm-up

            def once():
                before = cpu_seconds(proc.pid)
                r = oha(args, f"{url}/v2/models/cancer/infer", body, ["-c", "8", "-q", str(rate), "--latency-correction", "-z", dur, *extra])
                cpu = cpu_seconds(proc.pid) - before
                r["cpu_us_per_request"] = round(cpu / max(r["ok"] + r["failed"], 1) * 1e6, 1)
                return r

            r = repeated(args, once)
            out[name] = r
            log(f"   {name}: {r}")
        metrics = api(url, token, "GET", "/api/v1/models/cancer/metrics?window=15m")
        shadow = [s for s in metrics["series"] if s["role"] == "shadow"]
        if shadow:
            out["shadow 100% to 2"]["shadow_compared"] = shadow[0]["agree"] + shadow[0]["disagree"]
            out["shadow 100% to 2"]["shadow_dropped"] = shadow[0]["dropped"]
            out["shadow 100% to 2"]["shadow_agreement"] = shadow[0]["agreement"]
        return out
    finally:
        stop(proc)


def run_batching(args, tmp, body):
    """cancer-v1 with and without adaptive batching (16 requests within 2 ms)
    in Ferry, then the same pipeline with and without MLServer's adaptive
    batching (max_batch_size 16, max_batch_time 2 ms)."""
    data = tmp / "ferry-batching"
    proc = start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)], env={**os.environ, "FERRY_LOG": "warn"}, read_stdout=True)
    out = {}
    try:
        url = proc.stdout.readline().strip().removeprefix("ferry listening on ")
        wait_http(f"{url}/v2/health/ready")
        token = (data / "admin-token").read_text().strip()
        ferry = [args.ferry, "--server", url, "--token", token]
        subprocess.run([*ferry, "model", "add", "cancer", "1", "--file", str(ROOT / "examples/models/cancer-v1.onnx")], check=True, capture_output=True)
        for name, flags in [("off", ["--batch-max", "1"]), ("16 within 2ms", ["--batch-max", "16", "--batch-delay", "2ms"])]:
            subprocess.run([*ferry, "model", "set", "cancer", "1", *flags], check=True, capture_output=True)
            out[f"ferry, batching {name}"] = batching_figures(args, f"{url}/v2/models/cancer/infer", body, proc.pid)
            log(f"   ferry, batching {name}: {out[f'ferry, batching {name}']}")
    finally:
        stop(proc)
    if not args.no_mlserver:
        for name, settings in [("off", {}), ("16 within 2ms", {"max_batch_size": 16, "max_batch_time": 0.002})]:
            proc = start_mlserver(tmp, settings)
            try:
                out[f"mlserver, batching {name}"] = batching_figures(args, MLSERVER_INFER, body, proc.pid)
                log(f"   mlserver, batching {name}: {out[f'mlserver, batching {name}']}")
            finally:
                stop(proc)
    return out


def batching_figures(args, target, body, pid):
    """Saturation at 64 connections (with CPU per request) and latency at
    1,000 requests/s: the load that adaptive batching is for."""
    dur = "3s" if args.quick else "10s"
    oha(args, target, body, ["-c", "16", "-z", "1s"])

    def saturation():
        before = cpu_seconds(pid)
        sat = oha(args, target, body, ["-c", "64", "-z", dur])
        sat["cpu_us_per_request"] = round((cpu_seconds(pid) - before) / max(sat["ok"], 1) * 1e6, 1)
        return sat

    return {
        "saturation_c64": repeated(args, saturation),
        "fixed_1000rps": repeated(args, lambda: oha(args, target, body, ["-c", "8", "-q", "1000", "--latency-correction", "-z", dur])),
    }


def run_ferry(args, tmp, body):
    data = tmp / "ferry-data"
    proc = start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)], env={**os.environ, "FERRY_LOG": "warn"}, read_stdout=True)
    try:
        line = proc.stdout.readline()
        url = line.strip().removeprefix("ferry listening on ")
        wait_http(f"{url}/v2/health/ready")
        token = (data / "admin-token").read_text().strip()
        subprocess.run(
            [args.ferry, "--server", url, "--token", token, "model", "add", "cancer", "1",
             "--file", str(ROOT / "examples/models/cancer-v1.onnx")],
            check=True, capture_output=True,
        )
        return measure(args, "ferry", f"{url}/v2/models/cancer/infer", body, proc.pid)
    finally:
        stop(proc)


MLSERVER_INFER = "http://127.0.0.1:18901/v2/models/cancer/infer"


def start_mlserver(tmp, model_settings):
    """MLServer with the scikit-learn runtime serving the same pipeline as
    cancer-v1, with extra model settings (e.g. adaptive batching); ready."""
    python = MLSERVER_VENV / "bin" / "python"
    if not python.exists():
        log(f"installing MLServer into {MLSERVER_VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *MLSERVER_PACKAGES], check=True)
    models = tmp / "mlserver"
    subprocess.run([str(python), str(ROOT / "bench/mlserver_model.py"), str(models)], check=True)
    settings_file = models / "cancer" / "model-settings.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), **model_settings}))
    # parallel_workers 0: MLServer 1.7.1's worker processes die at start-up on
    # this machine ("There is no current event loop in thread 'MainThread'"),
    # so inference runs in the server process, as MLServer allows.
    (models / "settings.json").write_text(json.dumps(
        {"http_port": 18901, "grpc_port": 18902, "metrics_port": 18903, "parallel_workers": 0}
    ))
    proc = start([str(MLSERVER_VENV / "bin" / "mlserver"), "start", "."], cwd=models)
    wait_http("http://127.0.0.1:18901/v2/models/cancer/ready", timeout=120)
    return proc


def run_mlserver(args, tmp, body):
    proc = start_mlserver(tmp, {})
    try:
        return measure(args, "mlserver", MLSERVER_INFER, body, proc.pid)
    finally:
        stop(proc)


def machine():
    cpu = "unknown"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--oha", required=True)
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--quick", action="store_true", help="3 s runs instead of 10 s")
    ap.add_argument("--no-mlserver", action="store_true")
    ap.add_argument("--rates", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--suite", choices=["all", "serving", "routing", "batching", "gateways", "control", "scale", "grpc", "store", "cluster", "failover", "memory"], default="all")
    ap.add_argument("--scale-models", type=int, default=1000)
    ap.add_argument("--routing-rate", type=int, default=2000)
    ap.add_argument("--gateway-rate", type=int, default=500, help="fixed rate of the grpc suite's gateway figures")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median and spread reported)")
    half = (os.cpu_count() or 1) // 2
    default_sut, default_load = (f"0-{half - 1}", f"{half}-{os.cpu_count() - 1}") if half else ("", "")
    ap.add_argument("--sut-cpus", default=default_sut, help="CPUs for the servers under test (taskset list; '' to not pin)")
    ap.add_argument("--load-cpus", default=default_load, help="CPUs for the load generator")
    args = ap.parse_args()
    global ARGS
    ARGS = args
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        row = json.loads((ROOT / "examples/models/cancer-holdout.jsonl").read_text().splitlines()[0])
        row.pop("label")
        body = tmp / "body.json"
        body.write_text(json.dumps(row))
        if args.suite in ("all", "routing"):
            log("== routing (Ferry)")
            routing = {"machine": machine(), "rate": args.routing_rate, "setups": run_routing(args, tmp, body)}
            (RESULTS / "routing.json").write_text(json.dumps(routing, indent=2) + "\n")
            print(json.dumps(routing, indent=2))
        if args.suite in ("all", "gateways"):
            log("== routing overhead: Ferry vs nginx vs HAProxy")
            import gateways
            g = {"machine": machine(), "rate": args.routing_rate, "setups": gateways.run(sys.modules[__name__], args, tmp, body)}
            (RESULTS / "gateways.json").write_text(json.dumps(g, indent=2) + "\n")
            print(json.dumps(g, indent=2))
        if args.suite in ("all", "control"):
            log("== control plane (Ferry)")
            import control
            c = {"machine": machine(), "figures": repeated(args, lambda: control.run(sys.modules[__name__], args, tmp, body))}
            (RESULTS / "control.json").write_text(json.dumps(c, indent=2) + "\n")
            print(json.dumps(c, indent=2))
        if args.suite in ("all", "cluster"):
            log("== routes pushed to every instance: 3 instances on one PostgreSQL (Ferry)")
            import propagation
            cl = {"machine": machine(), "figures": repeated(args, lambda: propagation.run(args.ferry, tmp, body.read_bytes()))}
            (RESULTS / "cluster.json").write_text(json.dumps(cl, indent=2) + "\n")
            print(json.dumps(cl, indent=2))
        if args.suite in ("all", "failover"):
            log("== leader failover: kill -9 of the leader to the next rollout step, 3 instances on one PostgreSQL (Ferry)")
            import failover
            fo = {"machine": machine(), "figures": failover.run(args.ferry, tmp)}
            (RESULTS / "failover.json").write_text(json.dumps(fo, indent=2) + "\n")
            print(json.dumps(fo, indent=2))
        if args.suite in ("all", "scale"):
            log(f"== scale: {args.scale_models} models x 3 versions (Ferry)")
            import scale
            sc = {"machine": machine(), "figures": scale.run(sys.modules[__name__], args, tmp, body)}
            (RESULTS / "scale.json").write_text(json.dumps(sc, indent=2) + "\n")
            print(json.dumps(sc, indent=2))
        if args.suite in ("all", "memory"):
            log(f"== memory per version, apart from ONNX Runtime: {args.scale_models} remote versions (Ferry)")
            import version_memory
            me = {"machine": machine(), "figures": version_memory.run(sys.modules[__name__], args, tmp, body)}
            (RESULTS / "memory.json").write_text(json.dumps(me, indent=2) + "\n")
            print(json.dumps(me, indent=2))
        if args.suite in ("all", "grpc"):
            log("== gRPC: Ferry gRPC vs Ferry REST vs MLServer gRPC; Ferry as a gRPC gateway")
            import grpc_suite
            gr = {"machine": machine(), "setups": grpc_suite.run(sys.modules[__name__], args, tmp, body)}
            (RESULTS / "grpc.json").write_text(json.dumps(gr, indent=2) + "\n")
            print(json.dumps(gr, indent=2))
        if args.suite in ("all", "store"):
            log("== shared store: PostgreSQL vs SQLite, a 100 MB artifact through the store and a bucket (Ferry)")
            import shared_store
            st = {"machine": machine(), "figures": shared_store.run(sys.modules[__name__], args, tmp, body)}
            (RESULTS / "store.json").write_text(json.dumps(st, indent=2) + "\n")
            print(json.dumps(st, indent=2))
        if args.suite in ("all", "batching"):
            log("== adaptive batching (Ferry)")
            batching = {"machine": machine(), "setups": run_batching(args, tmp, body)}
            (RESULTS / "batching.json").write_text(json.dumps(batching, indent=2) + "\n")
            print(json.dumps(batching, indent=2))
        if args.suite in ("routing", "batching", "gateways", "control", "scale", "grpc", "store", "cluster", "failover", "memory"):
            return
        results = {"machine": machine(), "ferry": run_ferry(args, tmp, body)}
        if not args.no_mlserver:
            results["mlserver"] = run_mlserver(args, tmp, body)
            f, m = results["ferry"], results["mlserver"]
            results["ratios"] = {
                "throughput_c16": round(f["saturation"]["c16"]["rps"] / m["saturation"]["c16"]["rps"], 1),
                "throughput_c64": round(f["saturation"]["c64"]["rps"] / m["saturation"]["c64"]["rps"], 1),
                "p50_at_200rps": round(m["fixed_rate"]["200rps"]["p50_ms"] / f["fixed_rate"]["200rps"]["p50_ms"], 1)
                if "200rps" in f["fixed_rate"] and "200rps" in m["fixed_rate"] else None,
                "memory": round(m["rss_mib"] / f["rss_mib"], 1),
            }
    out = RESULTS / "serving.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    log(f"written to {out}")


if __name__ == "__main__":
    main()
