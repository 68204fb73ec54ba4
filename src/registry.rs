//! Models, versions, labels and serving settings; content-addressed artifacts;
//! validation at registration. The registry says what *exists*; what *serves*
//! is the controller's business.
//!
//! A version is accepted only after it has been loaded and has answered a
//! warm-up inference: an invalid file is refused and nothing is stored.

pub mod blobs;
pub mod copy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::records::EventKind;
use crate::records::{
    ModelRecord, NameError, RemoteAccess, ServingSettings, SettingsPatch, Source, VersionRecord,
    check_name, closest, shown_name,
};
use crate::runtime::{LoadLimits, OnnxRuntime, RemoteTarget, RuntimeError, Signature};
use crate::store::{BlobStore, DiskProblem, Event, Inserted, NewEvent, Page, Store, StoreError};
use crate::units::now_rfc3339;
pub use blobs::Blobs;

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

impl From<NameError> for RegistryError {
    fn from(e: NameError) -> RegistryError {
        RegistryError::Invalid(e.to_string())
    }
}

/// The registry service: validates and records versions.
pub struct Registry {
    store: Arc<dyn Store>,
    blobs: Arc<Blobs>,
    /// Where every instance finds artifacts (a shared store); `blobs` is
    /// then this instance's cache of it.
    shared: Option<Arc<dyn BlobStore>>,
    onnx: Arc<OnnxRuntime>,
    http: crate::runtime::remote::RemoteHttp,
    /// What a warm-up at registration may take (input bytes, time).
    limits: LoadLimits,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<Blobs>,
        onnx: Arc<OnnxRuntime>,
        http: crate::runtime::remote::RemoteHttp,
        limits: LoadLimits,
    ) -> Registry {
        Registry {
            store,
            blobs,
            shared: None,
            onnx,
            http,
            limits,
        }
    }

    /// Keeps artifacts in `shared` too (every instance reads them there);
    /// the local blob dir becomes a cache of it.
    pub fn with_shared_blobs(mut self, shared: Arc<dyn BlobStore>) -> Registry {
        self.shared = Some(shared);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether the store is known to be unreachable now (an outage): the
    /// data plane then answers from what this instance serves at once.
    pub fn store_known_unreachable(&self) -> bool {
        self.store.known_unreachable()
    }

    /// Every model, by name.
    pub fn models(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        Ok(self.store.models()?)
    }

    /// A model, if it is registered.
    pub fn model(&self, model: &str) -> Result<Option<ModelRecord>, RegistryError> {
        Ok(self.store.model(model)?)
    }

    /// A model's versions, in the order they were registered.
    pub fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, RegistryError> {
        Ok(self.store.versions(model)?)
    }

    /// A page of a model's events, oldest first.
    pub fn events(&self, model: &str, page: Page) -> Result<Vec<Event>, RegistryError> {
        Ok(self.store.events(model, page)?)
    }

    /// Where uploads are staged and artifacts stored.
    pub fn blobs(&self) -> &Arc<Blobs> {
        &self.blobs
    }

    /// The bytes of a stored ONNX artifact, verified against its digest.
    /// With a shared store, a blob missing from (or corrupted in) the local
    /// cache is fetched from it first.
    pub fn artifact(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let local = match self.blobs.get(digest) {
            Ok(bytes) => return Ok(bytes),
            Err(local) => local,
        };
        let Some(shared) = &self.shared else {
            return Err(RegistryError::Artifact(local));
        };
        if !self.blobs.fetch(digest, &**shared)? {
            return Err(RegistryError::Artifact(format!(
                "{local}; the shared store has no copy either: re-register the version from the original file"
            )));
        }
        tracing::info!(
            "artifact sha256:{digest} fetched from the shared store into the local cache"
        );
        self.blobs.get(digest).map_err(RegistryError::Artifact)
    }

    /// The stable version of a model (None: the model is not registered).
    pub fn stable(&self, model: &str) -> Result<Option<String>, RegistryError> {
        Ok(self.store.model(model)?.and_then(|m| m.stable))
    }

    /// The error for a model that is not registered: how to add it, and the
    /// registered name it was probably meant to be (a typo).
    pub fn unknown_model(&self, model: &str) -> RegistryError {
        let names: Vec<String> = self
            .store
            .models()
            .map(|m| m.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        let shown = shown_name(model);
        let hint = match closest(model, &names) {
            Some(near) => format!("did you mean \"{near}\"? Otherwise add it"),
            None => "add it".to_string(),
        };
        RegistryError::NotFound(format!(
            "model \"{shown}\" is not registered; {hint} with `ferry model add {shown} VERSION --file MODEL.onnx`"
        ))
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
        if known.is_empty() {
            return Err(self.unknown_model(model));
        }
        Err(RegistryError::NotFound(format!(
            "version \"{version}\" of model \"{model}\" is not registered; registered versions: {}",
            known.join(", ")
        )))
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
                (source, self.validate_and_keep(staged).await?)
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

    /// Validates a staged ONNX upload, then stores it under its digest
    /// (in the shared store when there is one, then locally) before any
    /// record names it: off the async threads. The shared copy comes first,
    /// from the staged file: when the shared store cannot take it, the
    /// staged file is removed and nothing is kept anywhere (a blob's chunks
    /// are invisible until its last row is written).
    async fn validate_and_keep(&self, staged: blobs::Staged) -> Result<Signature, RegistryError> {
        let onnx = self.onnx.clone();
        let blobs = self.blobs.clone();
        let shared = self.shared.clone();
        let limits = self.limits;
        let signature = tokio::task::spawn_blocking(move || -> Result<Signature, RegistryError> {
            let signature = validate_onnx_file(&onnx, staged.path(), limits)?;
            if let Some(shared) = shared {
                share(&staged, &*shared)?;
            }
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
        Ok(signature)
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
            let client = self
                .http
                .client(target, access)
                .map_err(|e| RegistryError::Invalid(format!("remote endpoint {shown}: {e}")))?;
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
            let warmup = sig
                .warmup_inputs(self.limits.max_input_bytes)
                .map_err(|e| RegistryError::Artifact(format!("remote endpoint {shown}: {e}")))?;
            tokio::time::timeout(timeout, client.infer(&warmup))
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
                EventKind::SettingsChanged,
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
                EventKind::VersionRemoved,
                format!("version {version} removed (by {who})"),
                serde_json::json!({"version": version, "by": who}),
            ),
        )?;
        Ok(())
    }
}

/// Copies a staged upload into the shared store, read from its file chunk
/// by chunk (a no-op when it is there already).
fn share(staged: &blobs::Staged, shared: &dyn BlobStore) -> Result<(), RegistryError> {
    let digest = &staged.digest;
    let mut file = std::fs::File::open(staged.path()).map_err(|e| {
        RegistryError::Io(format!(
            "cannot read artifact sha256:{digest} to share it: {e}"
        ))
    })?;
    shared.put_blob(digest, &mut file)?;
    Ok(())
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

/// Loads an ONNX model and runs a warm-up inference within `limits`;
/// returns its signature.
pub fn validate_onnx(
    onnx: &OnnxRuntime,
    bytes: &[u8],
    limits: LoadLimits,
) -> Result<Signature, RegistryError> {
    let session = onnx
        .session(bytes, 1)
        .map_err(|e| RegistryError::Artifact(e.to_string()))?;
    warm_up(session, limits)
}

/// [`validate_onnx`] of a staged upload, read by ONNX Runtime from its file.
pub fn validate_onnx_file(
    onnx: &OnnxRuntime,
    path: &std::path::Path,
    limits: LoadLimits,
) -> Result<Signature, RegistryError> {
    let session = onnx.session_from_file(path, 1).map_err(|e| {
        // The staged file's name means nothing to the client.
        RegistryError::Artifact(
            e.to_string()
                .replace(&path.display().to_string(), "the upload"),
        )
    })?;
    warm_up(session, limits)
}

/// The warm-up every version passes: one row of zeros within `limits`.
fn warm_up(
    mut session: crate::runtime::onnx::OnnxSession,
    limits: LoadLimits,
) -> Result<Signature, RegistryError> {
    let signature = session.signature().clone();
    let warmup = signature
        .warmup_inputs(limits.max_input_bytes)
        .map_err(RegistryError::Artifact)?;
    session
        .run_within(warmup, limits.timeout)
        .map_err(|e| match e {
            RuntimeError::Deadline(_) => RegistryError::Artifact(e.to_string()),
            e => RegistryError::Artifact(format!(
                "the model loads but its warm-up inference failed: {e}"
            )),
        })?;
    Ok(signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        let mut labels = BTreeMap::new();
        labels.insert("git".to_string(), "abc123".to_string());
        assert!(check_labels(&labels).is_ok());
        labels.insert("bad key".to_string(), "x".to_string());
        assert!(check_labels(&labels).is_err());
    }
}
