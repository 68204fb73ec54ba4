//! Durability: graceful shutdown finishes in-flight requests; a restart, also
//! after `kill -9`, brings every registered version back serving as before;
//! a corrupted artifact is detected and refused.

use std::time::Duration;

use serde_json::Value;

use super::harness::{Server, batch};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let mut s = Server::start().await;
    s.add("slow", "1", "cancer-slow.onnx");
    s.ferry_json(&["model", "set", "slow", "1", "--timeout", "30s"]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let http = reqwest::Client::new();
        let url = s.at("/v2/models/slow/infer");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&batch(1))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    // The twenty requests take ≥ 20 × 20 ms on one replica. Wait long enough
    // for all of them to be accepted even on a loaded machine (a connection
    // not yet accepted when the listener closes is not in flight), but stop
    // while most are still queued or running.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let status = tokio::task::spawn_blocking(move || {
        let st = s.terminate();
        drop(s);
        st
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "ferry exits cleanly on SIGTERM: {status:?}"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap().expect("answered, not cut off"), 200);
    }
}

#[tokio::test]
async fn restart_after_kill_9_keeps_every_version_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("other", "a", "cancer-bad.onnx");
    s.ferry_json(&["model", "set", "cancer", "1", "--replicas", "2"]);
    s.load("cancer", "2").await;
    let before = s.ferry_json(&["model", "show", "cancer"]);
    let (_, _, answer_before) = s.infer("/v2/models/cancer/infer", &batch(10)).await;
    let token = s.token();
    s.kill9();

    let s = Server::start_in(&dir, &[]).await;
    assert_eq!(s.token(), token, "the admin token survives");
    let after = s.ferry_json(&["model", "show", "cancer"]);
    assert_eq!(before, after, "registry identical after kill -9");
    assert_eq!(after["versions"][0]["settings"]["replicas"], 2);
    let (status, headers, answer_after) = s.infer("/v2/models/cancer/infer", &batch(10)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ferry-version"], "1");
    assert_eq!(answer_before["outputs"], answer_after["outputs"]);
    let (status, _, _) = s
        .infer("/v2/models/cancer/versions/2/infer", &batch(1))
        .await;
    assert_eq!(status, 200, "the loaded version is loaded again");
    let (status, _, _) = s.infer("/v2/models/other/infer", &batch(1)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_routing_policy_survives_kill_9_and_sticky_users_keep_their_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("cancer", "3", "cancer-bad.onnx");
    let policy = serde_json::json!({
        "stable": "1",
        "candidate": {"version": "2", "weight": 40, "sticky_header": "x-user-id"},
        "staging": "3"
    });
    assert_eq!(s.set_route("cancer", policy).await.0, 200);
    let route_before = s.admin_get("/api/v1/models/cancer/route").await;
    let versions = |s: &Server| {
        let (http, url) = (s.http.clone(), s.at("/v2/models/cancer/infer"));
        async move {
            let mut out = Vec::new();
            for u in 0..200 {
                let r = http
                    .post(&url)
                    .header("x-user-id", format!("u{u}"))
                    .json(&batch(1))
                    .send()
                    .await
                    .unwrap();
                out.push(r.headers()["x-ferry-version"].to_str().unwrap().to_string());
            }
            out
        }
    };
    let before = versions(&s).await;
    s.kill9();
    let s = Server::start_in(&dir, &[]).await;
    assert_eq!(
        s.admin_get("/api/v1/models/cancer/route").await,
        route_before
    );
    assert_eq!(
        versions(&s).await,
        before,
        "every user kept their version across the restart"
    );
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .header("x-ferry-env", "staging")
        .json(&batch(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ferry-version"], "3");
}

#[tokio::test]
async fn a_corrupted_artifact_is_refused_with_a_clear_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    let v = s.add("cancer", "1", "cancer-v1.onnx");
    s.add("fine", "1", "cancer-v2.onnx");
    let digest = v["source"]["digest"].as_str().unwrap().to_string();
    s.kill9();
    let blob = dir.join("blobs/sha256").join(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let s = Server::start_in(&dir, &[]).await;
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 404, "{body}");
    let ready = s
        .http
        .get(s.at("/v2/models/cancer/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let index = s.index().await;
    let entry = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "cancer")
        .unwrap();
    assert_eq!(entry["state"], "UNAVAILABLE");
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("could not start")
    );
    // Other models are unaffected.
    let (status, _, _) = s.infer("/v2/models/fine/infer", &batch(1)).await;
    assert_eq!(status, 200);
    // Loading it explicitly says what is wrong and how to fix it.
    let (status, body) = s
        .admin_post("/v2/repository/models/cancer/load", None)
        .await;
    assert_eq!(status, 503);
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("corrupted") && msg.contains("re-register"),
        "{msg}"
    );
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_start_up_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(super::harness::FERRY)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ort-library",
            "/nonexistent/libonnxruntime.so",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("--ort-library"),
        "{err}"
    );
    let out = std::process::Command::new(super::harness::FERRY)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .env("ORT_DYLIB_PATH", "/nonexistent/lib.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("given in ORT_DYLIB_PATH"));
}

/// SIGKILL at random moments while versions are being registered and
/// rollouts (canary, rolling, blue-green, basic, multi in turn) move through
/// their steps. After every restart, [`check_consistent`] holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_leaves_a_consistent_state() {
    use super::harness::example;
    // FERRY_CRASH_KILLS=200 for a long run; 10 in every `cargo test`.
    let kills: usize = super::harness::knob("FERRY_CRASH_KILLS", 10);
    let files = ["cancer-v2.onnx", "cancer-v1.onnx", "cancer-bad.onnx"];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let mut rng = fastrand::Rng::with_seed(20261126);
    let mut registered: Vec<String> = vec!["1".into()];
    for round in 0..kills {
        let version = format!("v{}", round + 2);
        let file = example(files[round % files.len()]);
        let cli = |args: &[&str]| {
            s.cli(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut add = cli(&add_args(&version, &file));
        let last = registered.last().unwrap().clone();
        let strategy = STRATEGIES[round % STRATEGIES.len()];
        let mut deploy = cli(&deploy_args(&last, strategy, "1s"));
        let wait = Duration::from_millis(rng.u64(0..1500));
        tokio::time::sleep(wait).await;
        s.kill9();
        let added = add.wait().unwrap().success();
        let _ = deploy.wait();

        s = Server::start_in(&dir, &[]).await;
        let (present, phase) = check_consistent(
            &s,
            &format!("round {round}"),
            &version,
            added,
            Duration::from_secs(20),
        )
        .await;
        registered = present;
        eprintln!(
            "round {round}: killed after {wait:?} (a {strategy} rollout running), registered {}, rollout {}",
            registered.len(),
            phase
        );
    }
}

/// The strategies the crash tests drive from the CLI. Shadow is left out:
/// it needs traffic to compare, and these tests send none (its kill -9
/// resumption is tested in `strategies.rs`).
pub(super) const STRATEGIES: [&str; 5] = ["canary", "rolling", "blue-green", "basic", "multi"];

/// `ferry model add cancer VERSION --file FILE`.
pub(super) fn add_args<'a>(version: &'a str, file: &'a std::path::Path) -> [&'a str; 6] {
    let file = file.to_str().expect("a UTF-8 path");
    ["model", "add", "cancer", version, "--file", file]
}

/// `ferry deploy cancer VERSION` with `strategy`, its pauses `pause` long.
pub(super) fn deploy_args<'a>(version: &'a str, strategy: &'a str, pause: &'a str) -> Vec<&'a str> {
    let mut args = vec!["deploy", "cancer", version, "--strategy", strategy];
    args.extend(match strategy {
        "canary" => vec!["--steps", "50,100", "--step-pause", pause],
        "rolling" => vec![
            "--replicas",
            "2",
            "--batch-size",
            "1",
            "--batch-pause",
            pause,
        ],
        "blue-green" => vec!["--auto-promote-after", pause, "--scale-down-delay", "1s"],
        "multi" => vec!["--keep", "1", "--timeout", "1s"],
        _ => vec![],
    });
    args
}

/// What must hold after any crash and restart: a registration the client saw
/// succeed (`added`) is there; every registered version loads (its blob is
/// whole and matches its digest) and has exactly one `version_registered`
/// event; an interrupted rollout resumes and succeeds; the stable version
/// answers; no temporary artifact file is left. Returns the versions present and the phase found at restart.
/// An interrupted rollout has `within` to succeed.
pub(super) async fn check_consistent(
    s: &Server,
    when: &str,
    version: &str,
    added: bool,
    within: Duration,
) -> (Vec<String>, Value) {
    let show = s.ferry_json(&["model", "show", "cancer"]);
    let present: Vec<String> = show["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    if added {
        assert!(
            present.iter().any(|v| v == version),
            "{when}: {version} was acknowledged but is gone: {present:?}"
        );
    }
    let events = s
        .admin_get("/api/v1/models/cancer/events?limit=10000")
        .await;
    for v in &present {
        s.load("cancer", v).await;
        let registrations = events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "version_registered" && e["data"]["version"] == v.as_str())
            .count();
        assert_eq!(
            registrations, 1,
            "{when}: version {v} has {registrations} registration events"
        );
    }
    let st = super::harness::status(s).await;
    if st["phase"] != "idle" {
        let last = super::harness::ended(s, within).await;
        assert_eq!(
            last["phase"], "succeeded",
            "{when}: the interrupted rollout resumes: {last}"
        );
    }
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200, "{when}: the stable version answers");
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{when}: temporary files left: {leftovers:?}"
    );
    (present, st["phase"].clone())
}

/// The process dies (abort, as `kill -9` would) at each write point in turn,
/// the 1st, 2nd, 3rd... time it is reached, while a version is registered and
/// a canary of it runs through its steps: inside a SQLite transaction before
/// and after COMMIT, and with an artifact written but not renamed, and renamed
/// but its directory not synced (see `src/crashpoint.rs`). After each crash
/// the restarted server passes [`check_consistent`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_write_point_leaves_a_consistent_state() {
    use super::harness::example;
    let points = [
        "store.before_commit",
        "store.after_commit",
        "blobs.before_rename",
        "blobs.before_dir_sync",
    ];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.kill9();
    // Each round registers new bytes (else the blob exists and is not
    // written again): cancer-v1 with its ModelProto.doc_string (field 6)
    // set anew, appended — in protobuf the last value of a field wins.
    let unique_model = |round: usize| {
        let mut bytes = std::fs::read(example("cancer-v1.onnx")).unwrap();
        let doc = format!("crash test round {round}");
        bytes.extend_from_slice(&[0x32, doc.len() as u8]);
        bytes.extend_from_slice(doc.as_bytes());
        let path = tmp.path().join(format!("round-{round}.onnx"));
        std::fs::write(&path, bytes).unwrap();
        path
    };
    // FERRY_CRASH_STRATEGIES=all crashes every strategy at every point (about
    // 5 minutes); every `cargo test` does the canary (about 30 s).
    let strategies: &[&str] = match std::env::var("FERRY_CRASH_STRATEGIES").as_deref() {
        Ok("all") => &STRATEGIES,
        _ => &["canary"],
    };
    let (mut round, mut crashes) = (0, Vec::new());
    for (strategy, point) in strategies
        .iter()
        .flat_map(|st| points.iter().map(move |p| (*st, *p)))
    {
        for n in 1.. {
            round += 1;
            let version = format!("c{round}");
            let crash_at = format!("{point}:{n}");
            let mut s = Server::spawn(
                &[],
                &[("FERRY_CRASH_AT", &crash_at)],
                &dir,
                &[],
                std::process::Stdio::inherit(),
            );
            let file = unique_model(round);
            let added = s
                .cli(&add_args(&version, &file))
                .output()
                .unwrap()
                .status
                .success();
            let _ = s.cli(&deploy_args(&version, strategy, "200ms")).output();
            let _ = s
                .cli(&["status", "cancer", "--watch", "--timeout", "10s"])
                .output();
            let crashed = s.has_died().await;
            s.kill9();
            let s = Server::start_in(&dir, &[]).await;
            let when = format!("{strategy}, crash at {crash_at}");
            check_consistent(&s, &when, &version, added, Duration::from_secs(20)).await;
            if !crashed {
                break; // this point is reached fewer than n times per round
            }
            crashes.push(format!("{strategy}/{crash_at}"));
        }
    }
    eprintln!(
        "{} crash points tried: {}",
        crashes.len(),
        crashes.join(", ")
    );
    for point in points {
        assert!(
            crashes.iter().any(|c| c.contains(point)),
            "{point} was never reached"
        );
    }
}
