//! `cargo xtask bench`: the same load generator (wrk) against the same upstream through each
//! host (real Envoy, the reference, and host-shim) set up in different ways, one after the
//! other, in one run: req/s, p50/p99 latency, Redis commands per request (from `INFO
//! commandstats` deltas), relay exchanges per request (from the relay's `/metrics`) and the
//! ratio to each scenario's reference; then, at one connection, the p50 a rate limit adds set
//! beside one relay round trip (a PING through the relay) and a direct Redis PING. Results are
//! printed and written to `<target>/bench/results.md` and `results.json` ([`report`]).
//!
//! Adding a scenario is adding an entry to [`SCENARIOS`] (and, for a plugin configuration
//! the envoy.yaml does not have, an entry in [`BENCH_CONFIGS`]).

use crate::cli::{BenchOptions, DemoHost};
use crate::envoy_install::{self, Envoy};
use crate::envoy_yaml;
use crate::probe;
use crate::procs::{self, free_port, loopback, ServiceSpec, Services, TempDir};
use crate::setup::{self, Needs};
use crate::vm_bench;
use crate::workspace::{Binaries, Workspace};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use testkit::envoy::{EnvoyProcess, Loopback};

mod memory;
mod ping;
mod report;
mod wrk;

use wrk::WrkReport;
pub(crate) use wrk::{run_wrk, Load};

/// Where a scenario's requests go.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// Straight to the upstream: the baseline.
    Direct,
    /// Through the host under test, set up as given.
    Gateway(Setup),
    /// `POST /resp` carrying one PING, straight to the relay: one relay round trip.
    RelayPing,
    /// PING straight to Redis (xtask's own client, see [`ping`]).
    RedisPing,
}

/// How the gateway under load is set up; each (host, setup) is one gateway process.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setup {
    /// envoy.yaml with the wasm filter removed: the host's own cost.
    NoFilter,
    /// envoy.yaml as it is: every policy it configures.
    Plugin,
    /// envoy.yaml with the plugin configuration replaced by one of [`BENCH_CONFIGS`].
    PluginWith(&'static str),
    /// As `PluginWith`, with the relay in front of a Redis Cluster of three masters
    /// (`--redis-cluster`) instead of the one redis-server.
    OnCluster(&'static str),
}

impl Setup {
    /// A name for its files.
    fn label(self) -> String {
        match self {
            Setup::NoFilter => "no-filter".into(),
            Setup::Plugin => "envoy-yaml".into(),
            Setup::PluginWith(name) => name.into(),
            Setup::OnCluster(name) => format!("cluster-{name}"),
        }
    }
}

/// The load a scenario runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pass {
    /// `--threads` and `--connections`.
    Load,
    /// One connection, one request at a time: latency without queueing.
    OneConnection,
}

/// Plugin configurations some scenarios run with instead of envoy.yaml's: (name, JSON).
const BENCH_CONFIGS: &[(&str, &str)] = &[
    // The plugin loaded with no policy anywhere (no events either): its fixed cost.
    (
        "minimal",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[]}"#,
    ),
    // One rate-limited route, one sliding-window limit that is never reached: the cost of one
    // decision per request.
    (
        "rate-limited",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[{"name":"bench","match":{"path":"/api/rate-limited"},"rate_limit":{"limits":[{"limit":1000000000,"window":"60s","algorithm":"sliding_window"}],"key":["client_ip"]}}]}"#,
    ),
    (
        "rate-limited-per-client",
        r#"{"redis":{"transport":"relay","cluster":"redis_relay"},"routes":[{"name":"bench","match":{"path":"/api/rate-limited"},"rate_limit":{"limits":[{"limit":1000000000,"window":"60s","algorithm":"sliding_window"}],"key":[{"query":"client"}]}}]}"#,
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

/// The relay's one PING, as the plugin would send it, with the relay's header names
/// (krowoc-relay's `TOKEN_HEADER` and `RESP_CONTENT_TYPE`; xtask does not build the relay's crate).
const RELAY_PING_BODY: &str = "*1\r\n$4\r\nPING\r\n";
const RELAY_TOKEN_HEADER: &str = "x-krowoc-relay-token";
const RESP_CONTENT_TYPE: &str = "application/x-resp";

struct Scenario {
    name: &'static str,
    target: Target,
    /// Request path (and query) every wrk request uses.
    path: &'static str,
    /// The scenario (same host) whose req/s this one's is divided by.
    baseline: Option<&'static str>,
    pass: Pass,
    /// Only host-shim runs it (transport `redis_call`: stock Envoy has no such host call).
    host_shim_only: bool,
    /// Checked with one request before load: the status, and a header that must be present
    /// (true) or absent (false) — proof that the setup is the one the name says.
    expect_status: u16,
    expect_header: Option<(&'static str, bool)>,
}

const DIRECT: &str = "direct upstream";
const NO_FILTER: &str = "no filter";
/// The plugin with no policy and no events: the events-off side of the events pair.
const NO_POLICY: &str = "plugin, no policy";
const ROUTE_WITHOUT_POLICY: &str = "route without policy";
/// The cached route passed through by the plugin with no policy: the cache's baseline.
const CACHE_PASS_THROUGH: &str = "cached route, no policy (pass-through)";
const RATE_LIMITED: &str = "rate-limited route";
const RATE_LIMITED_SPREAD: &str = "rate-limited route, a client per request";
const CACHE_HIT: &str = "cache hit";
const EVENTS_ON: &str = "events on";
const RELAY_PING_1C: &str = "relay PING (1 connection)";
const ROUTE_WITHOUT_POLICY_1C: &str = "route without policy (1 connection)";
const RATE_LIMITED_1C: &str = "rate-limited route (1 connection)";

/// A scenario under the main load, with its check.
const fn under_load(
    name: &'static str,
    setup: Setup,
    path: &'static str,
    baseline: &'static str,
    expect_header: (&'static str, bool),
) -> Scenario {
    Scenario {
        name,
        target: Target::Gateway(setup),
        path,
        baseline: Some(baseline),
        pass: Pass::Load,
        host_shim_only: false,
        expect_status: 200,
        expect_header: Some(expect_header),
    }
}

const fn host_shim_only(s: Scenario) -> Scenario {
    Scenario {
        host_shim_only: true,
        ..s
    }
}

const fn at_one_connection(s: Scenario, baseline: Option<&'static str>) -> Scenario {
    Scenario {
        pass: Pass::OneConnection,
        baseline,
        ..s
    }
}

/// Every scenario, in the order each host runs them (those sharing a gateway setup together,
/// so each setup starts once per pass).
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: DIRECT,
        target: Target::Direct,
        path: "/health",
        baseline: None,
        pass: Pass::Load,
        host_shim_only: false,
        expect_status: 200,
        expect_header: None,
    },
    under_load(
        NO_FILTER,
        Setup::NoFilter,
        "/health",
        DIRECT,
        ("ratelimit", false),
    ),
    under_load(
        NO_POLICY,
        Setup::PluginWith("minimal"),
        "/health",
        NO_FILTER,
        ("ratelimit", false),
    ),
    under_load(
        ROUTE_WITHOUT_POLICY,
        Setup::PluginWith("minimal"),
        "/api/rate-limited",
        NO_FILTER,
        ("ratelimit", false),
    ),
    under_load(
        CACHE_PASS_THROUGH,
        Setup::PluginWith("minimal"),
        "/api/cached-data?user_id=bench",
        NO_FILTER,
        ("x-cache", false),
    ),
    under_load(
        RATE_LIMITED,
        Setup::PluginWith("rate-limited"),
        "/api/rate-limited",
        ROUTE_WITHOUT_POLICY,
        ("ratelimit", true),
    ),
    // The same on a Redis Cluster of three masters behind the relay, against one redis-server:
    // one limit (its key on one master), a limit per request's client (keys over every
    // master), and cache hits (one route's entries share a slot: one master).
    under_load(
        "rate-limited route (Redis Cluster, 3 masters)",
        Setup::OnCluster("rate-limited"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    under_load(
        RATE_LIMITED_SPREAD,
        Setup::PluginWith("rate-limited-per-client"),
        "/api/rate-limited?client={unique}",
        ROUTE_WITHOUT_POLICY,
        ("ratelimit", true),
    ),
    under_load(
        "rate-limited route, a client per request (Redis Cluster, 3 masters)",
        Setup::OnCluster("rate-limited-per-client"),
        "/api/rate-limited?client={unique}",
        RATE_LIMITED_SPREAD,
        ("ratelimit", true),
    ),
    under_load(
        "cache hit (Redis Cluster, 3 masters)",
        Setup::OnCluster("cache"),
        "/api/cached-data?user_id=bench",
        CACHE_HIT,
        ("x-cache", true),
    ),
    // The response cache: hits (one Redis round trip, no upstream call) and misses (lookup,
    // upstream, store), against the same route passed through to the (zero-delay) upstream.
    under_load(
        CACHE_HIT,
        Setup::PluginWith("cache"),
        "/api/cached-data?user_id=bench",
        CACHE_PASS_THROUGH,
        ("x-cache", true),
    ),
    under_load(
        "cache miss, every request",
        Setup::PluginWith("cache"),
        "/api/cached-data?user_id={unique}",
        CACHE_PASS_THROUGH,
        ("x-cache", true),
    ),
    host_shim_only(under_load(
        "cache hit (redis_call)",
        Setup::PluginWith("cache-redis-call"),
        "/api/cached-data?user_id=bench",
        CACHE_PASS_THROUGH,
        ("x-cache", true),
    )),
    // Request events on vs off: the same plugin configuration ("minimal") with and without
    // events, so the difference is building, queueing and flushing one event per request.
    under_load(
        EVENTS_ON,
        Setup::PluginWith("events"),
        "/health",
        NO_POLICY,
        ("ratelimit", false),
    ),
    host_shim_only(under_load(
        "events on (redis_call)",
        Setup::PluginWith("events-redis-call"),
        "/health",
        NO_POLICY,
        ("ratelimit", false),
    )),
    // envoy.yaml's whole configuration on its cached route: the route table, a cache hit and
    // an event with a header field per request (no route there has a limit too).
    under_load(
        "every policy (envoy.yaml)",
        Setup::Plugin,
        "/api/cached-data?user_id=bench",
        CACHE_PASS_THROUGH,
        ("x-cache", true),
    ),
    // How cost grows. Decisions with more limits on the route (one script call for all of
    // them), against the one limit of the rate-limited route:
    under_load(
        "rate-limited route, 4 limits",
        Setup::PluginWith("limits-4"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    under_load(
        "rate-limited route, 16 limits",
        Setup::PluginWith("limits-16"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    // The same route found after 9, 99 and 999 others (exact paths and prefixes):
    under_load(
        "rate-limited route, last of 10 routes",
        Setup::PluginWith("routes-10"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    under_load(
        "rate-limited route, last of 100 routes",
        Setup::PluginWith("routes-100"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    under_load(
        "rate-limited route, last of 1,000 routes",
        Setup::PluginWith("routes-1000"),
        "/api/rate-limited",
        RATE_LIMITED,
        ("ratelimit", true),
    ),
    // Cache hits by body size, each against the same body passed through to the upstream:
    under_load(
        "1 KiB body, no policy (pass-through)",
        Setup::PluginWith("minimal"),
        "/api/bytes?size=1024",
        NO_FILTER,
        ("x-cache", false),
    ),
    under_load(
        "64 KiB body, no policy (pass-through)",
        Setup::PluginWith("minimal"),
        "/api/bytes?size=65536",
        NO_FILTER,
        ("x-cache", false),
    ),
    under_load(
        "512 KiB body, no policy (pass-through)",
        Setup::PluginWith("minimal"),
        "/api/bytes?size=524288",
        NO_FILTER,
        ("x-cache", false),
    ),
    under_load(
        "cache hit, 1 KiB body",
        Setup::PluginWith("cache-bytes"),
        "/api/bytes?size=1024",
        "1 KiB body, no policy (pass-through)",
        ("x-cache", true),
    ),
    under_load(
        "cache hit, 64 KiB body",
        Setup::PluginWith("cache-bytes"),
        "/api/bytes?size=65536",
        "64 KiB body, no policy (pass-through)",
        ("x-cache", true),
    ),
    under_load(
        "cache hit, 512 KiB body",
        Setup::PluginWith("cache-bytes"),
        "/api/bytes?size=524288",
        "512 KiB body, no policy (pass-through)",
        ("x-cache", true),
    ),
    // One connection: what a rate limit adds to a request's latency, beside one relay round
    // trip and one direct Redis round trip.
    Scenario {
        name: RELAY_PING_1C,
        target: Target::RelayPing,
        path: "/resp",
        baseline: None,
        pass: Pass::OneConnection,
        host_shim_only: false,
        expect_status: 200,
        expect_header: None,
    },
    Scenario {
        name: "Redis PING (1 connection)",
        target: Target::RedisPing,
        path: "PING",
        baseline: None,
        pass: Pass::OneConnection,
        host_shim_only: false,
        expect_status: 200,
        expect_header: None,
    },
    at_one_connection(
        under_load(
            ROUTE_WITHOUT_POLICY_1C,
            Setup::PluginWith("minimal"),
            "/api/rate-limited",
            NO_FILTER,
            ("ratelimit", false),
        ),
        None,
    ),
    at_one_connection(
        under_load(
            RATE_LIMITED_1C,
            Setup::PluginWith("rate-limited"),
            "/api/rate-limited",
            ROUTE_WITHOUT_POLICY,
            ("ratelimit", true),
        ),
        Some(ROUTE_WITHOUT_POLICY_1C),
    ),
];

impl Scenario {
    fn runs_on(&self, host: DemoHost) -> bool {
        host == DemoHost::HostShim || !self.host_shim_only
    }

    fn load(&self, options: &BenchOptions) -> Load {
        match self.pass {
            Pass::Load => Load {
                threads: options.threads,
                connections: options.connections,
            },
            Pass::OneConnection => Load {
                threads: 1,
                connections: 1,
            },
        }
    }
}

/// The plugin's own counters (the gateway's admin `/stats/prometheus`) over one measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct PluginCounters {
    /// Redis calls (round trips) the plugin made: `krowoc.redis.calls`.
    redis_calls: u64,
    events_published: u64,
    events_flushes: u64,
    events_dropped: u64,
}

/// A counter's value in Prometheus text: `name value`, or `name{} value` as Envoy prints a
/// plugin's stats; 0 when absent.
fn prometheus_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n.strip_suffix("{}").unwrap_or(n) == name).then(|| v.trim().parse::<u64>().ok())?
        })
        .unwrap_or(0)
}

/// `GET path` answered 200, its body.
fn metrics_text(addr: SocketAddr, path: &str) -> Result<String> {
    let (head, text) = probe::http_get_text(addr, path)?;
    if head.status != 200 {
        bail!("GET http://{addr}{path} answered {}", head.status);
    }
    Ok(text)
}

impl PluginCounters {
    fn read(admin: SocketAddr) -> Result<PluginCounters> {
        Ok(PluginCounters::parse(&metrics_text(
            admin,
            "/stats/prometheus",
        )?))
    }

    fn parse(text: &str) -> PluginCounters {
        PluginCounters {
            redis_calls: prometheus_counter(text, "krowoc_redis_calls"),
            events_published: prometheus_counter(text, "krowoc_events_published"),
            events_flushes: prometheus_counter(text, "krowoc_events_flushes"),
            events_dropped: prometheus_counter(text, "krowoc_events_dropped"),
        }
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

/// The relay's HTTP exchanges so far (`POST /resp` requests, answered or refused).
fn relay_exchanges(relay: SocketAddr) -> Result<u64> {
    Ok(prometheus_counter(
        &metrics_text(relay, "/metrics")?,
        "krowoc_relay_requests_total",
    ))
}

/// One scenario's measurement on one host.
struct Measured {
    host: DemoHost,
    scenario: &'static Scenario,
    wrk: WrkReport,
    redis_calls: BTreeMap<String, u64>,
    /// The relay's HTTP exchanges over the run.
    relay_exchanges: u64,
    /// The plugin's counters over the run (scenarios through a gateway with the plugin).
    plugin: Option<PluginCounters>,
}

impl Measured {
    fn redis_per_request(&self) -> f64 {
        let total: u64 = self.redis_calls.values().sum();
        total as f64 / self.wrk.requests.max(1) as f64
    }

    fn relay_per_request(&self) -> f64 {
        self.relay_exchanges as f64 / self.wrk.requests.max(1) as f64
    }
}

/// The gateway running now.
struct RunningGateway {
    host: DemoHost,
    setup: Setup,
    listen: SocketAddr,
    admin: SocketAddr,
    /// Envoy, stopped by its PID when dropped; None for host-shim (one of `services`).
    envoy: Option<EnvoyProcess>,
}

const HOST_SHIM_SERVICE: &str = "host-shim";

/// The shared pieces every scenario runs against.
struct Bench<'a> {
    ws: &'a Workspace,
    bins: Binaries,
    /// The plugin host-shim loads (default features: the Higress calls too).
    plugin: PathBuf,
    /// The plugin stock Envoy loads, and Envoy, when Envoy is one of the hosts.
    stock_plugin: Option<PathBuf>,
    envoy: Option<Envoy>,
    /// envoy/envoy.yaml's text, every setup's source.
    yaml: String,
    bench_dir: PathBuf,
    /// The token the relay was started with (envoy.yaml's), given to relay configurations.
    relay_token: Option<String>,
    redis: SocketAddr,
    upstream: SocketAddr,
    relay: SocketAddr,
    /// The Redis Cluster of the `OnCluster` setups and the relay in front of it, started when
    /// the first of them runs.
    cluster: Option<(testkit::cluster::RedisCluster, SocketAddr)>,
    /// Worker threads of either host (Envoy's --concurrency, host-shim's --workers).
    workers: usize,
    services: Services,
    gateway: Option<RunningGateway>,
}

impl BenchOptions {
    /// The hosts to bench, in the order they run: Envoy (the reference) first.
    fn hosts(&self) -> Vec<DemoHost> {
        match self.host {
            Some(h) => vec![h],
            None => DemoHost::ALL.to_vec(),
        }
    }

    fn selects(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }
}

/// The (host, scenario) pairs a run measures, in order.
fn plan(options: &BenchOptions) -> Vec<(DemoHost, &'static Scenario)> {
    options
        .hosts()
        .into_iter()
        .flat_map(|host| {
            SCENARIOS
                .iter()
                .filter(move |s| s.runs_on(host) && options.selects(s.name))
                .map(move |s| (host, s))
        })
        .collect()
}

pub fn run(options: &BenchOptions) -> Result<()> {
    procs::catch_stop_signals();
    let plan = plan(options);
    // host-shim's example measures the plugin in process: part of the host-shim side.
    let in_process =
        options.hosts().contains(&DemoHost::HostShim) && options.selects(vm_bench::NAME);
    let key_memory = options.selects(memory::NAME);
    if plan.is_empty() && !in_process && !key_memory {
        bail!(
            "no scenario matches --only {:?} on {}; scenarios: {}, {}",
            options.only,
            options
                .hosts()
                .iter()
                .map(|h| h.name())
                .collect::<Vec<_>>()
                .join(" and "),
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", "),
            vm_bench::NAME
        );
    }
    let on_envoy = plan.iter().any(|(h, _)| *h == DemoHost::Envoy);

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
    let envoy = if on_envoy {
        Some(envoy_install::ensure(&ws.target_dir, &options.setup)?)
    } else {
        None
    };
    let bench_dir = ws.target_dir.join("bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("cannot create {}", bench_dir.display()))?;
    let yaml_path = ws.root.join("envoy/envoy.yaml");
    let yaml = std::fs::read_to_string(&yaml_path)
        .with_context(|| format!("cannot read {}", yaml_path.display()))?;
    let token = envoy_yaml::relay_token(&yaml)
        .with_context(|| format!("reading the relay token from {}", yaml_path.display()))?;

    let wasm = ws.build_wasm()?;
    let stock_plugin = if on_envoy {
        Some(ws.build_stock_plugin()?)
    } else {
        None
    };
    let bins = ws.build_binaries(true)?;

    // First, while nothing else runs: the plugin's cost per request in process.
    let in_process = if in_process {
        let bin = vm_bench::build(&ws)?;
        let minimal = bench_config("minimal")?;
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
    let envoy_version = envoy.as_ref().map(|e| format!("Envoy {}", e.version));
    let mut bench = Bench {
        ws: &ws,
        bins,
        plugin: wasm.plugin,
        stock_plugin,
        envoy,
        yaml,
        bench_dir: bench_dir.clone(),
        relay_token: token.clone(),
        redis: loopback(free_port()?),
        upstream: loopback(free_port()?),
        relay: loopback(free_port()?),
        cluster: None,
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        services: Services::new(&bench_dir.join("logs"), false)?,
        gateway: None,
    };
    if !plan.is_empty() || key_memory {
        bench.start_backends(token.as_deref(), redis_dir.path())?;
    }

    let mut results: Vec<Measured> = Vec::new();
    for (host, scenario) in plan {
        if let Some(signal) = procs::stop_requested() {
            bail!("interrupted by {signal}");
        }
        eprintln!("\nxtask: ==> {}: {}", host.name(), scenario.name);
        let m = bench.measure(host, scenario, options)?;
        eprintln!(
            "xtask: {}, {}: {:.0} req/s, p50 {}, p99 {}, {:.2} Redis commands/request, {:.2} relay exchanges/request",
            host.name(),
            scenario.name,
            m.wrk.requests_per_sec,
            report::show_latency(m.wrk.p50),
            report::show_latency(m.wrk.p99),
            m.redis_per_request(),
            m.relay_per_request()
        );
        results.push(m);
    }
    // Redis memory per rate-limit key, on the first host (the scripts are the same on both).
    let memory_host = options.hosts()[0];
    let memory = if key_memory {
        if memory_host == DemoHost::Envoy && bench.envoy.is_none() {
            bench.envoy = Some(envoy_install::ensure(&ws.target_dir, &options.setup)?);
            bench.stock_plugin = Some(ws.build_stock_plugin()?);
        }
        bench.key_memory(memory_host)?
    } else {
        Vec::new()
    };
    bench.stop_gateway();
    bench.services.stop_all();

    let setting = report::Setting::here(options, envoy_version, bench.workers);
    let mut md = if results.is_empty() {
        report::heading_only(&setting)
    } else {
        report::render_markdown(&results, &setting)
    };
    if !memory.is_empty() {
        md.push_str(&memory::render(&memory, memory_host));
    }
    if !in_process.is_empty() {
        md.push_str(&vm_bench::render(&in_process));
    }
    println!("\n{md}");
    for (name, text) in [
        ("results.md", md),
        ("results.json", report::render_json(&results)),
    ] {
        let path = bench_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}

/// A plugin configuration by name: one of [`BENCH_CONFIGS`], or one of the scaling series,
/// generated: `limits-N` (the rate-limited route with N limits), `routes-N` (the rate-limited
/// route last of N routes) and `cache-bytes` (the cache on `/api/bytes`, entries up to 600,000
/// bytes).
fn bench_config(name: &str) -> Result<String> {
    if let Some((_, json)) = BENCH_CONFIGS.iter().find(|(n, _)| *n == name) {
        return Ok(json.to_string());
    }
    let relay = serde_json::json!({"transport": "relay", "cluster": "redis_relay"});
    let limited = |limits: Vec<serde_json::Value>| {
        serde_json::json!({"name": "bench", "match": {"path": "/api/rate-limited"},
                           "rate_limit": {"limits": limits, "key": ["client_ip"]}})
    };
    let never_reached = |i: usize| {
        serde_json::json!({"name": format!("limit_{i}"), "limit": 1_000_000_000u64,
                           "window": format!("{}s", 60 + i), "algorithm": "sliding_window"})
    };
    let count = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=10_000).contains(n))
    };
    let config = if let Some(n) = count("limits-") {
        serde_json::json!({"redis": relay, "routes": [limited((0..n).map(never_reached).collect())]})
    } else if let Some(n) = count("routes-") {
        // Exact paths and prefixes in turn before it, none of which the requests match.
        let mut routes: Vec<serde_json::Value> = (1..n)
            .map(|i| {
                if i % 2 == 0 {
                    serde_json::json!({"name": format!("exact_{i}"), "match": {"path": format!("/bench/exact/{i}")}})
                } else {
                    serde_json::json!({"name": format!("prefix_{i}"), "match": {"prefix": format!("/bench/prefix/{i}/")}})
                }
            })
            .collect();
        routes.push(limited(vec![never_reached(0)]));
        serde_json::json!({"redis": relay, "routes": routes})
    } else if let Some(config) = memory::config(name) {
        config
    } else if name == "cache-bytes" {
        serde_json::json!({"redis": relay, "routes": [{"name": "bench-bytes", "match": {"path": "/api/bytes"},
            "cache": {"ttl": "1h", "honor_cache_control": false, "key": {"query": ["size"]},
                      "max_body_bytes": 600_000}}]})
    } else {
        bail!("no bench plugin configuration named {name}");
    };
    Ok(config.to_string())
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

    /// Starts the Redis Cluster (three masters, no replicas) and a relay in front of it, once.
    fn ensure_cluster(&mut self) -> Result<SocketAddr> {
        if let Some((_, relay)) = &self.cluster {
            return Ok(*relay);
        }
        eprintln!("xtask: starting a Redis Cluster of three masters for the cluster scenarios");
        let cluster = testkit::cluster::RedisCluster::start(3, 0);
        let relay = loopback(free_port()?);
        let mut cmd = quiet(Command::new(&self.bins.relay));
        cmd.args([
            "--listen",
            &relay.to_string(),
            "--redis-cluster",
            &cluster.seeds(),
        ]);
        if let Some(t) = &self.relay_token {
            cmd.args(["--token", t]);
        }
        self.services.start(ServiceSpec {
            name: "relay-cluster".into(),
            command: cmd,
            ready_addr: relay,
            ready_line: Some("relay listening on".into()),
            startup_timeout: Duration::from_secs(30),
        })?;
        self.cluster = Some((cluster, relay));
        Ok(relay)
    }

    /// The relay `setup`'s gateway calls.
    fn relay_for(&self, setup: Setup) -> SocketAddr {
        match (setup, &self.cluster) {
            (Setup::OnCluster(_), Some((_, relay))) => *relay,
            _ => self.relay,
        }
    }

    /// The Redis servers a scenario's commands go to: the cluster's masters for `OnCluster`.
    fn redis_servers(&self, scenario: &Scenario) -> Vec<SocketAddr> {
        match (scenario.target, &self.cluster) {
            (Target::Gateway(Setup::OnCluster(_)), Some((cluster, _))) => cluster
                .masters()
                .into_iter()
                .map(|m| cluster.node(m).addr())
                .collect(),
            _ => vec![self.redis],
        }
    }

    /// `INFO commandstats` of each server, summed.
    fn commandstats(servers: &[SocketAddr]) -> Result<BTreeMap<String, u64>> {
        let mut sum = BTreeMap::new();
        for s in servers {
            for (name, n) in probe::redis_commandstats(*s)? {
                *sum.entry(name).or_insert(0) += n;
            }
        }
        Ok(sum)
    }

    /// Checks the setup with one request, warms up, then measures `scenario` on `host`.
    fn measure(
        &mut self,
        host: DemoHost,
        scenario: &'static Scenario,
        options: &BenchOptions,
    ) -> Result<Measured> {
        let load = scenario.load(options);
        let (url, script, admin) = match scenario.target {
            Target::Direct => {
                self.stop_gateway();
                (self.url(self.upstream, scenario), None, None)
            }
            Target::Gateway(setup) => {
                if let Setup::OnCluster(_) = setup {
                    self.ensure_cluster()?;
                }
                let (listen, admin) = self.gateway(host, setup)?;
                check_response(scenario, listen)?;
                let with_plugin = setup != Setup::NoFilter;
                check_plugin_loaded(scenario, admin, with_plugin)?;
                (
                    self.url(listen, scenario),
                    unique_path_script(scenario, &self.bench_dir)?,
                    with_plugin.then_some(admin),
                )
            }
            Target::RelayPing => {
                self.stop_gateway();
                self.check_relay_ping()?;
                (
                    format!("http://{}{}", self.relay, scenario.path),
                    Some(self.relay_ping_script()?),
                    None,
                )
            }
            Target::RedisPing => {
                self.stop_gateway();
                (String::new(), None, None)
            }
        };
        if let Target::Direct = scenario.target {
            check_response(scenario, self.upstream)?;
        }
        let run = |duration: Duration| match scenario.target {
            Target::RedisPing => ping::redis_ping(self.redis, duration),
            _ => run_wrk(&url, load, duration, script.as_deref()),
        };
        if !options.warmup.is_zero() {
            run(options.warmup)?;
        }
        let relay = match scenario.target {
            Target::Gateway(setup) => self.relay_for(setup),
            _ => self.relay,
        };
        let servers = self.redis_servers(scenario);
        let plugin_before = admin.map(PluginCounters::read).transpose()?;
        let relay_before = relay_exchanges(relay)?;
        let before = Self::commandstats(&servers)?;
        let wrk = run(options.duration)?;
        let after = Self::commandstats(&servers)?;
        let relay_after = relay_exchanges(relay)?;
        let plugin = match (admin, plugin_before) {
            (Some(admin), Some(before)) => Some(PluginCounters::read(admin)?.since(before)),
            _ => None,
        };
        self.check_alive()?;
        Ok(Measured {
            host,
            scenario,
            wrk,
            redis_calls: probe::commandstats_delta(&before, &after),
            relay_exchanges: relay_after.saturating_sub(relay_before),
            plugin,
        })
    }

    fn url(&self, addr: SocketAddr, scenario: &Scenario) -> String {
        format!("http://{addr}{}", scenario.path.replace(UNIQUE, "0"))
    }

    /// Fails, with the last output, if a service or Envoy has exited.
    fn check_alive(&mut self) -> Result<()> {
        self.services.check_alive()?;
        if let Some(envoy) = self.gateway.as_mut().and_then(|g| g.envoy.as_mut()) {
            if !envoy.is_running() {
                bail!(
                    "envoy exited during the run; its log ({}):\n{}",
                    envoy.log.display(),
                    envoy.log_text()
                );
            }
        }
        Ok(())
    }

    /// One PING through the relay, answered PONG: the probe measures what it says.
    fn check_relay_ping(&self) -> Result<()> {
        let mut headers = vec![("content-type", RESP_CONTENT_TYPE)];
        if let Some(t) = &self.relay_token {
            headers.push((RELAY_TOKEN_HEADER, t.as_str()));
        }
        let response = testkit::http::try_request(
            self.relay,
            "POST",
            "/resp",
            &headers,
            RELAY_PING_BODY.as_bytes(),
        )
        .with_context(|| format!("POST /resp (PING) to the relay at {}", self.relay))?;
        if response.status != 200 || response.body != b"+PONG\r\n" {
            bail!(
                "the relay answered PING with {} {:?}; not measuring the wrong thing",
                response.status,
                response.text()
            );
        }
        Ok(())
    }

    fn relay_ping_script(&self) -> Result<PathBuf> {
        let path = self.bench_dir.join("wrk-relay-ping.lua");
        std::fs::write(&path, relay_ping_lua(self.relay_token.as_deref()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// The listener and admin of `host` set up as `setup`, starting it (and stopping any other
    /// gateway, so an idle one does not share the cores with the one under load).
    fn gateway(&mut self, host: DemoHost, setup: Setup) -> Result<(SocketAddr, SocketAddr)> {
        if let Some(g) = &self.gateway {
            if g.host == host && g.setup == setup {
                return Ok((g.listen, g.admin));
            }
        }
        self.stop_gateway();
        let yaml = self.setup_yaml(setup)?;
        let running = match host {
            DemoHost::HostShim => self.start_host_shim(setup, &yaml)?,
            DemoHost::Envoy => self.start_envoy(setup, &yaml)?,
        };
        let addrs = (running.listen, running.admin);
        self.gateway = Some(running);
        Ok(addrs)
    }

    fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            match g.envoy {
                // Killed by the PID it was started with.
                Some(envoy) => drop(envoy),
                None => self.services.stop_one(HOST_SHIM_SERVICE),
            }
        }
    }

    /// envoy.yaml as `setup` has it.
    fn setup_yaml(&self, setup: Setup) -> Result<String> {
        match setup {
            Setup::NoFilter => envoy_yaml::without_wasm_filter(&self.yaml)
                .context("deriving a no-filter copy of envoy/envoy.yaml"),
            Setup::Plugin => Ok(self.yaml.clone()),
            Setup::PluginWith(name) | Setup::OnCluster(name) => {
                let json = with_relay_token(&bench_config(name)?, self.relay_token.as_deref())?;
                envoy_yaml::with_plugin_configuration(&self.yaml, &json)
            }
        }
    }

    fn start_host_shim(&mut self, setup: Setup, yaml: &str) -> Result<RunningGateway> {
        let path = self
            .bench_dir
            .join(format!("host-shim-{}.yaml", setup.label()));
        std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
        let listen = loopback(free_port()?);
        let admin = loopback(free_port()?);
        let mut cmd = quiet(Command::new(&self.bins.host_shim));
        cmd.current_dir(&self.ws.root)
            .arg("run")
            .arg("--config")
            .arg(&path);
        if setup != Setup::NoFilter {
            cmd.arg("--plugin").arg(&self.plugin);
        }
        cmd.args([
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
            "--workers",
            &self.workers.to_string(),
        ])
        .args(["--cluster", &format!("upstream={}", self.upstream)])
        .args([
            "--cluster",
            &format!("redis_relay={}", self.relay_for(setup)),
        ])
        .args(["--cluster", &format!("redis={}", self.redis)]);
        self.services.start(ServiceSpec {
            name: HOST_SHIM_SERVICE.into(),
            command: cmd,
            ready_addr: listen,
            ready_line: Some("host-shim listening on".into()),
            startup_timeout: Duration::from_secs(60),
        })?;
        Ok(RunningGateway {
            host: DemoHost::HostShim,
            setup,
            listen,
            admin,
            envoy: None,
        })
    }

    /// Envoy on a loopback copy of `yaml` (the stock plugin build; listener and admin on
    /// ports it picks), with its own `--base-id`.
    fn start_envoy(&mut self, setup: Setup, yaml: &str) -> Result<RunningGateway> {
        let (Some(envoy), Some(stock_plugin)) = (&self.envoy, &self.stock_plugin) else {
            bail!("Envoy scenarios need Envoy and the stock plugin build (run sets them up)");
        };
        let loopback_of = |text: &str| {
            testkit::envoy::loopback_yaml(
                text,
                &Loopback {
                    listener_port: 0,
                    admin_port: 0,
                    clusters: &[
                        ("upstream".into(), self.upstream),
                        ("redis_relay".into(), self.relay_for(setup)),
                        ("redis".into(), self.redis),
                    ],
                    plugin: stock_plugin,
                },
            )
            .map_err(anyhow::Error::msg)
            .context("making a loopback copy of envoy/envoy.yaml")
        };
        // The loopback copy needs the wasm filter to point at the plugin; drop it afterwards.
        let copy = match setup {
            Setup::NoFilter => envoy_yaml::without_wasm_filter(&loopback_of(&self.yaml)?)?,
            _ => loopback_of(yaml)?,
        };
        let dir = self
            .bench_dir
            .join("logs")
            .join(format!("envoy-{}", setup.label()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, copy).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "xtask: starting envoy ({}, --concurrency {}): {}",
            setup.label(),
            self.workers,
            path.display()
        );
        let process = EnvoyProcess::start(&envoy.path, &path, &dir, self.workers)
            .map_err(anyhow::Error::msg)
            .context("envoy did not start")?;
        eprintln!(
            "xtask: envoy (pid {}) is ready on {}, admin {}",
            process.pid(),
            process.listener,
            process.admin
        );
        Ok(RunningGateway {
            host: DemoHost::Envoy,
            setup,
            listen: process.listener,
            admin: process.admin,
            envoy: Some(process),
        })
    }
}

/// A wrk script that sends the relay one PING per request, with the relay's token.
fn relay_ping_lua(token: Option<&str>) -> String {
    let mut lua = format!(
        "-- Written by cargo xtask bench: one PING through the relay per request.\n\
         wrk.method = \"POST\"\n\
         wrk.body = \"{}\"\n\
         wrk.headers[\"Content-Type\"] = \"{RESP_CONTENT_TYPE}\"\n",
        RELAY_PING_BODY.replace('\r', "\\r").replace('\n', "\\n")
    );
    if let Some(t) = token {
        lua.push_str(&format!(
            "wrk.headers[\"{RELAY_TOKEN_HEADER}\"] = [==[{t}]==]\n"
        ));
    }
    lua
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

/// The gateway runs the plugin exactly when the scenario says so: its metrics are in the
/// admin's stats (responses carry no mark unless `version_header` is set).
fn check_plugin_loaded(scenario: &Scenario, admin: SocketAddr, expected: bool) -> Result<()> {
    let (_, stats) = probe::http_get_text(admin, "/stats/prometheus")?;
    let loaded = stats.contains("krowoc_");
    if loaded != expected {
        bail!(
            "{}: the gateway {} the plugin, expected {}; not measuring the wrong thing",
            scenario.name,
            if loaded { "runs" } else { "does not run" },
            if expected { "it" } else { "none" }
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(name: &str) -> &'static Scenario {
        SCENARIOS
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no scenario {name}"))
    }

    fn options(host: Option<DemoHost>, only: &[&str]) -> BenchOptions {
        BenchOptions {
            only: only.iter().map(|o| o.to_string()).collect(),
            host,
            ..BenchOptions::defaults(false)
        }
    }

    #[test]
    fn scenarios_have_unique_names_and_baselines_measured_beside_them() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "duplicate scenario {}",
                s.name
            );
            if let Some(b) = s.baseline {
                let b = scenario(b);
                // On every host the scenario runs on, under the same load.
                assert!(
                    DemoHost::ALL
                        .iter()
                        .all(|h| !s.runs_on(*h) || b.runs_on(*h)),
                    "{}: baseline {} does not run on each of its hosts",
                    s.name,
                    b.name
                );
                assert_eq!(s.pass, b.pass, "{}: baseline {}", s.name, b.name);
            }
            if let Target::Gateway(Setup::PluginWith(name)) = s.target {
                assert!(bench_config(name).is_ok(), "{}: {name}", s.name);
            }
        }
    }

    #[test]
    fn each_host_runs_its_scenarios_envoy_first_and_redis_call_only_on_host_shim() {
        let all = plan(&options(None, &[]));
        let hosts: Vec<DemoHost> = all.iter().map(|(h, _)| *h).collect();
        let first_host_shim = hosts.iter().position(|h| *h == DemoHost::HostShim).unwrap();
        assert!(hosts[..first_host_shim]
            .iter()
            .all(|h| *h == DemoHost::Envoy));
        assert!(hosts[first_host_shim..]
            .iter()
            .all(|h| *h == DemoHost::HostShim));
        assert!(all
            .iter()
            .filter(|(_, s)| s.name.contains("redis_call"))
            .all(|(h, _)| *h == DemoHost::HostShim));
        assert_eq!(
            all.iter().filter(|(h, _)| *h == DemoHost::HostShim).count(),
            SCENARIOS.len()
        );

        let envoy_limits: Vec<&str> =
            plan(&options(Some(DemoHost::Envoy), &["rate-limited route ("]))
                .into_iter()
                .map(|(h, s)| {
                    assert_eq!(h, DemoHost::Envoy);
                    s.name
                })
                .collect();
        assert_eq!(
            envoy_limits,
            [
                "rate-limited route (Redis Cluster, 3 masters)",
                RATE_LIMITED_1C
            ]
        );
        assert!(plan(&options(Some(DemoHost::Envoy), &["redis_call"])).is_empty());
    }

    #[test]
    fn the_one_connection_pass_runs_one_wrk_connection_whatever_the_load() {
        let o = options(None, &[]);
        let one = scenario(RATE_LIMITED_1C).load(&o);
        assert_eq!((one.threads, one.connections), (1, 1));
        let main = scenario(RATE_LIMITED).load(&o);
        assert_eq!((main.threads, main.connections), (2, 64));
    }

    #[test]
    fn counters_are_read_as_envoy_and_host_shim_print_them() {
        let envoy = "# TYPE krowoc_redis_calls counter\nkrowoc_redis_calls{} 42\n\
                     krowoc_events_published{} 7\nkrowoc_redis_calls_extra{} 9\n";
        let p = PluginCounters::parse(envoy);
        assert_eq!(
            (p.redis_calls, p.events_published, p.events_flushes),
            (42, 7, 0)
        );
        let relay = "# HELP krowoc_relay_requests_total POST /resp requests received.\n\
                     # TYPE krowoc_relay_requests_total counter\nkrowoc_relay_requests_total 1234\n";
        assert_eq!(
            prometheus_counter(relay, "krowoc_relay_requests_total"),
            1234
        );
        assert_eq!(prometheus_counter(relay, "krowoc_relay_commands_total"), 0);
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
    fn the_relay_ping_script_posts_one_ping_with_the_token() {
        let lua = relay_ping_lua(Some("s3cret"));
        assert!(lua.contains("wrk.method = \"POST\""), "{lua}");
        assert!(
            lua.contains(r#"wrk.body = "*1\r\n$4\r\nPING\r\n""#),
            "{lua}"
        );
        assert!(
            lua.contains("wrk.headers[\"x-krowoc-relay-token\"] = [==[s3cret]==]"),
            "{lua}"
        );
        assert!(!relay_ping_lua(None).contains("token"));
    }

    #[test]
    fn the_rate_limited_configuration_has_one_sliding_window_limit() {
        let config: serde_json::Value =
            serde_json::from_str(&bench_config("rate-limited").unwrap()).unwrap();
        let limits = config["routes"][0]["rate_limit"]["limits"]
            .as_array()
            .unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0]["algorithm"], "sliding_window");
    }

    #[test]
    fn plugin_counters_are_differences_over_the_run() {
        let p = PluginCounters {
            redis_calls: 300,
            events_published: 9_000,
            events_flushes: 300,
            events_dropped: 0,
        };
        let later = PluginCounters {
            redis_calls: 310,
            ..p
        };
        assert_eq!(later.since(p).redis_calls, 10);
        assert_eq!(later.since(p).events_published, 0);
    }
}
