//! `cargo xtask demo`: redis-server, the upstream, the relay and host-shim running
//! `envoy/envoy.yaml` with the freshly built plugin, on the agreed local ports, until Ctrl-C.

use crate::cli::DemoOptions;
use crate::envoy_yaml;
use crate::procs::{self, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Needs};
use crate::workspace::{Binaries, Workspace};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const GATEWAY_PORT: u16 = 10000;
const ADMIN_PORT: u16 = 9901;
const UPSTREAM_PORT: u16 = 8080;
const RELAY_PORT: u16 = 7379;
const REDIS_PORT: u16 = 6390;
const PORTS: [(&str, u16); 5] = [
    ("gateway", GATEWAY_PORT),
    ("host-shim admin", ADMIN_PORT),
    ("upstream", UPSTREAM_PORT),
    ("relay", RELAY_PORT),
    ("redis", REDIS_PORT),
];

pub fn run(options: &DemoOptions) -> Result<ExitCode> {
    procs::catch_stop_signals();
    // Before minutes of building: a busy port would only fail later.
    check_ports_free(&PORTS)?;

    setup::ensure(
        &Needs {
            wasm_target: true,
            redis: true,
            // Not for the demo itself: for the tour's commands in the README.
            curl: true,
            ..Needs::default()
        },
        &options.setup,
    )?;
    let ws = Workspace::load()?;
    let wasm = ws.build_wasm()?;
    let bins = ws.build_binaries(false)?;
    if let Some(signal) = procs::stop_requested() {
        eprintln!("xtask: {signal} received; nothing was started");
        return Ok(ExitCode::SUCCESS);
    }
    let mut demo = Demo::start(&ws, &wasm.plugin, &bins, options.follow_logs)?;
    let log_dir = demo.log_dir.clone();
    print_banner(&log_dir, options);

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

/// The demo's services, running until `stop` (or drop).
pub struct Demo {
    // Dropped in this order: the services first, then redis-server's directory.
    services: Services,
    _redis_dir: TempDir,
    pub log_dir: PathBuf,
}

impl Demo {
    /// Starts redis-server, the upstream, the relay and host-shim running envoy/envoy.yaml with
    /// `plugin`, on the demo's ports, each waited on until it serves.
    pub fn start(
        ws: &Workspace,
        plugin: &Path,
        bins: &Binaries,
        follow_logs: bool,
    ) -> Result<Demo> {
        let yaml_path = ws.root.join("envoy/envoy.yaml");
        let yaml = std::fs::read_to_string(&yaml_path)
            .with_context(|| format!("cannot read {}", yaml_path.display()))?;
        let token = envoy_yaml::relay_token(&yaml)
            .with_context(|| format!("reading the relay token from {}", yaml_path.display()))?;
        check_ports_free(&PORTS)?;

        let log_dir = ws.target_dir.join("demo");
        // Declared before `services` so it is removed after redis-server has stopped.
        let redis_dir = TempDir::fresh(&log_dir, "redis-data")?;
        let mut services = Services::new(&log_dir, follow_logs)?;
        let redis_url = format!("redis://127.0.0.1:{REDIS_PORT}");

        let mut redis = Command::new("redis-server");
        redis
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(redis_dir.path());
        services.start(ServiceSpec {
            name: "redis".into(),
            command: redis,
            ready_addr: loopback(REDIS_PORT),
            ready_line: Some("Ready to accept connections".into()),
            startup_timeout: Duration::from_secs(10),
        })?;

        let mut upstream = with_log_level(Command::new(&bins.upstream));
        upstream.args([
            "--listen",
            &loopback(UPSTREAM_PORT).to_string(),
            "--redis",
            &redis_url,
        ]);
        services.start(ServiceSpec {
            name: "upstream".into(),
            command: upstream,
            ready_addr: loopback(UPSTREAM_PORT),
            ready_line: Some("upstream listening on".into()),
            startup_timeout: Duration::from_secs(30),
        })?;

        let mut relay = with_log_level(Command::new(&bins.host_shim));
        relay.args([
            "relay",
            "--listen",
            &loopback(RELAY_PORT).to_string(),
            "--redis",
            &redis_url,
        ]);
        match &token {
            Some(t) => {
                eprintln!("xtask: the relay expects the token from envoy.yaml's plugin configuration");
                relay.args(["--token", t]);
            }
            None => eprintln!("xtask: envoy.yaml's plugin configuration has no relay token; the relay runs without one"),
        }
        services.start(ServiceSpec {
            name: "relay".into(),
            command: relay,
            ready_addr: loopback(RELAY_PORT),
            ready_line: Some("relay listening on".into()),
            startup_timeout: Duration::from_secs(30),
        })?;

        let mut gateway = with_log_level(Command::new(&bins.host_shim));
        gateway
            .current_dir(&ws.root)
            .args(["run", "--config", "envoy/envoy.yaml", "--plugin"])
            .arg(plugin)
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
            .args(["--cluster", &format!("redis={}", loopback(REDIS_PORT))]);
        services.start(ServiceSpec {
            name: "host-shim".into(),
            command: gateway,
            ready_addr: loopback(GATEWAY_PORT),
            ready_line: Some("host-shim listening on".into()),
            startup_timeout: Duration::from_secs(60),
        })?;

        Ok(Demo {
            services,
            _redis_dir: redis_dir,
            log_dir,
        })
    }

    /// Fails with the service's last output if one has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.services.check_alive()
    }

    pub fn stop(mut self) {
        self.services.stop_all();
    }
}

fn check_ports_free(ports: &[(&str, u16)]) -> Result<()> {
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

/// The services log at `info` unless the user chose a level with RUST_LOG.
fn with_log_level(mut cmd: Command) -> Command {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

fn print_banner(log_dir: &std::path::Path, options: &DemoOptions) {
    let gw = format!("http://{}", loopback(GATEWAY_PORT));
    let admin = format!("http://{}", loopback(ADMIN_PORT));
    println!(
        "
Krowoc Edge demo is running:
  gateway (host-shim + plugin)  {gw}
  host-shim admin               {admin}/stats/prometheus
  upstream, direct              http://{upstream}
  relay                         http://{relay}/resp
  redis                         redis://{redis}   (redis-cli -p {REDIS_PORT})
  logs                          {logs}/*.log

Try:
  curl -i {gw}/health
  curl -i '{gw}/api/cached-data?user_id=42'
  curl -i '{gw}/api/cached-data?user_id=42'
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\\n' {gw}/api/rate-limited; done
  curl -s {admin}/stats/prometheus
",
        upstream = loopback(UPSTREAM_PORT),
        relay = loopback(RELAY_PORT),
        redis = loopback(REDIS_PORT),
        logs = log_dir.display(),
    );
    match options.exit_after {
        Some(d) => println!("Stops by itself after {}s, or on Ctrl-C.", d.as_secs()),
        None => println!("Ctrl-C stops everything."),
    }
}
