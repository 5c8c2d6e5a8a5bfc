//! `cargo xtask demo`: redis-server, the upstream, the relay and Envoy (or, with `--host
//! host-shim`, host-shim) running `envoy/envoy.yaml` with the freshly built plugin, on the agreed
//! local ports, until Ctrl-C. Envoy runs a loopback copy of the file (`<target>/demo/envoy.yaml`:
//! listener, admin and clusters on 127.0.0.1, the stock-Envoy plugin build); host-shim runs the
//! file itself with its cluster overrides.

use crate::cli::{DemoHost, DemoOptions, SetupOptions};
use crate::envoy_install::{self, Envoy};
use crate::envoy_yaml;
use crate::procs::{self, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Needs};
use crate::workspace::{Binaries, WasmBuild, Workspace};
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
    ("gateway admin", ADMIN_PORT),
    ("upstream", UPSTREAM_PORT),
    ("relay", RELAY_PORT),
    ("redis", REDIS_PORT),
];

pub fn run(options: &DemoOptions) -> Result<ExitCode> {
    procs::catch_stop_signals();
    let (ws, builds) = prepare(&options.setup, options.host)?;
    if let Some(signal) = procs::stop_requested() {
        eprintln!("xtask: {signal} received; nothing was started");
        return Ok(ExitCode::SUCCESS);
    }
    let mut demo = Demo::start(&ws, &builds, options.host, options.follow_logs)?;
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
pub fn prepare(setup: &SetupOptions, host: DemoHost) -> Result<(Workspace, Builds)> {
    check_ports_free(&PORTS)?;
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
    _redis_dir: TempDir,
    pub log_dir: PathBuf,
}

impl Demo {
    /// Starts redis-server, the upstream, the relay and the gateway (`host` running
    /// envoy/envoy.yaml with the plugin), on the demo's ports, each waited on until it serves.
    pub fn start(
        ws: &Workspace,
        builds: &Builds,
        host: DemoHost,
        follow_logs: bool,
    ) -> Result<Demo> {
        let bins = &builds.bins;
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

        // The compose stack's ACL file: the relay logs in as the filter's least-privilege user.
        let acl_dir = ws.root.join("envoy/redis");
        let mut redis = Command::new("redis-server");
        redis
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--aclfile")
            .arg(acl_dir.join("users.acl"))
            .arg("--dir")
            .arg(redis_dir.path());
        services.start(service(
            "redis",
            redis,
            REDIS_PORT,
            "Ready to accept connections",
            10,
        ))?;

        let mut upstream = with_log_level(Command::new(&bins.upstream));
        upstream.args([
            "--listen",
            &loopback(UPSTREAM_PORT).to_string(),
            "--redis",
            &redis_url,
        ]);
        services.start(service(
            "upstream",
            upstream,
            UPSTREAM_PORT,
            "upstream listening on",
            30,
        ))?;

        let mut relay = with_log_level(Command::new(&bins.relay));
        relay
            .args([
                "--listen",
                &loopback(RELAY_PORT).to_string(),
                "--redis",
                &format!("redis://krowoc-edge@127.0.0.1:{REDIS_PORT}"),
            ])
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
                            ("redis".into(), loopback(REDIS_PORT)),
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
                    .args(["--cluster", &format!("redis={}", loopback(REDIS_PORT))]);
                service("host-shim", cmd, GATEWAY_PORT, "host-shim listening on", 60)
            }
        };
        services.start(gateway)?;

        Ok(Demo {
            services,
            _redis_dir: redis_dir,
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
  redis                         redis://{redis}   (redis-cli -p {REDIS_PORT})
  logs                          {logs}/*.log
",
        upstream = loopback(UPSTREAM_PORT),
        relay = loopback(RELAY_PORT),
        redis = loopback(REDIS_PORT),
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
