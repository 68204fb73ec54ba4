//! Analysis over the whole cluster: three `ferry serve` on one PostgreSQL.
//! The instance that drives the rollouts judges a slow canary on traffic it
//! never answered (sent only to the other two) and aborts it on latency
//! within about one interval; feedback posted to one instance for requests
//! another answered counts for the version that answered; the metrics
//! endpoint of any instance shows every instance's requests; a frozen
//! instance (SIGSTOP) leaves the windows it was up in marked incomplete
//! until it flushes again (SIGCONT). A single node restarted on its data
//! dir stays a single node: no `cluster` field, nothing incomplete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{Server, Traffic, eventually, holdout};
use super::outage::Cluster;
use super::testpg;

/// A closed bucket reaches the store within about a second of its close
/// (flushed 50 ms after it); a bucket is 5 s.
const MERGED: Duration = Duration::from_secs(15);

/// The instance that drives the rollouts: the view's `leader` when the
/// build has elected leaders, else the first started (it is ready, and
/// takes the driver's lock at its first tick, before the others start).
async fn leader_first(cluster: &mut Cluster) {
    let view = cluster.instances[0].admin_get("/api/v1/cluster").await;
    let Some(leader) = view["leader"]["id"].as_str().or(view["leader"].as_str()) else {
        return;
    };
    let url = view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == leader)
        .map(|i| i["url"].as_str().unwrap().to_string())
        .unwrap();
    let at = cluster.instances.iter().position(|s| s.url == url).unwrap();
    cluster.instances.swap(0, at);
}

/// The sum of a figure over every series of the model (the metrics
/// endpoint of `s`, last `window`).
async fn metrics(s: &Server, window: &str) -> Value {
    s.admin_get(&format!("/api/v1/models/cancer/metrics?window={window}"))
        .await
}

fn total(m: &Value, figure: &str) -> u64 {
    m["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[figure].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_aborts_a_slow_canary_on_traffic_only_the_others_answered() {
    let url = testpg::database();
    let mut cluster = Cluster::start_serving_cancer(&url, 3).await;
    leader_first(&mut cluster).await;
    let [leader, b, c] = &cluster.instances[..] else {
        unreachable!()
    };
    leader.add("cancer", "slow", "cancer-slow.onnx");
    let load = [Traffic::start(b, 40, 2), Traffic::start(c, 40, 2)];
    let started = Instant::now();
    leader.deploy_canary("slow", "30,100", "60s", &Server::LATENCY_CHECKED);
    let ended = super::harness::ended(leader, Duration::from_secs(40)).await;
    let took = started.elapsed();
    assert_eq!(ended["phase"], "aborted", "{ended}");
    for l in load {
        let seen = l.finish().await;
        assert!(seen.failures.is_empty(), "{:?}", &seen.failures[..1]);
    }
    // The leader answered none of it: the verdict counted the others'.
    let events = leader
        .admin_get("/api/v1/models/cancer/rollouts/r-1/events")
        .await;
    let verdicts: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("latency_p99_ms"))
        .collect();
    assert!(!verdicts.is_empty(), "{events}");
    let last = verdicts.last().unwrap();
    assert!(last.contains("x stable") && last.contains(", p"), "{last}");
    assert!(!last.contains("incomplete"), "{last}");
    let on_leader = super::harness::answered_by(leader, "slow").await;
    assert_eq!(on_leader, 0.0, "the leader took no candidate traffic");
    // Within one interval and its grace of the first window that could be
    // judged (the route reaches the others within a second; the first
    // window is whole 5 s buckets of canary traffic), on a loaded machine.
    eprintln!("aborted {took:?} after the deploy");
    assert!(took < Duration::from_secs(20), "aborted after {took:?}");
}

/// The version that answered a request, and the class it predicted.
struct Answered {
    version: String,
    predicted: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feedback_to_one_instance_counts_for_the_version_another_answered() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = &sharing_one_token(&url, tmp.path()).await;
    a.add("cancer", "1", "cancer-v1.onnx");
    a.add("cancer", "2", "cancer-v2.onnx");
    a.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 50}, {"pause": {}}]}},
    }))
    .await;
    eventually(MERGED, "every instance serves the canary", async || {
        let view = a.admin_get("/api/v1/cluster").await;
        view["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["warm"].as_array().unwrap().contains(&json!("cancer/2")))
    })
    .await;
    let before = total(&metrics(c, "15m").await, "requests");

    // A answers 60 requests, B 25 and C 15.
    let rows = holdout();
    let mut answered: BTreeMap<String, Answered> = BTreeMap::new();
    let mut sent = 0;
    for (s, n) in [(a, 60), (b, 25), (c, 15)] {
        for i in 0..n {
            let id = format!("{}-{i}", s.url.rsplit(':').next().unwrap());
            let mut body = rows[i % rows.len()].0.clone();
            body["id"] = json!(id);
            let (status, headers, out) = s.infer("/v2/models/cancer/infer", &body).await;
            assert_eq!(status, 200, "{out}");
            sent += 1;
            if std::ptr::eq(s, a) {
                let version = headers["x-ferry-version"].to_str().unwrap().to_string();
                let outputs = out["outputs"].as_array().unwrap();
                let label = outputs.iter().find(|o| o["name"] == "label").unwrap();
                let predicted = label["data"][0].as_i64().unwrap();
                answered.insert(id, Answered { version, predicted });
            }
        }
    }

    // Labels for A's answers, posted to B: every third one wrong.
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (n, (id, ans)) in answered.iter().enumerate() {
        let right = n % 3 != 0;
        let label = if right {
            ans.predicted
        } else {
            1 - ans.predicted
        };
        let (status, out) = feedback(b, id, label).await;
        assert_eq!(status, 200, "{id}: {out}");
        assert_eq!(out["version"], ans.version.as_str(), "{out}");
        assert_eq!(out["correct"], right, "{out}");
        let e = expected.entry(ans.version.clone()).or_default();
        e.0 += 1;
        e.1 += u64::from(right);
    }
    assert_eq!(expected.len(), 2, "both versions answered: {expected:?}");
    // One label per id across the cluster; an id nobody knows is the 404
    // a single node gives.
    let (first, _) = answered.iter().next().unwrap();
    let (status, out) = feedback(c, first, 1).await;
    assert_eq!(status, 409, "{out}");
    assert!(
        out["error"]
            .as_str()
            .unwrap()
            .contains("already has its label")
    );
    let (status, out) = feedback(c, "nobody-answered-this", 1).await;
    assert_eq!(status, 404, "{out}");
    assert!(
        out["error"]
            .as_str()
            .unwrap()
            .contains("is unknown or too old")
    );

    // The merged windows of C (which answered none of them) count the
    // labels for the version that answered, and every instance's requests.
    eventually(MERGED, "the labels and requests merged on C", async || {
        let m = metrics(c, "15m").await;
        let labelled: BTreeMap<String, (u64, u64)> = m["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["labelled"].as_u64() > Some(0))
            .map(|s| {
                let v = s["version"].as_str().unwrap().to_string();
                (
                    v,
                    (
                        s["labelled"].as_u64().unwrap(),
                        s["correct"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        labelled == expected
            && total(&m, "requests") == before + sent
            && m["cluster"]["complete"] == true
            && m["cluster"]["instances_expected"] == 3
    })
    .await;
    let m = metrics(a, "15m").await;
    assert_eq!(total(&m, "requests"), before + sent, "{m}");
}

/// Three instances with one admin token (as docs/scale-out.md asks): a
/// label is passed on with the caller's token.
async fn sharing_one_token(url: &str, tmp: &std::path::Path) -> [Server; 3] {
    let a = Server::start_in(&tmp.join("a"), &["--store", url]).await;
    let mut started = vec![a];
    for name in ["b", "c"] {
        std::fs::create_dir_all(tmp.join(name)).unwrap();
        std::fs::copy(
            tmp.join("a/admin-token"),
            tmp.join(name).join("admin-token"),
        )
        .unwrap();
        started.push(Server::start_in(&tmp.join(name), &["--store", url]).await);
    }
    started.try_into().map_err(|_| ()).unwrap()
}

async fn feedback(s: &Server, id: &str, label: i64) -> (u16, Value) {
    let r = s
        .http
        .post(s.at("/v2/models/cancer/feedback"))
        .bearer_auth(s.token())
        .json(&json!({"id": id, "label": label}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_a_frozen_instance_has_not_reported_is_marked_incomplete() {
    let url = testpg::database();
    let cluster = Cluster::start_serving_cancer(&url, 3).await;
    let [a, b, c] = &cluster.instances[..] else {
        unreachable!()
    };
    // Traffic on A only: a frozen C must not hold up its own clients.
    let load = [Traffic::start(a, 20, 1)];
    eventually(MERGED, "a complete window of three", async || {
        let m = metrics(b, "30s").await;
        m["cluster"]["complete"] == true && m["cluster"]["instances_expected"] == 3
    })
    .await;
    let c_id = {
        let view = a.admin_get("/api/v1/cluster").await;
        let me = view["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["url"] == c.url.as_str());
        me.unwrap()["id"].as_str().unwrap().to_string()
    };
    c.signal("-STOP");
    eventually(MERGED, "the window marked incomplete", async || {
        let m = metrics(b, "30s").await;
        m["cluster"]["complete"] == false
            && m["cluster"]["instances_reporting"] == 2
            && m["cluster"]["missing"] == json!([c_id])
    })
    .await;
    // Thawed, C flushes what it kept: the same windows are complete again.
    c.signal("-CONT");
    eventually(MERGED, "complete again once C flushed", async || {
        let m = metrics(b, "30s").await;
        m["cluster"]["complete"] == true && m["cluster"]["instances_expected"] == 3
    })
    .await;
    for l in load {
        let seen = l.finish().await;
        assert!(seen.failures.is_empty(), "{:?}", &seen.failures[..1]);
    }
}

/// A single node is never a cluster: restarted on its data dir after a
/// kill -9 (its previous process never left), it forgets that process's
/// row, its figures are its own and nothing says "incomplete".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_single_node_shows_no_cluster_and_no_incomplete_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut first = Server::start_in(&dir, &[]).await;
    first.add("cancer", "1", "cancer-v1.onnx");
    tokio::time::sleep(Duration::from_millis(1500)).await; // a heartbeat or two
    first.kill9();
    let s = Server::start_in(&dir, &[]).await;
    let view = s.admin_get("/api/v1/cluster").await;
    assert_eq!(view["instances"].as_array().unwrap().len(), 1, "{view}");
    for _ in 0..5 {
        let (status, _, out) = s.infer("/v2/models/cancer/infer", &holdout()[0].0).await;
        assert_eq!(status, 200, "{out}");
    }
    let m = metrics(&s, "60s").await;
    assert_eq!(total(&m, "requests"), 5, "{m}");
    assert!(m.get("cluster").is_none(), "{m}");
}
