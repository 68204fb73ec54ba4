//! Models, versions, labels and serving settings; content-addressed artifacts;
//! validation at registration. The registry says what *exists*; what *serves*
//! is the controller's business.
//!
//! A version is accepted only after it has been loaded and has answered a
//! warm-up inference: an invalid file is refused and nothing is stored.

pub mod blobs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::remote::RemoteAccess;
use crate::runtime::{OnnxRuntime, RemoteClient, RemoteTarget, Signature};
use crate::store::{DiskProblem, Inserted, NewEvent, Store, StoreError};
use crate::units::{HumanDuration, now_rfc3339};
pub use blobs::Blobs;

/// A model: the name clients call.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModelRecord {
    pub name: String,
    /// The version serving production traffic (the first one registered,
    /// until a rollout changes it).
    pub stable: Option<String>,
    pub created_at: String,
    /// Who took the model out of service (repository `unload`); it serves
    /// nothing until a repository `load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unloaded: Option<String>,
}

/// Where a version's answers come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// An ONNX file stored as `blobs/sha256/<digest>`.
    Onnx { digest: String, size: u64 },
    /// Endpoints of a remote V2 server; each one is a replica. `access`:
    /// TLS and headers, by reference (paths, variable names), never values.
    Remote {
        endpoints: Vec<String>,
        #[serde(default, skip_serializing_if = "RemoteAccess::is_empty")]
        access: RemoteAccess,
    },
}

/// How a version runs whenever it serves. For remote versions the replicas
/// are the endpoints, and `replicas`/`threads` do not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServingSettings {
    /// ONNX Runtime sessions, each on its own worker thread.
    pub replicas: u32,
    /// Intra-op threads per session; replicas × threads should not exceed the cores.
    pub threads: u32,
    /// Requests that may wait per replica before new ones get 503 + Retry-After.
    pub queue: u32,
    /// Longest wait for an answer before the request fails.
    #[schema(value_type = String, example = "2s")]
    pub timeout: HumanDuration,
    /// Adaptive batching: up to this many concurrent requests merged into
    /// one run (1: off).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch_max: u32,
    /// Adaptive batching: how long the first request of a batch waits for
    /// others (default 2ms when batching is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "2ms")]
    pub batch_delay: Option<HumanDuration>,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

impl Default for ServingSettings {
    fn default() -> Self {
        ServingSettings {
            replicas: 1,
            threads: 1,
            queue: 128,
            timeout: HumanDuration(Duration::from_secs(2)),
            batch_max: 1,
            batch_delay: None,
        }
    }
}

/// A change to some serving settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub replicas: Option<u32>,
    pub threads: Option<u32>,
    pub queue: Option<u32>,
    #[schema(value_type = Option<String>, example = "2s")]
    pub timeout: Option<HumanDuration>,
    pub batch_max: Option<u32>,
    #[schema(value_type = Option<String>, example = "2ms")]
    pub batch_delay: Option<HumanDuration>,
}

impl ServingSettings {
    /// The batching window, when batching is on.
    pub fn batching(&self) -> Option<(usize, Duration)> {
        (self.batch_max > 1).then(|| {
            (
                self.batch_max as usize,
                self.batch_delay.map_or(Duration::from_millis(2), |d| d.0),
            )
        })
    }

    pub fn apply(&self, patch: &SettingsPatch) -> ServingSettings {
        ServingSettings {
            replicas: patch.replicas.unwrap_or(self.replicas),
            threads: patch.threads.unwrap_or(self.threads),
            queue: patch.queue.unwrap_or(self.queue),
            timeout: patch.timeout.unwrap_or(self.timeout),
            batch_max: patch.batch_max.unwrap_or(self.batch_max),
            batch_delay: patch.batch_delay.or(self.batch_delay),
        }
    }

    /// Checks the ranges; the error names the setting and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between {lo} and {hi}, not {v}"))
            }
        };
        check("replicas", self.replicas.into(), 1, 64)?;
        check("threads", self.threads.into(), 1, 256)?;
        check("queue", self.queue.into(), 1, 1_000_000)?;
        check("batch_max", self.batch_max.into(), 1, 1024)?;
        if let Some(d) = self.batch_delay
            && d.0 > Duration::from_millis(100)
        {
            return Err(format!("batch_delay must be at most 100ms, not {d}"));
        }
        let t = self.timeout.0;
        if t < Duration::from_millis(1) || t > Duration::from_secs(600) {
            return Err(format!(
                "timeout must be between 1ms and 10m, not {}",
                self.timeout
            ));
        }
        Ok(())
    }
}

/// A registered version of a model (immutable but for its serving settings).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    pub source: Source,
    pub signature: Signature,
    pub labels: BTreeMap<String, String>,
    pub settings: ServingSettings,
    pub created_at: String,
    /// Loaded beside the stable version through the repository API, so it can
    /// be called with `/versions/{v}`.
    pub loaded: bool,
}

/// What a new version is made from.
pub enum Artifact {
    /// An uploaded ONNX file, staged in the blob dir with its digest.
    Onnx(blobs::Staged),
    /// Remote endpoints and how to reach them.
    Remote(Vec<String>, RemoteAccess),
}

/// A request to register a version.
pub struct NewVersion {
    pub model: String,
    pub version: String,
    pub artifact: Artifact,
    pub labels: BTreeMap<String, String>,
    pub settings: ServingSettings,
}

/// What registering did.
#[derive(Debug, Clone, PartialEq)]
pub struct Added {
    pub record: VersionRecord,
    /// False when the same artifact was already registered under that name.
    pub created: bool,
    /// The version became the model's stable version (its first).
    pub stable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A model or version name, label or setting that is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// The artifact does not load, or does not answer a warm-up inference.
    #[error("{0}")]
    Artifact(String),
    /// The name exists with different content, or the version is in use.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("storage failed: {0}")]
    Io(String),
    /// The disk refused a write (full, read-only); `what` names the write.
    #[error("{what}: {}", problem.advice())]
    Disk {
        problem: crate::store::DiskProblem,
        what: String,
    },
}

impl RegistryError {
    /// A failed disk write: `Disk` when the disk refused it (full,
    /// read-only), else `Io`; `what` names the write and its error.
    pub fn disk(e: std::io::Error, what: String) -> RegistryError {
        match DiskProblem::of_io(&e) {
            Some(problem) => RegistryError::Disk { problem, what },
            None => RegistryError::Io(what),
        }
    }
}

/// A client-supplied name as error messages show it: control characters
/// escaped, and at most 40 characters (then `…`), so a hostile name cannot
/// flood a message or a log line.
pub fn shown_name(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(40)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if name.chars().nth(40).is_some() {
        shown.push('…');
    }
    shown
}

/// The names [`check_name`] accepts, as a regular expression (for the
/// OpenAPI document).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$";

/// Checks a model or version name: 1–128 characters from `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (so never `.`, `..` or a path).
pub fn check_name(kind: &str, name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        let shown = shown_name(name);
        Err(RegistryError::Invalid(format!(
            "{kind} name \"{shown}\" is not allowed: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )))
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if labels.len() > 64 {
        return Err(RegistryError::Invalid(
            "at most 64 labels per version".into(),
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(RegistryError::Invalid(format!(
                "label key {k:?} is not allowed: use 1-63 characters from A-Z a-z 0-9 . _ - /"
            )));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(format!(
                "label {k:?}: the value must be at most 256 characters with no control characters"
            )));
        }
    }
    Ok(())
}

/// The registry service: validates and records versions.
pub struct Registry {
    store: Arc<dyn Store>,
    blobs: Arc<Blobs>,
    onnx: Arc<OnnxRuntime>,
    http: crate::runtime::remote::RemoteHttp,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<Blobs>,
        onnx: Arc<OnnxRuntime>,
        http: crate::runtime::remote::RemoteHttp,
    ) -> Registry {
        Registry {
            store,
            blobs,
            onnx,
            http,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where uploads are staged and artifacts stored.
    pub fn blobs(&self) -> &Arc<Blobs> {
        &self.blobs
    }

    /// The bytes of a stored ONNX artifact, verified against its digest.
    pub fn artifact(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        self.blobs.get(digest).map_err(RegistryError::Artifact)
    }

    /// The stable version of a model (None: the model is not registered).
    pub fn stable(&self, model: &str) -> Result<Option<String>, RegistryError> {
        Ok(self.store.model(model)?.and_then(|m| m.stable))
    }

    pub fn version(&self, model: &str, version: &str) -> Result<VersionRecord, RegistryError> {
        check_name("model", model)?;
        check_name("version", version)?;
        if let Some(v) = self.store.version(model, version)? {
            return Ok(v);
        }
        let known: Vec<String> = self
            .store
            .versions(model)?
            .into_iter()
            .map(|v| v.version)
            .collect();
        Err(RegistryError::NotFound(if known.is_empty() {
            format!(
                "model \"{model}\" is not registered; add it with `ferry model add {model} VERSION --file MODEL.onnx`"
            )
        } else {
            format!(
                "version \"{version}\" of model \"{model}\" is not registered; registered versions: {}",
                known.join(", ")
            )
        }))
    }

    /// Registers a version after loading it and running a warm-up inference.
    pub async fn add(&self, new: NewVersion) -> Result<Added, RegistryError> {
        check_name("model", &new.model)?;
        check_name("version", &new.version)?;
        check_labels(&new.labels)?;
        new.settings.validate().map_err(RegistryError::Invalid)?;
        let (source, signature) = match new.artifact {
            Artifact::Onnx(staged) => {
                let source = Source::Onnx {
                    digest: staged.digest.clone(),
                    size: staged.size,
                };
                if let Some(existing) = self.existing(&new.model, &new.version, &source)? {
                    return Ok(existing);
                }
                let onnx = self.onnx.clone();
                let blobs = self.blobs.clone();
                let signature =
                    tokio::task::spawn_blocking(move || -> Result<Signature, RegistryError> {
                        let signature = validate_onnx_file(&onnx, staged.path())?;
                        let size = staged.size;
                        blobs.adopt(staged).map_err(|e| {
                            let what = format!(
                                "cannot store the artifact ({size} bytes) in {}: {e}",
                                blobs.dir().display()
                            );
                            RegistryError::disk(e, what)
                        })?;
                        Ok(signature)
                    })
                    .await
                    .map_err(|e| RegistryError::Io(format!("validation task failed: {e}")))??;
                (source, signature)
            }
            Artifact::Remote(urls, access) => {
                access.validate().map_err(RegistryError::Invalid)?;
                if urls.is_empty() {
                    return Err(RegistryError::Invalid(
                        "a remote version needs at least one --url".into(),
                    ));
                }
                let targets = urls
                    .iter()
                    .map(|u| RemoteTarget::parse(u, &new.model))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(RegistryError::Invalid)?;
                let source = Source::Remote {
                    endpoints: targets.iter().map(RemoteTarget::display).collect(),
                    access: access.clone(),
                };
                if let Some(existing) = self.existing(&new.model, &new.version, &source)? {
                    return Ok(existing);
                }
                let signature = self
                    .validate_remote(targets, &access, new.settings.timeout.0)
                    .await?;
                (source, signature)
            }
        };
        let record = VersionRecord {
            model: new.model,
            version: new.version,
            source,
            signature,
            labels: new.labels,
            settings: new.settings,
            created_at: now_rfc3339(),
            loaded: false,
        };
        match self.store.insert_version(&record)? {
            Inserted::Created { stable } => Ok(Added {
                record,
                created: true,
                stable,
            }),
            Inserted::Exists(existing) => same_or_conflict(*existing, &record.source),
        }
    }

    fn existing(
        &self,
        model: &str,
        version: &str,
        source: &Source,
    ) -> Result<Option<Added>, RegistryError> {
        match self.store.version(model, version)? {
            None => Ok(None),
            Some(existing) => same_or_conflict(existing, source).map(Some),
        }
    }

    async fn validate_remote(
        &self,
        targets: Vec<RemoteTarget>,
        access: &RemoteAccess,
        timeout: Duration,
    ) -> Result<Signature, RegistryError> {
        let mut signature: Option<Signature> = None;
        for target in targets {
            let shown = target.display();
            let http = self
                .http
                .for_version(access, target.is_https())
                .map_err(|e| RegistryError::Invalid(format!("remote endpoint {shown}: {e}")))?;
            let client = RemoteClient::new(target, http);
            let sig = client
                .metadata(timeout)
                .await
                .map_err(|e| RegistryError::Artifact(format!("remote endpoint {shown}: {e}")))?;
            if let Some(first) = &signature
                && *first != sig
            {
                return Err(RegistryError::Artifact(format!(
                    "remote endpoint {shown} has a different signature from the first endpoint; all endpoints of a version must serve the same model"
                )));
            }
            tokio::time::timeout(timeout, client.infer(&sig.warmup_inputs()))
                .await
                .map_err(|_| {
                    RegistryError::Artifact(format!(
                        "remote endpoint {shown}: warm-up inference timed out after {timeout:?}"
                    ))
                })?
                .map_err(|e| {
                    RegistryError::Artifact(format!(
                        "remote endpoint {shown}: warm-up inference failed: {e}"
                    ))
                })?;
            signature = Some(sig);
        }
        Ok(signature.expect("at least one endpoint"))
    }

    /// Changes a version's serving settings; returns the updated record.
    pub fn set_settings(
        &self,
        model: &str,
        version: &str,
        patch: &SettingsPatch,
        who: &str,
    ) -> Result<VersionRecord, RegistryError> {
        let mut record = self.version(model, version)?;
        let settings = record.settings.apply(patch);
        settings.validate().map_err(RegistryError::Invalid)?;
        if settings == record.settings {
            return Ok(record);
        }
        self.store.update_settings(
            model,
            version,
            &settings,
            NewEvent::new(
                model,
                "settings_changed",
                format!(
                    "version {version} serving settings: replicas {}, threads {}, queue {}, timeout {} (by {who})",
                    settings.replicas, settings.threads, settings.queue, settings.timeout
                ),
                serde_json::json!({"version": version, "settings": settings, "by": who}),
            ),
        )?;
        record.settings = settings;
        Ok(record)
    }

    /// Removes a version that does not serve.
    pub fn remove(&self, model: &str, version: &str, who: &str) -> Result<(), RegistryError> {
        let record = self.version(model, version)?;
        if self.stable(model)?.as_deref() == Some(version) {
            return Err(RegistryError::Conflict(format!(
                "version \"{version}\" is the stable version of model \"{model}\" and serves production traffic; roll out another version first"
            )));
        }
        if record.loaded {
            return Err(RegistryError::Conflict(format!(
                "version \"{version}\" of model \"{model}\" is loaded; unload it first (POST /v2/repository/models/{model}/unload)"
            )));
        }
        if let Some(route) = self.store.route(model)?
            && route.versions().contains(version)
        {
            return Err(RegistryError::Conflict(format!(
                "version \"{version}\" of model \"{model}\" is part of the model's route (candidate, staging, failover or shadow); change the route first"
            )));
        }
        self.store.remove_version(
            model,
            version,
            NewEvent::new(
                model,
                "version_removed",
                format!("version {version} removed (by {who})"),
                serde_json::json!({"version": version, "by": who}),
            ),
        )?;
        Ok(())
    }
}

fn same_or_conflict(existing: VersionRecord, source: &Source) -> Result<Added, RegistryError> {
    if existing.source == *source {
        return Ok(Added {
            record: existing,
            created: false,
            stable: false,
        });
    }
    let what = match &existing.source {
        Source::Onnx { digest, .. } => format!("an ONNX file with sha256 {digest}"),
        Source::Remote { endpoints, .. } => format!("remote endpoints {}", endpoints.join(", ")),
    };
    Err(RegistryError::Conflict(format!(
        "version \"{}\" of model \"{}\" is already registered with different content ({what}); versions are immutable: register the new artifact under a new version",
        existing.version, existing.model
    )))
}

/// Loads an ONNX model and runs a warm-up inference; returns its signature.
pub fn validate_onnx(onnx: &OnnxRuntime, bytes: &[u8]) -> Result<Signature, RegistryError> {
    let session = onnx
        .session(bytes, 1)
        .map_err(|e| RegistryError::Artifact(e.to_string()))?;
    warm_up(session)
}

/// [`validate_onnx`] of a staged upload, read by ONNX Runtime from its file.
pub fn validate_onnx_file(
    onnx: &OnnxRuntime,
    path: &std::path::Path,
) -> Result<Signature, RegistryError> {
    let session = onnx.session_from_file(path, 1).map_err(|e| {
        // The staged file's name means nothing to the client.
        RegistryError::Artifact(
            e.to_string()
                .replace(&path.display().to_string(), "the upload"),
        )
    })?;
    warm_up(session)
}

fn warm_up(mut session: crate::runtime::onnx::OnnxSession) -> Result<Signature, RegistryError> {
    let signature = session.signature().clone();
    session.run(signature.warmup_inputs()).map_err(|e| {
        RegistryError::Artifact(format!(
            "the model loads but its warm-up inference failed: {e}"
        ))
    })?;
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_a_safe_character_set() {
        for ok in ["cancer", "v1", "2024-06-01", "a.b_c-d"] {
            assert!(check_name("model", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "a\0b",
            "-x",
            &"x".repeat(129),
            "é",
        ] {
            assert!(check_name("model", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_are_range_checked_and_patched() {
        let s = ServingSettings::default();
        assert!(s.validate().is_ok());
        let patched = s.apply(&SettingsPatch {
            replicas: Some(0),
            ..Default::default()
        });
        assert_eq!(
            patched.validate().unwrap_err(),
            "replicas must be between 1 and 64, not 0"
        );
        let patched = s.apply(&SettingsPatch {
            timeout: Some(HumanDuration(Duration::from_secs(3600))),
            ..Default::default()
        });
        assert!(
            patched
                .validate()
                .unwrap_err()
                .starts_with("timeout must be")
        );
    }

    #[test]
    fn labels_are_checked() {
        let mut labels = BTreeMap::new();
        labels.insert("git".to_string(), "abc123".to_string());
        assert!(check_labels(&labels).is_ok());
        labels.insert("bad key".to_string(), "x".to_string());
        assert!(check_labels(&labels).is_err());
    }
}
