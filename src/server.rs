//! `ferry serve`: opens the data dir, loads ONNX Runtime, wires the store,
//! registry, controller, gateway and HTTP API together, and serves until
//! SIGINT/SIGTERM (in-flight requests finish first, within the drain timeout).

mod slots;
mod threads;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, AdminToken, AppState, Limits};
use crate::controller::cluster::Identity;
use crate::controller::outbound::AllowList;
use crate::controller::{Controller, ControllerParts, Reach};
use crate::gateway::predlog::{PredictionLog, PredictionLogSettings};
use crate::gateway::recent::RecentPredictions;
use crate::gateway::{Gateway, RouteTable};
use crate::metrics::{Metrics, Telemetry};
use crate::registry::{Blobs, Registry};
use crate::runtime::{LoadLimits, OnnxRuntime, remote};
use crate::store::{BlobStore, BucketUrl, PostgresStore, S3Blobs, SqliteStore, Store, StoreUrl};
use crate::units::HumanDuration;

/// Validated settings of `ferry serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    /// `--store`: None is the data dir's `ferry.db` (today's single node).
    pub store: Option<StoreUrl>,
    /// `--artifacts`: a bucket that keeps the artifacts instead of the store.
    pub artifacts: Option<BucketUrl>,
    pub listen: SocketAddr,
    /// Serving threads (`--io-threads`; 0: one per core).
    pub io_threads: usize,
    /// Where the gRPC service listens (`None`: `--grpc-listen off`).
    pub grpc_listen: Option<SocketAddr>,
    pub ort_library: Option<PathBuf>,
    pub limits: Limits,
    /// How long a version leaving the routes may take to finish its requests.
    pub drain_timeout: Duration,
    /// How long a version's warm-up inference may run (registration and
    /// every load) before it is stopped and the version refused.
    pub load_timeout: Duration,
    /// Request ids remembered for delayed labels.
    pub remember_requests: usize,
    /// The optional sampled prediction log.
    pub prediction_log: Option<PredictionLogSettings>,
    /// When set, the data plane needs this token (created when missing).
    pub inference_token_file: Option<PathBuf>,
    /// A client must send its request headers within this long.
    pub header_read_timeout: Duration,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one peer address.
    pub max_connections_per_peer: usize,
    /// Which `Host` names and browser origins are accepted.
    pub head: api::head::HeadRules,
    /// When set, feedback may use this token instead of the admin token.
    pub feedback_token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain and key (both planes).
    pub tls: Option<TlsFiles>,
    /// What rollout specs may reach: `--qa-dir`, `--allow-outbound`.
    pub reach: Reach,
    /// `--event-retention`: events older than this are deleted.
    pub event_retention: Option<Duration>,
    /// `--advertise-url`: how other instances and the CLI reach this one
    /// (default: derived from the address bound).
    pub advertise_url: Option<String>,
    /// `--leader-lease`, `--leader-renew`: the leader's lease on a shared
    /// store.
    pub leader: crate::store::LeaseSettings,
    /// `--command-timeout`: how long a command asked of an instance that
    /// does not lead waits for the leader to take it.
    pub command_timeout: Duration,
}

/// Validates `--qa-dir` (an existing directory) and `--allow-outbound`.
pub fn reach(qa_dir: Option<PathBuf>, allow_outbound: Option<&str>) -> anyhow::Result<Reach> {
    let qa_dir = match qa_dir {
        Some(dir) => {
            let real = dir.canonicalize().with_context(|| {
                format!(
                    "--qa-dir {} cannot be used (it must be an existing directory)",
                    dir.display()
                )
            })?;
            anyhow::ensure!(
                real.is_dir(),
                "--qa-dir {} is not a directory; name the directory that holds QA datasets",
                dir.display()
            );
            Some(real)
        }
        None => None,
    };
    let outbound = allow_outbound
        .map(AllowList::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Reach { qa_dir, outbound })
}

/// Validates `--event-retention` (more than zero).
pub fn event_retention(d: Option<HumanDuration>) -> anyhow::Result<Option<Duration>> {
    match d {
        Some(d) if d.0.is_zero() => anyhow::bail!(
            "--event-retention must be more than 0 (e.g. 30d); leave it out to keep every event"
        ),
        d => Ok(d.map(|d| d.0)),
    }
}

/// The longest `--command-timeout`: a caller waits that long for a leader.
const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Validates `--command-timeout`: more than 0, at most 10 minutes.
pub fn command_timeout(d: HumanDuration) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        !d.0.is_zero() && d.0 <= MAX_COMMAND_TIMEOUT,
        "--command-timeout must be more than 0 and at most {MAX_COMMAND_TIMEOUT:?} (got {:?}): how long a command sent to an instance that does not lead waits for the leader to take it (e.g. 10s)",
        d.0
    );
    Ok(d.0)
}

/// The longest `--advertise-url` (it is written in every heartbeat and
/// shown by `ferry cluster`).
const MAX_ADVERTISE_URL: usize = 512;

/// Validates `--advertise-url`: an http:// or https:// URL with a host.
pub fn advertise_url(url: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(url) = url else { return Ok(None) };
    anyhow::ensure!(
        url.len() <= MAX_ADVERTISE_URL,
        "--advertise-url is {} bytes long; give at most {MAX_ADVERTISE_URL} (the address others reach this instance at, e.g. http://10.0.0.7:8080)",
        url.len()
    );
    anyhow::ensure!(
        !url.chars().any(|c| c.is_whitespace() || c.is_control()),
        "--advertise-url {url:?} holds a space or a control character; give an address such as http://10.0.0.7:8080"
    );
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {
            Ok(Some(url.trim_end_matches('/').to_string()))
        }
        _ => anyhow::bail!(
            "--advertise-url {url:?} is not an http:// or https:// URL with a host (e.g. http://10.0.0.7:8080)"
        ),
    }
}

/// Deletes events older than `retention`, now and then for ever (every
/// minute, sooner for a short retention), off the async threads.
async fn expire_events(store: Arc<dyn Store>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    loop {
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(std::time::UNIX_EPOCH);
        let cutoff = humantime::format_rfc3339_millis(cutoff).to_string();
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.delete_events_before(&cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!("deleted {n} events older than --event-retention"),
            Ok(Err(e)) => tracing::warn!("could not delete old events: {e}"),
            Err(e) => tracing::warn!("could not delete old events: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// A store `--store` named, opened and migrated, with the artifacts it
/// shares between instances (PostgreSQL keeps them; SQLite has none: its
/// data dir's blobs are the artifacts).
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub shared_blobs: Option<Arc<dyn BlobStore>>,
}

/// Opens the store `url` names (creating and migrating its schema).
pub fn open_store(url: &StoreUrl) -> anyhow::Result<OpenedStore> {
    Ok(match url {
        StoreUrl::Sqlite(file) => OpenedStore {
            store: Arc::new(SqliteStore::open_file(file)?),
            shared_blobs: None,
        },
        StoreUrl::Postgres(text) => {
            // Its errors name the server (without the password) already.
            let store = Arc::new(PostgresStore::open(text)?);
            tracing::info!("store: PostgreSQL at {}", store.shown_url());
            OpenedStore {
                store: store.clone(),
                shared_blobs: Some(store),
            }
        }
    })
}

impl OpenedStore {
    /// Keeps the artifacts in `bucket` (`--artifacts`) instead of the store:
    /// opened and checked now, so a wrong bucket or key stops the start.
    /// With SQLite the bucket holds a copy of every artifact and the data
    /// dir caches them.
    pub fn with_artifacts(self, bucket: Option<&BucketUrl>) -> anyhow::Result<OpenedStore> {
        let Some(bucket) = bucket else {
            return Ok(self);
        };
        let blobs = S3Blobs::open(bucket).context("cannot open --artifacts")?;
        tracing::info!("artifacts: in the bucket {bucket}");
        Ok(OpenedStore {
            store: self.store,
            shared_blobs: Some(Arc::new(blobs)),
        })
    }
}

/// Validates `--artifacts`.
pub fn bucket_url(artifacts: Option<&str>) -> anyhow::Result<Option<BucketUrl>> {
    artifacts
        .map(|text| BucketUrl::parse(text).map_err(|e| anyhow::anyhow!("--artifacts: {e}")))
        .transpose()
}

/// Validates `--store` (None: the data dir's SQLite database).
pub fn store_url(store: Option<&str>) -> anyhow::Result<Option<StoreUrl>> {
    store
        .map(|text| StoreUrl::parse(text).map_err(|e| anyhow::anyhow!("--store: {e}")))
        .transpose()
}

/// `--grpc-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpcListen(pub Option<SocketAddr>);

impl GrpcListen {
    /// `--grpc-listen`'s default (the cli's `default_value` says the same).
    pub const DEFAULT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        8081,
    ));
}

impl std::str::FromStr for GrpcListen {
    type Err = String;
    fn from_str(s: &str) -> Result<GrpcListen, String> {
        if s == "off" {
            return Ok(GrpcListen(None));
        }
        s.parse().map(|a| GrpcListen(Some(a))).map_err(|_| {
            format!("{s:?} is not an address (HOST:PORT, e.g. 127.0.0.1:8081) or \"off\"")
        })
    }
}

/// PEM files for `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let wired = wire(&opts)?;
    let tls = opts
        .tls
        .as_ref()
        .map(|files| tls_acceptor(files, b"http/1.1"))
        .transpose()?;
    let grpc_tls = match &opts.tls {
        Some(files) if opts.grpc_listen.is_some() => Some(tls_acceptor(files, b"h2")?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another server using it? choose one with --listen)",
                opts.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let grpc_listener = bind_grpc(opts.grpc_listen).await?;
    tracing::info!(
        "data dir {}, admin token in {}",
        opts.data_dir.display(),
        wired.token_path.display()
    );
    let grpc_addr = grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(grpc) = grpc_addr.filter(|a| opts.tls.is_none() && !a.ip().is_loopback()) {
        tracing::warn!(
            "gRPC listening on {grpc} without TLS: requests and tokens (in the authorization metadata) cross the network in plain text (use --tls-cert/--tls-key, or a TLS terminator in front)"
        );
    }
    let scheme = scheme(&opts, addr);
    let me = Identity::new(
        opts.advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}")),
    );
    announce(scheme, addr, grpc_addr, wired.dashboard_path);
    let controller = wired.state.controller.clone();
    start_models(controller.clone(), me, opts.leader);
    let mut head = opts.head.clone();
    head.loopback = addr.ip().is_loopback();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let grpc = grpc_listener.map(|listener| {
        let conns = Grpc {
            http: hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new()),
            service: crate::grpc::GrpcService::new(wired.state.clone(), &opts.limits),
            idle_timeout: opts.header_read_timeout,
            stopping: stopping.clone(),
        };
        Listening::new(listener, grpc_tls, conns, &opts)
    });
    let grpc = grpc.transpose()?;
    // The control API's requests run here, on the main runtime, beside the
    // controller; inference stays on the serving thread that accepted it.
    let app = api::service(wired.state, opts.limits, head)
        .with_control_runtime(tokio::runtime::Handle::current());
    let rest = Listening::new(listener, tls, Http1::new(app, &opts), &opts)?;
    let mut parts = Vec::new();
    for _ in 0..threads::count(opts.io_threads) {
        let grpc = grpc.as_ref().map(Listening::for_thread).transpose()?;
        parts.push((rest.for_thread()?, grpc));
    }
    // Only the threads' copies stay open: when the last one stops
    // accepting, new connections are refused.
    drop((rest, grpc));
    let opts = Arc::new(opts);
    threads::run(parts, move |(rest, grpc)| {
        let (opts, stopping) = (opts.clone(), stopping.clone());
        async move {
            let rest = rest.serve(&opts, stopping.clone());
            match grpc {
                Some(grpc) => {
                    tokio::join!(rest, grpc.serve(&opts, stopping));
                }
                None => rest.await,
            }
        }
    })
    .await?;
    // Every request answered: the background loops ended, the shadows'
    // last comparisons stored, hand the lease on and leave the cluster.
    controller.stop_background().await;
    controller.store_last_comparisons().await;
    controller.leave().await;
    tracing::info!("stopped");
    Ok(())
}

/// The server's parts, wired, before it listens.
struct Wired {
    state: AppState,
    token_path: PathBuf,
    /// The dashboard link, when the admin token was just created.
    dashboard_path: Option<String>,
}

/// Opens the data dir (store, artifacts, admin token), loads ONNX Runtime,
/// and wires the registry, controller, gateway and the API's state.
fn wire(opts: &ServeOptions) -> anyhow::Result<Wired> {
    create_private_dir(&opts.data_dir)
        .with_context(|| format!("cannot create the data dir {}", opts.data_dir.display()))?;
    let onnx = Arc::new(OnnxRuntime::load(opts.ort_library.as_deref())?);
    tracing::info!("ONNX Runtime loaded from {}", onnx.library.display());
    let store_url = opts
        .store
        .clone()
        .unwrap_or_else(|| StoreUrl::default_for(&opts.data_dir));
    let opened = open_store(&store_url)
        .with_context(|| match &opts.store {
            None => format!("cannot open the store in {}", opts.data_dir.display()),
            Some(url @ StoreUrl::Sqlite(_)) => format!("cannot open --store {}", url.shown()),
            // Its own errors name the server (without a password).
            Some(StoreUrl::Postgres(_)) => "cannot open --store".to_string(),
        })?
        .with_artifacts(opts.artifacts.as_ref())?;
    let blobs = Arc::new(Blobs::open(&opts.data_dir).context("cannot open the artifact store")?);
    blobs.clean_temporaries();
    let (token, created) = AdminToken::load_or_create(&opts.data_dir)
        .context("cannot read or create the admin token")?;
    let token_path = opts.data_dir.join("admin-token");
    if created {
        tracing::info!("admin token created in {}", token_path.display());
        warn_if_others_have_their_own_token(opened.store.as_ref(), &token_path);
    }
    let dashboard_path = created.then(|| token.dashboard_path());
    if let Some(retention) = opts.event_retention {
        tokio::spawn(expire_events(opened.store.clone(), retention));
    }
    let metrics = Arc::new(Metrics::new());
    let telemetry = Arc::new(Telemetry::default());
    let routes = Arc::new(RouteTable::new());
    let controller = controller(opts, onnx, opened, blobs, &metrics, &telemetry, &routes);
    let gateway = Gateway::new(
        routes,
        metrics.clone(),
        RecentPredictions::new(opts.remember_requests),
        prediction_log(opts)?,
    );
    let state = AppState {
        controller,
        gateway: Arc::new(gateway),
        metrics,
        telemetry,
        token: Arc::new(token),
        inference_token: optional_token(
            opts.inference_token_file.as_deref(),
            "inference",
            "the data plane needs the inference token in",
        )?,
        feedback_token: optional_token(
            opts.feedback_token_file.as_deref(),
            "feedback",
            "feedback also takes the token in",
        )?,
    };
    Ok(Wired {
        state,
        token_path,
        dashboard_path,
    })
}

/// The registry over the store and artifacts, and the controller that
/// starts what serves and publishes the routes.
fn controller(
    opts: &ServeOptions,
    onnx: Arc<OnnxRuntime>,
    opened: OpenedStore,
    blobs: Arc<Blobs>,
    metrics: &Arc<Metrics>,
    telemetry: &Arc<Telemetry>,
    routes: &Arc<RouteTable>,
) -> Arc<Controller> {
    let http = remote::RemoteHttp::new(Duration::from_secs(2), opts.limits.max_body_bytes);
    let limits = LoadLimits {
        max_input_bytes: opts.limits.max_body_bytes as u64,
        timeout: opts.load_timeout,
    };
    let mut registry = Registry::new(opened.store, blobs, onnx.clone(), http.clone(), limits);
    if let Some(shared) = opened.shared_blobs {
        registry = registry.with_shared_blobs(shared);
    }
    let registry = Arc::new(registry);
    Arc::new(Controller::new(ControllerParts {
        registry,
        routes: routes.clone(),
        onnx,
        http,
        metrics: metrics.clone(),
        telemetry: telemetry.clone(),
        drain_timeout: opts.drain_timeout,
        reach: opts.reach.clone(),
        limits,
        command_wait: opts.command_timeout,
    }))
}

/// The sampled prediction log, when `--prediction-log` asks for one.
fn prediction_log(opts: &ServeOptions) -> anyhow::Result<Option<PredictionLog>> {
    let Some(settings) = opts.prediction_log.clone() else {
        return Ok(None);
    };
    let path = settings.path.display().to_string();
    let log = PredictionLog::start(settings)
        .with_context(|| format!("cannot open the prediction log {path}"))?;
    tracing::info!("sampled prediction log: {path}");
    Ok(Some(log))
}

/// The `kind` token read from `path` (created when missing), if one is
/// configured; `says` opens the log line that names its file.
fn optional_token(
    path: Option<&std::path::Path>,
    kind: &str,
    says: &str,
) -> anyhow::Result<Option<Arc<AdminToken>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let (token, created) = AdminToken::from_file(path)
        .with_context(|| format!("cannot read or create the {kind} token {}", path.display()))?;
    tracing::info!(
        "{says} {}{}",
        path.display(),
        if created { " (created)" } else { "" }
    );
    Ok(Some(Arc::new(token)))
}

/// `https` or `http`, logged once: which certificate, or a warning when
/// plain HTTP listens beyond loopback.
fn scheme(opts: &ServeOptions, addr: SocketAddr) -> &'static str {
    match &opts.tls {
        Some(files) => {
            tracing::info!(
                "serving HTTPS with the certificate {}",
                files.cert.display()
            );
            "https"
        }
        None => {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "listening on {addr} without TLS: requests and tokens cross the network in plain text (use --tls-cert/--tls-key, or a TLS terminator in front)"
                );
            }
            "http"
        }
    }
}

/// Binds `--grpc-listen`. The default port taken (a second server on this
/// machine) serves REST all the same and says how to get gRPC; an address
/// the user chose must be served, or the start fails.
async fn bind_grpc(addr: Option<SocketAddr>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    Ok(match addr {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) if addr == GrpcListen::DEFAULT && e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::warn!(
                    "gRPC is not served: the default {addr} is in use (choose another with --grpc-listen ADDR, or --grpc-listen off)"
                );
                None
            }
            Err(e) => {
                return Err(e).with_context(|| {
                format!(
                    "cannot listen for gRPC on {addr} (is another server using it? choose one with --grpc-listen, or --grpc-listen off)"
                )
            });
            }
        },
        None => None,
    })
}

/// Says where the server listens, on stdout so scripts (and the tests) can
/// find an ephemeral port. One write, errors ignored: a reader that took its
/// line and left (as `ferry demo` does) must not stop the server.
fn announce(
    scheme: &str,
    addr: SocketAddr,
    grpc: Option<SocketAddr>,
    dashboard_path: Option<String>,
) {
    use std::io::Write;
    let mut started = format!("ferry listening on {scheme}://{addr}\n");
    // Once, when the token is new, and only to a person at a terminal (not
    // to a log a service manager keeps): a link that signs the dashboard in.
    if let Some(path) = dashboard_path.filter(|_| std::io::stdout().is_terminal()) {
        let host = if addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            addr
        };
        started.push_str(&format!(
            "dashboard (the link holds the admin token; treat it as the token): {scheme}://{host}{path}\n"
        ));
    }
    // After the dashboard link: scripts read the line after the address.
    if let Some(grpc) = grpc {
        started.push_str(&format!("ferry gRPC listening on {scheme}://{grpc}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(started.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Loads and warms every model that should serve, reports ready, then
/// follows the store's changes and runs the rollouts' background loop; the
/// listener answers meanwhile, and the instance reports itself from the
/// start. It competes for the leader's lease once ready (a leader that is
/// still loading would hold up every rollout).
fn start_models(controller: Arc<Controller>, me: Identity, lease: crate::store::LeaseSettings) {
    controller.identify(me.clone());
    controller.spawn_background(controller.clone().run_heartbeat(me.clone()));
    controller.spawn_background(controller.clone().run_flushing(me.clone()));
    let c = controller.clone();
    controller.spawn_background(async move {
        match c.start().await {
            Ok(()) => tracing::info!("ready: every registered model that should serve is loaded"),
            Err(e) => tracing::error!("start-up failed: {e}"),
        }
        c.campaign(&me, lease);
        c.spawn_background(c.clone().run_following(me));
        c.spawn_background(c.clone().run_commands(api::rollouts::answer));
        c.run_rollouts().await;
    });
}

/// How one accepted connection (plain or TLS) is served until it closes, or
/// until a graceful shutdown has let its requests finish.
trait Connections: Clone + Send + Sync + 'static {
    fn serve<S>(
        &self,
        peer: std::net::IpAddr,
        stream: S,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> impl Future<Output = ()> + Send
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
}

/// HTTP/1.1 for the REST API, the dashboard and `/metrics`.
#[derive(Clone)]
struct Http1 {
    http: hyper::server::conn::http1::Builder,
    app: api::dispatch::Dispatch,
}

impl Http1 {
    /// A client must send its request headers within
    /// `--header-read-timeout` (slow-loris; bodies are paced by the
    /// dispatcher).
    fn new(app: api::dispatch::Dispatch, opts: &ServeOptions) -> Http1 {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(opts.header_read_timeout);
        Http1 { http, app }
    }
}

impl Connections for Http1 {
    async fn serve<S>(
        &self,
        peer: std::net::IpAddr,
        stream: S,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let app = self.app.for_peer(peer);
        let connection = self
            .http
            .serve_connection(hyper_util::rt::TokioIo::new(stream), app);
        let _ = watcher.watch(connection).await;
    }
}

/// HTTP/2 for the gRPC service.
#[derive(Clone)]
struct Grpc {
    http: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    service: crate::grpc::GrpcService,
    /// A connection with no call running for this long is closed (GOAWAY;
    /// the REST port's `--header-read-timeout` for an idle connection).
    idle_timeout: Duration,
    /// Turns true when the server stops.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Connections for Grpc {
    async fn serve<S>(
        &self,
        _peer: std::net::IpAddr,
        stream: S,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (service, activity) = self.service.for_connection();
        let connection = self
            .http
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut stopping = self.stopping.clone();
        let mut check =
            tokio::time::interval((self.idle_timeout / 4).max(Duration::from_millis(50)));
        // Closed for idleness at this time: a client that never even
        // finished its handshake is dropped one idle timeout later. (When
        // the server stops, running calls get the drain timeout instead.)
        let mut idle_closed: Option<tokio::time::Instant> = None;
        let mut server_stopping = false;
        loop {
            tokio::select! {
                _ = connection.as_mut() => break,
                _ = stopping.wait_for(|stop| *stop), if !server_stopping => {
                    connection.as_mut().graceful_shutdown();
                    server_stopping = true;
                }
                _ = check.tick(), if !server_stopping => match idle_closed {
                    None if activity.idle_for(std::time::Instant::now()) >= self.idle_timeout => {
                        connection.as_mut().graceful_shutdown();
                        idle_closed = Some(tokio::time::Instant::now());
                    }
                    Some(at)
                        if at.elapsed() >= self.idle_timeout
                            && activity.idle_for(std::time::Instant::now()) > Duration::ZERO =>
                    {
                        break;
                    }
                    _ => {}
                },
            }
        }
        // Held until here, so a server stopping waits for this connection's
        // calls as it waits for REST's.
        drop(watcher);
    }
}

/// One listener and how its connections are served, as each serving thread
/// gets it: the same socket (a duplicated descriptor: every thread accepts
/// from it), and the connection slots shared by all threads.
struct Listening<C> {
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: C,
    slots: Arc<slots::Slots>,
}

impl<C: Connections> Listening<C> {
    fn new(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        conns: C,
        opts: &ServeOptions,
    ) -> anyhow::Result<Listening<C>> {
        Ok(Listening {
            listener: listener
                .into_std()
                .context("cannot hand the listener to the serving threads")?,
            tls,
            conns,
            slots: slots::Slots::new(opts.max_connections, opts.max_connections_per_peer),
        })
    }

    /// A serving thread's copy.
    fn for_thread(&self) -> anyhow::Result<Listening<C>> {
        Ok(Listening {
            listener: self
                .listener
                .try_clone()
                .context("cannot share the listener with a serving thread")?,
            tls: self.tls.clone(),
            conns: self.conns.clone(),
            slots: self.slots.clone(),
        })
    }

    /// Accepts and serves on this thread's runtime until the server stops.
    async fn serve(self, opts: &ServeOptions, stopping: tokio::sync::watch::Receiver<bool>) {
        match tokio::net::TcpListener::from_std(self.listener) {
            Ok(listener) => {
                serve_connections(listener, self.tls, self.conns, self.slots, opts, stopping).await
            }
            Err(e) => tracing::error!("a serving thread cannot accept connections: {e}"),
        }
    }
}

/// Accepts connections until SIGINT/SIGTERM, then stops accepting, closes
/// idle connections and waits for in-flight requests to finish. A client
/// that does not finish sending its request headers within
/// `header_read_timeout` is disconnected (slow-loris; with TLS the handshake
/// gets the same bound; bodies are paced by the dispatcher), and connections
/// beyond `max_connections`, or beyond `max_connections_per_peer` from one
/// address, are closed at once.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: impl Connections,
    slots: Arc<slots::Slots>,
    opts: &ServeOptions,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = stopping.wait_for(|stop| *stop);
    tokio::pin!(shutdown);
    let mut refusals = Refusals::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                drop(stream);
                refusals.refused(full, peer.ip(), opts);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            conns: conns.clone(),
            peer: peer.ip(),
            watcher: graceful.watcher(),
            handshake_timeout: opts.header_read_timeout,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            connection.serve(stream, tls).await;
            drop(slot);
        });
    }
    drop(listener);
    // In-flight requests finish within the drain timeout, whatever they
    // wait on (a warm-up that does not end included); the rest are cut off.
    if tokio::time::timeout(opts.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running after the drain timeout of {:?}; stopping without them",
            opts.drain_timeout
        );
    }
}

/// Connections refused since the last log line: one line per second at
/// most, so a flood cannot flood the log.
#[derive(Default)]
struct Refusals {
    count: u64,
    logged: Option<std::time::Instant>,
}

impl Refusals {
    fn refused(&mut self, full: slots::Full, peer: std::net::IpAddr, opts: &ServeOptions) {
        self.count += 1;
        if self
            .logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let refused = self.count;
        match full {
            slots::Full::Server => tracing::warn!(
                "refused {refused} connection(s): already {} open (--max-connections)",
                opts.max_connections
            ),
            slots::Full::Peer => tracing::warn!(
                "refused {refused} connection(s): {peer} already holds {} (--max-connections-per-peer)",
                opts.max_connections_per_peer
            ),
        }
        (self.count, self.logged) = (0, Some(std::time::Instant::now()));
    }
}

/// What serving one accepted connection needs.
struct Connection<C> {
    conns: C,
    peer: std::net::IpAddr,
    watcher: hyper_util::server::graceful::Watcher,
    /// How long a TLS handshake may take (the header read timeout).
    handshake_timeout: Duration,
}

impl<C: Connections> Connection<C> {
    /// Serves the connection, over TLS when the server has it: a client
    /// that sends plain HTTP to the HTTPS port gets a readable answer, one
    /// that does not finish its handshake in time is dropped.
    async fn serve(self, stream: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let Some(tls) = tls else {
            return self.conns.serve(self.peer, stream, self.watcher).await;
        };
        let handshake = async {
            if !starts_with_tls(&stream).await? {
                answer_plain_http_on_tls_port(stream).await;
                return Ok(None);
            }
            tls.accept(stream).await.map(Some)
        };
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(Some(stream))) => self.conns.serve(self.peer, stream, self.watcher).await,
            Ok(Ok(None)) => {}
            // A client that cannot or will not speak TLS: nothing to answer.
            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
            Err(_) => tracing::debug!("TLS handshake not finished in {:?}", self.handshake_timeout),
        }
    }
}

/// Whether a new connection opens with a TLS handshake record (0x16), read
/// without consuming it.
async fn starts_with_tls(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    Ok(n == 1 && first[0] == 0x16)
}

/// A plain-HTTP request on the HTTPS port gets a readable answer instead of
/// TLS noise, then the connection is closed.
async fn answer_plain_http_on_tls_port(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":"this port serves HTTPS: use https:// (plain HTTP was sent)"}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads `--tls-cert` (PEM certificate chain, leaf first) and `--tls-key`
/// (PEM private key: PKCS#8, PKCS#1 or SEC1) into an acceptor that offers
/// `alpn` (`http/1.1` for the REST port, `h2` for gRPC).
fn tls_acceptor(files: &TlsFiles, alpn: &[u8]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the certificate chain --tls-cert {} (expected PEM \"BEGIN CERTIFICATE\" blocks)",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "--tls-cert {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "cannot read the private key --tls-key {} (expected one PEM private key: PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS set-up")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .with_context(|| {
        format!(
            "--tls-key {} does not fit --tls-cert {} (or is a kind of key TLS cannot use)",
            files.key.display(),
            files.cert.display()
        )
    })?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Creates the data dir (and missing parents) readable by its owner only
/// (0700): it holds the admin token and every artifact. An existing
/// directory keeps the permissions its owner gave it.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// A new admin token made while other instances share the store: commands
/// and labels forwarded between instances carry the caller's token, so each
/// instance needs the same one. Said once, at start (the instances table of
/// an embedded store holds only this process's predecessors).
fn warn_if_others_have_their_own_token(
    store: &dyn crate::store::Store,
    token_path: &std::path::Path,
) {
    if !store.keeps_buckets() {
        return;
    }
    let others = match store.instances() {
        Ok(i) => i,
        Err(_) => return, // an outage is said elsewhere
    };
    let live = crate::controller::cluster::LIVE_WITHIN.as_millis() as u64;
    let now = crate::units::now_ms();
    let urls: Vec<String> = others
        .iter()
        .filter(|i| i.last_seen_ms + live >= now)
        .map(|i| i.report.url.clone())
        .collect();
    if let Some(first) = urls.first() {
        tracing::warn!(
            "this instance made a new admin token in {} while {} other instance(s) share the store (e.g. {first}): commands and labels forwarded between instances carry the caller's token, so every instance needs the same one; stop this instance, copy another's DATA_DIR/admin-token to {}, and start it again (docs/scale-out.md)",
            token_path.display(),
            urls.len(),
            token_path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_command_timeout_is_more_than_zero_and_at_most_ten_minutes() {
        let t = |s: &str| command_timeout(s.parse().unwrap());
        let e = t("0s").unwrap_err().to_string();
        assert!(e.contains("--command-timeout must be more than 0"), "{e}");
        assert!(t("11m").is_err());
        assert_eq!(t("10s").unwrap(), Duration::from_secs(10));
    }

    #[test]
    fn an_advertise_url_is_an_http_address_of_bounded_length_without_spaces() {
        let ok = |u: &str| super::advertise_url(Some(u.to_string()));
        assert_eq!(
            ok("http://10.0.0.7:8080/").unwrap().as_deref(),
            Some("http://10.0.0.7:8080")
        );
        for bad in [
            "ftp://h:1",
            "http://",
            "http:///x",
            "http://a b",
            "http://a\nb",
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("--advertise-url"), "{bad:?}: {e}");
        }
        let long = format!("http://{}", "a".repeat(600));
        let e = ok(&long).unwrap_err().to_string();
        assert!(e.contains("at most 512"), "{e}");
        assert_eq!(super::advertise_url(None).unwrap(), None);
    }

    use super::*;

    #[test]
    fn grpc_listen_takes_an_address_or_off_and_its_default_is_the_clis() {
        let default: GrpcListen = "127.0.0.1:8081".parse().unwrap();
        assert_eq!(default, GrpcListen(Some(GrpcListen::DEFAULT)));
        assert_eq!("off".parse::<GrpcListen>().unwrap(), GrpcListen(None));
        let err = "8081".parse::<GrpcListen>().unwrap_err();
        assert!(err.contains("HOST:PORT") && err.contains("off"), "{err}");
    }
}
