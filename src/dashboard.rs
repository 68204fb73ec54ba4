//! The dashboard: one static page (HTML, CSS and JavaScript, no build step,
//! no CDN) embedded in the binary and served at `/ui/`. It reads the control
//! API with the admin token the person enters, or finds in the address's
//! fragment (`/ui/#token=…`, which browsers never send; the page then takes
//! it out of the address), kept for the browser session, and polls every
//! second. Served with a Content-Security-Policy that runs
//! only the page's own script (by its hash), talks only to this server, and
//! may not be framed (`X-Frame-Options: DENY` for older browsers).

use axum::http::header;
use axum::response::{IntoResponse, Redirect};

/// The page itself.
pub const INDEX: &str = include_str!("dashboard/index.html");

/// The page's Content-Security-Policy: its one inline script by hash, its
/// inline styles, requests to this server only, no frames, no forms.
pub fn content_security_policy() -> &'static str {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let script = INDEX
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    });
    &CSP
}

/// `GET /ui/`
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, content_security_policy()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        INDEX,
    )
}

/// `GET /ui` → `/ui/`
pub async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}
