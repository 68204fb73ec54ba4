//! Starting and stopping `ferry serve`, running the CLI, and small HTTP helpers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A Python venv under the target dir (`test-python-NAME`) with
/// `requirements` installed from the package index, made once and reused
/// while the requirements stay the same. Returns its `bin/` directory.
pub fn python_with(name: &str, requirements: &[&str]) -> PathBuf {
    // Tests sharing a venv run in parallel: one installs, the others wait.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let venv = target.join(format!("test-python-{name}"));
    let bin = venv.join("bin");
    let stamp = venv.join(".ferry-requirements");
    let wanted = requirements.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return bin;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "this test needs Python 3 with venv (python3 -m venv) to install {requirements:?}"
    );
    let ok = Command::new(bin.join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(requirements)
        .status()
        .expect("pip runs");
    assert!(ok.success(), "pip install {requirements:?} failed");
    std::fs::write(&stamp, wanted).unwrap();
    bin
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn example(name: &str) -> PathBuf {
    repo().join("examples/models").join(name)
}

pub fn test_data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

/// The CA that signed the test server certificate `tls/server.pem`.
pub fn test_ca() -> reqwest::Certificate {
    let pem = std::fs::read(test_data("tls/ca.pem")).expect("the test CA");
    reqwest::Certificate::from_pem(&pem).expect("a PEM certificate")
}

/// The binary the servers and the CLI run: this build's, or
/// `FERRY_TEST_BINARY` (to show that a new test fails on an older build).
pub fn ferry_binary() -> String {
    std::env::var("FERRY_TEST_BINARY").unwrap_or_else(|_| FERRY.to_string())
}

/// A running `ferry serve` with its own data dir.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    /// The gRPC service's address (`http://127.0.0.1:PORT`), when the test
    /// asked for one with `--grpc-listen` (servers start without it, so
    /// that parallel tests never share a port).
    pub grpc: Option<String>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, &[]).await;
        s._tmp = Some(tmp);
        s
    }

    /// Starts on `dir` (kept by the caller) with extra `serve` arguments.
    pub async fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::start_under(&[], dir, extra).await
    }

    /// Starts `ferry serve` under a command that then runs it (`nsenter
    /// ... --`), for tests that put the server in another mount namespace.
    pub async fn start_under(prefix: &[&str], dir: &Path, extra: &[&str]) -> Server {
        let server = Server::spawn(prefix, &[], dir, extra, Stdio::inherit());
        server.wait_ready().await;
        server
    }

    /// Starts on `dir` with every log line (`FERRY_LOG=trace`) written to `log`.
    pub async fn start_logging_to(log: &Path, dir: &Path, extra: &[&str]) -> Server {
        let file = std::fs::File::create(log).expect("the log file");
        let server = Server::spawn(&[], &[("FERRY_LOG", "trace")], dir, extra, file.into());
        server.wait_ready().await;
        server
    }

    /// Starts `ferry serve` with extra environment variables and returns once
    /// it listens, without waiting for it to be ready (it may crash first).
    pub fn spawn(
        prefix: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
        extra: &[&str],
        stderr: Stdio,
    ) -> Server {
        let mut command = match prefix {
            [] => Command::new(ferry_binary()),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(FERRY);
                c
            }
        };
        let grpc_off: &[&str] = if extra.contains(&"--grpc-listen") {
            &[]
        } else {
            &["--grpc-listen", "off"]
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(grpc_off)
            .args(extra)
            .env("FERRY_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("ferry starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let (grpc_tx, grpc_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ferry listening on ") {
                    let _ = tx.send(url.to_string());
                } else if let Some(url) = line.strip_prefix("ferry gRPC listening on ") {
                    let _ = grpc_tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("ferry prints its address within 30 s");
        // Printed in the same write as the REST address.
        let grpc = grpc_off
            .is_empty()
            .then(|| grpc_rx.recv_timeout(Duration::from_secs(5)).ok())
            .flatten();
        let mut http = reqwest::Client::builder();
        if url.starts_with("https://") {
            http = http.add_root_certificate(test_ca());
        }
        Server {
            child: Some(child),
            url,
            grpc,
            dir: dir.to_path_buf(),
            _tmp: None,
            http: http.build().expect("an HTTP client"),
        }
    }

    /// Whether the server has died: it no longer answers its liveness check,
    /// and then its process exits (within 10 s, or the test fails).
    pub async fn has_died(&mut self) -> bool {
        let live = self.http.get(self.at("/v2/health/live")).send().await;
        if live.is_ok_and(|r| r.status() == 200) {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(c) = &mut self.child
            && c.try_wait().expect("try_wait").is_none()
        {
            assert!(
                Instant::now() < deadline,
                "the server stopped answering but did not exit"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.at("/v2/health/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ferry did not become ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin-token"))
            .expect("admin token exists")
            .trim()
            .to_string()
    }

    /// The `ferry` CLI pointed at this server with its admin token (the
    /// same binary as the server: `FERRY_TEST_BINARY` when set).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ferry_binary());
        c.args(["--server", &self.url, "--token", &self.token()]);
        if self.url.starts_with("https://") {
            c.arg("--ca-cert").arg(test_data("tls/ca.pem"));
        }
        c.args(args);
        c
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("the CLI runs")
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// The analysis flags of a canary judged on latency against stable
    /// every 5 s (`cancer-slow` fails it).
    pub const LATENCY_CHECKED: [&str; 6] = [
        "--interval",
        "5s",
        "--min-requests",
        "10",
        "--max-p99-vs-stable",
        "1.5",
    ];

    /// `ferry deploy cancer VERSION --strategy canary --steps STEPS
    /// --step-pause PAUSE`, then `extra` (analysis flags): its output.
    pub fn deploy_canary(&self, version: &str, steps: &str, pause: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "deploy",
            "cancer",
            version,
            "--strategy",
            "canary",
            "--steps",
            steps,
            "--step-pause",
            pause,
        ];
        args.extend_from_slice(extra);
        self.ferry_ok(&args)
    }

    /// `ferry deploy cancer VERSION` as a shadow of every request, compared
    /// on `label`, that never decides by itself (`--then manual` after
    /// more comparisons than a test makes).
    pub fn deploy_shadow_that_waits(&self, version: &str) -> String {
        self.ferry_ok(&[
            "deploy",
            "cancer",
            version,
            "--strategy",
            "shadow",
            "--mirror-percent",
            "100",
            "--compare-output",
            "label",
            "--min-comparisons",
            "100000",
            "--min-agreement",
            "0.5",
            "--then",
            "manual",
        ])
    }

    /// Runs the CLI with `-o json` and parses the answer.
    pub fn ferry_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ferry_ok(&all)).expect("JSON output")
    }

    /// Registers an example model file as MODEL VERSION.
    pub fn add(&self, model: &str, version: &str, file: &str) -> Value {
        let path = example(file);
        self.ferry_json(&[
            "model",
            "add",
            model,
            version,
            "--file",
            path.to_str().unwrap(),
        ])
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.memory("VmHWM")
    }

    /// The server's resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        self.memory("VmRSS")
    }

    /// A memory figure of /proc/PID/status, in bytes.
    fn memory(&self, key: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"));
        kb * 1024
    }

    /// Sends a signal by name (`-STOP`, `-CONT`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([name, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success(), "kill {name}");
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reaped");
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ferry did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GETs a control-API path with the admin token; returns the JSON answer.
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(self.at(path))
            .bearer_auth(self.token())
            .send()
            .await
            .expect("request sent");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("JSON answer")
    }

    /// POSTs with the admin token (an optional JSON body); returns status and answer.
    pub async fn admin_post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.post(self.at(path)).bearer_auth(self.token());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a request in the binary tensor extension: the JSON `header`,
    /// then the tensors' raw bytes, with `Inference-Header-Content-Length`.
    pub async fn post_binary(
        &self,
        path: &str,
        header: &Value,
        tensors: &[Vec<u8>],
    ) -> reqwest::Response {
        let (body, len) = binary_body(header, tensors);
        self.http
            .post(self.at(path))
            .header("inference-header-content-length", len)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Starts a rollout from a spec (JSON) through the control API; it must
    /// be accepted (201).
    pub async fn start_rollout(&self, spec: &Value) {
        let model = spec["model"].as_str().expect("the spec names its model");
        let (status, body) = self
            .admin_post(
                &format!("/api/v1/models/{model}/rollouts"),
                Some(spec.clone()),
            )
            .await;
        assert_eq!(status, 201, "the rollout was refused: {body}");
    }

    /// PUTs a model's routing policy; returns status and answer.
    pub async fn set_route(&self, model: &str, policy: Value) -> (u16, Value) {
        let r = self
            .http
            .put(self.at(&format!("/api/v1/models/{model}/route")))
            .bearer_auth(self.token())
            .json(&policy)
            .send()
            .await
            .expect("request sent");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// The repository index (`POST /v2/repository/index`).
    pub async fn index(&self) -> Value {
        let r = self
            .http
            .post(self.at("/v2/repository/index"))
            .send()
            .await
            .expect("request sent");
        r.json().await.expect("JSON answer")
    }

    /// The Prometheus exposition.
    pub async fn prometheus(&self) -> String {
        self.http
            .get(self.at("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Loads a version beside the stable one through the repository API.
    pub async fn load(&self, model: &str, version: &str) {
        let path = format!("/v2/repository/models/{model}/load");
        let (status, body) = self
            .admin_post(
                &path,
                Some(serde_json::json!({"parameters": {"version": version}})),
            )
            .await;
        assert_eq!(status, 200, "load {model} {version}: {body}");
    }

    /// The kinds of a model's events, oldest first.
    pub async fn event_kinds(&self, model: &str) -> Vec<String> {
        let events = self
            .admin_get(&format!("/api/v1/models/{model}/events"))
            .await;
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    }

    /// POSTs a JSON inference request to `path`.
    pub async fn infer(
        &self,
        path: &str,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self
            .http
            .post(self.at(path))
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The hold-out rows: (V2 request body without the label, label).
pub fn holdout() -> Vec<(Value, i64)> {
    std::fs::read_to_string(example("cancer-holdout.jsonl"))
        .expect("hold-out set")
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("JSON line");
            let label = v["label"].as_i64().expect("label");
            v.as_object_mut().unwrap().remove("label");
            (v, label)
        })
        .collect()
}

/// A value of a Prometheus series (0 when absent).
/// The series of `/api/v1/models/{m}/metrics` whose `key` is `value`
/// (e.g. `role` `stable`, `version` `2`); `Null` when there is none.
pub fn metrics_series(m: &Value, key: &str, value: &str) -> Value {
    m["series"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x[key] == value)
        .cloned()
        .unwrap_or_default()
}

pub fn series_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A request with `n` hold-out rows as one batch.
pub fn batch(n: usize) -> Value {
    let rows: Vec<Value> = holdout()
        .into_iter()
        .take(n)
        .map(|(v, _)| v["inputs"][0]["data"].clone())
        .collect();
    serde_json::json!({"inputs": [{"name": "input", "shape": [n, 30], "datatype": "FP32", "data": rows}]})
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn eventually<F: AsyncFnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a background load saw: answers per version, and failures.
#[derive(Default, Debug)]
pub struct Seen {
    pub versions: std::collections::HashMap<String, u64>,
    /// One line per failed request (status and body, or the error).
    pub failures: Vec<String>,
}

impl Seen {
    pub fn answered(&self) -> u64 {
        self.versions.values().sum()
    }
}

/// Background traffic to `cancer` from `clients` concurrent clients, each at
/// about `rate / clients` requests per second (`rate` 0: as fast as they
/// can), with 500 sticky user ids and two regions. Stop it with
/// [`Traffic::finish`].
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Seen>,
}

impl Traffic {
    pub fn start(s: &Server, rate: u64, clients: u64) -> Traffic {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        let task = tokio::spawn(async move {
            let rows = Arc::new(holdout());
            let n = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for c in 0..clients {
                let (http, url, rows, flag, n) = (
                    http.clone(),
                    url.clone(),
                    rows.clone(),
                    flag.clone(),
                    n.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut seen = Seen::default();
                    let pause = (rate > 0).then(|| Duration::from_millis(1000 * clients / rate));
                    while !flag.load(Ordering::Relaxed) {
                        let i = n.fetch_add(1, Ordering::Relaxed) as usize;
                        let r = http
                            .post(&url)
                            .header("x-user-id", format!("user-{}", i % 500))
                            .header("x-region", if c % 2 == 0 { "eu-west" } else { "us-east" })
                            .json(&rows[i % rows.len()].0)
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status() == 200 => {
                                let v =
                                    r.headers()["x-ferry-version"].to_str().unwrap().to_string();
                                *seen.versions.entry(v).or_default() += 1;
                            }
                            Ok(r) => seen.failures.push(format!(
                                "{} {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => seen.failures.push(e.to_string()),
                        }
                        if let Some(p) = pause {
                            tokio::time::sleep(p).await;
                        }
                    }
                    seen
                }));
            }
            let mut all = Seen::default();
            for t in tasks {
                let s = t.await.unwrap();
                for (k, v) in s.versions {
                    *all.versions.entry(k).or_default() += v;
                }
                all.failures.extend(s.failures);
            }
            all
        });
        Traffic { stop, task }
    }

    /// Stops the traffic and says what it saw.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The `cancer` model's status.
pub async fn status(s: &Server) -> Value {
    s.admin_get("/api/v1/models/cancer/status").await
}

/// A knob of a long run: the environment variable `name` parsed, or
/// `default` when it is not set. A value that does not parse stops the test
/// with the reason, rather than quietly running the short version.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number this test can use")),
        Err(_) => default,
    }
}

/// Registers `remote` (the V2 server at `url`) and the in-process `local`
/// (cancer-v1) as versions of `cancer`, and routes to `remote` with `local`
/// as its failover (breaker: 3 consecutive failures). Returns the policy.
pub async fn remote_then_local(s: &Server, url: &str) -> Value {
    s.ferry_json(&["model", "add", "cancer", "remote", "--url", url]);
    s.add("cancer", "local", "cancer-v1.onnx");
    let policy = serde_json::json!({"stable": "remote", "failover": ["local"], "timeout": "1s",
                                    "breaker": {"consecutive_failures": 3, "probe_every": "200ms"}});
    assert_eq!(s.set_route("cancer", policy.clone()).await.0, 200);
    policy
}

/// Requests to `cancer` that `version` answered, as the server counts them.
pub async fn answered_by(s: &Server, version: &str) -> f64 {
    let series =
        format!(r#"ferry_requests_total{{model="cancer",version="{version}",outcome="ok"}}"#);
    series_value(&s.prometheus().await, &series)
}

/// Waits until `version` has answered `more` requests beyond what it had
/// answered when this was called (the load is flowing to it).
pub async fn wait_answered(s: &Server, version: &str, more: f64) {
    let from = answered_by(s, version).await;
    eventually(
        Duration::from_secs(30),
        &format!("version {version} answers {more} more requests"),
        async || answered_by(s, version).await >= from + more,
    )
    .await;
}

/// Under load on the chain of [`remote_then_local`], applies `fault` to the
/// remote once it has answered, and checks what users saw until the failover
/// is counted: no error, answers from both versions.
pub async fn fails_over_without_errors(s: &Server, fault: impl AsyncFnOnce()) {
    let failovers =
        r#"ferry_failovers_total{model="cancer",from_version="remote",to_version="local"}"#;
    let traffic = Traffic::start(s, 0, 8);
    wait_answered(s, "remote", 1.0).await;
    fault().await;
    eventually(
        Duration::from_secs(10),
        "a failover is counted",
        async || series_value(&s.prometheus().await, failovers) >= 1.0,
    )
    .await;
    let seen = traffic.finish().await;
    assert!(
        seen.failures.is_empty(),
        "clients saw errors: {:?}",
        seen.failures
    );
    assert!(
        seen.versions.get("remote").copied().unwrap_or(0) > 0,
        "{:?}",
        seen.versions
    );
    assert!(
        seen.versions.get("local").copied().unwrap_or(0) > 0,
        "{:?}",
        seen.versions
    );
}

/// A binary-extension body: the JSON `header`, then the tensors' bytes; and
/// the header's length.
pub fn binary_body(header: &Value, tensors: &[Vec<u8>]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let len = body.len();
    for t in tensors {
        body.extend_from_slice(t);
    }
    (body, len)
}

/// Polls the `cancer` model's status until `done` holds; returns it. A
/// timeout shows the last status (an aborted rollout says why).
pub async fn status_until(
    s: &Server,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let st = status(s).await;
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} within {within:?}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the `cancer` model's last rollout has ended; returns it
/// (`rollout`, `strategy`, `phase`, `message`).
pub async fn ended(s: &Server, within: Duration) -> Value {
    let done = |st: &Value| st["phase"] == "idle" && st["last_rollout"].is_object();
    status_until(s, within, "ended", done).await["last_rollout"].clone()
}

/// Waits until the `cancer` model's rollout waits for `ferry promote`.
pub async fn waiting_for_promote(s: &Server, within: Duration) -> Value {
    let done = |st: &Value| st["waiting_for"] == "promote";
    status_until(s, within, "waiting for promote", done).await
}
