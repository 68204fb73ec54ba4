//! The official Triton Python HTTP client (`tritonclient[http]`), unchanged and
//! with its defaults (binary tensors), against Ferry. The test provisions its
//! own Python environment (a venv under the target dir) from the package index.

use std::process::Command;

use serde_json::Value;

use super::harness::{Server, example, python_with, repo};

const REQUIREMENTS: &[&str] = &["tritonclient[http]==2.73.0", "numpy==2.4.6"];

#[tokio::test]
async fn official_triton_http_client_works_unchanged() {
    let python = tokio::task::spawn_blocking(|| python_with("tritonclient", REQUIREMENTS))
        .await
        .unwrap();
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(example("models.json")).unwrap()).unwrap();
    let accuracy = expected["cancer-v1"]["holdout_accuracy"].to_string();
    let host = s.url.trim_start_matches("http://").to_string();
    let token = s.token();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python.join("python"))
            .arg(repo().join("tests/python/triton_client.py"))
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
        "tritonclient script failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tritonclient OK"));
}
