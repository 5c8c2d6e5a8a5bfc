//! Faults under load, on both hosts, with envoy.yaml's configuration (every policy): Redis
//! stalled past the timeout, Redis restarted empty, and its script cache flushed. A load
//! generator keeps requests going on the rate-limited, cached and event-only routes while the
//! fault happens; then each test asserts what the policies promise:
//!
//! * every answer is one the route's failure mode allows (the rate limit fails open, the cache
//!   bypasses to the upstream, an event never costs the request);
//! * no request waits much longer than the Redis timeout (bounded, generously for a loaded
//!   machine: this is a bound, not a speed measurement);
//! * soon after the fault ends the rate limit is decided by Redis again;
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
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(|cfg| {
            // The rate limit is never reached by the load: a 429 would only come from Redis.
            let route = cfg["routes"]
                .as_array_mut()
                .expect("routes")
                .iter_mut()
                .find(|r| r["name"] == "rate-limited")
                .expect("envoy.yaml has the rate-limited route");
            route["rate_limit"]["limits"] =
                json!([{"name": "per_minute", "limit": 1_000_000, "window": "60s"}]);
        })),
        ..StackOptions::default()
    })
}

/// What every fault test asserts of the answers under load.
fn assert_answers(answers: &[Answer]) {
    assert!(
        answers.len() >= 3 * 5,
        "the load ran: {} answers",
        answers.len()
    );
    for a in answers {
        let allowed = ROUTES
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
    std::thread::sleep(Duration::from_millis(1_000));
    let answers = load.finish();
    assert_answers(&answers);
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
    std::thread::sleep(Duration::from_millis(1_000));
    let answers = load.finish();
    assert_answers(&answers);
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
