//! Decides what serves and makes it so: loads versions into replica pools,
//! publishes routes, and records every change in the store *before* it takes
//! effect. On start-up it loads and warms everything the persisted state says
//! should serve before the server reports ready.
//!
//! Today it keeps each model's stable version serving (the first version
//! registered becomes stable) plus versions loaded through the repository API;
//! rollouts (strategies) build on the same load/publish steps.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::gateway::{ModelRoute, Replica, RouteTable, VersionPool};
use crate::metrics::Metrics;
use crate::registry::{
    Added, NewVersion, Registry, RegistryError, SettingsPatch, Source, VersionRecord,
};
use crate::runtime::{Engine, OnnxRuntime, RemoteClient, RemoteTarget, RuntimeError, Worker};
use crate::store::NewEvent;

/// The one writer of the route table.
pub struct Controller {
    registry: Arc<Registry>,
    routes: Arc<RouteTable>,
    onnx: Arc<OnnxRuntime>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    /// One change at a time: load/publish sequences never interleave.
    lock: tokio::sync::Mutex<()>,
    ready: AtomicBool,
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
    #[error("{0}")]
    Conflict(String),
}

impl From<crate::store::StoreError> for ControlError {
    fn from(e: crate::store::StoreError) -> Self {
        ControlError::Registry(e.into())
    }
}

impl Controller {
    pub fn new(
        registry: Arc<Registry>,
        routes: Arc<RouteTable>,
        onnx: Arc<OnnxRuntime>,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Controller {
        Controller {
            registry,
            routes,
            onnx,
            http,
            metrics,
            lock: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// True once start-up has loaded everything that should serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Loads every model's stable and loaded versions, then reports ready.
    /// A model that cannot start is logged with the reason and left unserved;
    /// the others serve.
    pub async fn start(&self) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        let models = self.registry.store().models()?;
        for model in models {
            if let Err(e) = self.refresh(&model.name).await {
                tracing::error!(model = %model.name, "not serving: {e}");
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Registers a version; the model's first version starts serving at once.
    pub async fn register(&self, new: NewVersion) -> Result<Added, ControlError> {
        let added = self.registry.add(new).await?;
        if added.stable || (!added.created && self.routes.model(&added.record.model).is_none()) {
            let _guard = self.lock.lock().await;
            self.refresh(&added.record.model).await?;
        }
        Ok(added)
    }

    /// Loads a version beside the stable one (repository `load`).
    pub async fn load(&self, model: &str, version: &str, who: &str) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        let record = self.registry.version(model, version)?;
        if !record.loaded && !self.is_stable(model, version)? {
            self.registry.store().set_loaded(
                model,
                version,
                true,
                NewEvent::new(
                    model,
                    "version_loaded",
                    format!("version {version} loaded (by {who})"),
                    serde_json::json!({"version": version, "by": who}),
                ),
            )?;
        }
        self.refresh(model).await
    }

    /// Unloads a version that is not stable (repository `unload`).
    pub async fn unload(&self, model: &str, version: &str, who: &str) -> Result<(), ControlError> {
        let _guard = self.lock.lock().await;
        let record = self.registry.version(model, version)?;
        if self.is_stable(model, version)? {
            return Err(ControlError::Conflict(format!(
                "version \"{version}\" is the stable version of model \"{model}\" and serves production traffic; it cannot be unloaded"
            )));
        }
        if record.loaded {
            self.registry.store().set_loaded(
                model,
                version,
                false,
                NewEvent::new(
                    model,
                    "version_unloaded",
                    format!("version {version} unloaded (by {who})"),
                    serde_json::json!({"version": version, "by": who}),
                ),
            )?;
        }
        self.refresh(model).await
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
            self.refresh(model).await?;
        }
        Ok(record)
    }

    /// Whether a version is in the published routes.
    pub fn serves(&self, model: &str, version: &str) -> bool {
        self.routes
            .model(model)
            .is_some_and(|r| r.versions.contains_key(version))
    }

    fn is_stable(&self, model: &str, version: &str) -> Result<bool, ControlError> {
        Ok(self.registry.stable(model)?.as_deref() == Some(version))
    }

    /// Brings the published route of `model` in line with the store: starts
    /// pools that are missing or whose settings changed, reuses the others,
    /// publishes once, and lets dropped pools drain.
    async fn refresh(&self, model: &str) -> Result<(), ControlError> {
        let store = self.registry.store();
        let Some(stable) = self.registry.stable(model)? else {
            self.routes.publish(model, None);
            return Ok(());
        };
        let current = self.routes.model(model);
        let wanted: Vec<VersionRecord> = store
            .versions(model)?
            .into_iter()
            .filter(|v| v.loaded || v.version == stable)
            .collect();
        let mut versions = HashMap::new();
        for record in wanted {
            let reusable = current
                .as_ref()
                .and_then(|r| r.versions.get(&record.version))
                .filter(|p| p.settings == record.settings);
            let pool = match reusable {
                Some(p) => p.clone(),
                None => Arc::new(self.start_pool(&record).await?),
            };
            versions.insert(record.version.clone(), pool);
        }
        let stable_pool = versions
            .get(&stable)
            .cloned()
            .ok_or_else(|| ControlError::Start {
                model: model.to_string(),
                version: stable.clone(),
                reason: "the stable version is not registered".into(),
            })?;
        self.routes.publish(
            model,
            Some(ModelRoute {
                stable: stable_pool,
                versions,
            }),
        );
        Ok(())
    }

    /// Starts every replica of a version and warms each one up; nothing is
    /// returned (or published) unless all are ready.
    async fn start_pool(&self, record: &VersionRecord) -> Result<VersionPool, ControlError> {
        let start_err = |reason: String| ControlError::Start {
            model: record.model.clone(),
            version: record.version.clone(),
            reason,
        };
        let warmup = record.signature.warmup_inputs();
        let mut replicas = Vec::new();
        match &record.source {
            Source::Onnx { digest, .. } => {
                warn_if_oversubscribed(record);
                let bytes = self
                    .registry
                    .artifact(digest)
                    .map_err(|e| start_err(e.to_string()))?;
                for i in 0..record.settings.replicas {
                    let (onnx, bytes, warmup) = (self.onnx.clone(), bytes.clone(), warmup.clone());
                    let threads = record.settings.threads as usize;
                    let name = format!("{}-{}-{i}", record.model, record.version);
                    let queue = record.settings.queue as usize;
                    let worker =
                        tokio::task::spawn_blocking(move || -> Result<Worker, RuntimeError> {
                            let mut session = onnx.session(&bytes, threads)?;
                            session.run(warmup)?;
                            Worker::spawn(&name, session, queue).map_err(|e| {
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
            Source::Remote { endpoints } => {
                for url in endpoints {
                    let target = RemoteTarget::parse(url, &record.model).map_err(start_err)?;
                    let client = RemoteClient::new(target, self.http.clone());
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
        Ok(VersionPool {
            model: record.model.clone(),
            version: record.version.clone(),
            signature: record.signature.clone(),
            replicas,
            settings: record.settings.clone(),
            timeout: record.settings.timeout.0,
            metrics: self.metrics.for_version(&record.model, &record.version),
        })
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
