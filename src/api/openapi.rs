//! The OpenAPI document of the HTTP API, generated from the handlers' and
//! types' annotations, served at `/api/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{control, error, rollouts, v2};

struct AdminTokenScheme;

impl Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The token in DATA_DIR/admin-token"))
                    .build(),
            ),
        );
    }
}

/// Documents what every operation can answer besides its own results, so
/// the document matches the server (checked with schemathesis, see
/// RELIABILITY.md): 401 where the admin token is needed, 400 where a path
/// name or a body is parsed, 404 where a model is named, 503/507 where state
/// changes and the disk may refuse; and the names' pattern on `{model}` and
/// `{version}`.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, Schema};
        let error = |what: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(what)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                (&mut item.get, false),
                (&mut item.put, true),
                (&mut item.post, true),
                (&mut item.delete, true),
                (&mut item.patch, true),
            ];
            for (op, changes_state) in operations {
                let Some(op) = op else { continue };
                let mut names_model = false;
                let mut parses = op.request_body.is_some();
                for param in op.parameters.iter_mut().flatten() {
                    if !matches!(param.parameter_in, ParameterIn::Path) {
                        continue;
                    }
                    parses = true;
                    if param.name == "model" || param.name == "version" {
                        names_model = true;
                        if let Some(RefOr::T(Schema::Object(schema))) = param.schema.as_mut() {
                            schema.pattern = Some(crate::records::NAME_PATTERN.to_string());
                        }
                    }
                }
                let responses = &mut op.responses.responses;
                if op.security.is_some() {
                    responses
                        .entry("401".into())
                        .or_insert_with(|| error("The admin token is missing or wrong."));
                }
                if parses {
                    responses
                        .entry("400".into())
                        .or_insert_with(|| error("The request is invalid; the error says why."));
                }
                if names_model {
                    responses
                        .entry("404".into())
                        .or_insert_with(|| error("No such model, version or rollout."));
                }
                if changes_state {
                    responses.entry("503".into()).or_insert_with(|| {
                        error("The data dir cannot be written (read-only); nothing was changed.")
                    });
                    responses.entry("507".into()).or_insert_with(|| {
                        error("The data dir's disk is full; nothing was changed.")
                    });
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry", description = "Serve machine-learning models and ship new versions of them into production safely."),
    paths(
        v2::server_metadata, v2::live, v2::ready, v2::model_metadata, v2::version_metadata,
        v2::model_ready, v2::version_ready, v2::infer, v2::infer_version,
        v2::repository_index, v2::repository_load, v2::repository_unload,
        control::list_models, control::show_model, control::show_version, control::add_version,
        control::set_version, control::remove_version, control::events,
        control::show_route, control::set_route, control::model_metrics,
        rollouts::apply, rollouts::all_status, rollouts::status, rollouts::promote, rollouts::pause,
        rollouts::resume, rollouts::abort, rollouts::retry, rollouts::rollback, rollouts::history,
        rollouts::rollout_events, rollouts::report, v2::feedback, control::cluster,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&AdminTokenScheme, &CommonErrors),
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
