//! The gRPC front door: `inference.GRPCInferenceService` (KServe's Open
//! Inference Protocol plus Triton's model repository RPCs) in front of the
//! same request path as the REST data plane. A gRPC request is decoded into
//! tensors ([`crate::protocol::grpc`]), routed and served by the one
//! [`crate::gateway::Gateway`] (weights, sticky keys and cohorts read from
//! the request metadata under the HTTP header names, failover, shadows,
//! metrics), and answered with `x-ferry-version` in its metadata.
//!
//! Layout: [`service`] the RPCs; [`status`] errors as gRPC status codes
//! (through the REST error mapping, so the messages are the same);
//! [`deadline`] the client's `grpc-timeout`. [`GrpcService`] is what the
//! server's HTTP/2 connections call.

pub mod deadline;
pub mod service;
pub mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http;
use tower_service::Service as _;

use crate::api::{AppState, Limits};
use crate::protocol::grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;

/// The gRPC routes, as a hyper service for one HTTP/2 connection.
#[derive(Clone)]
pub struct GrpcService {
    routes: tonic::service::Routes,
    /// The connection's calls, when it watches for idleness.
    activity: Option<Arc<Activity>>,
}

impl GrpcService {
    /// The service over `state`; request messages larger than
    /// `limits.max_body_bytes` are refused with `RESOURCE_EXHAUSTED`.
    pub fn new(state: AppState, limits: &Limits) -> GrpcService {
        let server = GrpcInferenceServiceServer::new(service::Front::new(state))
            .max_decoding_message_size(limits.max_body_bytes)
            .max_encoding_message_size(usize::MAX);
        GrpcService {
            routes: tonic::service::Routes::new(server).prepare(),
            activity: None,
        }
    }

    /// The service for one connection, and what tells when that connection
    /// is idle (no call running, none for a while).
    pub fn for_connection(&self) -> (GrpcService, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let service = GrpcService {
            routes: self.routes.clone(),
            activity: Some(activity.clone()),
        };
        (service, activity)
    }
}

/// One connection's calls: how many are running and when the last one
/// started or ended, so a connection that holds a slot without using it (no
/// HTTP/2 preface, or a preface and then nothing) can be closed the way an
/// idle REST connection is.
#[derive(Debug)]
pub struct Activity {
    born: std::time::Instant,
    running: AtomicUsize,
    /// Milliseconds since `born` of the last start or end of a call.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: std::time::Instant::now(),
            running: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long the connection has had no call running (zero while one
    /// runs), as of `now`.
    pub fn idle_for(&self, now: std::time::Instant) -> Duration {
        if self.running.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// A call started; it ends when the guard is dropped.
    fn call(self: &Arc<Activity>) -> Running {
        self.running.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Running(self.clone())
    }
}

/// A running call (see [`Activity::call`]).
struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.touch();
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B> hyper::service::Service<http::Request<B>> for GrpcService
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn call(&self, req: http::Request<B>) -> Self::Future {
        // Routes are always ready (`poll_ready` is a no-op), so a clone is
        // called directly.
        let mut routes = self.routes.clone();
        let running = self.activity.as_ref().map(Activity::call);
        Box::pin(async move {
            let resp = routes.call(req).await?;
            drop(running);
            Ok(status::size_limit_as_resource_exhausted(resp))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_while_no_call_runs() {
        let activity = Arc::new(Activity::new());
        let later = |d: u64| activity.born + Duration::from_secs(d);
        assert_eq!(activity.idle_for(later(5)), Duration::from_secs(5));
        let running = activity.call();
        assert_eq!(activity.idle_for(later(60)), Duration::ZERO, "a call runs");
        drop(running);
        let ended = activity.born + Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        assert_eq!(
            activity.idle_for(ended + Duration::from_secs(3)),
            Duration::from_secs(3),
            "idle from the end of the last call"
        );
    }
}
