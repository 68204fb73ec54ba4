//! The service hyper calls for every request. Inference posts
//! (`POST /v2/models/{model}[/versions/{version}]/infer`) go straight to
//! their handler: they are the hot path, and the router's matching,
//! middleware layers and extractors cost a measurable share of a
//! pass-through request (BENCHMARKS.md). Everything else — and any
//! inference request this cannot take as it is (a percent-encoded path, a
//! missing or wrong token) — goes through the axum router, which has the
//! same handler and gives the same answers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode};
use axum::response::IntoResponse;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;

use super::{ApiError, AppState, Limits, v2};

/// Inference posts to their handler, the rest to the router.
#[derive(Clone)]
pub struct Dispatch {
    state: AppState,
    max_body_bytes: usize,
    router: TowerToHyperService<Router>,
}

impl Dispatch {
    pub fn new(state: AppState, limits: Limits, router: Router) -> Dispatch {
        Dispatch {
            state,
            max_body_bytes: limits.max_body_bytes,
            router: TowerToHyperService::new(router),
        }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let target = (req.method() == Method::POST)
            .then(|| infer_target(req.uri().path()))
            .flatten()
            .filter(|_| self.state.may_infer(req.headers()));
        let Some((model, version)) = target else {
            return Box::pin(self.router.call(req));
        };
        let (state, limit) = (self.state.clone(), self.max_body_bytes);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => return Ok(body_error(&*e).into_response()),
            };
            Ok(
                match v2::run_infer(state, model, version, parts.headers, body).await {
                    Ok(response) => response,
                    Err(e) => e.into_response(),
                },
            )
        })
    }
}

/// The model (and version) of an inference path, when the path is exactly
/// one and needs no decoding; `None` sends the request to the router.
fn infer_target(path: &str) -> Option<(String, Option<String>)> {
    if path.contains('%') {
        return None;
    }
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    let mut parts = rest.split('/');
    let target = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(model), None, None, None) => (model, None),
        (Some(model), Some("versions"), Some(version), None) if !version.is_empty() => {
            (model, Some(version.to_string()))
        }
        _ => return None,
    };
    (!target.0.is_empty()).then(|| (target.0.to_string(), target.1))
}

/// The router's answers for a body that is too large or cannot be read.
fn body_error(e: &(dyn std::error::Error + Send + Sync + 'static)) -> ApiError {
    let status = match e.is::<http_body_util::LengthLimitError>() {
        true => StatusCode::PAYLOAD_TOO_LARGE,
        false => StatusCode::BAD_REQUEST,
    };
    ApiError::body(status, e)
}

#[cfg(test)]
mod tests {
    use super::infer_target;

    #[test]
    fn takes_exactly_the_two_inference_paths() {
        let own = |m: &str, v: Option<&str>| Some((m.to_string(), v.map(str::to_string)));
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
