//! Remote versions: a version served by another Open Inference Protocol server
//! (here, a second Ferry), with several endpoints as replicas.

use serde_json::json;

use super::harness::{Server, batch};

#[tokio::test]
async fn a_remote_version_serves_through_ferry() {
    let upstream = Server::start().await;
    upstream.add("cancer", "1", "cancer-v1.onnx");
    upstream.add("cancer", "2", "cancer-v2.onnx");
    upstream.load("cancer", "2").await;

    let s = Server::start().await;
    // Same model name on the remote, two endpoints (two replicas).
    let v = s.ferry_json(&[
        "model",
        "add",
        "cancer",
        "r1",
        "--url",
        &upstream.url,
        "--url",
        &upstream.url,
    ]);
    assert_eq!(v["source"]["kind"], "remote");
    assert_eq!(v["serving"], true);
    assert_eq!(v["signature"]["inputs"][0]["shape"], json!([-1, 30]));
    // A named remote model and version.
    let named = format!("{}/v2/models/cancer/versions/2", upstream.url);
    s.ferry_json(&["model", "add", "remote2", "x", "--url", &named]);

    let (status, headers, body) = s.infer("/v2/models/cancer/infer", &batch(5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ferry-version"], "r1");
    let (_, _, direct) = upstream
        .infer("/v2/models/cancer/versions/1/infer", &batch(5))
        .await;
    assert_eq!(body["outputs"], direct["outputs"]);
    let (_, _, via) = s.infer("/v2/models/remote2/infer", &batch(5)).await;
    let (_, _, direct2) = upstream
        .infer("/v2/models/cancer/versions/2/infer", &batch(5))
        .await;
    assert_eq!(via["outputs"], direct2["outputs"]);

    // Bad input is refused by Ferry before it goes out.
    let (status, _, body) = s
        .infer("/v2/models/cancer/infer", &json!({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}))
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn unreachable_or_wrong_remotes_are_refused_at_registration() {
    let s = Server::start().await;
    let out = s.ferry(&["model", "add", "cancer", "1", "--url", "http://127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("http://127.0.0.1:1/v2/models/cancer") && err.contains("connection failed"),
        "{err}"
    );

    let upstream = Server::start().await;
    upstream.add("cancer", "1", "cancer-v1.onnx");
    let missing = format!("{}/v2/models/absent", upstream.url);
    let out = s.ferry(&["model", "add", "cancer", "1", "--url", &missing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready"), "{err}");
    let out = s.ferry(&["model", "add", "cancer", "1", "--url", "ftp://x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("endpoints are http:// or https://"));
    assert_eq!(s.ferry_json(&["model", "list"]), json!([]));
}

#[tokio::test]
async fn remote_requests_pass_through_untouched_and_answer_as_ferrys() {
    let upstream = Server::start().await;
    upstream.add("cancer", "1", "cancer-v1.onnx");
    let s = Server::start().await;
    s.ferry_json(&["model", "add", "cancer", "far", "--url", &upstream.url]);
    // Binary in, binary out, through the pass-through path.
    let header = json!({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": 120}}],
                        "parameters": {"binary_data_output": true}});
    let r = s
        .post_binary("/v2/models/cancer/infer", &header, &[vec![0u8; 120]])
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ferry-version"], "far");
    let id = r.headers()["x-ferry-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(
        (head["model_name"].as_str(), head["model_version"].as_str()),
        (Some("cancer"), Some("far"))
    );
    assert_eq!(head["id"], id.as_str());
    assert_eq!(
        bytes.len() - json_len,
        8 + 8,
        "label (INT64) and two FP32 probabilities"
    );
    // A JSON request with the client's id; the label is remembered for feedback.
    let mut row = batch(1);
    row["id"] = json!("client-7");
    let (status, headers, answer) = s.infer("/v2/models/cancer/infer", &row).await;
    assert_eq!(
        (status, headers["x-ferry-request-id"].to_str().unwrap()),
        (200, "client-7")
    );
    assert_eq!(answer["model_version"], "far");
    let label = answer["outputs"][0]["data"][0].as_i64().unwrap();
    let fb: serde_json::Value = s
        .http
        .post(s.at("/v2/models/cancer/feedback"))
        .bearer_auth(s.token())
        .json(&json!({"id": "client-7", "label": label}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fb["correct"], true, "{fb}");
    assert_eq!(fb["version"], "far");
    let post = async |body: serde_json::Value| {
        let r = s
            .http
            .post(s.at("/v2/models/cancer/feedback"))
            .bearer_auth(s.token())
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    // The binary answer's class was not read (its tensors pass through
    // untouched): its label cannot be judged, and is refused, not counted
    // wrong.
    let (status, text) = post(json!({"id": id, "label": 1})).await;
    assert!(
        status == 409 && text.contains("without a class Ferry could read"),
        "{status} {text}"
    );
    // A label is a class: an integer.
    let (status, text) = post(json!({"id": "client-7", "label": 1.5})).await;
    assert!(
        status == 400 && text.contains("an integer"),
        "{status} {text}"
    );
}

/// An https:// remote behind mutual TLS that wants a bearer token: Ferry
/// trusts the given CA, presents its client certificate, and sends the
/// header read from its own environment — the value is never stored or shown.
/// (Multi-threaded: the fake upstream answers while the CLI blocks a thread.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_remote_with_mutual_tls_and_a_header_from_the_environment() {
    use super::harness::test_data;
    let upstream = super::upstream::Upstream::start_tls(Some(&test_data("tls/ca.pem"))).await;
    upstream.require_header("authorization", "Bearer s3cret-t0ken");
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::spawn(
        &[],
        &[("REMOTE_TOKEN", "Bearer s3cret-t0ken")],
        &tmp.path().join("d"),
        &[],
        std::process::Stdio::inherit(),
    );
    s.wait_ready().await;
    let (ca, cert, key) = (
        test_data("tls/ca.pem"),
        test_data("tls/client.pem"),
        test_data("tls/client.key"),
    );
    let add = |version: &str, extra: &[&str]| {
        let mut args = vec!["model", "add", "cancer", version, "--url", &upstream.url];
        args.extend_from_slice(extra);
        s.ferry(&args)
    };
    let full = [
        "--remote-ca-cert",
        ca.to_str().unwrap(),
        "--remote-client-cert",
        cert.to_str().unwrap(),
        "--remote-client-key",
        key.to_str().unwrap(),
        "--remote-header",
        "authorization=@env:REMOTE_TOKEN",
    ];
    let out = add("1", &full);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, headers, body) = s.infer("/v2/models/cancer/infer", &batch(3)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ferry-version"], "1");
    assert!(
        upstream.received() >= 2,
        "warm-up and the request went over TLS"
    );

    // The reference is shown, never the value.
    let show = String::from_utf8_lossy(&s.ferry(&["model", "show", "cancer", "-o", "json"]).stdout)
        .to_string();
    assert!(show.contains("authorization=@env:REMOTE_TOKEN"), "{show}");
    let history = s
        .admin_get("/api/v1/models/cancer/events")
        .await
        .to_string();
    for text in [&show, &history] {
        assert!(!text.contains("s3cret"), "the header value leaked: {text}");
    }
    let db = std::fs::read(tmp.path().join("d/ferry.db")).unwrap();
    assert!(
        !db.windows(6).any(|w| w == b"s3cret"),
        "the header value is in the database"
    );

    // Without the client certificate, the remote refuses the handshake;
    // without the CA, Ferry does not trust the remote; without the header,
    // the remote answers 401. Each is refused at registration, and says why.
    for (version, extra, wanted) in [
        ("2", &full[..2], "CertificateRequired"),
        ("3", &full[2..], "UnknownIssuer"),
        ("4", &full[..6], "401"),
    ] {
        let out = add(version, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{version}: {stderr}");
        assert!(stderr.contains(wanted), "{version}: {stderr}");
    }
    // A header whose variable the server does not have is named.
    let out = add(
        "5",
        &[
            &full[..6],
            &["--remote-header", "x-key=@env:NOT_SET_ANYWHERE"],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOT_SET_ANYWHERE"), "{stderr}");

    // After a restart the server reads the header again from its environment.
    let mut s = s;
    s.kill9();
    let s = Server::spawn(
        &[],
        &[("REMOTE_TOKEN", "Bearer s3cret-t0ken")],
        &tmp.path().join("d"),
        &[],
        std::process::Stdio::inherit(),
    );
    s.wait_ready().await;
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(3)).await;
    assert_eq!(status, 200, "{body}");
}

/// A passed-through answer counts once it is read: one Ferry cannot read is
/// the version's error (502 to the client, `outcome="error"` in the metrics,
/// an error in analysis), and a readable one's class is counted for
/// `prediction_shift`. (They were counted as answered before being read: a
/// canary of a remote sending broken answers passed `error_rate`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_remote_answer_is_the_versions_error_and_a_readable_ones_class_counts() {
    let upstream = super::upstream::Upstream::start().await;
    let s = Server::start().await;
    s.ferry_json(&["model", "add", "cancer", "far", "--url", &upstream.url]);
    let counted = async |outcome: &str| {
        super::harness::series_value(
            &s.prometheus().await,
            &format!(r#"ferry_requests_total{{model="cancer",version="far",outcome="{outcome}"}}"#),
        )
    };
    for _ in 0..3 {
        let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
        assert_eq!(status, 200, "{body}");
    }
    upstream
        .behaviour
        .garbled
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..2 {
        let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
        assert_eq!(status, 502, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the remote version sent an unreadable answer")
                && !error.contains("request body"),
            "{body}"
        );
    }
    // An answer with no outputs is no answer either.
    upstream
        .behaviour
        .garbled
        .store(false, std::sync::atomic::Ordering::Relaxed);
    upstream
        .behaviour
        .no_outputs
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .ends_with("the answer has no outputs"),
        "{body}"
    );
    assert_eq!((counted("ok").await, counted("error").await), (3.0, 3.0));
    // The three readable answers' class (the fake says 1) is counted.
    super::harness::eventually(
        std::time::Duration::from_secs(10),
        "the classes counted",
        async || {
            let m = s
                .admin_get("/api/v1/models/cancer/metrics?window=60s")
                .await;
            let far = super::harness::metrics_series(&m, "version", "far");
            far["errors"] == 3 && far["classes"]["1"] == 3
        },
    )
    .await;
}

/// A remote shadow answering without outputs (or without the compared
/// one) fails, counted as its error, as production's would: it was counted
/// as answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_shadow_answering_no_outputs_is_its_error() {
    let upstream = super::upstream::Upstream::start().await;
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.ferry_json(&["model", "add", "cancer", "far", "--url", &upstream.url]);
    upstream
        .behaviour
        .no_outputs
        .store(true, std::sync::atomic::Ordering::Relaxed);
    s.deploy_shadow_that_waits("far");
    for _ in 0..5 {
        let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
        assert_eq!(status, 200, "the user never sees the shadow: {body}");
    }
    super::harness::eventually(
        std::time::Duration::from_secs(10),
        "the shadow's five errors",
        async || {
            let m = s
                .admin_get("/api/v1/models/cancer/metrics?window=60s")
                .await;
            let shadow = super::harness::metrics_series(&m, "role", "shadow");
            shadow["requests"] == 5 && shadow["errors"] == 5
        },
    )
    .await;
}

/// The client's id comes back as its answer's, and takes the label, whatever
/// the remote does with it (leaves it out, or answers with its own); a
/// client id Ferry would refuse on the decoded path is refused here too.
/// Without one, Ferry makes it; either way the remote is sent it in
/// `x-ferry-request-id`, so its logs name the request as Ferry's answer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_id_is_its_answers_whatever_the_remote_says() {
    let upstream = super::upstream::Upstream::start().await;
    let s = Server::start().await;
    s.ferry_json(&["model", "add", "cancer", "far", "--url", &upstream.url]);
    for (i, remote_says) in [None, Some(None), Some(Some("not-yours".to_string()))]
        .into_iter()
        .enumerate()
    {
        *upstream.behaviour.answer_id.lock().unwrap() = remote_says.clone();
        let mut row = batch(1);
        let mine = format!("mine-{i}");
        row["id"] = json!(mine);
        let (status, headers, answer) = s.infer("/v2/models/cancer/infer", &row).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            (
                answer["id"].as_str(),
                headers["x-ferry-request-id"].to_str().ok()
            ),
            (Some(mine.as_str()), Some(mine.as_str())),
            "the remote said {remote_says:?}"
        );
        assert_eq!(upstream.behaviour.last_request_id(), Some(mine.clone()));
        let r = s
            .http
            .post(s.at("/v2/models/cancer/feedback"))
            .bearer_auth(s.token())
            .json(&json!({"id": mine, "label": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Without an id of its own, the client gets the one Ferry made and sent
    // the remote, whatever the remote answers.
    for remote_says in [Some(Some("theirs".to_string())), Some(None)] {
        *upstream.behaviour.answer_id.lock().unwrap() = remote_says;
        let (_, headers, answer) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
        let made = answer["id"].as_str().unwrap();
        assert_eq!(made.len(), 32, "{answer}");
        assert_eq!(headers["x-ferry-request-id"], made);
        assert_eq!(upstream.behaviour.last_request_id().as_deref(), Some(made));
    }
    // An id the decoded path refuses is refused here too.
    let mut row = batch(1);
    row["id"] = json!(7);
    let (status, _, answer) = s.infer("/v2/models/cancer/infer", &row).await;
    assert_eq!(status, 400, "{answer}");
}
