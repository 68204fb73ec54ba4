//! Hostile rollout specs and the control plane's growth (issue 19): a QA
//! dataset that is a FIFO, a device, too big or outside `--qa-dir`; specs
//! with too many checks; outbound URLs off `--allow-outbound`; paged events
//! and `--event-retention`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::harness::{Server, eventually, example, holdout};

/// POSTs a spec with a deadline (a server that hangs fails the test rather
/// than hanging it); returns status and answer.
async fn apply(s: &Server, spec: &Value) -> (u16, Value) {
    let model = spec["model"].as_str().unwrap();
    let r = s
        .http
        .post(s.at(&format!("/api/v1/models/{model}/rollouts")))
        .bearer_auth(s.token())
        .json(spec)
        // Generous for a loaded machine (one case sends 64 MiB); a server
        // frozen on a FIFO never answers.
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the apply is answered within 60 s");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn bg_spec(dataset: &str, content: Option<&str>) -> Value {
    let mut qa = json!({"dataset": dataset, "output": "probabilities", "min_accuracy": 0.9});
    if let Some(c) = content {
        qa["content"] = json!(c);
    }
    json!({"model": "cancer", "version": "2", "strategy": {"blue_green": {"qa": qa, "scale_down_delay": "1m"}}})
}

/// Health and inference on another model, each bounded by one second,
/// until `stop`; returns what did not answer in time.
async fn probe_until(s: &Server, stop: Instant) -> Vec<String> {
    let body = holdout()[0].0.clone();
    let mut slow = Vec::new();
    while Instant::now() < stop {
        let live = s
            .http
            .get(s.at("/v2/health/live"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if !live.as_ref().is_ok_and(|r| r.status() == 200) {
            slow.push(format!("health: {live:?}"));
        }
        let infer = s
            .http
            .post(s.at("/v2/models/other/infer"))
            .json(&body)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if !infer.as_ref().is_ok_and(|r| r.status() == 200) {
            slow.push(format!("inference on another model: {infer:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slow
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success(), "mkfifo {}", path.display());
}

/// A FIFO as the QA dataset froze the whole server (the read blocked an
/// async thread until a writer came); a device grew memory without bound.
/// Now each is refused at apply time, naming the field, and the server
/// answers health checks and other models' inference throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qa_dataset_that_is_a_fifo_a_device_too_big_or_outside_qa_dir_is_refused_and_the_server_keeps_answering()
 {
    let tmp = tempfile::tempdir().unwrap();
    let qa = tmp.path().join("qa");
    std::fs::create_dir(&qa).unwrap();
    mkfifo(&qa.join("qa.fifo"));
    std::os::unix::fs::symlink("/dev/zero", qa.join("zero.jsonl")).unwrap();
    std::fs::File::create(qa.join("big.jsonl"))
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    std::fs::copy(example("cancer-holdout.jsonl"), qa.join("holdout.jsonl")).unwrap();
    let s = Server::start_in(
        &tmp.path().join("data"),
        // One async thread: what blocks it, blocks everything. Bodies up
        // to 100 MB, so the dataset's own limit is what refuses it.
        &[
            "--qa-dir",
            qa.to_str().unwrap(),
            "--io-threads",
            "1",
            "--max-body-bytes",
            "100000000",
        ],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.add("other", "1", "cancer-v1.onnx");

    let (answered, slow) = tokio::join!(
        async {
            let started = Instant::now();
            let answer = apply(&s, &bg_spec("qa.fifo", None)).await;
            (answer, started.elapsed())
        },
        // Probe during the attempt and for 3 s after it (a rollout that was
        // accepted would run its QA gate then).
        probe_until(&s, Instant::now() + Duration::from_secs(4)),
    );
    assert!(
        slow.is_empty(),
        "the server stopped answering while a spec named a FIFO: {slow:?}"
    );
    let ((status, body), took) = answered;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("strategy.blue_green.qa.dataset \"qa.fifo\" is not a regular file"),
        "{error}"
    );
    assert!(took < Duration::from_secs(1), "refused in {took:?}");

    for (dataset, needle) in [
        ("zero.jsonl", "\"zero.jsonl\" is not a regular file"),
        (
            "big.jsonl",
            "\"big.jsonl\" is 67108865 bytes; at most 67108864 (64 MiB) are allowed",
        ),
        (
            "../data/ferry.db",
            "must be a relative path inside --qa-dir",
        ),
        ("/etc/hostname", "must be a relative path inside --qa-dir"),
    ] {
        let (status, body) = apply(&s, &bg_spec(dataset, None)).await;
        assert_eq!(status, 400, "{dataset}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with("strategy.blue_green.qa.dataset") && error.contains(needle),
            "{dataset}: {error}"
        );
    }
    // Content sent with the spec is bounded too (beside the body limit).
    let (status, body) = apply(&s, &bg_spec("x.jsonl", Some(&"x".repeat((64 << 20) + 1)))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("strategy.blue_green.qa.content"),
        "{body}"
    );

    // A regular file inside --qa-dir is read by the server and gates green.
    let (status, body) = apply(&s, &bg_spec("holdout.jsonl", None)).await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(20), "the QA gate ran", async || {
        s.admin_get("/api/v1/models/cancer/status").await["qa"]["accuracy"].is_number()
    })
    .await;
    let status = s.admin_get("/api/v1/models/cancer/status").await;
    assert_eq!(status["qa"]["passed"], true, "{status}");
}

/// Without --qa-dir the server reads no dataset from its disk: the spec is
/// refused with the hint to send the content (what the CLI does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_qa_dir_a_server_side_dataset_is_refused_with_the_hint() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let holdout = example("cancer-holdout.jsonl");
    let (status, body) = apply(&s, &bg_spec(holdout.to_str().unwrap(), None)).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("strategy.blue_green.qa.dataset")
            && error.contains("send the dataset's content with the spec")
            && error.contains("--qa-dir"),
        "{error}"
    );
    assert!(
        s.admin_get("/api/v1/models/cancer/rollouts")
            .await
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was started"
    );
}

/// A spec with 100 000 checks was accepted and made 15 MB events every
/// window; now it is refused naming the limit, as is a 5th webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_with_too_many_checks_is_refused_naming_the_limit() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let spec = |checks: Vec<Value>| {
        json!({"model": "cancer", "version": "2", "strategy": {"canary": {"steps": [{"weight": 100}]}},
               "analysis": {"checks": checks}})
    };
    let metric = json!({"metric": "error_rate", "max": 0.01});
    let (status, body) = apply(&s, &spec(vec![metric; 100_000])).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"],
        "analysis.checks has 100000 entries; at most 32 are allowed"
    );
    let hook = json!({"kind": "webhook", "url": "http://127.0.0.1:9/judge"});
    let (status, body) = apply(&s, &spec(vec![hook; 5])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("5 external checks (kind: webhook or prometheus), each called every window; at most 4 are allowed"),
        "{body}"
    );
    let notify: Vec<Value> = (0..9)
        .map(|i| json!({"url": format!("http://127.0.0.1:9/{i}")}))
        .collect();
    let mut many = spec(vec![]);
    many["notify"] = json!(notify);
    let (status, body) = apply(&s, &many).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "notify has 9 entries; at most 8 are allowed");
}

/// With --allow-outbound, a notify URL at another host (here the server
/// itself, as an attacker would aim it) is refused at apply time naming
/// the field and the flag; an allowed host is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_urls_off_allow_outbound_are_refused_at_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        &tmp.path().join("data"),
        &["--allow-outbound", "hooks.example.com,127.0.0.1:9"],
    )
    .await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    let spec = |url: String| {
        json!({"model": "cancer", "version": "2", "strategy": {"basic": {}},
               "notify": [{"url": url}]})
    };
    let own = s.at("/v2/repository/models/cancer/unload");
    let (status, body) = apply(&s, &spec(own.clone())).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"],
        format!(
            "notify[0].url {own:?} names a host that --allow-outbound does not list (allowed: hooks.example.com,127.0.0.1:9); use an allowed host or add it to the server's --allow-outbound"
        )
    );
    let mut check = spec("http://hooks.example.com/ok".into());
    check["strategy"] = json!({"canary": {"steps": [{"weight": 100}]}});
    check["analysis"] = json!({"checks": [{"kind": "prometheus", "address": "http://10.1.2.3:9090", "query": "up", "max": 1}]});
    let (status, body) = apply(&s, &check).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("analysis.checks[0].address \"http://10.1.2.3:9090\" names a host"),
        "{body}"
    );
    let (status, body) = apply(&s, &spec("http://127.0.0.1:9/hook".into())).await;
    assert_eq!(status, 201, "an allowed host is accepted: {body}");
}

/// A rollout stored before this version refused something in its spec
/// (here: analysis with a basic rollout, as an older Ferry took it) is not
/// retried as it was: `ferry retry` says why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_spec_this_version_refuses_is_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(&data, &[]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.deploy_canary("2", "10,100", "60s", &["--max-error-rate", "0.01"]);
    s.ferry_ok(&["abort", "cancer"]);
    let conn = rusqlite::Connection::open(data.join("ferry.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = conn
        .execute(
            "UPDATE rollouts SET spec = json_set(spec, '$.strategy', json('{\"basic\":{}}')) WHERE id = 1",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    let out = s.ferry(&["retry", "cancer"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && said.contains("r-1's spec no longer passes this version's checks: analysis is not used by strategy basic")
            && said.contains("ferry apply -f"),
        "{said}"
    );
}

/// Seeds `n` events of `model` straight into the database (as a long
/// history would have left them).
fn seed_events(data: &Path, model: &str, n: usize) {
    let conn = rusqlite::Connection::open(data.join("ferry.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    for i in 0..n {
        conn.execute(
            "INSERT INTO events (at, model, rollout, kind, message, data) VALUES (?1, ?2, NULL, 'note', ?3, '{}')",
            rusqlite::params!["2026-01-01T00:00:00.000Z", model, format!("seeded {i}")],
        )
        .unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// GETs with the admin token; returns status, the `Link` header and the answer.
async fn get(s: &Server, path: &str) -> (u16, Option<String>, Value) {
    let r = s
        .http
        .get(s.at(path))
        .bearer_auth(s.token())
        .send()
        .await
        .unwrap();
    let link = r
        .headers()
        .get("link")
        .map(|l| l.to_str().unwrap().to_string());
    (r.status().as_u16(), link, r.json().await.unwrap())
}

/// 2 500 events came back in one 5 MB answer; now they come in pages that
/// join to the whole history in order, the page size is bounded, and
/// `ferry history` still shows every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_pages_that_join_to_the_whole_history_and_history_shows_all() {
    let s = Server::start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    seed_events(&s.dir, "cancer", 2_500);
    let (status, _, all) = get(&s, "/api/v1/models/cancer/events?limit=10000").await;
    assert_eq!(status, 200);
    let all = all.as_array().unwrap().clone();
    assert_eq!(
        all.len(),
        2_502,
        "2 registration events and the seeded ones"
    );

    let mut joined = Vec::new();
    let mut next = Some("/api/v1/models/cancer/events?after=0&limit=700".to_string());
    while let Some(path) = next.take() {
        let (status, link, page) = get(&s, &path).await;
        assert_eq!(status, 200, "{path}: {page}");
        let page = page.as_array().unwrap();
        assert!(page.len() <= 700);
        joined.extend(page.iter().cloned());
        next = link.map(|l| {
            assert!(l.ends_with("; rel=\"next\""), "{l}");
            l.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_string()
        });
    }
    assert!(
        joined == all,
        "the pages join to every event, in order: {} events in pages, {} in all",
        joined.len(),
        all.len()
    );

    // Without a cursor: the most recent page, linking to the first.
    let (_, link, latest) = get(&s, "/api/v1/models/cancer/events").await;
    assert_eq!(
        latest.as_array().unwrap()[..],
        all[1_502..],
        "the 1000 most recent"
    );
    assert_eq!(
        link.as_deref(),
        Some("</api/v1/models/cancer/events?after=0&limit=1000>; rel=\"first\"")
    );
    for bad in ["limit=10001", "limit=0", "after=-1"] {
        let (status, _, body) = get(&s, &format!("/api/v1/models/cancer/events?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (_, _, body) = get(&s, "/api/v1/models/cancer/events?limit=10001").await;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("a page holds 1 to 10000 events"),
        "{body}"
    );

    let history = s.ferry_json(&["history", "cancer"]);
    assert_eq!(
        history.as_array().unwrap(),
        &all,
        "ferry history pages through everything"
    );
    let table = s.ferry_ok(&["history", "cancer"]);
    assert!(table.contains("seeded 0") && table.contains("seeded 2499"));
}

/// `--event-retention` deletes old events in the background, but never an
/// active rollout's, and never the rollout records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_retention_deletes_old_events_but_keeps_an_active_rollouts_and_the_rollouts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("data"), &["--event-retention", "3s"]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.start_rollout(&json!({"model": "cancer", "version": "2",
        "strategy": {"blue_green": {"scale_down_delay": "1m"}}}))
        .await;
    s.add("other", "1", "cancer-v1.onnx");
    let rollout_events = async || {
        get(&s, "/api/v1/models/cancer/rollouts/r-1/events")
            .await
            .2
            .as_array()
            .unwrap()
            .len()
    };
    let kept = rollout_events().await;
    assert!(kept > 0);
    // "other" registered after the rollout began: once its events are gone,
    // the rollout's (older) ones have been old enough for a while too.
    eventually(
        Duration::from_secs(20),
        "other's events deleted",
        async || s.event_kinds("other").await.is_empty(),
    )
    .await;
    assert_eq!(
        rollout_events().await,
        kept,
        "the active rollout's events stay"
    );
    assert!(
        s.event_kinds("cancer")
            .await
            .iter()
            .all(|k| k != "version_registered"),
        "registration events are not a rollout's: deleted"
    );
    s.ferry_ok(&["abort", "cancer"]);
    eventually(
        Duration::from_secs(20),
        "the ended rollout's events deleted",
        async || rollout_events().await == 0,
    )
    .await;
    let (_, _, history) = get(&s, "/api/v1/models/cancer/rollouts").await;
    assert_eq!(
        history[0]["rollout"], "r-1",
        "the rollout record stays: {history}"
    );
    assert_eq!(history[0]["phase"], "aborted");
}

/// A tiny HTTP server that answers every request with `status` and
/// `headers`, counting them. Returns its base URL and the count.
async fn counting_server(
    status: axum::http::StatusCode,
    headers: axum::http::HeaderMap,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let (counted, headers) = (counted.clone(), headers.clone());
        async move {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (status, headers)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hits)
}

/// An allowed webhook host that answers with a redirect cannot send Ferry
/// on to a host --allow-outbound does not list: redirects are not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_webhook_that_redirects_cannot_lead_ferry_off_the_allow_list() {
    use axum::http::{HeaderMap, StatusCode, header};
    use std::sync::atomic::Ordering;
    let (target, target_hits) = counting_server(StatusCode::OK, HeaderMap::new()).await;
    let mut location = HeaderMap::new();
    location.insert(
        header::LOCATION,
        format!("{target}/internal").parse().unwrap(),
    );
    let (hook, hook_hits) = counting_server(StatusCode::TEMPORARY_REDIRECT, location).await;
    let tmp = tempfile::tempdir().unwrap();
    let allowed = hook.trim_start_matches("http://").to_string();
    let s = Server::start_in(&tmp.path().join("data"), &["--allow-outbound", &allowed]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    s.add("cancer", "2", "cancer-v2.onnx");
    s.start_rollout(
        &json!({"model": "cancer", "version": "2", "strategy": {"basic": {}},
        "notify": [{"url": format!("{hook}/hook"), "events": ["succeeded"]}]}),
    )
    .await;
    // Three tries (1 s and 2 s apart), each answered 307 and not followed.
    eventually(
        Duration::from_secs(15),
        "three notify tries, or one followed redirect",
        async || hook_hits.load(Ordering::SeqCst) >= 3 || target_hits.load(Ordering::SeqCst) > 0,
    )
    .await;
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the redirect to a host off the list was followed"
    );
}
