//! Decides what serves and makes it so: loads versions into replica pools,
//! publishes routes, and records every change in the store *before* it takes
//! effect. On start-up it loads and warms everything the persisted state says
//! should serve before the server reports ready.
//!
//! Every change goes through one sequence: start (and warm) the pools the
//! model's routing policy needs (`prepare`), persist the policy with its
//! event, publish the route in one swap and drain the pools that left
//! (`publish`). [`Controller::apply`] stores the policy on its own; a
//! rollout pass stores it in the same transaction as its new state.

pub mod cluster;
pub mod commands;
mod dataset;
mod external;
pub mod feedback;
pub mod outbound;
pub mod rollouts;
pub mod telemetry;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::gateway::{ModelRoute, Replica, RoutePolicy, RouteTable, VersionPool};
use crate::metrics::{Metrics, Role, Telemetry};
use crate::records::{EventKind, SettingsPatch, Source, VersionRecord};
use crate::registry::{Added, NewVersion, Registry, RegistryError};
use crate::runtime::{
    Batching, Engine, LoadLimits, OnnxRuntime, RemoteTarget, RuntimeError, Worker,
};
use crate::store::NewEvent;

/// The pools a route needs, started and warm, not yet published.
struct Prepared {
    /// The versions that serve (routed, and loaded beside them).
    wanted: Vec<String>,
    pools: HashMap<String, Arc<VersionPool>>,
}

/// The event that records a model's new route.
fn route_changed(model: &str, policy: &RoutePolicy, who: &str) -> NewEvent {
    NewEvent::new(
        model,
        EventKind::RouteChanged,
        format!("route: {} (by {who})", policy.describe()),
        serde_json::json!({"route": policy, "by": who}),
    )
}

/// The one writer of the route table.
pub struct Controller {
    registry: Arc<Registry>,
    routes: Arc<RouteTable>,
    onnx: Arc<OnnxRuntime>,
    http: crate::runtime::remote::RemoteHttp,
    metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    /// How long a pool that left the routes may take to finish its requests.
    drain_timeout: Duration,
    /// What a replica's warm-up may take (input bytes, time).
    limits: LoadLimits,
    /// One change at a time: load/publish sequences never interleave.
    lock: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    reach: Reach,
    /// Shadow counters as last fed to each mirroring rollout (by id).
    shadow_seen: std::sync::Mutex<std::collections::HashMap<i64, rollouts::ShadowReading>>,
    /// The store's route version whose changes this instance has applied.
    served: AtomicI64,
    /// Versions this instance could not load when following the store.
    failures: cluster::Failures,
    /// Since when each rollout waits for other instances to warm its route.
    warm_waits: cluster::WarmWaits,
    /// Who this instance is in the instances table, once it reports.
    me: std::sync::OnceLock<cluster::Identity>,
    /// Set by a graceful stop ([`Controller::leave`]): no more reports.
    leaving: std::sync::atomic::AtomicBool,
    /// The background loops ([`Controller::spawn_background`]), stopped
    /// by [`Controller::stop_background`].
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// How long a command stored for the leader waits to be taken
    /// (`--command-timeout`).
    command_wait: Duration,
}

/// What a rollout spec may reach outside the process (`ferry serve
/// --qa-dir`, `--allow-outbound`); the defaults keep the old behaviour for
/// outbound calls and refuse server-side QA datasets.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Server-side QA dataset paths resolve inside it; none are read without it.
    pub qa_dir: Option<std::path::PathBuf>,
    /// When set, notify, webhook and Prometheus URLs must name these hosts.
    pub outbound: Option<outbound::AllowList>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A version could not be started (its artifact, a replica, a warm-up).
    #[error("version \"{version}\" of model \"{model}\" could not start: {reason}")]
    Start {
        model: String,
        version: String,
        reason: String,
    },
    /// The request conflicts with what serves (e.g. unloading the stable version).
    #[error("{0}")]
    Conflict(String),
    /// A routing policy that cannot be applied; names the field.
    #[error("{0}")]
    Invalid(String),
    /// A command stored for the leader was taken by none within the bound,
    /// and was withdrawn: nothing was done.
    #[error(
        "no instance leading the rollouts took the command ({command}) within {}, so nothing was done (it was withdrawn and will not be executed); the instances may be electing a leader: try again in a few seconds, and if it goes on, see `ferry cluster`",
        crate::units::HumanDuration(*waited)
    )]
    NoLeader { command: String, waited: Duration },
    /// A command stored for the leader whose answer this instance cannot
    /// give (the leader took it and is silent, the store failed meanwhile):
    /// it may have been executed.
    #[error(
        "the command ({command}) was stored for the leader, but {why}; it may have been executed: look at the history (ferry history MODEL) before trying again"
    )]
    Unanswered { command: String, why: String },
}

impl ControlError {
    /// Whether a rollout write was refused by fencing (another instance
    /// leads in a newer term).
    pub fn fenced(&self) -> bool {
        matches!(
            self,
            ControlError::Registry(RegistryError::Store(
                crate::store::StoreError::Fenced { .. }
            ))
        )
    }
}

impl From<crate::store::StoreError> for ControlError {
    fn from(e: crate::store::StoreError) -> Self {
        ControlError::Registry(e.into())
    }
}

/// The services the controller drives.
pub struct ControllerParts {
    pub registry: Arc<Registry>,
    pub routes: Arc<RouteTable>,
    pub onnx: Arc<OnnxRuntime>,
    pub http: crate::runtime::remote::RemoteHttp,
    pub metrics: Arc<Metrics>,
    pub telemetry: Arc<Telemetry>,
    pub drain_timeout: Duration,
    pub reach: Reach,
    pub limits: LoadLimits,
    /// How long a command stored for the leader waits to be taken.
    pub command_wait: Duration,
}

impl Controller {
    pub fn new(p: ControllerParts) -> Controller {
        Controller {
            registry: p.registry,
            routes: p.routes,
            onnx: p.onnx,
            http: p.http,
            metrics: p.metrics,
            telemetry: p.telemetry,
            drain_timeout: p.drain_timeout,
            limits: p.limits,
            lock: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            reach: p.reach,
            shadow_seen: Default::default(),
            served: AtomicI64::new(0),
            failures: Default::default(),
            warm_waits: Default::default(),
            me: Default::default(),
            leaving: Default::default(),
            background: Default::default(),
            command_wait: p.command_wait,
        }
    }

    /// Runs one of the background loops (rollouts, commands, following
    /// the store, heartbeat, flushing) until [`Controller::stop_background`].
    pub fn spawn_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// At a graceful stop, before the last store writes: ends the
    /// background loops and waits until they have, while the runtime still
    /// runs. (A loop left to the runtime's own shutdown, inside a store
    /// call then, went on to poll a timer without a driver and panicked;
    /// and a rollout stepped after this would race the stop's writes.)
    pub async fn stop_background(&self) {
        let tasks = std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // A loop inside a blocking store call ends when the call does;
            // the store's own time limits bound it.
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// True once start-up has loaded everything that should serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Loads every model's routed and loaded versions, then reports ready.
    /// A model that cannot start is logged with the reason and left unserved;
    /// the others serve.
    pub async fn start(&self) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        // Read first: a change committed while the models load is applied
        // by the next catch-up.
        let route_version = self.registry.store().route_version()?;
        let models = self.registry.store().models()?;
        for model in models {
            if let Err(e) = self.follow_noting_failures(&model.name).await {
                tracing::error!(model = %model.name, "not serving: {e}");
            }
        }
        self.served.fetch_max(route_version, Ordering::AcqRel);
        if let Err(e) = self.resume_rollouts().await {
            tracing::error!("resuming rollouts: {e}");
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Registers a version; the model's first version starts serving at once.
    pub async fn register(&self, new: NewVersion) -> Result<Added, ControlError> {
        let added = self.registry.add(new).await?;
        if added.stable || (!added.created && self.routes.model(&added.record.model).is_none()) {
            let _guard = self.lock.lock().await;
            self.apply(&added.record.model, None).await?;
        }
        Ok(added)
    }

    /// The model's routing policy (the stored one, or stable-only).
    /// Whether this instance serves `model` now (its published routes, no
    /// store call).
    pub fn serves_model(&self, model: &str) -> bool {
        self.routes.model(model).is_some()
    }

    pub fn route(&self, model: &str) -> Result<RoutePolicy, ControlError> {
        if let Some(p) = self.registry.store().route(model)? {
            return Ok(p);
        }
        let stable = self
            .registry
            .stable(model)?
            .ok_or_else(|| self.registry.unknown_model(model))?;
        Ok(RoutePolicy::stable_only(&stable))
    }

    /// Replaces a model's routing policy: the versions it needs are started
    /// and warm before the policy is persisted and published.
    pub async fn set_route(
        &self,
        model: &str,
        policy: RoutePolicy,
        who: &str,
    ) -> Result<RoutePolicy, ControlError> {
        policy.validate().map_err(ControlError::Invalid)?;
        let _guard = self.lock.lock().await;
        self.route(model)?; // the model exists
        self.in_service(model)?;
        if let Some(active) = self.active_rollout(model)? {
            return Err(ControlError::Conflict(format!(
                "{} is rolling out version {} of \"{model}\" and owns its route; abort it first (`ferry abort {model}`)",
                active.name(),
                active.spec.version
            )));
        }
        self.check_contract(model, &policy)?;
        self.apply(model, Some((policy.clone(), who))).await?;
        Ok(policy)
    }

    /// Loads a version beside the routed ones (repository `load`); a model
    /// taken out of service comes back with its route (the stable version).
    pub async fn load(&self, model: &str, version: &str, who: &str) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        let record = self.registry.version(model, version)?;
        let policy = self.route(model)?;
        if self.unloaded_by(model)?.is_some() {
            self.registry.store().set_unloaded(
                model,
                None,
                NewEvent::new(
                    model,
                    EventKind::ModelLoaded,
                    format!(
                        "model {model} loaded: back in service, stable version {} (by {who})",
                        policy.stable
                    ),
                    serde_json::json!({"version": version, "stable": policy.stable, "by": who}),
                ),
            )?;
        }
        if !record.loaded && policy.stable != version {
            self.registry.store().set_loaded(
                model,
                version,
                true,
                NewEvent::new(
                    model,
                    EventKind::VersionLoaded,
                    format!("version {version} loaded (by {who})"),
                    serde_json::json!({"version": version, "by": who}),
                ),
            )?;
        }
        self.apply(model, None).await
    }

    /// Unloads a version the route does not use (repository `unload`).
    /// Unloading the stable version takes the whole model out of service, as
    /// Triton does (not ready, inference 503) until a repository `load`;
    /// refused while a rollout owns the model.
    pub async fn unload(&self, model: &str, version: &str, who: &str) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        let record = self.registry.version(model, version)?;
        let policy = self.route(model)?;
        if policy.stable == version {
            if let Some(active) = self.active_rollout(model)? {
                return Err(ControlError::Conflict(format!(
                    "{} is rolling out version {} of \"{model}\" and owns it; abort it first (`ferry abort {model}`), then unload",
                    active.name(),
                    active.spec.version
                )));
            }
            if self.unloaded_by(model)?.is_none() {
                self.registry.store().set_unloaded(
                    model,
                    Some(who),
                    NewEvent::new(
                        model,
                        EventKind::ModelUnloaded,
                        format!(
                            "model {model} unloaded: out of service, stable version {version} no longer answers (by {who})"
                        ),
                        serde_json::json!({"version": version, "by": who}),
                    ),
                )?;
            }
            return self.apply(model, None).await;
        }
        if policy.versions().contains(version) {
            return Err(ControlError::Conflict(format!(
                "version \"{version}\" of model \"{model}\" is in the model's route ({}); change the route first",
                policy.describe()
            )));
        }
        if record.loaded {
            self.registry.store().set_loaded(
                model,
                version,
                false,
                NewEvent::new(
                    model,
                    EventKind::VersionUnloaded,
                    format!("version {version} unloaded (by {who})"),
                    serde_json::json!({"version": version, "by": who}),
                ),
            )?;
        }
        self.apply(model, None).await
    }

    /// Who took the model out of service, if it is (repository `unload`).
    pub fn unloaded_by(&self, model: &str) -> Result<Option<String>, ControlError> {
        Ok(self.registry.store().model(model)?.and_then(|m| m.unloaded))
    }

    /// Refuses a change of what serves while the model is out of service.
    fn in_service(&self, model: &str) -> Result<(), ControlError> {
        match self.unloaded_by(model)? {
            None => Ok(()),
            Some(by) => Err(ControlError::Conflict(format!(
                "model \"{model}\" is unloaded (by {by}); load it first (POST /v2/repository/models/{model}/load)"
            ))),
        }
    }

    /// The model's rollout in progress, if any.
    fn active_rollout(
        &self,
        model: &str,
    ) -> Result<Option<crate::store::RolloutRecord>, ControlError> {
        Ok(self
            .registry
            .store()
            .rollouts(model, 1)?
            .into_iter()
            .find(|r| r.state.phase.is_active()))
    }

    /// Changes serving settings; a serving version restarts its pool with them
    /// (the new pool is warm before it replaces the old one, which drains).
    pub async fn set_settings(
        &self,
        model: &str,
        version: &str,
        patch: &SettingsPatch,
        who: &str,
    ) -> Result<VersionRecord, ControlError> {
        let _guard = self.lock.lock().await;
        let before = self.registry.version(model, version)?;
        let record = self.registry.set_settings(model, version, patch, who)?;
        if record.settings != before.settings && self.serves(model, version) {
            self.apply(model, None).await?;
        }
        Ok(record)
    }

    /// Whether a version is in the published routes.
    pub fn serves(&self, model: &str, version: &str) -> bool {
        self.routes
            .model(model)
            .is_some_and(|r| r.pools.contains_key(version))
    }

    /// Versions that take the same requests as the stable version must keep
    /// its contract (same inputs, at least the same outputs).
    fn check_contract(&self, model: &str, policy: &RoutePolicy) -> Result<(), ControlError> {
        let stable = self.registry.version(model, &policy.stable)?;
        let mut same_requests: Vec<&str> = policy.failover.iter().map(String::as_str).collect();
        same_requests.extend(policy.candidate.as_ref().map(|c| c.version.as_str()));
        same_requests.extend(policy.shadow.as_ref().map(|s| s.version.as_str()));
        for v in same_requests {
            let record = self.registry.version(model, v)?;
            let diffs = stable.signature.contract_differences(&record.signature);
            if !diffs.is_empty() {
                return Err(ControlError::Invalid(format!(
                    "version \"{v}\" does not keep the contract of the stable version \"{}\": {}",
                    policy.stable,
                    diffs.join("; ")
                )));
            }
        }
        if let Some(shadow) = &policy.shadow {
            let compared = self.registry.version(model, &shadow.version)?;
            compare_output(
                "shadow.compare.output",
                &shadow.compare.output,
                &stable,
                &compared,
            )?;
        }
        Ok(())
    }

    /// Brings the published route of `model` in line with its policy (the
    /// given one, else the stored one): starts the pools it needs (reusing
    /// running ones whose settings are unchanged), persists a new policy with
    /// its event, publishes once, and drains the pools that left.
    async fn apply(
        &self,
        model: &str,
        change: Option<(RoutePolicy, &str)>,
    ) -> Result<(), ControlError> {
        let store = self.registry.store();
        let Some(stable) = self.registry.stable(model)? else {
            self.routes.publish(model, None);
            return Ok(());
        };
        let policy = match &change {
            Some((p, _)) => p.clone(),
            None => store
                .route(model)?
                .unwrap_or_else(|| RoutePolicy::stable_only(&stable)),
        };
        if change.is_none()
            && let Some(by) = store.model(model)?.and_then(|m| m.unloaded)
        {
            let leaving = self
                .routes
                .model(model)
                .map(|r| r.pools.values().cloned().collect())
                .unwrap_or_default();
            self.metrics.set_routing(model, &[], &[]);
            self.routes
                .publish(model, Some(ModelRoute::unloaded(policy, &by)));
            self.telemetry.forget_idle(model, &[]);
            self.drain(leaving);
            return Ok(());
        }
        // The stored route is the cluster's; this instance serves its own
        // share of it (a rolling update across instances).
        let mine = self.own_route(&policy);
        let prepared = self.prepare(model, &mine).await?;
        if let Some((policy, who)) = &change {
            store.set_route(model, policy, route_changed(model, policy, who))?;
        }
        self.publish(model, mine, prepared);
        Ok(())
    }

    /// Starts (and warms) every pool `policy` needs, reusing running ones
    /// whose settings are unchanged. Nothing is stored or published: a
    /// version that cannot start fails here, before anything promised it.
    async fn prepare(&self, model: &str, policy: &RoutePolicy) -> Result<Prepared, ControlError> {
        let mut wanted: Vec<String> = policy.versions().into_iter().map(str::to_string).collect();
        for v in self.registry.store().versions(model)? {
            if v.loaded && !wanted.contains(&v.version) {
                wanted.push(v.version);
            }
        }
        let current = self.routes.model(model);
        let mut pools = HashMap::new();
        for version in &wanted {
            let mut record = self.registry.version(model, version)?;
            let replicas = policy.replicas.get(version).copied();
            if let Some(n) = replicas {
                record.settings.replicas = n;
            }
            let reusable = current
                .as_ref()
                .and_then(|r| r.pools.get(version))
                .filter(|p| p.settings == record.settings);
            let pool = match reusable {
                Some(p) => p.clone(),
                None => Arc::new(self.start_pool(&record, replicas).await?),
            };
            pools.insert(version.clone(), pool);
        }
        Ok(Prepared { wanted, pools })
    }

    /// Publishes `policy` with its prepared pools in one swap, and drains
    /// the pools that left.
    fn publish(&self, model: &str, policy: RoutePolicy, prepared: Prepared) {
        let Prepared { wanted, pools } = prepared;
        let leaving: Vec<Arc<VersionPool>> = self
            .routes
            .model(model)
            .map(|r| {
                r.pools
                    .values()
                    .filter(|old| !pools.values().any(|new| Arc::ptr_eq(old, new)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.publish_metrics(model, &policy);
        self.routes
            .publish(model, Some(ModelRoute::new(policy, pools)));
        let serving: Vec<&str> = wanted.iter().map(String::as_str).collect();
        self.telemetry.forget_idle(model, &serving);
        self.drain(leaving);
    }

    fn publish_metrics(&self, model: &str, policy: &RoutePolicy) {
        let mut roles = vec![(policy.stable.clone(), Role::Stable)];
        let mut weights = Vec::new();
        match &policy.candidate {
            Some(c) => {
                roles.push((c.version.clone(), Role::Candidate));
                weights.push((policy.stable.clone(), 100.0 - c.weight));
                weights.push((c.version.clone(), c.weight));
            }
            None => weights.push((policy.stable.clone(), 100.0)),
        }
        roles.extend(policy.staging.iter().map(|v| (v.clone(), Role::Staging)));
        roles.extend(policy.failover.iter().map(|v| (v.clone(), Role::Fallback)));
        roles.extend(
            policy
                .shadow
                .iter()
                .map(|s| (s.version.clone(), Role::Shadow)),
        );
        self.metrics.set_routing(model, &roles, &weights);
    }

    /// Lets pools that left the routes finish their in-flight requests, up to
    /// the drain timeout, then releases them (their worker threads stop once
    /// the last request holding them is done).
    fn drain(&self, pools: Vec<Arc<VersionPool>>) {
        let timeout = self.drain_timeout;
        for pool in pools {
            tokio::spawn(async move {
                let deadline = Instant::now() + timeout;
                while pool.in_flight() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                match pool.in_flight() {
                    0 => {
                        tracing::info!(model = %pool.model, version = %pool.version, "drained and unloaded")
                    }
                    n => tracing::warn!(
                        model = %pool.model,
                        version = %pool.version,
                        "{n} requests still running after the drain timeout of {timeout:?}; released, they finish on their replicas"
                    ),
                }
            });
        }
    }

    /// Starts every replica of a version and warms each one up; nothing is
    /// returned (or published) unless all are ready.
    /// `replicas` is the route's override: for a remote version, how many of
    /// its endpoints to use (default: all).
    async fn start_pool(
        &self,
        record: &VersionRecord,
        override_replicas: Option<u32>,
    ) -> Result<VersionPool, ControlError> {
        let start_err = |reason: String| ControlError::Start {
            model: record.model.clone(),
            version: record.version.clone(),
            reason,
        };
        let warmup = record
            .signature
            .warmup_inputs(self.limits.max_input_bytes)
            .map_err(start_err)?;
        let load_timeout = self.limits.timeout;
        let mut replicas = Vec::new();
        match &record.source {
            Source::Onnx { digest, .. } => {
                warn_if_oversubscribed(record);
                let bytes = Arc::new(
                    self.registry
                        .artifact(digest)
                        .map_err(|e| start_err(e.to_string()))?,
                );
                for i in 0..record.settings.replicas {
                    let (onnx, bytes, warmup) = (self.onnx.clone(), bytes.clone(), warmup.clone());
                    let threads = record.settings.threads as usize;
                    let name = format!("{}-{}-{i}", record.model, record.version);
                    let queue = record.settings.queue as usize;
                    let batching = record.settings.batching().map(|(max, delay)| Batching {
                        max,
                        delay,
                        sizes: Some(self.metrics.batch_sizes(&record.model, &record.version)),
                    });
                    let worker =
                        tokio::task::spawn_blocking(move || -> Result<Worker, RuntimeError> {
                            let mut session = onnx.session(&bytes, threads)?;
                            session.run_within(warmup, load_timeout)?;
                            Worker::spawn(&name, session, queue, batching).map_err(|e| {
                                RuntimeError::Unavailable(format!(
                                    "cannot start a worker thread: {e}"
                                ))
                            })
                        })
                        .await
                        .map_err(|e| start_err(format!("replica start-up task failed: {e}")))?
                        .map_err(|e| start_err(e.to_string()))?;
                    replicas.push(Replica::new(Engine::Local(worker)));
                }
            }
            Source::Remote { endpoints, access } => {
                // A route may run a version on fewer of its endpoints (a
                // rolling update's batches); by default, all of them.
                let n = override_replicas
                    .map_or(endpoints.len(), |n| (n as usize).min(endpoints.len()));
                for url in endpoints.iter().take(n) {
                    let target = RemoteTarget::parse(url, &record.model).map_err(start_err)?;
                    let client = self
                        .http
                        .client(target, access)
                        .map_err(|e| start_err(format!("{url}: {e}")))?;
                    tokio::time::timeout(record.settings.timeout.0, client.infer(&warmup))
                        .await
                        .map_err(|_| start_err(format!("warm-up of {url} timed out")))?
                        .map_err(|e| start_err(format!("warm-up of {url} failed: {e}")))?;
                    replicas.push(Replica::new(Engine::Remote(client)));
                }
            }
        }
        tracing::info!(
            model = %record.model,
            version = %record.version,
            replicas = replicas.len(),
            "version loaded and warm"
        );
        Ok(VersionPool::new(
            record.model.clone(),
            record.version.clone(),
            record.signature.clone(),
            replicas,
            record.settings.clone(),
            self.metrics.for_version(&record.model, &record.version),
            self.telemetry.clone(),
        ))
    }
}

/// Replicas × threads beyond the machine's cores make sessions compete for
/// CPU and raise tail latency; say so when a version asks for that.
fn warn_if_oversubscribed(record: &VersionRecord) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (record.settings.replicas * record.settings.threads) as usize;
    if threads > cores {
        tracing::warn!(
            model = %record.model,
            version = %record.version,
            "{} replicas x {} threads = {threads} inference threads on {cores} cores; they will compete for CPU \
             (lower --threads or --replicas with `ferry model set`)",
            record.settings.replicas,
            record.settings.threads
        );
    }
}

/// A shadow is compared on an output that both the stable version and the
/// shadow answer (`field` names the setting in the message).
pub(crate) fn compare_output(
    field: &str,
    output: &str,
    stable: &VersionRecord,
    shadow: &VersionRecord,
) -> Result<(), ControlError> {
    for (role, v) in [("stable", stable), ("shadow", shadow)] {
        if let Some(outputs) = v.signature.lacks_output(output) {
            return Err(ControlError::Invalid(format!(
                "{field} \"{output}\" is not an output of version \"{}\" (the {role}), whose outputs are: {outputs}; compare on one both versions answer",
                v.version
            )));
        }
    }
    Ok(())
}
