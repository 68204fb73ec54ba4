"""Leader failover (called by bench/bench.py, `--suite failover`, or on its
own: `python3 bench/failover.py --ferry PATH`):

three `ferry serve` on one private PostgreSQL (bench/propagation.py's),
default lease (`--leader-lease 3s --leader-renew 1s`). Each run starts a
canary (`--steps 50,100 --step-pause 1s`) through a follower, kills the
leader with SIGKILL half-way through the pause, and measures the time from
the kill to the rollout's next step (its `step 3/3: promoting` event, taken
by the new leader once it holds the lease: the pause itself ended 0.5 s
after the kill, so the figure is the takeover). The killed instance starts
again before the next run. p50 and p99 over the runs (20 by default).
"""

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import datetime

from propagation import ROOT, Postgres, api, start


def leader(instances):
    """The index of the instance that leads, and its term (waits for one)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for proc, url, token in instances:
            if proc.poll() is not None:
                continue
            view = api(url, token, "GET", "/api/v1/cluster")
            lead = view.get("leader")
            urls = {i["id"]: i["url"] for i in view["instances"]}
            for n, (p, u, _) in enumerate(instances):
                if p.poll() is None and urls.get(lead) == u:
                    return n, view["term"]
            break
        time.sleep(0.05)
    raise SystemExit("no leader within 30 s")


def events(url, token):
    return api(url, token, "GET", "/api/v1/models/cancer/events?limit=10000")


def at_s(event):
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def one_run(ferry, instances, target, dirs, store, env):
    lead, term = leader(instances)
    via = (lead + 1) % len(instances)
    _, url, token = instances[via]
    before = len(events(url, token))
    cli = [ferry, "--server", url, "--token", token]
    subprocess.run([*cli, "deploy", "cancer", target, "--strategy", "canary", "--steps", "50,100",
                    "--step-pause", "1s"], check=True, capture_output=True)
    started = [e for e in events(url, token)[before:] if "weight 50%" in e["message"]]
    pause_ends = at_s(started[0]) + 1.0
    # Half-way through the pause.
    time.sleep(max(0.0, pause_ends - 0.5 - time.time()))
    proc = instances[lead][0]
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.time()
    proc.wait(10)
    deadline = time.monotonic() + 60
    while True:
        done = [e for e in events(url, token)[before:] if "promoting" in e["message"]]
        if done:
            took = at_s(done[0]) - killed
            break
        if time.monotonic() > deadline:
            raise SystemExit("the new leader took no step within 60 s")
        time.sleep(0.02)
    new, new_term = leader(instances)
    assert new != lead and new_term > term, (lead, new, term, new_term)
    instances[lead] = start(ferry, dirs[lead], store, env)
    return round(took * 1000, 1)


def run(ferry, tmp, runs=20):
    tmp = pathlib.Path(tmp) / f"failover-{time.time_ns()}"
    tmp.mkdir()
    pg = Postgres()
    env = {**os.environ, "FERRY_LOG": "error"}
    dirs = [tmp / name for name in "abc"]
    instances = []
    try:
        for d in dirs:
            instances.append(start(ferry, d, pg.url, env))
        _, url, token = instances[0]
        cli = [ferry, "--server", url, "--token", token]
        examples = ROOT / "examples/models"
        for v, f in (("1", "cancer-v1.onnx"), ("2", "cancer-v2.onnx")):
            subprocess.run([*cli, "model", "add", "cancer", v, "--file", str(examples / f)], check=True,
                           capture_output=True)
        times = []
        for i in range(runs):
            target = "2" if i % 2 == 0 else "1"
            times.append(one_run(ferry, instances, target, dirs, pg.url, env))
            # The rollout ends on the new leader; the next run starts after.
            _, url, token = instances[(i + 2) % 3]
            while api(url, token, "GET", "/api/v1/models/cancer/status")["phase"] != "idle":
                time.sleep(0.1)
        times.sort()
        return {
            "instances": 3,
            "runs": runs,
            "lease_s": 3,
            "renew_s": 1,
            "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
            "max_ms": times[-1],
            "min_ms": times[0],
        }
    finally:
        for proc, _, _ in instances:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        pg.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", default=str(ROOT / "target/release/ferry"))
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        out = run(args.ferry, t, args.runs)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
