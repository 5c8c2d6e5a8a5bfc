//! `cargo xtask soak`: the demo stack (envoy.yaml's configuration: every policy) under steady
//! load for a while on each host, sampling what should stay flat once warm: the resident memory
//! of the gateway and the relay, and Redis's key count (every key the filter writes has a TTL
//! or a cap). Redis's own memory is shown beside the events stream's length: it grows with the
//! stream until the stream reaches its `maxlen`, so it is shown, not judged. The load cycles through the rate-limited route, cache hits for a few users,
//! the event-only `/health`, and an invalidation every 500 requests (whose next miss waits for
//! the upstream's one second, with the requests coalesced on it).

use crate::bench::{run_wrk, Load};
use crate::cli::{DemoHost, DemoRedis, SoakOptions};
use crate::demo::{self, Demo};
use crate::probe;
use crate::procs::{self, loopback};
use crate::setup::{self, Needs};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const GATEWAY: u16 = 10000;
/// envoy.yaml's events stream (`key_prefix` + `events.stream.key`).
const STREAM: &str = "krowoc:events";
const REDIS: u16 = 6390;
/// Load before the first sample (caches filled, VMs warm, queues at their working size).
const WARM_UP: Duration = Duration::from_secs(30);
/// Memory that may come on top of the first sample without counting as growth (allocator
/// slack, a busier second), as a share and in bytes.
const FLAT_SHARE: f64 = 0.10;
const FLAT_BYTES: u64 = 16 * 1024 * 1024;

const SCRIPT: &str = r#"-- The soak's mix: limited, cached, event-only, and an invalidation now and then.
local paths = {
  "/api/rate-limited",
  "/api/cached-data?user_id=1",
  "/api/cached-data?user_id=2",
  "/api/cached-data?user_id=3",
  "/health",
}
local n = 0
request = function()
  n = n + 1
  if n % 500 == 0 then
    return wrk.format("POST", "/api/invalidate-cache", {["Content-Type"] = "application/json"},
      '{"user_id": "2"}')
  end
  return wrk.format("GET", paths[(n % #paths) + 1])
end
"#;

struct Sample {
    at: Duration,
    requests_per_sec: f64,
    errors: u64,
    /// Resident set sizes, bytes: the gateway, the relay, redis-server.
    rss: [u64; 3],
    redis_keys: u64,
    /// Entries in envoy.yaml's events stream.
    stream_len: u64,
}

pub fn run(options: &SoakOptions) -> Result<ExitCode> {
    setup::ensure(
        &Needs {
            wrk: true,
            ..Needs::default()
        },
        &options.setup,
    )?;
    let mut report = format!(
        "### Soak: {} per host, wrk -t2 -c16, samples every {} s after a {} s warm-up\n",
        show_duration(options.duration),
        options.interval.as_secs(),
        WARM_UP.as_secs()
    );
    let mut all_flat = true;
    for host in options.hosts() {
        let (ws, builds) = demo::prepare(&options.setup, host, DemoRedis::Single)?;
        let script = ws.target_dir.join("soak-mix.lua");
        std::fs::write(&script, SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        let mut demo = Demo::start(&ws, &builds, host, DemoRedis::Single, false)?;
        let samples = soak(&mut demo, host, options, &script);
        demo.stop();
        let samples = samples?;
        let (table, flat) = render(host, &samples);
        all_flat &= flat;
        report.push_str(&table);
    }
    println!("\n{report}");
    let dir = crate::workspace::Workspace::load()?.target_dir.join("soak");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.md");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(if all_flat {
        ExitCode::SUCCESS
    } else {
        eprintln!("xtask: memory grew past the warm-up sample (see the table)");
        ExitCode::FAILURE
    })
}

fn soak(
    demo: &mut Demo,
    host: DemoHost,
    options: &SoakOptions,
    script: &std::path::Path,
) -> Result<Vec<Sample>> {
    let url = format!("http://{}/", loopback(GATEWAY));
    let load = Load {
        threads: 2,
        connections: 16,
    };
    let gateway = host.name();
    let pids = [
        demo.pid(gateway).context("the gateway's pid")?,
        demo.pid("relay").context("the relay's pid")?,
        demo.pid("redis").context("redis-server's pid")?,
    ];
    eprintln!(
        "xtask: soak on {gateway}: warming up for {} s",
        WARM_UP.as_secs()
    );
    run_wrk(&url, load, WARM_UP, Some(script))?;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < options.duration {
        if let Some(signal) = procs::stop_requested() {
            bail!("interrupted by {signal}");
        }
        let wrk = run_wrk(&url, load, options.interval, Some(script))?;
        demo.check_alive()?;
        let sample = Sample {
            at: started.elapsed(),
            requests_per_sec: wrk.requests_per_sec,
            errors: wrk.errors,
            rss: pids.map(|p| rss_bytes(p).unwrap_or(0)),
            redis_keys: probe::redis_command(loopback(REDIS), &["DBSIZE"])?
                .parse()
                .unwrap_or(0),
            stream_len: probe::redis_command(loopback(REDIS), &["XLEN", STREAM])?
                .parse()
                .unwrap_or(0),
        };
        eprintln!(
            "xtask: soak on {gateway} at {}: {:.0} req/s, rss {} / {} / {}, {} keys",
            show_duration(sample.at),
            sample.requests_per_sec,
            mib(sample.rss[0]),
            mib(sample.rss[1]),
            mib(sample.rss[2]),
            sample.redis_keys
        );
        samples.push(sample);
    }
    Ok(samples)
}

/// `VmRSS` of a process, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host's table and whether every process stayed within the warm-up sample's bound.
fn render(host: DemoHost, samples: &[Sample]) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{}:\n\n| after | req/s | non-2xx (the limited route's 429s) | {} RSS | relay RSS | redis RSS | Redis keys | events stream |\n|--:|--:|--:|--:|--:|--:|--:|--:|",
        host.name(),
        host.name()
    );
    for s in samples {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            show_duration(s.at),
            s.requests_per_sec,
            s.errors,
            mib(s.rss[0]),
            mib(s.rss[1]),
            mib(s.rss[2]),
            s.redis_keys,
            s.stream_len
        );
    }
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return (out, false);
    };
    let mut flat = true;
    for (i, name) in [host.name(), "relay"].iter().enumerate() {
        let bound = (first.rss[i] as f64 * (1.0 + FLAT_SHARE)) as u64 + FLAT_BYTES;
        let ok = last.rss[i] <= bound;
        flat &= ok;
        let _ = writeln!(
            out,
            "\n{name}: {} → {} ({})",
            mib(first.rss[i]),
            mib(last.rss[i]),
            if ok { "flat" } else { "GREW" }
        );
    }
    (out, flat)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(secs: u64, gateway_mib: u64) -> Sample {
        Sample {
            at: Duration::from_secs(secs),
            requests_per_sec: 100.0,
            errors: 0,
            rss: [gateway_mib << 20, 20 << 20, 10 << 20],
            redis_keys: 12,
            stream_len: 1_000,
        }
    }

    #[test]
    fn memory_within_a_tenth_and_16_mib_of_the_first_sample_is_flat() {
        let (table, flat) = render(DemoHost::Envoy, &[sample(10, 100), sample(20, 125)]);
        assert!(flat, "{table}");
        assert!(table.contains("| 20s | 100 | 0 | 125.0 MiB | 20.0 MiB | 10.0 MiB | 12 | 1000 |"));
        let (table, flat) = render(DemoHost::Envoy, &[sample(10, 100), sample(20, 127)]);
        assert!(
            !flat && table.contains("envoy: 100.0 MiB → 127.0 MiB (GREW)"),
            "{table}"
        );
        assert!(
            !render(DemoHost::HostShim, &[]).1,
            "no samples prove nothing"
        );
    }
}
