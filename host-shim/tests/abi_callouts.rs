//! Callouts, driven by abi-test-guest: `proxy_http_call` to named clusters (answered from the
//! callback or resumed, Envoy's BadArgument rules, connect failure as 503 and timeout as 504),
//! and the Higress Redis calls against a real redis-server.

mod abi_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use abi_support::{closed_addr, echoed, header, request, start, GatewayOptions, TestGateway};

// ---- HTTP calls -----------------------------------------------------------------------------

#[test]
fn http_call_response_status_headers_and_body_reach_the_callback() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/answer", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-call-status"), "200");
    assert_eq!(header(&resp, "x-call-token-ok"), "true");
    assert_eq!(header(&resp, "x-call-content-type"), "application/json");
    let n: usize = header(&resp, "x-call-headers").parse().unwrap_or(0);
    assert!(
        n >= 4,
        "the call's headers (:status, content-type, x-upstream-*) were counted: {n}"
    );
    let call = echoed(&resp.body);
    assert_eq!(call["path"], "/callout");
    assert_eq!(call["method"], "GET");
    let seen = gw.upstream.last("/callout");
    assert_eq!(seen.header("x-callout-from"), Some("abi-test-guest"));
    assert_eq!(
        seen.header("host"),
        Some("upstream"),
        ":authority becomes the Host header"
    );
    assert_eq!(
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.path == "/answer")
            .count(),
        0,
        "answered locally"
    );
    assert!(gw.host_counter("http_callouts_total") >= 1);
}

#[test]
fn http_call_with_a_body_sends_it_with_its_content_length() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/post", &[("x-call-body", "hello")], b"");
    assert_eq!(header(&resp, "x-call-status"), "200");
    let seen = gw.upstream.last("/callout");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, "hello");
    assert_eq!(seen.header("content-length"), Some("5"));
}

#[test]
fn request_resumed_from_the_call_callback_reaches_the_upstream_with_added_headers() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/resumed",
        &[("x-call-mode", "resume")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        echoed(&resp.body)["path"],
        "/resumed",
        "the client gets the upstream's answer"
    );
    let seen = gw.upstream.last("/resumed");
    assert_eq!(seen.header("x-call-status"), Some("200"));
    assert_eq!(seen.header("x-call-token-ok"), Some("true"));
    let len: usize = seen
        .header("x-call-body-len")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(len > 0, "the callback read the call's body");
    let order: Vec<String> = gw.upstream.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        order,
        ["/callout", "/resumed"],
        "the request waited for the call"
    );
}

#[test]
fn http_call_to_an_unknown_cluster_is_a_bad_argument() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/x", &[("x-call-cluster", "nowhere")], b"");
    assert_eq!(resp.status, 500);
    assert_eq!(header(&resp, "x-dispatch-error"), "BadArgument");
}

#[test]
fn http_call_without_authority_is_a_bad_argument() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/x", &[("x-call-omit-authority", "1")], b"");
    assert_eq!(resp.status, 500);
    assert_eq!(header(&resp, "x-dispatch-error"), "BadArgument");
    assert!(gw.upstream.seen().is_empty(), "nothing was sent");
}

#[test]
fn http_call_connect_failure_arrives_as_a_503_response() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/x", &[("x-call-cluster", "dead")], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-call-status"), "503");
    assert!(
        resp.text().contains("upstream connect error"),
        "body: {:?}",
        resp.text()
    );
}

/// A server that answers every connection with a status line, a content-length of 100 and
/// three bytes of body, then closes: a reset after the headers.
fn reset_after_headers_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the resetting server");
    let addr = listener.local_addr().expect("resetting server address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc");
        }
    });
    addr
}

#[test]
fn http_call_reset_after_headers_arrives_with_no_headers_and_broken_connection() {
    let opts = GatewayOptions {
        clusters: vec![("resetting".into(), reset_after_headers_server())],
        ..GatewayOptions::default()
    };
    let gw = start("http_call", &opts);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/x",
        &[("x-call-cluster", "resetting")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        header(&resp, "x-call-headers"),
        "0",
        "a reset carries no headers"
    );
    assert_eq!(header(&resp, "x-call-status"), "<none>");
    assert_eq!(
        header(&resp, "x-call-get-status"),
        "11",
        "proxy_get_status: BrokenConnection"
    );
    assert!(resp.body.is_empty(), "no body: {:?}", resp.text());
}

#[test]
fn http_call_success_reports_ok_from_proxy_get_status() {
    let gw = start("http_call", &GatewayOptions::default());
    let (resp, _) = request(gw.addr, "GET", "/x", &[], b"");
    assert_eq!(header(&resp, "x-call-get-status"), "0");
}

#[test]
fn http_call_timeout_arrives_as_a_504_response() {
    let gw = start("http_call", &GatewayOptions::default());
    let started = Instant::now();
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/x",
        &[
            ("x-call-timeout-ms", "150"),
            ("x-call-upstream-delay-ms", "3000"),
        ],
        b"",
    );
    let took = started.elapsed();
    assert_eq!(header(&resp, "x-call-status"), "504");
    assert!(
        resp.text().contains("upstream request timeout"),
        "body: {:?}",
        resp.text()
    );
    assert!(
        took < Duration::from_millis(2500),
        "the call's own timeout applied, took {took:?}"
    );
}

// ---- Higress Redis calls --------------------------------------------------------------------

fn redis_gateway(redis: &testkit::RedisServer) -> TestGateway {
    let opts = GatewayOptions {
        clusters: vec![
            ("redis".into(), redis.addr()),
            ("redis_dead".into(), closed_addr()),
            ("outbound|6379||redis.static".into(), redis.addr()),
        ],
        ..GatewayOptions::default()
    };
    start("redis", &opts)
}

#[test]
fn redis_ping_returns_the_raw_reply_in_buffer_9() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(gw.addr, "GET", "/ping", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"+PONG\r\n");
    assert_eq!(header(&resp, "x-redis-status"), "0");
    assert_eq!(header(&resp, "x-redis-size"), "7");
    assert_eq!(header(&resp, "x-redis-read-status"), "0");
    assert_eq!(
        header(&resp, "x-redis-token-tag"),
        "3",
        "Redis tokens carry 3 in their low bits"
    );
}

#[test]
fn redis_eval_runs_the_script_and_returns_its_raw_array_reply() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let headers = [("x-redis-key", "abi:eval:1"), ("x-redis-arg", "hi")];
    let (first, _) = request(gw.addr, "GET", "/eval", &headers, b"");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        first.text(),
        "*3\r\n$10\r\nabi:eval:1\r\n$2\r\nhi\r\n:1\r\n"
    );
    let (second, _) = request(gw.addr, "GET", "/eval", &headers, b"");
    assert_eq!(
        second.text(),
        "*3\r\n$10\r\nabi:eval:1\r\n$2\r\nhi\r\n:2\r\n"
    );
    assert_eq!(redis.cli(&["GET", "abi:eval:1"]).trim(), "2");
}

/// Runs `SELECT db` then one command on a fresh connection; the second reply, raw.
fn redis_in_db(addr: SocketAddr, db: u32, args: &[&str]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to redis: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut out = testkit::encode_command(&["SELECT", &db.to_string()]);
    out.extend(testkit::encode_command(args));
    s.write_all(&out).expect("write to redis");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !(got.starts_with(b"+OK\r\n") && got.len() > 5 && got.ends_with(b"\r\n")) {
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "redis closed the connection after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    got.split_off(5)
}

#[test]
fn redis_cluster_name_with_db_suffix_selects_that_database() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/set",
        &[
            ("x-redis-cluster", "redis?db=3"),
            ("x-redis-key", "abi:db"),
            ("x-redis-arg", "v3"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"+OK\r\n");
    assert_eq!(
        redis_in_db(redis.addr(), 3, &["GET", "abi:db"]),
        b"$2\r\nv3\r\n"
    );
    assert_eq!(
        redis.int(&["EXISTS", "abi:db"]),
        0,
        "database 0 is untouched"
    );
}

#[test]
fn redis_call_to_an_unreachable_redis_reports_a_failure_status() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let started = Instant::now();
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[("x-redis-cluster", "redis_dead")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_ne!(header(&resp, "x-redis-status"), "0");
    assert!(resp.body.is_empty(), "no reply bytes: {:?}", resp.text());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(gw.host_counter("redis_callout_failures_total") >= 1);
}

/// Higress's `RedisStatus::NetworkError`: the one status its Envoy gives a failed Redis call.
const HIGRESS_NETWORK_ERROR: &str = "1";

#[test]
fn a_redis_call_to_a_redis_that_is_down_gets_higress_network_error() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[("x-redis-cluster", "redis_dead")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-redis-status"), HIGRESS_NETWORK_ERROR);
    assert_eq!(header(&resp, "x-redis-size"), "0");
    assert_eq!(gw.host_counter("redis_callout_unreachable_total"), 1);
    assert_eq!(gw.host_counter("redis_callout_timeouts_total"), 0);
}

#[test]
fn a_redis_call_without_a_reply_in_time_gets_higress_network_error() {
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let opts = GatewayOptions {
        clusters: vec![("redis_silent".into(), silent.local_addr().expect("addr"))],
        ..GatewayOptions::default()
    };
    let gw = start("redis", &opts);
    let started = Instant::now();
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[
            ("x-redis-cluster", "redis_silent"),
            ("x-redis-timeout-ms", "200"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-redis-status"), HIGRESS_NETWORK_ERROR);
    assert_eq!(header(&resp, "x-redis-size"), "0");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(gw.host_counter("redis_callout_timeouts_total"), 1);
}

#[test]
fn a_malformed_redis_query_gets_higress_network_error_and_is_not_sent() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(gw.addr, "GET", "/malformed", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-redis-status"), HIGRESS_NETWORK_ERROR);
    assert_eq!(header(&resp, "x-redis-size"), "0");
    assert_eq!(gw.host_counter("redis_callout_refusals_total"), 1);
    assert_eq!(
        redis.cli(&["CLIENT", "LIST"]).lines().count(),
        1,
        "only redis-cli's own connection: the pool never connected"
    );
}

#[test]
fn redis_init_for_an_unknown_cluster_is_a_bad_argument() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[("x-redis-cluster", "nowhere")],
        b"",
    );
    assert_eq!(resp.status, 500);
    assert_eq!(header(&resp, "x-redis-init-status"), "2");
}

/// Higress is the reference (stock Envoy has no Redis calls): its Go SDK initialises a cluster
/// with batching options after `?` and then calls it by the name before `?`.
#[test]
fn redis_call_by_the_name_before_the_options_reaches_the_cluster_initialised_with_them() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[
            (
                "x-redis-cluster",
                "outbound|6379||redis.static?buffer_flush_timeout=3&max_buffer_size_before_flush=1024",
            ),
            ("x-redis-call-cluster", "outbound|6379||redis.static"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"+PONG\r\n");
    assert_eq!(header(&resp, "x-redis-status"), "0");
}

#[test]
fn redis_db_given_to_init_applies_to_calls_by_the_plain_name() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/set",
        &[
            ("x-redis-cluster", "redis?db=5&buffer_flush_timeout=3"),
            ("x-redis-call-cluster", "redis"),
            ("x-redis-key", "abi:db5"),
            ("x-redis-arg", "v5"),
        ],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        redis_in_db(redis.addr(), 5, &["GET", "abi:db5"]),
        b"$2\r\nv5\r\n"
    );
}

#[test]
fn redis_init_with_a_malformed_option_is_a_bad_argument() {
    let redis = testkit::RedisServer::start();
    let gw = redis_gateway(&redis);
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/ping",
        &[("x-redis-cluster", "redis?db=two")],
        b"",
    );
    assert_eq!(resp.status, 500);
    assert_eq!(header(&resp, "x-redis-init-status"), "2");
}
