//! `host-shim run`: load envoy.yaml, apply command-line overrides, compile the plugin once,
//! start the workers and the admin listener, and serve until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::envoy_config::{EnvoyConfig, SocketAddress};
use crate::gateway::{FilterSpec, Gateway, GatewaySpec};
use crate::host::misc::PluginLogFile;
use crate::shared::SharedState;
use crate::vm::{PluginModule, VmSettings};
use krowoc_relay::tls::RedisTls;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The Envoy bootstrap to run (a documented subset of Envoy's schema).
    #[arg(long, default_value = "envoy/envoy.yaml")]
    pub config: PathBuf,
    /// Point a cluster somewhere else: NAME=HOST:PORT (repeatable).
    #[arg(long = "cluster", value_name = "NAME=HOST:PORT")]
    pub clusters: Vec<String>,
    /// Load this plugin instead of the yaml's vm_config.code.local.filename.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Listen here instead of the yaml's listener address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve admin here instead of the yaml's admin address.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Worker threads (one plugin VM each); default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// The longest one plugin callback may run before its VM is stopped and replaced.
    #[arg(long, default_value = "1000", value_name = "MS")]
    pub callback_deadline_ms: u64,
    /// Linear memory cap per plugin VM.
    #[arg(long, default_value = "256", value_name = "MIB")]
    pub vm_memory_mib: usize,
    /// Also write the plugin's log lines to FILE (appended), as Envoy's `--log-path` holds them.
    #[arg(long, value_name = "FILE")]
    pub log_path: Option<PathBuf>,
}

/// What a started gateway gives back: where it listens, and how to stop it.
pub struct Running {
    pub gateway: Gateway,
    pub admin_addr: Option<SocketAddr>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn stop(self) {
        if let Some(t) = self.admin_task {
            t.abort();
        }
        self.gateway.stop();
    }
}

/// Builds the gateway's spec from the yaml and the overrides.
pub fn load_spec(args: &RunArgs) -> anyhow::Result<(GatewaySpec, SocketAddr, Option<SocketAddr>)> {
    let mut cfg =
        EnvoyConfig::load(&args.config).map_err(|e| anyhow!("{}: {e}", args.config.display()))?;
    for o in &args.clusters {
        let (name, addr) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--cluster {o:?}: expected NAME=HOST:PORT"))?;
        cfg.override_cluster(name, addr)
            .map_err(|e| anyhow!("--cluster {o:?}: {e}"))?;
    }
    let listen = match args.listen {
        Some(a) => a,
        None => resolve(&cfg.listener.host, cfg.listener.port)
            .with_context(|| "the listener address in the yaml")?,
    };
    let admin = match (args.admin, &cfg.admin) {
        (Some(a), _) => Some(a),
        (None, Some(a)) => {
            Some(resolve(&a.host, a.port).with_context(|| "the admin address in the yaml")?)
        }
        (None, None) => None,
    };
    let clusters: HashMap<String, SocketAddress> = cfg
        .clusters
        .iter()
        .map(|(name, c)| (name.clone(), c.address()))
        .collect();
    let mut redis_tls = HashMap::new();
    for (name, cluster) in &cfg.clusters {
        let Some(tls) = &cluster.tls else { continue };
        let client = tls
            .client_certificate
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        let built = RedisTls::new(Some(&tls.trusted_ca), client)
            .with_context(|| format!("cluster {name}: transport_socket"))?;
        let built = match &tls.sni {
            Some(sni) => built.with_server_name(sni.clone()),
            None => built,
        };
        redis_tls.insert(name.clone(), built);
    }
    if let Some(route) = cfg
        .routes
        .iter()
        .find(|r| redis_tls.contains_key(&r.cluster))
    {
        anyhow::bail!(
            "route {:?}: its cluster {} has a TLS transport_socket; host-shim speaks TLS to Redis clusters only (proxy_redis_call)",
            route.name,
            route.cluster
        );
    }
    let redis_clusters = cfg
        .clusters
        .iter()
        .filter_map(|(name, c)| Some((name.clone(), c.redis_cluster.clone()?)))
        .collect();
    let routes = cfg.routes.clone();
    let filter = match &cfg.wasm {
        None => None,
        Some(w) => {
            let path = args.plugin.clone().unwrap_or_else(|| w.code_path.clone());
            let module = PluginModule::load(&path)?;
            Some(FilterSpec {
                module,
                settings: VmSettings {
                    plugin_name: w.name.clone(),
                    root_id: w.root_id.clone(),
                    vm_id: w.vm_id.clone(),
                    vm_configuration: w.vm_configuration.clone().into_bytes(),
                    plugin_configuration: w.configuration.clone().into_bytes(),
                    callback_deadline: Duration::from_millis(args.callback_deadline_ms.max(10)),
                    memory_limit_bytes: args.vm_memory_mib.max(1) << 20,
                    env: w.environment.clone(),
                    log_level: log_level_from_env(),
                    log_file: match &args.log_path {
                        None => None,
                        Some(p) => Some(Arc::new(
                            PluginLogFile::create(p)
                                .with_context(|| format!("--log-path {}", p.display()))?,
                        )),
                    },
                },
                failure_policy: w.failure_policy,
                reload_base_interval: w.reload_base_interval,
            })
        }
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let spec = GatewaySpec {
        workers,
        routes,
        clusters,
        redis_tls,
        redis_clusters,
        filter,
        max_request_headers_bytes: 60 * 1024,
        stream_idle_timeout: cfg.stream_idle_timeout,
        connection_manager: cfg.connection_manager.clone(),
        max_downstream_connections: cfg
            .max_downstream_connections
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    Ok((spec, listen, admin))
}

fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host}:{port} resolves to no address"))
}

/// The plugin's log level from RUST_LOG's simplest forms (Envoy's `--log-level`).
fn log_level_from_env() -> i32 {
    match std::env::var("RUST_LOG").unwrap_or_default().as_str() {
        "trace" => 0,
        "debug" => 1,
        "warn" => 3,
        "error" => 4,
        _ => 2,
    }
}

/// Starts the gateway and its admin listener (admin on the caller's tokio runtime).
pub async fn start(args: &RunArgs) -> anyhow::Result<Running> {
    let (spec, listen, admin) = load_spec(args)?;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shared = Arc::new(SharedState::default());
    let gateway = Gateway::start(spec, listener, shared.clone())?;
    let (admin_addr, admin_task) = match admin {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin)"))?;
            let addr = l.local_addr()?;
            let ready = gateway.readiness();
            (
                Some(addr),
                Some(tokio::spawn(crate::admin::serve(l, shared, ready))),
            )
        }
        None => (None, None),
    };
    Ok(Running {
        gateway,
        admin_addr,
        admin_task,
    })
}

/// `host-shim run`: serve until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let running = start(&args).await?;
    eprintln!("host-shim listening on {}", running.gateway.local_addr);
    if let Some(a) = running.admin_addr {
        eprintln!("host-shim admin on {a}");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("host-shim stopping");
    tokio::task::spawn_blocking(move || running.stop()).await?;
    Ok(())
}
