//! Rolling, blue-green and shadow rollouts end to end, with the real
//! process, the example models and real traffic — including `kill -9` in the
//! middle of each.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{
    Server, Traffic, batch, ended, eventually, example, holdout, status, waiting_for_promote,
};
use super::upstream::Upstream;

/// How each version answered `n` requests over the hold-out rows.
async fn split(s: &Server, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let rows = holdout();
    let mut seen = HashMap::new();
    for i in 0..n {
        let mut rb = s
            .http
            .post(s.at("/v2/models/cancer/infer"))
            .json(&rows[i % rows.len()].0);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        *seen
            .entry(r.headers()["x-ferry-version"].to_str().unwrap().to_string())
            .or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_four_replicas_one_at_a_time_moves_traffic_in_quarters() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.ferry_ok(&[
        "deploy",
        "cancer",
        "2",
        "--strategy",
        "rolling",
        "--replicas",
        "4",
        "--batch-size",
        "1",
        "--batch-pause",
        "3s",
    ]);
    for quarter in [25.0, 50.0, 75.0] {
        eventually(Duration::from_secs(15), "the next batch", async || {
            status(&s).await["traffic"]["2"] == json!(quarter)
        })
        .await;
        let seen = split(&s, 400, &[]).await;
        let share = *seen.get("2").unwrap_or(&0) as f64 / 400.0;
        assert!(
            (share - quarter / 100.0).abs() < 0.1,
            "at {quarter}% the candidate answered {share}"
        );
    }
    let last = ended(&s, Duration::from_secs(20)).await;
    assert_eq!(last["phase"], "succeeded");
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(
        (route["stable"].as_str(), route["replicas"]["2"].as_u64()),
        (Some("2"), Some(4))
    );
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    assert!(
        events
            .to_string()
            .contains("batch 2: 2 of 4 replicas run version 2"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_candidate_that_cannot_start_is_rolled_back_and_stable_serves_throughout() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "2",
        "--url",
        &upstream.url,
        "--url",
        &upstream.url,
    ]);
    upstream.set_failing(true);
    let traffic = Traffic::start(&s, 0, 4);
    s.ferry_ok(&[
        "deploy",
        "cancer",
        "2",
        "--strategy",
        "rolling",
        "--replicas",
        "2",
        "--batch-pause",
        "1s",
    ]);
    let last = ended(&s, Duration::from_secs(20)).await;
    let seen = traffic.finish().await;
    let (ok, failed) = (seen.answered(), seen.failures.len());
    assert_eq!(last["phase"], "aborted", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("could not start"),
        "{last}"
    );
    assert!(
        ok > 0 && failed == 0,
        "stable kept serving: {ok} ok, {failed} failed"
    );
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(route["stable"], "1");
    assert!(route["candidate"].is_null());
}

fn bg_spec(dir: &std::path::Path, version: &str, extra: &str) -> String {
    std::fs::copy(example("cancer-holdout.jsonl"), dir.join("holdout.jsonl")).unwrap();
    let path = dir.join("bg.yaml");
    std::fs::write(
        &path,
        format!(
            "model: cancer\nversion: \"{version}\"\nstrategy:\n  blue_green:\n    qa: {{ dataset: holdout.jsonl, output: probabilities, min_accuracy: 0.9 }}\n    scale_down_delay: 1m\n{extra}"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_stages_green_gates_on_qa_switches_without_errors_and_rolls_back_instantly() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("cancer", "bad", "cancer-bad.onnx");
    let tmp = tempfile::tempdir().unwrap();
    // cancer-bad fails the QA gate, with its accuracy.
    s.ferry_ok(&["apply", "-f", &bg_spec(tmp.path(), "bad", "")]);
    let last = ended(&s, Duration::from_secs(20)).await;
    assert_eq!(last["phase"], "aborted");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("QA accuracy 0.5673 < 0.9 on 171 rows"),
        "{last}"
    );

    // cancer-v2 passes it and waits in staging for a person.
    s.ferry_ok(&["apply", "-f", &bg_spec(tmp.path(), "2", "")]);
    waiting_for_promote(&s, Duration::from_secs(20)).await;
    let st = status(&s).await;
    // scikit-learn's own hold-out accuracy for cancer-v2 (examples/models/models.json).
    assert!(
        (st["qa"]["accuracy"].as_f64().unwrap() - 0.9591).abs() < 1e-3,
        "{st}"
    );
    assert_eq!(st["staging"], "2");
    assert_eq!(
        split(&s, 50, &[]).await.get("1"),
        Some(&50),
        "production does not reach green"
    );
    assert_eq!(
        split(&s, 20, &[("x-ferry-env", "staging")]).await.get("2"),
        Some(&20),
        "staging does"
    );
    let traffic = Traffic::start(&s, 0, 4);
    super::harness::wait_answered(&s, "1", 20.0).await;
    s.ferry_ok(&["promote", "cancer"]);
    let last = ended(&s, Duration::from_secs(10)).await;
    super::harness::wait_answered(&s, "2", 20.0).await;
    let seen = traffic.finish().await;
    let (ok, failed) = (seen.answered(), seen.failures.len());
    assert_eq!(last["phase"], "succeeded");
    assert_eq!(failed, 0, "no failed request across the switch ({ok} ok)");
    assert_eq!(split(&s, 20, &[]).await.get("2"), Some(&20));
    // Blue is still loaded: rollback is one switch.
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(route["warm"][0]["version"], "1");
    let t = Instant::now();
    s.ferry_ok(&["rollback", "cancer"]);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "instant rollback: {:?}",
        t.elapsed()
    );
    assert_eq!(split(&s, 20, &[]).await.get("1"), Some(&20));
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-3/events")
        .await;
    assert!(
        events
            .to_string()
            .contains("still loaded, so the switch is instant"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_promotion_failure_switches_back_to_blue() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "green", "--url", &upstream.url]);
    let traffic = Traffic::start(&s, 0, 4);
    s.ferry_ok(&[
        "deploy",
        "cancer",
        "green",
        "--strategy",
        "blue-green",
        "--auto-promote-after",
        "1s",
    ]);
    eventually(
        Duration::from_secs(15),
        "green takes production",
        async || s.admin_get("/api/v1/models/cancer/route").await["stable"] == "green",
    )
    .await;
    // Deploy flags give no post_promotion window; apply one through the API instead.
    traffic.finish().await;
    let _ = ended(&s, Duration::from_secs(10)).await;
    s.ferry_ok(&["rollback", "cancer"]);
    let spec = json!({
        "model": "cancer", "version": "green",
        "strategy": {"blue_green": {"auto_promote_after": "1s", "scale_down_delay": "1m", "post_promotion": "30s"}},
        "analysis": {"interval": "5s", "min_requests": 5, "failure_limit": 1, "checks": [{"metric": "error_rate", "max": 0.01}]}
    });
    s.start_rollout(&spec).await;
    let traffic = Traffic::start(&s, 0, 4);
    eventually(
        Duration::from_secs(15),
        "green takes production again",
        async || s.admin_get("/api/v1/models/cancer/route").await["stable"] == "green",
    )
    .await;
    upstream.set_failing(true);
    let last = ended(&s, Duration::from_secs(40)).await;
    traffic.finish().await;
    assert_eq!(last["phase"], "aborted", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("all traffic back on version 1"),
        "{last}"
    );
    assert_eq!(
        s.admin_get("/api/v1/models/cancer/route").await["stable"],
        "1"
    );
}

/// After the switch blue takes no traffic; a post-promotion check "vs
/// stable" compares green with blue's baseline from before the switch, so a
/// slow green is switched back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_promotion_check_vs_stable_compares_with_blue_before_the_switch() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "slow", "cancer-slow.onnx");
    let traffic = Traffic::start(&s, 0, 4);
    let spec = json!({
        "model": "cancer", "version": "slow",
        "strategy": {"blue_green": {"auto_promote_after": "6s", "scale_down_delay": "1m", "post_promotion": "30s"}},
        // Two failed windows: the first after the switch may still hold some
        // of blue's own traffic; the second holds none.
        "analysis": {"interval": "5s", "min_requests": 5, "failure_limit": 2,
                     "checks": [{"metric": "latency_p99_ms", "max_vs_stable": 1.5}]}
    });
    s.start_rollout(&spec).await;
    let last = ended(&s, Duration::from_secs(60)).await;
    traffic.finish().await;
    assert_eq!(last["phase"], "aborted", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("candidate latency_p99_ms")
            && message.contains("stable: version 1's baseline from before the switch")
            && message.contains("all traffic back on version 1"),
        "{message}"
    );
    assert_eq!(
        s.admin_get("/api/v1/models/cancer/route").await["stable"],
        "1"
    );
}

fn shadow_spec(version: &str, then: &str) -> Value {
    let mut shadow = json!({
        "mirror_percent": 100, "compare": {"output": "label"},
        "min_comparisons": 60, "min_agreement": 0.85, "then": then,
    });
    if then == "canary" {
        shadow["canary"] = json!({"steps": [{"weight": 50}, {"pause": "1s"}, {"weight": 100}]});
    }
    json!({"model": "cancer", "version": version, "strategy": {"shadow": shadow}, "analysis": {"interval": "5s", "min_requests": 5}})
}

/// A shadow compared on an output the versions do not answer would never
/// count a comparison: refused when it is applied, naming the outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_compared_on_an_output_no_version_answers_is_refused_naming_the_outputs() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let mut spec = shadow_spec("2", "promote");
    spec["strategy"]["shadow"]["compare"]["output"] = json!("nosuch");
    let (code, body) = s
        .admin_post("/api/v1/models/cancer/rollouts", Some(spec))
        .await;
    assert_eq!(code, 400, "{body}");
    let said = body["error"].as_str().unwrap();
    assert!(
        said.contains("\"nosuch\" is not an output of version \"1\" (the stable)")
            && said.contains("label")
            && said.contains("probabilities"),
        "{said}"
    );
    assert_eq!(status(&s).await["phase"], "idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_of_v2_hands_over_to_a_canary_and_cancer_bad_is_aborted_on_agreement() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("cancer", "bad", "cancer-bad.onnx");
    // cancer-bad agrees with v1 on about 61% of rows.
    let traffic = Traffic::start(&s, 0, 4);
    s.start_rollout(&shadow_spec("bad", "promote")).await;
    let last = ended(&s, Duration::from_secs(40)).await;
    assert_eq!(last["phase"], "aborted", "{last}");
    let msg = last["message"].as_str().unwrap();
    assert!(
        msg.starts_with("aborted: shadow agreement 0.") && msg.contains("< 0.85"),
        "{msg}"
    );
    // Users only ever got v1 while bad was mirrored.
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    assert!(
        events.to_string().contains("users only get version 1"),
        "{events}"
    );

    // v2 agrees with v1 on about 91%: mirrored first, then real users.
    s.start_rollout(&shadow_spec("2", "canary")).await;
    eventually(
        Duration::from_secs(30),
        "disagreement examples",
        async || {
            status(&s).await["shadow"]["examples"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        },
    )
    .await;
    let last = ended(&s, Duration::from_secs(60)).await;
    let seen = traffic.finish().await;
    let (ok, failed) = (seen.answered(), seen.failures.len());
    assert_eq!(last["phase"], "succeeded", "{last}");
    assert_eq!(failed, 0, "{ok} ok");
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-2/events")
        .await;
    let text = events.to_string();
    assert!(
        text.contains("continuing as a canary") && text.contains("weight 50%"),
        "{text}"
    );
    assert_eq!(
        s.admin_get("/api/v1/models/cancer/route").await["stable"],
        "2"
    );
}

/// A shadow's evidence survives its decision: the counts cover the example
/// disagreements at every moment, the verdict is taken once
/// `min_comparisons` is reached, and the `aborted` event keeps the numbers
/// and the examples (as does the status afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_decision_keeps_its_evidence_and_comes_at_min_comparisons() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "bad", "cancer-bad.onnx");
    let mut spec = shadow_spec("bad", "promote");
    spec["strategy"]["shadow"]["min_comparisons"] = json!(600);
    let traffic = Traffic::start(&s, 100, 2);
    s.start_rollout(&spec).await;
    let mut looked = 0;
    loop {
        let st = status(&s).await;
        if st["phase"] != "progressing" {
            break;
        }
        let shadow = &st["shadow"];
        let examples = shadow["examples"].as_array().map_or(0, Vec::len) as u64;
        assert!(
            shadow["disagree"].as_u64().unwrap() >= examples,
            "the counts do not cover the examples: {shadow}"
        );
        looked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    traffic.finish().await;
    assert!(
        looked > 5,
        "looked at the status while mirroring {looked} times"
    );
    let events = s
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    let aborted = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "aborted")
        .unwrap_or_else(|| panic!("an aborted event: {events}"));
    let data = &aborted["data"];
    let compared = data["comparisons"].as_u64().unwrap_or(0);
    assert!(
        (600..700).contains(&compared),
        "decided on {compared} comparisons when 600 were asked for: {aborted}"
    );
    let examples = data["examples"].as_array().map_or(0, Vec::len) as u64;
    assert!(
        examples > 0 && examples <= data["disagree"].as_u64().unwrap(),
        "{aborted}"
    );
    let st = status(&s).await;
    assert_eq!(st["shadow"]["comparisons"].as_u64(), Some(compared), "{st}");
    assert_eq!(
        st["shadow"]["examples"].as_array().map_or(0, Vec::len) as u64,
        examples,
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_rolling_blue_green_and_shadow_resumes_where_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("cancer", "3", "cancer-v2.onnx");

    // Rolling, killed with 2 of 4 replicas moved.
    s.ferry_ok(&[
        "deploy",
        "cancer",
        "2",
        "--strategy",
        "rolling",
        "--replicas",
        "4",
        "--batch-pause",
        "2s",
    ]);
    eventually(Duration::from_secs(15), "batch 2", async || {
        status(&s).await["traffic"]["2"] == json!(50.0)
    })
    .await;
    s.kill9();
    let mut s = Server::start_in(&dir, &[]).await;
    let st = status(&s).await;
    assert_eq!(
        (st["rollout"].as_str(), st["traffic"]["2"].clone()),
        (Some("r-1"), json!(50.0)),
        "{st}"
    );
    let seen = split(&s, 200, &[]).await;
    assert!(
        seen.get("2").is_some_and(|n| (60..=140).contains(n)),
        "the 50/50 pool is back: {seen:?}"
    );
    assert_eq!(
        ended(&s, Duration::from_secs(20)).await["phase"],
        "succeeded"
    );

    // Blue-green, killed while green waits in staging.
    let spec = tmp.path().join("bg.yaml");
    std::fs::write(
        &spec,
        "model: cancer\nversion: \"3\"\nstrategy: { blue_green: { scale_down_delay: 1m } }\n",
    )
    .unwrap();
    s.ferry_ok(&["apply", "-f", spec.to_str().unwrap()]);
    eventually(Duration::from_secs(15), "green waits", async || {
        status(&s).await["waiting_for"] == "promote"
    })
    .await;
    s.kill9();
    let mut s = Server::start_in(&dir, &[]).await;
    let st = status(&s).await;
    assert_eq!(
        (st["waiting_for"].as_str(), st["staging"].as_str()),
        (Some("promote"), Some("3")),
        "{st}"
    );
    assert_eq!(
        split(&s, 10, &[("x-ferry-env", "staging")]).await.get("3"),
        Some(&10)
    );
    s.ferry_ok(&["promote", "cancer"]);
    assert_eq!(
        ended(&s, Duration::from_secs(10)).await["phase"],
        "succeeded"
    );

    // Shadow, killed while mirroring: the comparisons counted so far are kept.
    let mut spec = shadow_spec("2", "promote");
    spec["strategy"]["shadow"]["min_comparisons"] = json!(100_000);
    s.start_rollout(&spec).await;
    let traffic = Traffic::start(&s, 0, 4);
    eventually(Duration::from_secs(30), "some comparisons", async || {
        status(&s).await["shadow"]["comparisons"]
            .as_u64()
            .unwrap_or(0)
            > 20
    })
    .await;
    traffic.finish().await;
    let before = status(&s).await["shadow"]["comparisons"].as_u64().unwrap();
    s.kill9();
    let s = Server::start_in(&dir, &[]).await;
    let st = status(&s).await;
    assert_eq!(st["strategy"], "shadow");
    assert_eq!(
        st["shadow"]["comparisons"].as_u64().unwrap(),
        before,
        "{st}"
    );
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(
        route["shadow"]["version"], "2",
        "mirroring again after the restart"
    );
    let _ = batch;
}

/// A graceful stop stores the shadow comparisons counted since they were
/// last fed to the rollout (at most once a second while it runs), so a
/// restart goes on from every comparison made, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_keeps_every_shadow_comparison_for_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let mut spec = shadow_spec("2", "manual");
    spec["strategy"]["shadow"]["min_comparisons"] = json!(100_000);
    s.start_rollout(&spec).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.admin_get("/api/v1/models/cancer/route").await["shadow"].is_null() {
        assert!(Instant::now() < deadline, "mirroring within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let compared = |prom: &str| -> u64 {
        prom.lines()
            .filter(|l| {
                l.starts_with("ferry_shadow_comparisons_total{model=\"cancer\",version=\"2\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    // Copies are counted once the stable answered: wait for them, then
    // stop at once (well within the second between two feeds).
    for _ in 0..50 {
        assert_eq!(s.infer("/v2/models/cancer/infer", &batch(1)).await.0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while compared(&s.prometheus().await) < 50 {
        assert!(Instant::now() < deadline, "50 copies compared within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = tokio::task::spawn_blocking(move || {
        let st = s.terminate();
        drop(s);
        st
    })
    .await
    .unwrap();
    assert!(stopped.success(), "{stopped:?}");

    let s = Server::start_in(&dir, &[]).await;
    let st = status(&s).await;
    assert_eq!(st["phase"], "progressing", "{st}");
    assert_eq!(
        st["shadow"]["comparisons"].as_u64(),
        Some(50),
        "every comparison made before the stop is kept: {}",
        st["shadow"]
    );
}
