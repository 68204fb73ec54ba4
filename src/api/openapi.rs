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
        rollouts::rollout_events, rollouts::report, v2::feedback,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&AdminTokenScheme),
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
