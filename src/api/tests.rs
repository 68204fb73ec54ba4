//! The HTTP surface in process (`tower::ServiceExt::oneshot` on the router,
//! no socket): which token each plane takes, and how the errors of every
//! layer come back (status, `{"error": …}` naming the fix). A real store,
//! registry and controller in a temporary directory, and one small ONNX
//! model (`examples/models/cancer-v1.onnx`) where a served model is needed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use tower::ServiceExt;

use super::{AdminToken, AppState, Limits};
use crate::controller::{Controller, ControllerParts, Reach};
use crate::gateway::recent::RecentPredictions;
use crate::gateway::{Gateway, RouteTable};
use crate::metrics::{Metrics, Telemetry};
use crate::registry::{Blobs, Registry};
use crate::runtime::{LoadLimits, OnnxRuntime, remote};
use crate::store::SqliteStore;

const ADMIN: &str = "admin-secret";
const INFERENCE: &str = "inference-secret";
const FEEDBACK: &str = "feedback-secret";

/// ONNX Runtime is initialised once per process.
fn onnx() -> Arc<OnnxRuntime> {
    OnnxRuntime::for_tests()
}

/// A server's state and router over a fresh data dir.
struct App {
    router: Router,
    _dir: tempfile::TempDir,
}

/// Which optional tokens the server is started with.
#[derive(Default)]
struct Tokens {
    inference: bool,
    feedback: bool,
}

impl App {
    fn new(tokens: Tokens) -> App {
        let dir = tempfile::tempdir().expect("a temporary dir");
        let store = Arc::new(SqliteStore::open(dir.path()).expect("a store"));
        let blobs = Arc::new(Blobs::open(dir.path()).expect("a blob dir"));
        let http = remote::RemoteHttp::new(Duration::from_secs(2), 64 << 20);
        let limits = LoadLimits {
            max_input_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
        };
        let registry = Arc::new(Registry::new(store, blobs, onnx(), http.clone(), limits));
        let (metrics, telemetry) = (Arc::new(Metrics::new()), Arc::new(Telemetry::default()));
        let routes = Arc::new(RouteTable::new());
        let controller = Arc::new(Controller::new(ControllerParts {
            registry,
            routes: routes.clone(),
            onnx: onnx(),
            http,
            metrics: metrics.clone(),
            telemetry: telemetry.clone(),
            drain_timeout: Duration::from_secs(1),
            reach: Reach::default(),
            limits,
            command_wait: crate::controller::commands::DEFAULT_WAIT,
        }));
        let gateway = Gateway::new(routes, metrics.clone(), RecentPredictions::new(100), None);
        let token = |yes: bool, t: &str| yes.then(|| Arc::new(AdminToken::new(t.into())));
        let state = AppState {
            controller,
            gateway: Arc::new(gateway),
            metrics,
            telemetry,
            token: Arc::new(AdminToken::new(ADMIN.into())),
            inference_token: token(tokens.inference, INFERENCE),
            feedback_token: token(tokens.feedback, FEEDBACK),
        };
        App {
            router: super::router(state, Limits::default()),
            _dir: dir,
        }
    }

    /// Sends one request; the answer's status, JSON body and
    /// `WWW-Authenticate` header.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body,
        content_type: &str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, content_type);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).expect("a request"))
            .await
            .expect("the router answers");
        let status = resp.status();
        let challenge = resp.headers().contains_key(header::WWW_AUTHENTICATE);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("a body");
        Answer {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            challenge,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.send(Method::GET, path, token, Body::empty(), "application/json")
            .await
    }

    async fn post(&self, path: &str, token: Option<&str>, json: &str) -> Answer {
        self.send(
            Method::POST,
            path,
            token,
            Body::from(json.to_string()),
            "application/json",
        )
        .await
    }

    /// Uploads an example model as a version (multipart `spec` + `artifact`).
    async fn upload(&self, model: &str, version: &str, file: &str) -> Answer {
        let onnx = std::fs::read(format!(
            "{}/examples/models/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("the example model");
        let mut body = b"--B\r\ncontent-disposition: form-data; name=\"spec\"\r\n\r\n{}\r\n--B\r\n\
            content-disposition: form-data; name=\"artifact\"; filename=\"m.onnx\"\r\n\
            content-type: application/octet-stream\r\n\r\n"
            .to_vec();
        body.extend_from_slice(&onnx);
        body.extend_from_slice(b"\r\n--B--\r\n");
        self.send(
            Method::PUT,
            &format!("/api/v1/models/{model}/versions/{version}"),
            Some(ADMIN),
            Body::from(body),
            "multipart/form-data; boundary=B",
        )
        .await
    }

    /// A server serving `cancer` version 1.
    async fn serving() -> App {
        let app = App::new(Tokens::default());
        let added = app.upload("cancer", "1", "cancer-v1.onnx").await;
        assert_eq!(added.status, StatusCode::CREATED, "{}", added.json);
        app
    }
}

/// What came back.
struct Answer {
    status: StatusCode,
    json: serde_json::Value,
    /// The answer carries `WWW-Authenticate`.
    challenge: bool,
}

impl Answer {
    /// The status and the `error` message.
    fn error(&self) -> (StatusCode, &str) {
        (self.status, self.json["error"].as_str().unwrap_or(""))
    }

    #[track_caller]
    fn assert_error(&self, status: StatusCode, says: &[&str]) {
        let (got, message) = self.error();
        assert_eq!(got, status, "{}", self.json);
        for part in says {
            assert!(message.contains(part), "{message:?} should say {part:?}");
        }
    }
}

/// One inference request for `cancer-v1` (30 features), with an id.
fn row(id: &str) -> String {
    let data = vec!["1.0"; 30].join(",");
    format!(
        r#"{{"id":"{id}","inputs":[{{"name":"input","shape":[1,30],"datatype":"FP32","data":[{data}]}}]}}"#
    )
}

#[tokio::test]
async fn the_control_api_needs_the_admin_token() {
    let app = App::new(Tokens::default());
    let missing = app.get("/api/v1/models", None).await;
    missing.assert_error(
        StatusCode::UNAUTHORIZED,
        &["needs the admin token", "DATA_DIR/admin-token"],
    );
    assert!(missing.challenge, "401 says Bearer");
    let wrong = app.get("/api/v1/models", Some("not-it")).await;
    wrong.assert_error(
        StatusCode::UNAUTHORIZED,
        &["the admin token is wrong", "DATA_DIR/admin-token"],
    );
    for token in [INFERENCE, FEEDBACK] {
        let other = app.get("/api/v1/models", Some(token)).await;
        assert_eq!(
            other.status,
            StatusCode::UNAUTHORIZED,
            "{token} is not the admin's"
        );
    }
    let right = app.get("/api/v1/models", Some(ADMIN)).await;
    assert_eq!(
        (right.status, right.json.clone()),
        (StatusCode::OK, serde_json::json!([]))
    );
}

#[tokio::test]
async fn the_data_plane_takes_the_inference_or_admin_token_when_one_is_set() {
    let open = App::new(Tokens::default());
    let answer = open.post("/v2/models/nope/infer", None, &row("a")).await;
    assert_eq!(
        answer.status,
        StatusCode::NOT_FOUND,
        "no token configured: open"
    );

    let guarded = App::new(Tokens {
        inference: true,
        ..Tokens::default()
    });
    let missing = guarded.post("/v2/models/nope/infer", None, &row("a")).await;
    missing.assert_error(
        StatusCode::UNAUTHORIZED,
        &["needs the inference token", "--inference-token-file"],
    );
    assert!(missing.challenge);
    let wrong = guarded
        .post("/v2/models/nope/infer", Some("not-it"), &row("a"))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    for token in [INFERENCE, ADMIN] {
        let through = guarded
            .post("/v2/models/nope/infer", Some(token), &row("a"))
            .await;
        assert_eq!(through.status, StatusCode::NOT_FOUND, "{token} passes");
    }
    assert_eq!(
        guarded.get("/v2/health/live", None).await.status,
        StatusCode::OK,
        "health is open"
    );
    let load = guarded
        .post("/v2/repository/models/nope/load", Some(INFERENCE), "{}")
        .await;
    load.assert_error(StatusCode::UNAUTHORIZED, &["the admin token is wrong"]);
}

#[tokio::test]
async fn feedback_takes_the_admin_or_feedback_token_and_shows_the_answer_to_the_admin_only() {
    let app = App::serving().await;
    let label = |id: &str| format!(r#"{{"id":"{id}","label":1}}"#);
    let missing = app
        .post("/v2/models/cancer/feedback", None, &label("x"))
        .await;
    missing.assert_error(
        StatusCode::UNAUTHORIZED,
        &["feedback needs a token", "--feedback-token-file"],
    );
    assert!(missing.challenge);

    let unknown = app
        .post("/v2/models/cancer/feedback", Some(ADMIN), &label("x"))
        .await;
    unknown.assert_error(StatusCode::NOT_FOUND, &["\"x\"", "--remember-requests"]);
    let answered = app.post("/v2/models/cancer/infer", None, &row("r1")).await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.json);
    let admin = app
        .post("/v2/models/cancer/feedback", Some(ADMIN), &label("r1"))
        .await;
    assert_eq!(admin.status, StatusCode::OK, "{}", admin.json);
    assert_eq!(admin.json["version"], "1", "the admin sees what answered");
    let again = app
        .post("/v2/models/cancer/feedback", Some(ADMIN), &label("r1"))
        .await;
    again.assert_error(StatusCode::CONFLICT, &["already has its label"]);
}

#[tokio::test]
async fn the_feedback_token_labels_without_seeing_the_answer() {
    let app = App::new(Tokens {
        inference: true,
        feedback: true,
    });
    let added = app.upload("cancer", "1", "cancer-v1.onnx").await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.json);
    let label = r#"{"id":"r1","label":1}"#;
    let inference = app
        .post("/v2/models/cancer/feedback", Some(INFERENCE), label)
        .await;
    assert_eq!(
        inference.status,
        StatusCode::UNAUTHORIZED,
        "an end user's token labels nothing"
    );
    let answered = app
        .post("/v2/models/cancer/infer", Some(INFERENCE), &row("r1"))
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.json);
    let labelled = app
        .post("/v2/models/cancer/feedback", Some(FEEDBACK), label)
        .await;
    assert_eq!(labelled.status, StatusCode::OK, "{}", labelled.json);
    assert_eq!(labelled.json["id"], "r1");
    for hidden in ["version", "predicted", "correct"] {
        assert!(
            labelled.json.get(hidden).is_none(),
            "{hidden} hidden: {}",
            labelled.json
        );
    }
}

#[tokio::test]
async fn unknown_paths_methods_names_and_models_say_what_exists() {
    let app = App::new(Tokens::default());
    app.get("/no/such/thing", None).await.assert_error(
        StatusCode::NOT_FOUND,
        &["/no/such/thing", "/api/v1/openapi.json"],
    );
    app.get("/v2/models/cancer/infer", None).await.assert_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &["GET is not allowed on /v2/models/cancer/infer"],
    );
    app.get("/api/v1/models/Not%20A%20Name", Some(ADMIN))
        .await
        .assert_error(StatusCode::BAD_REQUEST, &["model"]);
    app.get("/api/v1/models/nope", Some(ADMIN))
        .await
        .assert_error(StatusCode::NOT_FOUND, &["\"nope\""]);
    app.post("/v2/models/nope/infer", None, &row("a"))
        .await
        .assert_error(
            StatusCode::NOT_FOUND,
            &["\"nope\" is not served here", "GET /v2/repository/index"],
        );
}

#[tokio::test]
async fn inference_errors_name_the_input_the_version_and_the_way_back() {
    let app = App::serving().await;
    app.post("/v2/models/cancer/infer", None, "{not json")
        .await
        .assert_error(StatusCode::BAD_REQUEST, &[]);
    let wrong_input = row("a").replace("\"input\"", "\"features\"");
    app.post("/v2/models/cancer/infer", None, &wrong_input)
        .await
        .assert_error(StatusCode::BAD_REQUEST, &["input"]);
    app.post("/v2/models/cancer/versions/9/infer", None, &row("a"))
        .await
        .assert_error(
            StatusCode::NOT_FOUND,
            &["version \"9\"", "loaded versions: 1"],
        );
    let unload = app
        .post("/v2/repository/models/cancer/unload", Some(ADMIN), "{}")
        .await;
    assert_eq!(unload.status, StatusCode::OK, "{}", unload.json);
    app.post("/v2/models/cancer/infer", None, &row("a"))
        .await
        .assert_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &["unloaded", "POST /v2/repository/models/cancer/load"],
        );
    app.get("/v2/models/cancer/ready", None)
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, &["unloaded"]);
}

#[tokio::test]
async fn registry_and_control_errors_map_to_conflict_unprocessable_and_bad_request() {
    let app = App::serving().await;
    let same = app.upload("cancer", "1", "cancer-v1.onnx").await;
    assert_eq!(
        (same.status, same.json["result"].clone()),
        (StatusCode::OK, "unchanged".into())
    );
    app.upload("cancer", "1", "cancer-v2.onnx")
        .await
        .assert_error(StatusCode::CONFLICT, &["\"1\""]);
    let garbage = app.upload("cancer", "2", "models.json").await;
    assert_eq!(
        garbage.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        garbage.json
    );
    let route = |body: &str| {
        app.send(
            Method::PUT,
            "/api/v1/models/cancer/route",
            Some(ADMIN),
            Body::from(body.to_string()),
            "application/json",
        )
    };
    route("{\"stable\": ")
        .await
        .assert_error(StatusCode::BAD_REQUEST, &["request body is not valid"]);
    route(r#"{"stable":"1","failover":["1"]}"#)
        .await
        .assert_error(StatusCode::BAD_REQUEST, &["failover"]);
    route(r#"{"stable":"7"}"#)
        .await
        .assert_error(StatusCode::NOT_FOUND, &["\"7\""]);
}

#[tokio::test]
async fn a_rollout_command_for_a_name_no_model_can_have_is_400_before_anything_is_stored() {
    let app = App::new(Tokens::default());
    for path in [
        "/api/v1/models/a%00b/pause",
        "/api/v1/models/..%2F..%2Fx/abort",
        "/api/v1/models/a%20b/rollback",
    ] {
        let answer = app.post(path, Some(ADMIN), "{}").await;
        answer.assert_error(StatusCode::BAD_REQUEST, &["model name", "is not allowed"]);
    }
}
