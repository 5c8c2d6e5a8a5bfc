//! `cargo xtask bench`: the same load generator (wrk) against the same upstream through
//! different setups, one after the other, in one run: req/s, p50/p99 latency, the ratio to a
//! baseline scenario, and Redis commands per request (from `INFO commandstats` deltas).
//! Results are printed and written to `<target>/bench/results.md`.
//!
//! Adding a scenario is adding an entry to [`SCENARIOS`] (and, for a plugin configuration
//! the envoy.yaml does not have, a [`Gateway`] variant that derives it).

use crate::cli::BenchOptions;
use crate::envoy_yaml;
use crate::probe;
use crate::procs::{self, free_port, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Needs};
use crate::vm_bench;
use crate::workspace::{Binaries, Workspace};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use wrk::WrkReport;
pub(crate) use wrk::{run_wrk, Load};

mod wrk;

/// Where a scenario's load goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// Straight to the upstream: the baseline.
    Direct,
    /// Through a host-shim set up as given.
    Gateway(Gateway),
}

/// How the host-shim under load is set up; each variant is one host-shim process.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gateway {
    /// envoy.yaml with the wasm filter removed: host-shim's own cost.
    NoFilter,
    /// envoy.yaml as it is, with the freshly built plugin.
    Plugin,
    /// envoy.yaml with the plugin configuration replaced by one of [`BENCH_CONFIGS`].
    PluginWith(&'static str),
}

/// Plugin configurations some scenarios run with instead of envoy.yaml's: (name, JSON).
const BENCH_CONFIGS: &[(&str, &str)] = &[
    // The plugin loaded with no policy anywhere (no events either): its fixed cost.
    (
        "minimal",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[]}"#,
    ),
    // One rate-limited route whose limit is never reached: the cost of one decision per request.
    (
        "rate-limited",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[{"name":"bench","match":{"path":"/api/rate-limited"},"rate_limit":{"limits":[{"limit":1000000000,"window":"60s"}],"key":["client_ip"]}}]}"#,
    ),
    // "minimal" plus envoy.yaml's request events (PUBLISH + XADD per request, batched): the
    // cost of events alone, over each transport.
    (
        "events",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"events":{"publish":{"channel":"krowoc:requests"},"stream":{"key":"events","maxlen":100000},"batch_size":32,"flush_interval":"100ms","queue_limit":10000},"routes":[]}"#,
    ),
    (
        "events-redis-call",
        r#"{"redis":{"transport":"redis_call","cluster":"redis"},"events":{"publish":{"channel":"krowoc:requests"},"stream":{"key":"events","maxlen":100000},"batch_size":32,"flush_interval":"100ms","queue_limit":10000},"routes":[]}"#,
    ),
    // The response cache on /api/cached-data, keyed by user_id, over each transport.
    (
        "cache",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[{"name":"bench-cache","match":{"path":"/api/cached-data"},"cache":{"ttl":"1h","honor_cache_control":false,"key":{"query":["user_id"]}}}]}"#,
    ),
    (
        "cache-redis-call",
        r#"{"redis":{"transport":"redis_call","cluster":"redis"},"routes":[{"name":"bench-cache","match":{"path":"/api/cached-data"},"cache":{"ttl":"1h","honor_cache_control":false,"key":{"query":["user_id"]}}}]}"#,
    ),
];

/// In a scenario's path: replaced by a value unique to each request (a wrk script does it).
const UNIQUE: &str = "{unique}";

/// The cached route passed through by the plugin with no policy: the cache's baseline.
const CACHE_PASS_THROUGH: &str = "cached route, no policy (pass-through)";

impl Gateway {
    fn service_name(self) -> &'static str {
        match self {
            Gateway::NoFilter => "host-shim-no-filter",
            Gateway::Plugin => "host-shim-plugin",
            Gateway::PluginWith(_) => "host-shim-plugin-variant",
        }
    }
}

struct Scenario {
    name: &'static str,
    target: Target,
    /// Request path (and query) every wrk request uses.
    path: &'static str,
    /// The scenario whose req/s this one's is divided by.
    baseline: Option<&'static str>,
    /// Checked with one request before load: the status, and a header that must be present
    /// (true) or absent (false) — proof that the setup is the one the name says.
    expect_status: u16,
    expect_header: Option<(&'static str, bool)>,
}

const DIRECT: &str = "direct upstream";

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: DIRECT,
        target: Target::Direct,
        path: "/health",
        baseline: None,
        expect_status: 200,
        expect_header: None,
    },
    Scenario {
        name: "host-shim, no filter",
        target: Target::Gateway(Gateway::NoFilter),
        path: "/health",
        baseline: Some(DIRECT),
        expect_status: 200,
        expect_header: Some(("x-krowoc-edge", false)),
    },
    Scenario {
        name: "host-shim + plugin, no policy",
        target: Target::Gateway(Gateway::PluginWith("minimal")),
        path: "/health",
        baseline: Some(DIRECT),
        expect_status: 200,
        expect_header: Some(("x-krowoc-edge", true)),
    },
    Scenario {
        name: "host-shim + plugin (envoy.yaml)",
        target: Target::Gateway(Gateway::Plugin),
        path: "/health",
        baseline: Some(DIRECT),
        expect_status: 200,
        expect_header: Some(("x-krowoc-edge", true)),
    },
    Scenario {
        name: "route without policy",
        target: Target::Gateway(Gateway::PluginWith("minimal")),
        path: "/api/rate-limited",
        baseline: Some(DIRECT),
        expect_status: 200,
        expect_header: Some(("ratelimit", false)),
    },
    Scenario {
        name: "rate-limited route",
        target: Target::Gateway(Gateway::PluginWith("rate-limited")),
        path: "/api/rate-limited",
        baseline: Some("route without policy"),
        expect_status: 200,
        expect_header: Some(("ratelimit", true)),
    },
    // Request events on vs off: the same plugin configuration ("minimal") with and without
    // events, so the difference is building, queueing and flushing one event per request.
    Scenario {
        name: "events on (relay)",
        target: Target::Gateway(Gateway::PluginWith("events")),
        path: "/health",
        baseline: Some(NO_POLICY),
        expect_status: 200,
        expect_header: Some(("x-krowoc-edge", true)),
    },
    Scenario {
        name: "events on (redis_call)",
        target: Target::Gateway(Gateway::PluginWith("events-redis-call")),
        path: "/health",
        baseline: Some(NO_POLICY),
        expect_status: 200,
        expect_header: Some(("x-krowoc-edge", true)),
    },
    // The response cache: hits (one Redis round trip, no upstream call) and misses (lookup,
    // upstream, store), against the same route passed through to the (zero-delay) upstream.
    Scenario {
        name: CACHE_PASS_THROUGH,
        target: Target::Gateway(Gateway::PluginWith("minimal")),
        path: "/api/cached-data?user_id=bench",
        baseline: Some(DIRECT),
        expect_status: 200,
        expect_header: Some(("x-cache", false)),
    },
    Scenario {
        name: "cache hit (relay)",
        target: Target::Gateway(Gateway::PluginWith("cache")),
        path: "/api/cached-data?user_id=bench",
        baseline: Some(CACHE_PASS_THROUGH),
        expect_status: 200,
        expect_header: Some(("x-cache", true)),
    },
    Scenario {
        name: "cache hit (redis_call)",
        target: Target::Gateway(Gateway::PluginWith("cache-redis-call")),
        path: "/api/cached-data?user_id=bench",
        baseline: Some(CACHE_PASS_THROUGH),
        expect_status: 200,
        expect_header: Some(("x-cache", true)),
    },
    Scenario {
        name: "cache miss, every request (relay)",
        target: Target::Gateway(Gateway::PluginWith("cache")),
        path: "/api/cached-data?user_id={unique}",
        baseline: Some(CACHE_PASS_THROUGH),
        expect_status: 200,
        expect_header: Some(("x-cache", true)),
    },
];

/// The plugin with no policy and no events: the events-off side of the events pair.
const NO_POLICY: &str = "host-shim + plugin, no policy";

/// The plugin's own counters (host-shim's admin metrics) over one measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct PluginCounters {
    /// Redis calls (round trips) the plugin made: `krowoc.redis.calls`.
    redis_calls: u64,
    events_published: u64,
    events_flushes: u64,
    events_dropped: u64,
}

impl PluginCounters {
    fn read(admin: SocketAddr) -> Result<PluginCounters> {
        let (head, text) = probe::http_get_text(admin, "/stats/prometheus")?;
        if head.status != 200 {
            bail!(
                "GET http://{admin}/stats/prometheus answered {}",
                head.status
            );
        }
        let value = |name: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    // `name{} value`, as Envoy prints a plugin's stats.
                    let (n, v) = l.split_once(' ')?;
                    (n.strip_suffix("{}").unwrap_or(n) == name)
                        .then(|| v.trim().parse::<u64>().ok())?
                })
                .unwrap_or(0)
        };
        Ok(PluginCounters {
            redis_calls: value("krowoc_redis_calls"),
            events_published: value("krowoc_events_published"),
            events_flushes: value("krowoc_events_flushes"),
            events_dropped: value("krowoc_events_dropped"),
        })
    }

    fn since(self, before: PluginCounters) -> PluginCounters {
        PluginCounters {
            redis_calls: self.redis_calls.saturating_sub(before.redis_calls),
            events_published: self
                .events_published
                .saturating_sub(before.events_published),
            events_flushes: self.events_flushes.saturating_sub(before.events_flushes),
            events_dropped: self.events_dropped.saturating_sub(before.events_dropped),
        }
    }
}

/// One scenario's measurement.
struct Measured {
    scenario: &'static Scenario,
    wrk: WrkReport,
    redis_calls: BTreeMap<String, u64>,
    /// The plugin's counters over the run (scenarios through a gateway with the plugin).
    plugin: Option<PluginCounters>,
}

/// The shared pieces every scenario runs against.
struct Bench<'a> {
    ws: &'a Workspace,
    bins: Binaries,
    plugin: PathBuf,
    no_filter_yaml: PathBuf,
    bench_dir: PathBuf,
    /// The token the relay was started with (envoy.yaml's), given to relay configurations.
    relay_token: Option<String>,
    redis: SocketAddr,
    upstream: SocketAddr,
    relay: SocketAddr,
    services: Services,
    /// The host-shim running now, if any, and its listener.
    gateway: Option<(Gateway, SocketAddr)>,
    /// That host-shim's admin listener.
    gateway_admin: Option<SocketAddr>,
}

pub fn run(options: &BenchOptions) -> Result<()> {
    procs::catch_stop_signals();
    let selected: Vec<&'static Scenario> = SCENARIOS
        .iter()
        .filter(|s| {
            options.only.is_empty() || options.only.iter().any(|o| s.name.contains(o.as_str()))
        })
        .collect();
    let in_process = options.only.is_empty()
        || options
            .only
            .iter()
            .any(|o| vm_bench::NAME.contains(o.as_str()));
    if selected.is_empty() && !in_process {
        bail!(
            "no scenario matches --only {:?}; scenarios: {}, {}",
            options.only,
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", "),
            vm_bench::NAME
        );
    }

    setup::ensure(
        &Needs {
            wasm_target: true,
            redis: true,
            wrk: true,
            ..Needs::default()
        },
        &options.setup,
    )?;
    let ws = Workspace::load()?;
    let bench_dir = ws.target_dir.join("bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("cannot create {}", bench_dir.display()))?;
    let yaml_path = ws.root.join("envoy/envoy.yaml");
    let yaml = std::fs::read_to_string(&yaml_path)
        .with_context(|| format!("cannot read {}", yaml_path.display()))?;
    let token = envoy_yaml::relay_token(&yaml)
        .with_context(|| format!("reading the relay token from {}", yaml_path.display()))?;
    let no_filter_yaml = bench_dir.join("envoy-no-filter.yaml");
    std::fs::write(
        &no_filter_yaml,
        envoy_yaml::without_wasm_filter(&yaml)
            .with_context(|| format!("deriving a no-filter copy of {}", yaml_path.display()))?,
    )
    .with_context(|| format!("cannot write {}", no_filter_yaml.display()))?;
    eprintln!(
        "xtask: wrote {} (envoy.yaml without the wasm filter)",
        no_filter_yaml.display()
    );

    let wasm = ws.build_wasm()?;
    let bins = ws.build_binaries(true)?;

    // First, while nothing else runs: the plugin's cost per request in process.
    let in_process = if in_process {
        let bin = vm_bench::build(&ws)?;
        let minimal = BENCH_CONFIGS
            .iter()
            .find(|(n, _)| *n == "minimal")
            .map(|(_, j)| j.to_string())
            .context("no bench plugin configuration named minimal")?;
        let configs = [
            ("plugin, no policy".to_string(), minimal),
            (
                "plugin, envoy.yaml's configuration (`/health`: one event recorded, never flushed)"
                    .to_string(),
                envoy_yaml::plugin_configuration(&yaml)?,
            ),
        ];
        vm_bench::measure(&bin, &wasm.plugin, &configs)?
    } else {
        Vec::new()
    };

    let redis_dir = TempDir::fresh(&bench_dir, "redis-data")?;
    let mut bench = Bench {
        ws: &ws,
        bins,
        plugin: wasm.plugin,
        no_filter_yaml,
        bench_dir: bench_dir.clone(),
        relay_token: token.clone(),
        redis: loopback(free_port()?),
        upstream: loopback(free_port()?),
        relay: loopback(free_port()?),
        services: Services::new(&bench_dir.join("logs"), false)?,
        gateway: None,
        gateway_admin: None,
    };
    if !selected.is_empty() {
        bench.start_backends(token.as_deref(), redis_dir.path())?;
    }

    let mut results: Vec<Measured> = Vec::new();
    for scenario in selected {
        if let Some(signal) = procs::stop_requested() {
            bail!("interrupted by {signal}");
        }
        eprintln!("\nxtask: ==> {}", scenario.name);
        let addr = match scenario.target {
            Target::Direct => bench.upstream,
            Target::Gateway(g) => bench.gateway(g)?,
        };
        check_response(scenario, addr)?;
        let url = format!("http://{addr}{}", scenario.path.replace(UNIQUE, "0"));
        let script = unique_path_script(scenario, &bench_dir)?;
        let script = script.as_deref();
        if !options.warmup.is_zero() {
            run_wrk(&url, options.load(), options.warmup, script)?;
        }
        let admin = match scenario.target {
            Target::Gateway(Gateway::NoFilter) | Target::Direct => None,
            Target::Gateway(_) => bench.gateway_admin,
        };
        let plugin_before = admin.map(PluginCounters::read).transpose()?;
        let before = probe::redis_commandstats(bench.redis)?;
        let wrk = run_wrk(&url, options.load(), options.duration, script)?;
        let after = probe::redis_commandstats(bench.redis)?;
        let plugin = match (admin, plugin_before) {
            (Some(admin), Some(before)) => Some(PluginCounters::read(admin)?.since(before)),
            _ => None,
        };
        bench.services.check_alive()?;
        let m = Measured {
            scenario,
            wrk,
            redis_calls: probe::commandstats_delta(&before, &after),
            plugin,
        };
        eprintln!(
            "xtask: {}: {:.0} req/s, p50 {}, p99 {}, {:.2} Redis commands/request",
            scenario.name,
            m.wrk.requests_per_sec,
            show_latency(m.wrk.p50),
            show_latency(m.wrk.p99),
            m.redis_per_request()
        );
        results.push(m);
    }
    bench.services.stop_all();

    let mut report = if results.is_empty() {
        format!("### Benchmark, {}\n", today())
    } else {
        render_report(&results, options)
    };
    if !in_process.is_empty() {
        report.push_str(&vm_bench::render(&in_process));
    }
    println!("\n{report}");
    let path = bench_dir.join("results.md");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

impl BenchOptions {
    fn load(&self) -> Load {
        Load {
            threads: self.threads,
            connections: self.connections,
        }
    }
}

impl Bench<'_> {
    fn start_backends(&mut self, token: Option<&str>, redis_dir: &Path) -> Result<()> {
        let redis_url = format!("redis://{}", self.redis);
        let mut redis = Command::new("redis-server");
        redis
            .args([
                "--port",
                &self.redis.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(redis_dir);
        self.services.start(ServiceSpec {
            name: "redis".into(),
            command: redis,
            ready_addr: self.redis,
            ready_line: Some("Ready to accept connections".into()),
            startup_timeout: Duration::from_secs(10),
        })?;

        let mut upstream = quiet(Command::new(&self.bins.upstream));
        upstream.args([
            "--listen",
            &self.upstream.to_string(),
            "--redis",
            &redis_url,
            // A fast upstream: the cache scenarios compare hits with passing the route through.
            "--cached-data-delay",
            "0",
        ]);
        self.services.start(ServiceSpec {
            name: "upstream".into(),
            command: upstream,
            ready_addr: self.upstream,
            ready_line: Some("upstream listening on".into()),
            startup_timeout: Duration::from_secs(30),
        })?;

        let mut relay = quiet(Command::new(&self.bins.relay));
        relay.args(["--listen", &self.relay.to_string(), "--redis", &redis_url]);
        if let Some(t) = token {
            relay.args(["--token", t]);
        }
        self.services.start(ServiceSpec {
            name: "relay".into(),
            command: relay,
            ready_addr: self.relay,
            ready_line: Some("relay listening on".into()),
            startup_timeout: Duration::from_secs(30),
        })
    }

    /// The listener of a host-shim set up as `kind`, starting it (and stopping any other, so
    /// an idle gateway does not share the cores with the one under load).
    fn gateway(&mut self, kind: Gateway) -> Result<SocketAddr> {
        if let Some((running, addr)) = self.gateway {
            if running == kind {
                return Ok(addr);
            }
            self.services.stop_one(running.service_name());
            self.gateway = None;
        }
        let listen = loopback(free_port()?);
        let admin = loopback(free_port()?);
        let mut cmd = quiet(Command::new(&self.bins.host_shim));
        cmd.current_dir(&self.ws.root).arg("run");
        match kind {
            Gateway::NoFilter => {
                cmd.arg("--config").arg(&self.no_filter_yaml);
            }
            Gateway::Plugin => {
                cmd.args(["--config", "envoy/envoy.yaml", "--plugin"])
                    .arg(&self.plugin);
            }
            Gateway::PluginWith(name) => {
                let json = BENCH_CONFIGS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, j)| *j)
                    .with_context(|| format!("no bench plugin configuration named {name}"))?;
                let yaml = std::fs::read_to_string(self.ws.root.join("envoy/envoy.yaml"))
                    .context("cannot read envoy/envoy.yaml")?;
                let json = with_relay_token(json, self.relay_token.as_deref())?;
                let path = self.bench_dir.join(format!("envoy-{name}.yaml"));
                std::fs::write(&path, envoy_yaml::with_plugin_configuration(&yaml, &json)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                cmd.arg("--config")
                    .arg(&path)
                    .arg("--plugin")
                    .arg(&self.plugin);
            }
        }
        cmd.args([
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
        ])
        .args(["--cluster", &format!("upstream={}", self.upstream)])
        .args(["--cluster", &format!("redis_relay={}", self.relay)])
        .args(["--cluster", &format!("redis={}", self.redis)]);
        self.services.start(ServiceSpec {
            name: kind.service_name().into(),
            command: cmd,
            ready_addr: listen,
            ready_line: Some("host-shim listening on".into()),
            startup_timeout: Duration::from_secs(60),
        })?;
        self.gateway = Some((kind, listen));
        self.gateway_admin = Some(admin);
        Ok(listen)
    }
}

/// A bench configuration with the relay's token added when it uses the relay without one (the
/// relay refuses calls without the token envoy.yaml gives it).
fn with_relay_token(json: &str, token: Option<&str>) -> Result<String> {
    let mut config: serde_json::Value =
        serde_json::from_str(json).context("a bench plugin configuration is not JSON")?;
    let Some(token) = token else {
        return Ok(json.to_string());
    };
    let redis = &mut config["redis"];
    let relay = redis["transport"].as_str().unwrap_or("relay") == "relay";
    if relay && redis.get("token").is_none() {
        redis["token"] = serde_json::Value::String(token.to_string());
    }
    Ok(config.to_string())
}

/// Services under load log warnings only (unless RUST_LOG says otherwise): per-request info
/// lines would measure the logger.
fn quiet(mut cmd: Command) -> Command {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    cmd
}

fn check_response(scenario: &Scenario, addr: SocketAddr) -> Result<()> {
    let response = probe::http_get(addr, &scenario.path.replace(UNIQUE, "check"))?;
    if response.status != scenario.expect_status {
        bail!(
            "{}: GET {} answered {}, expected {}; not measuring the wrong thing",
            scenario.name,
            scenario.path,
            response.status,
            scenario.expect_status
        );
    }
    if let Some((header, present)) = scenario.expect_header {
        if response.header(header).is_some() != present {
            eprintln!(
                "xtask: warning: {}: the response {} a {header} header, expected it {}",
                scenario.name,
                if present { "lacks" } else { "has" },
                if present { "present" } else { "absent" }
            );
        }
    }
    Ok(())
}

/// For a scenario whose path holds [`UNIQUE`]: a wrk script that puts a value unique to each
/// request there (run start, wrk thread, request number), so every request is a cache miss.
fn unique_path_script(scenario: &Scenario, dir: &Path) -> Result<Option<PathBuf>> {
    let Some((before, after)) = scenario.path.split_once(UNIQUE) else {
        return Ok(None);
    };
    let lua = format!(
        "-- Written by cargo xtask bench for {name:?}: a different path for every request.\n\
         local n = 0\n\
         local run = tostring(os.time())\n\
         function setup(thread)\n  threads = (threads or 0) + 1\n  thread:set(\"tid\", threads)\nend\n\
         function request()\n  n = n + 1\n  \
         return wrk.format(nil, [[{before}]] .. run .. \"-\" .. tostring(tid) .. \"-\" .. n .. [[{after}]])\nend\n",
        name = scenario.name,
    );
    let path = dir.join("wrk-unique-path.lua");
    std::fs::write(&path, lua).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}

impl Measured {
    fn redis_per_request(&self) -> f64 {
        let total: u64 = self.redis_calls.values().sum();
        total as f64 / self.wrk.requests.max(1) as f64
    }
}

fn show_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn render_report(results: &[Measured], options: &BenchOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Benchmark, {}\n", today());
    let _ = writeln!(
        out,
        "{}; {}. Load: `wrk -t{} -c{} -d{}s --latency` after a {}s warm-up, one run per \
         scenario; release builds of host-shim and krowoc-upstream, the plugin built with \
         profile `wasm`. wrk, the gateway, the upstream and Redis share the machine.\n",
        machine(),
        command_line("rustc", &["--version"]).unwrap_or_else(|| "rustc ?".into()),
        options.threads,
        options.connections,
        options.duration.as_secs(),
        options.warmup.as_secs(),
    );
    let _ = writeln!(
        out,
        "| scenario | path | req/s | p50 | p99 | req/s vs baseline | Redis commands/request | errors |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|---|--:|--:|");
    for m in results {
        let ratio = m
            .scenario
            .baseline
            .and_then(|b| results.iter().find(|r| r.scenario.name == b))
            .map(|b| {
                format!(
                    "{:.0}% of {}",
                    100.0 * m.wrk.requests_per_sec / b.wrk.requests_per_sec.max(f64::MIN_POSITIVE),
                    b.scenario.name
                )
            })
            .unwrap_or_else(|| "—".into());
        let _ = writeln!(
            out,
            "| {} | `{}` | {:.0} | {} | {} | {} | {:.2} | {} |",
            m.scenario.name,
            m.scenario.path,
            m.wrk.requests_per_sec,
            show_latency(m.wrk.p50),
            show_latency(m.wrk.p99),
            ratio,
            m.redis_per_request(),
            m.wrk.errors
        );
    }
    let breakdowns: Vec<String> = results
        .iter()
        .filter(|m| !m.redis_calls.is_empty())
        .map(|m| {
            let per: Vec<String> = m
                .redis_calls
                .iter()
                .map(|(cmd, n)| {
                    let per_request = *n as f64 / m.wrk.requests.max(1) as f64;
                    format!("{cmd} {per_request:.2} ({n} calls)")
                })
                .collect();
            format!("- {}: {}", m.scenario.name, per.join(", "))
        })
        .collect();
    if !breakdowns.is_empty() {
        let _ = writeln!(
            out,
            "\nRedis commands per request, by command (INFO commandstats; commands run inside \
             scripts count too):\n{}",
            breakdowns.join("\n")
        );
    }
    let plugin_lines: Vec<String> = results
        .iter()
        .filter_map(|m| Some(plugin_line(m.scenario.name, m.plugin?, m.wrk.requests)))
        .collect();
    if !plugin_lines.is_empty() {
        let _ = writeln!(
            out,
            "\nThe plugin's Redis calls (round trips: one relay body or one `redis_call`, however \
             many commands it carries; `krowoc.redis.calls`) and request events, from host-shim's \
             metrics:\n{}",
            plugin_lines.join("\n")
        );
    }
    out
}

fn plugin_line(scenario: &str, p: PluginCounters, requests: u64) -> String {
    let requests = requests.max(1) as f64;
    let mut line = format!(
        "- {scenario}: {:.3} Redis calls/request ({} calls)",
        p.redis_calls as f64 / requests,
        p.redis_calls
    );
    if p.events_flushes > 0 || p.events_published > 0 {
        let _ = write!(
            line,
            "; events published {:.2}/request in {} flushes ({:.1} events/flush), {} dropped",
            p.events_published as f64 / requests,
            p.events_flushes,
            p.events_published as f64 / p.events_flushes.max(1) as f64,
            p.events_dropped
        );
    }
    line
}

/// "Intel(R) Xeon(R) ... , 2 cores, Linux 6.1.0"
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!("Linux {}", k.trim()))
        .unwrap_or_else(|_| std::env::consts::OS.to_string());
    format!("{cpu}, {cores} cores, {kernel}")
}

fn today() -> String {
    command_line("date", &["-u", "+%Y-%m-%d"]).unwrap_or_else(|| "date unknown".into())
}

/// A command's first output line, if it runs.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_have_unique_names_and_known_baselines() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "duplicate scenario {}",
                s.name
            );
            if let Some(b) = s.baseline {
                assert!(
                    SCENARIOS.iter().any(|o| o.name == b),
                    "{}: unknown baseline {b}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn the_report_shows_ratios_to_the_baseline_and_redis_work() {
        let report = |rps: f64, requests: u64| WrkReport {
            requests,
            requests_per_sec: rps,
            p50: Duration::from_micros(500),
            p99: Duration::from_micros(2500),
            errors: 0,
        };
        let results = vec![
            Measured {
                scenario: &SCENARIOS[0],
                wrk: report(1000.0, 10_000),
                redis_calls: BTreeMap::new(),
                plugin: None,
            },
            Measured {
                scenario: &SCENARIOS[2],
                wrk: report(800.0, 8_000),
                redis_calls: BTreeMap::from([("evalsha".to_string(), 8_000)]),
                plugin: Some(PluginCounters {
                    redis_calls: 8_000,
                    ..PluginCounters::default()
                }),
            },
        ];
        let options = BenchOptions {
            setup: crate::cli::SetupOptions { install: false },
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 64,
            threads: 2,
            only: Vec::new(),
        };
        let md = render_report(&results, &options);
        assert!(
            md.contains("| direct upstream | `/health` | 1000 | 500 µs | 2.50 ms | — | 0.00 | 0 |"),
            "{md}"
        );
        assert!(md.contains("| 80% of direct upstream | 1.00 |"), "{md}");
        assert!(
            md.contains("- host-shim + plugin, no policy: evalsha 1.00 (8000 calls)"),
            "{md}"
        );
        assert!(md.contains("wrk -t2 -c64 -d10s --latency"), "{md}");
        assert!(
            md.contains("- host-shim + plugin, no policy: 1.000 Redis calls/request (8000 calls)"),
            "{md}"
        );
    }

    #[test]
    fn relay_configurations_get_the_relays_token() {
        let with = |json: &str| {
            let out = with_relay_token(json, Some("t0k")).unwrap();
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        };
        assert_eq!(
            with(r#"{"redis":{"transport":"relay"},"routes":[]}"#)["redis"]["token"],
            "t0k"
        );
        assert_eq!(
            with(r#"{"redis":{"transport":"relay","token":"own"}}"#)["redis"]["token"],
            "own"
        );
        assert_eq!(
            with(r#"{"redis":{"transport":"redis_call"}}"#)["redis"].get("token"),
            None
        );
        for (name, json) in BENCH_CONFIGS {
            assert!(with_relay_token(json, Some("t")).is_ok(), "{name}");
        }
    }

    #[test]
    fn event_batching_is_reported_as_calls_and_events_per_request() {
        let p = PluginCounters {
            redis_calls: 300,
            events_published: 9_000,
            events_flushes: 300,
            events_dropped: 0,
        };
        assert_eq!(
            plugin_line("events on (relay)", p, 10_000),
            "- events on (relay): 0.030 Redis calls/request (300 calls); events published 0.90/request in 300 flushes (30.0 events/flush), 0 dropped"
        );
        let later = PluginCounters {
            redis_calls: 310,
            ..p
        };
        assert_eq!(later.since(p).redis_calls, 10);
        assert_eq!(later.since(p).events_published, 0);
    }
}
