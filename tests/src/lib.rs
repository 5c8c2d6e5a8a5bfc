//! Support for the end-to-end tests: a whole stack from real parts, on free loopback ports —
//! a real `redis-server`, the upstream (axum, in-process on a real socket), the relay, and a
//! gateway running `envoy/envoy.yaml` with the real `plugin.wasm`: real Envoy (the reference
//! host) or host-shim, started from the same yaml with the clusters pointed at the test's ports.
//!
//! ```no_run
//! let stack = krowoc_tests::Stack::on(krowoc_tests::Host::Envoy);
//! let resp = stack.get("/health");
//! assert_eq!(resp.status, 200);
//! ```
//!
//! [`on_both_hosts!`] makes a test per host of a `fn name(host: Host)`; [`on_host_shim_only!`]
//! is for what only host-shim has, with the reason Envoy's variant is skipped (the one list of
//! such reasons).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_shim::run::{RunArgs, Running};
use krowoc_relay::cluster::ClusterConfig;
use krowoc_relay::pool::RedisEndpoint;
use krowoc_relay::tls::RedisTls;
use krowoc_relay::RelayConfig;
use krowoc_upstream::config::UpstreamConfig;
use krowoc_upstream::AppState;
use serde_json::Value;
use testkit::cluster::RedisCluster;
use testkit::envoy::{EnvoyProcess, Loopback};
pub use testkit::http::Response;
pub use testkit::link::Link;
use testkit::tls::{CertFiles, TestCa};
pub use testkit::RedisServer;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The built plugin: `KROWOC_PLUGIN_WASM`, else the wasm profile's output under the workspace's
/// target dir. Panics with the command to run when it is missing.
pub fn plugin_wasm() -> PathBuf {
    let path = std::env::var_os("KROWOC_PLUGIN_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = std::env::var_os("KROWOC_WASM_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target/wasm32-wasip1/wasm"));
            dir.join("krowoc_plugin.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-plugin` (or `cargo xtask test`, which builds it)",
        path.display()
    );
    path
}

/// The plugin as stock Envoy loads it (no Higress imports): `KROWOC_STOCK_PLUGIN_WASM`, else
/// xtask's stock build under the workspace's target dir.
pub fn stock_plugin_wasm() -> PathBuf {
    let path = std::env::var_os("KROWOC_STOCK_PLUGIN_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/stock-plugin/wasm32-wasip1/wasm/krowoc_plugin.wasm")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// The proxy a gateway runs the plugin in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Real Envoy (`KROWOC_ENVOY`, installed by `cargo xtask test`), the stock plugin build.
    Envoy,
    /// host-shim, in this process, the plugin with Higress's Redis calls.
    HostShim,
}

/// One `#[test]` per host for each named `fn name(host: Host)`: `name::envoy` and
/// `name::host_shim` (a module and a function may share a name).
#[macro_export]
macro_rules! on_both_hosts {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn envoy() {
                super::$name($crate::Host::Envoy)
            }
            #[test]
            fn host_shim() {
                super::$name($crate::Host::HostShim)
            }
        }
    )+};
}

/// Tests of what only host-shim (and Higress) has: `name::host_shim` runs, `name::envoy` is
/// listed as ignored with the reason. Every feature a host lacks is one arm here, so the
/// reasons stand in one place.
#[macro_export]
macro_rules! on_host_shim_only {
    (redis_call: $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            #[ignore = "stock Envoy has no proxy_redis_call (Higress's ABI extension): \
                        transport redis_call runs in host-shim and Higress only"]
            fn envoy() {}
            #[test]
            fn host_shim() {
                super::$name($crate::Host::HostShim)
            }
        }
    )+};
    (host_api: $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            #[ignore = "drives host-shim's own API (its run arguments and startup errors); \
                        the Envoy side of the same contract is tested through its process"]
            fn envoy() {}
            #[test]
            fn host_shim() {
                super::$name($crate::Host::HostShim)
            }
        }
    )+};
}

/// The shipped Envoy configuration.
pub fn envoy_yaml() -> PathBuf {
    workspace_root().join("envoy/envoy.yaml")
}

/// Points a plugin configuration (envoy.yaml's) at Redis through `transport` (`relay` or
/// `redis_call`), dropping the settings the other transport uses and keeping the rest.
pub fn use_transport(cfg: &mut Value, transport: &str) {
    let redis = cfg
        .as_object_mut()
        .expect("plugin configuration is an object")
        .entry("redis")
        .or_insert_with(|| serde_json::json!({}));
    let redis = redis.as_object_mut().expect("redis is an object");
    redis.insert("transport".into(), serde_json::json!(transport));
    if transport == "redis_call" {
        redis.insert("cluster".into(), serde_json::json!("redis"));
        redis.remove("token");
        redis.remove("authority");
    } else {
        redis.insert("cluster".into(), serde_json::json!("redis_relay"));
        redis.remove("username");
        redis.remove("password");
        redis.remove("database");
    }
}

/// The route named `name` in a plugin configuration (envoy.yaml's, for tests that change one
/// route's policy).
pub fn route_named<'a>(cfg: &'a mut Value, name: &str) -> &'a mut Value {
    cfg["routes"]
        .as_array_mut()
        .expect("the configuration has routes")
        .iter_mut()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("the configuration has no route {name:?}"))
}

/// The relay token the shipped configuration uses, if any.
pub fn yaml_plugin_config() -> Value {
    let text = std::fs::read_to_string(envoy_yaml()).expect("read envoy/envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse envoy/envoy.yaml");
    let json = plugin_config_node(&yaml)
        .and_then(|v| v.as_str())
        .expect("envoy.yaml has the wasm filter's configuration value");
    serde_json::from_str(json).expect("the plugin configuration in envoy.yaml is JSON")
}

fn http_filters(yaml: &serde_yaml::Value) -> Option<&serde_yaml::Value> {
    yaml.get("static_resources")?
        .get("listeners")?
        .get(0)?
        .get("filter_chains")?
        .get(0)?
        .get("filters")?
        .get(0)?
        .get("typed_config")?
        .get("http_filters")
}

fn plugin_config_node(yaml: &serde_yaml::Value) -> Option<&serde_yaml::Value> {
    http_filters(yaml)?
        .as_sequence()?
        .iter()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some("envoy.filters.http.wasm"))?
        .get("typed_config")?
        .get("config")?
        .get("configuration")?
        .get("value")
}

/// Writes a copy of envoy.yaml whose plugin configuration is `config`.
pub fn write_yaml_with_plugin_config(dir: &Path, config: &Value) -> PathBuf {
    write_yaml(dir, config, None)
}

/// Writes a copy of envoy.yaml whose plugin configuration is `config`, its connection manager
/// changed by `edit`.
fn write_yaml(dir: &Path, config: &Value, edit: Option<&ConnectionManagerEdit>) -> PathBuf {
    let text = std::fs::read_to_string(envoy_yaml()).expect("read envoy/envoy.yaml");
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse envoy/envoy.yaml");
    if let Some(edit) = edit {
        edit(connection_manager(&mut yaml));
    }
    wasm_filter(&mut yaml)["typed_config"]["config"]["configuration"]["value"] =
        serde_yaml::Value::String(config.to_string());
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, serde_yaml::to_string(&yaml).expect("yaml")).expect("write yaml");
    // The plugin path in the yaml is relative to its directory; tests always pass --plugin.
    path
}

/// The Wasm filter's entry in envoy.yaml's `http_filters`.
fn wasm_filter(yaml: &mut serde_yaml::Value) -> &mut serde_yaml::Value {
    yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"]
        .as_sequence_mut()
        .expect("http_filters")
        .iter_mut()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some("envoy.filters.http.wasm"))
        .expect("the wasm filter")
}

/// A change to the plugin configuration taken from envoy.yaml.
pub type ConfigEdit = Box<dyn Fn(&mut Value)>;
/// A change to envoy.yaml's HTTP connection manager (its `typed_config` mapping).
pub type ConnectionManagerEdit = Box<dyn Fn(&mut serde_yaml::Mapping)>;

/// envoy.yaml's HTTP connection manager settings (`typed_config` of the listener's one filter).
pub fn connection_manager(yaml: &mut serde_yaml::Value) -> &mut serde_yaml::Mapping {
    yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        .as_mapping_mut()
        .expect("envoy.yaml has an HTTP connection manager")
}

/// A connection-manager edit giving envoy.yaml's catch-all route (`prefix: /`) the response
/// timeout `timeout` (e.g. `"1s"`), so a test need not wait the shipped one out.
pub fn catch_all_timeout(timeout: &'static str) -> ConnectionManagerEdit {
    Box::new(move |hcm| {
        let routes = &mut hcm["route_config"]["virtual_hosts"][0]["routes"];
        for route in routes.as_sequence_mut().expect("routes") {
            if route["match"]["prefix"] == "/" {
                route["route"]["timeout"] = timeout.into();
            }
        }
    })
}

/// How to start a [`Stack`].
pub struct StackOptions {
    pub host: Host,
    /// Changes the plugin configuration from envoy.yaml before starting.
    pub plugin_config: Option<ConfigEdit>,
    /// Changes envoy.yaml's connection manager before starting (both hosts run the result).
    pub connection_manager: Option<ConnectionManagerEdit>,
    pub workers: usize,
    /// The upstream's slow delays (0 keeps tests fast).
    pub upstream_delay: Duration,
    /// The relay's `--max-body-bytes` (None: its default).
    pub relay_max_body_bytes: Option<usize>,
    /// Puts the relay and the upstream behind [`Link`]s the test can cut (a killed process)
    /// and restore ([`Stack::relay_link`], [`Stack::upstream_link`]).
    pub cuttable: bool,
    /// Create the filter's least-privilege ACL user ([`FILTER_ACL_USER`], the rules of
    /// `krowoc_relay::acl` for `redis.key_prefix` and every configured event channel) and make
    /// the relay, and transport `redis_call`, log in as it. The upstream stays `default`.
    pub filter_acl_user: bool,
    /// Redis also listens for TLS (a test CA, client certificates required), and the filter
    /// reaches it only that way: the relay with `rediss://` and a client certificate, transport
    /// `redis_call` through a TLS `transport_socket` on envoy.yaml's `redis` cluster. The
    /// upstream and the test's own commands use the plain port.
    pub redis_tls: bool,
    /// The relay relays to a Redis Cluster (3 masters, no replicas; [`Stack::cluster`])
    /// instead of [`Stack::redis`], which the upstream keeps using. With `redis_tls`, the
    /// cluster is reached over TLS (no client certificate asked).
    pub redis_cluster: bool,
}

/// The ACL user and password [`StackOptions::filter_acl_user`] creates.
pub const FILTER_ACL_USER: (&str, &str) = ("krowoc-edge", "krowoc-edge-test-password");

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            host: Host::HostShim,
            plugin_config: None,
            connection_manager: None,
            workers: 2,
            upstream_delay: Duration::ZERO,
            relay_max_body_bytes: None,
            cuttable: false,
            filter_acl_user: false,
            redis_tls: false,
            redis_cluster: false,
        }
    }
}

/// Gives the yaml's `redis` cluster an Envoy TLS `transport_socket`: trust `ca`, show `client`,
/// ask for `localhost`.
fn add_redis_transport_socket(yaml_path: &Path, ca: &Path, client: &CertFiles) {
    let text = std::fs::read_to_string(yaml_path).expect("read the stack's yaml");
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse the yaml");
    let socket: serde_yaml::Value = serde_yaml::to_value(serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "validation_context": {"trusted_ca": {"filename": ca}},
                "tls_certificates": [{
                    "certificate_chain": {"filename": client.cert},
                    "private_key": {"filename": client.key}
                }]
            }
        }
    }))
    .expect("transport_socket as YAML");
    let cluster = yaml["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters")
        .iter_mut()
        .find(|c| c["name"] == "redis")
        .expect("envoy.yaml has the redis cluster");
    cluster["transport_socket"] = socket;
    std::fs::write(yaml_path, serde_yaml::to_string(&yaml).expect("yaml")).expect("write yaml");
}

/// Makes the yaml's `redis` cluster a Redis Cluster as Envoy describes one: `cluster_type`
/// `envoy.clusters.redis` with `seeds` as its endpoints.
fn use_redis_cluster_type(yaml_path: &Path, seeds: &str) {
    let text = std::fs::read_to_string(yaml_path).expect("read the stack's yaml");
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse the yaml");
    let endpoints: Vec<serde_json::Value> = seeds
        .split(',')
        .map(|seed| {
            let (host, port) = seed.rsplit_once(':').expect("host:port");
            serde_json::json!({"endpoint": {"address": {"socket_address": {
                "address": host, "port_value": port.parse::<u16>().expect("port")}}}})
        })
        .collect();
    let cluster = yaml["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters")
        .iter_mut()
        .find(|c| c["name"] == "redis")
        .expect("envoy.yaml has the redis cluster");
    let map = cluster.as_mapping_mut().expect("a mapping");
    map.remove("type");
    map.remove("dns_lookup_family");
    map.insert(
        "cluster_type".into(),
        serde_yaml::to_value(serde_json::json!({
            "name": "envoy.clusters.redis",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.redis.v3.RedisClusterConfig",
                "cluster_refresh_rate": "5s"
            }
        }))
        .expect("cluster_type as YAML"),
    );
    map.insert(
        "load_assignment".into(),
        serde_yaml::to_value(serde_json::json!({
            "cluster_name": "redis",
            "endpoints": [{"lb_endpoints": endpoints}]
        }))
        .expect("load_assignment as YAML"),
    );
    std::fs::write(yaml_path, serde_yaml::to_string(&yaml).expect("yaml")).expect("write yaml");
}

/// `ACL SETUSER` of [`FILTER_ACL_USER`] for the plugin configuration `config`: its
/// `redis.key_prefix` (default `krowoc:`) and every `channel` it names.
pub fn create_filter_acl_user(redis: &RedisServer, config: &Value) {
    let prefix = config["redis"]["key_prefix"].as_str().unwrap_or("krowoc:");
    let channels = plugin_config_channels(config);
    let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
    let (user, password) = FILTER_ACL_USER;
    let mut args = vec!["ACL".to_string(), "SETUSER".into(), user.into()];
    args.extend(krowoc_relay::acl::filter_user_rules(prefix, &channels));
    args.push(format!(">{password}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&args), "OK", "{args:?}");
}

/// How many commands, keys and channels `redis`'s ACL denied: the `count`s of `ACL LOG`
/// (Redis 7.0's INFO has no such counter).
pub fn acl_denied_on(redis: &RedisServer) -> i64 {
    let log = redis.cli(&["ACL", "LOG", "1000"]);
    let lines: Vec<&str> = log.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "count")
        .map(|w| w[1].parse::<i64>().unwrap_or(0))
        .sum()
}

/// Every event `channel` a plugin configuration names (top level and routes), once each.
pub fn plugin_config_channels(config: &Value) -> Vec<String> {
    let mut channels = Vec::new();
    collect_channels(config, &mut channels);
    channels
}

fn collect_channels(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v.as_str()) {
                    ("channel", Some(c)) if !out.iter().any(|o| o == c) => out.push(c.to_string()),
                    _ => collect_channels(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_channels(v, out)),
        _ => {}
    }
}

/// A gateway the stack started; it stops on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    process: GatewayProcess,
}

enum GatewayProcess {
    /// The running host-shim and its `--log-path` file.
    HostShim(Option<Running>, PathBuf),
    Envoy(EnvoyProcess),
}

impl Gateway {
    /// What the gateway logged: Envoy's log file; host-shim's plugin log lines (its own logs
    /// go to the test's output).
    pub fn log(&self) -> String {
        match &self.process {
            GatewayProcess::Envoy(e) => e.log_text(),
            GatewayProcess::HostShim(_, log) => std::fs::read_to_string(log).unwrap_or_default(),
        }
    }

    pub fn get(&self, path: &str) -> Response {
        testkit::http::get(self.addr, path)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        testkit::http::request(self.addr, method, path, headers, body)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let GatewayProcess::HostShim(running, _) = &mut self.process {
            if let Some(r) = running.take() {
                r.stop();
            }
        }
    }
}

/// A running stack; everything stops on drop.
pub struct Stack {
    pub host: Host,
    pub redis: RedisServer,
    /// With [`StackOptions::redis_cluster`]: the cluster the relay uses.
    pub cluster: Option<RedisCluster>,
    /// Its seeds as the filter reaches them: the TLS ports with [`StackOptions::redis_tls`].
    cluster_seeds: Option<String>,
    pub upstream: SocketAddr,
    pub upstream_state: AppState,
    pub relay: SocketAddr,
    /// In front of the relay and the upstream when [`StackOptions::cuttable`]: `relay` and
    /// `upstream` are then the links' addresses.
    pub relay_link: Option<Link>,
    pub upstream_link: Option<Link>,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub yaml: PathBuf,
    gateways: Vec<Gateway>,
    rt: tokio::runtime::Runtime,
    /// With [`StackOptions::redis_tls`]: the CA and the server's and the filter's certificates.
    tls: Option<(TestCa, CertFiles, CertFiles)>,
    dir: tempfile::TempDir,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with(StackOptions::default())
    }

    /// The default stack with its gateway on `host`.
    pub fn on(host: Host) -> Stack {
        Stack::start_with(StackOptions {
            host,
            ..StackOptions::default()
        })
    }

    pub fn start_with(options: StackOptions) -> Stack {
        let tls = options.redis_tls.then(|| {
            let ca = TestCa::new("krowoc test CA");
            let server = ca.issue_server(&["localhost", "127.0.0.1"]);
            let client = ca.issue_client("krowoc-edge");
            (ca, server, client)
        });
        let redis = match &tls {
            Some((ca, server, _)) => RedisServer::start_tls(ca, server, true),
            None => RedisServer::start(),
        };
        let cluster = options.redis_cluster.then(|| match &tls {
            // Over TLS too (the nodes' bus as well), on the TLS ports the filter then uses.
            Some((ca, _, _)) => {
                RedisCluster::start_tls(3, 0, ca, &ca.issue_peer(&["localhost", "127.0.0.1"]))
            }
            None => RedisCluster::start(3, 0),
        });
        let cluster_seeds = cluster.as_ref().map(|c| match &tls {
            Some(_) => c.tls_seeds(),
            None => c.seeds(),
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");

        let mut plugin_config = yaml_plugin_config();
        if let Some(change) = &options.plugin_config {
            change(&mut plugin_config);
        }
        let acl_user = options.filter_acl_user.then(|| {
            create_filter_acl_user(&redis, &plugin_config);
            for node in cluster.iter().flat_map(|c| (0..c.len()).map(|i| c.node(i))) {
                create_filter_acl_user(node, &plugin_config);
            }
            if plugin_config["redis"]["transport"] == "redis_call" {
                let (user, password) = FILTER_ACL_USER;
                plugin_config["redis"]["username"] = Value::from(user);
                plugin_config["redis"]["password"] = Value::from(password);
            }
            FILTER_ACL_USER
        });
        let yaml = write_yaml(
            dir.path(),
            &plugin_config,
            options.connection_manager.as_ref(),
        );
        if let Some((ca, _, client)) = &tls {
            add_redis_transport_socket(&yaml, &ca.ca_file(), client);
        }
        if let Some(cluster) = &cluster {
            use_redis_cluster_type(&yaml, cluster_seeds.as_deref().unwrap_or(&cluster.seeds()));
        }
        let token = plugin_config["redis"]["token"].as_str().map(str::to_string);

        let upstream_config = UpstreamConfig {
            redis: krowoc_upstream::RedisDeployment::standalone(redis.url()),
            cached_data_delay: options.upstream_delay,
            slow_delay: options.upstream_delay,
            subscriber_backoff_initial: Duration::from_millis(50),
            subscriber_backoff_max: Duration::from_millis(500),
            ..UpstreamConfig::default()
        };
        let (upstream, upstream_state) = rt.block_on(async {
            let state = AppState::start(upstream_config).expect("upstream state");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind upstream");
            let addr = listener.local_addr().expect("upstream addr");
            let app = krowoc_upstream::app(state.clone());
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            (addr, state)
        });

        let relay_tls = tls.as_ref().map(|(ca, _, client)| {
            RedisTls::new(Some(&ca.ca_file()), Some((&client.cert, &client.key)))
                .expect("the relay's TLS configuration")
        });
        let relay_url = match &tls {
            Some(_) => redis.tls_url(),
            None => redis.url(),
        };
        let relay = rt.block_on(async {
            let mut endpoint = RedisEndpoint::from_url(&relay_url).expect("redis url");
            if let Some((user, password)) = acl_user {
                endpoint.username = Some(user.to_string());
                endpoint.password = Some(password.to_string());
            }
            let mut config = RelayConfig::new(endpoint.clone());
            config.tls = relay_tls.clone();
            if let Some(seeds) = &cluster_seeds {
                config.cluster = Some(ClusterConfig {
                    seeds: seeds
                        .split(',')
                        .map(|s| {
                            let (host, port) = s.rsplit_once(':').expect("host:port");
                            (host.to_string(), port.parse().expect("port"))
                        })
                        .collect(),
                    login: endpoint,
                    tls: relay_tls,
                    connections: config.pool_size,
                    refresh: krowoc_relay::cluster::DEFAULT_REFRESH,
                });
            }
            config.token = token;
            if let Some(max) = options.relay_max_body_bytes {
                config.max_body_bytes = max;
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind relay");
            let addr = listener.local_addr().expect("relay addr");
            tokio::spawn(krowoc_relay::serve(listener, config));
            addr
        });

        let (relay_link, upstream_link) = if options.cuttable {
            (Some(Link::start(relay)), Some(Link::start(upstream)))
        } else {
            (None, None)
        };
        let relay = relay_link.as_ref().map_or(relay, |l| l.addr);
        let upstream = upstream_link.as_ref().map_or(upstream, |l| l.addr);

        let mut stack = Stack {
            host: options.host,
            redis,
            cluster,
            cluster_seeds,
            upstream,
            upstream_state,
            relay,
            relay_link,
            upstream_link,
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            yaml,
            gateways: Vec::new(),
            rt,
            tls,
            dir,
        };
        let (gateway, admin) = stack.start_gateway(options.workers);
        stack.gateway = gateway;
        stack.admin = admin;
        stack
    }

    /// The `redis` cluster's `--cluster` override: the Redis Cluster's seeds with
    /// [`StackOptions::redis_cluster`], else [`Stack::redis_gateway_addr`].
    fn redis_override(&self) -> String {
        match &self.cluster_seeds {
            Some(seeds) => seeds.clone(),
            None => self.redis_gateway_addr().to_string(),
        }
    }

    /// Where gateways reach Redis (its `redis` cluster): the TLS port with
    /// [`StackOptions::redis_tls`].
    pub fn redis_gateway_addr(&self) -> SocketAddr {
        match &self.tls {
            Some(_) => SocketAddr::from(([127, 0, 0, 1], self.redis.tls_port())),
            None => self.redis.addr(),
        }
    }

    /// The `run` arguments for a gateway on free ports in front of this stack's parts.
    pub fn run_args(&self, workers: usize) -> RunArgs {
        RunArgs {
            config: self.yaml.clone(),
            clusters: vec![
                format!("upstream={}", self.upstream),
                format!("redis_relay={}", self.relay),
                format!("redis={}", self.redis_override()),
            ],
            plugin: Some(plugin_wasm()),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            workers: Some(workers),
            callback_deadline_ms: 1000,
            vm_memory_mib: 256,
            log_path: None,
        }
    }

    /// Starts another gateway on the same Redis, relay and upstream (e.g. to show that two
    /// gateways share one limit); returns its listener and admin addresses.
    pub fn start_gateway(&mut self, workers: usize) -> (SocketAddr, SocketAddr) {
        let gateway = self.spawn_gateway(workers, &[]);
        let addrs = (gateway.addr, gateway.admin);
        self.gateways.push(gateway);
        addrs
    }

    /// A gateway on this stack's host whose clusters are this stack's parts, except those in
    /// `clusters` (name, address); the caller owns it.
    pub fn spawn_gateway(&self, workers: usize, clusters: &[(&str, SocketAddr)]) -> Gateway {
        self.spawn_gateway_on(self.host, workers, clusters)
    }

    /// Like [`Stack::spawn_gateway`], on `host` whatever the stack's own (the differential
    /// suite runs both hosts in front of the same parts).
    pub fn spawn_gateway_on(
        &self,
        host: Host,
        workers: usize,
        clusters: &[(&str, SocketAddr)],
    ) -> Gateway {
        let module = match host {
            Host::Envoy => stock_plugin_wasm(),
            Host::HostShim => plugin_wasm(),
        };
        self.spawn(host, workers, clusters, &self.yaml, &module)
    }

    /// A gateway on `host` that loads `module` with the plugin configuration `configuration`
    /// (a test guest), otherwise as [`Stack::spawn_gateway_on`].
    pub fn spawn_module_on(
        &self,
        host: Host,
        workers: usize,
        clusters: &[(&str, SocketAddr)],
        module: &Path,
        configuration: &str,
    ) -> Gateway {
        let dir = tempfile::tempdir_in(self.dir.path()).expect("guest yaml dir");
        let text = std::fs::read_to_string(&self.yaml).expect("read the stack's yaml");
        let mut yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse the yaml");
        wasm_filter(&mut yaml)["typed_config"]["config"]["configuration"]["value"] =
            serde_yaml::Value::String(configuration.to_string());
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, serde_yaml::to_string(&yaml).expect("yaml")).expect("write yaml");
        let _ = dir.keep();
        self.spawn(host, workers, clusters, &path, module)
    }

    fn spawn(
        &self,
        host: Host,
        workers: usize,
        clusters: &[(&str, SocketAddr)],
        yaml: &Path,
        module: &Path,
    ) -> Gateway {
        let mut all: Vec<(String, SocketAddr)> = vec![
            ("upstream".into(), self.upstream),
            ("redis_relay".into(), self.relay),
            ("redis".into(), self.redis_gateway_addr()),
        ];
        for (name, addr) in clusters {
            all.retain(|(n, _)| n != name);
            all.push((name.to_string(), *addr));
        }
        // The directory (logs, yaml) stays for a failing test to read; the stack's temp dir
        // removes it.
        let dir = tempfile::tempdir_in(self.dir.path())
            .expect("gateway dir")
            .keep();
        match host {
            Host::HostShim => {
                let mut args = self.run_args(workers);
                args.config = yaml.to_path_buf();
                args.plugin = Some(module.to_path_buf());
                args.clusters = all
                    .iter()
                    .map(|(n, a)| match (n.as_str(), &self.cluster) {
                        // A Redis Cluster's seeds, for its `envoy.clusters.redis` cluster.
                        ("redis", Some(_)) => format!("{n}={}", self.redis_override()),
                        _ => format!("{n}={a}"),
                    })
                    .collect();
                let log = dir.join("plugin.log");
                args.log_path = Some(log.clone());
                let running = self
                    .rt
                    .block_on(host_shim::run::start(&args))
                    .unwrap_or_else(|e| panic!("host-shim did not start: {e:#}"));
                Gateway {
                    addr: running.gateway.local_addr,
                    admin: running.admin_addr.expect("admin address"),
                    process: GatewayProcess::HostShim(Some(running), log),
                }
            }
            Host::Envoy => {
                let yaml = std::fs::read_to_string(yaml).expect("read the gateway's yaml");
                let copy = testkit::envoy::loopback_yaml(
                    &yaml,
                    &Loopback {
                        listener_port: 0,
                        admin_port: 0,
                        clusters: &all,
                        plugin: module,
                    },
                )
                .unwrap_or_else(|e| panic!("loopback copy of envoy.yaml: {e}"));
                let path = dir.join("envoy.yaml");
                std::fs::write(&path, copy).expect("write envoy.yaml");
                let envoy = EnvoyProcess::start(&testkit::envoy::binary(), &path, &dir, workers)
                    .unwrap_or_else(|e| panic!("envoy did not start: {e}"));
                Gateway {
                    addr: envoy.listener,
                    admin: envoy.admin,
                    process: GatewayProcess::Envoy(envoy),
                }
            }
        }
    }

    /// What the stack's first gateway logged (Envoy's log; empty for host-shim).
    pub fn gateway_log(&self) -> String {
        self.gateways.first().map(Gateway::log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Response {
        testkit::http::get(self.gateway, path)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        testkit::http::request(self.gateway, method, path, headers, body)
    }

    /// The gateway's Prometheus text.
    pub fn metrics(&self) -> String {
        testkit::http::get(self.admin, "/stats/prometheus").text()
    }

    /// `POST /_krowoc/cache/purge` with envoy.yaml's purge token and `directives`; asserts 200
    /// and returns the JSON answer.
    pub fn purge(&self, directives: &str) -> Value {
        let r = self.request(
            "POST",
            "/_krowoc/cache/purge",
            &[
                ("x-krowoc-purge-token", "demo-purge-token-change-me"),
                ("x-krowoc-invalidate", directives),
            ],
            b"",
        );
        assert_eq!(r.status, 200, "purge {directives}: {}", r.text());
        r.json()
    }

    /// Waits (up to 5 s) until `path` is answered from the cache.
    pub fn wait_for_hit(&self, path: &str) {
        let hit = eventually(Duration::from_secs(5), || {
            self.get(path).header("x-cache") == Some("HIT")
        });
        assert!(hit, "{path} never became a HIT");
    }

    /// The value of one metric line `name value` in the gateway's Prometheus text (0 if absent).
    pub fn metric(&self, name: &str) -> i64 {
        metric_value(&self.metrics(), name)
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.gateways.clear();
    }
}

/// Finds `name{} value` (as Envoy prints a plugin's stats) or `name value` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> i64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n.strip_suffix("{}").unwrap_or(n) == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it did.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
