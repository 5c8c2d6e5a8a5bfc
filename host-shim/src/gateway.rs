//! The gateway: worker threads that accept HTTP/1.1 connections, run each request through the
//! plugin's phases in Envoy's order, forward it to the routed cluster, and carry out the plugin's
//! callouts (HTTP calls, Higress Redis calls), ticks and queue notifications.
//!
//! One worker = one OS thread = one current-thread tokio runtime = one plugin VM, as in Envoy:
//! a request's contexts stay on the VM of the worker that accepted its connection. As in Envoy,
//! a "main" thread holds two more VMs, started before the workers': the base VM (started and
//! configured, then idle) and the main thread's own, which ticks and makes callouts but serves
//! no request.
//!
//! A request's life: route → `on_request_headers` (pause until resumed, or a local reply) →
//! request body chunks through `on_request_body` (buffered while the plugin pauses) → upstream →
//! `on_response_headers` → response body chunks through `on_response_body` → `on_done`,
//! `on_log`, `on_delete`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::field_order::{in_wire_order, FieldOrder, OrderedConnector, ResponseOrders};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, Mutex, Notify};

use crate::abi::{Action, HeaderList, Status};
use crate::body::{self, Body, BodySender};
use crate::conn_manager::{self, ConnectionManagerConfig};
use crate::downstream::{DownstreamIo, RequestInFlight};
use crate::envoy_config::{RouteEntry, SocketAddress};
use crate::redis_pool::{RedisEndpoint, RedisPool};
use crate::shared::{QueueReady, SharedState};
use crate::state::{Callout, HttpCallResponse, PauseOutcome, StreamInfo, StreamState};
use crate::vm::{FailurePolicy, PluginModule, Vm, VmError, VmSettings};

/// The wasm filter of the listener.
pub struct FilterSpec {
    pub module: Arc<PluginModule>,
    pub settings: VmSettings,
    /// What requests get once the VM has failed (Envoy's `failure_policy` / `fail_open`).
    pub failure_policy: FailurePolicy,
    /// `FAIL_RELOAD` loads a new VM at the first request at least this long (plus up to half
    /// again, at random, as Envoy's jittered lower bound) after the last load.
    pub reload_base_interval: Duration,
}

/// Everything a gateway needs, resolved from envoy.yaml and the command line.
pub struct GatewaySpec {
    pub workers: usize,
    /// In order: the first match wins. A route's `timeout` is as written (see
    /// [`RouteEntry::effective_timeout`]).
    pub routes: Vec<RouteEntry>,
    pub clusters: HashMap<String, SocketAddress>,
    pub filter: Option<FilterSpec>,
    /// Requests whose header block is larger than this get 431.
    pub max_request_headers_bytes: usize,
    /// How long a stream may stay paused by the plugin (Envoy's `stream_idle_timeout`); `None`:
    /// no limit.
    pub stream_idle_timeout: Option<Duration>,
    /// The HTTP connection manager's request handling (addresses, forwarding headers, timers,
    /// path normalisation); `Default` is Envoy's.
    pub connection_manager: ConnectionManagerConfig,
    /// The overload manager's `global_downstream_max_connections`: a connection accepted
    /// beyond it is closed at once, unanswered, as Envoy does.
    pub max_downstream_connections: Option<usize>,
}

impl GatewaySpec {
    /// First route whose matcher fits the path (query excluded), as Envoy's route table does.
    pub fn route_for(&self, path: &str) -> Option<&RouteEntry> {
        let path = path.split('?').next().unwrap_or(path);
        self.routes.iter().find(|r| r.matcher.matches(path))
    }
}

/// A running gateway: its listener address and a handle that stops it.
pub struct Gateway {
    pub local_addr: SocketAddr,
    pub shared: Arc<SharedState>,
    ready_workers: Arc<AtomicUsize>,
    workers: usize,
    shutdown: Vec<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Starts the workers on `listener`. Each worker creates its VM first; if any VM fails to
    /// start (or the plugin refuses its configuration) nothing is served and the error returns.
    pub fn start(
        spec: GatewaySpec,
        listener: std::net::TcpListener,
        shared: Arc<SharedState>,
    ) -> Result<Gateway, VmError> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| VmError::Start(format!("listener: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VmError::Start(format!("listener: {e}")))?;
        let spec = Arc::new(spec);
        let workers = spec.workers.max(1);
        // Envoy's threads: with a plugin, the main thread holds a VM too (after the base VM it
        // clones from); it ticks and takes callouts but serves no request. Its queue index
        // follows the workers'.
        let main_thread = spec.filter.is_some();
        let mut queue_senders = Vec::new();
        let mut queue_receivers = Vec::new();
        for _ in 0..workers + usize::from(main_thread) {
            let (tx, rx) = mpsc::unbounded_channel::<QueueReady>();
            queue_senders.push(tx);
            queue_receivers.push(rx);
        }
        shared.set_queue_notifier(move |worker, ready| {
            if let Some(tx) = queue_senders.get(worker) {
                let _ = tx.send(ready);
            }
        });
        let ready_workers = Arc::new(AtomicUsize::new(0));
        let downstream_connections = Arc::new(AtomicUsize::new(0));
        let local_ip = conn_manager::local_address();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), VmError>>();
        let mut shutdown = Vec::new();
        let mut threads = Vec::new();
        let stop_all = |shutdown: &[tokio::sync::watch::Sender<bool>]| {
            for s in shutdown {
                let _ = s.send(true);
            }
        };
        // The main thread's VMs start first, then the workers', in Envoy's order.
        let mut receivers = queue_receivers.into_iter().enumerate().collect::<Vec<_>>();
        if main_thread {
            receivers.rotate_right(1);
        }
        for (index, queue_rx) in receivers {
            let serves = index < workers;
            let listener = if serves {
                Some(
                    listener
                        .try_clone()
                        .map_err(|e| VmError::Start(format!("listener: {e}")))?,
                )
            } else {
                None
            };
            let spec = spec.clone();
            let shared = shared.clone();
            let started_tx = started_tx.clone();
            let ready = ready_workers.clone();
            let connections = downstream_connections.clone();
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            shutdown.push(stop_tx);
            let name = if serves {
                format!("worker-{index}")
            } else {
                "main".to_string()
            };
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    worker_main(
                        index,
                        spec,
                        shared,
                        listener,
                        queue_rx,
                        started_tx,
                        ready,
                        stop_rx,
                        (connections, local_ip),
                    )
                })
                .map_err(|e| VmError::Start(format!("cannot start a worker thread: {e}")))?;
            threads.push(thread);
            if !serves {
                // The workers' VMs are cloned after the main thread's have started.
                match started_rx.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        stop_all(&shutdown);
                        return Err(e);
                    }
                    Err(_) => return Err(VmError::Start("the main thread exited at start".into())),
                }
            }
        }
        drop(started_tx);
        for _ in 0..workers {
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop_all(&shutdown);
                    return Err(e);
                }
                Err(_) => return Err(VmError::Start("a worker thread exited at start".into())),
            }
        }
        Ok(Gateway {
            local_addr,
            shared,
            ready_workers,
            workers,
            shutdown,
            threads,
        })
    }

    /// True when every worker has a working VM (or there is no filter).
    pub fn is_ready(&self) -> bool {
        self.ready_workers.load(Ordering::Relaxed) == self.workers
    }

    /// A check the admin listener can hold on to.
    pub fn readiness(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let ready = self.ready_workers.clone();
        let workers = self.workers;
        Arc::new(move || ready.load(Ordering::Relaxed) == workers)
    }

    /// Stops accepting, and waits for the worker threads to end.
    pub fn stop(mut self) {
        for s in &self.shutdown {
            let _ = s.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn worker_main(
    index: usize,
    spec: Arc<GatewaySpec>,
    shared: Arc<SharedState>,
    // None on the main thread, which serves no request.
    listener: Option<std::net::TcpListener>,
    queue_rx: mpsc::UnboundedReceiver<QueueReady>,
    started: std::sync::mpsc::Sender<Result<(), VmError>>,
    ready: Arc<AtomicUsize>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    (downstream_connections, local_ip): (Arc<AtomicUsize>, IpAddr),
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(VmError::Start(format!("worker runtime: {e}"))));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (abandoned_tx, mut abandoned_rx) = mpsc::unbounded_channel();
        let worker = Rc::new(Worker::new(
            index,
            spec.clone(),
            shared.clone(),
            abandoned_tx,
            local_ip,
        ));
        // The main thread's base VM: started and configured, then only kept (Envoy clones the
        // threads' VMs from it; it never ticks).
        let mut _base_vm = None;
        if let (None, Some(filter)) = (&listener, &spec.filter) {
            match worker.start_vm(filter).await {
                Ok(vm) => _base_vm = Some(vm),
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            }
        }
        if let Some(filter) = &spec.filter {
            match worker.start_vm(filter).await {
                Ok(vm) => {
                    *worker.vm.lock().await = Some(VmSlot {
                        vm,
                        generation: 1,
                        loaded_at: Instant::now(),
                    });
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            }
        }
        let listener = match listener.map(tokio::net::TcpListener::from_std).transpose() {
            Ok(l) => l,
            Err(e) => {
                let _ = started.send(Err(VmError::Start(format!("listener: {e}"))));
                return;
            }
        };
        if listener.is_some() {
            ready.fetch_add(1, Ordering::Relaxed);
        }
        let _ = started.send(Ok(()));
        drop(started);
        if spec.filter.is_some() {
            tokio::task::spawn_local(worker.clone().tick_loop());
            tokio::task::spawn_local(worker.clone().queue_loop(queue_rx));
            let w = worker.clone();
            tokio::task::spawn_local(async move {
                while let Some((ctx, generation)) = abandoned_rx.recv().await {
                    finish(&w, ctx, generation).await;
                }
            });
        }
        let Some(listener) = listener else {
            let _ = stop.changed().await;
            return;
        };
        let connections = AtomicU64::new(0);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, peer)) = accepted else { continue };
                    let Some(slot) = ConnectionSlot::take(&downstream_connections, spec.max_downstream_connections) else {
                        worker.shared.counters.downstream_global_cx_overflow.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let local_addr = stream.local_addr().unwrap_or(peer);
                    let conn_id = (index as u64) << 48 | connections.fetch_add(1, Ordering::Relaxed);
                    let w = worker.clone();
                    tokio::task::spawn_local(async move {
                        w.serve_connection(stream, peer, local_addr, conn_id).await;
                        drop(slot);
                    });
                }
                _ = stop.changed() => break,
            }
        }
    });
}

struct VmSlot {
    vm: Vm,
    generation: u64,
    /// When this VM (or the last attempt to replace it) was loaded.
    loaded_at: Instant,
}

/// One downstream connection counted against the overload manager's limit, shared by all
/// workers; released on drop.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(active: &Arc<AtomicUsize>, max: Option<usize>) -> Option<ConnectionSlot> {
        let before = active.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|m| before >= m) {
            active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(active.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Worker {
    index: usize,
    spec: Arc<GatewaySpec>,
    shared: Arc<SharedState>,
    vm: Mutex<Option<VmSlot>>,
    client: Client<OrderedConnector, Body>,
    redis_pools: RefCell<HashMap<String, RedisPool>>,
    /// Streams whose client went away before they finished: (context, VM generation).
    abandoned: mpsc::UnboundedSender<(u32, u64)>,
    /// What Envoy appends to XFF for a loopback peer (its own address).
    local_ip: IpAddr,
}

/// Why a stream could not go on through the plugin.
enum StreamFailure {
    /// The VM trapped or was replaced: apply the failure policy.
    Vm,
    /// The plugin closed the stream: reset the connection.
    Closed,
}

/// What the plugin decided at a pause point.
enum Verdict {
    Continue,
    Local(crate::state::LocalResponse),
}

impl Worker {
    fn new(
        index: usize,
        spec: Arc<GatewaySpec>,
        shared: Arc<SharedState>,
        abandoned: mpsc::UnboundedSender<(u32, u64)>,
        local_ip: IpAddr,
    ) -> Worker {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(OrderedConnector(connector));
        Worker {
            index,
            spec,
            shared,
            vm: Mutex::new(None),
            client,
            redis_pools: RefCell::new(HashMap::new()),
            abandoned,
            local_ip,
        }
    }

    async fn start_vm(&self, filter: &FilterSpec) -> Result<Vm, VmError> {
        let clusters: HashMap<String, SocketAddress> = self.spec.clusters.clone();
        Vm::start(
            &filter.module,
            &filter.settings,
            self.index,
            self.shared.clone(),
            Arc::new(clusters),
        )
        .await
    }

    /// After a trap: the streams of the failed VM are woken so that they notice and apply the
    /// failure policy. The VM itself is replaced, if at all, by the next request
    /// ([`Worker::reload_if_due`]), as Envoy does.
    fn vm_trapped(self: &Rc<Self>) {
        let worker = self.clone();
        tokio::task::spawn_local(async move {
            let guard = worker.vm.lock().await;
            if let Some(slot) = guard.as_ref() {
                for s in slot.vm.state().streams.values() {
                    s.wake.notify_one();
                }
            }
        });
    }

    /// Envoy's `FAIL_RELOAD`, checked as a request arrives: a VM that trapped is replaced when
    /// the last load is at least the reload interval (base to 1.5 × base, drawn anew at each
    /// check) in the past; a check that is too early leaves it failed for this request. The
    /// load time moves on every attempt, successful or not. Returns whether the VM can serve.
    async fn reload_if_due(&self) -> bool {
        let mut guard = self.vm.lock().await;
        let Some(slot) = guard.as_mut() else {
            return true;
        };
        if slot.vm.failed.is_none() {
            return true;
        }
        let Some(filter) = self
            .spec
            .filter
            .as_ref()
            .filter(|f| f.failure_policy.reloads())
        else {
            return false;
        };
        let base = filter.reload_base_interval;
        let interval = base + base.mul_f64(fastrand::f64() / 2.0);
        if slot.loaded_at.elapsed() < interval {
            return false;
        }
        slot.loaded_at = Instant::now();
        match self.start_vm(filter).await {
            Ok(vm) => {
                for s in slot.vm.state().streams.values() {
                    s.wake.notify_one();
                }
                slot.vm = vm;
                slot.generation += 1;
                self.shared
                    .counters
                    .vm_replacements
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = self.index, "plugin VM replaced");
                true
            }
            Err(e) => {
                tracing::error!(worker = self.index, "cannot replace the plugin VM: {e}");
                false
            }
        }
    }

    async fn serve_connection(
        self: Rc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        conn_id: u64,
    ) {
        let cm = &self.spec.connection_manager;
        let server = match cm.server_header_transformation {
            conn_manager::ServerHeaderTransformation::PassThrough => None,
            _ => Some(cm.server_name.clone()),
        };
        let (io, state) =
            DownstreamIo::new(stream, cm.request_headers_timeout, cm.idle_timeout, server);
        let worker = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let worker = worker.clone();
            let in_flight = state.head_complete();
            let conflicting_framing = state.take_conflicting_framing();
            let mut req = req;
            if let Some(order) = state.take_field_order() {
                req.extensions_mut().insert(FieldOrder(order));
            }
            async move {
                let mut resp = if conflicting_framing {
                    // Envoy's codec refuses a body framed both ways (a smuggling vector), before
                    // any filter sees the request.
                    rejection_response(&conn_manager::Rejection {
                        status: 400,
                        body: "Bad Request",
                        details: "http1.content_length_and_chunked_not_allowed",
                        close: true,
                    })
                } else {
                    worker.clone().handle(req, peer, local, conn_id).await
                };
                // After the filters' response phase, as Envoy's connection manager encodes it.
                conn_manager::encode_response_headers(
                    &worker.spec.connection_manager,
                    resp.headers_mut(),
                );
                // The codec's `connection: close` goes after them.
                move_to_end(resp.headers_mut(), &http::header::CONNECTION);
                let resp = envoy_framing(resp);
                Ok::<_, Infallible>(held_until_done(resp, in_flight))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // The connection's own timers (crate::downstream) replace hyper's, which also
            // counts keep-alive idle time and answers nothing.
            .header_read_timeout(None)
            .max_buf_size(self.spec.max_request_headers_bytes.max(8192))
            .serve_connection(TokioIo::new(io), service);
        if let Err(e) = conn.await {
            tracing::debug!(%peer, "connection ended: {e}");
        }
    }

    async fn handle(
        self: Rc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        local: SocketAddr,
        conn_id: u64,
    ) -> Response<Body> {
        self.shared
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        // Envoy's max_request_headers_kb (60 KiB by default) counts the whole header block;
        // hyper's buffer limit only bites when the head arrives in pieces.
        let head_size: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + req.uri().to_string().len();
        let cm = &self.spec.connection_manager;
        let client_closes = closes_after(&req);
        let mut headers = request_header_list(&req);
        let rejection = conn_manager::check_request_head(
            req.version(),
            req.method().as_str(),
            req.headers().contains_key(http::header::HOST),
            head_size > self.spec.max_request_headers_bytes,
        )
        .and_then(|()| conn_manager::check_underscores(cm.headers_with_underscores, &mut headers))
        .and_then(|()| self.normalize_path(&mut headers))
        .err();
        let source = conn_manager::mutate_request_headers(cm, &mut headers, peer, self.local_ip);
        let path = header_str(&headers, ":path").unwrap_or("/").to_string();
        let route = self.spec.route_for(&path).cloned();
        let (_, incoming) = req.into_parts();
        let body = body::boxed(incoming);
        // Refused by the codec or the connection manager: answered before any filter exists, so
        // the plugin sees neither the request nor the reply (Envoy 1.40, measured).
        if let Some(r) = rejection {
            return rejection_response(&r);
        }
        if self.spec.filter.is_none() {
            return self.forward(route.as_ref(), headers, body).await;
        }
        let info = StreamInfo {
            source,
            destination: local,
            connection_id: conn_id,
            start_time: SystemTime::now(),
            route_name: route.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
            cluster_name: route
                .as_ref()
                .map(|r| r.cluster.clone())
                .unwrap_or_default(),
            client_closes,
        };
        if !self.reload_if_due().await {
            // Envoy: a failed plugin is skipped (FAIL_OPEN) or refuses every request.
            return if self.failure_policy().skips_failed_plugin() {
                self.forward(route.as_ref(), headers, body).await
            } else {
                plain_response(503, "")
            };
        }
        // A fail-open pass-through needs the request as received; keep a copy only then.
        let kept = self.fail_open().then(|| headers.clone());
        match FilteredStream::begin(self.clone(), info, headers, kept.clone()).await {
            Ok(stream) => stream.run(route, body).await,
            Err(StreamFailure::Closed) => reset_response(),
            Err(StreamFailure::Vm) => {
                self.fail_by_policy(route.as_ref(), kept.unwrap_or_default(), body)
                    .await
            }
        }
    }

    /// Envoy's `normalize_path` and `merge_slashes` on `:path`.
    fn normalize_path(&self, headers: &mut HeaderList) -> Result<(), conn_manager::Rejection> {
        let cm = &self.spec.connection_manager;
        let Some(entry) = headers.iter_mut().find(|(k, _)| k == ":path") else {
            return Ok(());
        };
        let path = String::from_utf8_lossy(&entry.1).into_owned();
        match conn_manager::normalize_path(&path, cm.normalize_path, cm.merge_slashes) {
            Some(p) => {
                entry.1 = p.into_bytes();
                Ok(())
            }
            None => Err(conn_manager::Rejection {
                status: 400,
                body: "",
                details: "path_normalization_failed",
                close: true,
            }),
        }
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.spec
            .filter
            .as_ref()
            .map_or(FailurePolicy::default(), |f| f.failure_policy)
    }

    /// Whether the request that failed the VM passes on (`fail_open: true`).
    fn fail_open(&self) -> bool {
        self.failure_policy().passes_failing_request()
    }

    /// What a request gets when the VM failed: Envoy's fail-closed 503, or a plain pass-through.
    async fn fail_by_policy(
        &self,
        route: Option<&RouteEntry>,
        headers: HeaderList,
        body: Body,
    ) -> Response<Body> {
        if self.fail_open() {
            self.shared
                .counters
                .fail_open_passes
                .fetch_add(1, Ordering::Relaxed);
            self.forward(route, headers, body).await
        } else {
            plain_response(503, "")
        }
    }

    /// Sends a request to the route's cluster and returns its response, or Envoy's local reply
    /// for no route (404), connect failure (503) or timeout (504).
    async fn forward(
        &self,
        route: Option<&RouteEntry>,
        headers: HeaderList,
        body: Body,
    ) -> Response<Body> {
        match self.send_upstream(route, headers, body).await {
            Ok(resp) => resp.map(body::boxed),
            Err(local) => local,
        }
    }

    async fn send_upstream(
        &self,
        route: Option<&RouteEntry>,
        headers: HeaderList,
        body: Body,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let Some(route) = route else {
            return Err(router_reply(404, "route_not_found", ""));
        };
        let Some(addr) = self.spec.clusters.get(&route.cluster) else {
            return Err(router_reply(
                503,
                "no_healthy_upstream",
                "no healthy upstream",
            ));
        };
        let cm = &self.spec.connection_manager;
        let mut headers = headers;
        let timeout = route.effective_timeout();
        conn_manager::router_request_headers(cm, &mut headers, timeout);
        let req = match build_request(addr, &headers, body) {
            Ok(r) => r,
            Err(e) => return Err(plain_response(400, &format!("bad request: {e}\n"))),
        };
        let sent = Instant::now();
        let fut = self.client.request(req);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => {
                    self.shared
                        .counters
                        .upstream_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(router_reply(
                        504,
                        "upstream_response_timeout",
                        "upstream request timeout",
                    ));
                }
            },
            None => fut.await,
        };
        match result {
            Ok(mut resp) => {
                conn_manager::router_response_headers(cm, resp.headers_mut(), sent.elapsed());
                Ok(resp)
            }
            // The client's body broke HTTP/1 framing (a malformed chunk): Envoy's codec answers.
            Err(e) if malformed_request_body(&e) => {
                Err(rejection_response(&conn_manager::Rejection {
                    status: 400,
                    body: "Bad Request",
                    details: "http1.codec_error",
                    close: true,
                }))
            }
            Err(e) => {
                self.shared
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cluster = %route.cluster, "upstream error: {e:?}");
                // Envoy 1.40's reset reasons: a refused connect is a "remote connection failure".
                let reason = if !e.is_connect() {
                    "connection termination"
                } else if timed_out(&e) {
                    "connection timeout"
                } else {
                    "remote connection failure"
                };
                Err(router_reply(
                    503,
                    "upstream_reset_before_response_started",
                    &format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}"),
                ))
            }
        }
    }

    // ---- callouts -------------------------------------------------------------------------

    fn dispatch(self: &Rc<Self>, callouts: Vec<Callout>, generation: u64) {
        for callout in callouts {
            let worker = self.clone();
            tokio::task::spawn_local(async move {
                match callout {
                    Callout::Http {
                        token,
                        cluster,
                        headers,
                        body,
                        trailers: _,
                        timeout,
                    } => {
                        let response = worker.http_callout(&cluster, headers, body, timeout).await;
                        worker.deliver_http(token, response, generation).await;
                    }
                    Callout::Redis {
                        token,
                        cluster,
                        query,
                    } => {
                        let reply = worker.redis_callout(&cluster, query).await;
                        worker.deliver_redis(token, reply, generation).await;
                    }
                }
            });
        }
    }

    async fn http_callout(
        &self,
        cluster: &str,
        headers: HeaderList,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> HttpCallResponse {
        let fail = |status: u16, text: &str| {
            self.shared
                .counters
                .http_callout_failures
                .fetch_add(1, Ordering::Relaxed);
            HttpCallResponse {
                headers: vec![
                    (":status".into(), status.to_string().into_bytes()),
                    ("content-length".into(), text.len().to_string().into_bytes()),
                    ("content-type".into(), b"text/plain".to_vec()),
                ],
                body: text.as_bytes().to_vec(),
                trailers: Vec::new(),
                status: Some(Status::Ok),
                message: String::new(),
            }
        };
        let Some(addr) = self.spec.clusters.get(cluster) else {
            return fail(503, "no healthy upstream");
        };
        let req = match build_request(addr, &headers, body::full(body)) {
            Ok(r) => r,
            Err(_) => return fail(503, "upstream connect error or disconnect/reset before headers. reset reason: invalid request"),
        };
        let exchange = async {
            let resp = self.client.request(req).await?;
            let (parts, incoming) = resp.into_parts();
            let collected = incoming.collect().await;
            Ok::<_, BoxedErr>((parts, collected))
        };
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, exchange).await {
                Ok(r) => r,
                Err(_) => return fail(504, "upstream request timeout"),
            },
            None => exchange.await,
        };
        match result {
            Ok((parts, Ok(collected))) => {
                let trailers = collected.trailers().map(header_list_of).unwrap_or_default();
                let mut headers = vec![(
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                )];
                headers.extend(response_header_list(&parts));
                HttpCallResponse {
                    headers,
                    body: collected.to_bytes().to_vec(),
                    trailers,
                    status: Some(Status::Ok),
                    message: String::new(),
                }
            }
            Ok((_, Err(e))) => {
                // Reset after the headers: the plugin sees no headers and BrokenConnection.
                self.shared
                    .counters
                    .http_callout_failures
                    .fetch_add(1, Ordering::Relaxed);
                HttpCallResponse {
                    headers: Vec::new(),
                    body: Vec::new(),
                    trailers: Vec::new(),
                    status: Some(Status::BrokenConnection),
                    message: e.to_string(),
                }
            }
            Err(e) => {
                let connect = e
                    .downcast_ref::<hyper_util::client::legacy::Error>()
                    .is_some_and(|e| e.is_connect());
                fail(
                    503,
                    if connect {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
                    } else {
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
                    },
                )
            }
        }
    }

    async fn deliver_http(
        self: &Rc<Self>,
        token: u32,
        response: HttpCallResponse,
        generation: u64,
    ) {
        let mut guard = self.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
            return;
        };
        let (nh, nb, nt) = (
            response.headers.len(),
            response.body.len(),
            response.trailers.len(),
        );
        slot.vm.state_mut().http_call_response = Some(response);
        let result = slot.vm.on_http_call_response(token, nh, nb, nt).await;
        let callouts = slot.vm.take_callouts();
        drop(guard);
        self.after_callback(result.map(|_| ()), callouts, generation);
    }

    /// Runs a Redis command (Higress ABI) on this worker's pool for the cluster.
    async fn redis_callout(&self, cluster: &str, query: Vec<u8>) -> Result<Vec<u8>, String> {
        let init = {
            let guard = self.vm.lock().await;
            guard
                .as_ref()
                .and_then(|s| s.vm.state().redis_clusters.get(cluster).cloned())
        };
        let Some(init) = init else {
            return Err(format!("redis cluster {cluster} was not initialised"));
        };
        let count = crate::redis_pool::parse_commands(&query)
            .map_err(|e| format!("malformed RESP query: {e}"))?
            .len();
        let pool = {
            let mut pools = self.redis_pools.borrow_mut();
            match pools.get(cluster) {
                Some(p) => p.clone(),
                None => {
                    let base = crate::host::redis_call::cluster_base(cluster);
                    let Some(addr) = self.spec.clusters.get(base) else {
                        return Err(format!("unknown cluster {base}"));
                    };
                    let db = init.db;
                    let endpoint = RedisEndpoint {
                        host: addr.host.clone(),
                        port: addr.port,
                        username: init.username.clone(),
                        password: init.password.clone(),
                        db,
                        connect_timeout: init.timeout,
                    };
                    let pool = RedisPool::new(endpoint, 2);
                    pools.insert(cluster.to_string(), pool.clone());
                    pool
                }
            }
        };
        pool.call_raw(Bytes::from(query), count, init.timeout)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    async fn deliver_redis(
        self: &Rc<Self>,
        token: u32,
        reply: Result<Vec<u8>, String>,
        generation: u64,
    ) {
        let (status, reply) = match reply {
            Ok(r) => (0, Some(r)),
            Err(e) => {
                tracing::debug!("redis call failed: {e}");
                self.shared
                    .counters
                    .redis_callout_failures
                    .fetch_add(1, Ordering::Relaxed);
                (1, None)
            }
        };
        let mut guard = self.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
            return;
        };
        let result = slot.vm.on_redis_call_response(token, status, reply).await;
        let callouts = slot.vm.take_callouts();
        drop(guard);
        self.after_callback(result, callouts, generation);
    }

    /// After a root-context callback: dispatch what it queued, or replace the VM if it failed.
    fn after_callback(
        self: &Rc<Self>,
        result: Result<(), VmError>,
        callouts: Vec<Callout>,
        generation: u64,
    ) {
        match result {
            Ok(()) => self.dispatch(callouts, generation),
            Err(_) => self.vm_trapped(),
        }
    }

    async fn tick_loop(self: Rc<Self>) {
        loop {
            let period = {
                let guard = self.vm.lock().await;
                guard.as_ref().and_then(|s| s.vm.state().tick_period)
            };
            let Some(period) = period else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::time::sleep(period).await;
            let mut guard = self.vm.lock().await;
            let Some(slot) = guard.as_mut() else { continue };
            let generation = slot.generation;
            let result = slot.vm.on_tick().await;
            let callouts = slot.vm.take_callouts();
            drop(guard);
            self.after_callback(result, callouts, generation);
        }
    }

    async fn queue_loop(self: Rc<Self>, mut rx: mpsc::UnboundedReceiver<QueueReady>) {
        while let Some(ready) = rx.recv().await {
            let mut guard = self.vm.lock().await;
            let Some(slot) = guard.as_mut() else { continue };
            let generation = slot.generation;
            let result = slot
                .vm
                .on_queue_ready(ready.root_context_id, ready.queue_id)
                .await;
            let callouts = slot.vm.take_callouts();
            drop(guard);
            self.after_callback(result, callouts, generation);
        }
    }
}

type BoxedErr = Box<dyn std::error::Error + Send + Sync>;

/// One request going through the plugin.
struct FilteredStream {
    worker: Rc<Worker>,
    ctx: u32,
    generation: u64,
    wake: Arc<Notify>,
    finished: bool,
    /// The request headers as received, for a fail-open pass-through (empty otherwise).
    original_headers: HeaderList,
    /// The last headers phase paused (the plugin resumed it later): Envoy buffered what body
    /// arrived meanwhile, its end included, and hands it over in one call.
    paused: bool,
}

impl Drop for FilteredStream {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away mid-stream: the plugin still gets on_done/on_log/on_delete.
            // Queued (not spawned) so that a drop during shutdown cannot panic.
            let _ = self.worker.abandoned.send((self.ctx, self.generation));
        }
    }
}

async fn finish(worker: &Rc<Worker>, ctx: u32, generation: u64) {
    let mut guard = worker.vm.lock().await;
    let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
        return;
    };
    if let Some(s) = slot.vm.stream(ctx) {
        encoded_response_map(&worker.spec.connection_manager, s);
    }
    let result = slot.vm.finish_stream(ctx).await;
    let callouts = slot.vm.take_callouts();
    drop(guard);
    worker.after_callback(result, callouts, generation);
}

/// The response map as the log phase reads it in Envoy: the connection manager and the codec
/// add `date`, `server` and `connection: close` to the map itself after the response phase
/// (Envoy 1.40, measured; the chunked framing is written without entering the map).
fn encoded_response_map(cm: &conn_manager::ConnectionManagerConfig, s: &mut StreamState) {
    let closes = s.info.client_closes;
    let Some(map) = s.response_headers.as_mut() else {
        return;
    };
    let mut encoded = http::HeaderMap::new();
    for (k, v) in map.iter() {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            encoded.append(k, v);
        }
    }
    conn_manager::encode_response_headers(cm, &mut encoded);
    for name in [http::header::DATE, http::header::SERVER] {
        let value = encoded.get(&name).map(|v| v.as_bytes().to_vec());
        match (map.iter_mut().find(|(k, _)| k == name.as_str()), value) {
            (Some(entry), Some(v)) => entry.1 = v,
            (None, Some(v)) => map.push((name.as_str().to_string(), v)),
            _ => {}
        }
    }
    if closes && !map.iter().any(|(k, _)| k == "connection") {
        map.push(("connection".into(), b"close".to_vec()));
    }
}

/// Envoy 1.40 answers a local reply sent before the plugin was given the request's end (in the
/// headers phase of a request with a body, or in a body call before the last) with
/// `connection: close`, and closes the connection after it.
fn closes_unread_body(local: &mut crate::state::LocalResponse) {
    local.closes_connection = true;
}

/// Whether the connection closes after this request: `connection: close`, or HTTP/1.0
/// without keep-alive.
fn closes_after(req: &Request<Incoming>) -> bool {
    let connection = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if connection.iter().any(|t| t == "close") {
        return true;
    }
    req.version() == http::Version::HTTP_10 && !connection.iter().any(|t| t == "keep-alive")
}

/// Stream state read back from the VM after a callback.
struct Outcome {
    action: Action,
    local: Option<crate::state::LocalResponse>,
    closed: bool,
}

impl FilteredStream {
    /// Creates the stream's context and runs `on_request_headers`.
    async fn begin(
        worker: Rc<Worker>,
        info: StreamInfo,
        headers: HeaderList,
        kept: Option<HeaderList>,
    ) -> Result<FilteredStream, StreamFailure> {
        let original_headers = kept.unwrap_or_default();
        let mut guard = worker.vm.lock().await;
        let Some(slot) = guard.as_mut() else {
            return Err(StreamFailure::Vm);
        };
        let state = StreamState::new(info, headers);
        let wake = state.wake.clone();
        let generation = slot.generation;
        let ctx = match slot.vm.create_stream(state).await {
            Ok(ctx) => ctx,
            Err(_) => {
                drop(guard);
                worker.vm_trapped();
                return Err(StreamFailure::Vm);
            }
        };
        drop(guard);
        Ok(FilteredStream {
            worker,
            ctx,
            generation,
            wake,
            finished: false,
            original_headers,
            paused: false,
        })
    }

    /// Runs one callback on this stream's VM, then reads back what the plugin decided.
    async fn callback<F>(&mut self, f: F) -> Result<Outcome, StreamFailure>
    where
        F: for<'a> FnOnce(
            &'a mut Vm,
            u32,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Action, VmError>> + 'a>,
        >,
    {
        let mut guard = self.worker.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == self.generation) else {
            self.finished = true;
            return Err(StreamFailure::Vm);
        };
        let result = f(&mut slot.vm, self.ctx).await;
        let callouts = slot.vm.take_callouts();
        let outcome = match result {
            Ok(action) => match slot.vm.stream(self.ctx) {
                Some(s) => Ok(Outcome {
                    action,
                    local: s.local_response.take(),
                    closed: s.closed,
                }),
                None => Err(StreamFailure::Vm),
            },
            Err(_) => Err(StreamFailure::Vm),
        };
        drop(guard);
        match &outcome {
            Ok(_) => self.worker.dispatch(callouts, self.generation),
            Err(_) => {
                self.finished = true;
                self.worker.vm_trapped();
            }
        }
        outcome
    }

    /// Waits until the plugin resumes the request (or response) or answers locally.
    async fn wait(&mut self, response: bool) -> Result<Verdict, StreamFailure> {
        // Envoy's stream idle timeout: a plugin that never resumes does not hold the client
        // forever.
        let deadline = idle_deadline(&self.worker.spec);
        loop {
            {
                let mut guard = self.worker.vm.lock().await;
                // A VM that trapped (or was replaced) will not resume this stream.
                let Some(slot) = guard
                    .as_mut()
                    .filter(|s| s.generation == self.generation && s.vm.failed.is_none())
                else {
                    self.finished = true;
                    return Err(StreamFailure::Vm);
                };
                let Some(s) = slot.vm.stream(self.ctx) else {
                    return Err(StreamFailure::Vm);
                };
                match s.take_pause_outcome(response) {
                    Some(PauseOutcome::Closed) => return Err(StreamFailure::Closed),
                    Some(PauseOutcome::Local(local)) => return Ok(Verdict::Local(local)),
                    Some(PauseOutcome::Resumed) => return Ok(Verdict::Continue),
                    None => {}
                }
            }
            if !wait_for_wake(&self.wake, deadline).await {
                return Ok(Verdict::Local(idle_timeout_reply()));
            }
        }
    }

    /// After a callback that may pause: wait if paused; a local reply wins either way.
    async fn settle(&mut self, outcome: Outcome, response: bool) -> Result<Verdict, StreamFailure> {
        if outcome.closed {
            return Err(StreamFailure::Closed);
        }
        if let Some(local) = outcome.local {
            return Ok(Verdict::Local(local));
        }
        self.paused = outcome.action == Action::Pause;
        match outcome.action {
            Action::Continue => {
                // A resume the plugin issued during the callback itself is not needed any more.
                Ok(Verdict::Continue)
            }
            Action::Pause => self.wait(response).await,
        }
    }

    async fn run(mut self, route: Option<RouteEntry>, mut body: Body) -> Response<Body> {
        let eos = body.is_end_stream();
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_request_headers(ctx, eos)))
            .await
        {
            Ok(o) => o,
            Err(e) => return self.failed(e, route.as_ref(), body).await,
        };
        match self.settle(outcome, false).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(mut local)) => {
                if !eos {
                    closes_unread_body(&mut local);
                }
                return self.local_reply(local).await;
            }
            Err(e) => return self.failed(e, route.as_ref(), body).await,
        }

        // Request body: stream chunks through on_request_body into the upstream request.
        let upstream_body = if eos {
            body::empty()
        } else {
            let (tx, upstream_body) = body::channel();
            let (local_tx, local_rx) = tokio::sync::oneshot::channel();
            let pump = BodyPump {
                worker: self.worker.clone(),
                ctx: self.ctx,
                generation: self.generation,
                wake: self.wake.clone(),
                dir: Direction::Request,
                end_with_data: self.paused,
            };
            tokio::task::spawn_local(async move {
                let verdict = pump_body(&pump, &mut body, tx).await;
                let _ = local_tx.send(verdict);
            });
            // Hold the upstream exchange until the body settles, unless a local reply or a
            // failure comes first.
            return self.proxy(route, upstream_body, Some(local_rx)).await;
        };
        self.proxy(route, upstream_body, None).await
    }

    async fn proxy(
        mut self,
        mut route: Option<RouteEntry>,
        upstream_body: Body,
        body_verdict: Option<tokio::sync::oneshot::Receiver<Result<Verdict, StreamFailure>>>,
    ) -> Response<Body> {
        let headers = {
            let mut guard = self.worker.vm.lock().await;
            match guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                Some(s) => {
                    // The router matches the request as the filters left it (Envoy clears its
                    // route cache when a plugin edits the headers), and finds no route for a
                    // request without x-forwarded-proto (Envoy 1.40's route table refuses it).
                    route = match header_str(&s.request_headers, "x-forwarded-proto") {
                        None => None,
                        Some(_) => header_str(&s.request_headers, ":path")
                            .and_then(|p| self.worker.spec.route_for(p).cloned()),
                    };
                    // The router edits the request's own map: the log phase sees it so.
                    conn_manager::router_request_headers(
                        &self.worker.spec.connection_manager,
                        &mut s.request_headers,
                        route.as_ref().and_then(RouteEntry::effective_timeout),
                    );
                    let mut h = s.request_headers.clone();
                    if s.request_body_modified {
                        h.retain(|(k, _)| k != "content-length");
                    }
                    h
                }
                None => {
                    drop(guard);
                    self.finished = true;
                    return self
                        .worker
                        .fail_by_policy(route.as_ref(), Vec::new(), body::empty())
                        .await;
                }
            }
        };
        let worker = self.worker.clone();
        let upstream = worker.send_upstream(route.as_ref(), headers, upstream_body);
        let upstream = match body_verdict {
            None => upstream.await,
            Some(mut verdict_rx) => {
                tokio::pin!(upstream);
                tokio::select! {
                    r = &mut upstream => r,
                    v = &mut verdict_rx => match v {
                        Ok(Ok(Verdict::Continue)) | Err(_) => upstream.await,
                        Ok(Ok(Verdict::Local(local))) => return self.local_reply(local).await,
                        Ok(Err(StreamFailure::Closed)) => return reset_response(),
                        Ok(Err(StreamFailure::Vm)) => {
                            self.finished = true;
                            return plain_response(503, "");
                        }
                    },
                }
            }
        };
        let mut close = false;
        let (status, resp_headers, resp_body) = match upstream {
            Ok(resp) => {
                let (parts, incoming) = resp.into_parts();
                let mut h = vec![(
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                )];
                h.extend(response_header_list(&parts));
                (parts.status, h, body::boxed(incoming))
            }
            Err(local) => {
                let (parts, b) = local.into_parts();
                close = parts.headers.get(http::header::CONNECTION)
                    == Some(&HeaderValue::from_static("close"));
                let mut h = vec![(
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                )];
                h.extend(header_list_of(&parts.headers));
                (parts.status, h, b)
            }
        };
        let _ = status;
        let mut resp = self.respond(resp_headers, resp_body, false).await;
        if close {
            // Hop-by-hop, so the response phase does not carry it: the codec's own decision.
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Runs the response phase: `on_response_headers`, then the body through `on_response_body`.
    /// `local`: the plugin's own reply, whose body Envoy hands the response phase in one call
    /// with the end.
    async fn respond(
        mut self,
        headers: HeaderList,
        resp_body: Body,
        local: bool,
    ) -> Response<Body> {
        let eos = resp_body.is_end_stream();
        // With fail_open, a VM failure here passes the upstream's response on as it came.
        let kept = self.worker.fail_open().then(|| headers.clone());
        {
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                s.response_headers = Some(headers);
            }
        }
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_response_headers(ctx, eos)))
            .await
        {
            Ok(o) => o,
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return self.response_after_vm_failure(kept, resp_body),
        };
        match self.settle(outcome, true).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(local)) => {
                // A local reply during the response phase replaces the response as it is.
                self.shared_local_count();
                let resp = local_response_parts(&local);
                self.finish_now().await;
                return resp;
            }
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return self.response_after_vm_failure(kept, resp_body),
        }
        let headers = {
            let mut guard = self.worker.vm.lock().await;
            guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
                .and_then(|s| s.response_headers.clone())
                .unwrap_or_default()
        };
        if eos {
            self.finish_later();
            return response_builder(&headers)
                .body(body::empty())
                .unwrap_or_else(|_| plain_response(502, "invalid response headers"));
        }
        // A body already complete in the receive buffer (the common small response) goes
        // through the plugin inline: the client gets headers and body in one write, with no
        // pump task.
        let end_with_data = local || self.paused;
        let mut resp_body = match body::take_if_complete(resp_body) {
            Ok(data) => return self.respond_complete(data, kept, end_with_data).await,
            Err(rest) => rest,
        };
        let builder = response_builder(&headers);
        let (tx, downstream) = body::channel();
        let pump = BodyPump {
            worker: self.worker.clone(),
            ctx: self.ctx,
            generation: self.generation,
            wake: self.wake.clone(),
            dir: Direction::Response,
            end_with_data,
        };
        // The pump owns the end of the stream (on_done/on_log/on_delete) from here on.
        self.finished = true;
        tokio::task::spawn_local(async move {
            let _ = pump_body(&pump, &mut resp_body, tx).await;
            finish(&pump.worker, pump.ctx, pump.generation).await;
        });
        builder
            .body(downstream)
            .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
    }

    /// The whole response body, already received, through `on_response_body`: as `(n, false)`
    /// then `(0, true)` (Envoy's codec reports the end on its own), or with `end_with_data` in
    /// one call (a local reply's body, or one that arrived while the headers phase paused).
    async fn respond_complete(
        mut self,
        data: Bytes,
        kept: Option<HeaderList>,
        end_with_data: bool,
    ) -> Response<Body> {
        let mut len = data.len();
        {
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                s.response_body = data.to_vec();
            }
        }
        // What the plugin let through before the end.
        let mut released = Vec::new();
        if !end_with_data {
            let first = match self
                .callback(|vm, ctx| Box::pin(vm.on_response_body(ctx, len, false)))
                .await
            {
                Ok(o) => o,
                Err(StreamFailure::Closed) => return reset_response(),
                Err(StreamFailure::Vm) => {
                    return self.response_after_vm_failure(kept, body::full(data));
                }
            };
            if first.closed {
                return reset_response();
            }
            if let Some(local) = first.local {
                self.shared_local_count();
                self.finish_later();
                return local_response_parts(&local);
            }
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                // Continue passes the buffer on; Pause keeps it for the next call.
                if first.action == Action::Continue {
                    released = std::mem::take(&mut s.response_body);
                }
                len = s.response_body.len();
            }
        }
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_response_body(ctx, len, true)))
            .await
        {
            Ok(o) => o,
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => {
                return self.response_after_vm_failure(kept, body::full(data));
            }
        };
        match self.settle(outcome, true).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(local)) => {
                self.shared_local_count();
                self.finish_later();
                return local_response_parts(&local);
            }
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return plain_response(503, ""),
        }
        let (mut headers, body, modified) = {
            let mut guard = self.worker.vm.lock().await;
            match guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                Some(s) => {
                    let rest = std::mem::take(&mut s.response_body);
                    let body = if released.is_empty() {
                        rest
                    } else {
                        released.extend_from_slice(&rest);
                        released
                    };
                    (
                        s.response_headers.clone().unwrap_or_default(),
                        body,
                        s.response_body_modified,
                    )
                }
                None => return plain_response(503, ""),
            }
        };
        if modified {
            // The whole body is known here, so a rewritten one gets its true length (in place:
            // the codec's framing, not a plugin's edit).
            if let Some(entry) = headers.iter_mut().find(|(k, _)| k == "content-length") {
                entry.1 = body.len().to_string().into_bytes();
            }
        }
        self.finish_later();
        response_builder(&headers)
            .body(body::full(body))
            .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
    }

    /// Hands the end of the stream (on_done/on_log/on_delete) to the worker's queue, so that
    /// the response does not wait for it.
    fn finish_later(&mut self) {
        self.finished = true;
        let _ = self.worker.abandoned.send((self.ctx, self.generation));
    }

    /// The VM failed in the response phase: pass the response on (fail_open) or answer 503.
    fn response_after_vm_failure(
        &mut self,
        kept: Option<HeaderList>,
        body: Body,
    ) -> Response<Body> {
        self.finished = true;
        match kept {
            Some(headers) => {
                self.worker
                    .shared
                    .counters
                    .fail_open_passes
                    .fetch_add(1, Ordering::Relaxed);
                response_builder(&headers)
                    .body(body)
                    .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
            }
            None => plain_response(503, ""),
        }
    }

    fn shared_local_count(&self) {
        self.worker
            .shared
            .counters
            .local_responses
            .fetch_add(1, Ordering::Relaxed);
    }

    async fn finish_now(&mut self) {
        self.finished = true;
        finish(&self.worker, self.ctx, self.generation).await;
    }

    /// The plugin answered in the request phase: the reply goes through the response phase of
    /// the filter chain, as Envoy encodes local replies.
    async fn local_reply(self, local: crate::state::LocalResponse) -> Response<Body> {
        self.shared_local_count();
        let resp = local_response_parts(&local);
        let (parts, b) = resp.into_parts();
        let mut h = vec![(
            ":status".to_string(),
            parts.status.as_str().as_bytes().to_vec(),
        )];
        h.extend(header_list_of(&parts.headers));
        let mut resp = self.respond(h, b, true).await;
        if local.closes_connection {
            // The codec's, after the filters: the plugin's response phase does not see it.
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        resp
    }

    async fn failed(
        mut self,
        e: StreamFailure,
        route: Option<&RouteEntry>,
        body: Body,
    ) -> Response<Body> {
        self.finished = true;
        match e {
            StreamFailure::Closed => reset_response(),
            StreamFailure::Vm => {
                let headers = std::mem::take(&mut self.original_headers);
                self.worker.fail_by_policy(route, headers, body).await
            }
        }
    }
}

/// One body on its way through the plugin's body callbacks.
struct BodyPump {
    worker: Rc<Worker>,
    ctx: u32,
    generation: u64,
    wake: Arc<Notify>,
    dir: Direction,
    /// What is there when the pump starts is handed over with the end in one call when it is
    /// all there (Envoy buffered it while the headers phase was paused); otherwise the end
    /// comes in a call of its own, as Envoy's HTTP/1 codec reports it.
    end_with_data: bool,
}

/// Which body a pump feeds through the plugin.
#[derive(Clone, Copy)]
enum Direction {
    Request,
    Response,
}

/// `first` and the data frames of `body` that are there without waiting for the peer, as one
/// chunk (what one socket read gives Envoy's codec; hyper decodes on its connection task, so
/// that task gets a turn before the body counts as drained), and whether the body ended. A
/// trailers frame stays for the next read.
async fn with_ready_data(first: Bytes, body: &mut Body) -> (Bytes, bool) {
    let mut more: Option<bytes::BytesMut> = None;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut yielded = false;
    loop {
        if body.is_end_stream() {
            break (more.map_or(first, bytes::BytesMut::freeze), true);
        }
        match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                let data = frame.into_data().unwrap_or_default();
                more.get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                    .extend_from_slice(&data);
                yielded = false;
            }
            std::task::Poll::Ready(Some(other)) => {
                *body = body::prepend(other, std::mem::replace(body, body::empty()));
                break (more.map_or(first, bytes::BytesMut::freeze), false);
            }
            std::task::Poll::Ready(None) => {
                *body = body::empty();
                break (more.map_or(first, bytes::BytesMut::freeze), true);
            }
            std::task::Poll::Pending if !yielded => {
                yielded = true;
                tokio::task::yield_now().await;
            }
            std::task::Poll::Pending => break (more.map_or(first, bytes::BytesMut::freeze), false),
        }
    }
}

/// Feeds one body, chunk by chunk, through the plugin's body callback into `tx`. While the
/// plugin answers Pause, chunks accumulate (it sees the whole buffer each time); Continue
/// flushes the buffer. Returns what the plugin decided for the request direction.
async fn pump_body(
    pump: &BodyPump,
    body: &mut Body,
    tx: BodySender,
) -> Result<Verdict, StreamFailure> {
    let (worker, ctx, generation, wake, dir) = (
        &pump.worker,
        pump.ctx,
        pump.generation,
        &pump.wake,
        pump.dir,
    );
    let mut end_with_data = pump.end_with_data;
    let mut saw_eos = false;
    // Chunks given to the plugin but not yet released downstream: what a fail-open
    // pass-through still owes the peer if the VM dies.
    let mut held: Vec<Bytes> = Vec::new();
    loop {
        let frame = if saw_eos { None } else { body.frame().await };
        let (chunk, trailers, eos) = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                // Envoy's HTTP/1 codec hands over what one read brought (several chunks of a
                // chunked body at once) and says the request ended in a call of its own:
                // `(n, false)` then `(0, true)`.
                Ok(data) => {
                    let (data, ended) = with_ready_data(data, body).await;
                    let eos = end_with_data && ended;
                    (Some(data), None, eos)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => (None, Some(header_list_of(&t)), true),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return Ok(Verdict::Continue);
            }
            None => (None, None, true),
        };
        if saw_eos && chunk.is_none() {
            return Ok(Verdict::Continue);
        }
        end_with_data = false;
        saw_eos = eos;
        if let Some(c) = &chunk {
            held.push(c.clone());
        }

        let mut guard = worker.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        let Some(s) = slot.vm.stream(ctx) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        let buffered = match dir {
            Direction::Request => &mut s.request_body,
            Direction::Response => &mut s.response_body,
        };
        if let Some(chunk) = &chunk {
            buffered.extend_from_slice(chunk);
        }
        let size = buffered.len();
        if let (Direction::Request, Some(chunk)) = (dir, &chunk) {
            s.request_body_received += chunk.len();
        }
        if let Some(t) = &trailers {
            match dir {
                Direction::Request => s.request_trailers = Some(t.clone()),
                Direction::Response => s.response_trailers = Some(t.clone()),
            }
        }
        let mut result = match dir {
            Direction::Request => {
                slot.vm
                    .on_request_body(ctx, size, eos && trailers.is_none())
                    .await
            }
            Direction::Response => {
                slot.vm
                    .on_response_body(ctx, size, eos && trailers.is_none())
                    .await
            }
        };
        if let (Ok(Action::Continue), Some(t)) = (&result, &trailers) {
            result = match dir {
                Direction::Request => slot.vm.on_request_trailers(ctx, t.len()).await,
                Direction::Response => slot.vm.on_response_trailers(ctx, t.len()).await,
            };
        }
        let callouts = slot.vm.take_callouts();
        let action = match result {
            Ok(a) => a,
            Err(_) => {
                drop(guard);
                worker.vm_trapped();
                return body_after_vm_failure(worker, held, body, &tx, eos).await;
            }
        };
        let Some(s) = slot.vm.stream(ctx) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        if s.closed {
            let _ = tx.send(Err("stream closed by the plugin".into())).await;
            return Err(StreamFailure::Closed);
        }
        if let Some(mut local) = s.local_response.take() {
            drop(guard);
            worker.dispatch(callouts, generation);
            let _ = tx.send(Err("replaced by a local reply".into())).await;
            // Before the plugin was given the request's end, as Envoy counts it.
            if !eos && matches!(dir, Direction::Request) {
                closes_unread_body(&mut local);
            }
            return Ok(Verdict::Local(local));
        }
        let mut flush = None;
        if action == Action::Continue {
            let buffered = match dir {
                Direction::Request => &mut s.request_body,
                Direction::Response => &mut s.response_body,
            };
            flush = Some(std::mem::take(buffered));
        }
        let trailers_out = if action == Action::Continue {
            match dir {
                Direction::Request => s.request_trailers.clone(),
                Direction::Response => s.response_trailers.clone(),
            }
        } else {
            None
        };
        drop(guard);
        worker.dispatch(callouts, generation);

        match flush {
            Some(data) => {
                held.clear();
                if !data.is_empty() && tx.send(Ok(Frame::data(Bytes::from(data)))).await.is_err() {
                    return Ok(Verdict::Continue);
                }
                if let Some(t) = trailers_out {
                    let _ = tx.send(Ok(Frame::trailers(header_map_of(&t)))).await;
                }
                if eos {
                    return Ok(Verdict::Continue);
                }
            }
            None if eos => {
                // The plugin holds the whole body: wait for it to resume, then flush; no longer
                // than the stream idle timeout.
                let deadline = idle_deadline(&worker.spec);
                loop {
                    {
                        let mut guard = worker.vm.lock().await;
                        let Some(s) = guard
                            .as_mut()
                            .filter(|s| s.generation == generation)
                            .and_then(|s| s.vm.stream(ctx))
                        else {
                            drop(guard);
                            return body_after_vm_failure(worker, held, body, &tx, true).await;
                        };
                        match s.take_pause_outcome(matches!(dir, Direction::Response)) {
                            None => {}
                            Some(PauseOutcome::Closed) => {
                                let _ = tx.send(Err("stream closed by the plugin".into())).await;
                                return Err(StreamFailure::Closed);
                            }
                            Some(PauseOutcome::Local(local)) => {
                                let _ = tx.send(Err("replaced by a local reply".into())).await;
                                return Ok(Verdict::Local(local));
                            }
                            Some(PauseOutcome::Resumed) => {
                                let (data, trailers) = match dir {
                                    Direction::Request => (
                                        std::mem::take(&mut s.request_body),
                                        s.request_trailers.clone(),
                                    ),
                                    Direction::Response => (
                                        std::mem::take(&mut s.response_body),
                                        s.response_trailers.clone(),
                                    ),
                                };
                                drop(guard);
                                held.clear();
                                if !data.is_empty() {
                                    let _ = tx.send(Ok(Frame::data(Bytes::from(data)))).await;
                                }
                                if let Some(t) = trailers {
                                    let _ = tx.send(Ok(Frame::trailers(header_map_of(&t)))).await;
                                }
                                return Ok(Verdict::Continue);
                            }
                        }
                    }
                    if !wait_for_wake(wake, deadline).await {
                        let _ = tx.send(Err("stream idle timeout".into())).await;
                        return match dir {
                            // Envoy answers 408 while the response has not started...
                            Direction::Request => Ok(Verdict::Local(idle_timeout_reply())),
                            // ...and resets the stream once it has.
                            Direction::Response => Err(StreamFailure::Closed),
                        };
                    }
                }
            }
            None => {}
        }
    }
}

/// When a stream paused from now on times out (`None`: never).
fn idle_deadline(spec: &GatewaySpec) -> Option<Instant> {
    spec.stream_idle_timeout.map(|t| Instant::now() + t)
}

/// Waits for the stream's wake-up; false when the deadline passed first.
async fn wait_for_wake(wake: &tokio::sync::Notify, deadline: Option<Instant>) -> bool {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), wake.notified())
            .await
            .is_ok(),
        None => {
            wake.notified().await;
            true
        }
    }
}

/// Envoy's answer to a request whose stream idled out before its response started.
fn idle_timeout_reply() -> crate::state::LocalResponse {
    crate::state::LocalResponse {
        status: 408,
        details: "stream_idle_timeout".into(),
        body: b"stream timeout".to_vec(),
        headers: Vec::new(),
        closes_connection: false,
    }
}

/// The VM failed while a body was going through it. With `fail_open` the rest passes through
/// untouched (first what the plugin had not released yet); otherwise the stream is aborted.
async fn body_after_vm_failure(
    worker: &Rc<Worker>,
    held: Vec<Bytes>,
    body: &mut Body,
    tx: &BodySender,
    eos_seen: bool,
) -> Result<Verdict, StreamFailure> {
    if !worker.fail_open() {
        let _ = tx.send(Err("plugin VM failed".into())).await;
        return Err(StreamFailure::Vm);
    }
    worker
        .shared
        .counters
        .fail_open_passes
        .fetch_add(1, Ordering::Relaxed);
    for chunk in held {
        if tx.send(Ok(Frame::data(chunk))).await.is_err() {
            return Ok(Verdict::Continue);
        }
    }
    if !eos_seen {
        while let Some(frame) = body.frame().await {
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                break;
            }
        }
    }
    Ok(Verdict::Continue)
}

// ---- HTTP plumbing ------------------------------------------------------------------------

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
];

/// The request's headers as Envoy's codec hands them on: `:authority`, `:path`, `:method`,
/// `:scheme`, then the regular headers in order (lower-case; `host` becomes `:authority`;
/// repeated `x-forwarded-for` headers joined by `,` into the first, as Envoy's header map
/// does). The connection manager's changes come after ([`conn_manager`]).
fn request_header_list(req: &Request<Incoming>) -> HeaderList {
    let authority = req
        .headers()
        .get(http::header::HOST)
        .map(|v| v.as_bytes().to_vec())
        .or_else(|| {
            req.uri()
                .authority()
                .map(|a| a.as_str().as_bytes().to_vec())
        })
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut h: HeaderList = vec![
        (":authority".into(), authority),
        (":path".into(), path.as_bytes().to_vec()),
        (":method".into(), req.method().as_str().as_bytes().to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    let mut xff_at: Option<usize> = None;
    let order = req.extensions().get::<FieldOrder>().map(|o| o.0.as_slice());
    for (k, v) in in_wire_order(req.headers(), order.unwrap_or_default()) {
        let name = k.as_str();
        // `expect: 100-continue` is answered here (hyper sends the 100 when the body is first
        // read), not passed on, as Envoy does.
        if name == "host"
            || HOP_BY_HOP.contains(&name)
            || (name == "expect" && v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            continue;
        }
        if name == "x-forwarded-for" {
            if let Some(i) = xff_at {
                let joined = &mut h[i].1;
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
                continue;
            }
            xff_at = Some(h.len());
        }
        h.push((name.to_string(), v.as_bytes().to_vec()));
    }
    h
}

/// Whether an upstream exchange failed because the client's request body could not be
/// decoded (hyper's chunked decoder reports InvalidData / InvalidInput).
fn malformed_request_body(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Whether an upstream error was a timeout (hyper-util's connect timeout).
fn timed_out(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// One of the router's own local replies (no route, no upstream, timeout), built as Envoy builds
/// local replies.
fn router_reply(status: u16, details: &str, body: &str) -> Response<Body> {
    local_response_parts(&crate::state::LocalResponse {
        status,
        details: details.into(),
        body: body.as_bytes().to_vec(),
        headers: Vec::new(),
        closes_connection: false,
    })
}

/// The response to a request the connection manager refused, when no filter runs.
fn rejection_response(r: &conn_manager::Rejection) -> Response<Body> {
    let mut resp = local_response_parts(&rejection_local(r));
    if r.close {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn rejection_local(r: &conn_manager::Rejection) -> crate::state::LocalResponse {
    crate::state::LocalResponse {
        status: r.status,
        details: r.details.into(),
        body: r.body.as_bytes().to_vec(),
        headers: Vec::new(),
        closes_connection: false,
    }
}

/// The response with the request's in-flight mark riding on its body: the connection counts as
/// idle (its idle timer runs) once the body has been sent or dropped.
fn held_until_done(resp: Response<Body>, in_flight: RequestInFlight) -> Response<Body> {
    resp.map(|inner| {
        body::boxed(HeldBody {
            inner,
            _in_flight: in_flight,
        })
    })
}

struct HeldBody {
    inner: Body,
    _in_flight: RequestInFlight,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn header_str<'a>(h: &'a HeaderList, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// An upstream response's fields (hop-by-hop ones dropped) in the order the upstream sent
/// them, when its connection noted that order.
fn response_header_list(parts: &http::response::Parts) -> HeaderList {
    let order = parts
        .extensions
        .get::<ResponseOrders>()
        .and_then(ResponseOrders::take)
        .unwrap_or_default();
    in_wire_order(&parts.headers, &order.0)
        .into_iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn header_list_of(map: &http::HeaderMap) -> HeaderList {
    map.iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn header_map_of(list: &HeaderList) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in list {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Builds the upstream request from the (plugin-modified) header list.
fn build_request(
    addr: &SocketAddress,
    headers: &HeaderList,
    body: Body,
) -> Result<Request<Body>, String> {
    let method = header_str(headers, ":method").unwrap_or("GET");
    let path = header_str(headers, ":path").unwrap_or("/");
    let authority = header_str(headers, ":authority").unwrap_or_default();
    let uri = format!("http://{addr}{path}");
    let mut builder = Request::builder()
        .method(
            http::Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("invalid :method {method:?}"))?,
        )
        .uri(uri.as_str());
    let map = builder
        .headers_mut()
        .ok_or_else(|| format!("invalid :path {path:?}"))?;
    // `host` first, where Envoy's codec writes `:authority`.
    if !authority.is_empty() {
        if let Ok(v) = HeaderValue::from_str(authority) {
            map.insert(http::header::HOST, v);
        }
    }
    // Every value of a repeated name goes on (a HeaderMap's by-value iterator names only the
    // first of each run).
    for (k, v) in header_map_of(headers).iter() {
        if !HOP_BY_HOP.contains(&k.as_str()) && k != http::header::HOST {
            map.append(k.clone(), v.clone());
        }
    }
    builder.body(body).map_err(|e| e.to_string())
}

fn response_builder(headers: &HeaderList) -> http::response::Builder {
    let status = header_str(headers, ":status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = Response::builder().status(status);
    if let Some(map) = builder.headers_mut() {
        // Filtered while building: HeaderMap::remove swap-removes, which reorders the rest.
        let kept: HeaderList = headers
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .cloned()
            .collect();
        *map = header_map_of(&kept);
    }
    builder
}

/// Moves every `name` field to the end, the others keeping their order (HeaderMap::remove
/// would swap the last field into the gap).
fn move_to_end(map: &mut http::HeaderMap, name: &HeaderName) {
    if !map.contains_key(name) {
        return;
    }
    let old = std::mem::take(map);
    let mut moved = Vec::new();
    for (k, v) in old.iter() {
        if k == name {
            moved.push(v.clone());
        } else {
            map.append(k.clone(), v.clone());
        }
    }
    for v in moved {
        map.append(name.clone(), v);
    }
}

/// A local reply's response as Envoy 1.40's `sendLocalReply` builds it: `:status`, the
/// plugin's headers in order, then for a body `content-length` (replacing a plugin's in place)
/// and `content-type: text/plain` when absent; an empty body drops both (the codec frames it).
fn local_response_parts(local: &crate::state::LocalResponse) -> Response<Body> {
    let mut headers = local.headers.clone();
    if local.body.is_empty() {
        headers.retain(|(k, _)| k != "content-length" && k != "content-type");
    } else {
        let len = local.body.len().to_string().into_bytes();
        match headers.iter_mut().find(|(k, _)| k == "content-length") {
            Some(entry) => entry.1 = len,
            None => headers.push(("content-length".into(), len)),
        }
        if !headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type".into(), b"text/plain".to_vec()));
        }
    }
    let mut list = vec![(":status".to_string(), local.status.to_string().into_bytes())];
    list.extend(headers);
    response_builder(&list)
        .body(body::full(local.body.clone()))
        .unwrap_or_else(|_| plain_response(500, "invalid local response headers"))
}

/// A short text response generated by the gateway itself (Envoy's local replies).
/// The response as Envoy's HTTP/1 codec frames it: a body without `content-length` (a plugin
/// removed it) goes chunked even when its size is known, where hyper would count it; and the
/// reason phrases where Envoy's table differs from the http crate's.
fn envoy_framing(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    if parts.status == http::StatusCode::NON_AUTHORITATIVE_INFORMATION {
        parts
            .extensions
            .insert(hyper::ext::ReasonPhrase::from_static(
                b"Non-Authoritative Information",
            ));
    }
    let sized = http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n > 0);
    let body = if sized && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        body::without_length(body)
    } else {
        body
    };
    Response::from_parts(parts, body)
}

pub fn plain_response(status: u16, text: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(text.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !text.is_empty() {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    resp
}

/// A response whose body fails at once: hyper then closes the connection, which is how a
/// stream reset looks on HTTP/1.1.
fn reset_response() -> Response<Body> {
    let (tx, b) = body::channel();
    drop(tx.try_send(Err("stream reset by the plugin".into())));
    let mut resp = Response::new(b);
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}
