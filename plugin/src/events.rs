//! Request events: one JSON event per request (the guide's `RedisPubSub.publish`, done by the
//! edge), queued in the VM and written to Redis in batches, off the request path.
//!
//! A request's life here: its facts are noted when its headers arrive ([`EventPublisher::on_request`],
//! where sampling is decided on the request id) in an [`OpenEvent`] the request's record keeps,
//! the filter's decisions are noted on it ([`OpenEvent::note_rate_limit`],
//! [`OpenEvent::note_cache`]), and the event is built in `on_log` ([`EventPublisher::on_log`])
//! and pushed on a bounded queue. When the queue is full the oldest event is dropped and counted.
//!
//! Flushing happens only on the root context's tick ([`EventPublisher::flush`]): a full batch is
//! sent at the next tick, a partial one once its oldest event has waited `flush_interval`. Why
//! not from `on_log` when a batch fills: a callout dispatched from a request context belongs to
//! it — Envoy cancels it when that context is deleted (right after `on_log`), and the Rust SDK
//! routes its answer to the (gone) context — so a flush must be made by the root context.
//!
//! One flush is one Redis call:
//! * transport `relay`: the batch's `PUBLISH`/`XADD` commands pipelined in one relay body
//!   (the relay answers with one reply per command);
//! * transport `redis_call`: Higress hosts forward exactly one command per call, so the batch is
//!   one `EVALSHA` of `scripts/events_flush.lua` (`EVAL` on NOSCRIPT) that runs the same
//!   commands inside Redis.
//!
//! A flush that fails for a reason that may pass (timeout, Redis or relay unreachable, breaker
//! open, `LOADING`…) puts its events back at the front of the queue, so events survive an outage
//! up to `queue_limit` and are written when Redis returns; delivery is at least once (a timed-out
//! flush may have been written): consumers deduplicate by `id`. Events Redis refuses (an error
//! reply such as `WRONGTYPE` for that event) are counted and not retried.

use crate::config::events::{EventPolicy, EventsConfig, FieldSource};
use crate::config::{Config, Transport};
use crate::host::{self, define_metric, increment_metric, record_metric};
use crate::host::{METRIC_COUNTER, METRIC_GAUGE, METRIC_HISTOGRAM};
use crate::http::RequestInfo;
use crate::ratelimit::Tally;
use crate::redis::client::{Purpose, RedisClient, Wire};
use crate::redis::error::{RedisError, RedisErrorKind};
use crate::redis::resp::{encode_array, Command, Reply};
use crate::redis::scripts::Script;
pub use crate::redis::scripts::EVENTS_FLUSH_LUA;
use proxy_wasm::types::LogLevel;
use serde::Serialize;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

/// `event_type` of the filter's events.
pub const EVENT_TYPE: &str = "http_request";
/// Field name of the event in stream entries (`XADD key ... * event <json>`).
pub const STREAM_FIELD: &str = "event";
/// Client-supplied values are cut to these lengths, so an event's size is bounded.
pub const MAX_PATH_BYTES: usize = 2048;
pub const MAX_FIELD_BYTES: usize = 512;
pub const MAX_ID_BYTES: usize = 128;

/// One event as published (field order is the JSON's).
#[derive(Debug, Serialize)]
pub struct RequestEvent<'a> {
    pub event_type: &'static str,
    /// A UUID the filter generates: consumers deduplicate by it, so a client never chooses it.
    pub id: &'a str,
    /// The request's `x-request-id` (trimmed, bounded); None when it had none.
    pub request_id: Option<&'a str>,
    /// When the request's headers arrived, RFC 3339 UTC with milliseconds.
    pub timestamp: String,
    pub timestamp_unix_ms: u64,
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub route: Option<&'a str>,
    /// None when no response was sent (the client went away).
    pub status: Option<u16>,
    pub duration_ms: f64,
    pub client: Option<&'a str>,
    /// The cache's decision (`HIT`, `MISS`, `BYPASS`, …); None where no cache policy applied.
    pub cache: Option<&'a str>,
    /// The rate limiter's decision; None where no rate limit applied.
    pub rate_limit: Option<&'static str>,
    /// Share of requests sampled (1 = every request), to scale counts by.
    pub sample_ratio: f64,
    /// Extra fields from headers (null when the header was absent).
    #[serde(flatten)]
    pub fields: BTreeMap<&'a str, Option<&'a str>>,
}

/// The rate limiter's decision as events name it.
pub fn rate_limit_label(tally: Tally) -> &'static str {
    match tally {
        Tally::Allowed => "allowed",
        Tally::Denied => "denied",
        Tally::ShadowDenied => "shadow_denied",
        Tally::FallbackAllowed => "fallback_allowed",
        Tally::FallbackDenied => "fallback_denied",
        Tally::Skipped => "skipped",
    }
}

/// What the host tells about the response in `on_log`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub status: Option<u16>,
    /// Response headers; read only when an extra field needs them.
    pub headers: Vec<(String, String)>,
}

/// Reads the response's status (and its headers when `want_headers`) from the host, in `on_log`.
pub fn host_response(want_headers: bool) -> ResponseFacts {
    let headers = if want_headers {
        host::header_pairs(host::MAP_RESPONSE_HEADERS)
    } else {
        Vec::new()
    };
    let from_headers = |h: &[(String, String)]| {
        h.iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.trim().parse::<u16>().ok())
    };
    let status = from_headers(&headers)
        .or_else(|| {
            // Envoy serialises integers as 8 bytes little-endian; 0 means no response.
            let b = host::property(&["response", "code"])?;
            let code = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
            u16::try_from(code).ok().filter(|c| *c > 0)
        })
        .or_else(|| {
            if want_headers {
                None
            } else {
                from_headers(&host::header_pairs(host::MAP_RESPONSE_HEADERS))
            }
        });
    ResponseFacts { status, headers }
}

/// A request's event from its start to `on_log`, kept in the request's record.
#[derive(Clone, Debug)]
pub struct OpenEvent {
    route: Option<usize>,
    id: String,
    request_id: Option<String>,
    start_ns: u64,
    method: String,
    path: String,
    client: Option<String>,
    /// One per policy field: the request header's value (response fields are read at the end).
    request_fields: Vec<Option<String>>,
    rate_limit: Option<&'static str>,
    cache: Option<&'static str>,
}

impl OpenEvent {
    /// The rate limiter decided.
    pub fn note_rate_limit(&mut self, tally: Tally) {
        self.rate_limit = Some(rate_limit_label(tally));
    }

    /// The cache decided (`HIT`, `MISS`, `BYPASS`, `STALE`, …).
    pub fn note_cache(&mut self, status: &'static str) {
        self.cache = Some(status);
    }
}

/// One event waiting to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The JSON text.
    pub payload: String,
    /// Route index (None: no route); its policy says where the event goes.
    pub route: Option<usize>,
    pub queued_ms: u64,
}

/// Counters since the VM started (the metrics report their deltas).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events built and queued.
    pub recorded: u64,
    /// Requests without an event because of sampling.
    pub sampled_out: u64,
    /// Events Redis confirmed.
    pub published: u64,
    /// Events dropped because the queue was full (the oldest first).
    pub dropped: u64,
    /// Events Redis refused (an error reply for that event); not retried.
    pub rejected: u64,
    /// Flush calls sent.
    pub flushes: u64,
    /// Events sent in those calls (retries included).
    pub flushed_events: u64,
    /// Flush calls that failed (their events are queued again when the failure may pass).
    pub flush_failures: u64,
    /// Events put back on the queue after a failed flush.
    pub requeued: u64,
}

#[derive(Clone, Debug, Default)]
struct EventMetrics {
    recorded: Option<u32>,
    sampled_out: Option<u32>,
    published: Option<u32>,
    dropped: Option<u32>,
    rejected: Option<u32>,
    flushes: Option<u32>,
    flush_failures: Option<u32>,
    requeued: Option<u32>,
    queued: Option<u32>,
    batch_size: Option<u32>,
    reported: EventStats,
    reported_queue: usize,
}

impl EventMetrics {
    fn define() -> EventMetrics {
        let counter = |name: &str| define_metric(METRIC_COUNTER, name);
        EventMetrics {
            recorded: counter("krowoc.events.recorded"),
            sampled_out: counter("krowoc.events.sampled_out"),
            published: counter("krowoc.events.published"),
            dropped: counter("krowoc.events.dropped"),
            rejected: counter("krowoc.events.rejected"),
            flushes: counter("krowoc.events.flushes"),
            flush_failures: counter("krowoc.events.flush_failures"),
            requeued: counter("krowoc.events.requeued"),
            queued: define_metric(METRIC_GAUGE, "krowoc.events.queued"),
            batch_size: define_metric(METRIC_HISTOGRAM, "krowoc.events.batch_size"),
            reported: EventStats::default(),
            reported_queue: 0,
        }
    }

    fn report(&mut self, stats: EventStats, queue_len: usize) {
        let d = |now: u64, before: u64| i64::try_from(now.saturating_sub(before)).unwrap_or(0);
        let r = self.reported;
        for (id, delta) in [
            (self.recorded, d(stats.recorded, r.recorded)),
            (self.sampled_out, d(stats.sampled_out, r.sampled_out)),
            (self.published, d(stats.published, r.published)),
            (self.dropped, d(stats.dropped, r.dropped)),
            (self.rejected, d(stats.rejected, r.rejected)),
            (self.flushes, d(stats.flushes, r.flushes)),
            (
                self.flush_failures,
                d(stats.flush_failures, r.flush_failures),
            ),
            (self.requeued, d(stats.requeued, r.requeued)),
        ] {
            if delta > 0 {
                increment_metric(id, delta);
            }
        }
        self.reported = stats;
        // The gauge is shared by every VM: each adds its own change.
        let change = i64::try_from(queue_len).unwrap_or(i64::MAX)
            - i64::try_from(self.reported_queue).unwrap_or(i64::MAX);
        if change != 0 {
            increment_metric(self.queued, change);
        }
        self.reported_queue = queue_len;
    }
}

/// A flush awaiting its answer.
#[derive(Debug)]
struct InFlight {
    events: Vec<QueuedEvent>,
}

/// The request events of one filter instance (one per VM).
pub struct EventPublisher {
    config: EventsConfig,
    route_names: Vec<String>,
    trusted_hops: u32,
    transport: Transport,
    script: Script,
    ids: IdGenerator,
    queue: VecDeque<QueuedEvent>,
    in_flight: HashMap<u32, InFlight>,
    next_flush: u32,
    pub stats: EventStats,
    metrics: EventMetrics,
    warned_rejection: bool,
}

impl EventPublisher {
    pub fn new(config: &Config) -> EventPublisher {
        EventPublisher {
            config: config.events.clone(),
            route_names: config.routes.iter().map(|r| r.name.clone()).collect(),
            trusted_hops: config.client_ip.trusted_hops,
            transport: config.redis.transport,
            script: Script::new("events_flush", EVENTS_FLUSH_LUA),
            ids: IdGenerator::new(),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            next_flush: 0,
            stats: EventStats::default(),
            metrics: if config.events.enabled() {
                EventMetrics::define()
            } else {
                EventMetrics::default()
            },
            warned_rejection: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// Whether a request on `route` (None: no route matched) is recorded.
    pub fn applies_to(&self, route: Option<usize>) -> bool {
        self.enabled() && self.config.policy(route).is_some()
    }

    /// The tick period events need (None when events are off).
    pub fn tick_period_ms(&self) -> Option<u64> {
        self.enabled().then_some(self.config.flush_interval_ms)
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Opens a request's event when its headers arrive (`now_ns`: the host's clock; `route`: the
    /// route it matched). None when it has no event (events off for it, or sampled out).
    pub fn on_request(
        &mut self,
        now_ns: u64,
        req: &RequestInfo,
        route: Option<usize>,
    ) -> Option<OpenEvent> {
        if !self.enabled() {
            return None;
        }
        let policy = self.config.policy(route)?;
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let request_id = header("x-request-id")
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(|id| truncate(id, MAX_ID_BYTES));
        let id = self.ids.next_uuid();
        // The request id when there is one, so every gateway on the request's path decides alike.
        if !sampled(request_id.unwrap_or(&id), policy.sample_ratio) {
            self.stats.sampled_out += 1;
            return None;
        }
        let request_id = request_id.map(str::to_string);
        let request_fields = policy
            .fields
            .iter()
            .map(|f| match &f.source {
                FieldSource::RequestHeader(h) => {
                    header(h).map(|v| truncate(v, MAX_FIELD_BYTES).to_string())
                }
                FieldSource::ResponseHeader(_) => None,
            })
            .collect();
        Some(OpenEvent {
            route,
            id,
            request_id,
            start_ns: now_ns,
            method: truncate(&req.method, 32).to_string(),
            path: truncate(req.path(), MAX_PATH_BYTES).to_string(),
            client: req.client_ip(self.trusted_hops),
            request_fields,
            rate_limit: None,
            cache: None,
        })
    }

    /// Builds and queues a request's event; `read_response` is asked for the response's facts
    /// (with headers when a field needs them).
    pub fn on_log(
        &mut self,
        open: OpenEvent,
        now_ns: u64,
        read_response: impl FnOnce(bool) -> ResponseFacts,
    ) {
        let Some(policy) = self.config.policy(open.route) else {
            return;
        };
        let response = read_response(policy.wants_response_headers());
        let payload = build_event(
            &open,
            policy,
            self.route_name(open.route),
            &response,
            now_ns,
        );
        self.enqueue(QueuedEvent {
            payload,
            route: open.route,
            queued_ms: now_ns / 1_000_000,
        });
        self.stats.recorded += 1;
    }

    fn route_name(&self, route: Option<usize>) -> Option<&str> {
        route
            .and_then(|i| self.route_names.get(i))
            .map(String::as_str)
    }

    /// Pushes an event, dropping the oldest when the queue is full.
    pub fn enqueue(&mut self, event: QueuedEvent) {
        while self.queue.len() >= self.config.queue_limit {
            self.queue.pop_front();
            self.stats.dropped += 1;
        }
        self.queue.push_back(event);
    }

    /// Sends what is due: every full batch, and a partial one whose oldest event has waited
    /// `flush_interval`, up to `max_in_flight` flushes awaiting answers. Called on the tick.
    pub fn flush(&mut self, client: &mut RedisClient, wire: &mut dyn Wire, now_ms: u64) {
        while self.in_flight.len() < self.config.max_in_flight {
            let Some(oldest) = self.queue.front() else {
                break;
            };
            let full = self.queue.len() >= self.config.batch_size;
            let waited = now_ms.saturating_sub(oldest.queued_ms) >= self.config.flush_interval_ms;
            if !full && !waited {
                break;
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                break;
            }
            let id = self.next_flush_id();
            let sent = match self.transport {
                Transport::Relay => {
                    let (payload, commands) = pipeline_payload(&batch, &self.config);
                    client.call_pipeline(wire, now_ms, id, Purpose::Events, &payload, commands)
                }
                Transport::RedisCall => {
                    let (evalsha, eval) = script_commands(&self.script, &batch, &self.config);
                    client.call(wire, now_ms, id, Purpose::Events, &evalsha, Some(eval))
                }
            };
            match sent {
                Ok(_) => {
                    self.stats.flushes += 1;
                    self.stats.flushed_events += batch.len() as u64;
                    record_metric(
                        self.metrics.batch_size,
                        i64::try_from(batch.len()).unwrap_or(i64::MAX),
                    );
                    self.in_flight.insert(id, InFlight { events: batch });
                }
                Err(e) => {
                    self.fail(batch, &e);
                    break;
                }
            }
        }
        self.report();
    }

    /// The answer to flush `flush_id` (a completion of [`Purpose::Events`]).
    pub fn on_flush_done(&mut self, flush_id: u32, result: Result<Reply, RedisError>) {
        let Some(flight) = self.in_flight.remove(&flush_id) else {
            return;
        };
        match result {
            Ok(reply) => {
                let outcome = match self.transport {
                    Transport::Relay => pipeline_outcome(&flight.events, &self.config, &reply),
                    Transport::RedisCall => script_outcome(&reply),
                };
                match outcome {
                    Some(o) => {
                        self.stats.published += o.written;
                        if o.refused > 0 {
                            self.stats.rejected += o.refused;
                            self.warn_rejection(o.refused, &o.first_error);
                        }
                    }
                    None => {
                        let n = flight.events.len() as u64;
                        self.stats.flush_failures += 1;
                        self.stats.rejected += n;
                        self.warn_rejection(n, "the reply to the flush was not the expected shape");
                    }
                }
            }
            Err(e) => self.fail(flight.events, &e),
        }
        self.report();
    }

    /// A flush that failed as a whole: its events go back to the queue when the failure may pass.
    fn fail(&mut self, batch: Vec<QueuedEvent>, e: &RedisError) {
        if e.kind != RedisErrorKind::BreakerOpen {
            self.stats.flush_failures += 1;
            host::log(
                LogLevel::Debug,
                &format!("krowoc-edge: events: flush of {} failed: {e}", batch.len()),
            );
        }
        if !retryable(e) {
            self.stats.rejected += batch.len() as u64;
            self.warn_rejection(batch.len() as u64, &e.to_string());
            return;
        }
        if e.kind != RedisErrorKind::BreakerOpen {
            self.stats.requeued += batch.len() as u64;
        }
        for event in batch.into_iter().rev() {
            self.queue.push_front(event);
        }
        while self.queue.len() > self.config.queue_limit {
            self.queue.pop_front();
            self.stats.dropped += 1;
        }
    }

    fn warn_rejection(&mut self, n: u64, why: &str) {
        // Once per VM at warn (a misconfiguration would otherwise log on every flush).
        let level = if self.warned_rejection {
            LogLevel::Debug
        } else {
            LogLevel::Warn
        };
        self.warned_rejection = true;
        host::log(
            level,
            &format!("krowoc-edge: events: Redis refused {n} event(s): {why}"),
        );
    }

    /// Takes up to `batch_size` events from the front; a batch holds events of at most one
    /// stream key (so the script call touches one Redis Cluster slot).
    fn take_batch(&mut self) -> Vec<QueuedEvent> {
        let mut batch = Vec::with_capacity(self.config.batch_size.min(self.queue.len()));
        let mut stream_key: Option<&str> = None;
        while batch.len() < self.config.batch_size {
            let Some(next) = self.queue.front() else {
                break;
            };
            let key = self
                .config
                .policy(next.route)
                .and_then(|p| p.stream.as_ref())
                .map(|s| s.key.as_str());
            if let (Some(k), Some(current)) = (key, stream_key) {
                if k != current {
                    break;
                }
            }
            stream_key = stream_key.or(key);
            if let Some(event) = self.queue.pop_front() {
                batch.push(event);
            }
        }
        batch
    }

    fn next_flush_id(&mut self) -> u32 {
        loop {
            self.next_flush = self.next_flush.wrapping_add(1);
            if !self.in_flight.contains_key(&self.next_flush) {
                return self.next_flush;
            }
        }
    }

    /// Adds the counters' changes to the metrics.
    pub fn report(&mut self) {
        self.metrics.report(self.stats, self.queue.len());
    }
}

/// Whether a whole-flush failure may pass by itself (so its events are worth keeping).
pub fn retryable(e: &RedisError) -> bool {
    match e.kind {
        RedisErrorKind::Timeout
        | RedisErrorKind::Unavailable
        | RedisErrorKind::Dispatch
        | RedisErrorKind::BreakerOpen => true,
        RedisErrorKind::Server(kind) => kind.is_unhealthy(),
        RedisErrorKind::Refused | RedisErrorKind::Protocol => false,
    }
}

/// The JSON text of a request's event.
fn build_event(
    open: &OpenEvent,
    policy: &EventPolicy,
    route: Option<&str>,
    response: &ResponseFacts,
    now_ns: u64,
) -> String {
    let unix_ms = open.start_ns / 1_000_000;
    let elapsed_us = now_ns.saturating_sub(open.start_ns) / 1_000;
    let mut fields = BTreeMap::new();
    for (field, from_request) in policy.fields.iter().zip(&open.request_fields) {
        let value = match &field.source {
            FieldSource::RequestHeader(_) => from_request.as_deref(),
            FieldSource::ResponseHeader(h) => response
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map(|(_, v)| truncate(v, MAX_FIELD_BYTES)),
        };
        fields.insert(field.name.as_str(), value);
    }
    let event = RequestEvent {
        event_type: EVENT_TYPE,
        id: &open.id,
        request_id: open.request_id.as_deref(),
        timestamp: rfc3339_ms(unix_ms),
        timestamp_unix_ms: unix_ms,
        method: &open.method,
        path: &open.path,
        route,
        status: response.status,
        duration_ms: elapsed_us as f64 / 1_000.0,
        client: open.client.as_deref(),
        cache: open.cache,
        rate_limit: open.rate_limit,
        sample_ratio: policy.sample_ratio,
        fields,
    };
    write_event(&event, elapsed_us)
}

/// The event's JSON text, exactly as `serde_json` writes [`RequestEvent`] (a test holds them
/// to it), written by hand: this runs once per request, and serde_json built for size (the
/// `wasm` profile) costs several times more.
fn write_event(e: &RequestEvent<'_>, elapsed_us: u64) -> String {
    let request_id_len = e.request_id.map_or(0, str::len);
    let mut out = String::with_capacity(340 + e.path.len() + e.id.len() + request_id_len);
    out.push_str("{\"event_type\":");
    push_json_str(&mut out, e.event_type);
    out.push_str(",\"id\":");
    push_json_str(&mut out, e.id);
    out.push_str(",\"request_id\":");
    push_json_opt(&mut out, e.request_id);
    out.push_str(",\"timestamp\":");
    push_json_str(&mut out, &e.timestamp);
    out.push_str(",\"timestamp_unix_ms\":");
    push_u64(&mut out, e.timestamp_unix_ms);
    out.push_str(",\"method\":");
    push_json_str(&mut out, e.method);
    out.push_str(",\"path\":");
    push_json_str(&mut out, e.path);
    out.push_str(",\"route\":");
    push_json_opt(&mut out, e.route);
    out.push_str(",\"status\":");
    match e.status {
        Some(s) => push_u64(&mut out, u64::from(s)),
        None => out.push_str("null"),
    }
    // Milliseconds with up to three decimals, as the shortest float text of `us / 1000`.
    out.push_str(",\"duration_ms\":");
    push_u64(&mut out, elapsed_us / 1_000);
    out.push('.');
    let frac = elapsed_us % 1_000;
    let frac_digits = [frac / 100, frac / 10 % 10, frac % 10];
    // Trailing zeros go, but one digit stays: 2.5, 1.0, 0.125.
    let keep = frac_digits
        .iter()
        .rposition(|d| *d != 0)
        .map_or(1, |i| i + 1);
    for d in &frac_digits[..keep] {
        out.push(char::from(b'0' + *d as u8));
    }
    out.push_str(",\"client\":");
    push_json_opt(&mut out, e.client);
    out.push_str(",\"cache\":");
    push_json_opt(&mut out, e.cache);
    out.push_str(",\"rate_limit\":");
    push_json_opt(&mut out, e.rate_limit);
    out.push_str(",\"sample_ratio\":");
    if e.sample_ratio == 1.0 {
        out.push_str("1.0");
    } else {
        out.push_str(&serde_json::to_string(&e.sample_ratio).unwrap_or_else(|_| "null".into()));
    }
    for (name, value) in &e.fields {
        out.push(',');
        push_json_str(&mut out, name);
        out.push(':');
        push_json_opt(&mut out, *value);
    }
    out.push('}');
    out
}

fn push_u64(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"));
}

fn push_json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string with serde_json's escapes: `\"`, `\\`, `\b \f \n \r \t`, other control
/// characters as `\u00XX`; everything else (UTF-8 included) as is.
fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut plain_from = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain_from..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        plain_from = i + 1;
    }
    out.push_str(&s[plain_from..]);
    out.push('"');
}

/// The relay form of a batch: each event's PUBLISH and/or XADD, in queue order, encoded back
/// to back (straight from the queued events: no per-command copies); and how many commands.
pub fn pipeline_payload(batch: &[QueuedEvent], config: &EventsConfig) -> (Vec<u8>, usize) {
    let size: usize = batch.iter().map(|e| 2 * e.payload.len() + 160).sum();
    let mut out = Vec::with_capacity(size);
    let mut commands = 0;
    let mut maxlen = String::new();
    for event in batch {
        let Some(policy) = config.policy(event.route) else {
            continue;
        };
        let payload = event.payload.as_bytes();
        if let Some(channel) = &policy.channel {
            encode_array(&mut out, &[b"PUBLISH", channel.as_bytes(), payload]);
            commands += 1;
        }
        if let Some(stream) = &policy.stream {
            maxlen.clear();
            maxlen.push_str(&stream.maxlen.to_string());
            encode_array(
                &mut out,
                &[
                    b"XADD".as_slice(),
                    stream.key.as_bytes(),
                    b"MAXLEN",
                    b"~",
                    maxlen.as_bytes(),
                    b"*",
                    STREAM_FIELD.as_bytes(),
                    payload,
                ],
            );
            commands += 1;
        }
    }
    (out, commands)
}

/// The `redis_call` form of a batch: `EVALSHA` of the flush script, and the `EVAL` sent instead
/// on NOSCRIPT (see `scripts/events_flush.lua` for the arguments).
pub fn script_commands(
    script: &Script,
    batch: &[QueuedEvent],
    config: &EventsConfig,
) -> (Command, Command) {
    let stream = batch
        .iter()
        .find_map(|e| config.policy(e.route).and_then(|p| p.stream.as_ref()));
    let keys = usize::from(stream.is_some()).to_string();
    let maxlen = stream.map_or_else(|| "0".to_string(), |s| s.maxlen.to_string());
    let build = |name: &str, first: &str| {
        let mut c = Command::new(name).arg(first).arg(&keys);
        if let Some(s) = stream {
            c = c.arg(&s.key);
        }
        c = c.arg(&maxlen);
        for event in batch {
            let policy = config.policy(event.route);
            let channel = policy.and_then(|p| p.channel.as_deref()).unwrap_or("");
            let to_stream = policy.is_some_and(|p| p.stream.is_some());
            c = c
                .arg(channel)
                .arg(if to_stream { "1" } else { "0" })
                .arg(&event.payload);
        }
        c
    };
    (build("EVALSHA", &script.sha1), build("EVAL", script.source))
}

/// What Redis did with a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    pub written: u64,
    pub refused: u64,
    pub first_error: String,
}

/// Reads the replies of a pipelined batch: an event is written when every command for it
/// succeeded. None when the reply does not match the batch.
pub fn pipeline_outcome(
    batch: &[QueuedEvent],
    config: &EventsConfig,
    reply: &Reply,
) -> Option<FlushOutcome> {
    let Reply::Array(replies) = reply else {
        return None;
    };
    let mut replies = replies.iter();
    let mut outcome = FlushOutcome::default();
    for event in batch {
        let n = config
            .policy(event.route)
            .map_or(0, EventPolicy::commands_per_event);
        let mut good = true;
        for _ in 0..n {
            if let Reply::Error(msg) = replies.next()? {
                good = false;
                if outcome.first_error.is_empty() {
                    outcome.first_error = msg.clone();
                }
            }
        }
        if good {
            outcome.written += 1;
        } else {
            outcome.refused += 1;
        }
    }
    replies.next().is_none().then_some(outcome)
}

/// Reads the flush script's reply `{written, refused, first_error}`.
pub fn script_outcome(reply: &Reply) -> Option<FlushOutcome> {
    let Reply::Array(items) = reply else {
        return None;
    };
    let [written, refused, error] = items.as_slice() else {
        return None;
    };
    Some(FlushOutcome {
        written: u64::try_from(written.as_int()?).ok()?,
        refused: u64::try_from(refused.as_int()?).ok()?,
        first_error: match error {
            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        },
    })
}

/// Sampling decided on the request id, so every gateway decides the same for one request.
pub fn sampled(id: &str, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    // FNV-1a, then a final mix so similar ids spread over the whole range.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h as f64) < ratio * (u64::MAX as f64)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `2024-05-06T07:08:09.123Z` for milliseconds since the Unix epoch (years 0 to 9999).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    // Written digit by digit: this runs once per request, and `format!` costs ~10x more.
    let mut out = String::with_capacity(24);
    let mut digits = |n: u64, width: u32, sep: char| {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + ((n / 10u64.pow(i)) % 10) as u8));
        }
        out.push(sep);
    };
    digits(u64::try_from(y).unwrap_or(0), 4, '-');
    digits(u64::from(m), 2, '-');
    digits(u64::from(d), 2, 'T');
    digits(rem / 3600, 2, ':');
    digits((rem % 3600) / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(unix_ms % 1000, 3, 'Z');
    out
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Event ids: UUIDs in the version 4 layout from a splitmix64 sequence whose start is drawn
/// from WASI `random_get` per VM, so VMs and gateways sharing a channel do not collide; no extra
/// dependency. Ids need to be unique, not unguessable (clients never see or choose them).
struct IdGenerator {
    state: u64,
}

impl IdGenerator {
    fn new() -> IdGenerator {
        IdGenerator {
            // Natively (unit tests) or if the host refuses: std's randomly keyed hasher.
            state: host::random_u64()
                .unwrap_or_else(|| RandomState::new().hash_one(0x6b72_6f77_6f63u64)),
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_uuid(&mut self) -> String {
        let hi = (self.next_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let lo = (self.next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let bits = (u128::from(hi) << 64) | u128::from(lo);
        let mut out = String::with_capacity(36);
        for i in 0..32 {
            if matches!(i, 8 | 12 | 16 | 20) {
                out.push('-');
            }
            let nibble = ((bits >> (124 - 4 * i)) & 0xf) as u8;
            out.push(char::from(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::redis::client::recording::RecordingWire;
    use crate::redis::client::RawReply;
    use serde_json::Value;

    fn recorder() -> RecordingWire {
        RecordingWire::default()
    }

    fn config(json: &str) -> Config {
        parse_config(json.as_bytes()).unwrap_or_else(|e| panic!("config refused: {e:?}"))
    }

    const ROUTES: &str = r#""routes": [
        {"name": "limited", "match": {"path": "/api/rate-limited"},
         "rate_limit": {"limits": [{"limit": 5, "window": "60s"}]}},
        {"name": "quiet", "match": {"prefix": "/quiet"}, "events": {"enabled": false}}
    ]"#;

    fn request(path: &str, headers: &[(&str, &str)]) -> RequestInfo {
        RequestInfo {
            path: path.to_string(),
            method: "GET".to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source_address: Some("10.1.2.3:5555".to_string()),
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseFacts {
        ResponseFacts {
            status: Some(status),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Runs one request through the publisher and returns its event (None if none was queued).
    /// Opens a request's event as the filter does: on the route its request line matches.
    fn open(
        p: &mut EventPublisher,
        cfg: &Config,
        now_ns: u64,
        req: &RequestInfo,
    ) -> Option<OpenEvent> {
        p.on_request(now_ns, req, cfg.route_for(req.path(), &req.method))
    }

    /// One request without decisions: opened, then logged with an empty response.
    fn pass(p: &mut EventPublisher, cfg: &Config, req: &RequestInfo) {
        if let Some(event) = open(p, cfg, 0, req) {
            p.on_log(event, 0, |_| ResponseFacts::default());
        }
    }

    fn one_event(
        p: &mut EventPublisher,
        cfg: &Config,
        req: &RequestInfo,
        resp: ResponseFacts,
    ) -> Option<Value> {
        let before = p.queue_len();
        if let Some(mut event) = open(p, cfg, 1_700_000_000_123_000_000, req) {
            event.note_rate_limit(Tally::Allowed);
            p.on_log(event, 1_700_000_000_125_500_000, |_| resp);
        }
        (p.queue_len() > before).then(|| {
            let last = p.queue.back().expect("queued");
            serde_json::from_str(&last.payload).expect("event is JSON")
        })
    }

    #[test]
    fn event_has_the_documented_fields_in_order() {
        let cfg = config(&format!(
            r#"{{"events": {{"fields": [{{"name": "user_agent", "request_header": "User-Agent"}},
                                        {{"name": "content_type", "response_header": "content-type"}},
                                        {{"name": "absent", "request_header": "x-none"}}]}},
                {ROUTES}}}"#
        ));
        let mut p = EventPublisher::new(&cfg);
        let req = request(
            "/api/rate-limited?user_id=7",
            &[("x-request-id", "req-42"), ("user-agent", "curl/8")],
        );
        let mut event = open(&mut p, &cfg, 1_700_000_000_123_000_000, &req).expect("an event");
        event.note_rate_limit(Tally::Denied);
        event.note_cache("BYPASS");
        let mut asked_for_headers = None;
        p.on_log(event, 1_700_000_000_125_500_000, |want| {
            asked_for_headers = Some(want);
            response(429, &[("content-type", "application/json")])
        });
        assert_eq!(
            asked_for_headers,
            Some(true),
            "a field needs response headers"
        );
        let raw = &p.queue.back().expect("queued").payload;
        let v: Value = serde_json::from_str(raw).expect("JSON");
        let id = v["id"].as_str().expect("id");
        assert_eq!(id.len(), 36, "a generated UUID: {id}");
        assert!(
            raw.starts_with(&format!(r#"{{"event_type":"http_request","id":"{id}","request_id":"req-42","timestamp":"2023-11-14T22:13:20.123Z","timestamp_unix_ms":1700000000123,"method":"GET","path":"/api/rate-limited","route":"limited","status":429,"duration_ms":2.5,"client":"10.1.2.3","cache":"BYPASS","rate_limit":"denied","sample_ratio":1.0"#)),
            "{raw}"
        );
        assert_eq!(v["user_agent"], "curl/8");
        assert_eq!(v["content_type"], "application/json");
        assert_eq!(v["absent"], Value::Null);
        assert_eq!(p.stats.recorded, 1);
    }

    #[test]
    fn the_hand_written_json_is_serde_jsons() {
        let mut fields = BTreeMap::new();
        fields.insert(
            "agent",
            Some("quote \" slash \\ nl \n tab \t bell \u{7} del \u{7f} é ✓"),
        );
        fields.insert("absent", None);
        for (us, status, ratio) in [
            (0u64, Some(200u16), 1.0f64),
            (1_000, None, 0.25),
            (2_500, Some(429), 0.1),
            (1_234_567, Some(599), 1e-3),
            (30, Some(100), 0.0),
        ] {
            let e = RequestEvent {
                event_type: EVENT_TYPE,
                id: "a\"b",
                request_id: if status.is_some() {
                    Some("r\\q\n")
                } else {
                    None
                },
                timestamp: rfc3339_ms(1_700_000_000_123),
                timestamp_unix_ms: 1_700_000_000_123,
                method: "GET",
                path: "/p\u{1}ath/\\x",
                route: if status.is_some() { Some("r") } else { None },
                status,
                duration_ms: us as f64 / 1_000.0,
                client: None,
                cache: Some("HIT"),
                rate_limit: Some("allowed"),
                sample_ratio: ratio,
                fields: fields.clone(),
            };
            assert_eq!(
                write_event(&e, us),
                serde_json::to_string(&e).expect("serde"),
                "{us}µs"
            );
        }
    }

    #[test]
    fn requests_without_a_route_or_decision_report_nulls() {
        let cfg = config(&format!(r#"{{"events": {{}}, {ROUTES}}}"#));
        let mut p = EventPublisher::new(&cfg);
        let event = open(&mut p, &cfg, 5_000_000, &request("/health", &[])).expect("an event");
        let mut asked = None;
        p.on_log(event, 6_000_000, |want| {
            asked = Some(want);
            ResponseFacts::default()
        });
        assert_eq!(asked, Some(false), "no field needs response headers");
        let v: Value = serde_json::from_str(&p.queue[0].payload).expect("JSON");
        assert_eq!(v["route"], Value::Null);
        assert_eq!(v["request_id"], Value::Null);
        assert_eq!(v["rate_limit"], Value::Null);
        assert_eq!(v["cache"], Value::Null);
        assert_eq!(v["status"], Value::Null);
        assert_eq!(v["duration_ms"], 1.0);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.005Z");
    }

    #[test]
    fn the_event_id_is_generated_and_the_clients_request_id_is_only_reported() {
        let cfg = config(&format!(r#"{{"events": {{}}, {ROUTES}}}"#));
        let mut p = EventPublisher::new(&cfg);
        let mut ids = Vec::new();
        for _ in 0..2 {
            let req = request("/x", &[("X-Request-Id", "  victim-id  ")]);
            let v = one_event(&mut p, &cfg, &req, response(200, &[])).expect("event");
            assert_eq!(v["request_id"], "victim-id", "trimmed");
            let id = v["id"].as_str().expect("id").to_string();
            assert_ne!(id, "victim-id");
            assert_eq!(id.len(), 36, "{id}");
            ids.push(id);
        }
        assert_ne!(ids[0], ids[1], "one request id, two events");
        let blank = one_event(
            &mut p,
            &cfg,
            &request("/x", &[("x-request-id", " ")]),
            response(200, &[]),
        )
        .expect("event");
        assert_eq!(blank["request_id"], Value::Null);
    }

    #[test]
    fn sampling_is_decided_on_the_request_id_when_there_is_one() {
        let cfg = config(r#"{"events": {"sample_ratio": 0.5}}"#);
        let ids: Vec<String> = (0..200).map(|i| format!("req-{i}")).collect();
        // Two publishers stand for two gateways on one request's path.
        let (mut a, mut b) = (EventPublisher::new(&cfg), EventPublisher::new(&cfg));
        for id in &ids {
            for p in [&mut a, &mut b] {
                pass(p, &cfg, &request("/x", &[("x-request-id", id)]));
            }
        }
        let kept = |p: &EventPublisher| -> Vec<String> {
            p.queue
                .iter()
                .map(|e| {
                    let v: Value = serde_json::from_str(&e.payload).expect("JSON");
                    v["request_id"].as_str().expect("request_id").to_string()
                })
                .collect()
        };
        let expected: Vec<String> = ids.iter().filter(|id| sampled(id, 0.5)).cloned().collect();
        assert_eq!(kept(&a), expected);
        assert_eq!(kept(&b), expected);
    }

    #[test]
    fn missing_request_id_gets_a_generated_uuid() {
        let cfg = config(&format!(r#"{{"events": {{}}, {ROUTES}}}"#));
        let mut p = EventPublisher::new(&cfg);
        let a = one_event(&mut p, &cfg, &request("/x", &[]), response(200, &[])).expect("a");
        let b = one_event(&mut p, &cfg, &request("/x", &[]), response(200, &[])).expect("b");
        let (a, b) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));
        assert_ne!(a, b);
        for id in [a, b] {
            let parts: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(parts, vec![8, 4, 4, 4, 12], "{id}");
            assert_eq!(&id[14..15], "4", "version 4: {id}");
            assert!(id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn disabled_routes_and_configs_without_events_queue_nothing() {
        let cfg = config(&format!(r#"{{"events": {{}}, {ROUTES}}}"#));
        let mut p = EventPublisher::new(&cfg);
        assert!(one_event(&mut p, &cfg, &request("/quiet/x", &[]), response(200, &[])).is_none());
        let cfg = config(&format!(r#"{{{ROUTES}}}"#));
        let mut p = EventPublisher::new(&cfg);
        assert!(!p.enabled());
        assert_eq!(p.tick_period_ms(), None);
        assert!(one_event(&mut p, &cfg, &request("/x", &[]), response(200, &[])).is_none());
    }

    #[test]
    fn client_and_path_values_are_bounded() {
        let cfg = config(r#"{"events": {}}"#);
        let mut p = EventPublisher::new(&cfg);
        let long = format!("/{}", "é".repeat(3000));
        let id = "i".repeat(500);
        let v = one_event(
            &mut p,
            &cfg,
            &request(&long, &[("x-request-id", &id)]),
            response(200, &[]),
        )
        .expect("event");
        assert!(v["path"].as_str().expect("path").len() <= MAX_PATH_BYTES);
        assert_eq!(
            v["request_id"].as_str().expect("request_id").len(),
            MAX_ID_BYTES
        );
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn sampling_follows_the_ratio_and_is_stable_per_id() {
        assert!(sampled("x", 1.0));
        assert!(!sampled("x", 0.0));
        let ids: Vec<String> = (0..20_000).map(|i| format!("req-{i}")).collect();
        let kept = ids.iter().filter(|id| sampled(id, 0.25)).count();
        assert!(
            (4_400..=5_600).contains(&kept),
            "kept {kept} of 20000 at 0.25"
        );
        for id in &ids[..100] {
            assert_eq!(sampled(id, 0.25), sampled(id, 0.25));
        }

        let cfg = config(r#"{"events": {"sample_ratio": 0.5}}"#);
        let mut p = EventPublisher::new(&cfg);
        for id in &ids[..1000] {
            pass(&mut p, &cfg, &request("/x", &[("x-request-id", id)]));
        }
        assert_eq!(p.stats.recorded + p.stats.sampled_out, 1000);
        assert_eq!(p.stats.recorded, p.queue_len() as u64);
        assert!((400..=600).contains(&p.stats.recorded), "{:?}", p.stats);
        let v: Value = serde_json::from_str(&p.queue[0].payload).expect("JSON");
        assert_eq!(v["sample_ratio"], 0.5);
    }

    fn queued(n: usize) -> QueuedEvent {
        QueuedEvent {
            payload: format!("{{\"n\":{n}}}"),
            route: None,
            queued_ms: 0,
        }
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let cfg = config(r#"{"events": {"queue_limit": 3, "batch_size": 2}}"#);
        let mut p = EventPublisher::new(&cfg);
        for n in 0..5 {
            p.enqueue(queued(n));
        }
        assert_eq!(p.stats.dropped, 2);
        let left: Vec<&str> = p.queue.iter().map(|e| e.payload.as_str()).collect();
        assert_eq!(left, vec![r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]);
    }

    #[test]
    fn a_batch_is_pipelined_publish_and_xadd_in_queue_order() {
        let cfg = config(
            r#"{"redis": {"key_prefix": "edge:"},
                "events": {"publish": {"channel": "reqs"}, "stream": {"maxlen": 500}}}"#,
        );
        let batch = vec![queued(1), queued(2)];
        let (payload, commands) = pipeline_payload(&batch, &cfg.events);
        assert_eq!(commands, 4);
        let mut expected = Vec::new();
        for n in [1, 2] {
            let json = format!("{{\"n\":{n}}}");
            expected.extend_from_slice(
                format!("*3\r\n$7\r\nPUBLISH\r\n$4\r\nreqs\r\n$7\r\n{json}\r\n").as_bytes(),
            );
            expected.extend_from_slice(
                format!(
                    "*8\r\n$4\r\nXADD\r\n$11\r\nedge:events\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$3\r\n500\r\n$1\r\n*\r\n$5\r\nevent\r\n$7\r\n{json}\r\n"
                )
                .as_bytes(),
            );
        }
        assert_eq!(
            String::from_utf8_lossy(&payload),
            String::from_utf8_lossy(&expected)
        );
    }

    #[test]
    fn a_redis_call_batch_is_one_script_call() {
        let cfg = config(
            r#"{"redis": {"transport": "redis_call"},
                "events": {"stream": {"key": "log", "maxlen": 50}},
                "routes": [{"name": "p", "match": {"prefix": "/p"},
                            "events": {"stream": {"enabled": false}}}]}"#,
        );
        let script = Script::new("events_flush", EVENTS_FLUSH_LUA);
        let mut routed = queued(2);
        routed.route = Some(0);
        let (evalsha, eval) = script_commands(&script, &[queued(1), routed], &cfg.events);
        let mut args = vec!["1".to_string(), "krowoc:log".to_string(), "50".to_string()];
        args.extend(
            [
                "krowoc:requests",
                "1",
                r#"{"n":1}"#,
                "krowoc:requests",
                "0",
                r#"{"n":2}"#,
            ]
            .map(String::from),
        );
        let expected = Command::new("EVALSHA").arg(&script.sha1).args(&args);
        assert_eq!(evalsha, expected);
        let expected = Command::new("EVAL").arg(script.source).args(&args);
        assert_eq!(eval, expected);
    }

    #[test]
    fn a_batch_holds_one_stream_key() {
        let cfg = config(
            r#"{"events": {"stream": {"key": "a"}},
                "routes": [{"name": "b", "match": {"prefix": "/b"}, "events": {"stream": {"key": "b"}}}]}"#,
        );
        let mut p = EventPublisher::new(&cfg);
        let mut to_b = queued(3);
        to_b.route = Some(0);
        for e in [queued(1), queued(2), to_b, queued(4)] {
            p.enqueue(e);
        }
        assert_eq!(p.take_batch().len(), 2);
        assert_eq!(p.take_batch().len(), 1);
        assert_eq!(p.take_batch().len(), 1);
    }

    fn relay_ok(body: &[u8]) -> RawReply {
        RawReply::Relay {
            status: Some(200),
            body: body.to_vec(),
        }
    }

    /// Delivers a host answer for `token` to the client and the publisher.
    fn answer(
        p: &mut EventPublisher,
        client: &mut RedisClient,
        wire: &mut RecordingWire,
        token: u32,
        raw: RawReply,
    ) {
        let c = client
            .on_reply(wire, 0, token, raw)
            .expect("a flush completion");
        assert_eq!(c.purpose, Purpose::Events);
        p.on_flush_done(c.context_id, c.result);
    }

    #[test]
    fn full_batches_go_at_once_and_partial_ones_after_the_interval() {
        let cfg = config(
            r#"{"events": {"batch_size": 3, "flush_interval": "100ms", "max_in_flight": 2}}"#,
        );
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        for n in 0..8 {
            let mut e = queued(n);
            e.queued_ms = 1_000;
            p.enqueue(e);
        }
        p.flush(&mut client, &mut wire, 1_010);
        assert_eq!(wire.sent.len(), 2, "two full batches, max_in_flight 2");
        assert_eq!(p.queue_len(), 2);
        assert_eq!(p.in_flight_len(), 2);
        let (t1, t2) = (wire.sent[0].0, wire.sent[1].0);
        answer(
            &mut p,
            &mut client,
            &mut wire,
            t1,
            relay_ok(&b":1\r\n".repeat(3)),
        );
        p.flush(&mut client, &mut wire, 1_020);
        assert_eq!(
            wire.sent.len(),
            2,
            "the rest is a partial batch, not due yet"
        );
        p.flush(&mut client, &mut wire, 1_100);
        assert_eq!(wire.sent.len(), 3, "due after flush_interval");
        let t3 = wire.sent[2].0;
        answer(
            &mut p,
            &mut client,
            &mut wire,
            t2,
            relay_ok(&b":0\r\n".repeat(3)),
        );
        answer(
            &mut p,
            &mut client,
            &mut wire,
            t3,
            relay_ok(&b":1\r\n".repeat(2)),
        );
        assert_eq!(p.stats.published, 8);
        assert_eq!(p.stats.flushes, 3);
        assert_eq!(p.stats.flushed_events, 8);
        assert_eq!(p.queue_len() + p.in_flight_len(), 0);
    }

    #[test]
    fn failed_flushes_requeue_their_events_in_order() {
        let cfg = config(r#"{"redis": {"timeout": "100ms"}, "events": {"batch_size": 2}}"#);
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        for n in 0..3 {
            p.enqueue(queued(n));
        }
        p.flush(&mut client, &mut wire, 0);
        assert_eq!(wire.sent.len(), 1);
        let token = wire.sent[0].0;
        answer(
            &mut p,
            &mut client,
            &mut wire,
            token,
            RawReply::Relay {
                status: Some(502),
                body: b"redis unreachable".to_vec(),
            },
        );
        assert_eq!(p.stats.flush_failures, 1);
        assert_eq!(p.stats.requeued, 2);
        let order: Vec<&str> = p.queue.iter().map(|e| e.payload.as_str()).collect();
        assert_eq!(order, vec![r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#]);

        // A flush without an answer times out on a tick and is queued again too.
        p.flush(&mut client, &mut wire, 1_000);
        assert_eq!(p.in_flight_len(), 2, "a full batch and a due partial one");
        for c in client.expire(1_000 + 100 + crate::redis::client::DEADLINE_GRACE_MS) {
            p.on_flush_done(c.context_id, c.result);
        }
        assert_eq!(p.stats.flush_failures, 3);
        assert_eq!(p.queue_len(), 3);
        assert_eq!(p.stats.published, 0);
    }

    #[test]
    fn an_open_breaker_keeps_events_queued_until_redis_returns() {
        let cfg = config(
            r#"{"redis": {"breaker": {"failures": 1, "cooldown": "1s"}},
                "events": {"batch_size": 2, "queue_limit": 4}}"#,
        );
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        p.flush(&mut client, &mut wire, 0);
        let token = wire.sent[0].0;
        answer(
            &mut p,
            &mut client,
            &mut wire,
            token,
            RawReply::Relay {
                status: None,
                body: Vec::new(),
            },
        );
        for n in 2..8 {
            p.enqueue(queued(n));
            p.flush(&mut client, &mut wire, 100 + n as u64);
        }
        assert_eq!(wire.sent.len(), 1, "no flush while the breaker is open");
        assert_eq!(p.stats.flush_failures, 1, "short-circuits are not failures");
        assert_eq!(
            p.stats.requeued, 2,
            "only the failed flush's events were sent back"
        );
        assert_eq!(p.queue_len(), 4);
        assert_eq!(p.stats.dropped, 4, "the oldest beyond the bound");
        // After the cool-down the next flush is the breaker's probe; its success closes it.
        p.flush(&mut client, &mut wire, 1_200);
        assert_eq!(wire.sent.len(), 2);
        let token = wire.sent[1].0;
        answer(
            &mut p,
            &mut client,
            &mut wire,
            token,
            relay_ok(&b":1\r\n".repeat(2)),
        );
        p.flush(&mut client, &mut wire, 1_201);
        assert_eq!(wire.sent.len(), 3);
        let token = wire.sent[2].0;
        answer(
            &mut p,
            &mut client,
            &mut wire,
            token,
            relay_ok(&b":1\r\n".repeat(2)),
        );
        assert_eq!(p.stats.published, 4);
        assert_eq!(p.queue_len(), 0);
    }

    #[test]
    fn events_redis_refuses_are_counted_not_retried() {
        let cfg = config(r#"{"events": {"batch_size": 2, "stream": {}}}"#);
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        p.flush(&mut client, &mut wire, 0);
        let token = wire.sent[0].0;
        let body = b":1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n:1\r\n$3\r\n1-0\r\n";
        answer(&mut p, &mut client, &mut wire, token, relay_ok(body));
        assert_eq!((p.stats.published, p.stats.rejected), (1, 1));
        assert_eq!(p.queue_len(), 0);
        assert_eq!(
            client.breaker_state(),
            crate::redis::breaker::BreakerState::Closed
        );
    }

    #[test]
    fn unhealthy_replies_and_refusals_are_told_apart() {
        assert!(retryable(&RedisError::server("LOADING Redis is loading")));
        assert!(retryable(&RedisError::new(RedisErrorKind::Timeout, "t")));
        assert!(!retryable(&RedisError::new(RedisErrorKind::Refused, "403")));
        assert!(!retryable(&RedisError::server("ERR unknown command")));
        assert_eq!(
            script_outcome(&Reply::Array(vec![
                Reply::Int(3),
                Reply::Int(1),
                Reply::Bulk(b"WRONGTYPE x".to_vec())
            ])),
            Some(FlushOutcome {
                written: 3,
                refused: 1,
                first_error: "WRONGTYPE x".into()
            })
        );
        assert_eq!(script_outcome(&Reply::Int(1)), None);
        let cfg = config(r#"{"events": {}}"#);
        assert_eq!(
            pipeline_outcome(
                &[queued(0)],
                &cfg.events,
                &Reply::Array(vec![Reply::Int(1), Reply::Int(1)])
            ),
            None,
            "more replies than commands"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_709_210_096_050), "2024-02-29T12:34:56.050Z");
    }

    #[test]
    fn generated_ids_are_v4_uuids_and_distinct() {
        let mut ids = IdGenerator::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next_uuid();
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4", "{id}");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
            assert!(seen.insert(id));
        }
        let (mut a, mut b) = (IdGenerator::new(), IdGenerator::new());
        assert_ne!(
            a.next_uuid(),
            b.next_uuid(),
            "each VM starts somewhere else"
        );
    }

    #[test]
    fn the_flush_script_has_a_header() {
        for line in ["-- KEYS", "-- ARGV", "-- Reply"] {
            assert!(
                EVENTS_FLUSH_LUA.lines().any(|l| l.starts_with(line)),
                "events_flush.lua lacks {line}"
            );
        }
    }
}
