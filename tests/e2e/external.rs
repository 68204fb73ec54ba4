//! External analysis checks: a real Prometheus server (Debian's package,
//! provisioned by the test when it is not installed) scraping Ferry's own
//! `/metrics`, and a webhook that judges each window.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{Server, Traffic, eventually, repo};
use super::upstream::Upstream;

/// Debian's `prometheus`: on PATH, or unpacked from the package into the
/// target dir (apt-get download + dpkg-deb, no system change).
fn prometheus_binary() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("test-prometheus");
    let bin = dir.join("usr/bin/prometheus");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let download = || {
        Command::new("apt-get")
            .args(["download", "prometheus"])
            .current_dir(&dir)
            .status()
    };
    if !download().is_ok_and(|s| s.success()) {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        assert!(
            download().is_ok_and(|s| s.success()),
            "this test needs Debian's prometheus package: install it (apt-get install prometheus) or let `apt-get download prometheus` work"
        );
    }
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded package");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(
        ok.success() && bin.exists(),
        "could not unpack {}",
        deb.display()
    );
    bin
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_prometheus(ferry: &Server) -> Prometheus {
    let target = ferry.url.trim_start_matches("http://");
    start_prometheus_with(&[format!(
        "  - job_name: ferry\n    static_configs: [ {{ targets: ['{target}'] }} ]\n"
    )])
    .await
}

/// A Prometheus with these scrape jobs (YAML list items), once every job's
/// target is up.
async fn start_prometheus_with(jobs: &[String]) -> Prometheus {
    let bin = tokio::task::spawn_blocking(prometheus_binary)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n{}",
            jobs.concat()
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let http = reqwest::Client::new();
    let query = format!("{}/api/v1/query?query=sum(up)", p.url);
    let want = jobs.len().to_string();
    eventually(
        Duration::from_secs(30),
        "prometheus scrapes ferry",
        async || match http.get(&query).send().await {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v["data"]["result"][0]["value"][1] == want.as_str()),
            Err(_) => false,
        },
    )
    .await;
    p
}

async fn last_message(s: &Server, within: Duration) -> String {
    let mut message = String::new();
    eventually(within, "the rollout ends", async || {
        let st = s.admin_get("/api/v1/models/cancer/status").await;
        message = st["last_rollout"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        st["phase"] == "idle" && st["last_rollout"].is_object()
    })
    .await;
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_check_on_ferrys_own_metrics_aborts_a_failing_canary() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "broken", "--url", &upstream.url]);
    let prometheus = start_prometheus(&s).await;
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("rollout.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"model: cancer
version: broken
strategy: {{ canary: {{ steps: [ {{ weight: 30 }}, {{ pause: 2m }}, {{ weight: 100 }} ] }} }}
analysis:
  interval: 5s
  min_requests: 5
  failure_limit: 1
  checks:
    - kind: prometheus
      address: "{}"
      query: 'sum(ferry_requests_total{{model="cancer",version="broken",outcome="error"}})'
      max: 3
"#,
            prometheus.url
        ),
    )
    .unwrap();
    let traffic = Traffic::start(&s, 100, 1);
    s.ferry_ok(&["apply", "-f", spec.to_str().unwrap()]);
    upstream.set_failing(true);
    let message = last_message(&s, Duration::from_secs(60)).await;
    traffic.finish().await;
    assert!(
        message.starts_with("aborted:") && message.contains("> 3.00"),
        "{message}"
    );
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    assert!(events.to_string().contains("prometheus"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_check_can_fail_a_window() {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/judge",
        post(|axum::Json(ctx): axum::Json<Value>| async move {
            // The context carries both arms' metrics for the window.
            assert!(ctx["candidate"]["metrics"]["requests"].is_number());
            axum::Json(json!({"result": "fail", "reason": "checkout conversions dropped"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/judge", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("rollout.yaml");
    std::fs::write(
        &spec,
        format!(
            "model: cancer\nversion: \"2\"\nstrategy: {{ canary: {{ steps: [ {{ weight: 50 }}, {{ pause: 2m }}, {{ weight: 100 }} ] }} }}\nanalysis: {{ interval: 5s, min_requests: 5, failure_limit: 1, checks: [ {{ kind: webhook, url: \"{hook}\" }} ] }}\n"
        ),
    )
    .unwrap();
    let traffic = Traffic::start(&s, 100, 1);
    s.ferry_ok(&["apply", "-f", spec.to_str().unwrap()]);
    let message = last_message(&s, Duration::from_secs(40)).await;
    traffic.finish().await;
    assert!(
        message.contains("checkout conversions dropped"),
        "{message}"
    );
}

/// An HTTP proxy for Prometheus' `proxy_url` that asks for Prometheus'
/// classic text format, as scrapers without OpenMetrics do. Returns its URL
/// and the content types Ferry answered with.
async fn classic_text_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::http::{Uri, header};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let answered = seen.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (http, answered) = (http.clone(), answered.clone());
        async move {
            let r = http
                .get(uri.to_string())
                .header(header::ACCEPT, "text/plain;version=0.0.4;q=1,*/*;q=0.1")
                .send()
                .await
                .unwrap();
            let kind = r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_string();
            answered.lock().unwrap().push(kind.clone());
            ([(header::CONTENT_TYPE, kind)], r.bytes().await.unwrap())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// What Prometheus knows of a metric from the target of `job`: its type.
async fn metric_type(p: &Prometheus, job: &str, metric: &str) -> Option<String> {
    let v: Value = reqwest::get(format!(
        "{}/api/v1/targets/metadata?match_target={{job=\"{job}\"}}&metric={metric}",
        p.url
    ))
    .await
    .ok()?
    .json()
    .await
    .ok()?;
    v["data"][0]["type"].as_str().map(str::to_string)
}

async fn query(p: &Prometheus, q: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/api/v1/query", p.url))
        .query(&[("query", q)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A real Prometheus scrapes `/metrics` both ways — as OpenMetrics (its
/// default `Accept`) and, through a proxy that asks for it, as the classic
/// text format — and reads typed counters and `ferry_rollout_phase` from
/// each. Before, the OpenMetrics body came labelled as classic text, so the
/// text parser typed `ferry_requests_total` as unknown, and there was no
/// phase series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_reads_typed_series_and_the_rollout_phase_in_both_formats() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let (one, _) = super::harness::holdout().remove(0);
    assert_eq!(s.infer("/v2/models/cancer/infer", &one).await.0, 200);
    s.start_rollout(&json!({"model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 10}, {"pause": {}}, {"weight": 100}]}}}))
        .await;
    let (proxy, answered) = classic_text_proxy().await;
    let target = s.url.trim_start_matches("http://");
    let prometheus = start_prometheus_with(&[
        format!("  - job_name: openmetrics\n    static_configs: [ {{ targets: ['{target}'] }} ]\n"),
        format!("  - job_name: classic\n    proxy_url: '{proxy}'\n    static_configs: [ {{ targets: ['{target}'] }} ]\n"),
    ])
    .await;
    for job in ["openmetrics", "classic"] {
        let q = format!(
            r#"ferry_rollout_phase{{job="{job}",model="cancer",strategy="canary",phase="paused"}}"#
        );
        let mut last = Value::Null;
        eventually(
            Duration::from_secs(20),
            "the phase is scraped",
            async || {
                last = query(&prometheus, &q).await;
                last["data"]["result"][0]["value"][1] == "1"
            },
        )
        .await;
        let q = format!(
            r#"ferry_requests_total{{job="{job}",model="cancer",version="1",outcome="ok"}}"#
        );
        assert_eq!(
            query(&prometheus, &q).await["data"]["result"][0]["value"][1],
            "1",
            "{job}"
        );
    }
    // Each parser typed the counters.
    assert_eq!(
        metric_type(&prometheus, "openmetrics", "ferry_requests")
            .await
            .as_deref(),
        Some("counter")
    );
    assert_eq!(
        metric_type(&prometheus, "classic", "ferry_requests_total")
            .await
            .as_deref(),
        Some("counter")
    );
    let kinds = answered.lock().unwrap().clone();
    assert!(
        kinds
            .iter()
            .all(|k| k.starts_with("text/plain; version=0.0.4")),
        "{kinds:?}"
    );
    let direct = s
        .http
        .get(s.at("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        direct.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{:?}",
        direct.headers()
    );
    assert!(direct.text().await.unwrap().ends_with("# EOF\n"));
}
