//! The HTTP side every feature shares: a request's facts as the host gave them, a response the
//! filter sends itself, and what to do to a paused request or held response.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::net::{IpAddr, SocketAddr};
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

/// Request or response fields as `(name, value)`, names lower case.
pub type Headers = [(String, String)];

/// Every value of a field, in order (several lines of one field are one list).
pub fn values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The first value of a field.
pub fn first<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every value of a field joined by `,` (one list, as RFC 9110 reads repeated lines); None
/// when the field is absent.
pub fn joined(headers: &Headers, name: &str) -> Option<String> {
    let mut values = values(headers, name).peekable();
    values.peek()?;
    Some(values.collect::<Vec<_>>().join(","))
}

/// The members of a comma-separated list field, trimmed, empty members dropped.
pub fn list_members<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    values(headers, name)
        .flat_map(|v| v.split(','))
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
}

/// Seconds since the epoch of an HTTP-date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), and
/// the obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`) forms recipients must accept. None when unreadable, which
/// includes a day name that is not the date's and years before 1970 (`httpdate`'s range).
pub fn parse_http_date(text: &str) -> Option<i64> {
    let at = httpdate::parse_http_date(text.trim()).ok()?;
    let secs = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
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
        first(&self.headers, name)
    }

    /// The client's address: the connection's, or an `X-Forwarded-For` entry past
    /// `trusted_hops` proxies (see [`client_ip`]).
    pub fn client_ip(&self, trusted_hops: u32) -> Option<String> {
        let forwarded: Vec<&str> = values(&self.headers, "x-forwarded-for").collect();
        client_ip(self.source_address.as_deref(), &forwarded, trusted_hops)
    }
}

/// A `:path` without its query string.
pub fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The client address: with `trusted_hops` = 0 the downstream connection's address; with
/// N > 0 the N-th `X-Forwarded-For` entry from the right (the one the outermost trusted proxy
/// appended). Entries a client prepends itself are never used. A proxy that appends the
/// connection's own address before the filter runs (Envoy with `use_remote_address`,
/// host-shim) leaves that address as the last entry: it is the connection, not a hop, and is
/// skipped. Addresses are normalised (ports removed, IPv6 in canonical form).
pub fn client_ip(
    source_address: Option<&str>,
    forwarded_for: &[&str],
    trusted_hops: u32,
) -> Option<String> {
    let source = source_address.and_then(parse_ip);
    if trusted_hops > 0 {
        let mut entries: Vec<&str> = forwarded_for
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if source.is_some() && entries.last().and_then(|e| parse_ip(e)) == source {
            entries.pop();
        }
        if !entries.is_empty() {
            let hops = usize::try_from(trusted_hops).unwrap_or(usize::MAX);
            // Fewer entries than trusted proxies: the leftmost was still written by one of them.
            let index = entries.len().saturating_sub(hops);
            if let Some(ip) = parse_ip(entries[index]) {
                return Some(ip.to_string());
            }
        }
    }
    source.map(|ip| ip.to_string())
}

/// Parses `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    let unbracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'))?;
    unbracketed.parse::<IpAddr>().ok().map(canonical)
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address (one client, one limit).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A query string's parameters, decoded as forms are (`%XX` and `+`; malformed escapes kept
/// as they are, empty pairs skipped, a name without `=` has an empty value).
pub fn query_pairs(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

/// Everything but RFC 3986's unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986 unreserved characters (upper-case hex).
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
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

/// Owned fields from `(name, value)` literals, for tests.
#[cfg(test)]
pub(crate) fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_trusted_hops_ignores_forwarded_for() {
        let ip = client_ip(Some("10.0.0.7:5555"), &["1.2.3.4"], 0);
        assert_eq!(ip.as_deref(), Some("10.0.0.7"));
    }

    #[test]
    fn trusted_hops_pick_the_entry_the_trusted_proxy_wrote() {
        // client spoofs "6.6.6.6"; the trusted proxy appended the real client 1.2.3.4.
        let xff = ["6.6.6.6, 1.2.3.4"];
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &xff, 1).as_deref(),
            Some("1.2.3.4")
        );
        let xff = ["6.6.6.6, 1.2.3.4, 10.0.0.2"];
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &xff, 2).as_deref(),
            Some("1.2.3.4")
        );
        // Several header lines count as one list.
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &["6.6.6.6", "1.2.3.4"], 1).as_deref(),
            Some("1.2.3.4")
        );
        // Fewer entries than hops: the leftmost.
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &["1.2.3.4"], 3).as_deref(),
            Some("1.2.3.4")
        );
        // Garbage where the address should be: the connection's address.
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &["nonsense"], 1).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            client_ip(Some("10.0.0.1:1"), &[], 1).as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn the_connection_address_appended_by_the_host_is_not_a_hop() {
        // Trusted proxy 10.0.0.1 wrote the client 1.2.3.4; the host appended 10.0.0.1.
        let xff = ["6.6.6.6, 1.2.3.4, 10.0.0.1"];
        assert_eq!(
            client_ip(Some("10.0.0.1:5"), &xff, 1).as_deref(),
            Some("1.2.3.4")
        );
        // A direct client with only the host's entry: itself.
        assert_eq!(
            client_ip(Some("1.2.3.4:5"), &["1.2.3.4"], 1).as_deref(),
            Some("1.2.3.4")
        );
    }

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            parse_ip("[::1]:8080").map(|i| i.to_string()).as_deref(),
            Some("::1")
        );
        assert_eq!(
            parse_ip("0:0:0:0:0:0:0:1")
                .map(|i| i.to_string())
                .as_deref(),
            Some("::1")
        );
        assert_eq!(
            parse_ip("[2001:db8::1]").map(|i| i.to_string()).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            parse_ip("::ffff:1.2.3.4").map(|i| i.to_string()).as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(
            parse_ip("1.2.3.4:99").map(|i| i.to_string()).as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(parse_ip("1.2.3"), None);
        assert_eq!(client_ip(None, &[], 0), None);
    }

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
