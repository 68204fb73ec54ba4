//! The admin token: created on first start in `DATA_DIR/admin-token` (mode
//! 0600), required as `Authorization: Bearer <token>` on the control API and
//! on repository load/unload. Compared in constant time; never logged.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: String) -> AdminToken {
        AdminToken(token)
    }

    /// Reads `DIR/admin-token`, creating it (mode 0600) with a random token
    /// when it does not exist. Returns the token and whether it was created.
    pub fn load_or_create(dir: &Path) -> std::io::Result<(AdminToken, bool)> {
        Self::load_or_create_named(dir, "admin-token")
    }

    fn load_or_create_named(dir: &Path, name: &str) -> std::io::Result<(AdminToken, bool)> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => return Ok((AdminToken(s.trim().to_string()), false)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        let token = hex::encode(bytes);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok((AdminToken(token), true))
    }

    /// The dashboard's path with this token in its fragment
    /// (`/ui/#token=…`): the browser keeps the fragment to itself, and the
    /// page moves the token into session storage and out of the address.
    pub fn dashboard_path(&self) -> String {
        format!("/ui/#token={}", self.0)
    }

    /// Whether the request carries this token (constant-time comparison).
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.0.as_bytes())))
    }

    /// Reads a token from `path`, creating it (mode 0600) when missing.
    pub fn from_file(path: &Path) -> std::io::Result<(AdminToken, bool)> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the token path has no file name"))?;
        Self::load_or_create_named(dir, &name.to_string_lossy())
    }

    /// Checks `Authorization: Bearer <token>`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match bearer(headers) {
            Some(t) if bool::from(t.as_bytes().ct_eq(self.0.as_bytes())) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the admin token is wrong; use the one in DATA_DIR/admin-token (ferry reads ./ferry-data/admin-token, FERRY_TOKEN or --token)",
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs the admin token: send Authorization: Bearer <token from DATA_DIR/admin-token>",
            )),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's
/// case does not matter, RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Middleware for the data plane: when an inference token is configured,
/// requests need it or the admin token.
pub async fn require_inference(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.may_infer(req.headers()) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "this server needs the inference token: send Authorization: Bearer <token from the --inference-token-file>",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Middleware for feedback: the admin token or the feedback token.
pub async fn require_feedback(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.may_label(req.headers()) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "feedback needs a token: send Authorization: Bearer <the admin token, or the token in the server's --feedback-token-file>",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Middleware: refuses requests without the admin token.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.token.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let mut resp = e.into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_whatever_its_case() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            bearer(&headers).map(str::to_string)
        };
        for value in ["Bearer t0k", "bearer t0k", "BEARER  t0k "] {
            assert_eq!(with(value).as_deref(), Some("t0k"), "{value:?}");
        }
        assert_eq!(with("Basic t0k"), None);
        assert_eq!(with("Bearer"), None);
    }
}
