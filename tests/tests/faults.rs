//! Faults under load, on both hosts, with envoy.yaml's configuration (every policy): Redis
//! stalled past the timeout, Redis restarted empty, its script cache flushed, the relay killed
//! and restarted, and the upstream killed and restarted (with and without the cache's
//! `stale_if_error`). A load
//! generator keeps requests going on the rate-limited, cached and event-only routes while the
//! fault happens; then each test asserts what the policies promise:
//!
//! * every answer is one the route's failure mode allows (the rate limit fails open, the cache
//!   bypasses to the upstream, an event never costs the request);
//! * no request waits much longer than the Redis timeout (bounded, generously for a loaded
//!   machine: this is a bound, not a speed measurement);
//! * within [`RECOVERY`] of the fault's end every answer is normal again: the rate limit is
//!   decided by Redis (its `ratelimit` fields are back) and the upstream answers;
//! * every request event is accounted for exactly: recorded = published + dropped once the
//!   queue has drained.

use krowoc_tests::{eventually, Host, Stack, StackOptions};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any request may take during a fault: envoy.yaml's Redis timeout (200 ms) plus the
/// breaker's grace, the upstream and a loaded machine's scheduling, with room to spare.
const LONGEST: Duration = Duration::from_millis(2_500);

/// How soon after a fault ends every answer must be normal again: the longest the breaker waits
/// before letting a call through to probe Redis (envoy.yaml's `cooldown`, 1 s), and a round
/// trip.
const RECOVERY: Duration = Duration::from_millis(1_000 + 250);

/// How long the load goes on after a fault ends: past [`RECOVERY`], so that normal answers
/// can be seen.
const AFTER: Duration = Duration::from_millis(1_750);

/// The routes the load goes to, and the statuses each may answer whatever Redis does.
const ROUTES: &[(&str, &[u16])] = &[
    // failure_mode allow: 200 while undecided, 429 once a decision said so.
    ("/api/rate-limited", &[200, 429]),
    // The cache bypasses to the upstream when Redis fails.
    ("/api/cached-data?user_id=7", &[200]),
    // No policy: only its event depends on Redis.
    ("/health", &[200]),
];

struct Answer {
    path: &'static str,
    status: u16,
    /// The `x-cache` header, if any.
    cache: Option<String>,
    /// Whether the answer carries rate-limit fields (a decision by Redis).
    decided: bool,
    /// When the request was sent.
    at: Instant,
    took: Duration,
}

/// Requests on every route, one after another, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Answer>>>,
}

impl Load {
    fn start(gateway: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (path, _) in ROUTES {
                    let started = Instant::now();
                    let r = testkit::http::get(gateway, path);
                    answers.push(Answer {
                        path,
                        status: r.status,
                        cache: r.header("x-cache").map(str::to_string),
                        decided: r.header("ratelimit").is_some(),
                        at: started,
                        took: started.elapsed(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the load thread")
    }
}

fn stack(host: Host) -> Stack {
    stack_with(host, false, |_| {})
}

/// The fault suite's stack, its relay and upstream behind links when `cuttable`, and the
/// plugin configuration changed by `edit` after the suite's own change.
fn stack_with(
    host: Host,
    cuttable: bool,
    edit: impl Fn(&mut serde_json::Value) + Send + Sync + 'static,
) -> Stack {
    Stack::start_with(StackOptions {
        host,
        cuttable,
        plugin_config: Some(Box::new(move |cfg| {
            // The rate limit is never reached by the load: a 429 would only come from Redis.
            let route = krowoc_tests::route_named(cfg, "rate-limited");
            route["rate_limit"]["limits"] =
                json!([{"name": "per_minute", "limit": 1_000_000, "window": "60s"}]);
            edit(cfg);
        })),
        ..StackOptions::default()
    })
}

/// What every fault test asserts of the answers under load.
fn assert_answers(answers: &[Answer]) {
    assert_answers_within(answers, ROUTES);
}

/// Every answer is one `routes` allows its path, and none took longer than [`LONGEST`].
fn assert_answers_within(answers: &[Answer], routes: &[(&str, &[u16])]) {
    assert!(
        answers.len() >= 3 * 5,
        "the load ran: {} answers",
        answers.len()
    );
    for a in answers {
        let allowed = routes
            .iter()
            .find(|(p, _)| *p == a.path)
            .map(|(_, s)| *s)
            .unwrap_or(&[]);
        assert!(
            allowed.contains(&a.status),
            "{} answered {} (allowed: {allowed:?})",
            a.path,
            a.status
        );
        assert!(
            a.took <= LONGEST,
            "{} took {:?}, more than {LONGEST:?}",
            a.path,
            a.took
        );
    }
}

/// After the fault: the rate limit is decided by Redis again (its fields are back).
fn assert_decided_by_redis_again(stack: &Stack) {
    let back = eventually(Duration::from_secs(5), || {
        stack.get("/api/rate-limited").header("ratelimit").is_some()
    });
    assert!(back, "the rate limit is decided by Redis again");
}

/// Within [`RECOVERY`] of `ended` every answer is normal: each request sent from then on was
/// answered 200 (nothing in the load reaches its limit) and, on the rate-limited route, decided
/// by Redis. The load must have gone on long enough for such requests to exist. Prints how long
/// recovery took (from the fault's end to the first request after which every answer was
/// normal).
fn assert_normal_within_recovery(answers: &[Answer], ended: Instant, fault: &str) {
    let normal = |a: &Answer| a.status == 200 && (a.path != "/api/rate-limited" || a.decided);
    let after: Vec<&Answer> = answers.iter().filter(|a| a.at >= ended).collect();
    let last_abnormal = after.iter().rposition(|a| !normal(a));
    let recovered_at = match last_abnormal {
        None => ended,
        Some(i) => match after.get(i + 1) {
            Some(a) => a.at,
            None => panic!("{fault}: the load ended before answers were normal again"),
        },
    };
    let took = recovered_at.duration_since(ended);
    eprintln!("{fault}: normal again {took:?} after the fault ended");
    assert!(
        took <= RECOVERY,
        "{fault}: answers were normal again only {took:?} after the fault ended (at most \
         {RECOVERY:?})"
    );
    let checked = after
        .iter()
        .filter(|a| a.at >= ended + RECOVERY && a.path == "/api/rate-limited")
        .count();
    assert!(
        checked > 0,
        "{fault}: the load went on past the recovery bound"
    );
}

/// recorded = published + dropped, exactly, once nothing is queued or in flight.
fn assert_events_accounted_for(stack: &Stack) {
    let mut last = String::new();
    let settled = eventually(Duration::from_secs(15), || {
        let m = stack.metrics();
        let v = |name: &str| krowoc_tests::metric_value(&m, name);
        let (recorded, published, dropped, queued) = (
            v("krowoc_events_recorded"),
            v("krowoc_events_published"),
            v("krowoc_events_dropped"),
            v("krowoc_events_queued"),
        );
        last = format!(
            "recorded {recorded}, published {published}, dropped {dropped}, queued {queued}"
        );
        recorded > 0 && queued == 0 && recorded == published + dropped
    });
    assert!(settled, "events not accounted for: {last}");
}

krowoc_tests::on_both_hosts!(a_stalled_redis_under_load_costs_at_most_the_timeout);
fn a_stalled_redis_under_load_costs_at_most_the_timeout(host: Host) {
    let mut stack = stack(host);
    let load = Load::start(stack.gateway);
    std::thread::sleep(Duration::from_millis(500));
    stack.redis.pause();
    std::thread::sleep(Duration::from_millis(1_500));
    stack.redis.resume();
    let ended = Instant::now();
    std::thread::sleep(AFTER);
    let answers = load.finish();
    assert_answers(&answers);
    assert_normal_within_recovery(&answers, ended, "Redis stalled");
    assert_decided_by_redis_again(&stack);
    assert_events_accounted_for(&stack);
}

krowoc_tests::on_both_hosts!(redis_restarted_empty_under_load_is_used_again_at_once);
fn redis_restarted_empty_under_load_is_used_again_at_once(host: Host) {
    let mut stack = stack(host);
    let load = Load::start(stack.gateway);
    std::thread::sleep(Duration::from_millis(500));
    // A restart loses every key and every loaded script.
    stack.redis.restart();
    let ended = Instant::now();
    std::thread::sleep(AFTER);
    let answers = load.finish();
    assert_answers(&answers);
    assert_normal_within_recovery(&answers, ended, "Redis restarted empty");
    assert_decided_by_redis_again(&stack);
    // The scripts were loaded again (EVAL after NOSCRIPT) and the cache refilled.
    assert!(eventually(Duration::from_secs(5), || {
        stack
            .get("/api/cached-data?user_id=7")
            .header("x-cache")
            .is_some_and(|c| c == "HIT")
    }));
    assert_events_accounted_for(&stack);
}

krowoc_tests::on_both_hosts!(a_flushed_script_cache_under_load_costs_no_decision);
fn a_flushed_script_cache_under_load_costs_no_decision(host: Host) {
    let stack = stack(host);
    let load = Load::start(stack.gateway);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        assert_eq!(stack.redis.cli(&["SCRIPT", "FLUSH"]), "OK");
        std::thread::sleep(Duration::from_millis(200));
    }
    let answers = load.finish();
    assert_answers(&answers);
    // NOSCRIPT is answered by EVAL: every rate-limited request was decided by Redis.
    let m = stack.metrics();
    let v = |name: &str| {
        assert!(m.contains(name), "no {name} in {m}");
        krowoc_tests::metric_value(&m, name)
    };
    assert_eq!(
        v("krowoc_rate_limit_rate_limited_redis_errors"),
        0,
        "no decision was lost to NOSCRIPT"
    );
    assert!(v("krowoc_rate_limit_rate_limited_allowed") > 0);
    assert!(v("krowoc_redis_noscript") > 0, "the flushes were noticed");
    assert_events_accounted_for(&stack);
}

/// The answers on `path` with `status`.
fn count(answers: &[Answer], path: &str, status: u16) -> usize {
    answers
        .iter()
        .filter(|a| a.path == path && a.status == status)
        .count()
}

krowoc_tests::on_both_hosts!(the_relay_killed_under_load_fails_open_and_is_used_again_once_back);
fn the_relay_killed_under_load_fails_open_and_is_used_again_once_back(host: Host) {
    let mut stack = stack_with(host, true, |_| {});
    let load = Load::start(stack.gateway);
    std::thread::sleep(Duration::from_millis(500));
    let relay = stack.relay_link.as_mut().expect("a cuttable stack");
    relay.cut();
    std::thread::sleep(Duration::from_millis(1_500));
    let before = relay.accepted();
    relay.restore();
    let ended = Instant::now();
    std::thread::sleep(AFTER);
    let answers = load.finish();
    // Every route kept answering: the limit failed open, the cache went to the upstream.
    assert_answers(&answers);
    assert_normal_within_recovery(&answers, ended, "the relay cut");
    let errors = stack.metric("krowoc_rate_limit_rate_limited_redis_errors");
    assert!(errors > 0, "the cut was noticed by the rate limit");
    assert_decided_by_redis_again(&stack);
    assert!(
        stack.relay_link.as_ref().expect("link").accepted() > before,
        "the gateway connected to the restarted relay by itself"
    );
    assert_events_accounted_for(&stack);
}

/// The routes' answers while the upstream is down: 503 from the gateway, except the cached
/// route where `cached` says what it may answer.
fn upstream_down_routes(cached: &'static [u16]) -> [(&'static str, &'static [u16]); 3] {
    [
        ("/api/rate-limited", &[200, 429, 503]),
        ("/api/cached-data?user_id=7", cached),
        ("/health", &[200, 503]),
    ]
}

/// A cached route whose entries expire after 1 s, with `stale_if_error` as given.
fn short_lived_cache(
    stale_if_error: &'static str,
) -> impl Fn(&mut serde_json::Value) + Send + Sync {
    move |cfg| {
        let route = krowoc_tests::route_named(cfg, "cached-data");
        route["cache"] = json!({"ttl": "1s", "key": {"query": ["user_id"]},
                                "honor_cache_control": false, "stale_if_error": stale_if_error});
    }
}

/// Kills the upstream under load for long enough that the cached entry expires, restores it,
/// and returns the answers and when it was restored.
fn kill_the_upstream_under_load(stack: &mut Stack) -> (Vec<Answer>, Instant) {
    let cached = "/api/cached-data?user_id=7";
    assert!(
        eventually(Duration::from_secs(5), || stack
            .get(cached)
            .header("x-cache")
            .is_some_and(|c| c == "HIT")),
        "the entry is cached before the fault"
    );
    let load = Load::start(stack.gateway);
    std::thread::sleep(Duration::from_millis(300));
    let upstream = stack.upstream_link.as_mut().expect("a cuttable stack");
    upstream.cut();
    std::thread::sleep(Duration::from_millis(2_000));
    upstream.restore();
    let ended = Instant::now();
    std::thread::sleep(AFTER);
    (load.finish(), ended)
}

/// After the upstream is back, the cached route is filled again with a good answer.
fn assert_cache_refilled(stack: &Stack) {
    let cached = "/api/cached-data?user_id=7";
    let mut last = String::new();
    let refilled = eventually(Duration::from_secs(5), || {
        let r = stack.get(cached);
        last = format!("{} {:?}", r.status, r.header("x-cache"));
        r.status == 200 && r.header("x-cache").is_some_and(|c| c == "HIT")
    });
    assert!(refilled, "the cache is used again: last answer {last}");
}

krowoc_tests::on_both_hosts!(the_upstream_killed_under_load_is_covered_by_stale_if_error);
fn the_upstream_killed_under_load_is_covered_by_stale_if_error(host: Host) {
    let mut stack = stack_with(host, true, short_lived_cache("60s"));
    let (answers, ended) = kill_the_upstream_under_load(&mut stack);
    assert_normal_within_recovery(&answers, ended, "the upstream cut, stale_if_error set");
    // The cached route never failed: fresh hits, then the stale copy while the upstream was
    // down, then refreshed.
    assert_answers_within(&answers, &upstream_down_routes(&[200]));
    assert!(count(&answers, "/health", 503) > 0, "the upstream was down");
    let stale = answers
        .iter()
        .filter(|a| a.cache.as_deref() == Some("STALE"))
        .count();
    assert!(
        stale > 0,
        "the stale copy was served while the upstream was down"
    );
    assert_cache_refilled(&stack);
    assert_events_accounted_for(&stack);
}

krowoc_tests::on_both_hosts!(
    the_upstream_killed_under_load_fails_the_expired_entry_and_caches_no_error
);
fn the_upstream_killed_under_load_fails_the_expired_entry_and_caches_no_error(host: Host) {
    let mut stack = stack_with(host, true, short_lived_cache("0s"));
    let (answers, ended) = kill_the_upstream_under_load(&mut stack);
    assert_answers_within(&answers, &upstream_down_routes(&[200, 503]));
    assert_normal_within_recovery(&answers, ended, "the upstream cut, stale_if_error unset");
    // Once the entry expired the upstream's absence shows, and no error was served from the
    // cache: every 503 came from the gateway, not from an entry.
    let cached = "/api/cached-data?user_id=7";
    assert!(
        count(&answers, cached, 503) > 0,
        "the expired entry was not served"
    );
    assert!(
        answers
            .iter()
            .filter(|a| a.path == cached && a.status == 503)
            .all(|a| a.cache.as_deref() != Some("HIT")),
        "a 503 was cached"
    );
    assert_cache_refilled(&stack);
    assert_events_accounted_for(&stack);
}
