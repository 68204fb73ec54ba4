//! HTTP wiring, no business logic: the V2 data plane ([`v2`]), the `/api/v1`
//! control plane ([`control`]), `/metrics`, the OpenAPI document
//! ([`openapi`]), admin-token checks ([`auth`]) and the single mapping from
//! errors to responses ([`error`]).

pub mod auth;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod openapi;
pub mod rollouts;
pub mod v2;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 20,
            max_upload_bytes: 1 << 30,
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
    pub ids: Arc<RequestIds>,
}

impl AppState {
    /// Whether a request may use the data plane: no inference token is
    /// configured, or it carries that token or the admin token.
    pub fn may_infer(&self, headers: &axum::http::HeaderMap) -> bool {
        self.inference_token
            .as_ref()
            .is_none_or(|t| t.matches(headers) || self.token.matches(headers))
    }
}

/// Generates request ids: a random per-process prefix and a counter, unique
/// across restarts and cheap on the request path.
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("the OS provides random bytes");
        RequestIds {
            prefix: hex::encode(bytes),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// What hyper serves: inference posts straight to their handler, the rest
/// through [`router`].
pub fn service(state: AppState, limits: Limits) -> dispatch::Dispatch {
    dispatch::Dispatch::new(state.clone(), limits, router(state, limits))
}

/// The whole HTTP surface on one router.
pub fn router(state: AppState, limits: Limits) -> Router {
    Router::new()
        .merge(v2::router(state.clone()))
        .merge(control::router(state.clone(), limits))
        .route("/metrics", get(metrics))
        .route("/ui/", get(crate::dashboard::index))
        .route("/ui", get(crate::dashboard::redirect))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
