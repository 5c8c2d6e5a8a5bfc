//! Requests Envoy 1.40's HTTP/1 codec refuses or answers itself, over real sockets, each as
//! Envoy answered it: HTTP/1.0 → 426, a lower-case method, a missing Host or a malformed
//! chunked body → 400, an oversized header block → 431, all with `connection: close`;
//! `expect: 100-continue` is answered by the gateway and not passed on; a local reply to HEAD
//! keeps its headers.

mod abi_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use abi_support::{start, GatewayOptions};

/// Sends `raw` and reads until the server closes; the head and the body as text.
fn exchange(addr: SocketAddr, raw: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn http_1_0_gets_426_upgrade_required_and_close() {
    let gw = start("headers", &GatewayOptions::default());
    let (head, body) = exchange(gw.addr, b"GET /x HTTP/1.0\r\nhost: a\r\n\r\n");
    assert!(
        head.starts_with("http/1.1 426 upgrade required"),
        "Envoy's status line says HTTP/1.1: {head}"
    );
    assert_eq!(body, "Upgrade Required");
    assert!(head.contains("connection: close"), "{head}");
    assert!(gw.upstream.seen().is_empty(), "never forwarded");
}

#[test]
fn a_lower_case_method_and_a_missing_host_get_400_and_close() {
    let gw = start("headers", &GatewayOptions::default());
    let (head, body) = exchange(gw.addr, b"get /x HTTP/1.1\r\nhost: a\r\n\r\n");
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert_eq!(body, "Bad Request");
    assert!(head.contains("connection: close"), "{head}");

    let (head, body) = exchange(gw.addr, b"GET /x HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert_eq!(body, "");
    assert!(head.contains("connection: close"), "{head}");
    assert!(gw.upstream.seen().is_empty(), "never forwarded");
}

#[test]
fn an_oversized_header_block_gets_431_and_close() {
    let gw = start("headers", &GatewayOptions::default());
    // 70 KiB in several headers: over Envoy's 60 KiB, each header within hyper's buffer.
    let mut raw = b"GET /x HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..7 {
        raw.extend_from_slice(format!("x-big-{i}: {}\r\n", "a".repeat(10 * 1024)).as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    let (head, body) = exchange(gw.addr, &raw);
    assert!(head.starts_with("http/1.1 431 "), "{head}");
    assert_eq!(body, "Request Header Fields Too Large");
    assert!(head.contains("connection: close"), "{head}");
}

#[test]
fn expect_100_continue_is_answered_and_not_forwarded() {
    let gw = start("headers", &GatewayOptions::default());
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(
        b"POST /e HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 3\r\nconnection: close\r\n\r\n",
    )
    .expect("write");
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).expect("the interim response");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"abc").expect("body");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    let seen = gw.upstream.last("/e");
    assert_eq!(seen.body, "abc");
    assert_eq!(seen.header("expect"), None);
}

#[test]
fn a_local_reply_to_head_keeps_its_content_type_and_length_without_the_body() {
    // Envoy 1.40 with the krowoc plugin's 405 to HEAD: content-type and content-length: 20
    // stay, no body follows.
    let gw = start("headers", &GatewayOptions::default());
    let (head, body) = exchange(
        gw.addr,
        b"HEAD /echo HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    assert!(length > 0, "{head}");
    assert_eq!(body, "");
}

#[test]
fn a_malformed_chunked_body_gets_400_and_close() {
    let gw = start("headers", &GatewayOptions::default());
    let (head, body) = exchange(
        gw.addr,
        b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    );
    assert!(head.starts_with("http/1.1 400 "), "{head}");
    assert_eq!(body, "Bad Request");
    assert!(head.contains("connection: close"), "{head}");
}
