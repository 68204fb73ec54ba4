//! The service hyper calls for every request. First the head is checked
//! ([`super::head`]) and the body read under the server's limits
//! ([`super::body`]: paced, bounded, one buffer, within the shared memory
//! budget) — for every route, so a handler that ignores its body still
//! leaves the connection ready for the next request. Then inference posts
//! (`POST /v2/models/{model}[/versions/{version}]/infer`) go straight to
//! their handler: they are the hot path, and the router's matching,
//! middleware layers and extractors cost a measurable share of a
//! pass-through request (BENCHMARKS.md). Everything else — and any
//! inference request this cannot take as it is (a percent-encoded path, a
//! missing or wrong token) — goes through the axum router, which has the
//! same handler and gives the same answers. Artifact uploads stream to the
//! router (paced, with their own size limit) instead of being held whole.
//!
//! Inference runs on the thread that accepted its connection (the server's
//! serving threads); the router's requests — the control plane's, which
//! may wait on the store or start versions — run on the control runtime
//! when one is given ([`Dispatch::with_control_runtime`]), beside the
//! controller, so they never hold a serving thread.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, header};
use axum::response::IntoResponse;
use hyper::body::{Body as _, Incoming};
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;

use super::body::{Account, BodyBudget, Paced};
use super::head::HeadRules;
use super::{ApiError, AppState, Limits, v2};

/// Inference posts to their handler, the rest to the router.
#[derive(Clone)]
pub struct Dispatch {
    /// The client's address (its share of the body budget), once known.
    peer: Option<std::net::IpAddr>,
    state: AppState,
    limits: Limits,
    budget: BodyBudget,
    head: std::sync::Arc<HeadRules>,
    router: TowerToHyperService<Router>,
    /// Where the router's requests run (`None`: where they arrive).
    control: Option<tokio::runtime::Handle>,
}

impl Dispatch {
    pub fn new(state: AppState, limits: Limits, head: HeadRules, router: Router) -> Dispatch {
        Dispatch {
            peer: None,
            state,
            limits,
            budget: BodyBudget::new(limits.max_body_memory),
            head: std::sync::Arc::new(head),
            router: TowerToHyperService::new(router),
            control: None,
        }
    }

    /// Runs the router's requests on `runtime`.
    pub fn with_control_runtime(self, runtime: tokio::runtime::Handle) -> Dispatch {
        Dispatch {
            control: Some(runtime),
            ..self
        }
    }

    /// The router's answer to `req`, on the control runtime when there is one.
    async fn route(&self, req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let answer = self.router.call(req);
        let Some(control) = &self.control else {
            return answer.await;
        };
        match control.spawn(answer).await {
            Ok(answer) => answer,
            Err(e) => Ok(ApiError::internal("the request's handler failed", e).into_response()),
        }
    }
}

impl Dispatch {
    /// The service for one connection from `peer`.
    pub fn for_peer(&self, peer: std::net::IpAddr) -> Dispatch {
        Dispatch {
            peer: Some(super::body::peer_key(peer)),
            ..self.clone()
        }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let path = req.uri().path();
        let decoded = path.starts_with("/v2/models/")
            && (path.ends_with("/infer") || path.ends_with("/feedback"));
        if let Err(e) = self.head.check(
            req.method(),
            req.version(),
            req.uri().authority().map(|a| a.as_str()),
            req.headers(),
            decoded,
        ) {
            return Box::pin(std::future::ready(Ok(closing(e))));
        }
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let target = (parts.method == Method::POST)
                .then(|| infer_target(parts.uri.path()))
                .flatten()
                .filter(|_| this.state.may_infer(&parts.headers));
            let declared = body.size_hint().exact();
            let body = Paced::new(body, this.limits.body);
            if is_upload(&parts.method, parts.uri.path()) {
                let req = Request::from_parts(parts, Body::new(body));
                return this.route(req).await;
            }
            // The admin's requests are not counted: an operator can always
            // abort a rollout, whatever clients hold.
            let account = Account {
                budget: (!this.state.token.matches(&parts.headers)).then_some(&this.budget),
                peer: this.peer,
            };
            let held = match super::body::read(body, declared, this.limits.max_body_bytes, account)
                .await
            {
                Ok(held) => held,
                Err(e) => return Ok(closing(e.into())),
            };
            let answer = match target {
                Some((model, version)) => {
                    match v2::run_infer(
                        this.state,
                        model,
                        version,
                        parts.headers,
                        held.bytes.clone(),
                    )
                    .await
                    {
                        Ok(response) => response,
                        Err(e) => e.into_response(),
                    }
                }
                None => {
                    let req = Request::from_parts(parts, Body::from(held.bytes.clone()));
                    this.route(req).await?
                }
            };
            drop(held);
            Ok(answer)
        })
    }
}

/// An answer given before the body was read: the connection cannot be
/// reused (the rest of the body would be read as the next request).
fn closing(e: ApiError) -> Response<Body> {
    let mut resp = e.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// `PUT /api/v1/models/{model}/versions/{version}`: an artifact upload.
fn is_upload(method: &Method, path: &str) -> bool {
    method == Method::PUT
        && path
            .strip_prefix("/api/v1/models/")
            .is_some_and(|rest| rest.split('/').nth(1) == Some("versions"))
}

/// The model (and version) of an inference path, when the path is exactly
/// one and needs no decoding; `None` sends the request to the router.
fn infer_target(path: &str) -> Option<(&str, Option<&str>)> {
    if path.contains('%') {
        return None;
    }
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    let mut parts = rest.split('/');
    let target = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(model), None, None, None) => (model, None),
        (Some(model), Some("versions"), Some(version), None) if !version.is_empty() => {
            (model, Some(version))
        }
        _ => return None,
    };
    (!target.0.is_empty()).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::infer_target;

    #[test]
    fn takes_exactly_the_two_inference_paths() {
        let own = |m, v| Some((m, v));
        assert_eq!(infer_target("/v2/models/cancer/infer"), own("cancer", None));
        assert_eq!(
            infer_target("/v2/models/cancer/versions/v2/infer"),
            own("cancer", Some("v2"))
        );
        for other in [
            "/v2/models/cancer",
            "/v2/models//infer",
            "/v2/models/cancer/infer/",
            "/v2/models/cancer/versions//infer",
            "/v2/models/cancer/versions/v2/extra/infer",
            "/v2/models/cancer/other/v2/infer",
            "/v2/models/can%20cer/infer",
            "/api/v1/models/cancer/infer",
        ] {
            assert_eq!(infer_target(other), None, "{other}");
        }
    }
}
