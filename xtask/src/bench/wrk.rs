//! wrk, the load generator every HTTP scenario uses: one run with a given load (and a Lua
//! script when the requests vary), and the parts of its `--latency` report the bench shows.

use crate::procs;
use crate::workspace::describe;
use anyhow::{anyhow, bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// wrk's load: threads and connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub threads: u32,
    pub connections: u32,
}

/// Runs wrk for `duration` (with `script` when given) and parses its report; kills it if it
/// overruns by 30 s.
pub(crate) fn run_wrk(
    url: &str,
    load: Load,
    duration: Duration,
    script: Option<&Path>,
) -> Result<WrkReport> {
    let mut cmd = Command::new("wrk");
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    cmd.arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--latency", "--timeout", "5s", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask: $ {}", describe(&cmd));
    let mut child = cmd.spawn().context("cannot start wrk")?;
    let mut stdout = child.stdout.take().context("wrk stdout")?;
    let mut stderr = child.stderr.take().context("wrk stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + duration + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(signal) = procs::stop_requested() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("interrupted by {signal}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk ran 30 s past its {duration:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("wrk failed ({status}):\n{out}{err}");
    }
    parse_wrk(&out).with_context(|| format!("cannot read wrk's report:\n{out}"))
}

/// The parts of wrk's `--latency` report the table shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WrkReport {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Non-2xx/3xx responses plus socket errors (connect, read, write, timeout).
    pub errors: u64,
}

fn parse_wrk(text: &str) -> Result<WrkReport> {
    let mut requests = None;
    let mut requests_per_sec = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            requests_per_sec = Some(
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| anyhow!("bad Requests/sec {v:?}"))?,
            );
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(
                n.trim()
                    .parse::<u64>()
                    .map_err(|_| anyhow!("bad request count {n:?}"))?,
            );
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = Some(parse_wrk_time(v.trim())?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = Some(parse_wrk_time(v.trim())?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v
                .trim()
                .parse::<u64>()
                .map_err(|_| anyhow!("bad Non-2xx count {v:?}"))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or("0");
                errors += n
                    .parse::<u64>()
                    .map_err(|_| anyhow!("bad socket error count {part:?}"))?;
            }
        }
    }
    Ok(WrkReport {
        requests: requests.context("no `N requests in` line")?,
        requests_per_sec: requests_per_sec.context("no `Requests/sec:` line")?,
        p50: p50.context("no 50% latency line (was --latency given?)")?,
        p99: p99.context("no 99% latency line (was --latency given?)")?,
        errors,
    })
}

/// wrk's time format: a number with `us`, `ms`, `s`, `m` or `h`.
fn parse_wrk_time(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("time {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number.parse().map_err(|_| anyhow!("bad time {text:?}"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("unknown time unit in {text:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "\
Running 3s test @ http://127.0.0.1:8080/health
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   620.32us  328.12us  10.24ms   85.73%
    Req/Sec    51.61k     3.21k   58.86k    70.50%
  Latency Distribution
     50%  568.00us
     75%  717.00us
     90%    0.93ms
     99%    1.68ms
  308154 requests in 3.00s, 26.17MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec: 102700.33
Transfer/sec:      8.72MB
";

    #[test]
    fn wrk_reports_are_parsed() {
        let r = parse_wrk(WRK_OUTPUT).unwrap();
        assert_eq!(r.requests, 308154);
        assert!((r.requests_per_sec - 102700.33).abs() < 1e-6);
        assert_eq!(r.p50, Duration::from_micros(568));
        assert_eq!(r.p99, Duration::from_micros(1680));
        assert_eq!(r.errors, 15);
    }

    #[test]
    fn a_report_without_latency_distribution_is_refused() {
        let without: String = WRK_OUTPUT
            .lines()
            .filter(|l| !l.contains('%') || l.contains("Stdev"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = parse_wrk(&without).unwrap_err();
        assert!(e.to_string().contains("--latency"), "{e}");
    }

    #[test]
    fn wrk_times_take_every_unit() {
        assert_eq!(
            parse_wrk_time("568.00us").unwrap(),
            Duration::from_micros(568)
        );
        assert_eq!(parse_wrk_time("2.00s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_wrk_time("1.50m").unwrap(), Duration::from_secs(90));
        assert!(parse_wrk_time("12").is_err());
        assert!(parse_wrk_time("1.0d").is_err());
    }
}
