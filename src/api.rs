//! HTTP wiring, no business logic: the V2 data plane ([`v2`]), the `/api/v1`
//! control plane ([`control`]), `/metrics`, the OpenAPI document
//! ([`openapi`]), admin-token checks ([`auth`]) and the single mapping from
//! errors to responses ([`error`]).

pub mod auth;
pub mod body;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod head;
pub mod openapi;
pub mod rollouts;
pub mod v2;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::controller::Controller;
use crate::gateway::Gateway;
use crate::metrics::{Metrics, Telemetry};
pub use auth::AdminToken;
pub use error::ApiError;

/// Limits on what clients may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest inference request body.
    pub max_body_bytes: usize,
    /// Largest artifact upload.
    pub max_upload_bytes: usize,
    /// Bytes of request bodies held at once, across all connections.
    pub max_body_memory: usize,
    /// How slowly a body may arrive.
    pub body: body::BodyRules,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 20,
            max_upload_bytes: 1 << 30,
            max_body_memory: 1 << 30,
            body: body::BodyRules::default(),
        }
    }
}

/// Everything a handler may use.
#[derive(Clone)]
pub struct AppState {
    pub controller: Arc<Controller>,
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    pub telemetry: Arc<Telemetry>,
    pub token: Arc<AdminToken>,
    /// When set, the data plane needs it (or the admin token).
    pub inference_token: Option<Arc<AdminToken>>,
    /// When set, feedback may use it instead of the admin token.
    pub feedback_token: Option<Arc<AdminToken>>,
}

impl AppState {
    /// Whether a request may use the data plane: no inference token is
    /// configured, or it carries that token or the admin token.
    pub fn may_infer(&self, headers: &axum::http::HeaderMap) -> bool {
        self.inference_token
            .as_ref()
            .is_none_or(|t| t.matches(headers) || self.token.matches(headers))
    }

    /// Whether a request may post delayed labels: it carries the admin
    /// token or the feedback token. Ground truth comes from a trusted job,
    /// never from end users.
    pub fn may_label(&self, headers: &axum::http::HeaderMap) -> bool {
        self.token.matches(headers)
            || self
                .feedback_token
                .as_ref()
                .is_some_and(|t| t.matches(headers))
    }
}

/// What hyper serves: inference posts straight to their handler, the rest
/// through [`router`].
pub fn service(state: AppState, limits: Limits, head: head::HeadRules) -> dispatch::Dispatch {
    dispatch::Dispatch::new(state.clone(), limits, head, router(state, limits))
}

/// The whole HTTP surface on one router.
pub fn router(state: AppState, limits: Limits) -> Router {
    Router::new()
        .merge(v2::router(state.clone()))
        .merge(control::router(state.clone(), limits))
        .merge(rollouts::router(state.clone()))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics))
        .route("/ui/", get(crate::dashboard::index))
        .route("/ui", get(crate::dashboard::redirect))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Exposition::negotiate(accept);
    state.controller.show_instance();
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.encode(format),
    )
}
