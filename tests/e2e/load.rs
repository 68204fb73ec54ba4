//! Every strategy, one after another, under one continuous open-loop load at
//! a fixed rate (the `ferry traffic` generator: requests sent on a schedule,
//! not after the previous answer), with the requests, failures and versions
//! of each phase counted: zero failed requests except where the strategy
//! deliberately exposes a bad candidate (its errors, compared with its
//! weight). `FERRY_LOAD_RPS` sets the rate (default 300).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::cli::traffic::{Load, Stats};
use serde_json::{Value, json};

use super::harness::{Server, ended, holdout, knob, status};
use super::upstream::Upstream;

/// One phase's share of the load.
#[derive(Clone)]
struct Phase {
    name: &'static str,
    seconds: f64,
    requests: u64,
    failed: BTreeMap<String, u64>,
    versions: BTreeMap<String, u64>,
}

impl Phase {
    fn failed(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Counts what the load saw between two moments.
struct Ledger {
    stats: Arc<Mutex<Stats>>,
    last: Stats,
    since: Instant,
    phases: Vec<Phase>,
}

impl Ledger {
    fn close(&mut self, name: &'static str) -> Phase {
        let now = self.stats.lock().unwrap().clone();
        let minus = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        self.phases.push(Phase {
            name,
            seconds: self.since.elapsed().as_secs_f64(),
            requests: now.requests - self.last.requests,
            failed: minus(&now.errors, &self.last.errors),
            versions: minus(&now.versions, &self.last.versions),
        });
        self.last = now;
        self.since = Instant::now();
        self.phases.last().unwrap().clone()
    }
}

/// Runs `spec` to its end, then a second of steady state; returns the
/// phase the rollout ended in.
async fn rollout(s: &Server, spec: Value) -> String {
    s.start_rollout(&spec).await;
    let phase = ended(s, Duration::from_secs(60)).await["phase"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase
}

/// A rollout of `strategy`, with analysis when the strategy reads it
/// (basic and multi end before a window could close).
fn spec(version: &str, strategy: Value) -> Value {
    let mut spec = json!({"model": "cancer", "version": version, "strategy": strategy});
    if spec["strategy"].get("basic").is_none() && spec["strategy"].get("multi").is_none() {
        spec["analysis"] = json!({"interval": "5s", "min_requests": 10,
                                  "checks": [{"metric": "error_rate", "max": 0.01}]});
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_under_fixed_rate_load_fails_no_request() {
    let rps: f64 = knob("FERRY_LOAD_RPS", 300.0);
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    for (v, file) in [
        ("1", "cancer-v1.onnx"),
        ("2", "cancer-v2.onnx"),
        ("3", "cancer-v1.onnx"),
        ("4", "cancer-v2.onnx"),
        ("5", "cancer-v1.onnx"),
        ("6", "cancer-v2.onnx"),
    ] {
        s.add("cancer", v, file);
    }
    s.ferry_json(&["model", "add", "cancer", "remote", "--url", &upstream.url]);

    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        http: s.http.clone(),
        url: s.at("/v2/models/cancer/infer"),
        bodies: Arc::new(holdout().into_iter().map(|(body, _)| body).collect()),
        rps,
        users: Some((500, "x-user-id".into())),
        headers: vec![],
        rotate: Some(("x-region".into(), vec!["eu-west".into(), "us-east".into()])),
    };
    let runner = {
        let (stop, stats) = (stop.clone(), stats.clone());
        tokio::spawn(async move { load.run(None, stop, stats).await })
    };
    let mut ledger = Ledger {
        stats: stats.clone(),
        last: Stats::default(),
        since: Instant::now(),
        phases: Vec::new(),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.close("v1 serving alone");

    let basic = rollout(&s, spec("2", json!({"basic": {}}))).await;
    assert_eq!(basic, "succeeded");
    ledger.close("basic: 1 -> 2");

    let rolling = json!({"rolling": {"replicas": 2, "batch_size": 1, "batch_pause": "1s"}});
    assert_eq!(rollout(&s, spec("3", rolling)).await, "succeeded");
    ledger.close("rolling: 2 -> 3, 2 replicas one at a time");

    let canary = json!({"canary": {"steps": [{"weight": 20}, {"pause": "2s"}, {"weight": 50},
                                             {"analysis": {}}, {"weight": 100}],
                                   "sticky": {"header": "x-user-id"}}});
    assert_eq!(rollout(&s, spec("4", canary)).await, "succeeded");
    ledger.close("canary: 3 -> 4 at 20 %, 50 %, analysis, 100 %");

    // A post-promotion window: with analysis, blue-green's last step waits for
    // a passing window, and this load sends no staging traffic to judge
    // before the switch.
    let blue_green = json!({"blue_green": {"auto_promote_after": "1s", "scale_down_delay": "1m", "post_promotion": "1s"}});
    assert_eq!(rollout(&s, spec("5", blue_green)).await, "succeeded");
    ledger.close("blue-green: 4 -> 5 (staged, switched)");
    s.ferry_ok(&["rollback", "cancer"]);
    assert_eq!(status(&s).await["traffic"], json!({"4": 100.0}));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.close("blue-green: instant switch back to 4");

    let shadow = json!({"shadow": {"mirror_percent": 100, "compare": {"output": "label"},
                                   "min_comparisons": 100, "min_agreement": 0.85, "then": "canary",
                                   "canary": {"steps": [{"weight": 50}, {"pause": "1s"}, {"weight": 100}]}}});
    assert_eq!(rollout(&s, spec("6", shadow)).await, "succeeded");
    ledger.close("shadow of 6, then a canary to 100 %");

    let multi = json!({"multi": {"keep": 1, "timeout": "1s",
                                 "breaker": {"error_rate": 0.5, "window": "5s", "probe_every": "500ms"}}});
    assert_eq!(rollout(&s, spec("remote", multi)).await, "succeeded");
    ledger.close("multi-service: remote in front of 6");
    upstream.set_failing(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failing_primary = ledger.close("multi-service: remote fails, 6 answers");
    assert!(
        failing_primary.versions.get("6").copied().unwrap_or(0) > 0,
        "the chain's next version answered"
    );
    s.ferry_ok(&["rollback", "cancer"]);
    upstream.set_failing(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.close("multi-service: rolled back to 6");

    // A bad canary: the remote at 20 % starts failing once it has started.
    let bad = json!({"canary": {"steps": [{"weight": 20}, {"pause": "60s"}, {"weight": 100}]}});
    let mut bad = spec("remote", bad);
    bad["analysis"]["failure_limit"] = json!(2);
    s.start_rollout(&bad).await;
    upstream.set_failing(true);
    assert_eq!(ended(&s, Duration::from_secs(60)).await["phase"], "aborted");
    // The abort is stored before the route without the candidate is
    // published: the phase ends once the candidate no longer serves (its
    // last requests, sent before the switch, are answered by then).
    super::harness::eventually(
        Duration::from_secs(10),
        "the candidate leaves the route",
        async || {
            s.http
                .get(s.at("/v2/models/cancer/versions/remote/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() != 200)
        },
    )
    .await;
    let exposed = ledger.close("canary of a failing remote at 20 %: aborted");
    let (errors, requests) = (exposed.failed(), exposed.requests);
    assert_eq!(status(&s).await["traffic"], json!({"6": 100.0}));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ledger.close("after the abort: 6 alone");

    stop.store(true, Ordering::Relaxed);
    runner.await.unwrap();
    let skipped = stats.lock().unwrap().skipped;

    eprintln!("\nfixed-rate load at {rps} requests/s through every strategy:");
    eprintln!(
        "{:<48} {:>6} {:>9} {:>7}  versions",
        "phase", "secs", "requests", "failed"
    );
    for p in &ledger.phases {
        eprintln!(
            "{:<48} {:>6.1} {:>9} {:>7}  {:?}{}",
            p.name,
            p.seconds,
            p.requests,
            p.failed(),
            p.versions,
            if p.failed.is_empty() {
                String::new()
            } else {
                format!(" failures {:?}", p.failed)
            }
        );
    }
    let candidate_answers = exposed.versions.get("remote").copied().unwrap_or(0) + errors;
    eprintln!(
        "bad canary: {errors} errors of {requests} requests in its phase ({:.1} %), weight 20 %; \
         {candidate_answers} requests went to the candidate; {skipped} sends skipped",
        100.0 * errors as f64 / requests.max(1) as f64
    );

    let exposed_name = "canary of a failing remote at 20 %: aborted";
    for p in ledger.phases.iter().filter(|p| p.name != exposed_name) {
        assert_eq!(p.failed(), 0, "{}: {:?}", p.name, p.failed);
    }
    assert!(errors > 0, "the bad canary's errors reached no one");
    assert!(
        (errors as f64) < 0.3 * requests as f64,
        "errors beyond the candidate's 20 % share: {errors} of {requests}"
    );
    assert!(
        exposed.failed.keys().all(|k| k == "500" || k == "502"),
        "only the candidate's own errors: {:?}",
        exposed.failed
    );
    assert_eq!(skipped, 0, "the load generator fell behind");
}
