//! The gateway with the real plugin.wasm in front of a real HTTP upstream on loopback: bodies
//! stream through unchanged, Envoy's local replies for bad input and dead upstreams, and the
//! binary's refusal to start on a bad plugin configuration or a bad yaml.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use host_shim::envoy_config::{PathMatch, RouteEntry, SocketAddress};
use host_shim::gateway::{FilterSpec, Gateway, GatewaySpec};
use host_shim::shared::SharedState;
use host_shim::vm::{PluginModule, VmSettings};
use http_body_util::BodyExt;

fn plugin_wasm() -> PathBuf {
    let path = std::env::var_os("KROWOC_PLUGIN_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = std::env::var_os("KROWOC_WASM_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/wasm")
                });
            dir.join("krowoc_plugin.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-plugin`",
        path.display()
    );
    path
}

/// An upstream that answers `/echo` with the request body (and `x-seen-*` headers describing
/// the request), `/big?n=N` with N bytes streamed in chunks, and anything else with `ok`.
fn start_echo_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            let chunked = req.headers().get("transfer-encoding").is_some();
                            let body = req.into_body().collect().await?.to_bytes();
                            let resp: http::Response<host_shim::body::Body> = if path == "/echo" {
                                http::Response::builder()
                                    .header("x-seen-length", body.len().to_string())
                                    .header("x-seen-chunked", chunked.to_string())
                                    .body(host_shim::body::full(body))
                                    .expect("response")
                            } else if path == "/big" {
                                let n: usize = query
                                    .strip_prefix("n=")
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                let (tx, b) = host_shim::body::channel();
                                tokio::spawn(async move {
                                    let mut sent = 0;
                                    while sent < n {
                                        let len = (n - sent).min(64 * 1024);
                                        let chunk: Vec<u8> =
                                            (sent..sent + len).map(|i| (i % 251) as u8).collect();
                                        sent += len;
                                        if tx
                                            .send(Ok(http_body::Frame::data(Bytes::from(chunk))))
                                            .await
                                            .is_err()
                                        {
                                            return;
                                        }
                                    }
                                });
                                http::Response::new(b)
                            } else {
                                http::Response::new(host_shim::body::full("ok"))
                            };
                            Ok::<_, hyper::Error>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

// The version header shows the plugin ran on each response.
const PLUGIN_CONFIG: &str =
    r#"{"redis":{"transport":"relay","cluster":"upstream"},"routes":[],"version_header":true}"#;

fn start_gateway(upstream: SocketAddr) -> Gateway {
    let module = PluginModule::load(&plugin_wasm()).unwrap_or_else(|e| panic!("{e}"));
    let mut clusters = HashMap::new();
    clusters.insert(
        "upstream".to_string(),
        SocketAddress {
            host: "127.0.0.1".into(),
            port: upstream.port(),
        },
    );
    clusters.insert(
        "dead".to_string(),
        SocketAddress {
            host: "127.0.0.1".into(),
            port: testkit::free_port(),
        },
    );
    let spec = GatewaySpec {
        workers: 2,
        routes: vec![
            RouteEntry {
                name: "dead".into(),
                matcher: PathMatch::Prefix("/dead".into()),
                cluster: "dead".into(),
                timeout: Some(Duration::from_secs(5)),
            },
            RouteEntry {
                name: "exact".into(),
                matcher: PathMatch::Path("/only".into()),
                cluster: "upstream".into(),
                timeout: Some(Duration::from_secs(5)),
            },
            RouteEntry {
                name: "api".into(),
                matcher: PathMatch::Prefix("/echo".into()),
                cluster: "upstream".into(),
                timeout: Some(Duration::from_secs(5)),
            },
            RouteEntry {
                name: "big".into(),
                matcher: PathMatch::Prefix("/big".into()),
                cluster: "upstream".into(),
                timeout: Some(Duration::from_secs(5)),
            },
        ],
        clusters,
        redis_tls: HashMap::new(),
        redis_clusters: HashMap::new(),
        filter: Some(FilterSpec {
            module,
            settings: VmSettings {
                plugin_name: "krowoc_edge".into(),
                root_id: "krowoc_edge".into(),
                vm_id: "krowoc_edge".into(),
                vm_configuration: Vec::new(),
                plugin_configuration: PLUGIN_CONFIG.as_bytes().to_vec(),
                callback_deadline: Duration::from_secs(1),
                memory_limit_bytes: 128 << 20,
                env: Vec::new(),
                log_level: 2,
                log_file: None,
            },
            failure_policy: host_shim::vm::FailurePolicy::FailClosed,
            reload_base_interval: host_shim::envoy_config::DEFAULT_RELOAD_BASE_INTERVAL,
        }),
        max_request_headers_bytes: 60 * 1024,
        connection_manager: Default::default(),
        max_downstream_connections: None,
        stream_idle_timeout: Some(std::time::Duration::from_secs(300)),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    Gateway::start(spec, listener, Arc::new(SharedState::default()))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn responses_pass_through_with_the_plugin_header_and_keep_alive() {
    let gw = start_gateway(start_echo_upstream());
    let mut s = TcpStream::connect(gw.local_addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // Two requests on one connection: keep-alive works and both go through the plugin.
    for i in 0..2 {
        let body = format!("hello {i}");
        write!(
            s,
            "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.ends_with(body.as_bytes()) {
            let n = s.read(&mut chunk).expect("read");
            assert!(
                n > 0,
                "connection closed early: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
        let resp = testkit::http::parse_response(&buf, false).expect("response");
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("x-krowoc-edge"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(resp.text(), body);
    }
    gw.stop();
}

#[test]
fn large_chunked_bodies_stream_through_unchanged_both_ways() {
    let gw = start_echo_upstream();
    let gw = start_gateway(gw);
    // 8 MiB request body, chunked, of a non-repeating-ish pattern.
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut req = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for chunk in payload.chunks(100_000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let raw = raw_exchange(gw.local_addr, &req);
    let resp = testkit::http::parse_response(&raw, false).expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-seen-chunked"), Some("true"));
    assert_eq!(
        resp.header("x-seen-length"),
        Some(payload.len().to_string().as_str())
    );
    assert!(
        resp.body == payload,
        "the echoed body differs from what was sent"
    );

    // 16 MiB streamed response.
    let n = 16 * 1024 * 1024;
    let resp = testkit::http::get(gw.local_addr, &format!("/big?n={n}"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), n);
    assert!(resp
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));
    gw.stop();
}

#[test]
fn envoy_local_replies_for_no_route_and_dead_upstream() {
    let gw = start_gateway(start_echo_upstream());
    let resp = testkit::http::get(gw.local_addr, "/nowhere");
    assert_eq!(resp.status, 404);
    // Exact match: /only matches, /only/more does not.
    assert_eq!(testkit::http::get(gw.local_addr, "/only/more").status, 404);

    let resp = testkit::http::get(gw.local_addr, "/dead/x");
    assert_eq!(resp.status, 503);
    assert!(
        resp.text().contains("upstream connect error"),
        "503 body should say why: {:?}",
        resp.text()
    );
    // Local replies go through the filter's response phase too, as in Envoy.
    assert!(resp.header("x-krowoc-edge").is_some());
    gw.stop();
}

#[test]
fn malformed_http_gets_400_and_oversized_headers_431() {
    let gw = start_gateway(start_echo_upstream());
    let raw = raw_exchange(gw.local_addr, b"GARBAGE\r\n\r\n");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "got {text:?}");

    let big = "a".repeat(100 * 1024);
    let req = format!("GET /echo HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let raw = raw_exchange(gw.local_addr, req.as_bytes());
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 431"), "got {text:?}");

    // The gateway still serves afterwards.
    assert_eq!(testkit::http::get(gw.local_addr, "/echo").status, 200);
    gw.stop();
}

fn write_yaml(dir: &std::path::Path, plugin_config: &str, extra_listener_field: &str) -> PathBuf {
    let yaml = format!(
        r#"static_resources:
  listeners:
  - name: main
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    {extra_listener_field}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: krowoc_edge
                root_id: krowoc_edge
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{plugin_config}'
                vm_config:
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: plugin.wasm
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: 1 }}
"#
    );
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).expect("write yaml");
    path
}

#[test]
fn binary_exits_nonzero_showing_the_plugins_refusal() {
    let dir = tempfile::tempdir().expect("dir");
    let yaml = write_yaml(
        dir.path(),
        r#"{"redis":{"transport":"relay","cluster":"upstream"},"routes":[],"no_such_option":1}"#,
        "",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_host-shim"))
        .args(["run", "--config"])
        .arg(&yaml)
        .arg("--plugin")
        .arg(plugin_wasm())
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .output()
        .expect("run host-shim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "host-shim should refuse: {stderr}");
    assert!(
        stderr.contains("refused its configuration") && stderr.contains("no_such_option"),
        "stderr should show the refusal and the plugin's line naming the field: {stderr}"
    );
}

#[test]
fn binary_exits_nonzero_naming_an_unsupported_yaml_field() {
    let dir = tempfile::tempdir().expect("dir");
    let yaml = write_yaml(dir.path(), PLUGIN_CONFIG, "listener_frobnication: true");
    let out = Command::new(env!("CARGO_BIN_EXE_host-shim"))
        .args(["run", "--config"])
        .arg(&yaml)
        .arg("--plugin")
        .arg(plugin_wasm())
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .output()
        .expect("run host-shim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "host-shim should refuse: {stderr}");
    assert!(
        stderr.contains("static_resources.listeners[0].listener_frobnication"),
        "the error should name the field's path: {stderr}"
    );
}
