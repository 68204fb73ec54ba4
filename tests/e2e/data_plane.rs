//! The Open Inference Protocol endpoints over real HTTP: JSON and binary
//! tensors, every datatype, batches, errors, repository, metrics, concurrency.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{Server, batch, binary_body, holdout, test_data};

async fn cancer() -> Server {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s
}

#[tokio::test]
async fn health_and_metadata() {
    let s = cancer().await;
    let get = |p: &str| {
        let url = s.at(p);
        let http = s.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/v2/health/live").await, (200, json!({"live": true})));
    assert_eq!(get("/v2/health/ready").await, (200, json!({"ready": true})));
    let (_, meta) = get("/v2").await;
    assert_eq!(meta["name"], "ferry");
    assert_eq!(
        meta["extensions"],
        json!(["binary_tensor_data", "model_repository"])
    );
    let (status, m) = get("/v2/models/cancer").await;
    assert_eq!(status, 200);
    assert_eq!(m["versions"], json!(["1"]));
    assert_eq!(m["platform"], "onnxruntime_onnx");
    assert_eq!(
        m["outputs"][1],
        json!({"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]})
    );
    assert_eq!(
        get("/v2/models/cancer/versions/1").await.1["inputs"],
        m["inputs"]
    );
    assert_eq!(get("/v2/models/cancer/ready").await.0, 200);
    assert_eq!(get("/v2/models/cancer/versions/1/ready").await.0, 200);
    let (status, body) = get("/v2/models/nope").await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("model \"nope\" is not registered")
    );
    assert_eq!(get("/v2/models/cancer/versions/7/ready").await.0, 404);
    assert_eq!(get("/v2/no/such/path").await.0, 404);
}

#[tokio::test]
async fn json_inference_matches_the_trained_model() {
    let s = cancer().await;
    let rows = holdout();
    let n = rows.len();
    let (status, headers, body) = s.infer("/v2/models/cancer/infer", &batch(n)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-ferry-version"], "1");
    let labels = body["outputs"][0]["data"].as_array().unwrap();
    assert_eq!(labels.len(), n);
    let correct = rows
        .iter()
        .zip(labels)
        .filter(|((_, want), got)| got.as_i64() == Some(*want))
        .count();
    // examples/models/models.json: scikit-learn's own accuracy for cancer-v1 on the hold-out set.
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(super::harness::example("models.json")).unwrap(),
    )
    .unwrap();
    let acc = correct as f64 / n as f64;
    assert!(
        (acc - expected["cancer-v1"]["holdout_accuracy"].as_f64().unwrap()).abs() < 1e-3,
        "accuracy {acc}"
    );
    assert_eq!(body["outputs"][1]["shape"], json!([n, 2]));

    // Flat data, an id echoed, a subset of outputs, no Content-Type header.
    let mut flat = rows[0].0.clone();
    flat["id"] = json!("my-request-1");
    flat["outputs"] = json!([{"name": "probabilities"}]);
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .body(serde_json::to_vec(&flat).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ferry-request-id"], "my-request-1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], "my-request-1");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(body["outputs"][0]["name"], "probabilities");

    // Without an id, Ferry makes one and says it in the header too.
    let (_, headers, body) = s.infer("/v2/models/cancer/infer", &rows[0].0).await;
    let id = body["id"].as_str().unwrap();
    assert!(!id.is_empty());
    assert_eq!(headers["x-ferry-request-id"], id);
}

/// Splits a binary response into its JSON header and the raw tail.
async fn split_binary(r: reqwest::Response) -> (Value, Vec<u8>) {
    let len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    (
        serde_json::from_slice(&bytes[..len]).unwrap(),
        bytes[len..].to_vec(),
    )
}

#[tokio::test]
async fn binary_tensor_extension_in_and_out() {
    let s = cancer().await;
    let rows = holdout();
    let mut raw = Vec::new();
    for (v, _) in rows.iter().take(2) {
        for x in v["inputs"][0]["data"].as_array().unwrap() {
            raw.extend((x.as_f64().unwrap() as f32).to_le_bytes());
        }
    }
    let header = json!({
        "inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": true}}, {"name": "probabilities", "parameters": {"binary_data": false}}]
    });
    let (body, len) = binary_body(&header, &[raw]);
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .header("inference-header-content-length", len)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (head, tail) = split_binary(r).await;
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
    assert_eq!(tail.len(), 16);
    let labels: Vec<i64> = tail
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(labels.iter().all(|l| *l == 0 || *l == 1), "{labels:?}");
    assert_eq!(head["outputs"][1]["data"].as_array().unwrap().len(), 4);

    // JSON answer to the same rows agrees with the binary one.
    let (_, _, json_answer) = s.infer("/v2/models/cancer/infer", &batch(2)).await;
    assert_eq!(json_answer["outputs"][0]["data"], json!(labels));

    // binary_data_output at the request level makes every output binary.
    let mut header = header.clone();
    header.as_object_mut().unwrap().remove("outputs");
    header["parameters"] = json!({"binary_data_output": true});
    let raw = vec![0u8; 2 * 30 * 4];
    let r = s
        .post_binary("/v2/models/cancer/infer", &header, &[raw])
        .await;
    let (head, tail) = split_binary(r).await;
    assert_eq!(tail.len(), 16 + 16);
    assert!(
        head["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["data"].is_null())
    );
}

#[tokio::test]
async fn every_datatype_round_trips_in_json_and_binary() {
    let s = Server::start().await;
    let file = test_data("all-types.onnx");
    s.ferry_json(&[
        "model",
        "add",
        "types",
        "1",
        "--file",
        file.to_str().unwrap(),
    ]);
    let cases: Vec<(&str, Value, Vec<u8>)> = vec![
        ("BOOL", json!([true, false, false, true]), vec![1, 0, 0, 1]),
        ("UINT8", json!([0, 1, 254, 255]), vec![0, 1, 254, 255]),
        (
            "UINT16",
            json!([0, 1, 65534, 65535]),
            [0u16, 1, 65534, 65535]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "UINT32",
            json!([0, 1, 7, 4294967295u32]),
            [0u32, 1, 7, u32::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "UINT64",
            json!([0, 1, 7, u64::MAX]),
            [0u64, 1, 7, u64::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "INT8",
            json!([-128, -1, 0, 127]),
            [-128i8, -1, 0, 127]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "INT16",
            json!([-32768, -1, 0, 32767]),
            [-32768i16, -1, 0, 32767]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "INT32",
            json!([i32::MIN, -1, 0, i32::MAX]),
            [i32::MIN, -1, 0, i32::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "INT64",
            json!([i64::MIN, -1, 0, i64::MAX]),
            [i64::MIN, -1, 0, i64::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "FP16",
            json!([0.5, -2.0, 0.0, 1024.0]),
            [0.5f32, -2.0, 0.0, 1024.0]
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
        (
            "FP32",
            json!([0.25, -1.5, 0.0, 3.0e38]),
            [0.25f32, -1.5, 0.0, 3.0e38]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        (
            "FP64",
            json!([0.1, -1e300, 0.0, 2.5]),
            [0.1f64, -1e300, 0.0, 2.5]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    ];
    // JSON: all twelve inputs in one request.
    let inputs: Vec<Value> = cases
        .iter()
        .map(|(dt, data, _)| json!({"name": format!("in_{dt}"), "datatype": dt, "shape": [2, 2], "data": data}))
        .collect();
    let (status, _, body) = s
        .infer("/v2/models/types/infer", &json!({"inputs": inputs}))
        .await;
    assert_eq!(status, 200, "{body}");
    for (dt, data, _) in &cases {
        let out = body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == format!("out_{dt}"))
            .unwrap();
        assert_eq!(out["datatype"], *dt);
        assert_eq!(out["shape"], json!([2, 2]));
        assert_eq!(&out["data"], data, "{dt}");
    }
    // Binary: the same values as raw bytes, answered as raw bytes.
    let inputs: Vec<Value> = cases
        .iter()
        .map(|(dt, _, raw)| json!({"name": format!("in_{dt}"), "datatype": dt, "shape": [2, 2], "parameters": {"binary_data_size": raw.len()}}))
        .collect();
    let outputs: Vec<Value> = cases
        .iter()
        .map(|(dt, _, _)| json!({"name": format!("out_{dt}"), "parameters": {"binary_data": true}}))
        .collect();
    let raws: Vec<Vec<u8>> = cases.iter().map(|c| c.2.clone()).collect();
    let header = json!({"inputs": inputs, "outputs": outputs});
    let r = s
        .post_binary("/v2/models/types/infer", &header, &raws)
        .await;
    assert_eq!(r.status(), 200);
    let (_, tail) = split_binary(r).await;
    assert_eq!(tail, raws.concat());
}

#[tokio::test]
async fn bad_requests_get_clear_errors_in_the_error_shape() {
    let s = cancer().await;
    let row = holdout()[0].0.clone();
    let mut wrong_shape = row.clone();
    wrong_shape["inputs"][0]["shape"] = json!([2, 15]);
    let mut wrong_type = row.clone();
    wrong_type["inputs"][0]["datatype"] = json!("FP64");
    let mut short = row.clone();
    short["inputs"][0]["data"].as_array_mut().unwrap().pop();
    let mut unknown_input = row.clone();
    unknown_input["inputs"][0]["name"] = json!("features");
    let mut unknown_output = row.clone();
    unknown_output["outputs"] = json!([{"name": "scores"}]);
    let mut bytes_type = row.clone();
    bytes_type["inputs"][0]["datatype"] = json!("BYTES");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v2/models/cancer/infer",
            b"{not json".to_vec(),
            400,
            "not a valid inference request",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&wrong_shape).unwrap(),
            400,
            "expects [-1, 30]",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&wrong_type).unwrap(),
            400,
            "must be FP32, not FP64",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&short).unwrap(),
            400,
            "needs 30 elements but 29 were given",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&unknown_input).unwrap(),
            400,
            "unknown input \"features\"",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&unknown_output).unwrap(),
            400,
            "unknown output \"scores\"",
        ),
        (
            "/v2/models/cancer/infer",
            serde_json::to_vec(&bytes_type).unwrap(),
            400,
            "\"BYTES\" is not supported",
        ),
        (
            "/v2/models/nope/infer",
            serde_json::to_vec(&row).unwrap(),
            404,
            "model \"nope\" is not served",
        ),
        (
            "/v2/models/cancer/versions/9/infer",
            serde_json::to_vec(&row).unwrap(),
            404,
            "loaded versions: 1",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = s.http.post(s.at(path)).body(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {needle}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {v}"));
        assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    }
    // Wrong method: still the error shape.
    let r = s
        .http
        .get(s.at("/v2/models/cancer/infer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("d"), &["--max-body-bytes", "4096"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200);
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(20)).await;
    assert_eq!(status, 413);
    assert!(body["error"].as_str().unwrap().contains("--max-body-bytes"));
}

/// Reads one HTTP/1.1 response (headers + Content-Length body) from a stream.
fn read_response(stream: &mut std::net::TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn a_connection_stays_usable_after_an_error() {
    let s = cancer().await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let good = serde_json::to_string(&holdout()[0].0).unwrap();
    let result = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut statuses = Vec::new();
        for body in ["{broken", good.as_str(), "[]", good.as_str()] {
            write!(
                stream,
                "POST /v2/models/cancer/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            statuses.push(read_response(&mut stream).0);
        }
        statuses
    })
    .await
    .unwrap();
    assert_eq!(result, vec![400, 200, 400, 200]);
}

#[tokio::test]
async fn sixty_four_concurrent_clients_get_no_error() {
    let s = cancer().await;
    let rows = holdout();
    let mut tasks = Vec::new();
    for c in 0..64 {
        let http = reqwest::Client::new();
        let url = s.at("/v2/models/cancer/infer");
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..20 {
                let (body, label) = &rows[(c * 20 + i) % rows.len()];
                let r = http.post(&url).json(body).send().await.unwrap();
                assert_eq!(r.status(), 200, "client {c} request {i}");
                let v: Value = r.json().await.unwrap();
                assert!(
                    v["outputs"][0]["data"][0]
                        .as_i64()
                        .is_some_and(|l| l == 0 || l == 1),
                    "{label}"
                );
                ok += 1;
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 64 * 20);
    let metrics = s
        .http
        .get(s.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"ferry_requests_total{model="cancer",version="1",outcome="ok"} 1280"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ferry_requests_total{model="cancer",version="1",outcome="error"} 0"#)
    );
}

#[tokio::test]
async fn repository_load_and_unload_need_the_token_and_go_through_the_controller() {
    let s = cancer().await;
    s.add("cancer", "2", "cancer-v2.onnx");
    let load = s.at("/v2/repository/models/cancer/load");
    let body = json!({"parameters": {"version": "2"}});
    let r = s.http.post(&load).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The token is checked before the body is read (found by schemathesis).
    let r = s.http.post(&load).body("null").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (status, _) = s
        .admin_post("/v2/repository/models/cancer/load", Some(body.clone()))
        .await;
    assert_eq!(status, 200);
    let (status, headers, _) = s
        .infer("/v2/models/cancer/versions/2/infer", &batch(1))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ferry-version"], "2");
    // The stable version still answers unversioned requests.
    let (_, headers, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(headers["x-ferry-version"], "1");
    let index = s.index().await;
    assert_eq!(
        index
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "READY")
            .count(),
        2
    );
    let show = s.ferry_json(&["model", "show", "cancer"]);
    assert_eq!(show["versions"][1]["role"], "loaded");

    let unload = "/v2/repository/models/cancer/unload";
    let (status, _) = s.admin_post(unload, Some(body)).await;
    assert_eq!(status, 200);
    let (status, _, _) = s
        .infer("/v2/models/cancer/versions/2/infer", &batch(1))
        .await;
    assert_eq!(status, 404);
    let kinds = s.event_kinds("cancer").await;
    assert!(
        kinds.ends_with(&["version_loaded".to_string(), "version_unloaded".to_string()]),
        "{kinds:?}"
    );
}

/// Triton's unload-then-load: unload without a version takes the model out
/// of service (not ready, inference 503 "unloaded", recorded with who did
/// it), across a restart; load brings its stable version back. Only a
/// rollout in progress refuses it.
#[tokio::test]
async fn repository_unload_takes_the_model_out_of_service_and_load_brings_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let unload = "/v2/repository/models/cancer/unload";
    let r = s.http.post(s.at(unload)).send().await.unwrap();
    assert_eq!(r.status(), 401, "the admin token is needed");
    let (status, body) = s.admin_post(unload, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "UNAVAILABLE");
    async fn assert_out_of_service(s: &Server) {
        {
            let r = s
                .http
                .get(s.at("/v2/models/cancer/ready"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
            let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
            assert_eq!(status, 503, "{body}");
            let msg = body["error"].as_str().unwrap();
            assert!(msg.contains("unloaded"), "{msg}");
            assert!(msg.contains("/v2/repository/models/cancer/load"), "{msg}");
            let index = s.index().await;
            let entry = index
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["version"] == "1")
                .unwrap()
                .clone();
            assert_eq!(entry["state"], "UNAVAILABLE", "{index}");
            assert!(
                entry["reason"].as_str().unwrap().contains("unloaded"),
                "{index}"
            );
            // Health stays green: the server is fine, the model is out of service.
            let r = s.http.get(s.at("/v2/health/ready")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    assert_out_of_service(&s).await;
    let events = s.admin_get("/api/v1/models/cancer/events").await;
    let last = events.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "model_unloaded", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("by repository API"),
        "{last}"
    );

    // Out of service across a restart.
    s.kill9();
    let s = Server::start_in(&dir, &[]).await;
    assert_out_of_service(&s).await;
    let (status, _) = s
        .admin_post(
            "/api/v1/models/cancer/rollouts",
            Some(json!({"model": "cancer", "version": "2", "strategy": {"basic": {}}})),
        )
        .await;
    assert_eq!(status, 409, "no rollout on a model out of service");

    let (status, body) = s
        .admin_post("/v2/repository/models/cancer/load", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let r = s
        .http
        .get(s.at("/v2/models/cancer/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, headers, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ferry-version"], "1");
    let kinds = s.event_kinds("cancer").await;
    assert_eq!(kinds.last().unwrap(), "model_loaded", "{kinds:?}");

    // While a rollout owns the model, unload is refused, and says so.
    let (status, body) = s
        .admin_post(
            "/api/v1/models/cancer/rollouts",
            Some(json!({"model": "cancer", "version": "2",
                        "strategy": {"canary": {"steps": [{"weight": 10}, {"pause": {}}]}}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s.admin_post(unload, None).await;
    assert_eq!(status, 409, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("r-") && msg.contains("ferry abort cancer"),
        "{msg}"
    );
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let s = Server::start().await;
    s.add("slow", "1", "cancer-slow.onnx");
    s.ferry_json(&[
        "model",
        "set",
        "slow",
        "1",
        "--queue",
        "1",
        "--timeout",
        "10s",
    ]);
    // One request runs, one waits in the queue; the rest find it full.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let http = reqwest::Client::new();
        let url = s.at("/v2/models/slow/infer");
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&batch(1)).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string()),
            )
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let rejected: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
    assert!(answers.iter().any(|(s, _)| *s == 200), "{answers:?}");
    assert!(!rejected.is_empty(), "{answers:?}");
    assert!(
        rejected
            .iter()
            .all(|(_, retry)| retry.as_deref() == Some("1"))
    );
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 503),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_batching_merges_concurrent_requests_with_identical_answers() {
    let s = cancer().await;
    let rows = holdout();
    // The answers without batching, one request at a time.
    let mut expected = Vec::new();
    for (body, _) in rows.iter().take(64) {
        let (_, _, answer) = s.infer("/v2/models/cancer/infer", body).await;
        expected.push(answer["outputs"].clone());
    }
    let v = s.ferry_json(&[
        "model",
        "set",
        "cancer",
        "1",
        "--batch-max",
        "16",
        "--batch-delay",
        "5ms",
    ]);
    assert_eq!(v["settings"]["batch_max"], 16);
    let human = s.ferry_ok(&["model", "show", "cancer"]);
    assert!(human.contains("batches of up to 16 within 5ms"), "{human}");
    // The same 64 rows, all at once.
    let mut tasks = Vec::new();
    for (body, _) in rows.iter().take(64) {
        let (http, url, body) = (
            s.http.clone(),
            s.at("/v2/models/cancer/infer"),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["outputs"].clone()
        }));
    }
    // Labels are identical; probabilities agree to float rounding (a batched
    // matrix product may sum in another order).
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(
            got[0], expected[i][0],
            "row {i}: another label when batched"
        );
        let (a, b) = (
            got[1]["data"].as_array().unwrap(),
            expected[i][1]["data"].as_array().unwrap(),
        );
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-6,
                "row {i}: {got} vs {}",
                expected[i]
            );
        }
    }
    let prom = s.prometheus().await;
    let count = super::harness::series_value(
        &prom,
        r#"ferry_batch_size_count{model="cancer",version="1"}"#,
    );
    let sum =
        super::harness::series_value(&prom, r#"ferry_batch_size_sum{model="cancer",version="1"}"#);
    assert_eq!(sum, 64.0, "every request went through the batcher: {prom}");
    assert!(
        count < 64.0,
        "some requests ran together: {count} runs for 64 requests"
    );
}

#[tokio::test]
async fn slow_clients_are_disconnected_and_connections_are_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        &tmp.path().join("d"),
        &[
            "--header-read-timeout",
            "500ms",
            "--max-connections",
            "3",
            "--max-connections-per-peer",
            "3",
        ],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let addr = s.url.trim_start_matches("http://").to_string();
    let outcome = tokio::task::spawn_blocking(move || {
        // A slow-loris client: half a request line, then nothing.
        let mut slow = std::net::TcpStream::connect(&addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        slow.write_all(b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let n = slow.read(&mut buf).unwrap_or(0);
        let slow_closed_after = started.elapsed();
        let slow_answer = String::from_utf8_lossy(&buf[..n]).to_string();
        drop(slow);
        // Three open connections fill the limit (each answered once, so the
        // server has accepted it); a fourth is closed at once. The server
        // frees the slow client's slot a moment after the client sees the
        // close, so a connection refused meanwhile is opened again (until
        // one is answered). The bounds are generous: on a loaded 2-core CI
        // host an answer can take a second, and a connection given up on
        // holds its slot until the server sees it closed.
        let idle: Vec<_> = (0..3)
            .map(|_| {
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                loop {
                    let mut c = std::net::TcpStream::connect(&addr).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let sent =
                        c.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
                    if sent.is_ok() && c.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
                        assert_eq!(read_response(&mut c).0, 200);
                        break c;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the slow client's slot was not freed within 15 s"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .collect();
        let mut extra = std::net::TcpStream::connect(&addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = extra.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        // Closed (EOF or reset), not merely unanswered until the read timeout.
        let refused = match extra.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        drop(idle);
        (slow_closed_after, slow_answer, refused)
    })
    .await
    .unwrap();
    let (after, answer, refused) = outcome;
    assert!(
        after < Duration::from_secs(3),
        "the slow client was cut off after {after:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    assert!(refused, "a connection beyond --max-connections is closed");
    // The server is still healthy for everyone else.
    let (status, _, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    assert_eq!(status, 200);
}

/// Asserts an answer is a 4xx in the error shape whose short message
/// contains `needle`; `what` names the case in failures.
async fn assert_clear_4xx(r: reqwest::Response, what: &str, needle: &str) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let msg = v["error"].as_str().unwrap_or_default().to_string();
    assert!((400..500).contains(&status), "{what}: {status} {msg}");
    assert!(
        msg.contains(needle),
        "{what}: expected {needle:?} in {msg:?}"
    );
    assert!(msg.len() < 400, "{what}: the message stays short: {msg:?}");
}

/// Hostile and malformed input: every case gets a 4xx in the error shape with
/// a message naming what was wrong, and the server stays ready afterwards.
#[tokio::test]
async fn hostile_input_gets_clear_4xx_and_the_server_stays_healthy() {
    let s = cancer().await;
    let row = holdout()[0].0.clone();
    let with_input = |edit: &dyn Fn(&mut Value)| {
        let mut r = row.clone();
        edit(&mut r["inputs"][0]);
        serde_json::to_vec(&r).unwrap()
    };
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut invalid_utf8 = serde_json::to_vec(&row).unwrap();
    invalid_utf8.splice(2..2, [0xff, 0xfe]);
    let long_name = "m".repeat(10_000);
    let infer = "/v2/models/cancer/infer";
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            infer.into(),
            format!("{{\"parameters\": {{\"deep\": {nested}}}, \"inputs\": []}}").into_bytes(),
            "recursion limit",
        ),
        (infer.into(), invalid_utf8, "not a valid inference request"),
        (
            infer.into(),
            with_input(&|i| i["shape"] = json!([-5, 30])),
            "shape",
        ),
        (
            infer.into(),
            with_input(&|i| i["shape"] = json!([1_000_000_000_000_000u64, 30])),
            "elements",
        ),
        (
            infer.into(),
            with_input(&|i| i["shape"] = json!([u64::MAX, 30])),
            "expected i64",
        ),
        (
            infer.into(),
            with_input(&|i| i["shape"] = json!([i64::MAX, i64::MAX, 30])),
            "shape",
        ),
        (
            infer.into(),
            with_input(&|i| i["data"][0] = json!(1e300)),
            "FP32",
        ),
        (
            infer.into(),
            with_input(&|i| i["data"][0] = json!("NaN")),
            "FP32",
        ),
        (
            infer.into(),
            with_input(&|i| i["name"] = json!("in\u{0}put")),
            "unknown input",
        ),
        (
            infer.into(),
            with_input(&|i| i["datatype"] = json!("FP1024")),
            "datatype",
        ),
        (
            "/v2/models/..%2F..%2Fetc/infer".into(),
            serde_json::to_vec(&row).unwrap(),
            "not served",
        ),
        (
            "/v2/models/can%00cer/infer".into(),
            serde_json::to_vec(&row).unwrap(),
            "model \"can\\0cer\" is not served",
        ),
        (
            format!("/v2/models/{long_name}/infer"),
            serde_json::to_vec(&row).unwrap(),
            "not served",
        ),
    ];
    for (path, body, needle) in cases {
        let r = s.http.post(s.at(&path)).body(body).send().await.unwrap();
        let short: String = path.chars().take(60).collect();
        assert_clear_4xx(r, &short, needle).await;
    }

    // Binary extension: a header length past the end of the body, and a
    // binary tensor whose byte size does not match its shape.
    let header = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
        "parameters": {"binary_data_size": 120}}]});
    let (body, len) = binary_body(&header, &[vec![0u8; 120]]);
    for (header_len, tail, needle) in [
        (body.len() + 10, 0usize, "Inference-Header-Content-Length"),
        (len, 4, "binary"),
    ] {
        let r = s
            .http
            .post(s.at(infer))
            .header("Inference-Header-Content-Length", header_len.to_string())
            .header("content-type", "application/octet-stream")
            .body(body[..body.len() - tail].to_vec())
            .send()
            .await
            .unwrap();
        assert_clear_4xx(r, &format!("binary {header_len}/{tail}"), needle).await;
    }

    let r = s.http.get(s.at("/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, _, _) = s.infer(infer, &batch(2)).await;
    assert_eq!(status, 200);
}
