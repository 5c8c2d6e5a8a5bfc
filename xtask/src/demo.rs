//! `cargo xtask demo`: redis-server, the upstream, the relay and Envoy (or, with `--host
//! host-shim`, host-shim) running `envoy/envoy.yaml` with the freshly built plugin, on the agreed
//! local ports, until Ctrl-C. Envoy runs a loopback copy of the file (`<target>/demo/envoy.yaml`:
//! listener, admin and clusters on 127.0.0.1, the stock-Envoy plugin build); host-shim runs the
//! file itself with its cluster overrides.

use crate::cli::{DemoHost, DemoOptions, DemoRedis, SetupOptions};
use crate::envoy_install::{self, Envoy};
use crate::envoy_yaml;
use crate::procs::{self, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Needs};
use crate::workspace::{Binaries, WasmBuild, Workspace};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

pub const GATEWAY_PORT: u16 = 10000;
pub const ADMIN_PORT: u16 = 9901;
const UPSTREAM_PORT: u16 = 8080;
const RELAY_PORT: u16 = 7379;
pub const REDIS_PORT: u16 = 6390;
const PORTS: [(&str, u16); 4] = [
    ("gateway", GATEWAY_PORT),
    ("gateway admin", ADMIN_PORT),
    ("upstream", UPSTREAM_PORT),
    ("relay", RELAY_PORT),
];
/// `--redis cluster`: three masters, then their three replicas.
const CLUSTER_PORTS: [u16; 6] = [6391, 6392, 6393, 6394, 6395, 6396];
/// `--redis sentinel`: the master is [`REDIS_PORT`], its replica this one.
const REPLICA_PORT: u16 = 6391;
const SENTINEL_PORTS: [u16; 3] = [26390, 26391, 26392];
/// The name the demo's sentinels monitor the master as.
pub const SENTINEL_MASTER: &str = "krowoc";

/// The ports the demo needs with `redis`: its services', and each Redis process's (a cluster
/// node's bus port too).
fn ports(redis: DemoRedis) -> Vec<(String, u16)> {
    let mut ports: Vec<(String, u16)> = PORTS.iter().map(|(n, p)| (n.to_string(), *p)).collect();
    match redis {
        DemoRedis::Single | DemoRedis::Tls => ports.push(("redis".into(), REDIS_PORT)),
        DemoRedis::Cluster => {
            for p in CLUSTER_PORTS {
                ports.push((format!("redis cluster node {p}"), p));
                ports.push((format!("redis cluster bus {}", p + 10000), p + 10000));
            }
        }
        DemoRedis::Sentinel => {
            ports.push(("redis master".into(), REDIS_PORT));
            ports.push(("redis replica".into(), REPLICA_PORT));
            for p in SENTINEL_PORTS {
                ports.push((format!("redis sentinel {p}"), p));
            }
        }
    }
    ports
}

pub fn run(options: &DemoOptions) -> Result<ExitCode> {
    procs::catch_stop_signals();
    let (ws, builds) = prepare(&options.setup, options.host, options.redis)?;
    if let Some(signal) = procs::stop_requested() {
        eprintln!("xtask: {signal} received; nothing was started");
        return Ok(ExitCode::SUCCESS);
    }
    let mut demo = Demo::start(
        &ws,
        &builds,
        options.host,
        options.redis,
        options.follow_logs,
    )?;
    let log_dir = demo.log_dir.clone();
    print_banner(&ws.root, &log_dir, options, &builds);

    let deadline = options.exit_after.map(|d| Instant::now() + d);
    loop {
        if let Some(signal) = procs::stop_requested() {
            eprintln!("\nxtask: {signal} received; stopping the demo");
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("xtask: --exit-after elapsed; stopping the demo");
            break;
        }
        demo.check_alive()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    demo.stop();
    eprintln!("xtask: demo stopped; everything it started has exited");
    Ok(ExitCode::SUCCESS)
}

/// What the demo runs: the plugin builds, the binaries, and Envoy when it is the host.
pub struct Builds {
    pub wasm: WasmBuild,
    /// The plugin as stock Envoy loads it (no Higress imports).
    pub stock_plugin: PathBuf,
    pub bins: Binaries,
    pub envoy: Option<Envoy>,
}

/// What starting the demo needs: its ports free (checked before minutes of building, when a busy
/// port would only fail later), setup (curl too: not for the demo, for the tour's commands; Envoy
/// when it is the host), the plugin and the binaries.
pub fn prepare(
    setup: &SetupOptions,
    host: DemoHost,
    redis: DemoRedis,
) -> Result<(Workspace, Builds)> {
    check_ports_free(&ports(redis))?;
    setup::ensure(
        &Needs {
            wasm_target: true,
            redis: true,
            curl: true,
            ..Needs::default()
        },
        setup,
    )?;
    let ws = Workspace::load()?;
    let envoy = match host {
        DemoHost::Envoy => Some(envoy_install::ensure(&ws.target_dir, setup)?),
        DemoHost::HostShim => None,
    };
    let wasm = ws.build_wasm()?;
    let stock_plugin = ws.build_stock_plugin()?;
    let bins = ws.build_binaries(false)?;
    Ok((
        ws,
        Builds {
            wasm,
            stock_plugin,
            bins,
            envoy,
        },
    ))
}

/// The demo's services, running until `stop` (or drop).
pub struct Demo {
    // Dropped in this order: the services first, then redis-server's directory.
    services: Services,
    _redis: RedisPart,
    pub log_dir: PathBuf,
}

/// What the demo's Redis leaves for the relay and the upstream: how to reach it, and the
/// directories (data, sentinel configurations, certificates) that must outlive it.
struct RedisPart {
    /// The relay's flags (as the filter's ACL user).
    relay_args: Vec<String>,
    /// The upstream's flags.
    upstream_args: Vec<String>,
    /// envoy.yaml's `redis` cluster (transport `redis_call`): one node.
    gateway_addr: std::net::SocketAddr,
    _dirs: Vec<TempDir>,
    _ca: Option<testkit::tls::TestCa>,
}

impl Demo {
    /// Starts redis-server, the upstream, the relay and the gateway (`host` running
    /// envoy/envoy.yaml with the plugin), on the demo's ports, each waited on until it serves.
    pub fn start(
        ws: &Workspace,
        builds: &Builds,
        host: DemoHost,
        redis_mode: DemoRedis,
        follow_logs: bool,
    ) -> Result<Demo> {
        let bins = &builds.bins;
        let yaml_path = ws.root.join("envoy/envoy.yaml");
        let yaml = std::fs::read_to_string(&yaml_path)
            .with_context(|| format!("cannot read {}", yaml_path.display()))?;
        let token = envoy_yaml::relay_token(&yaml)
            .with_context(|| format!("reading the relay token from {}", yaml_path.display()))?;
        check_ports_free(&ports(redis_mode))?;

        let log_dir = ws.target_dir.join("demo");
        let mut services = Services::new(&log_dir, follow_logs)?;
        // The compose stack's ACL file: the relay logs in as the filter's least-privilege user.
        let acl_dir = ws.root.join("envoy/redis");
        let redis_part = start_redis(&mut services, &log_dir, &acl_dir, redis_mode)?;

        let mut upstream = with_log_level(Command::new(&bins.upstream));
        upstream.args(["--listen", &loopback(UPSTREAM_PORT).to_string()]);
        upstream.args(&redis_part.upstream_args);
        services.start(service(
            "upstream",
            upstream,
            UPSTREAM_PORT,
            "upstream listening on",
            30,
        ))?;

        let mut relay = with_log_level(Command::new(&bins.relay));
        relay
            .args(["--listen", &loopback(RELAY_PORT).to_string()])
            .args(&redis_part.relay_args)
            .arg("--redis-password-file")
            .arg(acl_dir.join("krowoc-edge.password"));
        match &token {
            Some(t) => {
                eprintln!("xtask: the relay expects the token from envoy.yaml's plugin configuration");
                relay.args(["--token", t]);
            }
            None => eprintln!("xtask: envoy.yaml's plugin configuration has no relay token; the relay runs without one"),
        }
        services.start(service(
            "relay",
            relay,
            RELAY_PORT,
            "relay listening on",
            30,
        ))?;

        let gateway = match host {
            DemoHost::Envoy => {
                let envoy = builds
                    .envoy
                    .as_ref()
                    .context("the demo on Envoy needs Envoy (prepare finds or installs it)")?;
                let copy = testkit::envoy::loopback_yaml(
                    &yaml,
                    &testkit::envoy::Loopback {
                        listener_port: GATEWAY_PORT,
                        admin_port: ADMIN_PORT,
                        clusters: &[
                            ("upstream".into(), loopback(UPSTREAM_PORT)),
                            ("redis_relay".into(), loopback(RELAY_PORT)),
                            ("redis".into(), redis_part.gateway_addr),
                        ],
                        plugin: &builds.stock_plugin,
                    },
                )
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("making a loopback copy of {}", yaml_path.display()))?;
                let copy_path = log_dir.join("envoy.yaml");
                std::fs::write(&copy_path, copy)
                    .with_context(|| format!("cannot write {}", copy_path.display()))?;
                let mut cmd = Command::new(&envoy.path);
                cmd.arg("-c")
                    .arg(&copy_path)
                    .args(["--concurrency", "2", "--disable-hot-restart"])
                    // Its own shared-memory name, beside any other Envoy on the machine.
                    .args(["--base-id", &std::process::id().to_string()])
                    .args(["--log-level", "info"]);
                service(
                    "envoy",
                    cmd,
                    GATEWAY_PORT,
                    "starting main dispatch loop",
                    60,
                )
            }
            DemoHost::HostShim => {
                let mut cmd = with_log_level(Command::new(&bins.host_shim));
                cmd.current_dir(&ws.root)
                    .args(["run", "--config", "envoy/envoy.yaml", "--plugin"])
                    .arg(&builds.wasm.plugin)
                    .args(["--listen", &loopback(GATEWAY_PORT).to_string()])
                    .args(["--admin", &loopback(ADMIN_PORT).to_string()])
                    .args([
                        "--cluster",
                        &format!("upstream={}", loopback(UPSTREAM_PORT)),
                    ])
                    .args([
                        "--cluster",
                        &format!("redis_relay={}", loopback(RELAY_PORT)),
                    ])
                    .args(["--cluster", &format!("redis={}", redis_part.gateway_addr)]);
                service("host-shim", cmd, GATEWAY_PORT, "host-shim listening on", 60)
            }
        };
        services.start(gateway)?;

        Ok(Demo {
            services,
            _redis: redis_part,
            log_dir,
        })
    }

    /// The process id of the demo's service `name` (`redis`, `upstream`, `relay`, `envoy` or
    /// `host-shim`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.services.pid(name)
    }

    /// Fails with the service's last output if one has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.services.check_alive()
    }

    pub fn stop(mut self) {
        self.services.stop_all();
    }
}

/// A redis-server on `port`, as the filter's ACL file defines users, with no persistence.
fn redis_server(port: u16, acl_dir: &Path, dir: &Path) -> Command {
    let mut redis = Command::new("redis-server");
    redis
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--aclfile")
        .arg(acl_dir.join("users.acl"))
        .arg("--dir")
        .arg(dir);
    redis
}

/// Starts the demo's Redis as `mode` says, each process waited on until it serves.
fn start_redis(
    services: &mut Services,
    log_dir: &Path,
    acl_dir: &Path,
    mode: DemoRedis,
) -> Result<RedisPart> {
    let user = "krowoc-edge";
    match mode {
        DemoRedis::Single => {
            let dir = TempDir::fresh(log_dir, "redis-data")?;
            services.start(service(
                "redis",
                redis_server(REDIS_PORT, acl_dir, dir.path()),
                REDIS_PORT,
                "Ready to accept connections",
                10,
            ))?;
            Ok(RedisPart {
                relay_args: vec![
                    "--redis".into(),
                    format!("redis://{user}@127.0.0.1:{REDIS_PORT}"),
                ],
                upstream_args: vec!["--redis".into(), format!("redis://127.0.0.1:{REDIS_PORT}")],
                gateway_addr: loopback(REDIS_PORT),
                _dirs: vec![dir],
                _ca: None,
            })
        }
        DemoRedis::Tls => {
            let dir = TempDir::fresh(log_dir, "redis-data")?;
            let ca =
                testkit::tls::TestCa::new_in("krowoc demo CA", log_dir).with_context(|| {
                    format!("a directory for certificates in {}", log_dir.display())
                })?;
            let server = ca.issue_server(&["localhost", "127.0.0.1"]);
            let ca_file = ca.ca_file();
            let mut redis = redis_server(0, acl_dir, dir.path());
            redis
                .args(["--tls-port", &REDIS_PORT.to_string()])
                .arg("--tls-cert-file")
                .arg(&server.cert)
                .arg("--tls-key-file")
                .arg(&server.key)
                .arg("--tls-ca-cert-file")
                .arg(&ca_file)
                .args(["--tls-auth-clients", "no"]);
            services.start(service(
                "redis",
                redis,
                REDIS_PORT,
                "Ready to accept connections",
                10,
            ))?;
            let ca_arg = ca_file.display().to_string();
            Ok(RedisPart {
                relay_args: vec![
                    "--redis".into(),
                    format!("rediss://{user}@localhost:{REDIS_PORT}"),
                    "--tls-ca".into(),
                    ca_arg.clone(),
                ],
                upstream_args: vec![
                    "--redis".into(),
                    format!("rediss://localhost:{REDIS_PORT}"),
                    "--redis-tls-ca".into(),
                    ca_arg,
                ],
                gateway_addr: loopback(REDIS_PORT),
                _dirs: vec![dir],
                _ca: Some(ca),
            })
        }
        DemoRedis::Cluster => {
            let mut dirs = Vec::new();
            for port in CLUSTER_PORTS {
                let dir = TempDir::fresh(log_dir, &format!("redis-cluster-{port}"))?;
                let mut node = redis_server(port, acl_dir, dir.path());
                node.args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-node-timeout", "5000"]);
                services.start(service(
                    &format!("redis-{port}"),
                    node,
                    port,
                    "Ready to accept connections",
                    10,
                ))?;
                dirs.push(dir);
            }
            let mut create = Command::new("redis-cli");
            create.args(["--cluster", "create"]);
            for port in CLUSTER_PORTS {
                create.arg(format!("127.0.0.1:{port}"));
            }
            create
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .stdin(std::process::Stdio::null());
            let out = create
                .output()
                .context("running redis-cli --cluster create")?;
            if !out.status.success() {
                bail!(
                    "redis-cli --cluster create failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            wait_cluster_ok(&CLUSTER_PORTS, Duration::from_secs(30))?;
            let seeds: Vec<String> = CLUSTER_PORTS[..3]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let seeds = seeds.join(",");
            Ok(RedisPart {
                relay_args: vec!["--redis-cluster".into(), format!("redis://{user}@{seeds}")],
                upstream_args: vec!["--redis-cluster".into(), seeds],
                gateway_addr: loopback(CLUSTER_PORTS[0]),
                _dirs: dirs,
                _ca: None,
            })
        }
        DemoRedis::Sentinel => {
            let master_dir = TempDir::fresh(log_dir, "redis-data")?;
            services.start(service(
                "redis",
                redis_server(REDIS_PORT, acl_dir, master_dir.path()),
                REDIS_PORT,
                "Ready to accept connections",
                10,
            ))?;
            let replica_dir = TempDir::fresh(log_dir, "redis-replica")?;
            let mut replica = redis_server(REPLICA_PORT, acl_dir, replica_dir.path());
            replica.args(["--replicaof", "127.0.0.1", &REDIS_PORT.to_string()]);
            services.start(service(
                "redis-replica",
                replica,
                REPLICA_PORT,
                "MASTER <-> REPLICA sync: Finished with success",
                30,
            ))?;
            let mut dirs = vec![master_dir, replica_dir];
            for port in SENTINEL_PORTS {
                let dir = TempDir::fresh(log_dir, &format!("redis-sentinel-{port}"))?;
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {REDIS_PORT} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 5000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 10000\n",
                        dir.path().display()
                    ),
                )
                .with_context(|| format!("cannot write {}", conf.display()))?;
                let mut sentinel = Command::new("redis-server");
                sentinel.arg(&conf).arg("--sentinel");
                services.start(service(
                    &format!("sentinel-{port}"),
                    sentinel,
                    port,
                    "+monitor master",
                    10,
                ))?;
                dirs.push(dir);
            }
            let sentinels: Vec<String> = SENTINEL_PORTS
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let sentinels = sentinels.join(",");
            Ok(RedisPart {
                relay_args: vec![
                    "--redis-sentinel".into(),
                    format!("redis://{user}@{sentinels}"),
                    "--sentinel-master".into(),
                    SENTINEL_MASTER.into(),
                ],
                upstream_args: vec![
                    "--redis-sentinel".into(),
                    sentinels,
                    "--redis-sentinel-master".into(),
                    SENTINEL_MASTER.into(),
                ],
                gateway_addr: loopback(REDIS_PORT),
                _dirs: dirs,
                _ca: None,
            })
        }
    }
}

/// With `--redis cluster`: each master's port and `DBSIZE`.
pub fn keys_per_master() -> Result<Vec<(u16, u64)>> {
    let mut out = Vec::new();
    for port in &CLUSTER_PORTS[..3] {
        let reply = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "dbsize"])
            .output()
            .context("running redis-cli dbsize")?;
        let text = String::from_utf8_lossy(&reply.stdout);
        let n = text
            .trim()
            .parse()
            .with_context(|| format!("redis-cli -p {port} dbsize answered {text:?}"))?;
        out.push((*port, n));
    }
    Ok(out)
}

/// Waits until every node says `cluster_state:ok`.
fn wait_cluster_ok(ports: &[u16], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut states = Vec::new();
        for port in ports {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .context("running redis-cli cluster info")?;
            states.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if states.iter().all(|s| s.contains("cluster_state:ok")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the demo's Redis Cluster did not reach cluster_state:ok in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_ports_free(ports: &[(String, u16)]) -> Result<()> {
    let busy: Vec<String> = ports
        .iter()
        .filter(|(_, port)| procs::port_busy(loopback(*port)))
        .map(|(what, port)| format!("{port} ({what})"))
        .collect();
    if !busy.is_empty() {
        bail!(
            "the demo needs these ports but they are busy: {}; stop whatever holds them \
             (`ss -ltnp` shows it) and run again",
            busy.join(", ")
        );
    }
    Ok(())
}

/// A service that is ready once it logs `ready_line` and serves on `port` (loopback).
fn service(name: &str, command: Command, port: u16, ready_line: &str, secs: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        command,
        ready_addr: loopback(port),
        ready_line: Some(ready_line.into()),
        startup_timeout: Duration::from_secs(secs),
    }
}

/// The services log at `info` unless the user chose a level with RUST_LOG.
fn with_log_level(mut cmd: Command) -> Command {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

fn redis_banner(mode: DemoRedis) -> String {
    match mode {
        DemoRedis::Single => format!(
            "redis://{}   (redis-cli -p {REDIS_PORT})",
            loopback(REDIS_PORT)
        ),
        DemoRedis::Tls => format!(
            "rediss://localhost:{REDIS_PORT}   (TLS only; the CA is under the logs directory)"
        ),
        DemoRedis::Cluster => format!(
            "a Redis Cluster, masters 127.0.0.1:{}-{}, replicas {}-{}   (redis-cli -c -p {})",
            CLUSTER_PORTS[0], CLUSTER_PORTS[2], CLUSTER_PORTS[3], CLUSTER_PORTS[5], CLUSTER_PORTS[0]
        ),
        DemoRedis::Sentinel => format!(
            "master {} behind sentinels {}-{} (name {SENTINEL_MASTER})   (redis-cli -p {REDIS_PORT})",
            loopback(REDIS_PORT),
            SENTINEL_PORTS[0],
            SENTINEL_PORTS[2]
        ),
    }
}

fn print_banner(root: &Path, log_dir: &Path, options: &DemoOptions, builds: &Builds) {
    let gw = format!("http://{}", loopback(GATEWAY_PORT));
    let admin = format!("http://{}", loopback(ADMIN_PORT));
    let host = match (&builds.envoy, options.host) {
        (Some(envoy), DemoHost::Envoy) => format!("Envoy {} + plugin", envoy.version),
        _ => "host-shim + plugin".to_string(),
    };
    println!(
        "
Krowoc Edge demo is running on {host}:
  gateway                       {gw}
  gateway admin                 {admin}/stats/prometheus
  upstream, direct              http://{upstream}
  relay                         http://{relay}/resp
  redis                         {redis}
  logs                          {logs}/*.log
",
        upstream = loopback(UPSTREAM_PORT),
        relay = loopback(RELAY_PORT),
        redis = redis_banner(options.redis),
        logs = log_dir.display(),
    );
    // The README's own tour, so that the banner cannot suggest anything else.
    let tour = std::fs::read_to_string(root.join("README.md"))
        .ok()
        .and_then(|text| crate::tour::console_steps("README.md", &text).ok())
        .unwrap_or_default();
    if tour.is_empty() {
        println!("README.md (\"A tour of the demo\") shows what to try.");
    } else {
        println!(
            "The tour in README.md (\"A tour of the demo\", with each command's output), in another \
             terminal:"
        );
        for step in &tour {
            println!("  {}", step.command);
        }
        println!();
    }
    match options.exit_after {
        Some(d) => println!("Stops by itself after {}s, or on Ctrl-C.", d.as_secs()),
        None => println!("Ctrl-C stops everything."),
    }
}
