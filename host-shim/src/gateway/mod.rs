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
//!
//! This module starts the threads and their VMs; `worker` serves connections and forwards
//! requests, `stream` drives one request through the plugin's phases, `pumps` feeds bodies
//! through the body callbacks, `callouts` carries out what the plugin dispatched, `convert`
//! translates between hyper's types and the ABI's header lists, and `replies` builds the
//! responses the gateway sends itself.

mod callouts;
mod convert;
mod pumps;
mod replies;
mod stream;
mod worker;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::conn_manager::{self, ConnectionManagerConfig};
use crate::envoy_config::{RouteEntry, SocketAddress};
use crate::shared::{QueueReady, SharedState};
use crate::vm::{FailurePolicy, PluginModule, VmError, VmSettings};

use self::stream::finish;
use self::worker::{ConnectionSlot, VmSlot, Worker};

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
    /// The TLS of clusters with a `transport_socket`, built once at startup; host-shim speaks
    /// TLS to Redis clusters only (`proxy_redis_call`).
    pub redis_tls: HashMap<String, krowoc_relay::tls::RedisTls>,
    /// Clusters of `cluster_type` `envoy.clusters.redis`: Redis Clusters (`proxy_redis_call`
    /// routes each command to the master of its slot).
    pub redis_clusters: HashMap<String, crate::envoy_config::RedisClusterType>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy_config::PathMatch;

    fn route(name: &str, matcher: PathMatch) -> RouteEntry {
        RouteEntry {
            name: name.into(),
            matcher,
            cluster: "upstream".into(),
            timeout: None,
        }
    }

    #[test]
    fn the_first_route_whose_matcher_fits_the_path_without_its_query_wins() {
        let spec = GatewaySpec {
            workers: 1,
            routes: vec![
                route("exact", PathMatch::Path("/api/data".into())),
                route("query", PathMatch::Prefix("/api?".into())),
                route("api", PathMatch::Prefix("/api".into())),
            ],
            clusters: HashMap::new(),
            redis_tls: HashMap::new(),
            redis_clusters: HashMap::new(),
            filter: None,
            max_request_headers_bytes: 60 * 1024,
            stream_idle_timeout: None,
            connection_manager: ConnectionManagerConfig::default(),
            max_downstream_connections: None,
        };
        let name = |path: &str| spec.route_for(path).map(|r| r.name.as_str());
        assert_eq!(name("/api/data?page=2"), Some("exact"));
        assert_eq!(name("/api/data/1"), Some("api"));
        // The query is not part of what a prefix sees.
        assert_eq!(name("/api?x=1"), Some("api"));
        assert_eq!(name("/other"), None);
    }
}
