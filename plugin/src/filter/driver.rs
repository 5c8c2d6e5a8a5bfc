//! The phase driver: a request's life, in the order it happens. The contexts read the host and
//! call in here; each phase hands each feature its part of the request's [`Request`] record
//! and acts on what the feature decides.
//!
//! 1. route — matched once, on the request line ([`Edge::route`]); nothing to do: pass.
//! 2. start the event ([`Edge::on_request_headers`]).
//! 3. purge endpoint? — answered by the filter, never forwarded.
//! 4. rate limit ∥ cache lookup — both calls go out together: one Redis round trip at most.
//! 5. decide ([`Edge::decide`]) — once every call answered: the rate limit's verdict, then the
//!    cache's answer (serve, wait for a fill, or forward).
//! 6. upstream — the request goes on.
//! 7. response ([`Edge::on_response_headers`]) — the cache's fields (or a stale copy for an
//!    error), the filter's mark, the rate limit's fields.
//! 8. store ([`Edge::on_response_body`]) — the body is collected and stored off the path.
//! 9. log ([`Edge::on_log`]) — the event is queued; then the request ends ([`Edge::end`]).
//!
//! Redis answers ([`Edge::on_reply`]) and the tick ([`Edge::on_tick`]) come in between.

use super::record::{Request, Requests};
use crate::cache::{CacheEngine, CacheRequest, CacheResponse, Proceed, PurgeStart};
use crate::config::{Config, ConfigError, Transport};
use crate::events::{EventPublisher, ResponseFacts};
use crate::host::{self, HostUpstream, RedisCallWire, RelayWire};
use crate::http::{without_query, HostAction, LocalResponse, RequestInfo, Upstream};
use crate::metrics::Metrics;
use crate::ratelimit::{verdict_skipped, RateLimiter, RequestFacts, Start, Verdict};
use crate::redis::client::{Completion, Owner, RawReply, RedisClient, Wire};
use proxy_wasm::types::LogLevel;
use std::rc::Rc;

/// The outcome of the request-headers phase.
#[derive(Debug)]
pub enum Begin {
    /// No policy applies, or it was decided without waiting: let the request go on.
    Continue,
    /// Waiting for Redis.
    Pause,
    /// Answer from the filter now.
    Respond(LocalResponse),
}

/// What the response-headers phase does.
#[derive(Debug)]
pub enum ResponseStep {
    /// Set the cache's fields, the filter's mark ([`super::EDGE_HEADER`]), then the fields the request
    /// was let through with (the rate limit's); `hold`: keep the response until its purges are
    /// done (`HostAction::ResumeResponse`).
    Fields {
        cache: Vec<(String, String)>,
        passed: Vec<(String, String)>,
        hold: bool,
    },
    /// Answer with this instead (a stale copy for an upstream error).
    Replace(LocalResponse),
}

/// One configured filter instance on one VM.
pub struct Edge {
    pub config: Rc<Config>,
    client: RedisClient,
    /// The transport's host side (a recording wire in tests).
    wire: Box<dyn Wire>,
    /// Where background refreshes go (the host's HTTP calls).
    upstream: Box<dyn Upstream>,
    /// The Higress upstream `proxy_redis_init` was told about (transport `redis_call`).
    redis_call_upstream: Option<String>,
    /// The requests in flight: one record each.
    requests: Requests,
    rate_limiter: RateLimiter,
    metrics: Metrics,
    /// Request events: noted per request, queued, flushed on the tick.
    events: EventPublisher,
    /// The response cache (see [`crate::cache`]).
    cache: CacheEngine,
    /// Every request has an event (on no route and on every route): each is read whole, with
    /// no [`Edge::wants`] check first.
    reads_every_request: bool,
}

impl Edge {
    /// Builds the instance for a validated configuration; for `redis_call` this also tells the
    /// host the Redis credentials (a refusal is a configuration error naming the cluster).
    pub fn new(config: Config) -> Result<Edge, ConfigError> {
        let redis = &config.redis;
        // A VM's seed names it among every gateway's VMs (lock tokens, the VM registry).
        let seed = host::random_u64().unwrap_or_else(host::now_ns);
        let (wire, redis_call_upstream): (Box<dyn Wire>, _) = match redis.transport {
            Transport::Relay => {
                // Shared exchanges are sent from the root context, which a kick on this
                // queue (one per VM: its name carries the seed) brings in.
                let kick_queue = (redis.max_in_flight() > 0)
                    .then(|| host::register_shared_queue(&format!("krowoc-edge/{seed:016x}")))
                    .flatten();
                if redis.max_in_flight() > 0 && kick_queue.is_none() {
                    host::log(
                        LogLevel::Warn,
                        "krowoc-edge: the host refused a shared queue: redis.max_in_flight is not applied, every call has its own exchange",
                    );
                }
                let wire = RelayWire {
                    cluster: redis.cluster().to_string(),
                    authority: redis.authority().to_string(),
                    token: redis.token.clone(),
                    kick_queue,
                };
                (Box::new(wire), None)
            }
            Transport::RedisCall => {
                if !host::HAS_REDIS_CALL {
                    return Err(ConfigError {
                        path: "redis.transport".into(),
                        value: "\"redis_call\"".into(),
                        message: "this build of the plugin has no redis_call transport (built without the `redis-call` feature)".into(),
                    });
                }
                let upstream = redis_upstream(redis.cluster(), redis.database);
                if let Err(status) = host::redis_init(
                    &upstream,
                    redis.username.as_deref().unwrap_or(""),
                    redis.password.as_deref().unwrap_or(""),
                    redis.timeout.as_millis(),
                ) {
                    return Err(ConfigError {
                        path: "redis.cluster".into(),
                        value: format!("{upstream:?}"),
                        message: format!(
                            "the host refused proxy_redis_init (status {status}): is this a Redis cluster it knows?"
                        ),
                    });
                }
                let wire = RedisCallWire {
                    upstream: upstream.clone(),
                };
                (Box::new(wire), Some(upstream))
            }
        };
        let mut edge = Edge::with_host(config, wire, Box::new(HostUpstream), seed);
        edge.redis_call_upstream = redis_call_upstream;
        Ok(edge)
    }

    /// The instance over these host sides (`seed`: what makes this VM's cache lock tokens and
    /// registry member its own); tests give recording ones.
    pub fn with_host(
        config: Config,
        wire: Box<dyn Wire>,
        upstream: Box<dyn Upstream>,
        seed: u64,
    ) -> Edge {
        let events = EventPublisher::new(&config);
        let reads_every_request =
            events.applies_to(None) && (0..config.routes.len()).all(|i| events.applies_to(Some(i)));
        let config = Rc::new(config);
        Edge {
            client: RedisClient::new(&config.redis),
            metrics: Metrics::define(&config),
            events,
            cache: CacheEngine::new(&config, seed),
            wire,
            upstream,
            redis_call_upstream: None,
            requests: Requests::new(),
            rate_limiter: RateLimiter::new(&config, format!("{seed:016x}")),
            config,
            reads_every_request,
        }
    }

    /// Whether a request must be looked at before reading it whole (see [`Edge::wants`]).
    pub fn filters_requests(&self) -> bool {
        !self.reads_every_request
    }

    /// Tick period: often enough to enforce call deadlines close to the timeout.
    pub fn tick_period_ms(&self) -> u32 {
        let mut calls = (self.client.timeout_ms() / 4).clamp(10, 100);
        // `sync` limits send their counts every interval.
        if let Some(sync) = RateLimiter::sync_interval_ms(&self.config) {
            calls = calls.min(sync.max(10));
        }
        // Events flush on the tick: a partial batch waits at most about one flush interval.
        let period = self.events.tick_period_ms().map_or(calls, |e| e.min(calls));
        u32::try_from(period).unwrap_or(100)
    }

    pub fn uses_redis(&self) -> bool {
        self.config.routes.iter().any(|r| r.rate_limit.is_some())
            || self.events.enabled()
            || CacheEngine::wanted(&self.config)
    }

    // ---- 1. route ----------------------------------------------------------------------------

    /// The route a request line matches (`path` may carry its query): matched once per request.
    pub fn route(&self, path: &str, method: &str) -> Option<usize> {
        self.config.route_for(without_query(path), method)
    }

    /// Whether a request on `route` needs the filter at all: an event, a policy on its route,
    /// or the purge endpoint. When not, it passes without the filter reading its headers (an
    /// unpoliced route pays for two header lookups, not a copy of every header).
    pub fn wants(&self, path: &str, route: Option<usize>) -> bool {
        let policed = route.map(|i| &self.config.routes[i]).is_some_and(|r| {
            r.rate_limit.is_some() || r.cache.is_some() || r.invalidation.is_some()
        });
        let purge = self
            .config
            .cache
            .purge
            .as_ref()
            .is_some_and(|p| p.path == without_query(path));
        policed || purge || self.events.applies_to(route)
    }

    // ---- 2.-4. the request's headers ---------------------------------------------------------

    /// The request's headers arrived (it matched `route`): its record is made, its event
    /// started, and the purge endpoint, or the rate limit and the cache lookup, begun.
    /// `route_cluster` tells where the route sends requests (asked only by a cache that
    /// refreshes in the background).
    pub fn on_request_headers(
        &mut self,
        ctx: u32,
        now_ms: u64,
        now_ns: u64,
        req: &RequestInfo,
        route: Option<usize>,
        route_cluster: impl FnOnce() -> Option<String>,
    ) -> Begin {
        let mut request = Request::on(route);
        request.event = self.events.on_request(now_ns, req, route);
        let purge = self
            .cache
            .purge_endpoint(&mut self.client, &mut *self.wire, now_ms, ctx, req);
        let begin = match purge {
            Some(PurgeStart::Answer(resp)) => Begin::Respond(resp),
            Some(PurgeStart::Wait(purge)) => {
                request.purge = Some(purge);
                Begin::Pause
            }
            None => self.limit_and_look_up(ctx, now_ms, req, &mut request, route_cluster),
        };
        self.requests.insert(ctx, request);
        self.report_client();
        begin
    }

    /// The rate limit's call and the cache's lookup go out together; a denial decided without
    /// waiting (deny cache, failure mode) answers at once and sends no lookup.
    fn limit_and_look_up(
        &mut self,
        ctx: u32,
        now_ms: u64,
        req: &RequestInfo,
        request: &mut Request,
        route_cluster: impl FnOnce() -> Option<String>,
    ) -> Begin {
        let Some(route_idx) = request.route else {
            return Begin::Continue;
        };
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        if let Some(policy) = &route.rate_limit {
            let facts = RequestFacts {
                client_ip: req.client_ip(config.client_ip.trusted_hops),
                path: req.path(),
                query: req.query(),
                headers: &req.headers,
            };
            let start = self.rate_limiter.start(
                &mut self.client,
                &mut *self.wire,
                now_ms,
                ctx,
                &route.name,
                &config.redis.key_prefix,
                policy,
                &facts,
            );
            let decided = match start {
                Start::Skipped => Some(verdict_skipped()),
                Start::Decided(verdict) => Some(verdict),
                Start::Asked(call) => {
                    request.rate_limit = Some(call);
                    request.outstanding += 1;
                    None
                }
            };
            if let Some(denial) = decided.and_then(|v| settle(&self.metrics, route_idx, request, v))
            {
                return Begin::Respond(denial);
            }
        }
        let lookup = self.cache.lookup(
            &mut self.client,
            &mut *self.wire,
            now_ms,
            ctx,
            route_idx,
            req,
            route_cluster,
        );
        if let Some(cache) = lookup {
            if cache.awaits_lookup() {
                request.outstanding += 1;
            }
            request.cache = Some(cache);
        }
        if request.outstanding > 0 {
            Begin::Pause
        } else {
            Begin::Continue
        }
    }

    // ---- Redis answers -----------------------------------------------------------------------

    /// The host's answer to call `token` (`read_headers` gives an HTTP answer's fields, asked
    /// only for a cache refresh); `in_root` says the host is calling the root context.
    pub fn on_reply(
        &mut self,
        now_ms: u64,
        token: u32,
        raw: RawReply,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
        in_root: bool,
    ) -> Vec<HostAction> {
        let refresh = self.cache.on_refresh_answer(
            &mut self.client,
            &mut *self.wire,
            now_ms,
            token,
            &raw,
            read_headers,
        );
        if refresh {
            return Vec::new();
        }
        let done = self
            .client
            .on_answer(&mut *self.wire, now_ms, token, raw, in_root);
        self.report_client();
        done.into_iter()
            .filter_map(|c| self.complete(now_ms, c))
            .collect()
    }

    /// The root context was woken by this VM's kick: requests' calls waiting for an exchange
    /// go out now.
    pub fn on_kick(&mut self, now_ms: u64) -> Vec<HostAction> {
        let failed = self.client.on_kick(&mut *self.wire, now_ms);
        self.report_client();
        failed
            .into_iter()
            .filter_map(|c| self.complete(now_ms, c))
            .collect()
    }

    /// Whether call `token` is this instance's.
    pub fn owns_call(&self, token: u32) -> bool {
        self.client.has_pending(token)
    }

    /// Delivers one finished call to whoever made it: a flush, a cache job, or a request
    /// (which decides once its last call answered).
    fn complete(&mut self, now_ms: u64, c: Completion) -> Option<HostAction> {
        let ctx = match c.owner {
            Owner::Flush(flush) => {
                self.events.on_flush_done(flush, c.result);
                // Flushes are answered in the root context (they are made from it): send what
                // is due now rather than at the next tick, so a backlog drains at Redis' pace.
                self.events.flush(&mut self.client, &mut *self.wire, now_ms);
                return None;
            }
            Owner::Registry => {
                self.rate_limiter.on_registry_answer(c.result);
                return None;
            }
            Owner::Sync(id) => {
                self.rate_limiter.on_sync_answer(id, now_ms, c.result);
                return None;
            }
            Owner::Job(job) => {
                return self.cache.on_job_answer(
                    &mut self.client,
                    &mut *self.wire,
                    now_ms,
                    job,
                    c.result,
                    &mut self.requests,
                );
            }
            Owner::RateLimit(ctx) => {
                let request = self.requests.get_mut(&ctx)?;
                let policy = request
                    .route
                    .and_then(|r| self.config.routes[r].rate_limit.as_ref())?;
                RateLimiter::on_answer(request.rate_limit.as_mut()?, policy, c.result);
                ctx
            }
            Owner::CacheLookup(ctx) => {
                let cache = self.requests.get_mut(&ctx)?.cache.as_mut()?;
                if !CacheEngine::on_lookup(cache, c.result) {
                    return None;
                }
                ctx
            }
        };
        let request = self.requests.get_mut(&ctx)?;
        request.outstanding = request.outstanding.saturating_sub(1);
        if request.outstanding > 0 {
            return None;
        }
        self.decide(now_ms, ctx)
    }

    // ---- 5. decide ---------------------------------------------------------------------------

    /// Every call of request `ctx` answered: the rate limit's verdict first (unless decided
    /// already), then the cache's answer.
    pub fn decide(&mut self, now_ms: u64, ctx: u32) -> Option<HostAction> {
        let config = Rc::clone(&self.config);
        let request = self.requests.get_mut(&ctx)?;
        let route_idx = request.route?;
        let route = &config.routes[route_idx];
        if let (Some(policy), Some(call)) = (&route.rate_limit, request.rate_limit.as_mut()) {
            let verdict = self.rate_limiter.decide(now_ms, &route.name, policy, call);
            request.rate_limit = None;
            if let Some(denial) = verdict.and_then(|v| settle(&self.metrics, route_idx, request, v))
            {
                return Some(HostAction::Respond(ctx, denial));
            }
        }
        let Some(cache) = request.cache.as_mut() else {
            return Some(HostAction::Resume(ctx));
        };
        match self
            .cache
            .proceed(&mut self.client, &mut *self.wire, now_ms, ctx, cache)
        {
            Proceed::Serve(resp) => Some(HostAction::Respond(ctx, resp)),
            // The tick lets it go once the fill is there (or the wait is over).
            Proceed::Wait => None,
            Proceed::Forward => Some(HostAction::Resume(ctx)),
        }
    }

    // ---- 7.-8. the response ------------------------------------------------------------------

    /// The upstream's response headers (or a local reply's; `read_headers` gives them, asked
    /// only when the cache needs them): the cache reads them before the filter adds its own.
    pub fn on_response_headers(
        &mut self,
        ctx: u32,
        now_ms: u64,
        end_of_stream: bool,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
    ) -> ResponseStep {
        let Some(request) = self.requests.get_mut(&ctx) else {
            return ResponseStep::Fields {
                cache: Vec::new(),
                passed: Vec::new(),
                hold: false,
            };
        };
        let step = match request.route {
            Some(route) => self.cache.response_headers(
                &mut self.client,
                &mut *self.wire,
                now_ms,
                ctx,
                route,
                request.cache.as_mut(),
                &request.response_headers,
                end_of_stream,
                read_headers,
            ),
            None => CacheResponse::Pass(Vec::new()),
        };
        let (cache, hold) = match step {
            CacheResponse::Replace(resp) => return ResponseStep::Replace(resp),
            CacheResponse::Pass(fields) => (fields, false),
            CacheResponse::Hold(fields, purge) => {
                request.purge = Some(purge);
                (fields, true)
            }
        };
        ResponseStep::Fields {
            cache,
            passed: request.response_headers.clone(),
            hold,
        }
    }

    /// A chunk of the response body passed; `read_chunk` is asked for its bytes only when the
    /// cache keeps a copy (to store the response when it ends).
    pub fn on_response_body(
        &mut self,
        ctx: u32,
        now_ms: u64,
        end_of_stream: bool,
        read_chunk: impl FnOnce() -> Vec<u8>,
    ) {
        let Some(cache) = self.requests.get_mut(&ctx).and_then(|r| r.cache.as_mut()) else {
            return;
        };
        if !CacheEngine::collects(cache) {
            return;
        }
        let chunk = read_chunk();
        self.cache.response_body(
            &mut self.client,
            &mut *self.wire,
            now_ms,
            cache,
            &chunk,
            end_of_stream,
        );
    }

    // ---- 9. log and end ----------------------------------------------------------------------

    /// The request is logged: its event, with the decisions noted on its record, is queued
    /// (`read_response` is asked for the response's facts only when it has one); then it ends.
    pub fn on_log(
        &mut self,
        ctx: u32,
        now_ms: u64,
        now_ns: u64,
        read_response: impl FnOnce(bool) -> ResponseFacts,
    ) {
        if let Some(request) = self.requests.get_mut(&ctx) {
            if let Some(mut event) = request.event.take() {
                if let Some(tally) = request.tally {
                    event.note_rate_limit(tally);
                }
                if let Some(outcome) = request.cache.as_ref().and_then(CacheRequest::outcome) {
                    event.note_cache(outcome);
                }
                self.events.on_log(event, now_ns, read_response);
            }
        }
        self.end(ctx, now_ms);
    }

    /// The request ended (logged, or its context went away): its record is removed and each
    /// feature cleans up its part.
    pub fn end(&mut self, ctx: u32, now_ms: u64) {
        let Some(request) = self.requests.remove(&ctx) else {
            return;
        };
        if let Some(cache) = request.cache {
            self.cache
                .end(&mut self.client, &mut *self.wire, now_ms, ctx, cache);
        }
    }

    // ---- the tick ----------------------------------------------------------------------------

    /// Timeouts enforced, coalesced requests and cache jobs moved on, events flushed.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<HostAction> {
        let mut expired = self.client.expire(now_ms);
        // The tick is the root context: waiting calls whose kick was lost go out here.
        expired.extend(self.client.send_waiting(&mut *self.wire, now_ms));
        self.report_client();
        let mut actions: Vec<HostAction> = expired
            .into_iter()
            .filter_map(|c| self.complete(now_ms, c))
            .collect();
        actions.extend(self.cache.tick(
            &mut self.client,
            &mut *self.wire,
            &mut *self.upstream,
            now_ms,
            &mut self.requests,
        ));
        self.events.flush(&mut self.client, &mut *self.wire, now_ms);
        self.rate_limiter
            .tick(&mut self.client, &mut *self.wire, now_ms);
        self.report_client();
        actions
    }

    fn report_client(&mut self) {
        let transitions = std::mem::take(&mut self.client.transitions);
        for t in &transitions {
            match t {
                crate::redis::breaker::Transition::Opened => host::log(
                    LogLevel::Warn,
                    "krowoc-edge: Redis failing, circuit breaker open: policies use their failure mode",
                ),
                crate::redis::breaker::Transition::Closed => host::log(
                    LogLevel::Info,
                    "krowoc-edge: Redis answers again, circuit breaker closed",
                ),
                crate::redis::breaker::Transition::None => {}
            }
        }
        self.metrics.report_client(self.client.stats, &transitions);
        if self.client.take_noauth() {
            self.reinit_redis_call();
        }
    }

    /// Higress's wrappers call init again after NOAUTH (e.g. the password was rotated).
    fn reinit_redis_call(&mut self) {
        if let Some(upstream) = &self.redis_call_upstream {
            let r = &self.config.redis;
            let _ = host::redis_init(
                upstream,
                r.username.as_deref().unwrap_or(""),
                r.password.as_deref().unwrap_or(""),
                r.timeout.as_millis(),
            );
        }
    }
}

/// Records a rate-limit verdict on the request; the denial to answer with, if it is one.
fn settle(
    metrics: &Metrics,
    route: usize,
    request: &mut Request,
    verdict: Verdict,
) -> Option<LocalResponse> {
    metrics.count_verdict(route, &verdict);
    request.tally = Some(verdict.tally);
    if verdict.deny.is_none() {
        request.response_headers = verdict.response_headers;
    }
    verdict.deny
}

fn redis_upstream(cluster: &str, database: u32) -> String {
    if database == 0 {
        cluster.to_string()
    } else {
        format!("{cluster}?db={database}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::redis::client::recording::RecordingWire;
    use std::cell::RefCell;
    use std::time::Duration;

    /// No upstream answers in these tests: every refresh is refused.
    struct NoUpstream;

    impl Upstream for NoUpstream {
        fn call(&mut self, _: &str, _: &[(String, String)], _: Duration) -> Result<u32, String> {
            Err("no upstream in this test".into())
        }
    }

    /// An instance whose Redis calls the test reads (and answers) through `wire`.
    fn recorded(json: &str) -> (Edge, Rc<RefCell<RecordingWire>>) {
        let wire = Rc::new(RefCell::new(RecordingWire::default()));
        let config = parse_config(json.as_bytes()).expect("valid configuration");
        let edge = Edge::with_host(config, Box::new(Rc::clone(&wire)), Box::new(NoUpstream), 1);
        (edge, wire)
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestInfo {
        let mut all = vec![(":authority", "example.test"), (":scheme", "http")];
        all.extend_from_slice(headers);
        RequestInfo {
            path: path.to_string(),
            method: method.to_string(),
            headers: crate::http::fields(&all),
            source_address: Some("10.0.0.1:4000".into()),
        }
    }

    fn begin(e: &mut Edge, ctx: u32, req: &RequestInfo) -> Begin {
        let route = e.route(&req.path, &req.method);
        e.on_request_headers(ctx, 1_000, 1_000_000_000, req, route, || None)
    }

    fn ok(body: &[u8]) -> RawReply {
        RawReply::Relay {
            status: Some(200),
            body: body.to_vec(),
        }
    }

    /// Each call's payload, as text (commands and SHA1s are ASCII).
    fn payloads(wire: &RefCell<RecordingWire>) -> Vec<String> {
        wire.borrow()
            .sent
            .iter()
            .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    const LIMITED_AND_CACHED: &str = r#"{"routes": [
        {"name": "both", "match": {"prefix": "/both"},
         "rate_limit": {"limits": [{"limit": 5, "window": "60s"}]},
         "cache": {"ttl": "60s"}}],
        "cache": {"purge": {"path": "/both/_purge", "token": "0123456789abcdef"}}}"#;

    const ALLOWED: &[u8] = b"*5\r\n:1\r\n:0\r\n:4\r\n:60000\r\n:0\r\n";
    const DENIED: &[u8] = b"*5\r\n:0\r\n:30000\r\n:0\r\n:30000\r\n:1\r\n";
    const MISS_LOCK_TAKEN: &[u8] =
        b"*9\r\n$4\r\nmiss\r\n:0\r\n$-1\r\n:1\r\n:0\r\n:0\r\n:0\r\n:0\r\n:1700000000000\r\n";

    #[test]
    fn the_rate_limit_and_the_cache_lookup_go_out_together_and_decide_when_both_answered() {
        let (mut e, wire) = recorded(LIMITED_AND_CACHED);
        assert!(matches!(
            begin(&mut e, 7, &request("GET", "/both", &[])),
            Begin::Pause
        ));
        let sent = payloads(&wire);
        assert_eq!(sent.len(), 2, "one round trip: both calls at once");
        assert!(sent[0].contains(
            &crate::redis::scripts::Script::new(
                "rate_limit",
                crate::redis::scripts::RATE_LIMIT_LUA
            )
            .sha1
        ));
        let (limit, lookup) = (wire.borrow().sent[0].0, wire.borrow().sent[1].0);
        assert_eq!(
            e.on_reply(1_001, lookup, ok(MISS_LOCK_TAKEN), Vec::new, false),
            Vec::new()
        );
        assert_eq!(
            e.on_reply(1_002, limit, ok(ALLOWED), Vec::new, false),
            vec![HostAction::Resume(7)],
            "the last answer decides"
        );
        let ResponseStep::Fields {
            cache,
            passed,
            hold,
        } = e.on_response_headers(7, 1_010, true, || vec![(":status".into(), "200".into())])
        else {
            panic!("fields");
        };
        assert!(!hold);
        assert!(cache.contains(&("x-cache".to_string(), "MISS".to_string())));
        assert!(passed.iter().any(|(k, _)| k == "ratelimit"), "{passed:?}");
    }

    #[test]
    fn a_denial_drops_the_cache_answer_and_gives_the_fill_lock_back() {
        let (mut e, wire) = recorded(LIMITED_AND_CACHED);
        begin(&mut e, 7, &request("GET", "/both", &[]));
        let (limit, lookup) = (wire.borrow().sent[0].0, wire.borrow().sent[1].0);
        e.on_reply(1_001, lookup, ok(MISS_LOCK_TAKEN), Vec::new, false);
        let [HostAction::Respond(7, denied)] =
            &e.on_reply(1_002, limit, ok(DENIED), Vec::new, false)[..]
        else {
            panic!("denied");
        };
        assert_eq!(denied.status, 429);
        e.on_log(7, 1_003, 1_003_000_000, |_| ResponseFacts::default());
        e.on_tick(1_004);
        let unlock = payloads(&wire).pop().expect("a call");
        let sha =
            crate::redis::scripts::Script::new("cache_unlock", crate::cache::CACHE_UNLOCK_LUA).sha1;
        assert!(unlock.contains(&sha), "the lock goes back: {unlock}");
    }

    #[test]
    fn the_purge_endpoint_is_answered_before_any_rate_limit() {
        let (mut e, wire) = recorded(LIMITED_AND_CACHED);
        let req = request(
            "POST",
            "/both/_purge",
            &[
                ("x-krowoc-purge-token", "0123456789abcdef"),
                ("x-krowoc-invalidate", "route=both"),
            ],
        );
        assert!(matches!(begin(&mut e, 3, &req), Begin::Pause));
        let sent = payloads(&wire);
        assert_eq!(sent.len(), 1, "the purge only: {sent:?}");
        let purge = wire.borrow().sent[0].0;
        let [HostAction::Respond(3, answer)] =
            &e.on_reply(1_001, purge, ok(b":4\r\n"), Vec::new, false)[..]
        else {
            panic!("answered");
        };
        assert_eq!(answer.status, 200);
    }

    fn edge(json: &str) -> Edge {
        Edge::new(parse_config(json.as_bytes()).expect("valid configuration")).expect("edge")
    }

    /// Whether the filter reads a request with this request line (its route matched once).
    fn wants(e: &Edge, path: &str, method: &str) -> bool {
        e.wants(path, e.route(path, method))
    }

    const ROUTES: &str = r#"[
        {"name": "limited", "match": {"prefix": "/limited"},
         "rate_limit": {"limits": [{"limit": 5, "window": "60s"}]}},
        {"name": "posts-only", "match": {"prefix": "/posts", "methods": ["POST"]},
         "rate_limit": {"limits": [{"limit": 5, "window": "60s"}]}},
        {"name": "cached", "match": {"path": "/cached"}, "cache": {"ttl": "60s"}},
        {"name": "plain", "match": {"prefix": "/plain"}},
        {"name": "quiet", "match": {"prefix": "/quiet"}, "events": {"enabled": false}}
    ]"#;

    #[test]
    fn only_requests_with_something_to_do_are_read() {
        let e = edge(&format!(
            r#"{{"routes": {ROUTES},
                "cache": {{"purge": {{"path": "/_purge", "token": "0123456789abcdef"}}}}}}"#
        ));
        assert!(wants(&e, "/limited/x?y=1", "GET"));
        assert!(wants(&e, "/cached?user_id=1", "GET"));
        assert!(wants(&e, "/_purge?tag=x", "POST"));
        assert!(wants(&e, "/posts", "POST"));
        assert!(!wants(&e, "/posts", "GET"), "the route matches POST only");
        assert!(!wants(&e, "/plain", "GET"), "a route without a policy");
        assert!(!wants(&e, "/nowhere", "GET"), "no route");
    }

    #[test]
    fn with_events_every_request_is_read_but_where_they_are_off() {
        let e = edge(&format!(r#"{{"routes": {ROUTES}, "events": {{}}}}"#));
        assert!(wants(&e, "/plain", "GET"));
        assert!(wants(&e, "/nowhere", "GET"));
        assert!(
            !wants(&e, "/quiet", "GET"),
            "events off on that route, no other policy"
        );
        assert!(e.filters_requests(), "one route has no events");
        let everywhere = ROUTES.replace(r#", "events": {"enabled": false}"#, "");
        let e = edge(&format!(r#"{{"routes": {everywhere}, "events": {{}}}}"#));
        assert!(
            !e.filters_requests(),
            "every request has an event: read at once"
        );
        assert!(edge(r#"{"routes": []}"#).filters_requests());
    }
}
