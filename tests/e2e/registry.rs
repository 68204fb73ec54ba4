//! Registering, listing, configuring and removing versions through the CLI
//! and the control API.

use serde_json::{Value, json};

use super::harness::{Server, example, test_data};

#[tokio::test]
async fn first_version_becomes_stable_and_serves_later_ones_wait() {
    let s = Server::start().await;
    let v1 = s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "1",
        "--file",
        example("cancer-v1.onnx").to_str().unwrap(),
        "--label",
        "git=abc123",
        "--label",
        "run=7",
    ]);
    assert_eq!(v1["result"], "created");
    assert_eq!(v1["role"], "stable");
    assert_eq!(v1["serving"], true);
    assert_eq!(v1["labels"], json!({"git": "abc123", "run": "7"}));
    assert_eq!(v1["source"]["kind"], "onnx");
    assert_eq!(v1["source"]["digest"].as_str().unwrap().len(), 64);
    let v2 = s.add("cancer", "2", "cancer-v2.onnx");
    assert_eq!(v2["result"], "created");
    assert_eq!(v2["role"], Value::Null);
    assert_eq!(v2["serving"], false);

    // The stable version answers; version 2 is stored but not loaded.
    let (status, headers, body) = s
        .infer("/v2/models/cancer/infer", &super::harness::batch(1))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ferry-version"], "1");
    assert_eq!(body["model_version"], "1");
    let (status, _, body) = s
        .infer(
            "/v2/models/cancer/versions/2/infer",
            &super::harness::batch(1),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("version \"2\" of model \"cancer\" is not loaded")
    );

    // list and show, in JSON and for people.
    let list = s.ferry_json(&["model", "list"]);
    assert_eq!(list[0]["name"], "cancer");
    assert_eq!(list[0]["stable"], "1");
    assert_eq!(list[0]["versions"], json!(["1", "2"]));
    let human = s.ferry_ok(&["model", "list"]);
    assert!(
        human.starts_with("MODEL   STABLE  VERSIONS  SERVING\ncancer  1       1, 2      yes"),
        "{human}"
    );
    let show = s.ferry_json(&["model", "show", "cancer"]);
    let versions = show["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(
        versions[0]["signature"]["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 30]}])
    );
    assert_eq!(
        versions[0]["settings"],
        json!({"replicas": 1, "threads": 1, "queue": 128, "timeout": "2s"})
    );
    assert!(
        versions[0]["created_at"]
            .as_str()
            .unwrap()
            .starts_with("20")
    );
    assert!(versions[0]["source"]["size"].as_u64().unwrap() > 500);
    let human = s.ferry_ok(&["model", "show", "cancer"]);
    for needle in [
        "stable",
        "git=abc123",
        "probabilities",
        "FP32",
        "replicas 1, threads 1, queue 128, timeout 2s",
    ] {
        assert!(human.contains(needle), "{needle} missing from:\n{human}");
    }

    // Events: registration and the stable choice, with readable reasons.
    let events = s.admin_get("/api/v1/models/cancer/events").await;
    let kinds = s.event_kinds("cancer").await;
    assert_eq!(
        kinds,
        ["version_registered", "stable_set", "version_registered"]
    );
    assert!(
        events[1]["message"]
            .as_str()
            .unwrap()
            .contains("first version")
    );
}

#[tokio::test]
async fn re_adding_is_idempotent_and_different_content_conflicts() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let again = s.add("cancer", "1", "cancer-v1.onnx");
    assert_eq!(again["result"], "unchanged");
    let out = s.ferry(&[
        "model",
        "add",
        "cancer",
        "1",
        "--file",
        example("cancer-v2.onnx").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already registered with different content") && err.contains("HTTP 409"),
        "{err}"
    );
}

#[tokio::test]
async fn settings_change_and_serving_versions_restart_with_them() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let v = s.ferry_json(&[
        "model",
        "set",
        "cancer",
        "1",
        "--replicas",
        "2",
        "--queue",
        "16",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(
        v["settings"],
        json!({"replicas": 2, "threads": 1, "queue": 16, "timeout": "500ms"})
    );
    assert_eq!(v["serving"], true);
    let (status, _, _) = s
        .infer("/v2/models/cancer/infer", &super::harness::batch(3))
        .await;
    assert_eq!(status, 200);
    let out = s.ferry(&["model", "set", "cancer", "1", "--replicas", "0"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replicas must be between 1 and 64, not 0")
    );
    let out = s.ferry(&["model", "set", "cancer", "1", "--timeout", "5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("with a unit"));
}

#[tokio::test]
async fn remove_refuses_a_serving_version_and_removes_others() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let out = s.ferry(&["model", "remove", "cancer", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stable version of model \"cancer\""));
    assert_eq!(
        s.ferry_ok(&["model", "remove", "cancer", "2"]).trim(),
        "removed cancer 2"
    );
    let show = s.ferry_json(&["model", "show", "cancer"]);
    assert_eq!(show["versions"].as_array().unwrap().len(), 1);
    let out = s.ferry(&["model", "remove", "cancer", "9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("registered versions: 1"));
}

fn blob_count(s: &Server) -> usize {
    std::fs::read_dir(s.dir.join("blobs/sha256"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn invalid_uploads_are_refused_and_leave_nothing_behind() {
    let s = Server::start().await;
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"this is not an onnx model").unwrap();
    let out = s.ferry(&[
        "model",
        "add",
        "cancer",
        "1",
        "--file",
        garbage.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loadable ONNX model") && err.contains("HTTP 422"),
        "{err}"
    );

    let zipmap = test_data("cancer-zipmap.onnx");
    let out = s.ferry(&[
        "model",
        "add",
        "cancer",
        "1",
        "--file",
        zipmap.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ZipMap") && err.contains("zipmap"), "{err}");

    assert_eq!(blob_count(&s), 0, "no artifact stored");
    assert_eq!(s.ferry_json(&["model", "list"]), json!([]));
    let index = s.index().await;
    assert_eq!(index, json!([]));
}

#[tokio::test]
async fn unsafe_names_and_bad_labels_are_refused() {
    let s = Server::start().await;
    let file = example("cancer-v1.onnx");
    for (model, version) in [
        ("..", "1"),
        ("a b", "1"),
        ("cancer", ".hidden"),
        ("cancer", &"x".repeat(200)),
    ] {
        let out = s.ferry(&[
            "model",
            "add",
            model,
            version,
            "--file",
            file.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{model} {version}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not allowed"),
            "{model} {version}"
        );
    }
    let out = s.ferry(&[
        "model",
        "add",
        "cancer",
        "1",
        "--file",
        file.to_str().unwrap(),
        "--label",
        "no-equals",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be key=value"));
    // The raw API refuses a path-traversal name too.
    let r = s
        .http
        .put(s.at("/api/v1/models/..%2Fetc/versions/1"))
        .bearer_auth(s.token())
        .json(&json!({"urls": ["http://127.0.0.1:1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(blob_count(&s), 0);
}

#[tokio::test]
async fn control_api_needs_the_admin_token() {
    let s = Server::start().await;
    let r = s.http.get(s.at("/api/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("admin token"));
    let r = s
        .http
        .get(s.at("/api/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .get(s.at("/api/v1/models"))
        .bearer_auth(s.token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The CLI without a token says where to find one.
    let out = std::process::Command::new(super::harness::FERRY)
        .current_dir(std::env::temp_dir())
        .args(["--server", &s.url, "model", "list"])
        .env_remove("FERRY_TOKEN")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token found"));

    // The data dir and the token file are private to their owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.dir), 0o700, "the data dir is private");
    assert_eq!(
        mode(&s.dir.join("admin-token")),
        0o600,
        "the token file is private"
    );
}

#[tokio::test]
async fn openapi_document_lists_the_api() {
    let s = Server::start().await;
    let doc: Value = s
        .http
        .get(s.at("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/models",
        "/api/v1/models/{model}/versions/{version}",
        "/v2/models/{model}/infer",
        "/v2/repository/index",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
}

#[tokio::test]
async fn an_inference_token_guards_the_data_plane_but_not_health_and_no_token_is_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("inference-token");
    let log = tmp.path().join("server.log");
    let s = Server::start_logging_to(
        &log,
        &tmp.path().join("data"),
        &["--inference-token-file", token_file.to_str().unwrap()],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let url = s.at("/v2/models/cancer/infer");
    let r = s
        .http
        .post(&url)
        .json(&super::harness::batch(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.json::<Value>().await.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("inference token")
    );
    let r = s
        .http
        .post(&url)
        .bearer_auth("wrong")
        .json(&super::harness::batch(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for t in [token.as_str(), s.token().as_str()] {
        let r = s
            .http
            .post(&url)
            .bearer_auth(t)
            .json(&super::harness::batch(1))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "the inference token and the admin token both work"
        );
    }
    assert_eq!(
        s.http
            .get(s.at("/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.http
            .get(s.at("/v2/models/cancer"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Neither token ever reaches the log, even at trace level.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("the data plane needs the inference token"),
        "the log was captured: {logged}"
    );
    for (name, secret) in [("inference", token.as_str()), ("admin", s.token().as_str())] {
        assert!(!logged.contains(secret), "the {name} token is in the log");
    }
}

/// A model upload goes to disk as it arrives: the server's peak memory grows
/// by kilobytes of buffer, not by the artifact's size. (256 MB of bytes that
/// are not ONNX: refused after they were streamed and hashed, nothing kept.)
#[tokio::test]
async fn a_large_upload_is_streamed_to_disk_not_held_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("d"), &["--max-upload-bytes", "1073741824"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let before = s.peak_rss();
    const SIZE: usize = 256 << 20;
    let form = reqwest::multipart::Form::new().text("spec", "{}").part(
        "artifact",
        reqwest::multipart::Part::bytes(vec![7u8; SIZE]).file_name("big.onnx"),
    );
    let r = s
        .http
        .put(s.at("/api/v1/models/big/versions/1"))
        .bearer_auth(s.token())
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 422, "{body}");
    let grew = s.peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS {} MiB before, grew by {} MiB for a {} MiB upload",
        before >> 20,
        grew >> 20,
        SIZE >> 20
    );
    assert!(
        grew < 64 << 20,
        "a {} MiB upload raised the server's peak memory by {} MiB",
        SIZE >> 20,
        grew >> 20
    );
    // Nothing is left behind in the blob dir.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("d/blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}
