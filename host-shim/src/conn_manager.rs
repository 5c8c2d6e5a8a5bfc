//! What Envoy's HTTP connection manager does to a request before the filters see it, as
//! measured on Envoy 1.40: who the downstream is (`source.address`), `x-forwarded-for`,
//! `x-forwarded-proto`, `x-request-id`, `x-envoy-internal` and the client-sent `x-envoy-*`
//! headers it strips, headers with underscores, and `:path` normalisation. Also what the router
//! strips and adds on the way upstream, and what both add to every response after the filters'
//! response phase (`server`, `date`, the router's `x-envoy-upstream-service-time`).
//!
//! Envoy 1.40, a loopback client (`127.0.0.1`), no `internal_address_config`:
//!
//! | `use_remote_address`       | false (default)                       | true                                   |
//! |----------------------------|---------------------------------------|----------------------------------------|
//! | downstream address         | last XFF entry (`IP:0`), else the peer | the peer (`xff_num_trusted_hops` N>0: the Nth entry from the right, else the peer) |
//! | `x-forwarded-for`          | left as sent                           | `,PEER` appended (a loopback peer appends Envoy's own address instead); `skip_xff_append` keeps it as sent |
//! | `x-forwarded-proto`        | `http` when absent                    | set to `http` (kept as sent when trusted hops > 0) |
//! | `x-request-id`             | generated when absent                  | regenerated, unless `preserve_external_request_id` |
//! | `x-envoy-external-address` | (client's kept)                        | set to the downstream IP                |
//!
//! A request is *internal* only when XFF held exactly one address (with `use_remote_address`:
//! there was no XFF) and that address is in `internal_address_config.cidr_ranges`; with no
//! ranges nothing is internal, loopback included. Internal requests get `x-envoy-internal: true`
//! and keep their `x-envoy-*` headers; a client's `x-envoy-internal` is always removed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::abi::HeaderList;

/// The HTTP connection manager settings host-shim gives Envoy's behaviour; `Default` is
/// Envoy's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionManagerConfig {
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub preserve_external_request_id: bool,
    /// `internal_address_config.cidr_ranges`; empty: no address is internal (Envoy 1.40).
    pub internal_ranges: Vec<CidrRange>,
    /// From the first byte of a request until its headers are complete; `None`: no limit
    /// (Envoy's default). On expiry: 408 `request header timeout`, `connection: close`.
    pub request_headers_timeout: Option<Duration>,
    /// A connection with no request in flight for this long is closed; Envoy's default 1 h,
    /// `None` when set to `0s`.
    pub idle_timeout: Option<Duration>,
    pub headers_with_underscores: UnderscoreAction,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    /// `server_name`: the `server` value Envoy writes (`envoy` by default).
    pub server_name: String,
    pub server_header_transformation: ServerHeaderTransformation,
    /// The router filter's `suppress_envoy_headers` (Router typed_config): no
    /// `x-envoy-upstream-service-time` on responses, no `x-envoy-expected-rq-timeout-ms` on
    /// upstream requests. Kept here with the other settings that shape headers: host-shim's
    /// router is part of its connection manager.
    pub suppress_envoy_headers: bool,
}

/// Envoy's `common_http_protocol_options.idle_timeout` when none is set.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for ConnectionManagerConfig {
    fn default() -> Self {
        ConnectionManagerConfig {
            use_remote_address: false,
            xff_num_trusted_hops: 0,
            skip_xff_append: false,
            preserve_external_request_id: false,
            internal_ranges: Vec::new(),
            request_headers_timeout: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            headers_with_underscores: UnderscoreAction::Allow,
            normalize_path: false,
            merge_slashes: false,
            server_name: DEFAULT_SERVER_NAME.into(),
            server_header_transformation: ServerHeaderTransformation::Overwrite,
            suppress_envoy_headers: false,
        }
    }
}

/// Envoy's `server_name` when none is set.
pub const DEFAULT_SERVER_NAME: &str = "envoy";

/// `server_header_transformation`, as Envoy 1.40 applies it to every response (proxied or
/// local).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeaderTransformation {
    /// `server: <server_name>`; an upstream's `server` is replaced where it stands (default).
    Overwrite,
    /// An upstream's `server` is kept; otherwise `server: <server_name>` is appended.
    AppendIfAbsent,
    /// Nothing added; an upstream's `server` passes.
    PassThrough,
}

/// `headers_with_underscores_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoreAction {
    Allow,
    /// Envoy answers 400 `Bad Request` with `connection: close` (details
    /// `http1.unexpected_underscore`).
    RejectRequest,
    /// The header is removed before the filters see it.
    DropHeader,
}

/// One `cidr_ranges` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    pub prefix: IpAddr,
    pub len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.prefix, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Stripped from requests that are not internal (the filters never see them).
const EXTERNAL_STRIPPED: &[&str] = &[
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
];

/// Also stripped from edge requests (external, with `use_remote_address`).
const EDGE_STRIPPED: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-external-address",
    "x-envoy-original-host",
    "x-envoy-original-path",
];

/// Consumed by Envoy's router: never reach the upstream, even from internal clients (host-shim
/// does not act on them).
const ROUTER_CONSUMED: &[&str] = &[
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-max-retries",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
];

fn get<'a>(h: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

/// Replaces the first copy in place (removing the others), or appends.
fn set(h: &mut HeaderList, name: &str, value: Vec<u8>) {
    match h.iter().position(|(k, _)| k == name) {
        Some(i) => {
            h[i].1 = value;
            let mut seen = 0;
            h.retain(|(k, _)| {
                k != name || {
                    seen += 1;
                    seen == 1
                }
            });
        }
        None => h.push((name.to_string(), value)),
    }
}

fn remove(h: &mut HeaderList, names: &[&str]) {
    h.retain(|(k, _)| !names.contains(&k.as_str()));
}

/// Envoy's `getLastAddressFromXFF`: skip `skip` entries from the right, parse the next one
/// (trimmed). Also whether XFF held exactly one entry (and nothing was skipped).
fn last_xff_address(xff: Option<&[u8]>, skip: u32) -> (Option<IpAddr>, bool) {
    let Some(xff) = xff.and_then(|v| std::str::from_utf8(v).ok()) else {
        return (None, false);
    };
    let mut rest = xff;
    for _ in 0..skip {
        match rest.rfind(',') {
            Some(i) => rest = &rest[..i],
            None => return (None, false),
        }
    }
    let (entry, single) = match rest.rfind(',') {
        Some(i) => (&rest[i + 1..], false),
        None => (rest, skip == 0),
    };
    match entry.trim().parse::<IpAddr>() {
        Ok(ip) => (Some(ip), single),
        Err(_) => (None, false),
    }
}

/// Applies the connection manager's request mutations to `headers` (pseudo-headers first, as
/// the plugin sees them) and returns the downstream address (`source.address`).
///
/// `local_ip` is what Envoy appends to XFF for a loopback peer: its own address.
pub fn mutate_request_headers(
    cfg: &ConnectionManagerConfig,
    headers: &mut HeaderList,
    peer: SocketAddr,
    local_ip: IpAddr,
) -> SocketAddr {
    remove(headers, &["x-envoy-internal"]);
    let (final_addr, single) = if cfg.use_remote_address {
        let single = get(headers, "x-forwarded-for").is_none();
        let trusted = if cfg.xff_num_trusted_hops > 0 {
            last_xff_address(
                get(headers, "x-forwarded-for"),
                cfg.xff_num_trusted_hops - 1,
            )
            .0
        } else {
            None
        };
        if !cfg.skip_xff_append {
            // Envoy's test is for the loopback address itself (127.0.0.1, ::1), not 127/8:
            // a peer at 127.0.0.11 is appended as itself.
            let appended = if is_the_loopback_address(peer.ip()) {
                local_ip
            } else {
                peer.ip()
            };
            let value = match get(headers, "x-forwarded-for") {
                Some(existing) => {
                    let mut v = existing.to_vec();
                    v.push(b',');
                    v.extend_from_slice(appended.to_string().as_bytes());
                    v
                }
                None => appended.to_string().into_bytes(),
            };
            set(headers, "x-forwarded-for", value);
        }
        if cfg.xff_num_trusted_hops == 0 {
            set(headers, "x-forwarded-proto", b"http".to_vec());
        }
        let from_xff = trusted.map(|ip| SocketAddr::new(ip, 0));
        (Some(from_xff.unwrap_or(peer)), single)
    } else {
        let (ip, single) =
            last_xff_address(get(headers, "x-forwarded-for"), cfg.xff_num_trusted_hops);
        (ip.map(|ip| SocketAddr::new(ip, 0)), single)
    };
    if get(headers, "x-forwarded-proto").is_none() {
        headers.push(("x-forwarded-proto".into(), b"http".to_vec()));
    }
    let internal = single
        && final_addr.is_some_and(|a| cfg.internal_ranges.iter().any(|r| r.contains(a.ip())));
    // No usable XFF: the peer, for logging and properties (never internal, as in Envoy).
    let downstream = final_addr.unwrap_or(peer);
    let edge = !internal && cfg.use_remote_address;
    if internal {
        headers.push(("x-envoy-internal".into(), b"true".to_vec()));
    } else {
        remove(headers, EXTERNAL_STRIPPED);
        if edge {
            remove(headers, EDGE_STRIPPED);
        }
    }
    if edge {
        headers.push((
            "x-envoy-external-address".into(),
            downstream.ip().to_string().into_bytes(),
        ));
    }
    if get(headers, "x-request-id").is_none() || (edge && !cfg.preserve_external_request_id) {
        set(headers, "x-request-id", new_request_id().into_bytes());
    }
    downstream
}

/// What Envoy's router does to the request on its way upstream: drops the headers it consumes
/// and announces the route timeout (unless `suppress_envoy_headers`).
pub fn router_request_headers(
    cfg: &ConnectionManagerConfig,
    headers: &mut HeaderList,
    route_timeout: Option<Duration>,
) {
    remove(headers, ROUTER_CONSUMED);
    if let Some(t) = route_timeout.filter(|_| !cfg.suppress_envoy_headers) {
        headers.push((
            "x-envoy-expected-rq-timeout-ms".into(),
            t.as_millis().to_string().into_bytes(),
        ));
    }
}

/// The router's timing of an upstream exchange, set on the upstream's response before the
/// filters' response phase sees it: an upstream-sent `x-envoy-upstream-service-time` is
/// replaced where it stands (Envoy 1.40); with `suppress_envoy_headers` it passes untouched.
pub fn router_response_headers(
    cfg: &ConnectionManagerConfig,
    headers: &mut http::HeaderMap,
    upstream_time: Duration,
) {
    if !cfg.suppress_envoy_headers {
        headers.insert(
            "x-envoy-upstream-service-time",
            http::HeaderValue::from(upstream_time.as_millis() as u64),
        );
    }
}

/// What the connection manager adds to every response after the filters' response phase, in
/// Envoy 1.40's order: `date` when absent, then `server` by `server_header_transformation`.
/// hyper adds the framing (`content-length: 0` for an empty body, chunked for a streamed one)
/// after these, where Envoy's codec puts it too.
pub fn encode_response_headers(cfg: &ConnectionManagerConfig, headers: &mut http::HeaderMap) {
    if !headers.contains_key(http::header::DATE) {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        if let Ok(v) = http::HeaderValue::from_str(&now) {
            headers.insert(http::header::DATE, v);
        }
    }
    let overwrite = match cfg.server_header_transformation {
        ServerHeaderTransformation::Overwrite => true,
        ServerHeaderTransformation::AppendIfAbsent => !headers.contains_key(http::header::SERVER),
        ServerHeaderTransformation::PassThrough => false,
    };
    if overwrite {
        if let Ok(v) = http::HeaderValue::from_str(&cfg.server_name) {
            headers.insert(http::header::SERVER, v);
        }
    }
}

/// A random UUID (version 4) for `x-request-id`.
pub fn new_request_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// `127.0.0.1` or `::1` (Envoy's `isLoopbackAddress`), not the rest of 127.0.0.0/8.
fn is_the_loopback_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    }
}

/// The address Envoy appends to XFF for a loopback peer: its own (the node's) IPv4 address, or
/// 127.0.0.1 when it has none. Envoy takes the first non-loopback interface; host-shim takes
/// the source address of its default route, the same address on a single-homed host.
pub fn local_address() -> IpAddr {
    let routed = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        // No packet is sent: connecting a UDP socket only picks the route and source address.
        s.connect("203.0.113.1:9")?;
        s.local_addr()
    });
    match routed {
        Ok(a) if !a.ip().is_unspecified() && !a.ip().is_loopback() => a.ip(),
        _ => IpAddr::from([127, 0, 0, 1]),
    }
}

/// Why a request head was refused before the filters ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub body: &'static str,
    /// Envoy's response code details (the access log's `%RESPONSE_CODE_DETAILS%`).
    pub details: &'static str,
    pub close: bool,
}

/// Envoy 1.40's HTTP/1 codec checks on a request head hyper accepts: HTTP/1.0 gets 426
/// `Upgrade Required` (Envoy's default refuses HTTP/1.0), a method with lower-case letters and
/// an HTTP/1.1 request without `Host` get 400, a header block over the limit 431; every one
/// closes the connection.
pub fn check_request_head(
    version: http::Version,
    method: &str,
    has_host: bool,
    head_too_large: bool,
) -> Result<(), Rejection> {
    let refuse = |status, body, details| {
        Err(Rejection {
            status,
            body,
            details,
            close: true,
        })
    };
    if head_too_large {
        return refuse(
            431,
            "Request Header Fields Too Large",
            "http1.headers_too_large",
        );
    }
    if version < http::Version::HTTP_11 {
        return refuse(426, "Upgrade Required", "low_version");
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return refuse(400, "Bad Request", "http1.codec_error");
    }
    if !has_host {
        return refuse(400, "", "missing_host_header");
    }
    Ok(())
}

/// Applies `headers_with_underscores_action` to the regular headers.
pub fn check_underscores(
    action: UnderscoreAction,
    headers: &mut HeaderList,
) -> Result<(), Rejection> {
    let has = |k: &str| !k.starts_with(':') && k.contains('_');
    match action {
        UnderscoreAction::Allow => Ok(()),
        UnderscoreAction::DropHeader => {
            headers.retain(|(k, _)| !has(k));
            Ok(())
        }
        UnderscoreAction::RejectRequest if headers.iter().any(|(k, _)| has(k)) => Err(Rejection {
            status: 400,
            body: "Bad Request",
            details: "http1.unexpected_underscore",
            close: true,
        }),
        UnderscoreAction::RejectRequest => Ok(()),
    }
}

/// `:path` as Envoy's `normalize_path` and `merge_slashes` leave it (the query is untouched).
/// `None` when Envoy refuses the path (400, empty body): a fragment or an encoded NUL.
///
/// Measured on Envoy 1.40 (normalize_path and merge_slashes): `/api//x` → `/api/x`,
/// `/api/./x/../y` → `/api/y`, `/api/%2e%2e/y` → `/y`, `/a\b` → `/a/b`, `/rate%2Dlimited` →
/// `/rate-limited` (unreserved characters decoded), `%2F` and other reserved escapes kept
/// as sent (case too), `"<>^`{|}` escaped as `%22` …, `/a/b/..` → `/a/`, `/..` → `/`.
pub fn normalize_path(path: &str, normalize: bool, merge_slashes: bool) -> Option<String> {
    if !normalize && !merge_slashes {
        return Some(path.to_string());
    }
    let (path_part, query) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let mut out = if normalize {
        canonical_path(path_part)?
    } else {
        path_part.to_string()
    };
    if merge_slashes {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    out.push_str(query);
    Some(out)
}

/// Characters Envoy's (Chromium's) path canonicaliser percent-encodes.
fn escaped_in_path(b: u8) -> bool {
    b <= 0x20 || b >= 0x7f || matches!(b, b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}')
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn canonical_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'#' => return None,
            b'\\' => out.push('/'),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(0) => return None,
                    Some(d) if unreserved(d) => {
                        out.push(d as char);
                        i += 3;
                        continue;
                    }
                    Some(_) => {
                        out.push_str(&path[i..i + 3]);
                        i += 3;
                        continue;
                    }
                    None => out.push('%'),
                }
            }
            b if escaped_in_path(b) => out.push_str(&format!("%{b:02X}")),
            b => out.push(b as char),
        }
        i += 1;
    }
    if !out.starts_with('/') {
        return None;
    }
    let segments: Vec<&str> = out[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => {
                kept.push(s);
                continue;
            }
        }
        if n == last {
            kept.push("");
        }
    }
    Some(format!("/{}", kept.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xff_entries_are_read_from_the_right_as_envoy_does() {
        let x = |v: &str, skip| last_xff_address(Some(v.as_bytes()), skip);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(x("1.2.3.4", 0), (ip("1.2.3.4"), true));
        assert_eq!(x("1.2.3.4, 5.6.7.8", 0), (ip("5.6.7.8"), false));
        assert_eq!(x("1.2.3.4, 5.6.7.8", 1), (ip("1.2.3.4"), false));
        assert_eq!(x("1.2.3.4", 1), (None, false));
        assert_eq!(x("bogus, 5.6.7.8", 1), (None, false));
        assert_eq!(x("garbage", 0), (None, false));
        assert_eq!(x(" ::1 ", 0), (ip("::1"), true));
    }

    #[test]
    fn only_the_loopback_address_itself_appends_envoys_own_address() {
        let cfg = ConnectionManagerConfig {
            use_remote_address: true,
            ..ConnectionManagerConfig::default()
        };
        let local: IpAddr = "192.0.2.2".parse().unwrap();
        let appended = |peer: &str| {
            let mut headers: HeaderList = vec![(":path".into(), b"/".to_vec())];
            mutate_request_headers(&cfg, &mut headers, peer.parse().unwrap(), local);
            String::from_utf8(get(&headers, "x-forwarded-for").unwrap().to_vec()).unwrap()
        };
        assert_eq!(appended("127.0.0.1:5000"), "192.0.2.2");
        assert_eq!(appended("[::1]:5000"), "192.0.2.2");
        assert_eq!(appended("127.0.0.11:5000"), "127.0.0.11");
        assert_eq!(appended("203.0.113.9:5000"), "203.0.113.9");
    }

    #[test]
    fn cidr_ranges_match_by_prefix() {
        let r = CidrRange {
            prefix: "127.0.0.0".parse().unwrap(),
            len: 8,
        };
        assert!(r.contains("127.9.9.9".parse().unwrap()));
        assert!(!r.contains("128.0.0.1".parse().unwrap()));
        assert!(!r.contains("::1".parse().unwrap()));
        let all = CidrRange {
            prefix: "0.0.0.0".parse().unwrap(),
            len: 0,
        };
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn paths_normalise_as_envoy_1_40_does() {
        let n = |p: &str| normalize_path(p, true, true);
        let cases = [
            ("/api//rate-limited", "/api/rate-limited"),
            ("/api/./x/../rate-limited", "/api/rate-limited"),
            ("/api%2Frate-limited", "/api%2Frate-limited"),
            ("/api/rate%2Dlimited", "/api/rate-limited"),
            ("/api/rate-limited/", "/api/rate-limited/"),
            ("//api///rate-limited?a=1//b", "/api/rate-limited?a=1//b"),
            ("/api/%2e%2e/api/rate-limited", "/api/rate-limited"),
            ("/api\\rate-limited", "/api/rate-limited"),
            ("/../api/rate-limited", "/api/rate-limited"),
            ("/API/rate-limited", "/API/rate-limited"),
            ("/api/%7Erate-limited", "/api/~rate-limited"),
            ("/a%2fb", "/a%2fb"),
            ("/%41%62c", "/Abc"),
            ("/a%zzb", "/a%zzb"),
            ("/a%2e/b", "/a./b"),
            ("/a/.%2e/b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/\"x\"", "/a/%22x%22"),
            ("/a/{x}", "/a/%7Bx%7D"),
            ("/a/|^`", "/a/%7C%5E%60"),
            ("/a/'x'", "/a/'x'"),
            ("/a%25b", "/a%25b"),
            ("/a/%c3%a9", "/a/%c3%a9"),
            ("/a;b=c/../d", "/d"),
            ("/a/b?x=/../y", "/a/b?x=/../y"),
            ("/a/<>", "/a/%3C%3E"),
            ("/a/%20b", "/a/%20b"),
            ("/a/..%2fb", "/a/..%2fb"),
            ("/.", "/"),
            ("/..", "/"),
            ("/a/b/../../../c", "/c"),
            ("/a//b/../c", "/a/c"),
            ("/a/b%5Cc", "/a/b%5Cc"),
        ];
        for (input, want) in cases {
            assert_eq!(n(input).as_deref(), Some(want), "{input}");
        }
        assert_eq!(n("/api/rate-limited#frag"), None);
        assert_eq!(n("/api/rate-limited%00"), None);
        assert_eq!(
            normalize_path("//a/./b", false, true).as_deref(),
            Some("/a/./b")
        );
        assert_eq!(
            normalize_path("//a/./b", true, false).as_deref(),
            Some("//a/b")
        );
        assert_eq!(normalize_path("//a", false, false).as_deref(), Some("//a"));
    }
}
