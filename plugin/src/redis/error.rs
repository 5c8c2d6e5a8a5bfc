//! The error type of the Redis command layer: what went wrong (a kind with predicates) and a
//! message that says where. An error reply's RESP prefix (`NOSCRIPT`, `LOADING`, `MOVED`, ...)
//! is read once, into a [`ServerErrorKind`], whose health judgement the circuit breaker and the
//! event flushes' retries both follow.

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
    Server(ServerErrorKind),
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
            RedisErrorKind::Server(_) => "server",
            RedisErrorKind::BreakerOpen => "breaker_open",
            RedisErrorKind::Dispatch => "dispatch",
        }
    }
}

/// What an error reply's prefix says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerErrorKind {
    /// The script is not loaded: send EVAL instead.
    NoScript,
    /// Redis wants credentials (the host should be given them again).
    NoAuth,
    WrongPass,
    /// Redis is loading its dataset.
    Loading,
    /// A script runs too long.
    Busy,
    MasterDown,
    /// Out of memory: Redis refuses writes.
    Oom,
    TryAgain,
    ClusterDown,
    /// Redis Cluster redirections (the relay follows them; the filter sees them only through
    /// a misconfigured relay).
    Moved,
    Ask,
    /// A replica refused a write.
    ReadOnly,
    /// The ACL user may not run the command or touch the key or channel: a deployment error
    /// (the user's rules do not match the configuration). Not unhealthy: it says nothing of
    /// Redis, other calls may be allowed, and sending it again gets the same answer.
    NoPerm,
    /// `ERR`, `WRONGTYPE` and the rest: about the call, not about Redis.
    Other,
}

impl ServerErrorKind {
    /// The kind of an error reply from its first word.
    pub fn from_prefix(prefix: &str) -> ServerErrorKind {
        match prefix {
            "NOSCRIPT" => ServerErrorKind::NoScript,
            "NOAUTH" => ServerErrorKind::NoAuth,
            "WRONGPASS" => ServerErrorKind::WrongPass,
            "LOADING" => ServerErrorKind::Loading,
            "BUSY" => ServerErrorKind::Busy,
            "MASTERDOWN" => ServerErrorKind::MasterDown,
            "OOM" => ServerErrorKind::Oom,
            "TRYAGAIN" => ServerErrorKind::TryAgain,
            "CLUSTERDOWN" => ServerErrorKind::ClusterDown,
            "MOVED" => ServerErrorKind::Moved,
            "ASK" => ServerErrorKind::Ask,
            "READONLY" => ServerErrorKind::ReadOnly,
            "NOPERM" => ServerErrorKind::NoPerm,
            _ => ServerErrorKind::Other,
        }
    }

    /// Whether the reply says Redis is unhealthy (or refuses this client), a state that may
    /// pass: it counts for the breaker, and a flush that failed so is tried again.
    pub fn is_unhealthy(self) -> bool {
        matches!(
            self,
            ServerErrorKind::Loading
                | ServerErrorKind::Busy
                | ServerErrorKind::MasterDown
                | ServerErrorKind::NoAuth
                | ServerErrorKind::WrongPass
                | ServerErrorKind::Oom
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
        )
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

    /// An error reply from Redis; the message starts with its prefix, read here once.
    pub fn server(message: impl Into<String>) -> RedisError {
        let message = message.into();
        let kind = ServerErrorKind::from_prefix(message.split(' ').next().unwrap_or(""));
        RedisError::new(RedisErrorKind::Server(kind), message)
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == RedisErrorKind::Timeout
    }

    pub fn is_protocol(&self) -> bool {
        self.kind == RedisErrorKind::Protocol
    }

    /// The RESP error prefix of a server error (`NOSCRIPT`, `NOAUTH`, `MOVED`, ...).
    pub fn prefix(&self) -> Option<&str> {
        self.server_kind()
            .map(|_| self.message.split(' ').next().unwrap_or(""))
    }

    /// The kind of a server error.
    pub fn server_kind(&self) -> Option<ServerErrorKind> {
        match self.kind {
            RedisErrorKind::Server(k) => Some(k),
            _ => None,
        }
    }

    pub fn is_noscript(&self) -> bool {
        self.server_kind() == Some(ServerErrorKind::NoScript)
    }

    pub fn is_noauth(&self) -> bool {
        self.server_kind() == Some(ServerErrorKind::NoAuth)
    }

    /// Whether the failure says something about Redis' health (and so counts for the breaker).
    /// A script error such as a wrong argument does not, nor a call the relay refused (400, 403,
    /// 413): that is about the call, and one kind of call (a cache store too large for the
    /// relay) must not open the breaker for every other (rate limits would fall back). Nor does
    /// `OOM`: Redis answered at once and refuses only writes, so the calls that only read (cache
    /// hits) must keep going to it.
    pub fn counts_for_breaker(&self) -> bool {
        match self.kind {
            RedisErrorKind::Refused => false,
            RedisErrorKind::Server(ServerErrorKind::Oom) => false,
            RedisErrorKind::Server(kind) => kind.is_unhealthy(),
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
    fn out_of_memory_is_retried_by_flushes_but_does_not_open_the_breaker() {
        let oom = RedisError::server("OOM command not allowed when used memory > 'maxmemory'.");
        assert_eq!(oom.server_kind(), Some(ServerErrorKind::Oom));
        assert!(
            ServerErrorKind::Oom.is_unhealthy(),
            "a flush tries it again"
        );
        assert!(!oom.counts_for_breaker());
        let loading = RedisError::server("LOADING Redis is loading the dataset in memory");
        assert!(loading.counts_for_breaker());
    }

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
    fn error_replies_are_classified_once_by_their_prefix() {
        let kind = |m: &str| RedisError::server(m).server_kind();
        assert_eq!(
            kind("MOVED 3999 127.0.0.1:6381"),
            Some(ServerErrorKind::Moved)
        );
        assert_eq!(kind("OOM command not allowed"), Some(ServerErrorKind::Oom));
        assert_eq!(
            kind("WRONGTYPE Operation against a key"),
            Some(ServerErrorKind::Other)
        );
        assert_eq!(
            kind("noscript lower case is not the prefix"),
            Some(ServerErrorKind::Other)
        );
        assert!(RedisError::server("NOAUTH Authentication required.").is_noauth());
        let noperm = RedisError::server(
            "NOPERM this user has no permissions to access one of the keys used as arguments",
        );
        assert_eq!(noperm.server_kind(), Some(ServerErrorKind::NoPerm));
        assert!(
            !noperm.counts_for_breaker(),
            "an ACL refusal says nothing of Redis"
        );
        assert!(
            !ServerErrorKind::NoPerm.is_unhealthy(),
            "a flush refused so is not tried again"
        );
        assert!(!RedisError::server("READONLY You can't write").counts_for_breaker());
        assert_eq!(RedisError::protocol("x").server_kind(), None);
    }

    #[test]
    fn a_refused_call_says_nothing_about_redis_health() {
        let refused = RedisError::new(RedisErrorKind::Refused, "relay answered 413: too large");
        assert!(!refused.counts_for_breaker());
        assert!(RedisError::new(RedisErrorKind::Unavailable, "502").counts_for_breaker());
    }
}
