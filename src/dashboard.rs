//! The dashboard: one static page (HTML, CSS and JavaScript, no build step,
//! no CDN) embedded in the binary and served at `/ui/`. It reads the control
//! API with the admin token the person enters (kept for the browser session)
//! and polls every second.

use axum::http::header;
use axum::response::{IntoResponse, Redirect};

/// The page itself.
pub const INDEX: &str = include_str!("dashboard/index.html");

/// `GET /ui/`
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
}

/// `GET /ui` → `/ui/`
pub async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}
