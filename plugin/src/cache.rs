//! The response cache on a request's path, and its work off the path.
//!
//! A request on a route with a `cache` policy, as the filter's phase driver calls the
//! [`CacheEngine`]:
//! 1. [`CacheEngine::lookup`] — unless the request bypasses the cache (method, credentials),
//!    the lookup script is sent together with the rate-limit call, so the request waits for one
//!    round trip at most. The script returns the entry and, on a miss or a stale entry, tries
//!    the key's fill lock.
//! 2. [`CacheEngine::proceed`] — once every call answered and the rate limit let the request
//!    pass: a fresh entry is served (or 304); a stale one within stale-while-revalidate is
//!    served and, when this request took the lock, refreshed in the background; a miss with the
//!    lock taken by another request waits for that fill (coalescing); anything else goes
//!    upstream.
//! 3. [`CacheEngine::response_headers`] / [`CacheEngine::response_body`] — the upstream's
//!    answer passes to the client as it comes; a storable one is collected on the way, and
//!    stored (one script: the entry, its indexes, the lock) when it ends. A 5xx with a stale
//!    copy within stale-if-error is replaced by the stale copy. An invalidation header is
//!    honoured on 2xx.
//!
//! A request's cache state ([`CacheRequest`]) lives in the request's record; the engine keeps
//! only what outlives requests or spans several (jobs, coalescing, refreshes).
//!
//! Work that must outlive the request (stores, lock releases, background purges, refreshes,
//! coalescing polls) is dispatched from the root context: on the tick for transport `relay`
//! (a proxy cancels a stream's HTTP calls when the stream ends), at once for `redis_call`
//! (Higress calls belong to the root context anyway). Redis failing means bypass, never an
//! error to the client.

use crate::cache_entry::{self, StoredResponse, MAGIC};
use crate::cache_key::{self, CacheKey, KeyInput, RouteKeys};
use crate::cache_policy::{
    self, first, not_modified, not_modified_fields, status_fields, storable, stored_fields,
    ttl_seconds, Bypass, CacheStatus, Freshness, NotStored, Outcome,
};
use crate::cache_purge::{constant_time_eq, parse_directives, plan, Directive, PurgeStep};
use crate::config::cache::CachePolicy;
use crate::config::{Config, Transport};
use crate::host::{self, define_metric, increment_metric, METRIC_COUNTER};
use crate::http::{HostAction, LocalResponse, RequestInfo, Upstream};
use crate::redis::client::{Purpose, RawReply, RedisClient, Wire};
use crate::redis::error::RedisError;
use crate::redis::resp::{Command, Reply};
use crate::redis::scripts::Script;
pub use crate::redis::scripts::{
    CACHE_LOOKUP_LUA, CACHE_PURGE_LUA, CACHE_SCAN_PURGE_LUA, CACHE_STORE_LUA, CACHE_UNLOCK_LUA,
};
use proxy_wasm::types::LogLevel;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Completion ids of background jobs: far above any context id a host hands out.
const JOB_ID_BASE: u32 = 0x8000_0000;
/// SCAN COUNT of one pattern-purge step.
const SCAN_COUNT: u32 = 500;
/// Most jobs waiting for the tick; beyond, new ones are dropped (and counted as failures).
const MAX_QUEUED_JOBS: usize = 4096;
/// Timeout of a background refresh (the fill lock bounds how long others rely on it).
const REVALIDATE_TIMEOUT: Duration = Duration::from_secs(15);

/// The cache's scripts.
#[derive(Clone, Debug)]
pub struct CacheScripts {
    pub lookup: Script,
    pub store: Script,
    pub unlock: Script,
    pub purge: Script,
    pub scan: Script,
}

impl CacheScripts {
    pub fn load() -> CacheScripts {
        CacheScripts {
            lookup: Script::new("cache_lookup", CACHE_LOOKUP_LUA),
            store: Script::new("cache_store", CACHE_STORE_LUA),
            unlock: Script::new("cache_unlock", CACHE_UNLOCK_LUA),
            purge: Script::new("cache_purge", CACHE_PURGE_LUA),
            scan: Script::new("cache_scan_purge", CACHE_SCAN_PURGE_LUA),
        }
    }
}

// ---- metrics ---------------------------------------------------------------------------------

/// Metric ids of one cached route.
#[derive(Clone, Debug, Default)]
struct RouteCacheMetrics {
    hits: Option<u32>,
    misses: Option<u32>,
    expired: Option<u32>,
    stale: Option<u32>,
    bypass: Option<u32>,
    redis_errors: Option<u32>,
    stores: Option<u32>,
    store_failures: Option<u32>,
    not_stored: Option<u32>,
    coalesced: Option<u32>,
    not_modified: Option<u32>,
    corrupt: Option<u32>,
}

/// The cache's counters (see [`crate::metrics`] for the table).
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    routes: Vec<Option<RouteCacheMetrics>>,
    purges: Option<u32>,
    purged_entries: Option<u32>,
    purge_failures: Option<u32>,
    revalidations: Option<u32>,
}

/// `krowoc.cache.<route>.<what>`.
pub fn cache_metric_name(route: &str, what: &str) -> String {
    format!("krowoc.cache.{route}.{what}")
}

#[derive(Clone, Copy, Debug)]
enum Count {
    Hit,
    Miss,
    Expired,
    Stale,
    Bypass,
    RedisError,
    Store,
    StoreFailure,
    NotStored,
    Coalesced,
    NotModified,
    Corrupt,
}

impl Count {
    /// The counter of a lookup that goes to the upstream (a miss, or an expired entry).
    fn forwarded(outcome: Outcome) -> Count {
        if outcome == Outcome::Expired {
            Count::Expired
        } else {
            Count::Miss
        }
    }
}

impl CacheMetrics {
    pub fn define(config: &Config) -> CacheMetrics {
        let counter = |name: &str| define_metric(METRIC_COUNTER, name);
        let any_cache = config.routes.iter().any(|r| r.cache.is_some());
        let global = |name: &str| any_cache.then(|| counter(name)).flatten();
        CacheMetrics {
            routes: config
                .routes
                .iter()
                .map(|r| {
                    r.cache.as_ref().map(|_| {
                        let c = |what: &str| counter(&cache_metric_name(&r.name, what));
                        RouteCacheMetrics {
                            hits: c("hits"),
                            misses: c("misses"),
                            expired: c("expired"),
                            stale: c("stale"),
                            bypass: c("bypass"),
                            redis_errors: c("redis_errors"),
                            stores: c("stores"),
                            store_failures: c("store_failures"),
                            not_stored: c("not_stored"),
                            coalesced: c("coalesced"),
                            not_modified: c("not_modified"),
                            corrupt: c("corrupt"),
                        }
                    })
                })
                .collect(),
            purges: global("krowoc.cache.purges"),
            purged_entries: global("krowoc.cache.purged_entries"),
            purge_failures: global("krowoc.cache.purge_failures"),
            revalidations: global("krowoc.cache.revalidations"),
        }
    }

    fn count(&self, route: usize, what: Count) {
        let Some(Some(m)) = self.routes.get(route) else {
            return;
        };
        let id = match what {
            Count::Hit => m.hits,
            Count::Miss => m.misses,
            Count::Expired => m.expired,
            Count::Stale => m.stale,
            Count::Bypass => m.bypass,
            Count::RedisError => m.redis_errors,
            Count::Store => m.stores,
            Count::StoreFailure => m.store_failures,
            Count::NotStored => m.not_stored,
            Count::Coalesced => m.coalesced,
            Count::NotModified => m.not_modified,
            Count::Corrupt => m.corrupt,
        };
        increment_metric(id, 1);
    }
}

// ---- the lookup's answer ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    Hit,
    Stale,
    Expired,
    Miss,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// This request holds the fill lock.
    Taken,
    /// Another request is filling the key.
    Held,
    NotTried,
    /// The key was found uncacheable recently: go upstream without waiting.
    Pass,
}

/// The lookup script's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub state: EntryState,
    pub age_ms: u64,
    pub blob: Option<Vec<u8>>,
    pub lock: LockState,
    pub fresh_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
    pub corrupt: bool,
    /// Redis' clock at the lookup.
    pub now_ms: u64,
}

fn as_u64(r: &Reply) -> Option<u64> {
    r.as_int().map(|i| u64::try_from(i).unwrap_or(0))
}

/// Reads `cache_lookup.lua`'s reply.
pub fn parse_lookup(reply: &Reply) -> Result<Lookup, RedisError> {
    let bad = || RedisError::protocol(format!("cache_lookup answered {reply:?}"));
    let Reply::Array(items) = reply else {
        return Err(bad());
    };
    if items.len() != 9 {
        return Err(bad());
    }
    let state = match &items[0] {
        Reply::Bulk(b) => match b.as_slice() {
            b"hit" => EntryState::Hit,
            b"stale" => EntryState::Stale,
            b"expired" => EntryState::Expired,
            b"miss" => EntryState::Miss,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    let blob = match &items[2] {
        Reply::Bulk(b) => Some(b.clone()),
        Reply::Nil => None,
        _ => return Err(bad()),
    };
    let lock = match items[3].as_int().ok_or_else(bad)? {
        1 => LockState::Taken,
        0 => LockState::Held,
        -2 => LockState::Pass,
        _ => LockState::NotTried,
    };
    let num = |i: usize| as_u64(&items[i]).ok_or_else(bad);
    Ok(Lookup {
        state,
        age_ms: num(1)?,
        blob,
        lock,
        fresh_ms: num(4)?,
        swr_ms: num(5)?,
        sie_ms: num(6)?,
        corrupt: num(7)? == 1,
        now_ms: num(8)?,
    })
}

// ---- per-request state -----------------------------------------------------------------------

/// A stale entry kept while the request goes upstream, for stale-if-error.
#[derive(Clone, Debug)]
struct StaleCopy {
    response: StoredResponse,
    age_ms: u64,
    fresh_ms: u64,
    sie_ms: u64,
    /// Gateway time when the age was read.
    read_at_ms: u64,
}

impl StaleCopy {
    fn age_at(&self, now_ms: u64) -> u64 {
        self.age_ms + now_ms.saturating_sub(self.read_at_ms)
    }

    fn usable_for_error(&self, now_ms: u64) -> bool {
        self.sie_ms > 0 && self.age_at(now_ms) < self.fresh_ms.saturating_add(self.sie_ms)
    }
}

/// A response being collected for storing.
#[derive(Debug)]
struct Collector {
    status: u16,
    fields: Vec<(String, String)>,
    tags: Vec<String>,
    freshness: cache_policy::Freshness,
    body: Vec<u8>,
    content_length: Option<usize>,
}

/// Where a background refresh goes.
#[derive(Clone, Debug)]
struct RevalidateTarget {
    cluster: String,
    headers: Vec<(String, String)>,
}

#[derive(Debug)]
enum Phase {
    /// Not using the cache; the response passes untouched (but marked).
    Bypass(Bypass),
    Looking,
    Found(Result<Lookup, RedisError>),
    Waiting {
        since_ms: u64,
        stale: Option<StaleCopy>,
    },
    /// Answered from the cache.
    Served,
    /// Sent upstream; the response decides about storing.
    Forwarded {
        outcome: Outcome,
        stale: Option<StaleCopy>,
    },
    Collecting(Collector),
    Finished,
}

/// A request's cache state, kept in the request's record.
#[derive(Debug)]
pub struct CacheRequest {
    route: usize,
    method: String,
    key: CacheKey,
    keys: RouteKeys,
    token: String,
    holds_lock: bool,
    /// The request's conditional fields (`If-None-Match`, `If-Modified-Since`).
    conditional: Vec<(String, String)>,
    revalidate: Option<RevalidateTarget>,
    /// The entry found was unreadable: deleted when this request ends without storing (a
    /// separate delete could overtake the store that replaces it).
    delete_on_end: bool,
    /// Redis time of the lookup that sent this request upstream (0: none).
    looked_up_at: u64,
    phase: Phase,
    /// What the cache did, for the request's event.
    outcome: Option<Outcome>,
}

impl CacheRequest {
    /// Its lookup is out: the request waits for the answer.
    pub fn awaits_lookup(&self) -> bool {
        matches!(self.phase, Phase::Looking)
    }

    /// What the cache did (`HIT`, `MISS`, `BYPASS`, …), once it decided.
    pub fn outcome(&self) -> Option<&'static str> {
        self.outcome.map(Outcome::as_str)
    }

    fn entry_key(&self) -> String {
        self.keys.entry(&self.key.hash)
    }
    fn lock_key(&self) -> String {
        self.keys.lock(&self.key.hash)
    }
}

/// A request waiting for its purges: a purge-endpoint request (answered with the outcome), or
/// a response that announced an invalidation (let go once the purges are done).
#[derive(Debug, Default)]
pub struct PurgeRequest {
    /// A held response, not a purge-endpoint request.
    response: bool,
    outstanding: usize,
    deleted: u64,
    failures: Vec<String>,
    directives: Vec<String>,
}

/// Work off the request path.
#[derive(Debug)]
enum JobKind {
    Store {
        route: usize,
        keys: Vec<String>,
        /// ARGV[1]: the encoded response (bytes, not UTF-8 in general).
        blob: Vec<u8>,
        /// ARGV[2..].
        args: Vec<String>,
    },
    Unlock {
        lock_key: String,
        token: String,
        pass_ms: u64,
    },
    Delete {
        key: String,
    },
    Purge(PurgeStep),
    /// A pattern purge's next step.
    Scan {
        step: PurgeStep,
        cursor: String,
    },
    /// Coalescing: look again for waiters of one key (with the first waiter's lock token).
    Poll {
        entry_key: String,
        lock_key: String,
        token: String,
        lock_ms: u64,
    },
    Revalidate {
        route: usize,
        key: CacheKey,
        token: String,
        looked_up_at: u64,
        target: RevalidateTarget,
    },
}

#[derive(Debug)]
struct Job {
    kind: JobKind,
    /// The purge-endpoint request to tell when this job ends.
    notify: Option<u32>,
}

/// What a coalescing poll found, acted on at the next tick.
#[derive(Debug)]
struct PollResult {
    token: String,
    result: Result<Lookup, RedisError>,
    read_at_ms: u64,
}

/// A background refresh in flight (by HTTP call token).
#[derive(Debug)]
struct Revalidation {
    route: usize,
    key: CacheKey,
    token: String,
    looked_up_at: u64,
}

/// The cache's state on one VM.
pub struct CacheEngine {
    config: Rc<Config>,
    scripts: CacheScripts,
    metrics: CacheMetrics,
    queue: VecDeque<Job>,
    jobs: HashMap<u32, Job>,
    next_job: u32,
    /// Requests waiting for another request's fill, by entry key, in arrival order.
    waiting: BTreeMap<String, Vec<u32>>,
    polling: HashSet<String>,
    poll_results: HashMap<String, PollResult>,
    revalidations: HashMap<u32, Revalidation>,
    tokens: u64,
    seed: u64,
}

/// The cache's view of the requests in flight (the filter's records), by context id: the
/// engine reaches other requests only for coalescing and purge-endpoint answers.
pub trait CacheRequests {
    /// The cache state of request `ctx`.
    fn cache_mut(&mut self, ctx: u32) -> Option<&mut CacheRequest>;
    /// The purges request `ctx` waits for (None: no such request).
    fn purge_mut(&mut self, ctx: u32) -> Option<&mut Option<PurgeRequest>>;
}

/// How the purge endpoint answers.
#[derive(Debug)]
pub enum PurgeStart {
    /// At once (refused, or nothing could be sent).
    Answer(LocalResponse),
    /// Once these purges are done (the request waits, keeping this in its record).
    Wait(PurgeRequest),
}

/// What a request does once its lookup answered and the rate limit let it pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Proceed {
    /// Answered from the cache.
    Serve(LocalResponse),
    /// Waits for another request's fill (the tick lets it go).
    Wait,
    /// Goes upstream.
    Forward,
}

/// What the response phase does for the cache.
#[derive(Debug)]
pub enum CacheResponse {
    /// Let the response pass with these fields added.
    Pass(Vec<(String, String)>),
    /// Add these fields and hold the response until these purges are done
    /// (`HostAction::ResumeResponse`).
    Hold(Vec<(String, String)>, PurgeRequest),
    /// Answer with this instead (a stale copy for an upstream error).
    Replace(LocalResponse),
}

impl CacheEngine {
    /// `seed` makes this VM's lock tokens differ from every other's (the host's clock).
    pub fn new(config: &Rc<Config>, seed: u64) -> CacheEngine {
        CacheEngine {
            config: Rc::clone(config),
            scripts: CacheScripts::load(),
            metrics: CacheMetrics::define(config),
            queue: VecDeque::new(),
            jobs: HashMap::new(),
            next_job: 0,
            waiting: BTreeMap::new(),
            polling: HashSet::new(),
            poll_results: HashMap::new(),
            revalidations: HashMap::new(),
            tokens: 0,
            seed,
        }
    }

    /// A lock token unique across requests and gateways.
    fn new_token(&mut self, ctx: u32) -> String {
        self.tokens += 1;
        format!("{:x}.{ctx:x}.{:x}", self.seed, self.tokens)
    }

    fn job_id(&mut self) -> u32 {
        self.next_job = self.next_job.wrapping_add(1) % JOB_ID_BASE;
        JOB_ID_BASE | self.next_job
    }

    /// Whether this configuration uses the cache at all (ticks, Redis).
    pub fn wanted(config: &Config) -> bool {
        config
            .routes
            .iter()
            .any(|r| r.cache.is_some() || r.invalidation.is_some())
            || config.cache.purge.is_some()
    }

    // ---- request phase -----------------------------------------------------------------------

    /// The purge endpoint: answered by the filter, never forwarded. None for other paths.
    pub fn purge_endpoint(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        req: &RequestInfo,
    ) -> Option<PurgeStart> {
        let config = Rc::clone(&self.config);
        let purge = config.cache.purge.as_ref()?;
        if req.path() != purge.path {
            return None;
        }
        let respond = |status: u32, error: &str| {
            Some(PurgeStart::Answer(json_response(
                status,
                serde_json::json!({ "error": error }),
            )))
        };
        if req.method != "POST" && req.method != "PURGE" {
            let mut resp = json_response(405, serde_json::json!({"error": "use POST"}));
            resp.headers.push(("allow".into(), "POST, PURGE".into()));
            return Some(PurgeStart::Answer(resp));
        }
        let token = req.header(&purge.token_header).unwrap_or("");
        if !constant_time_eq(token.as_bytes(), purge.token.as_bytes()) {
            return respond(403, "missing or wrong purge token");
        }
        let directives = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(&purge.header))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let directives = match parse_directives(&directives) {
            Ok(d) if d.is_empty() => {
                return respond(
                    400,
                    &format!(
                        "give directives in the {} header, e.g. tag=user:42",
                        purge.header
                    ),
                )
            }
            Ok(d) => d,
            Err(e) => return respond(400, &e),
        };
        let mut request = PurgeRequest {
            directives: directives.iter().map(Directive::render).collect(),
            ..PurgeRequest::default()
        };
        let mut jobs = Vec::new();
        for d in &directives {
            for step in plan(&config, d) {
                jobs.push(Job {
                    kind: purge_job(step),
                    notify: Some(ctx),
                });
            }
        }
        // The endpoint's own calls go out from its context: it waits for them (alive).
        for job in jobs {
            match self.dispatch_job(client, wire, now_ms, job) {
                Ok(()) => request.outstanding += 1,
                Err(failed) => {
                    let (job, e) = *failed;
                    self.job_failed(&job, &e);
                    request.failures.push(e.to_string());
                }
            }
        }
        if request.outstanding == 0 {
            return Some(PurgeStart::Answer(purge_answer(&request)));
        }
        Some(PurgeStart::Wait(request))
    }

    /// The cache's part of a request on route `route_idx`: the lookup is sent (it goes out
    /// with the rate limit's call, so the request waits for one round trip at most), or the
    /// request bypasses the cache. None when the route has no cache.
    /// `route_cluster` tells where the route sends requests (asked only for a policy that
    /// refreshes in the background).
    #[allow(clippy::too_many_arguments)]
    pub fn lookup(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        route_idx: usize,
        req: &RequestInfo,
        route_cluster: impl FnOnce() -> Option<String>,
    ) -> Option<CacheRequest> {
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        let policy = route.cache.as_ref()?;
        let key = cache_key::derive(
            policy,
            &KeyInput {
                scheme: req.header(":scheme").unwrap_or("http"),
                host: req.header(":authority").unwrap_or(""),
                method: &req.method,
                path: req.path(),
                query: req.query(),
                headers: &req.headers,
            },
        );
        let mut request = CacheRequest {
            route: route_idx,
            method: req.method.clone(),
            key,
            keys: RouteKeys::new(&config.redis.key_prefix, &route.name),
            token: self.new_token(ctx),
            holds_lock: false,
            conditional: req
                .headers
                .iter()
                .filter(|(k, _)| {
                    k.eq_ignore_ascii_case("if-none-match")
                        || k.eq_ignore_ascii_case("if-modified-since")
                })
                .cloned()
                .collect(),
            revalidate: None,
            delete_on_end: false,
            looked_up_at: 0,
            phase: Phase::Looking,
            outcome: None,
        };
        if let Some(reason) = cache_policy::request_bypass(policy, &req.method, &req.headers) {
            request.phase = Phase::Bypass(reason);
            self.metrics.count(route_idx, Count::Bypass);
            return Some(request);
        }
        if policy.stale_while_revalidate.as_millis() > 0 || policy.honor_cache_control {
            request.revalidate = route_cluster()
                .filter(|c| !c.is_empty())
                .and_then(|cluster| revalidate_target(policy, req, cluster));
        }
        let lock_ms = if policy.coalesce.enabled {
            policy.coalesce.lock.as_millis()
        } else {
            0
        };
        let (keys, args) = lookup_call(
            request.entry_key(),
            request.lock_key(),
            lock_ms,
            &request.token,
        );
        let lookup = &self.scripts.lookup;
        let (evalsha, eval) = (lookup.evalsha(&keys, &args), lookup.eval(&keys, &args));
        let sent = client.call(
            wire,
            now_ms,
            ctx,
            Purpose::CacheLookup,
            &evalsha,
            Some(eval),
        );
        if let Err(e) = sent {
            log_debug(&format!(
                "krowoc-edge: route {}: cache bypassed: {e}",
                route.name
            ));
            request.phase = Phase::Bypass(Bypass::Redis);
            self.metrics.count(route_idx, Count::Bypass);
            self.metrics.count(route_idx, Count::RedisError);
        }
        Some(request)
    }

    /// The lookup's answer; false when the request was not waiting for one.
    pub fn on_lookup(request: &mut CacheRequest, result: Result<Reply, RedisError>) -> bool {
        if !matches!(request.phase, Phase::Looking) {
            return false;
        }
        let lookup = result.and_then(|r| parse_lookup(&r));
        if let Ok(l) = &lookup {
            request.holds_lock = l.lock == LockState::Taken;
            request.looked_up_at = l.now_ms;
        }
        request.phase = Phase::Found(lookup);
        true
    }

    /// The rate limit let the request pass: answer it from the cache, let it wait for a
    /// fill, or send it upstream.
    pub fn proceed(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
    ) -> Proceed {
        let config = Rc::clone(&self.config);
        if !matches!(request.phase, Phase::Found(_)) {
            // A bypass: nothing to decide.
            return Proceed::Forward;
        }
        let Phase::Found(result) = std::mem::replace(&mut request.phase, Phase::Finished) else {
            return Proceed::Forward;
        };
        let route = request.route;
        let mut lookup = match result {
            Ok(l) => l,
            Err(e) => {
                log_debug(&format!(
                    "krowoc-edge: route {}: cache bypassed: {e}",
                    config.routes[route].name
                ));
                self.metrics.count(route, Count::Bypass);
                self.metrics.count(route, Count::RedisError);
                request.phase = Phase::Bypass(Bypass::Redis);
                return Proceed::Forward;
            }
        };
        if lookup.corrupt {
            self.metrics.count(route, Count::Corrupt);
        }
        let decoded = match lookup.blob.take().map(entry_decode) {
            Some(Err(())) => {
                self.metrics.count(route, Count::Corrupt);
                request.delete_on_end = true;
                None
            }
            Some(Ok(r)) => Some(r),
            None => None,
        };
        let settings = &config.cache;
        match (lookup.state, decoded) {
            (EntryState::Hit, Some(stored)) => {
                self.metrics.count(route, Count::Hit);
                let ttl = ttl_seconds(lookup.fresh_ms, lookup.age_ms);
                let resp = serve(
                    settings,
                    request,
                    &stored,
                    lookup.age_ms,
                    Outcome::Hit,
                    CacheStatus::hit(ttl),
                );
                request.outcome = Some(Outcome::Hit);
                if resp.status == 304 {
                    self.metrics.count(route, Count::NotModified);
                }
                request.phase = Phase::Served;
                Proceed::Serve(resp)
            }
            (EntryState::Stale, Some(stored)) => {
                self.metrics.count(route, Count::Stale);
                let mut status = CacheStatus::hit(ttl_seconds(lookup.fresh_ms, lookup.age_ms));
                status.detail = Some("stale-while-revalidate");
                let resp = serve(
                    settings,
                    request,
                    &stored,
                    lookup.age_ms,
                    Outcome::Stale,
                    status,
                );
                request.outcome = Some(Outcome::Stale);
                request.phase = Phase::Served;
                if request.holds_lock {
                    request.holds_lock = false;
                    let job = match request.revalidate.clone() {
                        Some(target) => JobKind::Revalidate {
                            route,
                            key: request.key.clone(),
                            token: request.token.clone(),
                            looked_up_at: lookup.now_ms,
                            target,
                        },
                        None => JobKind::Unlock {
                            lock_key: request.lock_key(),
                            token: request.token.clone(),
                            pass_ms: 0,
                        },
                    };
                    self.queue_job(client, wire, now_ms, job);
                }
                Proceed::Serve(resp)
            }
            (state, stored) => {
                let stale = stored.map(|response| StaleCopy {
                    response,
                    age_ms: lookup.age_ms,
                    fresh_ms: lookup.fresh_ms,
                    sie_ms: lookup.sie_ms,
                    read_at_ms: now_ms,
                });
                let outcome = if stale.is_some() && state != EntryState::Miss {
                    Outcome::Expired
                } else {
                    Outcome::Miss
                };
                if lookup.lock == LockState::Held {
                    self.metrics.count(route, Count::Coalesced);
                    request.phase = Phase::Waiting {
                        since_ms: now_ms,
                        stale,
                    };
                    self.waiting
                        .entry(request.entry_key())
                        .or_default()
                        .push(ctx);
                    return Proceed::Wait;
                }
                self.metrics.count(route, Count::forwarded(outcome));
                request.phase = Phase::Forwarded { outcome, stale };
                Proceed::Forward
            }
        }
    }

    // ---- response phase ----------------------------------------------------------------------

    /// The upstream's response headers (or a local reply's) for a request on route
    /// `route_idx`: fields to add, or a replacement. `read_headers` gives the response's fields
    /// (asked only when the cache needs them); `passed` are the fields the request was let
    /// through with (the rate limit's), which a replacement carries too.
    ///
    /// A response that invalidates (the route's invalidation header, or a successful unsafe
    /// request to a cached route) is held until its purges are done, so that a client that
    /// reads after it sees the invalidation: one Redis round trip, the purges going out
    /// together. Pattern purges scan and stay off the response path.
    #[allow(clippy::too_many_arguments)]
    pub fn response_headers(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        route_idx: usize,
        request: Option<&mut CacheRequest>,
        passed: &[(String, String)],
        end_of_stream: bool,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
    ) -> CacheResponse {
        let mut purges = Vec::new();
        let step = self.response_step(
            client,
            wire,
            now_ms,
            route_idx,
            request,
            passed,
            end_of_stream,
            read_headers,
            &mut purges,
        );
        if purges.is_empty() {
            return step;
        }
        let mut held = PurgeRequest {
            response: true,
            ..PurgeRequest::default()
        };
        for kind in purges {
            let job = Job {
                kind,
                notify: Some(ctx),
            };
            match self.dispatch_job(client, wire, now_ms, job) {
                Ok(()) => held.outstanding += 1,
                Err(failed) => {
                    let (job, e) = *failed;
                    self.job_failed(&job, &e);
                }
            }
        }
        match step {
            CacheResponse::Pass(fields) if held.outstanding > 0 => {
                CacheResponse::Hold(fields, held)
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn response_step(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        route_idx: usize,
        request: Option<&mut CacheRequest>,
        passed: &[(String, String)],
        end_of_stream: bool,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
        purges: &mut Vec<JobKind>,
    ) -> CacheResponse {
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        let wanted = route.invalidation.is_some()
            || request
                .as_ref()
                .is_some_and(|r| matches!(r.phase, Phase::Forwarded { .. } | Phase::Bypass(_)));
        if !wanted {
            return CacheResponse::Pass(Vec::new());
        }
        let headers = read_headers();
        let status = header(&headers, ":status")
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(502);
        if let Some(inv) = &route.invalidation {
            if (200..300).contains(&status) {
                self.honour_invalidation(client, wire, now_ms, &headers, &inv.header, purges);
            }
        }
        let Some(request) = request else {
            return CacheResponse::Pass(Vec::new());
        };
        let settings = &config.cache;
        let Some(policy) = &route.cache else {
            return CacheResponse::Pass(Vec::new());
        };
        match std::mem::replace(&mut request.phase, Phase::Finished) {
            Phase::Bypass(reason) => {
                let (fwd, detail) = reason.forward();
                let mut s = CacheStatus::forward(fwd);
                s.fwd_status = Some(status);
                s.detail = Some(detail);
                // RFC 9111 4.4: a successful unsafe request invalidates its target URI.
                let unsafe_method = !matches!(
                    request.method.as_str(),
                    "GET" | "HEAD" | "OPTIONS" | "TRACE"
                );
                let invalidate =
                    (reason == Bypass::Method && unsafe_method && (200..400).contains(&status))
                        .then(|| PurgeStep::Index {
                            index_key: request.keys.url_index(&request.key.url),
                            entry_prefix: request.keys.entry_prefix(),
                            mark_key: request.keys.purge_mark(),
                        });
                request.phase = Phase::Bypass(reason);
                purges.extend(invalidate.map(JobKind::Purge));
                request.outcome = Some(Outcome::Bypass);
                CacheResponse::Pass(status_fields(settings, Outcome::Bypass, &s))
            }
            Phase::Forwarded { outcome, stale } => {
                let fwd = if outcome == Outcome::Expired {
                    "stale"
                } else {
                    "uri-miss"
                };
                if status >= 500 {
                    if let Some(stale) = stale.filter(|s| s.usable_for_error(now_ms)) {
                        let age = stale.age_at(now_ms);
                        let mut s = CacheStatus::forward(fwd);
                        s.fwd_status = Some(status);
                        s.ttl_s = Some(ttl_seconds(stale.fresh_ms, age));
                        s.detail = Some("stale-if-error");
                        let mut resp =
                            serve(settings, request, &stale.response, age, Outcome::Stale, s);
                        request.outcome = Some(Outcome::Stale);
                        self.metrics.count(route_idx, Count::Stale);
                        self.release_lock(client, wire, now_ms, request, 0);
                        resp.headers.extend(passed.iter().cloned());
                        return CacheResponse::Replace(resp);
                    }
                }
                let mut s = CacheStatus::forward(fwd);
                s.fwd_status = Some(status);
                let now_s = i64::try_from(now_ms / 1000).unwrap_or(0);
                match storable(policy, status, &headers, now_s) {
                    Ok(freshness) => {
                        s.stored = true;
                        let fields = stored_fields(
                            settings,
                            route.invalidation.as_ref().map(|i| i.header.as_str()),
                            &headers,
                        );
                        let content_length = header(&headers, "content-length")
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        let collector = Collector {
                            status,
                            tags: cache_policy::tags(policy, &headers),
                            fields,
                            freshness,
                            body: Vec::with_capacity(content_length.unwrap_or(0).min(1 << 20)),
                            content_length,
                        };
                        request.phase = Phase::Collecting(collector);
                        // A HEAD answer has no body even when its fields describe one.
                        if end_of_stream || request.method == "HEAD" {
                            self.finish_collecting(client, wire, now_ms, request);
                        }
                    }
                    Err(why) => {
                        s.detail = Some(why.as_str());
                        self.metrics.count(route_idx, Count::NotStored);
                        self.release_lock(
                            client,
                            wire,
                            now_ms,
                            request,
                            pass_for(why, status, policy),
                        );
                    }
                }
                request.outcome = Some(outcome);
                CacheResponse::Pass(status_fields(settings, outcome, &s))
            }
            other => {
                request.phase = other;
                CacheResponse::Pass(Vec::new())
            }
        }
    }

    /// Whether the request keeps a copy of its response body (to store it).
    pub fn collects(request: &CacheRequest) -> bool {
        matches!(request.phase, Phase::Collecting(_))
    }

    /// A chunk of the response body passed.
    pub fn response_body(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
        chunk: &[u8],
        end_of_stream: bool,
    ) {
        let Phase::Collecting(c) = &mut request.phase else {
            return;
        };
        let route = request.route;
        let policy = self.config.routes[route].cache.as_ref();
        let max = policy.map(|p| p.max_body_bytes).unwrap_or(0);
        c.body.extend_from_slice(chunk);
        if u64::try_from(c.body.len()).unwrap_or(u64::MAX) > max {
            request.phase = Phase::Finished;
            self.metrics.count(route, Count::NotStored);
            let pass = policy.map(|p| p.coalesce.lock.as_millis()).unwrap_or(0);
            self.release_lock(client, wire, now_ms, request, pass);
            return;
        }
        if end_of_stream {
            self.finish_collecting(client, wire, now_ms, request);
        }
    }

    /// The response ended: store what was collected.
    fn finish_collecting(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
    ) {
        let Phase::Collecting(c) = std::mem::replace(&mut request.phase, Phase::Finished) else {
            return;
        };
        // The store replaces the entry: no delete needed.
        request.delete_on_end = false;
        let blob = cache_entry::encode(c.status, &c.fields, &c.body);
        let token = if request.holds_lock {
            request.token.as_str()
        } else {
            ""
        };
        let call = store_call(
            &request.keys,
            &request.key,
            &c.tags,
            &c.freshness,
            token,
            request.looked_up_at,
        );
        request.holds_lock = false;
        self.queue_store(client, wire, now_ms, request.route, call, blob);
    }

    /// Request `ctx` ended (logged, or its context went away).
    pub fn end(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        mut request: CacheRequest,
    ) {
        if let Phase::Collecting(c) = &request.phase {
            // Trailers ended the body without an end-of-stream chunk: store if complete.
            if c.content_length == Some(c.body.len()) {
                self.finish_collecting(client, wire, now_ms, &mut request);
            } else {
                self.metrics.count(request.route, Count::NotStored);
            }
        }
        self.release_lock(client, wire, now_ms, &mut request, 0);
        if request.delete_on_end {
            let key = request.entry_key();
            self.queue_job(client, wire, now_ms, JobKind::Delete { key });
        }
        if matches!(request.phase, Phase::Waiting { .. }) {
            if let Some(list) = self.waiting.get_mut(&request.entry_key()) {
                list.retain(|c| *c != ctx);
            }
        }
    }

    /// Releases this request's fill lock (off the request path); `pass_ms` > 0 marks the key
    /// uncacheable for that long.
    fn release_lock(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
        pass_ms: u64,
    ) {
        if !request.holds_lock {
            return;
        }
        request.holds_lock = false;
        let job = JobKind::Unlock {
            lock_key: request.lock_key(),
            token: request.token.clone(),
            pass_ms,
        };
        self.queue_job(client, wire, now_ms, job);
    }

    /// Applies an upstream's invalidation header (its route has `invalidation`, status 2xx):
    /// index purges go to `purges` (the response waits for them), scans to the job queue.
    fn honour_invalidation(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        headers: &[(String, String)],
        name: &str,
        purges: &mut Vec<JobKind>,
    ) {
        let value = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if value.is_empty() {
            return;
        }
        let directives = match parse_directives(&value) {
            Ok(d) => d,
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    &format!("krowoc-edge: ignored invalidation header {name}: {e}"),
                );
                increment_metric(self.metrics.purge_failures, 1);
                return;
            }
        };
        let config = Rc::clone(&self.config);
        for d in &directives {
            for step in plan(&config, d) {
                match purge_job(step) {
                    scan @ JobKind::Scan { .. } => self.queue_job(client, wire, now_ms, scan),
                    index => purges.push(index),
                }
            }
        }
    }

    // ---- background work ---------------------------------------------------------------------

    fn queue_store(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        route: usize,
        (keys, args): (Vec<String>, Vec<String>),
        blob: Vec<u8>,
    ) {
        let job = Job {
            kind: JobKind::Store {
                route,
                keys,
                blob,
                args,
            },
            notify: None,
        };
        self.enqueue(client, wire, now_ms, job);
    }

    fn queue_job(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        kind: JobKind,
    ) {
        self.enqueue(client, wire, now_ms, Job { kind, notify: None });
    }

    fn enqueue(&mut self, client: &mut RedisClient, wire: &mut dyn Wire, now_ms: u64, job: Job) {
        // Higress Redis calls belong to the root context: no need to wait for the tick.
        let immediate = client.transport == Transport::RedisCall
            && !matches!(job.kind, JobKind::Revalidate { .. });
        if immediate {
            if let Err(failed) = self.dispatch_job(client, wire, now_ms, job) {
                let (job, e) = *failed;
                self.job_failed(&job, &e);
            }
            return;
        }
        if self.queue.len() >= MAX_QUEUED_JOBS {
            self.job_failed(&job, &RedisError::protocol("cache job queue full"));
            return;
        }
        self.queue.push_back(job);
    }

    /// Sends one job now; the job comes back with the error when it could not be sent.
    fn dispatch_job(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        job: Job,
    ) -> Result<(), Box<(Job, RedisError)>> {
        let id = self.job_id();
        let scripts = &self.scripts;
        let (cmd, eval) = match &job.kind {
            JobKind::Store {
                keys, blob, args, ..
            } => script_pair(&scripts.store, keys, Some(blob), args),
            JobKind::Unlock {
                lock_key,
                token,
                pass_ms,
            } => script_pair(
                &scripts.unlock,
                std::slice::from_ref(lock_key),
                None,
                &[token.clone(), pass_ms.to_string()],
            ),
            JobKind::Delete { key } => (Command::new("DEL").arg(key), None),
            JobKind::Purge(PurgeStep::Index {
                index_key,
                entry_prefix,
                mark_key,
            }) => script_pair(
                &scripts.purge,
                &[index_key.clone(), mark_key.clone()],
                None,
                std::slice::from_ref(entry_prefix),
            ),
            JobKind::Purge(PurgeStep::Scan { .. }) => {
                let e = RedisError::protocol("a scan is sent as a Scan job");
                return Err(Box::new((job, e)));
            }
            JobKind::Scan {
                step:
                    PurgeStep::Scan {
                        match_pattern,
                        lua_pattern,
                        mark_keys,
                    },
                cursor,
            } => script_pair(
                &scripts.scan,
                mark_keys,
                None,
                &[
                    cursor.clone(),
                    match_pattern.clone(),
                    SCAN_COUNT.to_string(),
                    lua_pattern.clone(),
                ],
            ),
            JobKind::Scan { .. } => {
                let e = RedisError::protocol("a Scan job needs a scan step");
                return Err(Box::new((job, e)));
            }
            JobKind::Poll {
                entry_key,
                lock_key,
                token,
                lock_ms,
            } => {
                let (keys, args) =
                    lookup_call(entry_key.clone(), lock_key.clone(), *lock_ms, token);
                script_pair(&scripts.lookup, &keys, None, &args)
            }
            JobKind::Revalidate { .. } => {
                let e = RedisError::protocol("a refresh is sent to the upstream on the tick");
                return Err(Box::new((job, e)));
            }
        };
        match client.call(wire, now_ms, id, Purpose::CacheJob, &cmd, eval) {
            Ok(_) => {
                if let JobKind::Poll { entry_key, .. } = &job.kind {
                    self.polling.insert(entry_key.clone());
                }
                self.jobs.insert(id, job);
                Ok(())
            }
            Err(e) => Err(Box::new((job, e))),
        }
    }

    /// Sends a background refresh to the route's upstream; the job comes back with the error
    /// when the host refused it.
    fn send_refresh(
        &mut self,
        upstream: &mut dyn Upstream,
        job: Job,
    ) -> Result<(), Box<(Job, RedisError)>> {
        let JobKind::Revalidate {
            route,
            key,
            token,
            looked_up_at,
            target,
        } = job.kind
        else {
            return Ok(());
        };
        match upstream.call(&target.cluster, &target.headers, REVALIDATE_TIMEOUT) {
            Ok(call) => {
                increment_metric(self.metrics.revalidations, 1);
                self.revalidations.insert(
                    call,
                    Revalidation {
                        route,
                        key,
                        token,
                        looked_up_at,
                    },
                );
                Ok(())
            }
            Err(why) => {
                let e = RedisError::new(
                    crate::redis::error::RedisErrorKind::Dispatch,
                    format!(
                        "host refused the refresh call to cluster {:?} ({why})",
                        target.cluster
                    ),
                );
                let job = Job {
                    kind: JobKind::Revalidate {
                        route,
                        key,
                        token,
                        looked_up_at,
                        target,
                    },
                    notify: job.notify,
                };
                Err(Box::new((job, e)))
            }
        }
    }

    /// A job could not be sent, or failed.
    fn job_failed(&mut self, job: &Job, e: &RedisError) {
        match &job.kind {
            JobKind::Store { route, .. } => {
                log_debug(&format!("krowoc-edge: cache store failed: {e}"));
                self.metrics.count(*route, Count::StoreFailure);
            }
            JobKind::Purge(_) | JobKind::Scan { .. } => {
                host::log(
                    LogLevel::Warn,
                    &format!("krowoc-edge: cache purge failed: {e}"),
                );
                increment_metric(self.metrics.purge_failures, 1);
            }
            JobKind::Poll {
                entry_key, token, ..
            } => {
                self.polling.remove(entry_key);
                self.poll_results.insert(
                    entry_key.clone(),
                    PollResult {
                        token: token.clone(),
                        result: Err(e.clone()),
                        read_at_ms: 0,
                    },
                );
            }
            JobKind::Revalidate {
                route, key, token, ..
            } => {
                log_debug(&format!("krowoc-edge: cache refresh not sent: {e}"));
                let keys = RouteKeys::new(
                    &self.config.redis.key_prefix,
                    &self.config.routes[*route].name,
                );
                self.queue.push_back(Job {
                    kind: JobKind::Unlock {
                        lock_key: keys.lock(&key.hash),
                        token: token.clone(),
                        pass_ms: 0,
                    },
                    notify: None,
                });
            }
            JobKind::Unlock { .. } | JobKind::Delete { .. } => {}
        }
    }

    /// A purge of request `ctx` finished (or made progress); once the last is done, the
    /// purge endpoint answers or the held response goes on.
    fn purge_progress(
        requests: &mut dyn CacheRequests,
        ctx: u32,
        deleted: u64,
        failure: Option<String>,
    ) -> Option<HostAction> {
        let slot = requests.purge_mut(ctx)?;
        let p = slot.as_mut()?;
        p.deleted += deleted;
        p.failures.extend(failure);
        p.outstanding = p.outstanding.saturating_sub(1);
        if p.outstanding > 0 {
            return None;
        }
        let p = slot.take()?;
        if p.response {
            return Some(HostAction::ResumeResponse(ctx));
        }
        Some(HostAction::Respond(ctx, purge_answer(&p)))
    }

    /// The answer to job `id` (a completion of [`Purpose::CacheJob`]).
    pub fn on_job_answer(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        id: u32,
        result: Result<Reply, RedisError>,
        requests: &mut dyn CacheRequests,
    ) -> Option<HostAction> {
        if !is_job(id) {
            return None;
        }
        let job = self.jobs.remove(&id)?;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.job_failed(&job, &e);
                return job
                    .notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, 0, Some(e.to_string())));
            }
        };
        match job.kind {
            JobKind::Store { route, .. } => {
                // -1: the route was purged after the lookup; the response may predate it.
                let count = if result == Reply::Int(-1) {
                    Count::NotStored
                } else {
                    Count::Store
                };
                self.metrics.count(route, count);
                None
            }
            JobKind::Unlock { .. } | JobKind::Delete { .. } | JobKind::Revalidate { .. } => None,
            JobKind::Purge(_) => {
                let deleted = as_u64(&result).unwrap_or(0);
                increment_metric(self.metrics.purges, 1);
                increment_metric(
                    self.metrics.purged_entries,
                    i64::try_from(deleted).unwrap_or(0),
                );
                job.notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, deleted, None))
            }
            JobKind::Scan { step, .. } => {
                let (cursor, deleted) = match &result {
                    Reply::Array(items) if items.len() == 2 => {
                        let cursor = match &items[0] {
                            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                            other => other.as_int().map(|i| i.to_string()).unwrap_or_default(),
                        };
                        (cursor, as_u64(&items[1]).unwrap_or(0))
                    }
                    _ => (String::new(), 0),
                };
                increment_metric(
                    self.metrics.purged_entries,
                    i64::try_from(deleted).unwrap_or(0),
                );
                if !cursor.is_empty() && cursor != "0" {
                    // The next step goes out from the context that got this answer.
                    let next = Job {
                        kind: JobKind::Scan { step, cursor },
                        notify: job.notify,
                    };
                    if let Some(ctx) = job.notify {
                        if let Some(Some(p)) = requests.purge_mut(ctx) {
                            p.deleted += deleted;
                        }
                    }
                    return match self.dispatch_job(client, wire, now_ms, next) {
                        Ok(()) => None,
                        Err(failed) => {
                            let (next, e) = *failed;
                            self.job_failed(&next, &e);
                            next.notify.and_then(|ctx| {
                                Self::purge_progress(requests, ctx, 0, Some(e.to_string()))
                            })
                        }
                    };
                }
                let failure = cursor
                    .is_empty()
                    .then(|| format!("cache_scan_purge answered {result:?}"));
                if failure.is_none() {
                    increment_metric(self.metrics.purges, 1);
                }
                job.notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, deleted, failure))
            }
            JobKind::Poll {
                entry_key, token, ..
            } => {
                self.polling.remove(&entry_key);
                self.poll_results.insert(
                    entry_key,
                    PollResult {
                        token,
                        result: parse_lookup(&result),
                        read_at_ms: now_ms,
                    },
                );
                None
            }
        }
    }

    /// The answer to a background refresh (HTTP call `token`; `read_headers` gives its
    /// response fields); false when the call is not one.
    pub fn on_refresh_answer(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        token: u32,
        raw: &RawReply,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
    ) -> bool {
        let Some(rev) = self.revalidations.remove(&token) else {
            return false;
        };
        let config = Rc::clone(&self.config);
        let route = &config.routes[rev.route];
        let keys = RouteKeys::new(&config.redis.key_prefix, &route.name);
        let unlock = |pass_ms| JobKind::Unlock {
            lock_key: keys.lock(&rev.key.hash),
            token: rev.token.clone(),
            pass_ms,
        };
        let Some(policy) = &route.cache else {
            return true;
        };
        let (status, body) = match raw {
            RawReply::Relay {
                status: Some(s),
                body,
            } => (*s, body),
            _ => {
                self.queue_job(client, wire, now_ms, unlock(0));
                return true;
            }
        };
        let headers = read_headers();
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(0);
        let too_large = u64::try_from(body.len()).unwrap_or(u64::MAX) > policy.max_body_bytes;
        match storable(policy, status, &headers, now_s) {
            Ok(f) if !too_large => {
                let fields = stored_fields(
                    &config.cache,
                    route.invalidation.as_ref().map(|i| i.header.as_str()),
                    &headers,
                );
                let blob = cache_entry::encode(status, &fields, body);
                let tags = cache_policy::tags(policy, &headers);
                let call = store_call(&keys, &rev.key, &tags, &f, &rev.token, rev.looked_up_at);
                self.queue_store(client, wire, now_ms, rev.route, call, blob);
            }
            Ok(_) => {
                self.metrics.count(rev.route, Count::NotStored);
                let lock_ms = policy.coalesce.lock.as_millis();
                self.queue_job(client, wire, now_ms, unlock(lock_ms));
            }
            Err(why) => {
                self.metrics.count(rev.route, Count::NotStored);
                self.queue_job(client, wire, now_ms, unlock(pass_for(why, status, policy)));
            }
        }
        true
    }

    /// The tick: coalesced requests (answers of polls, time-outs, new polls) and queued jobs
    /// (refreshes go to the route's upstream).
    pub fn tick(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        upstream: &mut dyn Upstream,
        now_ms: u64,
        requests: &mut dyn CacheRequests,
    ) -> Vec<HostAction> {
        let mut actions = Vec::new();
        let keys: Vec<String> = self.waiting.keys().cloned().collect();
        for entry_key in keys {
            let Some(mut waiters) = self.waiting.remove(&entry_key) else {
                continue;
            };
            waiters.retain(|c| {
                requests
                    .cache_mut(*c)
                    .is_some_and(|r| matches!(r.phase, Phase::Waiting { .. }))
            });
            if let Some(poll) = self.poll_results.remove(&entry_key) {
                waiters = self.settle_waiters(
                    client,
                    wire,
                    now_ms,
                    waiters,
                    poll,
                    requests,
                    &mut actions,
                );
            }
            let mut still = Vec::with_capacity(waiters.len());
            for ctx in waiters {
                let Some(r) = requests.cache_mut(ctx) else {
                    continue;
                };
                let wait = self.config.routes[r.route]
                    .cache
                    .as_ref()
                    .map(|p| p.coalesce.wait.as_millis())
                    .unwrap_or(0);
                let expired =
                    matches!(r.phase, Phase::Waiting { since_ms, .. } if since_ms + wait <= now_ms);
                if expired {
                    actions.extend(self.stop_waiting(now_ms, ctx, r));
                } else {
                    still.push(ctx);
                }
            }
            if let Some(first_ctx) = still.first().copied() {
                if !self.polling.contains(&entry_key) {
                    if let Some(r) = requests.cache_mut(first_ctx) {
                        self.poll(client, wire, now_ms, r);
                    }
                }
                self.waiting.insert(entry_key, still);
            }
        }
        let waiting = &self.waiting;
        self.poll_results.retain(|k, _| waiting.contains_key(k));
        let queued: Vec<Job> = self.queue.drain(..).collect();
        for job in queued {
            let sent = match job.kind {
                JobKind::Revalidate { .. } => self.send_refresh(upstream, job),
                _ => self.dispatch_job(client, wire, now_ms, job),
            };
            if let Err(failed) = sent {
                let (job, e) = *failed;
                self.job_failed(&job, &e);
            }
        }
        actions
    }

    /// Sends a coalescing poll for the key `request` waits on, with its lock token.
    fn poll(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &CacheRequest,
    ) {
        let lock_ms = self.config.routes[request.route]
            .cache
            .as_ref()
            .map(|p| p.coalesce.lock.as_millis())
            .unwrap_or(0);
        let job = Job {
            kind: JobKind::Poll {
                entry_key: request.entry_key(),
                lock_key: request.lock_key(),
                token: request.token.clone(),
                lock_ms,
            },
            notify: None,
        };
        if let Err(failed) = self.dispatch_job(client, wire, now_ms, job) {
            let (job, e) = *failed;
            self.job_failed(&job, &e);
        }
    }

    /// Acts on a poll's answer for the requests waiting on one key; returns those still waiting.
    #[allow(clippy::too_many_arguments)]
    fn settle_waiters(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        waiters: Vec<u32>,
        poll: PollResult,
        requests: &mut dyn CacheRequests,
        actions: &mut Vec<HostAction>,
    ) -> Vec<u32> {
        let config = Rc::clone(&self.config);
        let lookup = match poll.result {
            Ok(l) => l,
            Err(e) => {
                log_debug(&format!("krowoc-edge: coalescing poll failed: {e}"));
                for ctx in waiters {
                    if let Some(r) = requests.cache_mut(ctx) {
                        r.phase = Phase::Bypass(Bypass::Redis);
                        self.metrics.count(r.route, Count::Bypass);
                        self.metrics.count(r.route, Count::RedisError);
                        actions.push(HostAction::Resume(ctx));
                    }
                }
                return Vec::new();
            }
        };
        let servable = matches!(lookup.state, EntryState::Hit | EntryState::Stale);
        let stored = if servable {
            lookup.blob.clone().and_then(|b| entry_decode(b).ok())
        } else {
            None
        };
        if let Some(stored) = stored {
            let outcome = if lookup.state == EntryState::Hit {
                Outcome::Hit
            } else {
                Outcome::Stale
            };
            let age_ms = lookup.age_ms + now_ms.saturating_sub(poll.read_at_ms);
            for ctx in &waiters {
                let Some(r) = requests.cache_mut(*ctx) else {
                    continue;
                };
                let mut status = CacheStatus::hit(ttl_seconds(lookup.fresh_ms, age_ms));
                status.collapsed = true;
                let resp = serve(&config.cache, r, &stored, age_ms, outcome, status);
                r.outcome = Some(outcome);
                r.phase = Phase::Served;
                self.metrics.count(
                    r.route,
                    if outcome == Outcome::Hit {
                        Count::Hit
                    } else {
                        Count::Stale
                    },
                );
                actions.push(HostAction::Respond(*ctx, resp));
            }
            if lookup.lock == LockState::Taken {
                // The poll took the refresh lock of a stale entry: give it back.
                let lock_key = waiters
                    .first()
                    .and_then(|c| requests.cache_mut(*c))
                    .map(|r| r.lock_key());
                if let Some(lock_key) = lock_key {
                    let job = JobKind::Unlock {
                        lock_key,
                        token: poll.token.clone(),
                        pass_ms: 0,
                    };
                    self.queue_job(client, wire, now_ms, job);
                }
            }
            return Vec::new();
        }
        match lookup.lock {
            LockState::Taken => {
                // The filler gave up (or its lock expired): the poll's request fills instead.
                let mut rest = Vec::with_capacity(waiters.len());
                let mut handed = false;
                for ctx in waiters {
                    let owner = requests
                        .cache_mut(ctx)
                        .filter(|r| r.token == poll.token && !handed);
                    match owner {
                        Some(r) => {
                            handed = true;
                            actions.extend(self.stop_waiting_as_filler(
                                client,
                                wire,
                                now_ms,
                                ctx,
                                r,
                                lookup.now_ms,
                            ));
                        }
                        None => rest.push(ctx),
                    }
                }
                rest
            }
            LockState::Pass | LockState::NotTried => {
                for ctx in waiters {
                    if let Some(r) = requests.cache_mut(ctx) {
                        actions.extend(self.stop_waiting(now_ms, ctx, r));
                    }
                }
                Vec::new()
            }
            LockState::Held => waiters,
        }
    }

    /// A waiting request goes upstream holding the fill lock.
    fn stop_waiting_as_filler(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
        looked_up_at: u64,
    ) -> Option<HostAction> {
        request.holds_lock = true;
        request.looked_up_at = looked_up_at;
        let action = self.stop_waiting(now_ms, ctx, request);
        if !matches!(request.phase, Phase::Forwarded { .. }) {
            // Served stale instead: the lock goes back.
            self.release_lock(client, wire, now_ms, request, 0);
        }
        action
    }

    /// A waiting request stops waiting: a usable stale copy, or upstream.
    fn stop_waiting(
        &mut self,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
    ) -> Option<HostAction> {
        let Phase::Waiting { stale, .. } = std::mem::replace(&mut request.phase, Phase::Finished)
        else {
            return None;
        };
        if !request.holds_lock {
            if let Some(stale) = stale.as_ref().filter(|s| s.usable_for_error(now_ms)) {
                let age = stale.age_at(now_ms);
                let mut status = CacheStatus::hit(ttl_seconds(stale.fresh_ms, age));
                status.collapsed = true;
                status.detail = Some("stale-if-error");
                let resp = serve(
                    &self.config.cache,
                    request,
                    &stale.response,
                    age,
                    Outcome::Stale,
                    status,
                );
                request.outcome = Some(Outcome::Stale);
                request.phase = Phase::Served;
                self.metrics.count(request.route, Count::Stale);
                return Some(HostAction::Respond(ctx, resp));
            }
        }
        let outcome = if stale.is_some() {
            Outcome::Expired
        } else {
            Outcome::Miss
        };
        self.metrics.count(request.route, Count::forwarded(outcome));
        request.phase = Phase::Forwarded { outcome, stale };
        Some(HostAction::Resume(ctx))
    }
}

fn is_job(id: u32) -> bool {
    id & JOB_ID_BASE != 0
}

fn log_debug(message: &str) {
    host::log(LogLevel::Debug, message);
}

fn json_response(status: u32, body: serde_json::Value) -> LocalResponse {
    LocalResponse {
        status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "no-store".into()),
        ],
        body: body.to_string().into_bytes(),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    first(headers, name)
}

/// KEYS and ARGV of `cache_lookup.lua`: a request's lookup, and a coalescing poll's.
fn lookup_call(
    entry_key: String,
    lock_key: String,
    lock_ms: u64,
    token: &str,
) -> (Vec<String>, Vec<String>) {
    (
        vec![entry_key, lock_key],
        vec![
            String::from_utf8_lossy(MAGIC).into_owned(),
            lock_ms.to_string(),
            token.to_string(),
        ],
    )
}

/// KEYS, and ARGV after the encoded response, of `cache_store.lua`: the entry of `key`, its
/// indexes and tags, its freshness, the fill lock `token` releases (empty: none), and the Redis
/// time of the lookup (a purge since then refuses the store).
pub fn store_call(
    keys: &RouteKeys,
    key: &CacheKey,
    tags: &[String],
    f: &Freshness,
    token: &str,
    looked_up_at: u64,
) -> (Vec<String>, Vec<String>) {
    let mut store_keys = vec![
        keys.entry(&key.hash),
        keys.lock(&key.hash),
        keys.purge_mark(),
        keys.route_index(),
        keys.path_index(&key.path),
        keys.url_index(&key.url),
    ];
    store_keys.extend(tags.iter().map(|t| keys.tag_index(t)));
    let args = vec![
        f.fresh_ms.to_string(),
        f.stale_while_revalidate_ms.to_string(),
        f.stale_if_error_ms.to_string(),
        f.initial_age_ms.to_string(),
        key.url.clone(),
        key.hash.clone(),
        token.to_string(),
        looked_up_at.to_string(),
    ];
    (store_keys, args)
}

/// `EVALSHA`/`EVAL` of a script whose first argument may be bytes.
fn script_command(
    script: &Script,
    eval: bool,
    keys: &[String],
    blob: Option<&[u8]>,
    args: &[String],
) -> Command {
    let head = if eval {
        Command::new("EVAL").arg(script.source)
    } else {
        Command::new("EVALSHA").arg(&script.sha1)
    };
    let mut c = head.arg(keys.len().to_string()).args(keys);
    if let Some(b) = blob {
        c = c.arg(b);
    }
    c.args(args)
}

fn script_pair(
    script: &Script,
    keys: &[String],
    blob: Option<&[u8]>,
    args: &[String],
) -> (Command, Option<Command>) {
    (
        script_command(script, false, keys, blob, args),
        Some(script_command(script, true, keys, blob, args)),
    )
}

/// The job of one purge step.
fn purge_job(step: PurgeStep) -> JobKind {
    match step {
        PurgeStep::Scan { .. } => JobKind::Scan {
            step,
            cursor: "0".into(),
        },
        index => JobKind::Purge(index),
    }
}

fn entry_decode(blob: Vec<u8>) -> Result<StoredResponse, ()> {
    cache_entry::decode(blob).map_err(|e| log_debug(&format!("krowoc-edge: {e}")))
}

/// How long to mark a key uncacheable after a response that was not stored: a deterministic
/// refusal (private, too large, ...) keeps concurrent misses from waiting for a fill that never
/// comes; a 5xx may be passing, so it only releases the lock.
fn pass_for(why: NotStored, status: u16, policy: &CachePolicy) -> u64 {
    if why == NotStored::Status && status >= 500 {
        0
    } else {
        policy.coalesce.lock.as_millis()
    }
}

/// Where a background refresh of this request's entry would go: the route's `cluster`, with
/// the request line and the keyed fields.
fn revalidate_target(
    policy: &CachePolicy,
    req: &RequestInfo,
    cluster: String,
) -> Option<RevalidateTarget> {
    let mut headers = vec![
        (":method".to_string(), req.method.clone()),
        (":path".to_string(), req.path.clone()),
        (
            ":authority".to_string(),
            req.header(":authority")?.to_string(),
        ),
        (
            ":scheme".to_string(),
            req.header(":scheme").unwrap_or("http").to_string(),
        ),
    ];
    for name in &policy.key.headers {
        headers.extend(
            req.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .cloned(),
        );
    }
    Some(RevalidateTarget { cluster, headers })
}

/// The answer from the cache: the stored response (or 304 for a matching conditional
/// request) with `Age`, `X-Cache` and `Cache-Status`.
fn serve(
    settings: &crate::config::cache::CacheSettings,
    request: &CacheRequest,
    stored: &StoredResponse,
    age_ms: u64,
    outcome: Outcome,
    status: CacheStatus,
) -> LocalResponse {
    let (code, mut headers, body) =
        if not_modified(&request.method, &request.conditional, &stored.headers) {
            (304, not_modified_fields(&stored.headers), Vec::new())
        } else {
            (stored.status, stored.headers.clone(), stored.body.clone())
        };
    headers.push(("age".into(), (age_ms / 1000).to_string()));
    headers.extend(status_fields(settings, outcome, &status));
    LocalResponse {
        status: u32::from(code),
        headers,
        body,
    }
}

fn purge_answer(p: &PurgeRequest) -> LocalResponse {
    if p.failures.is_empty() {
        json_response(
            200,
            serde_json::json!({"purged": p.deleted, "directives": p.directives}),
        )
    } else {
        json_response(
            502,
            serde_json::json!({
                "error": "some purges failed",
                "failures": p.failures,
                "purged": p.deleted,
                "directives": p.directives,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn lookup_replies_are_read_in_every_state() {
        let r = Reply::Array(vec![
            bulk("hit"),
            Reply::Int(1500),
            bulk("KRC1..."),
            Reply::Int(-1),
            Reply::Int(60_000),
            Reply::Int(0),
            Reply::Int(300_000),
            Reply::Int(0),
            Reply::Int(1_700_000_000_000),
        ]);
        let l = parse_lookup(&r).expect("hit");
        assert_eq!(l.now_ms, 1_700_000_000_000);
        assert_eq!(l.state, EntryState::Hit);
        assert_eq!((l.age_ms, l.fresh_ms, l.sie_ms), (1500, 60_000, 300_000));
        assert_eq!(l.lock, LockState::NotTried);
        assert_eq!(l.blob.as_deref(), Some(&b"KRC1..."[..]));
        let r = Reply::Array(vec![
            bulk("miss"),
            Reply::Int(0),
            Reply::Nil,
            Reply::Int(0),
            Reply::Int(0),
            Reply::Int(0),
            Reply::Int(0),
            Reply::Int(1),
            Reply::Int(5),
        ]);
        let l = parse_lookup(&r).expect("miss");
        assert_eq!(
            (l.state, l.lock, l.corrupt),
            (EntryState::Miss, LockState::Held, true)
        );
        assert!(l.blob.is_none());
        for (n, lock) in [(1, LockState::Taken), (-2, LockState::Pass)] {
            let mut items = vec![bulk("expired"), Reply::Int(9), bulk("x"), Reply::Int(n)];
            items.extend([1, 2, 3, 0, 9].map(Reply::Int));
            assert_eq!(parse_lookup(&Reply::Array(items)).expect("ok").lock, lock);
        }
    }

    #[test]
    fn unexpected_lookup_replies_are_protocol_errors() {
        for r in [
            Reply::Nil,
            Reply::Int(1),
            Reply::Array(vec![bulk("hit")]),
            Reply::Array(vec![
                bulk("maybe"),
                Reply::Int(0),
                Reply::Nil,
                Reply::Int(0),
                Reply::Int(0),
                Reply::Int(0),
                Reply::Int(0),
                Reply::Int(0),
            ]),
        ] {
            assert!(
                parse_lookup(&r).expect_err("refused").is_protocol(),
                "{r:?}"
            );
        }
    }

    #[test]
    fn stale_copies_serve_errors_only_within_their_window() {
        let copy = StaleCopy {
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: vec![],
            },
            age_ms: 61_000,
            fresh_ms: 60_000,
            sie_ms: 10_000,
            read_at_ms: 1_000,
        };
        assert!(copy.usable_for_error(1_000));
        assert_eq!(copy.age_at(5_000), 65_000);
        assert!(!copy.usable_for_error(10_000));
        let none = StaleCopy { sie_ms: 0, ..copy };
        assert!(!none.usable_for_error(1_000));
    }

    #[test]
    fn scripts_have_header_comments() {
        for (name, src) in [
            ("cache_lookup", CACHE_LOOKUP_LUA),
            ("cache_store", CACHE_STORE_LUA),
            ("cache_unlock", CACHE_UNLOCK_LUA),
            ("cache_purge", CACHE_PURGE_LUA),
            ("cache_scan_purge", CACHE_SCAN_PURGE_LUA),
        ] {
            for line in ["-- KEYS", "-- ARGV", "-- Reply"] {
                assert!(
                    src.lines().any(|l| l.starts_with(line)),
                    "{name} lacks {line}"
                );
            }
        }
    }
}

/// The engine driven as the filter drives it, without a host: a recording wire for Redis, a
/// recording upstream for refreshes, the requests' records in a map.
#[cfg(test)]
mod engine_tests {
    use super::*;
    use crate::config::parse_config;
    use crate::redis::client::recording::RecordingWire;

    /// One refresh sent: its token, cluster and fields.
    type Refresh = (u32, String, Vec<(String, String)>);

    /// Refreshes the engine would send, recorded; tokens from 1000 up.
    #[derive(Default)]
    struct RecordingUpstream {
        calls: Vec<Refresh>,
        refuse: bool,
    }

    impl Upstream for RecordingUpstream {
        fn call(
            &mut self,
            cluster: &str,
            headers: &[(String, String)],
            _timeout: Duration,
        ) -> Result<u32, String> {
            if self.refuse {
                return Err("BadArgument".into());
            }
            let token = 1000 + self.calls.len() as u32;
            self.calls
                .push((token, cluster.to_string(), headers.to_vec()));
            Ok(token)
        }
    }

    /// The requests' records, reduced to the cache's parts.
    #[derive(Default)]
    struct Records(HashMap<u32, (Option<CacheRequest>, Option<PurgeRequest>)>);

    impl CacheRequests for Records {
        fn cache_mut(&mut self, ctx: u32) -> Option<&mut CacheRequest> {
            self.0.get_mut(&ctx).and_then(|(c, _)| c.as_mut())
        }

        fn purge_mut(&mut self, ctx: u32) -> Option<&mut Option<PurgeRequest>> {
            self.0.get_mut(&ctx).map(|(_, p)| p)
        }
    }

    const REDIS_NOW: u64 = 1_700_000_000_000;

    struct Cache {
        engine: CacheEngine,
        client: RedisClient,
        wire: RecordingWire,
        upstream: RecordingUpstream,
        records: Records,
        now_ms: u64,
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// RESP, as Redis writes a reply.
    fn resp(r: &Reply) -> Vec<u8> {
        let mut out = Vec::new();
        write_resp(&mut out, r);
        out
    }

    fn write_resp(out: &mut Vec<u8>, r: &Reply) {
        match r {
            Reply::Status(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Reply::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    write_resp(out, i);
                }
            }
        }
    }

    /// What `cache_lookup.lua` answers: state, age, entry, lock, fresh/swr/sie windows.
    #[allow(clippy::too_many_arguments)]
    fn lookup_reply(
        state: &str,
        age_ms: i64,
        entry: Option<&[u8]>,
        lock: i64,
        fresh_ms: i64,
        swr_ms: i64,
        sie_ms: i64,
    ) -> Vec<u8> {
        resp(&Reply::Array(vec![
            Reply::Bulk(state.as_bytes().to_vec()),
            Reply::Int(age_ms),
            entry.map_or(Reply::Nil, |e| Reply::Bulk(e.to_vec())),
            Reply::Int(lock),
            Reply::Int(fresh_ms),
            Reply::Int(swr_ms),
            Reply::Int(sie_ms),
            Reply::Int(0),
            Reply::Int(REDIS_NOW as i64),
        ]))
    }

    fn entry(body: &str) -> Vec<u8> {
        cache_entry::encode(
            200,
            &fields(&[("content-type", "text/plain")]),
            body.as_bytes(),
        )
    }

    fn header_of<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        first(fields, name)
    }

    /// The fields a response passes with (it must pass).
    fn passes(step: CacheResponse) -> Vec<(String, String)> {
        match step {
            CacheResponse::Pass(f) => f,
            other => panic!("the response should pass: {other:?}"),
        }
    }

    /// A miss: its lock taken by this request (1) or held by another (0).
    fn miss(lock: i64) -> Vec<u8> {
        lookup_reply("miss", 0, None, lock, 0, 0, 0)
    }

    const ROUTE: &str = r#"{"name": "r", "match": {"prefix": "/r"},
        "cache": {"ttl": "60s", "honor_cache_control": false,
                  "stale_while_revalidate": "30s", "stale_if_error": "60s"}}"#;

    impl Cache {
        fn new(routes: &str) -> Cache {
            Cache::with(&format!(r#"{{"routes": [{routes}]}}"#))
        }

        fn with(json: &str) -> Cache {
            let config = Rc::new(parse_config(json.as_bytes()).expect("config"));
            Cache {
                engine: CacheEngine::new(&config, 0xabc),
                client: RedisClient::new(&config.redis),
                wire: RecordingWire::default(),
                upstream: RecordingUpstream::default(),
                records: Records::default(),
                now_ms: 5_000_000,
            }
        }

        fn request(method: &str, path: &str) -> RequestInfo {
            RequestInfo {
                path: path.to_string(),
                method: method.to_string(),
                headers: fields(&[(":authority", "example.test"), (":scheme", "http")]),
                source_address: None,
            }
        }

        /// Request `ctx` on the route: its lookup; true when it was sent.
        fn look_up(&mut self, ctx: u32, method: &str, path: &str) -> bool {
            let req = Cache::request(method, path);
            let cache = self
                .engine
                .lookup(
                    &mut self.client,
                    &mut self.wire,
                    self.now_ms,
                    ctx,
                    0,
                    &req,
                    || Some("upstream".into()),
                )
                .expect("a cached route");
            let sent = cache.awaits_lookup();
            self.records.0.insert(ctx, (Some(cache), None));
            sent
        }

        /// Redis answers call `token`; the answer goes where the filter sends it.
        fn answer(&mut self, token: u32, reply: &[u8]) -> Option<HostAction> {
            let raw = RawReply::Relay {
                status: Some(200),
                body: reply.to_vec(),
            };
            let c = self
                .client
                .on_reply(&mut self.wire, self.now_ms, token, raw)?;
            match c.purpose {
                Purpose::CacheLookup => {
                    let r = self.records.cache_mut(c.context_id)?;
                    assert!(CacheEngine::on_lookup(r, c.result));
                    None
                }
                Purpose::CacheJob => self.engine.on_job_answer(
                    &mut self.client,
                    &mut self.wire,
                    self.now_ms,
                    c.context_id,
                    c.result,
                    &mut self.records,
                ),
                other => panic!("not a cache call: {other:?}"),
            }
        }

        /// Request `ctx`'s lookup is sent and answered with `reply`; then it proceeds.
        fn found(&mut self, ctx: u32, path: &str, reply: &[u8]) -> Proceed {
            assert!(self.look_up(ctx, "GET", path), "lookup sent");
            let token = self.wire.last_token();
            assert_eq!(self.answer(token, reply), None);
            self.proceed(ctx)
        }

        fn proceed(&mut self, ctx: u32) -> Proceed {
            let r = self.records.cache_mut(ctx).expect("request");
            self.engine
                .proceed(&mut self.client, &mut self.wire, self.now_ms, ctx, r)
        }

        fn respond(
            &mut self,
            ctx: u32,
            status: u16,
            headers: &[(&str, &str)],
            passed: &[(&str, &str)],
            end_of_stream: bool,
        ) -> CacheResponse {
            let mut all = fields(&[(":status", &status.to_string())]);
            all.extend(fields(headers));
            let (cache, _) = self.records.0.get_mut(&ctx).expect("request");
            self.engine.response_headers(
                &mut self.client,
                &mut self.wire,
                self.now_ms,
                ctx,
                0,
                cache.as_mut(),
                &fields(passed),
                end_of_stream,
                || all,
            )
        }

        fn body(&mut self, ctx: u32, chunk: &[u8], end_of_stream: bool) {
            let r = self.records.cache_mut(ctx).expect("request");
            assert!(CacheEngine::collects(r), "collecting");
            self.engine.response_body(
                &mut self.client,
                &mut self.wire,
                self.now_ms,
                r,
                chunk,
                end_of_stream,
            );
        }

        fn end(&mut self, ctx: u32) {
            let (cache, _) = self.records.0.remove(&ctx).expect("request");
            if let Some(cache) = cache {
                self.engine
                    .end(&mut self.client, &mut self.wire, self.now_ms, ctx, cache);
            }
        }

        fn tick(&mut self) -> Vec<HostAction> {
            self.engine.tick(
                &mut self.client,
                &mut self.wire,
                &mut self.upstream,
                self.now_ms,
                &mut self.records,
            )
        }

        fn token_of(&mut self, ctx: u32) -> String {
            self.records.cache_mut(ctx).expect("request").token.clone()
        }

        fn sha(&self, name: &str) -> String {
            let s = &self.engine.scripts;
            [&s.lookup, &s.store, &s.unlock, &s.purge, &s.scan]
                .into_iter()
                .find(|x| x.name == name)
                .map(|x| x.sha1.clone())
                .expect("a cache script")
        }
    }

    #[test]
    fn a_filling_miss_goes_upstream_and_its_response_is_stored_with_its_lock_on_the_tick() {
        let mut c = Cache::new(ROUTE);
        assert!(c.look_up(1, "GET", "/r?b=2&a=1"));
        let lookup = c.wire.last_command();
        assert_eq!(lookup[..2], ["EVALSHA".to_string(), c.sha("cache_lookup")]);
        let token = c.token_of(1);
        assert_eq!(
            lookup[5..],
            ["KRC1".to_string(), "10000".into(), token.clone()]
        );
        let t = c.wire.last_token();
        c.answer(t, &miss(1));
        assert_eq!(c.proceed(1), Proceed::Forward);

        let f = passes(c.respond(1, 200, &[("content-length", "5")], &[], false));
        assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
        assert_eq!(
            header_of(&f, "cache-status"),
            Some("krowoc; fwd=uri-miss; fwd-status=200; stored")
        );
        c.body(1, b"hel", false);
        c.body(1, b"lo", true);
        let sent = c.wire.sent.len();
        assert!(c.tick().is_empty());
        assert_eq!(
            c.wire.sent.len(),
            sent + 1,
            "the store goes out on the tick"
        );
        let store = c.wire.last_command();
        assert_eq!(
            store[..3],
            ["EVALSHA".to_string(), c.sha("cache_store"), "6".into()]
        );
        let keys = RouteKeys::new("krowoc:", "r");
        let blob = &store[9][..];
        assert_eq!(store[3], keys.entry(&store[15]));
        assert_eq!(blob.as_bytes()[..4], *b"KRC1", "ARGV[1] is the entry");
        assert_eq!(
            store[10..],
            [
                "60000".to_string(),
                "30000".into(),
                "60000".into(),
                "0".into(),
                "/r".into(),
                store[15].clone(),
                token,
                REDIS_NOW.to_string(),
            ],
            "freshness, URL, hash, the lock's token, the lookup's Redis time"
        );
        let t = c.wire.last_token();
        assert_eq!(c.answer(t, b":1\r\n"), None);
        assert!(c.engine.jobs.is_empty());
    }

    #[test]
    fn over_redis_call_stores_go_out_at_once() {
        let mut c = Cache::with(&format!(
            r#"{{"redis": {{"transport": "redis_call", "cluster": "redis"}}, "routes": [{ROUTE}]}}"#
        ));
        c.found(1, "/r", &miss(1));
        c.respond(1, 200, &[], &[], true);
        assert_eq!(c.wire.last_command()[1], c.sha("cache_store"));
    }

    #[test]
    fn a_concurrent_miss_waits_for_the_fill_and_is_served_from_it() {
        let mut c = Cache::new(ROUTE);
        assert_eq!(c.found(1, "/r", &miss(1)), Proceed::Forward);
        assert_eq!(
            c.found(2, "/r", &miss(0)),
            Proceed::Wait,
            "the lock is another request's"
        );
        assert!(c.tick().is_empty());
        let poll = c.wire.last_command();
        assert_eq!(poll[1], c.sha("cache_lookup"));
        assert_eq!(
            poll[7],
            c.token_of(2),
            "the waiter polls with its own token"
        );
        let t = c.wire.last_token();
        assert_eq!(
            c.answer(
                t,
                &lookup_reply("hit", 2_000, Some(&entry("filled")), -1, 60_000, 0, 0)
            ),
            None,
            "acted on at the next tick"
        );
        c.now_ms += 40;
        let actions = c.tick();
        let [HostAction::Respond(2, served)] = actions.as_slice() else {
            panic!("the waiter is served: {actions:?}");
        };
        assert_eq!(
            (served.status, served.body.as_slice()),
            (200, &b"filled"[..])
        );
        assert_eq!(header_of(&served.headers, "x-cache"), Some("HIT"));
        assert_eq!(
            header_of(&served.headers, "cache-status"),
            Some("krowoc; hit; ttl=57; collapsed"),
            "the entry's age counts the time since the poll read it"
        );
        assert_eq!(header_of(&served.headers, "age"), Some("2"));
        assert_eq!(
            c.records.cache_mut(2).and_then(|r| r.outcome()),
            Some("HIT")
        );
        let sent = c.wire.sent.len();
        assert!(c.tick().is_empty());
        assert_eq!(c.wire.sent.len(), sent, "nobody waits: no more polls");
    }

    #[test]
    fn a_waiter_goes_upstream_once_its_wait_is_over() {
        let mut c = Cache::new(ROUTE);
        c.found(1, "/r", &miss(1));
        c.found(2, "/r", &miss(0));
        c.now_ms += 4_999;
        assert!(c.tick().is_empty(), "still within coalesce.wait");
        c.now_ms += 1;
        assert_eq!(c.tick(), vec![HostAction::Resume(2)]);
        let f = passes(c.respond(2, 200, &[], &[], false));
        assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
    }

    #[test]
    fn when_the_filler_gives_up_the_polling_waiter_fills_with_its_own_lock() {
        let mut c = Cache::new(ROUTE);
        c.found(1, "/r", &miss(1));
        c.found(2, "/r", &miss(0));
        c.found(3, "/r", &miss(0));
        c.tick();
        let t = c.wire.last_token();
        c.answer(t, &miss(1));
        assert_eq!(
            c.tick(),
            vec![HostAction::Resume(2)],
            "the poll took the lock for the first waiter: it goes upstream, the other waits"
        );
        assert_eq!(
            c.wire.last_command()[7],
            c.token_of(3),
            "the next poll is 3's"
        );
        c.respond(2, 200, &[], &[], true);
        c.tick();
        let store = c.wire.last_command();
        assert_eq!(store[1], c.sha("cache_store"));
        assert_eq!(
            store[store.len() - 2],
            c.token_of(2),
            "its store releases its lock"
        );
    }

    #[test]
    fn a_stale_entry_is_served_and_refreshed_in_the_background_by_its_lock_holder() {
        let mut c = Cache::new(ROUTE);
        let served = c.found(
            1,
            "/r?a=1",
            &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
        );
        let Proceed::Serve(resp) = served else {
            panic!("served stale: {served:?}");
        };
        assert_eq!(resp.body, b"old");
        assert_eq!(header_of(&resp.headers, "x-cache"), Some("STALE"));
        assert_eq!(
            header_of(&resp.headers, "cache-status"),
            Some("krowoc; hit; ttl=-10; detail=stale-while-revalidate")
        );
        assert!(
            c.upstream.calls.is_empty(),
            "the refresh waits for the tick"
        );
        c.tick();
        let [(call, cluster, headers)] = c.upstream.calls.as_slice() else {
            panic!("one refresh: {:?}", c.upstream.calls);
        };
        assert_eq!(cluster, "upstream");
        assert_eq!(
            headers[..4],
            fields(&[
                (":method", "GET"),
                (":path", "/r?a=1"),
                (":authority", "example.test"),
                (":scheme", "http"),
            ])
        );
        let call = *call;
        let token = c.token_of(1);
        c.end(1);
        let sent = c.wire.sent.len();
        let fresh = RawReply::Relay {
            status: Some(200),
            body: b"new".to_vec(),
        };
        assert!(c.engine.on_refresh_answer(
            &mut c.client,
            &mut c.wire,
            c.now_ms,
            call,
            &fresh,
            || fields(&[(":status", "200"), ("cache-tag", "t1")]),
        ));
        c.tick();
        assert_eq!(c.wire.sent.len(), sent + 1);
        let store = c.wire.last_command();
        assert_eq!(
            store[..3],
            ["EVALSHA".to_string(), c.sha("cache_store"), "7".into()]
        );
        assert_eq!(store[9], RouteKeys::new("krowoc:", "r").tag_index("t1"));
        assert_eq!(
            store[10].as_bytes()[..4],
            *b"KRC1",
            "after the 7 keys, the entry"
        );
        assert_eq!(
            store[store.len() - 2..],
            [token, REDIS_NOW.to_string()],
            "stored under the served request's lock, as of its lookup"
        );
        assert!(!c.engine.on_refresh_answer(
            &mut c.client,
            &mut c.wire,
            c.now_ms,
            call,
            &fresh,
            Vec::new
        ));
    }

    #[test]
    fn a_refresh_that_fails_gives_its_lock_back() {
        let mut c = Cache::new(ROUTE);
        c.found(
            1,
            "/r",
            &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
        );
        c.tick();
        let call = c.upstream.calls[0].0;
        let token = c.token_of(1);
        let error = RawReply::Relay {
            status: Some(503),
            body: Vec::new(),
        };
        let headers = || fields(&[(":status", "503")]);
        assert!(c.engine.on_refresh_answer(
            &mut c.client,
            &mut c.wire,
            c.now_ms,
            call,
            &error,
            headers
        ));
        c.tick();
        let unlock = c.wire.last_command();
        assert_eq!(unlock[1], c.sha("cache_unlock"));
        assert_eq!(
            unlock[4..],
            [token.clone(), "0".into()],
            "a 5xx may pass: no pass mark"
        );

        // A refresh the host refuses gives the lock back too.
        let mut c = Cache::new(ROUTE);
        c.upstream.refuse = true;
        c.found(
            1,
            "/r",
            &lookup_reply("stale", 70_000, Some(&entry("old")), 1, 60_000, 30_000, 0),
        );
        let token = c.token_of(1);
        c.tick();
        c.tick();
        let unlock = c.wire.last_command();
        assert_eq!(unlock[1], c.sha("cache_unlock"));
        assert_eq!(unlock[4], token);
    }

    #[test]
    fn an_upstream_error_is_answered_with_a_stale_copy_within_stale_if_error() {
        let mut c = Cache::new(ROUTE);
        let expired = lookup_reply(
            "expired",
            100_000,
            Some(&entry("old")),
            1,
            60_000,
            0,
            60_000,
        );
        assert_eq!(c.found(1, "/r", &expired), Proceed::Forward);
        let token = c.token_of(1);
        let step = c.respond(1, 503, &[], &[("ratelimit", "\"r\";r=4;t=60")], false);
        let CacheResponse::Replace(resp) = step else {
            panic!("replaced: {step:?}");
        };
        assert_eq!((resp.status, resp.body.as_slice()), (200, &b"old"[..]));
        assert_eq!(header_of(&resp.headers, "x-cache"), Some("STALE"));
        assert_eq!(
            header_of(&resp.headers, "cache-status"),
            Some("krowoc; fwd=stale; fwd-status=503; ttl=-40; detail=stale-if-error")
        );
        assert_eq!(
            header_of(&resp.headers, "ratelimit"),
            Some("\"r\";r=4;t=60"),
            "the fields the request was let through with go too"
        );
        assert_eq!(
            c.records.cache_mut(1).and_then(|r| r.outcome()),
            Some("STALE")
        );
        c.tick();
        let unlock = c.wire.last_command();
        assert_eq!(unlock[1], c.sha("cache_unlock"));
        assert_eq!(unlock[4..], [token, "0".into()]);

        // Past the window the error passes, marked as the expired miss it is.
        let mut c = Cache::new(ROUTE);
        let too_old = lookup_reply(
            "expired",
            130_000,
            Some(&entry("old")),
            1,
            60_000,
            0,
            60_000,
        );
        c.found(1, "/r", &too_old);
        let f = passes(c.respond(1, 503, &[], &[], false));
        assert_eq!(header_of(&f, "x-cache"), Some("EXPIRED"));
    }

    #[test]
    fn a_store_carries_its_lookups_redis_time_so_a_purge_since_then_refuses_it() {
        let mut c = Cache::new(ROUTE);
        c.found(1, "/r", &miss(1));
        c.respond(1, 200, &[], &[], true);
        c.tick();
        let store = c.wire.last_command();
        assert_eq!(store.last(), Some(&REDIS_NOW.to_string()));
        assert!(store.contains(&RouteKeys::new("krowoc:", "r").purge_mark()));
        // cache_store.lua answers -1 when the route was purged after the lookup: not stored,
        // nothing else to do.
        let t = c.wire.last_token();
        assert_eq!(c.answer(t, b":-1\r\n"), None);
        assert!(c.engine.jobs.is_empty());
    }

    #[test]
    fn a_response_that_invalidates_is_held_until_its_purges_are_done() {
        let mut c = Cache::new(
            r#"{"name": "r", "match": {"prefix": "/r"}, "cache": {"ttl": "60s"},
                "invalidation": {}}"#,
        );
        c.found(1, "/r", &miss(1));
        let sent = c.wire.sent.len();
        let step = c.respond(1, 200, &[("x-krowoc-invalidate", "tag=user:1")], &[], false);
        let CacheResponse::Hold(f, purge) = step else {
            panic!("held: {step:?}");
        };
        assert_eq!(header_of(&f, "x-cache"), Some("MISS"));
        assert_eq!(c.wire.sent.len(), sent + 1, "the purge goes out at once");
        let cmd = c.wire.last_command();
        assert_eq!(cmd[1], c.sha("cache_purge"));
        assert_eq!(cmd[3], RouteKeys::new("krowoc:", "r").tag_index("user:1"));
        c.records.0.get_mut(&1).expect("request").1 = Some(purge);
        let t = c.wire.last_token();
        assert_eq!(c.answer(t, b":2\r\n"), Some(HostAction::ResumeResponse(1)));
        assert!(c.records.purge_mut(1).is_some_and(|p| p.is_none()));
    }

    #[test]
    fn a_successful_post_purges_its_url_before_its_response_goes_on() {
        let mut c = Cache::new(ROUTE);
        assert!(!c.look_up(1, "POST", "/r?a=1"), "a POST bypasses the cache");
        let step = c.respond(1, 201, &[], &[], false);
        let CacheResponse::Hold(f, _) = step else {
            panic!("held: {step:?}");
        };
        assert_eq!(header_of(&f, "x-cache"), Some("BYPASS"));
        let cmd = c.wire.last_command();
        assert_eq!(cmd[1], c.sha("cache_purge"));
        assert_eq!(cmd[3], RouteKeys::new("krowoc:", "r").url_index("/r"));
        // A failed POST purges nothing.
        let mut c = Cache::new(ROUTE);
        c.look_up(1, "POST", "/r");
        assert!(matches!(
            c.respond(1, 500, &[], &[], false),
            CacheResponse::Pass(_)
        ));
        assert!(c.wire.sent.is_empty());
    }

    #[test]
    fn an_uncacheable_response_releases_the_lock_and_sends_misses_upstream_for_a_while() {
        let mut c =
            Cache::new(r#"{"name": "r", "match": {"prefix": "/r"}, "cache": {"ttl": "60s"}}"#);
        c.found(1, "/r", &miss(1));
        let token = c.token_of(1);
        let f = passes(c.respond(1, 200, &[("cache-control", "private")], &[], false));
        assert_eq!(
            header_of(&f, "cache-status"),
            Some("krowoc; fwd=uri-miss; fwd-status=200; detail=private")
        );
        c.tick();
        let unlock = c.wire.last_command();
        assert_eq!(unlock[1], c.sha("cache_unlock"));
        assert_eq!(
            unlock[4..],
            [token, "10000".into()],
            "marked uncacheable for coalesce.lock"
        );
    }

    #[test]
    fn a_body_over_the_limit_is_not_stored_and_an_unfinished_one_gives_the_lock_back() {
        let mut c = Cache::new(
            r#"{"name": "r", "match": {"prefix": "/r"},
                "cache": {"ttl": "60s", "max_body_bytes": 4}}"#,
        );
        c.found(1, "/r", &miss(1));
        c.respond(1, 200, &[], &[], false);
        c.body(1, b"too long", false);
        c.tick();
        assert_eq!(c.wire.last_command()[1], c.sha("cache_unlock"));

        c.found(2, "/r", &miss(1));
        c.respond(2, 200, &[("content-length", "3")], &[], false);
        c.body(2, b"ab", false);
        let token = c.token_of(2);
        c.end(2);
        c.tick();
        let unlock = c.wire.last_command();
        assert_eq!(
            unlock[1],
            c.sha("cache_unlock"),
            "a short body is not stored"
        );
        assert_eq!(unlock[4..], [token, "0".into()]);
    }

    #[test]
    fn an_unreadable_entry_is_a_miss_deleted_when_the_request_ends_unstored() {
        let mut c = Cache::new(ROUTE);
        let garbage = lookup_reply("hit", 0, Some(b"KRC9 nonsense"), -1, 60_000, 0, 0);
        assert_eq!(c.found(1, "/r", &garbage), Proceed::Forward);
        c.respond(1, 500, &[], &[], false);
        let key = c.records.cache_mut(1).expect("request").entry_key();
        c.end(1);
        c.tick();
        assert_eq!(c.wire.last_command(), ["DEL".to_string(), key]);
    }

    #[test]
    fn the_purge_endpoint_answers_once_its_purges_are_done() {
        let mut c = Cache::with(&format!(
            r#"{{"routes": [{ROUTE}],
                "cache": {{"purge": {{"path": "/_purge", "token": "0123456789abcdef"}}}}}}"#
        ));
        let mut req = Cache::request("POST", "/_purge");
        req.headers.extend(fields(&[
            ("x-krowoc-purge-token", "0123456789abcdef"),
            ("x-krowoc-invalidate", "tag=a, route=r"),
        ]));
        let start = c
            .engine
            .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 9, &req);
        let Some(PurgeStart::Wait(purge)) = start else {
            panic!("waits: {start:?}");
        };
        assert_eq!(c.wire.sent.len(), 2, "one index purge per directive");
        c.records.0.insert(9, (None, Some(purge)));
        let (first, second) = (c.wire.sent[0].0, c.wire.sent[1].0);
        assert_eq!(c.answer(first, b":2\r\n"), None);
        let Some(HostAction::Respond(9, resp)) = c.answer(second, b":3\r\n") else {
            panic!("answered");
        };
        assert_eq!(resp.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON");
        assert_eq!(body["purged"], 5);
        assert_eq!(body["directives"], serde_json::json!(["tag=a", "route=r"]));

        req.headers[2].1 = "wrong-token-0123".into();
        let refused = c
            .engine
            .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 10, &req);
        assert!(matches!(
            refused,
            Some(PurgeStart::Answer(LocalResponse { status: 403, .. }))
        ));
        let other = Cache::request("GET", "/r");
        assert!(c
            .engine
            .purge_endpoint(&mut c.client, &mut c.wire, c.now_ms, 11, &other)
            .is_none());
    }
}
