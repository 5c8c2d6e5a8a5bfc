//! The plugin's configuration contract through host-shim: a bad configuration is refused with
//! one line per problem naming the field path and the value, and host-shim does not start; a
//! good one serves every response with the edge header.

use host_shim::run::RunArgs;
use krowoc_tests::{
    plugin_wasm, stock_plugin_wasm, write_yaml_with_plugin_config, Host, Stack, StackOptions,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use testkit::envoy::EnvoyProcess;

/// Starts a gateway on `host` with `config` as the plugin configuration; what it said when it
/// refused (host-shim's error, Envoy's log before it exited).
fn start_error(host: Host, config: &Value) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = write_yaml_with_plugin_config(dir.path(), config);
    let redis = testkit::RedisServer::start();
    let unused = || SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
    let clusters = [
        ("upstream".to_string(), unused()),
        ("redis_relay".to_string(), unused()),
        ("redis".to_string(), redis.addr()),
    ];
    match host {
        Host::Envoy => {
            let text = std::fs::read_to_string(&yaml).expect("read yaml");
            let plugin = stock_plugin_wasm();
            let copy = testkit::envoy::loopback_yaml(
                &text,
                &testkit::envoy::Loopback {
                    listener_port: 0,
                    admin_port: 0,
                    clusters: &clusters,
                    plugin: &plugin,
                },
            )
            .expect("loopback yaml");
            std::fs::write(&yaml, copy).expect("write yaml");
            match EnvoyProcess::start(&testkit::envoy::binary(), &yaml, dir.path(), 1) {
                Ok(envoy) => panic!(
                    "Envoy started with a configuration the plugin should refuse: {config}\n{}",
                    envoy.log_text()
                ),
                Err(log) => log,
            }
        }
        Host::HostShim => {
            let args = RunArgs {
                config: yaml,
                clusters: clusters.iter().map(|(n, a)| format!("{n}={a}")).collect(),
                plugin: Some(plugin_wasm()),
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                workers: Some(1),
                callback_deadline_ms: 1000,
                vm_memory_mib: 256,
                log_path: None,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            match rt.block_on(host_shim::run::start(&args)) {
                Ok(running) => {
                    running.stop();
                    panic!(
                        "host-shim started with a configuration the plugin should refuse: {config}"
                    );
                }
                Err(e) => format!("{e:#}"),
            }
        }
    }
}

krowoc_tests::on_both_hosts!(refused_configuration_names_every_bad_field_with_its_value);
fn refused_configuration_names_every_bad_field_with_its_value(host: Host) {
    let err = start_error(
        host,
        &json!({
            "redis": {"transport": "relay", "timeout": "soon"},
            "routes": [
                {"name": "a", "match": {"path": "/a"},
                 "rate_limit": {"limits": [{"limit": 5, "window": "60 seconds"}]}},
                {"name": "b", "match": {"path": "/b"}, "rate_limit": {"limits": [{"limit": 5, "window": "1m"}],
                 "failure_mode": "panic"}}
            ],
            "extra": true
        }),
    );
    // How each host says the VM refused its configuration.
    let refused = match host {
        Host::HostShim => "proxy_on_configure returned false",
        Host::Envoy => "Unable to create Wasm plugin krowoc_edge",
    };
    for expected in [
        refused,
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

krowoc_tests::on_both_hosts!(refused_configuration_never_shows_its_secrets);
fn refused_configuration_never_shows_its_secrets(host: Host) {
    let secrets = [
        "sekret relay token e2e",
        "sekret-password-e2e",
        "sekret-purge",
        "987654321",
    ];
    let err = start_error(
        host,
        &json!({
            "redis": {"transport": "relay", "token": secrets[0], "password": secrets[1]},
            "cache": {"purge": {"path": "/_krowoc/purge", "token": secrets[2]}},
            "routes": []
        }),
    );
    let typed = start_error(host, &json!({"redis": {"token": 987654321}, "routes": []}));
    for expected in [
        "redis.token (value (redacted))",
        "redis.password (value (redacted))",
        "cache.purge.token (value (redacted)): must be 16 to",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
    assert!(
        typed.contains("redis.token (value (redacted)): invalid type, expected a string"),
        "{typed}"
    );
    for secret in secrets {
        assert!(!err.contains(secret), "{secret:?} shown in:\n{err}");
        assert!(!typed.contains(secret), "{secret:?} shown in:\n{typed}");
    }
}

krowoc_tests::on_host_shim_only!(redis_call: redis_call_to_a_cluster_the_host_does_not_know_is_refused);
fn redis_call_to_a_cluster_the_host_does_not_know_is_refused(host: Host) {
    let err = start_error(
        host,
        &json!({
            "redis": {"transport": "redis_call", "cluster": "no_such_cluster"},
            "routes": []
        }),
    );
    assert!(err.contains("redis.cluster"), "{err}");
    assert!(err.contains("no_such_cluster"), "{err}");
}

krowoc_tests::on_both_hosts!(
    every_response_carries_the_edge_header_and_unlimited_routes_no_rate_limit_fields
);
fn every_response_carries_the_edge_header_and_unlimited_routes_no_rate_limit_fields(host: Host) {
    let stack = Stack::on(host);
    let r = stack.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-krowoc-edge"), Some(env!("CARGO_PKG_VERSION")));
    assert!(r.header("ratelimit").is_none());
    assert!(r.header("ratelimit-policy").is_none());
    let r = stack.get("/no/such/path");
    assert_eq!(r.header("x-krowoc-edge"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(
        stack.metric("krowoc_redis_calls"),
        0,
        "no policy, no Redis work"
    );
}

krowoc_tests::on_both_hosts!(without_version_header_no_response_carries_the_edge_header);
fn without_version_header_no_response_carries_the_edge_header(host: Host) {
    let stack = Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(|cfg| {
            cfg.as_object_mut()
                .expect("an object")
                .remove("version_header");
        })),
        ..StackOptions::default()
    });
    // Passed through, answered from the cache, and answered by the rate limit.
    for path in [
        "/health",
        "/api/cached-data?user_id=1",
        "/api/cached-data?user_id=1",
    ] {
        let r = stack.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("x-krowoc-edge").is_none(),
            "{path}: {:?}",
            r.headers
        );
    }
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = stack.get("/api/rate-limited");
        assert!(r.header("x-krowoc-edge").is_none(), "{:?}", r.headers);
        statuses.push(r.status);
    }
    assert_eq!(statuses.last(), Some(&429), "the sixth is denied locally");
}
