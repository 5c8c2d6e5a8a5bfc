//! Envoy's HTTP connection manager settings, over real sockets, each pinned to what Envoy 1.40
//! did with the same request (a loopback client, an echo upstream): the downstream address a
//! plugin reads (`source.address`), `x-forwarded-for`, `x-forwarded-proto`, `x-request-id`,
//! `x-envoy-*` headers as the plugin and the upstream see them, headers with underscores, path
//! normalisation, the request-headers and idle timers, and the overload manager's connection
//! limit.

mod abi_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use abi_support::{request, start, GatewayOptions};
use host_shim::conn_manager::{self, CidrRange, ConnectionManagerConfig, UnderscoreAction};
use serde_json::Value;

fn with_cm(cm: ConnectionManagerConfig) -> GatewayOptions {
    GatewayOptions {
        connection_manager: cm,
        ..GatewayOptions::default()
    }
}

fn edge() -> ConnectionManagerConfig {
    ConnectionManagerConfig {
        use_remote_address: true,
        ..ConnectionManagerConfig::default()
    }
}

/// The `properties` guest's report: `source.address`, `request.path` and the request headers
/// the plugin saw.
struct PluginView {
    source: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl PluginView {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn plugin_view(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (PluginView, SocketAddr) {
    let (resp, client) = request(addr, "GET", path, headers, b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v: Value = resp.json();
    let headers = v["request.headers"]
        .as_array()
        .unwrap_or_else(|| panic!("request.headers: {v}"))
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or_default().to_string(),
                p[1].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let view = PluginView {
        source: v["source.address"].as_str().unwrap_or_default().to_string(),
        path: v["request.path"].as_str().unwrap_or_default().to_string(),
        headers,
    };
    (view, client)
}

fn local_ip() -> String {
    conn_manager::local_address().to_string()
}

// ---- addresses and forwarding headers -------------------------------------------------------

#[test]
fn without_use_remote_address_the_downstream_is_the_last_xff_entry_and_xff_is_left_alone() {
    let gw = start("properties", &GatewayOptions::default());
    let (v, _) = plugin_view(
        gw.addr,
        "/p",
        &[
            ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
            ("x-request-id", "client-rid"),
            ("x-forwarded-proto", "https"),
        ],
    );
    // A client picks its own rate-limit identity this way: Envoy's default.
    assert_eq!(v.source, "5.6.7.8:0");
    assert_eq!(v.header("x-forwarded-for"), Some("1.2.3.4, 5.6.7.8"));
    assert_eq!(v.header("x-forwarded-proto"), Some("https"));
    assert_eq!(v.header("x-request-id"), Some("client-rid"));
    assert_eq!(v.header("x-envoy-external-address"), None);

    let (v, client) = plugin_view(gw.addr, "/p", &[("x-forwarded-for", "garbage")]);
    assert_eq!(
        v.source,
        client.to_string(),
        "an unparsable entry: the peer"
    );
    let (v, client) = plugin_view(gw.addr, "/p", &[]);
    assert_eq!(v.source, client.to_string());
    assert_eq!(v.header("x-forwarded-for"), None, "nothing appended");
    assert_eq!(v.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        v.header("x-request-id").map(str::len),
        Some(36),
        "generated"
    );
}

#[test]
fn repeated_xff_headers_are_one_comma_joined_header() {
    let gw = start("properties", &GatewayOptions::default());
    let (v, _) = plugin_view(
        gw.addr,
        "/p",
        &[
            ("x-forwarded-for", "1.2.3.4,5.6.7.8"),
            ("x-forwarded-for", "9.9.9.9"),
        ],
    );
    assert_eq!(v.header("x-forwarded-for"), Some("1.2.3.4,5.6.7.8,9.9.9.9"));
    assert_eq!(v.source, "9.9.9.9:0");
}

#[test]
fn with_use_remote_address_the_downstream_is_the_peer_and_a_loopback_peer_appends_envoys_address() {
    let gw = start("properties", &with_cm(edge()));
    let (v, client) = plugin_view(
        gw.addr,
        "/p",
        &[
            ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
            ("x-request-id", "client-rid"),
            ("x-forwarded-proto", "https"),
        ],
    );
    assert_eq!(v.source, client.to_string());
    assert_eq!(
        v.header("x-forwarded-for"),
        Some(format!("1.2.3.4, 5.6.7.8,{}", local_ip()).as_str())
    );
    assert_eq!(v.header("x-forwarded-proto"), Some("http"));
    assert_eq!(v.header("x-envoy-external-address"), Some("127.0.0.1"));
    let rid = v.header("x-request-id").unwrap_or_default();
    assert!(rid != "client-rid" && rid.len() == 36, "regenerated: {rid}");

    let (v, _) = plugin_view(gw.addr, "/p", &[]);
    assert_eq!(v.header("x-forwarded-for"), Some(local_ip().as_str()));
}

#[test]
fn trusted_hops_pick_the_xff_entry_and_keep_the_forwarded_proto() {
    let cm = ConnectionManagerConfig {
        xff_num_trusted_hops: 1,
        ..edge()
    };
    let gw = start("properties", &with_cm(cm));
    let (v, _) = plugin_view(
        gw.addr,
        "/p",
        &[
            ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
            ("x-forwarded-proto", "https"),
        ],
    );
    assert_eq!(v.source, "5.6.7.8:0");
    assert_eq!(v.header("x-envoy-external-address"), Some("5.6.7.8"));
    assert_eq!(v.header("x-forwarded-proto"), Some("https"));

    // Without use_remote_address one hop is skipped from the right.
    let cm = ConnectionManagerConfig {
        xff_num_trusted_hops: 1,
        ..ConnectionManagerConfig::default()
    };
    let gw = start("properties", &with_cm(cm));
    let (v, _) = plugin_view(gw.addr, "/p", &[("x-forwarded-for", "1.2.3.4, 5.6.7.8")]);
    assert_eq!(v.source, "1.2.3.4:0");
    let (v, client) = plugin_view(gw.addr, "/p", &[("x-forwarded-for", "1.2.3.4")]);
    assert_eq!(v.source, client.to_string(), "too few entries: the peer");
}

#[test]
fn skip_xff_append_and_preserve_external_request_id_keep_what_the_client_sent() {
    let cm = ConnectionManagerConfig {
        skip_xff_append: true,
        preserve_external_request_id: true,
        ..edge()
    };
    let gw = start("properties", &with_cm(cm));
    let (v, _) = plugin_view(
        gw.addr,
        "/p",
        &[("x-forwarded-for", "1.2.3.4"), ("x-request-id", "rid")],
    );
    assert_eq!(v.header("x-forwarded-for"), Some("1.2.3.4"));
    assert_eq!(v.header("x-request-id"), Some("rid"));
    assert_eq!(v.header("x-envoy-external-address"), Some("127.0.0.1"));
}

const CLIENT_ENVOY_HEADERS: &[(&str, &str)] = &[
    ("x-envoy-internal", "true"),
    ("x-envoy-retry-on", "5xx"),
    ("x-envoy-original-path", "/o"),
    ("x-envoy-decorator-operation", "d"),
    ("x-envoy-ip-tags", "t"),
    ("x-envoy-foo", "1"),
];

#[test]
fn an_external_client_cannot_send_envoys_internal_headers() {
    // Envoy 1.40 treats no address as internal unless internal_address_config says so:
    // a loopback client is external.
    let gw = start("properties", &with_cm(edge()));
    let (v, _) = plugin_view(gw.addr, "/p", CLIENT_ENVOY_HEADERS);
    for gone in [
        "x-envoy-internal",
        "x-envoy-retry-on",
        "x-envoy-original-path",
        "x-envoy-decorator-operation",
        "x-envoy-ip-tags",
    ] {
        assert_eq!(v.header(gone), None, "{gone}");
    }
    assert_eq!(v.header("x-envoy-foo"), Some("1"), "unknown names pass");

    // Not an edge request (no use_remote_address): the edge-only names stay.
    let gw = start("properties", &GatewayOptions::default());
    let (v, _) = plugin_view(gw.addr, "/p", CLIENT_ENVOY_HEADERS);
    assert_eq!(v.header("x-envoy-internal"), None);
    assert_eq!(v.header("x-envoy-retry-on"), None);
    assert_eq!(v.header("x-envoy-original-path"), Some("/o"));
    assert_eq!(v.header("x-envoy-decorator-operation"), Some("d"));
}

fn loopback_internal() -> ConnectionManagerConfig {
    ConnectionManagerConfig {
        internal_ranges: vec![CidrRange {
            prefix: "127.0.0.0".parse().expect("ip"),
            len: 8,
        }],
        ..edge()
    }
}

#[test]
fn an_internal_client_keeps_its_headers_and_gets_x_envoy_internal() {
    let gw = start("properties", &with_cm(loopback_internal()));
    let mut headers = CLIENT_ENVOY_HEADERS.to_vec();
    headers.push(("x-request-id", "rid"));
    let (v, _) = plugin_view(gw.addr, "/p", &headers);
    assert_eq!(v.header("x-envoy-internal"), Some("true"));
    assert_eq!(v.header("x-envoy-retry-on"), Some("5xx"));
    assert_eq!(v.header("x-request-id"), Some("rid"));
    assert_eq!(v.header("x-envoy-external-address"), None);

    // With an XFF header the request is no longer a single-address one: external.
    let (v, _) = plugin_view(gw.addr, "/p", &[("x-forwarded-for", "127.0.0.5")]);
    assert_eq!(v.header("x-envoy-internal"), None);
}

#[test]
fn the_upstream_sees_the_forwarding_headers_and_not_the_routers_own() {
    let gw = start("headers", &with_cm(loopback_internal()));
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/up",
        &[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-request-id", "rid"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-foo", "1"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = gw.upstream.last("/up");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some(format!("1.2.3.4,{}", local_ip()).as_str())
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-envoy-external-address"), Some("127.0.0.1"));
    assert_ne!(seen.header("x-request-id"), Some("rid"));
    assert_eq!(seen.header("x-envoy-retry-on"), None);
    assert_eq!(seen.header("x-envoy-foo"), Some("1"));
    // The router announces the route timeout (10 s in these gateways).
    assert_eq!(seen.header("x-envoy-expected-rq-timeout-ms"), Some("10000"));

    // An internal client's retry header reaches the plugin but not the upstream: the router
    // consumes it.
    let (resp, _) = request(gw.addr, "GET", "/up2", &[("x-envoy-retry-on", "5xx")], b"");
    assert_eq!(resp.status, 200);
    let seen = gw.upstream.last("/up2");
    assert_eq!(seen.header("x-envoy-internal"), Some("true"));
    assert_eq!(seen.header("x-envoy-retry-on"), None);
}

// ---- underscores and paths ------------------------------------------------------------------

#[test]
fn headers_with_underscores_are_rejected_with_400_and_close_or_dropped() {
    let cm = ConnectionManagerConfig {
        headers_with_underscores: UnderscoreAction::RejectRequest,
        ..ConnectionManagerConfig::default()
    };
    let gw = start("headers", &with_cm(cm));
    let (resp, _) = request(gw.addr, "GET", "/u", &[("x_under", "1")], b"");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.text(), "Bad Request");
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        gw.upstream.seen().iter().all(|s| s.path != "/u"),
        "never forwarded"
    );
    let (resp, _) = request(gw.addr, "GET", "/ok", &[("x-ok", "1")], b"");
    assert_eq!(resp.status, 200);

    let cm = ConnectionManagerConfig {
        headers_with_underscores: UnderscoreAction::DropHeader,
        ..ConnectionManagerConfig::default()
    };
    let gw = start("properties", &with_cm(cm));
    let (v, _) = plugin_view(gw.addr, "/p", &[("x_under", "1"), ("x-ok", "2")]);
    assert_eq!(v.header("x_under"), None);
    assert_eq!(v.header("x-ok"), Some("2"));
}

#[test]
fn normalised_paths_cannot_dodge_an_exact_route() {
    let cm = ConnectionManagerConfig {
        normalize_path: true,
        merge_slashes: true,
        ..ConnectionManagerConfig::default()
    };
    let gw = start("properties", &with_cm(cm.clone()));
    for spelled in [
        "/api//rate-limited",
        "/api/./x/../rate-limited",
        "/api/%2e%2e/api/rate-limited",
        "/api/rate%2Dlimited",
        "//api///rate-limited",
    ] {
        let (v, _) = plugin_view(gw.addr, spelled, &[]);
        assert_eq!(v.path, "/api/rate-limited", "{spelled}");
    }
    let (v, _) = plugin_view(gw.addr, "/api%2Frate-limited?q=a//b", &[]);
    assert_eq!(
        v.path, "/api%2Frate-limited?q=a//b",
        "%2F and the query are kept"
    );

    let gw = start("headers", &with_cm(cm));
    let (resp, _) = request(gw.addr, "GET", "/a//b/../c", &[], b"");
    assert_eq!(resp.status, 200);
    gw.upstream.last("/a/c");
    let (resp, _) = request(gw.addr, "GET", "/a%00b", &[], b"");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.text(), "");

    let gw = start("properties", &GatewayOptions::default());
    let (v, _) = plugin_view(gw.addr, "/api//rate-limited", &[]);
    assert_eq!(v.path, "/api//rate-limited", "off by default");
}

// ---- connection timers and limits -----------------------------------------------------------

/// Writes `sent`, then reads until EOF; returns what came back and when EOF came.
fn read_to_eof(addr: SocketAddr, sent: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let started = Instant::now();
    // A connection closed at accept may refuse the write: what matters is what comes back.
    let _ = s.write_all(sent);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn slow_request_headers_get_408_and_the_connection_closes() {
    let cm = ConnectionManagerConfig {
        request_headers_timeout: Some(Duration::from_millis(500)),
        ..ConnectionManagerConfig::default()
    };
    let gw = start("headers", &with_cm(cm));
    let (text, took) = read_to_eof(gw.addr, b"GET /x HTTP/1.1\r\nhost: a\r\n");
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text:?}"
    );
    assert!(text.contains("connection: close"), "{text:?}");
    assert!(text.ends_with("\r\n\r\nrequest header timeout"), "{text:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Complete headers are not timed, however slow the body or the upstream.
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/slow",
        &[("x-upstream-delay-ms", "900")],
        b"",
    );
    assert_eq!(resp.status, 200);
}

#[test]
fn idle_connections_close_without_a_response() {
    let cm = ConnectionManagerConfig {
        request_headers_timeout: Some(Duration::from_millis(300)),
        idle_timeout: Some(Duration::from_millis(500)),
        ..ConnectionManagerConfig::default()
    };
    let gw = start("headers", &with_cm(cm));
    // Not a byte sent: closed at the idle timeout, unanswered (no 408: no request began).
    let (text, took) = read_to_eof(gw.addr, b"");
    assert_eq!(text, "");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // After a request: Envoy drains (5 s) and closes 1 s later.
    let (text, took) = read_to_eof(gw.addr, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text:?}");
    assert!(
        took >= Duration::from_millis(6400) && took < Duration::from_secs(9),
        "{took:?}"
    );
}

#[test]
fn connections_beyond_the_overload_limit_are_closed_at_accept() {
    let opts = GatewayOptions {
        max_downstream_connections: Some(2),
        workers: 1,
        ..GatewayOptions::default()
    };
    let gw = start("headers", &opts);
    let connect = || {
        let s = TcpStream::connect(gw.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    };
    let held = [connect(), connect()];
    std::thread::sleep(Duration::from_millis(100));
    let (text, _) = read_to_eof(gw.addr, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n");
    assert_eq!(text, "", "the third connection is closed unanswered");
    assert_eq!(gw.host_counter("downstream_global_cx_overflow_total"), 1);
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    let (resp, _) = request(gw.addr, "GET", "/x", &[], b"");
    assert_eq!(resp.status, 200, "a slot is free again");
}
