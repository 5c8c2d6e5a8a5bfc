//! Reads the Envoy v3 bootstrap (`envoy/envoy.yaml`) that Envoy itself runs, into the typed
//! model host-shim needs. One file serves production (Envoy), the demo and the tests.
//!
//! host-shim understands a documented subset of Envoy's schema and refuses everything else by
//! its full path (e.g. `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.foo:
//! field not supported by host-shim`), so a setting is never silently ignored. Wrong types and
//! missing required fields name the path and the bad value.
//!
//! # The subset
//! ```text
//! admin.address.socket_address.{address, port_value, protocol: TCP}          (optional)
//! overload_manager                                                          (optional)
//!   refresh_interval, resource_monitors: at most one,
//!     {name: envoy.resource_monitors.global_downstream_max_connections,
//!      typed_config: DownstreamConnectionsConfig {max_active_downstream_connections}}
//! static_resources.listeners: exactly one
//!   name, address.socket_address
//!   filter_chains: exactly one, with filters: exactly one
//!     {name, typed_config: HttpConnectionManager}  (found by typed_config's @type)
//!       stat_prefix (required), codec_type (AUTO | HTTP1), stream_idle_timeout (default 300s)
//!       use_remote_address, xff_num_trusted_hops, skip_xff_append,
//!       preserve_external_request_id, internal_address_config.{unix_sockets, cidr_ranges[]
//!         {address_prefix, prefix_len}}                  (see crate::conn_manager)
//!       request_headers_timeout (default none), normalize_path, merge_slashes
//!       server_name (default "envoy"), server_header_transformation (OVERWRITE |
//!         APPEND_IF_ABSENT | PASS_THROUGH)                   (see crate::conn_manager)
//!       common_http_protocol_options.{idle_timeout (default 3600s),
//!         headers_with_underscores_action (ALLOW | REJECT_REQUEST | DROP_HEADER)}
//!       http2_protocol_options.{max_concurrent_streams, initial_stream_window_size,
//!         initial_connection_window_size}
//!       route_config.{name, virtual_hosts: exactly one}
//!         {name, domains (must contain "*"), routes[]}
//!           {name, match.{prefix | path}, route.{cluster, timeout}}
//!       http_filters: [wasm filter (optional, at most one)], router (last)
//!         wasm: typed_config envoy.extensions.filters.http.wasm.v3.Wasm, config:
//!           name, root_id, fail_open, failure_policy,
//!           reload_config.backoff.{base_interval, max_interval} (FAIL_RELOAD's wait: from
//!             base_interval to 1.5 × it, 1 s by default; max_interval is checked only)
//!           configuration: google.protobuf.StringValue {value} | google.protobuf.Struct {value}
//!           vm_config: vm_id, runtime, code.local.filename, configuration (as above),
//!                      allow_precompiled, nack_on_code_cache_miss,
//!                      environment_variables.{host_env_keys, key_values}
//!         router: typed_config envoy.extensions.filters.http.router.v3.Router,
//!           suppress_envoy_headers
//! static_resources.clusters[]
//!   name, type (STATIC | STRICT_DNS | LOGICAL_DNS), connect_timeout (default 5s), lb_policy,
//!   dns_lookup_family, load_assignment.{cluster_name, endpoints: exactly one
//!     {lb_endpoints: exactly one {endpoint.address.socket_address}}}
//! ```
//! Enum values are case-insensitive (`strict_dns` works, as in Envoy). Durations are Envoy's
//! (`"0.25s"`, `"5s"`).
//!
//! # Where host-shim differs from Envoy
//! * `code.local.filename`, when relative, is resolved against the yaml's directory (Envoy
//!   uses its working directory); `host-shim run --plugin PATH` replaces it.
//! * Cluster addresses are used as written (a name is resolved when connecting); a cluster has
//!   one endpoint. `lb_policy` and `dns_lookup_family` are checked and have no other effect.
//! * A route with no `timeout` gets Envoy's default of 15 s; `0s` means none (as in Envoy).
//! * host-shim serves HTTP/1.1 only: `http2_protocol_options` are checked (Envoy's ranges) and
//!   have no effect; `codec_type: AUTO` means HTTP/1.1.
//! * For a loopback peer with `use_remote_address`, Envoy appends its own address to
//!   `x-forwarded-for` (the first non-loopback interface's IPv4); host-shim takes its default
//!   route's source address, the same on a single-homed host.
//! * `overload_manager.refresh_interval` is checked only: host-shim counts connections
//!   exactly, at accept, where Envoy samples on that interval.
//! * The router strips the retry and timeout `x-envoy-*` headers it would act on and announces
//!   `x-envoy-expected-rq-timeout-ms`; host-shim strips and announces alike but never retries.
//!   `x-envoy-upstream-service-time` is host-shim's time from sending the request to the
//!   upstream's response head (Envoy times from its first byte sent), in whole milliseconds.
//! * Responses get `date` (when absent) and `server` after the filters' response phase, as in
//!   Envoy; requests the codec or the connection manager refuses (400, 426, 431) are answered
//!   without the filters, as in Envoy. What hyper frames differently: a response to HEAD with
//!   no `content-length` (an empty local reply, an upstream's) carries no
//!   `transfer-encoding: chunked` (hyper drops it for HEAD, Envoy writes it; no body follows
//!   either way). Repeated fields of one name reach the plugin in the order they came (from
//!   the client and from the upstream), but leave for the upstream and the client grouped by
//!   name (hyper writes http's HeaderMap); Envoy keeps them interleaved throughout.
//! * gRPC callouts (`proxy_grpc_call`, `proxy_grpc_stream` and the rest) answer `Unimplemented`:
//!   Envoy performs them over an HTTP/2 cluster. host-shim's clusters are HTTP/1.1 only and the
//!   filter never makes gRPC calls; implementing them means an HTTP/2 client, gRPC framing and
//!   the four gRPC callbacks, worth it only for a plugin that needs them.
//! * `response.flags` is always 0 (host-shim sets none of Envoy's response flags).
//! * The 408 for `request_headers_timeout` does not pass through the plugin and has no `date`
//!   or `server` (in Envoy the filters' response phase sees it); Envoy closes the connection
//!   1 s after it (delayed close), host-shim at once. An idle connection that served requests is closed `drain_timeout`
//!   (5 s) + 1 s after its idle timeout, as in Envoy; a request arriving in those seconds is
//!   served with keep-alive (Envoy answers it with `connection: close`).
//! * HTTP/1 parsing is hyper's. host-shim scans each head before hyper for what Envoy's codec
//!   refuses and hyper would not: Content-Length with chunked (400), a `#fragment` in the target
//!   (empty 400), HTTP/1.0 (426, with Envoy's `HTTP/1.1` status line). A malformed chunked
//!   body gets Envoy's 400 only when it breaks before the upstream has answered.
//!   `expect: 100-continue` is answered when the body is first read (after the plugin
//!   resumes), Envoy answers at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use crate::conn_manager::{
    CidrRange, ConnectionManagerConfig, ServerHeaderTransformation, UnderscoreAction,
};

pub const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
pub const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
pub const STRUCT_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";
pub const DOWNSTREAM_CONNECTIONS_MONITOR: &str =
    "envoy.resource_monitors.global_downstream_max_connections";
pub const DOWNSTREAM_CONNECTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// Envoy's HTTP connection manager `stream_idle_timeout` when none is set.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's route timeout when a route names none.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's `reload_config.backoff.base_interval` when none is set.
pub const DEFAULT_RELOAD_BASE_INTERVAL: Duration = Duration::from_secs(1);
/// Envoy's cluster connect timeout when a cluster names none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Wasm runtimes Envoy can be built with; host-shim runs any of them on wasmtime.
const RUNTIMES: &[&str] = &[
    "envoy.wasm.runtime.v8",
    "envoy.wasm.runtime.wasmtime",
    "envoy.wasm.runtime.wamr",
    "envoy.wasm.runtime.wavm",
];

/// What host-shim runs, read from an Envoy bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyConfig {
    /// The one listener's address.
    pub listener: SocketAddress,
    /// The HTTP connection manager's `stat_prefix`.
    pub stat_prefix: String,
    /// How long a stream may wait with no progress (a filter that never resumes), Envoy's
    /// `stream_idle_timeout`: 300 s unless set; `None` when set to `0s` (disabled).
    pub stream_idle_timeout: Option<Duration>,
    /// The HTTP connection manager's request handling: addresses and forwarding headers,
    /// request header and idle timers, underscores, path normalisation.
    pub connection_manager: ConnectionManagerConfig,
    /// `overload_manager`'s `global_downstream_max_connections` monitor.
    pub max_downstream_connections: Option<u64>,
    pub admin: Option<SocketAddress>,
    /// In order: the first match wins, as in Envoy.
    pub routes: Vec<RouteEntry>,
    pub wasm: Option<WasmFilter>,
    pub clusters: BTreeMap<String, Cluster>,
}

/// An address as written in the yaml: an IP or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAddress {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// `name`, empty when absent (Envoy's `xds.route_name` is then empty too).
    pub name: String,
    pub matcher: PathMatch,
    pub cluster: String,
    /// As written: `None` = Envoy's default ([`DEFAULT_ROUTE_TIMEOUT`]), `Some(0)` = no timeout.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// `match.prefix`: the request's `:path` starts with it.
    Prefix(String),
    /// `match.path`: the request's `:path` without its query string equals it.
    Path(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmFilter {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub runtime: String,
    /// The plugin's configuration (`proxy_on_configure`): a StringValue's `value`, or a Struct
    /// as JSON; empty when absent.
    pub configuration: String,
    /// The VM's configuration (`proxy_on_vm_start`), likewise.
    pub vm_configuration: String,
    /// `code.local.filename`, resolved against the yaml's directory when relative.
    pub code_path: PathBuf,
    /// `failure_policy`, or the deprecated `fail_open` (see [`FailurePolicy`]).
    pub failure_policy: crate::vm::FailurePolicy,
    /// `reload_config.backoff.base_interval`: after a trap, `FAIL_RELOAD` loads a new VM at the
    /// first request at least this long (plus up to half again, at random) after the last load.
    pub reload_base_interval: Duration,
    /// `vm_config.environment_variables`: `key_values`, then `host_env_keys` present in this
    /// process's environment; WASI `environ_*` shows these to the plugin.
    pub environment: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub connect_timeout: Duration,
    pub discovery: DiscoveryType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
}

/// Why a bootstrap was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid YAML: {message}")]
    Yaml {
        /// 1-based, when the parser knows it.
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A field outside the subset, a wrong type or value, or a missing required field.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// A cluster override that cannot be applied.
    #[error("{message}")]
    Override { name: String, message: String },
}

impl EnvoyConfigError {
    /// The yaml path the error is about, for [`EnvoyConfigError::Invalid`].
    pub fn path(&self) -> Option<&str> {
        match self {
            EnvoyConfigError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }
}

type Result<T, E = EnvoyConfigError> = std::result::Result<T, E>;

impl EnvoyConfig {
    /// Reads and checks a bootstrap file.
    pub fn load(path: &Path) -> Result<EnvoyConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| EnvoyConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        EnvoyConfig::from_yaml_str(&text, base_dir)
    }

    /// Parses a bootstrap; relative plugin paths are resolved against `base_dir`.
    pub fn from_yaml_str(yaml: &str, base_dir: &Path) -> Result<EnvoyConfig> {
        let value: Value = serde_yaml::from_str(yaml).map_err(|e| {
            let location = e.location();
            EnvoyConfigError::Yaml {
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                message: e.to_string(),
            }
        })?;
        parse_bootstrap(Node::root(&value), base_dir)
    }

    /// Points cluster `name` at `addr` (`HOST:PORT` or `[V6]:PORT`), as `--cluster NAME=ADDR`.
    pub fn override_cluster(&mut self, name: &str, addr: &str) -> Result<()> {
        let fail = |message: String| EnvoyConfigError::Override {
            name: name.to_string(),
            message,
        };
        let known = self.clusters.keys().cloned().collect::<Vec<_>>().join(", ");
        let Some(cluster) = self.clusters.get_mut(name) else {
            return Err(fail(format!(
                "unknown cluster {name:?}; the yaml defines: {known}"
            )));
        };
        let parsed =
            SocketAddress::parse(addr).map_err(|e| fail(format!("cluster {name}: {e}")))?;
        if parsed.port == 0 {
            return Err(fail(format!("cluster {name}: port 0 in {addr:?}")));
        }
        cluster.host = parsed.host;
        cluster.port = parsed.port;
        Ok(())
    }

    /// Applies `NAME=HOST:PORT` (the `--cluster` flag's form).
    pub fn apply_cluster_override(&mut self, spec: &str) -> Result<()> {
        let Some((name, addr)) = spec.split_once('=') else {
            return Err(EnvoyConfigError::Override {
                name: spec.to_string(),
                message: format!("{spec:?}: expected NAME=HOST:PORT"),
            });
        };
        self.override_cluster(name.trim(), addr.trim())
    }

    /// The route for a request's `:path`: the first that matches, as in Envoy.
    pub fn route_for(&self, path: &str) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| r.matcher.matches(path))
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Path(exact) => path.split('?').next() == Some(exact.as_str()),
        }
    }
}

impl Cluster {
    /// The cluster's one endpoint.
    pub fn address(&self) -> SocketAddress {
        SocketAddress {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

impl RouteEntry {
    /// The timeout to apply: the route's, else Envoy's default; `None` when disabled (`0s`).
    pub fn effective_timeout(&self) -> Option<Duration> {
        let t = self.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT);
        (!t.is_zero()).then_some(t)
    }
}

impl SocketAddress {
    /// `HOST:PORT` or `[V6]:PORT`.
    pub fn parse(s: &str) -> Result<SocketAddress, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((host, port)) = rest.split_once("]:") else {
                return Err(format!("address {s:?}: expected [IPV6]:PORT"));
            };
            (host, port)
        } else {
            match s.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(format!("address {s:?}: write IPv6 in brackets, [::1]:PORT"))
                }
                Some(hp) => hp,
                None => return Err(format!("address {s:?}: expected HOST:PORT")),
            }
        };
        if host.is_empty() {
            return Err(format!("address {s:?}: the host is empty"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("address {s:?}: port {port:?} is not a number from 0 to 65535"))?;
        Ok(SocketAddress {
            host: host.to_string(),
            port,
        })
    }

    /// The address as a `SocketAddr` when the host is an IP literal.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        krowoc_relay::HostPort(&self.host, self.port).fmt(f)
    }
}

/// Parses an Envoy (protobuf JSON) duration: seconds with up to 9 decimals and an `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let Some(number) = s.strip_suffix('s') else {
        return Err(format!(
            "{s:?} is not a duration; write seconds like \"5s\" or \"0.25s\""
        ));
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(fraction)
        || fraction.len() > 9
        || whole.len() > 12
    {
        return Err(format!(
            "{s:?} is not a duration; write seconds like \"5s\" or \"0.25s\""
        ));
    }
    let secs: u64 = whole
        .parse()
        .map_err(|_| format!("{s:?}: seconds out of range"))?;
    let nanos: u32 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}")
            .parse()
            .map_err(|_| format!("{s:?}: bad fraction"))?
    };
    Ok(Duration::new(secs, nanos))
}

// ---------------------------------------------------------------------------------------------
// Walking the YAML with paths

#[derive(Clone)]
struct Node<'a> {
    value: &'a Value,
    path: String,
}

struct Object<'a> {
    map: &'a Mapping,
    path: String,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn invalid(path: &str, message: impl Into<String>) -> EnvoyConfigError {
    EnvoyConfigError::Invalid {
        path: if path.is_empty() {
            "(top level)".into()
        } else {
            path.to_string()
        },
        message: message.into(),
    }
}

impl<'a> Node<'a> {
    fn root(value: &'a Value) -> Node<'a> {
        Node {
            value,
            path: String::new(),
        }
    }

    fn invalid(&self, message: impl Into<String>) -> EnvoyConfigError {
        invalid(&self.path, message)
    }

    fn expected(&self, what: &str) -> EnvoyConfigError {
        self.invalid(format!("expected {what}, found {}", describe(self.value)))
    }

    /// A mapping whose keys are all among `fields`.
    fn object(&self, fields: &[&str]) -> Result<Object<'a>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.expected("a mapping"));
        };
        for key in map.keys() {
            let Value::String(key) = key else {
                return Err(self.invalid(format!("keys must be strings, found {}", describe(key))));
            };
            if !fields.contains(&key.as_str()) {
                return Err(invalid(
                    &join(&self.path, key),
                    format!(
                        "field not supported by host-shim (fields read here: {})",
                        fields.join(", ")
                    ),
                ));
            }
        }
        Ok(Object {
            map,
            path: self.path.clone(),
        })
    }

    fn list(&self) -> Result<Vec<Node<'a>>> {
        let Value::Sequence(items) = self.value else {
            return Err(self.expected("a list"));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// A list of exactly one item.
    fn only_one(&self, what: &str) -> Result<Node<'a>> {
        let mut items = self.list()?;
        match items.len() {
            0 => Err(self.invalid(format!("needs one {what}, the list is empty"))),
            1 => Ok(items.remove(0)),
            _ => Err(items[1].invalid(format!("host-shim supports exactly one {what}"))),
        }
    }

    fn string(&self) -> Result<&'a str> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    fn boolean(&self) -> Result<bool> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.expected("true or false")),
        }
    }

    fn port(&self) -> Result<u16> {
        match self.value.as_u64() {
            Some(n) if n <= u64::from(u16::MAX) => Ok(n as u16),
            _ => Err(self.expected("a port number from 0 to 65535")),
        }
    }

    /// An integer from `min` to `max`.
    fn integer(&self, min: u64, max: u64) -> Result<u64> {
        match self.value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.expected(&format!("an integer from {min} to {max}"))),
        }
    }

    fn duration(&self) -> Result<Duration> {
        let s = self
            .string()
            .map_err(|_| self.expected("a duration string such as \"5s\""))?;
        parse_duration(s).map_err(|e| self.invalid(e))
    }

    /// One of `allowed` (case-insensitive); returned uppercased.
    fn enumeration(&self, allowed: &[&str]) -> Result<String> {
        let s = self.string()?;
        let upper = s.to_ascii_uppercase();
        if allowed.contains(&upper.as_str()) {
            Ok(upper)
        } else {
            Err(self.invalid(format!(
                "{s:?} is not supported by host-shim (one of: {})",
                allowed.join(", ")
            )))
        }
    }
}

impl<'a> Object<'a> {
    /// The field, unless absent or null.
    fn get(&self, key: &str) -> Option<Node<'a>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node {
                value,
                path: join(&self.path, key),
            }),
        }
    }

    fn req(&self, key: &str) -> Result<Node<'a>> {
        self.get(key)
            .ok_or_else(|| invalid(&join(&self.path, key), "missing required field"))
    }

    fn string_or_empty(&self, key: &str) -> Result<String> {
        Ok(self
            .get(key)
            .map(|n| n.string())
            .transpose()?
            .unwrap_or("")
            .to_string())
    }
}

/// The `@type` of a typed_config mapping, before its fields are known.
fn type_url<'a>(node: &Node<'a>) -> Result<&'a str> {
    let Value::Mapping(map) = node.value else {
        return Err(node.expected("a mapping"));
    };
    match map.get("@type") {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(
            &join(&node.path, "@type"),
            format!("expected a type URL string, found {}", describe(other)),
        )),
        None => Err(invalid(
            &join(&node.path, "@type"),
            "missing required field",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The bootstrap, piece by piece

fn parse_bootstrap(root: Node<'_>, base_dir: &Path) -> Result<EnvoyConfig> {
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
        ])?;
        let name_node = c.req("name")?;
        let name = name_node.string()?.to_string();
        if name.is_empty() {
            return Err(name_node.invalid("the cluster name is empty"));
        }
        if clusters.contains_key(&name) {
            return Err(name_node.invalid(format!("cluster {name:?} is defined twice")));
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
        let lb_endpoint = locality
            .req("lb_endpoints")?
            .only_one("endpoint per cluster")?;
        let endpoint = lb_endpoint.object(&["endpoint"])?.req("endpoint")?;
        let address_node = endpoint.object(&["address"])?.req("address")?;
        let address = socket_address(&address_node)?;
        if address.port == 0 {
            return Err(invalid(
                &format!("{}.socket_address.port_value", address_node.path),
                "port 0 cannot be connected to",
            ));
        }
        if discovery == DiscoveryType::Static && address.host.parse::<IpAddr>().is_err() {
            return Err(invalid(
                &format!("{}.socket_address.address", address_node.path),
                format!(
                    "{:?} is not an IP address; a STATIC cluster needs one (use type STRICT_DNS for host names)",
                    address.host
                ),
            ));
        }
        clusters.insert(
            name.clone(),
            Cluster {
                name,
                host: address.host,
                port: address.port,
                connect_timeout,
                discovery,
            },
        );
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_envoys_seconds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "5",
            "5ms",
            "-1s",
            ".5s",
            "1.5.5s",
            "1.0000000001s",
            "s",
            "1 s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_addresses_parse_and_print() {
        let a = SocketAddress::parse("redis:6379").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("redis", 6379));
        let b = SocketAddress::parse("[::1]:80").unwrap();
        assert_eq!(b.to_string(), "[::1]:80");
        assert_eq!(b.to_socket_addr(), Some("[::1]:80".parse().unwrap()));
        assert_eq!(a.to_socket_addr(), None);
        for bad in ["redis", ":80", "x:y", "::1:80", "[::1]80", "x:70000"] {
            assert!(SocketAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exact_paths_ignore_the_query_string_and_prefixes_do_not_need_to() {
        let exact = PathMatch::Path("/api/data".into());
        assert!(exact.matches("/api/data"));
        assert!(exact.matches("/api/data?x=1"));
        assert!(!exact.matches("/api/data/1"));
        let prefix = PathMatch::Prefix("/api".into());
        assert!(prefix.matches("/api?x=1"));
        assert!(prefix.matches("/apis"));
        assert!(!prefix.matches("/ap"));
    }
}
