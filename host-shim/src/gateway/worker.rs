//! One worker: its plugin VM (and when to replace it), its connections, and the way a request
//! enters: the connection manager's checks, then the plugin's phases or straight to the routed
//! cluster, with Envoy's failure policy when the VM has failed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, Mutex};

use crate::abi::HeaderList;
use crate::body::{self, Body};
use crate::conn_manager;
use crate::downstream::{DownstreamIo, RequestInFlight};
use crate::envoy_config::{RouteEntry, SocketAddress};
use crate::field_order::{FieldOrder, OrderedConnector};
use crate::redis_pool::RedisPool;

/// What a worker's `proxy_redis_call`s to one cluster go through: one Redis, or a Redis Cluster
/// (`envoy.clusters.redis`).
#[derive(Clone)]
pub(super) enum RedisBackend {
    One(RedisPool),
    Cluster(krowoc_relay::cluster::ClusterPool),
}
use crate::shared::SharedState;
use crate::state::StreamInfo;
use crate::vm::{FailurePolicy, Vm, VmError};

use super::convert::{
    build_request, closes_after, header_str, malformed_request_body, move_to_end,
    request_header_list, timed_out,
};
use super::replies::{
    envoy_framing, plain_response, rejection_response, reset_response, router_reply,
};
use super::stream::{FilteredStream, StreamFailure};
use super::{FilterSpec, GatewaySpec};

pub(super) struct VmSlot {
    pub(super) vm: Vm,
    pub(super) generation: u64,
    /// When this VM (or the last attempt to replace it) was loaded.
    pub(super) loaded_at: Instant,
}

/// One downstream connection counted against the overload manager's limit, shared by all
/// workers; released on drop.
pub(super) struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    pub(super) fn take(active: &Arc<AtomicUsize>, max: Option<usize>) -> Option<ConnectionSlot> {
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

pub(super) struct Worker {
    pub(super) index: usize,
    pub(super) spec: Arc<GatewaySpec>,
    pub(super) shared: Arc<SharedState>,
    pub(super) vm: Mutex<Option<VmSlot>>,
    pub(super) client: Client<OrderedConnector, Body>,
    pub(super) redis_pools: RefCell<HashMap<String, RedisBackend>>,
    /// Streams whose client went away before they finished: (context, VM generation).
    pub(super) abandoned: mpsc::UnboundedSender<(u32, u64)>,
    /// What Envoy appends to XFF for a loopback peer (its own address).
    pub(super) local_ip: IpAddr,
}

impl Worker {
    pub(super) fn new(
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

    pub(super) async fn start_vm(&self, filter: &FilterSpec) -> Result<Vm, VmError> {
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
    pub(super) fn vm_trapped(self: &Rc<Self>) {
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

    pub(super) async fn serve_connection(
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
    pub(super) fn fail_open(&self) -> bool {
        self.failure_policy().passes_failing_request()
    }

    /// What a request gets when the VM failed: Envoy's fail-closed 503, or a plain pass-through.
    pub(super) async fn fail_by_policy(
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
            Ok(resp) | Err(resp) => resp,
        }
    }

    pub(super) async fn send_upstream(
        &self,
        route: Option<&RouteEntry>,
        headers: HeaderList,
        body: Body,
    ) -> Result<Response<Body>, Response<Body>> {
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
                // The timeout runs on to the response's end, as Envoy's does: a body still
                // coming when it fires is cut.
                Ok(resp.map(|incoming| match timeout {
                    Some(t) => {
                        let shared = self.shared.clone();
                        body::until(body::boxed(incoming), (sent + t).into(), move || {
                            shared
                                .counters
                                .upstream_errors
                                .fetch_add(1, Ordering::Relaxed);
                        })
                    }
                    None => body::boxed(incoming),
                }))
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
