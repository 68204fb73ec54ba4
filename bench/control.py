"""Control-plane timings (called by bench/bench.py, `--suite control`):

- breach → stable: a canary of a remote candidate that starts failing; the
  time from its first failure to the moment every request is answered by
  the stable version again;
- route visibility: after `PUT /route` returns, how many requests are still
  answered by the old version (the publish happens before the answer);
- load and warm-up: registering a version (validation loads it and runs a
  warm-up inference) and loading it beside the stable one.
"""

import http.server
import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.request

ANSWER = json.dumps({"model_name": "cancer", "model_version": "1", "outputs": [
    {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
    {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.2, 0.8]}]}).encode()
METADATA = json.dumps({"name": "cancer", "versions": ["1"], "platform": "toggle",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]}).encode()


class Toggle(http.server.BaseHTTPRequestHandler):
    """A remote V2 model that answers until told to fail."""
    failing = False
    first_failure = None
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(200, METADATA if self.path.endswith("/cancer") else b"{}")

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        if Toggle.failing:
            if Toggle.first_failure is None:
                Toggle.first_failure = time.monotonic()
            self.reply(500, b'{"error": "toggled to fail"}')
        else:
            self.reply(200, ANSWER)


def run(bench, args, tmp, body):
    """One run of every figure, on a fresh server and data dir."""
    tmp = pathlib.Path(tmp) / f"control-{time.time_ns()}"
    tmp.mkdir()
    Toggle.failing, Toggle.first_failure = False, None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Toggle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    toggle_url = f"http://127.0.0.1:{server.server_address[1]}"
    data = tmp / "ferry-data"
    ferry = bench.start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                        env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True)
    out = {}
    try:
        url = ferry.stdout.readline().strip().removeprefix("ferry listening on ")
        bench.wait_http(f"{url}/v2/health/ready")
        token = (data / "admin-token").read_text().strip()
        cli = [args.ferry, "--server", url, "--token", token]
        examples = bench.ROOT / "examples/models"

        # Load and warm-up.
        t = time.monotonic()
        subprocess.run([*cli, "model", "add", "cancer", "1", "--file", str(examples / "cancer-v1.onnx")], check=True, capture_output=True)
        out["register_and_serve_first_version_ms"] = round((time.monotonic() - t) * 1000, 1)
        t = time.monotonic()
        subprocess.run([*cli, "model", "add", "cancer", "2", "--file", str(examples / "cancer-v2.onnx")], check=True, capture_output=True)
        out["register_version_ms"] = round((time.monotonic() - t) * 1000, 1)
        t = time.monotonic()
        bench.api(url, token, "POST", "/v2/repository/models/cancer/load", {"parameters": {"version": "2"}})
        out["load_and_warm_loaded_version_ms"] = round((time.monotonic() - t) * 1000, 1)
        bench.api(url, token, "POST", "/v2/repository/models/cancer/unload", {"parameters": {"version": "2"}})

        # Route visibility: after PUT returns, the very next request sees it.
        body_bytes = pathlib.Path(body).read_bytes()
        stale = 0
        for i in range(20):
            target = "2" if i % 2 == 0 else "1"
            bench.api(url, token, "PUT", "/api/v1/models/cancer/route", {"stable": target})
            req = urllib.request.Request(f"{url}/v2/models/cancer/infer", data=body_bytes, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req) as r:
                stale += r.headers["x-ferry-version"] != target
        out["route_changes"] = 20
        out["requests_answered_by_the_old_route_after_put_returned"] = stale
        bench.api(url, token, "PUT", "/api/v1/models/cancer/route", {"stable": "1"})

        # Breach → stable.
        subprocess.run([*cli, "model", "add", "cancer", "toggle", "--url", toggle_url], check=True, capture_output=True)
        interval = 5
        spec = {"model": "cancer", "version": "toggle",
                "strategy": {"canary": {"steps": [{"weight": 50}, {"pause": "10m"}, {"weight": 100}]}},
                "analysis": {"interval": f"{interval}s", "min_requests": 10, "failure_limit": 1,
                             "checks": [{"metric": "error_rate", "max": 0.05}]}}
        bench.api(url, token, "POST", "/api/v1/models/cancer/rollouts", spec)
        answers = []  # (monotonic time, version or error)
        stop = threading.Event()

        def load():
            while not stop.is_set():
                req = urllib.request.Request(f"{url}/v2/models/cancer/infer", data=body_bytes, headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(req) as r:
                        answers.append((time.monotonic(), r.headers["x-ferry-version"]))
                except Exception:
                    answers.append((time.monotonic(), "error"))
                time.sleep(0.004)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(7)  # the canary serves fine for a while
        Toggle.failing = True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = bench.api(url, token, "GET", "/api/v1/models/cancer/status")
            if st["phase"] == "idle":
                break
            time.sleep(0.05)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        breach = Toggle.first_failure
        last_bad = max((t for t, v in answers if v != "1"), default=breach)
        out["analysis_interval_s"] = interval
        out["breach_to_all_traffic_on_stable_ms"] = round((last_bad - breach) * 1000, 1)
        out["errors_clients_saw"] = sum(1 for _, v in answers if v == "error")
        out["requests"] = len(answers)
        bench.log(f"   control plane: {out}")
        return out
    finally:
        bench.stop(ferry)
        server.shutdown()
