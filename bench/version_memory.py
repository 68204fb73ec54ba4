"""Memory per version, apart from ONNX Runtime (called by bench/bench.py,
`--suite memory`): N models, each with one remote version on a fixed-response
nginx upstream (gateways.py's), so no ONNX Runtime session or allocation is
in the figures. Reports the resident-memory growth per version at three
points: registered and routed (route, pools, Prometheus series of a routed
version), after its first requests (metric windows, the request id map, the
per-thread keep-alive upstream connections), and after a minute of steady
traffic spread over every model (each version's metric windows holding a
dozen filled 5-second buckets). Resident-memory growth is what an operator
pays, allocator overhead included.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import time
import urllib.request

import gateways


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(bench, args, tmp, body):
    n = args.scale_models
    tmp = pathlib.Path(tmp) / "memory"
    tmp.mkdir(exist_ok=True)
    port = gateways.free_port()
    upstream = gateways.start_nginx(bench, tmp, "upstream", gateways.upstream_server(port, "a", tmp / "a.log"))
    data = tmp / "ferry-data"
    ferry = bench.start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                        env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True)
    payload = pathlib.Path(body).read_bytes()
    out = {"models": n, "versions_per_model": 1, "source": "remote (nginx fixed answer)"}
    try:
        url = ferry.stdout.readline().strip().removeprefix("ferry listening on ")
        bench.wait_http(f"{url}/v2/health/ready")
        token = (data / "admin-token").read_text().strip()
        cli = [args.ferry, "--server", url, "--token", token]
        remote = f"http://127.0.0.1:{port}/v2/models/cancer"

        def add(model):
            subprocess.run([*cli, "model", "add", model, "1", "--url", remote], check=True, capture_output=True)

        def infer(model):
            req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=payload,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()

        # One model first: what every process has, whatever it serves.
        add("m-0")
        for _ in range(3):
            infer("m-0")
        time.sleep(1)
        base = rss_kib(ferry.pid)
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(add, [f"m-{i}" for i in range(1, n)]))
        out["register_s"] = round(time.monotonic() - t, 1)
        time.sleep(1)
        registered = rss_kib(ferry.pid)
        out["kib_per_routed_version"] = round((registered - base) / (n - 1), 2)
        # The first requests of every version: its series and connections.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(infer, [f"m-{i}" for i in range(1, n) for _ in range(3)]))
        time.sleep(1)
        first = rss_kib(ferry.pid)
        out["kib_per_serving_version_first_requests"] = round((first - registered) / (n - 1), 2)
        # A minute of traffic over every model: a dozen filled buckets each.
        seconds = 15 if args.quick else 60
        end = time.monotonic() + seconds
        sent = 0
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            while time.monotonic() < end:
                list(pool.map(infer, [f"m-{i}" for i in range(1, n)]))
                sent += n - 1
        time.sleep(1)
        steady = rss_kib(ferry.pid)
        out["traffic_seconds"] = seconds
        out["requests_per_version"] = round(sent / (n - 1), 1)
        out["kib_per_serving_version_after_traffic"] = round((steady - registered) / (n - 1), 2)
        out["rss_kib"] = {"one_model": base, "registered": registered, "first_requests": first, "after_traffic": steady}
        bench.log(f"   memory: {out}")
        return out
    finally:
        bench.stop(ferry)
        bench.stop(upstream)
