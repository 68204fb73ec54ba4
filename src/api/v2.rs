//! The Open Inference Protocol data plane (`/v2`): health, server and model
//! metadata, readiness, inference (JSON and binary tensors) and the model
//! repository extension.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::{ApiJson, reading};
use super::{ApiError, AppState};
use crate::controller::feedback::FORWARDED;
use crate::gateway::{Answer, FrontDoor, Request};
use crate::protocol;
use crate::records::{Source, VersionRecord};
use crate::runtime::TensorSpec;

pub const VERSION_HEADER: &str = "x-ferry-version";
pub use crate::protocol::REQUEST_ID_HEADER;

/// The protocol extensions Ferry really implements.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository"];

/// The data plane. With an inference token configured, everything but the
/// health checks needs it (or the admin token). Repository load/unload
/// change state, so they need the admin token, checked before the body is
/// read.
pub fn router(state: AppState) -> Router<AppState> {
    let repository = Router::new()
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_admin,
        ));
    let health = Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready));
    let guarded = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v2/repository/index", post(repository_index))
        .merge(repository)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_inference,
        ));
    // Ground truth decides rollouts, so it comes from a trusted job: the
    // admin token or the feedback token, never an end user's.
    let labels = Router::new()
        .route("/v2/models/{model}/feedback", post(feedback))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::auth::require_feedback,
        ));
    health.merge(guarded).merge(labels)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<&'static str>,
}

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "ferry",
        version: env!("CARGO_PKG_VERSION"),
        extensions: EXTENSIONS.to_vec(),
    })
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "v2", responses((status = 200)))]
pub async fn live() -> Json<serde_json::Value> {
    Json(json!({"live": true}))
}

/// Readiness: every version that should serve is loaded and warm.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2", responses((status = 200), (status = 503)))]
pub async fn ready(State(s): State<AppState>) -> Response {
    if s.controller.is_ready() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "error": "starting: loading and warming the registered models"})),
        )
            .into_response()
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    pub(crate) name: String,
    pub(crate) versions: Vec<String>,
    pub(crate) platform: &'static str,
    pub(crate) inputs: Vec<TensorSpec>,
    pub(crate) outputs: Vec<TensorSpec>,
}

fn metadata(
    model: &str,
    remote: bool,
    signature: &crate::protocol::Signature,
    versions: Vec<String>,
) -> ModelMetadata {
    ModelMetadata {
        name: model.to_string(),
        versions,
        platform: if remote {
            "remote_v2"
        } else {
            "onnxruntime_onnx"
        },
        inputs: signature.inputs.clone(),
        outputs: signature.outputs.clone(),
    }
}

/// A version being served now (the model's stable one when `version` is
/// None), from the published routes alone: what serves is described and
/// reported ready without the store, which a shared store's outage must not
/// take from the data plane.
fn served(
    s: &AppState,
    model: &str,
    version: Option<&str>,
) -> Option<std::sync::Arc<crate::gateway::VersionPool>> {
    let route = s.gateway.routes().model(model)?;
    if route.unloaded.is_some() {
        return None;
    }
    route
        .pools
        .get(version.unwrap_or(&route.policy.stable))
        .cloned()
}

/// The metadata of a model (its stable version, and every loaded one) or
/// of one version: from what serves, else from the registry.
pub(crate) fn metadata_of(
    s: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<ModelMetadata, ApiError> {
    let versions = |v: &str| match version {
        Some(_) => vec![v.to_string()],
        None => loaded_versions(s, model),
    };
    if let Some(pool) = served(s, model, version) {
        return Ok(metadata(
            model,
            pool.is_remote(),
            &pool.signature,
            versions(&pool.version),
        ));
    }
    let what = || format!("the metadata of model \"{model}\"");
    let record = match version {
        Some(v) => s
            .controller
            .registry()
            .version(model, v)
            .map_err(reading(&what()))?,
        None => stable_record(s, model).map_err(reading(&what()))?,
    };
    let remote = matches!(record.source, Source::Remote { .. });
    Ok(metadata(
        model,
        remote,
        &record.signature,
        versions(&record.version),
    ))
}

/// Whether a model's stable version (or the one named) is loaded and warm,
/// and which version that is; not found when it is not registered.
pub(crate) fn readiness_of(
    s: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<(String, bool), ApiError> {
    if let Some(pool) = served(s, model, version) {
        return Ok((pool.version.clone(), true));
    }
    let what = || format!("whether model \"{model}\" is ready");
    let version = match version {
        Some(v) => {
            let record = s.controller.registry().version(model, v);
            record.map_err(reading(&what()))?.version
        }
        None => stable_record(s, model).map_err(reading(&what()))?.version,
    };
    let ready = s.controller.serves(model, &version);
    Ok((version, ready))
}

/// The stable version of a model, as the registry knows it.
pub(crate) fn stable_record(s: &AppState, model: &str) -> Result<VersionRecord, ApiError> {
    let registry = s.controller.registry();
    crate::records::check_name("model", model)?;
    let stable = registry
        .stable(model)?
        .ok_or_else(|| ApiError::not_found(format!("model \"{model}\" is not registered")))?;
    Ok(registry.version(model, &stable)?)
}

/// Model metadata (of the stable version); `versions` lists the loaded ones.
#[utoipa::path(get, path = "/v2/models/{model}", tag = "v2",
    responses((status = 200, body = ModelMetadata), (status = 404, body = super::error::ErrorBody)))]
pub async fn model_metadata(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    Ok(Json(metadata_of(&s, &model, None)?))
}

/// The versions of a model loaded now, sorted.
pub(crate) fn loaded_versions(s: &AppState, model: &str) -> Vec<String> {
    let mut versions: Vec<String> = s
        .gateway
        .routes()
        .model(model)
        .map(|r| r.pools.keys().cloned().collect())
        .unwrap_or_default();
    versions.sort();
    versions
}

/// Metadata of one version.
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}", tag = "v2",
    responses((status = 200, body = ModelMetadata), (status = 404, body = super::error::ErrorBody)))]
pub async fn version_metadata(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    Ok(Json(metadata_of(&s, &model, Some(&version))?))
}

fn readiness(s: &AppState, model: &str, version: &str, ready: bool) -> Response {
    if ready {
        Json(json!({"name": model, "version": version, "ready": true})).into_response()
    } else if let Some(by) = s
        .gateway
        .routes()
        .model(model)
        .and_then(|r| r.unloaded.clone())
    {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model \"{model}\" is unloaded (by {by}); POST /v2/repository/models/{model}/load puts it back in service"),
        )
        .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("version \"{version}\" of model \"{model}\" is registered but not loaded"),
        )
        .into_response()
    }
}

/// Whether the model's stable version is loaded and warm.
#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "v2",
    responses((status = 200), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn model_ready(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    let (version, ready) = readiness_of(&s, &model, None)?;
    Ok(readiness(&s, &model, &version, ready))
}

/// Whether one version is loaded and warm.
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}/ready", tag = "v2",
    responses((status = 200), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn version_ready(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (version, ready) = readiness_of(&s, &model, Some(&version))?;
    Ok(readiness(&s, &model, &version, ready))
}

/// Inference on the model (its stable version). JSON, or the binary tensor
/// data extension with `Inference-Header-Content-Length`.
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "v2",
    request_body(content = serde_json::Value, description = "V2 inference request"),
    responses((status = 200, description = "V2 inference response"), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn infer(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run_infer(s, &model, None, headers, body?).await
}

/// Inference on one loaded version.
#[utoipa::path(post, path = "/v2/models/{model}/versions/{version}/infer", tag = "v2",
    request_body(content = serde_json::Value, description = "V2 inference request"),
    responses((status = 200, description = "V2 inference response"), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn infer_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    run_infer(s, &model, Some(&version), headers, body?).await
}

/// Inference on the model's routed version, or on `version`, served by the
/// gateway in one call. The router's two inference handlers and the
/// dispatcher's hot path ([`super::dispatch`]) all end here.
pub async fn run_infer(
    s: AppState,
    model: &str,
    version: Option<&str>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let header_len = headers
        .get(protocol::HEADER_CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let answer = s
        .gateway
        .serve(Request {
            door: FrontDoor::Rest,
            model,
            version,
            headers: &headers,
            body,
            header_len,
        })
        .await?;
    Ok(respond(answer))
}

/// An inference answer with its headers: content type (and the JSON header's
/// length for the binary extension), the version that answered, the id.
fn respond(answer: Answer) -> Response {
    let mut resp = Response::new(axum::body::Body::from(answer.body));
    let h = resp.headers_mut();
    match answer.json_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                HeaderName::from_static(protocol::HEADER_CONTENT_LENGTH),
                HeaderValue::from(n),
            );
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    if let Some(v) = answer.version {
        h.insert(HeaderName::from_static(VERSION_HEADER), v);
    }
    // The id's own bytes, not a copy (ids are checked printable ASCII).
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(answer.id)) {
        h.insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    resp
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct IndexRequest {
    /// Only versions that are loaded and ready.
    #[serde(default)]
    ready: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct IndexEntry {
    pub(crate) name: String,
    pub(crate) version: String,
    /// `READY` (loaded and warm) or `UNAVAILABLE` (registered, not loaded).
    pub(crate) state: &'static str,
    pub(crate) reason: String,
}

/// Every registered version and whether it is loaded.
#[utoipa::path(post, path = "/v2/repository/index", tag = "v2",
    request_body(content = Option<IndexRequest>), responses((status = 200, body = Vec<IndexEntry>)))]
pub async fn repository_index(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<IndexRequest>,
) -> Result<Json<Vec<IndexEntry>>, ApiError> {
    Ok(Json(index_entries(&s, req.ready)?))
}

/// The repository index (REST and gRPC): every registered version, or only
/// the ready ones, with its state and why it is not ready. With the store
/// unreachable, the index is what this instance routes and serves
/// ([`served_entries`]): load balancers and Triton clients keep an answer.
pub(crate) fn index_entries(s: &AppState, ready: bool) -> Result<Vec<IndexEntry>, ApiError> {
    if s.controller.registry().store_known_unreachable() {
        return Ok(served_entries(s, ready));
    }
    match registered_entries(s, ready) {
        Err(e) if e.store_down.is_some() => Ok(served_entries(s, ready)),
        answer => answer,
    }
}

/// The index from the published routes alone: every version a route names
/// or loads, by model name; versions registered but neither routed nor
/// loaded are not known there, and left out.
fn served_entries(s: &AppState, ready: bool) -> Vec<IndexEntry> {
    let routes = s.gateway.routes();
    let mut models: Vec<String> = routes
        .snapshot_policies()
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    models.sort();
    let mut out = Vec::new();
    for name in models {
        let Some(route) = routes.model(&name) else {
            continue;
        };
        let mut versions: Vec<&str> = route.policy.versions().into_iter().collect();
        versions.extend(route.pools.keys().map(String::as_str));
        versions.sort_unstable();
        versions.dedup();
        for version in versions {
            let serving = route.pools.contains_key(version);
            if ready && !serving {
                continue;
            }
            out.push(IndexEntry {
                name: name.clone(),
                version: version.to_string(),
                state: if serving { "READY" } else { "UNAVAILABLE" },
                reason: match (&route.unloaded, serving) {
                    (_, true) => String::new(),
                    (Some(by), false) => unloaded_reason(&name, by),
                    (None, false) => NOT_STARTED.into(),
                },
            });
        }
    }
    out
}

/// Why a version that should serve is not ready.
const NOT_STARTED: &str = "should serve but could not start; see the server log";

fn unloaded_reason(model: &str, by: &str) -> String {
    format!("unloaded (by {by}); POST /v2/repository/models/{model}/load puts it back")
}

/// The index from the registry: every registered version.
fn registered_entries(s: &AppState, ready: bool) -> Result<Vec<IndexEntry>, ApiError> {
    let registry = s.controller.registry();
    let mut out = Vec::new();
    for m in registry.models()? {
        for v in registry.versions(&m.name)? {
            let serving = s.controller.serves(&m.name, &v.version);
            if ready && !serving {
                continue;
            }
            out.push(IndexEntry {
                name: m.name.clone(),
                version: v.version.clone(),
                state: if serving { "READY" } else { "UNAVAILABLE" },
                reason: if serving {
                    String::new()
                } else if let Some(by) = &m.unloaded {
                    unloaded_reason(&m.name, by)
                } else if m.stable.as_deref() == Some(v.version.as_str()) || v.loaded {
                    NOT_STARTED.into()
                } else {
                    "registered, not loaded".into()
                },
            });
        }
    }
    Ok(out)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct RepositoryRequest {
    #[serde(default)]
    parameters: RepositoryParameters,
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct RepositoryParameters {
    /// The version to load or unload (default: the stable version).
    #[serde(default)]
    version: Option<String>,
}

fn version_param(s: &AppState, model: &str, req: &RepositoryRequest) -> Result<String, ApiError> {
    match &req.parameters.version {
        Some(v) => Ok(v.clone()),
        None => Ok(stable_record(s, model)?.version),
    }
}

/// Loads a version beside the stable one, or puts a model taken out of
/// service back with its stable version (admin token required).
#[utoipa::path(post, path = "/v2/repository/models/{model}/load", tag = "v2",
    request_body(content = Option<RepositoryRequest>), security(("admin_token" = [])),
    responses((status = 200), (status = 401, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn repository_load(
    State(s): State<AppState>,
    Path(model): Path<String>,
    ApiJson(req): ApiJson<RepositoryRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let version = version_param(&s, &model, &req)?;
    s.controller
        .load(&model, &version, "repository API")
        .await?;
    Ok(Json(
        json!({"name": model, "version": version, "state": "READY"}),
    ))
}

/// Unloads a version; unloading the stable version (the default) takes the
/// model out of service until `load` (admin token required; 409 while a
/// rollout owns the model).
#[utoipa::path(post, path = "/v2/repository/models/{model}/unload", tag = "v2",
    request_body(content = Option<RepositoryRequest>), security(("admin_token" = [])),
    responses((status = 200), (status = 401, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn repository_unload(
    State(s): State<AppState>,
    Path(model): Path<String>,
    ApiJson(req): ApiJson<RepositoryRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let version = version_param(&s, &model, &req)?;
    s.controller
        .unload(&model, &version, "repository API")
        .await?;
    Ok(Json(
        json!({"name": model, "version": version, "state": "UNAVAILABLE"}),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The id of the answered request (the `id` of its response).
    id: String,
    /// The true class index (or value).
    #[schema(value_type = f64)]
    label: serde_json::Value,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct FeedbackResult {
    id: String,
    model: String,
    label: f64,
    /// The version that answered, what it predicted and whether the label
    /// matched: only for the admin token (a labelling job with the feedback
    /// token never saw the answer, and learns nothing of it here).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predicted: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correct: Option<bool>,
}

/// Delayed labels: joins ground truth to the version and predicted class that
/// answered a recent request, feeding per-version live accuracy. Adds an
/// observation; never changes what serves. Needs the admin token or the
/// feedback token (`--feedback-token-file`); one label per request id.
#[utoipa::path(post, path = "/v2/models/{model}/feedback", tag = "v2",
    request_body = FeedbackRequest, security(("admin_token" = [])),
    responses((status = 200, body = FeedbackResult), (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody)))]
pub async fn feedback(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<FeedbackRequest>,
) -> Result<Response, ApiError> {
    use crate::gateway::recent::NoLabel;
    // A class is an integer (1, or 1.0 as some clients write it).
    let label = req
        .label
        .as_f64()
        .filter(|l| l.fract() == 0.0 && l.abs() < 2f64.powi(53))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "label must be a class, an integer such as 0 or 1, not {}",
                req.label
            ))
        })?;
    protocol::check_id(&req.id)?;
    let known = s.gateway.recent().label(&req.id, &model);
    if known == Err(NoLabel::Unknown) {
        // A model name mistyped is said as such, not as an unknown id.
        crate::records::check_name("model", &model)?;
        if s.controller.registry().stable(&model)?.is_none() {
            return Err(ApiError::not_found(format!(
                "model \"{model}\" is not registered: post a label to the model that answered the request, /v2/models/MODEL/feedback"
            )));
        }
    }
    if known == Err(NoLabel::Unknown) && !headers.contains_key(FORWARDED) {
        // Perhaps another instance answered it: it takes the label.
        let asked = label_elsewhere(&s, &model, &req, &headers).await;
        if let Some(answer) = asked.answer {
            return Ok(peer_answer(answer));
        }
        return Err(unknown_id(&req.id, &model, &asked.unreachable));
    }
    let answered = known.map_err(|why| {
        let id = &req.id;
        match why {
            NoLabel::Unknown => unknown_id(id, &model, &[]),
            NoLabel::Shared => ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "request id \"{id}\" answered more than one request, so a label cannot say which it is for; give each request its own id (or let Ferry make them)"
                ),
            ),
            NoLabel::Labelled => ApiError::new(
                StatusCode::CONFLICT,
                format!("request id \"{id}\" already has its label; a label counts once per request"),
            ),
            NoLabel::NoPrediction => ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "request id \"{id}\" was answered without a class Ferry could read (a \"label\" output, in JSON, with an integer first value), so its label cannot be judged; requests whose labels you will post should get the label output in JSON"
                ),
            ),
        }
    })?;
    let correct = answered.class.is_some_and(|c| c as f64 == label);
    s.telemetry
        .series(&model, &answered.version, answered.role)
        .record(crate::units::now_secs(), |b| {
            b.labelled += 1;
            b.correct += u64::from(correct);
        });
    let admin = s.token.matches(&headers);
    Ok(Json(FeedbackResult {
        id: req.id,
        model,
        label,
        version: admin.then(|| answered.version.to_string()),
        predicted: admin.then_some(answered.class).flatten(),
        correct: admin.then_some(correct),
    })
    .into_response())
}

/// The 404 of an id no instance knows, naming those that could not be asked.
fn unknown_id(id: &str, model: &str, unreachable: &[String]) -> ApiError {
    let mut message = format!(
        "request id \"{id}\" of model \"{model}\" is unknown or too old: Ferry remembers the most recent answers (ferry serve --remember-requests)"
    );
    if !unreachable.is_empty() {
        message.push_str(&format!(
            "; these instances could not be asked, or did not answer: {}",
            unreachable.join("; ")
        ));
    }
    ApiError::not_found(message)
}

/// Passes the label to the other live instances with the caller's token.
async fn label_elsewhere(
    s: &AppState,
    model: &str,
    req: &FeedbackRequest,
    headers: &HeaderMap,
) -> crate::controller::feedback::Asked {
    let body = serde_json::to_vec(&json!({"id": req.id, "label": req.label}))
        .expect("JSON values serialise");
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.controller
        .label_elsewhere(model, body, authorization)
        .await
}

/// The answer of the instance that knew the id, as it gave it.
fn peer_answer(answer: crate::controller::feedback::PeerAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let json = HeaderValue::from_static("application/json");
    let mut resp = (status, answer.body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, json);
    resp
}
