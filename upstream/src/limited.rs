//! `GET /api/rate-limited` and `GET /api/slow-limited`: plain responses. Their limits (the
//! guide's 5 per minute, and 2 per 5 minutes for the slow one) are the filter's job.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::AppState;

/// `GET /api/rate-limited` — `{"endpoint", "message", "call", "served_at"}` at once.
pub async fn rate_limited(State(state): State<AppState>) -> Json<Value> {
    let call = state
        .stats()
        .rate_limited_calls
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    Json(json!({
        "endpoint": "/api/rate-limited",
        "message": "rate-limited endpoint (the guide's limit: 5 requests per minute, enforced at the edge)",
        "call": call,
        "served_at": Timestamp::now().rfc3339(),
    }))
}

/// `GET /api/slow-limited` — waits `slow_delay`, then
/// `{"endpoint", "message", "took_ms", "call", "served_at"}`.
pub async fn slow_limited(State(state): State<AppState>) -> Json<Value> {
    let call = state
        .stats()
        .slow_limited_calls
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    let delay = state.config().slow_delay;
    tokio::time::sleep(delay).await;
    Json(json!({
        "endpoint": "/api/slow-limited",
        "message": "slow rate-limited endpoint (the guide's limit: 2 requests per 5 minutes, enforced at the edge)",
        "took_ms": delay.as_millis() as u64,
        "call": call,
        "served_at": Timestamp::now().rfc3339(),
    }))
}
