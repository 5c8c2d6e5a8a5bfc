//! What the plugin dispatched, carried out on its worker: HTTP calls to clusters, Higress Redis
//! calls on the worker's pools, ticks and shared-queue notifications, each answered through the
//! matching root-context callback.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::abi::{HeaderList, Status};
use crate::body;
use crate::redis_pool::{PoolError, PoolErrorKind, RedisEndpoint, RedisPool};
use krowoc_relay::cluster::{ClusterConfig, ClusterPool};

use super::worker::RedisBackend;
use crate::shared::QueueReady;
use crate::state::{Callout, HttpCallResponse};
use crate::vm::VmError;

use super::convert::{build_request, header_list_of, response_header_list};
use super::worker::Worker;

type BoxedErr = Box<dyn std::error::Error + Send + Sync>;

impl Worker {
    pub(super) fn dispatch(self: &Rc<Self>, callouts: Vec<Callout>, generation: u64) {
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
        if self.spec.redis_tls.contains_key(cluster) {
            // host-shim's HTTP client is plain; TLS is for Redis clusters.
            return fail(503, "upstream connect error or disconnect/reset before headers. reset reason: TLS is not supported for HTTP clusters by host-shim");
        }
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

    /// Runs a Redis query (Higress ABI) on this worker's pool for the cluster. The pool parses
    /// the query, once, as it counts the replies to wait for.
    async fn redis_callout(
        &self,
        cluster: &str,
        query: Vec<u8>,
    ) -> Result<Vec<u8>, RedisCallError> {
        let init = {
            let guard = self.vm.lock().await;
            guard
                .as_ref()
                .and_then(|s| s.vm.state().redis_clusters.get(cluster).cloned())
        };
        let Some(init) = init else {
            return Err(RedisCallError::NoCluster(format!(
                "redis cluster {cluster} was not initialised"
            )));
        };
        let pool = {
            let mut pools = self.redis_pools.borrow_mut();
            match pools.get(cluster) {
                Some(p) => p.clone(),
                None => {
                    let pool = self.redis_backend(cluster, &init)?;
                    pools.insert(cluster.to_string(), pool.clone());
                    pool
                }
            }
        };
        let replies = match pool {
            RedisBackend::One(pool) => pool.call(Bytes::from(query), init.timeout).await,
            RedisBackend::Cluster(cluster) => cluster.call(Bytes::from(query), init.timeout).await,
        };
        replies.map(|b| b.to_vec()).map_err(RedisCallError::Pool)
    }

    /// The pool for `cluster` as the VM initialised it: a Redis Cluster for a cluster of type
    /// `envoy.clusters.redis`, else one Redis; over TLS when the cluster has a transport socket.
    fn redis_backend(
        &self,
        cluster: &str,
        init: &crate::state::RedisInit,
    ) -> Result<RedisBackend, RedisCallError> {
        let base = crate::host::redis_call::cluster_base(cluster);
        let Some(addr) = self.spec.clusters.get(base) else {
            return Err(RedisCallError::NoCluster(format!("unknown cluster {base}")));
        };
        let tls = self.spec.redis_tls.get(base);
        let endpoint = RedisEndpoint {
            host: addr.host.clone(),
            port: addr.port,
            username: init.username.clone(),
            password: init.password.clone(),
            db: init.db,
            connect_timeout: init.timeout,
            tls: false,
        };
        let Some(redis) = self.spec.redis_clusters.get(base) else {
            return Ok(RedisBackend::One(match tls {
                Some(tls) => RedisPool::with_tls(endpoint, 2, tls.clone()),
                None => RedisPool::new(endpoint, 2),
            }));
        };
        if init.db.is_some_and(|d| d != 0) {
            return Err(RedisCallError::NoCluster(format!(
                "cluster {base} is a Redis Cluster, which has database 0 only"
            )));
        }
        Ok(RedisBackend::Cluster(ClusterPool::new(ClusterConfig {
            seeds: redis
                .seeds
                .iter()
                .map(|s| (s.host.clone(), s.port))
                .collect(),
            login: RedisEndpoint {
                db: None,
                tls: tls.is_some(),
                ..endpoint
            },
            tls: tls.cloned(),
            connections: 2,
            refresh: redis.refresh,
        })))
    }

    async fn deliver_redis(
        self: &Rc<Self>,
        token: u32,
        reply: Result<Vec<u8>, RedisCallError>,
        generation: u64,
    ) {
        let (status, reply) = match reply {
            Ok(r) => (REDIS_STATUS_OK, Some(r)),
            Err(e) => {
                tracing::debug!(kind = e.kind(), "redis call failed: {e}");
                let counters = &self.shared.counters;
                counters
                    .redis_callout_failures
                    .fetch_add(1, Ordering::Relaxed);
                match &e {
                    RedisCallError::Pool(p) if p.is_timeout() => &counters.redis_callout_timeouts,
                    RedisCallError::Pool(p) if p.is_invalid_request() => {
                        &counters.redis_callout_refusals
                    }
                    _ => &counters.redis_callout_unreachable,
                }
                .fetch_add(1, Ordering::Relaxed);
                (e.higress_status(), None)
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
    pub(super) fn after_callback(
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

    pub(super) async fn tick_loop(self: Rc<Self>) {
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

    pub(super) async fn queue_loop(self: Rc<Self>, mut rx: mpsc::UnboundedReceiver<QueueReady>) {
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

/// Higress's `RedisStatus`, the status `proxy_on_redis_call_response` passes: `Ok = 0` and
/// `NetworkError = 1` are all there is (higress-group/proxy-wasm-cpp-sdk, `proxy_wasm_enums.h`).
const REDIS_STATUS_OK: i32 = 0;
const REDIS_STATUS_NETWORK_ERROR: i32 = 1;

/// Why a Higress Redis call got no reply.
#[derive(Debug)]
enum RedisCallError {
    /// The call names a cluster this VM has not initialised, or one the gateway does not know:
    /// nothing was sent.
    NoCluster(String),
    /// The pool could not carry it (its kind says why).
    Pool(PoolError),
}

impl RedisCallError {
    /// What went wrong, for the log.
    fn kind(&self) -> &'static str {
        match self {
            RedisCallError::NoCluster(_) => "no cluster",
            RedisCallError::Pool(e) => e.kind().as_str(),
        }
    }

    /// The status the plugin's callback gets. Higress has one failure status: its Envoy
    /// answers every failure of a Redis call with `RedisStatus::NetworkError` and no reply
    /// (`Context::onRedisCallFailure` in source/extensions/common/wasm/context.cc), because its
    /// Redis async client's `onFailure` carries no reason: a refused connection, a timeout and a
    /// cancelled request look alike (source/common/redis/async_client_impl.cc). The kind still
    /// goes to the log and the counters. A malformed query is refused here before it is sent;
    /// Higress's Envoy sends the bytes unchecked and Redis answers them as it will.
    fn higress_status(&self) -> i32 {
        match self {
            RedisCallError::NoCluster(_) => REDIS_STATUS_NETWORK_ERROR,
            RedisCallError::Pool(e) => match e.kind() {
                PoolErrorKind::Unreachable
                | PoolErrorKind::Timeout
                | PoolErrorKind::Auth
                | PoolErrorKind::Tls
                | PoolErrorKind::Protocol
                | PoolErrorKind::InvalidRequest => REDIS_STATUS_NETWORK_ERROR,
            },
        }
    }
}

impl std::fmt::Display for RedisCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisCallError::NoCluster(message) => f.write_str(message),
            RedisCallError::Pool(e) => e.fmt(f),
        }
    }
}
