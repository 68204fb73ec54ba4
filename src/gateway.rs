//! Per-request decisions, read from the route table: which version serves a
//! request, which replica runs it, what happens when it fails, and which
//! copies go to a shadow. The controller publishes routes; the gateway only
//! reads them (lock-free) and never waits on the controller.
//!
//! A front door hands over a [`Request`] (model, version, routing headers,
//! the body as received) to [`Gateway::serve`], one call, and gets back an
//! [`Answer`] (the encoded response, the version that gave it, the id) or a
//! [`GatewayError`]; what happens in between stays here. No HTTP server
//! type appears in either, so a gRPC front door can use the same call.
//!
//! The request path is the file tree: [`routes`] (the published snapshot) →
//! [`choose`] (the version, from the [`policy`]) → [`pool`] (the replica) →
//! [`failover`] along the chain, guarded by [`breaker`]s → [`mirror`] (the
//! shadow copy, run by [`copies`] on a low-priority thread, compared by
//! [`compare`]) → [`recent`] (what answered, for
//! delayed labels) and [`predlog`] (the optional sampled prediction log);
//! [`ids`] makes the ids of requests that bring none.

pub mod breaker;
pub mod choose;
pub mod compare;
pub mod copies;
mod failover;
pub mod ids;
pub mod mirror;
pub mod policy;
pub mod pool;
pub mod predlog;
pub mod recent;
pub mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

use crate::metrics::{Metrics, Outcome, Role};
use crate::protocol::{self, InferRequest, InferResponse, ProtocolError, Tensor};
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
    /// The request body is not a V2 inference request.
    #[error(transparent)]
    BadRequest(#[from] ProtocolError),
    /// The version ran (or refused) the request.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The front door a request came through: its answer is counted under it
/// in the version's window, so the status can split traffic by protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontDoor {
    Rest,
    Grpc,
}

/// One inference request, as a front door hands it over.
pub struct Request<'a> {
    /// The front door that received it (REST, or gRPC).
    pub door: FrontDoor,
    pub model: &'a str,
    /// The version the client addressed (`/versions/{v}`), if any.
    pub version: Option<&'a str>,
    /// What routing reads: the staging header, cohort rules, sticky keys.
    pub headers: &'a HeaderMap,
    /// The V2 inference request as received (JSON, or its JSON header and
    /// binary tensors): a remote version may get it untouched.
    pub body: bytes::Bytes,
    /// The body's `Inference-Header-Content-Length` (binary extension).
    pub header_len: Option<&'a str>,
}

/// What to answer: an encoded V2 inference response and what its headers
/// say.
pub struct Answer {
    pub body: Vec<u8>,
    /// The length of the JSON header when tensors follow it in binary.
    pub json_len: Option<usize>,
    /// The version that answered, as its header says it (`None` for a
    /// name no header can carry).
    pub version: Option<HeaderValue>,
    /// The request id (the client's, or one made for the request).
    pub id: String,
}

/// A request's route: the model's snapshot, the version chosen and its role.
struct Routed {
    route: Arc<ModelRoute>,
    pool: Arc<VersionPool>,
    role: Role,
}

/// An answer and the version that gave it.
struct Served {
    version: String,
    role: Role,
    outputs: Vec<Tensor>,
    /// The predicted class of the first row (see [`compare::answer_class`]).
    class: Option<i64>,
}

impl Served {
    /// The outputs the client asked for, in its order (all of them when it
    /// named none).
    fn take_outputs(self, asked: &[protocol::RequestedOutput]) -> Vec<Tensor> {
        if asked.is_empty() {
            return self.outputs;
        }
        let mut all = self.outputs;
        asked
            .iter()
            .filter_map(|o| {
                all.iter()
                    .position(|t| t.name == o.name)
                    .map(|i| all.swap_remove(i))
            })
            .collect()
    }
}

/// One inference request its front door has already decoded (gRPC): the
/// tensors, and the outputs it names.
pub struct Decoded<'a> {
    /// The front door that received it (gRPC, or REST).
    pub door: FrontDoor,
    pub model: &'a str,
    /// The version the client addressed, if any.
    pub version: Option<&'a str>,
    /// What routing reads: the staging header, cohort rules, sticky keys.
    pub headers: &'a HeaderMap,
    /// The client's id, if it sent one (otherwise one is made).
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// Outputs asked for, in order (empty: all of them).
    pub outputs: Vec<protocol::RequestedOutput>,
}

/// The answer to a [`Decoded`] request, for its front door to encode.
pub struct Outputs {
    /// The version that answered.
    pub version: String,
    /// The request id (the client's, or one made for the request).
    pub id: String,
    /// The outputs asked for, in the order asked (all when none were named).
    pub outputs: Vec<Tensor>,
}

/// The data plane's entry point.
pub struct Gateway {
    routes: Arc<RouteTable>,
    metrics: Arc<Metrics>,
    recent: recent::RecentPredictions,
    log: Option<predlog::PredictionLog>,
    ids: ids::RequestIds,
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
            ids: ids::RequestIds::default(),
        }
    }

    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.routes
    }

    /// What answered recent requests (for delayed labels).
    pub fn recent(&self) -> &recent::RecentPredictions {
        &self.recent
    }

    /// Serves one inference request: chooses the version from the path and
    /// headers, then passes the body to a remote version untouched when
    /// nothing needs its tensors, or else decodes it, runs it (along the
    /// failover chain when the stable version fails, with a copy to the
    /// shadow) and encodes the answer.
    pub async fn serve(&self, request: Request<'_>) -> Result<Answer, GatewayError> {
        let routed = self.route(request.model, request.version, request.headers)?;
        if self.can_pass_through(&routed, &request.body, request.header_len) {
            return self.pass_through(routed, request).await;
        }
        let mut decoded = protocol::decode_request(&request.body, request.header_len)?;
        let id = decoded.id.take().unwrap_or_else(|| self.ids.next());
        let inputs = std::mem::take(&mut decoded.inputs);
        // A body that asks for no particular outputs can be the shadow's
        // copy as it is.
        let body = decoded
            .outputs
            .is_empty()
            .then_some((&request.body, request.header_len));
        let call = Call {
            door: request.door,
            model: request.model,
            id: &id,
            inputs,
            outputs: &decoded.outputs,
            body,
        };
        let served = self.infer(routed, call).await?;
        Ok(encode(request.model, id, served, &decoded))
    }

    /// Serves one request its front door decoded (gRPC): the same routing,
    /// failover chain, shadow copy and records as [`Gateway::serve`], with
    /// the outputs handed back as tensors.
    pub async fn serve_decoded(&self, request: Decoded<'_>) -> Result<Outputs, GatewayError> {
        let routed = self.route(request.model, request.version, request.headers)?;
        let id = request.id.unwrap_or_else(|| self.ids.next());
        let call = Call {
            door: request.door,
            model: request.model,
            id: &id,
            inputs: request.inputs,
            outputs: &request.outputs,
            body: None,
        };
        let served = self.infer(routed, call).await?;
        Ok(Outputs {
            version: served.version.clone(),
            outputs: served.take_outputs(&request.outputs),
            id,
        })
    }

    /// Chooses the version for a request from its path and headers alone.
    fn route(
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
    fn can_pass_through(&self, routed: &Routed, body: &[u8], header_len: Option<&str>) -> bool {
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
    /// remote checks the inputs. Only the answer's JSON header is rewritten
    /// (our model name, version and id); what answered is remembered for
    /// delayed labels and handed to the shadow copy.
    async fn pass_through(
        &self,
        routed: Routed,
        request: Request<'_>,
    ) -> Result<Answer, GatewayError> {
        let Routed { route, pool, role } = routed;
        // The client's id, or one made now: sent with the request (and its
        // copy), and its answer's, whatever the remote echoes.
        let id = match protocol::request_id(&request.body, request.header_len) {
            Ok(id) => id.unwrap_or_else(|| self.ids.next()),
            Err(e) => {
                pool.record(role, request.door, Outcome::Rejected, 0.0, None);
                return Err(RuntimeError::BadInput(e.to_string()).into());
            }
        };
        let timeout = timeout(&route, &pool);
        let shadow = (role == Role::Stable)
            .then(|| {
                let copy = mirror::Copy::Body {
                    body: &request.body,
                    header_len: request.header_len,
                    inputs: None,
                };
                mirror::Mirror::start(&route, copy, request.door, &id)
            })
            .flatten();
        let started = Instant::now();
        let result = pool
            .forward(request.body, request.header_len, &id, timeout)
            .await;
        // The remote's own time when the answer was timed (the yardstick
        // its shadow's copies are timed by: `gateway::copies`).
        let took = match &result {
            Ok(passed) => passed.took,
            Err(_) => None,
        };
        // An answer counts once it is read: one that cannot be is the
        // version's error, and a readable one's class is counted.
        let result = result.and_then(|passed| {
            let rewritten = protocol::rewrite_response(
                &passed.body,
                passed.header_len.as_deref(),
                request.model,
                &pool.version,
                id,
            )
            .map_err(|e| {
                RuntimeError::Upstream(format!(
                    "the remote version sent an unreadable answer: {}",
                    e.of_answer()
                ))
            })?;
            Ok((passed, rewritten))
        });
        pool.record(
            role,
            request.door,
            outcome(&result),
            took.unwrap_or_else(|| started.elapsed()).as_secs_f64(),
            result.as_ref().ok().and_then(|(_, r)| r.class),
        );
        let (
            crate::runtime::Passed {
                body: answer,
                header_len: answer_len,
                ..
            },
            rewritten,
        ) = result?;
        self.recent.remember(
            &rewritten.id,
            &pool.model,
            &pool.version,
            role,
            rewritten.class,
        );
        if let Some(shadow) = shadow {
            shadow.primary_sent(answer, answer_len);
        }
        Ok(Answer {
            body: rewritten.body,
            json_len: rewritten.json_len,
            version: pool.version_header.clone(),
            id: rewritten.id,
        })
    }

    /// Serves one decoded request: check the inputs against the version's
    /// signature, run it (along the failover chain when the stable version
    /// fails), mirror a copy to the shadow, and record what answered.
    async fn infer(&self, routed: Routed, call: Call<'_>) -> Result<Served, GatewayError> {
        let Routed { route, pool, role } = routed;
        let pool = &pool;
        let checked = pool.signature.check_inputs(&call.inputs).and_then(|()| {
            pool.signature
                .check_outputs(call.outputs.iter().map(|o| o.name.as_str()))
        });
        if let Err(why) = checked {
            pool.record(role, call.door, Outcome::Rejected, 0.0, None);
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
                mirror::Mirror::start(&route, copy, call.door, call.id)
            })
            .flatten();
        let chain = failover::chain(&route, pool, role);
        let logged_inputs = self
            .log
            .as_ref()
            .filter(|l| l.sampled())
            .map(|_| call.inputs.clone());
        let result = failover::run_chain(
            &self.metrics,
            &route,
            &chain,
            failover::Origin {
                role,
                door: call.door,
                asked: call.outputs,
                id: call.id,
            },
            call.inputs,
            timeout,
            async |pool: &VersionPool, inputs, id: &str| pool.run_timed(inputs, id).await,
        )
        .await;
        if let Some(shadow) = shadow {
            shadow.primary_answered(result.as_ref().ok().map(|s| s.outputs.as_slice()));
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
}

/// One decoded inference call.
struct Call<'a> {
    door: FrontDoor,
    model: &'a str,
    /// The request id (the client's or a generated one).
    id: &'a str,
    inputs: Vec<Tensor>,
    /// Outputs the client asked for (empty: all).
    outputs: &'a [protocol::RequestedOutput],
    /// The client's body as received and its `Inference-Header-Content-Length`,
    /// when a copy may be sent as it is (it asks for no particular outputs).
    body: Option<(&'a bytes::Bytes, Option<&'a str>)>,
}

/// The answer to a decoded request: the outputs it asked for, in its order
/// (all of them when it named none), each in JSON or binary as it asked.
fn encode(model: &str, id: String, served: Served, request: &InferRequest) -> Answer {
    let model_version = served.version.clone();
    let response = InferResponse {
        model_name: model.to_string(),
        model_version,
        id,
        outputs: served.take_outputs(&request.outputs),
    };
    let binary = |t: &Tensor| {
        request
            .outputs
            .iter()
            .find(|o| o.name == t.name)
            .and_then(|o| o.binary)
            .unwrap_or(request.binary_output)
    };
    let (body, json_len) = protocol::encode_response(&response, binary);
    Answer {
        body,
        json_len,
        version: HeaderValue::from_str(&response.model_version).ok(),
        id: response.id,
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
