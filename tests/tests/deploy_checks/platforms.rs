//! Istio and Envoy Gateway: the manifests under envoy/kubernetes/ (Redis, the relay), envoy/istio/
//! and envoy/envoy-gateway/ checked against each other, against envoy.yaml's plugin
//! configuration and against what each platform generates, as far as that can be done without a
//! cluster: every object parses ([`kubernetes`], unknown keys refused); namespaces, labels and
//! selectors, ports, Secrets and mounts agree; the relay's flags pass the relay's own parser and
//! validation (with the Secret's files); the relay reaches the Redis Service, whose ACL file
//! gives the relay's user exactly the filter's rules and password; the plugin configuration
//! passes the plugin's validation, names the cluster the platform creates for the relay, carries
//! the relay's token and equals envoy.yaml's but for the connection; NetworkPolicies admit only
//! the gateway to the relay and only the relay to Redis; images are pinned.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use krowoc_plugin::config::{Config, Transport};
use krowoc_relay::pool::RedisEndpoint;
use krowoc_relay::{RelayArgs, RelayConfig};

use super::checks::{
    acl_user_rules, check_acl_user, differing_keys, flag_value, is_loopback, pinned,
    validate_plugin_config, Deployment, Problem, RelayCli, REDIS_DEFAULT_PORT,
};
use super::kubernetes::{
    self, resolve_service_host, service_fqdn, Container, EnvoyCluster, IntOrString, IstioCluster,
    LabelSelector, Object, Resource, CLUSTER_TYPE_URL, NAMESPACE_NAME_LABEL,
};

pub const K8S_REDIS: &str = "envoy/kubernetes/redis.yaml";
pub const K8S_RELAY: &str = "envoy/kubernetes/relay.yaml";
pub const K8S_PLUGIN_DOCKERFILE: &str = "envoy/kubernetes/plugin.Dockerfile";
pub const RELAY_DOCKERFILE: &str = "envoy/docker/relay.Dockerfile";
pub const ISTIO_WASMPLUGIN: &str = "envoy/istio/wasmplugin.yaml";
pub const ISTIO_NETWORK_POLICY: &str = "envoy/istio/network-policy.yaml";
pub const EG_GATEWAY: &str = "envoy/envoy-gateway/gateway.yaml";
pub const EG_PATCH_POLICY: &str = "envoy/envoy-gateway/patch-policy.yaml";
pub const EG_EXTENSION_POLICY: &str = "envoy/envoy-gateway/extension-policy.yaml";
pub const EG_NETWORK_POLICY: &str = "envoy/envoy-gateway/network-policy.yaml";

/// The images the manifests run that this repository builds, by repository name (the last path
/// segment; the registry is the platform engineer's), and the Dockerfile that builds each (their
/// headers' `docker build -t`).
const RELAY_IMAGE: (&str, &str) = ("krowoc-relay", RELAY_DOCKERFILE);
const PLUGIN_IMAGE: (&str, &str) = ("krowoc-edge-envoy", K8S_PLUGIN_DOCKERFILE);

/// Where Envoy Gateway's Kubernetes provider runs the Envoy of every Gateway (its default), and
/// the labels it gives those pods.
pub const EG_PROXY_NAMESPACE: &str = "envoy-gateway-system";
const EG_OWNING_GATEWAY_NAME: &str = "gateway.envoyproxy.io/owning-gateway-name";
const EG_OWNING_GATEWAY_NAMESPACE: &str = "gateway.envoyproxy.io/owning-gateway-namespace";
/// The HTTP filters Envoy Gateway generates for Wasm extensions and for a SecurityPolicy's
/// authorization (its "Customize Filter Order" lists the default order).
const EG_WASM_FILTER: &str = "envoy.filters.http.wasm";
const EG_RBAC_FILTER: &str = "envoy.filters.http.rbac";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    Istio,
    EnvoyGateway,
}

impl Platform {
    pub const ALL: [Platform; 2] = [Platform::Istio, Platform::EnvoyGateway];

    pub fn name(self) -> &'static str {
        match self {
            Platform::Istio => "Istio",
            Platform::EnvoyGateway => "Envoy Gateway",
        }
    }

    /// The manifests applied for this platform, in apply order.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Platform::Istio => &[K8S_REDIS, K8S_RELAY, ISTIO_NETWORK_POLICY, ISTIO_WASMPLUGIN],
            Platform::EnvoyGateway => &[
                K8S_REDIS,
                K8S_RELAY,
                EG_GATEWAY,
                EG_NETWORK_POLICY,
                EG_PATCH_POLICY,
                EG_EXTENSION_POLICY,
            ],
        }
    }

    /// Namespaces the platform provides: objects may live there without a Namespace manifest.
    fn own_namespaces(self) -> &'static [&'static str] {
        match self {
            Platform::Istio => &["istio-system"],
            Platform::EnvoyGateway => &[EG_PROXY_NAMESPACE],
        }
    }
}

/// Every check over the Istio and Envoy Gateway manifests; a problem of a file both platforms
/// apply is reported once.
pub fn check_kubernetes(d: &Deployment) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    for platform in Platform::ALL {
        for p in check_platform(d, platform) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The objects of a platform's files; a file that is missing or does not parse is a problem.
pub fn load(d: &Deployment, platform: Platform) -> (Vec<Object>, Vec<Problem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for file in platform.files() {
        let Some(text) = d.read(file) else {
            problems.push(Problem::Unreadable {
                file: file.to_string(),
                message: "missing".into(),
            });
            continue;
        };
        match kubernetes::parse(file, &text) {
            Ok(o) => objects.extend(o),
            Err(message) => problems.push(Problem::Unreadable {
                file: file.to_string(),
                message,
            }),
        }
    }
    (objects, problems)
}

pub fn check_platform(d: &Deployment, platform: Platform) -> Vec<Problem> {
    let (objects, mut problems) = load(d, platform);
    if !problems.is_empty() {
        return problems;
    }
    let m = Manifests { objects: &objects };
    problems.extend(m.check_namespaces(platform));
    problems.extend(m.check_selectors_and_ports());
    problems.extend(m.check_secret_volumes());
    problems.extend(m.check_images());
    let relay = match m.relay(d) {
        Ok(r) => r,
        Err(p) => {
            problems.extend(p);
            return problems;
        }
    };
    problems.extend(relay.problems.iter().cloned());
    let plugin = match platform {
        Platform::Istio => m.istio_plugin(&relay),
        Platform::EnvoyGateway => m.envoy_gateway_plugin(&relay),
    };
    let plugin = match plugin {
        Ok(p) => p,
        Err(p) => {
            problems.extend(p);
            return problems;
        }
    };
    problems.extend(plugin.problems.iter().cloned());
    problems.extend(m.check_plugin_config(d, &plugin, &relay));
    problems.extend(m.check_redis(&relay, &plugin));
    problems.extend(m.check_isolation(&relay, &plugin.admitted));
    problems
}

struct Manifests<'a> {
    objects: &'a [Object],
}

/// A Deployment, with its file.
#[derive(Clone, Copy)]
struct Workload<'a> {
    object: &'a Object,
    deployment: &'a kubernetes::Deployment,
}

impl Workload<'_> {
    fn namespace(&self) -> &str {
        self.object.meta().namespace.as_deref().unwrap_or("default")
    }
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.deployment.spec.template.metadata.labels
    }
    fn containers(&self) -> &[Container] {
        &self.deployment.spec.template.spec.containers
    }
}

/// The relay as the manifests run it.
struct Relay<'a> {
    workload: Workload<'a>,
    args: RelayArgs,
    listen_port: u16,
    token: RelayToken,
    /// The Redis password the relay sends.
    password: Option<String>,
    problems: Vec<Problem>,
}

/// The token the relay requires.
enum RelayToken {
    None,
    /// Its value, and where the relay reads it (`Secret ns/name key k`, its `--token` flag).
    Known {
        value: String,
        from: String,
    },
    /// Its `--token-file` is not in the manifests (a problem reported as such).
    Unknown,
}

/// The pods that must reach a workload: their namespace and labels.
#[derive(Clone)]
struct Clients {
    namespace: String,
    labels: BTreeMap<String, String>,
}

/// The plugin as a platform runs it.
struct Plugin {
    file: &'static str,
    config: Config,
    json: serde_json::Value,
    /// Who must reach the relay: (namespace, pod labels) of the gateway; `None` when the
    /// manifests do not say (a problem reported already).
    admitted: Option<Clients>,
    problems: Vec<Problem>,
}

/// The path inside `mount` of `path`, when `path` is under it.
fn under_mount<'p>(path: &'p str, mount: &str) -> Option<&'p str> {
    let mount = mount.trim_end_matches('/');
    path.strip_prefix(mount)?.strip_prefix('/')
}

impl<'a> Manifests<'a> {
    fn workloads(&self) -> impl Iterator<Item = Workload<'a>> + 'a {
        self.objects.iter().filter_map(|o| match &o.resource {
            Resource::Deployment(d) => Some(Workload {
                object: o,
                deployment: d,
            }),
            _ => None,
        })
    }

    fn services(&self) -> impl Iterator<Item = (&'a Object, &'a kubernetes::Service)> + 'a {
        self.objects.iter().filter_map(|o| match &o.resource {
            Resource::Service(s) => Some((o, s)),
            _ => None,
        })
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<&'a kubernetes::Secret> {
        self.objects.iter().find_map(|o| match &o.resource {
            Resource::Secret(s)
                if s.metadata.name == name
                    && s.metadata.namespace.as_deref().unwrap_or("default") == namespace =>
            {
                Some(s)
            }
            _ => None,
        })
    }

    /// The workloads a label selector picks in `namespace`.
    fn selected(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Workload<'a>> {
        self.workloads()
            .filter(|w| {
                w.namespace() == namespace
                    && selector.iter().all(|(k, v)| w.labels().get(k) == Some(v))
            })
            .collect()
    }

    fn service(
        &self,
        name: &str,
        namespace: &str,
    ) -> Option<(&'a Object, &'a kubernetes::Service)> {
        self.services().find(|(o, _)| {
            o.meta().name == name && o.meta().namespace.as_deref().unwrap_or("default") == namespace
        })
    }

    /// Every namespaced object names its namespace, and that namespace exists: created by a
    /// manifest or provided by the platform.
    fn check_namespaces(&self, platform: Platform) -> Vec<Problem> {
        let declared: Vec<&str> = self
            .objects
            .iter()
            .filter(|o| matches!(o.resource, Resource::Namespace(_)))
            .map(|o| o.meta().name.as_str())
            .collect();
        let mut problems = Vec::new();
        for o in self.objects {
            if matches!(o.resource, Resource::Namespace(_)) {
                continue;
            }
            match &o.meta().namespace {
                None => problems.push(Problem::Manifest {
                    file: o.file.clone(),
                    object: o.label(),
                    message: "no metadata.namespace: it would land in whichever namespace kubectl points at".into(),
                }),
                Some(ns) if !declared.contains(&ns.as_str()) && !platform.own_namespaces().contains(&ns.as_str()) => {
                    problems.push(Problem::NamespaceUnknown {
                        file: o.file.clone(),
                        object: o.label(),
                        namespace: ns.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        problems
    }

    /// Deployments select their own pods; Services select pods that declare their target ports;
    /// probes probe a declared port.
    fn check_selectors_and_ports(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for w in self.workloads() {
            let selector = &w.deployment.spec.selector;
            if selector.match_labels.is_empty() || !selector.selects(w.labels()) {
                problems.push(Problem::SelectorMatchesNothing {
                    file: w.object.file.clone(),
                    object: w.object.label(),
                    selector: "spec.selector".into(),
                });
            }
            for c in w.containers() {
                for (what, probe) in [
                    ("readinessProbe", &c.readiness_probe),
                    ("livenessProbe", &c.liveness_probe),
                ] {
                    if let Some(port) = probe.as_ref().and_then(|p| p.port()) {
                        if c.port(port).is_none() {
                            problems.push(Problem::PortMissing {
                                file: w.object.file.clone(),
                                object: w.object.label(),
                                what: format!("container {}'s {what}", c.name),
                                port: port.to_string(),
                            });
                        }
                    }
                }
            }
        }
        for (o, s) in self.services() {
            let ns = o.meta().namespace.as_deref().unwrap_or("default");
            let selected = self.selected(ns, &s.spec.selector);
            if s.spec.selector.is_empty() || selected.is_empty() {
                problems.push(Problem::SelectorMatchesNothing {
                    file: o.file.clone(),
                    object: o.label(),
                    selector: "spec.selector".into(),
                });
                continue;
            }
            for port in &s.spec.ports {
                for w in &selected {
                    if !w
                        .containers()
                        .iter()
                        .any(|c| c.port(&port.target()).is_some())
                    {
                        problems.push(Problem::PortMissing {
                            file: o.file.clone(),
                            object: o.label(),
                            what: format!(
                                "port {} (targetPort) on {}",
                                port.port,
                                w.object.label()
                            ),
                            port: port.target().to_string(),
                        });
                    }
                }
            }
        }
        problems
    }

    /// Every mounted volume is a Secret the manifests define, with the keys it names.
    fn check_secret_volumes(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for w in self.workloads() {
            let spec = &w.deployment.spec.template.spec;
            for c in w.containers() {
                for mount in &c.volume_mounts {
                    if !spec.volumes.iter().any(|v| v.name == mount.name) {
                        problems.push(Problem::Manifest {
                            file: w.object.file.clone(),
                            object: w.object.label(),
                            message: format!(
                                "container {} mounts volume {:?}, which the pod does not define",
                                c.name, mount.name
                            ),
                        });
                    }
                    if mount.read_only != Some(true) {
                        problems.push(Problem::Manifest {
                            file: w.object.file.clone(),
                            object: w.object.label(),
                            message: format!(
                                "container {} mounts {} writable: mount Secrets readOnly",
                                c.name, mount.mount_path
                            ),
                        });
                    }
                }
            }
            for v in &spec.volumes {
                let name = &v.secret.secret_name;
                let label = format!("Secret {}/{name}", w.namespace());
                let Some(secret) = self.secret(w.namespace(), name) else {
                    problems.push(Problem::SecretMissing {
                        file: w.object.file.clone(),
                        object: w.object.label(),
                        secret: label,
                        key: None,
                    });
                    continue;
                };
                for item in &v.secret.items {
                    if !secret.string_data.contains_key(&item.key) {
                        problems.push(Problem::SecretMissing {
                            file: w.object.file.clone(),
                            object: w.object.label(),
                            secret: label.clone(),
                            key: Some(item.key.clone()),
                        });
                    }
                }
            }
        }
        problems
    }

    /// Container images and plugin images are pinned.
    fn check_images(&self) -> Vec<Problem> {
        let mut images: Vec<(&str, String)> = Vec::new();
        for o in self.objects {
            match &o.resource {
                Resource::Deployment(d) => {
                    for c in &d.spec.template.spec.containers {
                        images.push((&o.file, c.image.clone()));
                    }
                }
                Resource::WasmPlugin(w) => {
                    images.push((&o.file, w.spec.url.trim_start_matches("oci://").to_string()))
                }
                Resource::EnvoyExtensionPolicy(p) => {
                    for wasm in &p.spec.wasm {
                        if let Some(image) = &wasm.code.image {
                            images.push((&o.file, image.url.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        images
            .into_iter()
            .filter_map(|(file, image)| {
                pinned(&image).err().map(|why| Problem::ImageNotPinned {
                    file: file.to_string(),
                    image,
                    why,
                })
            })
            .collect()
    }

    /// The text of the file `path` that `container` of `w` reads: the Secret key a volume mounts
    /// there, and where it comes from. `Err(None)`: a problem check_secret_volumes reports (a
    /// volume, Secret or key that does not exist).
    fn mounted_file(
        &self,
        w: &Workload<'_>,
        container: &Container,
        path: &str,
    ) -> Result<(String, String), Option<Problem>> {
        let missing = || {
            Some(Problem::MountMissing {
                file: w.object.file.clone(),
                object: w.object.label(),
                path: path.to_string(),
            })
        };
        let (mount, rel) = container
            .volume_mounts
            .iter()
            .find_map(|m| under_mount(path, &m.mount_path).map(|rel| (m, rel)))
            .ok_or_else(missing)?;
        let volume = w
            .deployment
            .spec
            .template
            .spec
            .volumes
            .iter()
            .find(|v| v.name == mount.name)
            .ok_or(None)?;
        let key = match volume.secret.items.as_slice() {
            [] => Some(rel.to_string()),
            items => items.iter().find(|i| i.path == rel).map(|i| i.key.clone()),
        }
        .ok_or_else(missing)?;
        let name = &volume.secret.secret_name;
        let label = format!("Secret {}/{name} key {key}", w.namespace());
        let text = self
            .secret(w.namespace(), name)
            .and_then(|s| s.string_data.get(&key))
            .ok_or(None)?;
        Ok((text.clone(), label))
    }

    /// The relay's Deployment: the one container running the image relay.Dockerfile builds,
    /// its command line parsed and validated by the relay itself with the Secret's files.
    fn relay(&self, d: &Deployment) -> Result<Relay<'a>, Vec<Problem>> {
        let mut found = Vec::new();
        for w in self.workloads() {
            for c in &w.deployment.spec.template.spec.containers {
                if image_repository(&c.image) == RELAY_IMAGE.0 {
                    found.push((w, c));
                }
            }
        }
        let Some((workload, container)) = found.pop() else {
            return Err(vec![Problem::Manifest {
                file: K8S_RELAY.into(),
                object: "Deployment".into(),
                message: format!(
                    "no container runs the relay image (…/{}:TAG, built by {})",
                    RELAY_IMAGE.0, RELAY_IMAGE.1
                ),
            }]);
        };
        let object = workload.object.label();
        let refused = |message: String| Problem::RelayArgsRefused {
            service: object.clone(),
            message,
        };
        let argv = container_argv(d, container, RELAY_IMAGE.1);
        let args = match RelayCli::try_parse_from(&argv) {
            Ok(cli) => cli.relay,
            Err(e) => {
                return Err(vec![refused(
                    e.to_string().lines().next().unwrap_or_default().to_string(),
                )]);
            }
        };
        let mut problems = Vec::new();
        // The relay's own validation, with the files it would read taken from the Secrets.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut local = args.clone();
        let mut files: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut all_files = true;
        // (the path in the container, the copy's path here), to name the former in errors.
        let mut copies: Vec<(String, String)> = Vec::new();
        {
            let mut materialise = |path: &mut PathBuf| {
                let shown = path.to_string_lossy().into_owned();
                match self.mounted_file(&workload, container, &shown) {
                    Ok((text, from)) => {
                        let copy = dir.path().join(format!("{}", files.len()));
                        std::fs::write(&copy, &text).expect("write a Secret's file");
                        copies.push((shown.clone(), copy.to_string_lossy().into_owned()));
                        files.insert(shown, (text, from));
                        *path = copy;
                    }
                    Err(p) => {
                        problems.extend(p);
                        all_files = false;
                    }
                }
            };
            for path in [
                &mut local.token_file,
                &mut local.redis_password_file,
                &mut local.tls_ca,
                &mut local.tls_cert,
                &mut local.tls_key,
            ]
            .into_iter()
            .flatten()
            {
                materialise(path);
            }
            for path in &mut local.allow_script {
                materialise(path);
            }
        }
        if all_files {
            if let Err(e) = RelayConfig::from_args(&local) {
                let message = copies
                    .iter()
                    .fold(format!("{e:#}"), |m, (shown, copy)| m.replace(copy, shown));
                problems.push(refused(message));
            }
        }
        let read = |path: &Option<PathBuf>| {
            path.as_ref()
                .and_then(|p| files.get(&*p.to_string_lossy()))
                .map(|(text, from)| {
                    (
                        text.trim_end_matches(['\r', '\n']).to_string(),
                        from.clone(),
                    )
                })
        };
        let token = match (&args.token, read(&args.token_file)) {
            (Some(t), _) => RelayToken::Known {
                value: t.clone(),
                from: "its --token flag".into(),
            },
            (None, Some((value, from))) => RelayToken::Known { value, from },
            (None, None) if args.token_file.is_some() => RelayToken::Unknown,
            (None, None) => RelayToken::None,
        };
        let password = read(&args.redis_password_file).map(|(p, _)| p);

        let listen = args
            .listen
            .rsplit_once(':')
            .map(|(h, p)| (h.trim_matches(['[', ']']).to_string(), p.parse::<u16>()));
        let listen_port = match listen {
            Some((host, Ok(port))) => {
                if is_loopback(&host) {
                    problems.push(Problem::ListensOnLoopback {
                        service: object.clone(),
                        address: args.listen.clone(),
                    });
                }
                port
            }
            _ => {
                problems.push(refused(format!(
                    "--listen {:?}: not HOST:PORT",
                    args.listen
                )));
                return Err(problems);
            }
        };
        // Ready when Redis answers through the relay: /ready, on the port it listens on.
        let ready = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        if !ready.is_some_and(|h| {
            h.path == "/ready"
                && container
                    .port(&h.port)
                    .is_some_and(|p| p.container_port == listen_port)
        }) {
            problems.push(Problem::Manifest {
                file: workload.object.file.clone(),
                object: object.clone(),
                message: format!(
                    "container {}: the readinessProbe must be httpGet /ready on the port the relay listens on ({listen_port}): it is 200 only while Redis answers through the relay",
                    container.name
                ),
            });
        }
        // Every Service in front of the relay sends to the port it listens on.
        for (o, s) in self.services_selecting(workload) {
            for port in &s.spec.ports {
                let Some(target) = container.port(&port.target()) else {
                    continue; // check_selectors_and_ports reports it
                };
                if target.container_port != listen_port {
                    problems.push(Problem::ListenPortMismatch {
                        file: workload.object.file.clone(),
                        object: object.clone(),
                        what: format!("{} (port {})", o.label(), port.port),
                        port: target.container_port,
                        listening: listen_port,
                    });
                }
            }
        }
        Ok(Relay {
            workload,
            args,
            listen_port,
            token,
            password,
            problems,
        })
    }

    /// The Services of a workload: those in its namespace whose selector picks its pods.
    fn services_selecting(&self, w: Workload<'_>) -> Vec<(&'a Object, &'a kubernetes::Service)> {
        self.services()
            .filter(|(o, s)| {
                o.meta().namespace.as_deref().unwrap_or("default") == w.namespace()
                    && !s.spec.selector.is_empty()
                    && s.spec
                        .selector
                        .iter()
                        .all(|(k, v)| w.labels().get(k) == Some(v))
            })
            .collect()
    }

    /// Whether `host:port`, resolved from `from_namespace`, is a port of a relay Service.
    fn reaches_relay(
        &self,
        relay: &Relay<'_>,
        host: &str,
        port: u16,
        from_namespace: &str,
    ) -> Result<(), String> {
        let (name, ns) = resolve_service_host(host, from_namespace)
            .ok_or_else(|| format!("{host:?} is not a Kubernetes Service's name"))?;
        let (_, service) = self
            .service(&name, &ns)
            .ok_or_else(|| format!("the manifests have no Service {name} in namespace {ns}"))?;
        if !service.spec.ports.iter().any(|p| p.port == port) {
            return Err(format!("Service {ns}/{name} has no port {port}"));
        }
        if !self
            .services_selecting(relay.workload)
            .iter()
            .any(|(o, _)| {
                o.meta().name == name && o.meta().namespace.as_deref() == Some(ns.as_str())
            })
        {
            return Err(format!(
                "Service {ns}/{name} does not select the relay's pods"
            ));
        }
        Ok(())
    }

    /// Istio: one WasmPlugin, selecting the gateway's pods, in a phase after Istio's
    /// authentication and authorization, pulling the stock-Envoy plugin image, its cluster the
    /// one Istio creates for the relay's Service.
    fn istio_plugin(&self, relay: &Relay<'_>) -> Result<Plugin, Vec<Problem>> {
        let file = ISTIO_WASMPLUGIN;
        let plugins: Vec<(&Object, &kubernetes::WasmPlugin)> = self
            .objects
            .iter()
            .filter_map(|o| match &o.resource {
                Resource::WasmPlugin(w) if o.file == file => Some((o, w)),
                _ => None,
            })
            .collect();
        let [(object, plugin)] = plugins.as_slice() else {
            return Err(vec![Problem::Manifest {
                file: file.into(),
                object: "WasmPlugin".into(),
                message: format!("expected one WasmPlugin, found {}", plugins.len()),
            }]);
        };
        let label = object.label();
        let mut problems = Vec::new();
        let manifest = |message: String| Problem::Manifest {
            file: file.into(),
            object: label.clone(),
            message,
        };
        let selector = plugin
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default();
        if selector.is_empty() {
            problems.push(manifest("spec.selector.matchLabels is empty: the filter would run in every proxy of the namespace (of the whole mesh, in Istio's root namespace), not only the gateway's".into()));
        }
        match plugin.spec.phase.as_deref() {
            Some("AUTHN") | Some("AUTHZ") => problems.push(manifest(format!(
                "phase {}: the filter would answer from the cache and count limits before Istio's authorization (use STATS)",
                plugin.spec.phase.as_deref().unwrap_or_default()
            ))),
            Some("STATS") | Some("UNSPECIFIED_PHASE") | None => {}
            Some(other) => problems.push(manifest(format!("phase {other:?} is not an Istio plugin phase"))),
        }
        if plugin.spec.fail_strategy.as_deref() == Some("FAIL_OPEN") {
            problems.push(manifest(
                "failStrategy FAIL_OPEN: a failing VM would let every request past the limits"
                    .into(),
            ));
        }
        match plugin.spec.url.strip_prefix("oci://") {
            Some(image) if image_repository(image) == PLUGIN_IMAGE.0 => {}
            _ => problems.push(manifest(format!(
                "spec.url {:?}: expected oci://REGISTRY/{}:TAG, the stock-Envoy build of {} (Higress's image imports functions Envoy lacks)",
                plugin.spec.url, PLUGIN_IMAGE.0, PLUGIN_IMAGE.1
            ))),
        }
        let Some(config) = &plugin.spec.plugin_config else {
            problems.push(manifest("spec.pluginConfig is missing".into()));
            return Err(problems);
        };
        let (config, json) = plugin_config(file, config).map_err(|p| {
            let mut all = problems.clone();
            all.push(p);
            all
        })?;
        // Istio's rule: outbound|PORT||NAME.NAMESPACE.svc.cluster.local, pushed to the gateway
        // unless the Service is exported elsewhere only.
        let cluster = config.redis.cluster().to_string();
        let gateway_ns = object.meta().namespace.clone().unwrap_or_default();
        let named = IstioCluster::parse(&cluster).and_then(|c| {
            let (name, ns) = c.service()?;
            if !c.subset.is_empty() {
                return Err(format!(
                    "subset {:?}: the relay needs no DestinationRule subset",
                    c.subset
                ));
            }
            self.reaches_relay(relay, &service_fqdn(&name, &ns), c.port, &ns)?;
            let exported = self
                .service(&name, &ns)
                .and_then(|(o, _)| o.meta().annotations.get(ISTIO_EXPORT_TO));
            match exported {
                Some(to) if !istio_exported_to(to, &ns, &gateway_ns) => Err(format!(
                    "Service {ns}/{name} is exported to {to:?} ({ISTIO_EXPORT_TO}): Istio does not give its cluster to the gateway in {gateway_ns}"
                )),
                _ => Ok(()),
            }
        });
        if let Err(message) = named {
            problems.push(Problem::ClusterNotGenerated {
                file: file.into(),
                platform: Platform::Istio.name().into(),
                cluster,
                message,
            });
        }
        // In Istio's root namespace the selector picks pods of every namespace; the NetworkPolicy
        // and README keep the gateway in the WasmPlugin's own.
        Ok(Plugin {
            file,
            config,
            json,
            admitted: Some(Clients {
                namespace: gateway_ns,
                labels: selector,
            }),
            problems,
        })
    }

    /// Envoy Gateway: one EnvoyExtensionPolicy on an HTTPRoute of the manifests, pulling the
    /// stock-Envoy plugin image, failing closed, its cluster one that an EnvoyPatchPolicy on the
    /// route's Gateway adds, pointing at the relay's Service.
    fn envoy_gateway_plugin(&self, relay: &Relay<'_>) -> Result<Plugin, Vec<Problem>> {
        let file = EG_EXTENSION_POLICY;
        let policies: Vec<(&Object, &kubernetes::EnvoyExtensionPolicy)> = self
            .objects
            .iter()
            .filter_map(|o| match &o.resource {
                Resource::EnvoyExtensionPolicy(p) if o.file == file => Some((o, p)),
                _ => None,
            })
            .collect();
        let [(object, policy)] = policies.as_slice() else {
            return Err(vec![Problem::Manifest {
                file: file.into(),
                object: "EnvoyExtensionPolicy".into(),
                message: format!(
                    "expected one EnvoyExtensionPolicy, found {}",
                    policies.len()
                ),
            }]);
        };
        let label = object.label();
        let namespace = object.meta().namespace.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let manifest = |message: String| Problem::Manifest {
            file: file.into(),
            object: label.clone(),
            message,
        };
        // targetRefs → HTTPRoutes of the policy's namespace → their Gateways.
        let mut gateways: Vec<String> = Vec::new();
        for target in &policy.spec.target_refs {
            if (target.group.as_str(), target.kind.as_str())
                != ("gateway.networking.k8s.io", "HTTPRoute")
            {
                problems.push(manifest(format!(
                    "targetRefs {} {}: the filter attaches to an HTTPRoute",
                    target.kind, target.name
                )));
                continue;
            }
            let route = self.objects.iter().find_map(|o| match &o.resource {
                Resource::HttpRoute(r)
                    if r.metadata.name == target.name
                        && r.metadata.namespace.as_deref() == Some(namespace.as_str()) =>
                {
                    Some(r)
                }
                _ => None,
            });
            let Some(route) = route else {
                problems.push(manifest(format!(
                    "targetRefs names HTTPRoute {namespace}/{}, which no manifest defines",
                    target.name
                )));
                continue;
            };
            for parent in &route.spec.parent_refs {
                let ns = parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone());
                let is_gateway = parent.kind.as_deref().unwrap_or("Gateway") == "Gateway";
                let gateway = self.objects.iter().find_map(|o| match &o.resource {
                    Resource::Gateway(g)
                        if g.metadata.name == parent.name
                            && g.metadata.namespace.as_deref() == Some(ns.as_str()) =>
                    {
                        Some(g)
                    }
                    _ => None,
                });
                let (true, Some(gateway)) = (is_gateway, gateway) else {
                    problems.push(Problem::Manifest {
                        file: EG_GATEWAY.into(),
                        object: format!("HTTPRoute {namespace}/{}", target.name),
                        message: format!(
                            "parentRefs names Gateway {ns}/{}, which no manifest defines",
                            parent.name
                        ),
                    });
                    continue;
                };
                if let Err(message) = self.wasm_after_authorization(&ns, gateway) {
                    problems.push(Problem::Manifest {
                        file: EG_GATEWAY.into(),
                        object: format!("Gateway {ns}/{}", parent.name),
                        message,
                    });
                }
                gateways.push(format!("{ns}/{}", parent.name));
            }
        }
        let [wasm] = policy.spec.wasm.as_slice() else {
            problems.push(manifest(format!(
                "expected one wasm extension, found {}",
                policy.spec.wasm.len()
            )));
            return Err(problems);
        };
        if wasm.fail_open == Some(true) {
            problems.push(manifest(
                "failOpen: true would let every request past the limits when the VM fails".into(),
            ));
        }
        match (wasm.code.source_type.as_str(), &wasm.code.image) {
            ("Image", Some(image)) if image_repository(&image.url) == PLUGIN_IMAGE.0 => {}
            _ => problems.push(manifest(format!(
                "code: expected type Image with image.url REGISTRY/{}:TAG, the stock-Envoy build of {}",
                PLUGIN_IMAGE.0, PLUGIN_IMAGE.1
            ))),
        }
        let Some(config) = &wasm.config else {
            problems.push(manifest("wasm[0].config is missing".into()));
            return Err(problems);
        };
        let (config, json) = plugin_config(file, config).map_err(|p| {
            let mut all = problems.clone();
            all.push(p);
            all
        })?;
        let cluster = config.redis.cluster().to_string();
        let cluster_checked = match gateways.is_empty() {
            true => Ok(()), // no Gateway to check it against: reported above
            false => self.envoy_gateway_cluster(relay, &gateways, &cluster),
        };
        if let Err(message) = cluster_checked {
            problems.push(Problem::ClusterNotGenerated {
                file: file.into(),
                platform: Platform::EnvoyGateway.name().into(),
                cluster,
                message,
            });
        }
        // Envoy Gateway runs each Gateway's Envoy in its own namespace, labelled with the Gateway.
        let admitted = gateways
            .first()
            .and_then(|g| g.split_once('/'))
            .map(|(ns, name)| {
                let labels = BTreeMap::from([
                    (EG_OWNING_GATEWAY_NAME.to_string(), name.to_string()),
                    (EG_OWNING_GATEWAY_NAMESPACE.to_string(), ns.to_string()),
                ]);
                Clients {
                    namespace: EG_PROXY_NAMESPACE.to_string(),
                    labels,
                }
            });
        Ok(Plugin {
            file,
            config,
            json,
            admitted,
            problems,
        })
    }

    /// Envoy Gateway runs Wasm extensions before its RBAC filter (a SecurityPolicy's
    /// authorization) unless the Gateway's EnvoyProxy moves them after it.
    fn wasm_after_authorization(
        &self,
        namespace: &str,
        gateway: &kubernetes::Gateway,
    ) -> Result<(), String> {
        let wanted = format!("give it an EnvoyProxy (infrastructure.parametersRef) whose filterOrder puts {EG_WASM_FILTER} after {EG_RBAC_FILTER}: by default Envoy Gateway runs Wasm before authorization, and the filter would answer from its cache for requests authorization refuses");
        let reference = gateway
            .spec
            .infrastructure
            .as_ref()
            .and_then(|i| i.parameters_ref.as_ref())
            .filter(|r| r.group == "gateway.envoyproxy.io" && r.kind == "EnvoyProxy")
            .ok_or_else(|| wanted.clone())?;
        let proxy = self
            .objects
            .iter()
            .find_map(|o| match &o.resource {
                Resource::EnvoyProxy(p)
                    if p.metadata.name == reference.name
                        && p.metadata.namespace.as_deref() == Some(namespace) =>
                {
                    Some(p)
                }
                _ => None,
            })
            .ok_or_else(|| {
                format!(
                    "infrastructure.parametersRef names EnvoyProxy {namespace}/{}, which no manifest defines",
                    reference.name
                )
            })?;
        let moved = proxy.spec.filter_order.iter().any(|f| {
            f.name == EG_WASM_FILTER
                && f.after.as_deref() == Some(EG_RBAC_FILTER)
                && f.before.is_none()
        });
        match moved {
            true => Ok(()),
            false => Err(wanted),
        }
    }

    /// Envoy Gateway's rule: the clusters it generates for routes and policies have names of its
    /// own, so the relay is a cluster an EnvoyPatchPolicy adds to the Gateway's Envoy (operation
    /// `add` with an empty `path`, a whole `Cluster`), under the name the filter uses. It must
    /// target a Gateway of the filter's route and point at the relay's Service by its full name
    /// (the Envoy runs in another namespace than the Service).
    fn envoy_gateway_cluster(
        &self,
        relay: &Relay<'_>,
        gateways: &[String],
        cluster: &str,
    ) -> Result<(), String> {
        let mut seen = Vec::new();
        for o in self.objects {
            let Resource::EnvoyPatchPolicy(policy) = &o.resource else {
                continue;
            };
            let ns = o.meta().namespace.as_deref().unwrap_or("default");
            let target = &policy.spec.target_ref;
            let gateway = format!("{ns}/{}", target.name);
            for patch in &policy.spec.json_patches {
                let op = &patch.operation;
                if patch.resource_type != CLUSTER_TYPE_URL
                    || op.op != "add"
                    || !op.path.as_deref().unwrap_or("").is_empty()
                {
                    continue;
                }
                let Some(value) = &op.value else { continue };
                let added: EnvoyCluster = serde_yaml::from_value(value.clone()).map_err(|e| {
                    format!("{}: the Cluster {:?} it adds: {e}", o.label(), patch.name)
                })?;
                seen.push(added.name.clone());
                if added.name != cluster {
                    continue;
                }
                if patch.name != added.name || added.load_assignment.cluster_name != added.name {
                    return Err(format!(
                        "{}: the patch's name {:?}, the Cluster's name {:?} and its load_assignment.cluster_name {:?} must be the same",
                        o.label(), patch.name, added.name, added.load_assignment.cluster_name
                    ));
                }
                if target.kind != "Gateway" || !gateways.contains(&gateway) {
                    return Err(format!(
                        "{} adds it to {} {gateway}, not to the Gateway of the filter's route ({})",
                        o.label(),
                        target.kind,
                        gateways.join(", ")
                    ));
                }
                if policy.spec.patch_type != "JSONPatch" {
                    return Err(format!(
                        "{}: type {:?}, expected JSONPatch",
                        o.label(),
                        policy.spec.patch_type
                    ));
                }
                if !matches!(added.discovery.as_str(), "STRICT_DNS" | "LOGICAL_DNS") {
                    return Err(format!(
                        "type {}: a Service's name needs a DNS cluster (STRICT_DNS)",
                        added.discovery
                    ));
                }
                let addresses = added.addresses();
                if addresses.is_empty() {
                    return Err("the cluster has no endpoint".into());
                }
                for (host, port) in addresses {
                    self.reaches_relay(relay, &host, port, EG_PROXY_NAMESPACE)
                        .map_err(|e| format!("its endpoint {host}:{port}: {e}"))?;
                }
                return Ok(());
            }
        }
        Err(format!(
            "no EnvoyPatchPolicy adds a Cluster of that name (added: {seen:?}); Envoy Gateway's own cluster names are not the filter's to use"
        ))
    }

    /// The plugin configuration: transport `relay`, a valid :authority, the relay's token,
    /// envoy.yaml's policies.
    fn check_plugin_config(
        &self,
        d: &Deployment,
        plugin: &Plugin,
        relay: &Relay<'_>,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        let file = plugin.file;
        let redis = &plugin.config.redis;
        if redis.transport != Transport::Relay {
            problems.push(Problem::Manifest {
                file: file.into(),
                object: "the plugin configuration".into(),
                message:
                    "redis.transport must be relay: the proxy is Envoy, which has no Redis calls"
                        .into(),
            });
            return problems;
        }
        if axum::http::uri::Authority::from_str(redis.authority()).is_err() {
            problems.push(Problem::AuthorityInvalid {
                file: file.into(),
                authority: redis.authority().to_string(),
            });
        }
        // A token file the manifests do not provide is reported where it is read.
        let mismatch = match &relay.token {
            RelayToken::Known { value, from } if redis.token.as_ref() != Some(value) => {
                Some(format!("the relay reads it from {from}"))
            }
            RelayToken::None if redis.token.is_some() => Some("the relay runs without one".into()),
            _ => None,
        };
        if let Some(secret) = mismatch {
            problems.push(Problem::PluginTokenMismatch {
                file: file.into(),
                secret,
            });
        }
        // envoy.yaml's own problems are check_envoy's to report.
        if let Ok((_, envoy_json)) = d.envoy_plugin_config() {
            for key in differing_keys(&envoy_json, &plugin.json) {
                problems.push(Problem::VariantDiffers {
                    file: file.into(),
                    key,
                });
            }
        }
        problems
    }

    /// The relay reaches a Redis Service, whose Redis loads an ACL file giving the relay's user
    /// exactly the filter's rules and the relay's password, with `default` off.
    fn check_redis(&self, relay: &Relay<'_>, plugin: &Plugin) -> Vec<Problem> {
        let object = relay.workload.object.label();
        let file = relay.workload.object.file.clone();
        let endpoint = match &relay.password {
            Some(password) => {
                RedisEndpoint::from_url_and_password(&relay.args.redis, password.clone())
            }
            None => RedisEndpoint::from_url(&relay.args.redis),
        };
        let Ok(endpoint) = endpoint else {
            return Vec::new(); // the relay's validation reported it
        };
        let unknown = || Problem::ServiceUnknown {
            file: file.clone(),
            from: format!("{object} (--redis)"),
            host: endpoint.host.clone(),
            port: endpoint.port,
        };
        let Some((name, ns)) = resolve_service_host(&endpoint.host, relay.workload.namespace())
        else {
            return vec![unknown()];
        };
        let Some((service_object, service)) = self.service(&name, &ns) else {
            return vec![unknown()];
        };
        let Some(port) = service.spec.ports.iter().find(|p| p.port == endpoint.port) else {
            return vec![unknown()];
        };
        let mut problems = Vec::new();
        for w in self.selected(&ns, &service.spec.selector) {
            for c in w.containers() {
                let Some(listening) = redis_port(c) else {
                    continue;
                };
                let argv = argv_of(c);
                if let Some(target) = c.port(&port.target()) {
                    if target.container_port != listening {
                        problems.push(Problem::ListenPortMismatch {
                            file: w.object.file.clone(),
                            object: w.object.label(),
                            what: format!("{} (port {})", service_object.label(), port.port),
                            port: target.container_port,
                            listening,
                        });
                    }
                }
                let Some(user) = &endpoint.username else {
                    problems.push(Problem::Manifest {
                        file: file.clone(),
                        object: object.clone(),
                        message: format!(
                            "--redis {}: log in as the filter's ACL user (redis://USER@HOST)",
                            relay.args.redis
                        ),
                    });
                    continue;
                };
                let Some(aclfile) = flag_value(&argv, "--aclfile") else {
                    problems.push(Problem::AclUserMissing {
                        user: user.clone(),
                        aclfile: None,
                    });
                    continue;
                };
                let (text, from) = match self.mounted_file(&w, c, &aclfile) {
                    Ok(t) => t,
                    Err(p) => {
                        problems.extend(p);
                        continue;
                    }
                };
                let source = format!("{} ({from})", w.object.file);
                problems.extend(check_acl_user(
                    &source,
                    &text,
                    user,
                    endpoint.password.as_deref().unwrap_or_default(),
                    &plugin.config,
                    &plugin.json,
                ));
                let default_off = acl_user_rules(&text, "default")
                    .is_some_and(|r| r.iter().any(|w| w == "off") && !r.iter().any(|w| w == "on"));
                if !default_off {
                    problems.push(Problem::AclDefaultUserOn { file: source });
                }
            }
        }
        problems
    }

    /// NetworkPolicies: the relay admits only the gateway's pods (`admitted`) on its port, Redis
    /// admits only the relay's pods on its port; nothing else reaches either.
    fn check_isolation(&self, relay: &Relay<'_>, admitted: &Option<Clients>) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut targets: Vec<(Workload<'_>, Clients, u16)> = Vec::new();
        if let Some(admitted) = admitted {
            targets.push((relay.workload, admitted.clone(), relay.listen_port));
        }
        let the_relay = Clients {
            namespace: relay.workload.namespace().to_string(),
            labels: relay.workload.labels().clone(),
        };
        for w in self.workloads() {
            if let Some(port) = w.containers().iter().find_map(redis_port) {
                targets.push((w, the_relay.clone(), port));
            }
        }
        for (w, clients, port) in targets {
            let (from_ns, from_labels) = (&clients.namespace, &clients.labels);
            let policies: Vec<(&Object, &kubernetes::NetworkPolicy)> = self
                .objects
                .iter()
                .filter_map(|o| match &o.resource {
                    Resource::NetworkPolicy(p)
                        if p.metadata.namespace.as_deref() == Some(w.namespace())
                            && p.spec.policy_types.iter().any(|t| t == "Ingress")
                            && !p.spec.pod_selector.match_labels.is_empty()
                            && p.spec.pod_selector.selects(w.labels()) =>
                    {
                        Some((o, p))
                    }
                    _ => None,
                })
                .collect();
            let isolated = |message: String| Problem::NotIsolated {
                file: w.object.file.clone(),
                object: w.object.label(),
                message,
            };
            if policies.is_empty() {
                problems.push(isolated("no NetworkPolicy selects its pods for Ingress: every pod of the cluster reaches it".into()));
                continue;
            }
            let mut admits = false;
            for (o, p) in &policies {
                for rule in &p.spec.ingress {
                    let open_peer = rule.from.is_empty()
                        || rule.from.iter().any(|peer| {
                            peer.pod_selector
                                .as_ref()
                                .is_none_or(|s| s.match_labels.is_empty())
                                && peer
                                    .namespace_selector
                                    .as_ref()
                                    .is_none_or(|s| s.match_labels.is_empty())
                        });
                    if open_peer {
                        problems.push(Problem::NotIsolated {
                            file: o.file.clone(),
                            object: o.label(),
                            message:
                                "an ingress rule without pod or namespace labels admits every pod"
                                    .into(),
                        });
                    }
                    let ports_ok = rule.ports.is_empty()
                        || rule.ports.iter().any(|p| match &p.port {
                            IntOrString::Int(n) => *n == port,
                            IntOrString::Str(name) => w.containers().iter().any(|c| {
                                c.port(&IntOrString::Str(name.clone()))
                                    .is_some_and(|cp| cp.container_port == port)
                            }),
                        });
                    let peer_ok = rule.from.iter().any(|peer| {
                        let ns_ok = match &peer.namespace_selector {
                            None => from_ns.as_str() == w.namespace(),
                            Some(s) => s.selects(&BTreeMap::from([(
                                NAMESPACE_NAME_LABEL.to_string(),
                                from_ns.clone(),
                            )])),
                        };
                        let pods_ok = peer
                            .pod_selector
                            .as_ref()
                            .is_none_or(|s: &LabelSelector| s.selects(from_labels));
                        ns_ok && pods_ok
                    });
                    admits |= ports_ok && peer_ok;
                }
            }
            if !admits {
                let who: Vec<String> = from_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                problems.push(isolated(format!(
                    "no NetworkPolicy admits the pods that must reach it (namespace {from_ns}, labels {}) on port {port}",
                    who.join(",")
                )));
            }
        }
        problems
    }
}

/// The annotation that limits which namespaces' proxies Istio gives a Service's clusters to.
const ISTIO_EXPORT_TO: &str = "networking.istio.io/exportTo";

/// Whether a Service of `service_ns` exported to `export_to` (`*`, `.`, `~` or namespace names,
/// comma-separated) is visible to proxies in `proxy_ns`.
fn istio_exported_to(export_to: &str, service_ns: &str, proxy_ns: &str) -> bool {
    export_to.split(',').map(str::trim).any(|to| match to {
        "*" => true,
        "." => service_ns == proxy_ns,
        "~" => false,
        ns => ns == proxy_ns,
    })
}

/// A plugin configuration given as YAML (a WasmPlugin's pluginConfig, an EnvoyExtensionPolicy's
/// config), which the platform hands to the filter as JSON, parsed by the plugin itself.
fn plugin_config(
    file: &str,
    value: &serde_yaml::Value,
) -> Result<(Config, serde_json::Value), Problem> {
    let json = serde_json::to_value(value).map_err(|e| Problem::Manifest {
        file: file.into(),
        object: "the plugin configuration".into(),
        message: format!("not JSON-shaped: {e}"),
    })?;
    let config = validate_plugin_config(file, json.to_string().as_bytes())?;
    Ok((config, json))
}

/// The port a Redis container listens on (its `--port`), when it runs the Redis image.
fn redis_port(c: &Container) -> Option<u16> {
    c.image.starts_with("redis:").then(|| {
        flag_value(&argv_of(c), "--port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(REDIS_DEFAULT_PORT)
    })
}

/// A container's `command` and `args` as written (the image's own are not looked up).
fn argv_of(c: &Container) -> Vec<String> {
    let command = c.command.clone().unwrap_or_default();
    command
        .into_iter()
        .chain(c.args.clone().unwrap_or_default())
        .collect()
}

/// The repository name of an image reference: `registry.example.com/krowoc-relay:0.1.0` is
/// `krowoc-relay`.
fn image_repository(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.split(':').next().unwrap_or(last)
}

/// What a container runs: its `command` (else the image's ENTRYPOINT, from the Dockerfile that
/// builds it), then its `args` (else, without a `command`, the image's CMD).
fn container_argv(d: &Deployment, c: &Container, dockerfile: &str) -> Vec<String> {
    let stage = d
        .dockerfile(dockerfile)
        .ok()
        .map(|df| df.final_stage().clone());
    let from_image = |instruction: &str| {
        stage
            .as_ref()
            .and_then(|s| s.last(instruction))
            .map(|i| i.args.clone())
            .unwrap_or_default()
    };
    let command = c
        .command
        .clone()
        .unwrap_or_else(|| from_image("ENTRYPOINT"));
    let args = match (&c.args, &c.command) {
        (Some(a), _) => a.clone(),
        (None, None) => from_image("CMD"),
        (None, Some(_)) => Vec::new(),
    };
    command.into_iter().chain(args).collect()
}

#[test]
fn image_repositories_drop_the_registry_the_tag_and_the_digest() {
    assert_eq!(
        image_repository("registry.example.com/krowoc-relay:0.1.0"),
        "krowoc-relay"
    );
    assert_eq!(
        image_repository("registry.example.com:5000/team/krowoc-edge-envoy@sha256:ab"),
        "krowoc-edge-envoy"
    );
    assert_eq!(image_repository("redis:7.4.7-bookworm"), "redis");
}
