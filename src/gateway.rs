//! Per-request decisions, read from the route table: which version serves a
//! request, which replica runs it, what happens when it fails, and which
//! copies go to a shadow. The controller publishes routes; the gateway only
//! reads them (lock-free) and never waits on the controller.
//!
//! The request path is the file tree: [`routes`] (the published snapshot) →
//! [`choose`] (the version, from the [`policy`]) → [`pool`] (the replica) →
//! failover along the chain, guarded by [`breaker`]s → [`mirror`] (the shadow
//! copy, compared by [`compare`]) → [`recent`] (what answered, for delayed
//! labels) and [`predlog`] (the optional sampled prediction log).

pub mod breaker;
pub mod choose;
pub mod compare;
pub mod mirror;
pub mod policy;
pub mod pool;
pub mod predlog;
pub mod recent;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::metrics::{Metrics, Outcome, Role};
use crate::protocol::{self, Tensor};
use crate::runtime::RuntimeError;
pub use policy::RoutePolicy;
pub use pool::{Replica, VersionPool};
pub use routes::{ModelRoute, RouteTable};

/// The header that sends a request to the staging environment.
pub const ENV_HEADER: &str = "x-ferry-env";

/// Why the gateway could not answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No such model or version is being served.
    #[error("{0}")]
    NotFound(String),
    /// The model was taken out of service (repository `unload`).
    #[error("{0}")]
    Unloaded(String),
    /// The version ran (or refused) the request.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// One inference call as the gateway sees it.
pub struct Call<'a> {
    pub model: &'a str,
    /// `/versions/{v}` in the path.
    pub version: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The request id (the client's or a generated one).
    pub id: &'a str,
    pub inputs: Vec<Tensor>,
    /// Outputs the client asked for (empty: all).
    pub outputs: &'a [&'a str],
    /// The client's body as received and its `Inference-Header-Content-Length`,
    /// when a copy may be sent as it is (it asks for no particular outputs).
    pub body: Option<(&'a bytes::Bytes, Option<&'a str>)>,
}

/// A passed-through request's answer, as the remote sent it.
pub struct Forwarded {
    pub answer: bytes::Bytes,
    /// The answer's `Inference-Header-Content-Length` (binary extension).
    pub answer_len: Option<String>,
    shadow: Option<mirror::Mirror>,
}

/// A request's route: the model's snapshot, the version chosen and its role.
pub struct Routed {
    pub route: Arc<ModelRoute>,
    pub pool: Arc<VersionPool>,
    pub role: Role,
}

/// An answer and the version that gave it.
pub struct Served {
    pub version: String,
    pub role: Role,
    pub outputs: Vec<Tensor>,
    /// The predicted class of the first row (see [`compare::answer_class`]).
    pub class: Option<i64>,
}

impl Served {
    /// The outputs the client asked for, in its order (all of them when it
    /// named none).
    pub fn take_outputs(self, names: &[&str]) -> Vec<Tensor> {
        if names.is_empty() {
            return self.outputs;
        }
        let mut all = self.outputs;
        names
            .iter()
            .filter_map(|n| {
                all.iter()
                    .position(|t| t.name == *n)
                    .map(|i| all.swap_remove(i))
            })
            .collect()
    }
}

/// The data plane's entry point.
pub struct Gateway {
    routes: Arc<RouteTable>,
    metrics: Arc<Metrics>,
    recent: recent::RecentPredictions,
    log: Option<predlog::PredictionLog>,
}

impl Gateway {
    pub fn new(
        routes: Arc<RouteTable>,
        metrics: Arc<Metrics>,
        recent: recent::RecentPredictions,
        log: Option<predlog::PredictionLog>,
    ) -> Gateway {
        Gateway {
            routes,
            metrics,
            recent,
            log,
        }
    }

    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// What answered recent requests (for delayed labels).
    pub fn recent(&self) -> &recent::RecentPredictions {
        &self.recent
    }

    /// Chooses the version for a request from its path and headers alone.
    pub fn route(
        &self,
        model: &str,
        version: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Routed, GatewayError> {
        let route = self.routes.model(model).ok_or_else(|| {
            let model = crate::records::shown_name(model);
            GatewayError::NotFound(format!(
                "model \"{model}\" is not served here; GET /v2/repository/index lists the models and their state"
            ))
        })?;
        if let Some(by) = &route.unloaded {
            return Err(GatewayError::Unloaded(format!(
                "model \"{model}\" is unloaded (by {by}); POST /v2/repository/models/{model}/load puts it back in service"
            )));
        }
        let (version, role) = match version {
            Some(v) => (v.to_string(), Role::Direct),
            None => {
                let staging = headers
                    .get(ENV_HEADER)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"staging"));
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
                let (v, role) = choose::choose(&route.policy, staging, header, fastrand::u32(..choose::BUCKETS))
                    .map_err(|choose::NoVersion::NoStaging| {
                        GatewayError::NotFound(format!(
                            "model \"{model}\" has no staging version (the request has {ENV_HEADER}: staging)"
                        ))
                    })?;
                (v.to_string(), role)
            }
        };
        let pool = route.pools.get(&version).cloned().ok_or_else(|| {
            GatewayError::NotFound(format!(
                "version \"{version}\" of model \"{model}\" is not loaded; loaded versions: {}",
                route.loaded().join(", ")
            ))
        })?;
        Ok(Routed { route, pool, role })
    }

    /// Whether a routed request can pass through untouched: its version runs
    /// on remote endpoints and nothing needs its decoded tensors — no
    /// failover chain, no prediction log sample, and no shadow unless the
    /// shadow is remote too and the body asks for no particular outputs (its
    /// copy is then the same bytes, and only the answers are decoded).
    pub fn can_pass_through(&self, routed: &Routed, body: &[u8], header_len: Option<&str>) -> bool {
        let policy = &routed.route.policy;
        let production = routed.role == Role::Stable;
        let shadow_takes_bytes = || {
            policy.shadow.as_ref().is_none_or(|s| {
                routed
                    .route
                    .pools
                    .get(&s.version)
                    .is_some_and(|p| p.is_remote())
                    && !protocol::names_outputs(body, header_len)
            })
        };
        routed.pool.is_remote()
            && !(production && (!policy.failover.is_empty() || !shadow_takes_bytes()))
            && self.log.as_ref().is_none_or(|l| !l.sampled())
    }

    /// Passes a request body to a remote version untouched (see
    /// [`Gateway::can_pass_through`]), and a copy of it to the shadow; the
    /// remote checks the inputs. Finish with [`Gateway::forwarded`].
    pub async fn forward(
        &self,
        routed: &Routed,
        body: bytes::Bytes,
        header_len: Option<&str>,
    ) -> Result<Forwarded, GatewayError> {
        let pool = &routed.pool;
        let timeout = timeout(&routed.route, pool);
        let shadow = (routed.role == Role::Stable)
            .then(|| {
                let copy = mirror::Copy::Body {
                    body: &body,
                    header_len,
                    inputs: None,
                };
                mirror::Mirror::start(&routed.route, copy)
            })
            .flatten();
        let started = Instant::now();
        let result = pool.forward(body, header_len, timeout).await;
        pool.record(
            routed.role,
            outcome(&result),
            started.elapsed().as_secs_f64(),
            None,
        );
        let (answer, answer_len) = result?;
        Ok(Forwarded {
            answer,
            answer_len,
            shadow,
        })
    }

    /// What answered a passed-through request, once its id is known:
    /// remembered for delayed labels, and handed to its shadow copy.
    pub fn forwarded(&self, routed: &Routed, forwarded: Forwarded, id: &str, class: Option<i64>) {
        self.recent.remember(
            id,
            &routed.pool.model,
            &routed.pool.version,
            routed.role,
            class,
        );
        if let Some(shadow) = forwarded.shadow {
            let outputs =
                protocol::decode_response_json(&forwarded.answer, forwarded.answer_len.as_deref())
                    .ok();
            shadow.primary_answered(outputs.as_deref(), id);
        }
    }

    /// Serves one decoded request: check the inputs against the version's
    /// signature, run it (along the failover chain when the stable version
    /// fails), mirror a copy to the shadow, and record what answered.
    pub async fn infer(&self, routed: Routed, call: Call<'_>) -> Result<Served, GatewayError> {
        let Routed { route, pool, role } = routed;
        let pool = &pool;
        let checked = pool
            .signature
            .check_inputs(&call.inputs)
            .and_then(|()| pool.signature.check_outputs(call.outputs.iter().copied()));
        if let Err(why) = checked {
            pool.record(role, Outcome::Rejected, 0.0, None);
            return Err(RuntimeError::BadInput(why).into());
        }
        let timeout = timeout(&route, pool);
        // Production requests (those the stable version serves) are the ones
        // mirrored to a shadow and protected by the failover chain.
        let shadow = (role == Role::Stable)
            .then(|| {
                let copy = match call.body {
                    Some((body, header_len)) => mirror::Copy::Body {
                        body,
                        header_len,
                        inputs: Some(&call.inputs),
                    },
                    None => mirror::Copy::Tensors(&call.inputs),
                };
                mirror::Mirror::start(&route, copy)
            })
            .flatten();
        let chain: Vec<&Arc<VersionPool>> = if role == Role::Stable {
            std::iter::once(pool)
                .chain(
                    route
                        .policy
                        .failover
                        .iter()
                        .filter_map(|v| route.pools.get(v)),
                )
                .collect()
        } else {
            vec![pool]
        };
        let logged_inputs = self
            .log
            .as_ref()
            .filter(|l| l.sampled())
            .map(|_| call.inputs.clone());
        let result = self
            .run_chain(&route, &chain, role, call.inputs, timeout)
            .await;
        if let Some(shadow) = shadow {
            shadow.primary_answered(result.as_ref().ok().map(|s| s.outputs.as_slice()), call.id);
        }
        let served = result?;
        self.recent.remember(
            call.id,
            call.model,
            &served.version,
            served.role,
            served.class,
        );
        if let (Some(log), Some(inputs)) = (&self.log, logged_inputs) {
            log.write(
                call.id,
                call.model,
                &served.version,
                served.role,
                &inputs,
                &served.outputs,
            );
        }
        Ok(served)
    }

    /// Runs the request on the first version of the chain, and on failure on
    /// the next, and so on. Retrying is safe: inference is a pure function of
    /// its input, so a request that failed on one version has no effect to
    /// undo, and a bad input (the client's mistake) is never retried.
    async fn run_chain(
        &self,
        route: &ModelRoute,
        chain: &[&Arc<VersionPool>],
        role: Role,
        inputs: Vec<Tensor>,
        timeout: Duration,
    ) -> Result<Served, GatewayError> {
        let breakers = chain.len() > 1;
        let mut inputs = Some(inputs);
        let mut last_error: Option<RuntimeError> = None;
        let mut previous: Option<&str> = None;
        for (i, pool) in chain.iter().enumerate() {
            let is_last = i + 1 == chain.len();
            if breakers && !is_last && !pool.breaker.allow(Instant::now()) {
                // Circuit open: skip to the next version. The request fails
                // over all the same, and is counted so.
                previous = Some(&pool.version);
                continue;
            }
            let attempt_inputs = if is_last {
                inputs.take().expect("inputs are kept for the last attempt")
            } else {
                inputs
                    .clone()
                    .expect("inputs are kept until the last attempt")
            };
            if let Some(from) = previous {
                self.metrics.failover(&pool.model, from, &pool.version);
            }
            let attempt_role = if i == 0 { role } else { Role::Fallback };
            let started = Instant::now();
            let result = pool.infer(attempt_inputs, timeout).await;
            let seconds = started.elapsed().as_secs_f64();
            if breakers {
                pool.breaker
                    .record(result.is_ok(), Instant::now(), &route.policy.breaker);
            }
            let class = result.as_ref().ok().and_then(|o| compare::answer_class(o));
            pool.record(attempt_role, outcome(&result), seconds, class);
            match result {
                Ok(outputs) => {
                    return Ok(Served {
                        version: pool.version.clone(),
                        role: attempt_role,
                        outputs,
                        class,
                    });
                }
                Err(e) => {
                    if !e.is_retryable() {
                        return Err(e.into());
                    }
                    previous = Some(&pool.version);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| {
                RuntimeError::Unavailable("no version of the chain could take the request".into())
            })
            .into())
    }
}

/// How a request's answer counts: a full queue or a bad input is the
/// request refused (`rejected`), any other failure an `error`.
fn outcome<T>(result: &Result<T, RuntimeError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(RuntimeError::QueueFull { .. } | RuntimeError::BadInput(_)) => Outcome::Rejected,
        Err(_) => Outcome::Error,
    }
}

/// How long a request may wait for its answer: the route's timeout (a
/// multi-service chain sets one for every version), else the version's own.
fn timeout(route: &ModelRoute, pool: &VersionPool) -> Duration {
    route.policy.timeout.map_or_else(|| pool.timeout(), |t| t.0)
}
