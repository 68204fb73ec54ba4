//! Rolling across instances (`rolling` with `scope: instances`): three
//! `ferry serve` on one PostgreSQL, traffic spread over them as a load
//! balancer spreads it. Batch by batch the candidate replaces the stable
//! version on one more instance — each instance answers with one version
//! only — so the share answered by the candidate moves 33 → 67 → 100 %;
//! a candidate that starts failing on the last batch is taken back batch by
//! batch, and every instance ends on the stable version.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{Server, Traffic, batch, eventually, status, status_until};
use super::outage::Cluster;
use super::testpg;
use super::upstream::Upstream;

/// How long a batch's route may take to reach every instance (announced at
/// once, checked every second, a warm-up of milliseconds: seconds under a
/// loaded test machine).
const PROPAGATION: Duration = Duration::from_secs(10);

/// The candidate's share of the route (the instances' share) at batch `k`
/// of 3, as the status shows it.
fn share(k: u32) -> f64 {
    (f64::from(k) * 10_000.0 / 3.0).round() / 100.0
}

/// Waits until every live instance serves the store's latest route version
/// (each has applied its own share of the batch's route).
async fn followed_everywhere(s: &Server) {
    eventually(
        PROPAGATION,
        "every instance follows the route",
        async || {
            let view = s.admin_get("/api/v1/cluster").await;
            let latest = view["route_version"].as_i64();
            view["instances"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["live"] != true || i["route_version"].as_i64() == latest)
        },
    )
    .await;
}

/// Sends `n` requests, each to an instance picked at random (a load
/// balancer's spread); the versions that answered, per instance (by URL).
async fn spread(instances: &[Server], n: usize) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut seen: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let body = batch(1);
    for _ in 0..n {
        let s = &instances[fastrand::usize(..instances.len())];
        let r = s
            .http
            .post(s.at("/v2/models/cancer/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", s.url);
        let version = r.headers()["x-ferry-version"].to_str().unwrap().to_string();
        *seen
            .entry(s.url.clone())
            .or_default()
            .entry(version)
            .or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_across_three_instances_moves_the_candidate_share_33_67_100() {
    let url = testpg::database();
    let cluster = Cluster::start_serving_cancer(&url, 3).await;
    let servers = &cluster.instances;
    let (a, c) = (&servers[0], &servers[2]);
    a.add("cancer", "2", "cancer-v2.onnx");
    followed_everywhere(a).await;
    // Started through C (the instance that drives rollouts may be another).
    c.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"rolling": {"scope": "instances", "batch_size": 1, "batch_pause": "8s"}},
    }))
    .await;
    let n = 300;
    for k in 1..=3u32 {
        let st = status_until(a, Duration::from_secs(30), &format!("batch {k}"), |st| {
            st["traffic"]["2"] == json!(share(k))
        })
        .await;
        assert_eq!(
            st["steps"][k as usize],
            format!("batch {k}: {k}/3 instances"),
            "{st}"
        );
        followed_everywhere(a).await;
        let seen = spread(servers, n).await;
        // Each instance answers with one version only: no split inside it.
        let on_candidate = seen
            .values()
            .filter(|versions| {
                assert_eq!(versions.len(), 1, "an instance split its traffic: {seen:?}");
                versions.contains_key("2")
            })
            .count();
        assert_eq!(on_candidate, k as usize, "batch {k}: {seen:?}");
        // The candidate's share follows the spread, within 5 σ of k/3.
        let candidate: usize = seen.values().filter_map(|v| v.get("2")).sum();
        let (observed, p) = (candidate as f64 / n as f64, f64::from(k) / 3.0);
        let bound = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
        eprintln!(
            "batch {k}: the candidate answered {observed:.3} of {n} requests (expected {p:.3} ± {bound:.3})"
        );
        assert!(
            (observed - p).abs() <= bound,
            "batch {k}: the candidate answered {observed:.3}, expected {p:.3} ± {bound:.3}: {seen:?}"
        );
        if k == 2 {
            let shown = c.ferry_ok(&["status", "cancer"]);
            assert!(shown.contains(">>>  3. batch 2: 2/3 instances"), "{shown}");
        }
    }
    let done = super::harness::ended(a, Duration::from_secs(30)).await;
    assert_eq!(done["phase"], "succeeded", "{done}");
    let route = a.admin_get("/api/v1/models/cancer/route").await;
    assert!(
        route["stable"] == "2"
            && route["candidate"].is_null()
            && route["candidate_instances"].is_null(),
        "the candidate everywhere, as the stable version: {route}"
    );
    let events = a
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await
        .to_string();
    assert!(
        events.contains("3 instances take part, 1 at a time, in this order")
            && events.contains("batch 2: 2 of 3 instances run version 2"),
        "{events}"
    );
}

/// The shares the status showed while `watch` ran, each once, in order.
fn shares_seen(history: &[Value]) -> Vec<f64> {
    let mut seen: Vec<f64> = Vec::new();
    for st in history {
        let now = st["traffic"]["2"].as_f64().unwrap_or(0.0);
        if seen.last() != Some(&now) {
            seen.push(now);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_on_the_last_batch_is_taken_back_batch_by_batch() {
    let upstream = Upstream::start().await;
    let url = testpg::database();
    let cluster = Cluster::start_serving_cancer(&url, 3).await;
    let servers = &cluster.instances;
    let (a, b) = (&servers[0], &servers[1]);
    // The candidate is a remote version: the test makes it fail at will.
    a.ferry_json(&["model", "add", "cancer", "2", "--url", &upstream.url]);
    followed_everywhere(a).await;
    // Traffic on every instance, so whichever drives the rollouts judges
    // windows with candidate requests in them once it serves the candidate.
    let traffic: Vec<Traffic> = servers.iter().map(|s| Traffic::start(s, 40, 2)).collect();
    b.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"rolling": {"scope": "instances", "batch_size": 1, "batch_pause": "10s"}},
        // Windows are judged on every instance's traffic merged; a window
        // an instance has not reported yet is inconclusive and must not
        // add up to a pause on this loaded machine.
        "analysis": {"interval": "5s", "min_requests": 10, "max_inconclusive": 30,
                     "checks": [{"metric": "error_rate", "max": 0.05}]},
    }))
    .await;
    // On the last batch every instance serves the candidate (the instance
    // that judges the windows included): from then on it fails. Two
    // windows (every 5 s) close within the batch's 10 s pause.
    let mut history = Vec::new();
    status_until(a, Duration::from_secs(60), "the last batch", |st| {
        st["traffic"]["2"] == json!(100.0)
    })
    .await;
    followed_everywhere(a).await;
    eventually(PROPAGATION, "the candidate warm everywhere", async || {
        let view = a.admin_get("/api/v1/cluster").await;
        view["instances"].as_array().unwrap().iter().all(|i| {
            i["live"] != true || i["warm"].as_array().unwrap().contains(&json!("cancer/2"))
        })
    })
    .await;
    upstream.set_failing(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(a).await;
        let over = st["phase"] == "idle";
        history.push(st);
        if over {
            break;
        }
        if std::time::Instant::now() > deadline {
            let cluster = a.admin_get("/api/v1/cluster").await;
            let events = a
                .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
                .await;
            panic!(
                "not ended: {}\ncluster: {cluster}\nevents: {events}",
                history.last().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once more, ended: the route restored.
    history.push(status(a).await);
    for t in traffic {
        t.finish().await;
    }
    let last = history.last().unwrap()["last_rollout"].clone();
    assert_eq!(last["phase"], "aborted", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("analysis failed")
            && message.contains("all 3 instances back on version 1"),
        "{message}"
    );
    assert_eq!(
        shares_seen(&history),
        [100.0, share(2), share(1), 0.0],
        "one instance back per batch pause"
    );
    let events = a
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await
        .to_string();
    for back in [
        "rolling back: 2 of 3 instances left on version 2",
        "rolling back: 1 of 3 instances left on version 2",
    ] {
        assert!(events.contains(back), "{back}: {events}");
    }
    // Every instance answers with the stable version again.
    followed_everywhere(a).await;
    let seen = spread(servers, 60).await;
    assert!(
        seen.values().all(|v| v.keys().eq(["1"])),
        "all on stable: {seen:?}"
    );
}
