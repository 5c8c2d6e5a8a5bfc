//! Rate limiting end to end: real redis-server, relay, upstream, host-shim running
//! envoy/envoy.yaml with the real plugin.wasm — with transport `relay` and with `redis_call`.

use krowoc_tests::{eventually, metric_value, Host, Response, Stack, StackOptions};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const RELAY: &str = "relay";
const REDIS_CALL: &str = "redis_call";

use krowoc_tests::use_transport;

fn stack(host: Host, transport: &'static str, tweak: impl Fn(&mut Value) + 'static) -> Stack {
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            use_transport(cfg, transport);
            tweak(cfg);
        })),
        ..StackOptions::default()
    })
}

/// Prometheus name of a per-route rate-limit counter.
fn route_metric(route: &str, what: &str) -> String {
    format!(
        "krowoc_rate_limit_{}_{what}",
        route.replace(['-', '.'], "_")
    )
}

fn get_with(stack: &Stack, path: &str, headers: &[(&str, &str)]) -> Response {
    stack.request("GET", path, headers, b"")
}

fn sixth_request_gets_429_with_headers(host: Host, transport: &'static str) {
    let stack = stack(host, transport, |_| {});
    for i in 0..5u64 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "request {} of 5: {}", i + 1, r.text());
        assert!(r.header("x-krowoc-edge").is_some());
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"per_minute\";q=5;w=60")
        );
        let remaining = 4 - i;
        let rl = r.header("ratelimit").expect("RateLimit field");
        assert!(
            rl.starts_with(&format!("\"per_minute\";r={remaining};t=")),
            "request {}: {rl}",
            i + 1
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert!(r.header("retry-after").is_none());
    }
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("delay-seconds");
    assert!((55..=60).contains(&retry), "retry-after {retry}");
    let rl = r.header("ratelimit").expect("RateLimit on the denial");
    let t: u64 = rl
        .rsplit("t=")
        .next()
        .and_then(|t| t.parse().ok())
        .expect("t parameter");
    assert!(rl.starts_with("\"per_minute\";r=0;"), "{rl}");
    assert!(
        t >= retry,
        "RateLimit t={t} must not be earlier than Retry-After {retry}"
    );
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert!(
        r.header("x-krowoc-edge").is_some(),
        "local responses carry the edge header"
    );
    let body = r.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["violated_policies"], json!(["per_minute"]));
    // The other route has its own limit; and denials keep being denied.
    assert_eq!(stack.get("/api/slow-limited").status, 200);
    assert_eq!(stack.get("/api/rate-limited").status, 429);
    let m = stack.metrics();
    assert_eq!(
        metric_value(&m, &route_metric("rate-limited", "allowed")),
        5
    );
    assert_eq!(metric_value(&m, &route_metric("rate-limited", "denied")), 2);
    assert_eq!(
        metric_value(&m, &route_metric("rate-limited", "redis_errors")),
        0
    );
}

krowoc_tests::on_both_hosts!(sixth_request_in_a_minute_gets_429_with_headers_relay);
fn sixth_request_in_a_minute_gets_429_with_headers_relay(host: Host) {
    sixth_request_gets_429_with_headers(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: sixth_request_in_a_minute_gets_429_with_headers_redis_call);
fn sixth_request_in_a_minute_gets_429_with_headers_redis_call(host: Host) {
    sixth_request_gets_429_with_headers(host, REDIS_CALL);
}

fn two_gateways_share_one_limit(host: Host, transport: &'static str) {
    let mut stack = stack(host, transport, |_| {});
    let (second, _) = stack.start_gateway(2);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = if i % 2 == 0 {
            stack.get("/api/rate-limited")
        } else {
            testkit::http::get(second, "/api/rate-limited")
        };
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429, 429]);
}

krowoc_tests::on_both_hosts!(two_gateways_on_one_redis_share_one_limit_relay);
fn two_gateways_on_one_redis_share_one_limit_relay(host: Host) {
    two_gateways_share_one_limit(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: two_gateways_on_one_redis_share_one_limit_redis_call);
fn two_gateways_on_one_redis_share_one_limit_redis_call(host: Host) {
    two_gateways_share_one_limit(host, REDIS_CALL);
}

fn spoofed_forwarded_for_does_not_escape(host: Host, transport: &'static str) {
    let stack = stack(host, transport, |cfg| {
        cfg["client_ip"] = json!({"trusted_hops": 0});
    });
    let statuses: Vec<u16> = (0..7)
        .map(|i| {
            let xff = format!("203.0.113.{i}");
            get_with(&stack, "/api/rate-limited", &[("x-forwarded-for", &xff)]).status
        })
        .collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429]);
}

krowoc_tests::on_both_hosts!(
    forwarded_for_spoofing_does_not_escape_the_limit_with_zero_trusted_hops_relay
);
fn forwarded_for_spoofing_does_not_escape_the_limit_with_zero_trusted_hops_relay(host: Host) {
    spoofed_forwarded_for_does_not_escape(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: forwarded_for_spoofing_does_not_escape_the_limit_with_zero_trusted_hops_redis_call);
fn forwarded_for_spoofing_does_not_escape_the_limit_with_zero_trusted_hops_redis_call(host: Host) {
    spoofed_forwarded_for_does_not_escape(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(
    a_spoofed_forwarded_for_neither_escapes_the_limit_nor_spends_another_clients_quota
);
fn a_spoofed_forwarded_for_neither_escapes_the_limit_nor_spends_another_clients_quota(host: Host) {
    // envoy.yaml as shipped: the client is the connection's peer (use_remote_address).
    let stack = stack(host, RELAY, |_| {});
    let victim: IpAddr = "127.0.0.2".parse().expect("ip");
    let statuses: Vec<u16> = (1..=8)
        .map(|i| {
            let xff = format!("10.9.0.{i}");
            get_with(&stack, "/api/rate-limited", &[("x-forwarded-for", &xff)]).status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    // Claiming the victim's address spends the claimant's quota (already gone), not the victim's.
    let claimed = get_with(
        &stack,
        "/api/rate-limited",
        &[("x-forwarded-for", &victim.to_string())],
    );
    assert_eq!(claimed.status, 429);
    let from_victim = |_| {
        testkit::http::request_from(victim, stack.gateway, "GET", "/api/rate-limited", &[], b"")
            .status
    };
    let statuses: Vec<u16> = (0..6).map(from_victim).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429],
        "the victim's own five"
    );
}

krowoc_tests::on_both_hosts!(behind_a_trusted_load_balancer_its_forwarded_for_identifies_clients);
fn behind_a_trusted_load_balancer_its_forwarded_for_identifies_clients(host: Host) {
    // The safe setting behind one load balancer: the gateway trusts one X-Forwarded-For hop
    // (Envoy's xff_num_trusted_hops) and reports that client as the connection's address; the
    // filter keys on it (client_ip.trusted_hops stays 0).
    let stack = Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(|cfg: &mut Value| use_transport(cfg, RELAY))),
        connection_manager: Some(Box::new(|hcm| {
            hcm.insert("xff_num_trusted_hops".into(), 1.into());
        })),
        ..StackOptions::default()
    });
    // The client prepends a fake address; the load balancer's entry (rightmost) counts.
    for i in 0..5 {
        let xff = format!("6.6.6.{i}, 198.51.100.7");
        let r = get_with(&stack, "/api/rate-limited", &[("x-forwarded-for", &xff)]);
        assert_eq!(r.status, 200);
    }
    let r = get_with(
        &stack,
        "/api/rate-limited",
        &[("x-forwarded-for", "6.6.6.99, 198.51.100.7")],
    );
    assert_eq!(r.status, 429, "same client behind the load balancer");
    let r = get_with(
        &stack,
        "/api/rate-limited",
        &[("x-forwarded-for", "198.51.100.8")],
    );
    assert_eq!(r.status, 200, "another client behind the load balancer");
}

fn redis_outage(host: Host, transport: &'static str) {
    let timeout_ms = 200u64;
    let mut stack = stack(host, transport, move |cfg| {
        cfg["redis"]["timeout"] = json!(format!("{timeout_ms}ms"));
        cfg["redis"]["breaker"] = json!({"failures": 2, "cooldown": "500ms"});
    });
    assert_eq!(stack.get("/api/rate-limited").status, 200);
    stack.redis.stop();

    // failure_mode allow (the default): traffic passes, each request waits at most ~timeout.
    let mut slowest = Duration::ZERO;
    for _ in 0..12 {
        let started = Instant::now();
        let r = stack.get("/api/rate-limited");
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("ratelimit").is_none(), "no decision, no fields");
    }
    assert!(
        slowest < Duration::from_millis(timeout_ms + 150),
        "slowest request during the outage took {slowest:?}"
    );
    let m = stack.metrics();
    assert!(metric_value(&m, "krowoc_redis_breaker_open") >= 1, "{m}");
    assert!(metric_value(&m, "krowoc_redis_breaker_opened") >= 1);
    assert!(metric_value(&m, &route_metric("rate-limited", "fallback_allowed")) >= 12);
    assert!(metric_value(&m, &route_metric("rate-limited", "redis_errors")) >= 12);
    // With the breaker open, requests are decided without calling Redis.
    let short_before = metric_value(&m, "krowoc_redis_short_circuited");
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(stack.get("/api/rate-limited").status, 200);
    }
    assert!(started.elapsed() < Duration::from_millis(5 * timeout_ms));
    assert!(stack.metric("krowoc_redis_short_circuited") > short_before);

    // Redis returns (empty): probes after the cool-down close every breaker.
    stack.redis.restart();
    let closed = eventually(Duration::from_secs(15), || {
        let _ = stack.get("/api/slow-limited");
        std::thread::sleep(Duration::from_millis(50));
        stack.metric("krowoc_redis_breaker_open") == 0
    });
    assert!(closed, "breaker still open:\n{}", stack.metrics());
    // And the limit is enforced again, counted from Redis' return (it restarted empty).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(stack.get("/api/rate-limited").status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429]);
}

krowoc_tests::on_both_hosts!(
    redis_killed_allows_traffic_within_the_timeout_and_the_breaker_recovers_relay
);
fn redis_killed_allows_traffic_within_the_timeout_and_the_breaker_recovers_relay(host: Host) {
    redis_outage(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: redis_killed_allows_traffic_within_the_timeout_and_the_breaker_recovers_redis_call);
fn redis_killed_allows_traffic_within_the_timeout_and_the_breaker_recovers_redis_call(host: Host) {
    redis_outage(host, REDIS_CALL);
}

fn script_flush_mid_run(host: Host, transport: &'static str) {
    let stack = stack(host, transport, |_| {});
    for _ in 0..3 {
        assert_eq!(stack.get("/api/rate-limited").status, 200);
    }
    assert_eq!(stack.redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    assert_eq!(stack.get("/api/rate-limited").status, 200);
    assert_eq!(stack.get("/api/rate-limited").status, 200);
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 429, "the flush lost no count");
    assert!(stack.metric("krowoc_redis_noscript") >= 1);
    assert_eq!(
        stack.metric(&route_metric("rate-limited", "redis_errors")),
        0
    );
}

krowoc_tests::on_both_hosts!(script_flush_mid_run_still_counts_correctly_relay);
fn script_flush_mid_run_still_counts_correctly_relay(host: Host) {
    script_flush_mid_run(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: script_flush_mid_run_still_counts_correctly_redis_call);
fn script_flush_mid_run_still_counts_correctly_redis_call(host: Host) {
    script_flush_mid_run(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(failure_mode_deny_answers_503_and_local_keeps_a_per_worker_limit);
fn failure_mode_deny_answers_503_and_local_keeps_a_per_worker_limit(host: Host) {
    let mut stack = stack(host, RELAY, |cfg| {
        cfg["routes"] = json!([
            {"name": "deny", "match": {"path": "/api/rate-limited"},
             "rate_limit": {"limits": [{"limit": 5, "window": "60s"}], "failure_mode": "deny"}},
            {"name": "local", "match": {"path": "/api/slow-limited"},
             "rate_limit": {"limits": [{"limit": 2, "window": "5m"}], "failure_mode": "local",
                            "headers": "legacy"}}
        ]);
    });
    stack.redis.stop();
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "rate_limit_unavailable");
    // Two workers, each with its own bucket of 2: at most 4 pass, and at least 2.
    let statuses: Vec<u16> = (0..8)
        .map(|_| stack.get("/api/slow-limited").status)
        .collect();
    let passed = statuses.iter().filter(|s| **s == 200).count();
    assert!((2..=4).contains(&passed), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(stack.metric(&route_metric("local", "fallback_denied")) >= 4);
}

krowoc_tests::on_both_hosts!(failure_mode_local_admits_a_share_of_the_limit_per_vm_across_gateways);
fn failure_mode_local_admits_a_share_of_the_limit_per_vm_across_gateways(host: Host) {
    let limit = 8;
    let mut stack = stack(host, RELAY, move |cfg| {
        cfg["routes"] = json!([
            {"name": "local", "match": {"path": "/api/slow-limited"},
             "rate_limit": {"limits": [{"limit": limit, "window": "5m"}], "failure_mode": "local",
                            "key": [{"query": "client"}]}}
        ]);
    });
    let (second, _) = stack.start_gateway(2);
    // Two gateways of two workers: four VMs decide, each registers while Redis is up.
    let vms = 4;
    // (Another client than the one measured below: that one's limit stays untouched, and
    // no denial of it is remembered in the VMs' deny caches.)
    let registered = eventually(Duration::from_secs(30), || {
        stack.get("/api/slow-limited?client=warm-up");
        testkit::http::get(second, "/api/slow-limited?client=warm-up");
        stack.redis.int(&["ZCARD", "krowoc:vms"]) == vms
    });
    assert!(
        registered,
        "registered VMs: {}",
        stack.redis.int(&["ZCARD", "krowoc:vms"])
    );
    // Every VM reads the count at its next registration (every 2 s).
    std::thread::sleep(Duration::from_millis(2_500));
    stack.redis.stop();
    let statuses: Vec<u16> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                stack.get("/api/slow-limited?client=measured").status
            } else {
                testkit::http::get(second, "/api/slow-limited?client=measured").status
            }
        })
        .collect();
    let passed = statuses.iter().filter(|s| **s == 200).count();
    // Each VM's bucket holds limit / VMs = 2: at most the limit in all, not 2 × 2 × 8.
    assert!(
        (1..=limit as usize).contains(&passed),
        "{passed} passed: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
}

krowoc_tests::on_both_hosts!(shadow_mode_counts_but_never_denies);
fn shadow_mode_counts_but_never_denies(host: Host) {
    let stack = stack(host, RELAY, |cfg| {
        cfg["routes"] = json!([
            {"name": "shadowed", "match": {"path": "/api/rate-limited"},
             "rate_limit": {"limits": [{"limit": 5, "window": "60s"}], "shadow": true}}
        ]);
    });
    let statuses: Vec<u16> = (0..7)
        .map(|_| stack.get("/api/rate-limited").status)
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(stack.metric(&route_metric("shadowed", "allowed")), 5);
    assert_eq!(stack.metric(&route_metric("shadowed", "shadow_denied")), 2);
    assert_eq!(stack.metric(&route_metric("shadowed", "denied")), 0);
}

krowoc_tests::on_both_hosts!(denied_keys_are_answered_from_the_vm_without_redis);
fn denied_keys_are_answered_from_the_vm_without_redis(host: Host) {
    let stack = Stack::start_with(StackOptions {
        host,
        workers: 1,
        plugin_config: Some(Box::new(|cfg: &mut Value| {
            use_transport(cfg, RELAY);
            // Event flushes are Redis calls too; this test counts the rate limit's alone.
            cfg.as_object_mut().expect("object").remove("events");
        })),
        ..StackOptions::default()
    });
    for _ in 0..5 {
        assert_eq!(stack.get("/api/rate-limited").status, 200);
    }
    assert_eq!(stack.get("/api/rate-limited").status, 429);
    let calls_before = stack.metric("krowoc_redis_calls");
    for _ in 0..10 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 429);
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(
        stack.metric("krowoc_redis_calls"),
        calls_before,
        "no Redis call for a key known to be over its limit"
    );
    assert_eq!(
        stack.metric(&route_metric("rate-limited", "deny_cache_hits")),
        10
    );
}

fn slow_redis_costs_at_most_the_timeout(host: Host, transport: &'static str) {
    let stack = stack(host, transport, |cfg| {
        cfg["redis"]["timeout"] = json!("200ms");
        // Event flushes failing during the stall would open the breaker (by design) and hide
        // the recovery this test watches; this test is about one decision's latency.
        if let Some(c) = cfg.as_object_mut() {
            c.remove("events");
        }
    });
    assert_eq!(stack.get("/api/rate-limited").status, 200);
    // Stall Redis for 1.5s from the side (CLIENT is refused by the relay, not by Redis).
    assert_eq!(stack.redis.cli(&["CLIENT", "PAUSE", "1500", "ALL"]), "OK");
    let started = Instant::now();
    let r = stack.get("/api/rate-limited");
    let took = started.elapsed();
    assert_eq!(r.status, 200, "failure_mode allow: {}", r.text());
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(200 + 150),
        "a stalled Redis cost {took:?} with a 200ms timeout"
    );
    assert!(stack.metric("krowoc_redis_errors") >= 1);
    if transport == RELAY {
        // The relay call's timeout answers 504; a Higress host reports only "not OK".
        assert!(stack.metric("krowoc_redis_timeouts") >= 1);
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Once Redis answers again, the late reply was ignored and decisions resume.
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").is_some());
}

krowoc_tests::on_both_hosts!(stalled_redis_costs_at_most_the_timeout_relay);
fn stalled_redis_costs_at_most_the_timeout_relay(host: Host) {
    slow_redis_costs_at_most_the_timeout(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: stalled_redis_costs_at_most_the_timeout_redis_call);
fn stalled_redis_costs_at_most_the_timeout_redis_call(host: Host) {
    slow_redis_costs_at_most_the_timeout(host, REDIS_CALL);
}

/// Whether Redis decided a request on a route with a limit of 1 (allowed with fields, or
/// denied), rather than the failure mode (allowed without fields).
fn decided_by_redis(r: &Response) -> bool {
    r.status == 429 || r.header("ratelimit").is_some()
}

fn limits_are_decided_by_redis_again_within_a_second_of_its_return(
    host: Host,
    transport: &'static str,
) {
    let mut stack = stack(host, transport, |cfg| {
        // A generous timeout: a probe slowed by a loaded machine must not count as a failure.
        cfg["redis"]["timeout"] = json!("1s");
        // The breaker as envoy.yaml ships it.
        assert_eq!(
            cfg["redis"]["breaker"],
            json!({"failures": 5, "probe_interval": "100ms", "cooldown": "1s"})
        );
        let route = krowoc_tests::route_named(cfg, "rate-limited");
        route["rate_limit"]["limits"] = json!([{"name": "once", "limit": 1, "window": "60s"}]);
    });
    let r = stack.get("/api/rate-limited");
    assert!(decided_by_redis(&r) && r.status == 200, "{}", r.text());
    stack.redis.stop();
    // An outage long enough for the probes to back off to the cool-down.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "failure_mode allow: {}", r.text());
        assert!(!decided_by_redis(&r), "Redis is down: {}", r.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        stack.metric("krowoc_redis_breaker_opened") >= 1,
        "{}",
        stack.metrics()
    );

    stack.redis.restart();
    // Redis answers PING from here. One request at a time: each VM's first request after its
    // next probe is due is that probe.
    let back = Instant::now();
    let mut decisions = Vec::new();
    while back.elapsed() < Duration::from_secs(4) {
        let sent = back.elapsed();
        let r = stack.get("/api/rate-limited");
        decisions.push((sent, decided_by_redis(&r), r.status));
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = decisions.iter().find(|(_, by_redis, _)| *by_redis);
    eprintln!("first request decided by Redis after it returned: {first:?}");
    let late: Vec<_> = decisions
        .iter()
        .filter(|(sent, _, _)| *sent >= Duration::from_millis(1_500))
        .collect();
    assert!(late.len() >= 2, "too few requests to judge: {decisions:?}");
    assert!(
        late.iter().all(|(_, by_redis, _)| *by_redis),
        "requests 1.5s after Redis returned were not all decided by Redis: {decisions:?}"
    );
    // Redis restarted empty: the first decision it made allowed, every later one denies.
    let by_redis: Vec<u16> = decisions
        .iter()
        .filter(|(_, by_redis, _)| *by_redis)
        .map(|(_, _, status)| *status)
        .collect();
    assert_eq!(by_redis[0], 200, "{decisions:?}");
    assert!(by_redis[1..].iter().all(|s| *s == 429), "{decisions:?}");
    assert_eq!(
        stack.metric("krowoc_redis_breaker_open"),
        0,
        "{}",
        stack.metrics()
    );
}

krowoc_tests::on_both_hosts!(limits_are_decided_by_redis_again_within_a_second_of_its_return_relay);
fn limits_are_decided_by_redis_again_within_a_second_of_its_return_relay(host: Host) {
    limits_are_decided_by_redis_again_within_a_second_of_its_return(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: limits_are_decided_by_redis_again_within_a_second_of_its_return_redis_call);
fn limits_are_decided_by_redis_again_within_a_second_of_its_return_redis_call(host: Host) {
    limits_are_decided_by_redis_again_within_a_second_of_its_return(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(concurrent_requests_share_relay_exchanges_and_each_is_decided_once);
fn concurrent_requests_share_relay_exchanges_and_each_is_decided_once(host: Host) {
    const CLIENTS: usize = 16;
    const EACH: usize = 10;
    const LIMIT: usize = 100;
    let stack = stack(host, RELAY, |cfg| {
        // One exchange in flight per VM: calls made meanwhile ride together in the next.
        cfg["redis"]["max_in_flight"] = json!(1);
        let route = krowoc_tests::route_named(cfg, "rate-limited");
        route["rate_limit"]["limits"] =
            json!([{"name": "per_minute", "limit": LIMIT, "window": "60s"}]);
    });
    let gateway = stack.gateway;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(move || {
                    (0..EACH)
                        .map(|_| testkit::http::get(gateway, "/api/rate-limited").status)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client"))
            .collect()
    });
    let count = |status: u16| statuses.iter().filter(|s| **s == status).count();
    // Exactly the limit admitted: sharing an exchange changes how calls travel, not what
    // Redis decides.
    assert_eq!(count(200), LIMIT, "{statuses:?}");
    assert_eq!(count(429), CLIENTS * EACH - LIMIT, "{statuses:?}");
    let m = stack.metrics();
    let v = |name: &str| metric_value(&m, name);
    assert_eq!(v(&route_metric("rate-limited", "redis_errors")), 0);
    assert_eq!(v(&route_metric("rate-limited", "fallback_allowed")), 0);
    let (calls, shared) = (v("krowoc_redis_calls"), v("krowoc_redis_shared"));
    eprintln!(
        "{calls} exchanges for {} decisions, {shared} in shared exchanges",
        CLIENTS * EACH
    );
    assert!(shared > 0, "some calls rode in a shared exchange: {m}");
    assert!(
        calls < (CLIENTS * EACH) as i64,
        "fewer exchanges ({calls}) than decisions ({})",
        CLIENTS * EACH
    );
}

krowoc_tests::on_both_hosts!(sync_limits_decide_in_the_vm_and_overshoot_by_at_most_one_interval);
fn sync_limits_decide_in_the_vm_and_overshoot_by_at_most_one_interval(host: Host) {
    const LIMIT: u64 = 200;
    const SENT: usize = 600;
    const CLIENTS: usize = 8;
    const INTERVAL: Duration = Duration::from_millis(100);
    let mut stack = stack(host, RELAY, |cfg| {
        let route = krowoc_tests::route_named(cfg, "rate-limited");
        // A window far longer than the test, so that it never starts a new one.
        route["rate_limit"]["limits"] = json!([{"name": "hot", "limit": LIMIT, "window": "720h",
                                                "algorithm": "fixed_window"}]);
        route["rate_limit"]["sync"] = json!("100ms");
    });
    let (second, second_admin) = stack.start_gateway(2);
    let gateways = [stack.gateway, second];
    // (when the request was sent, its status)
    let answers: Vec<(Instant, u16)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                s.spawn(move || {
                    (0..SENT / CLIENTS)
                        .map(|i| {
                            let sent = Instant::now();
                            let gw = gateways[(c + i) % 2];
                            (sent, testkit::http::get(gw, "/api/rate-limited").status)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client"))
            .collect()
    });
    let admitted = answers.iter().filter(|(_, s)| *s == 200).count() as u64;
    let denied = answers.iter().filter(|(_, s)| *s == 429).count() as u64;
    assert_eq!(admitted + denied, SENT as u64);
    // The bound: what every VM together admits in one interval plus a round trip. Counted
    // from the run itself: the most requests sent within any span of that length (a round
    // trip on this loaded machine taken as another interval).
    let mut sent: Vec<Instant> = answers.iter().map(|(t, _)| *t).collect();
    sent.sort();
    let span = 2 * INTERVAL;
    let busiest = (0..sent.len())
        .map(|i| {
            sent[i..]
                .iter()
                .take_while(|t| **t - sent[i] <= span)
                .count()
        })
        .max()
        .unwrap_or(0) as u64;
    assert!(admitted >= LIMIT, "the limit is reached: {admitted}");
    assert!(
        admitted <= LIMIT + busiest,
        "{admitted} admitted: more than {LIMIT} + {busiest} sent in the busiest {span:?}"
    );
    // Every admitted request reached Redis's count once the VMs synced.
    let counted = || -> u64 {
        let keys = stack.redis.cli(&["KEYS", "krowoc:rl:*:w*"]);
        keys.lines()
            .filter(|k| !k.trim().is_empty())
            .map(|k| {
                stack
                    .redis
                    .cli(&["GET", k.trim()])
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .sum()
    };
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(3), || {
            last = counted();
            last == admitted
        }),
        "Redis counted {last}, the gateways admitted {admitted}"
    );
    // Far fewer Redis calls than requests: a sync per interval per VM.
    let calls: i64 = [stack.admin, second_admin]
        .iter()
        .map(|admin| {
            let m = testkit::http::get(*admin, "/stats/prometheus").text();
            metric_value(&m, "krowoc_redis_calls")
        })
        .sum();
    eprintln!("{admitted} admitted (busiest {span:?}: {busiest} sent), {calls} Redis calls for {SENT} requests");
    assert!(
        (calls as f64) < SENT as f64 / 4.0,
        "{calls} Redis calls for {SENT} requests"
    );
}
