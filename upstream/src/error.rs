//! The crate's one error type: a kind (what went wrong, which fixes the HTTP status), the field
//! or option at fault when there is one, a message for humans, and the underlying cause.
//!
//! Over HTTP every error is JSON with `Cache-Control: no-store`:
//! `{"error": {"kind": "invalid_field", "field": "channel", "message": "..."}}`.

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// What went wrong. Each kind has one HTTP status ([`ErrorKind::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A body field or query parameter is missing or has the wrong type or value (400).
    InvalidField,
    /// The body is not JSON, or not a JSON object (400).
    MalformedJson,
    /// The body is larger than the configured cap (413).
    PayloadTooLarge,
    /// No route for the path (404).
    NotFound,
    /// The path exists but not for this method (405).
    MethodNotAllowed,
    /// Redis refused the connection, dropped it, or cannot be reached (503).
    RedisUnavailable,
    /// Redis did not answer within the configured timeout (503).
    RedisTimeout,
    /// Redis answered with an error reply such as `READONLY` or `NOAUTH` (502). The replies
    /// that mean "not now" (`CLUSTERDOWN`, `MASTERDOWN`, `TRYAGAIN`, `LOADING`) are
    /// [`ErrorKind::RedisUnavailable`] instead.
    RedisReply,
    /// Every event stream slot is taken (`--max-event-streams`); try again later (503).
    TooManyStreams,
    /// A command-line option or configuration value is invalid (startup only).
    Config,
    /// A bug or an impossible state; the message says which (500).
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidField | ErrorKind::MalformedJson | ErrorKind::Config => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RedisUnavailable | ErrorKind::RedisTimeout | ErrorKind::TooManyStreams => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::RedisReply => StatusCode::BAD_GATEWAY,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `kind` string in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidField => "invalid_field",
            ErrorKind::MalformedJson => "malformed_json",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RedisUnavailable => "redis_unavailable",
            ErrorKind::RedisTimeout => "redis_timeout",
            ErrorKind::RedisReply => "redis_error_reply",
            ErrorKind::TooManyStreams => "too_many_streams",
            ErrorKind::Config => "invalid_config",
            ErrorKind::Internal => "internal",
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    field: Option<String>,
    message: String,
    source: Option<Cause>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            field: None,
            message: message.into(),
            source: None,
        }
    }

    /// A bad body field or query parameter; `message` should say what was expected and got.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidField, message).with_field(field)
    }

    /// A bad configuration value; `field` is the option's name (e.g. `--events-buffer`).
    pub fn config(field: &str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Config, message).with_field(field)
    }

    /// A failed Redis call, classified by what the client library reports. `operation` names the
    /// command and target, e.g. `PUBLISH to app:events`.
    pub fn redis(operation: &str, err: redis::RedisError) -> Error {
        use redis::ServerErrorKind::{BusyLoading, ClusterDown, MasterDown, TryAgain};
        let kind = if err.is_timeout() {
            ErrorKind::RedisTimeout
        } else if matches!(
            err.kind(),
            redis::ErrorKind::Server(ClusterDown | MasterDown | TryAgain | BusyLoading)
        ) {
            // A failover or a restart under way: it passes by itself.
            ErrorKind::RedisUnavailable
        } else if matches!(err.kind(), redis::ErrorKind::Server(_)) {
            ErrorKind::RedisReply
        } else {
            ErrorKind::RedisUnavailable
        };
        let message = match kind {
            // Keep the reply's prefix (READONLY, NOAUTH, OOM...) so a reader can act on it.
            ErrorKind::RedisReply => format!("Redis refused {operation}: {err}"),
            _ => format!("Redis is unavailable: {operation} failed: {err}"),
        };
        Error {
            kind,
            field: None,
            message,
            source: Some(Box::new(err)),
        }
    }

    /// A Redis call that did not finish within `timeout`.
    pub fn redis_timeout(operation: &str, timeout: std::time::Duration) -> Error {
        Error::new(
            ErrorKind::RedisTimeout,
            format!("Redis is unavailable: {operation} got no answer within {timeout:?}"),
        )
    }

    pub fn with_field(mut self, field: &str) -> Error {
        self.field = Some(field.to_string());
        self
    }

    pub fn with_source(mut self, source: impl Into<Cause>) -> Error {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// True when Redis could not be reached or did not answer in time.
    pub fn is_redis_down(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::RedisUnavailable | ErrorKind::RedisTimeout
        )
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::RedisTimeout
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) if self.kind == ErrorKind::Config => write!(f, "{field}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(kind = self.kind.as_str(), "{}", self.message);
        } else {
            tracing::debug!(kind = self.kind.as_str(), "{}", self.message);
        }
        let mut body = json!({ "kind": self.kind.as_str(), "message": self.message });
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        let mut response = (status, Json(json!({ "error": body }))).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_status() {
        let cases = [
            (ErrorKind::InvalidField, 400),
            (ErrorKind::MalformedJson, 400),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::NotFound, 404),
            (ErrorKind::MethodNotAllowed, 405),
            (ErrorKind::RedisUnavailable, 503),
            (ErrorKind::RedisTimeout, 503),
            (ErrorKind::RedisReply, 502),
            (ErrorKind::TooManyStreams, 503),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
        }
    }

    #[test]
    fn server_error_replies_keep_their_code_and_map_to_502() {
        let reply = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_string(),
        ));
        let err = Error::redis("PUBLISH to app:events", reply);
        assert_eq!(err.kind(), ErrorKind::RedisReply);
        assert_eq!(err.status().as_u16(), 502);
        assert!(err.message().contains("READONLY"), "{}", err.message());
    }

    #[test]
    fn replies_that_mean_not_now_are_redis_down() {
        for (kind, code) in [
            (redis::ServerErrorKind::ClusterDown, "CLUSTERDOWN"),
            (redis::ServerErrorKind::MasterDown, "MASTERDOWN"),
            (redis::ServerErrorKind::TryAgain, "TRYAGAIN"),
            (redis::ServerErrorKind::BusyLoading, "LOADING"),
        ] {
            let reply = redis::RedisError::from((
                redis::ErrorKind::Server(kind),
                code,
                "a failover is under way".to_string(),
            ));
            let err = Error::redis("PUBLISH to app:events", reply);
            assert!(err.is_redis_down(), "{code}");
            assert_eq!(err.status().as_u16(), 503, "{code}");
        }
    }

    #[test]
    fn io_errors_are_redis_down() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::redis("PING", redis::RedisError::from(io));
        assert!(err.is_redis_down());
        assert_eq!(err.status().as_u16(), 503);
    }
}
