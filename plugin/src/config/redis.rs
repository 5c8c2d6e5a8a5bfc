//! The `redis` section: how the filter reaches Redis (transport, cluster, credentials), the
//! timeout every call shares, the key prefix and the circuit breaker.

use super::duration::ConfigDuration;
use super::problems::{PathSeg, Problems};
use serde::Deserialize;

const MAX_KEY_PREFIX_BYTES: usize = 64;

/// How the filter reaches Redis, and what every call shares.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `relay` (stock Envoy, via `dispatch_http_call`) or `redis_call` (Higress ABI).
    #[serde(default)]
    pub transport: Transport,
    /// Envoy cluster name; default `redis_relay` for `relay`, `redis` for `redis_call`.
    #[serde(default)]
    pub cluster: Option<String>,
    /// `:authority` of relay calls; default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// Relay token sent as `x-krowoc-relay-token` (relay only).
    #[serde(default)]
    pub token: Option<String>,
    /// Redis ACL user (redis_call only).
    #[serde(default)]
    pub username: Option<String>,
    /// Redis password (redis_call only).
    #[serde(default)]
    pub password: Option<String>,
    /// Redis logical database (redis_call only; the relay picks its database in its URL).
    #[serde(default)]
    pub database: u32,
    /// Timeout of every Redis call.
    #[serde(default = "default_redis_timeout")]
    pub timeout: ConfigDuration,
    /// Prefix of every key the filter writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Transport `relay`: the most exchanges this VM's requests have in flight at once; calls
    /// made beyond wait and ride together in the next exchange. 0: every call at once, in an
    /// exchange of its own. Unset: [`DEFAULT_MAX_IN_FLIGHT`].
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

/// `max_in_flight` when unset, for transport `relay` (measured in Envoy: the README's
/// benchmark).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2;

/// The largest `max_in_flight` accepted.
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Relay,
    RedisCall,
}

/// Per-VM circuit breaker: after `failures` consecutive failed calls, no Redis calls until a
/// probe is due: the first `probe_interval` after it opened, then twice the previous wait after
/// each failed probe, at most `cooldown` (see `redis::breaker`).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// The wait before the first probe (unset: 100ms, or `cooldown` if that is shorter).
    #[serde(default)]
    pub probe_interval: Option<ConfigDuration>,
    /// The longest wait between probes.
    #[serde(default = "default_breaker_cooldown")]
    pub cooldown: ConfigDuration,
}

impl BreakerConfig {
    /// The wait before the first probe, in milliseconds.
    pub fn probe_interval_ms(&self) -> u64 {
        self.probe_interval.map_or_else(
            || DEFAULT_PROBE_INTERVAL_MS.min(self.cooldown.as_millis()),
            ConfigDuration::as_millis,
        )
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_breaker_failures(),
            probe_interval: None,
            cooldown: default_breaker_cooldown(),
        }
    }
}

fn default_redis_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(200)
}
fn default_key_prefix() -> String {
    "krowoc:".to_string()
}
fn default_breaker_failures() -> u32 {
    5
}
const DEFAULT_PROBE_INTERVAL_MS: u64 = 100;
fn default_breaker_cooldown() -> ConfigDuration {
    ConfigDuration::from_millis(1_000)
}

impl RedisConfig {
    /// The Envoy cluster Redis calls go to.
    pub fn cluster(&self) -> &str {
        match (&self.cluster, self.transport) {
            (Some(c), _) => c,
            (None, Transport::Relay) => "redis_relay",
            (None, Transport::RedisCall) => "redis",
        }
    }

    /// Requests' exchanges a VM keeps in flight before calls share the next one (0: no limit;
    /// always 0 for `redis_call`, which carries one command per call).
    pub fn max_in_flight(&self) -> usize {
        match self.transport {
            Transport::Relay => self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            Transport::RedisCall => 0,
        }
    }

    /// `:authority` of relay calls.
    pub fn authority(&self) -> &str {
        self.authority.as_deref().unwrap_or_else(|| self.cluster())
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            transport: Transport::default(),
            cluster: None,
            authority: None,
            token: None,
            username: None,
            password: None,
            database: 0,
            timeout: default_redis_timeout(),
            key_prefix: default_key_prefix(),
            breaker: BreakerConfig::default(),
            max_in_flight: None,
        }
    }
}

pub(super) fn validate_redis(p: &mut Problems<'_>, redis: &RedisConfig) {
    let at = |field: &'static str| [PathSeg::Key("redis"), PathSeg::Key(field)];
    if let Some(cluster) = &redis.cluster {
        if cluster.is_empty() || cluster.chars().any(|c| c.is_whitespace() || c.is_control()) {
            p.at(
                &at("cluster"),
                "must be a non-empty cluster name without spaces",
            );
        }
    }
    if let Some(authority) = &redis.authority {
        if authority.is_empty()
            || authority
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.at(
                &at("authority"),
                "must be a non-empty host name without spaces",
            );
        }
    }
    match redis.transport {
        Transport::Relay => {
            for (field, set) in [
                ("username", redis.username.is_some()),
                ("password", redis.password.is_some()),
                ("database", redis.database != 0),
            ] {
                if set {
                    p.at(
                        &at(field),
                        "only used with transport `redis_call` (the relay authenticates and picks the database itself)",
                    );
                }
            }
        }
        Transport::RedisCall => {
            for (field, set) in [
                ("token", redis.token.is_some()),
                ("authority", redis.authority.is_some()),
                ("max_in_flight", redis.max_in_flight.is_some()),
            ] {
                if set {
                    p.at(&at(field), "only used with transport `relay`");
                }
            }
        }
    }
    if let Some(token) = &redis.token {
        if token.is_empty() || !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            p.at(
                &at("token"),
                "must be non-empty visible ASCII (it is sent as a header)",
            );
        }
    }
    if redis.max_in_flight.is_some_and(|m| m > MAX_IN_FLIGHT) {
        p.at(
            &at("max_in_flight"),
            format!("must be at most {MAX_IN_FLIGHT} (0: no limit)"),
        );
    }
    let timeout = redis.timeout.as_millis();
    if timeout == 0 || timeout > 60_000 {
        p.at(&at("timeout"), "must be between 1ms and 60s");
    }
    let prefix = &redis.key_prefix;
    if prefix.len() > MAX_KEY_PREFIX_BYTES
        || prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
    {
        p.at(
            &at("key_prefix"),
            format!("must be at most {MAX_KEY_PREFIX_BYTES} bytes without spaces or braces (braces would break hash tags)"),
        );
    }
    if redis.breaker.failures == 0 {
        p.at(
            &[
                PathSeg::Key("redis"),
                PathSeg::Key("breaker"),
                PathSeg::Key("failures"),
            ],
            "must be at least 1",
        );
    }
    let cooldown = redis.breaker.cooldown.as_millis();
    if cooldown == 0 || cooldown > 3_600_000 {
        p.at(
            &[
                PathSeg::Key("redis"),
                PathSeg::Key("breaker"),
                PathSeg::Key("cooldown"),
            ],
            "must be between 1ms and 1h",
        );
    }
    let probe_interval = redis.breaker.probe_interval_ms();
    if redis.breaker.probe_interval.is_some() && (probe_interval == 0 || probe_interval > cooldown)
    {
        p.at(
            &[
                PathSeg::Key("redis"),
                PathSeg::Key("breaker"),
                PathSeg::Key("probe_interval"),
            ],
            format!(
                "must be between 1ms and `cooldown` ({cooldown}ms): the first probe cannot wait longer than the longest wait between probes"
            ),
        );
    }
}
