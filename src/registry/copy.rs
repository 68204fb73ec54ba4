//! `ferry store copy`: moves everything a Ferry holds — models, versions,
//! routes, rollouts, the whole event history (ids, order and timestamps
//! kept) and the artifacts — from one store to another, e.g. a single
//! node's SQLite data dir into the PostgreSQL a cluster shares.
//!
//! Artifacts go first, so no copied record names a missing artifact; then
//! the rows in one transaction; then the events, page by page. At the end
//! the copy is checked: the target's counts and rows equal the source's, and
//! every artifact is read back and hashed. A target that holds anything is
//! refused unless the caller asks to replace it.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Blobs, RegistryError};
use crate::records::Source;
use crate::store::{BlobStore, Counts, Store, StoreError};

/// Events copied per page.
const EVENT_PAGE: usize = 1000;

/// Where a store's artifacts live.
#[derive(Clone)]
pub enum Artifacts {
    /// A data dir's `blobs/sha256/` (the SQLite store's).
    Local(Arc<Blobs>),
    /// Inside the shared store (PostgreSQL's `blob_chunks`).
    Shared(Arc<dyn BlobStore>),
}

/// A store and its artifacts: one end of a copy.
pub struct End<'a> {
    pub store: &'a dyn Store,
    pub artifacts: &'a Artifacts,
}

/// What a copy did, checked.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Copied {
    /// The source's counts; the target's were found equal.
    pub counts: Counts,
    /// Distinct artifacts copied, each read back and its digest checked.
    pub artifacts: usize,
    pub artifact_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifact(#[from] RegistryError),
    /// The target does not hold what was copied (a writer during the copy?).
    #[error("the copy does not match its source: {0}")]
    Mismatch(String),
}

/// Copies `from` into `to` and checks the result (see the module doc).
pub fn copy(from: End<'_>, to: End<'_>, replace: bool) -> Result<Copied, CopyError> {
    let counts = from.store.counts()?;
    let present = to.store.counts()?;
    if !replace && present != Counts::default() {
        return Err(StoreError::NotEmpty {
            models: present.models,
            events: present.events,
        }
        .into());
    }
    let snapshot = from.store.snapshot()?;
    let digests: BTreeSet<&str> = snapshot
        .versions
        .iter()
        .filter_map(|v| match &v.source {
            Source::Onnx { digest, .. } => Some(digest.as_str()),
            Source::Remote { .. } => None,
        })
        .collect();
    for digest in &digests {
        transfer(digest, from.artifacts, to.artifacts)?;
    }
    to.store.restore(&snapshot, replace)?;
    let mut after = 0;
    loop {
        let page = from.store.event_log(after, EVENT_PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        to.store.append_events(&page)?;
    }
    let copied = to.store.counts()?;
    if copied != counts {
        return Err(CopyError::Mismatch(format!(
            "the source holds {counts}, the target {copied}"
        )));
    }
    if to.store.snapshot()? != snapshot {
        return Err(CopyError::Mismatch(
            "the target's models, versions or rollouts differ from the source's".into(),
        ));
    }
    let mut artifact_bytes = 0;
    for digest in &digests {
        artifact_bytes += verify(digest, to.artifacts)?;
    }
    Ok(Copied {
        counts,
        artifacts: digests.len(),
        artifact_bytes,
    })
}

/// Copies one artifact, streamed, checked against its digest on the way.
fn transfer(digest: &str, from: &Artifacts, to: &Artifacts) -> Result<(), CopyError> {
    let missing = || {
        CopyError::Artifact(RegistryError::Artifact(format!(
            "artifact sha256:{digest} is missing from the source; re-register its version there first"
        )))
    };
    let open = |blobs: &Blobs| {
        blobs.open_blob(digest).map_err(|e| {
            CopyError::Artifact(RegistryError::Artifact(format!(
                "artifact sha256:{digest} cannot be read from {}: {e}",
                blobs.dir().display()
            )))
        })
    };
    match (from, to) {
        (Artifacts::Local(a), Artifacts::Local(b)) => {
            b.put_reader(digest, &mut open(a)?)?;
        }
        (Artifacts::Local(a), Artifacts::Shared(b)) => {
            b.put_blob(digest, &mut open(a)?)?;
        }
        (Artifacts::Shared(a), Artifacts::Local(b)) => {
            if !b.fetch(digest, &**a)? {
                return Err(missing());
            }
        }
        (Artifacts::Shared(a), Artifacts::Shared(b)) => {
            // Through a file: a blob is never held in memory whole.
            let staging =
                std::env::temp_dir().join(format!("ferry-copy-{}-{digest}", std::process::id()));
            let staged = (|| {
                let local = Blobs::open(&staging).map_err(|e| {
                    RegistryError::Io(format!(
                        "cannot stage an artifact in {}: {e}",
                        staging.display()
                    ))
                })?;
                if !local.fetch(digest, &**a)? {
                    return Err(missing());
                }
                b.put_blob(digest, &mut open(&local)?)?;
                Ok(())
            })();
            let _ = std::fs::remove_dir_all(&staging);
            staged?;
        }
    }
    Ok(())
}

/// Reads an artifact back, streamed, and checks its digest; its size.
fn verify(digest: &str, at: &Artifacts) -> Result<u64, CopyError> {
    let mut sink = Hashing::default();
    match at {
        Artifacts::Local(blobs) => {
            let mut file = blobs.open_blob(digest).map_err(|e| {
                CopyError::Mismatch(format!("artifact sha256:{digest} was not copied: {e}"))
            })?;
            std::io::copy(&mut file, &mut sink)
                .map_err(|e| CopyError::Mismatch(format!("artifact sha256:{digest}: {e}")))?;
        }
        Artifacts::Shared(shared) => {
            if !shared.get_blob(digest, &mut sink)? {
                return Err(CopyError::Mismatch(format!(
                    "artifact sha256:{digest} was not copied"
                )));
            }
        }
    }
    let actual = hex::encode(sink.hasher.finalize());
    if actual != digest {
        return Err(CopyError::Mismatch(format!(
            "artifact sha256:{digest} reads back as sha256:{actual}"
        )));
    }
    Ok(sink.bytes)
}

/// A writer that only hashes and counts.
#[derive(Default)]
struct Hashing {
    hasher: Sha256,
    bytes: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::record;
    use crate::store::{NewEvent, PostgresStore, SqliteStore, testpg};

    /// A single node's data dir with a version whose artifact is stored.
    fn node(dir: &std::path::Path) -> (SqliteStore, Arc<Blobs>, String) {
        let store = SqliteStore::open(dir).unwrap();
        let blobs = Arc::new(Blobs::open(dir).unwrap());
        let bytes = vec![7u8; (3 << 20) / 2];
        let digest = super::super::blobs::digest(&bytes);
        blobs.put(&digest, &bytes).unwrap();
        let mut v = record("m", "1");
        v.source = Source::Onnx {
            digest: digest.clone(),
            size: bytes.len() as u64,
        };
        store.insert_version(&v).unwrap();
        let mut remote = record("m", "2");
        remote.source = Source::Remote {
            endpoints: vec!["http://127.0.0.1:1".into()],
            access: Default::default(),
        };
        store.insert_version(&remote).unwrap();
        store
            .set_loaded(
                "m",
                "2",
                true,
                NewEvent::new(
                    "m",
                    crate::records::EventKind::VersionLoaded,
                    "loaded".into(),
                    serde_json::json!({}),
                ),
            )
            .unwrap();
        (store, blobs, digest)
    }

    #[test]
    fn a_single_node_is_copied_into_postgres_and_back_with_its_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, blobs, digest) = node(dir.path());
        let pg: Arc<PostgresStore> = Arc::new(PostgresStore::open(&testpg::database()).unwrap());
        let local = Artifacts::Local(blobs);
        let shared = Artifacts::Shared(pg.clone());
        let copied = copy(
            End {
                store: &sqlite,
                artifacts: &local,
            },
            End {
                store: &*pg,
                artifacts: &shared,
            },
            false,
        )
        .unwrap();
        assert_eq!(
            copied,
            Copied {
                counts: Counts {
                    models: 1,
                    versions: 2,
                    rollouts: 0,
                    events: 4
                },
                artifacts: 1,
                artifact_bytes: (3 << 20) / 2,
            }
        );
        assert!(pg.has_blob(&digest).unwrap());
        assert_eq!(
            pg.event_log(0, 100).unwrap(),
            sqlite.event_log(0, 100).unwrap()
        );
        // Again: the target holds something now.
        let again = copy(
            End {
                store: &sqlite,
                artifacts: &local,
            },
            End {
                store: &*pg,
                artifacts: &shared,
            },
            false,
        );
        assert!(matches!(
            again,
            Err(CopyError::Store(StoreError::NotEmpty { models: 1, .. }))
        ));
        // And back into a new data dir.
        let back_dir = tempfile::tempdir().unwrap();
        let back = SqliteStore::open(back_dir.path()).unwrap();
        let back_blobs = Arc::new(Blobs::open(back_dir.path()).unwrap());
        copy(
            End {
                store: &*pg,
                artifacts: &shared,
            },
            End {
                store: &back,
                artifacts: &Artifacts::Local(back_blobs.clone()),
            },
            false,
        )
        .unwrap();
        assert_eq!(back_blobs.get(&digest).unwrap().len(), (3 << 20) / 2);
        assert_eq!(back.snapshot().unwrap(), sqlite.snapshot().unwrap());
    }

    #[test]
    fn a_corrupted_artifact_is_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, blobs, digest) = node(dir.path());
        std::fs::write(blobs.dir().join(&digest), b"tampered").unwrap();
        let target = tempfile::tempdir().unwrap();
        let to = SqliteStore::open(target.path()).unwrap();
        let e = copy(
            End {
                store: &sqlite,
                artifacts: &Artifacts::Local(blobs),
            },
            End {
                store: &to,
                artifacts: &Artifacts::Local(Arc::new(Blobs::open(target.path()).unwrap())),
            },
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains(&digest), "{e}");
        assert_eq!(
            to.counts().unwrap(),
            Counts::default(),
            "nothing was copied"
        );
    }
}
