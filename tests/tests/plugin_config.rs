//! The plugin's configuration contract through host-shim: a bad configuration is refused with
//! one line per problem naming the field path and the value, and host-shim does not start; a
//! good one serves every response with the edge header.

use host_shim::run::RunArgs;
use krowoc_tests::{plugin_wasm, write_yaml_with_plugin_config, Stack};
use serde_json::{json, Value};
use std::net::SocketAddr;

/// Starts host-shim with `config` as the plugin configuration; the error text if it refuses.
fn start_error(config: &Value) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = write_yaml_with_plugin_config(dir.path(), config);
    let redis = testkit::RedisServer::start();
    let unused = |p: u16| format!("127.0.0.1:{p}");
    let args = RunArgs {
        config: yaml,
        clusters: vec![
            format!("upstream={}", unused(testkit::free_port())),
            format!("redis_relay={}", unused(testkit::free_port())),
            format!("redis=127.0.0.1:{}", redis.port),
        ],
        plugin: Some(plugin_wasm()),
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        workers: Some(1),
        callback_deadline_ms: 1000,
        vm_memory_mib: 256,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(host_shim::run::start(&args)) {
        Ok(running) => {
            running.stop();
            panic!("host-shim started with a configuration the plugin should refuse: {config}");
        }
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn refused_configuration_names_every_bad_field_with_its_value() {
    let err = start_error(&json!({
        "redis": {"transport": "relay", "timeout": "soon"},
        "routes": [
            {"name": "a", "match": {"path": "/a"},
             "rate_limit": {"limits": [{"limit": 5, "window": "60 seconds"}]}},
            {"name": "b", "match": {"path": "/b"}, "rate_limit": {"limits": [{"limit": 5, "window": "1m"}],
             "failure_mode": "panic"}}
        ],
        "extra": true
    }));
    for expected in [
        "proxy_on_configure returned false",
        "redis.timeout",
        "\"soon\"",
        "routes[0].rate_limit.limits[0].window",
        "\"60 seconds\"",
        "routes[1].rate_limit.failure_mode",
        "\"panic\"",
        "extra",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
}

#[test]
fn redis_call_to_a_cluster_the_host_does_not_know_is_refused() {
    let err = start_error(&json!({
        "redis": {"transport": "redis_call", "cluster": "no_such_cluster"},
        "routes": []
    }));
    assert!(err.contains("redis.cluster"), "{err}");
    assert!(err.contains("no_such_cluster"), "{err}");
}

#[test]
fn every_response_carries_the_edge_header_and_unlimited_routes_no_rate_limit_fields() {
    let stack = Stack::start();
    let r = stack.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-krowoc-edge"), Some(env!("CARGO_PKG_VERSION")));
    assert!(r.header("ratelimit").is_none());
    assert!(r.header("ratelimit-policy").is_none());
    let r = stack.get("/no/such/path");
    assert_eq!(r.header("x-krowoc-edge"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(
        stack.metric("envoy_krowoc_redis_calls"),
        0,
        "no policy, no Redis work"
    );
}
