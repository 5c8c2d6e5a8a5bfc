//! Rate-limit response fields: the IETF draft's `RateLimit-Policy` and `RateLimit`
//! (draft-ietf-httpapi-ratelimit-headers-10: lists of Structured Field items whose value is a
//! String naming the policy, with parameters `q` quota and `w` window in seconds, resp. `r`
//! remaining and `t` seconds until quota comes back), the older `X-RateLimit-*` fields, and
//! `Retry-After` on a denial.

use super::Decision;
use crate::config::{HeaderStyle, LimitRule};

/// Whole seconds, rounded up: a client waiting this long is never early.
pub fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The `Retry-After` value (delay-seconds) for a denial: at least 1.
pub fn retry_after_secs(retry_after_ms: u64) -> u64 {
    ceil_secs(retry_after_ms).max(1)
}

/// A Structured Field String: `"` and `\` escaped; other characters are limited by validation
/// of policy names (visible ASCII).
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        if (' '..='~').contains(&c) {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// `RateLimit-Policy` value: one item per limit, e.g. `"per_1m";q=5;w=60`.
pub fn policy_field(limits: &[LimitRule]) -> String {
    limits
        .iter()
        .map(|l| {
            format!(
                "{};q={};w={}",
                sf_string(l.name()),
                l.limit,
                ceil_secs(l.window_ms()).max(1)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `RateLimit` value: one item per limit, e.g. `"per_1m";r=4;t=60`. On a denial the `t` of a
/// violated limit is never earlier than `Retry-After`.
pub fn limit_field(limits: &[LimitRule], decision: &Decision) -> String {
    limits
        .iter()
        .zip(&decision.limits)
        .map(|(l, s)| {
            let mut t = ceil_secs(s.reset_ms);
            if !decision.allowed && s.over {
                t = t.max(retry_after_secs(decision.retry_after_ms));
            }
            format!("{};r={};t={}", sf_string(l.name()), s.remaining, t)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The response fields for a decision, in the configured style. A denial always carries
/// `Retry-After`, whatever the style.
pub fn rate_limit_headers(
    style: HeaderStyle,
    limits: &[LimitRule],
    decision: &Decision,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if style.draft() {
        out.push(("ratelimit-policy".to_string(), policy_field(limits)));
        out.push(("ratelimit".to_string(), limit_field(limits, decision)));
    }
    if style.legacy() {
        if let Some((l, s)) = most_restrictive(limits, decision) {
            let mut reset = ceil_secs(s.reset_ms);
            if !decision.allowed && s.over {
                reset = reset.max(retry_after_secs(decision.retry_after_ms));
            }
            out.push(("x-ratelimit-limit".to_string(), l.limit.to_string()));
            out.push(("x-ratelimit-remaining".to_string(), s.remaining.to_string()));
            out.push(("x-ratelimit-reset".to_string(), reset.to_string()));
        }
    }
    if !decision.allowed {
        out.push((
            "retry-after".to_string(),
            retry_after_secs(decision.retry_after_ms).to_string(),
        ));
    }
    out
}

/// The limit a client is closest to: fewest remaining, then the latest reset.
fn most_restrictive<'a>(
    limits: &'a [LimitRule],
    decision: &'a Decision,
) -> Option<(&'a LimitRule, &'a super::LimitStatus)> {
    limits
        .iter()
        .zip(&decision.limits)
        .min_by(|(_, a), (_, b)| {
            a.remaining
                .cmp(&b.remaining)
                .then(b.reset_ms.cmp(&a.reset_ms))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::duration::ConfigDuration;
    use crate::config::{Algorithm, LimitRule};
    use crate::ratelimit::LimitStatus;

    fn rule(name: &str, limit: u64, window_ms: u64) -> LimitRule {
        LimitRule {
            name: Some(name.into()),
            limit,
            window: ConfigDuration::from_millis(window_ms),
            algorithm: Algorithm::SlidingLog,
            burst: None,
        }
    }

    fn status(remaining: u64, reset_ms: u64, over: bool) -> LimitStatus {
        LimitStatus {
            remaining,
            reset_ms,
            over,
        }
    }

    #[test]
    fn draft_fields_follow_the_structured_field_syntax() {
        let limits = [rule("per_1m", 5, 60_000), rule("per_1h", 100, 3_600_000)];
        let d = Decision {
            allowed: true,
            retry_after_ms: 0,
            limits: vec![status(4, 59_001, false), status(99, 3_599_999, false)],
        };
        let h = rate_limit_headers(HeaderStyle::Draft, &limits, &d);
        assert_eq!(
            h,
            vec![
                (
                    "ratelimit-policy".to_string(),
                    "\"per_1m\";q=5;w=60, \"per_1h\";q=100;w=3600".to_string()
                ),
                (
                    "ratelimit".to_string(),
                    "\"per_1m\";r=4;t=60, \"per_1h\";r=99;t=3600".to_string()
                ),
            ]
        );
    }

    #[test]
    fn denial_carries_retry_after_and_reset_not_earlier() {
        let limits = [rule("per_1m", 5, 60_000)];
        let d = Decision {
            allowed: false,
            retry_after_ms: 41_200,
            limits: vec![status(0, 30_000, true)],
        };
        let h = rate_limit_headers(HeaderStyle::Both, &limits, &d);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("retry-after"), Some("42"));
        assert_eq!(get("ratelimit"), Some("\"per_1m\";r=0;t=42"));
        assert_eq!(get("x-ratelimit-limit"), Some("5"));
        assert_eq!(get("x-ratelimit-remaining"), Some("0"));
        assert_eq!(get("x-ratelimit-reset"), Some("42"));
        let h = rate_limit_headers(HeaderStyle::None, &limits, &d);
        assert_eq!(h, vec![("retry-after".to_string(), "42".to_string())]);
    }

    #[test]
    fn legacy_fields_describe_the_most_restrictive_limit() {
        let limits = [rule("per_1s", 10, 1_000), rule("per_1h", 1000, 3_600_000)];
        let d = Decision {
            allowed: true,
            retry_after_ms: 0,
            limits: vec![status(9, 1_000, false), status(3, 3_000_000, false)],
        };
        let h = rate_limit_headers(HeaderStyle::Legacy, &limits, &d);
        assert_eq!(
            h,
            vec![
                ("x-ratelimit-limit".to_string(), "1000".to_string()),
                ("x-ratelimit-remaining".to_string(), "3".to_string()),
                ("x-ratelimit-reset".to_string(), "3000".to_string()),
            ]
        );
    }

    #[test]
    fn sub_second_windows_round_up() {
        assert_eq!(policy_field(&[rule("fast", 3, 500)]), "\"fast\";q=3;w=1");
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1001), 2);
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
