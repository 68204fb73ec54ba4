//! Three `ferry serve` instances on one PostgreSQL database, as a cluster
//! behind a load balancer: a change made through any instance (a
//! registration, a route, a rollout) is served by every instance within the
//! propagation bound; `ferry cluster` lists them live, and one killed shows
//! stale; a canary started through one instance splits traffic by its
//! weight on every instance, and a sticky user gets the same version
//! everywhere.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{Server, batch, eventually};
use super::testpg;

/// How long a change may take to be served by every instance: the
/// announcement is immediate, the periodic check runs every second, and a
/// warm-up of the example model takes milliseconds (seconds on a loaded
/// test machine).
const PROPAGATION: Duration = Duration::from_secs(5);

async fn three(url: &str, tmp: &std::path::Path) -> [Server; 3] {
    let mut started = Vec::new();
    for name in ["a", "b", "c"] {
        started.push(Server::start_in(&tmp.join(name), &["--store", url]).await);
    }
    started.try_into().map_err(|_| ()).unwrap()
}

/// The version that answered, with its outputs (`None` when the model
/// does not answer there).
async fn answer(s: &Server, user: Option<&str>) -> Option<(String, Value)> {
    let mut request = s.http.post(s.at("/v2/models/cancer/infer")).json(&batch(3));
    if let Some(u) = user {
        request = request.header("x-user-id", u);
    }
    let r = request.send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    let version = r.headers()["x-ferry-version"].to_str().ok()?.to_string();
    let body: Value = r.json().await.ok()?;
    Some((version, body["outputs"].clone()))
}

/// Waits until every server answers with `version`; returns how long it took.
async fn served_everywhere(servers: &[&Server], version: &str) -> Duration {
    let since = Instant::now();
    for s in servers {
        eventually(
            PROPAGATION,
            &format!("{} serves {version}", s.url),
            async || answer(s, None).await.is_some_and(|(v, _)| v == version),
        )
        .await;
    }
    since.elapsed()
}

async fn cluster(s: &Server) -> Value {
    s.admin_get("/api/v1/cluster").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_any_instance_is_served_by_every_instance() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, mut c] = three(&url, tmp.path()).await;

    // Registered through A: B and C serve it, each from its own cache of
    // the artifact (fetched from PostgreSQL, digest checked).
    let added = a.add("cancer", "1", "cancer-v1.onnx");
    let digest = added["source"]["digest"].as_str().unwrap().to_string();
    served_everywhere(&[&b, &c], "1").await;
    let from_a = answer(&a, None).await.unwrap();
    for s in [&b, &c] {
        assert_eq!(answer(s, None).await.unwrap(), from_a, "{}", s.url);
        assert!(
            s.dir.join("blobs/sha256").join(&digest).exists(),
            "{} cached the artifact",
            s.url
        );
    }

    // A route set through B: A and C serve it within the bound.
    a.add("cancer", "2", "cancer-v2.onnx");
    let (status, body) = b.set_route("cancer", json!({"stable": "2"})).await;
    assert_eq!(status, 200, "{body}");
    let took = served_everywhere(&[&a, &c, &b], "2").await;
    assert!(took < PROPAGATION, "served everywhere after {took:?}");

    // Every instance serves the latest route version, and says so.
    let latest = cluster(&c).await["route_version"].as_i64().unwrap();
    eventually(
        PROPAGATION,
        "three live instances on the latest route",
        async || {
            let view = cluster(&a).await;
            let instances = view["instances"].as_array().unwrap().clone();
            instances.len() == 3
                && instances.iter().all(|i| {
                    i["live"] == true
                        && i["route_version"].as_i64() == Some(latest)
                        && i["warm"] == json!(["cancer/2"])
                })
        },
    )
    .await;
    let table = b.ferry_ok(&["cluster"]);
    assert_eq!(table.matches(" live ").count(), 3, "{table}");
    for s in [&a, &b, &c] {
        assert!(table.contains(&s.url), "{table}");
    }
    let status = b.ferry_ok(&["status", "cancer"]);
    assert!(
        status.contains(&format!("instances (route version {latest}):")),
        "{status}"
    );

    // C killed: it stops reporting and shows stale (after 5 s of silence).
    c.kill9();
    eventually(Duration::from_secs(15), "C shows stale", async || {
        let table = a.ferry_ok(&["cluster"]);
        table.matches(" live ").count() == 2 && table.matches(" stale ").count() == 1
    })
    .await;
    let view = cluster(&b).await;
    let stale: Vec<&Value> = view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["live"] == false)
        .collect();
    assert_eq!(stale.len(), 1, "{view}");
    assert_eq!(stale[0]["url"], c.url.as_str());
}

/// Sends `n` requests without a user to `s` (all at once, a few in flight);
/// returns how many the candidate answered.
async fn candidate_share(s: &Server, n: usize) -> usize {
    let mut candidate = 0;
    for _ in 0..n {
        let (version, _) = answer(s, None).await.expect("every request answers");
        candidate += (version == "2") as usize;
    }
    candidate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_started_through_one_instance_splits_traffic_alike_on_every_instance() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = three(&url, tmp.path()).await;
    a.add("cancer", "1", "cancer-v1.onnx");
    a.add("cancer", "2", "cancer-v2.onnx");
    served_everywhere(&[&a, &b, &c], "1").await;
    c.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 30}, {"pause": {}}], "sticky": {"header": "x-user-id"}}},
    }))
    .await;
    // Every instance serves the canary's route.
    eventually(
        PROPAGATION,
        "every instance has the candidate warm",
        async || {
            let view = cluster(&b).await;
            let latest = view["route_version"].as_i64();
            view["instances"].as_array().unwrap().iter().all(|i| {
                i["route_version"].as_i64() == latest
                    && i["warm"].as_array().unwrap().contains(&json!("cancer/2"))
            })
        },
    )
    .await;

    // Traffic spread over the three: the split on each and in total within
    // 5 standard deviations of 30 %.
    let per_instance = 400;
    let (on_a, on_b, on_c) = tokio::join!(
        candidate_share(&a, per_instance),
        candidate_share(&b, per_instance),
        candidate_share(&c, per_instance),
    );
    let within = |candidate: usize, n: usize| {
        let share = candidate as f64 / n as f64;
        let tolerance = 5.0 * (0.3f64 * 0.7 / n as f64).sqrt();
        ((share - 0.3).abs() <= tolerance, share)
    };
    for (name, on) in [("a", on_a), ("b", on_b), ("c", on_c)] {
        let (ok, share) = within(on, per_instance);
        assert!(ok, "instance {name}: candidate share {share}");
    }
    let (ok, share) = within(on_a + on_b + on_c, 3 * per_instance);
    assert!(ok, "in total: candidate share {share}");

    // A sticky user gets the same version whichever instance answers.
    let mut versions: HashMap<String, usize> = HashMap::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let mut seen = Vec::new();
        for s in [&a, &b, &c] {
            seen.push(answer(s, Some(&user)).await.unwrap().0);
        }
        assert!(seen.iter().all(|v| *v == seen[0]), "{user} got {seen:?}");
        *versions.entry(seen[0].clone()).or_default() += 1;
    }
    assert_eq!(versions.len(), 2, "both versions have users: {versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_fails_when_an_instance_cannot_load_its_version_and_says_which() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start_in(&tmp.path().join("a"), &["--store", &url]).await;
    // B gives a warm-up 20 ms: the slow model (45 ms a row) never loads there.
    let b = Server::start_in(
        &tmp.path().join("b"),
        &["--store", &url, "--load-timeout", "20ms"],
    )
    .await;
    a.add("cancer", "1", "cancer-v1.onnx");
    a.add("cancer", "2", "cancer-slow.onnx");
    served_everywhere(&[&a, &b], "1").await;
    a.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 30}, {"pause": {}}]}},
    }))
    .await;
    eventually_failed(&a).await;
    // (B's load failure is in its report only until it follows the route
    // back to version 1: the message is what must name it.)
    let b_id = id_of(&a, &b.url).await;
    let ended = a.admin_get("/api/v1/models/cancer/status").await;
    let message = ended["last_rollout"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains(&format!("instance {b_id} ({})", b.url))
            && message.contains("could not load version cancer/2")
            && message.contains("version 1 keeps serving"),
        "{ended}"
    );
    served_everywhere(&[&a, &b], "1").await;
}

/// Waits for the rollout to fail.
async fn eventually_failed(s: &Server) {
    eventually(Duration::from_secs(30), "the rollout failed", async || {
        let status = s.admin_get("/api/v1/models/cancer/status").await;
        status["last_rollout"]["phase"] == "failed"
    })
    .await;
}

/// The id `ferry cluster` shows for the instance at `url`.
async fn id_of(s: &Server, url: &str) -> String {
    let view = cluster(s).await;
    view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["url"] == url)
        .and_then(|i| i["id"].as_str())
        .unwrap_or_else(|| panic!("no instance at {url}: {view}"))
        .to_string()
}

/// An instance that makes its own admin token while others share the store
/// says so at start, with the fix; one given another's token says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_new_admin_token_beside_others_says_to_share_one() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start_in(&tmp.path().join("a"), &["--store", &url]).await;
    eventually(Duration::from_secs(10), "a reports itself", async || {
        cluster(&a).await["instances"]
            .as_array()
            .is_some_and(|i| i.len() == 1)
    })
    .await;
    let (b_log, c_log) = (tmp.path().join("b.log"), tmp.path().join("c.log"));
    let _b = Server::start_logging_to(&b_log, &tmp.path().join("b"), &["--store", &url]).await;
    let said = std::fs::read_to_string(&b_log).unwrap();
    assert!(
        said.contains("made a new admin token")
            && said.contains(&a.url)
            && said.contains("copy another's DATA_DIR/admin-token"),
        "{said}"
    );
    let c_dir = tmp.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    std::fs::copy(a.dir.join("admin-token"), c_dir.join("admin-token")).unwrap();
    let _c = Server::start_logging_to(&c_log, &c_dir, &["--store", &url]).await;
    let said = std::fs::read_to_string(&c_log).unwrap();
    assert!(!said.contains("made a new admin token"), "{said}");
}
