//! A version's pool of replicas and the choice of replica: the ready replica
//! with the fewest requests in flight. The pool also carries what the request
//! path records into: the version's breaker, metrics and telemetry series.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::FrontDoor;
use super::breaker::Breaker;
use crate::metrics::{Outcome, Role, Series, Telemetry, VersionMetrics};
use crate::protocol::Tensor;
use crate::records::ServingSettings;
use crate::runtime::{Engine, RuntimeError, Signature};
use crate::units::now_secs;

/// One running instance of a version.
pub struct Replica {
    engine: Engine,
    in_flight: AtomicUsize,
}

impl Replica {
    pub fn new(engine: Engine) -> Replica {
        Replica {
            engine,
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Decrements a replica's in-flight count (and the version's gauge)
/// however the request ends (answer, error, timeout, or the client going
/// away).
struct InFlight<'a>(
    &'a AtomicUsize,
    &'a prometheus_client::metrics::gauge::Gauge,
);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

/// The running replicas of one version, with what the gateway needs to call
/// them. Immutable once published; replaced whole when its settings change.
pub struct VersionPool {
    pub model: String,
    pub version: String,
    /// The version's name as an answer's `x-ferry-version` header says it,
    /// made once rather than for every request.
    pub version_header: Option<axum::http::HeaderValue>,
    pub signature: Signature,
    pub replicas: Vec<Replica>,
    /// The settings the replicas were started with (a change restarts the pool).
    pub settings: ServingSettings,
    pub metrics: VersionMetrics,
    /// Stops sending to this version when it fails in a failover chain.
    pub breaker: Breaker,
    telemetry: Arc<Telemetry>,
    series: [OnceLock<Arc<Series>>; 6],
    /// Dropped copies not yet in the shadow series (its lock was busy).
    drops_pending: std::sync::atomic::AtomicU64,
    /// When a failed shadow copy was last logged, and the failures since.
    shadow_errors: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// How often a shadow's failed copies are logged at most (with the count
/// of those not logged since).
const SHADOW_ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

impl VersionPool {
    pub fn new(
        model: String,
        version: String,
        signature: Signature,
        replicas: Vec<Replica>,
        settings: ServingSettings,
        metrics: VersionMetrics,
        telemetry: Arc<Telemetry>,
    ) -> VersionPool {
        VersionPool {
            model,
            version_header: axum::http::HeaderValue::from_str(&version).ok(),
            version,
            signature,
            replicas,
            settings,
            metrics,
            breaker: Breaker::default(),
            telemetry,
            series: Default::default(),
            drops_pending: std::sync::atomic::AtomicU64::new(0),
            shadow_errors: Default::default(),
        }
    }

    /// Requests running or queued on this version's replicas.
    pub fn in_flight(&self) -> usize {
        self.replicas.iter().map(Replica::in_flight).sum()
    }

    /// The version's own timeout (a route may set a shorter or longer one).
    pub fn timeout(&self) -> Duration {
        self.settings.timeout.0
    }

    fn series(&self, role: Role) -> &Arc<Series> {
        let i = Role::ALL.iter().position(|r| *r == role).expect("listed");
        self.series[i].get_or_init(|| self.telemetry.series(&self.model, &self.version, role))
    }

    /// Records one request's outcome in the Prometheus series and in the
    /// role's time window (with the front door it came through, and the
    /// predicted class when there is one).
    pub fn record(
        &self,
        role: Role,
        door: FrontDoor,
        outcome: Outcome,
        seconds: f64,
        class: Option<i64>,
    ) {
        self.metrics.record(outcome, seconds);
        self.series(role).record(now_secs(), |b| {
            match outcome {
                Outcome::Ok | Outcome::Error => {
                    b.requests += 1;
                    b.errors += u64::from(outcome == Outcome::Error);
                    b.grpc += u64::from(door == FrontDoor::Grpc);
                    b.latency.add(seconds);
                }
                Outcome::Rejected => b.rejected += 1,
            }
            if let Some(c) = class {
                b.classes.add(c, 1);
            }
        });
    }

    /// Keeps an example of this (shadow) version disagreeing with production.
    pub fn record_disagreement(&self, id: &str, primary: &Tensor, shadow: &Tensor) {
        let json =
            |t: &Tensor| serde_json::json!({"name": t.name, "shape": t.shape, "data": t.data});
        self.telemetry.record_disagreement(
            &self.model,
            &self.version,
            crate::metrics::Disagreement {
                id: id.to_string(),
                primary: json(primary),
                shadow: json(shadow),
            },
        );
    }

    /// Records a shadow comparison or a dropped copy on this (shadow) version.
    pub fn record_shadow(&self, f: impl FnOnce(&mut crate::metrics::window::Bucket)) {
        self.series(Role::Shadow).record(now_secs(), |b| {
            b.dropped += self.drops_pending.swap(0, Ordering::Relaxed);
            f(b);
        });
    }

    /// Counts a shadow copy dropped, on the request's own thread, without
    /// waiting: the shadow series' lock may be held by the copies' thread,
    /// which runs at the lowest priority (`gateway::copies`). A drop that
    /// finds it busy is added by the next one that does not, or by the
    /// copies' next record.
    pub fn shadow_dropped(&self) {
        self.metrics.dropped();
        self.drops_pending.fetch_add(1, Ordering::Relaxed);
        self.series(Role::Shadow).try_record(now_secs(), |b| {
            b.dropped += self.drops_pending.swap(0, Ordering::Relaxed);
        });
    }

    /// Says why a copy to this (shadow) version failed, in the log: nobody
    /// else sees a shadow's errors. At most once per
    /// [`SHADOW_ERROR_LOG_EVERY`], with the failures not logged since;
    /// whether this one was logged.
    pub fn shadow_failed(&self, error: &RuntimeError) -> bool {
        let mut seen = self.shadow_errors.lock().unwrap_or_else(|p| p.into_inner());
        let (last, unlogged) = &mut *seen;
        if last.is_some_and(|t| t.elapsed() < SHADOW_ERROR_LOG_EVERY) {
            *unlogged += 1;
            return false;
        }
        let more = match std::mem::take(unlogged) {
            0 => String::new(),
            n => format!(" ({n} more failed since the last such line)"),
        };
        tracing::warn!(
            model = %self.model,
            version = %self.version,
            "a shadow copy failed: {error}{more}; users are not affected (they get production's answers), and the shadow's errors count against it"
        );
        *last = Some(std::time::Instant::now());
        true
    }

    fn pick(&self) -> Option<&Replica> {
        self.replicas.iter().min_by_key(|r| r.in_flight())
    }

    /// Every replica is a remote endpoint (requests can pass through untouched).
    pub fn is_remote(&self) -> bool {
        !self.replicas.is_empty() && self.replicas.iter().all(|r| r.engine.is_remote())
    }

    /// Passes a request body through to the least busy remote replica.
    pub async fn forward(
        &self,
        body: bytes::Bytes,
        header_len: Option<&str>,
        id: &str,
        timeout: Duration,
    ) -> Result<crate::runtime::Passed, RuntimeError> {
        within(
            timeout,
            self.on_replica(async |engine: &Engine| {
                engine.forward(body, header_len, Some(id)).await
            }),
        )
        .await
    }

    /// Runs a request on the least busy replica, within `timeout`.
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        timeout: Duration,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        within(timeout, self.run(inputs)).await
    }

    /// [`VersionPool::infer`], with how long the answer took to be ready
    /// when the engine can tell it apart from this thread's own wait
    /// ([`Engine::infer_timed`]).
    pub async fn infer_timed(
        &self,
        inputs: Vec<Tensor>,
        id: &str,
        timeout: Duration,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError> {
        within(timeout, self.run_timed(inputs, id)).await
    }

    /// Runs a request on the least busy replica, for as long as it takes
    /// (the caller bounds it: the failover chain, per attempt).
    pub async fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        self.on_replica(async |engine: &Engine| engine.infer(inputs).await)
            .await
    }

    /// [`VersionPool::run`], with how long the answer took to be ready
    /// when the engine can tell it apart from this thread's own wait
    /// ([`Engine::infer_timed`]).
    pub async fn run_timed(
        &self,
        inputs: Vec<Tensor>,
        id: &str,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError> {
        self.on_replica(async |engine: &Engine| engine.infer_timed(inputs, Some(id)).await)
            .await
    }

    /// Calls the least busy replica, counting the request in flight until it
    /// ends however it ends.
    async fn on_replica<T>(
        &self,
        call: impl AsyncFnOnce(&Engine) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let replica = self.pick().ok_or_else(|| {
            RuntimeError::Unavailable(format!(
                "version \"{}\" of model \"{}\" has no running replica",
                self.version, self.model
            ))
        })?;
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.inc();
        let _guard = InFlight(&replica.in_flight, &self.metrics.in_flight);
        call(&replica.engine).await
    }
}

/// `call`'s answer, or [`RuntimeError::Timeout`] once `timeout` has passed
/// (the call is dropped: a replica's in-flight count goes down with it).
pub async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(RuntimeError::Timeout(timeout)))
}
