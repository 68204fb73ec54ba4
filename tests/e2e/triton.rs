//! The official Triton Python clients (`tritonclient[http,grpc]`), unchanged
//! and with their defaults (binary tensors over HTTP, raw contents over
//! gRPC), against Ferry. The test provisions its own Python environment (a
//! venv under the target dir) from the package index.

use std::process::Command;

use serde_json::Value;

use super::harness::{Server, example, python_with, repo, test_data};

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

/// gRPC takes the HTTP server's TLS settings: `tritonclient.grpc` with
/// `ssl=True` and the test CA is served; a plaintext gRPC client is not.
#[tokio::test]
async fn tritonclient_grpc_over_tls_with_the_servers_certificate() {
    let python = tokio::task::spawn_blocking(|| python_with("tritonclient", REQUIREMENTS))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (test_data("tls/server.pem"), test_data("tls/server.key"));
    let s = Server::start_in(
        &tmp.path().join("data"),
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let grpc = s.grpc.clone().expect("a gRPC address");
    assert!(grpc.starts_with("https://127.0.0.1:"), "{grpc}");
    s.add("cancer", "1", "cancer-v1.onnx");
    let host = grpc.trim_start_matches("https://").to_string();
    let script = r#"
import sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
host, ca = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url=host, ssl=True, root_certificates=ca)
x = grpcclient.InferInput("input", [1, 30], "FP32")
x.set_data_from_numpy(np.zeros((1, 30), dtype=np.float32))
assert client.infer("cancer", [x]).get_response().model_version == "1"
plain = grpcclient.InferenceServerClient(url=host)
try:
    plain.is_server_live(client_timeout=5)
    raise AssertionError("plaintext gRPC must not be served on the TLS port")
except InferenceServerException as e:
    print("plaintext refused:", e.status())
print("TLS OK")
"#;
    let ca = test_data("tls/ca.pem");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python.join("python"))
            .args(["-c", script, &host])
            .arg(ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("TLS OK"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
