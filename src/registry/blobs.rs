//! Content-addressed artifact storage: `blobs/sha256/<digest>`, written
//! atomically (temporary file, fsync, rename, fsync of the directory) and
//! verified against its digest every time it is read.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{digest}.{}.tmp", hex::encode(nonce)));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            crate::crashpoint::reach("blobs.before_rename");
            fs::rename(&tmp, &path)?;
            crate::crashpoint::reach("blobs.before_dir_sync");
            fs::File::open(&self.dir)?.sync_all()
        };
        let result = write();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
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
}
