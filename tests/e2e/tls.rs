//! HTTPS on both planes (`--tls-cert`/`--tls-key`): clients that trust the
//! server's CA are served, others get a reason; plain HTTP and stalled
//! handshakes on the HTTPS port are dealt with, and bad key files are refused
//! at start-up.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::harness::{FERRY, Server, batch, test_ca, test_data};

fn tls_args() -> Vec<String> {
    [
        "--tls-cert",
        test_data("tls/server.pem").to_str().unwrap(),
        "--tls-key",
        test_data("tls/server.key").to_str().unwrap(),
        "--header-read-timeout",
        "1s",
    ]
    .map(str::to_string)
    .to_vec()
}

#[tokio::test]
async fn https_serves_both_planes_to_clients_that_trust_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let args = tls_args();
    let s = Server::start_in(
        &tmp.path().join("data"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);

    // The control plane, through the CLI (which trusts the CA via --ca-cert).
    s.add("cancer", "1", "cancer-v1.onnx");
    let list = s.ferry_json(&["model", "list"]);
    assert_eq!(list[0]["name"], "cancer", "{list}");

    // The data plane, from a client that trusts the CA.
    let (status, headers, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ferry-version"], "1");

    // A client that does not trust the CA is told why it cannot connect.
    let out = std::process::Command::new(FERRY)
        .args(["--server", &s.url, "--token", &s.token(), "model", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("certificate") && err.contains("--ca-cert"),
        "no reason given: {err}"
    );

    let addr = s.url.trim_start_matches("https://").to_string();
    // Plain HTTP on the HTTPS port: a readable 400, not TLS noise.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .write_all(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");

    // A handshake that starts and stalls is cut off at --header-read-timeout.
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let started = Instant::now();
    let n = stalled.read(&mut [0u8; 64]).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "the stalled handshake was answered");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "closed after {waited:?}, expected about 1 s"
    );

    // And the server is still healthy (a new connection: the pooled one sat
    // idle past --header-read-timeout, so the server has closed it).
    let fresh = reqwest::Client::builder()
        .add_root_certificate(test_ca())
        .build()
        .unwrap();
    let r = fresh.get(s.at("/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn key_files_that_do_not_fit_are_refused_at_start_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = test_data("tls/server.pem");
    let ca = test_data("tls/ca.pem");
    let key = test_data("tls/server.key");
    let readme = super::harness::repo().join("README.md");
    let missing = tmp.path().join("missing.key");
    let cases: [(&std::path::Path, &std::path::Path, &str); 3] = [
        (&readme, &key, "holds no certificate"),
        (&ca, &key, "does not fit"),
        (&cert, &missing, "cannot read the private key"),
    ];
    for (cert, key, expected) in cases {
        let out = std::process::Command::new(FERRY)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {cert:?} {key:?}");
        assert!(err.contains(expected), "{expected:?} not in: {err}");
    }
    // One without the other is a usage error.
    let out = std::process::Command::new(FERRY)
        .args(["serve", "--tls-cert"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}
