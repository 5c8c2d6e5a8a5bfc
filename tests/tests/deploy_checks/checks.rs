//! The deployment checks. Each `check_*` function reads a [`Deployment`] (the repository, or a
//! copy of it with some files replaced) and returns every [`Problem`] it finds, so the shipped
//! files and deliberately broken copies go through exactly the same code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use clap::Parser;
use host_shim::envoy_config::EnvoyConfig;
use krowoc_plugin::config::{parse_config, Config, Transport};
use krowoc_relay::pool::RedisEndpoint;
use krowoc_relay::{RelayArgs, RelayConfig};

use super::compose::{Compose, Service};
use super::dockerfile::{shell_commands, Dockerfile, Stage};
use super::dockerignore::DockerIgnore;
use super::kubernetes::{self, IstioCluster, Resource};
use super::platforms::K8S_PLUGIN_DOCKERFILE;

pub const ENVOY_YAML: &str = "envoy/envoy.yaml";
pub const COMPOSE: &str = "envoy/docker-compose.yml";
pub const WASMPLUGIN: &str = "envoy/higress/wasmplugin.yaml";
pub const HIGRESS_SERVICES: &str = "envoy/higress/redis.yaml";
pub const HIGRESS_PLUGIN_DOCKERFILE: &str = "envoy/higress/plugin.Dockerfile";
pub const DOCKERIGNORE: &str = ".dockerignore";
pub const CARGO_TOML: &str = "Cargo.toml";

/// Where Envoy's image reads its bootstrap when the command does not say (`-c`).
const ENVOY_DEFAULT_CONFIG: &str = "/etc/envoy/envoy.yaml";
/// krowoc-upstream's `--listen` default (upstream/src/main.rs).
const UPSTREAM_DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const REDIS_DEFAULT_PORT: u16 = 6379;
/// The plugin's configuration keys that only say how Redis is reached; everything else must be
/// the same in envoy.yaml and the Higress variant.
const CONNECTION_KEYS: &[&str] = &[
    "transport",
    "cluster",
    "authority",
    "token",
    "username",
    "password",
    "database",
];

/// Host functions stock Envoy links into a Wasm module (proxy-wasm-cpp-host, exports.h:
/// FOR_ALL_HOST_FUNCTIONS and FOR_ALL_HOST_FUNCTIONS_ABI_SPECIFIC, with the `proxy_` prefix).
pub const ENVOY_ENV_IMPORTS: &[&str] = &[
    "proxy_log",
    "proxy_get_status",
    "proxy_set_property",
    "proxy_get_property",
    "proxy_send_local_response",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_buffer_status",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_close",
    "proxy_grpc_cancel",
    "proxy_grpc_send",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_current_time_nanoseconds",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_call_foreign_function",
    "proxy_get_configuration",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_get_log_level",
];
/// WASI preview1 functions stock Envoy provides (exports.h: FOR_ALL_WASI_FUNCTIONS).
pub const ENVOY_WASI_IMPORTS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_seek",
    "fd_close",
    "fd_fdstat_get",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "random_get",
    "proc_exit",
    "path_open",
    "fd_prestat_get",
    "fd_prestat_dir_name",
];
/// Added by Higress (docs/higress-redis-abi.md).
pub const HIGRESS_ENV_IMPORTS: &[&str] = &["proxy_redis_init", "proxy_redis_call"];

/// One thing wrong with the deployment files. Each variant names the file or service and the
/// value at fault, so a test can assert the exact problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Unreadable {
        file: String,
        message: String,
    },
    EnvoyYamlRefused {
        file: String,
        message: String,
    },
    NoWasmFilter {
        file: String,
    },
    PluginConfigRefused {
        file: String,
        errors: Vec<String>,
    },
    UnknownCluster {
        file: String,
        cluster: String,
        named_by: String,
    },
    StockEnvoyWithoutRedisCall {
        dockerfile: String,
        transport: String,
    },
    BuildFileMissing {
        service: String,
        path: String,
    },
    MountSourceMissing {
        service: String,
        source: String,
    },
    EnvoyYamlNotMounted {
        service: String,
        config_path: String,
    },
    PluginNotInImage {
        service: String,
        path: String,
    },
    NoEnvoyService,
    ServiceMissing {
        from: String,
        what: String,
        host: String,
    },
    ListenUnknown {
        service: String,
    },
    PortNotServed {
        what: String,
        service: String,
        port: u16,
        listening: u16,
    },
    ListensOnLoopback {
        service: String,
        address: String,
    },
    NoSharedNetwork {
        from: String,
        to: String,
    },
    DependsOnNotHealthy {
        service: String,
        dependency: String,
    },
    PortNotPublished {
        service: String,
        port: u16,
        what: String,
    },
    BadPort {
        service: String,
        message: String,
    },
    MissingHealthcheck {
        service: String,
    },
    HealthcheckPortMismatch {
        service: String,
        probe_port: String,
        listen_port: u16,
    },
    HealthcheckToolMissing {
        service: String,
        tool: String,
    },
    RelayArgsRefused {
        service: String,
        message: String,
    },
    RelayTokenMismatch {
        plugin: Option<String>,
        relay: Option<String>,
    },
    /// The relay logs in as a user the Redis service's ACL file does not define.
    AclUserMissing {
        user: String,
        aclfile: Option<String>,
    },
    /// The ACL file gives the relay's user other rules than the filter's (krowoc_relay::acl for
    /// envoy.yaml's key prefix and channels).
    AclUserRules {
        user: String,
        expected: String,
        found: String,
    },
    /// The ACL file does not accept the password the relay sends.
    AclPasswordMismatch {
        user: String,
    },
    UnknownNetwork {
        service: String,
        network: String,
    },
    NotInternal {
        service: String,
        network: String,
    },
    DockerfileRefused {
        dockerfile: String,
        message: String,
    },
    UnknownStage {
        dockerfile: String,
        line: usize,
        stage: String,
    },
    CopySourceMissing {
        dockerfile: String,
        line: usize,
        source: String,
    },
    CopySourceIgnored {
        dockerfile: String,
        line: usize,
        source: String,
        pattern: String,
    },
    WorkspaceMemberNotCopied {
        dockerfile: String,
        stage: String,
        member: String,
    },
    CargoBuild {
        dockerfile: String,
        line: usize,
        message: String,
    },
    PluginFeatures {
        dockerfile: String,
        line: usize,
        message: String,
    },
    ImageNotPinned {
        file: String,
        image: String,
        why: String,
    },
    EnvoyNotTested {
        dockerfile: String,
        image: String,
        tested: String,
    },
    RustTooOld {
        dockerfile: String,
        image: String,
        required: String,
    },
    DebianSuiteMismatch {
        dockerfile: String,
        builder: String,
        runtime: String,
    },
    HigressManifest {
        file: String,
        message: String,
    },
    HigressClusterUnknown {
        file: String,
        cluster: String,
        message: String,
    },
    VariantDiffers {
        file: String,
        key: String,
    },
    WasmUnreadable {
        message: String,
    },
    ImportNotProvided {
        host: String,
        module: String,
        name: String,
    },
    /// Prometheus, Grafana and their files (deploy_checks/monitoring.rs).
    Monitoring {
        file: String,
        message: String,
    },
    /// A Wasm image's final stage is not one layer holding `/plugin.wasm`.
    WasmImageLayout {
        dockerfile: String,
        message: String,
    },
    /// A Kubernetes object is well-formed but wrong for what it is for (a missing selector, a
    /// phase that runs the filter before authorization, a fail-open switch, …).
    Manifest {
        file: String,
        object: String,
        message: String,
    },
    NamespaceUnknown {
        file: String,
        object: String,
        namespace: String,
    },
    SelectorMatchesNothing {
        file: String,
        object: String,
        selector: String,
    },
    /// A Service, probe or NetworkPolicy names a port the pods do not declare or serve.
    PortMissing {
        file: String,
        object: String,
        what: String,
        port: String,
    },
    SecretMissing {
        file: String,
        object: String,
        secret: String,
        key: Option<String>,
    },
    /// A Kubernetes workload listens on another port than the one sent to.
    ListenPortMismatch {
        file: String,
        object: String,
        what: String,
        port: u16,
        listening: u16,
    },
    /// A file a container reads is in no volume it mounts.
    MountMissing {
        file: String,
        object: String,
        path: String,
    },
    /// `from` reaches `host:port`, which is no port of a Service in the manifests.
    ServiceUnknown {
        file: String,
        from: String,
        host: String,
        port: u16,
    },
    /// The plugin's `redis.cluster` is not the cluster the platform creates for the relay.
    ClusterNotGenerated {
        file: String,
        platform: String,
        cluster: String,
        message: String,
    },
    AuthorityInvalid {
        file: String,
        authority: String,
    },
    /// The plugin's `redis.token` is not the relay's token (the Secret's value).
    PluginTokenMismatch {
        file: String,
        secret: String,
    },
    /// The Redis ACL file leaves the `default` user on (anyone who reaches Redis is admitted).
    AclDefaultUserOn {
        file: String,
    },
    /// Redis or the relay is reachable beyond what must reach it.
    NotIsolated {
        file: String,
        object: String,
        message: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem::*;
        match self {
            Unreadable { file, message } => write!(f, "{file}: cannot read: {message}"),
            EnvoyYamlRefused { file, message } => write!(f, "{file}: host-shim refuses it: {message}"),
            NoWasmFilter { file } => write!(f, "{file}: no envoy.filters.http.wasm filter"),
            PluginConfigRefused { file, errors } => {
                write!(f, "{file}: the plugin refuses its configuration: {}", errors.join("; "))
            }
            UnknownCluster { file, cluster, named_by } => {
                write!(f, "{file}: cluster {cluster:?} ({named_by}) is not defined")
            }
            StockEnvoyWithoutRedisCall { dockerfile, transport } => write!(
                f,
                "{dockerfile} builds the plugin without the redis-call feature for stock Envoy, but envoy.yaml uses transport {transport:?}"
            ),
            BuildFileMissing { service, path } => write!(f, "service {service}: build file {path} does not exist"),
            MountSourceMissing { service, source } => write!(f, "service {service}: mounted {source} does not exist"),
            EnvoyYamlNotMounted { service, config_path } => write!(
                f,
                "service {service}: Envoy reads {config_path}, but envoy.yaml is not mounted there"
            ),
            PluginNotInImage { service, path } => write!(
                f,
                "service {service}: envoy.yaml loads the plugin from {path}, which is neither mounted nor copied into the image"
            ),
            NoEnvoyService => write!(f, "no compose service runs the envoyproxy/envoy image"),
            ServiceMissing { from, what, host } => {
                write!(f, "{from} reaches {what} at host {host:?}, which is not a compose service")
            }
            ListenUnknown { service } => write!(f, "service {service}: cannot tell which address it listens on"),
            PortNotServed { what, service, port, listening } => write!(
                f,
                "{what} uses {service}:{port}, but service {service} listens on port {listening}"
            ),
            ListensOnLoopback { service, address } => write!(
                f,
                "service {service} listens on {address}: loopback is unreachable from other containers"
            ),
            NoSharedNetwork { from, to } => write!(f, "services {from} and {to} share no network"),
            DependsOnNotHealthy { service, dependency } => write!(
                f,
                "service {service} does not wait for {dependency} (depends_on condition service_healthy)"
            ),
            PortNotPublished { service, port, what } => {
                write!(f, "service {service}: the {what} port {port} is not published")
            }
            BadPort { service, message } => write!(f, "service {service}: {message}"),
            MissingHealthcheck { service } => write!(f, "service {service} has no health check"),
            HealthcheckPortMismatch { service, probe_port, listen_port } => write!(
                f,
                "service {service}: the health check probes port {probe_port}, the service listens on {listen_port}"
            ),
            HealthcheckToolMissing { service, tool } => {
                write!(f, "service {service}: the health check runs {tool:?}, which the image does not contain")
            }
            RelayArgsRefused { service, message } => write!(f, "service {service}: the relay refuses its flags: {message}"),
            RelayTokenMismatch { plugin, relay } => write!(
                f,
                "the plugin's redis.token is {} but the relay's --token is {}",
                describe_secret(plugin),
                describe_secret(relay)
            ),
            AclUserMissing { user, aclfile: Some(file) } => write!(f, "the relay logs in to Redis as {user:?}, which {file} does not define"),
            AclUserMissing { user, aclfile: None } => write!(f, "the relay logs in to Redis as {user:?}, but the Redis service loads no --aclfile from the repository that defines it"),
            AclUserRules { user, expected, found } => write!(f, "Redis ACL user {user:?} has the rules `{found}` but the filter needs exactly `{expected}`"),
            AclPasswordMismatch { user } => write!(f, "Redis ACL user {user:?} does not accept the password the relay sends (its --redis-password-file or URL)"),
            UnknownNetwork { service, network } => write!(f, "service {service}: network {network:?} is not declared"),
            NotInternal { service, network } => write!(
                f,
                "service {service} is on network {network}, which is not internal: Redis and the relay must be reachable from the stack only"
            ),
            DockerfileRefused { dockerfile, message } => write!(f, "{dockerfile}: {message}"),
            UnknownStage { dockerfile, line, stage } => {
                write!(f, "{dockerfile}:{line}: COPY --from={stage} names no earlier stage")
            }
            CopySourceMissing { dockerfile, line, source } => {
                write!(f, "{dockerfile}:{line}: COPY source {source} does not exist")
            }
            CopySourceIgnored { dockerfile, line, source, pattern } => write!(
                f,
                "{dockerfile}:{line}: COPY source {source} is excluded by .dockerignore pattern {pattern:?}"
            ),
            WorkspaceMemberNotCopied { dockerfile, stage, member } => write!(
                f,
                "{dockerfile}: stage {stage} runs cargo but does not copy workspace member {member} (cargo cannot load the workspace)"
            ),
            CargoBuild { dockerfile, line, message } => write!(f, "{dockerfile}:{line}: {message}"),
            PluginFeatures { dockerfile, line, message } => write!(f, "{dockerfile}:{line}: {message}"),
            ImageNotPinned { file, image, why } => write!(f, "{file}: image {image} is not pinned: {why}"),
            EnvoyNotTested { dockerfile, image, tested } => write!(
                f,
                "{dockerfile}: {image} is not the Envoy the tests run (envoyproxy/envoy:v{tested})"
            ),
            RustTooOld { dockerfile, image, required } => write!(
                f,
                "{dockerfile}: {image} is older than the workspace's rust-version {required}"
            ),
            DebianSuiteMismatch { dockerfile, builder, runtime } => write!(
                f,
                "{dockerfile}: binaries built on {builder} run on {runtime}: another Debian release (glibc)"
            ),
            HigressManifest { file, message } => write!(f, "{file}: {message}"),
            HigressClusterUnknown { file, cluster, message } => write!(f, "{file}: cluster {cluster:?}: {message}"),
            VariantDiffers { file, key } => write!(
                f,
                "{file}: `{key}` differs from envoy.yaml's plugin configuration (only the Redis connection may differ)"
            ),
            WasmUnreadable { message } => write!(f, "plugin.wasm: {message}"),
Monitoring { file, message } => write!(f, "{file}: {message}"),
                        ImportNotProvided { host, module, name } => {
                write!(f, "plugin.wasm imports {module}.{name}, which {host} does not provide")
            }
            WasmImageLayout { dockerfile, message } => write!(f, "{dockerfile}: {message}"),
            Manifest { file, object, message } => write!(f, "{file}: {object}: {message}"),
            NamespaceUnknown { file, object, namespace } => write!(
                f,
                "{file}: {object} is in namespace {namespace:?}, which no manifest creates and the platform does not provide"
            ),
            SelectorMatchesNothing { file, object, selector } => {
                write!(f, "{file}: {object}: {selector} selects no pods of the manifests")
            }
            PortMissing { file, object, what, port } => {
                write!(f, "{file}: {object}: {what} uses port {port}, which its pods do not declare")
            }
            SecretMissing { file, object, secret, key: None } => {
                write!(f, "{file}: {object} uses {secret}, which no manifest defines")
            }
            SecretMissing { file, object, secret, key: Some(key) } => {
                write!(f, "{file}: {object} uses key {key:?} of {secret}, which has no such key")
            }
            ListenPortMismatch { file, object, what, port, listening } => write!(
                f,
                "{file}: {object} listens on port {listening}, but {what} sends to port {port}"
            ),
            MountMissing { file, object, path } => {
                write!(f, "{file}: {object} reads {path}, which no volume it mounts provides")
            }
            ServiceUnknown { file, from, host, port } => {
                write!(f, "{file}: {from} reaches {host}:{port}, which is no port of a Service in the manifests")
            }
            ClusterNotGenerated { file, platform, cluster, message } => write!(
                f,
                "{file}: redis.cluster {cluster:?} is not a cluster {platform} creates for the relay: {message}"
            ),
            AuthorityInvalid { file, authority } => write!(
                f,
                "{file}: the relay calls would carry :authority {authority:?}, which is not a host name (set redis.authority)"
            ),
            PluginTokenMismatch { file, secret } => write!(
                f,
                "{file}: the plugin's redis.token is not the relay's token ({secret})"
            ),
            AclDefaultUserOn { file } => write!(
                f,
                "{file}: the Redis ACL file leaves user `default` on: write `user default off`"
            ),
            NotIsolated { file, object, message } => write!(f, "{file}: {object}: {message}"),
        }
    }
}

fn describe_secret(s: &Option<String>) -> String {
    match s {
        Some(t) => format!("set ({} characters)", t.len()),
        None => "unset".to_string(),
    }
}

/// The files the checks read: the repository, with some files optionally replaced or removed.
#[derive(Clone)]
pub struct Deployment {
    root: PathBuf,
    overrides: BTreeMap<String, String>,
}

impl Deployment {
    pub fn repo() -> Deployment {
        Deployment {
            root: krowoc_tests::workspace_root(),
            overrides: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same deployment with `rel` replaced by `text`.
    pub fn with_file(mut self, rel: &str, text: String) -> Deployment {
        self.overrides.insert(rel.to_string(), text);
        self
    }

    /// The same deployment with `rel` edited by `edit` (which must change it).
    pub fn edit(self, rel: &str, edit: impl FnOnce(String) -> String) -> Deployment {
        let before = self
            .read(rel)
            .unwrap_or_else(|| panic!("{rel} is missing from the repository"));
        let after = edit(before.clone());
        assert_ne!(before, after, "the edit of {rel} changed nothing");
        self.with_file(rel, after)
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        match self.overrides.get(rel) {
            Some(text) => Some(text.clone()),
            None => std::fs::read_to_string(self.root.join(rel)).ok(),
        }
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.overrides.contains_key(rel) || self.root.join(rel).exists()
    }

    fn read_or_problem(&self, rel: &str) -> Result<String, Problem> {
        self.read(rel).ok_or_else(|| Problem::Unreadable {
            file: rel.to_string(),
            message: "missing".into(),
        })
    }

    pub fn envoy(&self) -> Result<EnvoyConfig, Problem> {
        let text = self.read_or_problem(ENVOY_YAML)?;
        EnvoyConfig::from_yaml_str(&text, &self.root.join("envoy")).map_err(|e| {
            Problem::EnvoyYamlRefused {
                file: ENVOY_YAML.into(),
                message: e.to_string(),
            }
        })
    }

    /// The plugin's configuration in envoy.yaml, parsed by the plugin itself.
    pub fn envoy_plugin_config(&self) -> Result<(Config, serde_json::Value), Problem> {
        let envoy = self.envoy()?;
        let wasm = envoy.wasm.ok_or(Problem::NoWasmFilter {
            file: ENVOY_YAML.into(),
        })?;
        let config = validate_plugin_config(ENVOY_YAML, wasm.configuration.as_bytes())?;
        let json = serde_json::from_str(&wasm.configuration).map_err(|e| Problem::Unreadable {
            file: ENVOY_YAML.into(),
            message: format!("plugin configuration: {e}"),
        })?;
        Ok((config, json))
    }

    pub fn compose(&self) -> Result<Compose, Problem> {
        let text = self.read_or_problem(COMPOSE)?;
        Compose::parse(&text).map_err(|message| Problem::Unreadable {
            file: COMPOSE.into(),
            message,
        })
    }

    pub fn dockerfile(&self, rel: &str) -> Result<Dockerfile, Problem> {
        let text = self.read_or_problem(rel)?;
        Dockerfile::parse(&text).map_err(|e| Problem::DockerfileRefused {
            dockerfile: rel.to_string(),
            message: e.to_string(),
        })
    }

    /// (Dockerfile, build context), both relative to the repository root: the compose builds and
    /// the plugin images for Higress and for Istio and Envoy Gateway (built from the root, see
    /// their headers).
    pub fn dockerfiles(&self, compose: &Compose) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = compose
            .services
            .values()
            .filter_map(|s| s.build.as_ref())
            .map(|b| {
                let context = join_rel("envoy", &b.context);
                let file = join_rel(&context, b.dockerfile.as_deref().unwrap_or("Dockerfile"));
                (file, context)
            })
            .collect();
        out.push((HIGRESS_PLUGIN_DOCKERFILE.to_string(), String::new()));
        out.push((K8S_PLUGIN_DOCKERFILE.to_string(), String::new()));
        out.sort();
        out.dedup();
        out
    }
}

pub fn validate_plugin_config(file: &str, bytes: &[u8]) -> Result<Config, Problem> {
    parse_config(bytes).map_err(|errors| Problem::PluginConfigRefused {
        file: file.to_string(),
        errors: errors.iter().map(ToString::to_string).collect(),
    })
}

/// `base/rel` normalised (`envoy/..` is the root, spelled ``).
pub fn join_rel(base: &str, rel: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for comp in Path::new(base).join(rel).components() {
        match comp {
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

// ---------------------------------------------------------------------------------------------
// envoy.yaml

/// envoy.yaml loads in host-shim, its plugin configuration passes the plugin's validation, and
/// every cluster the plugin or a route names is defined.
pub fn check_envoy(d: &Deployment) -> Vec<Problem> {
    let envoy = match d.envoy() {
        Ok(e) => e,
        Err(p) => return vec![p],
    };
    let mut problems = Vec::new();
    for route in &envoy.routes {
        if !envoy.clusters.contains_key(&route.cluster) {
            problems.push(Problem::UnknownCluster {
                file: ENVOY_YAML.into(),
                cluster: route.cluster.clone(),
                named_by: format!("route {:?}", route.matcher),
            });
        }
    }
    match d.envoy_plugin_config() {
        Ok((config, _)) => {
            let cluster = config.redis.cluster();
            if !envoy.clusters.contains_key(cluster) {
                problems.push(Problem::UnknownCluster {
                    file: ENVOY_YAML.into(),
                    cluster: cluster.to_string(),
                    named_by: "the plugin's redis.cluster".into(),
                });
            }
        }
        Err(p) => problems.push(p),
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml against envoy.yaml and the images

/// What a compose service runs: its image's final stage (when built here) and its argv.
struct Running<'a> {
    name: &'a str,
    service: &'a Service,
    image: Option<Stage>,
}

impl Running<'_> {
    fn argv(&self) -> Vec<String> {
        let entrypoint = self
            .service
            .entrypoint
            .clone()
            .or_else(|| {
                self.image
                    .as_ref()
                    .and_then(|s| s.last("ENTRYPOINT"))
                    .map(|i| i.args.clone())
            })
            .unwrap_or_default();
        let command = self
            .service
            .command
            .clone()
            .or_else(|| {
                self.image
                    .as_ref()
                    .and_then(|s| s.last("CMD"))
                    .map(|i| i.args.clone())
            })
            .unwrap_or_default();
        entrypoint.into_iter().chain(command).collect()
    }

    fn base_image(&self) -> String {
        match (&self.service.image, &self.image) {
            (Some(image), _) => image.clone(),
            (None, Some(stage)) => stage.image.clone(),
            (None, None) => String::new(),
        }
    }

    fn is_envoy(&self) -> bool {
        self.base_image().starts_with("envoyproxy/envoy")
    }

    fn is_redis(&self) -> bool {
        self.base_image().starts_with("redis:")
    }

    fn networks(&self) -> BTreeSet<String> {
        if self.service.networks.is_empty() {
            ["default".to_string()].into()
        } else {
            self.service.networks.iter().cloned().collect()
        }
    }

    /// File names the image carries in /usr/local/bin (copied in its final stage).
    fn tools(&self) -> BTreeSet<String> {
        let Some(stage) = &self.image else {
            return BTreeSet::new();
        };
        stage
            .all("COPY")
            .filter_map(|c| c.args.last())
            .filter_map(|dest| dest.strip_prefix("/usr/local/bin/"))
            .map(str::to_string)
            .collect()
    }

    fn copies_to(&self, path: &str) -> bool {
        self.image.as_ref().is_some_and(|s| {
            s.all("COPY")
                .any(|c| c.args.last().map(String::as_str) == Some(path))
        })
    }
}

/// How a service is started, as far as the checks need it.
enum Role {
    Envoy,
    Redis { port: u16 },
    Relay(Box<RelayArgs>),
    Upstream { listen: String, redis_url: String },
    Unknown,
}

/// `krowoc-relay`'s command line (the relay's own binary).
#[derive(Parser)]
#[command(name = "krowoc-relay")]
pub struct RelayCli {
    #[command(flatten)]
    pub relay: RelayArgs,
}

#[derive(Parser)]
#[command(name = "host-shim")]
struct HostShimCli {
    #[command(subcommand)]
    command: HostShimCommand,
}

#[derive(clap::Subcommand)]
enum HostShimCommand {
    Relay(RelayArgs),
    Run(host_shim::run::RunArgs),
}

pub fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_string)
        }
    })
}

fn role(run: &Running<'_>, problems: &mut Vec<Problem>) -> Role {
    if run.is_envoy() {
        return Role::Envoy;
    }
    let argv = run.argv();
    if run.is_redis() {
        let port = flag_value(&argv, "--port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(REDIS_DEFAULT_PORT);
        return Role::Redis { port };
    }
    let relay = |args: RelayArgs, problems: &mut Vec<Problem>| {
        // Secret files are paths in the container: the flags are checked without them.
        if args.token_file.is_none() && args.redis_password_file.is_none() {
            if let Err(e) = RelayConfig::from_args(&args) {
                problems.push(Problem::RelayArgsRefused {
                    service: run.name.to_string(),
                    message: format!("{e:#}"),
                });
            }
        }
        Role::Relay(Box::new(args))
    };
    let refused = |e: clap::Error, problems: &mut Vec<Problem>| {
        problems.push(Problem::RelayArgsRefused {
            service: run.name.to_string(),
            message: e.to_string().lines().next().unwrap_or_default().to_string(),
        });
        Role::Unknown
    };
    match argv.first().map(String::as_str) {
        Some("krowoc-relay") => match RelayCli::try_parse_from(&argv) {
            Ok(cli) => relay(cli.relay, problems),
            Err(e) => refused(e, problems),
        },
        Some("host-shim") => match HostShimCli::try_parse_from(&argv) {
            Ok(HostShimCli {
                command: HostShimCommand::Relay(args),
            }) => relay(args, problems),
            Ok(_) => Role::Unknown,
            Err(e) => refused(e, problems),
        },
        Some("krowoc-upstream") => {
            let image_env = |name: &str| run.image.as_ref().and_then(|s| s.env(name));
            let listen = flag_value(&argv, "--listen")
                .or_else(|| run.service.env("UPSTREAM_LISTEN"))
                .or_else(|| image_env("UPSTREAM_LISTEN"))
                .unwrap_or_else(|| UPSTREAM_DEFAULT_LISTEN.to_string());
            let redis_url = flag_value(&argv, "--redis")
                .or_else(|| run.service.env("REDIS_URL"))
                .or_else(|| image_env("REDIS_URL"))
                .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
            Role::Upstream { listen, redis_url }
        }
        _ => Role::Unknown,
    }
}

/// (host, port) a service listens on, when the checks can tell.
fn listen_address(role: &Role) -> Option<(String, u16)> {
    let split = |addr: &str| {
        let (host, port) = addr.rsplit_once(':')?;
        Some((
            host.trim_matches(['[', ']']).to_string(),
            port.parse().ok()?,
        ))
    };
    match role {
        Role::Redis { port } => Some(("0.0.0.0".into(), *port)),
        Role::Relay(args) => split(&args.listen),
        Role::Upstream { listen, .. } => split(listen),
        Role::Envoy | Role::Unknown => None,
    }
}

pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

struct Stack<'a> {
    runs: BTreeMap<&'a str, Running<'a>>,
    roles: BTreeMap<&'a str, Role>,
}

impl Stack<'_> {
    /// `from` connects to `host:port` for `what`: a service of that name must listen there on a
    /// non-loopback address, share a network with `from`, and `from` must wait for it.
    fn check_reach(
        &self,
        from: &str,
        what: &str,
        host: &str,
        port: u16,
        problems: &mut Vec<Problem>,
    ) {
        let (Some(target), Some(source)) = (self.runs.get(host), self.runs.get(from)) else {
            problems.push(Problem::ServiceMissing {
                from: from.to_string(),
                what: what.to_string(),
                host: host.to_string(),
            });
            return;
        };
        match self.roles.get(host).and_then(listen_address) {
            None => problems.push(Problem::ListenUnknown {
                service: host.to_string(),
            }),
            Some((listen_host, listen_port)) => {
                if listen_port != port {
                    problems.push(Problem::PortNotServed {
                        what: what.to_string(),
                        service: host.to_string(),
                        port,
                        listening: listen_port,
                    });
                }
                if is_loopback(&listen_host) {
                    problems.push(Problem::ListensOnLoopback {
                        service: host.to_string(),
                        address: krowoc_relay::HostPort(&listen_host, listen_port).to_string(),
                    });
                }
            }
        }
        if source.networks().is_disjoint(&target.networks()) {
            problems.push(Problem::NoSharedNetwork {
                from: from.to_string(),
                to: host.to_string(),
            });
        }
        let healthy = source
            .service
            .depends_on
            .get(host)
            .is_some_and(|d| d.condition == "service_healthy");
        if !healthy {
            problems.push(Problem::DependsOnNotHealthy {
                service: from.to_string(),
                dependency: host.to_string(),
            });
        }
    }
}

/// docker-compose.yml parses; its builds and mounts exist; Envoy gets envoy.yaml and the plugin
/// where envoy.yaml expects them; every cluster in envoy.yaml is a service listening on that
/// port, reachable from Envoy; the relay and the upstream reach Redis; ports, health checks,
/// start order and the relay token agree with envoy.yaml.
pub fn check_compose(d: &Deployment) -> Vec<Problem> {
    let compose = match d.compose() {
        Ok(c) => c,
        Err(p) => return vec![p],
    };
    // envoy.yaml's own problems are check_envoy's to report.
    let Ok(envoy) = d.envoy() else {
        return Vec::new();
    };
    let plugin = d.envoy_plugin_config().ok().map(|(c, _)| c);
    let mut problems = Vec::new();

    let mut runs = BTreeMap::new();
    for (name, service) in &compose.services {
        for network in &service.networks {
            if !compose.networks.contains_key(network) {
                problems.push(Problem::UnknownNetwork {
                    service: name.clone(),
                    network: network.clone(),
                });
            }
        }
        let mut image = None;
        if let Some(build) = &service.build {
            let context = join_rel("envoy", &build.context);
            let dockerfile = join_rel(
                &context,
                build.dockerfile.as_deref().unwrap_or("Dockerfile"),
            );
            for path in [&context, &dockerfile] {
                if !d.exists(path) {
                    problems.push(Problem::BuildFileMissing {
                        service: name.clone(),
                        path: path.clone(),
                    });
                }
            }
            // Dockerfile syntax problems are check_dockerfiles' to report.
            if let Ok(df) = d.dockerfile(&dockerfile) {
                image = Some(match &build.target {
                    Some(t) => df
                        .stage(t)
                        .cloned()
                        .unwrap_or_else(|| df.final_stage().clone()),
                    None => df.final_stage().clone(),
                });
            }
        }
        for (source, _) in service.binds() {
            if !d.exists(&join_rel("envoy", &source)) {
                problems.push(Problem::MountSourceMissing {
                    service: name.clone(),
                    source,
                });
            }
        }
        runs.insert(
            name.as_str(),
            Running {
                name,
                service,
                image,
            },
        );
    }
    let roles: BTreeMap<&str, Role> = runs
        .iter()
        .map(|(name, run)| (*name, role(run, &mut problems)))
        .collect();
    let stack = Stack { runs, roles };

    // Redis and the relay answer anyone who reaches them: keep them off reachable networks.
    for (name, role) in &stack.roles {
        if matches!(role, Role::Redis { .. } | Role::Relay(_)) {
            for network in stack.runs[name].networks() {
                let internal = compose
                    .networks
                    .get(&network)
                    .and_then(Option::as_ref)
                    .is_some_and(|n| n.internal);
                if !internal {
                    problems.push(Problem::NotInternal {
                        service: name.to_string(),
                        network,
                    });
                }
            }
        }
    }

    // Envoy: its configuration, its plugin, its clusters, its ports.
    let Some(envoy_name) = stack
        .roles
        .iter()
        .find(|(_, r)| matches!(r, Role::Envoy))
        .map(|(n, _)| *n)
    else {
        problems.push(Problem::NoEnvoyService);
        return problems;
    };
    let envoy_run = &stack.runs[envoy_name];
    let argv = envoy_run.argv();
    let config_path = flag_value(&argv, "-c")
        .or_else(|| flag_value(&argv, "--config-path"))
        .unwrap_or_else(|| ENVOY_DEFAULT_CONFIG.to_string());
    let mounted =
        envoy_run.service.binds().iter().any(|(source, target)| {
            *target == config_path && join_rel("envoy", source) == ENVOY_YAML
        });
    if !mounted {
        problems.push(Problem::EnvoyYamlNotMounted {
            service: envoy_name.to_string(),
            config_path,
        });
    }
    if let Some(wasm) = &envoy.wasm {
        let path = wasm.code_path.to_string_lossy().into_owned();
        let plugin_mounted = envoy_run
            .service
            .binds()
            .iter()
            .any(|(_, target)| *target == path);
        if !plugin_mounted && !envoy_run.copies_to(&path) {
            problems.push(Problem::PluginNotInImage {
                service: envoy_name.to_string(),
                path,
            });
        }
    }

    // Every cluster Envoy may call must be a service Envoy can reach; the ones routes and the
    // plugin use must also be up before Envoy starts.
    let mut used: BTreeSet<&str> = envoy.routes.iter().map(|r| r.cluster.as_str()).collect();
    if let Some(cfg) = &plugin {
        used.insert(cfg.redis.cluster());
    }
    for (name, cluster) in &envoy.clusters {
        let what = format!("envoy.yaml cluster {name}");
        let mut found = Vec::new();
        stack.check_reach(envoy_name, &what, &cluster.host, cluster.port, &mut found);
        if !used.contains(name.as_str()) {
            found.retain(|p| !matches!(p, Problem::DependsOnNotHealthy { .. }));
        }
        problems.extend(found);
    }

    let published: Vec<_> = envoy_run.service.published();
    let mut container_ports = BTreeSet::new();
    for p in published {
        match p {
            Ok(published) => {
                container_ports.insert(published.container_port);
            }
            Err(message) => problems.push(Problem::BadPort {
                service: envoy_name.to_string(),
                message,
            }),
        }
    }
    let mut envoy_ports = vec![("listener", &envoy.listener)];
    if let Some(admin) = &envoy.admin {
        envoy_ports.push(("admin", admin));
    }
    for (what, address) in &envoy_ports {
        if !container_ports.contains(&address.port) {
            problems.push(Problem::PortNotPublished {
                service: envoy_name.to_string(),
                port: address.port,
                what: what.to_string(),
            });
        }
        if is_loopback(&address.host) {
            problems.push(Problem::ListensOnLoopback {
                service: envoy_name.to_string(),
                address: address.to_string(),
            });
        }
    }

    // The relay and the upstream reach Redis; the relay's token is the plugin's.
    for (name, role) in &stack.roles {
        let url = match role {
            Role::Relay(args) => Some(args.redis.clone()),
            Role::Upstream { redis_url, .. } => Some(redis_url.clone()),
            _ => None,
        };
        if let Some(url) = url {
            let password_file = match role {
                Role::Relay(args) => args.redis_password_file.is_some(),
                _ => false,
            };
            let endpoint = match password_file {
                true => RedisEndpoint::from_url_and_password(&url, String::new()),
                false => RedisEndpoint::from_url(&url),
            };
            match endpoint {
                Ok(endpoint) => stack.check_reach(
                    name,
                    &format!("{name}'s Redis URL"),
                    &endpoint.host,
                    endpoint.port,
                    &mut problems,
                ),
                Err(e) => problems.push(Problem::RelayArgsRefused {
                    service: name.to_string(),
                    message: e.to_string(),
                }),
            }
        }
        if let (Role::Relay(args), Some(cfg)) = (role, &plugin) {
            let relay_token = match (&args.token, &args.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(file)) => {
                    let file = file.to_string_lossy();
                    stack.runs[name]
                        .service
                        .binds()
                        .iter()
                        .find(|(_, target)| *target == file)
                        .and_then(|(source, _)| d.read(&join_rel("envoy", source)))
                        .map(|t| t.trim_end_matches(['\r', '\n']).to_string())
                }
                (None, None) => None,
            };
            if cfg.redis.transport == Transport::Relay && cfg.redis.token != relay_token {
                problems.push(Problem::RelayTokenMismatch {
                    plugin: cfg.redis.token.clone(),
                    relay: relay_token,
                });
            }
        }
        if let (Role::Relay(args), Some((cfg, raw))) = (role, d.envoy_plugin_config().ok()) {
            problems.extend(check_relay_acl_user(d, &stack, name, args, &cfg, &raw));
        }
    }

    // Health checks: present, probing the port the service serves, with a tool the image has;
    // for Envoy, the admin port.
    for (name, run) in &stack.runs {
        let Some(check) = &run.service.healthcheck else {
            problems.push(Problem::MissingHealthcheck {
                service: name.to_string(),
            });
            continue;
        };
        if check.test.first().map(String::as_str) != Some("CMD") {
            continue;
        }
        let Some(tool) = check.test.get(1) else {
            continue;
        };
        // Only images built here can be checked for the tool.
        if run.image.is_some() && !run.tools().contains(tool) {
            problems.push(Problem::HealthcheckToolMissing {
                service: name.to_string(),
                tool: tool.clone(),
            });
        }
        if tool == "http-ready" {
            let probe_port = check.test.get(3).cloned().unwrap_or_default();
            let listen_port = match &stack.roles[name] {
                Role::Envoy => envoy.admin.as_ref().map(|a| a.port),
                role => listen_address(role).map(|(_, p)| p),
            };
            if let Some(listen_port) = listen_port {
                if probe_port != listen_port.to_string() {
                    problems.push(Problem::HealthcheckPortMismatch {
                        service: name.to_string(),
                        probe_port,
                        listen_port,
                    });
                }
            }
        }
    }

    // Stock Envoy gets a plugin built without Higress's imports: envoy.yaml must use the relay.
    if let (Some(cfg), Some(build)) = (&plugin, &envoy_run.service.build) {
        let context = join_rel("envoy", &build.context);
        let dockerfile = join_rel(
            &context,
            build.dockerfile.as_deref().unwrap_or("Dockerfile"),
        );
        if let Ok(df) = d.dockerfile(&dockerfile) {
            let stock = plugin_builds(&df).iter().any(|b| b.no_default_features);
            if stock && cfg.redis.transport == Transport::RedisCall {
                problems.push(Problem::StockEnvoyWithoutRedisCall {
                    dockerfile,
                    transport: "redis_call".into(),
                });
            }
        }
    }
    problems
}

/// The relay's Redis user, when its URL names one, must be the filter's least-privilege user in
/// the ACL file the Redis service loads: exactly `krowoc_relay::acl`'s rules for envoy.yaml's
/// key prefix and channels, accepting the relay's password.
fn check_relay_acl_user(
    d: &Deployment,
    stack: &Stack<'_>,
    relay: &str,
    args: &RelayArgs,
    cfg: &Config,
    raw: &serde_json::Value,
) -> Vec<Problem> {
    let mounted = |service: &str, path: &str| {
        stack.runs[service]
            .service
            .binds()
            .iter()
            .find(|(_, target)| target == path)
            .and_then(|(source, _)| d.read(&join_rel("envoy", source)))
    };
    let endpoint = match &args.redis_password_file {
        Some(file) => {
            let file = file.to_string_lossy();
            let password = mounted(relay, &file)
                .map(|t| t.trim_end_matches(['\r', '\n']).to_string())
                .unwrap_or_default();
            RedisEndpoint::from_url_and_password(&args.redis, password)
        }
        None => RedisEndpoint::from_url(&args.redis),
    };
    let Ok(endpoint) = endpoint else {
        return Vec::new();
    };
    let Some(user) = endpoint.username.clone() else {
        return Vec::new();
    };
    let redis = stack.roles.iter().find_map(|(name, role)| {
        (matches!(role, Role::Redis { .. }) && *name == endpoint.host).then_some(*name)
    });
    let Some(redis) = redis else {
        return Vec::new();
    };
    let aclfile = flag_value(&stack.runs[redis].argv(), "--aclfile");
    let text = aclfile.as_deref().and_then(|f| mounted(redis, f));
    let (Some(file), Some(text)) = (aclfile, text) else {
        return vec![Problem::AclUserMissing {
            user,
            aclfile: None,
        }];
    };
    let password = endpoint.password.unwrap_or_default();
    check_acl_user(&file, &text, &user, &password, cfg, raw)
}

/// In the ACL file `text` (named `file` in problems), `user` has exactly the filter's rules for
/// the plugin configuration's key prefix and channels (`krowoc_relay::acl`) and accepts
/// `password`.
pub fn check_acl_user(
    file: &str,
    text: &str,
    user: &str,
    password: &str,
    cfg: &Config,
    raw: &serde_json::Value,
) -> Vec<Problem> {
    let Some(rules) = acl_user_rules(text, user) else {
        return vec![Problem::AclUserMissing {
            user: user.to_string(),
            aclfile: Some(file.to_string()),
        }];
    };
    let (passwords, rules): (Vec<String>, Vec<String>) =
        rules.into_iter().partition(|r| r.starts_with('>'));
    let channels = krowoc_tests::plugin_config_channels(raw);
    let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
    let expected = krowoc_relay::acl::filter_user_rules(&cfg.redis.key_prefix, &channels);
    let mut problems = Vec::new();
    if rules != expected {
        problems.push(Problem::AclUserRules {
            user: user.to_string(),
            expected: expected.join(" "),
            found: rules.join(" "),
        });
    }
    if !passwords.iter().any(|p| p[1..] == *password) {
        problems.push(Problem::AclPasswordMismatch {
            user: user.to_string(),
        });
    }
    problems
}

/// The rules of `user <name> …` in an ACL file, when the file defines the user.
pub fn acl_user_rules(text: &str, user: &str) -> Option<Vec<String>> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("user") && words.next() == Some(user))
            .then(|| words.map(str::to_string).collect())
    })
}

// ---------------------------------------------------------------------------------------------
// Dockerfiles

struct CargoBuild {
    line: usize,
    packages: Vec<String>,
    no_default_features: bool,
    words: Vec<String>,
}

fn cargo_builds(stage: &Stage) -> Vec<CargoBuild> {
    stage
        .all("RUN")
        .flat_map(|run| {
            shell_commands(&run.body)
                .into_iter()
                .filter(|c| {
                    c.first().map(String::as_str) == Some("cargo")
                        && c.get(1).map(String::as_str) == Some("build")
                })
                .map(|words| CargoBuild {
                    line: run.line,
                    packages: words
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| *w == "-p" || *w == "--package")
                        .filter_map(|(i, _)| words.get(i + 1).cloned())
                        .collect(),
                    no_default_features: words.iter().any(|w| w == "--no-default-features"),
                    words,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn plugin_builds(df: &Dockerfile) -> Vec<CargoBuild> {
    df.stages
        .iter()
        .flat_map(cargo_builds)
        .filter(|b| b.packages.iter().any(|p| p == "krowoc-plugin"))
        .collect()
}

/// The workspace: member directories and package names, and `rust-version`.
struct Workspace {
    members: Vec<String>,
    packages: BTreeSet<String>,
    rust_version: Option<String>,
}

fn workspace(d: &Deployment) -> Result<Workspace, Problem> {
    let text = d.read_or_problem(CARGO_TOML)?;
    let manifest: toml::Table = toml::from_str(&text).map_err(|e| Problem::Unreadable {
        file: CARGO_TOML.into(),
        message: e.to_string(),
    })?;
    let ws = manifest.get("workspace");
    let members: Vec<String> = ws
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let rust_version = ws
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("rust-version"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut packages = BTreeSet::new();
    for member in &members {
        let rel = format!("{member}/Cargo.toml");
        let text = d.read_or_problem(&rel)?;
        let manifest: toml::Table = toml::from_str(&text).map_err(|e| Problem::Unreadable {
            file: rel.clone(),
            message: e.to_string(),
        })?;
        if let Some(name) = manifest
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(|n| n.as_str())
        {
            packages.insert(name.to_string());
        }
    }
    Ok(Workspace {
        members,
        packages,
        rust_version,
    })
}

fn version_parts(v: &str) -> Option<Vec<u64>> {
    v.split('.').map(|p| p.parse().ok()).collect()
}

/// Whether an image reference pins a version; `Err(why)` when it does not.
pub fn pinned(image: &str) -> Result<(), String> {
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => return Err("no tag (means :latest)".into()),
    };
    if tag == "latest" || tag.ends_with("-latest") || tag == "dev" {
        return Err(format!("tag {tag} moves"));
    }
    let exact = |v: &str| version_parts(v).is_some_and(|p| p.len() == 3);
    match name {
        "rust" => match tag.split('-').next() {
            Some(v) if exact(v) => Ok(()),
            _ => Err("give the exact toolchain, e.g. rust:1.95.0-bookworm".into()),
        },
        "envoyproxy/envoy" => match tag.strip_prefix('v') {
            Some(v) if exact(v) => Ok(()),
            _ => Err("give an exact release, e.g. v1.40.0 (the release the tests run)".into()),
        },
        "prom/prometheus" => match tag.strip_prefix('v') {
            Some(v) if exact(v) => Ok(()),
            _ => Err("give an exact release, e.g. prom/prometheus:v3.5.0".into()),
        },
        "grafana/grafana" => match tag.split('-').next() {
            Some(v) if exact(v) => Ok(()),
            _ => Err("give an exact release, e.g. grafana/grafana:12.1.1".into()),
        },
        "redis" => match tag.split('-').next() {
            Some(v) if exact(v) => Ok(()),
            _ => Err("give an exact release, e.g. redis:7.4.7-bookworm".into()),
        },
        "debian" => {
            if ["bookworm", "trixie", "bullseye"]
                .iter()
                .any(|s| tag.starts_with(s))
                || tag.starts_with(|c: char| c.is_ascii_digit())
            {
                Ok(())
            } else {
                Err("name the Debian release (e.g. bookworm-slim)".into())
            }
        }
        _ => Ok(()),
    }
}

/// A Wasm image as Higress, Istio and Envoy Gateway pull it: exactly one COPY in the final
/// stage (one layer), putting `plugin.wasm` at the root.
fn wasm_image_layout(stage: &Stage) -> Result<(), String> {
    let copies: Vec<_> = stage.all("COPY").chain(stage.all("ADD")).collect();
    let [copy] = copies.as_slice() else {
        return Err(format!(
            "the final stage has {} COPY/ADD instructions: a Wasm image must be exactly one layer (one COPY)",
            copies.len()
        ));
    };
    let (dest, source) = match copy.args.as_slice() {
        [source, dest] => (dest.as_str(), source.as_str()),
        _ => return Err(format!("line {}: copy one file, plugin.wasm", copy.line)),
    };
    let named_plugin =
        Path::new(source).file_name().and_then(|n| n.to_str()) == Some("plugin.wasm");
    match dest {
        "/plugin.wasm" | "plugin.wasm" | "./plugin.wasm" => Ok(()),
        "/" | "./" | "." if named_plugin => Ok(()),
        other => Err(format!(
            "line {}: the module goes to /plugin.wasm, not {other}",
            copy.line
        )),
    }
}

fn debian_suite(image: &str) -> Option<&'static str> {
    ["bookworm", "trixie", "bullseye"]
        .into_iter()
        .find(|s| image.contains(s))
}

/// Every Dockerfile parses; COPY sources exist in the build context and are not dockerignored;
/// `--from` names a stage; stages that run cargo copy the whole workspace and build one package,
/// locked; the plugin is built without Higress's imports for stock Envoy and with them for
/// Higress; base images are pinned, new enough, and builder and runtime share a Debian release.
pub fn check_dockerfiles(d: &Deployment) -> Vec<Problem> {
    let compose = match d.compose() {
        Ok(c) => c,
        Err(p) => return vec![p],
    };
    let mut problems = Vec::new();
    for service in compose.services.values() {
        if let Some(image) = &service.image {
            if let Err(why) = pinned(image) {
                problems.push(Problem::ImageNotPinned {
                    file: COMPOSE.into(),
                    image: image.clone(),
                    why,
                });
            }
        }
    }
    let ignore = DockerIgnore::parse(&d.read(DOCKERIGNORE).unwrap_or_default());
    let ws = match workspace(d) {
        Ok(w) => w,
        Err(p) => return vec![p],
    };
    for (file, context) in d.dockerfiles(&compose) {
        let df = match d.dockerfile(&file) {
            Ok(df) => df,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        for stage in &df.stages {
            let known_stages: Vec<String> = df.stages[..stage.index]
                .iter()
                .flat_map(|s| [s.name.clone().unwrap_or_default(), s.index.to_string()])
                .collect();
            let is_stage = df.stages[..stage.index]
                .iter()
                .any(|s| s.name.as_deref() == Some(stage.image.as_str()));
            if !is_stage && stage.image != "scratch" {
                if let Err(why) = pinned(&stage.image) {
                    problems.push(Problem::ImageNotPinned {
                        file: file.clone(),
                        image: stage.image.clone(),
                        why,
                    });
                }
            }
            if let Some(tag) = stage.image.strip_prefix("envoyproxy/envoy:") {
                // A floating tag is reported as not pinned; a pinned one must be the tested one.
                if pinned(&stage.image).is_ok()
                    && tag != format!("v{}", testkit::envoy::PINNED_VERSION)
                {
                    problems.push(Problem::EnvoyNotTested {
                        dockerfile: file.clone(),
                        image: stage.image.clone(),
                        tested: testkit::envoy::PINNED_VERSION.into(),
                    });
                }
            }
            if let (Some(tag), Some(required)) =
                (stage.image.strip_prefix("rust:"), &ws.rust_version)
            {
                let have = tag.split('-').next().and_then(version_parts);
                let want = version_parts(required);
                if let (Some(have), Some(want)) = (have, want) {
                    if have < want {
                        problems.push(Problem::RustTooOld {
                            dockerfile: file.clone(),
                            image: stage.image.clone(),
                            required: required.clone(),
                        });
                    }
                }
            }

            let mut copied: Vec<String> = Vec::new();
            for copy in stage.all("COPY").chain(stage.all("ADD")) {
                if copy.args.len() < 2 {
                    problems.push(Problem::DockerfileRefused {
                        dockerfile: file.clone(),
                        message: format!(
                            "line {}: COPY needs a source and a destination",
                            copy.line
                        ),
                    });
                    continue;
                }
                let sources = &copy.args[..copy.args.len() - 1];
                if let Some(from) = copy.flag("from") {
                    if !known_stages.iter().any(|s| s == from) {
                        problems.push(Problem::UnknownStage {
                            dockerfile: file.clone(),
                            line: copy.line,
                            stage: from.to_string(),
                        });
                    } else if let Some(builder) = df.stage(from) {
                        if let (Some(b), Some(r)) =
                            (debian_suite(&builder.image), debian_suite(&stage.image))
                        {
                            if b != r {
                                problems.push(Problem::DebianSuiteMismatch {
                                    dockerfile: file.clone(),
                                    builder: builder.image.clone(),
                                    runtime: stage.image.clone(),
                                });
                            }
                        }
                    }
                    continue;
                }
                for source in sources {
                    let rel = join_rel(&context, source);
                    if !d.exists(&rel) {
                        problems.push(Problem::CopySourceMissing {
                            dockerfile: file.clone(),
                            line: copy.line,
                            source: source.clone(),
                        });
                    } else if let Some(pattern) = ignore.excluding_pattern(source) {
                        problems.push(Problem::CopySourceIgnored {
                            dockerfile: file.clone(),
                            line: copy.line,
                            source: source.clone(),
                            pattern: pattern.to_string(),
                        });
                    }
                    copied.push(source.trim_end_matches('/').to_string());
                }
            }

            let builds = cargo_builds(stage);
            if builds.is_empty() {
                continue;
            }
            for needed in ws
                .members
                .iter()
                .chain([&"Cargo.toml".to_string(), &"Cargo.lock".to_string()])
            {
                let covered = copied
                    .iter()
                    .any(|c| c == "." || needed == c || needed.starts_with(&format!("{c}/")));
                if !covered {
                    problems.push(Problem::WorkspaceMemberNotCopied {
                        dockerfile: file.clone(),
                        stage: stage.label(),
                        member: needed.clone(),
                    });
                }
            }
            let adds_wasm_target = stage
                .all("RUN")
                .any(|r| r.body.contains("rustup target add wasm32-wasip1"));
            for build in &builds {
                let has = |w: &str| build.words.iter().any(|x| x == w);
                let mut complain = |message: String| {
                    problems.push(Problem::CargoBuild {
                        dockerfile: file.clone(),
                        line: build.line,
                        message,
                    })
                };
                if !has("--locked") {
                    complain("cargo build without --locked: the image may build other dependency versions than Cargo.lock".into());
                }
                if !has("--release") && !has("--profile") {
                    complain("cargo build without --release (or --profile): a debug build".into());
                }
                if build.packages.is_empty() {
                    complain("cargo build without -p: builds the whole workspace".into());
                }
                for p in &build.packages {
                    if !ws.packages.contains(p) {
                        complain(format!("-p {p}: no workspace package of that name"));
                    }
                }
                if has("wasm32-wasip1") && !adds_wasm_target {
                    complain("builds for wasm32-wasip1 without `rustup target add wasm32-wasip1` in this stage".into());
                }
            }
        }
        // The plugin's features must fit the host the image is for.
        let target = &df.final_stage().image;
        let host = match file.as_str() {
            HIGRESS_PLUGIN_DOCKERFILE => Some(WasmHost::Higress),
            K8S_PLUGIN_DOCKERFILE => Some(WasmHost::StockEnvoy),
            _ if target.starts_with("envoyproxy/envoy") => Some(WasmHost::StockEnvoy),
            _ => None,
        };
        for build in plugin_builds(&df) {
            if host == Some(WasmHost::StockEnvoy) && !build.no_default_features {
                problems.push(Problem::PluginFeatures {
                    dockerfile: file.clone(),
                    line: build.line,
                    message: "the plugin for stock Envoy must be built with --no-default-features: the redis-call feature imports proxy_redis_init/proxy_redis_call, which Envoy does not provide".into(),
                });
            }
            if host == Some(WasmHost::Higress) && build.no_default_features {
                problems.push(Problem::PluginFeatures {
                    dockerfile: file.clone(),
                    line: build.line,
                    message: "the Higress plugin image needs the redis-call feature (transport redis_call): drop --no-default-features".into(),
                });
            }
        }
        if target == "scratch" {
            if let Err(message) = wasm_image_layout(df.final_stage()) {
                problems.push(Problem::WasmImageLayout {
                    dockerfile: file.clone(),
                    message,
                });
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Higress

/// The Higress WasmPlugin: well-formed, no `matchRules`, `defaultConfig` passes the plugin's
/// validation with transport `redis_call`, its cluster is the one Higress creates for a Service
/// in redis.yaml, and everything but the Redis connection equals envoy.yaml's configuration.
pub fn check_higress(d: &Deployment) -> Vec<Problem> {
    let manifest_problem = |message: String| Problem::HigressManifest {
        file: WASMPLUGIN.into(),
        message,
    };
    let text = match d.read_or_problem(WASMPLUGIN) {
        Ok(t) => t,
        Err(p) => return vec![p],
    };
    let doc: serde_yaml::Value = match serde_yaml::from_str(&text) {
        Ok(v) => v,
        Err(e) => return vec![manifest_problem(format!("invalid YAML: {e}"))],
    };
    let mut problems = Vec::new();
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(&doc, |v, k| v.get(*k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    if field(&["apiVersion"]).as_deref() != Some("extensions.higress.io/v1alpha1")
        || field(&["kind"]).as_deref() != Some("WasmPlugin")
    {
        problems.push(manifest_problem(
            "expected apiVersion extensions.higress.io/v1alpha1, kind WasmPlugin".into(),
        ));
    }
    match field(&["spec", "url"]) {
        Some(url)
            if ["oci://", "http://", "https://", "file://"]
                .iter()
                .any(|s| url.starts_with(s)) => {}
        other => problems.push(manifest_problem(format!(
            "spec.url {other:?}: expected an oci:// (or http(s)://, file://) URL"
        ))),
    }
    if doc.get("spec").and_then(|s| s.get("matchRules")).is_some() {
        problems.push(manifest_problem(
            "spec.matchRules: Higress merges them into a `_rules_` key, which the plugin refuses; use defaultConfig and the plugin's own `routes`".into(),
        ));
    }
    let Some(default_config) = doc.get("spec").and_then(|s| s.get("defaultConfig")) else {
        problems.push(manifest_problem("spec.defaultConfig is missing".into()));
        return problems;
    };
    // Higress hands defaultConfig to the plugin as JSON.
    let json = match serde_json::to_value(default_config) {
        Ok(v) => v,
        Err(e) => {
            problems.push(manifest_problem(format!(
                "defaultConfig is not JSON-shaped: {e}"
            )));
            return problems;
        }
    };
    let config = match validate_plugin_config(WASMPLUGIN, json.to_string().as_bytes()) {
        Ok(c) => c,
        Err(p) => {
            problems.push(p);
            return problems;
        }
    };
    if config.redis.transport != Transport::RedisCall {
        problems.push(manifest_problem(
            "defaultConfig.redis.transport must be redis_call (Higress has no relay)".into(),
        ));
    }
    let cluster = config.redis.cluster().to_string();
    if let Err(message) = higress_cluster_exists(d, &cluster) {
        problems.push(Problem::HigressClusterUnknown {
            file: WASMPLUGIN.into(),
            cluster,
            message,
        });
    }
    if let Ok((_, envoy_json)) = d.envoy_plugin_config() {
        for key in differing_keys(&envoy_json, &json) {
            problems.push(Problem::VariantDiffers {
                file: WASMPLUGIN.into(),
                key,
            });
        }
    }
    problems
}

/// The cluster names a Service in redis.yaml. Higress is built on Istio and names a Service's
/// cluster as Istio does ([`IstioCluster`]).
fn higress_cluster_exists(d: &Deployment, cluster: &str) -> Result<(), String> {
    let cluster = IstioCluster::parse(cluster)?;
    let (name, namespace) = cluster.service()?;
    let text = d
        .read(HIGRESS_SERVICES)
        .ok_or_else(|| format!("{HIGRESS_SERVICES} is missing"))?;
    let objects = kubernetes::parse(HIGRESS_SERVICES, &text)
        .map_err(|e| format!("{HIGRESS_SERVICES}: {e}"))?;
    let found = objects.iter().any(|o| match &o.resource {
        Resource::Service(s) => {
            s.metadata.name == name
                && s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && s.spec.ports.iter().any(|p| p.port == cluster.port)
        }
        _ => false,
    });
    match found {
        true => Ok(()),
        false => Err(format!(
            "{HIGRESS_SERVICES} has no Service {name} in namespace {namespace} with port {}",
            cluster.port
        )),
    }
}

/// Top-level keys (and `redis.*` keys outside the connection) whose values differ.
pub fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let ao = a.as_object().unwrap_or(&empty);
    let bo = b.as_object().unwrap_or(&empty);
    let mut keys: BTreeSet<&String> = ao.keys().collect();
    keys.extend(bo.keys());
    let mut out = Vec::new();
    for key in keys {
        if key == "redis" {
            let ar = ao.get(key).and_then(|v| v.as_object()).unwrap_or(&empty);
            let br = bo.get(key).and_then(|v| v.as_object()).unwrap_or(&empty);
            let mut rk: BTreeSet<&String> = ar.keys().collect();
            rk.extend(br.keys());
            for k in rk {
                if !CONNECTION_KEYS.contains(&k.as_str()) && ar.get(k) != br.get(k) {
                    out.push(format!("redis.{k}"));
                }
            }
        } else if ao.get(key) != bo.get(key) {
            out.push(key.clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// plugin.wasm against the host's functions

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WasmHost {
    StockEnvoy,
    Higress,
}

/// Every import of the module is a function the host provides; a module importing anything else
/// is refused by Envoy when it loads.
pub fn check_plugin_imports(wasm: &[u8], host: WasmHost) -> Vec<Problem> {
    let mut problems = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = match payload {
            Ok(p) => p,
            Err(e) => {
                return vec![Problem::WasmUnreadable {
                    message: e.to_string(),
                }]
            }
        };
        let wasmparser::Payload::ImportSection(reader) = payload else {
            continue;
        };
        for import in reader.into_imports() {
            let import = match import {
                Ok(i) => i,
                Err(e) => {
                    return vec![Problem::WasmUnreadable {
                        message: e.to_string(),
                    }]
                }
            };
            let provided = match import.module {
                "env" => {
                    ENVOY_ENV_IMPORTS.contains(&import.name)
                        || (host == WasmHost::Higress && HIGRESS_ENV_IMPORTS.contains(&import.name))
                }
                "wasi_snapshot_preview1" => ENVOY_WASI_IMPORTS.contains(&import.name),
                _ => false,
            };
            if !provided {
                problems.push(Problem::ImportNotProvided {
                    host: format!("{host:?}"),
                    module: import.module.to_string(),
                    name: import.name.to_string(),
                });
            }
        }
    }
    problems
}

/// Every check over the deployment files.
pub fn check_all(d: &Deployment) -> Vec<Problem> {
    let mut problems = check_envoy(d);
    problems.extend(check_compose(d));
    problems.extend(check_dockerfiles(d));
    problems.extend(check_higress(d));
    problems.extend(super::monitoring::check_monitoring(d));
    problems.extend(super::platforms::check_kubernetes(d));
    problems
}
