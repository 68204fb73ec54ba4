//! Errors as gRPC status codes. Every error first takes its REST form
//! ([`ApiError`], the one mapping of errors to answers), so gRPC and REST
//! clients read the same message; its HTTP status then picks the code:
//! bad input `INVALID_ARGUMENT`, not found `NOT_FOUND`, a full queue or
//! nothing ready `UNAVAILABLE` (with retry advice in the metadata), a
//! timeout `DEADLINE_EXCEEDED`, no token `UNAUTHENTICATED`, too large
//! `RESOURCE_EXHAUSTED`.

use axum::http::{self, HeaderValue, StatusCode};
use tonic::{Code, Status};

use crate::api::ApiError;

/// The gRPC code for a REST status.
pub fn code(status: StatusCode) -> Code {
    match status {
        StatusCode::BAD_REQUEST => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY => Code::FailedPrecondition,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::INSUFFICIENT_STORAGE => Code::ResourceExhausted,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => Code::Unavailable,
        StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
        _ => Code::Internal,
    }
}

/// A code's name as the gRPC specification writes it (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Any error of the request path as a gRPC status with the REST message.
pub fn status(e: impl Into<ApiError>) -> Status {
    let e: ApiError = e.into();
    let mut status = Status::new(code(e.status), e.message);
    if let Some(secs) = e.retry_after {
        let metadata = status.metadata_mut();
        metadata.insert("retry-after", secs.into());
        // gRPC's own retry advice (gRFC A6), in milliseconds.
        metadata.insert("grpc-retry-pushback-ms", (u64::from(secs) * 1000).into());
    }
    status
}

/// What a client whose deadline passed is told.
pub fn deadline_exceeded(after: std::time::Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the client's deadline of {} passed before the answer; the request was cancelled",
        crate::units::HumanDuration(after)
    ))
}

/// The message for a request larger than `--max-body-bytes`, as REST says it.
const TOO_LARGE: &str =
    "request message is larger than the server's limit (ferry serve --max-body-bytes)";

/// tonic refuses a message over its size limit with `OUT_OF_RANGE` before
/// reading it; gRPC's own servers say `RESOURCE_EXHAUSTED`, and so does
/// Ferry (with the flag that sets the limit).
pub fn size_limit_as_resource_exhausted<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert("grpc-message", HeaderValue::from_static(TOO_LARGE));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_statuses_pick_the_grpc_codes_the_protocol_names() {
        let table = [
            (400, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (404, Code::NotFound),
            (409, Code::FailedPrecondition),
            (413, Code::ResourceExhausted),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
            (500, Code::Internal),
        ];
        for (http, grpc) in table {
            assert_eq!(code(StatusCode::from_u16(http).unwrap()), grpc, "{http}");
        }
    }

    #[test]
    fn code_names_are_the_specifications() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn a_full_queue_is_unavailable_with_retry_advice_and_the_rest_message() {
        let s = status(crate::runtime::RuntimeError::QueueFull { depth: 3 });
        assert_eq!(s.code(), Code::Unavailable);
        assert!(
            s.message().contains("queue is full (3 requests waiting)"),
            "{}",
            s.message()
        );
        assert_eq!(s.metadata().get("retry-after").unwrap(), "1");
        assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
    }

    #[test]
    fn an_unreachable_store_is_unavailable_with_the_rest_message_and_retry_advice() {
        use crate::store::{PgFailure, PgProblem, StoreError};
        let down = StoreError::Postgres(PgFailure {
            url: "postgres://ferry:***@db:5432/ferry".into(),
            problem: PgProblem::Unreachable,
            detail: "connection refused".into(),
        });
        let s = status(crate::registry::RegistryError::Store(down));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.message(),
            "the store at postgres://ferry:***@db:5432/ferry is unreachable: connection refused; nothing was changed"
        );
        assert_eq!(s.metadata().get("retry-after").unwrap(), "5");
    }

    #[test]
    fn only_the_size_limit_refusal_becomes_resource_exhausted() {
        let answer = |status: &'static str, message: &'static str| {
            http::Response::builder()
                .header("grpc-status", status)
                .header("grpc-message", message)
                .body(())
                .unwrap()
        };
        let fixed = size_limit_as_resource_exhausted(answer(
            "11",
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(fixed.headers()["grpc-status"], "8");
        assert_eq!(fixed.headers()["grpc-message"], TOO_LARGE);
        let other = size_limit_as_resource_exhausted(answer("11", "something else"));
        assert_eq!(other.headers()["grpc-status"], "11");
        let ok = size_limit_as_resource_exhausted(answer("0", "message length too large"));
        assert_eq!(ok.headers()["grpc-status"], "0");
    }
}
