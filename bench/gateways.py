"""Routing overhead, side by side: Ferry as a gateway vs nginx split_clients,
HAProxy weighted backends and the upstream hit directly; and mirroring: Ferry's
shadow vs nginx `mirror`. Called by bench/bench.py (`--suite gateways`).

Two fixed-response V2 upstreams are built from nginx itself (`return 200` with
a fixed inference answer, plus the metadata and readiness Ferry checks when it
registers a remote version). Each upstream writes an access log, so the same
run checks correctness: the 90/10 split, and that mirrored copies arrive with
the whole body.
"""

import json
import os
import pathlib
import statistics
import subprocess
import time

ANSWER = json.dumps({
    "model_name": "cancer", "model_version": "1",
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.2, 0.8]},
    ],
})
METADATA = json.dumps({
    "name": "cancer", "versions": ["1"], "platform": "fixed",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
})


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def nginx_conf(tmp, servers):
    """A whole nginx configuration with `servers` (server blocks) inside."""
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-{os.getpid()}-{time.time_ns()}.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp};
  proxy_temp_path {tmp};
  fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp};
  scgi_temp_path {tmp};
  log_format body '$content_length $request_length';
  {servers}
}}
"""


def upstream_server(port, name, log):
    return f"""
  server {{
    listen 127.0.0.1:{port};
    location = /v2/models/cancer {{ default_type application/json; return 200 '{METADATA}'; }}
    location = /v2/models/cancer/ready {{ default_type application/json; return 200 '{{"ready": true}}'; }}
    location / {{
      access_log {log} body;
      default_type application/json;
      add_header x-upstream {name};
      return 200 '{ANSWER}';
    }}
  }}"""


def start_nginx(bench, tmp, name, servers):
    conf = tmp / f"{name}.conf"
    conf.write_text(nginx_conf(tmp, servers))
    proc = bench.start(["nginx", "-c", str(conf), "-p", str(tmp)])
    return proc


def body_lengths(path):
    """Content-Length of the requests in an upstream's log, counted: the
    client's body length for a proxied or mirrored copy sent as is (a
    re-encoded copy shows its own, constant length). nginx's `return` does
    not read the body, so lengths are all the log can say."""
    seen = {}
    try:
        for line in open(path):
            length = line.split()[0]
            seen[length] = seen.get(length, 0) + 1
    except (FileNotFoundError, IndexError):
        pass
    return seen


def count_lines(path):
    try:
        return sum(1 for _ in open(path))
    except FileNotFoundError:
        return 0


def run(bench, args, tmp, body):
    tmp = pathlib.Path(tmp) / "gateways"
    tmp.mkdir(exist_ok=True)
    ua, ub = free_port(), free_port()
    log_a, log_b = tmp / "a.log", tmp / "b.log"
    upstreams = start_nginx(bench, tmp, "upstreams", upstream_server(ua, "a", log_a) + upstream_server(ub, "b", log_b))
    procs = [upstreams]
    body_len = pathlib.Path(body).stat().st_size
    rate = args.routing_rate
    dur = "3s" if args.quick else "10s"
    results = {}

    def measure(name, url, pids):
        bench.wait_http(url.rsplit("/v2", 1)[0] + "/v2/models/cancer/ready", timeout=30) if "ferry" not in name else None
        bench.oha(args, url, body, ["-c", "8", "-z", "1s"])  # warm-up (keep-alive connections)

        def once():
            for f in (log_a, log_b):
                open(f, "w").close()
            before = sum(bench.cpu_seconds(p) for p in pids)
            fixed = bench.oha(args, url, body, ["-c", "8", "-q", str(rate), "--latency-correction", "-z", dur])
            cpu = sum(bench.cpu_seconds(p) for p in pids) - before
            a, b = count_lines(log_a), count_lines(log_b)
            lengths = {"a": body_lengths(log_a), "b": body_lengths(log_b)}
            for f in (log_a, log_b):
                open(f, "w").close()
            sat = bench.oha(args, url, body, ["-c", "64", "-z", dur])
            time.sleep(1)  # copies still in flight reach b
            sat_a, sat_b = count_lines(log_a), count_lines(log_b)
            return {
                "fixed_rate": fixed,
                "cpu_us_per_request": round(cpu / max(fixed["ok"], 1) * 1e6, 1),
                "saturation_c64_rps": sat["rps"],
                "upstream_a": a,
                "upstream_b": b,
                "body_lengths": lengths,
                # At saturation: what each upstream saw. For a mirror, b's
                # share of a is the copies that reached the shadow (1 - the
                # share dropped).
                "saturation_upstream_a": sat_a,
                "saturation_upstream_b": sat_b,
                "saturation_b_per_a": round(sat_b / max(sat_a, 1), 4),
            }

        r = bench.repeated(args, once)
        results[name] = r
        bench.log(f"   {name}: {r}")
        return r

    def shadow_cost(route, url, stable):
        """The primary's latency with a 100 % shadow on and off, at a fixed
        rate of half the gateway's saturation (stable only), rounds
        interleaved so the machine's noise moves both alike."""
        half = int(stable["saturation_c64_rps"] / 2)
        on = {"stable": "a", "shadow": {"version": "b", "percent": 100, "compare": {"output": "label"}}}
        off = {"stable": "a"}
        runs = {"off": [], "on": []}
        for _ in range(args.repeat):
            for name, policy in (("off", off), ("on", on)):
                route(policy)
                bench.oha(args, url, body, ["-c", "8", "-z", "1s"])
                runs[name].append(bench.oha(args, url, body, ["-c", "32", "-q", str(half), "--latency-correction", "-z", dur]))
        route(off)
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("p50_ms", "p99_ms", "rps")} for k, v in runs.items()}
        out = {"rate": half, "off": med["off"], "on": med["on"], "runs": runs,
               "p99_on_vs_off": round(med["on"]["p99_ms"] / med["off"]["p99_ms"], 3)}
        bench.log(f"   shadow at half saturation ({half} req/s): p99 on/off {out['p99_on_vs_off']}")
        return out

    def children(pid):
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [pid] + [int(p) for p in out]

    try:
        bench.wait_http(f"http://127.0.0.1:{ua}/v2/models/cancer/ready")
        # The upstream alone (the floor: the load generator and the upstream).
        measure("direct to upstream", f"http://127.0.0.1:{ua}/v2/models/cancer/infer", [])

        # nginx split_clients 90/10, keep-alive to the upstreams.
        gp = free_port()
        split = f"""
  upstream a {{ server 127.0.0.1:{ua}; keepalive 64; }}
  upstream b {{ server 127.0.0.1:{ub}; keepalive 64; }}
  split_clients "$request_id" $pool {{ 90% a; * b; }}
  server {{
    listen 127.0.0.1:{gp};
    location / {{ proxy_pass http://$pool; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""
        nginx = start_nginx(bench, tmp, "split", split)
        procs.append(nginx)
        time.sleep(0.5)
        measure("nginx split_clients 90/10", f"http://127.0.0.1:{gp}/v2/models/cancer/infer", children(nginx.pid))
        bench.stop(nginx)

        # nginx mirror: every request also goes to b.
        mp = free_port()
        mirror = f"""
  upstream a {{ server 127.0.0.1:{ua}; keepalive 64; }}
  upstream b {{ server 127.0.0.1:{ub}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{mp};
    location / {{ mirror /mirror; mirror_request_body on; proxy_pass http://a; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /mirror {{ internal; proxy_pass http://b$request_uri; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""
        nginx = start_nginx(bench, tmp, "mirror", mirror)
        time.sleep(0.5)
        measure("nginx mirror 100%", f"http://127.0.0.1:{mp}/v2/models/cancer/infer", children(nginx.pid))
        bench.stop(nginx)

        # HAProxy weighted backends 90/10. roundrobin honours weights exactly;
        # `balance random` is random(2) in HAProxy 2.x (the less loaded of two
        # draws), which drifted to 14 % for a 10 % weight in earlier runs.
        hp = free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(f"""
global
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:{hp}
  default_backend pool
backend pool
  balance roundrobin
  server a 127.0.0.1:{ua} weight 90
  server b 127.0.0.1:{ub} weight 10
""")
        haproxy = bench.start(["haproxy", "-f", str(cfg), "-db"])
        time.sleep(0.5)
        measure("haproxy weighted 90/10", f"http://127.0.0.1:{hp}/v2/models/cancer/infer", [haproxy.pid])
        bench.stop(haproxy)

        # Ferry with two remote versions, with its default I/O threads (one
        # per core) and with one.
        for label, extra in [("", []), (", 1 I/O thread", ["--io-threads", "1"])]:
            data = tmp / f"ferry-data{len(extra)}"
            ferry = bench.start([args.ferry, "serve", "--grpc-listen", "off", "--listen", "127.0.0.1:0", "--data-dir", str(data), *extra],
                                env={**os.environ, "FERRY_LOG": "error"}, read_stdout=True)
            procs.append(ferry)
            url = ferry.stdout.readline().strip().removeprefix("ferry listening on ")
            bench.wait_http(f"{url}/v2/health/ready")
            token = (data / "admin-token").read_text().strip()
            cli = [args.ferry, "--server", url, "--token", token]
            subprocess.run([*cli, "model", "add", "cancer", "a", "--url", f"http://127.0.0.1:{ua}"], check=True, capture_output=True)
            subprocess.run([*cli, "model", "add", "cancer", "b", "--url", f"http://127.0.0.1:{ub}"], check=True, capture_output=True)

            def route(policy):
                bench.api(url, token, "PUT", "/api/v1/models/cancer/route", policy)

            route({"stable": "a", "candidate": {"version": "b", "weight": 10}})
            measure(f"ferry split 90/10{label}", f"{url}/v2/models/cancer/infer", [ferry.pid])
            route({"stable": "a", "shadow": {"version": "b", "percent": 100, "compare": {"output": "label"}}})
            measure(f"ferry shadow 100%{label}", f"{url}/v2/models/cancer/infer", [ferry.pid])
            route({"stable": "a"})
            stable = measure(f"ferry stable only{label}", f"{url}/v2/models/cancer/infer", [ferry.pid])
            if not extra:
                results["shadow_at_half_saturation"] = shadow_cost(route, f"{url}/v2/models/cancer/infer", stable)
            bench.stop(ferry)

        # The client's body length, to compare with the upstreams' body_lengths.
        results["body_length"] = body_len
        return results
    finally:
        for p in procs:
            bench.stop(p)
