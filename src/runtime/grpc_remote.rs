//! Remote versions on another gRPC Open Inference Protocol server (Triton's
//! 8001, MLServer's 8081, another Ferry): `--url grpc://HOST:PORT[/MODEL[/VERSION]]`.
//! One tonic channel per endpoint multiplexes every request over a kept-alive
//! HTTP/2 connection, reconnecting when it drops. It is driven by
//! [`super::RemoteClient`], so a gRPC remote keeps the REST remote's rules:
//! the version's timeout around each call, connection failures and server
//! errors retryable along a failover chain, the client's mistakes not.
//! Requests carry the raw tensor contents; answers are read raw or typed.

use std::time::Duration;

use tonic::Code;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};

use super::RuntimeError;
use super::target::{RemoteTarget, signature_of};
use crate::protocol::grpc::{self as wire, pb};
use crate::protocol::{Signature, Tensor};

type Client = pb::grpc_inference_service_client::GrpcInferenceServiceClient<Channel>;

/// The gRPC client of one remote endpoint.
pub struct GrpcRemote {
    client: Client,
}

impl GrpcRemote {
    /// A client of `target`'s server; it connects on first use (within
    /// `connect_timeout`) and again after the connection drops.
    pub fn new(target: &RemoteTarget, connect_timeout: Duration) -> Result<GrpcRemote, String> {
        let address = target.base.replacen("grpc://", "http://", 1);
        let endpoint = Endpoint::from_shared(address)
            .map_err(|e| format!("{} is not a gRPC address: {e}", target.display()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(GrpcRemote {
            client: Client::new(endpoint.connect_lazy())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    fn request<T>(message: T, headers: &axum::http::HeaderMap) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if !headers.is_empty() {
            *request.metadata_mut() = MetadataMap::from_headers(headers.clone());
        }
        request
    }

    /// The remote model's signature, after checking it is ready.
    pub async fn metadata(
        &self,
        target: &RemoteTarget,
        headers: &axum::http::HeaderMap,
        timeout: Duration,
    ) -> Result<Signature, RuntimeError> {
        let mut client = self.client.clone();
        let version = target.version.clone().unwrap_or_default();
        let ready = pb::ModelReadyRequest {
            name: target.model.clone(),
            version: version.clone(),
        };
        let ready =
            tokio::time::timeout(timeout, client.model_ready(Self::request(ready, headers)))
                .await
                .map_err(|_| unavailable(target, "timed out"))?
                .map_err(|s| error(target, s))?;
        if !ready.get_ref().ready {
            return Err(RuntimeError::Unavailable(format!(
                "remote model {} is not ready (ModelReady answered false)",
                target.display()
            )));
        }
        let request = pb::ModelMetadataRequest {
            name: target.model.clone(),
            version,
        };
        let meta = tokio::time::timeout(
            timeout,
            client.model_metadata(Self::request(request, headers)),
        )
        .await
        .map_err(|_| unavailable(target, "timed out"))?
        .map_err(|s| error(target, s))?
        .into_inner();
        let specs = |list: Vec<pb::model_metadata_response::TensorMetadata>| {
            list.into_iter()
                .map(|t| (t.name, t.datatype, t.shape))
                .collect()
        };
        signature_of(specs(meta.inputs), specs(meta.outputs))
    }

    /// Runs one request on the remote and decodes its outputs.
    pub async fn infer(
        &self,
        target: &RemoteTarget,
        headers: &axum::http::HeaderMap,
        inputs: &[Tensor],
        id: Option<&str>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let request = wire::encode_request(&target.model, target.version.as_deref(), id, inputs);
        let answer = self
            .client
            .clone()
            .model_infer(Self::request(request, headers))
            .await
            .map_err(|s| error(target, s))?
            .into_inner();
        wire::decode_response(answer).map_err(|e| {
            RuntimeError::Inference(format!(
                "remote {} sent an unreadable answer: {e}",
                target.display()
            ))
        })
    }
}

fn unavailable(target: &RemoteTarget, why: &str) -> RuntimeError {
    RuntimeError::Unavailable(format!("remote {} {why}", target.display()))
}

/// A remote's gRPC status as the REST remote's errors: the client's
/// mistakes (a 4xx over REST) are `BadInput` and never retried; a server
/// that cannot be reached is `Unavailable`, and other server failures are
/// `Upstream`, both retried along a failover chain.
fn error(target: &RemoteTarget, status: tonic::Status) -> RuntimeError {
    let text = format!(
        "remote {} answered {:?}: {}",
        target.display(),
        status.code(),
        status.message()
    );
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::AlreadyExists
        | Code::Unimplemented => RuntimeError::BadInput(text),
        // tonic reports a connection it could not make or lost as
        // UNAVAILABLE (or UNKNOWN with a transport error as its source).
        Code::Unavailable => RuntimeError::Unavailable(text),
        _ => RuntimeError::Upstream(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_mistakes_are_not_retried_and_the_servers_failures_are() {
        let target = RemoteTarget::parse("grpc://h:1/m", "x").unwrap();
        for code in [Code::InvalidArgument, Code::NotFound, Code::Unauthenticated] {
            let e = error(&target, tonic::Status::new(code, "no"));
            assert!(!e.is_retryable(), "{code:?}: {e}");
        }
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Unknown,
        ] {
            let e = error(&target, tonic::Status::new(code, "no"));
            assert!(e.is_retryable(), "{code:?}: {e}");
            assert!(e.to_string().contains("remote grpc://h:1/m"), "{e}");
        }
    }
}
