//! `ferry traffic`: a load generator for trying things out — a fixed request
//! rate from the hold-out set (or zeros shaped like the model's input), with
//! user ids and extra headers, reporting requests, errors, latency
//! percentiles and which versions answered. `ferry demo` drives its traffic
//! with the same [`Load`].
//!
//! `--grpc` sends the same requests over the gRPC service instead (raw
//! tensor contents, the headers as metadata). The rate is open-loop: a
//! request's latency counts from when it should have been sent, so a
//! client or server that falls behind shows in the percentiles (as oha's
//! latency correction does). `--concurrency N` measures throughput
//! instead: N streams, each sending its next request when the last answers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};

use super::Output;
use super::client::Client;
use super::table;
use crate::metrics::sketch::Sketch;
use crate::units::HumanDuration;

#[derive(clap::Args, Debug)]
pub struct TrafficArgs {
    pub model: String,
    /// Requests per second.
    #[arg(long, default_value_t = 50.0)]
    pub rps: f64,
    /// How long to run, e.g. 30s.
    #[arg(long, default_value = "10s")]
    pub duration: HumanDuration,
    /// JSON Lines of V2 request bodies (a `label` field is ignored); default:
    /// zeros shaped like the model's input.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Simulate this many users, one id each, sent in --user-header.
    #[arg(long)]
    pub users: Option<u64>,
    #[arg(long, default_value = "x-user-id")]
    pub user_header: String,
    /// An extra header, k=v (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Send over gRPC to HOST:PORT (default: the server's host, port 8081).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "HOST:PORT")]
    pub grpc: Option<String>,
    /// Closed loop: this many streams, each sending as soon as its last
    /// request is answered (--rps is then ignored).
    #[arg(long)]
    pub concurrency: Option<usize>,
}

/// Where gRPC requests go, and the requests (the bodies, as tensors).
#[derive(Clone)]
pub struct GrpcLoad {
    /// HOST:PORT, named when it cannot be reached.
    pub address: Arc<str>,
    pub client: GrpcClient,
    pub requests: Arc<Vec<crate::protocol::grpc::pb::ModelInferRequest>>,
}

type GrpcClient =
    crate::protocol::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >;

impl GrpcLoad {
    /// A client of `address` (connected on first use) sending `bodies` to
    /// `model`.
    pub fn new(address: &str, model: &str, bodies: &[Value]) -> anyhow::Result<GrpcLoad> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .with_context(|| format!("--grpc {address:?} is not HOST:PORT"))?
            .tcp_nodelay(true)
            .connect_lazy();
        let requests = bodies
            .iter()
            .map(|b| {
                let body = serde_json::to_vec(b).expect("JSON values serialise");
                let request = crate::protocol::decode_request(&body, None)
                    .context("a request of --data is not a V2 inference request")?;
                Ok(crate::protocol::grpc::encode_request(
                    model,
                    None,
                    request.id.as_deref(),
                    &request.inputs,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(GrpcLoad {
            address: address.into(),
            client: GrpcClient::new(channel),
            requests: Arc::new(requests),
        })
    }
}

/// What a load generator sends.
#[derive(Clone)]
pub struct Load {
    pub http: reqwest::Client,
    pub url: String,
    pub bodies: Arc<Vec<Value>>,
    pub rps: f64,
    pub users: Option<(u64, String)>,
    pub headers: Vec<(String, String)>,
    /// Values cycled through for a header (e.g. regions), per request.
    pub rotate: Option<(String, Vec<String>)>,
}

/// How one request ended: the version that answered, or the kind of
/// failure and why.
type Answer = Result<String, (String, String)>;

/// What it saw.
#[derive(Default, Clone, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    /// Failures by HTTP status (or `connect` / `timeout`).
    pub errors: BTreeMap<String, u64>,
    /// Why, per kind of failure: the first answer's `error` (or the
    /// connection error with its causes).
    pub reasons: BTreeMap<String, String>,
    /// Answers per version (x-ferry-version).
    pub versions: BTreeMap<String, u64>,
    #[serde(skip)]
    pub latency: Sketch,
    /// Requests not sent because 256 were already waiting for answers.
    pub skipped: u64,
}

impl Stats {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn ms(&self, q: f64) -> Option<f64> {
        self.latency.quantile(q).map(|s| (s * 1e5).round() / 100.0)
    }
}

impl Load {
    /// Sends at the configured rate until `stop` is set or `duration`
    /// passes; `stats` is updated as answers come in. Latency counts from
    /// when each request was due.
    pub async fn run(
        &self,
        duration: Option<Duration>,
        stop: Arc<AtomicBool>,
        stats: Arc<Mutex<Stats>>,
    ) {
        self.run_over(None, duration, stop, stats).await
    }

    /// [`Load::run`], over gRPC when `grpc` is given.
    pub async fn run_over(
        &self,
        grpc: Option<GrpcLoad>,
        duration: Option<Duration>,
        stop: Arc<AtomicBool>,
        stats: Arc<Mutex<Stats>>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(256));
        let period = Duration::from_secs_f64(1.0 / self.rps.max(0.1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        let mut i: u64 = 0;
        let mut tasks = tokio::task::JoinSet::new();
        while !stop.load(Ordering::Relaxed) && duration.is_none_or(|d| started.elapsed() < d) {
            let due = ticker.tick().await.into_std();
            while tasks.try_join_next().is_some() {}
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                stats.lock().unwrap_or_else(|p| p.into_inner()).skipped += 1;
                continue;
            };
            let (load, grpc, stats) = (self.clone(), grpc.clone(), stats.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let answer = load.send(grpc.as_ref(), i, &stats).await;
                record(&stats, due.elapsed().as_secs_f64(), answer);
            });
            i += 1;
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Closed loop: `streams` senders, each sending its next request as soon
    /// as the last is answered, for `duration`.
    pub async fn run_closed(
        &self,
        grpc: Option<GrpcLoad>,
        streams: usize,
        duration: Duration,
        stats: Arc<Mutex<Stats>>,
    ) {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for stream in 0..streams {
            let (load, grpc, stats) = (self.clone(), grpc.clone(), stats.clone());
            tasks.spawn(async move {
                let mut i = stream as u64;
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let answer = load.send(grpc.as_ref(), i, &stats).await;
                    record(&stats, t.elapsed().as_secs_f64(), answer);
                    i += streams as u64;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// The `i`-th request's headers (user id, extra headers, rotated values).
    fn headers_of(&self, i: u64) -> Vec<(&str, String)> {
        let mut out: Vec<(&str, String)> = Vec::new();
        if let Some((n, header)) = &self.users {
            out.push((header, format!("user-{}", i % n.max(&1))));
        }
        for (k, v) in &self.headers {
            out.push((k, v.clone()));
        }
        if let Some((k, values)) = &self.rotate {
            out.push((k, values[(i as usize) % values.len()].clone()));
        }
        out
    }

    /// Sends the `i`-th request over HTTP or gRPC.
    async fn send(&self, grpc: Option<&GrpcLoad>, i: u64, stats: &Mutex<Stats>) -> Answer {
        match grpc {
            Some(grpc) => self.send_grpc(grpc, i).await,
            None => self.send_http(i, stats).await,
        }
    }

    async fn send_http(&self, i: u64, stats: &Mutex<Stats>) -> Answer {
        let mut rb = self
            .http
            .post(&self.url)
            .json(&self.bodies[(i as usize) % self.bodies.len()]);
        for (k, v) in self.headers_of(i) {
            rb = rb.header(k, v);
        }
        match rb.timeout(Duration::from_secs(10)).send().await {
            Ok(r) if r.status().is_success() => Ok(r
                .headers()
                .get("x-ferry-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string()),
            Ok(r) => {
                let kind = r.status().as_u16().to_string();
                let known = stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reasons
                    .contains_key(&kind);
                let why = if known {
                    String::new()
                } else {
                    server_error(r).await
                };
                Err((kind, why))
            }
            Err(e) => {
                let kind = if e.is_timeout() { "timeout" } else { "connect" };
                Err((kind.to_string(), super::client::error_chain(&e)))
            }
        }
    }

    async fn send_grpc(&self, grpc: &GrpcLoad, i: u64) -> Answer {
        let message = grpc.requests[(i as usize) % grpc.requests.len()].clone();
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_secs(10));
        for (k, v) in self.headers_of(i) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                v.parse(),
            ) {
                request.metadata_mut().insert(k, v);
            }
        }
        match grpc.client.clone().model_infer(request).await {
            Ok(r) => Ok(r
                .metadata()
                .get("x-ferry-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string()),
            Err(status)
                if status.code() == tonic::Code::Unavailable && status.metadata().is_empty() =>
            {
                Err((
                    "Unavailable".to_string(),
                    format!(
                        "{} (gRPC at {}; is the server's --grpc-listen elsewhere? pass --grpc HOST:PORT)",
                        status.message(),
                        grpc.address
                    ),
                ))
            }
            Err(status) => Err((format!("{:?}", status.code()), status.message().to_string())),
        }
    }
}

/// Counts one answer (and its latency) in `stats`.
fn record(stats: &Mutex<Stats>, secs: f64, answer: Answer) {
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    s.requests += 1;
    s.latency.add(secs);
    match answer {
        Ok(version) => {
            s.ok += 1;
            *s.versions.entry(version).or_default() += 1;
        }
        Err((kind, why)) => {
            *s.errors.entry(kind.clone()).or_default() += 1;
            if !why.is_empty() {
                s.reasons.entry(kind).or_insert(why);
            }
        }
    }
}

/// The `error` of a failed answer (its first 300 bytes otherwise).
async fn server_error(r: reqwest::Response) -> String {
    let body = r.bytes().await.unwrap_or_default();
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

/// Reads V2 request bodies (dropping `label`) from JSON Lines.
pub fn read_bodies(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_bodies(&text, &path.display().to_string())
}

/// Requests from JSON Lines text (`origin` names it in messages); a `label`
/// field is dropped.
pub fn parse_bodies(text: &str, origin: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut v: Value = serde_json::from_str(line)
            .with_context(|| format!("{origin} line {}: not JSON", i + 1))?;
        if let Some(o) = v.as_object_mut() {
            o.remove("label");
        }
        out.push(v);
    }
    anyhow::ensure!(!out.is_empty(), "{origin} has no requests");
    Ok(out)
}

/// One request of zeros shaped like the model's inputs (batch 1).
async fn zeros_for(client: &Client, model: &str) -> anyhow::Result<Value> {
    let (_, meta): (_, Value) = client
        .send(client.request(Method::GET, &format!("/v2/models/{model}")))
        .await?;
    let inputs: Vec<Value> = meta["inputs"]
        .as_array()
        .context("the model metadata lists no inputs")?
        .iter()
        .map(|i| {
            let shape: Vec<i64> = i["shape"].as_array().map(|s| s.iter().map(|d| d.as_i64().unwrap_or(1).max(1)).collect()).unwrap_or_default();
            let n: i64 = shape.iter().product();
            let zero = if i["datatype"] == "BOOL" { json!(false) } else { json!(0) };
            json!({"name": i["name"], "datatype": i["datatype"], "shape": shape, "data": vec![zero; n as usize]})
        })
        .collect();
    Ok(json!({"inputs": inputs}))
}

/// The headers with the CLI's token (`--token`, `FERRY_TOKEN` or the data
/// dir's admin token) as the bearer, unless an `authorization` header was
/// given: a server with an inference token takes it or the admin token.
fn with_token(mut headers: Vec<(String, String)>, token: Option<&str>) -> Vec<(String, String)> {
    if let Some(t) = token
        && !headers.iter().any(|(k, _)| k == "authorization")
    {
        headers.push(("authorization".to_string(), format!("Bearer {t}")));
    }
    headers
}

pub fn parse_header(s: &str) -> anyhow::Result<(String, String)> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .with_context(|| format!("--header {s:?} must be name=value"))
}

/// Prints a report (human or JSON).
pub fn report(stats: &Stats, seconds: f64, output: Output) {
    let rate = stats.requests as f64 / seconds.max(0.001);
    if output == Output::Json {
        let mut v = serde_json::to_value(stats).unwrap_or_default();
        v["seconds"] = json!(seconds);
        v["requests_per_second"] = json!(rate);
        v["latency_ms"] = json!({"p50": stats.ms(0.5), "p95": stats.ms(0.95), "p99": stats.ms(0.99), "max": stats.ms(1.0)});
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let ms = |q| stats.ms(q).map_or("-".into(), |m| format!("{m:.2} ms"));
    outln!(
        "{} requests in {seconds:.1} s ({rate:.1}/s): {} ok, {} failed{}",
        stats.requests,
        stats.ok,
        stats.failed(),
        if stats.skipped > 0 {
            format!(", {} not sent (client saturated)", stats.skipped)
        } else {
            String::new()
        }
    );
    outln!(
        "latency  p50 {}  p95 {}  p99 {}  max {}",
        ms(0.5),
        ms(0.95),
        ms(0.99),
        ms(1.0)
    );
    let rows: Vec<Vec<String>> = stats
        .versions
        .iter()
        .map(|(v, n)| {
            vec![
                v.clone(),
                n.to_string(),
                format!("{:.1}%", *n as f64 * 100.0 / stats.ok.max(1) as f64),
            ]
        })
        .collect();
    outln!("{}", table::render(&["VERSION", "ANSWERS", "SHARE"], &rows));
    for (k, n) in &stats.errors {
        match stats.reasons.get(k) {
            Some(why) => outln!("errors {k}: {n} ({why})"),
            None => outln!("errors {k}: {n}"),
        }
    }
}

/// The default gRPC address: the server's host, port 8081.
fn grpc_address_of(server: &str) -> anyhow::Result<String> {
    let url =
        reqwest::Url::parse(server).with_context(|| format!("server {server:?} is not a URL"))?;
    let host = url.host_str().context("the server URL has no host")?;
    Ok(format!("{host}:8081"))
}

/// `ferry traffic`. Exits 1 when requests were sent and none succeeded.
pub async fn run(client: &Client, args: TrafficArgs, output: Output) -> anyhow::Result<ExitCode> {
    crate::records::check_name("model", &args.model)?;
    anyhow::ensure!(
        args.rps > 0.0 && args.rps <= 100_000.0,
        "--rps must be between 0 and 100000"
    );
    let bodies = match &args.data {
        Some(p) => read_bodies(p)?,
        None => vec![zeros_for(client, &args.model).await?],
    };
    let load = Load {
        http: client.http().clone(),
        url: format!("{}/v2/models/{}/infer", client.base(), args.model),
        bodies: Arc::new(bodies),
        rps: args.rps,
        users: args.users.map(|n| (n, args.user_header.clone())),
        headers: with_token(
            args.headers
                .iter()
                .map(|h| parse_header(h))
                .collect::<anyhow::Result<_>>()?,
            client.token(),
        ),
        rotate: None,
    };
    let grpc = match &args.grpc {
        None => None,
        Some(address) => {
            let address = match address.as_str() {
                "" => grpc_address_of(client.base())?,
                given => given.to_string(),
            };
            Some(GrpcLoad::new(&address, &args.model, &load.bodies)?)
        }
    };
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let bar = (output == Output::Human).then(|| {
        let b = indicatif::ProgressBar::new(args.duration.0.as_millis() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
                .expect("a valid template"),
        );
        b
    });
    let started = Instant::now();
    let runner = {
        let (load, stop, stats) = (load.clone(), stop.clone(), stats.clone());
        let d = args.duration.0;
        match args.concurrency {
            Some(n) => tokio::spawn(async move { load.run_closed(grpc, n.max(1), d, stats).await }),
            None => tokio::spawn(async move { load.run_over(grpc, Some(d), stop, stats).await }),
        }
    };
    while !runner.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(b) = &bar {
            let s = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
            b.set_position(started.elapsed().as_millis() as u64);
            b.set_message(format!("{} requests, {} failed", s.requests, s.failed()));
        }
    }
    runner.await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let s = stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report(&s, started.elapsed().as_secs_f64(), output);
    if s.requests > 0 && s.ok == 0 {
        let why: Vec<String> = s.reasons.iter().map(|(k, w)| format!("{k}: {w}")).collect();
        eprintln!(
            "error: none of the {} requests succeeded{}",
            s.requests,
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn the_token_is_sent_as_the_bearer_unless_an_authorization_header_is_given() {
        assert_eq!(
            with_token(vec![h("x-region", "eu")], Some("t0k")),
            vec![h("x-region", "eu"), h("authorization", "Bearer t0k")]
        );
        let own = vec![parse_header("Authorization=Bearer inf").unwrap()];
        assert_eq!(with_token(own.clone(), Some("t0k")), own);
        assert_eq!(with_token(vec![], None), vec![]);
    }
}
