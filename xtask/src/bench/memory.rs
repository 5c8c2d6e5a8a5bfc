//! Redis memory per rate-limit key: for each algorithm at limit 100 and 10,000, one client
//! fills its key through the gateway (requests until the limit denies), and `MEMORY USAGE` of
//! the key it left is read. `sliding_log` keeps one entry per admitted request (O(limit));
//! the others keep a fixed-size state.

use super::{metrics_text, prometheus_counter, run_wrk, Bench, Load, Setup};
use crate::cli::DemoHost;
use crate::probe;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::time::Duration;

/// The section's name, which `--only` selects.
pub const NAME: &str = "Redis memory per rate-limit key";

pub const ALGORITHMS: [&str; 4] = ["sliding_log", "sliding_window", "fixed_window", "gcra"];
pub const LIMITS: [u64; 2] = [100, 10_000];
/// The plugin configuration of each (algorithm, limit), by name (see `bench_config`).
pub const CONFIGS: [&str; 8] = [
    "memory-sliding_log-100",
    "memory-sliding_log-10000",
    "memory-sliding_window-100",
    "memory-sliding_window-10000",
    "memory-fixed_window-100",
    "memory-fixed_window-10000",
    "memory-gcra-100",
    "memory-gcra-10000",
];
/// The key prefix of those configurations, so their keys are found apart from the others.
pub const KEY_PREFIX: &str = "mem:";

/// `memory-<algorithm>-<limit>`: one route, one limit per client address with a window of an
/// hour (nothing expires while it is measured).
pub fn config(name: &str) -> Option<serde_json::Value> {
    let (algorithm, limit) = name.strip_prefix("memory-")?.rsplit_once('-')?;
    let limit: u64 = limit.parse().ok()?;
    ALGORITHMS.contains(&algorithm).then(|| {
        serde_json::json!({
            "redis": {"transport": "relay", "cluster": "redis_relay", "key_prefix": KEY_PREFIX},
            "routes": [{"name": "bench", "match": {"path": "/api/rate-limited"},
                        "rate_limit": {"limits": [{"name": "mem", "limit": limit, "window": "1h",
                                                   "algorithm": algorithm}],
                                       "key": ["client_ip"]}}]
        })
    })
}

/// One measured key.
pub struct KeyMemory {
    pub algorithm: &'static str,
    pub limit: u64,
    /// `MEMORY USAGE` of the client's key, in bytes.
    pub bytes: u64,
}

impl Bench<'_> {
    /// Fills each configuration's key on `host` and reads its size.
    pub(super) fn key_memory(&mut self, host: DemoHost) -> Result<Vec<KeyMemory>> {
        let mut out = Vec::new();
        for name in CONFIGS {
            let (algorithm, limit) = name
                .strip_prefix("memory-")
                .and_then(|n| n.rsplit_once('-'))
                .context("a memory configuration name")?;
            let algorithm = ALGORITHMS
                .into_iter()
                .find(|a| *a == algorithm)
                .context("a known algorithm")?;
            let limit: u64 = limit.parse()?;
            eprintln!(
                "\nxtask: ==> {}: {NAME}: {algorithm}, limit {limit}",
                host.name()
            );
            let (listen, admin) = self.gateway(host, Setup::PluginWith(name))?;
            let url = format!("http://{listen}/api/rate-limited");
            // Until the limit has denied a request, so the key holds everything it keeps.
            let mut denied = 0;
            for _ in 0..10 {
                run_wrk(
                    &url,
                    Load {
                        threads: 1,
                        connections: 8,
                    },
                    Duration::from_secs(2),
                    None,
                )?;
                let m = metrics_text(admin, "/stats/prometheus")?;
                denied = prometheus_counter(&m, "krowoc_rate_limit_bench_denied");
                if denied > 0 {
                    break;
                }
            }
            if denied == 0 {
                bail!("{algorithm}, limit {limit}: the limit never denied a request");
            }
            let pattern = format!("{KEY_PREFIX}rl:*:{algorithm}:{limit}:*");
            let keys = probe::redis_array(self.redis, &["KEYS", &pattern])?;
            let [key] = keys.as_slice() else {
                bail!("{algorithm}, limit {limit}: expected one key matching {pattern}, found {keys:?}");
            };
            let bytes: u64 =
                probe::redis_command(self.redis, &["MEMORY", "USAGE", key, "SAMPLES", "0"])?
                    .parse()
                    .with_context(|| format!("MEMORY USAGE {key}"))?;
            eprintln!("xtask: {algorithm}, limit {limit}: {key}: {bytes} bytes");
            out.push(KeyMemory {
                algorithm,
                limit,
                bytes,
            });
        }
        Ok(out)
    }
}

/// The section of results.md: a row per algorithm, a column per limit, and where
/// `sliding_log` starts to cost more than `sliding_window`.
pub fn render(rows: &[KeyMemory], host: DemoHost) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### {NAME} ({}; `MEMORY USAGE` of one client's key once its limit denies)\n",
        host.name()
    );
    let _ = writeln!(
        out,
        "| algorithm | {} |",
        LIMITS
            .iter()
            .map(|l| format!("limit {}", group_thousands(*l)))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|{}", "--:|".repeat(LIMITS.len()));
    let bytes = |a: &str, l: u64| {
        rows.iter()
            .find(|r| r.algorithm == a && r.limit == l)
            .map(|r| r.bytes)
    };
    for a in ALGORITHMS {
        let cells: Vec<String> = LIMITS
            .iter()
            .map(|l| bytes(a, *l).map_or("–".into(), |b| format!("{} B", group_thousands(b))))
            .collect();
        let _ = writeln!(out, "| `{a}` | {} |", cells.join(" | "));
    }
    if let (Some(small), Some(large), Some(window)) = (
        bytes("sliding_log", LIMITS[0]),
        bytes("sliding_log", LIMITS[1]),
        bytes("sliding_window", LIMITS[0]),
    ) {
        // Per request in the window at each limit: Redis keeps a small sorted set compactly
        // (a listpack, up to `zset-max-listpack-entries`, 128 by default) and a large one as a
        // skiplist, so the cost per entry is not one number.
        let per_small = small as f64 / LIMITS[0] as f64;
        let per_large = large as f64 / LIMITS[1] as f64;
        let crossover = (window as f64 / per_small).ceil().max(1.0);
        let _ = writeln!(
            out,
            "\n`sliding_log` keeps one entry per request in the window: {per_small:.1} bytes each \
             at limit {}, {per_large:.1} at limit {} (Redis stores a sorted set of more than 128 \
             entries as a skiplist). It costs more than `sliding_window`'s {window} bytes from a \
             limit of about {crossover:.0}.",
            group_thousands(LIMITS[0]),
            group_thousands(LIMITS[1]),
        );
    }
    out
}

fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_is_valid_and_names_its_algorithm_and_limit() {
        for name in CONFIGS {
            let c = config(name).unwrap_or_else(|| panic!("{name}"));
            let limit = &c["routes"][0]["rate_limit"]["limits"][0];
            assert!(
                name.contains(limit["algorithm"].as_str().unwrap()),
                "{name}"
            );
            assert!(name.ends_with(&limit["limit"].to_string()), "{name}");
        }
        assert!(config("memory-token_bucket-100").is_none());
        assert!(config("memory-gcra-x").is_none());
    }

    #[test]
    fn the_table_states_the_crossover_from_the_measured_sizes() {
        let rows = [
            ("sliding_log", 100, 6_000),
            ("sliding_log", 10_000, 600_000),
            ("sliding_window", 100, 120),
            ("sliding_window", 10_000, 120),
        ]
        .map(|(algorithm, limit, bytes)| KeyMemory {
            algorithm,
            limit,
            bytes,
        });
        let md = render(&rows, DemoHost::Envoy);
        assert!(
            md.contains("| `sliding_log` | 6,000 B | 600,000 B |"),
            "{md}"
        );
        assert!(md.contains("| `gcra` | – | – |"), "{md}");
        assert!(
            md.contains("60.0 bytes each at limit 100, 60.0 at limit 10,000"),
            "{md}"
        );
        assert!(md.contains("from a limit of about 2."), "{md}");
    }
}
