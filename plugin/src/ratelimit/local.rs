//! The per-worker fallback of `failure_mode: local`: token buckets with each limit's capacity
//! and rate, decided in the VM when Redis cannot be asked.

use super::{Decision, LimitStatus};
use crate::config::{Algorithm, LimitRule};
use std::collections::HashMap;

/// A token bucket with the capacity and refill of one limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn full(capacity: f64, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, capacity: f64, per_ms: f64, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * per_ms).min(capacity);
        self.last_ms = self.last_ms.max(now_ms);
    }
}

fn bucket_shape(l: &LimitRule) -> (f64, f64) {
    let capacity = match l.algorithm {
        Algorithm::Gcra => l.burst(),
        _ => l.limit,
    } as f64;
    let per_ms = l.limit as f64 / l.window_ms().max(1) as f64;
    (capacity, per_ms)
}

/// The per-worker fallback of `failure_mode: local`: token buckets with each limit's capacity
/// and rate, keyed like Redis would be. Bounded like the deny cache.
#[derive(Debug, Default)]
pub struct LocalLimiter {
    buckets: HashMap<String, Vec<TokenBucket>>,
}

pub const LOCAL_LIMITER_MAX_KEYS: usize = 10_000;

impl LocalLimiter {
    /// Decides one request; like the script, a denial consumes nothing.
    pub fn decide(&mut self, identity: &str, limits: &[LimitRule], now_ms: u64) -> Decision {
        if !self.buckets.contains_key(identity) && self.buckets.len() >= LOCAL_LIMITER_MAX_KEYS {
            // Drop buckets that have refilled completely: they equal fresh ones.
            self.buckets.retain(|_, bs| {
                bs.iter().zip(limits).any(|(b, l)| {
                    let (cap, per_ms) = bucket_shape(l);
                    let mut b = *b;
                    b.refill(cap, per_ms, now_ms);
                    b.tokens < cap
                })
            });
            if self.buckets.len() >= LOCAL_LIMITER_MAX_KEYS {
                self.buckets.clear();
            }
        }
        let buckets = self.buckets.entry(identity.to_string()).or_insert_with(|| {
            limits
                .iter()
                .map(|l| TokenBucket::full(bucket_shape(l).0, now_ms))
                .collect()
        });
        let mut statuses = Vec::with_capacity(limits.len());
        let mut allowed = true;
        let mut retry_after_ms = 0u64;
        for (b, l) in buckets.iter_mut().zip(limits) {
            let (cap, per_ms) = bucket_shape(l);
            b.refill(cap, per_ms, now_ms);
            let over = b.tokens < 1.0;
            let to_next_ms = ((1.0 - b.tokens.fract()) / per_ms).ceil() as u64;
            if over {
                allowed = false;
                let wait = ((1.0 - b.tokens) / per_ms).ceil() as u64;
                retry_after_ms = retry_after_ms.max(wait.max(1));
            }
            statuses.push(LimitStatus {
                remaining: b.tokens.floor() as u64,
                reset_ms: to_next_ms.max(1),
                over,
            });
        }
        if allowed {
            for ((b, s), _) in buckets.iter_mut().zip(&mut statuses).zip(limits) {
                b.tokens -= 1.0;
                s.remaining = b.tokens.floor().max(0.0) as u64;
            }
        }
        Decision {
            allowed,
            retry_after_ms: if allowed { 0 } else { retry_after_ms },
            limits: statuses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::test_policy as policy;

    #[test]
    fn local_bucket_admits_the_limit_then_refills() {
        let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}], "failure_mode": "local"}"#);
        let mut l = LocalLimiter::default();
        for i in 0..5 {
            let d = l.decide("r:a", &p.limits, 0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.limits[0].remaining, 4 - i);
        }
        let d = l.decide("r:a", &p.limits, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 12_000, "one token every 12s");
        // A denial consumed nothing: after 12s exactly one more is admitted.
        assert!(l.decide("r:a", &p.limits, 12_000).allowed);
        assert!(!l.decide("r:a", &p.limits, 12_000).allowed);
        // Another client has its own bucket.
        assert!(l.decide("r:b", &p.limits, 12_000).allowed);
    }

    #[test]
    fn local_bucket_denial_of_one_limit_consumes_none() {
        let p = policy(
            r#"{"limits": [{"limit": 2, "window": "1s"}, {"limit": 100, "window": "1h"}], "failure_mode": "local"}"#,
        );
        let mut l = LocalLimiter::default();
        assert!(l.decide("a", &p.limits, 0).allowed);
        assert!(l.decide("a", &p.limits, 0).allowed);
        let d = l.decide("a", &p.limits, 0);
        assert!(!d.allowed);
        assert!(d.limits[0].over && !d.limits[1].over);
        assert_eq!(d.limits[1].remaining, 98);
    }
}
