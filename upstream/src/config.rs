//! The upstream's configuration: typed, with the demo's defaults, validated once at startup.

use std::path::PathBuf;
use std::time::Duration;

use krowoc_relay::redis_url::redact_url;

use crate::deployment::{RedisDeployment, DEFAULT_REDIS_URL};
use crate::error::Error;

/// The channels the background subscriber listens to by default: the filter's request events
/// and the application's own events.
pub const DEFAULT_CHANNELS: &[&str] = &["krowoc:requests", "app:events"];

/// The longest channel name accepted, in bytes (configuration and `POST /api/publish-event`).
pub const MAX_CHANNEL_BYTES: usize = 256;

/// The largest ring buffer of received events accepted by `--events-buffer`.
pub const MAX_EVENTS_BUFFER: usize = 100_000;

/// The most concurrent `GET /api/events/stream` clients accepted by `--max-event-streams`.
pub const MAX_EVENT_STREAMS: usize = 10_000;

/// The largest per-stream backlog accepted by `--event-stream-buffer`.
pub const MAX_EVENT_STREAM_BUFFER: usize = 65_536;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// One server, a cluster's seeds, or sentinels and a master name (see [`crate::deployment`]).
    pub redis: RedisDeployment,
    /// With `rediss://` (in any deployment): trust the CA certificates in this PEM file instead
    /// of the system's trusted roots.
    pub redis_tls_ca: Option<PathBuf>,
    /// How long `GET /api/cached-data` takes (the guide's "slow operation").
    pub cached_data_delay: Duration,
    /// How long `GET /api/slow-limited` takes.
    pub slow_delay: Duration,
    /// `max-age` sent in `Cache-Control` on `GET /api/cached-data`.
    pub cache_max_age: Duration,
    /// Channels the background subscriber SUBSCRIBEs to; empty disables it.
    pub channels: Vec<String>,
    /// How many received events `GET /api/recent-events` can show (the ring buffer's size).
    pub events_buffer: usize,
    /// Payloads longer than this are kept truncated (as a string) in the ring buffer.
    pub max_event_bytes: usize,
    /// Largest accepted request body for the JSON endpoints; larger answers 413.
    pub max_body_bytes: usize,
    /// Every Redis call made by a handler (and each connection attempt) gives up after this.
    pub redis_timeout: Duration,
    /// The subscriber's first reconnect delay; doubles after each failure...
    pub subscriber_backoff_initial: Duration,
    /// ...up to this cap.
    pub subscriber_backoff_max: Duration,
    /// The subscriber PINGs its connection this often, so a silently dead link is noticed.
    pub subscriber_ping_interval: Duration,
    /// How many `GET /api/events/stream` clients may be connected at once; more get 503.
    pub max_event_streams: usize,
    /// How many received events a stream client may fall behind by; a client further behind
    /// skips the oldest and is told how many it skipped.
    pub event_stream_buffer: usize,
    /// An idle event stream sends a comment this often, so proxies and clients see it alive
    /// (and a client that has gone is noticed when the write fails).
    pub event_stream_keep_alive: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            redis: RedisDeployment::standalone(DEFAULT_REDIS_URL),
            redis_tls_ca: None,
            cached_data_delay: Duration::from_secs(1),
            slow_delay: Duration::from_secs(2),
            cache_max_age: Duration::from_secs(60),
            channels: DEFAULT_CHANNELS.iter().map(|c| c.to_string()).collect(),
            events_buffer: 200,
            max_event_bytes: 64 * 1024,
            max_body_bytes: 64 * 1024,
            redis_timeout: Duration::from_secs(1),
            subscriber_backoff_initial: Duration::from_millis(100),
            subscriber_backoff_max: Duration::from_secs(10),
            subscriber_ping_interval: Duration::from_secs(15),
            max_event_streams: 32,
            event_stream_buffer: 256,
            event_stream_keep_alive: Duration::from_secs(15),
        }
    }
}

impl UpstreamConfig {
    /// Checks every value; the error names the option (as spelled on the command line) and the
    /// bad value.
    pub fn validate(&self) -> Result<(), Error> {
        if let RedisDeployment::Standalone { url } = &self.redis {
            if let Err(e) = redis::Client::open(url.as_str()) {
                return Err(Error::config(
                    "--redis",
                    format!("{:?} is not a Redis URL: {e}", redact_url(url)),
                ));
            }
        }
        if self.redis_tls_ca.is_some() && !self.redis.uses_tls() {
            return Err(Error::config(
                "--redis-tls-ca",
                format!(
                    "a CA is for TLS, but {} does not use rediss:// ({})",
                    self.redis.flag(),
                    self.redis
                ),
            ));
        }
        for (i, channel) in self.channels.iter().enumerate() {
            validate_channel(channel).map_err(|why| {
                Error::config(
                    "--channels",
                    format!("channel #{} {channel:?} {why}", i + 1),
                )
            })?;
            if self.channels[..i].contains(channel) {
                return Err(Error::config(
                    "--channels",
                    format!("channel {channel:?} is listed twice"),
                ));
            }
        }
        if !(1..=MAX_EVENTS_BUFFER).contains(&self.events_buffer) {
            return Err(Error::config(
                "--events-buffer",
                format!(
                    "{} is out of range: must be 1..={MAX_EVENTS_BUFFER}",
                    self.events_buffer
                ),
            ));
        }
        if self.max_event_bytes == 0 {
            return Err(Error::config("--max-event-bytes", "must be at least 1"));
        }
        if !(2..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(Error::config(
                "--max-body-bytes",
                format!(
                    "{} is out of range: must be 2..=16777216",
                    self.max_body_bytes
                ),
            ));
        }
        for (option, value, max) in [
            (
                "--max-event-streams",
                self.max_event_streams,
                MAX_EVENT_STREAMS,
            ),
            (
                "--event-stream-buffer",
                self.event_stream_buffer,
                MAX_EVENT_STREAM_BUFFER,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(Error::config(
                    option,
                    format!("{value} is out of range: must be 1..={max}"),
                ));
            }
        }
        for (option, value) in [
            ("--redis-timeout", self.redis_timeout),
            ("--subscriber-backoff", self.subscriber_backoff_initial),
            ("--subscriber-ping-interval", self.subscriber_ping_interval),
            ("--event-stream-keep-alive", self.event_stream_keep_alive),
        ] {
            if value.is_zero() {
                return Err(Error::config(option, "must be greater than 0"));
            }
        }
        if self.subscriber_backoff_max < self.subscriber_backoff_initial {
            return Err(Error::config(
                "--subscriber-max-backoff",
                format!(
                    "{:?} is below --subscriber-backoff ({:?})",
                    self.subscriber_backoff_max, self.subscriber_backoff_initial
                ),
            ));
        }
        Ok(())
    }
}

/// Why a channel name is refused, if it is: empty, or longer than [`MAX_CHANNEL_BYTES`].
pub fn validate_channel(channel: &str) -> Result<(), String> {
    if channel.is_empty() {
        return Err("is empty".to_string());
    }
    if channel.len() > MAX_CHANNEL_BYTES {
        return Err(format!(
            "is {} bytes long; the limit is {MAX_CHANNEL_BYTES}",
            channel.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(UpstreamConfig::default().validate().is_ok());
    }

    #[test]
    fn invalid_values_name_the_option() {
        let cases: Vec<(UpstreamConfig, &str)> = vec![
            (
                UpstreamConfig {
                    redis: RedisDeployment::standalone("http://nope"),
                    ..Default::default()
                },
                "--redis",
            ),
            (
                UpstreamConfig {
                    channels: vec!["a".into(), "".into()],
                    ..Default::default()
                },
                "--channels",
            ),
            (
                UpstreamConfig {
                    channels: vec!["a".into(), "a".into()],
                    ..Default::default()
                },
                "--channels",
            ),
            (
                UpstreamConfig {
                    events_buffer: 0,
                    ..Default::default()
                },
                "--events-buffer",
            ),
            (
                UpstreamConfig {
                    redis_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "--redis-timeout",
            ),
            (
                UpstreamConfig {
                    subscriber_backoff_max: Duration::from_millis(1),
                    ..Default::default()
                },
                "--subscriber-max-backoff",
            ),
            (
                UpstreamConfig {
                    max_event_streams: 0,
                    ..Default::default()
                },
                "--max-event-streams",
            ),
            (
                UpstreamConfig {
                    event_stream_buffer: MAX_EVENT_STREAM_BUFFER + 1,
                    ..Default::default()
                },
                "--event-stream-buffer",
            ),
            (
                UpstreamConfig {
                    event_stream_keep_alive: Duration::ZERO,
                    ..Default::default()
                },
                "--event-stream-keep-alive",
            ),
        ];
        for (config, option) in cases {
            let err = config.validate().expect_err(option);
            assert_eq!(err.field(), Some(option), "{err}");
        }
    }

    #[test]
    fn a_ca_goes_with_rediss_in_every_deployment() {
        let with_ca = |redis: RedisDeployment| UpstreamConfig {
            redis,
            redis_tls_ca: Some("/etc/ca.pem".into()),
            ..Default::default()
        };
        let plain = with_ca(RedisDeployment::cluster("h1:7000,h2:7001").unwrap());
        let err = plain.validate().expect_err("a CA without TLS");
        assert_eq!(err.field(), Some("--redis-tls-ca"));
        assert!(err.to_string().contains("--redis-cluster"), "{err}");
        let tls = with_ca(RedisDeployment::sentinel("rediss://s1:26379,s2:26379", "m").unwrap());
        assert!(tls.validate().is_ok());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redact_url("redis://secret@h:6379"), "redis://***@h:6379");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
