//! The filter end to end on a Redis Cluster (3 masters on loopback), through the relay's
//! `--redis-cluster` mode: one limit shared by two gateways, the cache's store, hit and every
//! kind of purge, and events on the stream, with the filter's keys spread over the masters.

use krowoc_relay::cluster::key_slot;
use krowoc_tests::{eventually, Host, Stack, StackOptions};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

fn cluster_stack(host: Host, transport: &'static str, acl_user: bool, tls: bool) -> Stack {
    Stack::start_with(StackOptions {
        host,
        filter_acl_user: acl_user,
        redis_tls: tls,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            krowoc_tests::use_transport(cfg, transport);
            cfg["redis"]["timeout"] = json!("1s");
            // A limit per client, so that the limits of many clients spread over the masters.
            let per_client = json!({"name": "per-client", "match": {"path": "/api/slow-limited"},
                "rate_limit": {"limits": [{"limit": 2, "window": "5m"}],
                               "key": [{"query": "client"}]}});
            let routes = cfg["routes"].as_array_mut().expect("routes");
            routes.retain(|r| r["name"] != "slow-limited");
            routes.insert(0, per_client);
            // A second cached route whose slot is on another master than cached-data's
            // (redis-cli gives 3 masters the ranges 0-5460, 5461-10922, 10923-16383).
            let third = |name: &str| key_slot(name.as_bytes()) / 5461;
            let other = (0..)
                .map(|i| format!("cached-health-{i}"))
                .find(|n| third(n) != third("cached-data"))
                .expect("a name");
            routes.insert(
                0,
                json!({"name": other, "match": {"path": "/health"},
                       "cache": {"ttl": "60s", "honor_cache_control": false}}),
            );
        })),
        redis_cluster: true,
        ..StackOptions::default()
    })
}

/// The keys matching `pattern` on each master of the stack's cluster.
fn keys_per_master(stack: &Stack, pattern: &str) -> Vec<Vec<String>> {
    let cluster = stack.cluster.as_ref().expect("a cluster stack");
    cluster
        .masters()
        .iter()
        .map(|&m| {
            let keys = cluster.node(m).cli(&["KEYS", pattern]);
            keys.lines()
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

krowoc_tests::on_both_hosts!(the_filter_works_on_a_redis_cluster_relay);
fn the_filter_works_on_a_redis_cluster_relay(host: Host) {
    the_filter_works_on_a_cluster(host, "relay", false, false);
}

krowoc_tests::on_both_hosts!(the_filter_works_on_a_redis_cluster_over_tls_relay);
fn the_filter_works_on_a_redis_cluster_over_tls_relay(host: Host) {
    the_filter_works_on_a_cluster(host, "relay", false, true);
}

// The `redis` cluster has an Envoy TLS transport_socket too.
krowoc_tests::on_host_shim_only!(redis_call: the_filter_works_on_a_redis_cluster_over_tls_redis_call);
fn the_filter_works_on_a_redis_cluster_over_tls_redis_call(host: Host) {
    the_filter_works_on_a_cluster(host, "redis_call", false, true);
}

krowoc_tests::on_both_hosts!(the_filter_works_on_a_redis_cluster_as_its_acl_user_relay);
fn the_filter_works_on_a_redis_cluster_as_its_acl_user_relay(host: Host) {
    the_filter_works_on_a_cluster(host, "relay", true, false);
}

// The `redis` cluster is an `envoy.clusters.redis` cluster (its seeds the cluster's masters),
// which Envoy loads too; only host-shim makes Redis calls.
krowoc_tests::on_host_shim_only!(redis_call: the_filter_works_on_a_redis_cluster_redis_call);
fn the_filter_works_on_a_redis_cluster_redis_call(host: Host) {
    the_filter_works_on_a_cluster(host, "redis_call", true, false);
}

/// How many commands, keys and channels Redis's ACL denied on the cluster's masters.
fn acl_denied(stack: &Stack) -> i64 {
    let cluster = stack.cluster.as_ref().expect("cluster");
    cluster
        .masters()
        .iter()
        .map(|&m| krowoc_tests::acl_denied_on(cluster.node(m)))
        .sum()
}

fn the_filter_works_on_a_cluster(host: Host, transport: &'static str, acl_user: bool, tls: bool) {
    let mut stack = cluster_stack(host, transport, acl_user, tls);
    let (second, _) = stack.start_gateway(2);

    // One limit for both gateways, decided in the cluster.
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
    // 30 clients' limits, each in its own slot: spread over the masters, each exact.
    for client in 0..30 {
        let path = format!("/api/slow-limited?client=c{client}");
        let statuses: Vec<u16> = (0..3)
            .map(|i| match i % 2 {
                0 => stack.get(&path).status,
                _ => testkit::http::get(second, &path).status,
            })
            .collect();
        assert_eq!(statuses, vec![200, 200, 429], "client c{client}");
    }
    let limits: Vec<usize> = keys_per_master(&stack, "krowoc:rl:*")
        .iter()
        .map(Vec::len)
        .collect();
    assert!(
        limits.iter().all(|&n| n > 0),
        "rate-limit keys not on every master: {limits:?}"
    );

    // The cache: misses stored, then served. A route's cache lives in one slot (its hash tag),
    // so one script stores an entry and its indexes together.
    let ids: Vec<String> = (1..=24).map(|i| i.to_string()).collect();
    for id in &ids {
        let miss = stack.get(&format!("/api/cached-data?user_id={id}"));
        assert_eq!(miss.header("x-cache"), Some("MISS"), "{:?}", miss.headers);
    }
    for id in &ids {
        stack.wait_for_hit(&format!("/api/cached-data?user_id={id}"));
    }
    let entries = keys_per_master(&stack, "krowoc:c:*:e:*");
    let spread: Vec<usize> = entries.iter().map(Vec::len).collect();
    assert_eq!(spread.iter().sum::<usize>(), ids.len(), "{spread:?}");
    assert_eq!(
        spread.iter().filter(|&&n| n > 0).count(),
        1,
        "a route's entries on one master: {spread:?}"
    );
    // The other cached route's entry, on another master.
    assert_eq!(stack.get("/health").header("x-cache"), Some("MISS"));
    stack.wait_for_hit("/health");
    let entries = keys_per_master(&stack, "krowoc:c:*:e:*");
    let spread: Vec<usize> = entries.iter().map(Vec::len).collect();
    assert_eq!(
        spread.iter().filter(|&&n| n > 0).count(),
        2,
        "two routes' entries on two masters: {spread:?}"
    );

    // Purges by tag, URL, pattern and route.
    assert_eq!(stack.purge("tag=user:1")["purged"], 1);
    assert_eq!(stack.purge("url=/api/cached-data?user_id=2")["purged"], 1);
    assert_eq!(
        stack.purge("pattern=/api/cached-data?user_id=3*")["purged"],
        1
    );
    assert_eq!(
        stack.purge("pattern=/api/cached-data?user_id=1?")["purged"],
        10
    );
    for gone in ["1", "2", "3", "10", "15", "19"] {
        let r = stack.get(&format!("/api/cached-data?user_id={gone}"));
        assert_eq!(
            r.header("x-cache"),
            Some("MISS"),
            "user {gone}: {:?}",
            r.headers
        );
    }
    let r = stack.get("/api/cached-data?user_id=20");
    assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
    // A pattern over both routes scans both masters.
    assert_eq!(stack.purge("pattern=/health")["purged"], 1);
    assert_eq!(stack.get("/health").header("x-cache"), Some("MISS"));
    stack.purge("route=/api/cached-data");
    let r = stack.get("/api/cached-data?user_id=21");
    assert_eq!(r.header("x-cache"), Some("MISS"), "{:?}", r.headers);

    // Events reach the stream (in one slot: on one master).
    let streamed = eventually(WAIT, || {
        let cluster = stack.cluster.as_ref().expect("cluster");
        let owner = cluster.owner_of("krowoc:events");
        cluster.node(owner).int(&["XLEN", "krowoc:events"]) > 0
    });
    assert!(streamed, "no event reached the stream");
    assert_eq!(
        stack.metric("krowoc_redis_errors"),
        0,
        "{}",
        stack.metrics()
    );
    if acl_user {
        let (user, _) = krowoc_tests::FILTER_ACL_USER;
        let cluster = stack.cluster.as_ref().expect("cluster");
        for m in cluster.masters() {
            let clients = cluster.node(m).cli(&["CLIENT", "LIST"]);
            assert!(
                clients.contains(&format!(" user={user} ")),
                "nothing logged in to master {m} as {user}:\n{clients}"
            );
        }
        assert_eq!(acl_denied(&stack), 0, "Redis's ACL denied commands");
    }
}
