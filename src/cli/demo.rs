//! `ferry demo`: a guided live story on the bundled example models. It starts
//! a server on a fresh temporary data dir, sends realistic traffic (hold-out
//! rows, user ids, regions), and walks through all six strategies, printing
//! what happens and why and the equivalent command. Every phase checks that
//! it ended the way the story says; the demo exits non-zero otherwise, so CI
//! can run it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::Client;
use super::traffic::{Load, Stats, parse_bodies};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Short timings: the whole story in under a minute.
    #[arg(long)]
    pub fast: bool,
    /// Leave the server running afterwards (Ctrl-C stops it).
    #[arg(long)]
    pub keep: bool,
    /// Where the server listens (default: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
}

/// A `ferry serve` child process on a temporary data dir.
struct DemoServer {
    /// Shared with [`super::stop_on_early_exit`]: a closed output pipe ends
    /// the demo without running `Drop`.
    child: Arc<Mutex<Child>>,
    url: String,
    dir: PathBuf,
}

impl DemoServer {
    fn start(listen: &str, dir: &Path) -> anyhow::Result<DemoServer> {
        let exe = std::env::current_exe().context("cannot find the ferry binary")?;
        let mut child = Command::new(exe)
            // The demo speaks REST; its two servers must not both take
            // the default gRPC port (nor one a user's server holds).
            .args([
                "serve",
                "--grpc-listen",
                "off",
                "--listen",
                listen,
                "--data-dir",
            ])
            .arg(dir)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start ferry serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("ferry listening on ")
            .with_context(|| format!("ferry serve did not start: {line:?}"))?
            .to_string();
        let child = Arc::new(Mutex::new(child));
        super::stop_on_early_exit(&child);
        Ok(DemoServer {
            child,
            url,
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The example models and hold-out set (`examples/models`, ≈175 KB),
/// embedded at build time so an installed binary runs the demo anywhere.
mod bundled {
    pub const V1: &[u8] = include_bytes!("../../examples/models/cancer-v1.onnx");
    pub const V2: &[u8] = include_bytes!("../../examples/models/cancer-v2.onnx");
    pub const SLOW: &[u8] = include_bytes!("../../examples/models/cancer-slow.onnx");
    pub const BAD: &[u8] = include_bytes!("../../examples/models/cancer-bad.onnx");
    pub const HOLDOUT: &str = include_str!("../../examples/models/cancer-holdout.jsonl");
}

struct Story {
    client: Client,
    url: String,
    fast: bool,
    stats: Arc<Mutex<Stats>>,
    failures: Vec<String>,
    phase: usize,
}

const PHASES: usize = 7;

impl Story {
    fn t(&self, normal: u64, fast: u64) -> String {
        format!("{}s", if self.fast { fast } else { normal })
    }

    fn title(&mut self, name: &str, why: &str) {
        self.phase += 1;
        outln!("\n\x1b[1m[{}/{PHASES}] {name}\x1b[0m\n  {why}", self.phase);
    }

    fn command(&self, cmd: &str) {
        outln!("  \x1b[2m$ {cmd}\x1b[0m");
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut rb = self.client.request(method, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        Ok(self.client.send::<Value>(rb).await?.1)
    }

    async fn add(&self, version: &str, model: &'static [u8]) -> anyhow::Result<()> {
        let form = reqwest::multipart::Form::new().text("spec", "{}").part(
            "artifact",
            reqwest::multipart::Part::bytes(model).file_name("model.onnx"),
        );
        let path = format!("/api/v1/models/cancer/versions/{version}");
        self.client
            .send::<Value>(self.client.request(Method::PUT, &path).multipart(form))
            .await?;
        Ok(())
    }

    async fn deploy(&self, spec: Value) -> anyhow::Result<()> {
        self.api(Method::POST, "/api/v1/models/cancer/rollouts", Some(spec))
            .await?;
        Ok(())
    }

    /// Follows the rollout until it ends, printing each new message; returns
    /// the final phase and message.
    async fn follow(&self, limit: Duration) -> anyhow::Result<(String, String)> {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            let st = self
                .api(Method::GET, "/api/v1/models/cancer/status", None)
                .await?;
            let message = st["message"].as_str().unwrap_or("").to_string();
            let traffic = st["traffic"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(v, w)| format!("{v}:{}%", w))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let line = format!("{message}  [{traffic}]");
            if line != last && st["phase"] != "idle" {
                outln!("  · {line}");
                last = line;
            }
            if st["phase"] == "idle" && st["last_rollout"].is_object() {
                let l = &st["last_rollout"];
                return Ok((
                    l["phase"].as_str().unwrap_or("").to_string(),
                    l["message"].as_str().unwrap_or("").to_string(),
                ));
            }
            if started.elapsed() > limit {
                bail!("the rollout did not end within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }

    /// Checks how a phase ended against the story.
    fn expect(&mut self, what: &str, got: (String, String), want: &str) {
        if got.0 == want {
            outln!("  \x1b[32m✓\x1b[0m {what}: {} — {}", got.0, got.1);
        } else {
            outln!(
                "  \x1b[31m✗\x1b[0m {what}: expected {want}, got {} — {}",
                got.0,
                got.1
            );
            self.failures
                .push(format!("{what}: expected {want}, got {}", got.0));
        }
    }

    fn check(&mut self, what: &str, ok: bool, detail: String) {
        if ok {
            outln!("  \x1b[32m✓\x1b[0m {what}: {detail}");
        } else {
            outln!("  \x1b[31m✗\x1b[0m {what}: {detail}");
            self.failures.push(format!("{what}: {detail}"));
        }
    }

    fn traffic_since(&self, before: &Stats) -> (u64, u64, Vec<(String, u64)>) {
        let now = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let versions = now
            .versions
            .iter()
            .map(|(v, n)| (v.clone(), n - before.versions.get(v).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        (now.ok - before.ok, now.failed() - before.failed(), versions)
    }

    fn snapshot(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `ferry demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut nonce = [0u8; 4];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", hex::encode(nonce)));
    std::fs::create_dir_all(&dir)?;
    let server = DemoServer::start(&args.listen, &dir)?;
    let token = std::fs::read_to_string(dir.join("admin-token"))?
        .trim()
        .to_string();
    let client = Client::new(&server.url, Some(token.clone()), None)?;
    let http = client.http().clone();
    wait_until_ready(&http, &server.url).await?;
    outln!(
        "\x1b[1mFerry demo\x1b[0m — six ways to ship a model, on the bundled breast-cancer classifiers"
    );
    outln!(
        "  server     {}   (data in {})",
        server.url,
        server.dir.display()
    );
    outln!(
        "  dashboard  {}/ui/#token={token}   (the link signs you in)",
        server.url
    );
    outln!(
        "  CLI        export FERRY_SERVER={} FERRY_TOKEN={token}",
        server.url
    );

    let bodies = parse_bodies(bundled::HOLDOUT, "the bundled cancer-holdout.jsonl")?;
    let mut story = Story {
        client,
        url: server.url.clone(),
        fast: args.fast,
        stats: Arc::new(Mutex::new(Stats::default())),
        failures: Vec::new(),
        phase: 0,
    };
    story.add("1", bundled::V1).await?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        http: http.clone(),
        url: format!("{}/v2/models/cancer/infer", server.url),
        bodies: Arc::new(bodies),
        rps: if args.fast { 150.0 } else { 100.0 },
        users: Some((500, "x-user-id".into())),
        headers: vec![],
        rotate: Some((
            "x-region".into(),
            vec!["eu-west".into(), "us-east".into(), "ap-south".into()],
        )),
    };
    let traffic = {
        let (load, stop, stats) = (load.clone(), stop.clone(), story.stats.clone());
        tokio::spawn(async move { load.run(None, stop, stats).await })
    };
    outln!(
        "\n  traffic    {} requests/s from the hold-out set, 500 users (x-user-id), 3 regions (x-region)",
        load.rps
    );
    let result = tell(&mut story).await;
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    if let Err(e) = result {
        story.failures.push(e.to_string());
    }
    print_outcome(&story, started.elapsed());
    if args.keep {
        outln!(
            "\nThe server keeps running at {} — Ctrl-C stops it.",
            server.url
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(if story.failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Waits (at most 30 s) until the demo's server says it is ready.
async fn wait_until_ready(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let ready = Instant::now();
    while http
        .get(format!("{url}/v2/health/ready"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .ok()
        != Some(true)
    {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "the demo server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The closing lines: what the traffic saw, and what did not go as told.
fn print_outcome(story: &Story, took: Duration) {
    let s = story.snapshot();
    outln!(
        "\n\x1b[1mDone in {:.0} s\x1b[0m: {} requests answered, {} failed (those a failing candidate was allowed to expose), p50 {} ms, p99 {} ms",
        took.as_secs_f64(),
        s.ok,
        s.failed(),
        s.ms(0.5).unwrap_or(0.0),
        s.ms(0.99).unwrap_or(0.0)
    );
    if !story.failures.is_empty() {
        outln!("\x1b[31mThe story did not go as told:\x1b[0m");
        for f in &story.failures {
            outln!("  - {f}");
        }
    }
}

async fn tell(story: &mut Story) -> anyhow::Result<()> {
    let long = Duration::from_secs(120);
    // 1. basic
    story.title(
        "basic: replace in place",
        "Version 2 (gradient boosting) replaces version 1 at once: fastest, no safety net.",
    );
    story.add("2", bundled::V2).await?;
    story.command("ferry model add cancer 2 --file examples/models/cancer-v2.onnx");
    story.command("ferry deploy cancer 2 --strategy basic");
    story
        .deploy(json!({"model": "cancer", "version": "2", "strategy": {"basic": {}}}))
        .await?;
    let end = story.follow(long).await?;
    story.expect("basic", end, "succeeded");

    // 2. rolling
    story.title(
        "rolling: replace replicas in batches",
        "Version 3 takes over a pool of 4 replicas one at a time; traffic follows the replicas (25/50/75/100 %).",
    );
    story.add("3", bundled::V1).await?;
    let pause = story.t(4, 1);
    story.command(&format!(
        "ferry deploy cancer 3 --strategy rolling --replicas 4 --batch-size 1 --batch-pause {pause}"
    ));
    story
        .deploy(json!({"model": "cancer", "version": "3", "strategy": {"rolling": {"replicas": 4, "batch_size": 1, "batch_pause": pause}}}))
        .await?;
    let end = story.follow(long).await?;
    story.expect("rolling", end, "succeeded");

    // 3. canary promoted, with its A/B report
    story.title(
        "canary: a share of users, compared live with stable",
        "Version 4 (gradient boosting again) goes to 20 % then 50 % of users, sticky per user, while analysis compares error rate and latency with version 3.",
    );
    story.add("4", bundled::V2).await?;
    let pause = story.t(10, 3);
    story.command(&format!(
        "ferry deploy cancer 4 --strategy canary --steps 20,50,100 --step-pause {pause} --sticky-header x-user-id --max-error-rate 0.01 --max-p99-vs-stable 3"
    ));
    story
        .deploy(json!({
            "model": "cancer", "version": "4",
            "strategy": {"canary": {"steps": [{"weight": 20}, {"pause": pause}, {"weight": 50}, {"pause": pause}, {"weight": 100}], "sticky": {"header": "x-user-id"}}},
            "analysis": {"interval": "5s", "min_requests": 20, "checks": [{"metric": "error_rate", "max": 0.01}, {"metric": "latency_p99_ms", "max_vs_stable": 3}]}
        }))
        .await?;
    let end = story.follow(long).await?;
    story.expect("canary of cancer-v2", end, "succeeded");
    let report = story
        .api(Method::GET, "/api/v1/models/cancer/report", None)
        .await?;
    outln!(
        "  A/B report: stable {} answered {} requests (error rate {}), candidate {} answered {} (error rate {}); p50 {} vs {} ms",
        report["stable"]["version"],
        report["stable"]["requests"],
        report["stable"]["error_rate"]["value"],
        report["candidate"]["version"],
        report["candidate"]["requests"],
        report["candidate"]["error_rate"]["value"],
        report["stable"]["latency_p50_ms"],
        report["candidate"]["latency_p50_ms"]
    );
    story.command("ferry report cancer");

    // 4. canary of cancer-slow rolled back on latency
    story.title(
        "canary rolled back automatically",
        "cancer-slow gives the same answers, 40 ms slower. The latency check fails with significance and the canary aborts on its own.",
    );
    story.add("slow", bundled::SLOW).await?;
    story.command("ferry deploy cancer slow --strategy canary --steps 20,100 --step-pause 1m --max-p99-vs-stable 1.5");
    story
        .deploy(json!({
            "model": "cancer", "version": "slow",
            "strategy": {"canary": {"steps": [{"weight": 20}, {"pause": "1m"}, {"weight": 100}]}},
            "analysis": {"interval": "5s", "min_requests": 10, "failure_limit": 1, "checks": [{"metric": "latency_p99_ms", "max_vs_stable": 1.5}]}
        }))
        .await?;
    let end = story.follow(long).await?;
    story.expect("canary of cancer-slow", end, "aborted");

    // 5. shadow of cancer-bad rejected on agreement
    story.title(
        "shadow: compare without showing",
        "cancer-bad gets a copy of every request; users never see its answers. It agrees with production on too few of them.",
    );
    story.add("bad", bundled::BAD).await?;
    story.command("ferry deploy cancer bad --strategy shadow --mirror-percent 100 --compare-output label --min-comparisons 200 --min-agreement 0.95 --then promote");
    let before = story.snapshot();
    story
        .deploy(json!({
            "model": "cancer", "version": "bad",
            "strategy": {"shadow": {"mirror_percent": 100, "compare": {"output": "label"}, "min_comparisons": 200, "min_agreement": 0.95, "then": "promote"}}
        }))
        .await?;
    let end = story.follow(long).await?;
    story.expect("shadow of cancer-bad", end, "aborted");
    let (_, _, versions) = story.traffic_since(&before);
    story.check(
        "users never got the shadow's answers",
        !versions.iter().any(|(v, _)| v == "bad"),
        format!("answers by version while it was mirrored: {versions:?}"),
    );

    // 6. blue-green with the QA gate
    story.title(
        "blue-green: stage, test, switch",
        "Version 5 loads into staging (x-ferry-env: staging), the hold-out set runs against it as a QA gate, then production switches at once; version 4 stays warm for an instant rollback.",
    );
    story.add("5", bundled::V2).await?;
    let content = bundled::HOLDOUT;
    let auto = story.t(8, 2);
    story.command(&format!(
        "ferry deploy cancer 5 --strategy blue-green --qa-dataset examples/models/cancer-holdout.jsonl --min-accuracy 0.9 --auto-promote-after {auto} --scale-down-delay 5m"
    ));
    story
        .deploy(json!({
            "model": "cancer", "version": "5",
            "strategy": {"blue_green": {"qa": {"dataset": "cancer-holdout.jsonl", "content": content, "output": "probabilities", "min_accuracy": 0.9}, "auto_promote_after": auto, "scale_down_delay": "5m"}}
        }))
        .await?;
    let end = story.follow(long).await?;
    story.expect("blue-green", end, "succeeded");

    // 7. multi-version failover
    story.title(
        "multi-version: fail over to the previous version",
        "Version 6 runs on another server; version 5 stays warm behind it. The other server dies: requests fail over to version 5, users see no error.",
    );
    let remote_dir =
        std::env::temp_dir().join(format!("{}-remote", story.url.replace([':', '/', '.'], "")));
    std::fs::create_dir_all(&remote_dir)?;
    let remote = DemoServer::start("127.0.0.1:0", &remote_dir)?;
    let remote_client = Client::new(
        &remote.url,
        Some(
            std::fs::read_to_string(remote_dir.join("admin-token"))?
                .trim()
                .to_string(),
        ),
        None,
    )?;
    let form = reqwest::multipart::Form::new().text("spec", "{}").part(
        "artifact",
        reqwest::multipart::Part::bytes(bundled::V2).file_name("model.onnx"),
    );
    remote_client
        .send::<Value>(
            remote_client
                .request(Method::PUT, "/api/v1/models/cancer/versions/1")
                .multipart(form),
        )
        .await?;
    story
        .api(
            Method::PUT,
            "/api/v1/models/cancer/versions/6",
            Some(json!({"urls": [remote.url]})),
        )
        .await?;
    story.command(&format!("ferry model add cancer 6 --url {}", remote.url));
    story.command("ferry deploy cancer 6 --strategy multi --keep 1 --timeout 500ms");
    story
        .deploy(json!({"model": "cancer", "version": "6", "strategy": {"multi": {"keep": 1, "timeout": "500ms"}}}))
        .await?;
    let end = story.follow(long).await?;
    story.expect("multi", end, "succeeded");
    tokio::time::sleep(Duration::from_secs(if story.fast { 1 } else { 3 })).await;
    let before = story.snapshot();
    outln!("  · stopping the server behind version 6 …");
    drop(remote);
    let _ = std::fs::remove_dir_all(&remote_dir);
    tokio::time::sleep(Duration::from_secs(if story.fast { 2 } else { 5 })).await;
    let (ok, failed, versions) = story.traffic_since(&before);
    story.check(
        "failover",
        failed == 0 && versions.iter().any(|(v, n)| v == "5" && *n > 0),
        format!("{ok} answered, {failed} failed since the primary died; answers by version: {versions:?}"),
    );
    story.command("ferry rollback cancer        # instant: version 5 is still loaded");
    story
        .api(
            Method::POST,
            "/api/v1/models/cancer/rollback",
            Some(json!({})),
        )
        .await?;
    let st = story
        .api(Method::GET, "/api/v1/models/cancer/status", None)
        .await?;
    story.check(
        "rollback",
        st["stable"] == "5",
        format!("stable is version {}", st["stable"]),
    );
    outln!(
        "\n  See it all: ferry history cancer   ·   ferry status cancer   ·   {}/ui/",
        story.url
    );
    Ok(())
}
