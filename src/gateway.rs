//! Per-request decisions, read from the route table: which version serves a
//! request, which replica runs it. The controller publishes routes; the
//! gateway only reads them (lock-free) and never waits on the controller.
//!
//! The request path is the file tree: [`routes`] (the published snapshot and
//! the choice of version) → [`pool`] (the version's replicas and the choice of
//! replica) → [`crate::runtime::Engine`] (the call).

pub mod pool;
pub mod routes;

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Outcome;
use crate::protocol::Tensor;
use crate::runtime::RuntimeError;
pub use pool::{Replica, VersionPool};
pub use routes::{ModelRoute, RouteTable};

/// Why the gateway could not answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No such model or version is being served.
    #[error("{0}")]
    NotFound(String),
    /// The version exists but cannot take requests now.
    #[error("{0}")]
    Unavailable(String),
    /// The version ran (or refused) the request.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// An answer and the version that gave it.
pub struct Served {
    pub version: String,
    pub outputs: Vec<Tensor>,
}

/// The data plane's entry point.
pub struct Gateway {
    routes: Arc<RouteTable>,
}

impl Gateway {
    pub fn new(routes: Arc<RouteTable>) -> Gateway {
        Gateway { routes }
    }

    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// Chooses the version (`version` given: exactly that one; otherwise the
    /// model's stable version), checks the inputs against its signature, and
    /// runs the request on its least busy replica.
    pub async fn infer(
        &self,
        model: &str,
        version: Option<&str>,
        inputs: Vec<Tensor>,
        outputs: &[&str],
    ) -> Result<Served, GatewayError> {
        let pool = self.routes.choose(model, version)?;
        let started = Instant::now();
        let checked = pool
            .signature
            .check_inputs(&inputs)
            .and_then(|()| pool.signature.check_outputs(outputs.iter().copied()));
        if let Err(why) = checked {
            pool.metrics.record(Outcome::Rejected, 0.0);
            return Err(RuntimeError::BadInput(why).into());
        }
        let result = pool.infer(inputs).await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(RuntimeError::QueueFull { .. } | RuntimeError::BadInput(_)) => Outcome::Rejected,
            Err(_) => Outcome::Error,
        };
        pool.metrics
            .record(outcome, started.elapsed().as_secs_f64());
        Ok(Served {
            version: pool.version.clone(),
            outputs: result?,
        })
    }
}
