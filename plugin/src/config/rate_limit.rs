//! A route's `rate_limit`: its limits (algorithm, window, burst), what identifies a client,
//! the denial's status and body, shadow mode, the failure mode and the deny cache.

use super::duration::{format_duration, ConfigDuration};
use super::problems::{is_token, PathSeg, Problems};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

const MAX_NAME_BYTES: usize = 64;
const MAX_LIMITS_PER_ROUTE: usize = 16;
const MAX_KEY_PARTS: usize = 8;
const MAX_WINDOW_MS: u64 = 30 * 24 * 3_600_000;
const MAX_LIMIT: u64 = 1_000_000_000;

/// A route's rate limit: one or more limits decided together in one Redis call.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub limits: Vec<LimitRule>,
    /// What identifies a client; parts are combined. Default: `["client_ip"]`.
    #[serde(default = "default_key")]
    pub key: Vec<KeyPart>,
    /// A request missing a keyed header or query parameter: limited as one group, or skipped.
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Which rate-limit header fields responses carry.
    #[serde(default)]
    pub headers: HeaderStyle,
    /// Status of a denied request.
    #[serde(default = "default_deny_status")]
    pub status: u16,
    /// JSON body of a denied request; default `{"error":"rate_limited",...}`.
    #[serde(default)]
    pub body: Option<Value>,
    /// Decide and count, never deny.
    #[serde(default)]
    pub shadow: bool,
    /// What to do when Redis is slow, down or answers garbage.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Deny a key inside the VM until its reset once Redis said it is over the limit.
    #[serde(default = "default_true")]
    pub deny_cache: bool,
    /// Approximate limits for very hot keys: each VM decides alone from its count plus the
    /// shared count it last saw, and adds its count to Redis every `sync` (see
    /// `ratelimit::sync`). Only `fixed_window` limits, on windows aligned to Redis's clock.
    #[serde(default)]
    pub sync: Option<ConfigDuration>,
}

/// The shortest and longest `sync` interval.
const MIN_SYNC_MS: u64 = 10;
const MAX_SYNC_MS: u64 = 60_000;

/// One limit: at most `limit` requests per `window`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    /// Name in the `RateLimit-Policy` field; default `per_<window>` (e.g. `per_1m`).
    #[serde(default)]
    pub name: Option<String>,
    pub limit: u64,
    pub window: ConfigDuration,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// `gcra` only: requests admitted at once from an idle state; default `limit`.
    #[serde(default)]
    pub burst: Option<u64>,
}

impl LimitRule {
    /// The limit's name (resolved during validation, so never empty afterwards).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    pub fn window_ms(&self) -> u64 {
        self.window.as_millis()
    }

    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.limit)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Never more than `limit` admitted in any interval of length `window`.
    #[default]
    SlidingLog,
    /// Two counters weighted by the elapsed part of the window; O(1) memory.
    SlidingWindow,
    /// A counter per aligned window (the guide's semantics).
    FixedWindow,
    /// Generic cell rate algorithm: `limit / window` with a burst.
    Gcra,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::Gcra => "gcra",
        }
    }
}

/// One part of a rate-limit key.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    /// The client address (see `client_ip`).
    ClientIp,
    /// The request path without the query string.
    Path,
    /// The route as a whole: every request of the route shares the limit.
    Route,
    /// A request header's value: `{"header": "x-api-key"}`.
    Header(String),
    /// A query parameter's value: `{"query": "user_id"}`.
    Query(String),
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Requests without the keyed value share one limit.
    #[default]
    Group,
    /// Requests without the keyed value are not limited.
    Skip,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    #[default]
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    Legacy,
    /// Both of the above.
    Both,
    /// No rate-limit fields (a denial still carries `Retry-After`).
    None,
}

impl HeaderStyle {
    pub fn draft(self) -> bool {
        matches!(self, HeaderStyle::Draft | HeaderStyle::Both)
    }
    pub fn legacy(self) -> bool {
        matches!(self, HeaderStyle::Legacy | HeaderStyle::Both)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through.
    #[default]
    Allow,
    /// Answer 503.
    Deny,
    /// Decide with a per-worker token bucket of the same limit.
    Local,
}

fn default_key() -> Vec<KeyPart> {
    vec![KeyPart::ClientIp]
}
fn default_deny_status() -> u16 {
    429
}
fn default_true() -> bool {
    true
}

/// A structured-field key as the draft's `RateLimit-Policy` needs: `[a-z*][a-z0-9_.*-]*`.
fn is_sf_key(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_lowercase() || b == b'*' => {}
        _ => return false,
    }
    s.len() <= MAX_NAME_BYTES
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        })
}

pub(super) fn validate_rate_limit(
    p: &mut Problems<'_>,
    base: &[PathSeg<'static>],
    rl: &mut RateLimitPolicy,
) {
    let at = |rest: &[PathSeg<'static>]| -> Vec<PathSeg<'static>> {
        let mut v = base.to_vec();
        v.extend_from_slice(rest);
        v
    };
    if rl.limits.is_empty() || rl.limits.len() > MAX_LIMITS_PER_ROUTE {
        p.at(
            &at(&[PathSeg::Key("limits")]),
            format!("give 1 to {MAX_LIMITS_PER_ROUTE} limits"),
        );
    }
    let mut names = HashSet::new();
    for (j, limit) in rl.limits.iter_mut().enumerate() {
        let lp = |field: &'static str| {
            at(&[
                PathSeg::Key("limits"),
                PathSeg::Index(j),
                PathSeg::Key(field),
            ])
        };
        if limit.limit == 0 || limit.limit > MAX_LIMIT {
            p.at(&lp("limit"), format!("must be between 1 and {MAX_LIMIT}"));
        }
        let window = limit.window.as_millis();
        if window == 0 || window > MAX_WINDOW_MS {
            p.at(&lp("window"), "must be between 1ms and 720h");
        }
        match (limit.algorithm, limit.burst) {
            (Algorithm::Gcra, Some(b)) if b == 0 || b > MAX_LIMIT => {
                p.at(&lp("burst"), format!("must be between 1 and {MAX_LIMIT}"))
            }
            (Algorithm::Gcra, _) | (_, None) => {}
            (_, Some(_)) => p.at(&lp("burst"), "only used with algorithm `gcra`"),
        }
        if limit.algorithm == Algorithm::Gcra && limit.limit > 0 && window / limit.limit == 0 {
            p.at(
                &lp("limit"),
                "gcra needs at least 1ms between requests: lower the limit or widen the window",
            );
        }
        match &limit.name {
            Some(name) if !is_sf_key(name) => p.at(
                &lp("name"),
                "must start with a-z and use only a-z 0-9 _ - . * (a structured-field key)",
            ),
            Some(_) => {}
            None => {
                limit.name = Some(format!("per_{}", format_duration(limit.window.0)));
            }
        }
        if !names.insert(limit.name().to_string()) {
            p.at(
                &lp("name"),
                format!(
                    "two limits are named {:?}: give each limit a distinct `name`",
                    limit.name()
                ),
            );
        }
    }
    if rl.key.is_empty() || rl.key.len() > MAX_KEY_PARTS {
        p.at(
            &at(&[PathSeg::Key("key")]),
            format!("give 1 to {MAX_KEY_PARTS} key parts"),
        );
    }
    for (j, part) in rl.key.iter().enumerate() {
        let bad = match part {
            KeyPart::Header(h) => !is_token(h),
            KeyPart::Query(q) => q.is_empty() || q.len() > 256,
            _ => false,
        };
        if bad {
            p.at(
                &at(&[PathSeg::Key("key"), PathSeg::Index(j)]),
                "must name a header (a token) or a query parameter (1 to 256 bytes)",
            );
        }
    }
    if let Some(sync) = rl.sync {
        let ms = sync.as_millis();
        if !(MIN_SYNC_MS..=MAX_SYNC_MS).contains(&ms) {
            p.at(
                &at(&[PathSeg::Key("sync")]),
                format!("must be between {MIN_SYNC_MS}ms and 60s"),
            );
        }
        for (j, limit) in rl.limits.iter().enumerate() {
            if limit.algorithm != Algorithm::FixedWindow {
                p.at(
                    &at(&[
                        PathSeg::Key("limits"),
                        PathSeg::Index(j),
                        PathSeg::Key("algorithm"),
                    ]),
                    "a limit with `sync` must use algorithm `fixed_window` (a count per window, which VMs can add to)",
                );
            } else if limit.window.as_millis() < ms {
                p.at(
                    &at(&[PathSeg::Key("sync")]),
                    format!(
                        "must be shorter than every limit's window ({} is {})",
                        limit.name(),
                        format_duration(limit.window.0)
                    ),
                );
            }
        }
    }
    if !(200..=599).contains(&rl.status) {
        p.at(
            &at(&[PathSeg::Key("status")]),
            "must be an HTTP status between 200 and 599",
        );
    }
    // Lower-case header names once, so lookups need no case folding later.
    for part in rl.key.iter_mut() {
        if let KeyPart::Header(h) = part {
            *h = h.to_ascii_lowercase();
        }
    }
}
