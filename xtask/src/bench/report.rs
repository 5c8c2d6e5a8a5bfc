//! What a bench run shows: one table of every scenario on every host (req/s, p50, p99, Redis
//! commands and relay exchanges per request, the ratio to the scenario's reference), the issue's
//! aims with the measured value and whether each is met, the per-command and per-plugin-counter
//! breakdowns, and the same rows as JSON (`results.json`).

use super::{Measured, PluginCounters, NO_FILTER, NO_POLICY};
use crate::cli::{BenchOptions, DemoHost};
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

/// The aims: a scenario's req/s against its reference's.
struct RatioAim {
    scenario: &'static str,
    reference: &'static str,
    at_least: f64,
}

const RATIO_AIMS: &[RatioAim] = &[
    RatioAim {
        scenario: NO_POLICY,
        reference: NO_FILTER,
        at_least: 0.85,
    },
    RatioAim {
        scenario: super::RATE_LIMITED,
        reference: super::ROUTE_WITHOUT_POLICY,
        at_least: 0.70,
    },
    RatioAim {
        scenario: super::CACHE_HIT,
        reference: super::CACHE_PASS_THROUGH,
        at_least: 0.90,
    },
    RatioAim {
        scenario: super::EVENTS_ON,
        reference: NO_POLICY,
        at_least: 0.95,
    },
];

/// The 1-connection aim: the p50 a rate limit adds is at most one relay round trip and this.
const ADDED_P50_SLACK: Duration = Duration::from_micros(100);

/// One aim as measured on one host.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AimResult {
    pub host: DemoHost,
    /// What is aimed at, e.g. "rate-limited route ≥ 70% of route without policy".
    pub aim: String,
    /// The measured value, e.g. "46%".
    pub measured: String,
    pub met: bool,
    /// By how much it is met or missed, e.g. "24 points short".
    pub margin: String,
}

fn find<'a>(results: &'a [Measured], host: DemoHost, name: &str) -> Option<&'a Measured> {
    results
        .iter()
        .find(|m| m.host == host && m.scenario.name == name)
}

/// Every aim whose scenarios were all measured, per host, in the order the hosts ran.
pub(super) fn aims(results: &[Measured]) -> Vec<AimResult> {
    let mut hosts: Vec<DemoHost> = Vec::new();
    for m in results {
        if !hosts.contains(&m.host) {
            hosts.push(m.host);
        }
    }
    let mut out = Vec::new();
    for host in hosts {
        for a in RATIO_AIMS {
            let (Some(m), Some(r)) = (
                find(results, host, a.scenario),
                find(results, host, a.reference),
            ) else {
                continue;
            };
            let ratio = m.wrk.requests_per_sec / r.wrk.requests_per_sec.max(f64::MIN_POSITIVE);
            let points = (100.0 * (ratio - a.at_least)).round();
            out.push(AimResult {
                host,
                aim: format!(
                    "{} ≥ {:.0}% of {}",
                    a.scenario,
                    100.0 * a.at_least,
                    a.reference
                ),
                measured: format!("{:.0}%", 100.0 * ratio),
                met: ratio >= a.at_least,
                margin: if ratio >= a.at_least {
                    format!("{points:.0} points to spare")
                } else {
                    format!("{:.0} points short", -points)
                },
            });
        }
        let (Some(limited), Some(unlimited), Some(relay)) = (
            find(results, host, super::RATE_LIMITED_1C),
            find(results, host, super::ROUTE_WITHOUT_POLICY_1C),
            find(results, host, super::RELAY_PING_1C),
        ) else {
            continue;
        };
        let added = limited.wrk.p50.as_secs_f64() - unlimited.wrk.p50.as_secs_f64();
        let bound = relay.wrk.p50 + ADDED_P50_SLACK;
        let spare = bound.as_secs_f64() - added;
        out.push(AimResult {
            host,
            aim: format!(
                "p50 the rate limit adds at 1 connection ({} − {}) ≤ {} p50 + {}",
                super::RATE_LIMITED_1C,
                super::ROUTE_WITHOUT_POLICY_1C,
                super::RELAY_PING_1C,
                show_latency(ADDED_P50_SLACK)
            ),
            measured: format!(
                "{} against {} ({} + {})",
                show_signed(added),
                show_latency(bound),
                show_latency(relay.wrk.p50),
                show_latency(ADDED_P50_SLACK)
            ),
            met: spare >= 0.0,
            margin: if spare >= 0.0 {
                format!("{} to spare", show_signed(spare))
            } else {
                format!("{} over", show_signed(-spare))
            },
        });
    }
    out
}

pub(super) fn show_latency(d: Duration) -> String {
    show_signed(d.as_secs_f64())
}

/// Seconds as µs below a millisecond, else ms; negative values keep their sign.
fn show_signed(secs: f64) -> String {
    let us = secs * 1e6;
    if us.abs() < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// "62% of no filter", or "—" without a reference measured on the same host.
fn vs_reference(m: &Measured, results: &[Measured]) -> String {
    m.scenario
        .baseline
        .and_then(|b| find(results, m.host, b))
        .map(|b| {
            format!(
                "{:.0}% of {}",
                100.0 * m.wrk.requests_per_sec / b.wrk.requests_per_sec.max(f64::MIN_POSITIVE),
                b.scenario.name
            )
        })
        .unwrap_or_else(|| "—".into())
}

/// The scenarios' table, aims and breakdowns (results.md without the in-process section).
pub(super) fn render_markdown(results: &[Measured], setting: &Setting) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Benchmark, {}\n", setting.date);
    let o = setting.options;
    let _ = writeln!(
        out,
        "{}; {}; {}. Load: `wrk -t{} -c{} -d{}s --latency` after a {}s warm-up, one run per \
         scenario; the 1-connection rows: `wrk -t1 -c1` for as long (the Redis PING: xtask's \
         own client, one PING at a time). Gateways with {} workers (Envoy `--concurrency {}`, \
         host-shim `--workers {}`); release builds of host-shim, krowoc-relay and \
         krowoc-upstream, the plugin built with profile `wasm` (Envoy loads the \
         `--no-default-features` build; its transport is the relay). wrk, the gateway, the \
         upstream, the relay and Redis share the machine.\n",
        setting.machine,
        setting.rustc,
        setting.envoy.as_deref().unwrap_or("Envoy not run"),
        o.threads,
        o.connections,
        o.duration.as_secs(),
        o.warmup.as_secs(),
        setting.workers,
        setting.workers,
        setting.workers,
    );
    let _ = writeln!(
        out,
        "| host | scenario | path | req/s | p50 | p99 | Redis commands/request | relay exchanges/request | vs reference | errors |"
    );
    let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|---|--:|");
    for m in results {
        let _ = writeln!(
            out,
            "| {} | {} | `{}` | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} |",
            m.host.name(),
            m.scenario.name,
            m.scenario.path,
            m.wrk.requests_per_sec,
            show_latency(m.wrk.p50),
            show_latency(m.wrk.p99),
            m.redis_per_request(),
            m.relay_per_request(),
            vs_reference(m, results),
            m.wrk.errors
        );
    }
    let aims = aims(results);
    if !aims.is_empty() {
        let _ = writeln!(out, "\nAims (req/s against the reference, from this run):");
        for a in &aims {
            let _ = writeln!(
                out,
                "- {}: {}: {} — {} ({})",
                a.host.name(),
                a.aim,
                a.measured,
                if a.met { "met" } else { "not met" },
                a.margin
            );
        }
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
            format!(
                "- {}, {}: {}",
                m.host.name(),
                m.scenario.name,
                per.join(", ")
            )
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
        .filter_map(|m| {
            let name = format!("{}, {}", m.host.name(), m.scenario.name);
            Some(plugin_line(&name, m.plugin?, m.wrk.requests))
        })
        .collect();
    if !plugin_lines.is_empty() {
        let _ = writeln!(
            out,
            "\nThe plugin's Redis calls (round trips: one relay body or one `redis_call`, however \
             many commands it carries; `krowoc.redis.calls`) and request events, from the \
             gateway's admin `/stats/prometheus`:\n{}",
            plugin_lines.join("\n")
        );
    }
    out
}

/// What the table's heading says about the run.
pub(super) struct Setting<'a> {
    pub options: &'a BenchOptions,
    pub date: String,
    pub machine: String,
    pub rustc: String,
    /// "Envoy 1.40.0" when Envoy ran.
    pub envoy: Option<String>,
    pub workers: usize,
}

impl<'a> Setting<'a> {
    /// This machine's setting, read now.
    pub fn here(options: &'a BenchOptions, envoy: Option<String>, workers: usize) -> Self {
        Setting {
            options,
            date: command_line("date", &["-u", "+%Y-%m-%d"])
                .unwrap_or_else(|| "date unknown".into()),
            machine: machine(),
            rustc: command_line("rustc", &["--version"]).unwrap_or_else(|| "rustc ?".into()),
            envoy,
            workers,
        }
    }
}

/// `results.json`: one object per table row.
pub(super) fn render_json(results: &[Measured]) -> String {
    let round = |x: f64, places: i32| {
        let scale = 10f64.powi(places);
        (x * scale).round() / scale
    };
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.scenario.name,
                "host": m.host.name(),
                "req_per_s": round(m.wrk.requests_per_sec, 1),
                "p50_us": round(m.wrk.p50.as_secs_f64() * 1e6, 1),
                "p99_us": round(m.wrk.p99.as_secs_f64() * 1e6, 1),
                "redis_calls_per_request": round(m.redis_per_request(), 3),
                "relay_exchanges_per_request": round(m.relay_per_request(), 3),
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Array(rows))
        .unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

pub(super) fn plugin_line(scenario: &str, p: PluginCounters, requests: u64) -> String {
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

/// A command's first output line, if it runs.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().next().map(str::to_string)
}

/// The first line of the table's heading when nothing but the in-process part ran.
pub(super) fn heading_only(setting: &Setting) -> String {
    format!("### Benchmark, {}\n", setting.date)
}

#[cfg(test)]
mod tests {
    use super::super::{wrk::WrkReport, SCENARIOS};
    use super::*;
    use std::collections::BTreeMap;

    fn measured(host: DemoHost, name: &str, rps: f64, p50_us: u64) -> Measured {
        let requests = (rps * 10.0) as u64;
        Measured {
            host,
            scenario: SCENARIOS
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no scenario {name}")),
            wrk: WrkReport {
                requests,
                requests_per_sec: rps,
                p50: Duration::from_micros(p50_us),
                p99: Duration::from_micros(p50_us * 5),
                errors: 0,
            },
            redis_calls: BTreeMap::new(),
            relay_exchanges: 0,
            plugin: None,
        }
    }

    fn options() -> BenchOptions {
        BenchOptions::defaults(false)
    }

    fn setting(options: &BenchOptions) -> Setting<'_> {
        Setting {
            options,
            date: "2026-12-01".into(),
            machine: "Some CPU, 2 cores, Linux 6.1".into(),
            rustc: "rustc 1.95.0".into(),
            envoy: Some("Envoy 1.40.0".into()),
            workers: 2,
        }
    }

    #[test]
    fn one_table_shows_every_host_with_ratios_to_the_reference_on_the_same_host() {
        let mut limited = measured(DemoHost::Envoy, super::super::RATE_LIMITED, 600.0, 900);
        limited.redis_calls = BTreeMap::from([("evalsha".to_string(), 6_000)]);
        limited.relay_exchanges = 6_000;
        limited.plugin = Some(PluginCounters {
            redis_calls: 6_000,
            ..PluginCounters::default()
        });
        let results = vec![
            measured(DemoHost::Envoy, DIRECT_NAME, 1000.0, 500),
            measured(
                DemoHost::Envoy,
                super::super::ROUTE_WITHOUT_POLICY,
                800.0,
                600,
            ),
            limited,
            // host-shim's reference is host-shim's, not Envoy's.
            measured(
                DemoHost::HostShim,
                super::super::ROUTE_WITHOUT_POLICY,
                400.0,
                700,
            ),
            measured(DemoHost::HostShim, super::super::RATE_LIMITED, 300.0, 1200),
        ];
        let o = options();
        let md = render_markdown(&results, &setting(&o));
        assert!(
            md.contains("| envoy | direct upstream | `/health` | 1000 | 500 µs | 2.50 ms | 0.00 | 0.00 | — | 0 |"),
            "{md}"
        );
        assert!(
            md.contains("| envoy | rate-limited route | `/api/rate-limited` | 600 | 900 µs | 4.50 ms | 1.00 | 1.00 | 75% of route without policy | 0 |"),
            "{md}"
        );
        assert!(
            md.contains("| host-shim | rate-limited route | `/api/rate-limited` | 300 | 1.20 ms | 6.00 ms | 0.00 | 0.00 | 75% of route without policy | 0 |"),
            "{md}"
        );
        assert!(
            md.contains("- envoy, rate-limited route: evalsha 1.00 (6000 calls)"),
            "{md}"
        );
        assert!(
            md.contains("- envoy, rate-limited route: 1.000 Redis calls/request (6000 calls)"),
            "{md}"
        );
        assert!(md.contains("wrk -t2 -c64 -d10s --latency"), "{md}");
        assert!(md.contains("Envoy `--concurrency 2`"), "{md}");
        assert!(md.contains("Envoy 1.40.0"), "{md}");
        assert_eq!(
            md.matches("| host | scenario |").count(),
            1,
            "one table: {md}"
        );
    }

    const DIRECT_NAME: &str = super::super::DIRECT;

    #[test]
    fn aims_say_the_measured_value_and_by_how_much_they_are_met_or_missed() {
        use super::super::*;
        let results = vec![
            measured(DemoHost::Envoy, NO_FILTER, 1000.0, 500),
            measured(DemoHost::Envoy, NO_POLICY, 900.0, 500),
            measured(DemoHost::Envoy, ROUTE_WITHOUT_POLICY, 800.0, 500),
            measured(DemoHost::Envoy, RATE_LIMITED, 400.0, 900),
            measured(DemoHost::Envoy, EVENTS_ON, 720.0, 500),
            measured(DemoHost::Envoy, RELAY_PING_1C, 3000.0, 300),
            measured(DemoHost::Envoy, ROUTE_WITHOUT_POLICY_1C, 2000.0, 350),
            measured(DemoHost::Envoy, RATE_LIMITED_1C, 1000.0, 700),
            // Without its reference on the same host, no aim.
            measured(DemoHost::HostShim, RATE_LIMITED, 400.0, 900),
        ];
        let aims = aims(&results);
        let lines: Vec<(String, &str, bool, &str)> = aims
            .iter()
            .map(|a| {
                (
                    format!("{}: {}", a.host.name(), a.aim),
                    a.measured.as_str(),
                    a.met,
                    a.margin.as_str(),
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                (
                    "envoy: plugin, no policy ≥ 85% of no filter".to_string(),
                    "90%",
                    true,
                    "5 points to spare"
                ),
                (
                    "envoy: rate-limited route ≥ 70% of route without policy".to_string(),
                    "50%",
                    false,
                    "20 points short"
                ),
                (
                    "envoy: events on ≥ 95% of plugin, no policy".to_string(),
                    "80%",
                    false,
                    "15 points short"
                ),
                (
                    "envoy: p50 the rate limit adds at 1 connection (rate-limited route (1 connection) − route without policy (1 connection)) ≤ relay PING (1 connection) p50 + 100 µs".to_string(),
                    "350 µs against 400 µs (300 µs + 100 µs)",
                    true,
                    "50 µs to spare"
                ),
            ]
        );
        let o = options();
        let md = render_markdown(&results, &setting(&o));
        assert!(
            md.contains("- envoy: rate-limited route ≥ 70% of route without policy: 50% — not met (20 points short)"),
            "{md}"
        );
    }

    #[test]
    fn the_json_has_one_object_per_row_with_the_agreed_fields() {
        let mut m = measured(DemoHost::HostShim, super::super::CACHE_HIT, 1234.56, 789);
        m.wrk.requests = 10_000;
        m.redis_calls = BTreeMap::from([("evalsha".into(), 10_000), ("hmget".into(), 10_000)]);
        m.relay_exchanges = 10_001;
        let json: serde_json::Value = serde_json::from_str(&render_json(&[m])).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "name": "cache hit",
                "host": "host-shim",
                "req_per_s": 1234.6,
                "p50_us": 789.0,
                "p99_us": 3945.0,
                "redis_calls_per_request": 2.0,
                "relay_exchanges_per_request": 1.0,
            }])
        );
        assert_eq!(render_json(&[]).trim(), "[]");
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
            plugin_line("envoy, events on", p, 10_000),
            "- envoy, events on: 0.030 Redis calls/request (300 calls); events published 0.90/request in 300 flushes (30.0 events/flush), 0 dropped"
        );
    }

    #[test]
    fn latencies_read_in_microseconds_below_a_millisecond() {
        assert_eq!(show_latency(Duration::from_micros(568)), "568 µs");
        assert_eq!(show_latency(Duration::from_micros(1680)), "1.68 ms");
        assert_eq!(show_signed(-0.000_05), "-50 µs");
    }
}
