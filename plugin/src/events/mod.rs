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
//! Every command's outcome is kept: an event's PUBLISH and its XADD are separate. A command Redis
//! cannot take now (`OOM`, `LOADING`… for that command), and every command of a flush that
//! failed as a whole for a reason that may pass (timeout, Redis or relay unreachable, breaker
//! open), goes back to the front of the queue with its event, and only the commands still to do
//! are sent again: an event whose PUBLISH went through and whose XADD got `OOM` is only XADDed
//! again. So events survive an outage up to `queue_limit` and are written when Redis returns.
//! Duplicates come only from a flush whose outcome is unknown (a timeout, a reset: it may have
//! been written), counted as `possible_duplicates`; consumers deduplicate by `id`. A command
//! Redis refuses (`WRONGTYPE`, `ERR`…) is not sent again.
//!
//! Accounting: every recorded event ends in exactly one of `published` (it reached Redis: at
//! least one of its targets, channel or stream, took it; `partial` counts those a target of
//! which gave up) or `dropped` (no target took it: pushed out of a full queue, refused on every
//! target, or its flush failed for good), or is still queued or in flight. A warning says how
//! many were dropped and why, at most once per [`LOSS_LOG_INTERVAL_MS`] per VM.
//!
//! Here: the publisher (queue, flushes, retries). [`event`]: one request's event and its JSON;
//! [`batch`]: a batch's commands and what each event's commands got.

use crate::config::events::{EventPolicy, EventsConfig, FieldSource};
use crate::config::{Config, Transport};
use crate::host::{self, record_metric};
use crate::http::{first, RequestInfo};
use crate::metrics::EventMetrics;
pub use crate::metrics::EventStats;
use crate::ratelimit::Tally;
use crate::redis::client::{Owner, RedisClient, Wire};
use crate::redis::error::{RedisError, RedisErrorKind, ServerErrorKind};
use crate::redis::resp::{encode_array, Command, Reply};

pub mod batch;
pub mod event;

pub use event::{OpenEvent, RequestEvent, ResponseFacts};

use crate::redis::scripts::Script;
pub use crate::redis::scripts::EVENTS_FLUSH_LUA;
use batch::*;
use event::*;
use proxy_wasm::types::LogLevel;
use serde::Serialize;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

/// One event waiting to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The JSON text.
    pub payload: String,
    /// Route index (None: no route); its policy says where the event goes.
    pub route: Option<usize>,
    pub queued_ms: u64,
    /// The targets still to write (of those its policy has).
    pub pending: Targets,
    /// Some target took it already.
    pub reached: bool,
    /// Redis refused it on some target.
    pub refused: bool,
}

impl QueuedEvent {
    pub fn new(payload: String, route: Option<usize>, queued_ms: u64) -> QueuedEvent {
        QueuedEvent {
            payload,
            route,
            queued_ms,
            pending: Targets::ALL,
            reached: false,
            refused: false,
        }
    }
}

/// At most one warning about lost events per VM in this long.
pub const LOSS_LOG_INTERVAL_MS: u64 = 10_000;

/// Why an event's remaining targets were given up (Redis refusing a command is noted on the
/// event itself).
#[derive(Clone, Debug)]
enum LossReason {
    /// Pushed out of a full queue (Redis failing meanwhile).
    QueueFull,
    /// The flush failed in a way retrying would not fix (the error).
    Failed(String),
}

/// Losses since the last warning.
#[derive(Clone, Debug, Default)]
struct LossTally {
    dropped: u64,
    partial: u64,
    queue_full: u64,
    refused: u64,
    failed: u64,
    first_refusal: String,
    first_failure: String,
}

impl LossTally {
    fn is_empty(&self) -> bool {
        self.dropped == 0 && self.partial == 0
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
    losses: LossTally,
    /// The last failure that sent events back to the queue (why the queue may overflow).
    last_failure: String,
    /// When the last loss warning was logged.
    last_loss_log_ms: Option<u64>,
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
            losses: LossTally::default(),
            last_failure: String::new(),
            last_loss_log_ms: None,
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
        let header = |name: &str| req.header(name);
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
        self.enqueue(QueuedEvent::new(payload, open.route, now_ns / 1_000_000));
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
            if let Some(oldest) = self.queue.pop_front() {
                self.give_up(oldest, LossReason::QueueFull);
            }
        }
        self.queue.push_back(event);
    }

    /// Ends an event's life: published if some target took it, else dropped; `why` is what
    /// happened to the targets it still had.
    fn give_up(&mut self, event: QueuedEvent, why: LossReason) {
        self.settle(event, Some(why));
    }

    /// Counts an event that is done: `lost` says why the targets it still has were given up
    /// (None: it has none left).
    fn settle(&mut self, event: QueuedEvent, lost: Option<LossReason>) {
        let lost = lost.filter(|_| !targets_now(&event, &self.config).is_empty());
        if event.refused {
            self.stats.rejected += 1;
        }
        if event.reached {
            self.stats.published += 1;
            if lost.is_none() && !event.refused {
                return;
            }
            self.stats.partial += 1;
            self.losses.partial += 1;
        } else {
            // Every policy has a target, so an event no target took lost something.
            self.stats.dropped += 1;
            self.losses.dropped += 1;
        }
        match lost {
            Some(LossReason::QueueFull) => self.losses.queue_full += 1,
            Some(LossReason::Failed(why)) => {
                self.losses.failed += 1;
                if self.losses.first_failure.is_empty() {
                    self.losses.first_failure = why;
                }
            }
            // Nothing else given up: what is missing, Redis refused.
            None => self.losses.refused += 1,
        }
    }

    /// Applies what a flush's commands got to one event: done (counted), or back to the queue
    /// with the targets still to write (returned).
    fn apply(&mut self, mut event: QueuedEvent, outcome: EventOutcome) -> Option<QueuedEvent> {
        let mut retry = false;
        for (sent, target) in [
            (outcome.publish, &mut event.pending.publish),
            (outcome.stream, &mut event.pending.stream),
        ] {
            match sent {
                None => {}
                Some(CommandOutcome::Written) => {
                    *target = false;
                    event.reached = true;
                }
                Some(CommandOutcome::Refused(why)) => {
                    *target = false;
                    event.refused = true;
                    if self.losses.first_refusal.is_empty() {
                        self.losses.first_refusal = why;
                    }
                }
                Some(CommandOutcome::Retry(why)) => {
                    retry = true;
                    self.last_failure = why;
                }
            }
        }
        if retry {
            return Some(event);
        }
        self.settle(event, None);
        None
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
                    client.call_pipeline(wire, now_ms, Owner::Flush(id), &payload, commands)
                }
                Transport::RedisCall => {
                    let (evalsha, eval) = script_commands(&self.script, &batch, &self.config);
                    client.call(wire, now_ms, Owner::Flush(id), &evalsha, Some(eval))
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
        if let Some(warning) = self.loss_warning(now_ms) {
            host::log(LogLevel::Warn, &warning);
        }
        self.report();
    }

    /// The answer to flush `flush_id` (a completion of [`Owner::Flush`]).
    pub fn on_flush_done(&mut self, flush_id: u32, result: Result<Reply, RedisError>) {
        let Some(flight) = self.in_flight.remove(&flush_id) else {
            return;
        };
        match result {
            Ok(reply) => match flush_outcomes(&flight.events, &self.config, &reply) {
                Some(outcomes) => {
                    let mut again = Vec::new();
                    for (event, outcome) in flight.events.into_iter().zip(outcomes) {
                        again.extend(self.apply(event, outcome));
                    }
                    self.stats.requeued += again.len() as u64;
                    self.requeue(again);
                }
                None => {
                    // Written or not, nobody can tell: not sent again (a reply that does not
                    // match is a bug or a foreign relay, and would come back the same).
                    self.stats.flush_failures += 1;
                    let why = "the reply to the flush was not the expected shape";
                    for event in flight.events {
                        self.give_up(event, LossReason::Failed(why.to_string()));
                    }
                }
            },
            Err(e) => self.fail(flight.events, &e),
        }
        self.report();
    }

    /// A flush that failed as a whole: its events go back to the queue, with the targets they
    /// still had, when the failure may pass.
    fn fail(&mut self, batch: Vec<QueuedEvent>, e: &RedisError) {
        if e.kind != RedisErrorKind::BreakerOpen {
            self.stats.flush_failures += 1;
            self.last_failure = e.to_string();
            host::log(
                LogLevel::Debug,
                &format!("krowoc-edge: events: flush of {} failed: {e}", batch.len()),
            );
        }
        if !retryable(e) {
            for event in batch {
                self.give_up(event, LossReason::Failed(e.to_string()));
            }
            return;
        }
        if e.kind != RedisErrorKind::BreakerOpen {
            self.stats.requeued += batch.len() as u64;
        }
        if may_have_been_written(e) {
            self.stats.possible_duplicates += batch.len() as u64;
        }
        self.requeue(batch);
    }

    /// Puts events back at the front of the queue, in their order; the oldest beyond the
    /// bound are given up.
    fn requeue(&mut self, events: Vec<QueuedEvent>) {
        for event in events.into_iter().rev() {
            self.queue.push_front(event);
        }
        while self.queue.len() > self.config.queue_limit {
            if let Some(oldest) = self.queue.pop_front() {
                self.give_up(oldest, LossReason::QueueFull);
            }
        }
    }

    /// The warning about what was lost since the last one, at most once per
    /// [`LOSS_LOG_INTERVAL_MS`] (None: nothing lost, or too soon).
    fn loss_warning(&mut self, now_ms: u64) -> Option<String> {
        if self.losses.is_empty() {
            return None;
        }
        if let Some(last) = self.last_loss_log_ms {
            if now_ms.saturating_sub(last) < LOSS_LOG_INTERVAL_MS {
                return None;
            }
        }
        let since = self.last_loss_log_ms.map_or_else(String::new, |last| {
            format!(" in the last {}s", now_ms.saturating_sub(last) / 1000)
        });
        self.last_loss_log_ms = Some(now_ms);
        let l = std::mem::take(&mut self.losses);
        Some(loss_message(&l, &since, &self.last_failure))
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

/// The warning about lost events: how many and why (`since`: " in the last Ns" or "").
fn loss_message(l: &LossTally, since: &str, last_failure: &str) -> String {
    let mut why = Vec::new();
    if l.queue_full > 0 {
        let failing = if last_failure.is_empty() {
            String::new()
        } else {
            format!("; last failure: {last_failure}")
        };
        why.push(format!(
            "{} pushed out of the full queue (Redis not taking them{failing})",
            l.queue_full
        ));
    }
    if l.refused > 0 {
        why.push(format!(
            "{} refused by Redis ({})",
            l.refused, l.first_refusal
        ));
    }
    if l.failed > 0 {
        why.push(format!(
            "{} in failed flushes ({})",
            l.failed, l.first_failure
        ));
    }
    format!(
        "krowoc-edge: events: {} event(s) dropped, {} written to only some targets{since}: {}",
        l.dropped,
        l.partial,
        why.join(", ")
    )
}

/// Whether a flush that failed so may still have been written (its events, sent again, may be
/// duplicates): no answer came, or the connection went away mid-call.
pub fn may_have_been_written(e: &RedisError) -> bool {
    matches!(
        e.kind,
        RedisErrorKind::Timeout | RedisErrorKind::Unavailable
    )
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
            headers: crate::http::fields(headers),
            source_address: Some("10.1.2.3:5555".to_string()),
        }
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseFacts {
        ResponseFacts {
            status: Some(status),
            headers: crate::http::fields(headers),
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
        QueuedEvent::new(format!("{{\"n\":{n}}}"), None, 0)
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
        let Owner::Flush(flush) = c.owner else {
            panic!("not a flush: {:?}", c.owner);
        };
        p.on_flush_done(flush, c.result);
    }

    /// Delivers a host answer for the last call sent.
    fn answer_last(
        p: &mut EventPublisher,
        client: &mut RedisClient,
        wire: &mut RecordingWire,
        raw: RawReply,
    ) {
        let token = wire.last_token();
        answer(p, client, wire, token, raw);
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
            let Owner::Flush(flush) = c.owner else {
                panic!("not a flush: {:?}", c.owner);
            };
            p.on_flush_done(flush, c.result);
        }
        assert_eq!(p.stats.flush_failures, 3);
        assert_eq!(p.queue_len(), 3);
        assert_eq!(p.stats.published, 0);
    }

    #[test]
    fn an_open_breaker_keeps_events_queued_until_redis_returns() {
        let cfg = config(
            r#"{"redis": {"breaker": {"failures": 1, "probe_interval": "1s", "cooldown": "1s"}},
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
        // Event 0 reached the channel (published, but partial); event 1 both targets.
        assert_eq!((p.stats.published, p.stats.rejected), (2, 1));
        assert_eq!((p.stats.partial, p.stats.dropped), (1, 0));
        assert_eq!(p.queue_len(), 0);
        assert_eq!(
            client.breaker_state(),
            crate::redis::breaker::BreakerState::Closed
        );
    }

    const OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";

    /// Every event enqueued is published, dropped, queued or in flight.
    fn assert_accounted(p: &EventPublisher, enqueued: u64) {
        let in_flight: usize = p.in_flight.values().map(|f| f.events.len()).sum();
        assert_eq!(
            p.stats.published + p.stats.dropped + (p.queue_len() + in_flight) as u64,
            enqueued,
            "{:?}",
            p.stats
        );
    }

    #[test]
    fn an_oom_xadd_is_sent_again_alone_and_the_publish_is_not_repeated() {
        let cfg = config(r#"{"events": {"batch_size": 2, "stream": {}}}"#);
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        p.flush(&mut client, &mut wire, 0);
        let body = [b":1\r\n".as_slice(), OOM, b":1\r\n", b"$3\r\n1-0\r\n"].concat();
        answer_last(&mut p, &mut client, &mut wire, relay_ok(&body));
        assert_eq!(
            p.stats.published, 1,
            "event 1 is done; event 0 waits for its XADD"
        );
        assert_eq!((p.stats.requeued, p.stats.possible_duplicates), (1, 0));
        assert_eq!(p.queue_len(), 1);
        assert_accounted(&p, 2);

        // Redis still full: only the XADD goes, and gets OOM again.
        p.flush(&mut client, &mut wire, 1_000);
        assert_eq!(wire.sent.len(), 2);
        let payload = String::from_utf8_lossy(&wire.sent[1].1).into_owned();
        assert!(payload.starts_with("*8\r\n$4\r\nXADD\r\n"), "{payload}");
        assert!(!payload.contains("PUBLISH"), "{payload}");
        answer_last(&mut p, &mut client, &mut wire, relay_ok(OOM));
        assert_eq!(p.queue_len(), 1);

        p.flush(&mut client, &mut wire, 2_000);
        assert_eq!(wire.last_command()[0], "XADD");
        answer_last(&mut p, &mut client, &mut wire, relay_ok(b"$3\r\n2-0\r\n"));
        assert_eq!(
            (p.stats.published, p.stats.partial, p.stats.dropped),
            (2, 0, 0)
        );
        assert_eq!(p.stats.requeued, 2);
        assert_eq!(p.queue_len(), 0);
        assert_accounted(&p, 2);
    }

    #[test]
    fn a_redis_call_flush_sends_again_only_the_commands_that_failed() {
        let cfg = config(
            r#"{"redis": {"transport": "redis_call"}, "events": {"batch_size": 2, "stream": {}}}"#,
        );
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        p.flush(&mut client, &mut wire, 0);
        let args = wire.last_command();
        assert_eq!(
            args[5..],
            [
                "krowoc:requests",
                "1",
                r#"{"n":0}"#,
                "krowoc:requests",
                "1",
                r#"{"n":1}"#
            ]
        );
        let oom = &OOM[..OOM.len() - 2];
        let body = [
            b"*4\r\n:1\r\n".as_slice(),
            oom,
            b"\r\n-LOADING Redis is loading\r\n$3\r\n1-0\r\n",
        ]
        .concat();
        let reply = RawReply::RedisCall { status: 0, body };
        answer_last(&mut p, &mut client, &mut wire, reply);
        assert_eq!(p.stats.published, 0, "neither event is done yet");
        assert_eq!(p.queue_len(), 2);
        p.flush(&mut client, &mut wire, 1_000);
        let args = wire.last_command();
        assert_eq!(
            args[5..],
            ["", "1", r#"{"n":0}"#, "krowoc:requests", "0", r#"{"n":1}"#]
        );
        let reply = RawReply::RedisCall {
            status: 0,
            body: b"*2\r\n$3\r\n2-0\r\n:0\r\n".to_vec(),
        };
        answer_last(&mut p, &mut client, &mut wire, reply);
        assert_eq!(
            (p.stats.published, p.stats.partial, p.stats.dropped),
            (2, 0, 0)
        );
        assert_eq!(p.queue_len(), 0);
    }

    #[test]
    fn events_written_somewhere_are_not_counted_as_dropped_when_pushed_out() {
        let cfg = config(r#"{"events": {"batch_size": 2, "queue_limit": 2, "stream": {}}}"#);
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        p.flush(&mut client, &mut wire, 0);
        // Both PUBLISHed, both XADDs refused for memory: queued again for their XADD.
        let body = [b":1\r\n".as_slice(), OOM, b":1\r\n", OOM].concat();
        answer_last(&mut p, &mut client, &mut wire, relay_ok(&body));
        assert_eq!(p.queue_len(), 2);
        // Two new events push them out: they reached the channel, so published, but partial.
        p.enqueue(queued(2));
        p.enqueue(queued(3));
        assert_eq!(
            (p.stats.published, p.stats.partial, p.stats.dropped),
            (2, 2, 0)
        );
        // And two more push out events that reached nothing: dropped.
        p.enqueue(queued(4));
        p.enqueue(queued(5));
        assert_eq!(
            (p.stats.published, p.stats.partial, p.stats.dropped),
            (2, 2, 2)
        );
        assert_accounted(&p, 6);
        let warning = p.loss_warning(5_000).expect("a warning");
        assert!(
            warning.contains("2 event(s) dropped, 2 written to only some targets"),
            "{warning}"
        );
        assert!(
            warning.contains("4 pushed out of the full queue"),
            "{warning}"
        );
        assert!(warning.contains("OOM command not allowed"), "{warning}");
    }

    #[test]
    fn a_timed_out_flush_is_sent_again_and_counted_as_possible_duplicates() {
        let cfg = config(r#"{"redis": {"timeout": "100ms"}, "events": {"batch_size": 3}}"#);
        let mut p = EventPublisher::new(&cfg);
        let mut client = RedisClient::new(&cfg.redis);
        let mut wire = recorder();
        for n in 0..3 {
            p.enqueue(queued(n));
        }
        p.flush(&mut client, &mut wire, 0);
        for c in client.expire(100 + crate::redis::client::DEADLINE_GRACE_MS) {
            let Owner::Flush(flush) = c.owner else {
                panic!("not a flush: {:?}", c.owner);
            };
            p.on_flush_done(flush, c.result);
        }
        assert_eq!((p.stats.requeued, p.stats.possible_duplicates), (3, 3));
        // A reply Redis sent (even an error for every command) is no duplicate risk.
        p.flush(&mut client, &mut wire, 1_000);
        let body = b"-LOADING Redis is loading\r\n".repeat(3);
        answer_last(&mut p, &mut client, &mut wire, relay_ok(&body));
        assert_eq!((p.stats.requeued, p.stats.possible_duplicates), (6, 3));
        assert_accounted(&p, 3);
    }

    #[test]
    fn losses_are_logged_at_most_once_per_interval() {
        let cfg = config(r#"{"events": {"queue_limit": 1, "batch_size": 1}}"#);
        let mut p = EventPublisher::new(&cfg);
        assert_eq!(p.loss_warning(0), None, "nothing lost");
        p.enqueue(queued(0));
        p.enqueue(queued(1));
        let first = p.loss_warning(1_000).expect("first loss: logged at once");
        assert!(first.contains("1 event(s) dropped"), "{first}");
        p.enqueue(queued(2));
        assert_eq!(p.loss_warning(1_100), None);
        assert_eq!(p.loss_warning(10_999), None);
        p.enqueue(queued(3));
        let next = p.loss_warning(11_000).expect("after the interval");
        assert!(
            next.contains("2 event(s) dropped, 0 written to only some targets in the last 10s"),
            "{next}"
        );
        assert_eq!(p.loss_warning(30_000), None, "nothing new");
        assert_eq!(p.stats.dropped, 3);
    }

    #[test]
    fn unhealthy_replies_and_refusals_are_told_apart() {
        assert!(retryable(&RedisError::server("LOADING Redis is loading")));
        assert!(retryable(&RedisError::new(RedisErrorKind::Timeout, "t")));
        assert!(!retryable(&RedisError::new(RedisErrorKind::Refused, "403")));
        assert!(!retryable(&RedisError::server("ERR unknown command")));
        let cfg = config(r#"{"events": {"stream": {}}}"#);
        let oom = "OOM command not allowed when used memory > 'maxmemory'.";
        assert_eq!(
            flush_outcomes(
                &[queued(0), queued(1)],
                &cfg.events,
                &Reply::Array(vec![
                    Reply::Int(3),
                    Reply::Error(oom.into()),
                    Reply::Error("WRONGTYPE x".into()),
                    Reply::Bulk(b"1-0".to_vec()),
                ])
            ),
            Some(vec![
                EventOutcome {
                    publish: Some(CommandOutcome::Written),
                    stream: Some(CommandOutcome::Retry(oom.into())),
                },
                EventOutcome {
                    publish: Some(CommandOutcome::Refused("WRONGTYPE x".into())),
                    stream: Some(CommandOutcome::Written),
                },
            ])
        );
        assert_eq!(
            flush_outcomes(&[queued(0)], &cfg.events, &Reply::Int(1)),
            None
        );
        let cfg = config(r#"{"events": {}}"#);
        assert_eq!(
            flush_outcomes(
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
