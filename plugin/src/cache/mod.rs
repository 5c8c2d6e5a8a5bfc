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
//!
//! Here: the engine and a request's cache state. The steps, one file each: [`lookup`] (the
//! call and the decision), [`response`] (the response phase), [`store`], [`jobs`] (work off
//! the path), [`coalescing`], [`revalidation`] and [`purge`] (directives, the purge endpoint,
//! invalidation headers). Below them, plain rules without the engine: [`policy`] (RFC 9111),
//! [`key`] (cache keys and Redis keys) and [`entry`] (a stored response as bytes).

pub mod coalescing;
pub mod entry;
pub mod jobs;
pub mod key;
pub mod lookup;
pub mod policy;
pub mod purge;
pub mod response;
pub mod revalidation;
pub mod store;

pub use lookup::{parse_lookup, EntryState, LockState, Lookup, Proceed};
pub use purge::{PurgeRequest, PurgeStart};
pub use response::CacheResponse;
pub use store::store_call;

use coalescing::PollResult;
use jobs::{Job, JobKind};
use lookup::{as_u64, lookup_call};
use revalidation::{revalidate_target, RevalidateTarget, Revalidation};
use store::pass_for;

use crate::config::cache::CachePolicy;
use crate::config::{Config, Transport};
use crate::host::{self, increment_metric};
use crate::http::first;
use crate::http::{HostAction, LocalResponse, RequestInfo, Upstream};
use crate::metrics::{CacheCount as Count, CacheMetrics};
use crate::redis::client::{Owner, RawReply, RedisClient, Wire};
use crate::redis::error::RedisError;
use crate::redis::resp::{Command, Reply};
use crate::redis::scripts::Script;
pub use crate::redis::scripts::{
    CACHE_LOOKUP_LUA, CACHE_PURGE_LUA, CACHE_SCAN_PURGE_LUA, CACHE_STORE_LUA, CACHE_UNLOCK_LUA,
};
use entry::{StoredResponse, MAGIC};
use key::{CacheKey, KeyInput, RouteKeys};
use policy::{
    not_modified, not_modified_fields, status_fields, storable, stored_fields, ttl_seconds, Bypass,
    CacheStatus, Freshness, NotStored, Outcome,
};
use proxy_wasm::types::LogLevel;
use purge::PurgeStep;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

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
    freshness: policy::Freshness,
    body: Vec<u8>,
    content_length: Option<usize>,
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
    /// The client asked for a fresh answer (`no-cache`, with `honor_request_cache_control`).
    no_cache: bool,
    /// A stored answer was found but not used because of `no_cache`: sent upstream, stored.
    refreshed: bool,
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
    pub(super) fn new_token(&mut self, ctx: u32) -> String {
        self.tokens += 1;
        format!("{:x}.{ctx:x}.{:x}", self.seed, self.tokens)
    }

    /// Whether this configuration uses the cache at all (ticks, Redis).
    pub fn wanted(config: &Config) -> bool {
        config
            .routes
            .iter()
            .any(|r| r.cache.is_some() || r.invalidation.is_some())
            || config.cache.purge.is_some()
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
}

/// The counter of a lookup that goes to the upstream (a miss, or an expired entry).
fn forwarded(outcome: Outcome) -> Count {
    if outcome == Outcome::Expired {
        Count::Expired
    } else {
        Count::Miss
    }
}

fn log_debug(message: &str) {
    host::log(LogLevel::Debug, message);
}

fn entry_decode(blob: Vec<u8>) -> Result<StoredResponse, ()> {
    entry::decode(blob).map_err(|e| log_debug(&format!("krowoc-edge: {e}")))
}

/// The answer from the cache: the stored response (or 304 for a matching conditional
/// request) with `Age`, `X-Cache` and `Cache-Status`.
/// An owned `stored` gives its body to the answer: a hit's body is not copied in the VM.
fn serve(
    settings: &crate::config::cache::CacheSettings,
    request: &CacheRequest,
    stored: std::borrow::Cow<'_, StoredResponse>,
    age_ms: u64,
    outcome: Outcome,
    status: CacheStatus,
) -> LocalResponse {
    let (code, mut headers, body) =
        if not_modified(&request.method, &request.conditional, &stored.headers) {
            (304, not_modified_fields(&stored.headers), Vec::new())
        } else {
            let stored = stored.into_owned();
            (stored.status, stored.headers, stored.body)
        };
    headers.push(("age".into(), (age_ms / 1000).to_string()));
    headers.extend(status_fields(settings, outcome, &status));
    LocalResponse {
        status: u32::from(code),
        headers,
        body,
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

#[cfg(test)]
mod engine_tests;
