//! Artifacts in PostgreSQL: a blob is `blob_chunks` rows of [`CHUNK_BYTES`]
//! (written and read one chunk at a time, so a large model is never in memory
//! whole) and a `blobs` row written last, which makes it visible. Chunks of
//! one digest are the same bytes whoever writes them, so two instances
//! storing the same artifact at once do no harm.

use super::failure::corrupt;
use super::{CHUNK_BYTES, PostgresStore};
use crate::store::{BlobStore, StoreError, read_full};
use crate::units::now_rfc3339;

impl BlobStore for PostgresStore {
    fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        let digest = digest.to_string();
        self.run(|db| async move {
            let client = db.client().await?;
            let row = client
                .query_opt("SELECT 1 FROM blobs WHERE digest = $1", &[&digest])
                .await?;
            Ok(row.is_some())
        })
    }

    fn put_blob(&self, digest: &str, from: &mut dyn std::io::Read) -> Result<u64, StoreError> {
        use sha2::Digest as _;
        if self.has_blob(digest)? {
            return Ok(0);
        }
        let mut hasher = sha2::Sha256::new();
        let (mut size, mut seq) = (0u64, 0i32);
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = read_full(from, &mut buf).map_err(|e| StoreError::Corrupt {
                what: format!("artifact sha256:{digest}"),
                reason: format!("cannot be read: {e}"),
            })?;
            if n == 0 && seq > 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            let (chunk, d) = (buf[..n].to_vec(), digest.to_string());
            // Chunks of one digest are the same bytes whoever writes them: an
            // upsert, outside a transaction, never holding the blob whole.
            self.run(move |db| async move {
                let client = db.client().await?;
                client
                    .execute(
                        "INSERT INTO blob_chunks (digest, seq, bytes) VALUES ($1, $2, $3)
                         ON CONFLICT (digest, seq) DO UPDATE SET bytes = EXCLUDED.bytes",
                        &[&d, &seq, &chunk],
                    )
                    .await?;
                Ok(())
            })?;
            seq += 1;
            if n < CHUNK_BYTES {
                break;
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != digest {
            return Err(StoreError::Corrupt {
                what: format!("artifact sha256:{digest}"),
                reason: format!("its bytes have sha256 {actual}; nothing was stored"),
            });
        }
        let d = digest.to_string();
        self.run(move |db| async move {
            let client = db.client().await?;
            client
                .execute(
                    "INSERT INTO blobs (digest, size, chunks, created_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (digest) DO NOTHING",
                    &[&d, &(size as i64), &seq, &now_rfc3339()],
                )
                .await?;
            Ok(())
        })?;
        Ok(size)
    }

    fn get_blob(&self, digest: &str, to: &mut dyn std::io::Write) -> Result<bool, StoreError> {
        let d = digest.to_string();
        let chunks: Option<i32> = self.run(move |db| async move {
            let client = db.client().await?;
            let row = client
                .query_opt("SELECT chunks FROM blobs WHERE digest = $1", &[&d])
                .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })?;
        let Some(chunks) = chunks else {
            return Ok(false);
        };
        for seq in 0..chunks {
            let d = digest.to_string();
            let bytes: Vec<u8> = self.run(move |db| async move {
                let client = db.client().await?;
                let row = client
                    .query_opt(
                        "SELECT bytes FROM blob_chunks WHERE digest = $1 AND seq = $2",
                        &[&d, &seq],
                    )
                    .await?
                    .ok_or_else(|| {
                        corrupt(
                            &format!("artifact sha256:{d}"),
                            format!("chunk {seq} is missing"),
                        )
                    })?;
                Ok(row.try_get(0)?)
            })?;
            to.write_all(&bytes).map_err(|e| StoreError::Corrupt {
                what: format!("artifact sha256:{digest}"),
                reason: format!("cannot be written where it is cached: {e}"),
            })?;
        }
        Ok(true)
    }
}
