"""Cluster-wide analysis (`python3 bench/cluster_analysis.py --ferry PATH`):

1. Decision delay, three instances vs one: a canary of `cancer-slow` (45 ms
   a row against cancer-v1's microseconds) with a latency check against
   stable (`--interval 5s --min-requests 10 --max-p99-vs-stable 1.5`),
   traffic (Python pollers on keep-alive connections, ~40 req/s each) sent
   to the instances that do not drive the rollouts (with one instance: to
   it). Per run: from the first answer by the slow candidate (the breach
   begins) to the last one (every instance routes to stable again), and the
   part of it after the 5-second boundary that closed the judged window
   (what the merge costs: the others' flush and the leader's wait for it).
   One instance is a single node on SQLite; three share a private
   PostgreSQL (Debian's binaries, as the tests start it).
2. CPU per in-process request with and without the cluster store: an
   instance on PostgreSQL (flushing its buckets) beside one on SQLite, the
   same fixed-rate `ferry traffic` load interleaved round by round
   (bench/shared_store.py's harness).
3. PostgreSQL rows written per minute per model-version: three instances
   under traffic for 60 s, rows of `telemetry_buckets` per version and the
   flush marks.
"""

import argparse
import http.client
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402
import propagation  # noqa: E402
import shared_store  # noqa: E402

ROOT = propagation.ROOT
BUCKET_S = 5
DEPLOY = ["deploy", "cancer", "slow", "--strategy", "canary", "--steps", "30,100", "--step-pause", "60s",
          "--interval", "5s", "--min-requests", "10", "--max-p99-vs-stable", "1.5"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Pollers:
    """Back-to-back inference on keep-alive connections (one thread each),
    noting when the candidate answered first and last."""

    def __init__(self, urls, body, per_url=2, pause=0.05):
        self.first_slow = self.last_slow = None
        self.answers = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.poll, args=(u, body, pause), daemon=True)
                        for u in urls for _ in range(per_url)]
        for t in self.threads:
            t.start()

    def poll(self, url, body, pause):
        conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
        while not self.stop.is_set():
            conn.request("POST", "/v2/models/cancer/infer", body, {"content-type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            now = time.time()
            with self.lock:
                self.answers += 1
                if answer.getheader("x-ferry-version") == "slow":
                    self.first_slow = self.first_slow or now
                    self.last_slow = now
            time.sleep(pause)

    def reset(self):
        with self.lock:
            self.first_slow = self.last_slow = None

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def cli(ferry, inst, *words):
    _, url, token = inst
    return subprocess.run([ferry, "--server", url, "--token", token, *words], check=True,
                          capture_output=True, text=True).stdout


def rollout_ended(inst, within=60):
    _, url, token = inst
    deadline = time.time() + within
    while time.time() < deadline:
        st = propagation.api(url, token, "GET", "/api/v1/models/cancer/status")
        if st["phase"] == "idle" and st.get("last_rollout"):
            return st["last_rollout"]
        time.sleep(0.05)
    raise SystemExit("the rollout did not end within 60 s")


def decision_runs(ferry, instances, body, runs):
    """Canary of the slow model, `runs` times; the delays in seconds."""
    examples = ROOT / "examples/models"
    for v, f in (("1", "cancer-v1.onnx"), ("slow", "cancer-slow.onnx")):
        cli(ferry, instances[0], "model", "add", "cancer", v, "--file", str(examples / f))
    time.sleep(2)  # every instance follows the registrations
    # Traffic to the instances that do not drive the rollouts (the first
    # started drives them: it is ready, and takes the lock, first).
    targets = [url for _, url, _ in (instances[1:] or instances)]
    pollers = Pollers(targets, body)
    out = []
    try:
        time.sleep(3)
        for i in range(runs):
            pollers.reset()
            cli(ferry, instances[0], *DEPLOY)
            ended = rollout_ended(instances[0])
            time.sleep(2)  # every instance routes to stable: no slow answer after
            with pollers.lock:
                first, last = pollers.first_slow, pollers.last_slow
            if ended["phase"] != "aborted" or first is None:
                raise SystemExit(f"run {i}: {ended} (first slow answer {first})")
            after_close = last - (last // BUCKET_S) * BUCKET_S
            run = {"breach_to_stable_s": round(last - first, 2), "after_window_closed_s": round(after_close, 2)}
            log(f"   run {i}: {run}")
            out.append(run)
            time.sleep(1)
    finally:
        pollers.finish()
    return out


def summary(runs):
    keys = runs[0].keys()
    return {k: {"median": round(statistics.median(r[k] for r in runs), 2),
                "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys} | {"runs": runs}


def start_all(ferry, tmp, stores, env):
    return [propagation.start(ferry, tmp / f"i{i}", store, env) for i, store in enumerate(stores)]


def stop_all(instances):
    for proc, _, _ in instances:
        bench.stop(proc)


def psql(pg, sql):
    cmd = [*pg.as_user, str(pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
           "-d", "ferry", "-Atc", sql]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def rows_per_minute(pg, ferry, instances, body):
    """Traffic on all three for a minute; rows written per version."""
    pollers = Pollers([url for _, url, _ in instances], body, per_url=1)
    try:
        time.sleep(8)
        start = int(time.time()) // BUCKET_S
        time.sleep(62)
        end = start + 60 // BUCKET_S
        time.sleep(2)  # the last bucket flushed
        per_version = psql(pg, f"SELECT version, role, count(*) FROM telemetry_buckets WHERE model = 'cancer' "
                               f"AND epoch > {start} AND epoch <= {end} GROUP BY version, role ORDER BY 1, 2")
        total = psql(pg, f"SELECT count(*) FROM telemetry_buckets WHERE epoch > {start} AND epoch <= {end}")
        size = psql(pg, "SELECT pg_total_relation_size('telemetry_buckets')")
        rows = psql(pg, "SELECT count(*) FROM telemetry_buckets")
    finally:
        pollers.finish()
    return {"per_version_role_per_minute": per_version.splitlines(), "all_rows_per_minute": int(total),
            "mark_updates_per_minute": 3 * 60 // BUCKET_S, "table_bytes": int(size), "table_rows": int(rows),
            "answers": pollers.answers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", default=str(ROOT / "target/release/ferry"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpu-rate", type=int, default=500)
    ap.add_argument("--cpu-rounds", type=int, default=3)
    ap.add_argument("--cpu-seconds", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[], choices=["delay", "cpu", "rows"])
    args = ap.parse_args()
    args.sut_cpus = args.load_cpus = ""
    bench.ARGS = args
    row = json.loads((ROOT / "examples/models/cancer-holdout.jsonl").read_text().splitlines()[0])
    row.pop("label")
    body = json.dumps(row).encode()
    env = {**__import__("os").environ, "FERRY_LOG": "error"}
    out = {"load_average_at_start": open("/proc/loadavg").read().split()[:3]}
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        pg = propagation.Postgres()
        try:
            if "delay" not in args.skip:
                log("== decision delay: one instance (SQLite)")
                one = start_all(args.ferry, tmp / "one", [f"sqlite:{tmp}/one-db"], env)
                try:
                    out["one"] = summary(decision_runs(args.ferry, one, body, args.runs))
                finally:
                    stop_all(one)
                log("== decision delay: three instances (PostgreSQL)")
                three = start_all(args.ferry, tmp / "three", [pg.url] * 3, env)
                try:
                    out["three"] = summary(decision_runs(args.ferry, three, body, args.runs))
                    if "rows" not in args.skip:
                        log("== rows written per minute")
                        out["rows"] = rows_per_minute(pg, args.ferry, three, body)
                finally:
                    stop_all(three)
            if "cpu" not in args.skip:
                log("== CPU per request: SQLite vs PostgreSQL (flushing)")
                psql(pg, "SELECT 1")
                subprocess.run([*pg.as_user, str(pg.bin / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port),
                                "-U", "postgres", "ferry_cpu"], check=True, capture_output=True)
                cpu_url = f"postgres://postgres@127.0.0.1:{pg.port}/ferry_cpu"
                (tmp / "cpu").mkdir()
                out["cpu_per_request"] = shared_store.cpu_per_request(
                    bench, args, tmp / "cpu", cpu_url, args.cpu_rounds, args.cpu_seconds, args.cpu_rate)
        finally:
            pg.stop()
    out["load_average_at_end"] = open("/proc/loadavg").read().split()[:3]
    results = ROOT / "bench/results"
    results.mkdir(exist_ok=True)
    (results / "cluster_analysis.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
