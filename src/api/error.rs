//! The one place where errors become HTTP responses: always `{"error": "..."}`
//! with Triton's status mapping (not found 404, unavailable 503, bad input 400,
//! internal 500). 5xx bodies say what failed, never internals (those go to
//! the log).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::controller::ControlError;
use crate::gateway::GatewayError;
use crate::protocol::ProtocolError;
use crate::registry::RegistryError;
use crate::runtime::RuntimeError;
use crate::store::commands::CommandOutcome;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for `Retry-After` (set when the client should come back).
    pub retry_after: Option<u32>,
    /// Set when the store could not be reached ("the store at … is
    /// unreachable: …"), so that a read can say what it could not read
    /// ([`ApiError::reading`]) rather than that nothing was changed.
    pub store_down: Option<String>,
}

/// When a client may try again after the store was unreachable, in seconds.
pub const STORE_RETRY_AFTER: u32 = 5;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
            store_down: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// A server-side failure: the details are logged, the client gets `what`.
    pub fn internal(what: &str, detail: impl std::fmt::Display) -> ApiError {
        tracing::error!("{what}: {detail}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what}; the server log has the details"),
        )
    }
}

impl ApiError {
    /// A write the disk refused: 507 when it is full, 503 when it cannot be
    /// written. The change was not made (blob writes and transactions are
    /// all-or-nothing), and the answer and the log say what to do.
    pub fn disk(problem: crate::store::DiskProblem, what: &str) -> ApiError {
        use crate::store::DiskProblem;
        let message = format!("{what}; {}; nothing was changed", problem.advice());
        tracing::error!("{message}");
        let status = match problem {
            DiskProblem::Full | DiskProblem::DatabaseFull => StatusCode::INSUFFICIENT_STORAGE,
            DiskProblem::ReadOnly | DiskProblem::DatabaseReadOnly => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError::new(status, message)
    }

    /// A store that could not be reached: 503 with `Retry-After`. Nothing
    /// was changed (a transaction that never committed), unless the
    /// connection was lost during the commit, which the message then says.
    /// Not logged here: the store logs an outage when it starts and ends.
    pub fn store_unreachable(e: &crate::store::StoreError) -> Option<ApiError> {
        let cause = e.unreachable_cause()?;
        let message = if e.maybe_changed() {
            format!(
                "{cause}; the connection was lost while the change was being committed, so it may have been made: look at the history (ferry history MODEL) before trying again"
            )
        } else {
            format!("{cause}; nothing was changed")
        };
        Some(ApiError {
            retry_after: Some(STORE_RETRY_AFTER),
            store_down: Some(cause),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        })
    }

    /// For a request that only reads: an unreachable store's answer says
    /// `what` could not be read ("the model list"); other errors unchanged.
    pub fn reading(mut self, what: &str) -> ApiError {
        if let Some(cause) = &self.store_down {
            self.message = format!("{cause}; {what} could not be read");
        }
        self
    }
}

/// `map_err` for a handler that only reads (see [`ApiError::reading`]).
pub fn reading<E: Into<ApiError>>(what: &str) -> impl FnOnce(E) -> ApiError + '_ {
    move |e| e.into().reading(what)
}

/// The error body, for the OpenAPI document.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it can, how to fix it.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        respond(CommandOutcome::from(self))
    }
}

/// An error as a stored answer: what a leader keeps for the instance that
/// forwarded it a command, and what every error response is built from.
impl From<ApiError> for CommandOutcome {
    fn from(e: ApiError) -> Self {
        CommandOutcome {
            status: e.status.as_u16(),
            body: serde_json::to_string(&ErrorBody { error: e.message })
                .expect("a string always serialises"),
            retry_after: e.retry_after,
        }
    }
}

/// A JSON answer with its status: an error, or a command's answer wherever
/// it was executed (byte for byte what `Json` would send).
pub fn respond(outcome: CommandOutcome) -> Response {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        outcome.body,
    )
        .into_response();
    if let Some(secs) = outcome.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

impl From<crate::records::NameError> for ApiError {
    fn from(e: crate::records::NameError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::BadInput(m) => ApiError::bad_request(m),
            RuntimeError::QueueFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            RuntimeError::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
            RuntimeError::Unavailable(m) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m)
            },
            RuntimeError::InvalidModel(_)
            | RuntimeError::UnsupportedSignature(_)
            | RuntimeError::Refused(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            RuntimeError::Upstream(m) => ApiError::new(StatusCode::BAD_GATEWAY, m),
            other => ApiError::internal("inference failed", other),
        }
    }
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::NotFound(m) => ApiError::not_found(m),
            GatewayError::Unloaded(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
            GatewayError::BadRequest(p) => p.into(),
            GatewayError::Runtime(r) => r.into(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::bad_request(m),
            RegistryError::Artifact(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            RegistryError::NotFound(m) => ApiError::not_found(m),
            RegistryError::Store(e) => match (ApiError::store_unreachable(&e), e.disk_problem()) {
                (Some(unreachable), _) => unreachable,
                (None, Some(problem)) => {
                    ApiError::disk(problem, &format!("cannot write the database ({e})"))
                }
                // Leadership moved during the request: nothing was changed.
                (None, None) if matches!(e, crate::store::StoreError::Fenced { .. }) => ApiError {
                    retry_after: Some(STORE_RETRY_AFTER),
                    ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                },
                (None, None) => ApiError::internal("the store failed", e),
            },
            RegistryError::Disk { problem, what } => ApiError::disk(problem, &what),
            RegistryError::Io(e) => ApiError::internal("storing the artifact failed", e),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Registry(r) => r.into(),
            ControlError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            ControlError::Invalid(m) => ApiError::bad_request(m),
            start @ ControlError::Start { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, start.to_string())
            }
            leaderless @ (ControlError::NoLeader { .. } | ControlError::Unanswered { .. }) => {
                ApiError {
                    retry_after: Some(crate::controller::commands::RETRY_AFTER_SECS),
                    ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, leaderless.to_string())
                }
            }
        }
    }
}

impl ApiError {
    /// A request body the server could not read: too large for
    /// `--max-body-bytes` (413), or cut off or malformed on the wire.
    pub fn body(status: StatusCode, why: impl std::fmt::Display) -> ApiError {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "request body is larger than the server's limit (ferry serve --max-body-bytes)",
            )
        } else {
            ApiError::new(status, format!("could not read the request body: {why}"))
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(e: axum::extract::rejection::BytesRejection) -> Self {
        ApiError::body(e.status(), e.body_text())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::new(e.status(), e.body_text())
    }
}

/// `Json<T>` that reports bad input in the API's own error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state).await?;
        if bytes.is_empty() {
            return serde_json::from_slice(b"{}")
                .map(ApiJson)
                .map_err(|e| ApiError::bad_request(format!("request body is required: {e}")));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid: {e}")))
    }
}

/// Unknown paths: 404 in the API's error shape.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {}; see /api/v1/openapi.json for the API",
        uri.path()
    ))
}

/// Known paths with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Json;

    use super::*;
    use crate::store::StoreError;

    fn sqlite(code: std::ffi::c_int) -> StoreError {
        StoreError::Database(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    /// (error, status, Retry-After, words the message must hold).
    fn case(e: impl Into<ApiError>, status: StatusCode, retry: Option<u32>, says: &[&str]) {
        let e = e.into();
        assert_eq!((e.status, e.retry_after), (status, retry), "{}", e.message);
        for part in says {
            assert!(
                e.message.contains(part),
                "{:?} should say {part:?}",
                e.message
            );
        }
    }

    #[test]
    fn store_errors_say_what_the_operator_can_do_and_hide_the_rest() {
        let full = || RegistryError::Store(sqlite(rusqlite::ffi::SQLITE_FULL));
        case(
            full(),
            StatusCode::INSUFFICIENT_STORAGE,
            None,
            &["disk is full", "free space", "nothing was changed"],
        );
        let read_only = RegistryError::Store(sqlite(rusqlite::ffi::SQLITE_READONLY));
        case(
            read_only,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            &["nothing was changed"],
        );
        let corrupt = StoreError::Corrupt {
            what: "route of cancer".into(),
            reason: "secret detail".into(),
        };
        let e = ApiError::from(RegistryError::Store(corrupt));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            e.message,
            "the store failed; the server log has the details"
        );
        let too_new = StoreError::TooNew { found: 9, known: 3 };
        case(
            RegistryError::Store(too_new),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &["server log"],
        );
        case(
            ControlError::from(sqlite(rusqlite::ffi::SQLITE_FULL)),
            StatusCode::INSUFFICIENT_STORAGE,
            None,
            &["disk is full"],
        );
        let fenced = StoreError::Fenced {
            term: 3,
            newer: 4,
            holder: "8d02b6c4a1f0".into(),
        };
        case(
            ControlError::from(fenced),
            StatusCode::SERVICE_UNAVAILABLE,
            Some(STORE_RETRY_AFTER),
            &[
                "term 3",
                "instance 8d02b6c4a1f0 leads in term 4",
                "nothing was changed",
            ],
        );
    }

    #[test]
    fn a_command_no_leader_took_is_503_and_says_nothing_was_done() {
        use crate::controller::commands::RETRY_AFTER_SECS;
        let command = "pause of model \"cancer\"".to_string();
        case(
            ControlError::NoLeader {
                command: command.clone(),
                waited: Duration::from_secs(10),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            Some(RETRY_AFTER_SECS),
            &[
                "no instance leading the rollouts took the command (pause of model \"cancer\") within 10s",
                "nothing was done",
                "ferry cluster",
            ],
        );
        case(
            ControlError::Unanswered {
                command,
                why: "the leader (instance 1a2b) took it and had not answered after 1m 10s".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            Some(RETRY_AFTER_SECS),
            &[
                "the command (pause of model \"cancer\") was stored for the leader, but the leader (instance 1a2b) took it",
                "may have been executed",
                "ferry history",
            ],
        );
    }

    #[tokio::test]
    async fn an_error_response_is_json_bytes_with_its_status_and_retry_after() {
        let e = ApiError {
            retry_after: Some(3),
            ..ApiError::new(StatusCode::CONFLICT, "r-1 is \"already\" paused")
        };
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let as_json = (
            StatusCode::CONFLICT,
            Json(ErrorBody {
                error: "r-1 is \"already\" paused".into(),
            }),
        )
            .into_response();
        let expected = axum::body::to_bytes(as_json.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(body, expected);
    }

    fn postgres(problem: crate::store::PgProblem) -> StoreError {
        StoreError::Postgres(crate::store::PgFailure {
            url: "postgres://ferry:***@db:5432/ferry".into(),
            problem,
            detail: "no answer within 5s".into(),
        })
    }

    #[test]
    fn an_unreachable_store_is_503_with_the_reason_and_what_was_not_done() {
        use crate::store::PgProblem;
        let cause =
            "the store at postgres://ferry:***@db:5432/ferry is unreachable: no answer within 5s";
        let write = ApiError::from(RegistryError::Store(postgres(PgProblem::Unreachable)));
        assert_eq!(write.message, format!("{cause}; nothing was changed"));
        assert_eq!(
            (write.status, write.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Some(STORE_RETRY_AFTER))
        );
        assert!(
            !write.message.contains("check that"),
            "the operator's advice goes to the log"
        );
        let read = write.reading("the model list");
        assert_eq!(
            read.message,
            format!("{cause}; the model list could not be read")
        );
        assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);
        case(
            ControlError::from(postgres(PgProblem::CommitUnknown)),
            StatusCode::SERVICE_UNAVAILABLE,
            Some(STORE_RETRY_AFTER),
            &[cause, "may have been made", "ferry history"],
        );
        // Other errors are not touched by `reading`.
        let other = ApiError::not_found("model \"x\" is not registered").reading("x");
        assert_eq!(other.message, "model \"x\" is not registered");
        // A server that refuses TLS or a login is not an outage.
        case(
            RegistryError::Store(postgres(PgProblem::Tls)),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &["server log"],
        );
    }

    #[test]
    fn an_unreachable_artifact_bucket_is_503_too_but_refused_credentials_are_not() {
        use crate::store::{BucketFailure, StoreError, s3::BucketProblem};
        let bucket = |problem| {
            RegistryError::Store(StoreError::Bucket(BucketFailure {
                url: "s3://models/ferry".into(),
                doing: "when uploading sha256:ab12".into(),
                problem,
                detail: "connection refused".into(),
            }))
        };
        case(
            bucket(BucketProblem::Unreachable),
            StatusCode::SERVICE_UNAVAILABLE,
            Some(STORE_RETRY_AFTER),
            &[
                "the artifact bucket s3://models/ferry is unreachable when uploading sha256:ab12: connection refused",
                "nothing was changed",
            ],
        );
        case(
            bucket(BucketProblem::Credentials),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            &["server log"],
        );
    }

    #[test]
    fn registry_and_control_errors_keep_their_messages() {
        use crate::store::DiskProblem;
        case(
            RegistryError::Invalid("labels: too many".into()),
            StatusCode::BAD_REQUEST,
            None,
            &["labels"],
        );
        case(
            RegistryError::Artifact("not a model".into()),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            &["not a model"],
        );
        case(
            RegistryError::Conflict("in use".into()),
            StatusCode::CONFLICT,
            None,
            &["in use"],
        );
        case(
            RegistryError::NotFound("no \"x\"".into()),
            StatusCode::NOT_FOUND,
            None,
            &["\"x\""],
        );
        let disk = RegistryError::Disk {
            problem: DiskProblem::ReadOnly,
            what: "cannot write the blob".into(),
        };
        case(
            disk,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            &["cannot write the blob", "nothing was changed"],
        );
        let io = ApiError::from(RegistryError::Io("/secret/path: EIO".into()));
        assert_eq!(io.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!io.message.contains("/secret"), "{}", io.message);
        case(
            ControlError::Conflict("abort it first".into()),
            StatusCode::CONFLICT,
            None,
            &["abort it first"],
        );
        case(
            ControlError::Invalid("failover[0]".into()),
            StatusCode::BAD_REQUEST,
            None,
            &["failover[0]"],
        );
        let start = ControlError::Start {
            model: "cancer".into(),
            version: "2".into(),
            reason: "warm-up failed".into(),
        };
        case(
            start,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            &["version \"2\" of model \"cancer\"", "warm-up failed"],
        );
    }

    #[test]
    fn gateway_and_runtime_errors_follow_triton() {
        case(
            GatewayError::NotFound("m".into()),
            StatusCode::NOT_FOUND,
            None,
            &[],
        );
        case(
            GatewayError::Unloaded("load".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            &["load"],
        );
        let bad = crate::protocol::decode_request(b"{", None).expect_err("not JSON");
        case(
            GatewayError::BadRequest(bad),
            StatusCode::BAD_REQUEST,
            None,
            &[],
        );
        let runtime = |e: RuntimeError| GatewayError::Runtime(e);
        case(
            runtime(RuntimeError::BadInput("input x".into())),
            StatusCode::BAD_REQUEST,
            None,
            &["input x"],
        );
        case(
            runtime(RuntimeError::QueueFull { depth: 8 }),
            StatusCode::SERVICE_UNAVAILABLE,
            Some(1),
            &["retry shortly"],
        );
        case(
            runtime(RuntimeError::Unavailable("down".into())),
            StatusCode::SERVICE_UNAVAILABLE,
            Some(1),
            &["down"],
        );
        case(
            runtime(RuntimeError::Timeout(Duration::from_secs(2))),
            StatusCode::GATEWAY_TIMEOUT,
            None,
            &["2s"],
        );
        case(
            runtime(RuntimeError::Upstream("remote said 500".into())),
            StatusCode::BAD_GATEWAY,
            None,
            &["remote said 500"],
        );
        case(
            runtime(RuntimeError::Refused("external data".into())),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            &[],
        );
        let failed = ApiError::from(runtime(RuntimeError::Inference("secret detail".into())));
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            failed.message,
            "inference failed; the server log has the details"
        );
    }

    #[tokio::test]
    async fn an_error_is_its_status_a_json_body_and_retry_after() {
        let e = ApiError::from(RuntimeError::QueueFull { depth: 4 });
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("a body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({"error": "replica queue is full (4 requests waiting); retry shortly"})
        );
    }

    #[test]
    fn bodies_too_large_name_the_flag() {
        case(
            ApiError::body(StatusCode::PAYLOAD_TOO_LARGE, "x"),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            &["--max-body-bytes"],
        );
        case(
            ApiError::body(StatusCode::BAD_REQUEST, "cut off"),
            StatusCode::BAD_REQUEST,
            None,
            &["cut off"],
        );
    }
}
