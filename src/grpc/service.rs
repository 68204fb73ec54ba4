//! The RPCs of `inference.GRPCInferenceService`. Each reads the same state
//! the REST handlers read, and inference goes through the one gateway:
//! [`Front::model_infer`] decodes, routes by the request metadata, serves,
//! and answers with `x-ferry-version` and `x-ferry-request-id` metadata.

use axum::http::HeaderMap;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use super::status::{deadline_exceeded, status};
use crate::api::v2::{self, REQUEST_ID_HEADER, VERSION_HEADER};
use crate::api::{ApiError, AppState};
use crate::gateway::{Decoded, FrontDoor};
use crate::protocol::RequestedOutput;
use crate::protocol::grpc::{self as wire, pb};
use crate::runtime::TensorSpec;

/// The service's state: the same as the REST API's.
pub struct Front {
    state: AppState,
}

impl Front {
    pub fn new(state: AppState) -> Front {
        Front { state }
    }

    /// The data plane needs the inference token when one is configured
    /// (or the admin token), in the `authorization` metadata.
    fn may_infer(&self, headers: &HeaderMap) -> Result<(), Status> {
        if self.state.may_infer(headers) {
            return Ok(());
        }
        Err(Status::unauthenticated(
            "this server needs the inference token: send the metadata authorization: Bearer <token from the --inference-token-file>",
        ))
    }

    /// Repository load and unload change what serves: the admin token.
    fn admin(&self, headers: &HeaderMap) -> Result<(), Status> {
        self.state.token.check(headers).map_err(status)
    }

    /// Serves one decoded request through the gateway; the answer carries
    /// the version that gave it and the request's id.
    async fn infer(
        &self,
        headers: &HeaderMap,
        request: pb::ModelInferRequest,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let request = wire::decode_request(request).map_err(status)?;
        let served = self
            .state
            .gateway
            .serve_decoded(Decoded {
                door: FrontDoor::Grpc,
                model: &request.model,
                version: request.version.as_deref(),
                headers,
                id: request.id,
                inputs: request.inputs,
                outputs: request
                    .outputs
                    .into_iter()
                    .map(|name| RequestedOutput { name, binary: None })
                    .collect(),
            })
            .await
            .map_err(status)?;
        let (version, id) = (served.version, served.id);
        let outputs = served.outputs;
        let answer = wire::encode_response(request.model, version.clone(), id.clone(), &outputs);
        let mut response = Response::new(answer);
        let metadata = response.metadata_mut();
        if let Ok(v) = MetadataValue::try_from(version.as_str()) {
            metadata.insert(VERSION_HEADER, v);
        }
        if let Ok(v) = MetadataValue::try_from(id.as_str()) {
            metadata.insert(REQUEST_ID_HEADER, v);
        }
        Ok(response)
    }

    /// The version a request names, or the model's stable version.
    fn version_or_stable(&self, model: &str, version: &str) -> Result<String, Status> {
        if version.is_empty() {
            Ok(v2::stable_record(&self.state, model)
                .map_err(status)?
                .version)
        } else {
            Ok(version.to_string())
        }
    }
}

/// Counts an inference call in `ferry_grpc_requests_total` however it
/// ends: with its status, or — when the client reset the stream first (its
/// own deadline passing a moment before ours) and the call was dropped —
/// as `DEADLINE_EXCEEDED` past the deadline, `CANCELLED` before it.
struct Counted<'a> {
    service: &'a Front,
    model: String,
    deadline: Option<tokio::time::Instant>,
    code: Option<tonic::Code>,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or_else(|| match self.deadline {
            Some(at) if tokio::time::Instant::now() >= at => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Cancelled,
        });
        let state = &self.service.state;
        let served = state.gateway.routes().model(&self.model).is_some();
        state.metrics.grpc_request(
            if served { &self.model } else { "(not served)" },
            &super::status::code_name(code),
        );
    }
}

/// The request's metadata as HTTP headers: routing, tokens and the deadline
/// are read under the same names as over REST.
fn headers(metadata: MetadataMap) -> HeaderMap {
    metadata.into_headers()
}

fn tensor_metadata(specs: &[TensorSpec]) -> Vec<pb::model_metadata_response::TensorMetadata> {
    specs
        .iter()
        .map(|s| pb::model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.as_str().into(),
            shape: s.shape.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for Front {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.controller.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.may_infer(&headers(metadata))?;
        let version = Some(req.version.as_str()).filter(|v| !v.is_empty());
        let (_, ready) = v2::readiness_of(&self.state, &req.name, version).map_err(status)?;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        self.may_infer(&headers(request.into_parts().0))?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "ferry".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: v2::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.may_infer(&headers(metadata))?;
        let version = Some(req.version.as_str()).filter(|v| !v.is_empty());
        let meta = v2::metadata_of(&self.state, &req.name, version).map_err(status)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: meta.name,
            versions: meta.versions,
            platform: meta.platform.into(),
            inputs: tensor_metadata(&meta.inputs),
            outputs: tensor_metadata(&meta.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let headers = headers(metadata);
        self.may_infer(&headers)?;
        let deadline = super::deadline::of(&headers);
        let mut counted = Counted {
            service: self,
            model: req.model_name.clone(),
            deadline: deadline.map(|after| tokio::time::Instant::now() + after),
            code: None,
        };
        // The client's deadline: past it the call is dropped, which cancels
        // the run and takes the request out of the in-flight count.
        let result = match deadline {
            Some(after) => tokio::time::timeout(after, self.infer(&headers, req))
                .await
                .unwrap_or_else(|_| Err(deadline_exceeded(after))),
            None => self.infer(&headers, req).await,
        };
        counted.code = Some(match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        });
        result
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.may_infer(&headers(metadata))?;
        let models = v2::index_entries(&self.state, req.ready)
            .map_err(status)?
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.into(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.admin(&headers(metadata))?;
        let version =
            self.version_or_stable(&req.model_name, &version_parameter(&req.parameters)?)?;
        self.state
            .controller
            .load(&req.model_name, &version, "repository API (gRPC)")
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        self.admin(&headers(metadata))?;
        let version =
            self.version_or_stable(&req.model_name, &version_parameter(&req.parameters)?)?;
        self.state
            .controller
            .unload(&req.model_name, &version, "repository API (gRPC)")
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

/// The `version` parameter of a repository request (a string), as REST's
/// `parameters.version`; empty when not given.
fn version_parameter(
    parameters: &std::collections::HashMap<String, pb::ModelRepositoryParameter>,
) -> Result<String, Status> {
    use pb::model_repository_parameter::ParameterChoice;
    match parameters
        .get("version")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(String::new()),
        Some(ParameterChoice::StringParam(v)) => Ok(v.clone()),
        Some(ParameterChoice::Int64Param(v)) => Ok(v.to_string()),
        Some(_) => Err(status(ApiError::bad_request(
            "parameter \"version\" must be a string (or an integer) naming the version",
        ))),
    }
}
