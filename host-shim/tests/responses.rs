//! What reaches the client besides the upstream's and the plugin's fields, over real sockets,
//! each pinned to what Envoy 1.40 sent with the krowoc plugin (`curl -i` side by side): the
//! router's `x-envoy-upstream-service-time` after the upstream's fields and before the filter's
//! response-phase ones, then `date` when absent, then `server` by `server_name` and
//! `server_header_transformation`; local replies framed as Envoy's `sendLocalReply` frames them;
//! requests the codec refuses answered without the filters; `host` first on the upstream request.

mod abi_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use abi_support::{guest, request, spec, start, GatewayOptions, Response};
use host_shim::conn_manager::{ConnectionManagerConfig, ServerHeaderTransformation};
use host_shim::gateway::Gateway;
use host_shim::shared::SharedState;

/// An upstream that answers every request with `fields` (raw `name: value\r\n` lines) and the
/// body `hello`, then closes.
fn fixed_upstream(fields: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fixed upstream");
    let addr = listener.local_addr().expect("fixed upstream address");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\n{fields}content-length: 5\r\nconnection: close\r\n\r\nhello"
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    addr
}

/// A gateway running the `headers` guest in front of `upstream`; stopped on drop.
struct FixedGateway {
    addr: SocketAddr,
    gateway: Option<Gateway>,
}

impl Drop for FixedGateway {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop();
        }
    }
}

fn gateway_to(upstream: SocketAddr, cm: ConnectionManagerConfig) -> FixedGateway {
    let opts = GatewayOptions {
        connection_manager: cm,
        ..GatewayOptions::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gateway");
    let shared = Arc::new(SharedState::default());
    shared.set_data("abi/vm_counter", b"0".to_vec(), 0);
    let gateway = Gateway::start(spec(guest(), "headers", &opts, upstream), listener, shared)
        .expect("gateway starts");
    FixedGateway {
        addr: gateway.local_addr,
        gateway: Some(gateway),
    }
}

/// The field names in order, without `connection` (the tests' requests ask for `close`, which
/// the codec writes last).
fn names(resp: &Response) -> Vec<&str> {
    resp.headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| *k != "connection")
        .collect()
}

fn position(resp: &Response, name: &str) -> usize {
    names(resp)
        .iter()
        .position(|k| *k == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", names(resp)))
}

const UPSTREAM_FIELDS: &str = "server: up/1.0\r\nx-envoy-upstream-service-time: 999\r\n\
                               date: Mon, 01 Jan 2001 00:00:00 GMT\r\nx-up: 1\r\n";

#[test]
fn a_proxied_response_gets_the_routers_timing_then_the_filters_fields_then_date_and_server() {
    let gw = start("headers", &GatewayOptions::default());
    let resp = gw.get("/r", &[]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let timing = position(&resp, "x-envoy-upstream-service-time");
    assert!(
        position(&resp, "content-type") < timing,
        "{:?}",
        names(&resp)
    );
    assert!(
        timing < position(&resp, "x-resp-added"),
        "{:?}",
        names(&resp)
    );
    // The filter replaced the upstream's x-upstream-tag: Envoy appends the new value at the end.
    assert!(
        position(&resp, "x-resp-added") < position(&resp, "x-upstream-tag"),
        "{:?}",
        names(&resp)
    );
    assert!(resp
        .header("x-envoy-upstream-service-time")
        .is_some_and(|v| v.parse::<u64>().is_ok()));
    // The echo upstream sends its own date, which stays where it was.
    assert!(position(&resp, "date") < timing, "{:?}", names(&resp));
    assert_eq!(names(&resp).last(), Some(&"server"));
    assert_eq!(resp.header("server"), Some("envoy"));
}

#[test]
fn an_upstreams_server_and_timing_are_replaced_where_they_stand_and_its_date_kept() {
    let gw = gateway_to(
        fixed_upstream(UPSTREAM_FIELDS),
        ConnectionManagerConfig::default(),
    );
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let n = names(&resp);
    assert_eq!(
        n[..4],
        ["server", "x-envoy-upstream-service-time", "date", "x-up"],
        "{n:?}"
    );
    assert_eq!(resp.header("server"), Some("envoy"));
    assert_ne!(resp.header("x-envoy-upstream-service-time"), Some("999"));
    assert_eq!(resp.header("date"), Some("Mon, 01 Jan 2001 00:00:00 GMT"));
    assert_eq!(n.iter().filter(|k| **k == "server").count(), 1);
}

#[test]
fn server_name_with_append_if_absent_and_pass_through() {
    let append = ConnectionManagerConfig {
        server_name: "krowoc".into(),
        server_header_transformation: ServerHeaderTransformation::AppendIfAbsent,
        ..ConnectionManagerConfig::default()
    };
    let gw = gateway_to(fixed_upstream(UPSTREAM_FIELDS), append.clone());
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(resp.header("server"), Some("up/1.0"), "the upstream's kept");
    let gw = gateway_to(fixed_upstream("x-up: 1\r\n"), append);
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(names(&resp).last(), Some(&"server"));
    assert_eq!(
        resp.header("server"),
        Some("krowoc"),
        "appended when absent"
    );

    let pass = ConnectionManagerConfig {
        server_header_transformation: ServerHeaderTransformation::PassThrough,
        ..ConnectionManagerConfig::default()
    };
    let gw = gateway_to(fixed_upstream(UPSTREAM_FIELDS), pass.clone());
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(resp.header("server"), Some("up/1.0"));
    let gw = gateway_to(fixed_upstream("x-up: 1\r\n"), pass);
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(resp.header("server"), None, "{:?}", names(&resp));
}

#[test]
fn suppress_envoy_headers_drops_the_routers_timing_and_timeout_announcement() {
    let suppress = ConnectionManagerConfig {
        suppress_envoy_headers: true,
        ..ConnectionManagerConfig::default()
    };
    let gw = start(
        "headers",
        &GatewayOptions {
            connection_manager: suppress.clone(),
            ..GatewayOptions::default()
        },
    );
    let resp = gw.get("/s", &[]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-envoy-upstream-service-time"), None);
    assert_eq!(
        resp.header("server"),
        Some("envoy"),
        "server is not the router's"
    );
    let seen = gw.upstream.last("/s");
    assert_eq!(seen.header("x-envoy-expected-rq-timeout-ms"), None);

    let gw = gateway_to(fixed_upstream(UPSTREAM_FIELDS), suppress);
    let (resp, _) = request(gw.addr, "GET", "/r", &[], b"");
    assert_eq!(
        resp.header("x-envoy-upstream-service-time"),
        Some("999"),
        "an upstream's passes untouched"
    );
}

#[test]
fn local_replies_are_framed_as_envoys_send_local_reply() {
    let gw = start("headers", &GatewayOptions::default());
    // The plugin's reply with a body: no router timing, date and server last.
    let resp = gw.get("/echo", &[]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-envoy-upstream-service-time"), None);
    let n = names(&resp);
    assert_eq!(n[n.len() - 2..], ["date", "server"], "{n:?}");
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str())
    );

    // The router's 503 for a refused connection: content-length, content-type, then the
    // filter's fields, date, server; Envoy 1.40's reset reason.
    let gw = gateway_to(
        abi_support::closed_addr(),
        ConnectionManagerConfig::default(),
    );
    let (resp, _) = request(gw.addr, "GET", "/down", &[], b"");
    assert_eq!(resp.status, 503);
    assert_eq!(
        resp.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
    );
    let n = names(&resp);
    assert_eq!(n[..2], ["content-length", "content-type"], "{n:?}");
    assert_eq!(n[n.len() - 2..], ["date", "server"], "{n:?}");
    assert_eq!(resp.header("x-envoy-upstream-service-time"), None);
}

#[test]
fn an_empty_local_reply_has_no_content_type_and_its_length_comes_last() {
    // A route table without a match: the router's 404, empty. Envoy's codec writes
    // content-length: 0 after server.
    let opts = GatewayOptions::default();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let shared = Arc::new(SharedState::default());
    shared.set_data("abi/vm_counter", b"0".to_vec(), 0);
    let mut s = spec(guest(), "headers", &opts, abi_support::closed_addr());
    s.routes.clear();
    let gateway = Gateway::start(s, listener, shared).expect("gateway starts");
    let gw = FixedGateway {
        addr: gateway.local_addr,
        gateway: Some(gateway),
    };
    let (resp, _) = request(gw.addr, "GET", "/nowhere", &[], b"");
    assert_eq!(resp.status, 404);
    let n = names(&resp);
    assert_eq!(
        n[n.len() - 3..],
        ["date", "server", "content-length"],
        "{n:?}"
    );
    assert_eq!(resp.header("content-length"), Some("0"));
    assert_eq!(resp.header("content-type"), None);
    assert!(n.contains(&"x-resp-added"), "through the filter: {n:?}");
}

#[test]
fn a_request_the_codec_refuses_is_answered_without_the_filters_and_close_comes_last() {
    let gw = start("headers", &GatewayOptions::default());
    let mut s = std::net::TcpStream::connect(gw.addr).expect("connect");
    s.write_all(b"get /x HTTP/1.1\r\nhost: a\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let head = out.split("\r\n\r\n").next().unwrap_or_default();
    let fields: Vec<&str> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(
        fields,
        [
            "content-length",
            "content-type",
            "date",
            "server",
            "connection"
        ],
        "{head}"
    );
}

#[test]
fn the_upstream_request_starts_with_host() {
    let gw = start("headers", &GatewayOptions::default());
    let resp = gw.get("/h", &[("x-first", "1")]);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = gw.upstream.last("/h");
    assert_eq!(
        seen.headers.first().map(|(k, _)| k.as_str()),
        Some("host"),
        "{:?}",
        seen.headers
    );
}
