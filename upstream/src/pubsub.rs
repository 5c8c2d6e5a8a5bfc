//! The guide's Pub/Sub demo: `POST /api/publish-event` (PUBLISH on the handlers' own
//! connection) and `GET /api/recent-events` (what the background subscriber received).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::config::validate_channel;
use crate::error::{Error, ErrorKind};
use crate::input::{json_type_name, preview, reject_unknown_fields, JsonObject, QueryParams};
use crate::AppState;

/// Events shown by `GET /api/recent-events` without a `limit`.
pub const DEFAULT_RECENT_LIMIT: usize = 20;

/// `POST /api/publish-event` with `{"channel": "app:events", "message": <any JSON but null>}`.
///
/// The message is published as compact JSON text (a string message is published quoted), so
/// subscribers always receive JSON. Answers 200
/// `{"published": true, "channel", "receivers", "bytes"}`; `receivers` is PUBLISH's reply (in
/// a Redis Cluster, the subscribers of the one node that took the PUBLISH).
/// Refusals: bad or missing field → 400 naming it; body over the cap → 413; malformed JSON →
/// 400; Redis down or not answering → 503; a Redis error reply → 502.
pub async fn publish_event(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, Error> {
    let Some(body) = body else {
        return Err(Error::invalid_field(
            "channel",
            r#"the body is empty; expected {"channel": "...", "message": ...}"#,
        ));
    };
    reject_unknown_fields(&body, &["channel", "message"])?;
    let channel = match body.get("channel") {
        None | Some(Value::Null) => {
            return Err(Error::invalid_field(
                "channel",
                "`channel` is required: a non-empty string",
            ))
        }
        Some(Value::String(channel)) => {
            validate_channel(channel).map_err(|why| {
                Error::invalid_field("channel", format!("`channel` {why}: {}", preview(channel)))
            })?;
            channel
        }
        Some(other) => {
            return Err(Error::invalid_field(
                "channel",
                format!("`channel` must be a string, got {}", json_type_name(other)),
            ))
        }
    };
    let message = match body.get("message") {
        None | Some(Value::Null) => {
            return Err(Error::invalid_field(
                "message",
                "`message` is required: any JSON value except null",
            ))
        }
        Some(message) => message,
    };
    let payload = serde_json::to_vec(message).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("cannot serialise `message`: {e}"),
        )
    })?;

    let receivers = match state.redis().publish(channel, &payload).await {
        Ok(receivers) => receivers,
        Err(e) => {
            state
                .stats()
                .publish_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    state
        .stats()
        .events_published
        .fetch_add(1, Ordering::Relaxed);
    Ok(Json(json!({
        "published": true,
        "channel": channel,
        "receivers": receivers,
        "bytes": payload.len(),
    })))
}

/// `GET /api/recent-events?limit=N&channel=C` — events the background subscriber received,
/// newest first. `limit` defaults to 20 and is capped at the buffer's size; it must be a whole
/// number ≥ 1. `channel` keeps only that channel's events.
///
/// Answers `{"events": [{"seq", "channel", "received_at", "received_at_unix_ms", "message",
/// "bytes", "truncated"}], "count", "limit", "channel", "buffer": {"capacity", "buffered",
/// "received", "evicted"}, "subscriber": {...}}`.
pub async fn recent_events(
    State(state): State<AppState>,
    params: QueryParams,
) -> Result<Json<Value>, Error> {
    let log = state.events();
    let capacity = log.capacity();
    let limit = match params.single("limit")? {
        None => DEFAULT_RECENT_LIMIT.min(capacity),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX).min(capacity),
            _ => {
                return Err(Error::invalid_field(
                    "limit",
                    format!(
                    "`limit` must be a whole number from 1 (at most {capacity} are kept); got {}",
                    preview(raw)
                ),
                ))
            }
        },
    };
    let channel = params.single("channel")?;
    if let Some(channel) = channel {
        validate_channel(channel).map_err(|why| {
            Error::invalid_field("channel", format!("`channel` {why}: {}", preview(channel)))
        })?;
    }
    let snapshot = log.recent(limit, channel);
    let events: Vec<Value> = snapshot.events.iter().map(|e| e.to_json()).collect();
    Ok(Json(json!({
        "count": events.len(),
        "limit": limit,
        "channel": channel,
        "events": events,
        "buffer": {
            "capacity": capacity,
            "buffered": snapshot.buffered,
            "received": snapshot.received,
            "evicted": snapshot.evicted,
        },
        "subscriber": state.subscriber().snapshot().to_json(),
    })))
}
