//! The Krowoc Edge demo upstream: the Redis integration guide's example endpoints and health
//! checks as an axum service, to stand behind the krowoc filter.
//!
//! The caching and rate limiting the guide did in application code are the filter's job; this
//! service only *marks* its responses for it (`Cache-Control`, `Cache-Tag`, the
//! [`invalidation`] header). Pub/Sub and the health checks are real: handlers PUBLISH on a
//! reconnecting connection, a background subscriber keeps the latest events in a ring buffer,
//! and `/health/deep` reports on Redis and the subscriber.
//!
//! | endpoint                     | what it does                                              |
//! |------------------------------|-----------------------------------------------------------|
//! | `GET /`                      | lists the endpoints                                       |
//! | `GET /health`                | liveness, no Redis ([`health`])                           |
//! | `GET /health/deep`           | Redis and subscriber checks, `application/health+json`    |
//! | `GET /api/cached-data`       | slow; `Cache-Control`, `Cache-Tag: user:<id>` ([`cached_data`]) |
//! | `POST /api/invalidate-cache` | answers with `x-krowoc-invalidate` ([`invalidation`])      |
//! | `POST /api/publish-event`    | PUBLISH, answers `receivers` ([`pubsub`])                  |
//! | `GET /api/recent-events`     | what the subscriber received, newest first                |
//! | `GET /api/events/stream`     | the same events live, as Server-Sent Events ([`event_stream`]) |
//! | `GET /api/rate-limited`, `GET /api/slow-limited` | plain answers ([`limited`])           |
//! | `GET /api/stats`             | call counters, for tests that prove the cache worked      |
//! | `GET /demo`                  | a page with the endpoints as buttons and the live feed ([`demo`]) |
//!
//! Errors are JSON, `{"error": {"kind", "message", "field"?}}`, with the status of their
//! [`ErrorKind`]. Timestamps are RFC 3339 in UTC with milliseconds, with a `*_unix_ms` twin.
//!
//! Redis is one server, a Redis Cluster or a Sentinel-managed master ([`deployment`]). The
//! service starts and serves while Redis is down (Redis endpoints answer 503, every Redis
//! call is bounded by `redis_timeout`) and recovers by itself when Redis returns, a cluster
//! promotes a replica, or the sentinels fail over.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let state = krowoc_upstream::AppState::start(krowoc_upstream::UpstreamConfig::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, krowoc_upstream::app(state)).await?;
//! # Ok(()) }
//! ```

pub mod bytes;
pub mod cached_data;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod deployment;
pub mod error;
pub mod event_stream;
pub mod events;
pub mod health;
pub mod index;
pub mod input;
pub mod invalidation;
pub mod limited;
pub mod pubsub;
pub mod redis_link;
pub mod sentinel;
pub mod subscriber;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

pub use config::UpstreamConfig;
pub use deployment::RedisDeployment;
pub use error::{Error, ErrorKind};

use events::EventLog;
use redis_link::RedisLink;
use subscriber::{SubscriberMonitor, SubscriberSettings};

/// The router with every endpoint; drive it in-process with `tower::ServiceExt::oneshot` or
/// serve it with `axum::serve`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(index::index))
        .route("/health", get(health::health))
        .route("/health/deep", get(health::health_deep))
        .route("/api/cached-data", get(cached_data::cached_data))
        .route("/api/invalidate-cache", post(cached_data::invalidate_cache))
        .route("/api/publish-event", post(pubsub::publish_event))
        .route("/api/recent-events", get(pubsub::recent_events))
        .route("/api/events/stream", get(event_stream::event_stream))
        .route("/api/rate-limited", get(limited::rate_limited))
        .route("/api/slow-limited", get(limited::slow_limited))
        .route("/api/stats", get(index::stats))
        .route("/api/bytes", get(bytes::bytes))
        .route("/demo", get(demo::page))
        .route("/demo/app.js", get(demo::script))
        .route("/demo/app.css", get(demo::style))
        .route("/demo/favicon.svg", get(demo::icon))
        .fallback(index::not_found)
        .method_not_allowed_fallback(index::method_not_allowed)
        .layer(middleware::from_fn(log_and_default_to_no_store))
        .with_state(state)
}

/// Responses that do not say how to cache them are `no-store`, so a filter honouring
/// `Cache-Control` stores only what is meant to be stored (`/api/cached-data`).
async fn log_and_default_to_no_store(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

/// Everything the handlers share. Cheap to clone; the subscriber task stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    config: UpstreamConfig,
    redis: RedisLink,
    events: Arc<EventLog>,
    subscriber: Arc<SubscriberMonitor>,
    stats: Stats,
    started: Instant,
    /// One permit per open event stream (`max_event_streams`).
    stream_slots: Arc<Semaphore>,
    /// Set once the service shuts down: every event stream ends.
    closing: watch::Sender<bool>,
    _subscriber_task: Option<AbortOnDrop>,
}

impl AppState {
    /// Validates `config`, prepares the Redis connection (without dialling: Redis may be down)
    /// and starts the background subscriber when channels are configured. Must be called inside
    /// a Tokio runtime.
    pub fn start(config: UpstreamConfig) -> Result<AppState, Error> {
        config.validate()?;
        let redis = RedisLink::new(
            &config.redis,
            config.redis_tls_ca.as_deref(),
            config.redis_timeout,
        )?;
        let events = Arc::new(EventLog::new(
            config.events_buffer,
            config.max_event_bytes,
            config.event_stream_buffer,
        ));
        let monitor = Arc::new(SubscriberMonitor::new(&config.channels));
        let task = (!config.channels.is_empty()).then(|| {
            let settings = SubscriberSettings {
                channels: config.channels.clone(),
                timeout: config.redis_timeout,
                backoff_initial: config.subscriber_backoff_initial,
                backoff_max: config.subscriber_backoff_max,
                ping_interval: config.subscriber_ping_interval,
            };
            AbortOnDrop(subscriber::spawn(
                redis.clone(),
                settings,
                events.clone(),
                monitor.clone(),
            ))
        });
        Ok(AppState(Arc::new(Shared {
            stream_slots: Arc::new(Semaphore::new(config.max_event_streams)),
            closing: watch::Sender::new(false),
            config,
            redis,
            events,
            subscriber: monitor,
            stats: Stats::default(),
            started: Instant::now(),
            _subscriber_task: task,
        })))
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.0.config
    }

    pub fn redis(&self) -> &RedisLink {
        &self.0.redis
    }

    pub fn events(&self) -> &EventLog {
        &self.0.events
    }

    pub fn subscriber(&self) -> &SubscriberMonitor {
        &self.0.subscriber
    }

    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }

    pub fn uptime(&self) -> Duration {
        self.0.started.elapsed()
    }

    /// A slot for one more event stream, held as long as the stream is open; `None` when all
    /// `max_event_streams` are taken.
    pub(crate) fn take_stream_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.0.stream_slots.clone().try_acquire_owned().ok()
    }

    /// Event streams open now.
    pub fn event_streams_open(&self) -> usize {
        self.0.config.max_event_streams - self.0.stream_slots.available_permits()
    }

    /// Ends every event stream, now and from now on: a graceful shutdown waits for open
    /// responses, and an event stream never ends by itself.
    pub fn close_event_streams(&self) {
        self.0.closing.send_replace(true);
    }

    /// Becomes `true` when [`AppState::close_event_streams`] is called.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.0.closing.subscribe()
    }
}

/// A task that stops when its handle's owner is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Calls that reached each handler since start (shown by `GET /api/stats`).
#[derive(Debug, Default)]
pub struct Stats {
    pub cached_data_calls: AtomicU64,
    pub invalidations: AtomicU64,
    pub events_published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub rate_limited_calls: AtomicU64,
    pub slow_limited_calls: AtomicU64,
    /// `GET /api/events/stream` clients served, and refused for want of a slot.
    pub event_streams_opened: AtomicU64,
    pub event_streams_refused: AtomicU64,
    /// Events stream clients skipped because they fell behind (or resumed past the buffer).
    pub event_stream_skipped: AtomicU64,
}

impl Stats {
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "cached_data_calls": get(&self.cached_data_calls),
            "invalidations": get(&self.invalidations),
            "events_published": get(&self.events_published),
            "publish_failures": get(&self.publish_failures),
            "rate_limited_calls": get(&self.rate_limited_calls),
            "slow_limited_calls": get(&self.slow_limited_calls),
            "event_streams_opened": get(&self.event_streams_opened),
            "event_streams_refused": get(&self.event_streams_refused),
            "event_stream_skipped": get(&self.event_stream_skipped),
        })
    }
}
