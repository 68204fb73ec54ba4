"""The shared store (called by bench/bench.py, `--suite store`): what running
on PostgreSQL (and a bucket) costs a Ferry instance.

1. CPU per in-process inference request on an instance with the PostgreSQL
   store vs one with the SQLite store, same run, same load, interleaved round
   by round (the data path never touches the store: the goal is <= 1.05x).
2. A 100 MB ONNX artifact (made here with the `onnx` package: a large
   initializer feeding a tiny graph; not committed) registered through
   instance A, then instance B on a fresh data dir started on the same store
   until its first warm answer: the times, and the peak resident memory
   (VmHWM) of both. Three ways: SQLite (A alone, the reference), PostgreSQL
   (artifact in `blob_chunks`), PostgreSQL with `--artifacts s3://…` (moto's
   S3 server on loopback).

It starts a private PostgreSQL (Debian's binaries, as the tests do) and
moto, and installs `onnx`, `numpy` and `moto[server]` into bench/.venv-store.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

VENV_PACKAGES = ["onnx", "numpy", "moto[server]==5.2.5"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv(bench):
    path = bench.ROOT / "bench/.venv-store"
    python = path / "bin/python"
    stamp = path / ".packages"
    if not (stamp.exists() and stamp.read_text() == "\n".join(VENV_PACKAGES)):
        log(f"installing {VENV_PACKAGES} into {path} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *VENV_PACKAGES],
                       check=True)
        stamp.write_text("\n".join(VENV_PACKAGES))
    return path / "bin"


class Postgres:
    """A private PostgreSQL on a free loopback port, as `postgres` when root."""

    def __init__(self):
        bins = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bins:
            raise SystemExit("the store suite needs PostgreSQL's binaries: apt-get install postgresql")
        self.bin = bins[-1]
        self.root = os.geteuid() == 0
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="ferry-bench-pg-"))
        os.chmod(self.dir, 0o755)
        if self.root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.run("initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", "postgres", "--no-sync")
        self.run("pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on", "start")

    def run(self, tool, *args):
        cmd = [str(self.bin / tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def database(self, name):
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.run("pg_ctl", "-D", f"{self.dir}/data", "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def start_moto(bench, bin_dir):
    port = free_port()
    proc = subprocess.Popen([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise SystemExit("moto_server did not listen within 30 s")
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    code = "import boto3, os; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).create_bucket(Bucket='ferry-bench')"
    subprocess.run([str(bin_dir / "python"), "-c", code], check=True, env={**os.environ, **env})
    return proc, env


def make_big_model(python, path, mib):
    """An ONNX model of about `mib` MiB: y = x + W[0:4], W a large initializer
    of random floats (weights do not compress)."""
    code = f"""
import numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
w = numpy_helper.from_array(np.random.default_rng(7).standard_normal({mib} * 262144).astype(np.float32), "w")
idx = numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx")
graph = helper.make_graph(
    [helper.make_node("Gather", ["w", "idx"], ["head"]), helper.make_node("Add", ["x", "head"], ["y"])],
    "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w, idx])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.save(model, {str(path)!r})
"""
    subprocess.run([str(python), "-c", code], check=True)


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Instance:
    def __init__(self, bench, args, data, extra, env):
        self.bench, self.data = bench, data
        self.started = time.monotonic()
        self.proc = bench.start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0",
                                 "--data-dir", str(data), *extra],
                                env={**os.environ, "FERRY_LOG": "error", **env}, read_stdout=True)
        self.url = self.proc.stdout.readline().strip().removeprefix("ferry listening on ")
        if not self.url:
            raise SystemExit(f"ferry serve {' '.join(extra)} did not start")
        bench.wait_http(f"{self.url}/v2/health/ready", timeout=600)
        self.token = (data / "admin-token").read_text().strip()

    def cli(self, args, *words):
        return subprocess.run([args.ferry, "--server", self.url, "--token", self.token, *words],
                              check=True, capture_output=True, text=True)

    def mib(self, field):
        return round(status_kib(self.proc.pid, field) / 1024, 1)

    def stop(self):
        self.bench.stop(self.proc)


def first_answer(url, model, body, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer {model} within {timeout}s")


def cpu_per_request(bench, args, tmp, pg_url, rounds, seconds, rate):
    """The same fixed-rate load on a SQLite and a PostgreSQL instance,
    interleaved round by round; CPU µs per answered request of each."""
    targets = {
        "sqlite": Instance(bench, args, tmp / "cpu-sqlite", [], {}),
        "postgres": Instance(bench, args, tmp / "cpu-postgres", ["--store", pg_url], {}),
    }
    model = str(bench.ROOT / "examples/models/cancer-v1.onnx")
    data = str(bench.ROOT / "examples/models/cancer-holdout.jsonl")
    runs = {name: [] for name in targets}
    try:
        for t in targets.values():
            t.cli(args, "model", "add", "cancer", "1", "--file", model)

        def load(t, secs):
            out = subprocess.run(bench.pinned(args.load_cpus, [args.ferry, "--server", t.url, "--token", t.token, "traffic", "cancer",
                                                                "--rps", str(rate), "--duration", f"{secs}s",
                                                                "--data", data, "-o", "json"]),
                                 check=True, capture_output=True, text=True).stdout
            return json.loads(out)

        for t in targets.values():
            load(t, 1)  # warm-up
        for _ in range(rounds):
            for name, t in targets.items():
                before = bench.cpu_seconds(t.proc.pid)
                seen = load(t, seconds)
                cpu = bench.cpu_seconds(t.proc.pid) - before
                runs[name].append({"cpu_us": round(cpu / max(seen["ok"], 1) * 1e6, 1), "ok": seen["ok"],
                                   "failed": seen["requests"] - seen["ok"], "p50_ms": seen["latency_ms"]["p50"],
                                   "p99_ms": seen["latency_ms"]["p99"]})
                log(f"   {name}: {runs[name][-1]}")
    finally:
        for t in targets.values():
            t.stop()
    import statistics
    out = {name: {"cpu_us": statistics.median(r["cpu_us"] for r in rs), "runs": rs} for name, rs in runs.items()}
    out["ratio"] = round(out["postgres"]["cpu_us"] / out["sqlite"]["cpu_us"], 3)
    out["rate"], out["seconds"], out["rounds"] = rate, seconds, rounds
    return out


def big_artifact(bench, args, tmp, name, model_file, extra, env, body):
    """Registration through A, then B (fresh data dir, same store) until its
    first warm answer; times and peak memory of both."""
    a = Instance(bench, args, tmp / f"{name}-a", extra, env)
    out = {"a_rss_idle_mib": a.mib("VmRSS")}
    try:
        t = time.monotonic()
        a.cli(args, "model", "add", "big", "1", "--file", str(model_file))
        out["register_s"] = round(time.monotonic() - t, 2)
        first_answer(a.url, "big", body)
        out["a_peak_mib"] = a.mib("VmHWM")
        if name == "sqlite":
            return out
        t = time.monotonic()
        b = Instance(bench, args, tmp / f"{name}-b", extra, env)
        try:
            out["b_ready_s"] = round(time.monotonic() - t, 2)
            first_answer(b.url, "big", body)
            out["b_first_answer_s"] = round(time.monotonic() - t, 2)
            out["b_peak_mib"] = b.mib("VmHWM")
        finally:
            b.stop()
    finally:
        a.stop()
    return out


def run(bench, args, tmp, body):
    tmp = pathlib.Path(tmp) / "store"
    tmp.mkdir(exist_ok=True)
    bin_dir = venv(bench)
    pg = Postgres()
    moto, moto_env = None, {}
    try:
        rounds, seconds = (3, 3) if args.quick else (5, 10)
        log(f"== CPU per in-process request: SQLite vs PostgreSQL store ({rounds} rounds of {seconds} s at 1000 req/s)")
        out = {"cpu_per_request": cpu_per_request(bench, args, tmp, pg.database("ferry_cpu"), rounds, seconds, 1000)}
        model = tmp / "big.onnx"
        make_big_model(bin_dir / "python", model, 100)
        out["artifact_bytes"] = model.stat().st_size
        big_body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
        moto, moto_env = start_moto(bench, bin_dir)
        ways = [
            ("sqlite", [], {}),
            ("postgres", ["--store", pg.database("ferry_big")], {}),
            ("postgres_s3", ["--store", pg.database("ferry_big_s3"), "--artifacts", "s3://ferry-bench/big"], moto_env),
        ]
        out["big_artifact"] = {}
        for name, extra, env in ways:
            log(f"== a {out['artifact_bytes'] // 2**20} MiB artifact: {name}")
            out["big_artifact"][name] = big_artifact(bench, args, tmp, name, model, extra, env, big_body)
            log(f"   {out['big_artifact'][name]}")
        return out
    finally:
        if moto:
            bench.stop(moto)
        pg.stop()
