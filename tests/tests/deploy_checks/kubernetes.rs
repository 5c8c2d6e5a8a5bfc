//! The subset of Kubernetes (and Istio, Gateway API, Envoy Gateway) objects that the manifests
//! under envoy/ use, typed, with unknown keys refused (a misspelt `containerPorts` is an error,
//! not an ignored key), and the naming rules the platforms apply to them: a Service's DNS name,
//! the Envoy cluster Istio (and Higress, which is built on it) creates for a Service port.
//!
//! Free-form parts (an Envoy resource inside a patch, a plugin configuration, resource limits,
//! security contexts) stay `serde_yaml::Value`; everything the checks compare is typed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_yaml::Value;

// ---------------------------------------------------------------------------------------------
// Naming rules

/// The cluster DNS domain Kubernetes gives Services (`--cluster-domain`, `cluster.local` by
/// default; the manifests assume the default).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A Service's DNS name: `NAME.NAMESPACE.svc.cluster.local`.
pub fn service_fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// The Service (name, namespace) a pod in `from_namespace` reaches at `host`: the DNS search
/// path makes `NAME`, `NAME.NAMESPACE`, `NAME.NAMESPACE.svc` and the full name all resolve.
/// `None` for a host that is not a Service name (an IP address, an outside name).
pub fn resolve_service_host(host: &str, from_namespace: &str) -> Option<(String, String)> {
    let rest = host
        .strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}"))
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let parts: Vec<&str> = rest.split('.').collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match parts.as_slice() {
        [name] if valid(name) && rest == host => {
            Some((name.to_string(), from_namespace.to_string()))
        }
        [name, namespace] if valid(name) && valid(namespace) => {
            Some((name.to_string(), namespace.to_string()))
        }
        _ => None,
    }
}

/// An Envoy cluster as Istio names it: `DIRECTION|PORT|SUBSET|HOST` (istioctl proxy-config
/// cluster shows the four parts as DIRECTION, PORT, SUBSET and SERVICE FQDN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioCluster {
    pub port: u16,
    pub subset: String,
    pub host: String,
}

impl IstioCluster {
    /// The cluster Istio creates for port `port` of Service `name` in `namespace`, no subset.
    pub fn for_service(name: &str, namespace: &str, port: u16) -> IstioCluster {
        IstioCluster {
            port,
            subset: String::new(),
            host: service_fqdn(name, namespace),
        }
    }

    /// Reads an outbound cluster name; the error says what does not fit the rule.
    pub fn parse(name: &str) -> Result<IstioCluster, String> {
        let parts: Vec<&str> = name.split('|').collect();
        let [direction, port, subset, host] = parts.as_slice() else {
            return Err("not an Istio cluster name (outbound|PORT||HOST)".into());
        };
        if *direction != "outbound" {
            return Err("Istio names the clusters of Services `outbound|…`".into());
        }
        let port = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port"))?;
        Ok(IstioCluster {
            port,
            subset: subset.to_string(),
            host: host.to_string(),
        })
    }

    /// (name, namespace) of the Kubernetes Service the cluster is for.
    pub fn service(&self) -> Result<(String, String), String> {
        let rest = self
            .host
            .strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}"))
            .ok_or_else(|| {
                "only Kubernetes Service clusters (NAME.NAMESPACE.svc.cluster.local) can be checked here"
                    .to_string()
            })?;
        rest.split_once('.')
            .filter(|(_, ns)| !ns.contains('.'))
            .map(|(n, ns)| (n.to_string(), ns.to_string()))
            .ok_or_else(|| format!("{:?}: expected NAME.NAMESPACE.svc.cluster.local", self.host))
    }
}

impl fmt::Display for IstioCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outbound|{}|{}|{}", self.port, self.subset, self.host)
    }
}

// ---------------------------------------------------------------------------------------------
// The objects

/// One object of a manifest file, with where it came from.
#[derive(Debug)]
pub struct Object {
    pub file: String,
    pub resource: Resource,
}

impl Object {
    pub fn meta(&self) -> &ObjectMeta {
        match &self.resource {
            Resource::Namespace(o) => &o.metadata,
            Resource::Secret(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::Deployment(o) => &o.metadata,
            Resource::NetworkPolicy(o) => &o.metadata,
            Resource::WasmPlugin(o) => &o.metadata,
            Resource::Gateway(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::EnvoyExtensionPolicy(o) => &o.metadata,
            Resource::EnvoyPatchPolicy(o) => &o.metadata,
            Resource::EnvoyProxy(o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> &'static str {
        match &self.resource {
            Resource::Namespace(_) => "Namespace",
            Resource::Secret(_) => "Secret",
            Resource::Service(_) => "Service",
            Resource::Deployment(_) => "Deployment",
            Resource::NetworkPolicy(_) => "NetworkPolicy",
            Resource::WasmPlugin(_) => "WasmPlugin",
            Resource::Gateway(_) => "Gateway",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::EnvoyExtensionPolicy(_) => "EnvoyExtensionPolicy",
            Resource::EnvoyPatchPolicy(_) => "EnvoyPatchPolicy",
            Resource::EnvoyProxy(_) => "EnvoyProxy",
        }
    }

    /// `Kind namespace/name`, as the problems name an object.
    pub fn label(&self) -> String {
        let m = self.meta();
        match &m.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind(), m.name),
            None => format!("{} {}", self.kind(), m.name),
        }
    }
}

#[derive(Debug)]
pub enum Resource {
    Namespace(Namespace),
    Secret(Secret),
    Service(Service),
    Deployment(Deployment),
    NetworkPolicy(NetworkPolicy),
    WasmPlugin(WasmPlugin),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    EnvoyExtensionPolicy(EnvoyExtensionPolicy),
    EnvoyPatchPolicy(EnvoyPatchPolicy),
    EnvoyProxy(EnvoyProxy),
}

/// The documents of one manifest file. Each document's `apiVersion` and `kind` pick its type;
/// the error names the document (1-based), its kind and the field at fault.
pub fn parse(file: &str, text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = |message: String| format!("document {}: {message}", i + 1);
        let value = Value::deserialize(doc).map_err(|e| at(e.to_string()))?;
        let Value::Mapping(mut map) = value else {
            if value.is_null() {
                continue;
            }
            return Err(at("not a mapping".into()));
        };
        let mut take = |key: &str| {
            map.remove(key)
                .and_then(|v| v.as_str().map(str::to_string))
                .ok_or_else(|| at(format!("no {key}")))
        };
        let (api_version, kind) = (take("apiVersion")?, take("kind")?);
        let rest = Value::Mapping(map);
        fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
            serde_yaml::from_value(v).map_err(|e| e.to_string())
        }
        let resource = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => typed(rest).map(Resource::Namespace),
            ("v1", "Secret") => typed(rest).map(Resource::Secret),
            ("v1", "Service") => typed(rest).map(Resource::Service),
            ("apps/v1", "Deployment") => typed(rest).map(Resource::Deployment),
            ("networking.k8s.io/v1", "NetworkPolicy") => typed(rest).map(Resource::NetworkPolicy),
            ("extensions.istio.io/v1alpha1", "WasmPlugin") => typed(rest).map(Resource::WasmPlugin),
            ("gateway.networking.k8s.io/v1", "Gateway") => typed(rest).map(Resource::Gateway),
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => typed(rest).map(Resource::HttpRoute),
            ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy") => {
                typed(rest).map(Resource::EnvoyExtensionPolicy)
            }
            ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy") => {
                typed(rest).map(Resource::EnvoyPatchPolicy)
            }
            ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy") => {
                typed(rest).map(Resource::EnvoyProxy)
            }
            (api, kind) => Err(format!(
                "{api} {kind} is not a kind these checks know (add it to deploy_checks/kubernetes.rs)"
            )),
        }
        .map_err(|e| at(format!("{kind}: {e}")))?;
        out.push(Object {
            file: file.to_string(),
            resource,
        });
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `matchLabels` only: the manifests use no `matchExpressions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    /// Whether an object with `labels` is selected (an empty selector selects everything).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A port given by number or by the name of a container port.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    Str(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::Str(s) => write!(f, "{s}"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// `stringData` only: the checks compare the values (a password, a token, an ACL file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Secret {
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type")]
    #[allow(dead_code)] // read so the key is known
    pub secret_type: Option<String>,
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub name: Option<String>,
    pub port: u16,
    /// Unset: the same number as `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub app_protocol: Option<String>,
}

impl ServicePort {
    pub fn target(&self) -> IntOrString {
        self.target_port
            .clone()
            .unwrap_or(IntOrString::Int(self.port))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub metadata: ObjectMeta,
    pub spec: DeploymentSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub replicas: Option<u32>,
    pub selector: LabelSelector,
    pub template: PodTemplate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodTemplate {
    pub metadata: PodMeta,
    pub spec: PodSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodMeta {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    #[allow(dead_code)] // free-form; read so the key is known
    pub security_context: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    #[allow(dead_code)] // free-form; read so the key is known
    pub security_context: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)] // free-form; read so the key is known
    pub resources: Option<Value>,
}

impl Container {
    /// The container port a Service's `targetPort` names.
    pub fn port(&self, target: &IntOrString) -> Option<&ContainerPort> {
        self.ports.iter().find(|p| match target {
            IntOrString::Int(n) => p.container_port == *n,
            IntOrString::Str(name) => p.name.as_deref() == Some(name),
        })
    }
}

/// Plain values only: a value from a Secret would be in the pod spec's environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    #[allow(dead_code)] // read so the key is known
    pub name: String,
    #[allow(dead_code)] // read so the key is known
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // timings are read so their keys are known; the checks use the port
pub struct Probe {
    #[serde(default)]
    pub http_get: Option<HttpGetAction>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default)]
    pub exec: Option<ExecAction>,
    #[serde(default)]
    pub period_seconds: Option<u32>,
    #[serde(default)]
    pub initial_delay_seconds: Option<u32>,
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
    #[serde(default)]
    pub failure_threshold: Option<u32>,
}

impl Probe {
    /// The port the probe connects to (an exec probe has none).
    pub fn port(&self) -> Option<&IntOrString> {
        self.http_get
            .as_ref()
            .map(|h| &h.port)
            .or(self.tcp_socket.as_ref().map(|t| &t.port))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGetAction {
    pub path: String,
    pub port: IntOrString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocketAction {
    pub port: IntOrString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecAction {
    #[allow(dead_code)] // read so the key is known
    pub command: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: Option<bool>,
}

/// Secret volumes only: the manifests mount nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub secret: SecretVolume,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretVolume {
    pub secret_name: String,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub default_mode: Option<u32>,
    /// Empty: every key of the Secret, each a file of its name.
    #[serde(default)]
    pub items: Vec<KeyToPath>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyToPath {
    pub key: String,
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    pub metadata: ObjectMeta,
    pub spec: NetworkPolicySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    pub pod_selector: LabelSelector,
    #[serde(default)]
    pub policy_types: Vec<String>,
    #[serde(default)]
    pub ingress: Vec<NetworkPolicyIngressRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    #[serde(default)]
    pub from: Vec<NetworkPolicyPeer>,
    #[serde(default)]
    pub ports: Vec<NetworkPolicyPort>,
}

/// Both selectors in one peer: pods matching `pod_selector` in namespaces matching
/// `namespace_selector`; only `pod_selector`: pods of the policy's own namespace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyPort {
    pub port: IntOrString,
}

/// The label every namespace carries with its own name (Kubernetes 1.21 and later).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

// Istio

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPlugin {
    pub metadata: ObjectMeta,
    pub spec: WasmPluginSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmPluginSpec {
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    pub url: String,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub sha256: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub image_pull_secret: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub priority: Option<i64>,
    #[serde(default)]
    pub fail_strategy: Option<String>,
    #[serde(default)]
    pub plugin_config: Option<Value>,
}

// Gateway API and Envoy Gateway

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    pub spec: GatewaySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[allow(dead_code)] // read so the key is known
    pub gateway_class_name: String,
    #[serde(default)]
    pub infrastructure: Option<GatewayInfrastructure>,
    #[allow(dead_code)] // read so the key is known
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayInfrastructure {
    #[serde(default)]
    pub parameters_ref: Option<LocalPolicyTargetRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read so the keys are known
pub struct Listener {
    pub name: String,
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub hostnames: Vec<String>,
    #[allow(dead_code)] // the backends are the application's: read so the keys are known
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    /// Unset: the route's own namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)] // read so the keys are known
pub struct HttpRouteRule {
    #[serde(default)]
    pub matches: Option<Value>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read so the keys are known
pub struct BackendRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// A reference to an object in the referrer's namespace: a policy's target, a Gateway's
/// parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyExtensionPolicy {
    pub metadata: ObjectMeta,
    pub spec: EnvoyExtensionPolicySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyExtensionPolicySpec {
    pub target_refs: Vec<LocalPolicyTargetRef>,
    pub wasm: Vec<Wasm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Wasm {
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub name: Option<String>,
    #[serde(default, rename = "rootID")]
    #[allow(dead_code)] // read so the key is known
    pub root_id: Option<String>,
    pub code: WasmCodeSource,
    #[serde(default)]
    pub config: Option<Value>,
    #[serde(default)]
    pub fail_open: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmCodeSource {
    #[serde(rename = "type")]
    pub source_type: String,
    #[serde(default)]
    pub image: Option<ImageWasmCodeSource>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub sha256: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub pull_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageWasmCodeSource {
    pub url: String,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub pull_secret_ref: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyPatchPolicy {
    pub metadata: ObjectMeta,
    pub spec: EnvoyPatchPolicySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyPatchPolicySpec {
    pub target_ref: LocalPolicyTargetRef,
    #[serde(rename = "type")]
    pub patch_type: String,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub priority: Option<i32>,
    pub json_patches: Vec<EnvoyJsonPatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyJsonPatch {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub operation: JsonPatchOperation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPatchOperation {
    pub op: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub value: Option<Value>,
}

/// Envoy Gateway's settings for the Envoy of a Gateway that references it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyProxy {
    pub metadata: ObjectMeta,
    pub spec: EnvoyProxySpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyProxySpec {
    #[serde(default)]
    pub filter_order: Vec<FilterPosition>,
    #[serde(default)]
    #[allow(dead_code)] // free-form; read so the key is known
    pub provider: Option<Value>,
}

/// Moves the filters named `name` before or after those named in `before` / `after`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterPosition {
    pub name: String,
    #[serde(default)]
    pub before: Option<String>,
    #[serde(default)]
    pub after: Option<String>,
}

/// The xDS type of an Envoy cluster, as an EnvoyPatchPolicy names it.
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// The part of an Envoy `Cluster` a patch adds for the relay: a DNS cluster with one address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyCluster {
    pub name: String,
    #[serde(rename = "type")]
    pub discovery: String,
    #[allow(dead_code)] // read so the key is known
    pub connect_timeout: String,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub lb_policy: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // read so the key is known
    pub dns_lookup_family: Option<String>,
    pub load_assignment: ClusterLoadAssignment,
}

impl EnvoyCluster {
    /// (host, port) of every endpoint.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        self.load_assignment
            .endpoints
            .iter()
            .flat_map(|e| &e.lb_endpoints)
            .map(|e| {
                let a = &e.endpoint.address.socket_address;
                (a.address.clone(), a.port_value)
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLoadAssignment {
    pub cluster_name: String,
    pub endpoints: Vec<LocalityLbEndpoints>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbEndpoints {
    pub lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbEndpoint {
    pub endpoint: Endpoint,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: Address,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub socket_address: SocketAddress,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketAddress {
    pub address: String,
    pub port_value: u16,
}

#[test]
fn istio_cluster_names_round_trip_and_name_their_service() {
    let c = IstioCluster::for_service("krowoc-relay", "krowoc-edge", 7379);
    let name = c.to_string();
    assert_eq!(
        name,
        "outbound|7379||krowoc-relay.krowoc-edge.svc.cluster.local"
    );
    assert_eq!(IstioCluster::parse(&name), Ok(c.clone()));
    assert_eq!(
        c.service(),
        Ok(("krowoc-relay".into(), "krowoc-edge".into()))
    );
    assert!(IstioCluster::parse("inbound|7379||x.y.svc.cluster.local").is_err());
    assert!(IstioCluster::parse("krowoc-relay").is_err());
    let dns = IstioCluster::parse("outbound|6379||redis.dns").unwrap();
    assert!(dns
        .service()
        .unwrap_err()
        .contains("only Kubernetes Service"));
}

#[test]
fn service_hosts_resolve_as_the_dns_search_path_does() {
    let resolve = |h: &str| resolve_service_host(h, "krowoc-edge");
    let redis = Some(("redis".to_string(), "krowoc-edge".to_string()));
    for host in [
        "redis",
        "redis.krowoc-edge",
        "redis.krowoc-edge.svc",
        "redis.krowoc-edge.svc.cluster.local",
    ] {
        assert_eq!(resolve(host), redis, "{host}");
    }
    assert_eq!(
        resolve("redis.other"),
        Some(("redis".into(), "other".into()))
    );
    assert_eq!(resolve("10.0.0.1"), None);
    assert_eq!(resolve("redis.example.com"), None);
}
