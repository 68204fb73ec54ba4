//! A version's pool of replicas and the choice of replica: the ready replica
//! with the fewest requests in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::metrics::VersionMetrics;
use crate::protocol::Tensor;
use crate::registry::ServingSettings;
use crate::runtime::{Engine, RuntimeError, Signature};

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

/// Decrements a replica's in-flight count however the request ends (answer,
/// error, timeout, or the client going away).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running replicas of one version, with what the gateway needs to call
/// them. Immutable once published; replaced whole when anything changes.
pub struct VersionPool {
    pub model: String,
    pub version: String,
    pub signature: Signature,
    pub replicas: Vec<Replica>,
    /// The settings the replicas were started with (a change restarts the pool).
    pub settings: ServingSettings,
    /// Longest wait for an answer (from the settings).
    pub timeout: Duration,
    pub metrics: VersionMetrics,
}

impl VersionPool {
    fn pick(&self) -> Option<&Replica> {
        self.replicas.iter().min_by_key(|r| r.in_flight())
    }

    /// Runs a request on the least busy replica, within the timeout.
    pub async fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let replica = self.pick().ok_or_else(|| {
            RuntimeError::Unavailable(format!(
                "version \"{}\" of model \"{}\" has no running replica",
                self.version, self.model
            ))
        })?;
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&replica.in_flight);
        match tokio::time::timeout(self.timeout, replica.engine.infer(inputs)).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Timeout(self.timeout)),
        }
    }
}
