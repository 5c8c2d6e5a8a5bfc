//! The proxy-wasm contexts and the per-request flow.
//!
//! A request's life: route match → rate-limit decision (deny cache, or one script call to
//! Redis) → upstream → response fields added. Calls to Redis for one request are dispatched
//! together and the request resumes when every one has answered or timed out (the cache
//! lookup of a later issue joins the rate-limit call here: a new [`Purpose`] and a slot in
//! [`RequestFlow`]).
//!
//! State shared by the root context, the request contexts and the Higress callback lives in
//! one [`Edge`] per root context, reachable from `proxy_on_redis_call_response` through a
//! thread-local table. Host actions (resume, local response) are collected while the state is
//! borrowed and performed after the borrow ends, so a host that calls back synchronously finds
//! the state free.

use crate::client::{Completion, Purpose, RawReply, RedisClient, Wire};
use crate::config::{parse_config, Config, ConfigError, Transport};
use crate::error::RedisError;
use crate::events::{host_response, EventPublisher};
use crate::host::{self, RedisCallWire, RelayWire};
use crate::keys::{client_ip, derive_keys, KeyDecision, RequestFacts};
use crate::metrics::Metrics;
use crate::ratelimit::{
    parse_decision, script_call, verdict_for_cached_denial, verdict_for_decision,
    verdict_for_failure, verdict_skipped, DenyCache, LocalLimiter, LocalResponse, Verdict,
};
use crate::scripts::Scripts;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Name of the response header that proves the filter ran.
pub const EDGE_HEADER: &str = "x-krowoc-edge";

thread_local! {
    /// Root context id → its state, for the Higress callback (the SDK does not know it).
    static INSTANCES: RefCell<HashMap<u32, Rc<RefCell<Edge>>>> = RefCell::new(HashMap::new());
}

/// Either transport's host side.
pub enum HostWire {
    Relay(RelayWire),
    RedisCall(RedisCallWire),
}

impl Wire for HostWire {
    fn send(&mut self, payload: &[u8], timeout_ms: u64) -> Result<u32, RedisError> {
        match self {
            HostWire::Relay(w) => w.send(payload, timeout_ms),
            HostWire::RedisCall(w) => w.send(payload, timeout_ms),
        }
    }
}

/// What to do to a request once its Redis calls are answered.
#[derive(Debug)]
pub enum HostAction {
    /// Let a paused request go on.
    Resume(u32),
    Respond(u32, LocalResponse),
    /// Let a held response go on.
    ResumeResponse(u32),
}

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

/// One request with a policy.
#[derive(Debug)]
pub struct RequestFlow {
    pub(crate) route: usize,
    identity: String,
    /// Redis calls not answered yet.
    pub(crate) outstanding: usize,
    rate_limit: Option<Result<crate::ratelimit::Decision, RedisError>>,
    /// Fields added to the upstream's response.
    pub response_headers: Vec<(String, String)>,
}

impl RequestFlow {
    /// A flow for a request on route `route` with no call made yet.
    pub(crate) fn for_route(route: usize) -> RequestFlow {
        RequestFlow {
            route,
            identity: String::new(),
            outstanding: 0,
            rate_limit: None,
            response_headers: Vec::new(),
        }
    }
}

/// A request's facts as the host gave them.
pub struct RequestInfo {
    pub path: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub source_address: Option<String>,
}

impl RequestInfo {
    /// The client's address: the connection's, or an `X-Forwarded-For` entry past
    /// `trusted_hops` proxies (see [`crate::keys::client_ip`]).
    pub fn client_ip(&self, trusted_hops: u32) -> Option<String> {
        let forwarded: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|(_, v)| v.as_str())
            .collect();
        client_ip(self.source_address.as_deref(), &forwarded, trusted_hops)
    }
}

/// One configured filter instance on one VM.
pub struct Edge {
    pub config: Rc<Config>,
    scripts: Scripts,
    pub(crate) client: RedisClient,
    pub(crate) wire: HostWire,
    pub(crate) flows: HashMap<u32, RequestFlow>,
    deny_cache: DenyCache,
    local: LocalLimiter,
    metrics: Metrics,
    /// Request events: noted per request, queued, flushed on the tick.
    pub events: EventPublisher,
    /// The response cache (see [`crate::cache`]).
    pub(crate) cache: crate::cache::CacheEngine,
    /// Every request has an event (on no route and on every route): each is read whole, with
    /// no [`Edge::wants`] check first.
    reads_every_request: bool,
}

impl Edge {
    /// Builds the instance for a validated configuration; for `redis_call` this also tells the
    /// host the Redis credentials (a refusal is a configuration error naming the cluster).
    pub fn new(config: Config) -> Result<Edge, ConfigError> {
        let redis = &config.redis;
        let wire = match redis.transport {
            Transport::Relay => HostWire::Relay(RelayWire {
                cluster: redis.cluster().to_string(),
                authority: redis.authority().to_string(),
                token: redis.token.clone(),
            }),
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
                HostWire::RedisCall(RedisCallWire { upstream })
            }
        };
        let events = EventPublisher::new(&config);
        let reads_every_request =
            events.applies_to(None) && (0..config.routes.len()).all(|i| events.applies_to(Some(i)));
        Ok(Edge {
            scripts: Scripts::load(),
            client: RedisClient::new(&config.redis),
            metrics: Metrics::define(&config),
            events,
            cache: crate::cache::CacheEngine::new(&config),
            wire,
            flows: HashMap::new(),
            deny_cache: DenyCache::default(),
            local: LocalLimiter::default(),
            config: Rc::new(config),
            reads_every_request,
        })
    }

    /// Whether a request must be looked at before reading it whole (see [`Edge::wants`]).
    pub fn filters_requests(&self) -> bool {
        !self.reads_every_request
    }

    /// Tick period: often enough to enforce call deadlines close to the timeout.
    pub fn tick_period_ms(&self) -> u32 {
        let calls = (self.client.timeout_ms() / 4).clamp(10, 100);
        // Events flush on the tick: a partial batch waits at most about one flush interval.
        let period = self.events.tick_period_ms().map_or(calls, |e| e.min(calls));
        u32::try_from(period).unwrap_or(100)
    }

    pub fn uses_redis(&self) -> bool {
        self.config.routes.iter().any(|r| r.rate_limit.is_some())
            || self.events.enabled()
            || crate::cache::CacheEngine::wanted(&self.config)
    }

    /// The request-headers phase of context `ctx`: the rate limit, then the cache (whose
    /// lookup joins the rate-limit call: one round trip).
    /// Whether a request needs the filter at all: an event for its route, a policy on the route
    /// it matches, or the purge endpoint. When not, it passes without the filter reading its
    /// headers (an unpoliced route pays for two header lookups, not a copy of every header).
    pub fn wants(&self, path: &str, method: &str) -> bool {
        let path = path.split_once('?').map_or(path, |p| p.0);
        let route = self
            .config
            .routes
            .iter()
            .position(|r| r.matcher.matches(path, method));
        let policed = route.map(|i| &self.config.routes[i]).is_some_and(|r| {
            r.rate_limit.is_some() || r.cache.is_some() || r.invalidation.is_some()
        });
        let purge = self
            .config
            .cache
            .purge
            .as_ref()
            .is_some_and(|p| p.path == path);
        policed || purge || self.events.applies_to(route)
    }

    pub fn begin(&mut self, ctx: u32, now_ms: u64, req: &RequestInfo) -> Begin {
        let rate_limit = self.begin_rate_limit(ctx, now_ms, req);
        self.begin_cache(ctx, now_ms, req, rate_limit)
    }

    fn begin_rate_limit(&mut self, ctx: u32, now_ms: u64, req: &RequestInfo) -> Begin {
        self.events
            .on_request(ctx, host::now_ns(), req, &self.config);
        let (path, query) = req.path.split_once('?').unwrap_or((req.path.as_str(), ""));
        let Some(route_idx) = self
            .config
            .routes
            .iter()
            .position(|r| r.matcher.matches(path, &req.method))
        else {
            return Begin::Continue;
        };
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        let Some(policy) = &route.rate_limit else {
            return Begin::Continue;
        };
        let facts = RequestFacts {
            client_ip: req.client_ip(config.client_ip.trusted_hops),
            path,
            query,
            headers: &req.headers,
        };
        let group = match derive_keys(&route.name, &config.redis.key_prefix, policy, &facts) {
            KeyDecision::Skip => {
                self.metrics.count_verdict(route_idx, &verdict_skipped());
                self.events
                    .note_rate_limit(ctx, crate::ratelimit::Tally::Skipped);
                return Begin::Continue;
            }
            KeyDecision::Limit(group) => group,
        };
        let mut flow = RequestFlow {
            route: route_idx,
            identity: group.identity.clone(),
            outstanding: 0,
            rate_limit: None,
            response_headers: Vec::new(),
        };
        if policy.deny_cache && !policy.shadow {
            if let Some(decision) = self.deny_cache.lookup(&group.identity, now_ms) {
                let verdict = verdict_for_cached_denial(&route.name, policy, &decision);
                return self.settle(ctx, flow, verdict);
            }
        }
        let (evalsha, eval) = script_call(&self.scripts.rate_limit, policy, &group);
        let sent = self.client.call(
            &mut self.wire,
            now_ms,
            ctx,
            Purpose::RateLimit,
            &evalsha,
            Some(eval),
        );
        self.report_client();
        match sent {
            Ok(_) => {
                flow.outstanding += 1;
                self.flows.insert(ctx, flow);
                Begin::Pause
            }
            Err(e) => {
                log_redis_error(&route.name, &e);
                let verdict = verdict_for_failure(
                    &route.name,
                    policy,
                    &group.identity,
                    &mut self.local,
                    now_ms,
                );
                self.settle(ctx, flow, verdict)
            }
        }
    }

    /// Records a verdict reached without waiting.
    fn settle(&mut self, ctx: u32, mut flow: RequestFlow, verdict: Verdict) -> Begin {
        self.metrics.count_verdict(flow.route, &verdict);
        self.events.note_rate_limit(ctx, verdict.tally);
        match verdict.deny {
            Some(resp) => Begin::Respond(resp),
            None => {
                flow.response_headers = verdict.response_headers;
                self.flows.insert(ctx, flow);
                Begin::Continue
            }
        }
    }

    /// The host's answer to call `token`.
    pub fn on_reply(&mut self, now_ms: u64, token: u32, raw: RawReply) -> Option<HostAction> {
        if self.cache_revalidated(now_ms, token, &raw) {
            return None;
        }
        let completion = self.client.on_reply(&mut self.wire, now_ms, token, raw);
        self.report_client();
        completion.and_then(|c| self.complete(now_ms, c))
    }

    /// Whether call `token` is this instance's.
    pub fn owns_call(&self, token: u32) -> bool {
        self.client.has_pending(token)
    }

    /// Timeouts enforced on the tick.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<HostAction> {
        let expired = self.client.expire(now_ms);
        self.report_client();
        let mut actions: Vec<HostAction> = expired
            .into_iter()
            .filter_map(|c| self.complete(now_ms, c))
            .collect();
        actions.extend(self.cache_tick(now_ms));
        self.events.flush(&mut self.client, &mut self.wire, now_ms);
        self.report_client();
        actions
    }

    fn report_client(&mut self) {
        let transitions = std::mem::take(&mut self.client.transitions);
        for t in &transitions {
            match t {
                crate::breaker::Transition::Opened => host::log(
                    LogLevel::Warn,
                    "krowoc-edge: Redis failing, circuit breaker open: policies use their failure mode",
                ),
                crate::breaker::Transition::Closed => host::log(
                    LogLevel::Info,
                    "krowoc-edge: Redis answers again, circuit breaker closed",
                ),
                crate::breaker::Transition::None => {}
            }
        }
        self.metrics.report_client(self.client.stats, &transitions);
        if self.client.take_noauth() {
            self.reinit_redis_call();
        }
    }

    /// Higress's wrappers call init again after NOAUTH (e.g. the password was rotated).
    fn reinit_redis_call(&mut self) {
        if let HostWire::RedisCall(w) = &self.wire {
            let r = &self.config.redis;
            let _ = host::redis_init(
                &w.upstream,
                r.username.as_deref().unwrap_or(""),
                r.password.as_deref().unwrap_or(""),
                r.timeout.as_millis(),
            );
        }
    }

    /// Delivers one finished call to its request; when it was the last, decides.
    fn complete(&mut self, now_ms: u64, c: Completion) -> Option<HostAction> {
        if c.purpose == Purpose::Events {
            self.events.on_flush_done(c.context_id, c.result);
            // Flushes are answered in the root context (they are made from it): send what is
            // due now rather than at the next tick, so a backlog drains at Redis' pace.
            self.events.flush(&mut self.client, &mut self.wire, now_ms);
            return None;
        }
        if matches!(c.purpose, Purpose::CacheLookup | Purpose::CacheJob) {
            return self.complete_cache(now_ms, c.context_id, c.purpose, c.result);
        }
        let config = Rc::clone(&self.config);
        let flow = self.flows.get_mut(&c.context_id)?;
        match c.purpose {
            Purpose::RateLimit => {
                let n = config.routes[flow.route]
                    .rate_limit
                    .as_ref()
                    .map(|p| p.limits.len())
                    .unwrap_or(0);
                flow.rate_limit = Some(c.result.and_then(|r| parse_decision(&r, n)));
            }
            // Settled above: flushes and cache calls are not the rate limit's.
            Purpose::Events | Purpose::CacheLookup | Purpose::CacheJob => return None,
        }
        flow.outstanding = flow.outstanding.saturating_sub(1);
        if flow.outstanding > 0 {
            return None;
        }
        self.decide(now_ms, c.context_id)
    }

    /// Every call of request `ctx` has answered: the rate-limit verdict first (if not settled
    /// already), then the cache's answer.
    pub(crate) fn decide(&mut self, now_ms: u64, ctx: u32) -> Option<HostAction> {
        let config = Rc::clone(&self.config);
        let flow = self.flows.get_mut(&ctx)?;
        let route = &config.routes[flow.route];
        let Some(policy) = route.rate_limit.as_ref() else {
            return self.cache_proceed(now_ms, ctx);
        };
        let verdict = match flow.rate_limit.take() {
            Some(Ok(decision)) => {
                if !decision.allowed && policy.deny_cache && !policy.shadow {
                    self.deny_cache.insert(&flow.identity, now_ms, &decision);
                }
                verdict_for_decision(&route.name, policy, &decision, false)
            }
            Some(Err(e)) => {
                log_redis_error(&route.name, &e);
                verdict_for_failure(&route.name, policy, &flow.identity, &mut self.local, now_ms)
            }
            None => return self.cache_proceed(now_ms, ctx),
        };
        self.metrics.count_verdict(flow.route, &verdict);
        self.events.note_rate_limit(ctx, verdict.tally);
        match verdict.deny {
            Some(resp) => Some(HostAction::Respond(ctx, resp)),
            None => {
                flow.response_headers = verdict.response_headers;
                self.cache_proceed(now_ms, ctx)
            }
        }
    }

    /// Fields for the response of context `ctx`.
    pub fn response_headers(&self, ctx: u32) -> Vec<(String, String)> {
        self.flows
            .get(&ctx)
            .map(|f| f.response_headers.clone())
            .unwrap_or_default()
    }

    pub fn end(&mut self, ctx: u32) {
        self.cache_end(ctx);
        self.flows.remove(&ctx);
        self.events.forget(ctx);
    }
}

fn redis_upstream(cluster: &str, database: u32) -> String {
    if database == 0 {
        cluster.to_string()
    } else {
        format!("{cluster}?db={database}")
    }
}

fn log_redis_error(route: &str, e: &RedisError) {
    // Debug level: during an outage every request fails the same way; the breaker logs once.
    host::log(
        LogLevel::Debug,
        &format!("krowoc-edge: route {route}: rate limit undecided: {e}"),
    );
}

/// Performs actions outside any borrow of the state. `current` is the context the host is
/// already calling (no switch needed).
fn perform(actions: Vec<HostAction>, current: Option<u32>) {
    for action in actions {
        let ctx = match &action {
            HostAction::Resume(c) | HostAction::Respond(c, _) | HostAction::ResumeResponse(c) => *c,
        };
        if current != Some(ctx) && !host::set_effective_context(ctx) {
            // The request is gone (client closed): nothing to resume.
            continue;
        }
        match action {
            HostAction::Resume(_) => {
                host::resume_request();
            }
            HostAction::ResumeResponse(_) => {
                host::resume_response();
            }
            HostAction::Respond(_, resp) => {
                send_response(&resp);
            }
        }
    }
}

fn send_response(resp: &LocalResponse) {
    let mut headers = resp.headers.clone();
    headers.push((EDGE_HEADER.to_string(), crate::VERSION.to_string()));
    host::send_local_response(resp.status, "krowoc_edge", &headers, &resp.body);
}

/// Root context: parses the configuration once and creates request contexts.
pub struct EdgeRoot {
    context_id: u32,
    edge: Option<Rc<RefCell<Edge>>>,
}

impl EdgeRoot {
    pub fn new(context_id: u32) -> EdgeRoot {
        EdgeRoot {
            context_id,
            edge: None,
        }
    }
}

impl Context for EdgeRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        // Calls made from the root context (none yet; events will flush from here).
        let Some(edge) = &self.edge else { return };
        let raw = host::relay_reply(num_headers, body_size);
        let action = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_reply(host::now_ms(), token, raw),
            Err(_) => None,
        };
        perform(action.into_iter().collect(), None);
    }

    fn on_done(&mut self) -> bool {
        INSTANCES.with(|i| i.borrow_mut().remove(&self.context_id));
        true
    }
}

impl RootContext for EdgeRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let built = parse_config(&host::plugin_configuration())
            .and_then(|config| Edge::new(config).map_err(|e| vec![e]));
        match built {
            Ok(edge) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "krowoc-edge {} configured (root context {}): {} route(s), transport {:?}",
                        crate::VERSION,
                        self.context_id,
                        edge.config.routes.len(),
                        edge.config.redis.transport
                    ),
                );
                if edge.uses_redis() {
                    host::set_tick_period_ms(edge.tick_period_ms());
                }
                let edge = Rc::new(RefCell::new(edge));
                INSTANCES.with(|i| i.borrow_mut().insert(self.context_id, Rc::clone(&edge)));
                self.edge = Some(edge);
                true
            }
            Err(problems) => {
                for problem in &problems {
                    host::log(LogLevel::Error, &format!("krowoc-edge: {problem}"));
                }
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(edge) = &self.edge else { return };
        let actions = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_tick(host::now_ms()),
            Err(_) => Vec::new(),
        };
        perform(actions, None);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EdgeRequest {
            context_id,
            edge: self.edge.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request context.
pub struct EdgeRequest {
    context_id: u32,
    edge: Option<Rc<RefCell<Edge>>>,
}

impl EdgeRequest {
    fn request_info(&self) -> RequestInfo {
        let headers = host::header_pairs(host::MAP_REQUEST_HEADERS);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        RequestInfo {
            path: get(":path"),
            method: get(":method"),
            source_address: host::property(&["source", "address"])
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            headers,
        }
    }
}

impl Context for EdgeRequest {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let Some(edge) = &self.edge else { return };
        let raw = host::relay_reply(num_headers, body_size);
        let action = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_reply(host::now_ms(), token, raw),
            // Re-entered while busy: the call stays pending and times out on a tick.
            Err(_) => None,
        };
        perform(action.into_iter().collect(), Some(self.context_id));
    }
}

impl HttpContext for EdgeRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(edge) = &self.edge else {
            return Action::Continue;
        };
        // Where some requests need nothing, two header lookups decide before reading them whole.
        if edge.try_borrow().is_ok_and(|e| e.filters_requests()) {
            let path = host::header_value(host::MAP_REQUEST_HEADERS, ":path").unwrap_or_default();
            let method =
                host::header_value(host::MAP_REQUEST_HEADERS, ":method").unwrap_or_default();
            if !edge.try_borrow().is_ok_and(|e| e.wants(&path, &method)) {
                return Action::Continue;
            }
        }
        let info = self.request_info();
        let begin = match edge.try_borrow_mut() {
            Ok(mut e) => e.begin(self.context_id, host::now_ms(), &info),
            Err(_) => Begin::Continue,
        };
        match begin {
            Begin::Continue => Action::Continue,
            Begin::Pause => Action::Pause,
            Begin::Respond(resp) => {
                send_response(&resp);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // The cache reads the upstream's fields before the filter adds its own.
        let mut hold = false;
        if let Some(edge) = &self.edge {
            let step = match edge.try_borrow_mut() {
                Ok(mut e) => {
                    e.cache_response_headers(self.context_id, host::now_ms(), end_of_stream)
                }
                Err(_) => crate::cache::CacheResponse::Pass(Vec::new()),
            };
            let fields = match step {
                crate::cache::CacheResponse::Replace(resp) => {
                    send_response(&resp);
                    return Action::Pause;
                }
                crate::cache::CacheResponse::Pass(fields) => fields,
                crate::cache::CacheResponse::Hold(fields) => {
                    hold = true;
                    fields
                }
            };
            for (k, v) in fields {
                host::replace_header(host::MAP_RESPONSE_HEADERS, &k, &v);
            }
        }
        host::replace_header(host::MAP_RESPONSE_HEADERS, EDGE_HEADER, crate::VERSION);
        if let Some(edge) = &self.edge {
            let headers = edge
                .try_borrow()
                .map(|e| e.response_headers(self.context_id))
                .unwrap_or_default();
            for (k, v) in headers {
                host::replace_header(host::MAP_RESPONSE_HEADERS, &k, &v);
            }
        }
        // Held until the response's purges are done; the fields above go with it.
        if hold {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Chunks pass on as they come; the cache keeps a copy of a response it will store.
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.cache_response_body(self.context_id, host::now_ms(), body_size, end_of_stream);
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.events
                    .on_log(self.context_id, host::now_ns(), host_response);
                e.end(self.context_id);
            }
        }
    }
}

impl Drop for EdgeRequest {
    fn drop(&mut self) {
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.end(self.context_id);
            }
        }
    }
}

/// Higress calls this with the root context that made the call. Unknown tokens (a reply
/// after its deadline) are ignored, never a trap.
#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
#[no_mangle]
pub extern "C" fn proxy_on_redis_call_response(
    root_context_id: u32,
    token: u32,
    status: u32,
    response_size: usize,
) {
    let edge = INSTANCES.with(|i| {
        let map = i.borrow();
        map.get(&root_context_id).cloned().or_else(|| {
            map.values()
                .find(|e| e.try_borrow().map(|e| e.owns_call(token)).unwrap_or(false))
                .cloned()
        })
    });
    let Some(edge) = edge else { return };
    let raw = host::redis_call_reply(status, response_size);
    let action = match edge.try_borrow_mut() {
        Ok(mut e) => e.on_reply(host::now_ms(), token, raw),
        Err(_) => None,
    };
    perform(action.into_iter().collect(), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(json: &str) -> Edge {
        Edge::new(parse_config(json.as_bytes()).expect("valid configuration")).expect("edge")
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
        assert!(e.wants("/limited/x?y=1", "GET"));
        assert!(e.wants("/cached?user_id=1", "GET"));
        assert!(e.wants("/_purge?tag=x", "POST"));
        assert!(e.wants("/posts", "POST"));
        assert!(!e.wants("/posts", "GET"), "the route matches POST only");
        assert!(!e.wants("/plain", "GET"), "a route without a policy");
        assert!(!e.wants("/nowhere", "GET"), "no route");
    }

    #[test]
    fn with_events_every_request_is_read_but_where_they_are_off() {
        let e = edge(&format!(r#"{{"routes": {ROUTES}, "events": {{}}}}"#));
        assert!(e.wants("/plain", "GET"));
        assert!(e.wants("/nowhere", "GET"));
        assert!(
            !e.wants("/quiet", "GET"),
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
