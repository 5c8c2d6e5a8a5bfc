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

/// A limit's bucket in one of `vms` VMs: its share of the capacity (rounded up, at least one
/// request) and of the rate.
fn bucket_shape(l: &LimitRule, vms: u64) -> (f64, f64) {
    let capacity = match l.algorithm {
        Algorithm::Gcra => l.burst(),
        _ => l.limit,
    };
    let vms = vms.max(1);
    let share = capacity.div_ceil(vms).max(1) as f64;
    let per_ms = l.limit as f64 / vms as f64 / l.window_ms().max(1) as f64;
    (share, per_ms)
}

/// The per-worker fallback of `failure_mode: local`: token buckets with this VM's share of
/// each limit's capacity and rate (see [`super::share`]), keyed like Redis would be. Bounded
/// like the deny cache.
#[derive(Debug)]
pub struct LocalLimiter {
    buckets: HashMap<String, Vec<TokenBucket>>,
    /// VMs sharing each limit.
    vms: u64,
}

impl Default for LocalLimiter {
    fn default() -> LocalLimiter {
        LocalLimiter {
            buckets: HashMap::new(),
            vms: 1,
        }
    }
}

pub const LOCAL_LIMITER_MAX_KEYS: usize = 10_000;

impl LocalLimiter {
    /// How many VMs share each limit from now on (at least 1).
    pub fn set_vms(&mut self, vms: u64) {
        self.vms = vms.max(1);
    }

    /// Decides one request; like the script, a denial consumes nothing.
    pub fn decide(&mut self, identity: &str, limits: &[LimitRule], now_ms: u64) -> Decision {
        let vms = self.vms;
        if !self.buckets.contains_key(identity) && self.buckets.len() >= LOCAL_LIMITER_MAX_KEYS {
            // Drop buckets that have refilled completely: they equal fresh ones.
            self.buckets.retain(|_, bs| {
                bs.iter().zip(limits).any(|(b, l)| {
                    let (cap, per_ms) = bucket_shape(l, vms);
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
                .map(|l| TokenBucket::full(bucket_shape(l, vms).0, now_ms))
                .collect()
        });
        let mut statuses = Vec::with_capacity(limits.len());
        let mut allowed = true;
        let mut retry_after_ms = 0u64;
        for (b, l) in buckets.iter_mut().zip(limits) {
            let (cap, per_ms) = bucket_shape(l, vms);
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
    fn each_vm_admits_its_share_of_the_limit() {
        let p = policy(r#"{"limits": [{"limit": 10, "window": "60s"}], "failure_mode": "local"}"#);
        for (vms, admitted) in [(1, 10), (2, 5), (3, 4), (4, 3), (40, 1)] {
            let mut l = LocalLimiter::default();
            l.set_vms(vms);
            let n = (0..20)
                .filter(|_| l.decide("a", &p.limits, 0).allowed)
                .count();
            assert_eq!(n, admitted, "{vms} VMs: ceil(10 / {vms}), at least 1");
        }
        // The rate is shared too: with 2 VMs one token every 12s instead of every 6s.
        let mut l = LocalLimiter::default();
        l.set_vms(2);
        while l.decide("a", &p.limits, 0).allowed {}
        assert!(!l.decide("a", &p.limits, 6_000).allowed);
        assert!(l.decide("a", &p.limits, 12_000).allowed);
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
