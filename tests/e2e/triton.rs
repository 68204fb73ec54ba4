//! The official Triton Python clients (`tritonclient[http,grpc]`), unchanged
//! and with their defaults (binary tensors over HTTP, raw contents over
//! gRPC), against Ferry. The test provisions its own Python environment (a
//! venv under the target dir) from the package index.

use std::process::Command;

use serde_json::Value;

use super::harness::{Server, example, python_with, repo};

const REQUIREMENTS: &[&str] = &["tritonclient[http,grpc]==2.73.0", "numpy==2.4.6"];

#[tokio::test]
async fn official_triton_http_client_works_unchanged() {
    let s = Server::start().await;
    let host = s.url.trim_start_matches("http://").to_string();
    run_script(&s, "triton_client.py", host, "tritonclient OK").await;
}

/// `tritonclient.grpc`: health, metadata, typed and raw contents, batches,
/// each kind of bad input, the repository with and without the token.
#[tokio::test]
async fn official_triton_grpc_client_works_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("data"), &["--grpc-listen", "127.0.0.1:0"]).await;
    let host = s.grpc.clone().expect("a gRPC address");
    let host = host.trim_start_matches("http://").to_string();
    run_script(&s, "triton_grpc_client.py", host, "tritonclient.grpc OK").await;
}

/// Runs `tests/python/SCRIPT HOST HOLDOUT ACCURACY TOKEN` against `cancer`
/// version 1 on `s`, and checks it ends with `done`.
async fn run_script(s: &Server, script: &'static str, host: String, done: &str) {
    let python = tokio::task::spawn_blocking(|| python_with("tritonclient", REQUIREMENTS))
        .await
        .unwrap();
    s.add("cancer", "1", "cancer-v1.onnx");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(example("models.json")).unwrap()).unwrap();
    let accuracy = expected["cancer-v1"]["holdout_accuracy"].to_string();
    let token = s.token();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python.join("python"))
            .arg(repo().join("tests/python").join(script))
            .arg(host)
            .arg(example("cancer-holdout.jsonl"))
            .arg(accuracy)
            .arg(token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(done));
}
