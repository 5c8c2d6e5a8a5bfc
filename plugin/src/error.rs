//! The error type of the Redis command layer: what went wrong (a kind with predicates) and a
//! message that says where. Error replies keep their RESP prefix (`NOSCRIPT`, `MOVED`, ...).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisErrorKind {
    /// No reply within the call's timeout.
    Timeout,
    /// Redis or the relay could not be reached (connect failure, reset, 502/503 from the host).
    Unavailable,
    /// The relay refused the call (400 malformed, 403 token or command, 413 too large).
    Refused,
    /// The reply was not the RESP (or the shape) expected.
    Protocol,
    /// Redis answered with an error reply.
    Server,
    /// The circuit breaker is open: the call was not made.
    BreakerOpen,
    /// The host refused to dispatch the call (unknown cluster, bad argument).
    Dispatch,
}

impl RedisErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisErrorKind::Timeout => "timeout",
            RedisErrorKind::Unavailable => "unavailable",
            RedisErrorKind::Refused => "refused",
            RedisErrorKind::Protocol => "protocol",
            RedisErrorKind::Server => "server",
            RedisErrorKind::BreakerOpen => "breaker_open",
            RedisErrorKind::Dispatch => "dispatch",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisError {
    pub kind: RedisErrorKind,
    pub message: String,
}

impl RedisError {
    pub fn new(kind: RedisErrorKind, message: impl Into<String>) -> RedisError {
        RedisError {
            kind,
            message: message.into(),
        }
    }

    pub fn protocol(message: impl Into<String>) -> RedisError {
        RedisError::new(RedisErrorKind::Protocol, message)
    }

    /// An error reply from Redis; the message starts with its prefix.
    pub fn server(message: impl Into<String>) -> RedisError {
        RedisError::new(RedisErrorKind::Server, message)
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == RedisErrorKind::Timeout
    }

    pub fn is_protocol(&self) -> bool {
        self.kind == RedisErrorKind::Protocol
    }

    /// The RESP error prefix of a server error (`NOSCRIPT`, `NOAUTH`, `MOVED`, ...).
    pub fn prefix(&self) -> Option<&str> {
        (self.kind == RedisErrorKind::Server).then(|| self.message.split(' ').next().unwrap_or(""))
    }

    pub fn is_noscript(&self) -> bool {
        self.prefix() == Some("NOSCRIPT")
    }

    /// Whether the failure says something about Redis' health (and so counts for the breaker).
    /// A script error such as a wrong argument does not, nor a call the relay refused (400, 403,
    /// 413): that is about the call, and one kind of call (a cache store too large for the
    /// relay) must not open the breaker for every other (rate limits would fall back).
    pub fn counts_for_breaker(&self) -> bool {
        match self.kind {
            RedisErrorKind::Refused => false,
            RedisErrorKind::Server => matches!(
                self.prefix(),
                Some(
                    "LOADING"
                        | "BUSY"
                        | "MASTERDOWN"
                        | "NOAUTH"
                        | "WRONGPASS"
                        | "OOM"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                )
            ),
            RedisErrorKind::BreakerOpen => false,
            _ => true,
        }
    }
}

impl fmt::Display for RedisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis {}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for RedisError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_their_prefix() {
        let e = RedisError::server("NOSCRIPT No matching script. Please use EVAL.");
        assert!(e.is_noscript());
        assert_eq!(e.prefix(), Some("NOSCRIPT"));
        assert!(!e.counts_for_breaker());
        assert!(RedisError::server("LOADING Redis is loading").counts_for_breaker());
        assert_eq!(RedisError::protocol("x").prefix(), None);
        assert!(RedisError::new(RedisErrorKind::Timeout, "t").is_timeout());
        assert!(RedisError::new(RedisErrorKind::Timeout, "t").counts_for_breaker());
    }

    #[test]
    fn a_refused_call_says_nothing_about_redis_health() {
        let refused = RedisError::new(RedisErrorKind::Refused, "relay answered 413: too large");
        assert!(!refused.counts_for_breaker());
        assert!(RedisError::new(RedisErrorKind::Unavailable, "502").counts_for_breaker());
    }
}
