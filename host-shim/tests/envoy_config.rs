//! envoy.yaml as host-shim reads it: the shipped file, and refusals that name the exact path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use host_shim::conn_manager::{
    CidrRange, ConnectionManagerConfig, ServerHeaderTransformation, UnderscoreAction,
};
use host_shim::envoy_config::{DiscoveryType, EnvoyConfig, EnvoyConfigError, PathMatch};
use host_shim::vm::FailurePolicy;
use serde_yaml::Value;

fn shipped_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/envoy.yaml")
}

fn shipped_yaml() -> Value {
    let text = std::fs::read_to_string(shipped_path()).expect("read envoy/envoy.yaml");
    serde_yaml::from_str(&text).expect("envoy.yaml is YAML")
}

/// The value at a path written the way errors write it: `a.b[0].c`.
fn at<'a>(root: &'a mut Value, path: &str) -> &'a mut Value {
    let mut v = root;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            v = v
                .get_mut(key)
                .unwrap_or_else(|| panic!("no {key} in {path}"));
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().expect("index");
            v = v.get_mut(i).unwrap_or_else(|| panic!("no [{i}] in {path}"));
        }
    }
    v
}

/// Sets `key` in the mapping at `path` and parses the result.
fn with_field(path: &str, key: &str, value: Value) -> Result<EnvoyConfig, EnvoyConfigError> {
    let mut yaml = shipped_yaml();
    let target = at(&mut yaml, path);
    target
        .as_mapping_mut()
        .unwrap_or_else(|| panic!("{path} is not a mapping"))
        .insert(Value::String(key.into()), value);
    parse(&yaml)
}

fn without_field(path: &str, key: &str) -> Result<EnvoyConfig, EnvoyConfigError> {
    let mut yaml = shipped_yaml();
    at(&mut yaml, path)
        .as_mapping_mut()
        .unwrap_or_else(|| panic!("{path} is not a mapping"))
        .remove(key)
        .unwrap_or_else(|| panic!("no {key} at {path}"));
    parse(&yaml)
}

fn parse(yaml: &Value) -> Result<EnvoyConfig, EnvoyConfigError> {
    let text = serde_yaml::to_string(yaml).expect("serialise");
    EnvoyConfig::from_yaml_str(&text, Path::new("/srv/gateway"))
}

fn refused(result: Result<EnvoyConfig, EnvoyConfigError>) -> (String, String) {
    let err = result.expect_err("the yaml must be refused");
    let path = err.path().unwrap_or_default().to_string();
    (path, err.to_string())
}

const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("test yaml")
}

#[test]
fn shipped_envoy_yaml_loads_with_its_clusters_route_and_wasm_filter() {
    let cfg = EnvoyConfig::load(&shipped_path()).expect("envoy/envoy.yaml loads");
    assert_eq!(cfg.listener.to_string(), "0.0.0.0:10000");
    assert_eq!(
        cfg.admin.as_ref().map(ToString::to_string).as_deref(),
        Some("0.0.0.0:9901")
    );
    assert_eq!(cfg.stat_prefix, "gateway");

    let names: Vec<&str> = cfg.clusters.keys().map(String::as_str).collect();
    assert_eq!(names, ["redis", "redis_relay", "upstream"]);
    let expect = [
        ("upstream", "upstream", 8080),
        ("redis_relay", "relay", 7379),
        ("redis", "redis", 6379),
    ];
    for (name, host, port) in expect {
        let c = &cfg.clusters[name];
        assert_eq!(
            (c.name.as_str(), c.host.as_str(), c.port),
            (name, host, port)
        );
        assert_eq!(c.discovery, DiscoveryType::StrictDns);
    }
    assert_eq!(
        cfg.clusters["redis_relay"].connect_timeout,
        Duration::from_millis(250)
    );

    // The live event feed first, without a response timeout; then everything else.
    assert_eq!(cfg.routes.len(), 2);
    assert_eq!(
        cfg.routes[0].matcher,
        PathMatch::Path("/api/events/stream".into())
    );
    assert_eq!(cfg.routes[0].cluster, "upstream");
    assert_eq!(cfg.routes[0].effective_timeout(), None);
    assert_eq!(cfg.routes[1].matcher, PathMatch::Prefix("/".into()));
    assert_eq!(cfg.routes[1].cluster, "upstream");
    assert_eq!(cfg.routes[1].timeout, Some(Duration::from_secs(15)));
    assert_eq!(
        cfg.route_for("/api/events/stream").map(|r| r.timeout),
        Some(Some(Duration::ZERO))
    );
    assert_eq!(
        cfg.route_for("/api/events").map(|r| r.timeout),
        Some(Some(Duration::from_secs(15)))
    );

    let wasm = cfg.wasm.as_ref().expect("the wasm filter");
    assert_eq!(wasm.name, "krowoc_edge");
    assert_eq!(wasm.root_id, "krowoc_edge");
    assert_eq!(wasm.vm_id, "krowoc_edge");
    assert_eq!(wasm.runtime, "envoy.wasm.runtime.v8");
    assert_eq!(wasm.code_path, PathBuf::from("/etc/envoy/plugin.wasm"));
    assert_eq!(wasm.failure_policy, FailurePolicy::FailReload);
    assert_eq!(wasm.vm_configuration, "");
    let plugin_json: serde_json::Value =
        serde_json::from_str(&wasm.configuration).expect("the plugin configuration is JSON");
    assert!(plugin_json.is_object(), "{plugin_json}");
}

#[test]
fn malformed_yaml_is_refused_with_its_line() {
    let err = EnvoyConfig::from_yaml_str(
        "admin:\n  address: [1, 2\nstatic_resources: {}\n",
        Path::new("."),
    )
    .expect_err("malformed");
    match &err {
        EnvoyConfigError::Yaml { line, .. } => assert!(line.is_some(), "{err}"),
        other => panic!("expected a YAML error, got {other}"),
    }
    assert!(err.to_string().contains("line"), "{err}");
}

#[test]
fn an_unknown_field_is_refused_by_its_exact_path() {
    let (path, message) = refused(with_field(
        &format!("{HCM}.http_filters[1].typed_config"),
        "foo",
        Value::Bool(true),
    ));
    let expected = format!("{HCM}.http_filters[1].typed_config.foo");
    assert_eq!(path, expected);
    assert!(
        message.starts_with(&format!("{expected}: field not supported by host-shim")),
        "{message}"
    );

    let cases = [
        ("", "layered_runtime"),
        ("static_resources.clusters[0]", "health_checks"),
        (HCM, "access_log"),
        (
            &format!("{HCM}.http_filters[0].typed_config.config"),
            "capability_restriction_config",
        ),
        (
            &format!("{HCM}.http_filters[0].typed_config.config.vm_config.code"),
            "remote",
        ),
        ("static_resources.listeners[0]", "listener_filters"),
    ];
    for (at_path, key) in cases {
        let (path, message) = refused(with_field(at_path, key, Value::Null));
        let expected = if at_path.is_empty() {
            key.to_string()
        } else {
            format!("{at_path}.{key}")
        };
        assert_eq!(path, expected, "{message}");
        assert!(
            message.contains("field not supported by host-shim"),
            "{message}"
        );
    }
}

#[test]
fn a_missing_cluster_address_names_its_path() {
    let sa = "static_resources.clusters[1].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address";
    let (path, message) = refused(without_field(sa, "address"));
    assert_eq!(path, format!("{sa}.address"));
    assert!(message.ends_with("missing required field"), "{message}");
    let (path, _) = refused(without_field(
        "static_resources.clusters[0]",
        "load_assignment",
    ));
    assert_eq!(path, "static_resources.clusters[0].load_assignment");
}

#[test]
fn wrong_types_and_values_name_the_path_and_the_value() {
    let sa = "static_resources.listeners[0].address.socket_address";
    let (path, message) = refused(with_field(
        sa,
        "port_value",
        Value::String("ten thousand".into()),
    ));
    assert_eq!(path, format!("{sa}.port_value"));
    assert!(message.contains("\"ten thousand\""), "{message}");

    let (path, message) = refused(with_field(
        "static_resources.clusters[0]",
        "connect_timeout",
        "5".into(),
    ));
    assert_eq!(path, "static_resources.clusters[0].connect_timeout");
    assert!(message.contains("\"5\""), "{message}");

    let (path, message) = refused(with_field(
        "static_resources.clusters[0]",
        "type",
        "EDS".into(),
    ));
    assert_eq!(path, "static_resources.clusters[0].type");
    assert!(
        message.contains("EDS") && message.contains("STRICT_DNS"),
        "{message}"
    );

    let route = format!("{HCM}.route_config.virtual_hosts[0].routes[0].route");
    let (path, message) = refused(with_field(&route, "cluster", "nowhere".into()));
    assert_eq!(path, format!("{route}.cluster"));
    assert!(message.contains("unknown cluster \"nowhere\""), "{message}");

    let (path, message) = refused(with_field(HCM, "codec_type", "HTTP2".into()));
    assert_eq!(path, format!("{HCM}.codec_type"));
    assert!(message.contains("HTTP2"), "{message}");

    // Envoy's lowercase enum spelling is accepted.
    let cfg = with_field("static_resources.clusters[0]", "type", "strict_dns".into())
        .expect("lowercase enum");
    assert_eq!(cfg.clusters["upstream"].discovery, DiscoveryType::StrictDns);
}

#[test]
fn more_listeners_or_filters_than_the_subset_are_refused_by_path() {
    let mut two_listeners = shipped_yaml();
    let listener = at(&mut two_listeners, "static_resources.listeners[0]").clone();
    at(&mut two_listeners, "static_resources.listeners")
        .as_sequence_mut()
        .expect("list")
        .push(listener);
    let (path, message) = refused(parse(&two_listeners));
    assert_eq!(path, "static_resources.listeners[1]");
    assert!(message.contains("exactly one listener"), "{message}");

    let mut two_wasm = shipped_yaml();
    let wasm = at(&mut two_wasm, &format!("{HCM}.http_filters[0]")).clone();
    at(&mut two_wasm, &format!("{HCM}.http_filters"))
        .as_sequence_mut()
        .expect("list")
        .insert(1, wasm);
    let (path, message) = refused(parse(&two_wasm));
    assert_eq!(path, format!("{HCM}.http_filters[1]"));
    assert!(message.contains("one wasm filter"), "{message}");

    let mut router_first = shipped_yaml();
    at(&mut router_first, &format!("{HCM}.http_filters"))
        .as_sequence_mut()
        .expect("list")
        .reverse();
    let (path, message) = refused(parse(&router_first));
    assert_eq!(path, format!("{HCM}.http_filters[1]"));
    assert!(message.contains("router must be last"), "{message}");

    let (path, message) = refused(with_field(
        &format!("{HCM}.http_filters[0].typed_config"),
        "@type",
        "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua".into(),
    ));
    assert_eq!(path, format!("{HCM}.http_filters[0].typed_config.@type"));
    assert!(message.contains("lua"), "{message}");
}

#[test]
fn a_static_cluster_needs_an_ip_address() {
    let (path, message) = refused(with_field(
        "static_resources.clusters[0]",
        "type",
        "STATIC".into(),
    ));
    assert_eq!(
        path,
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    );
    assert!(
        message.contains("\"upstream\" is not an IP address"),
        "{message}"
    );
}

#[test]
fn override_cluster_repoints_a_cluster_and_refuses_unknown_names_and_bad_addresses() {
    let mut cfg = EnvoyConfig::load(&shipped_path()).expect("load");
    cfg.override_cluster("redis", "127.0.0.1:6390")
        .expect("override");
    assert_eq!(
        (
            cfg.clusters["redis"].host.as_str(),
            cfg.clusters["redis"].port
        ),
        ("127.0.0.1", 6390)
    );
    cfg.apply_cluster_override("upstream=[::1]:8081")
        .expect("ipv6 override");
    assert_eq!(
        (
            cfg.clusters["upstream"].host.as_str(),
            cfg.clusters["upstream"].port
        ),
        ("::1", 8081)
    );

    let err = cfg
        .override_cluster("nope", "127.0.0.1:1")
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains("unknown cluster \"nope\"") && err.contains("redis_relay"),
        "{err}"
    );
    for bad in ["127.0.0.1", "127.0.0.1:http", ":80", "host:0", "host:70000"] {
        let err = cfg
            .override_cluster("redis", bad)
            .expect_err(bad)
            .to_string();
        assert!(err.contains(bad), "{bad}: {err}");
    }
    assert!(cfg.apply_cluster_override("redis127.0.0.1:1").is_err());
    assert_eq!(
        cfg.clusters["redis"].port, 6390,
        "a refused override changes nothing"
    );
}

#[test]
fn routes_match_in_order_and_the_first_match_wins() {
    let mut doc = shipped_yaml();
    *at(
        &mut doc,
        &format!("{HCM}.route_config.virtual_hosts[0].routes"),
    ) = yaml(
        r#"
- match: { path: "/api/exact" }
  route: { cluster: redis_relay, timeout: 0s }
- match: { prefix: "/api" }
  route: { cluster: redis, timeout: 0.5s }
- match: { prefix: "/api/exact/deeper" }
  route: { cluster: redis_relay }
- match: { prefix: "/" }
  route: { cluster: upstream }
"#,
    );
    let cfg = parse(&doc).expect("routes");
    let cluster_for = |p: &str| cfg.route_for(p).map(|r| r.cluster.as_str());
    assert_eq!(cluster_for("/api/exact"), Some("redis_relay"));
    assert_eq!(cluster_for("/api/exact?x=1"), Some("redis_relay"));
    // The earlier /api prefix shadows the later, longer prefix, as in Envoy.
    assert_eq!(cluster_for("/api/exact/deeper"), Some("redis"));
    assert_eq!(cluster_for("/apis"), Some("redis"));
    assert_eq!(cluster_for("/health"), Some("upstream"));
    assert_eq!(
        cfg.routes[0].effective_timeout(),
        None,
        "0s disables the timeout"
    );
    assert_eq!(
        cfg.routes[1].effective_timeout(),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        cfg.routes[2].effective_timeout(),
        Some(Duration::from_secs(15))
    );

    let mut no_catch_all = doc.clone();
    at(
        &mut no_catch_all,
        &format!("{HCM}.route_config.virtual_hosts[0].routes"),
    )
    .as_sequence_mut()
    .expect("list")
    .pop();
    let cfg = parse(&no_catch_all).expect("routes");
    assert!(cfg.route_for("/other").is_none());

    let (path, message) = refused(with_field(
        &format!("{HCM}.route_config.virtual_hosts[0].routes[1].match"),
        "path",
        "/x".into(),
    ));
    assert_eq!(
        path,
        format!("{HCM}.route_config.virtual_hosts[0].routes[1].match")
    );
    assert!(message.contains("not both"), "{message}");
}

#[test]
fn relative_plugin_paths_resolve_against_the_yaml_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut doc = shipped_yaml();
    *at(
        &mut doc,
        &format!("{HCM}.http_filters[0].typed_config.config.vm_config.code.local.filename"),
    ) = "plugins/krowoc.wasm".into();
    let file = dir.path().join("envoy.yaml");
    std::fs::write(&file, serde_yaml::to_string(&doc).expect("yaml")).expect("write");
    let cfg = EnvoyConfig::load(&file).expect("load");
    let wasm = cfg.wasm.expect("wasm");
    assert_eq!(wasm.code_path, dir.path().join("plugins/krowoc.wasm"));

    let err = EnvoyConfig::load(&dir.path().join("missing.yaml")).expect_err("missing file");
    assert!(err.to_string().contains("missing.yaml"), "{err}");
}

#[test]
fn failure_policy_struct_configuration_and_environment_are_read() {
    let config = format!("{HCM}.http_filters[0].typed_config.config");
    let mut doc = shipped_yaml();
    let c = at(&mut doc, &config).as_mapping_mut().expect("config");
    c.remove("fail_open");
    c.insert("failure_policy".into(), "FAIL_OPEN".into());
    c.insert(
        "configuration".into(),
        yaml("{ '@type': type.googleapis.com/google.protobuf.Struct, value: { redis: { cluster: redis }, n: 3 } }"),
    );
    at(&mut doc, &format!("{config}.vm_config"))
        .as_mapping_mut()
        .expect("vm_config")
        .insert(
            "environment_variables".into(),
            yaml("{ key_values: { MODE: demo } }"),
        );
    let cfg = parse(&doc).expect("yaml");
    let wasm = cfg.wasm.expect("wasm");
    assert_eq!(wasm.failure_policy, FailurePolicy::FailOpen);
    let json: serde_json::Value = serde_json::from_str(&wasm.configuration).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"redis": {"cluster": "redis"}, "n": 3})
    );
    assert_eq!(
        wasm.environment,
        vec![("MODE".to_string(), "demo".to_string())]
    );

    let (path, message) = refused(with_field(&config, "failure_policy", "SOMETIMES".into()));
    assert_eq!(path, format!("{config}.failure_policy"));
    assert!(message.contains("SOMETIMES"), "{message}");
    let (path, _) = refused(with_field(
        &format!("{config}.configuration"),
        "@type",
        "type.googleapis.com/google.protobuf.BytesValue".into(),
    ));
    assert_eq!(path, format!("{config}.configuration.@type"));
}

#[test]
fn a_bootstrap_without_the_wasm_filter_is_a_plain_proxy() {
    let mut doc = shipped_yaml();
    at(&mut doc, &format!("{HCM}.http_filters"))
        .as_sequence_mut()
        .expect("list")
        .remove(0);
    let cfg = parse(&doc).expect("yaml");
    assert!(cfg.wasm.is_none());
    let (path, message) = refused(without_field(HCM, "http_filters"));
    assert_eq!(path, format!("{HCM}.http_filters"));
    assert!(message.contains("missing required field"), "{message}");
}

#[test]
fn stream_idle_timeout_defaults_to_envoys_300s_and_0s_disables_it() {
    let shipped = parse(&shipped_yaml()).unwrap();
    assert_eq!(shipped.stream_idle_timeout, Some(Duration::from_secs(300)));
    let set = with_field(HCM, "stream_idle_timeout", "1.5s".into()).unwrap();
    assert_eq!(set.stream_idle_timeout, Some(Duration::from_millis(1500)));
    let off = with_field(HCM, "stream_idle_timeout", "0s".into()).unwrap();
    assert_eq!(off.stream_idle_timeout, None);
    let (path, message) = refused(with_field(HCM, "stream_idle_timeout", "soon".into()));
    assert_eq!(path, format!("{HCM}.stream_idle_timeout"));
    assert!(message.contains("soon"), "{message}");
}

#[test]
fn the_shipped_edge_settings_are_read() {
    let cfg = EnvoyConfig::load(&shipped_path()).expect("envoy/envoy.yaml loads");
    let cm = &cfg.connection_manager;
    assert!(cm.use_remote_address);
    assert_eq!(cm.xff_num_trusted_hops, 0);
    assert!(!cm.skip_xff_append);
    assert!(!cm.preserve_external_request_id);
    assert!(cm.internal_ranges.is_empty());
    assert!(cm.normalize_path && cm.merge_slashes);
    assert_eq!(cm.request_headers_timeout, Some(Duration::from_secs(10)));
    assert_eq!(cm.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(cm.headers_with_underscores, UnderscoreAction::RejectRequest);
    assert_eq!(cfg.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(cfg.max_downstream_connections, Some(10000));
}

#[test]
fn connection_manager_fields_default_to_envoys() {
    let mut doc = shipped_yaml();
    let hcm = at(&mut doc, HCM).as_mapping_mut().expect("hcm");
    for key in [
        "use_remote_address",
        "xff_num_trusted_hops",
        "normalize_path",
        "merge_slashes",
        "request_headers_timeout",
        "common_http_protocol_options",
        "http2_protocol_options",
    ] {
        hcm.remove(key)
            .unwrap_or_else(|| panic!("shipped yaml has {key}"));
    }
    doc.as_mapping_mut()
        .expect("top")
        .remove("overload_manager")
        .expect("overload_manager");
    let cfg = parse(&doc).expect("yaml");
    assert_eq!(cfg.connection_manager, ConnectionManagerConfig::default());
    assert!(!cfg.connection_manager.use_remote_address);
    assert_eq!(cfg.connection_manager.request_headers_timeout, None);
    assert_eq!(
        cfg.connection_manager.idle_timeout,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        cfg.connection_manager.headers_with_underscores,
        UnderscoreAction::Allow
    );
    assert_eq!(cfg.max_downstream_connections, None);
}

#[test]
fn connection_manager_options_are_read_and_checked_by_path() {
    let cfg = with_field(
        HCM,
        "internal_address_config",
        yaml("{unix_sockets: false, cidr_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}, {address_prefix: '::1', prefix_len: 128}]}"),
    )
    .expect("internal_address_config");
    assert_eq!(
        cfg.connection_manager.internal_ranges,
        [
            CidrRange {
                prefix: "10.0.0.0".parse().unwrap(),
                len: 8
            },
            CidrRange {
                prefix: "::1".parse().unwrap(),
                len: 128
            },
        ]
    );
    let cfg = with_field(HCM, "skip_xff_append", Value::Bool(true)).unwrap();
    assert!(cfg.connection_manager.skip_xff_append);
    let cfg = with_field(HCM, "preserve_external_request_id", Value::Bool(true)).unwrap();
    assert!(cfg.connection_manager.preserve_external_request_id);
    let cfg = with_field(HCM, "request_headers_timeout", "0s".into()).unwrap();
    assert_eq!(cfg.connection_manager.request_headers_timeout, None);
    let cfg = with_field(
        HCM,
        "common_http_protocol_options",
        yaml("{idle_timeout: 0s, headers_with_underscores_action: drop_header}"),
    )
    .unwrap();
    assert_eq!(cfg.connection_manager.idle_timeout, None);
    assert_eq!(
        cfg.connection_manager.headers_with_underscores,
        UnderscoreAction::DropHeader
    );

    let refusals = [
        (
            "common_http_protocol_options",
            yaml("{max_headers_count: 10}"),
            format!("{HCM}.common_http_protocol_options.max_headers_count"),
            "field not supported",
        ),
        (
            "common_http_protocol_options",
            yaml("{headers_with_underscores_action: REJECT}"),
            format!("{HCM}.common_http_protocol_options.headers_with_underscores_action"),
            "REJECT",
        ),
        (
            "http2_protocol_options",
            yaml("{initial_stream_window_size: 100}"),
            format!("{HCM}.http2_protocol_options.initial_stream_window_size"),
            "65535",
        ),
        (
            "http2_protocol_options",
            yaml("{allow_connect: true}"),
            format!("{HCM}.http2_protocol_options.allow_connect"),
            "field not supported",
        ),
        (
            "xff_num_trusted_hops",
            Value::from(-1),
            format!("{HCM}.xff_num_trusted_hops"),
            "integer",
        ),
        (
            "use_remote_address",
            "yes".into(),
            format!("{HCM}.use_remote_address"),
            "true or false",
        ),
        (
            "internal_address_config",
            yaml("{cidr_ranges: [{address_prefix: 10.0.0.0, prefix_len: 33}]}"),
            format!("{HCM}.internal_address_config.cidr_ranges[0].prefix_len"),
            "0 to 32",
        ),
        (
            "internal_address_config",
            yaml("{cidr_ranges: [{address_prefix: ten}]}"),
            format!("{HCM}.internal_address_config.cidr_ranges[0].address_prefix"),
            "not an IP",
        ),
    ];
    for (key, value, want_path, want_text) in refusals {
        let (path, message) = refused(with_field(HCM, key, value));
        assert_eq!(path, want_path, "{message}");
        assert!(message.contains(want_text), "{message}");
    }
}

#[test]
fn the_overload_manager_takes_only_the_connection_limit_monitor() {
    let monitor = "overload_manager.resource_monitors[0]";
    let (path, message) = refused(with_field(
        monitor,
        "name",
        "envoy.resource_monitors.fixed_heap".into(),
    ));
    assert_eq!(path, format!("{monitor}.name"));
    assert!(
        message.contains("global_downstream_max_connections"),
        "{message}"
    );
    let (path, _) = refused(with_field(
        &format!("{monitor}.typed_config"),
        "max_active_downstream_connections",
        Value::from(0),
    ));
    assert_eq!(
        path,
        format!("{monitor}.typed_config.max_active_downstream_connections")
    );
    let (path, _) = refused(with_field("overload_manager", "actions", yaml("[]")));
    assert_eq!(path, "overload_manager.actions");
    let (path, _) = refused(with_field(
        &format!("{monitor}.typed_config"),
        "@type",
        "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig"
            .into(),
    ));
    assert_eq!(path, format!("{monitor}.typed_config.@type"));
}

/// Envoy 1.40: `fail_open: true` is the legacy fail-open (the failing request passes too), and
/// refuses it together with a set `failure_policy`: "only one of fail_open or failure_policy can
/// be set". `fail_open: false` with `FAIL_RELOAD` is fine.
#[test]
fn fail_open_and_failure_policy_are_read_as_envoy_does() {
    let config = format!("{HCM}.http_filters[0].typed_config.config");
    let policy_of = |fail_open: bool, policy: Option<&str>| {
        let mut doc = shipped_yaml();
        let c = at(&mut doc, &config).as_mapping_mut().expect("config");
        c.remove("failure_policy");
        c.insert("fail_open".into(), fail_open.into());
        if let Some(p) = policy {
            c.insert("failure_policy".into(), p.into());
        }
        parse(&doc).map(|cfg| cfg.wasm.expect("wasm").failure_policy)
    };
    assert_eq!(
        policy_of(true, None).ok(),
        Some(FailurePolicy::FailOpenLegacy)
    );
    assert_eq!(
        policy_of(true, Some("UNSPECIFIED")).ok(),
        Some(FailurePolicy::FailOpenLegacy)
    );
    assert_eq!(
        policy_of(false, Some("FAIL_RELOAD")).ok(),
        Some(FailurePolicy::FailReload)
    );
    let refused = policy_of(true, Some("FAIL_CLOSED")).expect_err("both fields set");
    assert!(
        refused
            .to_string()
            .contains("only one of fail_open or failure_policy"),
        "{refused}"
    );
}

#[test]
fn server_header_settings_and_the_routers_suppress_envoy_headers_are_read() {
    let cfg = parse(&shipped_yaml()).expect("the shipped yaml");
    assert_eq!(cfg.connection_manager.server_name, "envoy");
    assert_eq!(
        cfg.connection_manager.server_header_transformation,
        ServerHeaderTransformation::Overwrite
    );
    assert!(!cfg.connection_manager.suppress_envoy_headers);

    let cfg = with_field(HCM, "server_name", Value::String("krowoc".into())).expect("server_name");
    assert_eq!(cfg.connection_manager.server_name, "krowoc");
    for (text, want) in [
        ("OVERWRITE", ServerHeaderTransformation::Overwrite),
        (
            "APPEND_IF_ABSENT",
            ServerHeaderTransformation::AppendIfAbsent,
        ),
        ("pass_through", ServerHeaderTransformation::PassThrough),
    ] {
        let cfg = with_field(
            HCM,
            "server_header_transformation",
            Value::String(text.into()),
        )
        .expect(text);
        assert_eq!(cfg.connection_manager.server_header_transformation, want);
    }
    let (path, message) = refused(with_field(
        HCM,
        "server_header_transformation",
        Value::String("REPLACE".into()),
    ));
    assert_eq!(path, format!("{HCM}.server_header_transformation"));
    assert!(message.contains("REPLACE"), "{message}");

    let router = format!("{HCM}.http_filters[1].typed_config");
    let cfg = with_field(&router, "suppress_envoy_headers", Value::Bool(true)).expect("router");
    assert!(cfg.connection_manager.suppress_envoy_headers);
    let (path, _) = refused(with_field(
        &router,
        "suppress_envoy_headers",
        Value::String("yes".into()),
    ));
    assert_eq!(path, format!("{router}.suppress_envoy_headers"));
}

const TLS_SOCKET: &str = r#"
name: envoy.transport_sockets.tls
typed_config:
  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
  sni: redis.internal
  common_tls_context:
    validation_context:
      trusted_ca: {filename: /etc/krowoc/redis-ca.pem}
    tls_certificates:
    - certificate_chain: {filename: /etc/krowoc/edge.pem}
      private_key: {filename: /etc/krowoc/edge.key}
"#;

/// The shipped `redis` cluster (the third) with `socket` as its transport_socket.
fn redis_cluster_with(socket: Value) -> Result<EnvoyConfig, EnvoyConfigError> {
    with_field("static_resources.clusters[2]", "transport_socket", socket)
}

#[test]
fn a_redis_clusters_tls_transport_socket_is_read() {
    let cfg = redis_cluster_with(yaml(TLS_SOCKET)).expect("a TLS redis cluster");
    let tls = cfg.clusters["redis"].tls.clone().expect("tls");
    assert_eq!(tls.sni.as_deref(), Some("redis.internal"));
    assert_eq!(tls.trusted_ca, PathBuf::from("/etc/krowoc/redis-ca.pem"));
    assert_eq!(
        tls.client_certificate,
        Some((
            PathBuf::from("/etc/krowoc/edge.pem"),
            PathBuf::from("/etc/krowoc/edge.key")
        ))
    );
    assert!(cfg.clusters["upstream"].tls.is_none());
}

#[test]
fn tls_without_a_trusted_ca_or_of_another_kind_is_refused_by_path() {
    let socket = "static_resources.clusters[2].transport_socket";
    let mut no_ca = yaml(TLS_SOCKET);
    no_ca["typed_config"]["common_tls_context"]
        .as_mapping_mut()
        .expect("common_tls_context")
        .remove("validation_context");
    let (path, _) = refused(redis_cluster_with(no_ca));
    assert_eq!(
        path,
        format!("{socket}.typed_config.common_tls_context.validation_context")
    );

    let mut other = yaml(TLS_SOCKET);
    other["name"] = Value::from("envoy.transport_sockets.raw_buffer");
    let (path, message) = refused(redis_cluster_with(other));
    assert_eq!(path, format!("{socket}.name"));
    assert!(message.contains("envoy.transport_sockets.tls"), "{message}");

    let mut unknown = yaml(TLS_SOCKET);
    unknown["typed_config"]["common_tls_context"]["alpn_protocols"] = yaml("[h2]");
    let (path, _) = refused(redis_cluster_with(unknown));
    assert_eq!(
        path,
        format!("{socket}.typed_config.common_tls_context.alpn_protocols")
    );
}

const REDIS_CLUSTER_TYPE: &str = r#"
name: envoy.clusters.redis
typed_config:
  "@type": type.googleapis.com/envoy.extensions.clusters.redis.v3.RedisClusterConfig
  cluster_refresh_rate: 2s
"#;

const THREE_SEEDS: &str = r#"
cluster_name: redis
endpoints:
- lb_endpoints:
  - endpoint: {address: {socket_address: {address: redis-0, port_value: 7000}}}
  - endpoint: {address: {socket_address: {address: redis-1, port_value: 7001}}}
  - endpoint: {address: {socket_address: {address: redis-2, port_value: 7002}}}
"#;

/// The shipped `redis` cluster as an `envoy.clusters.redis` cluster of three seeds.
fn redis_cluster_type(edit: impl FnOnce(&mut Value)) -> Result<EnvoyConfig, EnvoyConfigError> {
    let mut doc = shipped_yaml();
    let cluster = at(&mut doc, "static_resources.clusters[2]");
    let map = cluster.as_mapping_mut().expect("cluster");
    map.remove("type");
    map.insert("cluster_type".into(), yaml(REDIS_CLUSTER_TYPE));
    map.insert("load_assignment".into(), yaml(THREE_SEEDS));
    edit(cluster);
    parse(&doc)
}

#[test]
fn an_envoy_redis_cluster_type_is_read_with_its_seeds_and_refresh_rate() {
    let mut cfg = redis_cluster_type(|_| {}).expect("a Redis Cluster");
    let redis = cfg.clusters["redis"]
        .redis_cluster
        .clone()
        .expect("redis cluster");
    let seeds: Vec<(String, u16)> = redis
        .seeds
        .iter()
        .map(|s| (s.host.clone(), s.port))
        .collect();
    assert_eq!(
        seeds,
        vec![
            ("redis-0".into(), 7000),
            ("redis-1".into(), 7001),
            ("redis-2".into(), 7002)
        ]
    );
    assert_eq!(redis.refresh, Duration::from_secs(2));
    assert_eq!(cfg.clusters["redis"].port, 7000);
    assert!(cfg.clusters["upstream"].redis_cluster.is_none());

    // --cluster redis=SEEDS replaces the seeds.
    cfg.override_cluster("redis", "127.0.0.1:7100, 127.0.0.1:7101")
        .expect("seeds override");
    let redis = cfg.clusters["redis"]
        .redis_cluster
        .clone()
        .expect("redis cluster");
    assert_eq!(redis.seeds.len(), 2);
    assert_eq!(cfg.clusters["redis"].port, 7100);
    assert!(cfg
        .override_cluster("upstream", "127.0.0.1:1,127.0.0.1:2")
        .is_err());
}

#[test]
fn a_redis_cluster_type_of_another_kind_or_beside_a_type_is_refused_by_path() {
    let (path, message) = refused(redis_cluster_type(|c| {
        c["type"] = Value::from("STRICT_DNS");
    }));
    assert_eq!(path, "static_resources.clusters[2].type");
    assert!(message.contains("not both"), "{message}");

    let (path, message) = refused(redis_cluster_type(|c| {
        c["cluster_type"]["name"] = Value::from("envoy.clusters.aggregate");
    }));
    assert_eq!(path, "static_resources.clusters[2].cluster_type.name");
    assert!(message.contains("envoy.clusters.redis"), "{message}");

    let (path, _) = refused(redis_cluster_type(|c| {
        c["cluster_type"]["typed_config"]["cluster_refresh_rate"] = Value::from("soon");
    }));
    assert_eq!(
        path,
        "static_resources.clusters[2].cluster_type.typed_config.cluster_refresh_rate"
    );
}
