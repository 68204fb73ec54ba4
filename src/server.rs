//! `ferry serve`: opens the data dir, loads ONNX Runtime, wires the store,
//! registry, controller, gateway and HTTP API together, and serves until
//! SIGINT/SIGTERM (in-flight requests finish first).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, AdminToken, AppState, Limits, RequestIds};
use crate::controller::{Controller, ControllerParts};
use crate::gateway::predlog::{PredictionLog, PredictionLogSettings};
use crate::gateway::recent::RecentPredictions;
use crate::gateway::{Gateway, RouteTable};
use crate::metrics::{Metrics, Telemetry};
use crate::registry::{Blobs, Registry};
use crate::runtime::{OnnxRuntime, remote};
use crate::store::{SqliteStore, Store};

/// Validated settings of `ferry serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub ort_library: Option<PathBuf>,
    pub limits: Limits,
    /// How long a version leaving the routes may take to finish its requests.
    pub drain_timeout: Duration,
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
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    create_private_dir(&opts.data_dir)
        .with_context(|| format!("cannot create the data dir {}", opts.data_dir.display()))?;
    let onnx = Arc::new(OnnxRuntime::load(opts.ort_library.as_deref())?);
    tracing::info!("ONNX Runtime loaded from {}", onnx.library.display());
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&opts.data_dir)
            .with_context(|| format!("cannot open the store in {}", opts.data_dir.display()))?,
    );
    let blobs = Arc::new(Blobs::open(&opts.data_dir).context("cannot open the artifact store")?);
    blobs.clean_temporaries();
    let (token, created) = AdminToken::load_or_create(&opts.data_dir)
        .context("cannot read or create the admin token")?;
    let token_path = opts.data_dir.join("admin-token");
    if created {
        tracing::info!("admin token created in {}", token_path.display());
    }
    let http = remote::http_client(Duration::from_secs(2));
    let metrics = Arc::new(Metrics::new());
    let telemetry = Arc::new(Telemetry::default());
    let routes = Arc::new(RouteTable::new());
    let registry = Arc::new(Registry::new(store, blobs, onnx.clone(), http.clone()));
    let controller = Arc::new(Controller::new(ControllerParts {
        registry,
        routes: routes.clone(),
        onnx,
        http,
        metrics: metrics.clone(),
        telemetry: telemetry.clone(),
        drain_timeout: opts.drain_timeout,
    }));
    let prediction_log = match opts.prediction_log.clone() {
        Some(settings) => {
            let path = settings.path.display().to_string();
            let log = PredictionLog::start(settings)
                .with_context(|| format!("cannot open the prediction log {path}"))?;
            tracing::info!("sampled prediction log: {path}");
            Some(log)
        }
        None => None,
    };
    let gateway = Gateway::new(
        routes,
        metrics.clone(),
        RecentPredictions::new(opts.remember_requests),
        prediction_log,
    );
    let state = AppState {
        controller: controller.clone(),
        gateway: Arc::new(gateway),
        metrics,
        telemetry,
        token: Arc::new(token),
        inference_token: match &opts.inference_token_file {
            Some(path) => {
                let (t, created) = AdminToken::from_file(path).with_context(|| {
                    format!(
                        "cannot read or create the inference token {}",
                        path.display()
                    )
                })?;
                tracing::info!(
                    "the data plane needs the inference token in {}{}",
                    path.display(),
                    if created { " (created)" } else { "" }
                );
                Some(Arc::new(t))
            }
            None => None,
        },
        ids: Arc::new(RequestIds::default()),
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
    tracing::info!(
        "data dir {}, admin token in {}",
        opts.data_dir.display(),
        token_path.display()
    );
    // Printed on stdout so scripts (and the tests) can find an ephemeral port.
    println!("ferry listening on http://{addr}");
    let starting = controller.clone();
    tokio::spawn(async move {
        match starting.start().await {
            Ok(()) => tracing::info!("ready: every registered model that should serve is loaded"),
            Err(e) => tracing::error!("start-up failed: {e}"),
        }
        starting.run_rollouts().await;
    });
    serve_connections(listener, api::router(state, opts.limits), &opts).await;
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections until SIGINT/SIGTERM, then stops accepting, closes
/// idle connections and waits for in-flight requests to finish. A client
/// that does not finish sending its request headers within
/// `header_read_timeout` is disconnected (slow-loris), and connections beyond
/// `max_connections` are closed at once.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    opts: &ServeOptions,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let (mut refused, mut last_refusal_log) = (0u64, None::<std::time::Instant>);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            // One line per second at most, so a flood cannot flood the log.
            refused += 1;
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(
                    "refused {refused} connection(s): already {} open (--max-connections)",
                    opts.max_connections
                );
                (refused, last_refusal_log) = (0, Some(std::time::Instant::now()));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
