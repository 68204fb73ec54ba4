"""Routes pushed to every instance (called by bench/bench.py, `--suite
cluster`, or on its own: `python3 bench/propagation.py --ferry PATH`):

three `ferry serve` on one private PostgreSQL (started here from Debian's
`postgresql` binaries, as the tests do, and stopped at the end); 100 route
changes (the stable version flipped between 1 and 2), each made through the
next instance in turn. For each change: the time from sending `PUT /route`
to the moment every instance answers with the new version (three pollers,
one per instance, each sending inference requests back to back on one
keep-alive connection and noting the first answer by the new version). p50 and p99 over the 100 changes.
"""

import argparse
import http.client
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A private PostgreSQL server on a free loopback port."""

    def __init__(self):
        bins = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bins:
            raise SystemExit("PostgreSQL's binaries are missing: apt-get install postgresql")
        self.bin = bins[-1]
        # Its own directory: the postgres user must reach it.
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "ferry")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/ferry"

    def run(self, tool, *args):
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True)

    def stop(self):
        self.run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def api(url, token, method, path, body=None):
    req = urllib.request.Request(
        f"{url}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def start(ferry, data, store, env):
    proc = subprocess.Popen([ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0",
                             "--data-dir", str(data), "--store", store],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    url = proc.stdout.readline().strip().removeprefix("ferry listening on ")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not become ready")
        time.sleep(0.05)
    return proc, url, (data / "admin-token").read_text().strip()


def change_once(instances, target, through, body):
    """Sets the stable version to `target` through instance `through`;
    returns the ms until every instance answered with it."""
    seen = [None] * len(instances)
    go = threading.Event()

    def poll(i, url):
        # One keep-alive connection per poller: a new connection per request
        # (urllib) added its own milliseconds to every figure.
        conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
        go.wait()
        while True:
            conn.request("POST", "/v2/models/cancer/infer", body, {"content-type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            if answer.getheader("x-ferry-version") == target:
                seen[i] = time.monotonic()
                conn.close()
                return

    threads = [threading.Thread(target=poll, args=(i, url)) for i, (_, url, _) in enumerate(instances)]
    for t in threads:
        t.start()
    _, url, token = instances[through]
    sent = time.monotonic()
    go.set()
    api(url, token, "PUT", "/api/v1/models/cancer/route", {"stable": target})
    for t in threads:
        t.join(30)
    return round((max(seen) - sent) * 1000, 2)


def run(ferry, tmp, body, changes=100):
    tmp = pathlib.Path(tmp) / f"cluster-{time.time_ns()}"
    tmp.mkdir()
    pg = Postgres()
    env = {**os.environ, "FERRY_LOG": "error"}
    instances = []
    try:
        for name in "abc":
            instances.append(start(ferry, tmp / name, pg.url, env))
        _, url, token = instances[0]
        examples = ROOT / "examples/models"
        cli = [ferry, "--server", url, "--token", token]
        for v, f in (("1", "cancer-v1.onnx"), ("2", "cancer-v2.onnx")):
            subprocess.run([*cli, "model", "add", "cancer", v, "--file", str(examples / f)], check=True,
                           capture_output=True)
        # Both versions loaded (kept warm beside the route) on every instance,
        # so that a change measures the route's push, not a model load.
        for v in ("1", "2"):
            api(url, token, "POST", "/v2/repository/models/cancer/load", {"parameters": {"version": v}})
        change_once(instances, "1", 0, body)
        times = []
        for i in range(changes):
            target = "2" if i % 2 == 0 else "1"
            times.append(change_once(instances, target, i % 3, body))
        times.sort()
        out = {
            "instances": 3,
            "changes": changes,
            "p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
            "max_ms": round(times[-1], 1),
            "min_ms": round(times[0], 1),
        }
        return out
    finally:
        for proc, _, _ in instances:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        pg.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", default=str(ROOT / "target/release/ferry"))
    ap.add_argument("--changes", type=int, default=100)
    args = ap.parse_args()
    row = json.loads((ROOT / "examples/models/cancer-holdout.jsonl").read_text().splitlines()[0])
    row.pop("label")
    with tempfile.TemporaryDirectory() as t:
        out = run(args.ferry, t, json.dumps(row).encode(), args.changes)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
