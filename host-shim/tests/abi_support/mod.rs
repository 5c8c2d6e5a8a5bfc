//! Shared by the `abi_*` tests: the abi-test-guest module (compiled once per test process), an
//! echo upstream on loopback that reports what it received, a gateway started in-process with
//! one scenario, a small HTTP/1.1 client that also reports its own address, and polling.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use host_shim::conn_manager::ConnectionManagerConfig;
use host_shim::envoy_config::{PathMatch, RouteEntry, SocketAddress};
use host_shim::gateway::{FilterSpec, Gateway, GatewaySpec};
use host_shim::shared::SharedState;
use host_shim::vm::{FailurePolicy, PluginModule, VmError, VmSettings};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub use testkit::http::Response;

// ---- the guest ------------------------------------------------------------------------------

/// Where `cargo xtask build-plugin` (or `cargo xtask test`, via `KROWOC_WASM_DIR`) puts the
/// guest modules.
pub fn wasm_dir() -> PathBuf {
    match std::env::var_os("KROWOC_WASM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target/wasm32-wasip1/wasm"),
    }
}

pub fn guest_path() -> PathBuf {
    let path = wasm_dir().join("abi_test_guest.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-plugin` (or `cargo build -p abi-test-guest \
         --target wasm32-wasip1 --profile wasm`) first",
        path.display()
    );
    path
}

/// The abi-test-guest module, compiled once per test process.
pub fn guest() -> Arc<PluginModule> {
    static MODULE: OnceLock<Arc<PluginModule>> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let path = guest_path();
            PluginModule::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .clone()
}

/// A WAT module from `host-shim/tests/wat/`, as text (wasmtime compiles the text format).
pub fn wat_source(name: &str) -> (PathBuf, Vec<u8>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/wat")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, bytes)
}

// ---- the echo upstream ----------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Lower-case names, in the order hyper yields them.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP/1.1 server on loopback that answers every request with JSON describing it (method,
/// path, headers, body) and keeps a copy. `x-upstream-delay-ms` delays the answer,
/// `x-upstream-status` picks its status. Every answer carries `x-upstream-tag: original` and
/// `x-upstream-secret: s3cret`.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EchoUpstream {
    pub fn start() -> EchoUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the echo upstream");
        let addr = listener.local_addr().expect("echo upstream address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking echo listener");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let record = seen.clone();
        std::thread::Builder::new()
            .name("echo-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("echo upstream runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("echo listener");
                    loop {
                        let (stream, _) = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                            _ = &mut stop_rx => return,
                        };
                        let record = record.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let record = record.clone();
                                async move { Ok::<_, Infallible>(echo(req, record).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            })
            .expect("echo upstream thread");
        EchoUpstream {
            addr,
            seen,
            stop: Some(stop_tx),
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last request received with this path (query included).
    pub fn last(&self, path: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("the upstream received no request for {path}"))
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn echo(
    req: hyper::Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let delay = seen
        .header("x-upstream-delay-ms")
        .and_then(|d| d.parse::<u64>().ok());
    let status = seen
        .header("x-upstream-status")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    record
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(seen.clone());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let json = serde_json::to_vec(&seen).unwrap_or_default();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream-tag", "original")
        .header("x-upstream-secret", "s3cret")
        .body(Full::new(Bytes::from(json)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

/// Parses the echo upstream's JSON body.
pub fn echoed(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not the upstream's echo ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    })
}

// ---- the gateway ----------------------------------------------------------------------------

/// How a test gateway is set up; `Default` is two workers, `FAIL_RELOAD` (one trap does not leave
/// a test's gateway failed for good, as Envoy's default `FAIL_CLOSED` would), generous limits.
#[derive(Clone)]
pub struct GatewayOptions {
    pub workers: usize,
    pub failure_policy: FailurePolicy,
    pub callback_deadline: Duration,
    pub memory_limit_bytes: usize,
    pub vm_configuration: String,
    pub vm_id: String,
    pub env: Vec<(String, String)>,
    /// Clusters besides `upstream` (the echo server) and `dead` (a closed port).
    pub clusters: Vec<(String, SocketAddr)>,
    /// The route's `timeout` as the yaml would write it: `None` is Envoy's 15 s default.
    pub route_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub connection_manager: ConnectionManagerConfig,
    pub max_downstream_connections: Option<usize>,
    /// `reload_config.backoff.base_interval` (Envoy's 1 s by default).
    pub reload_base_interval: Duration,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            workers: 2,
            failure_policy: FailurePolicy::FailReload,
            callback_deadline: Duration::from_secs(5),
            memory_limit_bytes: 64 << 20,
            vm_configuration: String::new(),
            vm_id: "abi_vm".into(),
            env: Vec::new(),
            clusters: Vec::new(),
            route_timeout: Some(Duration::from_secs(10)),
            stream_idle_timeout: Some(Duration::from_secs(300)),
            connection_manager: ConnectionManagerConfig::default(),
            max_downstream_connections: None,
            reload_base_interval: host_shim::envoy_config::DEFAULT_RELOAD_BASE_INTERVAL,
        }
    }
}

/// A gateway running the guest in front of an echo upstream; stopped on drop.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub shared: Arc<SharedState>,
    pub upstream: EchoUpstream,
    gateway: Option<Gateway>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop();
        }
    }
}

/// A loopback address nothing listens on.
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], testkit::free_port()))
}

/// The spec of a gateway: one catch-all route to `upstream`, the guest with `config`.
pub fn spec(
    module: Arc<PluginModule>,
    config: &str,
    opts: &GatewayOptions,
    upstream: SocketAddr,
) -> GatewaySpec {
    let mut clusters = HashMap::new();
    let mut add = |name: &str, addr: SocketAddr| {
        clusters.insert(
            name.to_string(),
            SocketAddress {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
        );
    };
    add("upstream", upstream);
    add("dead", closed_addr());
    for (name, addr) in &opts.clusters {
        add(name, *addr);
    }
    GatewaySpec {
        workers: opts.workers,
        routes: vec![RouteEntry {
            name: "abi_route".into(),
            matcher: PathMatch::Prefix("/".into()),
            cluster: "upstream".into(),
            timeout: opts.route_timeout,
        }],
        clusters,
        redis_tls: HashMap::new(),
        redis_clusters: HashMap::new(),
        filter: Some(FilterSpec {
            module,
            settings: VmSettings {
                plugin_name: "abi_plugin".into(),
                root_id: "abi_root".into(),
                vm_id: opts.vm_id.clone(),
                vm_configuration: opts.vm_configuration.clone().into_bytes(),
                plugin_configuration: config.as_bytes().to_vec(),
                callback_deadline: opts.callback_deadline,
                memory_limit_bytes: opts.memory_limit_bytes,
                env: opts.env.clone(),
                log_level: 0,
                log_file: None,
            },
            failure_policy: opts.failure_policy,
            reload_base_interval: opts.reload_base_interval,
        }),
        max_request_headers_bytes: 60 * 1024,
        connection_manager: opts.connection_manager.clone(),
        max_downstream_connections: opts.max_downstream_connections,
        stream_idle_timeout: opts.stream_idle_timeout,
    }
}

/// Starts `module` with `config`; the error is the gateway's.
pub fn try_start_module(
    module: Arc<PluginModule>,
    config: &str,
    opts: &GatewayOptions,
) -> Result<TestGateway, VmError> {
    let upstream = EchoUpstream::start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the gateway listener");
    let shared = Arc::new(SharedState::default());
    // The guest's VM counter exists before the VMs start: creating a missing key takes no CAS
    // (cas 0 writes unconditionally, in Envoy as here), so VMs racing to create it could both
    // write "1"; incrementing an existing one is CAS-protected.
    shared.set_data("abi/vm_counter", b"0".to_vec(), 0);
    let gateway = Gateway::start(
        spec(module, config, opts, upstream.addr),
        listener,
        shared.clone(),
    )?;
    Ok(TestGateway {
        addr: gateway.local_addr,
        shared,
        upstream,
        gateway: Some(gateway),
    })
}

/// Starts the guest with `config` (a scenario word or JSON).
pub fn start(config: &str, opts: &GatewayOptions) -> TestGateway {
    try_start_module(guest(), config, opts)
        .unwrap_or_else(|e| panic!("gateway with {config:?} did not start: {e}"))
}

impl TestGateway {
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        request(self.addr, "GET", path, headers, b"").0
    }

    /// A shared-data value as text.
    pub fn shared_text(&self, key: &str) -> Option<String> {
        self.shared
            .get_data(key)
            .map(|(v, _)| String::from_utf8_lossy(&v).into_owned())
    }

    /// The gateway's readiness check, for an admin listener.
    pub fn readiness(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        match &self.gateway {
            Some(g) => g.readiness(),
            None => Arc::new(|| false),
        }
    }

    pub fn metrics_text(&self) -> String {
        self.shared.prometheus_text(&[])
    }

    /// A host counter from the Prometheus text (`host_shim_<name> N`).
    pub fn host_counter(&self, name: &str) -> u64 {
        let prefix = format!("host_shim_{name} ");
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no host counter {name} in:\n{}", self.metrics_text()))
    }
}

// ---- the client -----------------------------------------------------------------------------

/// Sends one request (`connection: close`) and returns the response and the client's own
/// address (what the gateway sees as the peer).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (Response, SocketAddr) {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("connection: close\r\n\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &[&raw], Duration::ZERO)
}

/// Sends a POST with a chunked body, one write per chunk with `gap` between them.
pub fn post_chunked(
    addr: SocketAddr,
    path: &str,
    chunks: &[&[u8]],
    gap: Duration,
) -> (Response, SocketAddr) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    let mut parts: Vec<Vec<u8>> = vec![head];
    for c in chunks {
        let mut p = format!("{:x}\r\n", c.len()).into_bytes();
        p.extend_from_slice(c);
        p.extend_from_slice(b"\r\n");
        parts.push(p);
    }
    parts.push(b"0\r\n\r\n".to_vec());
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    exchange(addr, &refs, gap)
}

fn exchange(addr: SocketAddr, writes: &[&[u8]], gap: Duration) -> (Response, SocketAddr) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to the gateway {addr}: {e}"));
    let local = stream.local_addr().expect("client address");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    for (i, w) in writes.iter().enumerate() {
        if i > 0 && !gap.is_zero() {
            std::thread::sleep(gap);
        }
        stream
            .write_all(w)
            .unwrap_or_else(|e| panic!("write to the gateway: {e}"));
    }
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        // A reset after a complete response still leaves a parseable answer.
        if raw.is_empty() {
            panic!("read from the gateway: {e}");
        }
    }
    let resp = testkit::http::parse_response(&raw, false)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(&raw)));
    (resp, local)
}

// ---- waiting --------------------------------------------------------------------------------

/// Polls `f` every 10 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A header that must be present.
pub fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.header(name).unwrap_or_else(|| {
        panic!(
            "response {} has no {name} header; headers {:?}, body {:?}",
            resp.status,
            resp.headers,
            resp.text()
        )
    })
}
