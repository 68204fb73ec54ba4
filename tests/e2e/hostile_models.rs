//! A malicious model (issue 19): one that reads files outside the data dir
//! through external data, one whose declared input would take 40 GB of
//! warm-up zeros, and one whose warm-up never ends. Each is refused with its
//! reason, and the server keeps serving the other models and stops on time.
//! The models are `tests/data/hostile/*.onnx` (made by `make.py` there).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{Server, eventually, test_data};

fn hostile(name: &str) -> String {
    test_data(&format!("hostile/{name}"))
        .to_str()
        .unwrap()
        .to_string()
}

fn blob_count(s: &Server) -> usize {
    std::fs::read_dir(s.dir.join("blobs/sha256")).map_or(0, |d| d.count())
}

/// `ferry model add MODEL 1 --file FILE`; returns (success, stderr).
fn add(s: &Server, model: &str, file: &str) -> (bool, String) {
    let out = s.ferry(&["model", "add", model, "1", "--file", file]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The cancer example still registers and answers.
async fn serves_another_model(s: &Server) {
    s.add("cancer", "1", "cancer-v1.onnx");
    let row: Vec<f32> = vec![0.5; 30];
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .json(&json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": row}]}))
        .send()
        .await
        .expect("request sent");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn a_model_with_external_data_is_refused_and_never_reads_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir_all(cwd.join("nested")).unwrap();
    let secret: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(cwd.join("secret.bin"), &secret).unwrap();
    std::fs::write(cwd.join("nested/secret.bin"), &secret).unwrap();
    // The server runs with the secrets in its working directory.
    let s = Server::start_under(
        &["env", "-C", cwd.to_str().unwrap()],
        &tmp.path().join("data"),
        &[],
    )
    .await;

    for (file, initializer, location) in [
        ("external-data.onnx", "w", "secret.bin"),
        ("external-data-subdir.onnx", "w", "nested/secret.bin"),
    ] {
        let (ok, err) = add(&s, "leak", &hostile(file));
        assert!(!ok, "{file} was registered");
        assert!(
            err.contains(&format!(
                "initializer \"{initializer}\" keeps its data in an external file (\"{location}\")"
            )) && err.contains("save_as_external_data=False")
                && err.contains("HTTP 422"),
            "{file}: {err}"
        );
    }
    assert_eq!(blob_count(&s), 0, "nothing stored");
    assert_eq!(s.ferry_json(&["model", "list"]), json!([]));

    // Changing the file changes nothing: there is nothing that serves it.
    std::fs::write(cwd.join("secret.bin"), [0u8; 16]).unwrap();
    let r = s
        .http
        .post(s.at("/v2/models/leak/infer"))
        .json(&json!({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [16], "data": vec![0u8; 16]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    serves_another_model(&s).await;
}

#[tokio::test]
async fn a_model_declaring_a_40_gb_input_is_refused_and_the_server_keeps_serving() {
    let s = Server::start().await;
    let (ok, err) = add(&s, "huge", &hostile("huge-input.onnx"));
    assert!(!ok, "the huge model was registered");
    assert!(
        err.contains("input \"x\"")
            && err.contains("[100000, 100000]")
            && err.contains("40000000000 bytes")
            && err.contains("67108864")
            && err.contains("--max-body-bytes")
            && err.contains("HTTP 422"),
        "{err}"
    );
    assert_eq!(blob_count(&s), 0, "nothing stored");
    serves_another_model(&s).await;
}

#[tokio::test]
async fn a_warm_up_that_outlives_the_load_timeout_is_cancelled_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("data"), &["--load-timeout", "2s"]).await;
    let started = Instant::now();
    let (ok, err) = add(&s, "spin", &hostile("long-loop.onnx"));
    let took = started.elapsed();
    assert!(!ok, "the endless model was registered");
    assert!(
        err.contains("did not finish within the load timeout of 2s")
            && err.contains("--load-timeout"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "refused after {took:?}");
    assert_eq!(blob_count(&s), 0, "nothing stored");
    // The run was cancelled, not left spinning: the server goes idle.
    let pid = s.pid();
    let before = cpu_seconds(pid);
    let window = Instant::now();
    serves_another_model(&s).await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(window.elapsed())).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 1.0,
        "the server used {used:.2} CPU seconds in 2 s after the refusal"
    );
}

/// Waits until the server has burnt `seconds` of CPU: a warm-up is spinning.
async fn until_busy(pid: u32, seconds: f64) {
    let before = cpu_seconds(pid);
    eventually(
        Duration::from_secs(30),
        "the warm-up is running",
        async || cpu_seconds(pid) - before >= seconds,
    )
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_server_within_the_drain_timeout_while_a_warm_up_spins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(&tmp.path().join("data"), &["--drain-timeout", "2s"]).await;
    // The default load timeout (60 s) is far longer than this test waits.
    let mut registering = s
        .cli(&[
            "model",
            "add",
            "spin",
            "1",
            "--file",
            &hostile("long-loop.onnx"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_busy(s.pid(), 0.5).await;
    let asked = Instant::now();
    let status = s.terminate();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(2 + 5),
        "stopped {took:?} after SIGTERM with a drain timeout of 2s"
    );
    assert!(status.success(), "{status}");
    let _ = registering.kill();
    let _ = registering.wait();
}

async fn infer_loop(s: &Server, n: i64) -> (u16, serde_json::Value) {
    let r = s
        .http
        .post(s.at("/v2/models/loop/infer"))
        .json(&json!({"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [n]}]}))
        .send()
        .await
        .expect("request sent");
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn a_request_whose_run_outlives_the_timeout_is_stopped_and_frees_its_replica() {
    let s = Server::start().await;
    let model = hostile("input-loop.onnx");
    s.ferry_ok(&[
        "model",
        "add",
        "loop",
        "1",
        "--file",
        &model,
        "--timeout",
        "300ms",
    ]);
    // Its warm-up (n = 0) was instant; this request would spin for hours.
    let (status, body) = infer_loop(&s, 1 << 50).await;
    assert_eq!(status, 504, "{body}");
    // The run was stopped: the one replica answers the next request in time,
    // and the server goes idle.
    let (status, body) = infer_loop(&s, 3).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([3.0]));
    let pid = s.pid();
    let before = cpu_seconds(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5 * window.elapsed().as_secs_f64(),
        "the server used {used:.2} CPU seconds in {:?} after the timeout",
        window.elapsed()
    );
}

/// A remote V2 server whose model declares a [100000, 100000] FP32 input;
/// counts the inference requests it gets (it should get none).
async fn hostile_remote() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicU64, Ordering};
    let inferences = std::sync::Arc::new(AtomicU64::new(0));
    let counted = inferences.clone();
    let app = axum::Router::new()
        .route(
            "/v2/models/huge",
            get(|| async {
                axum::Json(json!({
                    "name": "huge", "versions": ["1"], "platform": "hostile",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [100000, 100000]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [100000, 100000]}]
                }))
            }),
        )
        .route(
            "/v2/models/huge/ready",
            get(|| async { axum::Json(json!({"ready": true})) }),
        )
        .route(
            "/v2/models/huge/infer",
            post(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, inferences)
}

// Multi-threaded: the fake remote answers while the CLI blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_declaring_a_40_gb_input_is_refused_before_any_warm_up() {
    let s = Server::start().await;
    let (url, inferences) = hostile_remote().await;
    let out = s.ferry(&["model", "add", "huge", "1", "--url", &url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the hostile remote was registered");
    assert!(
        err.contains("input \"x\" is declared FP32 [100000, 100000]")
            && err.contains("40000000000 bytes")
            && err.contains("--max-body-bytes"),
        "{err}"
    );
    assert_eq!(
        inferences.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no warm-up was sent"
    );
    serves_another_model(&s).await;
}

/// Swaps a stored version's artifact for `file` behind the server's back,
/// as a data dir written before these checks existed would hold it: the
/// blob under its digest, the version's source and signature to match.
fn plant(dir: &std::path::Path, model: &str, file: &str, signature: serde_json::Value) {
    let bytes = std::fs::read(hostile(file)).unwrap();
    let digest = ferry::registry::blobs::digest(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(&digest), &bytes).unwrap();
    let db = rusqlite::Connection::open(dir.join("ferry.db")).unwrap();
    let source = json!({"kind": "onnx", "digest": digest, "size": bytes.len()});
    let changed = db
        .execute(
            "UPDATE versions SET source = ?1, signature = ?2 WHERE model = ?3",
            rusqlite::params![source.to_string(), signature.to_string(), model],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

#[tokio::test]
async fn stored_hostile_models_are_refused_at_start_up_and_the_others_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cwd) = (tmp.path().join("data"), tmp.path().join("cwd"));
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(cwd.join("secret.bin"), [7u8; 16]).unwrap();
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("leak", "1", "cancer-v1.onnx");
    s.add("huge", "1", "cancer-v1.onnx");
    s.add("fine", "1", "cancer-v2.onnx");
    s.kill9();
    let uint8 = |shape: serde_json::Value| {
        json!({"inputs": [{"name": "x", "datatype": "UINT8", "shape": shape}],
                                                 "outputs": [{"name": "y", "datatype": "UINT8", "shape": shape}]})
    };
    plant(&dir, "leak", "external-data.onnx", uint8(json!([16])));
    plant(
        &dir,
        "huge",
        "huge-input.onnx",
        uint8(json!([100000, 100000])),
    );

    let s = Server::start_under(&["env", "-C", cwd.to_str().unwrap()], &dir, &[]).await;
    let index = s.index().await;
    let state = |model: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == model)
            .unwrap_or_else(|| panic!("{model} in {index}"))["state"]
            .clone()
    };
    assert_eq!(state("leak"), "UNAVAILABLE");
    assert_eq!(state("huge"), "UNAVAILABLE");
    // Loading one explicitly says why.
    let reason = async |model: &str| {
        let (status, body) = s
            .admin_post(&format!("/v2/repository/models/{model}/load"), None)
            .await;
        assert_eq!(status, 503, "{body}");
        body["error"].as_str().unwrap().to_string()
    };
    let leak = reason("leak").await;
    assert!(
        leak.contains("initializer \"w\" keeps its data in an external file (\"secret.bin\")"),
        "{leak}"
    );
    let huge = reason("huge").await;
    assert!(
        huge.contains("[100000, 100000]") && huge.contains("--max-body-bytes"),
        "{huge}"
    );
    let r = s
        .http
        .post(s.at("/v2/models/leak/infer"))
        .json(&json!({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [16], "data": vec![0u8; 16]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the secret is not served");
    let (status, _, _) = s
        .infer("/v2/models/fine/infer", &super::harness::batch(1))
        .await;
    assert_eq!(status, 200);
}
