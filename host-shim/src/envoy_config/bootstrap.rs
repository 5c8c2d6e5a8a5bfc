//! The bootstrap, section by section: the listener and its HTTP connection manager, the routes,
//! the wasm filter and the router, the overload manager and the clusters, each checked against
//! the subset the crate docs list.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;

use crate::conn_manager::{
    CidrRange, ConnectionManagerConfig, ServerHeaderTransformation, UnderscoreAction,
};

use super::yaml::{describe, invalid, join, type_url, Node, Object};
use super::{
    Cluster, DiscoveryType, EnvoyConfig, PathMatch, RedisClusterType, Result, RouteEntry,
    SocketAddress, UpstreamTls, WasmFilter, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RELOAD_BASE_INTERVAL,
    DEFAULT_STREAM_IDLE_TIMEOUT, DOWNSTREAM_CONNECTIONS_MONITOR, DOWNSTREAM_CONNECTIONS_TYPE,
    HCM_TYPE, ROUTER_TYPE, RUNTIMES, STRING_VALUE_TYPE, STRUCT_TYPE, WASM_TYPE,
};

pub(super) fn parse_bootstrap(root: Node<'_>, base_dir: &Path) -> Result<EnvoyConfig> {
    let top = root.object(&["admin", "static_resources", "overload_manager"])?;
    let max_downstream_connections = top
        .get("overload_manager")
        .map(|o| parse_overload_manager(&o))
        .transpose()?
        .flatten();
    let admin = match top.get("admin") {
        None => None,
        Some(node) => {
            let admin = node.object(&["address"])?;
            admin
                .get("address")
                .map(|a| socket_address(&a))
                .transpose()?
        }
    };
    let resources = top
        .req("static_resources")?
        .object(&["listeners", "clusters"])?;
    let clusters = parse_clusters(&resources.req("clusters")?)?;
    let listener_node = resources.req("listeners")?.only_one("listener")?;
    let listener = listener_node.object(&["name", "address", "filter_chains"])?;
    if let Some(name) = listener.get("name") {
        name.string()?;
    }
    let listen = socket_address(&listener.req("address")?)?;
    let chain = listener.req("filter_chains")?.only_one("filter chain")?;
    let chain = chain.object(&["name", "filters"])?;
    let filter = chain.req("filters")?.only_one("network filter")?;
    let filter = filter.object(&["name", "typed_config"])?;
    if let Some(name) = filter.get("name") {
        name.string()?;
    }
    let hcm = filter.req("typed_config")?;
    let hcm_type = type_url(&hcm)?;
    if hcm_type != HCM_TYPE {
        return Err(invalid(
            &join(&hcm.path, "@type"),
            format!("{hcm_type:?}: host-shim runs only the HTTP connection manager ({HCM_TYPE})"),
        ));
    }
    let hcm = hcm.object(&[
        "@type",
        "stat_prefix",
        "codec_type",
        "stream_idle_timeout",
        "route_config",
        "http_filters",
        "use_remote_address",
        "xff_num_trusted_hops",
        "skip_xff_append",
        "preserve_external_request_id",
        "internal_address_config",
        "request_headers_timeout",
        "common_http_protocol_options",
        "http2_protocol_options",
        "normalize_path",
        "merge_slashes",
        "server_name",
        "server_header_transformation",
    ])?;
    let mut connection_manager = parse_connection_manager(&hcm)?;
    let stat_prefix = hcm.req("stat_prefix")?.string()?.to_string();
    let stream_idle_timeout = match hcm.get("stream_idle_timeout") {
        None => Some(DEFAULT_STREAM_IDLE_TIMEOUT),
        Some(t) => Some(t.duration()?).filter(|d| !d.is_zero()),
    };
    if let Some(codec) = hcm.get("codec_type") {
        codec.enumeration(&["AUTO", "HTTP1"])?;
    }
    let routes = parse_routes(&hcm.req("route_config")?, &clusters)?;
    let wasm = parse_http_filters(&hcm.req("http_filters")?, base_dir, &mut connection_manager)?;
    Ok(EnvoyConfig {
        listener: listen,
        stat_prefix,
        stream_idle_timeout,
        connection_manager,
        max_downstream_connections,
        admin,
        routes,
        wasm,
        clusters,
    })
}

/// The connection manager fields that shape requests and connections (Envoy's defaults when
/// absent).
fn parse_connection_manager(hcm: &Object<'_>) -> Result<ConnectionManagerConfig> {
    let mut cm = ConnectionManagerConfig::default();
    let flag = |name: &str| -> Result<bool> {
        Ok(hcm
            .get(name)
            .map(|f| f.boolean())
            .transpose()?
            .unwrap_or(false))
    };
    cm.use_remote_address = flag("use_remote_address")?;
    cm.skip_xff_append = flag("skip_xff_append")?;
    cm.preserve_external_request_id = flag("preserve_external_request_id")?;
    cm.normalize_path = flag("normalize_path")?;
    cm.merge_slashes = flag("merge_slashes")?;
    if let Some(name) = hcm.get("server_name") {
        cm.server_name = name.string()?.to_string();
        if http::HeaderValue::from_str(&cm.server_name).is_err() {
            return Err(name.invalid("not a valid header value"));
        }
    }
    if let Some(t) = hcm.get("server_header_transformation") {
        cm.server_header_transformation = match t
            .enumeration(&["OVERWRITE", "APPEND_IF_ABSENT", "PASS_THROUGH"])?
            .as_str()
        {
            "APPEND_IF_ABSENT" => ServerHeaderTransformation::AppendIfAbsent,
            "PASS_THROUGH" => ServerHeaderTransformation::PassThrough,
            _ => ServerHeaderTransformation::Overwrite,
        };
    }
    if let Some(hops) = hcm.get("xff_num_trusted_hops") {
        cm.xff_num_trusted_hops = hops.integer(0, u64::from(u32::MAX))? as u32;
    }
    if let Some(t) = hcm.get("request_headers_timeout") {
        cm.request_headers_timeout = Some(t.duration()?).filter(|d| !d.is_zero());
    }
    if let Some(internal) = hcm.get("internal_address_config") {
        let internal = internal.object(&["unix_sockets", "cidr_ranges"])?;
        if let Some(u) = internal.get("unix_sockets") {
            u.boolean()?;
        }
        if let Some(ranges) = internal.get("cidr_ranges") {
            for range in ranges.list()? {
                cm.internal_ranges.push(cidr_range(&range)?);
            }
        }
    }
    if let Some(common) = hcm.get("common_http_protocol_options") {
        let common = common.object(&["idle_timeout", "headers_with_underscores_action"])?;
        if let Some(t) = common.get("idle_timeout") {
            cm.idle_timeout = Some(t.duration()?).filter(|d| !d.is_zero());
        }
        if let Some(a) = common.get("headers_with_underscores_action") {
            cm.headers_with_underscores = match a
                .enumeration(&["ALLOW", "REJECT_REQUEST", "DROP_HEADER"])?
                .as_str()
            {
                "REJECT_REQUEST" => UnderscoreAction::RejectRequest,
                "DROP_HEADER" => UnderscoreAction::DropHeader,
                _ => UnderscoreAction::Allow,
            };
        }
    }
    if let Some(h2) = hcm.get("http2_protocol_options") {
        // host-shim serves HTTP/1.1 only: checked as Envoy checks them, no other effect.
        let h2 = h2.object(&[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
        ])?;
        let max = u64::from(i32::MAX.unsigned_abs());
        if let Some(n) = h2.get("max_concurrent_streams") {
            n.integer(1, max)?;
        }
        for window in [
            "initial_stream_window_size",
            "initial_connection_window_size",
        ] {
            if let Some(n) = h2.get(window) {
                n.integer(65535, max)?;
            }
        }
    }
    Ok(cm)
}

/// `{address_prefix, prefix_len}`
fn cidr_range(node: &Node<'_>) -> Result<CidrRange> {
    let range = node.object(&["address_prefix", "prefix_len"])?;
    let prefix_node = range.req("address_prefix")?;
    let prefix_text = prefix_node.string()?;
    let prefix: IpAddr = prefix_text
        .parse()
        .map_err(|_| prefix_node.invalid(format!("{prefix_text:?} is not an IP address")))?;
    let max = if prefix.is_ipv4() { 32 } else { 128 };
    let len = match range.get("prefix_len") {
        None => 0,
        Some(l) => l.integer(0, max)? as u8,
    };
    Ok(CidrRange { prefix, len })
}

/// `overload_manager`: only the global downstream connection limit (the one monitor that needs
/// no actions).
fn parse_overload_manager(node: &Node<'_>) -> Result<Option<u64>> {
    let om = node.object(&["refresh_interval", "resource_monitors"])?;
    if let Some(r) = om.get("refresh_interval") {
        r.duration()?;
    }
    let mut max = None;
    let Some(monitors) = om.get("resource_monitors") else {
        return Ok(None);
    };
    for monitor in monitors.list()? {
        let m = monitor.object(&["name", "typed_config"])?;
        let name_node = m.req("name")?;
        let name = name_node.string()?;
        if name != DOWNSTREAM_CONNECTIONS_MONITOR {
            return Err(name_node.invalid(format!(
                "{name:?}: host-shim supports only the {DOWNSTREAM_CONNECTIONS_MONITOR} monitor"
            )));
        }
        if max.is_some() {
            return Err(monitor.invalid(format!("{DOWNSTREAM_CONNECTIONS_MONITOR} is given twice")));
        }
        let typed = m.req("typed_config")?;
        let url = type_url(&typed)?;
        if url != DOWNSTREAM_CONNECTIONS_TYPE {
            return Err(invalid(
                &join(&typed.path, "@type"),
                format!("{url:?}: this monitor's typed_config is {DOWNSTREAM_CONNECTIONS_TYPE}"),
            ));
        }
        let config = typed.object(&["@type", "max_active_downstream_connections"])?;
        max = Some(
            config
                .req("max_active_downstream_connections")?
                .integer(1, i64::MAX.unsigned_abs())?,
        );
    }
    Ok(max)
}

/// `address: {socket_address: {address, port_value}}`
fn socket_address(node: &Node<'_>) -> Result<SocketAddress> {
    let address = node.object(&["socket_address"])?;
    let sa = address.req("socket_address")?;
    let sa = sa.object(&["address", "port_value", "protocol"])?;
    if let Some(protocol) = sa.get("protocol") {
        protocol.enumeration(&["TCP"])?;
    }
    let host = sa.req("address")?;
    let host_str = host.string()?;
    if host_str.is_empty() {
        return Err(host.invalid("the address is empty"));
    }
    let port = sa.req("port_value")?.port()?;
    Ok(SocketAddress {
        host: host_str.to_string(),
        port,
    })
}

fn parse_routes(node: &Node<'_>, clusters: &BTreeMap<String, Cluster>) -> Result<Vec<RouteEntry>> {
    let route_config = node.object(&["name", "virtual_hosts"])?;
    if let Some(name) = route_config.get("name") {
        name.string()?;
    }
    let vhost = route_config
        .req("virtual_hosts")?
        .only_one("virtual host")?;
    let vhost = vhost.object(&["name", "domains", "routes"])?;
    vhost.req("name")?.string()?;
    let domains = vhost.req("domains")?;
    let mut wildcard = false;
    for d in domains.list()? {
        wildcard |= d.string()? == "*";
    }
    if !wildcard {
        return Err(domains.invalid(
            "host-shim routes every host alike; the one virtual host's domains must include \"*\"",
        ));
    }
    let mut routes = Vec::new();
    for route in vhost.req("routes")?.list()? {
        let entry = route.object(&["name", "match", "route"])?;
        let name = match entry.get("name") {
            Some(name) => name.string()?.to_string(),
            None => String::new(),
        };
        let m = entry.req("match")?;
        let matcher_obj = m.object(&["prefix", "path"])?;
        let matcher = match (matcher_obj.get("prefix"), matcher_obj.get("path")) {
            (Some(p), None) => PathMatch::Prefix(p.string()?.to_string()),
            (None, Some(p)) => {
                let path = p.string()?;
                if !path.starts_with('/') {
                    return Err(p.invalid(format!("{path:?}: an exact path starts with '/'")));
                }
                PathMatch::Path(path.to_string())
            }
            (Some(_), Some(_)) => return Err(m.invalid("give either prefix or path, not both")),
            (None, None) => return Err(m.invalid("missing prefix or path")),
        };
        let action = entry.req("route")?.object(&["cluster", "timeout"])?;
        let cluster_node = action.req("cluster")?;
        let cluster = cluster_node.string()?.to_string();
        if !clusters.contains_key(&cluster) {
            let known = clusters.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(
                cluster_node.invalid(format!("unknown cluster {cluster:?} (clusters: {known})"))
            );
        }
        let timeout = action.get("timeout").map(|t| t.duration()).transpose()?;
        routes.push(RouteEntry {
            name,
            matcher,
            cluster,
            timeout,
        });
    }
    Ok(routes)
}

/// The wasm filter, and the router's settings into `cm`.
fn parse_http_filters(
    node: &Node<'_>,
    base_dir: &Path,
    cm: &mut ConnectionManagerConfig,
) -> Result<Option<WasmFilter>> {
    let filters = node.list()?;
    let mut wasm: Option<WasmFilter> = None;
    let mut router_seen = false;
    for filter in &filters {
        if router_seen {
            return Err(
                filter.invalid("filters after the router never run; the router must be last")
            );
        }
        let entry = filter.object(&["name", "typed_config"])?;
        entry.req("name")?.string()?;
        let typed = entry.req("typed_config")?;
        match type_url(&typed)? {
            WASM_TYPE => {
                if wasm.is_some() {
                    return Err(filter.invalid("host-shim runs one wasm filter"));
                }
                wasm = Some(parse_wasm(&typed, base_dir)?);
            }
            ROUTER_TYPE => {
                let router = typed.object(&["@type", "suppress_envoy_headers"])?;
                if let Some(f) = router.get("suppress_envoy_headers") {
                    cm.suppress_envoy_headers = f.boolean()?;
                }
                router_seen = true;
            }
            other => {
                return Err(invalid(
                    &join(&typed.path, "@type"),
                    format!(
                        "{other:?}: host-shim supports only the wasm filter ({WASM_TYPE}) and the router ({ROUTER_TYPE})"
                    ),
                ))
            }
        }
    }
    if !router_seen {
        return Err(node.invalid(format!(
            "the last http filter must be the router (typed_config @type {ROUTER_TYPE})"
        )));
    }
    Ok(wasm)
}

fn parse_wasm(typed: &Node<'_>, base_dir: &Path) -> Result<WasmFilter> {
    let wasm = typed.object(&["@type", "config"])?;
    let config = wasm.req("config")?.object(&[
        "name",
        "root_id",
        "vm_config",
        "configuration",
        "fail_open",
        "failure_policy",
        "reload_config",
    ])?;
    let name = config.string_or_empty("name")?;
    let root_id = config.string_or_empty("root_id")?;
    let configuration = config
        .get("configuration")
        .map(|c| any_config(&c))
        .transpose()?
        .unwrap_or_default();
    let fail_open_flag = config
        .get("fail_open")
        .map(|f| f.boolean())
        .transpose()?
        .unwrap_or(false);
    let policy = config.get("failure_policy");
    let policy_name = policy
        .as_ref()
        .map(|p| p.enumeration(&["UNSPECIFIED", "FAIL_CLOSED", "FAIL_RELOAD", "FAIL_OPEN"]))
        .transpose()?;
    let failure_policy =
        crate::vm::FailurePolicy::from_envoy(fail_open_flag, policy_name.as_deref())
            // Only a set failure_policy can be refused.
            .map_err(|m| match &policy {
                Some(p) => p.invalid(m),
                None => invalid("failure_policy", m),
            })?;
    let reload_base_interval = match config.get("reload_config") {
        None => DEFAULT_RELOAD_BASE_INTERVAL,
        Some(reload) => match reload.object(&["backoff"])?.get("backoff") {
            None => DEFAULT_RELOAD_BASE_INTERVAL,
            Some(backoff) => {
                let backoff = backoff.object(&["base_interval", "max_interval"])?;
                let base_node = backoff.req("base_interval")?;
                let base = base_node.duration()?;
                if base < Duration::from_millis(1) {
                    return Err(base_node.invalid("must be at least 1ms"));
                }
                if let Some(max) = backoff.get("max_interval") {
                    if max.duration()? < base {
                        return Err(max.invalid("must not be less than base_interval"));
                    }
                }
                base
            }
        },
    };
    let vm = config.req("vm_config")?.object(&[
        "vm_id",
        "runtime",
        "code",
        "configuration",
        "allow_precompiled",
        "nack_on_code_cache_miss",
        "environment_variables",
    ])?;
    let vm_id = vm.string_or_empty("vm_id")?;
    let runtime = match vm.get("runtime") {
        None => String::new(),
        Some(r) => {
            let s = r.string()?;
            if s == "envoy.wasm.runtime.null" {
                return Err(r.invalid("the null runtime runs plugins compiled into Envoy; host-shim needs a .wasm file"));
            }
            if !s.is_empty() && !RUNTIMES.contains(&s) {
                return Err(r.invalid(format!(
                    "unknown runtime {s:?} (one of: {})",
                    RUNTIMES.join(", ")
                )));
            }
            s.to_string()
        }
    };
    for flag in ["allow_precompiled", "nack_on_code_cache_miss"] {
        if let Some(f) = vm.get(flag) {
            f.boolean()?;
        }
    }
    let vm_configuration = vm
        .get("configuration")
        .map(|c| any_config(&c))
        .transpose()?
        .unwrap_or_default();
    let code = vm.req("code")?.object(&["local"])?;
    let local = code.req("local")?.object(&["filename"])?;
    let filename_node = local.req("filename")?;
    let filename = filename_node.string()?;
    if filename.is_empty() {
        return Err(filename_node.invalid("the filename is empty"));
    }
    let code_path = if Path::new(filename).is_absolute() {
        PathBuf::from(filename)
    } else {
        base_dir.join(filename)
    };
    let environment = match vm.get("environment_variables") {
        None => Vec::new(),
        Some(env) => environment(&env)?,
    };
    Ok(WasmFilter {
        name,
        root_id,
        vm_id,
        runtime,
        configuration,
        vm_configuration,
        code_path,
        failure_policy,
        reload_base_interval,
        environment,
    })
}

/// A `google.protobuf.Any` configuration: StringValue passes its value, Struct becomes JSON
/// (what Envoy hands the plugin in both cases).
fn any_config(node: &Node<'_>) -> Result<String> {
    let url = type_url(node)?;
    let any = node.object(&["@type", "value"])?;
    match url {
        STRING_VALUE_TYPE => Ok(any.string_or_empty("value")?),
        STRUCT_TYPE => {
            let Some(value) = any.get("value") else {
                return Ok("{}".into());
            };
            if !matches!(value.value, Value::Mapping(_)) {
                return Err(value.expected("a mapping (a protobuf Struct)"));
            }
            serde_json::to_string(value.value)
                .map_err(|e| value.invalid(format!("cannot be written as JSON: {e}")))
        }
        other => Err(invalid(
            &join(&node.path, "@type"),
            format!(
                "{other:?}: host-shim passes configuration as {STRING_VALUE_TYPE} or {STRUCT_TYPE}"
            ),
        )),
    }
}

fn environment(node: &Node<'_>) -> Result<Vec<(String, String)>> {
    let env = node.object(&["host_env_keys", "key_values"])?;
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(kv) = env.get("key_values") {
        let Value::Mapping(map) = kv.value else {
            return Err(kv.expected("a mapping of names to values"));
        };
        for (k, v) in map {
            let Value::String(k) = k else {
                return Err(kv.invalid(format!("names must be strings, found {}", describe(k))));
            };
            let Value::String(v) = v else {
                return Err(invalid(
                    &join(&kv.path, k),
                    format!("expected a string, found {}", describe(v)),
                ));
            };
            out.push((k.clone(), v.clone()));
        }
    }
    if let Some(keys) = env.get("host_env_keys") {
        for key in keys.list()? {
            let name = key.string()?;
            if out.iter().any(|(k, _)| k == name) {
                return Err(key.invalid(format!(
                    "{name:?} is also in key_values (Envoy refuses the overlap)"
                )));
            }
            if let Ok(value) = std::env::var(name) {
                out.push((name.to_string(), value));
            }
        }
    }
    Ok(out)
}

fn parse_clusters(node: &Node<'_>) -> Result<BTreeMap<String, Cluster>> {
    let mut clusters = BTreeMap::new();
    for item in node.list()? {
        let c = item.object(&[
            "name",
            "type",
            "connect_timeout",
            "lb_policy",
            "dns_lookup_family",
            "load_assignment",
            "transport_socket",
            "cluster_type",
        ])?;
        let name_node = c.req("name")?;
        let name = name_node.string()?.to_string();
        if name.is_empty() {
            return Err(name_node.invalid("the cluster name is empty"));
        }
        if clusters.contains_key(&name) {
            return Err(name_node.invalid(format!("cluster {name:?} is defined twice")));
        }
        let redis_cluster = c
            .get("cluster_type")
            .map(|t| redis_cluster_type(&t))
            .transpose()?;
        if let (Some(_), Some(t)) = (&redis_cluster, c.get("type")) {
            return Err(t.invalid(
                "a cluster has either `type` or `cluster_type`, not both (Envoy's cluster_discovery_type)",
            ));
        }
        let discovery = match c.get("type") {
            None => DiscoveryType::Static,
            Some(t) => match t
                .enumeration(&["STATIC", "STRICT_DNS", "LOGICAL_DNS"])?
                .as_str()
            {
                "STRICT_DNS" => DiscoveryType::StrictDns,
                "LOGICAL_DNS" => DiscoveryType::LogicalDns,
                _ => DiscoveryType::Static,
            },
        };
        let connect_timeout = c
            .get("connect_timeout")
            .map(|t| t.duration())
            .transpose()?
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if let Some(lb) = c.get("lb_policy") {
            lb.enumeration(&[
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "RANDOM",
                "RING_HASH",
                "MAGLEV",
            ])?;
        }
        if let Some(family) = c.get("dns_lookup_family") {
            family.enumeration(&["AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL"])?;
        }
        let assignment = c
            .req("load_assignment")?
            .object(&["cluster_name", "endpoints"])?;
        assignment.req("cluster_name")?.string()?;
        let locality = assignment
            .req("endpoints")?
            .only_one("locality (endpoints entry)")?;
        let locality = locality.object(&["lb_endpoints"])?;
        let lb_endpoints = match &redis_cluster {
            // A Redis Cluster's endpoints are its seed nodes.
            Some(_) => locality.req("lb_endpoints")?.list()?,
            None => vec![locality
                .req("lb_endpoints")?
                .only_one("endpoint per cluster")?],
        };
        let mut addresses = Vec::new();
        for lb_endpoint in lb_endpoints {
            let endpoint = lb_endpoint.object(&["endpoint"])?.req("endpoint")?;
            let address_node = endpoint.object(&["address"])?.req("address")?;
            let address = socket_address(&address_node)?;
            if address.port == 0 {
                return Err(invalid(
                    &format!("{}.socket_address.port_value", address_node.path),
                    "port 0 cannot be connected to",
                ));
            }
            if discovery == DiscoveryType::Static
                && redis_cluster.is_none()
                && address.host.parse::<IpAddr>().is_err()
            {
                return Err(invalid(
                    &format!("{}.socket_address.address", address_node.path),
                    format!(
                        "{:?} is not an IP address; a STATIC cluster needs one (use type STRICT_DNS for host names)",
                        address.host
                    ),
                ));
            }
            addresses.push(address);
        }
        let Some(address) = addresses.first().cloned() else {
            return Err(invalid(
                &format!("{}.lb_endpoints", locality.path),
                "no endpoints: a Redis Cluster needs at least one seed node",
            ));
        };
        let redis_cluster = redis_cluster.map(|refresh| RedisClusterType {
            seeds: addresses,
            refresh,
        });
        clusters.insert(
            name.clone(),
            Cluster {
                name,
                host: address.host,
                port: address.port,
                connect_timeout,
                discovery,
                tls: c
                    .get("transport_socket")
                    .map(|t| upstream_tls(&t))
                    .transpose()?,
                redis_cluster,
            },
        );
    }
    Ok(clusters)
}

const REDIS_CLUSTER_CONFIG: &str =
    "type.googleapis.com/envoy.extensions.clusters.redis.v3.RedisClusterConfig";
/// Envoy's `cluster_refresh_rate` default.
const DEFAULT_REDIS_CLUSTER_REFRESH: Duration = Duration::from_secs(5);

/// A cluster's `cluster_type`: `envoy.clusters.redis` with a `RedisClusterConfig`; its
/// `cluster_refresh_rate` (how often the slot map is read again).
fn redis_cluster_type(node: &Node<'_>) -> Result<Duration> {
    let t = node.object(&["name", "typed_config"])?;
    let name = t.req("name")?;
    if name.string()? != "envoy.clusters.redis" {
        return Err(name.invalid("host-shim supports only the cluster_type envoy.clusters.redis"));
    }
    let typed = t.req("typed_config")?;
    let url = type_url(&typed)?;
    if url != REDIS_CLUSTER_CONFIG {
        return Err(invalid(
            &format!("{}.@type", typed.path),
            format!("{url:?}: host-shim reads only {REDIS_CLUSTER_CONFIG}"),
        ));
    }
    let config = typed.object(&[
        "@type",
        "cluster_refresh_rate",
        "cluster_refresh_timeout",
        "redirect_refresh_interval",
    ])?;
    for checked in ["cluster_refresh_timeout", "redirect_refresh_interval"] {
        if let Some(d) = config.get(checked) {
            d.duration()?;
        }
    }
    let refresh = config
        .get("cluster_refresh_rate")
        .map(|d| d.duration())
        .transpose()?
        .unwrap_or(DEFAULT_REDIS_CLUSTER_REFRESH);
    if refresh.is_zero() {
        return Err(invalid(
            &format!("{}.cluster_refresh_rate", typed.path),
            "must be more than 0s",
        ));
    }
    Ok(refresh)
}

const UPSTREAM_TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A cluster's `transport_socket`: `envoy.transport_sockets.tls` with an `UpstreamTlsContext`.
fn upstream_tls(node: &Node<'_>) -> Result<UpstreamTls> {
    let socket = node.object(&["name", "typed_config"])?;
    let name = socket.req("name")?;
    if name.string()? != "envoy.transport_sockets.tls" {
        return Err(name.invalid("host-shim supports only envoy.transport_sockets.tls"));
    }
    let typed = socket.req("typed_config")?;
    let url = type_url(&typed)?;
    if url != UPSTREAM_TLS_CONTEXT {
        return Err(invalid(
            &format!("{}.@type", typed.path),
            format!("{url:?}: host-shim reads only {UPSTREAM_TLS_CONTEXT}"),
        ));
    }
    let context = typed.object(&["@type", "sni", "common_tls_context"])?;
    let sni = context
        .get("sni")
        .map(|n| n.string().map(str::to_string))
        .transpose()?;
    let common = context
        .req("common_tls_context")?
        .object(&["validation_context", "tls_certificates"])?;
    let filename = |node: Node<'_>| -> Result<PathBuf> {
        let file = node.object(&["filename"])?.req("filename")?;
        match file.string()? {
            "" => Err(file.invalid("the file name is empty")),
            name => Ok(PathBuf::from(name)),
        }
    };
    // host-shim never connects to a server it has not verified.
    let validation = common.req("validation_context")?.object(&["trusted_ca"])?;
    let trusted_ca = filename(validation.req("trusted_ca")?)?;
    let client_certificate = match common.get("tls_certificates") {
        None => None,
        Some(list) => {
            let cert = list.only_one("client certificate (tls_certificates entry)")?;
            let cert = cert.object(&["certificate_chain", "private_key"])?;
            Some((
                filename(cert.req("certificate_chain")?)?,
                filename(cert.req("private_key")?)?,
            ))
        }
    };
    Ok(UpstreamTls {
        sni,
        trusted_ca,
        client_certificate,
    })
}
