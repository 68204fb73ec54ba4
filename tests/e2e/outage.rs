//! A shared store's outage costs no inference request. Two `ferry serve`
//! instances on one PostgreSQL take traffic while PostgreSQL is stopped
//! (`pg_ctl stop -m fast`, then `-m immediate`: a crash), and while a TCP
//! proxy between them and PostgreSQL cuts every connection, or swallows
//! packets without a reset (a blackhole): every inference request is
//! answered, readiness stays 200, a registration gets 503 with the reason
//! and "nothing was changed" within seconds and leaves nothing behind; once
//! PostgreSQL is back, a registration succeeds and serves.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::harness::{Server, Traffic, batch, eventually, example};
use super::testpg;

/// Instances of `ferry serve` on one database, each with its own data dir.
pub struct Cluster {
    pub instances: Vec<Server>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts instance `a`, registers `cancer` 1 through it, then starts the
    /// others (which load it at start).
    pub async fn start_serving_cancer(url: &str, n: usize) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let first = ["--store", url, "--grpc-listen", "127.0.0.1:0"];
        let mut instances = vec![Server::start_in(&tmp.path().join("a"), &first).await];
        instances[0].add("cancer", "1", "cancer-v1.onnx");
        for i in 1..n {
            let dir = tmp.path().join(format!("{}", (b'a' + i as u8) as char));
            instances.push(Server::start_in(&dir, &["--store", url]).await);
        }
        Cluster {
            instances,
            _tmp: tmp,
        }
    }

    /// Each instance's data dir.
    pub fn dirs(&self) -> Vec<&Path> {
        self.instances.iter().map(|s| s.dir.as_path()).collect()
    }

    /// Traffic to `cancer` on every instance (40 requests/s each).
    fn traffic(&self) -> Vec<Traffic> {
        self.instances
            .iter()
            .map(|s| Traffic::start(s, 40, 4))
            .collect()
    }
}

/// Stops the traffic: every request must have been answered.
pub(super) async fn no_failed_inference(traffic: Vec<Traffic>) -> u64 {
    let mut answered = 0;
    for t in traffic {
        let seen = t.finish().await;
        assert!(
            seen.failures.is_empty(),
            "{} inference requests failed, e.g. {:?}",
            seen.failures.len(),
            &seen.failures[..seen.failures.len().min(3)]
        );
        answered += seen.answered();
    }
    answered
}

/// Registers a version over the control API; the answer's status, its
/// `Retry-After` and body, and how long it took.
async fn register(
    s: &Server,
    model: &str,
    version: &str,
) -> (u16, Option<String>, Value, Duration) {
    let bytes = std::fs::read(example("cancer-v2.onnx")).unwrap();
    let form = reqwest::multipart::Form::new()
        .text("spec", "{}")
        .part("artifact", reqwest::multipart::Part::bytes(bytes));
    let started = Instant::now();
    let r = s
        .http
        .put(s.at(&format!("/api/v1/models/{model}/versions/{version}")))
        .bearer_auth(s.token())
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json().await.unwrap_or(Value::Null);
    (status, retry, body, started.elapsed())
}

/// The files of a data dir's blob directory (staged uploads included).
fn blob_files(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

/// What every instance does while the store cannot be reached: readiness
/// 200, the model ready, its metadata and the repository index answered
/// from what it serves; a registration refused with 503, the reason and
/// nothing left behind (no staged upload, no blob); the CLI prints it.
async fn during_the_outage(cluster: &Cluster, shown_url: &str, within: Duration) {
    for s in &cluster.instances {
        let ready = s.http.get(s.at("/v2/health/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "a load balancer keeps every instance");
        let model = s
            .http
            .get(s.at("/v2/models/cancer/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(model.status(), 200);
        let meta = s.http.get(s.at("/v2/models/cancer")).send().await.unwrap();
        assert_eq!(meta.status(), 200);
    }
    let a = &cluster.instances[0];
    let before = blob_files(&a.dir);
    let (status, retry, body, took) = register(a, "cancer", "2").await;
    let error = body["error"].as_str().unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert!(
        error.starts_with(&format!("the store at {shown_url} is unreachable: "))
            && error.ends_with("; nothing was changed"),
        "{error}"
    );
    assert!(took < within, "the refusal took {took:?}");
    eprintln!("outage: a registration was refused in {took:?}");
    assert_eq!(
        blob_files(&a.dir),
        before,
        "nothing kept: no staged upload, no blob"
    );
    // Once the store is known down, the index answers at once from what
    // this instance serves.
    let started = Instant::now();
    let index = a.index().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let cancer =
        serde_json::json!({"name": "cancer", "version": "1", "state": "READY", "reason": ""});
    assert!(index.as_array().unwrap().contains(&cancer), "{index}");
    // The metrics of a model it serves: its own figures, marked incomplete,
    // at once.
    let started = Instant::now();
    let m = a
        .admin_get("/api/v1/models/cancer/metrics?window=10s")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(m["cluster"]["complete"], false, "{m}");
    assert!(m["series"].as_array().is_some_and(|s| !s.is_empty()), "{m}");
    grpc_during_the_outage(a).await;
    // The CLI says the same, and what it could not read.
    let out = a.ferry(&[
        "model",
        "add",
        "cancer",
        "2",
        "--file",
        example("cancer-v2.onnx").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nothing was changed") && err.contains("(HTTP 503)"),
        "{err}"
    );
    let out = a.ferry(&["status", "cancer"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is unreachable")
            && err.contains("the status of model \"cancer\" could not be read"),
        "{err}"
    );
}

/// Over gRPC: the server and the model ready, the index from what serves,
/// a repository load refused with UNAVAILABLE and REST's message.
async fn grpc_during_the_outage(a: &Server) {
    use ferry::protocol::grpc::pb;
    let mut grpc = super::grpc::client(a).await;
    let ready = grpc.server_ready(pb::ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
    let model = pb::ModelReadyRequest {
        name: "cancer".into(),
        version: String::new(),
    };
    assert!(grpc.model_ready(model).await.unwrap().into_inner().ready);
    let index = grpc
        .repository_index(pb::RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        index
            .models
            .iter()
            .any(|m| m.name == "cancer" && m.state == "READY"),
        "{index:?}"
    );
    let mut load = tonic::Request::new(pb::RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: "cancer".into(),
        parameters: Default::default(),
    });
    let bearer = format!("Bearer {}", a.token()).parse().unwrap();
    load.metadata_mut().insert("authorization", bearer);
    let refused = grpc.repository_model_load(load).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("is unreachable"), "{refused:?}");
}

/// After the outage: a registration succeeds through instance `a` (its
/// pool reconnected by itself) and the new model serves there.
async fn after_the_outage(cluster: &Cluster, model: &str) {
    let a = &cluster.instances[0];
    let mut last = Value::Null;
    eventually(
        Duration::from_secs(20),
        "a registration succeeds again",
        async || {
            let (status, _, body, _) = register(a, model, "1").await;
            last = body;
            status == 201
        },
    )
    .await;
    let (status, headers, body) = a
        .infer(&format!("/v2/models/{model}/infer"), &batch(2))
        .await;
    assert_eq!(status, 200, "{body} after {last}");
    assert_eq!(headers["x-ferry-version"], "1");
    converged(cluster, model).await;
}

/// Every instance catches up by itself: each serves the store's latest
/// route version (as `GET /api/v1/cluster` reports it) and answers for the
/// model registered after the outage.
async fn converged(cluster: &Cluster, model: &str) {
    let a = &cluster.instances[0];
    let mut view = Value::Null;
    eventually(
        Duration::from_secs(20),
        "every instance serves the latest route version",
        async || {
            view = a.admin_get("/api/v1/cluster").await;
            let latest = view["route_version"].as_i64();
            let instances = view["instances"].as_array().cloned().unwrap_or_default();
            instances.len() == cluster.instances.len()
                && instances
                    .iter()
                    .all(|i| i["live"] == true && i["route_version"].as_i64() == latest)
        },
    )
    .await;
    for s in &cluster.instances[1..] {
        let (status, _, body) = s
            .infer(&format!("/v2/models/{model}/infer"), &batch(2))
            .await;
        assert_eq!(status, 200, "{body}; the cluster: {view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_while_two_instances_serve_costs_no_inference_request() {
    let server = testpg::PgServer::start();
    let url = server.database();
    let cluster = Cluster::start_serving_cancer(&url, 2).await;
    let traffic = cluster.traffic();
    for (i, mode) in ["fast", "immediate"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.stop(mode);
        during_the_outage(&cluster, &url, Duration::from_secs(8)).await;
        server.restart();
        after_the_outage(&cluster, &format!("after_{mode}_{i}")).await;
    }
    let answered = no_failed_inference(traffic).await;
    assert!(answered > 100, "traffic ran: {answered} answers");
    eprintln!("outage: {answered} inference requests answered, none failed");
}

/// A TCP proxy between Ferry and PostgreSQL: it passes bytes, cuts every
/// connection and refuses new ones, or swallows everything without a
/// reset (connections hang, new ones too) until healed.
pub(super) struct Proxy {
    pub(super) port: u16,
    mode: watch::Sender<Mode>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Mode {
    Pass,
    Cut,
    Blackhole,
}

impl Proxy {
    pub(super) async fn start(to: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, watching) = watch::channel(Mode::Pass);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watching.borrow() == Mode::Cut {
                    continue; // dropped: refused
                }
                tokio::spawn(pipe(client, to, watching.clone()));
            }
        });
        Proxy { port, mode }
    }

    pub(super) fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

/// One connection through the proxy, both ways.
async fn pipe(client: TcpStream, to: u16, mode: watch::Receiver<Mode>) {
    if !pass(&mut mode.clone()).await {
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(copy(cr, sw, mode.clone()));
    copy(sr, cw, mode).await;
    let _ = up.await;
}

/// Waits while blackholed; false once cut.
async fn pass(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            Mode::Pass => return true,
            Mode::Cut => return false,
            Mode::Blackhole => {}
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if !pass(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
        };
        // Bytes read as the cut came are held (TCP would resend them).
        if !pass(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_cut_or_blackholed_between_ferry_and_postgres_cost_no_inference_request() {
    let direct = testpg::database();
    let server_port = testpg::shared().port;
    let proxy = Arc::new(Proxy::start(server_port).await);
    let url = direct.replace(&format!(":{server_port}/"), &format!(":{}/", proxy.port));
    let cluster = Cluster::start_serving_cancer(&url, 2).await;
    let traffic = cluster.traffic();

    // Every connection dropped, new ones refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Mode::Cut);
    during_the_outage(&cluster, &url, Duration::from_secs(8)).await;
    proxy.set(Mode::Pass);
    after_the_outage(&cluster, "after_cut").await;

    // Packets vanish: no reset, connections hang. Every call has its own
    // time limit, so the answer still comes within seconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Mode::Blackhole);
    during_the_outage(&cluster, &url, Duration::from_secs(12)).await;
    proxy.set(Mode::Pass);
    after_the_outage(&cluster, "after_blackhole").await;

    let answered = no_failed_inference(traffic).await;
    assert!(answered > 100, "traffic ran: {answered} answers");
    eprintln!("outage: {answered} inference requests answered, none failed");
    assert_eq!(cluster.dirs().len(), 2);
}
