"""Scale (called by bench/bench.py, `--suite scale`): N models with 3
versions each registered and routed (the first version of each serving
in-process). Reports registration time, requests/s and latency on one model
before and after the others exist (route lookup cost), memory per loaded
version and per serving version's metric windows, and the time to ready
after a restart with all of them registered.
"""

import concurrent.futures
import os
import pathlib
import signal
import subprocess
import time
import urllib.request


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_ferry(bench, args, data):
    proc = bench.start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                       env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True)
    t = time.monotonic()
    url = proc.stdout.readline().strip().removeprefix("ferry listening on ")
    bench.wait_http(f"{url}/v2/health/ready", timeout=600)
    return proc, url, time.monotonic() - t


def run(bench, args, tmp, body):
    n = args.scale_models
    tmp = pathlib.Path(tmp) / "scale"
    tmp.mkdir(exist_ok=True)
    data = tmp / "ferry-data"
    proc, url, _ = start_ferry(bench, args, data)
    token = (data / "admin-token").read_text().strip()
    files = [bench.ROOT / "examples/models" / f for f in ("cancer-v1.onnx", "cancer-v2.onnx", "cancer-bad.onnx")]
    out = {"models": n, "versions_per_model": 3}
    dur = "3s" if args.quick else "10s"

    def add(model, version, file):
        subprocess.run([args.ferry, "--server", url, "--token", token, "model", "add", model, version, "--file", str(file)],
                       check=True, capture_output=True)

    try:
        add("m-0", "1", files[0])
        target = f"{url}/v2/models/m-0/infer"
        bench.oha(args, target, body, ["-c", "16", "-z", "1s"])
        one = bench.repeated(args, lambda: bench.oha(args, target, body, ["-c", "64", "-z", dur]))
        one_fixed = bench.repeated(args, lambda: bench.oha(args, target, body, ["-c", "8", "-q", "1000", "--latency-correction", "-z", dur]))
        rss_one = rss_mib(proc.pid)
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(add, f"m-{i}", str(v + 1), files[v]) for i in range(n) for v in range(3) if (i, v) != (0, 0)]
            for j in jobs:
                j.result()
        out["register_all_s"] = round(time.monotonic() - t, 1)
        rss_all = rss_mib(proc.pid)
        out["rss_mib_one_model"] = round(rss_one, 1)
        out["rss_mib_all_models"] = round(rss_all, 1)
        out["mib_per_loaded_version"] = round((rss_all - rss_one) / max(n - 1, 1), 3)
        many = bench.repeated(args, lambda: bench.oha(args, target, body, ["-c", "64", "-z", dur]))
        many_fixed = bench.repeated(args, lambda: bench.oha(args, target, body, ["-c", "8", "-q", "1000", "--latency-correction", "-z", dur]))
        out["one_model"] = {"rps_c64": one["rps"], "saturation_c64": one, "fixed_1000rps": one_fixed}
        out["with_all_models"] = {"rps_c64": many["rps"], "saturation_c64": many, "fixed_1000rps": many_fixed}
        out["throughput_ratio"] = round(many["rps"] / one["rps"], 3)
        # Metric windows: a few requests to every model creates its series.
        before = rss_mib(proc.pid)
        payload = pathlib.Path(body).read_bytes()
        for i in range(n):
            for _ in range(3):
                req = urllib.request.Request(f"{url}/v2/models/m-{i}/infer", data=payload, headers={"content-type": "application/json"})
                urllib.request.urlopen(req).read()
        out["kib_per_serving_version_windows_and_recent_ids"] = round((rss_mib(proc.pid) - before) * 1024 / n, 1)
        # Restart with everything registered.
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc, url, ready_s = start_ferry(bench, args, data)
        out["restart_to_ready_s"] = round(ready_s, 2)
        bench.log(f"   scale: {out}")
        return out
    finally:
        bench.stop(proc)
