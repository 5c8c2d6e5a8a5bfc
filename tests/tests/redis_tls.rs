//! The filter's whole production path to Redis at once: TLS with client certificates (mutual
//! TLS) and the least-privilege ACL user. The relay connects with `rediss://`, a CA and a client
//! certificate; transport `redis_call` goes through a TLS `transport_socket` on envoy.yaml's
//! `redis` cluster (host-shim). Redis is reached on its TLS port only.

use krowoc_tests::{eventually, Host, Stack, StackOptions};
use serde_json::{json, Value};
use std::time::Duration;

const RELAY: &str = "relay";
const REDIS_CALL: &str = "redis_call";

fn tls_stack(host: Host, transport: &'static str) -> Stack {
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            let redis = cfg["redis"].as_object_mut().expect("redis is an object");
            redis.insert("transport".into(), json!(transport));
            if transport == REDIS_CALL {
                redis.insert("cluster".into(), json!("redis"));
                redis.remove("token");
            }
            redis.insert("timeout".into(), json!("1s"));
        })),
        redis_tls: true,
        filter_acl_user: true,
        ..StackOptions::default()
    })
}

fn limits_cache_and_events_over_mutual_tls_as_the_acl_user(host: Host, transport: &'static str) {
    let stack = tls_stack(host, transport);
    for i in 0..5 {
        let r = stack.get("/api/rate-limited");
        assert_eq!(r.status, 200, "request {}: {}", i + 1, r.text());
        assert!(r.header("ratelimit").is_some(), "{:?}", r.headers);
    }
    assert_eq!(stack.get("/api/rate-limited").status, 429);

    let miss = stack.get("/api/cached-data?user_id=7");
    assert_eq!(miss.header("x-cache"), Some("MISS"), "{:?}", miss.headers);
    let hit = eventually(Duration::from_secs(5), || {
        stack.get("/api/cached-data?user_id=7").header("x-cache") == Some("HIT")
    });
    assert!(hit, "never a cache hit over TLS");

    let streamed = eventually(Duration::from_secs(5), || {
        stack.redis.int(&["XLEN", "krowoc:events"]) > 0
    });
    assert!(streamed, "no event reached the stream over TLS");
    assert_eq!(stack.metric("krowoc_redis_errors"), 0);
}

krowoc_tests::on_both_hosts!(limits_cache_and_events_over_mutual_tls_relay);
fn limits_cache_and_events_over_mutual_tls_relay(host: Host) {
    limits_cache_and_events_over_mutual_tls_as_the_acl_user(host, RELAY);
}

krowoc_tests::on_host_shim_only!(redis_call: limits_cache_and_events_over_mutual_tls_redis_call);
fn limits_cache_and_events_over_mutual_tls_redis_call(host: Host) {
    limits_cache_and_events_over_mutual_tls_as_the_acl_user(host, REDIS_CALL);
}

krowoc_tests::on_host_shim_only!(redis_call: a_redis_cluster_trusting_another_ca_is_refused);
/// A gateway whose `redis` cluster trusts another CA than the one that signed Redis's
/// certificate: host-shim refuses the server, the rate limit fails open, the failures are
/// counted.
fn a_redis_cluster_trusting_another_ca_is_refused(host: Host) {
    let stack = tls_stack(host, REDIS_CALL);
    let other = testkit::tls::TestCa::new("another CA");
    let yaml = std::fs::read_to_string(&stack.yaml).expect("the stack's yaml");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let cluster = doc["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters")
        .iter_mut()
        .find(|c| c["name"] == "redis")
        .expect("the redis cluster");
    cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
        ["trusted_ca"]["filename"] = other.ca_file().to_string_lossy().into_owned().into();
    std::fs::write(&stack.yaml, serde_yaml::to_string(&doc).expect("yaml")).expect("write");

    let gateway = stack.spawn_gateway(1, &[]);
    for _ in 0..3 {
        let r = gateway.get("/api/rate-limited");
        assert_eq!(r.status, 200, "rate limits fail open: {}", r.text());
    }
    let metrics = testkit::http::get(gateway.admin, "/stats/prometheus").text();
    assert!(
        krowoc_tests::metric_value(&metrics, "krowoc_redis_errors") >= 3,
        "{metrics}"
    );
    assert!(
        krowoc_tests::metric_value(&metrics, "host_shim_redis_callout_failures_total") >= 3,
        "{metrics}"
    );
}
