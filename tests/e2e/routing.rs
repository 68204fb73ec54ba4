//! The gateway over real processes and sockets: weighted splits, sticky and
//! cohort targeting, staging, failover when a remote primary dies, shadow
//! mirroring with a slow and a dead shadow, and switches under load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{
    Seen, Server, Traffic, batch, fails_over_without_errors, holdout, remote_then_local,
    series_value,
};
use super::upstream::Upstream;

/// How many requests each version answered, and the failures seen.
type LoadResult = (HashMap<String, usize>, Vec<String>);

/// Sends `n` requests from `concurrency` clients; `headers(i)` gives request
/// i's headers. Returns how many each version answered, and the failures.
async fn drive(
    s: &Server,
    path: &str,
    n: usize,
    concurrency: usize,
    headers: impl Fn(usize) -> Vec<(&'static str, String)> + Send + Sync + 'static,
) -> LoadResult {
    let headers = Arc::new(headers);
    let body = Arc::new(holdout()[0].0.clone());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body, next, headers) = (
            s.http.clone(),
            s.at(path),
            body.clone(),
            next.clone(),
            headers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let mut rb = http.post(&url).json(&*body);
                for (k, v) in headers(i) {
                    rb = rb.header(k, v);
                }
                match rb.send().await {
                    Ok(r) if r.status() == 200 => {
                        let v = r.headers()["x-ferry-version"].to_str().unwrap().to_string();
                        *seen.entry(v).or_default() += 1;
                    }
                    Ok(r) => failures.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (seen, failures)
        }));
    }
    let mut seen = HashMap::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (s, f) = t.await.unwrap();
        for (k, v) in s {
            *seen.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    (seen, failures)
}

/// Five standard deviations of a binomial share.
fn tolerance(p: f64, n: usize) -> f64 {
    5.0 * (p * (1.0 - p) / n as f64).sqrt()
}

async fn two_versions() -> Server {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_ten_thousand_requests_within_tolerance() {
    let s = two_versions().await;
    let (status, body) = s
        .set_route(
            "cancer",
            json!({"stable": "1", "candidate": {"version": "2", "weight": 30}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let n = 10_000;
    let (seen, failures) = drive(&s, "/v2/models/cancer/infer", n, 16, |_| vec![]).await;
    assert!(failures.is_empty(), "{failures:?}");
    let share = *seen.get("2").unwrap_or(&0) as f64 / n as f64;
    assert!(
        (share - 0.30).abs() <= tolerance(0.30, n),
        "candidate share {share}"
    );

    let prom = s.prometheus().await;
    assert_eq!(
        series_value(
            &prom,
            r#"ferry_traffic_weight_percent{model="cancer",version="2"}"#
        ),
        30.0
    );
    assert_eq!(
        series_value(
            &prom,
            r#"ferry_traffic_weight_percent{model="cancer",version="1"}"#
        ),
        70.0
    );
    assert_eq!(
        series_value(
            &prom,
            r#"ferry_version_role{model="cancer",version="2",role="candidate"}"#
        ),
        1.0
    );

    let m = s.admin_get("/api/v1/models/cancer/metrics?window=5m").await;
    let series = m["series"].as_array().unwrap();
    let requests = |version: &str, role: &str| {
        series
            .iter()
            .find(|x| x["version"] == version && x["role"] == role)
            .map_or(0, |x| x["requests"].as_u64().unwrap())
    };
    assert_eq!(
        requests("1", "stable") + requests("2", "candidate"),
        n as u64
    );
    assert_eq!(requests("2", "candidate") as usize, seen["2"]);
    let candidate = series.iter().find(|x| x["role"] == "candidate").unwrap();
    assert!(candidate["latency_p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(candidate["error_rate"], 0.0);

    // The event history says what changed and who asked.
    let kinds = s.event_kinds("cancer").await;
    assert_eq!(kinds.last().unwrap(), "route_changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_users_keep_their_version_and_raising_the_weight_only_adds_users() {
    let s = two_versions().await;
    let policy = |w: u32| json!({"stable": "1", "candidate": {"version": "2", "weight": w, "sticky_header": "x-user-id"}});
    assert_eq!(s.set_route("cancer", policy(20)).await.0, 200);
    let users = 1_000;
    let assign = |s: &Server| {
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        async move {
            let body = holdout()[0].0.clone();
            let mut out = HashMap::new();
            for u in 0..users {
                let r = http
                    .post(&url)
                    .header("x-user-id", format!("user-{u}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                out.insert(
                    u,
                    r.headers()["x-ferry-version"].to_str().unwrap().to_string(),
                );
            }
            out
        }
    };
    let first = assign(&s).await;
    let again = assign(&s).await;
    assert_eq!(first, again, "the same user always gets the same version");
    let at_20 = first.values().filter(|v| *v == "2").count();
    assert!(
        (at_20 as f64 / users as f64 - 0.2).abs() <= tolerance(0.2, users),
        "{at_20} users at 20%"
    );

    assert_eq!(s.set_route("cancer", policy(50)).await.0, 200);
    let later = assign(&s).await;
    for (u, v) in &first {
        if v == "2" {
            assert_eq!(
                later[u], "2",
                "user-{u} moved back to stable when the weight grew"
            );
        }
    }
    let at_50 = later.values().filter(|v| *v == "2").count();
    assert!(at_50 > at_20);
    assert!(
        (at_50 as f64 / users as f64 - 0.5).abs() <= tolerance(0.5, users),
        "{at_50} users at 50%"
    );
}

#[tokio::test]
async fn a_cohort_canary_touches_only_its_cohort_and_staging_is_reached_by_header() {
    let s = two_versions().await;
    s.add("cancer", "3", "cancer-bad.onnx");
    let policy = json!({
        "stable": "1",
        "candidate": {"version": "2", "weight": 100, "match": [{"header": "x-region", "values": ["eu-west", "eu-north"]}]},
        "staging": "3"
    });
    assert_eq!(s.set_route("cancer", policy).await.0, 200);
    let version = |headers: Vec<(&'static str, &'static str)>| {
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        async move {
            let mut rb = http.post(url).json(&batch(1));
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-ferry-version"].to_str().unwrap().to_string()
        }
    };
    for _ in 0..20 {
        assert_eq!(version(vec![("x-region", "eu-west")]).await, "2");
        assert_eq!(version(vec![("x-region", "eu-north")]).await, "2");
        assert_eq!(version(vec![("x-region", "us-east")]).await, "1");
        assert_eq!(version(vec![]).await, "1");
    }
    assert_eq!(version(vec![("x-ferry-env", "staging")]).await, "3");
    assert_eq!(
        version(vec![("x-ferry-env", "staging"), ("x-region", "eu-west")]).await,
        "3"
    );
    // /versions/{v} addresses any loaded version directly.
    let (status, headers, _) = s
        .infer("/v2/models/cancer/versions/3/infer", &batch(1))
        .await;
    assert_eq!(
        (status, headers["x-ferry-version"].to_str().unwrap()),
        (200, "3")
    );

    // Without a staging version, the staging header is a clear 404.
    assert_eq!(s.set_route("cancer", json!({"stable": "1"})).await.0, 200);
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .header("x-ferry-env", "staging")
        .json(&batch(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("no staging version")
    );
}

#[tokio::test]
async fn invalid_routes_are_refused_before_anything_changes() {
    let s = two_versions().await;
    let tmp = tempfile::tempdir().unwrap();
    let types = super::harness::test_data("all-types.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "odd",
        "--file",
        types.to_str().unwrap(),
    ]);
    let _ = tmp;
    for (policy, needle) in [
        (
            json!({"stable": "1", "candidate": {"version": "2", "weight": 101}}),
            "candidate.weight",
        ),
        (
            json!({"stable": "1", "candidate": {"version": "9", "weight": 10}}),
            "version \"9\" of model \"cancer\" is not registered",
        ),
        (
            json!({"stable": "1", "candidate": {"version": "odd", "weight": 10}}),
            "does not keep the contract",
        ),
        (
            json!({"stable": "1", "shadow": {"version": "2", "percent": 10, "compare": {"output": "scores"}}}),
            "shadow.compare.output \"scores\"",
        ),
        (json!({"stable": "1", "weights": {}}), "unknown field"),
    ] {
        let (status, body) = s.set_route("cancer", policy).await;
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(status == 400 || status == 404, "{status} {body}");
        assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    }
    let route = s.admin_get("/api/v1/models/cancer/route").await;
    assert_eq!(
        route,
        json!({"stable": "1", "breaker": {"error_rate": 0.5, "consecutive_failures": 5, "window": "10s", "min_requests": 10, "probe_every": "1s"}})
    );
    // A version in the route cannot be removed or unloaded.
    assert_eq!(
        s.set_route("cancer", json!({"stable": "1", "staging": "2"}))
            .await
            .0,
        200
    );
    let out = s.ferry(&["model", "remove", "cancer", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("part of the model's route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_answering_when_the_primary_remote_dies_mid_load() {
    let mut upstream = Server::start().await;
    upstream.add("cancer", "1", "cancer-v1.onnx");
    let s = Server::start().await;
    remote_then_local(&s, &upstream.url).await;
    fails_over_without_errors(&s, async move || {
        tokio::task::spawn_blocking(move || upstream.kill9())
            .await
            .unwrap();
    })
    .await;
    let prom = s.prometheus().await;
    assert_eq!(
        series_value(
            &prom,
            r#"ferry_version_role{model="cancer",version="local",role="fallback"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_never_delays_users_and_saturation_drops_copies() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "shadow",
        "--url",
        &upstream.url,
        "--timeout",
        "5s",
    ]);
    let timed = |n: usize| {
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        async move {
            let body = holdout()[0].0.clone();
            let mut times = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let r = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(
                    r.headers()["x-ferry-version"],
                    "1",
                    "users only get the stable answer"
                );
                times.push(t.elapsed());
            }
            times.sort();
            times
        }
    };
    let without = timed(50).await;
    upstream.set_delay(1_000);
    let policy = json!({"stable": "1", "shadow": {"version": "shadow", "percent": 100, "max_in_flight": 4,
                        "compare": {"output": "label"}}});
    assert_eq!(s.set_route("cancer", policy).await.0, 200);
    let with = timed(50).await;
    let p99 = |t: &[Duration]| t[t.len() * 99 / 100 - 1];
    // The shadow takes 1 s per request; users must not notice.
    assert!(
        p99(&with) < Duration::from_millis(100),
        "p99 with a 1 s shadow: {:?} (without: {:?})",
        p99(&with),
        p99(&without)
    );
    let prom = s.prometheus().await;
    let dropped = series_value(
        &prom,
        r#"ferry_shadow_dropped_total{model="cancer",version="shadow"}"#,
    );
    assert!(
        dropped >= 40.0,
        "copies beyond 4 in flight are dropped: {dropped}"
    );
    // The copies that went out are compared once the shadow answers.
    super::harness::eventually(Duration::from_secs(5), "the shadow's answers are compared", async || {
        let prom = s.prometheus().await;
        let compared = series_value(&prom, r#"ferry_shadow_comparisons_total{model="cancer",version="shadow",result="agree"}"#)
            + series_value(&prom, r#"ferry_shadow_comparisons_total{model="cancer",version="shadow",result="disagree"}"#);
        compared >= 4.0
    })
    .await;
    // Two warm-ups (at registration and when the route loads it), then at
    // most max_in_flight copies while every copy takes 1 s.
    assert!(
        upstream.received() <= 2 + 4,
        "copies beyond max_in_flight went out: {}",
        upstream.received()
    );
    let m = s.admin_get("/api/v1/models/cancer/metrics?window=1m").await;
    let shadow = super::harness::metrics_series(&m, "role", "shadow");
    assert!(shadow["agreement"].is_number(), "{shadow}");
    assert!(shadow["dropped"].as_u64().unwrap() >= 40);
    assert!(
        shadow["latency_p50_ms"].as_f64().unwrap() >= 900.0,
        "the shadow's own latency is recorded: {shadow}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shadow_costs_users_nothing_and_its_errors_are_counted() {
    let mut upstream = Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "shadow",
        "--url",
        &upstream.url,
        "--timeout",
        "500ms",
    ]);
    let policy = json!({"stable": "1", "shadow": {"version": "shadow", "percent": 100, "compare": {"output": "probabilities", "mode": "abs", "tolerance": 0.001}}});
    assert_eq!(s.set_route("cancer", policy).await.0, 200);
    upstream.shut_down();
    upstream.set_failing(true);
    let (seen, failures) = drive(&s, "/v2/models/cancer/infer", 200, 4, |_| vec![]).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(seen.get("1"), Some(&200));
    super::harness::eventually(
        Duration::from_secs(5),
        "shadow errors are counted",
        async || {
            let prom = s.prometheus().await;
            series_value(
                &prom,
                r#"ferry_shadow_comparisons_total{model="cancer",version="shadow",result="error"}"#,
            ) >= 10.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_all_traffic_under_load_fails_no_request() {
    let s = two_versions().await;
    let traffic = Traffic::start(&s, 0, 8);
    for i in 0..8 {
        let (now, next) = if i % 2 == 0 { ("1", "2") } else { ("2", "1") };
        // The switch happens while the current version is answering.
        super::harness::wait_answered(&s, now, 20.0).await;
        let (status, body) = s.set_route("cancer", json!({"stable": next})).await;
        assert_eq!(status, 200, "{body}");
    }
    super::harness::wait_answered(&s, "1", 20.0).await;
    let Seen {
        versions: seen,
        failures,
    } = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "failed requests across switches: {failures:?}"
    );
    assert!(seen["1"] > 0 && seen["2"] > 0, "{seen:?}");
    // Switching the stable version back and forth keeps both loaded only as needed.
    let show = s.ferry_json(&["model", "show", "cancer"]);
    assert_eq!(show["stable"], "1");
}

#[tokio::test]
async fn the_prediction_log_samples_requests_to_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("predictions.jsonl");
    let s = Server::start_in(
        &tmp.path().join("data"),
        &[
            "--prediction-log",
            log.to_str().unwrap(),
            "--prediction-log-sample",
            "1",
        ],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let mut body = holdout()[0].0.clone();
    body["id"] = json!("logged-1");
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &body).await;
    assert_eq!(status, 200);
    super::harness::eventually(Duration::from_secs(5), "the line is written", async || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("logged-1"))
    })
    .await;
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["version"], "1");
    assert_eq!(line["role"], "stable");
    assert_eq!(line["inputs"][0]["shape"], json!([1, 30]));
    assert_eq!(line["outputs"][1]["name"], "probabilities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_a_version_that_leaves_the_route() {
    let s = Server::start().await;
    s.add("cancer", "slow", "cancer-slow.onnx");
    s.add("cancer", "1", "cancer-v1.onnx");
    // Six requests queue on the slow version's one replica (≥ 20 ms each).
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&batch(1)).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()["x-ferry-version"].to_str().unwrap().to_string(),
            )
        }));
    }
    // One has been answered by the slow version: the other five are queued
    // on its one replica (≥ 20 ms each) when the route changes.
    super::harness::wait_answered(&s, "slow", 1.0).await;
    assert_eq!(s.set_route("cancer", json!({"stable": "1"})).await.0, 200);
    let (_, headers, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(
        headers["x-ferry-version"], "1",
        "new requests go to the new stable version"
    );
    let mut answered_by_slow = 0;
    for t in tasks {
        let (status, version) = t.await.unwrap();
        assert_eq!(status, 200, "an in-flight request was lost in the switch");
        answered_by_slow += usize::from(version == "slow");
    }
    assert!(
        answered_by_slow >= 1,
        "requests that were running finished on the old version"
    );
    // Once drained, the old version is no longer loaded.
    let (status, _, _) = s
        .infer("/v2/models/cancer/versions/slow/infer", &batch(1))
        .await;
    assert_eq!(status, 404);
}

/// Both versions remote, the shadow answering the other class: requests
/// pass through to the stable version, the shadow gets the client's very
/// bytes (nothing re-encoded), only the answers are decoded to compare, and
/// disagreements keep the client's request id. A request naming its outputs
/// is decoded instead and its copy re-encoded with every output, so the
/// comparison still has the output it compares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_shadow_gets_the_clients_bytes_and_its_answers_are_compared() {
    let stable = Upstream::start().await;
    let shadow = Upstream::start().await;
    shadow.answer_class_zero();
    let s = Server::start().await;
    s.ferry_json(&["model", "add", "cancer", "a", "--url", &stable.url]);
    s.ferry_json(&["model", "add", "cancer", "b", "--url", &shadow.url]);
    s.start_rollout(&json!({"model": "cancer", "version": "b",
        "strategy": {"shadow": {"mirror_percent": 100, "compare": {"output": "label"},
                                "min_comparisons": 100000, "min_agreement": 0.5, "then": "promote"}},
        "analysis": {"interval": "5s", "min_requests": 5}}))
        .await;
    let disagreed = async || {
        series_value(
            &s.prometheus().await,
            r#"ferry_shadow_comparisons_total{model="cancer",version="b",result="disagree"}"#,
        )
    };
    let row = holdout()[0].0["inputs"][0]["data"].to_string();
    let url = s.at("/v2/models/cancer/infer");
    for i in 0..20 {
        // Spaced out as no encoder would write it: a re-encoded copy differs.
        let body = format!(
            r#"{{ "id" : "client-{i}",   "inputs" : [ {{ "name" : "input", "datatype" : "FP32", "shape" : [ 1, 30 ], "data" : {row} }} ] }}"#
        );
        let r = s.http.post(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ferry-version"], "a");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["id"], format!("client-{i}"), "{answer}");
        assert_eq!(
            answer["outputs"][0]["data"],
            json!([1]),
            "users get the stable answer"
        );
        super::harness::eventually(Duration::from_secs(5), "the copy arrives", async || {
            shadow.last_body() == body.as_bytes()
        })
        .await;
    }
    super::harness::eventually(Duration::from_secs(5), "every copy compared", async || {
        disagreed().await >= 20.0
    })
    .await;
    // The rollout stores its comparisons at most once a second.
    super::harness::eventually(
        Duration::from_secs(5),
        "examples in the status",
        async || {
            super::harness::status(&s).await["shadow"]["examples"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        },
    )
    .await;
    let examples = super::harness::status(&s).await["shadow"]["examples"].clone();
    let ids: Vec<&str> = examples
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|id| id.starts_with("client-")),
        "disagreements keep the client's ids: {examples}"
    );

    // Naming an output: decoded, answered with that output only, and the
    // copy asks for every output, so `label` is still compared.
    let body = format!(
        r#"{{ "inputs" : [ {{ "name" : "input", "datatype" : "FP32", "shape" : [ 1, 30 ], "data" : {row} }} ], "outputs" : [ {{ "name" : "probabilities" }} ] }}"#
    );
    let r = s.http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["outputs"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["outputs"][0]["name"], "probabilities");
    super::harness::eventually(
        Duration::from_secs(5),
        "that copy compared too",
        async || disagreed().await >= 21.0,
    )
    .await;
    assert_ne!(
        shadow.last_body(),
        body.as_bytes(),
        "re-encoded from the decoded inputs"
    );
}

/// Every request the fallback answers because the primary failed is a
/// failover, whether the primary failed it or its open breaker skipped it:
/// the counter matched only the tries (12 of 801).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_an_open_breaker_count_as_failovers() {
    let upstream = Upstream::start().await;
    let s = Server::start().await;
    remote_then_local(&s, &upstream.url).await;
    upstream.set_failing(true);
    let (one, _) = holdout().remove(0);
    for _ in 0..60 {
        let (status, headers, _) = s.infer("/v2/models/cancer/infer", &one).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-ferry-version"], "local");
    }
    let prom = s.prometheus().await;
    let failovers = series_value(
        &prom,
        r#"ferry_failovers_total{model="cancer",from_version="remote",to_version="local"}"#,
    );
    let tried = series_value(
        &prom,
        r#"ferry_requests_total{model="cancer",version="remote",outcome="error"}"#,
    );
    assert!(tried < 60.0, "the breaker opened: {tried} tries");
    assert_eq!(failovers, 60.0, "{prom}");
}

/// A copy is taken when the primary is chosen and sent once the primary has
/// answered, by the serving thread's companion at the lowest CPU priority
/// (so the kernel runs it only when no request waits for the core); a copy
/// taken goes out also when the primary fails, its own outcome counted and
/// nothing compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_run_at_the_lowest_priority_and_go_out_when_the_primary_fails() {
    let stable = Upstream::start().await;
    let shadow = Upstream::start().await;
    let s = Server::start().await;
    s.ferry_json(&["model", "add", "cancer", "a", "--url", &stable.url]);
    s.ferry_json(&["model", "add", "cancer", "b", "--url", &shadow.url]);
    let policy = json!({"stable": "a", "shadow": {"version": "b", "percent": 100, "compare": {"output": "label"}}});
    assert_eq!(s.set_route("cancer", policy).await.0, 200);

    // Each serving thread has its copy thread, at nice 19 (the 19th field
    // of /proc/PID/task/TID/stat); the serving threads keep their own.
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", s.pid())).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        let (name, rest) = stat.split_once(" (").unwrap().1.rsplit_once(") ").unwrap();
        let nice: i32 = rest.split(' ').nth(16).unwrap().parse().unwrap();
        threads.push((name.to_string(), nice));
    }
    let named = |prefix: &str| -> Vec<i32> {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, nice)| *nice)
            .collect()
    };
    let (serving, copies) = (named("ferry-serve-"), named("ferry-copies-"));
    assert!(!serving.is_empty(), "{threads:?}");
    assert_eq!(copies.len(), serving.len(), "{threads:?}");
    assert!(copies.iter().all(|&n| n == 19), "{threads:?}");
    assert!(serving.iter().all(|&n| n < 19), "{threads:?}");

    stable.set_failing(true);
    let before = shadow.received();
    let body = holdout()[0].0.clone();
    for _ in 0..10 {
        let (status, _, answer) = s.infer("/v2/models/cancer/infer", &body).await;
        assert_eq!(status, 502, "the stable version's failure: {answer}");
    }
    super::harness::eventually(
        Duration::from_secs(5),
        "every copy reaches the shadow",
        async || shadow.received() >= before + 10,
    )
    .await;
    super::harness::eventually(
        Duration::from_secs(5),
        "the copies' outcomes are counted",
        async || {
            series_value(
                &s.prometheus().await,
                r#"ferry_requests_total{model="cancer",version="b",outcome="ok"}"#,
            ) >= 10.0
        },
    )
    .await;
    let prom = s.prometheus().await;
    let compared: f64 = ["agree", "disagree", "error"]
        .iter()
        .map(|r| {
            series_value(
                &prom,
                &format!(
                    r#"ferry_shadow_comparisons_total{{model="cancer",version="b",result="{r}"}}"#
                ),
            )
        })
        .sum();
    assert_eq!(compared, 0.0, "nothing to compare with a failed primary");
}
