//! Real Envoy, the reference host: a loopback copy of `envoy/envoy.yaml` (listener, admin and
//! clusters on the addresses a test or the demo chose, the plugin from a local path), and an
//! Envoy process started with its own `--base-id` and stopped by its PID on drop.
//!
//! ```no_run
//! # use std::net::SocketAddr;
//! let yaml = std::fs::read_to_string("envoy/envoy.yaml").unwrap();
//! let upstream: SocketAddr = "127.0.0.1:8080".parse().unwrap();
//! let copy = testkit::envoy::loopback_yaml(&yaml, &testkit::envoy::Loopback {
//!     listener_port: 0,
//!     admin_port: 0,
//!     clusters: &[("upstream".into(), upstream)],
//!     plugin: std::path::Path::new("plugin.wasm"),
//! }).unwrap();
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_yaml::{Mapping, Value};

/// The Envoy binary to run (`cargo xtask test` sets it to the one it found or installed).
pub const ENV_ENVOY: &str = "KROWOC_ENVOY";
/// The Envoy release the project is tested with (xtask installs it; the images pin it).
pub const PINNED_VERSION: &str = "1.40.0";

/// Where `cargo xtask` installs the pinned Envoy.
pub fn pinned_path(target_dir: &Path) -> PathBuf {
    target_dir.join("envoy").join(PINNED_VERSION).join("envoy")
}

/// The Envoy binary: `KROWOC_ENVOY`, else the pinned one under `<workspace>/target`. Panics
/// with the command that installs it when neither exists.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os(ENV_ENVOY).filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|root| root.join("target"))
                .unwrap_or_else(|| PathBuf::from("target"))
        });
    let pinned = pinned_path(&target);
    assert!(
        pinned.is_file(),
        "no Envoy: {ENV_ENVOY} is unset and {} is missing; `cargo xtask test` installs it",
        pinned.display()
    );
    pinned
}

/// What the loopback copy changes.
pub struct Loopback<'a> {
    /// The gateway listener's port on 127.0.0.1 (0: any free one, read back from the admin).
    pub listener_port: u16,
    /// The admin listener's port on 127.0.0.1 (0: any).
    pub admin_port: u16,
    /// Every cluster's one endpoint (each cluster in the file must be given).
    pub clusters: &'a [(String, SocketAddr)],
    /// The plugin every wasm filter loads.
    pub plugin: &'a Path,
}

/// `yaml` with the listener and admin on loopback, each cluster a STATIC one at its given
/// address (a cluster with a `cluster_type` keeps its endpoints), and every wasm filter's code
/// read from `plugin`. Everything else is kept.
pub fn loopback_yaml(yaml: &str, lb: &Loopback) -> Result<String, String> {
    let mut doc: Value =
        serde_yaml::from_str(yaml).map_err(|e| format!("envoy.yaml is not YAML: {e}"))?;
    set_socket_address(
        doc.get_mut("admin")
            .and_then(|a| a.get_mut("address"))
            .ok_or("envoy.yaml has no admin.address")?,
        lb.admin_port,
    );
    let resources = doc
        .get_mut("static_resources")
        .ok_or("envoy.yaml has no static_resources")?;
    let listeners = resources
        .get_mut("listeners")
        .and_then(Value::as_sequence_mut)
        .ok_or("envoy.yaml has no static_resources.listeners")?;
    let [listener] = listeners.as_mut_slice() else {
        return Err(format!(
            "envoy.yaml has {} listeners; expected one",
            listeners.len()
        ));
    };
    set_socket_address(
        listener
            .get_mut("address")
            .ok_or("the listener has no address")?,
        lb.listener_port,
    );
    let mut plugins = 0;
    set_plugin_paths(listener, lb.plugin, &mut plugins);
    if plugins == 0 {
        return Err("envoy.yaml has no wasm filter with code.local.filename".into());
    }
    let clusters = resources
        .get_mut("clusters")
        .and_then(Value::as_sequence_mut)
        .ok_or("envoy.yaml has no static_resources.clusters")?;
    for cluster in clusters.iter_mut() {
        let name = cluster
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a cluster has no name")?
            .to_string();
        if cluster.get("cluster_type").is_some() {
            // A custom cluster type (`envoy.clusters.redis`) keeps its endpoints: the seeds.
            continue;
        }
        let addr = lb
            .clusters
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| format!("no loopback address given for cluster {name}"))?;
        cluster["type"] = Value::from("STATIC");
        let endpoint = cluster
            .get_mut("load_assignment")
            .and_then(|l| l.get_mut("endpoints"))
            .and_then(|e| e.get_mut(0))
            .and_then(|e| e.get_mut("lb_endpoints"))
            .and_then(|e| e.get_mut(0))
            .and_then(|e| e.get_mut("endpoint"))
            .and_then(|e| e.get_mut("address"))
            .ok_or_else(|| format!("cluster {name} has no load_assignment endpoint address"))?;
        *endpoint = socket_address(&addr.ip().to_string(), addr.port());
    }
    serde_yaml::to_string(&doc).map_err(|e| format!("cannot write yaml: {e}"))
}

fn socket_address(address: &str, port: u16) -> Value {
    let mut inner = Mapping::new();
    inner.insert("address".into(), address.into());
    inner.insert("port_value".into(), u64::from(port).into());
    let mut outer = Mapping::new();
    outer.insert("socket_address".into(), Value::Mapping(inner));
    Value::Mapping(outer)
}

fn set_socket_address(address: &mut Value, port: u16) {
    *address = socket_address("127.0.0.1", port);
}

/// Every `vm_config.code.local.filename` below `node` becomes `plugin`.
fn set_plugin_paths(node: &mut Value, plugin: &Path, found: &mut usize) {
    match node {
        Value::Mapping(map) => {
            if let Some(local) = map
                .get_mut("vm_config")
                .and_then(|v| v.get_mut("code"))
                .and_then(|c| c.get_mut("local"))
            {
                local["filename"] = Value::from(plugin.display().to_string());
                *found += 1;
            }
            for (_, v) in map.iter_mut() {
                set_plugin_paths(v, plugin, found);
            }
        }
        Value::Sequence(seq) => seq
            .iter_mut()
            .for_each(|v| set_plugin_paths(v, plugin, found)),
        _ => {}
    }
}

/// A running Envoy; killed (by the PID it was started with) on drop.
pub struct EnvoyProcess {
    child: Child,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The gateway listener (the one listener of the yaml).
    pub listener: SocketAddr,
    /// Envoy's log (stderr), for a failing test to show.
    pub log: PathBuf,
}

/// `--base-id` values unique to this process's instances (the shared-memory name Envoy
/// derives from it must differ between instances running side by side).
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() % 100_000) * 100 + n % 100
}

impl EnvoyProcess {
    /// Starts `envoy -c yaml` with `concurrency` workers, logs in `dir`, and waits until the
    /// admin says LIVE and the listener is bound. Fails with the log when Envoy exits first.
    pub fn start(
        binary: &Path,
        yaml: &Path,
        dir: &Path,
        concurrency: usize,
    ) -> Result<EnvoyProcess, String> {
        let admin_file = dir.join("envoy-admin.addr");
        let log = dir.join("envoy.log");
        let _ = std::fs::remove_file(&admin_file);
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(yaml)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--base-id", &next_base_id().to_string()])
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--log-level",
                "warning",
                "--component-log-level",
                "wasm:info",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut process = EnvoyProcess {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        process.wait_ready(&admin_file, Duration::from_secs(60))?;
        Ok(process)
    }

    fn wait_ready(&mut self, admin_file: &Path, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "envoy exited ({status}) before it was ready:\n{}",
                    self.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "envoy not ready after {timeout:?}:\n{}",
                    self.log_text()
                ));
            }
            if self.admin.port() == 0 {
                if let Some(addr) = std::fs::read_to_string(admin_file)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                {
                    self.admin = addr;
                }
            } else if let Some(listener) = self.live_listener() {
                self.listener = listener;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The listener's bound address once the server is LIVE.
    fn live_listener(&self) -> Option<SocketAddr> {
        let ready = crate::http::try_request(self.admin, "GET", "/ready", &[], b"").ok()?;
        if ready.status != 200 {
            return None;
        }
        let listeners =
            crate::http::try_request(self.admin, "GET", "/listeners?format=json", &[], b"").ok()?;
        let json: serde_json::Value = serde_json::from_slice(&listeners.body).ok()?;
        let address = &json["listener_statuses"][0]["local_address"]["socket_address"];
        let ip = address["address"].as_str()?.parse().ok()?;
        let port = u16::try_from(address["port_value"].as_u64()?).ok()?;
        (port != 0).then(|| SocketAddr::new(ip, port))
    }

    /// Envoy's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "
admin:
  address: {socket_address: {address: 0.0.0.0, port_value: 9901}}
static_resources:
  listeners:
  - name: gateway
    address: {socket_address: {address: 0.0.0.0, port_value: 10000}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              config:
                vm_config: {code: {local: {filename: /etc/envoy/plugin.wasm}}}
  clusters:
  - name: upstream
    type: STRICT_DNS
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: upstream, port_value: 8080}}}
";

    #[test]
    fn the_loopback_copy_moves_listeners_clusters_and_the_plugin() {
        let up: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        let text = loopback_yaml(
            YAML,
            &Loopback {
                listener_port: 0,
                admin_port: 1234,
                clusters: &[("upstream".into(), up)],
                plugin: Path::new("/tmp/p.wasm"),
            },
        )
        .unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        let sock = |v: &Value| {
            (
                v["socket_address"]["address"].as_str().unwrap().to_string(),
                v["socket_address"]["port_value"].as_u64().unwrap(),
            )
        };
        assert_eq!(sock(&doc["admin"]["address"]), ("127.0.0.1".into(), 1234));
        let res = &doc["static_resources"];
        assert_eq!(
            sock(&res["listeners"][0]["address"]),
            ("127.0.0.1".into(), 0)
        );
        let cluster = &res["clusters"][0];
        assert_eq!(cluster["type"].as_str(), Some("STATIC"));
        assert_eq!(
            sock(
                &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                    ["address"]
            ),
            ("127.0.0.1".into(), 4567)
        );
        assert!(text.contains("filename: /tmp/p.wasm"), "{text}");
    }

    #[test]
    fn a_cluster_without_an_address_is_refused_by_name() {
        let e = loopback_yaml(
            YAML,
            &Loopback {
                listener_port: 0,
                admin_port: 0,
                clusters: &[],
                plugin: Path::new("/tmp/p.wasm"),
            },
        )
        .unwrap_err();
        assert!(e.contains("cluster upstream"), "{e}");
    }
}
