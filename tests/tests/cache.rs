//! The response cache end to end: real redis-server, relay, upstream, host-shim running
//! envoy/envoy.yaml with the real plugin.wasm — with transport `relay` and with `redis_call`.
//! Upstream calls are counted by the upstream itself (`cached_data_calls`), so a hit is proven
//! not to reach it. Cases the demo upstream cannot produce (private, Set-Cookie, Vary, ETag,
//! an upstream that fails) use a small origin started by the test behind a second gateway.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as AxumResponse};
use axum::routing::get;
use axum::Router;
use krowoc_tests::{eventually, metric_value, Gateway, Host, Response, Stack, StackOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const RELAY: &str = "relay";
const REDIS_CALL: &str = "redis_call";
const PURGE_PATH: &str = "/_krowoc/cache/purge";
const PURGE_TOKEN: &str = "demo-purge-token-change-me";

use krowoc_tests::use_transport;

/// The `cache` policy of the shipped `cached-data` route.
fn cached_data_policy(cfg: &mut Value) -> &mut Value {
    let route = krowoc_tests::route_named(cfg, "cached-data");
    &mut route["cache"]
}

fn stack_with(
    host: Host,
    transport: &'static str,
    delay: Duration,
    tweak: impl Fn(&mut Value) + 'static,
) -> Stack {
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            use_transport(cfg, transport);
            // The machine running the tests may be busy: a lookup that misses a 200ms timeout
            // bypasses the cache, which is right but not what these tests look at.
            cfg["redis"]["timeout"] = json!("1s");
            tweak(cfg);
        })),
        upstream_delay: delay,
        ..StackOptions::default()
    })
}

fn stack(host: Host, transport: &'static str) -> Stack {
    stack_with(host, transport, Duration::ZERO, |_| {})
}

/// Prometheus name of a per-route cache counter.
fn cache_metric(route: &str, what: &str) -> String {
    format!("krowoc_cache_{}_{what}", route.replace(['-', '.'], "_"))
}

fn upstream_calls(stack: &Stack) -> u64 {
    stack
        .upstream_state
        .stats()
        .cached_data_calls
        .load(Ordering::Relaxed)
}

fn x_cache(r: &Response) -> &str {
    r.header("x-cache").unwrap_or("(none)")
}

fn user(id: &str) -> String {
    format!("/api/cached-data?user_id={id}")
}

/// GETs `path` until it is answered from the cache (stores happen after the response).
fn wait_for_hit(stack: &Stack, path: &str) -> Response {
    let mut last = None;
    let hit = eventually(Duration::from_secs(5), || {
        let r = stack.get(path);
        let hit = x_cache(&r) == "HIT";
        last = Some(r);
        hit
    });
    let last = last.expect("at least one request");
    assert!(
        hit,
        "{path} never became a HIT: {} {:?}",
        x_cache(&last),
        last.headers
    );
    last
}

/// Fields that differ between a miss and a hit by design.
fn comparable_fields(r: &Response) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = r
        .headers
        .iter()
        // Envoy's router times each upstream answer (x-envoy-upstream-service-time); a hit
        // had no upstream answer and carries none.
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "x-cache" | "cache-status" | "age" | "connection"
            ) && !k.starts_with("x-envoy-")
        })
        .cloned()
        .collect();
    fields.sort();
    fields
}

fn purge(stack: &Stack, directives: &str) -> Response {
    stack.request(
        "POST",
        PURGE_PATH,
        &[
            ("x-krowoc-purge-token", PURGE_TOKEN),
            ("x-krowoc-invalidate", directives),
        ],
        b"",
    )
}

fn entry_keys(stack: &Stack) -> Vec<String> {
    let text = stack.redis.cli(&["KEYS", "krowoc:c:*:e:*"]);
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- miss, hit, expiry, keys ---------------------------------------------------------------

fn miss_then_hit(host: Host, transport: &'static str) {
    let stack = stack(host, transport);
    let miss = stack.get(&user("1"));
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(x_cache(&miss), "MISS");
    assert_eq!(
        miss.header("cache-status"),
        Some("krowoc; fwd=uri-miss; fwd-status=200; stored")
    );
    let hit = wait_for_hit(&stack, &user("1"));
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, miss.body, "identical bodies");
    assert_eq!(
        comparable_fields(&hit),
        comparable_fields(&miss),
        "identical fields"
    );
    assert!(hit.header("age").is_some());
    let status = hit.header("cache-status").expect("Cache-Status");
    assert!(status.starts_with("krowoc; hit; ttl="), "{status}");
    let ttl: i64 = status
        .split("; ")
        .find_map(|p| p.strip_prefix("ttl="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("ttl in {status:?}"));
    assert!((55..=60).contains(&ttl), "upstream max-age=60: {ttl}");
    assert_eq!(hit.header("cache-tag"), Some("user:1"));
    assert_eq!(upstream_calls(&stack), 1, "hits never reach the upstream");
    for _ in 0..5 {
        assert_eq!(x_cache(&stack.get(&user("1"))), "HIT");
    }
    assert_eq!(upstream_calls(&stack), 1);
    let m = stack.metrics();
    assert!(
        metric_value(&m, &cache_metric("cached-data", "hits")) >= 6,
        "{m}"
    );
    assert_eq!(metric_value(&m, &cache_metric("cached-data", "misses")), 1);
    assert_eq!(metric_value(&m, &cache_metric("cached-data", "stores")), 1);
    assert_eq!(
        metric_value(&m, &cache_metric("cached-data", "store_failures")),
        0
    );
}

krowoc_tests::on_both_hosts!(miss_then_hit_with_identical_body_and_fields_relay);
fn miss_then_hit_with_identical_body_and_fields_relay(host: Host) {
    miss_then_hit(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: miss_then_hit_with_identical_body_and_fields_redis_call);
fn miss_then_hit_with_identical_body_and_fields_redis_call(host: Host) {
    miss_then_hit(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(entries_expire_after_their_ttl);
fn entries_expire_after_their_ttl(host: Host) {
    let stack = stack_with(host, RELAY, Duration::ZERO, |cfg| {
        *cached_data_policy(cfg) = json!({"ttl": "1s", "key": {"query": ["user_id"]},
                                          "honor_cache_control": false});
    });
    assert_eq!(x_cache(&stack.get(&user("1"))), "MISS");
    wait_for_hit(&stack, &user("1"));
    let stored = entry_keys(&stack);
    assert_eq!(stored.len(), 1, "{stored:?}");
    let pttl = stack.redis.int(&["PTTL", &stored[0]]);
    assert!(
        (0..=1000).contains(&pttl),
        "Redis keeps it for the ttl: {pttl}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let again = stack.get(&user("1"));
    assert_eq!(x_cache(&again), "MISS", "{:?}", again.headers);
    assert_eq!(upstream_calls(&stack), 2);
}

krowoc_tests::on_both_hosts!(each_user_id_has_its_own_entry_and_other_parameters_are_ignored);
fn each_user_id_has_its_own_entry_and_other_parameters_are_ignored(host: Host) {
    let stack = stack(host, RELAY);
    for id in ["1", "2"] {
        assert_eq!(x_cache(&stack.get(&user(id))), "MISS");
    }
    for id in ["1", "2"] {
        let hit = wait_for_hit(&stack, &user(id));
        assert_eq!(hit.json()["user_id"], id, "user {id} gets their own entry");
    }
    let extra = stack.get("/api/cached-data?utm_source=ad&user_id=1&cachebust=7");
    assert_eq!(
        x_cache(&extra),
        "HIT",
        "parameters outside the key change nothing"
    );
    assert_eq!(extra.json()["user_id"], "1");
    assert_eq!(
        x_cache(&stack.get("/api/cached-data")),
        "MISS",
        "no user_id: its own entry"
    );
    assert_eq!(upstream_calls(&stack), 3);
}

fn rate_limit_and_cache(host: Host, transport: &'static str) {
    let stack = stack_with(host, transport, Duration::ZERO, |cfg| {
        let route = krowoc_tests::route_named(cfg, "cached-data");
        route["rate_limit"] = json!({"limits": [{"name": "per_minute", "limit": 5, "window": "60s"}],
                                     "headers": "both"});
    });
    let miss = stack.get(&user("1"));
    assert_eq!(x_cache(&miss), "MISS");
    assert_eq!(miss.header("x-ratelimit-remaining"), Some("4"));
    std::thread::sleep(Duration::from_millis(300));
    for remaining in ["3", "2", "1", "0"] {
        let hit = stack.get(&user("1"));
        assert_eq!(hit.status, 200);
        assert_eq!(x_cache(&hit), "HIT", "both answers arrive together");
        assert_eq!(
            hit.header("x-ratelimit-remaining"),
            Some(remaining),
            "hits are limited too"
        );
    }
    let denied = stack.get(&user("1"));
    assert_eq!(
        denied.status, 429,
        "over the limit the cached answer is dropped"
    );
    assert!(denied.header("x-cache").is_none());
    assert!(denied.header("retry-after").is_some());
    assert_eq!(upstream_calls(&stack), 1);
    assert_eq!(stack.metric(&cache_metric("cached-data", "hits")), 4);
}

krowoc_tests::on_both_hosts!(a_rate_limited_cached_route_decides_both_in_one_round_trip_relay);
fn a_rate_limited_cached_route_decides_both_in_one_round_trip_relay(host: Host) {
    rate_limit_and_cache(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: a_rate_limited_cached_route_decides_both_in_one_round_trip_redis_call);
fn a_rate_limited_cached_route_decides_both_in_one_round_trip_redis_call(host: Host) {
    rate_limit_and_cache(host, REDIS_CALL);
}

// ---- invalidation ---------------------------------------------------------------------------

fn fill(stack: &Stack, ids: &[&str]) {
    for id in ids {
        stack.get(&user(id));
    }
    for id in ids {
        wait_for_hit(stack, &user(id));
    }
}

fn purge_endpoint(host: Host, transport: &'static str) {
    let stack = stack(host, transport);
    fill(&stack, &["1", "2", "3", "4"]);
    assert_eq!(entry_keys(&stack).len(), 4);

    let r = purge(&stack, "tag=user:1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["purged"], 1, "{}", r.text());
    assert_eq!(entry_keys(&stack).len(), 3, "exactly the tagged entry");
    assert_eq!(x_cache(&stack.get(&user("2"))), "HIT");
    assert_eq!(x_cache(&stack.get(&user("1"))), "MISS");

    let r = purge(&stack, "url=/api/cached-data?user_id=2&utm=x");
    assert_eq!(r.json()["purged"], 1, "{}", r.text());
    assert_eq!(x_cache(&stack.get(&user("2"))), "MISS");
    assert_eq!(x_cache(&stack.get(&user("3"))), "HIT");

    let r = purge(&stack, "pattern=/api/cached-data?user_id=[34]");
    assert_eq!(r.status, 200, "{}", r.text());
    // The glob has no classes: "[34]" is literal, nothing matches.
    assert_eq!(r.json()["purged"], 0, "{}", r.text());
    let r = purge(&stack, "pattern=/api/cached-data?user_id=3*");
    assert_eq!(r.json()["purged"], 1, "{}", r.text());
    assert_eq!(x_cache(&stack.get(&user("3"))), "MISS");
    assert_eq!(x_cache(&stack.get(&user("4"))), "HIT");

    let r = purge(&stack, "route=/api/cached-data");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(entry_keys(&stack).is_empty(), "{:?}", entry_keys(&stack));
    assert_eq!(x_cache(&stack.get(&user("4"))), "MISS");
    assert!(stack.metric("krowoc_cache_purges") >= 4);
}

krowoc_tests::on_both_hosts!(purge_endpoint_by_tag_url_pattern_and_route_relay);
fn purge_endpoint_by_tag_url_pattern_and_route_relay(host: Host) {
    purge_endpoint(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: purge_endpoint_by_tag_url_pattern_and_route_redis_call);
fn purge_endpoint_by_tag_url_pattern_and_route_redis_call(host: Host) {
    purge_endpoint(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(purge_endpoint_refuses_wrong_tokens_methods_and_empty_requests);
fn purge_endpoint_refuses_wrong_tokens_methods_and_empty_requests(host: Host) {
    let stack = stack(host, RELAY);
    fill(&stack, &["1"]);
    let wrong = stack.request(
        "POST",
        PURGE_PATH,
        &[
            ("x-krowoc-purge-token", "demo-purge-token-change-mE"),
            ("x-krowoc-invalidate", "tag=user:1"),
        ],
        b"",
    );
    assert_eq!(wrong.status, 403, "{}", wrong.text());
    let missing = stack.request(
        "POST",
        PURGE_PATH,
        &[("x-krowoc-invalidate", "tag=user:1")],
        b"",
    );
    assert_eq!(missing.status, 403);
    let get = stack.get(PURGE_PATH);
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST, PURGE"));
    let empty = stack.request(
        "POST",
        PURGE_PATH,
        &[("x-krowoc-purge-token", PURGE_TOKEN)],
        b"",
    );
    assert_eq!(empty.status, 400, "{}", empty.text());
    let bad = purge(&stack, "tag");
    assert_eq!(bad.status, 400);
    assert_eq!(x_cache(&stack.get(&user("1"))), "HIT", "nothing was purged");
    assert_eq!(
        upstream_calls(&stack),
        1,
        "the endpoint never reaches the upstream"
    );
}

krowoc_tests::on_both_hosts!(the_purge_endpoint_is_off_unless_configured);
fn the_purge_endpoint_is_off_unless_configured(host: Host) {
    let stack = stack_with(host, RELAY, Duration::ZERO, |cfg| {
        cfg.as_object_mut().expect("object").remove("cache");
    });
    let r = purge(&stack, "tag=user:1");
    assert_eq!(
        r.status, 404,
        "forwarded to the upstream, which has no such path"
    );
}

fn invalidation_header(host: Host, transport: &'static str) {
    let stack = stack(host, transport);
    fill(&stack, &["1", "2", "3"]);
    let r = stack.request(
        "POST",
        "/api/invalidate-cache",
        &[("content-type", "application/json")],
        br#"{"user_id": "1"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-krowoc-invalidate"), Some("tag=user:1"));
    // The response was held until the purge was done: a read right after it misses.
    assert_eq!(x_cache(&stack.get(&user("1"))), "MISS");
    assert_eq!(x_cache(&stack.get(&user("2"))), "HIT");
    assert_eq!(stack.metric("krowoc_cache_purges"), 1);
    let r = stack.request("POST", "/api/invalidate-cache", &[], b"");
    assert_eq!(
        r.header("x-krowoc-invalidate"),
        Some("route=/api/cached-data")
    );
    let left = entry_keys(&stack);
    // user 1's entry was stored again by the MISS above (off the response path).
    assert!(
        left.is_empty(),
        "the route purge was done before the response: {left:?}"
    );
    assert_eq!(x_cache(&stack.get(&user("3"))), "MISS");
}

krowoc_tests::on_both_hosts!(upstream_invalidation_header_purges_one_user_then_the_route_relay);
fn upstream_invalidation_header_purges_one_user_then_the_route_relay(host: Host) {
    invalidation_header(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: upstream_invalidation_header_purges_one_user_then_the_route_redis_call);
fn upstream_invalidation_header_purges_one_user_then_the_route_redis_call(host: Host) {
    invalidation_header(host, REDIS_CALL);
}

// ---- coalescing and stale serving ------------------------------------------------------------

fn concurrent_misses(host: Host, transport: &'static str) {
    let stack = stack_with(host, transport, Duration::from_millis(500), |_| {});
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let gateway = stack.gateway;
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                testkit::http::get(gateway, "/api/cached-data?user_id=7")
            })
        })
        .collect();
    let responses: Vec<Response> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, responses[0].body, "everyone gets the one fill");
    }
    assert_eq!(
        upstream_calls(&stack),
        1,
        "20 concurrent misses, 1 upstream call"
    );
    let outcomes: Vec<&str> = responses.iter().map(x_cache).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "MISS").count(),
        1,
        "{outcomes:?}"
    );
    assert!(stack.metric(&cache_metric("cached-data", "coalesced")) >= 1);
}

krowoc_tests::on_both_hosts!(twenty_concurrent_misses_make_one_upstream_call_relay);
fn twenty_concurrent_misses_make_one_upstream_call_relay(host: Host) {
    concurrent_misses(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: twenty_concurrent_misses_make_one_upstream_call_redis_call);
fn twenty_concurrent_misses_make_one_upstream_call_redis_call(host: Host) {
    concurrent_misses(host, REDIS_CALL);
}

/// Starts another gateway on the stack's Redis and relay whose `upstream` cluster is `upstream`.
fn gateway_to(stack: &Stack, upstream: SocketAddr) -> Gateway {
    stack.spawn_gateway(1, &[("upstream", upstream)])
}

fn stale_if_error(host: Host, transport: &'static str) {
    let stack = stack_with(host, transport, Duration::ZERO, |cfg| {
        *cached_data_policy(cfg) = json!({"ttl": "1s", "key": {"query": ["user_id"]},
                                          "honor_cache_control": false, "stale_if_error": "60s"});
    });
    let first = stack.get(&user("5"));
    wait_for_hit(&stack, &user("5"));
    std::thread::sleep(Duration::from_millis(1100));
    // A gateway whose upstream is down (nothing listens on the port).
    let dead = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
    let broken = gateway_to(&stack, dead);
    // The same Host as the first gateway's clients: the host is part of the key.
    let host = stack.gateway.to_string();
    let via_broken =
        |path: &str| testkit::http::request(broken.addr, "GET", path, &[("host", &host)], b"");
    let r = via_broken(&user("5"));
    assert_eq!(
        r.status,
        200,
        "stale copy instead of the 503: {} {:?}",
        r.text(),
        r.headers
    );
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.body, first.body);
    let status = r.header("cache-status").expect("Cache-Status");
    assert!(
        status.contains("fwd-status=503") && status.contains("detail=stale-if-error"),
        "{status}"
    );
    // A user never cached has no stale copy: the error passes through.
    let none = via_broken(&user("6"));
    assert_eq!(none.status, 503);
    // The healthy gateway refreshes the expired entry.
    let refreshed = stack.get(&user("5"));
    assert_eq!(x_cache(&refreshed), "EXPIRED");
    assert_eq!(upstream_calls(&stack), 2);
    drop(broken);
}

krowoc_tests::on_both_hosts!(stale_if_error_serves_the_stale_copy_when_the_upstream_is_down_relay);
fn stale_if_error_serves_the_stale_copy_when_the_upstream_is_down_relay(host: Host) {
    stale_if_error(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: stale_if_error_serves_the_stale_copy_when_the_upstream_is_down_redis_call);
fn stale_if_error_serves_the_stale_copy_when_the_upstream_is_down_redis_call(host: Host) {
    stale_if_error(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(stale_while_revalidate_serves_stale_and_refreshes_in_the_background);
fn stale_while_revalidate_serves_stale_and_refreshes_in_the_background(host: Host) {
    let stack = stack_with(host, RELAY, Duration::from_millis(300), |cfg| {
        *cached_data_policy(cfg) = json!({"ttl": "1s", "key": {"query": ["user_id"]},
                                          "honor_cache_control": false,
                                          "stale_while_revalidate": "30s"});
    });
    let first = stack.get(&user("8"));
    wait_for_hit(&stack, &user("8"));
    std::thread::sleep(Duration::from_millis(1100));
    let started = Instant::now();
    let stale = stack.get(&user("8"));
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "served without waiting for the slow upstream: {:?}",
        started.elapsed()
    );
    assert_eq!(x_cache(&stale), "STALE");
    assert_eq!(stale.body, first.body);
    assert!(
        eventually(Duration::from_secs(5), || upstream_calls(&stack) == 2),
        "one background refresh"
    );
    let fresh = wait_for_hit(&stack, &user("8"));
    assert_ne!(fresh.body, first.body, "the refreshed copy");
    assert_eq!(fresh.json()["call"], 2);
    assert_eq!(upstream_calls(&stack), 2, "refreshed once");
    assert!(stack.metric("krowoc_cache_revalidations") >= 1);
}

// ---- what is never stored, poisoning, corruption, outages -----------------------------------

krowoc_tests::on_both_hosts!(a_successful_unsafe_request_invalidates_its_url);
fn a_successful_unsafe_request_invalidates_its_url(host: Host) {
    let setup = OriginSetup::start(host, json!({"ttl": "60s"}));
    setup.get("/origin/public", &[]);
    assert!(eventually(Duration::from_secs(3), || {
        x_cache(&setup.get("/origin/public", &[])) == "HIT"
    }));
    let post = |status: u16| {
        setup.origin.post_status.store(status, Ordering::Relaxed);
        testkit::http::request(setup.gateway.addr, "POST", "/origin/public", &[], b"")
    };
    let failed = post(500);
    assert_eq!(failed.status, 500);
    assert_eq!(x_cache(&failed), "BYPASS");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        x_cache(&setup.get("/origin/public", &[])),
        "HIT",
        "a failed update invalidates nothing"
    );
    assert_eq!(post(204).status, 204);
    // RFC 9111 4.4: the POST's target URI is invalidated, before the POST's response goes on.
    assert_eq!(x_cache(&setup.get("/origin/public", &[])), "MISS");
}

krowoc_tests::on_both_hosts!(requests_with_credentials_bypass_the_cache);
fn requests_with_credentials_bypass_the_cache(host: Host) {
    let stack = stack(host, RELAY);
    for (name, value) in [
        ("authorization", "Bearer secret"),
        ("proxy-authorization", "Basic dXNlcjpwYXNz"),
        ("cookie", "session=1"),
    ] {
        let r = stack.request("GET", &user("9"), &[(name, value)], b"");
        assert_eq!(r.status, 200);
        assert_eq!(x_cache(&r), "BYPASS", "{name}");
        assert!(
            r.header("cache-status")
                .is_some_and(|s| s.contains("detail=authorized")),
            "{:?}",
            r.headers
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(entry_keys(&stack).is_empty(), "nothing stored for them");
    assert_eq!(x_cache(&stack.get(&user("9"))), "MISS");
}

krowoc_tests::on_both_hosts!(a_clients_cache_control_counts_only_when_the_route_honours_it);
fn a_clients_cache_control_counts_only_when_the_route_honours_it(host: Host) {
    for honour in [false, true] {
        let stack = stack_with(host, RELAY, Duration::ZERO, move |cfg| {
            cached_data_policy(cfg)["honor_request_cache_control"] = json!(honour);
        });
        assert_eq!(x_cache(&stack.get(&user("3"))), "MISS");
        wait_for_hit(&stack, &user("3"));
        let calls = upstream_calls(&stack);
        let fresh = stack.request("GET", &user("3"), &[("cache-control", "no-cache")], b"");
        assert_eq!(fresh.status, 200);
        let status = fresh.header("cache-status").unwrap_or_default().to_string();
        let no_store = stack.request("GET", &user("3"), &[("cache-control", "no-store")], b"");
        if !honour {
            assert_eq!(x_cache(&fresh), "HIT", "ignored by default: {status}");
            assert_eq!(x_cache(&no_store), "HIT");
            assert_eq!(upstream_calls(&stack), calls);
            continue;
        }
        assert_eq!(x_cache(&fresh), "MISS", "{status}");
        assert!(
            status.contains("fwd=request") && status.contains("stored"),
            "{status}"
        );
        assert_eq!(x_cache(&no_store), "BYPASS");
        assert!(
            no_store
                .header("cache-status")
                .is_some_and(|s| s.contains("fwd=request") && s.contains("detail=no-store")),
            "{:?}",
            no_store.headers
        );
        assert_eq!(upstream_calls(&stack), calls + 2, "both went upstream");
        // The no-cache answer (its body names its upstream call) replaces the entry.
        let replaced = eventually(Duration::from_secs(5), || {
            let r = stack.get(&user("3"));
            x_cache(&r) == "HIT" && r.body == fresh.body
        });
        assert!(replaced, "the entry is the no-cache request's answer");
        assert_eq!(upstream_calls(&stack), calls + 2);
    }
}

krowoc_tests::on_both_hosts!(a_full_redis_keeps_serving_cache_hits_while_rate_limits_fail_open);
fn a_full_redis_keeps_serving_cache_hits_while_rate_limits_fail_open(host: Host) {
    let stack = stack_with(host, RELAY, Duration::ZERO, |cfg| {
        let route = krowoc_tests::route_named(cfg, "rate-limited");
        // fixed_window writes before it decides: a full Redis refuses it with OOM.
        route["rate_limit"]["limits"] = json!([{"name": "per_minute", "limit": 100, "window": "60s", "algorithm": "fixed_window"}]);
    });
    wait_for_hit(&stack, &user("5"));
    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        assert_eq!(stack.redis.cli(&["CONFIG", "SET", k, v]), "OK");
    }
    // More OOM answers than the breaker's `failures` (5).
    for _ in 0..10 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "failure_mode allow");
        assert!(
            r.header("ratelimit").is_none(),
            "not decided by Redis: {:?}",
            r.headers
        );
    }
    assert_eq!(
        stack.metric("krowoc_redis_breaker_opened"),
        0,
        "OOM does not open the breaker"
    );
    let hit = stack.get(&user("5"));
    assert_eq!(
        x_cache(&hit),
        "HIT",
        "hits are still served: {:?}",
        hit.headers
    );
    assert_eq!(stack.redis.cli(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
}

/// A test origin: `/origin/<kind>` answers as `kind` says; calls are counted.
#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicU64>,
    /// Status `/origin/flaky` answers (200 until changed).
    flaky_status: Arc<AtomicU16>,
    /// Status a POST answers (200 until changed).
    post_status: Arc<AtomicU16>,
}

async fn origin_post(State(o): State<Origin>) -> StatusCode {
    let s = o.post_status.load(Ordering::Relaxed);
    StatusCode::from_u16(if s == 0 { 200 } else { s }).unwrap_or(StatusCode::OK)
}

async fn origin_handler(
    State(o): State<Origin>,
    Path(kind): Path<String>,
    headers: HeaderMap,
) -> AxumResponse {
    let call = o.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let mut fields: Vec<(&str, String)> = vec![("cache-control", "public, max-age=60".into())];
    let mut status = StatusCode::OK;
    let mut body = format!("{kind} call {call}");
    match kind.as_str() {
        "public" => fields.push(("etag", "\"v1\"".into())),
        "envoy-fields" => {
            // What Envoy's router adds to an upstream's answer, and one the upstream made up.
            fields.push(("x-envoy-upstream-service-time", "1025".into()));
            fields.push(("x-envoy-foo", "bar".into()));
        }
        "private" => fields[0].1 = "private, max-age=60".into(),
        "no-store" => fields[0].1 = "no-store".into(),
        "set-cookie" => fields.push(("set-cookie", format!("session={call}"))),
        "vary" => {
            let host = headers
                .get("x-forwarded-host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("origin.example");
            body = format!("<a href=\"https://{host}/\">call {call}</a>");
            fields.push(("vary", "X-Forwarded-Host".into()));
        }
        "big" => {
            // 1 MiB, every byte position-dependent, so any reordering or loss shows.
            let big: String = (0..BIG_BODY_BYTES)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            body = big;
        }
        "flaky" => {
            let s = o.flaky_status.load(Ordering::Relaxed);
            status = StatusCode::from_u16(if s == 0 { 200 } else { s }).unwrap_or(StatusCode::OK);
        }
        _ => status = StatusCode::NOT_FOUND,
    }
    let mut resp = (status, body).into_response();
    for (k, v) in fields {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

const BIG_BODY_BYTES: usize = 1024 * 1024;

/// A stack whose plugin caches `/origin/` too, and a gateway in front of a test origin.
struct OriginSetup {
    stack: Stack,
    origin: Origin,
    gateway: Gateway,
}

impl OriginSetup {
    fn start(host: Host, policy: Value) -> OriginSetup {
        OriginSetup::start_with(host, RELAY, policy)
    }

    fn start_with(host: Host, transport: &'static str, policy: Value) -> OriginSetup {
        let stack = stack_with(host, transport, Duration::ZERO, move |cfg| {
            let routes = cfg["routes"].as_array_mut().expect("routes");
            routes
                .push(json!({"name": "origin", "match": {"prefix": "/origin/"}, "cache": policy}));
        });
        let origin = Origin::default();
        let addr = stack.runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind origin");
            let addr = listener.local_addr().expect("origin addr");
            let app = Router::new()
                .route("/origin/{kind}", get(origin_handler).post(origin_post))
                .with_state(origin.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            addr
        });
        let gateway = gateway_to(&stack, addr);
        OriginSetup {
            stack,
            origin,
            gateway,
        }
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        testkit::http::request(self.gateway.addr, "GET", path, headers, b"")
    }

    fn calls(&self) -> u64 {
        self.origin.calls.load(Ordering::Relaxed)
    }
}

krowoc_tests::on_both_hosts!(private_no_store_set_cookie_and_unkeyed_vary_responses_are_not_stored);
fn private_no_store_set_cookie_and_unkeyed_vary_responses_are_not_stored(host: Host) {
    let setup = OriginSetup::start(host, json!({"ttl": "60s"}));
    for (kind, reason) in [
        ("private", "private"),
        ("no-store", "no-store"),
        ("set-cookie", "set-cookie"),
        ("vary", "vary-unkeyed"),
    ] {
        let path = format!("/origin/{kind}");
        let before = setup.calls();
        for _ in 0..2 {
            let r = setup.get(&path, &[]);
            assert_eq!(r.status, 200, "{kind}: {}", r.text());
            assert_eq!(x_cache(&r), "MISS", "{kind}");
            let status = r.header("cache-status").unwrap_or("");
            assert!(
                status.contains(&format!("detail={reason}")),
                "{kind}: {status}"
            );
            assert!(!status.contains("stored"), "{kind}: {status}");
            std::thread::sleep(Duration::from_millis(150));
        }
        assert_eq!(setup.calls() - before, 2, "{kind}: both went upstream");
    }
    assert!(
        entry_keys(&setup.stack).is_empty(),
        "{:?}",
        entry_keys(&setup.stack)
    );
    // The public one is stored, as a control.
    setup.get("/origin/public", &[]);
    assert!(eventually(Duration::from_secs(3), || {
        x_cache(&setup.get("/origin/public", &[])) == "HIT"
    }));
}

krowoc_tests::on_both_hosts!(poisoned_unkeyed_headers_do_not_change_what_others_get);
fn poisoned_unkeyed_headers_do_not_change_what_others_get(host: Host) {
    let setup = OriginSetup::start(host, json!({"ttl": "60s"}));
    // An origin that varies on the header says so: the attacker's copy is not stored.
    let attack = setup.get("/origin/vary", &[("x-forwarded-host", "evil.example")]);
    assert!(attack.text().contains("evil.example"));
    std::thread::sleep(Duration::from_millis(200));
    let victim = setup.get("/origin/vary", &[]);
    assert!(!victim.text().contains("evil"), "{}", victim.text());
    // The host is part of the key: a request for another host fills another entry.
    let other_host = setup.get("/origin/public", &[("host", "evil.example")]);
    assert_eq!(x_cache(&other_host), "MISS");
    std::thread::sleep(Duration::from_millis(200));
    let mine = setup.get("/origin/public", &[]);
    assert_eq!(x_cache(&mine), "MISS", "not the other host's entry");
    // Unkeyed fields neither split nor replace an entry: others keep getting the stored copy.
    let stack = &setup.stack;
    stack.get(&user("1"));
    let clean = wait_for_hit(stack, &user("1"));
    for (name, value) in [
        ("x-forwarded-host", "evil.example"),
        ("x-original-url", "/admin"),
        ("x-forwarded-scheme", "nothttp"),
    ] {
        let r = stack.request("GET", &user("1"), &[(name, value)], b"");
        assert_eq!(x_cache(&r), "HIT", "{name}");
        assert_eq!(r.body, clean.body);
    }
    assert_eq!(stack.get(&user("1")).body, clean.body);
    assert_eq!(upstream_calls(stack), 1);
}

krowoc_tests::on_both_hosts!(a_hit_carries_no_envoy_header_from_the_stored_response);
fn a_hit_carries_no_envoy_header_from_the_stored_response(host: Host) {
    let setup = OriginSetup::start(host, json!({"ttl": "60s"}));
    let envoy_fields = |r: &Response| -> Vec<(String, String)> {
        r.headers
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-envoy-"))
            .cloned()
            .collect()
    };
    let miss = setup.get("/origin/envoy-fields", &[]);
    assert_eq!(x_cache(&miss), "MISS");
    // The origin's 1025 on host-shim; Envoy's router writes its own measurement.
    assert!(
        miss.header("x-envoy-upstream-service-time").is_some(),
        "the miss passes the upstream's fields on: {:?}",
        miss.headers
    );
    assert_eq!(miss.header("x-envoy-foo"), Some("bar"));
    let mut hit = None;
    assert!(eventually(Duration::from_secs(3), || {
        let r = setup.get("/origin/envoy-fields", &[]);
        let is_hit = x_cache(&r) == "HIT";
        hit = Some(r);
        is_hit
    }));
    let hit = hit.expect("at least one request");
    assert_eq!(hit.body, miss.body);
    let replayed = envoy_fields(&hit);
    assert!(replayed.is_empty(), "replayed from the miss: {replayed:?}");
    assert_eq!(setup.calls(), 1);
}

krowoc_tests::on_both_hosts!(conditional_requests_on_a_hit_get_304);
fn conditional_requests_on_a_hit_get_304(host: Host) {
    let setup = OriginSetup::start(host, json!({"ttl": "60s"}));
    setup.get("/origin/public", &[]);
    assert!(eventually(Duration::from_secs(3), || {
        x_cache(&setup.get("/origin/public", &[])) == "HIT"
    }));
    let r = setup.get("/origin/public", &[("if-none-match", "\"v1\"")]);
    assert_eq!(r.status, 304, "{:?}", r.headers);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(x_cache(&r), "HIT");
    let r = setup.get("/origin/public", &[("if-none-match", "\"v2\"")]);
    assert_eq!(r.status, 200);
    assert_eq!(setup.calls(), 1);
}

krowoc_tests::on_both_hosts!(
    a_flaky_upstreams_5xx_is_replaced_by_the_stale_copy_within_stale_if_error
);
fn a_flaky_upstreams_5xx_is_replaced_by_the_stale_copy_within_stale_if_error(host: Host) {
    let setup = OriginSetup::start(
        host,
        json!({"ttl": "1s", "honor_cache_control": false,
                                          "stale_if_error": "30s"}),
    );
    let good = setup.get("/origin/flaky", &[]);
    assert!(eventually(Duration::from_secs(3), || {
        x_cache(&setup.get("/origin/flaky", &[])) == "HIT"
    }));
    std::thread::sleep(Duration::from_millis(1100));
    setup.origin.flaky_status.store(502, Ordering::Relaxed);
    let r = setup.get("/origin/flaky", &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(r.body, good.body);
    // A 4xx is an answer, not an error: it passes.
    setup.origin.flaky_status.store(404, Ordering::Relaxed);
    assert_eq!(setup.get("/origin/flaky", &[]).status, 404);
}

krowoc_tests::on_host_shim_only!(redis_call: a_one_mebibyte_body_is_stored_and_served_whole);
fn a_one_mebibyte_body_is_stored_and_served_whole(host: Host) {
    // redis_call: the relay's default 1 MiB body cap would refuse a 1 MiB store.
    let setup = OriginSetup::start_with(
        host,
        REDIS_CALL,
        json!({"ttl": "60s", "max_body_bytes": 2_000_000}),
    );
    let miss = setup.get("/origin/big", &[]);
    assert_eq!(miss.status, 200);
    assert_eq!(miss.body.len(), BIG_BODY_BYTES);
    assert_eq!(x_cache(&miss), "MISS");
    assert!(eventually(Duration::from_secs(5), || {
        x_cache(&setup.get("/origin/big", &[])) == "HIT"
    }));
    let started = Instant::now();
    let hit = setup.get("/origin/big", &[]);
    let took = started.elapsed();
    assert_eq!(x_cache(&hit), "HIT");
    assert!(
        hit.body == miss.body,
        "the stored megabyte comes back unchanged"
    );
    assert_eq!(setup.calls(), 1);
    // A regression guard against quadratic copying, not a benchmark: linear is milliseconds.
    assert!(took < Duration::from_secs(2), "a 1 MiB hit took {took:?}");
    // Beyond max_body_bytes a response passes but is not stored.
    let small = OriginSetup::start_with(
        host,
        REDIS_CALL,
        json!({"ttl": "60s", "max_body_bytes": 1000}),
    );
    let r = small.get("/origin/big", &[]);
    assert_eq!(r.body.len(), BIG_BODY_BYTES);
    assert!(r
        .header("cache-status")
        .is_some_and(|s| s.contains("detail=too-large")));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(x_cache(&small.get("/origin/big", &[])), "MISS");
}

krowoc_tests::on_both_hosts!(a_corrupted_entry_is_a_miss_and_is_replaced);
fn a_corrupted_entry_is_a_miss_and_is_replaced(host: Host) {
    let stack = stack(host, RELAY);
    stack.get(&user("3"));
    let clean = wait_for_hit(&stack, &user("3"));
    let keys = entry_keys(&stack);
    assert_eq!(keys.len(), 1);
    // Damaged fields behind a valid version tag: the filter's decoder refuses them.
    stack
        .redis
        .cli(&["HSET", &keys[0], "v", "KRC1\u{1}\u{2}garbage"]);
    let r = stack.get(&user("3"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.json()["user_id"], "3");
    assert!(stack.metric(&cache_metric("cached-data", "corrupt")) >= 1);
    // Until the replacement lands, requests still find the unreadable entry and go upstream.
    let again = wait_for_hit(&stack, &user("3"));
    let call = again.json()["call"].as_u64().unwrap_or(0);
    assert!(call >= 2, "re-stored from the upstream: call {call}");
    assert_eq!(again.json()["user_id"], "3");
    // Not a hash at all.
    let keys = entry_keys(&stack);
    stack.redis.cli(&["SET", &keys[0], "not an entry"]);
    assert_eq!(x_cache(&stack.get(&user("3"))), "MISS");
    wait_for_hit(&stack, &user("3"));
    assert_ne!(clean.body, again.body);
}

fn redis_outage(host: Host, transport: &'static str) {
    let mut stack = stack_with(host, transport, Duration::ZERO, |cfg| {
        cfg["redis"]["timeout"] = json!("200ms");
        cfg["redis"]["breaker"] = json!({"failures": 2, "cooldown": "500ms"});
    });
    stack.get(&user("1"));
    wait_for_hit(&stack, &user("1"));
    stack.redis.stop();
    // A response held for its purge goes on when the purge fails.
    let started = Instant::now();
    let r = stack.request("POST", "/api/invalidate-cache", &[], br#"{"user_id": "1"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-krowoc-invalidate"), Some("tag=user:1"));
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stack.metric("krowoc_cache_purge_failures"), 1);
    for _ in 0..6 {
        let started = Instant::now();
        let r = stack.get(&user("1"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["user_id"], "1");
        assert_eq!(x_cache(&r), "BYPASS");
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(stack.metric(&cache_metric("cached-data", "bypass")) >= 6);
    assert!(stack.metric(&cache_metric("cached-data", "redis_errors")) >= 6);
    stack.redis.restart();
    // Redis restarted empty: the cache fills again once the breaker closes.
    assert!(eventually(Duration::from_secs(10), || {
        x_cache(&stack.get(&user("1"))) == "HIT"
    }));
}

krowoc_tests::on_both_hosts!(redis_killed_requests_are_still_answered_by_the_upstream_relay);
fn redis_killed_requests_are_still_answered_by_the_upstream_relay(host: Host) {
    redis_outage(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: redis_killed_requests_are_still_answered_by_the_upstream_redis_call);
fn redis_killed_requests_are_still_answered_by_the_upstream_redis_call(host: Host) {
    redis_outage(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(stores_the_relay_refuses_do_not_open_the_breaker_for_the_rate_limits);
/// A store the relay refuses (413: over its body cap) is a store failure and says nothing about
/// Redis' health: the breaker stays closed and the rate limits still decide through Redis.
fn stores_the_relay_refuses_do_not_open_the_breaker_for_the_rate_limits(host: Host) {
    let stack = Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(|cfg: &mut Value| {
            use_transport(cfg, RELAY);
            cfg["redis"]["timeout"] = json!("1s");
            cfg["redis"]["breaker"] = json!({"failures": 2, "cooldown": "60s"});
            // Small flushes, so that events get through the small cap below.
            cfg["events"]["batch_size"] = json!(4);
            // A cached route whose answers grow with the events the upstream has seen.
            let recent = json!({"name": "recent", "match": {"path": "/api/recent-events"},
                "cache": {"ttl": "60s", "honor_cache_control": false,
                          "key": {"query": ["limit"]}}});
            cfg["routes"].as_array_mut().unwrap().insert(0, recent);
        })),
        // Scripts, lookups, rate-limit calls and flushes of 4 events fit; 40 events do not.
        relay_max_body_bytes: Some(8 * 1024),
        ..StackOptions::default()
    });
    for _ in 0..40 {
        assert_eq!(stack.get("/health").status, 200);
    }
    let big = "/api/recent-events?limit=200";
    assert!(
        eventually(Duration::from_secs(5), || {
            testkit::http::get(stack.upstream, big).body.len() > 12 * 1024
        }),
        "the upstream's subscriber saw the events"
    );
    // Concurrent misses on four keys: their lookups answer first, then their stores are refused
    // one after another (consecutive failures, what opens a breaker).
    let gateway = stack.gateway;
    let answers: Vec<_> = (200..204)
        .map(|limit| {
            std::thread::spawn(move || {
                testkit::http::get(gateway, &format!("/api/recent-events?limit={limit}"))
            })
        })
        .collect();
    for answer in answers {
        let r = answer.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(x_cache(&r), "MISS");
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            stack.metric(&cache_metric("recent", "store_failures")) == 4
        }),
        "{}",
        stack.metrics()
    );
    assert_eq!(stack.metric("krowoc_redis_breaker_opened"), 0);
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ratelimit"), Some("\"per_minute\";r=4;t=60"));
    assert_eq!(stack.metric("krowoc_rate_limit_rate_limited_allowed"), 1);
    assert_eq!(
        stack.metric("krowoc_rate_limit_rate_limited_fallback_allowed"),
        0
    );
}
