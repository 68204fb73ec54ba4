"""A shadow's own latency beside stable's, as analysis reads them: two
identical fixed-response nginx upstreams registered as versions `a`
(stable) and `b` (shadow, 100 %), 10 s of load at each rate given, then the
last 15 s of `/api/v1/models/cancer/metrics` per series (p50, p99, copies
dropped). Servers on CPU 0, oha on CPU 1, as in bench/run.sh (run that
once first: it installs oha and nginx).

    PATH=$PATH:/usr/sbin python3 bench/shadow_latency.py FERRY_BINARY 2000 16000
"""
import sys, os, subprocess, time, json, pathlib, tempfile
os.chdir(pathlib.Path(__file__).resolve().parent.parent)
import bench, gateways
class A: pass
args=A(); args.sut_cpus="0"; args.load_cpus="1"; args.oha="bench/.tools/bin/oha"
bench.ARGS=args
tmp=pathlib.Path(tempfile.mkdtemp())
ua,ub=gateways.free_port(),gateways.free_port()
os.environ["PATH"]+=":/usr/sbin"
# UPSTREAMS_CPU=1 puts the upstreams beside oha, off the gateway's core (as
# remote models run on other hosts).
args.sut_cpus=os.environ.get("UPSTREAMS_CPU","0")
ups=gateways.start_nginx(bench,tmp,"ups",gateways.upstream_server(ua,"a",tmp/"a.log")+gateways.upstream_server(ub,"b",tmp/"b.log"))
args.sut_cpus="0"
bench.wait_http(f"http://127.0.0.1:{ua}/v2/models/cancer/ready")
binary=sys.argv[1]
data=tmp/"d"
f=bench.start([binary,"serve","--listen","127.0.0.1:0","--data-dir",str(data)],env={**os.environ,"FERRY_LOG":"warn"},read_stdout=True)
try:
    url=f.stdout.readline().strip().removeprefix("ferry listening on ")
    bench.wait_http(f"{url}/v2/health/ready")
    tok=(data/"admin-token").read_text().strip()
    cli=[binary,"--server",url,"--token",tok]
    subprocess.run([*cli,"model","add","cancer","a","--url",f"http://127.0.0.1:{ua}"],check=True,capture_output=True)
    subprocess.run([*cli,"model","add","cancer","b","--url",f"http://127.0.0.1:{ub}"],check=True,capture_output=True)
    bench.api(url,tok,"PUT","/api/v1/models/cancer/route",{"stable":"a","shadow":{"version":"b","percent":100,"compare":{"output":"label"}}})
    row=json.loads(open("examples/models/cancer-holdout.jsonl").readline()); row.pop("label")
    body=tmp/"body.json"; body.write_text(json.dumps(row))
    for rate in sys.argv[2:]:
        time.sleep(6)  # a fresh 5 s bucket
        r=bench.oha(args,f"{url}/v2/models/cancer/infer",body,["-c","8","-q",rate,"--latency-correction","-z","10s"])
        m=bench.api(url,tok,"GET","/api/v1/models/cancer/metrics?window=15s")
        for sr in m["series"]:
            print(rate, sr["version"], sr["role"], "req", sr.get("requests"), "p50", sr.get("latency_p50_ms"), "p99", sr.get("latency_p99_ms"), "dropped", sr.get("dropped"), flush=True)
finally:
    bench.stop(f); bench.stop(ups)
