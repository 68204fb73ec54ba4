//! The rollout part of the control API: apply a spec, status, commands
//! (promote, pause, resume, abort, retry, rollback), history, events and the
//! A/B report. Every handler is a thin call into the controller; a command
//! goes through [`run`], which has the leader execute it when another
//! instance leads (`controller::commands`), and [`answer`] is how its result
//! is answered wherever it was executed.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::{ApiJson, ErrorBody, reading, respond};
use super::{ApiError, AppState};
use crate::analysis::report::Report;
use crate::controller::ControlError;
use crate::controller::commands::{Answer, Request};
use crate::controller::rollouts::{Applied, Status};
use crate::spec::RolloutSpec;
use crate::store::Event;
use crate::store::commands::CommandOutcome;
use crate::strategy::Phase;

/// The rollout commands and views; all need the admin token.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/status", get(all_status))
        .route("/api/v1/models/{model}/rollouts", post(apply).get(history))
        .route(
            "/api/v1/models/{model}/rollouts/{rollout}/events",
            get(rollout_events),
        )
        .route("/api/v1/models/{model}/status", get(status))
        .route("/api/v1/models/{model}/report", get(report))
        .route("/api/v1/models/{model}/promote", post(promote))
        .route("/api/v1/models/{model}/pause", post(pause))
        .route("/api/v1/models/{model}/resume", post(resume))
        .route("/api/v1/models/{model}/abort", post(abort))
        .route("/api/v1/models/{model}/retry", post(retry))
        .route("/api/v1/models/{model}/rollback", post(rollback))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            super::auth::require_admin,
        ))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyResult {
    /// `created`, or `unchanged` when the same spec is already rolling out.
    pub result: Applied,
    #[serde(flatten)]
    pub status: Status,
}

/// Starts a rollout from a spec (JSON, or YAML: the same schema). An
/// identical spec to the active rollout's is a no-op (200, `unchanged`);
/// another active rollout is a 409 naming it.
#[utoipa::path(post, path = "/api/v1/models/{model}/rollouts", tag = "rollouts", security(("admin_token" = [])),
    request_body = RolloutSpec,
    responses((status = 201, body = ApplyResult), (status = 200, body = ApplyResult), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn apply(
    State(s): State<AppState>,
    Path(model): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    // Parsing a big spec (a QA dataset may ride along) takes a while: off
    // the I/O threads, so the data plane never waits on it.
    let spec = tokio::task::spawn_blocking(move || {
        let text =
            std::str::from_utf8(&body).map_err(|_| "the spec is not UTF-8 text".to_string())?;
        RolloutSpec::from_yaml(text)
    })
    .await
    .map_err(|e| ApiError::internal("parsing the spec failed", e))?
    .map_err(ApiError::bad_request)?;
    if spec.model != model {
        return Err(ApiError::bad_request(format!(
            "the spec is for model \"{}\" but was sent to /api/v1/models/{model}/rollouts",
            spec.model
        )));
    }
    let spec = Box::new(spec);
    run(&s, &model, Request::Apply { spec }).await
}

/// Runs a command where it must run (here, or at the leader when another
/// instance leads the rollouts) and answers with its answer: the same
/// status and body either way.
async fn run(s: &AppState, model: &str, request: Request) -> Result<Response, ApiError> {
    // A name no model can have is refused here, before it is stored for
    // the leader or sent to the store.
    crate::records::check_name("model", model)?;
    let reply = s
        .controller
        .submit(model, request, "control API", answer)
        .await?;
    let mut response = respond(reply.outcome);
    if let Some(by) = reply.executed_by
        && let Ok(value) = HeaderValue::from_str(&by.to_string())
    {
        response.headers_mut().insert(EXECUTED_BY, value);
    }
    Ok(response)
}

/// The header on the answer to a command another instance executed: which
/// instance (and term), and the command's id.
pub const EXECUTED_BY: &str = "x-ferry-executed-by";

/// A command's result as the control API answers it: what the instance
/// that executed it sends, or stores for the instance that asked.
pub fn answer(result: Result<Answer, ControlError>) -> CommandOutcome {
    let json = |code: StatusCode, body: Result<String, serde_json::Error>| match body {
        Ok(body) => CommandOutcome {
            status: code.as_u16(),
            body,
            retry_after: None,
        },
        Err(e) => ApiError::internal("writing the answer failed", e).into(),
    };
    match result {
        Ok(Answer::Applied(result, status)) => {
            let code = if result == Applied::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json(code, serde_json::to_string(&ApplyResult { result, status }))
        }
        Ok(Answer::Status(status)) => json(StatusCode::OK, serde_json::to_string(&status)),
        Err(e) => ApiError::from(e).into(),
    }
}

/// Every model's status.
#[utoipa::path(get, path = "/api/v1/status", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Vec<Status>)))]
pub async fn all_status(State(s): State<AppState>) -> Result<Json<Vec<Status>>, ApiError> {
    let what = "the status of the models";
    let models = s.controller.registry().models().map_err(reading(what))?;
    let mut out = Vec::new();
    for m in models {
        out.push(s.controller.status(&m.name).map_err(reading(what))?);
    }
    Ok(Json(out))
}

/// A model's status: stable and candidate, the active rollout's steps,
/// traffic, the latest analysis verdict with its numbers.
#[utoipa::path(get, path = "/api/v1/models/{model}/status", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Status), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Status>, ApiError> {
    crate::records::check_name("model", &model)?;
    let status = s
        .controller
        .status(&model)
        .map_err(reading(&format!("the status of model \"{model}\"")))?;
    Ok(Json(status))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Skip every remaining step.
    #[serde(default)]
    full: bool,
}

/// Advances past the current wait or step (`full`: to the end).
#[utoipa::path(post, path = "/api/v1/models/{model}/promote", tag = "rollouts", security(("admin_token" = [])),
    request_body(content = Option<PromoteRequest>),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn promote(
    State(s): State<AppState>,
    Path(model): Path<String>,
    ApiJson(req): ApiJson<PromoteRequest>,
) -> Result<Response, ApiError> {
    run(&s, &model, Request::Promote { full: req.full }).await
}

/// Pauses the active rollout until `resume`.
#[utoipa::path(post, path = "/api/v1/models/{model}/pause", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pause(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, &model, Request::Pause).await
}

/// Ends a pause that waits for `resume`.
#[utoipa::path(post, path = "/api/v1/models/{model}/resume", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn resume(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, &model, Request::Resume).await
}

/// Puts all traffic back on the stable version at once; final for the rollout.
#[utoipa::path(post, path = "/api/v1/models/{model}/abort", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn abort(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, &model, Request::Abort).await
}

/// Starts a new rollout with the spec of the last aborted or failed one.
#[utoipa::path(post, path = "/api/v1/models/{model}/retry", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn retry(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    run(&s, &model, Request::Retry).await
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to go back to (default: the previous stable version).
    #[serde(default)]
    to: Option<String>,
}

/// Switches production to the previous stable version (or `to`), as a
/// recorded rollout; the rollout it undoes becomes `rolled_back`.
#[utoipa::path(post, path = "/api/v1/models/{model}/rollback", tag = "rollouts", security(("admin_token" = [])),
    request_body(content = Option<RollbackRequest>),
    responses((status = 200, body = Status), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn rollback(
    State(s): State<AppState>,
    Path(model): Path<String>,
    ApiJson(req): ApiJson<RollbackRequest>,
) -> Result<Response, ApiError> {
    if let Some(v) = &req.to {
        crate::records::check_name("version", v)?;
    }
    run(&s, &model, Request::Rollback { to: req.to }).await
}

/// One rollout in the history.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutSummary {
    pub rollout: String,
    pub strategy: String,
    pub version: String,
    /// The stable version when it started.
    pub from: String,
    pub phase: Phase,
    pub message: String,
    pub created_at: String,
    pub updated_at: String,
    #[schema(value_type = Object)]
    pub spec: RolloutSpec,
}

/// A model's rollouts, newest first, each with its events.
#[utoipa::path(get, path = "/api/v1/models/{model}/rollouts", tag = "rollouts", security(("admin_token" = [])),
    responses((status = 200, body = Vec<RolloutSummary>), (status = 404, body = ErrorBody)))]
pub async fn history(
    State(s): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Vec<RolloutSummary>>, ApiError> {
    crate::records::check_name("model", &model)?;
    let what = format!("the rollouts of model \"{model}\"");
    s.controller.route(&model).map_err(reading(&what))?;
    let rollouts = s.controller.rollouts(&model, 200).map_err(reading(&what))?;
    Ok(Json(
        rollouts
            .into_iter()
            .map(|r| RolloutSummary {
                rollout: r.name(),
                strategy: r.kind.to_string(),
                version: r.spec.version.clone(),
                from: r.state.before.stable.clone(),
                phase: r.state.phase,
                message: r.state.message.clone(),
                created_at: r.created_at.clone(),
                updated_at: r.updated_at.clone(),
                spec: r.spec,
            })
            .collect(),
    ))
}

/// A rollout's events, oldest first: the most recent page (all of them
/// when there are at most `limit`), or the page after `after`.
#[utoipa::path(get, path = "/api/v1/models/{model}/rollouts/{rollout}/events", tag = "rollouts", security(("admin_token" = [])),
    params(super::control::EventsQuery),
    responses((status = 200, body = Vec<Event>, headers(("link" = String, description = "`<...?after=N&limit=L>; rel=\"next\"` when the page is full (`rel=\"first\"` for the most recent page)"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rollout_events(
    State(s): State<AppState>,
    Path((model, rollout)): Path<(String, String)>,
    query: Result<Query<super::control::EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let page = super::control::EventsQuery::page(query)?;
    let what = format!("the events of rollout {rollout} of model \"{model}\"");
    let r = s
        .controller
        .rollout(&model, Some(&rollout))
        .map_err(reading(&what))?;
    let events = s
        .controller
        .rollout_events(&r, page)
        .map_err(reading(&what))?;
    Ok(super::control::events_page(
        &format!("/api/v1/models/{model}/rollouts/{}/events", r.name()),
        page,
        events,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ReportQuery {
    /// The rollout (default: the latest).
    rollout: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReportView {
    pub rollout: String,
    pub strategy: String,
    pub phase: Phase,
    #[serde(flatten)]
    pub report: Report,
}

/// The A/B comparison of a rollout's two arms.
#[utoipa::path(get, path = "/api/v1/models/{model}/report", tag = "rollouts", security(("admin_token" = [])),
    params(ReportQuery), responses((status = 200, body = ReportView), (status = 404, body = ErrorBody)))]
pub async fn report(
    State(s): State<AppState>,
    Path(model): Path<String>,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ReportView>, ApiError> {
    let query = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let r = s
        .controller
        .rollout(&model, query.rollout.as_deref())
        .map_err(reading(&format!("the rollouts of model \"{model}\"")))?;
    Ok(Json(ReportView {
        rollout: r.name(),
        strategy: r.kind.to_string(),
        phase: r.state.phase,
        report: s.controller.report_of(&r),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        serde_json::from_value(serde_json::json!({
            "model": "cancer", "stable": "1", "candidate": "2", "rollout": "r-1",
            "strategy": "canary", "phase": "paused", "waiting_for": "resume",
            "steps": ["weight 10"], "step": 0, "traffic": {"1": 90.0, "2": 10.0},
            "observed": {}, "message": "paused by control API", "analysis": null,
            "updated_at": null, "last_rollout": null
        }))
        .unwrap()
    }

    #[test]
    fn a_command_is_answered_with_the_status_code_and_bytes_of_a_direct_answer() {
        let created = answer(Ok(Answer::Applied(Applied::Created, status())));
        let unchanged = answer(Ok(Answer::Applied(Applied::Unchanged, status())));
        assert_eq!((created.status, unchanged.status), (201, 200));
        let expected = serde_json::to_string(&ApplyResult {
            result: Applied::Created,
            status: status(),
        })
        .unwrap();
        assert_eq!(created.body, expected);
        assert!(
            unchanged
                .body
                .starts_with(r#"{"result":"unchanged","model":"cancer""#)
        );

        let paused = answer(Ok(Answer::Status(status())));
        assert_eq!(paused.status, 200);
        assert_eq!(paused.body, serde_json::to_string(&status()).unwrap());
        assert_eq!(paused.retry_after, None);

        // Errors: the one mapping, body and Retry-After included.
        let conflict = answer(Err(ControlError::Conflict("r-1 is already paused".into())));
        assert_eq!(
            conflict,
            CommandOutcome {
                status: 409,
                body: r#"{"error":"r-1 is already paused"}"#.into(),
                retry_after: None,
            }
        );
        let invalid = answer(Err(ControlError::Invalid("bad".into())));
        assert_eq!(invalid.status, 400);
        let no_leader = answer(Err(ControlError::NoLeader {
            command: "pause of model \"cancer\"".into(),
            waited: std::time::Duration::from_secs(10),
        }));
        assert_eq!((no_leader.status, no_leader.retry_after), (503, Some(5)));
    }
}
