//! The direct Redis round trip the relay's is set beside: `PING` after `PING` on one connection,
//! each reply awaited, for a while. wrk speaks only HTTP, so this is xtask's own client; one
//! connection and one command at a time leave nothing for a load generator to do better.

use super::wrk::WrkReport;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const PONG: &[u8] = b"+PONG\r\n";

/// PINGs `redis` on one connection for `duration`; the report wrk would give for it.
pub(super) fn redis_ping(redis: SocketAddr, duration: Duration) -> Result<WrkReport> {
    let mut stream = TcpStream::connect_timeout(&redis, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to redis at {redis}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = [0u8; PONG.len()];
    let mut round_trips = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        stream.write_all(PING)?;
        stream
            .read_exact(&mut reply)
            .with_context(|| format!("reading PING's reply from {redis}"))?;
        round_trips.push(sent.elapsed());
        if reply != PONG {
            bail!(
                "redis at {redis} answered PING with {:?}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
    Ok(report(round_trips, started.elapsed()))
}

/// Request count, rate and percentiles of round trips measured over `elapsed`.
fn report(mut round_trips: Vec<Duration>, elapsed: Duration) -> WrkReport {
    round_trips.sort_unstable();
    WrkReport {
        requests: round_trips.len() as u64,
        requests_per_sec: round_trips.len() as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        p50: percentile(&round_trips, 50.0),
        p99: percentile(&round_trips, 99.0),
        errors: 0,
    }
}

/// The nearest-rank percentile of sorted values (zero when there are none).
fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (pct / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(us).collect();
        assert_eq!(percentile(&values, 50.0), us(50));
        assert_eq!(percentile(&values, 99.0), us(99));
        assert_eq!(percentile(&[us(7)], 99.0), us(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn round_trips_become_a_report_like_wrks() {
        let r = report(vec![us(30), us(10), us(20), us(40)], Duration::from_secs(2));
        assert_eq!(r.requests, 4);
        assert_eq!(r.requests_per_sec, 2.0);
        assert_eq!((r.p50, r.p99), (us(20), us(40)));
        assert_eq!(r.errors, 0);
    }
}
