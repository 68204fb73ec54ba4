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

use axum::http;
use tower_service::Service as _;

use crate::api::{AppState, Limits};
use crate::protocol::grpc::pb::grpc_inference_service_server::GrpcInferenceServiceServer;

/// The gRPC routes, as a hyper service for one HTTP/2 connection.
#[derive(Clone)]
pub struct GrpcService {
    routes: tonic::service::Routes,
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
        }
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
        Box::pin(async move {
            let resp = routes.call(req).await?;
            Ok(status::size_limit_as_resource_exhausted(resp))
        })
    }
}
