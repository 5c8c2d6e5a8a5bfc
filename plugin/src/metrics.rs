//! The filter's metrics (proxy-wasm counters and gauges). Names are dotted; Envoy and
//! host-shim expose them in Prometheus as `envoy_` + the name with `.`/`-` turned into `_`.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `krowoc.redis.calls` | counter | Redis calls sent, each one round trip (EVAL retries included; an exchange shared by several requests' calls is one) |
//! | `krowoc.redis.shared` | counter | requests' calls that rode in a shared exchange (`redis.max_in_flight`) |
//! | `krowoc.redis.errors` | counter | calls that failed (timeouts, unreachable, garbage, refused) |
//! | `krowoc.redis.timeouts` | counter | calls without an answer in time |
//! | `krowoc.redis.noscript` | counter | NOSCRIPT answers (followed by EVAL) |
//! | `krowoc.redis.short_circuited` | counter | calls not made because the breaker was open |
//! | `krowoc.redis.breaker_opened` | counter | times a VM's breaker opened |
//! | `krowoc.redis.breaker_open` | gauge | VMs whose breaker is open now (0: all closed) |
//! | `krowoc.rate_limit.<route>.allowed` | counter | requests Redis admitted |
//! | `krowoc.rate_limit.<route>.denied` | counter | requests denied (incl. from the deny cache) |
//! | `krowoc.rate_limit.<route>.shadow_denied` | counter | would-be denials in shadow mode |
//! | `krowoc.rate_limit.<route>.deny_cache_hits` | counter | denials decided in the VM, no Redis call |
//! | `krowoc.rate_limit.<route>.redis_errors` | counter | decisions Redis could not make |
//! | `krowoc.rate_limit.<route>.fallback_allowed` | counter | requests let through by the failure mode |
//! | `krowoc.rate_limit.<route>.fallback_denied` | counter | requests refused by the failure mode |
//! | `krowoc.rate_limit.<route>.skipped` | counter | requests without the keyed value, skipped |
//! | `krowoc.events.recorded` | counter | request events built and queued |
//! | `krowoc.events.sampled_out` | counter | requests without an event because of `sample_ratio` |
//! | `krowoc.events.published` | counter | events that reached Redis: at least one of their targets (the channel's PUBLISH, the stream's XADD) took them |
//! | `krowoc.events.partial` | counter | of `published`, events one target of which gave up (refused, or still unwritten when pushed out of the queue) |
//! | `krowoc.events.dropped` | counter | events that never reached Redis: no target took them (pushed out of a full queue, oldest first; refused on every target; or their flush failed for good) |
//! | `krowoc.events.rejected` | counter | events Redis refused on some target (error reply such as `WRONGTYPE`), not sent again; also in `dropped` or `partial` |
//! | `krowoc.events.flushes` | counter | flush calls sent (one Redis call each) |
//! | `krowoc.events.flush_failures` | counter | flush calls that failed as a whole (their events queued again when the failure may pass) |
//! | `krowoc.events.requeued` | counter | events put back on the queue with the targets still to write, after a failed flush or a command Redis could not take then (`OOM`, `LOADING`…) |
//! | `krowoc.events.possible_duplicates` | counter | events sent again after a flush whose outcome is unknown (timeout, reset): at most this many duplicates |
//! | `krowoc.events.queued` | gauge | events waiting in all VMs' queues now |
//!
//! Every recorded event ends in exactly one of `published` and `dropped`: `recorded` =
//! `published` + `dropped` + `queued` + the events of flushes in flight.
//! | `krowoc.events.batch_size` | histogram | events per flush |
//! | `krowoc.cache.<route>.hits` | counter | requests answered from a fresh entry (incl. 304s and coalesced waits) |
//! | `krowoc.cache.<route>.misses` | counter | lookups without an entry (or past one, for a client's honoured `no-cache`): sent upstream |
//! | `krowoc.cache.<route>.expired` | counter | lookups finding an entry past its stale windows: sent upstream |
//! | `krowoc.cache.<route>.stale` | counter | stale entries served (stale-while-revalidate, stale-if-error) |
//! | `krowoc.cache.<route>.bypass` | counter | requests not using the cache (method, credentials, a client's honoured `no-store`, Redis failing) |
//! | `krowoc.cache.<route>.redis_errors` | counter | bypasses because Redis failed or the breaker was open |
//! | `krowoc.cache.<route>.stores` | counter | responses stored |
//! | `krowoc.cache.<route>.store_failures` | counter | stores that failed |
//! | `krowoc.cache.<route>.not_stored` | counter | responses not stored (Cache-Control, Set-Cookie, Vary, size, purged meanwhile) |
//! | `krowoc.cache.<route>.coalesced` | counter | misses that waited for another request's fill |
//! | `krowoc.cache.<route>.not_modified` | counter | conditional requests answered 304 |
//! | `krowoc.cache.<route>.corrupt` | counter | unreadable entries found (treated as misses, deleted) |
//! | `krowoc.cache.purges` | counter | purge operations completed (an index purge or a whole pattern scan) |
//! | `krowoc.cache.purged_entries` | counter | entries deleted by purges |
//! | `krowoc.cache.purge_failures` | counter | purges that failed or malformed invalidation headers |
//! | `krowoc.cache.revalidations` | counter | background refreshes sent (stale-while-revalidate) |

use crate::config::Config;
use crate::host::{define_metric, increment_metric};
use crate::ratelimit::{Tally, Verdict};
use crate::redis::breaker::Transition;
use crate::redis::client::ClientStats;
use proxy_wasm::types::MetricType;

/// Metric ids of one route (None where the host refused a definition).
#[derive(Clone, Debug, Default)]
pub struct RouteMetrics {
    pub allowed: Option<u32>,
    pub denied: Option<u32>,
    pub shadow_denied: Option<u32>,
    pub deny_cache_hits: Option<u32>,
    pub redis_errors: Option<u32>,
    pub fallback_allowed: Option<u32>,
    pub fallback_denied: Option<u32>,
    pub skipped: Option<u32>,
}

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    calls: Option<u32>,
    errors: Option<u32>,
    timeouts: Option<u32>,
    noscript: Option<u32>,
    short_circuited: Option<u32>,
    shared: Option<u32>,
    breaker_opened: Option<u32>,
    breaker_open: Option<u32>,
    /// Per route, in configuration order (None for routes without a rate limit).
    routes: Vec<Option<RouteMetrics>>,
    reported: ClientStats,
}

/// Metric names of a route's rate limit.
pub fn route_metric_name(route: &str, what: &str) -> String {
    format!("krowoc.rate_limit.{route}.{what}")
}

impl Metrics {
    pub fn define(config: &Config) -> Metrics {
        let counter = |name: &str| define_metric(MetricType::Counter, name);
        Metrics {
            calls: counter("krowoc.redis.calls"),
            errors: counter("krowoc.redis.errors"),
            timeouts: counter("krowoc.redis.timeouts"),
            noscript: counter("krowoc.redis.noscript"),
            short_circuited: counter("krowoc.redis.short_circuited"),
            shared: counter("krowoc.redis.shared"),
            breaker_opened: counter("krowoc.redis.breaker_opened"),
            breaker_open: define_metric(MetricType::Gauge, "krowoc.redis.breaker_open"),
            routes: config
                .routes
                .iter()
                .map(|r| {
                    r.rate_limit.as_ref().map(|_| {
                        let c = |what: &str| counter(&route_metric_name(&r.name, what));
                        RouteMetrics {
                            allowed: c("allowed"),
                            denied: c("denied"),
                            shadow_denied: c("shadow_denied"),
                            deny_cache_hits: c("deny_cache_hits"),
                            redis_errors: c("redis_errors"),
                            fallback_allowed: c("fallback_allowed"),
                            fallback_denied: c("fallback_denied"),
                            skipped: c("skipped"),
                        }
                    })
                })
                .collect(),
            reported: ClientStats::default(),
        }
    }

    /// Counts a rate-limit verdict for route number `route`.
    pub fn count_verdict(&self, route: usize, verdict: &Verdict) {
        let Some(Some(m)) = self.routes.get(route) else {
            return;
        };
        let id = match verdict.tally {
            Tally::Allowed => m.allowed,
            Tally::Denied => m.denied,
            Tally::ShadowDenied => m.shadow_denied,
            Tally::FallbackAllowed => m.fallback_allowed,
            Tally::FallbackDenied => m.fallback_denied,
            Tally::Skipped => m.skipped,
        };
        increment_metric(id, 1);
        if verdict.from_deny_cache {
            increment_metric(m.deny_cache_hits, 1);
        }
        if verdict.redis_error {
            increment_metric(m.redis_errors, 1);
        }
    }

    /// Adds what the command layer counted since the last report.
    pub fn report_client(&mut self, stats: ClientStats, transitions: &[Transition]) {
        let d = |now: u64, before: u64| i64::try_from(now.saturating_sub(before)).unwrap_or(0);
        let r = self.reported;
        for (id, delta) in [
            (self.calls, d(stats.calls, r.calls)),
            (self.errors, d(stats.errors, r.errors)),
            (self.timeouts, d(stats.timeouts, r.timeouts)),
            (self.noscript, d(stats.noscript, r.noscript)),
            (
                self.short_circuited,
                d(stats.short_circuited, r.short_circuited),
            ),
            (self.shared, d(stats.shared, r.shared)),
        ] {
            if delta > 0 {
                increment_metric(id, delta);
            }
        }
        self.reported = stats;
        for t in transitions {
            match t {
                Transition::Opened => {
                    increment_metric(self.breaker_opened, 1);
                    increment_metric(self.breaker_open, 1);
                }
                Transition::Closed => increment_metric(self.breaker_open, -1),
                Transition::None => {}
            }
        }
    }
}

// ---- the cache ---------------------------------------------------------------------------

/// Metric ids of one cached route.
#[derive(Clone, Debug, Default)]
pub struct RouteCacheMetrics {
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

/// The cache's counters.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    routes: Vec<Option<RouteCacheMetrics>>,
    pub purges: Option<u32>,
    pub purged_entries: Option<u32>,
    pub purge_failures: Option<u32>,
    pub revalidations: Option<u32>,
}

/// `krowoc.cache.<route>.<what>`.
pub fn cache_metric_name(route: &str, what: &str) -> String {
    format!("krowoc.cache.{route}.{what}")
}

/// What the cache counts per route.
#[derive(Clone, Copy, Debug)]
pub enum CacheCount {
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

impl CacheMetrics {
    pub fn define(config: &Config) -> CacheMetrics {
        let counter = |name: &str| define_metric(MetricType::Counter, name);
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

    pub fn count(&self, route: usize, what: CacheCount) {
        let Some(Some(m)) = self.routes.get(route) else {
            return;
        };
        let id = match what {
            CacheCount::Hit => m.hits,
            CacheCount::Miss => m.misses,
            CacheCount::Expired => m.expired,
            CacheCount::Stale => m.stale,
            CacheCount::Bypass => m.bypass,
            CacheCount::RedisError => m.redis_errors,
            CacheCount::Store => m.stores,
            CacheCount::StoreFailure => m.store_failures,
            CacheCount::NotStored => m.not_stored,
            CacheCount::Coalesced => m.coalesced,
            CacheCount::NotModified => m.not_modified,
            CacheCount::Corrupt => m.corrupt,
        };
        increment_metric(id, 1);
    }
}

// ---- request events ------------------------------------------------------------------------

/// Counters since the VM started (the metrics report their deltas).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events built and queued.
    pub recorded: u64,
    /// Requests without an event because of sampling.
    pub sampled_out: u64,
    /// Events that reached Redis (some target took them).
    pub published: u64,
    /// Of those, events a target of which gave up.
    pub partial: u64,
    /// Events that never reached Redis (no target took them).
    pub dropped: u64,
    /// Events Redis refused on some target (an error reply for that command); not retried.
    pub rejected: u64,
    /// Flush calls sent.
    pub flushes: u64,
    /// Events sent in those calls (retries included).
    pub flushed_events: u64,
    /// Flush calls that failed (their events are queued again when the failure may pass).
    pub flush_failures: u64,
    /// Events put back on the queue after a failed flush or command.
    pub requeued: u64,
    /// Events sent again after a flush whose outcome is unknown (may be duplicates).
    pub possible_duplicates: u64,
}

/// The request events' metrics, by delta from the publisher's [`EventStats`].
#[derive(Clone, Debug, Default)]
pub struct EventMetrics {
    recorded: Option<u32>,
    sampled_out: Option<u32>,
    published: Option<u32>,
    partial: Option<u32>,
    dropped: Option<u32>,
    rejected: Option<u32>,
    flushes: Option<u32>,
    flush_failures: Option<u32>,
    requeued: Option<u32>,
    possible_duplicates: Option<u32>,
    queued: Option<u32>,
    pub batch_size: Option<u32>,
    reported: EventStats,
    reported_queue: usize,
}

impl EventMetrics {
    pub fn define() -> EventMetrics {
        let counter = |name: &str| define_metric(MetricType::Counter, name);
        EventMetrics {
            recorded: counter("krowoc.events.recorded"),
            sampled_out: counter("krowoc.events.sampled_out"),
            published: counter("krowoc.events.published"),
            partial: counter("krowoc.events.partial"),
            dropped: counter("krowoc.events.dropped"),
            rejected: counter("krowoc.events.rejected"),
            flushes: counter("krowoc.events.flushes"),
            flush_failures: counter("krowoc.events.flush_failures"),
            requeued: counter("krowoc.events.requeued"),
            possible_duplicates: counter("krowoc.events.possible_duplicates"),
            queued: define_metric(MetricType::Gauge, "krowoc.events.queued"),
            batch_size: define_metric(MetricType::Histogram, "krowoc.events.batch_size"),
            reported: EventStats::default(),
            reported_queue: 0,
        }
    }

    pub fn report(&mut self, stats: EventStats, queue_len: usize) {
        let d = |now: u64, before: u64| i64::try_from(now.saturating_sub(before)).unwrap_or(0);
        let r = self.reported;
        for (id, delta) in [
            (self.recorded, d(stats.recorded, r.recorded)),
            (self.sampled_out, d(stats.sampled_out, r.sampled_out)),
            (self.published, d(stats.published, r.published)),
            (self.partial, d(stats.partial, r.partial)),
            (self.dropped, d(stats.dropped, r.dropped)),
            (self.rejected, d(stats.rejected, r.rejected)),
            (self.flushes, d(stats.flushes, r.flushes)),
            (
                self.flush_failures,
                d(stats.flush_failures, r.flush_failures),
            ),
            (self.requeued, d(stats.requeued, r.requeued)),
            (
                self.possible_duplicates,
                d(stats.possible_duplicates, r.possible_duplicates),
            ),
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
