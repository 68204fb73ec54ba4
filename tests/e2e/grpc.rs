//! The gRPC front door over real sockets: the same gateway as REST (canary
//! weights and sticky users from metadata, shadows, analysis windows), the
//! client's deadline, the message-size limit, and versions that live on
//! another gRPC server. The official Python client's tour is in `triton.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry::protocol::grpc::pb;
use ferry::protocol::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::json;
use tonic::Code;

use super::harness::{
    Server, eventually, fails_over_without_errors, holdout, series_value, status,
};

type Client = GrpcInferenceServiceClient<tonic::transport::Channel>;

/// A server with its gRPC service on a free port.
async fn grpc_server(extra: &[&str]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--grpc-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let s = Server::start_in(&tmp.path().join("data"), &args).await;
    assert!(s.grpc.is_some(), "the server prints its gRPC address");
    (s, tmp)
}

pub async fn client(s: &Server) -> Client {
    let url = s.grpc.clone().expect("started with --grpc-listen");
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("the gRPC port takes connections");
    Client::new(channel)
}

/// A request for `model` with `rows` hold-out rows, raw contents.
fn rows(model: &str, rows: usize) -> pb::ModelInferRequest {
    let data: Vec<f32> = holdout()
        .iter()
        .cycle()
        .take(rows)
        .flat_map(|(r, _)| {
            r["inputs"][0]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 30],
            ..Default::default()
        }],
        raw_input_contents: vec![data.iter().flat_map(|x| x.to_le_bytes()).collect()],
        ..Default::default()
    }
}

/// Sends a request with metadata; returns the version that answered.
async fn infer(
    c: &mut Client,
    req: pb::ModelInferRequest,
    metadata: &[(&'static str, String)],
) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(req);
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    let resp = c.model_infer(req).await?;
    let header = resp
        .metadata()
        .get("x-ferry-version")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        header,
        resp.get_ref().model_version,
        "metadata and message agree"
    );
    Ok(header)
}

/// One ModelInfer call with `grpc-timeout: timeout`, over a bare HTTP/2
/// connection: a gRPC client library would give up by itself at its
/// deadline (tonic with CANCELLED) and hide what the server answers.
/// Returns the answer's `grpc-status` and `grpc-message`.
async fn call_with_deadline(
    addr: &str,
    req: pb::ModelInferRequest,
    timeout: &str,
) -> (String, String) {
    use http_body_util::BodyExt;
    use prost::Message;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let message = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let request = hyper::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", timeout)
    .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
    .unwrap();
    let resp = sender.send_request(request).await.unwrap();
    let (parts, body) = resp.into_parts();
    let trailers = body
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap_or_default();
    let field = |name: &str| {
        parts
            .headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap().replace("%20", " "))
            .unwrap_or_default()
    };
    (field("grpc-status"), field("grpc-message"))
}

fn in_flight(prom: &str, model: &str) -> f64 {
    series_value(
        prom,
        &format!(r#"ferry_requests_in_flight{{model="{model}",version="1"}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_cancels_the_request_and_nothing_stays_in_flight() {
    let (s, _tmp) = grpc_server(&[]).await;
    s.add("slow", "1", "cancer-slow.onnx");
    let mut c = client(&s).await;
    // 32 requests of a 45 ms model on one replica: 1.4 s of work if they
    // all ran. Each may wait 30 ms.
    let addr = s
        .grpc
        .clone()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let mut calls = Vec::new();
    for _ in 0..32 {
        let addr = addr.clone();
        calls.push(tokio::spawn(async move {
            call_with_deadline(&addr, rows("slow", 1), "30m").await
        }));
    }
    let mut exceeded = 0;
    for call in calls {
        let (code, message) = call.await.unwrap();
        if code != "0" {
            assert_eq!(code, "4", "DEADLINE_EXCEEDED: {message}");
            assert!(message.contains("the request was cancelled"), "{message}");
            exceeded += 1;
        }
    }
    assert!(
        exceeded >= 28,
        "only {exceeded} of 32 passed their deadline"
    );
    eventually(Duration::from_secs(2), "no request in flight", async || {
        in_flight(&s.prometheus().await, "slow") == 0.0
    })
    .await;
    // Every request past its deadline counts: as an error of the version
    // (what a rollout's analysis reads) and in the gRPC status codes.
    let prom = s.prometheus().await;
    let errors = series_value(
        &prom,
        r#"ferry_requests_total{model="slow",version="1",outcome="error"}"#,
    );
    let deadlines = series_value(
        &prom,
        r#"ferry_grpc_requests_total{model="slow",code="DEADLINE_EXCEEDED"}"#,
    );
    assert_eq!(
        (errors, deadlines),
        (exceeded as f64, exceeded as f64),
        "{prom}"
    );
    // The cancelled requests were not left queued or running: the next
    // one is answered in about one run, not after the 1.4 s of theirs.
    let started = Instant::now();
    infer(&mut c, rows("slow", 1), &[]).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "the next request waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_message_over_max_body_bytes_is_resource_exhausted() {
    let (s, _tmp) = grpc_server(&["--max-body-bytes", "4096"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let mut c = client(&s).await;
    assert_eq!(infer(&mut c, rows("cancer", 10), &[]).await.unwrap(), "1");
    let status = c.model_infer(rows("cancer", 100)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-body-bytes"), "{status:?}");
    // The connection is still good for the next request.
    assert_eq!(infer(&mut c, rows("cancer", 1), &[]).await.unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_seen_over_grpc_only_splits_by_weight_keeps_users_and_feeds_the_analysis() {
    let (s, _tmp) = grpc_server(&[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.start_rollout(&json!({
        "model": "cancer", "version": "2",
        "strategy": {"canary": {"steps": [{"weight": 30}, {"pause": {}}], "sticky": {"header": "x-user-id"}}},
    }))
    .await;
    let mut c = client(&s).await;
    let users = 600;
    let mut first = HashMap::new();
    for u in 0..users {
        let v = infer(
            &mut c,
            rows("cancer", 1),
            &[("x-user-id", format!("user-{u}"))],
        )
        .await
        .unwrap();
        first.insert(u, v);
    }
    let share = first.values().filter(|v| *v == "2").count() as f64 / users as f64;
    let tolerance = 5.0 * (0.3f64 * 0.7 / users as f64).sqrt();
    assert!((share - 0.30).abs() <= tolerance, "candidate share {share}");
    for u in (0..users).step_by(7) {
        let again = infer(
            &mut c,
            rows("cancer", 1),
            &[("x-user-id", format!("user-{u}"))],
        )
        .await
        .unwrap();
        assert_eq!(again, first[&u], "user-{u} moved");
    }
    // The rollout's windows counted the gRPC requests.
    let observed = status(&s).await;
    let seen = observed["observed"]["2"].as_f64().unwrap_or(0.0);
    assert!((seen - 30.0).abs() < 10.0, "{observed}");
    // The protocol split: every request above came over gRPC.
    let prom = s.prometheus().await;
    let grpc_ok = series_value(
        &prom,
        r#"ferry_grpc_requests_total{model="cancer",code="OK"}"#,
    );
    assert!(grpc_ok >= users as f64, "{grpc_ok}");
    // Staging by metadata, as by header: no staging version here.
    let err = infer(
        &mut c,
        rows("cancer", 1),
        &[("x-ferry-env", "staging".into())],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let prom = s.prometheus().await;
    let not_found = r#"ferry_grpc_requests_total{model="cancer",code="NOT_FOUND"}"#;
    assert_eq!(series_value(&prom, not_found), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_compares_grpc_requests_and_the_answer_id_takes_a_label() {
    let (s, _tmp) = grpc_server(&[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let policy = json!({"stable": "1", "shadow": {"version": "2", "percent": 100,
        "compare": {"output": "probabilities", "mode": "abs", "tolerance": 0.001}}});
    let (code, body) = s.set_route("cancer", policy).await;
    assert_eq!(code, 200, "{body}");
    let mut c = client(&s).await;
    let mut id = String::new();
    for _ in 0..50 {
        let resp = c.model_infer(rows("cancer", 1)).await.unwrap();
        assert_eq!(
            resp.get_ref().model_version,
            "1",
            "the shadow never answers"
        );
        id = resp.get_ref().id.clone();
    }
    let compared = |prom: &str| {
        ["agree", "disagree"]
            .iter()
            .map(|r| {
                series_value(
                    prom,
                    &format!(r#"ferry_shadow_comparisons_total{{model="cancer",version="2",result="{r}"}}"#),
                )
            })
            .sum::<f64>()
    };
    eventually(Duration::from_secs(10), "50 comparisons", async || {
        compared(&s.prometheus().await) >= 50.0
    })
    .await;
    // The answer's id works for a delayed label, as over REST.
    let (code, body) = s
        .admin_post(
            "/v2/models/cancer/feedback",
            Some(json!({"id": id, "label": 1})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["version"], "1", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_chain_whose_primary_is_a_grpc_remote_that_dies_fails_no_request() {
    let (mut remote, _rtmp) = grpc_server(&[]).await;
    remote.add("cancer", "1", "cancer-v1.onnx");
    let s = Server::start().await;
    let url = format!(
        "{}/cancer",
        remote.grpc.clone().unwrap().replace("http://", "grpc://")
    );
    super::harness::remote_then_local(&s, &url).await;
    // REST clients reach the gRPC remote: the tensors are translated.
    let (code, headers, body) = s
        .infer("/v2/models/cancer/infer", &super::harness::batch(3))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(headers["x-ferry-version"], "remote");
    assert_eq!(body["outputs"][0]["shape"][0], 3, "{body}");
    fails_over_without_errors(&s, async || remote.kill9()).await;
}

/// Reads until the server closes the connection; the time that took.
async fn closed_within(mut stream: tokio::net::TcpStream, limit: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept an idle connection open for {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grpc_connections_are_closed_like_idle_rest_ones() {
    use tokio::io::AsyncWriteExt;
    let (s, _tmp) = grpc_server(&["--header-read-timeout", "1s"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let addr = s.grpc.clone().unwrap();
    let addr = addr.trim_start_matches("http://");
    // Nothing sent at all; the HTTP/2 preface and an empty SETTINGS frame,
    // then nothing. Each held a connection slot for ever before.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let limit = Duration::from_secs(6);
    let (a, b) = tokio::join!(closed_within(silent, limit), closed_within(preface, limit));
    assert!(
        a >= Duration::from_millis(900) && b >= Duration::from_millis(900),
        "{a:?} {b:?}"
    );
    // A client that uses its connection is served, and one whose connection
    // was closed while idle reconnects by itself.
    let mut c = client(&s).await;
    assert_eq!(infer(&mut c, rows("cancer", 1), &[]).await.unwrap(), "1");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(infer(&mut c, rows("cancer", 1), &[]).await.unwrap(), "1");
}

/// The status splits its recent requests by protocol: N over REST and M over
/// gRPC show as such in the status JSON (per version too), in `ferry status
/// -o json` as received, and as one line of `ferry status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_splits_recent_requests_between_rest_and_grpc() {
    let (s, _tmp) = grpc_server(&[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let (rest, grpc) = (30u64, 20u64);
    let mut c = client(&s).await;
    let started = Instant::now();
    let (row, _) = &holdout()[0];
    for _ in 0..rest {
        let (code, _, body) = s.infer("/v2/models/cancer/infer", row).await;
        assert_eq!(code, 200, "{body}");
    }
    for _ in 0..grpc {
        infer(&mut c, rows("cancer", 1), &[]).await.unwrap();
    }
    let status = status(&s).await;
    let printed = s.ferry_json(&["status", "cancer"]);
    let text = s.ferry_ok(&["status", "cancer"]);
    // The window reaches at least 5 s back: what was sent and read within
    // that is all in it.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "too slow to test the window: {took:?}"
    );
    let split = &status["protocols"];
    // The 10 s window's seconds so far: its last bucket is filling, and
    // the server started moments ago.
    let seconds = split["seconds"].as_u64().unwrap();
    assert!((1..=10).contains(&seconds), "{status}");
    assert_eq!(
        (split["rest"].as_u64(), split["grpc"].as_u64()),
        (Some(rest), Some(grpc)),
        "{status}"
    );
    assert_eq!(
        split["versions"],
        json!({"1": {"rest": rest, "grpc": grpc}}),
        "{status}"
    );
    // Read again a moment later: the same requests, seconds perhaps one more.
    for key in ["rest", "grpc", "versions"] {
        assert_eq!(printed["protocols"][key], split[key], "{printed}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("protocols 50 requests in the last ")
                && l.ends_with("s, 60% REST, 40% gRPC")),
        "{text}"
    );
}
