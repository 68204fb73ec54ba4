//! `ferry serve --store postgres://…` against a real PostgreSQL started by
//! the tests ([`super::testpg`]): a version registered through one instance
//! is served by another on a fresh data dir (its artifact fetched from
//! PostgreSQL and checked); instances starting at once migrate once; `ferry
//! store copy` moves a single node with its history; wrong or unreachable
//! stores are refused with a message that says what to check and never the
//! password.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::harness::{FERRY, Server, batch, ferry_binary};
use super::testpg;

/// The version that answered.
async fn served_by(s: &Server, model: &str) -> (String, Value) {
    let (status, headers, body) = s
        .infer(&format!("/v2/models/{model}/infer"), &batch(3))
        .await;
    assert_eq!(status, 200, "{body}");
    let version = headers["x-ferry-version"].to_str().unwrap().to_string();
    (version, body["outputs"].clone())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_registered_through_one_instance_is_served_by_another_on_a_fresh_data_dir() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start_in(&tmp.path().join("a"), &["--store", &url]).await;
    let added = a.add("cancer", "1", "cancer-v1.onnx");
    let digest = added["source"]["digest"]
        .as_str()
        .expect("the version's digest")
        .to_string();
    let (version, answer) = served_by(&a, "cancer").await;
    assert_eq!(version, "1");
    assert!(
        !tmp.path().join("b").exists(),
        "B has nothing of its own: no shared filesystem"
    );

    // B: another instance, its own empty data dir, the same database.
    let b_dir = tmp.path().join("b");
    let mut b = Server::start_in(&b_dir, &["--store", &url]).await;
    assert_eq!(
        served_by(&b, "cancer").await,
        (version.clone(), answer.clone())
    );
    let cached: Vec<_> = std::fs::read_dir(b_dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        cached.len(),
        1,
        "the artifact is cached in B's data dir: {cached:?}"
    );
    assert_eq!(cached[0], digest);
    let history = b.ferry_json(&["history", "cancer"]);
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["version_registered", "stable_set"]);

    // A corrupted cache is caught by the digest check and fetched again.
    b.terminate();
    let blob = b_dir.join("blobs/sha256").join(&cached[0]);
    std::fs::write(&blob, b"not the model").unwrap();
    let b = Server::start_in(&b_dir, &["--store", &url]).await;
    assert_eq!(served_by(&b, "cancer").await, (version, answer));
    assert_ne!(std::fs::read(&blob).unwrap(), b"not the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_started_at_the_same_moment_on_an_empty_database_both_come_up() {
    let url = testpg::database();
    let tmp = tempfile::tempdir().unwrap();
    let starts: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let (dir, url) = (tmp.path().join(name), url.clone());
            std::thread::spawn(move || {
                Server::spawn(
                    &[],
                    &[],
                    &dir,
                    &["--store", &url],
                    std::process::Stdio::inherit(),
                )
            })
        })
        .collect();
    let servers: Vec<Server> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    for s in &servers {
        s.wait_ready().await;
    }
    let database = url.rsplit('/').next().unwrap();
    // Each migration once: as many rows as migrations, none twice.
    assert_eq!(
        testpg::shared().psql(
            database,
            "SELECT count(*) = count(DISTINCT version) AND count(*) = max(version) FROM schema_version"
        ),
        "t",
        "each migration ran once"
    );
    servers[0].add("cancer", "1", "cancer-v1.onnx");
    let models = servers[1].ferry_json(&["model", "list"]);
    assert!(models.to_string().contains("cancer"), "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_single_node_with_its_history_into_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let mut s = Server::start_in(&node, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.ferry_ok(&["deploy", "cancer", "2", "--strategy", "basic"]);
    s.ferry_ok(&["model", "set", "cancer", "2", "--replicas", "2"]);
    let routes_before = served_by(&s, "cancer").await;
    let history_before = s.ferry_json(&["history", "cancer"]);
    let rollouts_before = s.admin_get("/api/v1/models/cancer/rollouts").await;
    s.terminate();

    let url = testpg::database();
    let copy = |extra: &[&str]| {
        Command::new(ferry_binary())
            .args(["store", "copy", "--from"])
            .arg(format!("sqlite:{}", node.display()))
            .args(["--to", &url])
            .args(extra)
            .output()
            .expect("ferry runs")
    };
    let out = copy(&["-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let counts = &report["copied"]["counts"];
    assert_eq!(
        (&counts["models"], &counts["versions"], &counts["rollouts"]),
        (&Value::from(1), &Value::from(2), &Value::from(1)),
        "{report}"
    );
    assert_eq!(
        counts["events"].as_u64().unwrap() as usize,
        history_before.as_array().unwrap().len()
    );
    assert_eq!(report["copied"]["artifacts"], 2);
    // Again: the target is not empty any more.
    let out = copy(&[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not empty") && text(&out).contains("--replace"),
        "{}",
        text(&out)
    );
    let out = copy(&["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("every digest checked"),
        "{}",
        text(&out)
    );

    // The same databases named differently (another host name for the
    // server; a symlink to the data dir) are one store: refused before
    // anything is deleted.
    let same = |from: String, to: String| {
        let out = Command::new(ferry_binary())
            .args(["store", "copy", "--from", &from, "--to", &to, "--replace"])
            .output()
            .expect("ferry runs");
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("same database"), "{}", text(&out));
    };
    same(url.clone(), url.replace("127.0.0.1", "localhost"));
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&node, &link).unwrap();
    same(
        format!("sqlite:{}", node.display()),
        format!("sqlite:{}", link.display()),
    );

    // A server on the copy (a fresh data dir) serves the same routes and
    // shows the same history.
    let p = Server::start_in(&tmp.path().join("cluster"), &["--store", &url]).await;
    assert_eq!(served_by(&p, "cancer").await, routes_before);
    assert_eq!(p.ferry_json(&["history", "cancer"]), history_before);
    assert_eq!(
        p.admin_get("/api/v1/models/cancer/rollouts").await,
        rollouts_before
    );
    let show = p.ferry_json(&["model", "show", "cancer"]);
    assert!(show.to_string().contains("\"replicas\":2"), "{show}");
}

/// Runs `ferry serve --store STORE` expecting it to refuse to start.
pub fn refused(store: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(FERRY)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .args(["--store", store])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not give up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    text(&out)
}

#[test]
fn a_wrong_or_unreachable_store_is_refused_with_what_to_check_and_no_password() {
    let said = refused("mysql://root:hunter2@db/ferry");
    assert!(
        said.contains("--store")
            && said.contains("unknown kind \"mysql\"")
            && !said.contains("hunter2"),
        "{said}"
    );
    let server = testpg::PgServer::start();
    let url = server
        .database()
        .replace("postgres://postgres@", "postgres://postgres:hunter2@");
    server.stop("fast");
    let said = refused(&url);
    let shown = format!("postgres://postgres:***@127.0.0.1:{}/", server.port);
    assert!(
        said.contains(&shown)
            && said.contains("is unreachable")
            && said.contains("check that PostgreSQL is running")
            && !said.contains("hunter2"),
        "{said}"
    );
    let said = refused(&format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/no_such_db",
        testpg::shared().port
    ));
    assert!(
        said.contains("does not exist")
            && said.contains("create the database")
            && !said.contains("hunter2"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_what_serves_still_answers_ready_metadata_and_inference() {
    let pg = testpg::PgServer::start();
    let url = pg.database();
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("data"), &["--store", &url]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    pg.stop("fast");
    let http = reqwest::Client::new();
    for path in [
        "/v2/models/cancer/ready",
        "/v2/models/cancer/versions/1/ready",
        "/v2/models/cancer",
        "/v2/models/cancer/versions/1",
    ] {
        let answer = http.get(s.at(path)).send().await.unwrap();
        let status = answer.status().as_u16();
        assert_eq!(status, 200, "{path}: {}", answer.text().await.unwrap());
    }
    assert_eq!(served_by(&s, "cancer").await.0, "1");
    pg.restart();
}
