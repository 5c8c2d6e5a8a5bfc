//! The service's own pages: `GET /` (what is served), `GET /api/stats` (call counters, so tests
//! can prove the cache kept requests away), and the JSON 404 / 405 fallbacks.

use axum::extract::State;
use axum::http::{Method, Uri};
use axum::Json;
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind};
use crate::AppState;

/// Method, path, parameters, what it does.
const ENDPOINTS: &[(&str, &str, &str, &str)] = &[
    ("GET", "/", "", "this list"),
    ("GET", "/health", "", "liveness (no Redis)"),
    (
        "GET",
        "/health/deep",
        "",
        "Redis reachability, latency, memory, clients, version, uptime; the subscriber's state",
    ),
    (
        "GET",
        "/api/cached-data",
        "user_id (optional)",
        "a slow operation the filter caches per user_id (Cache-Control, Cache-Tag: user:<id>)",
    ),
    (
        "POST",
        "/api/invalidate-cache",
        "JSON body: user_id (optional)",
        "answers with x-krowoc-invalidate: tag=user:<id> or route=/api/cached-data",
    ),
    (
        "POST",
        "/api/publish-event",
        "JSON body: channel, message (required)",
        "PUBLISH to Redis; answers the number of receivers",
    ),
    (
        "GET",
        "/api/recent-events",
        "limit, channel (optional)",
        "events received by the background subscriber, newest first",
    ),
    (
        "GET",
        "/api/rate-limited",
        "",
        "rate limited at the edge (5 per minute)",
    ),
    (
        "GET",
        "/api/slow-limited",
        "",
        "slow, rate limited at the edge (2 per 5 minutes)",
    ),
    (
        "GET",
        "/api/events/stream",
        "Last-Event-ID header (optional)",
        "the subscriber's events live, as Server-Sent Events (text/event-stream)",
    ),
    ("GET", "/api/stats", "", "call counters"),
    (
        "GET",
        "/api/bytes",
        "size (bytes, at most 1 MiB)",
        "that many bytes, cacheable for a minute (the benchmark's cache hits by body size)",
    ),
    (
        "GET",
        "/demo",
        "",
        "a page: the endpoints as buttons, their answers' headers, the live event feed",
    ),
];

/// `GET /` — `{"service", "version", "endpoints": [{"method", "path", "params", "description"}]}`.
pub async fn index() -> Json<Value> {
    let endpoints: Vec<Value> = ENDPOINTS
        .iter()
        .map(|(method, path, params, description)| {
            json!({"method": method, "path": path, "params": params, "description": description})
        })
        .collect();
    Json(json!({
        "service": "krowoc-upstream",
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": endpoints,
    }))
}

/// `GET /api/stats` — the counters in [`crate::Stats`] plus the event buffer's and the uptime.
pub async fn stats(State(state): State<AppState>) -> Json<Value> {
    let mut body = state.stats().to_json();
    let log = state.events();
    body["events_received"] = json!(log.received());
    body["events_buffered"] = json!(log.len());
    body["events_evicted"] = json!(log.evicted());
    body["subscriber_state"] = json!(state.subscriber().snapshot().phase.as_str());
    body["event_streams_open"] = json!(state.event_streams_open());
    body["uptime_seconds"] = json!(state.uptime().as_secs());
    Json(body)
}

pub async fn not_found(method: Method, uri: Uri) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "no route for {method} {}; GET / lists the endpoints",
            uri.path()
        ),
    )
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        format!(
            "{method} is not allowed on {}; GET / lists the endpoints",
            uri.path()
        ),
    )
}
