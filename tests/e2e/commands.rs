//! Commands from any instance: three `ferry serve` on one PostgreSQL. Each
//! rollout command (`apply`, `pause`, `resume`, `promote`, `abort`,
//! `retry`, `rollback`) sent to an instance that does not lead is executed
//! once by the leader, and the follower answers with the leader's answer
//! (`x-ferry-executed-by` names the leader); a conflict or an unknown model
//! gets the same status and text through a follower as from the leader;
//! `ferry pause` against a follower works; and with the leader stopped
//! (SIGSTOP, with a lease longer than the test: it keeps its role and takes
//! nothing, and no other instance may lead meanwhile), a command through a
//! follower gets 503 within `--command-timeout` and is never executed,
//! not even once the leader runs again — nor is the command of a follower
//! killed before it could withdraw it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{Server, eventually, status_until};
use super::testpg;

/// The header a follower's answer carries.
const EXECUTED_BY: &str = "x-ferry-executed-by";

/// Three instances on `url` serving `cancer` 1 (2 registered), with the
/// given `--command-timeout` and `--leader-lease`.
async fn three(url: &str, tmp: &std::path::Path, timeout: &str, lease: &str) -> Vec<Server> {
    let args = [
        "--store",
        url,
        "--command-timeout",
        timeout,
        "--leader-lease",
        lease,
        "--leader-renew",
        "1s",
    ];
    let a = Server::start_in(&tmp.join("a"), &args).await;
    a.add("cancer", "1", "cancer-v1.onnx");
    a.add("cancer", "2", "cancer-v2.onnx");
    let mut all = vec![a];
    for name in ["b", "c"] {
        all.push(Server::start_in(&tmp.join(name), &args).await);
    }
    all
}

/// A command's answer: status, `x-ferry-executed-by` (when another instance
/// executed it), body.
struct Answer {
    status: u16,
    executed_by: Option<String>,
    body: Value,
}

async fn post(s: &Server, path: &str, body: Option<Value>) -> Answer {
    let mut request = s.http.post(s.at(path)).bearer_auth(s.token());
    if let Some(b) = body {
        request = request.json(&b);
    }
    let r = request.send().await.expect("request sent");
    Answer {
        status: r.status().as_u16(),
        executed_by: r.headers().get(EXECUTED_BY).map(|v| {
            let text = v.to_str().unwrap();
            // "instance ID[ (term N)], command N"
            let id = text.strip_prefix("instance ").expect(text);
            id.split([' ', ',']).next().unwrap().to_string()
        }),
        body: r.json().await.unwrap_or(Value::Null),
    }
}

async fn command(s: &Server, name: &str, body: Option<Value>) -> Answer {
    post(s, &format!("/api/v1/models/cancer/{name}"), body).await
}

/// Which instance leads (it executes a command itself) and its id as the
/// followers name it; the others follow.
async fn roles(servers: &[Server]) -> (usize, String) {
    let mut found = None;
    eventually(Duration::from_secs(15), "one leader", async || {
        let mut leaders = Vec::new();
        let mut named = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            // An unknown model: 404 wherever it is executed, nothing changed.
            let a = post(s, "/api/v1/models/nope/pause", None).await;
            assert_eq!(a.status, 404, "{}", a.body);
            match a.executed_by {
                None => leaders.push(i),
                Some(id) => named.push(id),
            }
        }
        named.dedup();
        if let ([leader], [id]) = (leaders.as_slice(), named.as_slice()) {
            found = Some((*leader, id.clone()));
        }
        found.is_some()
    })
    .await;
    found.unwrap()
}

fn spec() -> Value {
    json!({
        "model": "cancer",
        "version": "2",
        "strategy": {"canary": {"steps": [
            {"weight": 10}, {"pause": "1h"}, {"weight": 50}, {"pause": {}}, {"weight": 100}
        ]}}
    })
}

/// The keys of a JSON object, sorted: an answer's shape.
fn shape(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// Sends the same command to the leader and to a follower, when it
/// conflicts either way: the same status and the same text.
async fn same_conflict(leader: &Server, follower: &Server, name: &str, id: &str) {
    let direct = command(leader, name, None).await;
    let through = command(follower, name, None).await;
    assert_eq!(direct.status, 409, "{}", direct.body);
    assert_eq!(direct.executed_by, None);
    assert_eq!(through.executed_by.as_deref(), Some(id));
    assert_eq!(
        (through.status, &through.body),
        (direct.status, &direct.body)
    );
}

/// The messages of the model's events of `kind`.
async fn events(s: &Server, kind: &str) -> Vec<String> {
    let events = s.admin_get("/api/v1/models/cancer/events").await;
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

/// The pauses a person asked for through another instance (a timed pause
/// step is a `paused` event too).
async fn paused_by_a_person(s: &Server) -> Vec<String> {
    let mut paused = events(s, "paused").await;
    paused.retain(|m| m.starts_with("paused by control API on instance "));
    paused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_through_a_follower_is_executed_by_the_leader_with_its_answer() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let servers = three(&url, tmp.path(), "10s", "3s").await;
    let (l, id) = roles(&servers).await;
    let leader = &servers[l];
    let followers: Vec<&Server> = (0..3).filter(|i| *i != l).map(|i| &servers[i]).collect();
    let (f1, f2) = (followers[0], followers[1]);

    // apply: created by the leader; the same spec again is `unchanged`
    // through the leader and through a follower, in the same shape.
    let created = post(f1, "/api/v1/models/cancer/rollouts", Some(spec())).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.executed_by.as_deref(), Some(id.as_str()));
    assert_eq!(created.body["result"], "created");
    assert_eq!(created.body["rollout"], "r-1");
    let direct = post(leader, "/api/v1/models/cancer/rollouts", Some(spec())).await;
    let through = post(f2, "/api/v1/models/cancer/rollouts", Some(spec())).await;
    assert_eq!(
        (direct.status, through.status),
        (200, 200),
        "{}",
        through.body
    );
    assert_eq!(
        (&direct.body["result"], &through.body["result"]),
        (&json!("unchanged"), &json!("unchanged"))
    );
    assert_eq!(shape(&through.body), shape(&direct.body));
    assert_eq!(shape(&created.body), shape(&direct.body));
    let started = events(leader, "rollout_started").await;
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(
        started[0].contains("control API on instance"),
        "{started:?}"
    );

    // A spec for another model is refused where it enters, as everywhere.
    let wrong = post(f1, "/api/v1/models/iris/rollouts", Some(spec())).await;
    assert_eq!(
        (wrong.status, wrong.executed_by),
        (400, None),
        "{}",
        wrong.body
    );

    // pause: executed once; pausing again conflicts with the same text.
    let paused = command(f1, "pause", None).await;
    assert_eq!(
        (paused.status, &paused.body["phase"]),
        (200, &json!("paused")),
        "{}",
        paused.body
    );
    assert_eq!(paused.executed_by.as_deref(), Some(id.as_str()));
    assert_eq!(
        shape(&paused.body),
        shape(&leader.admin_get("/api/v1/models/cancer/status").await)
    );
    same_conflict(leader, f2, "pause", &id).await;
    assert_eq!(paused_by_a_person(leader).await.len(), 1);

    // resume, then resume again: 409 with the same text either way.
    let resumed = command(f2, "resume", None).await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_ne!(resumed.body["phase"], "paused");
    same_conflict(leader, f1, "resume", &id).await;

    // promote past the timed pause, then abort.
    let promoted = command(f1, "promote", Some(json!({}))).await;
    assert_eq!(
        (promoted.status, promoted.executed_by.as_deref()),
        (200, Some(id.as_str())),
        "{}",
        promoted.body
    );
    let aborted = command(f2, "abort", None).await;
    assert_eq!(aborted.status, 200, "{}", aborted.body);
    assert_eq!(
        aborted.body["last_rollout"]["phase"], "aborted",
        "{}",
        aborted.body
    );
    same_conflict(leader, f1, "abort", &id).await;

    // retry: a new rollout with the same spec.
    let retried = command(f1, "retry", None).await;
    assert_eq!(
        (retried.status, &retried.body["rollout"]),
        (200, &json!("r-2")),
        "{}",
        retried.body
    );
    assert_eq!(retried.executed_by.as_deref(), Some(id.as_str()));

    // The CLI against a follower.
    let out = f2.ferry_ok(&["pause", "cancer"]);
    assert!(out.contains("paused"), "{out}");
    assert_eq!(paused_by_a_person(leader).await.len(), 2);
    f1.ferry_ok(&["resume", "cancer"]);

    // promote --full to the end, then roll back through a follower.
    let full = command(f2, "promote", Some(json!({"full": true}))).await;
    assert_eq!(full.status, 200, "{}", full.body);
    status_until(leader, Duration::from_secs(30), "stable on 2", |st| {
        st["phase"] == "idle" && st["stable"] == "2"
    })
    .await;
    let back = command(f1, "rollback", None).await;
    assert_eq!(
        (back.status, back.executed_by.as_deref()),
        (200, Some(id.as_str())),
        "{}",
        back.body
    );
    status_until(f2, Duration::from_secs(30), "stable on 1", |st| {
        st["phase"] == "idle" && st["stable"] == "1"
    })
    .await;
    // A version that is not registered: the same 404 either way.
    let direct = command(leader, "rollback", Some(json!({"to": "9"}))).await;
    let through = command(f2, "rollback", Some(json!({"to": "9"}))).await;
    assert_eq!(direct.status, 404, "{}", direct.body);
    assert_eq!(
        (through.status, &through.body),
        (direct.status, &direct.body)
    );
    assert_eq!(events(f1, "rollback_started").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_leader_stopped_a_command_gets_503_within_the_bound_and_is_never_executed() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let mut servers = three(&url, tmp.path(), "3s", "300s").await;
    let (l, id) = roles(&servers).await;
    let created = post(
        &servers[(l + 1) % 3],
        "/api/v1/models/cancer/rollouts",
        Some(spec()),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);

    // Stopped, the leader keeps its role (its session holds the lock) and
    // takes nothing. A follower asked to abort dies (kill -9) before it can
    // withdraw its command: the command is past its time to be taken when
    // the leader runs again, and never executed.
    servers[l].signal("-STOP");
    let doomed = &mut servers[(l + 2) % 3];
    let abort = doomed
        .http
        .post(doomed.at("/api/v1/models/cancer/abort"))
        .bearer_auth(doomed.token())
        .send();
    let abort = tokio::spawn(abort);
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.kill9();
    assert!(
        abort.await.unwrap().is_err(),
        "no answer from a killed instance"
    );

    // The other follower withdraws its command at the bound.
    let follower = &servers[(l + 1) % 3];
    let asked = Instant::now();
    let r = follower
        .http
        .post(follower.at("/api/v1/models/cancer/pause"))
        .bearer_auth(follower.token())
        .send()
        .await
        .unwrap();
    let took = asked.elapsed();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
    servers[l].signal("-CONT");
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("no instance leading the rollouts took the command (pause of model \"cancer\") within 3s")
            && message.contains("nothing was done"),
        "{message}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // Running again, the leader never executes the withdrawn command; a new
    // one goes through (the test can tell a pause from none).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = follower.admin_get("/api/v1/models/cancer/status").await;
    assert_eq!(status["phase"], "progressing", "{status}");
    assert!(events(follower, "aborted").await.is_empty());
    assert!(paused_by_a_person(follower).await.is_empty());
    let paused = command(follower, "pause", None).await;
    assert_eq!(
        (paused.status, paused.executed_by.as_deref()),
        (200, Some(id.as_str())),
        "{}",
        paused.body
    );
    assert_eq!(paused_by_a_person(follower).await.len(), 1);
}
