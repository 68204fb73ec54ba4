//! The control API (`/api/v1`, admin token required): the registry — add a
//! version by upload or by URL, list, show, change serving settings, remove —
//! and each model's event history.

use std::collections::BTreeMap;

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::{ApiJson, ErrorBody, reading};
use super::{ApiError, AppState, Limits, auth};
use crate::gateway::RoutePolicy;
use crate::metrics::{Role, SeriesSummary};
use crate::records::{RemoteAccess, ServingSettings, SettingsPatch, VersionRecord};
use crate::registry::{Artifact, NewVersion};
use crate::store::Event;
use crate::units::HumanDuration;

pub fn router(state: AppState, limits: Limits) -> Router<AppState> {
    Router::new()
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/{model}", get(show_model))
        .route(
            "/api/v1/models/{model}/versions/{version}",
            get(show_version)
                .put(add_version)
                .patch(set_version)
                .delete(remove_version)
                .layer(DefaultBodyLimit::max(limits.max_upload_bytes)),
        )
        .route("/api/v1/models/{model}/events", get(events))
        .route(
            "/api/v1/models/{model}/route",
            get(show_route).put(set_route),
        )
        .route("/api/v1/models/{model}/metrics", get(model_metrics))
        .route("/api/v1/cluster", get(cluster))
        .route_layer(middleware::from_fn_with_state(state, auth::require_admin))
}

/// A version as the control API shows it: the record plus whether it serves.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionView {
    #[serde(flatten)]
    pub record: VersionRecord,
    /// Loaded, warm and in the published routes.
    pub serving: bool,
    /// The version's part in the model's routes: `stable`, `candidate`,
    /// `staging`, `shadow` or `fallback`; `loaded` for one loaded beside
    /// them (`/versions/{v}` only); null otherwise.
    pub role: Option<String>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelSummary {
    pub name: String,
    pub stable: Option<String>,
    pub versions: Vec<String>,
    /// Whether the stable version is serving.
    pub serving: bool,
    pub created_at: String,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub stable: Option<String>,
    pub created_at: String,
    pub versions: Vec<VersionView>,
}

/// The view of a record, looking up whether it is the stable version.
fn view_of(s: &AppState, record: VersionRecord) -> Result<VersionView, ApiError> {
    let route = s.controller.route(&record.model).ok();
    Ok(view(s, route.as_ref(), record))
}

fn view(s: &AppState, route: Option<&RoutePolicy>, record: VersionRecord) -> VersionView {
    let serving = s.controller.serves(&record.model, &record.version);
    let v = record.version.as_str();
    let role = match route {
        Some(r) if r.stable == v => Some(Role::Stable),
        Some(r) if r.candidate.as_ref().is_some_and(|c| c.version == v) => Some(Role::Candidate),
        Some(r) if r.staging.as_deref() == Some(v) => Some(Role::Staging),
        Some(r) if r.shadow.as_ref().is_some_and(|sh| sh.version == v) => Some(Role::Shadow),
        Some(r) if r.failover.iter().any(|f| f == v) => Some(Role::Fallback),
        _ => None,
    };
    let role = role
        .map(Role::as_str)
        .or_else(|| record.loaded.then_some("loaded"))
        .map(str::to_string);
    VersionView {
        record,
        serving,
        role,
    }
}

/// All models.
#[utoipa::path(get, path = "/api/v1/models", tag = "registry", security(("admin_token" = [])),
    responses((status = 200, body = Vec<ModelSummary>), (status = 401, body = ErrorBody)))]
pub async fn list_models(State(s): State<AppState>) -> Result<Json<Vec<ModelSummary>>, ApiError> {
    let registry = s.controller.registry();
    let mut out = Vec::new();
    let what = "the model list";
    for m in registry.models().map_err(reading(what))? {
        let versions = registry.versions(&m.name).map_err(reading(what))?;
        out.push(ModelSummary {
            serving: m
                .stable
                .as_deref()
                .is_some_and(|v| s.controller.serves(&m.name, v)),
            name: m.name,
            stable: m.stable,
            versions: versions.into_iter().map(|v| v.version).collect(),
            created_at: m.created_at,
        });
    }
    Ok(Json(out))
}

/// One model with all its versions.
#[utoipa::path(get, path = "/api/v1/models/{model}", tag = "registry", security(("admin_token" = [])),
    responses((status = 200, body = ModelView), (status = 404, body = ErrorBody)))]
pub async fn show_model(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    crate::records::check_name("model", &model)?;
    let registry = s.controller.registry();
    let what = format!("model \"{model}\"");
    let m = registry
        .model(&model)
        .map_err(reading(&what))?
        .ok_or_else(|| registry.unknown_model(&model))?;
    let route = s.controller.route(&model).ok();
    let versions = registry
        .versions(&model)
        .map_err(reading(&what))?
        .into_iter()
        .map(|v| view(&s, route.as_ref(), v))
        .collect();
    Ok(Json(ModelView {
        name: m.name,
        stable: m.stable,
        created_at: m.created_at,
        versions,
    }))
}

/// One version.
#[utoipa::path(get, path = "/api/v1/models/{model}/versions/{version}", tag = "registry", security(("admin_token" = [])),
    responses((status = 200, body = VersionView), (status = 404, body = ErrorBody)))]
pub async fn show_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<VersionView>, ApiError> {
    let record = s
        .controller
        .registry()
        .version(&model, &version)
        .map_err(reading(&format!(
            "version \"{version}\" of model \"{model}\""
        )))?;
    Ok(Json(view_of(&s, record)?))
}

/// How to register a version: the JSON body (remote versions), or the `spec`
/// part of a multipart upload whose `artifact` part is the ONNX file.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddVersionSpec {
    /// Remote V2 endpoints (`http://host:port[/v2/models/NAME[/versions/V]]`),
    /// one replica each. Leave empty when uploading an ONNX file.
    #[serde(default)]
    pub urls: Vec<String>,
    /// For remote versions: TLS trust, client certificate and request
    /// headers, by reference (paths on the server, `NAME=@env:VAR`,
    /// `NAME=@file:PATH`); the values are never stored.
    #[serde(default, skip_serializing_if = "RemoteAccess::is_empty")]
    pub remote: RemoteAccess,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Serving settings; omitted fields take the defaults.
    #[serde(default)]
    pub settings: SettingsPatch,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddVersionResult {
    /// `created`, or `unchanged` when the same artifact was already registered.
    pub result: String,
    #[serde(flatten)]
    pub version: VersionView,
}

/// Reads an add-version request; the multipart `artifact` part is streamed to
/// a staged file in the blob dir while it is hashed, never held whole.
async fn read_add_request(
    req: Request,
    state: &AppState,
) -> Result<(AddVersionSpec, Option<crate::registry::blobs::Staged>), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !content_type.starts_with("multipart/form-data") {
        let ApiJson(spec) = ApiJson::<AddVersionSpec>::from_request(req, state).await?;
        return Ok((spec, None));
    }
    let mut multipart = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut spec = AddVersionSpec::default();
    let mut artifact = None;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("could not read the upload: {}", e.body_text()),
        )
    })? {
        let name = field.name().unwrap_or("").to_string();
        let read_err = |e: axum::extract::multipart::MultipartError| {
            ApiError::new(
                e.status(),
                format!("could not read the upload: {}", e.body_text()),
            )
        };
        if name == "artifact" {
            let blobs = state.controller.registry().blobs().clone();
            let disk = |e: std::io::Error| {
                let what = format!("cannot stage the upload in {}: {e}", blobs.dir().display());
                ApiError::from(crate::registry::RegistryError::disk(e, what))
            };
            let mut upload = blobs.upload().await.map_err(disk)?;
            while let Some(chunk) = field.chunk().await.map_err(read_err)? {
                upload.write(&chunk).await.map_err(disk)?;
            }
            artifact = Some(upload.finish().await.map_err(disk)?);
            continue;
        }
        let data = field.bytes().await.map_err(read_err)?;
        match name.as_str() {
            "spec" => {
                spec = serde_json::from_slice(&data).map_err(|e| {
                    ApiError::bad_request(format!("the \"spec\" part is not valid: {e}"))
                })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected multipart part \"{other}\"; send \"spec\" (JSON) and \"artifact\" (the ONNX file)"
                )));
            }
        }
    }
    Ok((spec, artifact))
}

/// Registers a version: upload an ONNX file (multipart: `spec` + `artifact`)
/// or give remote endpoints (JSON). The version is loaded and warmed up before
/// it is accepted. Re-adding the same artifact is a no-op (200); different
/// content under the same name is a 409.
#[utoipa::path(put, path = "/api/v1/models/{model}/versions/{version}", tag = "registry", security(("admin_token" = [])),
    request_body(content = AddVersionSpec, description = "JSON for remote versions; multipart/form-data with parts `spec` and `artifact` for ONNX files"),
    responses((status = 201, body = AddVersionResult), (status = 200, body = AddVersionResult),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn add_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let (spec, artifact) = read_add_request(req, &s).await?;
    if spec.urls.is_empty() && !spec.remote.is_empty() {
        return Err(ApiError::bad_request(
            "\"remote\" (TLS and headers) applies to versions on remote urls; give --url, or leave out the --remote-* options",
        ));
    }
    let artifact = match (artifact, spec.urls.is_empty()) {
        (Some(bytes), true) => Artifact::Onnx(bytes),
        (None, false) => Artifact::Remote(spec.urls, spec.remote),
        (Some(_), false) => {
            return Err(ApiError::bad_request(
                "give either an ONNX artifact or remote urls, not both",
            ));
        }
        (None, true) => {
            return Err(ApiError::bad_request(
                "nothing to register: upload the ONNX file (multipart part \"artifact\") or give \"urls\" of a remote V2 server",
            ));
        }
    };
    let added = s
        .controller
        .register(NewVersion {
            model,
            version,
            artifact,
            labels: spec.labels,
            settings: ServingSettings::default().apply(&spec.settings),
        })
        .await?;
    let status = if added.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = AddVersionResult {
        result: if added.created {
            "created"
        } else {
            "unchanged"
        }
        .into(),
        version: view_of(&s, added.record)?,
    };
    Ok((status, Json(body)).into_response())
}

/// Changes a version's serving settings; a serving version restarts its
/// replicas with them (warm before they take over).
#[utoipa::path(patch, path = "/api/v1/models/{model}/versions/{version}", tag = "registry", security(("admin_token" = [])),
    request_body = SettingsPatch,
    responses((status = 200, body = VersionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    ApiJson(patch): ApiJson<SettingsPatch>,
) -> Result<Json<VersionView>, ApiError> {
    let record = s
        .controller
        .set_settings(&model, &version, &patch, "control API")
        .await?;
    Ok(Json(view_of(&s, record)?))
}

/// Removes a version that does not serve.
#[utoipa::path(delete, path = "/api/v1/models/{model}/versions/{version}", tag = "registry", security(("admin_token" = [])),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.controller
        .registry()
        .remove(&model, &version, "control API")?;
    Ok(StatusCode::NO_CONTENT)
}

/// The default and the largest page of events.
pub const EVENTS_PAGE: usize = 1000;
pub const EVENTS_PAGE_MAX: usize = 10_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this one, oldest first (the `Link: rel="next"` header
    /// carries it); without it, the most recent events.
    after: Option<i64>,
    /// At most this many events (default 1000, at most 10000).
    limit: Option<usize>,
}

impl EventsQuery {
    /// The page asked for; a bad limit is refused naming the limit.
    pub(super) fn page(
        query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    ) -> Result<crate::store::Page, ApiError> {
        let q = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = q.limit.unwrap_or(EVENTS_PAGE);
        if limit == 0 || limit > EVENTS_PAGE_MAX {
            return Err(ApiError::bad_request(format!(
                "limit {limit} is out of range: a page holds 1 to {EVENTS_PAGE_MAX} events; follow the Link header (?after=...) for the next page"
            )));
        }
        Ok(match q.after {
            Some(after) if after < 0 => {
                return Err(ApiError::bad_request(format!(
                    "after {after} is not an event number (0 or more)"
                )));
            }
            Some(after) => crate::store::Page::After { after, limit },
            None => crate::store::Page::Latest { limit },
        })
    }
}

/// A page of events, with `Link: <path?after=N&limit=L>; rel="next"` when
/// the page is full (more may follow); a page of the most recent events
/// links `rel="first"` to the start of the history instead.
pub fn events_page(path: &str, page: crate::store::Page, events: Vec<Event>) -> Response {
    let (limit, rel, after) = match page {
        crate::store::Page::Latest { limit } => (limit, "first", Some(0)),
        crate::store::Page::After { limit, .. } => (limit, "next", events.last().map(|e| e.id)),
    };
    let link = match after {
        Some(after) if events.len() >= limit => Some(format!(
            "<{path}?after={after}&limit={limit}>; rel=\"{rel}\""
        )),
        _ => None,
    };
    let mut response = Json(events).into_response();
    if let Some(link) = link.and_then(|l| header::HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

/// A model's events, oldest first: the most recent page, or the page after
/// `after`.
#[utoipa::path(get, path = "/api/v1/models/{model}/events", tag = "registry", security(("admin_token" = [])),
    params(EventsQuery),
    responses((status = 200, body = Vec<Event>, headers(("link" = String, description = "`<...?after=N&limit=L>; rel=\"next\"` when the page is full (`rel=\"first\"` for the most recent page)"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(s): State<AppState>,
    Path(model): Path<String>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let page = EventsQuery::page(query)?;
    crate::records::check_name("model", &model)?;
    let registry = s.controller.registry();
    let what = format!("the events of model \"{model}\"");
    if registry.model(&model).map_err(reading(&what))?.is_none() {
        return Err(ApiError::not_found(format!(
            "model \"{model}\" is not registered"
        )));
    }
    let events = registry.events(&model, page).map_err(reading(&what))?;
    Ok(events_page(
        &format!("/api/v1/models/{model}/events"),
        page,
        events,
    ))
}

/// The model's routing policy: which versions take which requests.
#[utoipa::path(get, path = "/api/v1/models/{model}/route", tag = "routing", security(("admin_token" = [])),
    responses((status = 200, body = RoutePolicy), (status = 404, body = ErrorBody)))]
pub async fn show_route(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<RoutePolicy>, ApiError> {
    crate::records::check_name("model", &model)?;
    let route = s
        .controller
        .route(&model)
        .map_err(reading(&format!("the route of model \"{model}\"")))?;
    Ok(Json(route))
}

/// Sets the model's routing policy directly: candidate weight (sticky key,
/// cohort), staging, failover chain and breaker, shadow mirroring. Every
/// version it names is loaded and warm before the switch, which is atomic.
/// Rollouts set this for you; this is the manual control.
#[utoipa::path(put, path = "/api/v1/models/{model}/route", tag = "routing", security(("admin_token" = [])),
    request_body = RoutePolicy,
    responses((status = 200, body = RoutePolicy), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn set_route(
    State(s): State<AppState>,
    Path(model): Path<String>,
    ApiJson(policy): ApiJson<RoutePolicy>,
) -> Result<Json<RoutePolicy>, ApiError> {
    crate::records::check_name("model", &model)?;
    Ok(Json(
        s.controller
            .set_route(&model, policy, "control API")
            .await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct MetricsQuery {
    /// The window to summarise, e.g. `30s`, `5m` (default 1m, at most 15m).
    window: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelMetrics {
    pub model: String,
    #[schema(value_type = String)]
    pub window: HumanDuration,
    /// One entry per version and role that saw traffic in the last 15 minutes.
    pub series: Vec<SeriesSummary>,
    /// With several instances on one store: the series are merged over all
    /// of them, and this says whether every instance's closed buckets of
    /// the window have arrived (absent on a single node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::metrics::cluster::Completeness>,
}

/// Per-version, per-role request counts, error rate, latency percentiles and
/// shadow agreement over a recent window.
#[utoipa::path(get, path = "/api/v1/models/{model}/metrics", tag = "routing", security(("admin_token" = [])),
    params(MetricsQuery),
    responses((status = 200, body = ModelMetrics), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn model_metrics(
    State(s): State<AppState>,
    Path(model): Path<String>,
    query: Result<axum::extract::Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ModelMetrics>, ApiError> {
    let query = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let window = match &query.window {
        Some(w) => {
            HumanDuration::parse(w).map_err(|e| ApiError::bad_request(format!("window: {e}")))?
        }
        None => HumanDuration(std::time::Duration::from_secs(60)),
    };
    if window.0 > std::time::Duration::from_secs(900) || window.0.is_zero() {
        return Err(ApiError::bad_request(format!(
            "window must be between 1s and 15m, not {window}"
        )));
    }
    crate::records::check_name("model", &model)?;
    // A model this instance serves exists, whatever the store says now (it
    // may be unreachable: the figures are then this instance's own, marked
    // incomplete); any other is looked up.
    if !s.controller.serves_model(&model) {
        s.controller
            .route(&model)
            .map_err(reading(&format!("whether model \"{model}\" exists")))?;
    }
    let (series, completeness) = s.controller.merged_summaries(&model, window.0);
    Ok(Json(ModelMetrics {
        model: model.clone(),
        window,
        series,
        cluster: completeness.shared().then_some(completeness),
    }))
}

/// The instances sharing this store (one on an embedded store): each one's
/// address, build, whether it reported within the last 5 s (live) or not
/// (stale), the route version it serves beside the store's latest, its warm
/// versions and its load failures.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster", security(("admin_token" = [])),
    responses((status = 200, body = crate::controller::cluster::ClusterView)))]
pub async fn cluster(
    State(s): State<AppState>,
) -> Result<Json<crate::controller::cluster::ClusterView>, ApiError> {
    Ok(Json(s.controller.cluster()?))
}
