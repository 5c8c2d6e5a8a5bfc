//! The guide's caching demo: `GET /api/cached-data` (a slow operation the filter caches per
//! `user_id`, tagged `user:<id>`) and `POST /api/invalidate-cache` (answers with the
//! invalidation header the filter acts on).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::error::{Error, ErrorKind};
use crate::input::{json_type_name, preview, reject_unknown_fields, JsonObject, QueryParams};
use crate::invalidation::{self, Invalidation};
use crate::AppState;

/// The cached route, as named in `route=` invalidations.
pub const CACHED_DATA_ROUTE: &str = "/api/cached-data";

/// The longest accepted `user_id`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// The `Cache-Tag` response header (the filter indexes entries by it).
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// The tag of a user's entries: `user:<id>`, or `user:anonymous` without a `user_id`.
pub fn user_tag(user_id: Option<&str>) -> String {
    format!("user:{}", user_id.unwrap_or("anonymous"))
}

/// A user id may go into a cache key, a `Cache-Tag` and an invalidation directive, so it is
/// limited to characters that are safe in all three: `A-Z a-z 0-9 . _ : @ -`.
pub fn validate_user_id(raw: &str) -> Result<String, Error> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-');
    if raw.is_empty() || raw.len() > MAX_USER_ID_BYTES || !raw.chars().all(allowed) {
        return Err(Error::invalid_field(
            "user_id",
            format!(
                "`user_id` must be 1 to {MAX_USER_ID_BYTES} characters from A-Z a-z 0-9 . _ : @ -; got {}",
                preview(raw)
            ),
        ));
    }
    Ok(raw.to_string())
}

/// `GET /api/cached-data?user_id=ID` — waits `cached_data_delay`, then answers
/// `{"user_id", "data", "generated_at" (RFC 3339), "generated_at_unix_ms", "call"}` with
/// `Cache-Control: public, max-age=<cache_max_age>` and `Cache-Tag: user:<id>`.
/// `call` counts the calls that reached this handler, so a cached copy shows an old number.
pub async fn cached_data(
    State(state): State<AppState>,
    params: QueryParams,
) -> Result<Response, Error> {
    let user_id = params
        .single("user_id")?
        .map(validate_user_id)
        .transpose()?;
    let call = state
        .stats()
        .cached_data_calls
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    let delay = state.config().cached_data_delay;
    tokio::time::sleep(delay).await;

    let generated_at = Timestamp::now();
    let tag = user_tag(user_id.as_deref());
    let who = match &user_id {
        Some(id) => format!("user {id}"),
        None => "an anonymous user".to_string(),
    };
    let body = json!({
        "user_id": user_id,
        "data": {
            "summary": format!("expensive result for {who}"),
            "items": ["alpha", "beta", "gamma"],
            "took_ms": delay.as_millis() as u64,
        },
        "generated_at": generated_at.rfc3339(),
        "generated_at_unix_ms": generated_at.unix_ms,
        "call": call,
    });
    let cache_control = format!("public, max-age={}", state.config().cache_max_age.as_secs());
    let mut response = Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, header_value(&cache_control)?);
    headers.insert(CACHE_TAG, header_value(&tag)?);
    Ok(response)
}

/// `POST /api/invalidate-cache` with an optional body `{"user_id": "42"}` (a string, or a
/// non-negative integer). With a user: purge that user's entries (`tag=user:<id>`); without
/// (empty body, `{}` or `"user_id": null`): purge the whole route (`route=/api/cached-data`).
///
/// Answers 200 `{"scope": "user"|"all", "user_id", "invalidate": [{"kind", "value"}], "header"}`
/// with the `x-krowoc-invalidate` header (see [`crate::invalidation`]).
pub async fn invalidate_cache(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, Error> {
    let user_id = match &body {
        None => None,
        Some(body) => {
            reject_unknown_fields(body, &["user_id"])?;
            match body.get("user_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(validate_user_id(s)?),
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(n) => Some(n.to_string()),
                    None => {
                        return Err(Error::invalid_field(
                            "user_id",
                            format!(
                            "`user_id` must be a non-negative whole number or a string; got {n}"
                        ),
                        ))
                    }
                },
                Some(other) => {
                    return Err(Error::invalid_field(
                        "user_id",
                        format!(
                            "`user_id` must be a string or a number, got {}",
                            json_type_name(other)
                        ),
                    ))
                }
            }
        }
    };
    let (scope, directive) = match &user_id {
        Some(id) => ("user", Invalidation::Tag(user_tag(Some(id)))),
        None => ("all", Invalidation::Route(CACHED_DATA_ROUTE.to_string())),
    };
    let directives = [directive];
    let header = invalidation::header_value(&directives);
    state.stats().invalidations.fetch_add(1, Ordering::Relaxed);
    tracing::info!(scope, header = %header, "cache invalidation requested");

    let body = json!({
        "scope": scope,
        "user_id": user_id,
        "invalidate": directives
            .iter()
            .map(|d| json!({"kind": d.kind(), "value": d.value()}))
            .collect::<Vec<_>>(),
        "header": header,
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        HeaderName::from_static(invalidation::HEADER),
        header_value(&header)?,
    );
    Ok(response)
}

fn header_value(text: &str) -> Result<HeaderValue, Error> {
    // Inputs are validated to header-safe characters before they get here.
    HeaderValue::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("{} is not a valid header value: {e}", preview(text)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_limited_to_header_safe_characters() {
        assert_eq!(validate_user_id("42").ok().as_deref(), Some("42"));
        assert!(validate_user_id("alice@example.com").is_ok());
        for bad in ["", "a b", "a,b", "a\r\nx: y", "é", &"x".repeat(129)] {
            let err = validate_user_id(bad).expect_err(bad);
            assert_eq!(err.field(), Some("user_id"));
        }
    }

    #[test]
    fn anonymous_requests_share_one_tag() {
        assert_eq!(user_tag(None), "user:anonymous");
        assert_eq!(user_tag(Some("7")), "user:7");
    }
}
