//! The filter end to end as its least-privilege Redis ACL user (`krowoc_relay::acl`, the
//! `ACL SETUSER` line of the README): the relay, and transport `redis_call`, log in as
//! `krowoc-edge`, allowed only the filter's commands, keys under `krowoc:` and the
//! `krowoc:requests` channel. Rate limits, cache store and hit, purges (by tag, URL, pattern and
//! route) and events all work and Redis denies nothing; a key outside what the user may touch is
//! refused by Redis (NOPERM), reported, and not sent again and again.

use krowoc_tests::{eventually, Host, Stack, StackOptions, FILTER_ACL_USER};
use serde_json::{json, Value};
use std::time::Duration;

const RELAY: &str = "relay";
const REDIS_CALL: &str = "redis_call";
const STREAM: &str = "krowoc:events";
const WAIT: Duration = Duration::from_secs(5);

fn use_transport(cfg: &mut Value, transport: &str) {
    krowoc_tests::use_transport(cfg, transport);
    // A busy test machine must not turn a slow answer into a fallback.
    cfg["redis"]["timeout"] = json!("1s");
}

fn acl_stack(host: Host, transport: &'static str) -> Stack {
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            use_transport(cfg, transport)
        })),
        filter_acl_user: true,
        ..StackOptions::default()
    })
}

/// How many commands, keys and channels Redis's ACL denied.
fn acl_denied(stack: &Stack) -> i64 {
    krowoc_tests::acl_denied_on(&stack.redis)
}

fn the_filter_works_as_its_acl_user(host: Host, transport: &'static str) {
    let stack = acl_stack(host, transport);
    let (user, _) = FILTER_ACL_USER;

    // Rate limit: five allowed, the sixth refused, decided in Redis.
    for i in 0..5 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "request {}: {}", i + 1, r.text());
        assert!(r.header("ratelimit").is_some(), "{:?}", r.headers);
    }
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 429, "{}", r.text());

    // Cache: a miss is stored, then served.
    for id in ["1", "2", "3", "4"] {
        let miss = stack.get(&format!("/api/cached-data?user_id={id}"));
        assert_eq!(miss.header("x-cache"), Some("MISS"), "{:?}", miss.headers);
    }
    for id in ["1", "2", "3", "4"] {
        stack.wait_for_hit(&format!("/api/cached-data?user_id={id}"));
    }

    // Purges: by tag, URL, pattern (SCAN in a script) and route.
    assert_eq!(stack.purge("tag=user:1")["purged"], 1);
    assert_eq!(stack.purge("url=/api/cached-data?user_id=2")["purged"], 1);
    assert_eq!(
        stack.purge("pattern=/api/cached-data?user_id=3*")["purged"],
        1
    );
    assert_eq!(stack.purge("route=/api/cached-data")["purged"], 1);
    let miss = stack.get("/api/cached-data?user_id=4");
    assert_eq!(miss.header("x-cache"), Some("MISS"), "{:?}", miss.headers);

    // Events: published on the channel (the upstream's subscriber, as `default`, gets them)
    // and added to the stream.
    let delivered = eventually(WAIT, || {
        let recent = stack.get("/api/recent-events?channel=krowoc:requests&limit=100");
        let published = recent.json()["events"]
            .as_array()
            .is_some_and(|e| !e.is_empty());
        let streamed = stack.redis.int(&["XLEN", STREAM]) > 0;
        published && streamed
    });
    assert!(delivered, "no event reached the channel and the stream");

    // It all ran as the ACL user, and Redis refused nothing.
    let clients = stack.redis.cli(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!(" user={user} "))),
        "nothing logged in as {user}:\n{clients}"
    );
    assert_eq!(
        acl_denied(&stack),
        0,
        "ACL LOG:\n{}",
        stack.redis.cli(&["ACL", "LOG"])
    );
}

krowoc_tests::on_both_hosts!(the_filter_works_as_its_acl_user_relay);
fn the_filter_works_as_its_acl_user_relay(host: Host) {
    the_filter_works_as_its_acl_user(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: the_filter_works_as_its_acl_user_redis_call);
fn the_filter_works_as_its_acl_user_redis_call(host: Host) {
    the_filter_works_as_its_acl_user(host, REDIS_CALL);
}

fn keys_outside_the_users_pattern_are_refused_reported_and_not_retried(
    host: Host,
    transport: &'static str,
) {
    let stack = acl_stack(host, transport);
    let (user, _) = FILTER_ACL_USER;
    // The user may no longer touch the filter's keys, nor publish on its channel.
    let reply = stack.redis.cli(&[
        "ACL",
        "SETUSER",
        user,
        "resetkeys",
        "~elsewhere:*",
        "resetchannels",
    ]);
    assert_eq!(reply, "OK");

    // Rate limits fail open (the route's default), each request answered at once.
    for _ in 0..8 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The cache bypasses: every request goes upstream, nothing is stored.
    let r = stack.get("/api/cached-data?user_id=1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.header("x-cache"), Some("HIT"));
    assert_eq!(stack.redis.int(&["DBSIZE"]), 0, "nothing may be written");

    // Reported: Redis errors counted, the refusals in Redis's ACL LOG.
    assert!(
        eventually(WAIT, || stack.metric("krowoc_redis_errors") >= 8),
        "krowoc_redis_errors = {}",
        stack.metric("krowoc_redis_errors")
    );
    let log = stack.redis.cli(&["ACL", "LOG"]);
    assert!(log.contains(user), "{log}");
    // Events refused so are dropped, not queued again.
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_dropped")
            + stack.metric("krowoc_events_rejected")
            > 0),
        "events neither dropped nor rejected:\n{}",
        stack.metrics()
    );

    // Not retried: once traffic stops, Redis sees no more refused commands.
    std::thread::sleep(Duration::from_millis(800));
    let settled = acl_denied(&stack);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(acl_denied(&stack), settled, "refused commands keep coming");
}

krowoc_tests::on_both_hosts!(keys_outside_the_users_pattern_are_refused_relay);
fn keys_outside_the_users_pattern_are_refused_relay(host: Host) {
    keys_outside_the_users_pattern_are_refused_reported_and_not_retried(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: keys_outside_the_users_pattern_are_refused_redis_call);
fn keys_outside_the_users_pattern_are_refused_redis_call(host: Host) {
    keys_outside_the_users_pattern_are_refused_reported_and_not_retried(host, REDIS_CALL);
}
