//! The HTTP side every feature shares: a request's facts as the host gave them, a response the
//! filter sends itself, and what to do to a paused request or held response.

use crate::keys::client_ip;
use std::time::Duration;

/// A request's facts as the host gave them.
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    /// `:path`, with its query string.
    pub path: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub source_address: Option<String>,
}

impl RequestInfo {
    /// The path without its query string.
    pub fn path(&self) -> &str {
        without_query(&self.path)
    }

    /// The query string without `?` (empty when none).
    pub fn query(&self) -> &str {
        self.path.split_once('?').map_or("", |(_, q)| q)
    }

    /// The first value of a field (names compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The client's address: the connection's, or an `X-Forwarded-For` entry past
    /// `trusted_hops` proxies (see [`crate::keys::client_ip`]).
    pub fn client_ip(&self, trusted_hops: u32) -> Option<String> {
        let forwarded: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|(_, v)| v.as_str())
            .collect();
        client_ip(self.source_address.as_deref(), &forwarded, trusted_hops)
    }
}

/// A `:path` without its query string.
pub fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// A response the filter sends instead of the upstream's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What to do to a request once the Redis calls it waits for are answered.
#[derive(Debug, PartialEq, Eq)]
pub enum HostAction {
    /// Let a paused request go on.
    Resume(u32),
    Respond(u32, LocalResponse),
    /// Let a held response go on.
    ResumeResponse(u32),
}

/// HTTP calls to an upstream cluster (the host's `dispatch_http_call`): the answer comes later,
/// under the returned token.
pub trait Upstream {
    /// Sends a bodiless request with these fields (`:method`, `:path`, … included); why the
    /// host refused it otherwise.
    fn call(
        &mut self,
        cluster: &str,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> Result<u32, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_query_are_split_at_the_first_question_mark() {
        let r = RequestInfo {
            path: "/a/b?x=1?y".into(),
            ..RequestInfo::default()
        };
        assert_eq!((r.path(), r.query()), ("/a/b", "x=1?y"));
        let r = RequestInfo {
            path: "/plain".into(),
            ..RequestInfo::default()
        };
        assert_eq!((r.path(), r.query()), ("/plain", ""));
    }
}
