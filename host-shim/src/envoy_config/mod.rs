//! Reads the Envoy v3 bootstrap (`envoy/envoy.yaml`) that Envoy itself runs, into the typed
//! model host-shim needs. One file serves production (Envoy), the demo and the tests.
//!
//! host-shim understands a documented subset of Envoy's schema and refuses everything else by
//! its full path (e.g. `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.foo:
//! field not supported by host-shim`), so a setting is never silently ignored. Wrong types and
//! missing required fields name the path and the bad value.
//!
//! This module holds the typed model and its API; `yaml` walks the YAML keeping each node's
//! path, and `bootstrap` reads the bootstrap section by section into the model.
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
//!   cluster_type (instead of type): {name: envoy.clusters.redis, typed_config:
//!     RedisClusterConfig {cluster_refresh_rate (default 5s), cluster_refresh_timeout,
//!     redirect_refresh_interval}}: a Redis Cluster for proxy_redis_call, its lb_endpoints (one
//!     or more) the seed nodes
//!   transport_socket (optional; Redis clusters only)
//!     {name: envoy.transport_sockets.tls, typed_config: UpstreamTlsContext {sni,
//!      common_tls_context.{validation_context.trusted_ca.filename (required),
//!        tls_certificates: at most one {certificate_chain.filename, private_key.filename}}}}
//! ```
//! Enum values are case-insensitive (`strict_dns` works, as in Envoy). Durations are Envoy's
//! (`"0.25s"`, `"5s"`).
//!
//! # Where host-shim differs from Envoy
//! * `code.local.filename`, when relative, is resolved against the yaml's directory (Envoy
//!   uses its working directory); `host-shim run --plugin PATH` replaces it.
//! * Cluster addresses are used as written (a name is resolved when connecting); a cluster has
//!   one endpoint. `lb_policy` and `dns_lookup_family` are checked and have no other effect.
//! * A TLS `transport_socket` is for Redis clusters (`proxy_redis_call`); a route to such a
//!   cluster is refused at startup and an HTTP call to one fails (503). host-shim always
//!   verifies the server: `trusted_ca` is required, and the certificate must be valid for `sni`
//!   (else the cluster's address), where Envoy checks a name only when told
//!   (`match_typed_subject_alt_names`).
//! * A route with no `timeout` gets Envoy's default of 15 s; `0s` means none (as in Envoy). It
//!   runs to the response's end, as in Envoy: 504 before the head, a reset after it (a
//!   streamed body such as Server-Sent Events is cut). Envoy closes that connection 1 s later
//!   (delayed close), host-shim at once.
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
//!   Envoy; requests the codec or the connection manager refuses (400, 426, 431, 501) are answered
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

mod bootstrap;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;

use crate::conn_manager::ConnectionManagerConfig;

use self::bootstrap::parse_bootstrap;
use self::yaml::Node;

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
    /// `transport_socket` `envoy.transport_sockets.tls`: connect with TLS (host-shim does so for
    /// Redis clusters, `proxy_redis_call`).
    pub tls: Option<UpstreamTls>,
    /// `cluster_type` `envoy.clusters.redis`: a Redis Cluster, its endpoints the seed nodes
    /// (`host`/`port` are the first); for `proxy_redis_call`.
    pub redis_cluster: Option<RedisClusterType>,
}

/// A Redis Cluster as Envoy's `envoy.clusters.redis` cluster type describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisClusterType {
    /// The `load_assignment` endpoints: nodes to read the slot map from.
    pub seeds: Vec<SocketAddress>,
    /// `cluster_refresh_rate` (Envoy's default 5 s).
    pub refresh: Duration,
}

/// The subset of Envoy's `UpstreamTlsContext` host-shim reads: whom to trust, which client
/// certificate to show, which name to ask for. Stricter than Envoy in one way: host-shim always
/// verifies the server's certificate against `trusted_ca`, and its name against `sni` (else the
/// cluster's address), where Envoy checks a name only with `match_typed_subject_alt_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `sni`: the server name sent and verified.
    pub sni: Option<String>,
    /// `common_tls_context.validation_context.trusted_ca.filename`.
    pub trusted_ca: PathBuf,
    /// `common_tls_context.tls_certificates[0]`: `certificate_chain.filename` and
    /// `private_key.filename` (mutual TLS).
    pub client_certificate: Option<(PathBuf, PathBuf)>,
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
        // A Redis Cluster (`envoy.clusters.redis`) takes seeds: HOST:PORT[,HOST:PORT…].
        let listed: Vec<&str> = match cluster.redis_cluster {
            Some(_) => addr.split(',').map(str::trim).collect(),
            None => vec![addr],
        };
        let mut seeds = Vec::new();
        for one in listed {
            let parsed =
                SocketAddress::parse(one).map_err(|e| fail(format!("cluster {name}: {e}")))?;
            if parsed.port == 0 {
                return Err(fail(format!("cluster {name}: port 0 in {one:?}")));
            }
            seeds.push(parsed);
        }
        let parsed = seeds[0].clone();
        if let Some(redis) = &mut cluster.redis_cluster {
            redis.seeds = seeds;
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
