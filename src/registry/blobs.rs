//! Content-addressed artifact storage: `blobs/sha256/<digest>`, written
//! atomically (temporary file, fsync, rename, fsync of the directory) and
//! verified against its digest every time it is read. An upload is written
//! to a temporary file as it arrives and hashed on the way ([`Upload`]), so
//! its size costs disk, not memory; the [`Staged`] file is renamed into place
//! once the registry has validated it, and removed otherwise.
//!
//! With a shared store, this directory is each instance's local cache: a
//! blob missing here is fetched from the shared [`BlobStore`] into it
//! ([`Blobs::fetch`]), streamed to a temporary file and hashed on the way.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::RegistryError;
use crate::store::BlobStore;

pub struct Blobs {
    dir: PathBuf,
}

/// The sha256 of `bytes`, lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Blobs {
    pub fn open(data_dir: &Path) -> std::io::Result<Blobs> {
        let dir = data_dir.join("blobs").join("sha256");
        fs::create_dir_all(&dir)?;
        Ok(Blobs { dir })
    }

    /// Where the blobs live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// Stores `bytes` under their digest (a no-op when already there).
    pub fn put(&self, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(digest);
        if path.exists() && self.get(digest).is_ok() {
            return Ok(());
        }
        self.write_atomically(digest, |f| f.write_all(bytes))
    }

    /// Writes a blob through `fill` into a temporary file, fsyncs it and
    /// renames it into place (then fsyncs the directory); the temporary file
    /// is removed when anything fails.
    fn write_atomically(
        &self,
        digest: &str,
        fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{digest}.{}.tmp", hex::encode(nonce)));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            fill(&mut f)?;
            f.sync_all()?;
            crate::crashpoint::reach("blobs.before_rename");
            fs::rename(&tmp, self.path(digest))?;
            crate::crashpoint::reach("blobs.before_dir_sync");
            fs::File::open(&self.dir)?.sync_all()
        };
        let result = write();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Copies a blob from the shared store into this cache, streamed and
    /// hashed on the way; kept only when its bytes have `digest`. False when
    /// the shared store has no blob with this digest.
    pub fn fetch(&self, digest: &str, shared: &dyn BlobStore) -> Result<bool, RegistryError> {
        let mut found = Ok(false);
        let mut hashed = String::new();
        let written = self.write_atomically(digest, |file| {
            let mut sink = HashingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                failed: None,
            };
            found = shared.get_blob(digest, &mut sink);
            if let Some(e) = sink.failed.take() {
                return Err(e);
            }
            sink.inner.flush()?;
            hashed = hex::encode(sink.hasher.finalize());
            match &found {
                Ok(true) if hashed == digest => Ok(()),
                // Not stored, a store error, or other bytes: nothing is kept.
                _ => Err(std::io::Error::other("not kept")),
            }
        });
        match (found?, written) {
            (false, _) => Ok(false),
            (true, Ok(())) => Ok(true),
            (true, Err(_)) if !hashed.is_empty() && hashed != digest => {
                Err(RegistryError::Artifact(format!(
                    "the shared store's copy of artifact sha256:{digest} is corrupted (its sha256 is {hashed}); re-register the version from the original file"
                )))
            }
            (true, Err(e)) => {
                let what = format!(
                    "cannot cache artifact sha256:{digest} in {}: {e}",
                    self.dir.display()
                );
                Err(RegistryError::disk(e, what))
            }
        }
    }

    /// Stores the bytes read from `from` under `digest`, streamed and hashed
    /// on the way; refused (nothing kept) when they do not have that digest.
    pub fn put_reader(
        &self,
        digest: &str,
        from: &mut dyn std::io::Read,
    ) -> Result<(), RegistryError> {
        let mut hashed = String::new();
        let written = self.write_atomically(digest, |file| {
            let mut sink = HashingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                failed: None,
            };
            std::io::copy(from, &mut sink)?;
            sink.inner.flush()?;
            hashed = hex::encode(sink.hasher.finalize());
            if hashed == digest {
                Ok(())
            } else {
                Err(std::io::Error::other("other bytes"))
            }
        });
        match written {
            Ok(()) => Ok(()),
            Err(_) if !hashed.is_empty() && hashed != digest => Err(RegistryError::Artifact(
                format!("artifact sha256:{digest} is corrupted: its bytes have sha256 {hashed}"),
            )),
            Err(e) => {
                let what = format!(
                    "cannot store artifact sha256:{digest} in {}: {e}",
                    self.dir.display()
                );
                Err(RegistryError::disk(e, what))
            }
        }
    }

    /// Opens a stored blob for reading (not verified: the reader hashes it).
    pub fn open_blob(&self, digest: &str) -> std::io::Result<fs::File> {
        fs::File::open(self.path(digest))
    }

    /// Starts an upload: a temporary file in the blob dir (removed at start-up
    /// if a crash leaves it), written and hashed chunk by chunk.
    pub async fn upload(&self) -> std::io::Result<Upload> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let path = self.dir.join(format!(".upload.{}.tmp", hex::encode(nonce)));
        let file = tokio::fs::File::create(&path).await?;
        Ok(Upload {
            staged: Staged {
                path,
                digest: String::new(),
                size: 0,
            },
            file,
            hasher: Sha256::new(),
        })
    }

    /// Stages bytes already in memory (tests, small artifacts).
    pub async fn stage_bytes(&self, bytes: &[u8]) -> std::io::Result<Staged> {
        let mut up = self.upload().await?;
        up.write(bytes).await?;
        up.finish().await
    }

    /// Stores a staged upload under its digest: renamed into place (and the
    /// directory fsynced), or dropped when an intact copy is already there.
    pub fn adopt(&self, mut staged: Staged) -> std::io::Result<()> {
        let path = self.path(&staged.digest);
        if path.exists() && self.get(&staged.digest).is_ok() {
            return Ok(()); // `staged` removes its file
        }
        crate::crashpoint::reach("blobs.before_rename");
        fs::rename(&staged.path, &path)?;
        staged.path = PathBuf::new(); // adopted: nothing to remove
        crate::crashpoint::reach("blobs.before_dir_sync");
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Reads a blob and checks it still has its digest.
    pub fn get(&self, digest: &str) -> Result<Vec<u8>, String> {
        let path = self.path(digest);
        let bytes = fs::read(&path)
            .map_err(|e| format!("artifact {} cannot be read: {e}", path.display()))?;
        let actual = self::digest(&bytes);
        if actual != digest {
            return Err(format!(
                "artifact {} is corrupted: its sha256 is now {actual}; re-register the version from the original file",
                path.display()
            ));
        }
        Ok(bytes)
    }

    /// Removes leftovers of writes interrupted by a crash.
    pub fn clean_temporaries(&self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A writer that hashes what it passes on and keeps its first error (the
/// shared store sees only that the write failed; the cache says why).
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    failed: Option<std::io::Error>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed.get_or_insert(e);
                Err(kind.into())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An upload being written: each chunk goes to the file and the hash.
pub struct Upload {
    staged: Staged,
    file: tokio::fs::File,
    hasher: Sha256,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.hasher.update(chunk);
        self.staged.size += chunk.len() as u64;
        self.file.write_all(chunk).await
    }

    /// Flushes and fsyncs the file; the upload is then a [`Staged`] artifact.
    pub async fn finish(mut self) -> std::io::Result<Staged> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await?;
        self.staged.digest = hex::encode(self.hasher.finalize_reset());
        Ok(self.staged)
    }
}

/// A complete upload in a temporary file of the blob dir, with its digest;
/// removed when dropped unless [`Blobs::adopt`] stored it.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    pub digest: String,
    pub size: u64,
}

impl Staged {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let d = digest(b"model");
        blobs.put(&d, b"model").unwrap();
        assert_eq!(blobs.get(&d).unwrap(), b"model");
        fs::write(blobs.path(&d), b"tampered").unwrap();
        assert!(blobs.get(&d).unwrap_err().contains("corrupted"));
        // Putting again repairs it.
        blobs.put(&d, b"model").unwrap();
        assert_eq!(blobs.get(&d).unwrap(), b"model");
    }

    #[tokio::test]
    async fn an_upload_is_hashed_as_it_is_written_and_kept_only_when_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let mut up = blobs.upload().await.unwrap();
        up.write(b"mo").await.unwrap();
        up.write(b"del").await.unwrap();
        let staged = up.finish().await.unwrap();
        assert_eq!(
            (staged.digest.as_str(), staged.size),
            (digest(b"model").as_str(), 5)
        );
        let tmp = staged.path().to_path_buf();
        blobs.adopt(staged).unwrap();
        assert!(!tmp.exists());
        assert_eq!(blobs.get(&digest(b"model")).unwrap(), b"model");
        // A refused upload leaves nothing behind.
        let staged = blobs.stage_bytes(b"not kept").await.unwrap();
        let tmp = staged.path().to_path_buf();
        assert!(tmp.exists());
        drop(staged);
        assert!(!tmp.exists());
        assert_eq!(fs::read_dir(blobs.dir()).unwrap().count(), 1);
    }

    /// A shared store in memory: blobs by digest, or a failure for every call.
    struct Memory(
        std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
        bool,
    );

    impl BlobStore for Memory {
        fn has_blob(&self, digest: &str) -> Result<bool, crate::store::StoreError> {
            Ok(self.0.lock().unwrap().contains_key(digest))
        }

        fn put_blob(
            &self,
            digest: &str,
            from: &mut dyn std::io::Read,
        ) -> Result<u64, crate::store::StoreError> {
            let mut bytes = Vec::new();
            from.read_to_end(&mut bytes).unwrap();
            let n = bytes.len() as u64;
            self.0.lock().unwrap().insert(digest.into(), bytes);
            Ok(n)
        }

        fn get_blob(
            &self,
            digest: &str,
            to: &mut dyn Write,
        ) -> Result<bool, crate::store::StoreError> {
            if self.1 {
                return Err(crate::store::StoreError::Corrupt {
                    what: "the test store".into(),
                    reason: "down".into(),
                });
            }
            match self.0.lock().unwrap().get(digest) {
                None => Ok(false),
                Some(bytes) => {
                    for chunk in bytes.chunks(3) {
                        to.write_all(chunk).unwrap();
                    }
                    Ok(true)
                }
            }
        }
    }

    #[test]
    fn a_blob_missing_from_the_cache_is_fetched_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let shared = Memory(Default::default(), false);
        let d = digest(b"model bytes");
        assert!(
            !blobs.fetch(&d, &shared).unwrap(),
            "not in the shared store"
        );
        shared.put_blob(&d, &mut &b"model bytes"[..]).unwrap();
        assert!(blobs.fetch(&d, &shared).unwrap());
        assert_eq!(blobs.get(&d).unwrap(), b"model bytes");
        // A shared copy with other bytes is refused and nothing is cached.
        let other = digest(b"other");
        shared.put_blob(&other, &mut &b"tampered"[..]).unwrap();
        let e = blobs.fetch(&other, &shared).unwrap_err();
        assert!(e.to_string().contains("is corrupted"), "{e}");
        assert!(blobs.get(&other).is_err());
        // A failing store says so; no temporary file is left.
        let down = Memory(Default::default(), true);
        assert!(matches!(
            blobs.fetch(&other, &down),
            Err(RegistryError::Store(_))
        ));
        let names: Vec<_> = fs::read_dir(blobs.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(&d)]);
        // Streamed from a reader, checked the same way.
        let third = digest(b"third");
        blobs.put_reader(&third, &mut &b"third"[..]).unwrap();
        assert_eq!(blobs.get(&third).unwrap(), b"third");
        assert!(blobs.put_reader(&third, &mut &b"3rd"[..]).is_err());
        assert_eq!(
            blobs.get(&third).unwrap(),
            b"third",
            "the intact copy stays"
        );
    }
}
