//! Rollouts end to end, with the real process, real models and real traffic:
//! a canary promoted through its steps, candidates aborted automatically on
//! errors and on latency, a restart in the middle of a pause, multi-version
//! failover and instant rollback, a basic rollout whose candidate cannot
//! start, delayed labels, notify webhooks (rollback's `rolled_back`
//! included), a manual pause that stops a timed pause's clock, and a last
//! step that inconclusive windows alone never take.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{Server, Traffic, eventually, holdout, status, waiting_for_promote};
use super::upstream::Upstream;

/// The phase the `cancer` model's last rollout ended in.
async fn ended(s: &Server, within: Duration) -> String {
    super::harness::ended(s, within).await["phase"]
        .as_str()
        .unwrap()
        .to_string()
}

fn write_spec(dir: &std::path::Path, yaml: &str) -> String {
    let path = dir.join("rollout.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_of_v2_is_promoted_through_its_steps() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        r#"
model: cancer
version: "2"
strategy:
  canary:
    steps:
      - weight: 20
      - pause: {}
      - weight: 50
      - analysis: {}
      - weight: 100
    sticky: { header: x-user-id }
analysis:
  interval: 5s
  min_requests: 10
  checks:
    - { metric: error_rate, max: 0.01 }
    - { metric: latency_p99_ms, max_vs_stable: 3 }
"#,
    );
    let load = Traffic::start(&s, 200, 4);
    let out = s.ferry_ok(&["apply", "-f", &spec]);
    assert!(
        out.contains("r-1 started: canary of cancer version 2"),
        "{out}"
    );
    waiting_for_promote(&s, Duration::from_secs(10)).await;
    let st = status(&s).await;
    assert_eq!(st["traffic"], json!({"1": 80.0, "2": 20.0}));
    assert_eq!(
        st["steps"],
        json!([
            "weight 20",
            "pause until promoted",
            "weight 50",
            "analysis",
            "weight 100",
            "promote"
        ])
    );
    assert_eq!(st["step"], 1);
    // Applying the same spec again changes nothing; another spec is refused.
    let again = s.ferry_ok(&["apply", "-f", &spec]);
    assert!(again.contains("already rolling out this spec"), "{again}");
    s.add("cancer", "3", "cancer-bad.onnx");
    let out = s.ferry(&["deploy", "cancer", "3", "--strategy", "basic"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an active rollout, r-1"));
    // Let the candidate take traffic (its share at 20 %), then promote.
    super::harness::wait_answered(&s, "2", 30.0).await;
    s.ferry_ok(&["promote", "cancer"]);
    let watched = s.ferry(&["status", "cancer", "--watch", "--timeout", "60s"]);
    assert!(
        watched.status.success(),
        "status --watch: {}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(String::from_utf8_lossy(&watched.stdout).contains("r-1: succeeded"));
    let seen = load.finish().await;
    assert!(seen.failures.is_empty(), "{seen:?}");
    assert!(seen.versions["2"] > 0 && seen.versions["1"] > 0, "{seen:?}");
    let show = s.ferry_json(&["model", "show", "cancer"]);
    assert_eq!(show["stable"], "2");
    // Every step is in the history, in order, with readable reasons.
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    let messages: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    let expect = [
        "step 1/6: weight 20%",
        "waiting for `ferry promote cancer`",
        "promoted past step 2/6",
        "step 3/6: weight 50%",
        "analysis gate passed",
        "step 5/6: weight 100%",
        "succeeded",
    ];
    let mut at = 0;
    for m in &messages {
        if at < expect.len() && m.contains(expect[at]) {
            at += 1;
        }
    }
    assert_eq!(
        at,
        expect.len(),
        "events out of order or missing: {messages:#?}"
    );
    // The A/B report compares both arms.
    let report = s.ferry_json(&["report", "cancer", "r-1"]);
    assert!(
        report["candidate"]["requests"].as_u64().unwrap() > 10,
        "{report}"
    );
    assert!(report["stable"]["requests"].as_u64().unwrap() > 10);
    let human = s.ferry_ok(&["report", "cancer"]);
    assert!(
        human.contains("STABLE 1") && human.contains("CANDIDATE 2") && human.contains("error rate"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_aborted_and_clients_see_errors_only_in_its_share() {
    a_remote_candidate_that_turns_bad_is_aborted(Upstream::set_failing, &[]).await;
}

/// A candidate that hangs: its requests end at the version's timeout, count
/// as errors, and the canary is aborted like a failing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_candidate_times_out_and_is_aborted() {
    fn hang(upstream: &Upstream, on: bool) {
        let ms = if on { 60_000 } else { 0 };
        upstream.behaviour.delay_ms.store(ms, Ordering::Relaxed);
    }
    let seen = a_remote_candidate_that_turns_bad_is_aborted(hang, &["--timeout", "300ms"]).await;
    assert!(
        seen.failures.iter().all(|f| f.starts_with("504")),
        "hung requests end as 504 at the timeout: {:?}",
        seen.failures
    );
}

/// A canary of a remote candidate at 20 % that turns bad (`fault(.., true)`)
/// after warming up: aborted after two failed windows, clients see errors
/// only in its share, stable serves everything after; `retry` starts again.
async fn a_remote_candidate_that_turns_bad_is_aborted(
    fault: fn(&Upstream, bool),
    settings: &[&str],
) -> super::harness::Seen {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "broken", "--url", &upstream.url]);
    if !settings.is_empty() {
        let mut args = vec!["model", "set", "cancer", "broken"];
        args.extend_from_slice(settings);
        s.ferry_ok(&args);
    }
    let load = Traffic::start(&s, 150, 3);
    s.deploy_canary(
        "broken",
        "20,100",
        "60s",
        &[
            "--interval",
            "5s",
            "--min-requests",
            "10",
            "--max-error-rate",
            "0.01",
        ],
    );
    // It loaded and warmed up fine; now it turns bad for every request.
    fault(&upstream, true);
    let started = Instant::now();
    assert_eq!(ended(&s, Duration::from_secs(40)).await, "aborted");
    let took = started.elapsed();
    let seen = load.finish().await;
    let failed = seen.failures.len() as u64;
    let share = failed as f64 / (failed + seen.answered()) as f64;
    assert!(
        failed > 0,
        "the candidate's errors reached some clients: {seen:?}"
    );
    assert!(
        share < 0.35,
        "clients saw errors only in proportion to the 20% weight: {share:.3} ({seen:?})"
    );
    // Two failed 5 s windows (failure_limit 2), plus bucket alignment.
    assert!(took < Duration::from_secs(25), "aborted after {took:?}");
    let st = status(&s).await;
    let msg = st["last_rollout"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("aborted: candidate error_rate")
            && msg.contains("in 2 failed windows with no passing window between them"),
        "{msg}"
    );
    assert_eq!(st["traffic"], json!({"1": 100.0}));
    let (status_code, headers, _) = s
        .infer("/v2/models/cancer/infer", &super::harness::batch(1))
        .await;
    assert_eq!(
        (status_code, headers["x-ferry-version"].to_str().unwrap()),
        (200, "1")
    );
    // retry starts the same spec again.
    fault(&upstream, false);
    let out = s.ferry_ok(&["retry", "cancer"]);
    assert!(out.starts_with("r-2"), "{out}");
    s.ferry_ok(&["abort", "cancer"]);
    seen
}

/// A live A/B report counts only its own rollout's traffic: one started
/// right after an abort does not show the aborted rollout's candidate
/// requests as its own (its candidate here takes none: weight 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_counts_only_its_own_rollouts_traffic() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let load = Traffic::start(&s, 200, 4);
    s.deploy_canary("2", "50,100", "60s", &[]);
    super::harness::wait_answered(&s, "2", 50.0).await;
    s.ferry_ok(&["abort", "cancer"]);
    s.deploy_canary("2", "0,100", "60s", &[]);
    for _ in 0..4 {
        let report = s.ferry_json(&["report", "cancer", "r-2"]);
        assert_eq!(report["candidate"]["requests"], 0, "{report}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let report = s.ferry_json(&["report", "cancer", "r-2"]);
    assert!(
        report["stable"]["requests"].as_u64().unwrap() > 0,
        "{report}"
    );
    load.finish().await;
}

/// A shadow's report compares production with its copies: the candidate's
/// arm is what it answered as the shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadows_report_counts_the_copies_it_answered() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let load = Traffic::start(&s, 100, 2);
    s.deploy_shadow_that_waits("2");
    eventually(
        Duration::from_secs(15),
        "copies in the report",
        async || {
            let report = s.ferry_json(&["report", "cancer"]);
            report["candidate"]["requests"].as_u64().unwrap_or(0) > 20
                && report["stable"]["requests"].as_u64().unwrap_or(0) > 20
        },
    )
    .await;
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_candidate_is_aborted_on_latency() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "slow", "cancer-slow.onnx");
    let load = Traffic::start(&s, 60, 2);
    s.deploy_canary("slow", "30,100", "60s", &Server::LATENCY_CHECKED);
    assert_eq!(ended(&s, Duration::from_secs(40)).await, "aborted");
    let seen = load.finish().await;
    assert!(seen.failures.is_empty(), "slow is not failing: {seen:?}");
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    let last = events.as_array().unwrap().last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        last.contains("latency_p99_ms") && last.contains("x stable") && last.contains(", p"),
        "{last}"
    );
    // After the abort, the status still shows the window it ended on.
    let st = status(&s).await;
    assert_eq!(st["analysis"]["verdict"], "fail", "{st}");
    let human = s.ferry_ok(&["status", "cancer"]);
    assert!(
        human.contains("last rollout r-1: aborted")
            && human.contains("analysis  fail over 5s: ")
            && human.contains("latency_p99_ms max 1.5 x stable  fail")
            && human.contains("recent events"),
        "{human}"
    );
    // A model that is not registered is said to be so, not to have no
    // rollouts.
    let out = s.ferry(&["report", "cancr"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model \"cancr\" is not registered"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_pause_resumes_the_same_step_with_the_time_left() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.deploy_canary("2", "25,100", "8s", &[]);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = status(&s).await;
    assert_eq!(before["step"], 1);
    s.kill9();
    let s = Server::start_in(&dir, &[]).await;
    let after = status(&s).await;
    let since_start = started.elapsed().as_secs();
    // One node: the killed process's row is not listed as a second instance.
    let cluster = s.admin_get("/api/v1/cluster").await;
    assert_eq!(
        cluster["instances"].as_array().unwrap().len(),
        1,
        "{cluster}"
    );
    assert_eq!(after["rollout"], "r-1");
    assert_eq!(after["step"], 1, "same step");
    assert_eq!(
        after["traffic"],
        json!({"1": 75.0, "2": 25.0}),
        "same weights"
    );
    let left: u64 = after["message"]
        .as_str()
        .unwrap()
        .split(", ")
        .nth(1)
        .unwrap()
        .trim_end_matches("s left")
        .parse()
        .unwrap();
    assert!(
        left + since_start <= 9 && left >= 1,
        "the pause continues from its stored start: {left}s left after {since_start}s ({after})"
    );
    assert_eq!(ended(&s, Duration::from_secs(20)).await, "succeeded");
    let total = started.elapsed();
    assert!(
        total < Duration::from_secs(12),
        "the 8 s pause was not restarted from zero: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_fails_over_when_the_primary_dies_and_rollback_is_instant() {
    let mut primary = Server::start().await;
    primary.add("cancer", "1", "cancer-v2.onnx");
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "2", "--url", &primary.url]);
    s.ferry_ok(&[
        "deploy",
        "cancer",
        "2",
        "--strategy",
        "multi",
        "--keep",
        "1",
        "--timeout",
        "1s",
    ]);
    assert_eq!(ended(&s, Duration::from_secs(10)).await, "succeeded");
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(
        (route["stable"].as_str(), route["failover"].clone()),
        (Some("2"), json!(["1"]))
    );

    let load = Traffic::start(&s, 200, 4);
    super::harness::wait_answered(&s, "2", 20.0).await;
    tokio::task::spawn_blocking(move || primary.kill9())
        .await
        .unwrap();
    // Version 1 (the failover) answers in its place.
    super::harness::wait_answered(&s, "1", 50.0).await;
    let t = Instant::now();
    s.ferry_ok(&["rollback", "cancer"]);
    let rollback_took = t.elapsed();
    super::harness::wait_answered(&s, "1", 20.0).await;
    let seen = load.finish().await;
    assert!(
        seen.failures.is_empty(),
        "zero client errors while the primary died: {seen:?}"
    );
    assert!(seen.versions["1"] > 0);
    assert!(
        rollback_took < Duration::from_secs(2),
        "rollback to a warm version: {rollback_took:?}"
    );
    let history = s.admin_get("/api/v1/models/cancer/rollouts").await;
    assert_eq!(history[0]["strategy"], "rollback");
    assert_eq!(history[1]["phase"], "rolled_back");
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-2/events")
        .await;
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("still loaded, so the switch is instant"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_rollout_whose_candidate_cannot_start_fails_and_stable_keeps_serving() {
    let mut upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "2", "--url", &upstream.url]);
    upstream.shut_down();
    upstream.set_failing(true);
    // Basic is instant: deploy reports the failure and exits non-zero.
    let out = s.ferry(&["deploy", "cancer", "2", "--strategy", "basic"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"));
    assert_eq!(ended(&s, Duration::from_secs(15)).await, "failed");
    let st = status(&s).await;
    let msg = st["last_rollout"]["message"].as_str().unwrap();
    assert!(
        msg.contains("could not start") && msg.contains("version 1 keeps serving"),
        "{msg}"
    );
    let (code, headers, _) = s
        .infer("/v2/models/cancer/infer", &super::harness::batch(1))
        .await;
    assert_eq!(
        (code, headers["x-ferry-version"].to_str().unwrap()),
        (200, "1")
    );
    // A watcher learns how it ended from the exit code.
    let out = s.ferry(&["status", "cancer", "--watch"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn delayed_labels_give_live_accuracy_per_version() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let rows = holdout();
    let mut correct = 0;
    for (i, (body, label)) in rows.iter().take(40).enumerate() {
        let mut body = body.clone();
        body["id"] = json!(format!("req-{i}"));
        let (_, _, answer) = s.infer("/v2/models/cancer/infer", &body).await;
        let r = s
            .http
            .post(s.at("/v2/models/cancer/feedback"))
            .bearer_auth(s.token())
            .json(&json!({"id": format!("req-{i}"), "label": label}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let fb: Value = r.json().await.unwrap();
        assert_eq!(fb["predicted"], answer["outputs"][0]["data"][0]);
        correct += usize::from(fb["correct"] == true);
    }
    let m = s.admin_get("/api/v1/models/cancer/metrics?window=1m").await;
    let stable = super::harness::metrics_series(&m, "role", "stable");
    assert_eq!(stable["labelled"], 40);
    assert_eq!(stable["correct"], correct);
    let unknown = async |model: &str| {
        let r = s
            .http
            .post(s.at(&format!("/v2/models/{model}/feedback")))
            .bearer_auth(s.token())
            .json(&json!({"id": "never-seen", "label": 1}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    let (status, body) = unknown("cancer").await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown or too old")
    );
    // A mistyped model is named as such, not as an unknown id.
    let (status, body) = unknown("cancr").await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().starts_with(
            "model \"cancr\" is not registered: post a label to the model that answered"
        ),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_webhooks_hear_how_a_rollout_ended() {
    use axum::routing::post;
    let received = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(v): axum::Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        &format!(
            "model: cancer\nversion: \"2\"\nstrategy: {{ basic: {{}} }}\nnotify: [ {{ url: \"{hook}\" }} ]\n"
        ),
    );
    s.ferry_ok(&["apply", "-f", &spec]);
    eventually(
        Duration::from_secs(10),
        "the webhook hears `succeeded`",
        async || {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "succeeded")
        },
    )
    .await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only the end states by default: {got:?}");
    assert_eq!(got[0]["rollout"], "r-1");
    assert_eq!(got[0]["model"], "cancer");
}

/// A rollback's notification is `rolled_back`, sent to every hook that
/// subscribes to it, and never `succeeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_notifies_rolled_back_not_succeeded() {
    use axum::routing::post;
    type Sink = Arc<std::sync::Mutex<Vec<(String, Value)>>>;
    let received: Sink = Arc::default();
    let hook = |name: &'static str, sink: Sink| {
        post(move |axum::Json(v): axum::Json<Value>| async move {
            sink.lock().unwrap().push((name.to_string(), v));
            "ok"
        })
    };
    let app = axum::Router::new()
        .route("/all", hook("all", received.clone()))
        .route("/rolled-back", hook("rolled-back", received.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        &format!(
            "model: cancer\nversion: \"2\"\nstrategy: {{ basic: {{}} }}\nnotify: [ {{ url: \"{base}/all\" }}, {{ url: \"{base}/rolled-back\", events: [rolled_back] }} ]\n"
        ),
    );
    s.ferry_ok(&["apply", "-f", &spec]);
    assert_eq!(ended(&s, Duration::from_secs(10)).await, "succeeded");
    s.ferry_ok(&["rollback", "cancer"]);
    let heard = async |hook: &str| {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|(h, e)| h == hook && e["kind"] == "rolled_back")
    };
    eventually(
        Duration::from_secs(10),
        "both hooks hear `rolled_back`",
        async || heard("all").await && heard("rolled-back").await,
    )
    .await;
    let got = received.lock().unwrap().clone();
    let kinds: Vec<(String, String, String)> = got
        .iter()
        .map(|(h, e)| {
            let field = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (h.clone(), field("rollout"), field("kind"))
        })
        .collect();
    let of = |hook: &str| {
        let mut k: Vec<(String, String)> = kinds
            .iter()
            .filter(|(h, ..)| h == hook)
            .map(|(_, r, k)| (r.clone(), k.clone()))
            .collect();
        k.sort();
        k
    };
    let pair = |r: &str, k: &str| (r.to_string(), k.to_string());
    assert_eq!(
        of("all"),
        vec![pair("r-1", "succeeded"), pair("r-2", "rolled_back")],
        "{got:?}"
    );
    assert_eq!(
        of("rolled-back"),
        vec![pair("r-2", "rolled_back")],
        "{got:?}"
    );
}

/// `ferry pause` stops a timed pause's clock: nothing moves while paused,
/// and resume continues with the time that was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_pause_stops_the_clock_of_a_timed_pause() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.deploy_canary("2", "10,50,100", "8s", &[]);
    let started = Instant::now();
    s.ferry_ok(&["pause", "cancer"]);
    // Paused for longer than the whole 8 s pause: the weight never moves.
    while started.elapsed() < Duration::from_secs(12) {
        let st = status(&s).await;
        assert_eq!(st["traffic"]["2"], json!(10.0), "moved while paused: {st}");
        assert_eq!(st["waiting_for"], "resume", "{st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.ferry_ok(&["resume", "cancer"]);
    let st = status(&s).await;
    assert_eq!(st["traffic"]["2"], json!(10.0), "{st}");
    let message = st["message"].as_str().unwrap();
    let left: u64 = message
        .split_once("8s, ")
        .and_then(|(_, rest)| rest.split_once("s left"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("a countdown: {message}"));
    assert!(
        (5..=8).contains(&left),
        "{left}s left after resume: {message}"
    );
    super::harness::status_until(&s, Duration::from_secs(15), "weight 50", |st| {
        st["traffic"]["2"] == json!(50.0)
    })
    .await;
}

/// A canary whose only check can never be judged (Prometheus at an address
/// nothing listens on) does not take its last step when its pause runs out:
/// it waits for a passing window, then pauses for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconclusive_windows_alone_never_take_the_last_step() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let traffic = Traffic::start(&s, 100, 2);
    s.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 30}, {"pause": "6s"}, {"weight": 100}]}},
        "analysis": {"interval": "5s", "min_requests": 5, "max_inconclusive": 3,
                     "checks": [{"kind": "prometheus", "address": nobody, "query": "up", "max": 1}]}
    }))
    .await;
    let st =
        super::harness::status_until(&s, Duration::from_secs(40), "paused for a person", |st| {
            st["waiting_for"] == "resume" || st["phase"] == "idle"
        })
        .await;
    traffic.finish().await;
    assert_eq!(st["phase"], "paused", "{st}");
    assert_eq!(st["traffic"]["2"], json!(30.0), "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("3 consecutive inconclusive analysis windows"),
        "{st}"
    );
}

#[tokio::test]
async fn invalid_specs_and_commands_are_refused_with_reasons() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let types = super::harness::test_data("all-types.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "odd",
        "--file",
        types.to_str().unwrap(),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        (
            "model: cancer\nversion: \"2\"\nstrategy: { canary: { steps: [ { weight: 150 } ] } }\n",
            "strategy.canary.steps[0].weight",
        ),
        (
            "model: cancer\nversion: \"9\"\nstrategy: { basic: {} }\n",
            "version \"9\" of model \"cancer\" is not registered",
        ),
        (
            "model: cancer\nversion: \"odd\"\nstrategy: { basic: {} }\n",
            "breaks the contract",
        ),
        (
            "model: cancer\nversion: \"1\"\nstrategy: { basic: {} }\n",
            "already the stable version",
        ),
        (
            "model: cancer\nversion: \"2\"\nstrategy: { blue_green: { qa: { dataset: missing.jsonl, output: probabilities, min_accuracy: 0.9 } } }\n",
            "cannot read the QA dataset",
        ),
    ] {
        let spec = write_spec(tmp.path(), yaml);
        let out = s.ferry(&["apply", "-f", &spec]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{yaml}: {err}"
        );
    }
    for (cmd, needle) in [
        (vec!["promote", "cancer"], "no active rollout"),
        (
            vec!["rollback", "cancer"],
            "no rollout of \"cancer\" to roll back",
        ),
        (vec!["retry", "cancer"], "no rollout to retry"),
    ] {
        let out = s.ferry(&cmd);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{cmd:?}"
        );
    }
    s.deploy_canary("2", "10,100", "1m", &[]);
    let out = s.ferry(&["resume", "cancer"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not waiting for resume"));
    let (code, body) = s.set_route("cancer", json!({"stable": "1"})).await;
    assert_eq!(code, 409, "a manual route change during a rollout: {body}");
    s.ferry_ok(&["pause", "cancer"]);
    let out = s.ferry(&["promote", "cancer"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused waiting for resume"));
    s.ferry_ok(&["resume", "cancer"]);
    let out = s.ferry_ok(&["abort", "cancer"]);
    assert!(out.contains("aborted by control API"), "{out}");
}
