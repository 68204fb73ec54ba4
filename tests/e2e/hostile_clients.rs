//! Hostile clients (issue 19): what an unauthenticated client could do to a
//! server before, each attack replayed against the real binary. Raw TCP
//! where the attack is below what an HTTP client library would send.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::harness::{Server, batch, eventually};

fn addr(s: &Server) -> std::net::SocketAddr {
    s.url
        .strip_prefix("http://")
        .expect("a plain HTTP server")
        .parse()
        .expect("an address")
}

/// A connection from a chosen loopback address (127.0.0.2 is another peer).
async fn connect_from(s: &Server, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .expect("bind a loopback source address");
    socket.connect(addr(s)).await.expect("connect")
}

/// One HTTP/1.1 answer read off a connection: status, head, body. `None`
/// when the server closed the connection instead of answering.
async fn answer(stream: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((status, head, String::from_utf8_lossy(&body).to_string()))
}

/// Sends raw bytes on a new connection and reads one answer.
async fn raw(s: &Server, request: &str) -> (u16, String, String) {
    let mut c = TcpStream::connect(addr(s)).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), answer(&mut c))
        .await
        .expect("an answer within 10 s")
        .expect("an answer, not a closed connection")
}

/// The answers the server gives on `conns` within three seconds, and the
/// connections it holds without answering.
async fn answered(conns: Vec<TcpStream>) -> (Vec<(u16, String, String)>, Vec<TcpStream>) {
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        tasks.spawn(async move {
            let a = tokio::time::timeout(Duration::from_secs(3), answer(&mut c))
                .await
                .ok()
                .flatten();
            (a, c)
        });
    }
    let (mut answers, mut held) = (Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (Some(a), _) => answers.push(a),
            (None, c) => held.push(c),
        }
    }
    (answers, held)
}

/// Whether the server closed the connection (within `within`).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(within, stream.read_to_end(&mut rest)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

/// The index of the one connection of `conns` the server closed (or
/// answered and closed), waiting at most `within`; every other is open.
async fn one_closed(conns: &[TcpStream], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let closed: Vec<usize> = (0..conns.len())
            .filter(|&i| {
                let mut buf = [0u8; 256];
                !matches!(conns[i].try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .collect();
        if closed.len() == 1 {
            return closed[0];
        }
        assert!(
            closed.len() <= 1,
            "{} connections closed: {closed:?}",
            closed.len()
        );
        assert!(
            Instant::now() < deadline,
            "none of {} was refused within {within:?}",
            conns.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn infer_head(host: &str, len: usize) -> String {
    format!(
        "POST /v2/models/cancer/infer HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

#[tokio::test]
async fn feedback_needs_a_token_counts_once_and_ids_cannot_be_guessed() {
    let tmp = tempfile::tempdir().unwrap();
    let labeller = tmp.path().join("feedback-token");
    let s = Server::start_in(
        &tmp.path().join("data"),
        &["--feedback-token-file", labeller.to_str().unwrap()],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let labeller = std::fs::read_to_string(&labeller)
        .unwrap()
        .trim()
        .to_string();
    // Generated ids are 128 random bits: no shared prefix, no counter.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, headers, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
        assert_eq!(code, 200);
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(headers["x-ferry-request-id"].to_str().unwrap(), id);
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        ids.push(id);
    }
    assert_ne!(ids[0][..8], ids[1][..8], "{ids:?}");
    let post = async |id: &str, token: Option<&str>| {
        let mut r = s
            .http
            .post(s.at("/v2/models/cancer/feedback"))
            .json(&json!({"id": id, "label": 1}));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    // No token, or a wrong one: refused before anything is counted.
    let (code, body) = post(&ids[0], None).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--feedback-token-file")
    );
    assert_eq!(post(&ids[0], Some("guess")).await.0, 401);
    // The labelling job's token: counted once, and the answer says nothing
    // of what was predicted.
    let (code, body) = post(&ids[0], Some(&labeller)).await;
    assert_eq!(code, 200, "{body}");
    for hidden in ["predicted", "correct", "version"] {
        assert!(body.get(hidden).is_none(), "{body}");
    }
    let (code, body) = post(&ids[0], Some(&labeller)).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already has its label")
    );
    // The admin token sees the prediction.
    let (code, body) = post(&ids[1], Some(&s.token())).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body["predicted"].is_i64() && body["version"] == "1",
        "{body}"
    );
    let m = s.admin_get("/api/v1/models/cancer/metrics?window=1m").await;
    let labelled: u64 = m["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["labelled"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(labelled, 2, "two labels counted, the repeat was not");
    // Two requests that chose the same id: neither takes a label, and the
    // second cannot overwrite what the first was answered.
    let mut row = batch(1);
    row["id"] = json!("chosen-by-client");
    for _ in 0..2 {
        assert_eq!(s.infer("/v2/models/cancer/infer", &row).await.0, 200);
    }
    let (code, body) = post("chosen-by-client", Some(&labeller)).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("more than one request")
    );
}

#[tokio::test]
async fn long_or_unprintable_request_ids_are_refused_and_not_remembered() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let mut row = batch(1);
    row["id"] = json!("x".repeat(8 << 20));
    let (code, headers, body) = s.infer("/v2/models/cancer/infer", &row).await;
    assert_eq!(code, 400, "{body}");
    assert!(headers.get("x-ferry-request-id").is_none());
    assert!(
        body["error"].as_str().unwrap().contains("at most")
            || body["error"].as_str().unwrap().contains("1 to 256"),
        "{body}"
    );
    row["id"] = json!("line\nbreak");
    assert_eq!(s.infer("/v2/models/cancer/infer", &row).await.0, 400);
    row["id"] = json!("x".repeat(256));
    assert_eq!(s.infer("/v2/models/cancer/infer", &row).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sent_a_byte_at_a_time_cost_their_size_not_a_buffer_per_byte() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let before = s.rss();
    // 100 connections each announce a 3,000-byte body and send it one byte
    // per write, round-robin, so the server reads them a byte at a time.
    const CONNS: usize = 100;
    const BYTES: usize = 3_000;
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut c = TcpStream::connect(addr(&s)).await.unwrap();
        c.set_nodelay(true).unwrap();
        c.write_all(infer_head("127.0.0.1", BYTES).as_bytes())
            .await
            .unwrap();
        conns.push(c);
    }
    for _ in 0..BYTES - 1 {
        for c in &mut conns {
            c.write_all(b" ").await.unwrap();
        }
    }
    let held = s.rss().saturating_sub(before);
    // 300 KB of bodies in flight: 3 MB more here. Kept as pieces, each
    // one-byte read pinned a read buffer of its own: 117 MB more before.
    assert!(
        held < 32 << 20,
        "{CONNS} bodies of {BYTES} bytes, sent a byte at a time, grew the server by {} MB",
        held >> 20
    );
    // The bodies are whole requests once finished (spaces, then "{}" is
    // not a request: each gets its 400, the server is fine).
    for c in &mut conns {
        c.write_all(b"x").await.unwrap();
        let (code, _, _) = answer(c).await.expect("an answer");
        assert_eq!(code, 400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_of_bodies_held_at_once_are_bounded_in_all_and_per_peer() {
    let tmp = tempfile::tempdir().unwrap();
    // 400 KB in all, 100 KB for one address.
    let s = Server::start_in(&tmp.path().join("data"), &["--max-body-memory", "400000"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    // A client that announces 60 KB and sends half holds 60 KB.
    let half = async |from: &str| {
        let mut c = connect_from(&s, from).await;
        c.write_all(infer_head("127.0.0.1", 60_000).as_bytes())
            .await
            .unwrap();
        c.write_all(&[b' '; 30_000]).await.unwrap();
        c
    };
    // The server takes a body's share as its bytes arrive, in whatever
    // order it reads the connections: which one is refused is not fixed,
    // how many are.
    let mut held = Vec::new();
    let (refused, kept) = answered(vec![half("127.0.0.3").await, half("127.0.0.3").await]).await;
    assert_eq!((refused.len(), kept.len()), (1, 1), "{refused:?}");
    let (code, head, body) = &refused[0];
    assert_eq!(*code, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    assert!(
        body.contains("a quarter of it for one client address"),
        "{body}"
    );
    held.extend(kept);
    // Other addresses fill the rest: 6 × 60 KB fit in 400 KB, a 7th not.
    for i in 4..=9 {
        held.push(half(&format!("127.0.0.{i}")).await);
    }
    let (refused, kept) = answered(held).await;
    assert_eq!((refused.len(), kept.len()), (1, 6), "{refused:?}");
    let (code, _, body) = &refused[0];
    assert_eq!(*code, 503, "{body}");
    assert!(
        body.contains("--max-body-memory") && !body.contains("quarter"),
        "{body}"
    );
    let held = kept;
    // The admin is not counted: an operator can still act.
    let token = s.token();
    let mut admin = connect_from(&s, "127.0.0.9").await;
    admin
        .write_all(
            format!(
                "POST /api/v1/models/cancer/pause HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (code, _, body) = answer(&mut admin).await.expect("answered");
    assert_ne!(code, 503, "{body}");
    drop(held);
    // Given back once the clients are gone.
    eventually(
        Duration::from_secs(10),
        "the budget is free again",
        async || {
            let mut c = half("127.0.0.3").await;
            c.write_all(&[b' '; 30_000]).await.unwrap();
            answer(&mut c).await.is_some_and(|(code, _, _)| code == 400)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_are_cut_and_one_peer_cannot_take_every_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        &tmp.path().join("data"),
        &[
            "--body-read-timeout",
            "1s",
            "--body-min-rate",
            "100",
            "--max-connections",
            "24",
            "--max-connections-per-peer",
            "12",
        ],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    // The attacker (127.0.0.3: the test's own HTTP client keeps a pooled
    // connection from 127.0.0.1) sends headers, then a byte now and then.
    let started = Instant::now();
    // Thirteen connections: whichever the server takes last is refused at
    // once (closed) — the serving threads accept concurrently, so not
    // necessarily the last opened here.
    let mut conns = Vec::new();
    for _ in 0..13 {
        conns.push(connect_from(&s, "127.0.0.3").await);
    }
    let refused = one_closed(&conns, Duration::from_secs(5)).await;
    conns.remove(refused);
    // The twelve send headers, then a byte now and then.
    for c in &mut conns {
        c.write_all(infer_head("127.0.0.1", 1_000).as_bytes())
            .await
            .unwrap();
        c.write_all(b" ").await.unwrap();
    }
    let mut slow = conns;
    // ...while another peer is served.
    let mut other = connect_from(&s, "127.0.0.2").await;
    let body = serde_json::to_string(&batch(1)).unwrap();
    other
        .write_all(format!("{}{body}", infer_head("127.0.0.1", body.len())).as_bytes())
        .await
        .unwrap();
    assert_eq!(answer(&mut other).await.expect("served").0, 200);
    // Half of the slow ones keep trickling (5 bytes/s), half stop: all are
    // answered 408 and closed within a few seconds, not held for ever.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for c in slow.iter_mut().step_by(2) {
            let _ = c.write_all(b" ").await;
        }
    }
    for c in &mut slow {
        let (code, _, body) = tokio::time::timeout(Duration::from_secs(5), answer(c))
            .await
            .expect("cut within 5 s")
            .expect("a 408 before closing");
        assert_eq!(code, 408, "{body}");
        assert!(
            body.contains("--body-read-timeout") || body.contains("--body-min-rate"),
            "{body}"
        );
        assert!(closed_within(c, Duration::from_secs(2)).await);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // The slots are free again.
    let mut again = connect_from(&s, "127.0.0.3").await;
    again
        .write_all(format!("{}{body}", infer_head("127.0.0.1", body.len())).as_bytes())
        .await
        .unwrap();
    assert_eq!(answer(&mut again).await.expect("served").0, 200);
}

#[tokio::test]
async fn a_body_that_arrives_after_the_answer_keeps_the_connection_usable() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let token = s.token();
    let mut c = TcpStream::connect(addr(&s)).await.unwrap();
    c.set_nodelay(true).unwrap();
    for round in 0..20 {
        // pause ignores its body (no rollout: 404/409); the body follows
        // the headers in its own packet.
        c.write_all(
            format!(
                "POST /api/v1/models/cancer/pause HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"{}").await.unwrap();
        let (code, _, _) = answer(&mut c)
            .await
            .unwrap_or_else(|| panic!("round {round}: the connection was closed"));
        assert!((400..500).contains(&code), "{code}");
    }
    c.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(answer(&mut c).await.expect("still open").0, 200);
}

#[tokio::test]
async fn malformed_and_cross_origin_requests_are_refused_like_nginx_does() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let body = serde_json::to_string(&batch(1)).unwrap();
    let n = body.len();
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "HTTP/1.1 without Host",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\ncontent-length: {n}\r\n\r\n{body}"),
            400,
        ),
        (
            "two Host headers",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\nhost: 127.0.0.1\r\ncontent-length: {n}\r\n\r\n{body}"),
            400,
        ),
        (
            "a rebinding DNS name",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: attacker.example:8080\r\ncontent-length: {n}\r\n\r\n{body}"),
            403,
        ),
        (
            "gzip, chunked",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n{n:x}\r\n{body}\r\n0\r\n\r\n"),
            501,
        ),
        (
            "a signed Inference-Header-Content-Length",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\ninference-header-content-length: +{n}\r\ncontent-length: {n}\r\n\r\n{body}"),
            400,
        ),
        (
            "a cross-origin browser post",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\norigin: http://evil.example\r\ncontent-type: text/plain\r\ncontent-length: {n}\r\n\r\n{body}"),
            403,
        ),
        (
            "a text/plain inference body",
            format!("POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\ncontent-length: {n}\r\n\r\n{body}"),
            415,
        ),
        (
            "a form posted to feedback",
            "POST /v2/models/cancer/feedback HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: multipart/form-data; boundary=x\r\ncontent-length: 0\r\n\r\n".to_string(),
            415,
        ),
    ];
    for (what, request, want) in cases {
        let (code, _, answer) = raw(&s, &request).await;
        assert_eq!(code, want, "{what}: {answer}");
        let error: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert!(error["error"].is_string(), "{what}: {answer}");
    }
    // The same request, well formed (curl's default content type included),
    // is served; so is a same-origin one.
    for extra in [
        "content-type: application/x-www-form-urlencoded\r\n",
        "origin: http://127.0.0.1\r\n",
        "",
    ] {
        let request = format!(
            "POST /v2/models/cancer/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}content-length: {n}\r\n\r\n{body}"
        );
        assert_eq!(raw(&s, &request).await.0, 200, "{extra}");
    }
    // The dashboard may run only its own script and may not be framed.
    let r = s.http.get(s.at("/ui/")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_json_body_costs_a_few_times_its_size_to_decode_not_twenty() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    // 280,000 rows of 30 zeros: a 16 MiB JSON body.
    let rows = 280_000;
    let body = format!(
        r#"{{"inputs":[{{"name":"input","shape":[{rows},30],"datatype":"FP32","data":[{}]}}]}}"#,
        vec!["0"; rows * 30].join(",")
    );
    let before = s.peak_rss();
    let r = s
        .http
        .post(s.at("/v2/models/cancer/infer"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let grew = s.peak_rss().saturating_sub(before);
    // Here: 89 MB (the body, its typed tensor, the answer); a JSON tree of
    // the data took 378 MB before.
    assert!(
        grew < 8 * body.len() as u64,
        "a {} MB body grew the server's peak memory by {} MB",
        body.len() >> 20,
        grew >> 20
    );
}
