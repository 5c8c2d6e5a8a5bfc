//! `GET /demo`: one page that calls the guide's six endpoints (through whatever gateway served
//! it), shows each answer with the headers the filter sets, and follows
//! `GET /api/events/stream` in a live feed. No build step and nothing from elsewhere: the
//! page, its script, its style sheet and its icon are files of this crate, included whole.
//!
//! Every file is served with a Content-Security-Policy that allows only same-origin scripts,
//! styles, images and connections (no inline script or style, no `eval`, no framing, no form
//! targets) and `X-Content-Type-Options: nosniff`; `Cache-Control: no-store` comes from the
//! router's default, so a cache in front keeps none of it.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The page's policy: its own origin's script, style sheet and icon, and fetch / EventSource
/// to its own origin; nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub const PAGE: &str = include_str!("demo/index.html");
pub const SCRIPT: &str = include_str!("demo/app.js");
pub const STYLE: &str = include_str!("demo/app.css");
pub const ICON: &str = include_str!("demo/favicon.svg");

/// `GET /demo`.
pub async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

/// `GET /demo/app.js`.
pub async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /demo/app.css`.
pub async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}

/// `GET /demo/favicon.svg`.
pub async fn icon() -> Response {
    file("image/svg+xml", ICON)
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 4] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    (headers, body).into_response()
}
