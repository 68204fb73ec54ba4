//! Request ids for requests that bring none: they cannot be guessed, so
//! that knowing one id (a label is posted by id) tells nothing of another.

use std::sync::atomic::{AtomicU64, Ordering};

/// 128 bits of SHA-256 over a per-process random key and a counter (a hash
/// DRBG), at the cost of one small hash per request instead of a system
/// call.
pub struct RequestIds {
    key: [u8; 32],
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS provides random bytes");
        RequestIds {
            key,
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> String {
        use sha2::{Digest, Sha256};
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::new()
            .chain_update(self.key)
            .chain_update(n.to_le_bytes())
            .finalize();
        hex::encode(&digest[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn ids_are_distinct_hex_and_differ_between_processes() {
        let (one, other) = (RequestIds::default(), RequestIds::default());
        let a: Vec<String> = (0..100).map(|_| one.next()).collect();
        let mut unique = a.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), a.len());
        assert!(
            a.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        assert_ne!(other.next(), a[0], "each process has its own key");
    }
}
