//! Rate limiting: the [`RateLimiter`] a request's phases call, the script call for a request and
//! its reply as a [`Decision`], the in-VM deny cache, and the verdict (pass with headers, or a
//! local response) for every way a decision can come about. Its parts: [`keys`] (the Redis keys
//! of a request), [`local`] (the token buckets of `failure_mode: local`), [`fields`] (the
//! response fields).

use crate::config::{Config, FailureMode, LimitRule, RateLimitPolicy};
use crate::host;
use crate::http::LocalResponse;
use crate::redis::client::{Owner, RedisClient, Wire};
use crate::redis::error::RedisError;
use crate::redis::resp::{Command, Reply};
use crate::redis::scripts::{Script, RATE_LIMIT_LUA};
use fields::{rate_limit_headers, retry_after_secs};
use keys::{derive_keys, KeyDecision, KeyGroup};
use proxy_wasm::types::LogLevel;
use std::collections::HashMap;

pub mod fields;
pub mod keys;
pub mod local;
pub mod share;
pub mod sync;

pub use keys::RequestFacts;
pub use local::LocalLimiter;
pub use share::Share;
pub use sync::SyncLimits;

/// The state of one limit after a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    /// Units left after this request (when denied: before it).
    pub remaining: u64,
    /// Milliseconds until the limit gives a unit back.
    pub reset_ms: u64,
    /// This limit refused the request.
    pub over: bool,
}

/// The decision for one request over all limits of its route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// 0 when allowed; else milliseconds until every violated limit admits again.
    pub retry_after_ms: u64,
    /// In the policy's order.
    pub limits: Vec<LimitStatus>,
}

impl Decision {
    /// Names of the limits that refused the request.
    pub fn violated<'a>(&self, limits: &'a [LimitRule]) -> Vec<&'a str> {
        limits
            .iter()
            .zip(&self.limits)
            .filter(|(_, s)| s.over)
            .map(|(l, _)| l.name())
            .collect()
    }
}

/// ARGV of `rate_limit.lua`: n, then algorithm, limit, window_ms, burst per limit.
pub fn script_args(policy: &RateLimitPolicy) -> Vec<String> {
    let mut args = vec![policy.limits.len().to_string()];
    for l in &policy.limits {
        args.push(l.algorithm.as_str().to_string());
        args.push(l.limit.to_string());
        args.push(l.window_ms().to_string());
        args.push(l.burst().to_string());
    }
    args
}

/// The EVALSHA for a request, and the EVAL to send if Redis answers NOSCRIPT.
pub fn script_call(
    script: &Script,
    policy: &RateLimitPolicy,
    keys: &KeyGroup,
) -> (Command, Command) {
    let args = script_args(policy);
    (
        script.evalsha(&keys.keys, &args),
        script.eval(&keys.keys, &args),
    )
}

/// Reads the script's reply `{allowed, retry_after_ms, (remaining, reset_ms, over) * n}`.
pub fn parse_decision(reply: &Reply, n_limits: usize) -> Result<Decision, RedisError> {
    let items = match reply {
        Reply::Array(items) => items,
        Reply::Error(e) => return Err(RedisError::server(e.clone())),
        other => {
            return Err(RedisError::protocol(format!(
                "rate_limit script answered {other:?}, not an array"
            )))
        }
    };
    if items.len() != 2 + 3 * n_limits {
        return Err(RedisError::protocol(format!(
            "rate_limit script answered {} values for {n_limits} limits",
            items.len()
        )));
    }
    let num = |i: usize| -> Result<u64, RedisError> {
        match items[i].as_int() {
            Some(v) if v >= 0 => Ok(v as u64),
            _ => Err(RedisError::protocol(format!(
                "rate_limit script value {i} is {:?}, not a non-negative integer",
                items[i]
            ))),
        }
    };
    let allowed = match num(0)? {
        0 => false,
        1 => true,
        other => {
            return Err(RedisError::protocol(format!(
                "rate_limit script answered allowed={other}"
            )))
        }
    };
    let mut limits = Vec::with_capacity(n_limits);
    for i in 0..n_limits {
        let base = 2 + 3 * i;
        limits.push(LimitStatus {
            remaining: num(base)?,
            reset_ms: num(base + 1)?,
            over: num(base + 2)? == 1,
        });
    }
    Ok(Decision {
        allowed,
        retry_after_ms: if allowed { 0 } else { num(1)? },
        limits,
    })
}

/// Keys known to be over their limit, denied inside the VM until the retry time without a
/// Redis call. Bounded: when full, expired entries are dropped, then new ones are not cached.
#[derive(Debug, Default)]
pub struct DenyCache {
    entries: HashMap<String, (u64, Decision)>,
}

pub const DENY_CACHE_MAX_ENTRIES: usize = 10_000;

impl DenyCache {
    pub fn insert(&mut self, identity: &str, now_ms: u64, decision: &Decision) {
        if decision.allowed || decision.retry_after_ms == 0 {
            return;
        }
        if self.entries.len() >= DENY_CACHE_MAX_ENTRIES {
            self.entries.retain(|_, (until, _)| *until > now_ms);
            if self.entries.len() >= DENY_CACHE_MAX_ENTRIES {
                return;
            }
        }
        let until = now_ms.saturating_add(decision.retry_after_ms);
        self.entries
            .insert(identity.to_string(), (until, decision.clone()));
    }

    /// The cached denial with its times moved on to `now_ms`, if still in force.
    pub fn lookup(&mut self, identity: &str, now_ms: u64) -> Option<Decision> {
        let (until, stored) = self.entries.get(identity)?;
        if *until <= now_ms {
            self.entries.remove(identity);
            return None;
        }
        let left = until - now_ms;
        let elapsed = stored.retry_after_ms.saturating_sub(left);
        let mut d = stored.clone();
        d.retry_after_ms = left;
        for s in &mut d.limits {
            s.reset_ms = s.reset_ms.saturating_sub(elapsed);
        }
        Some(d)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How a rate-limit verdict came about, for the per-route counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    Allowed,
    Denied,
    ShadowDenied,
    /// Redis failed and the failure mode let the request through (`allow`, or `local` admitted).
    FallbackAllowed,
    /// Redis failed and the failure mode refused it (`deny`, or `local` refused).
    FallbackDenied,
    /// A missing key with `missing_key: skip`.
    Skipped,
}

/// The rate limiter's answer for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Some: answer the request with this instead of forwarding it.
    pub deny: Option<LocalResponse>,
    /// Fields to add to the upstream's response when the request passes.
    pub response_headers: Vec<(String, String)>,
    pub tally: Tally,
    /// The denial came from the in-VM deny cache.
    pub from_deny_cache: bool,
    /// The decision came without Redis because Redis failed (or the breaker is open).
    pub redis_error: bool,
}

/// The body of a denial: the configured JSON, or a default naming the violated limits.
pub fn deny_body(route: &str, policy: &RateLimitPolicy, decision: &Decision) -> Vec<u8> {
    match &policy.body {
        Some(body) => body.to_string().into_bytes(),
        None => serde_json::json!({
            "error": "rate_limited",
            "message": "Too many requests",
            "route": route,
            "violated_policies": decision.violated(&policy.limits),
            "retry_after": retry_after_secs(decision.retry_after_ms),
        })
        .to_string()
        .into_bytes(),
    }
}

/// The verdict for a decision (from Redis, the deny cache, or the local buckets).
pub fn verdict_for_decision(
    route: &str,
    policy: &RateLimitPolicy,
    decision: &Decision,
    fallback: bool,
) -> Verdict {
    let headers = rate_limit_headers(policy.headers, &policy.limits, decision);
    let (deny, tally, response_headers) = if decision.allowed {
        let tally = if fallback {
            Tally::FallbackAllowed
        } else {
            Tally::Allowed
        };
        let mut h = headers;
        h.retain(|(k, _)| k != "retry-after");
        (None, tally, h)
    } else if policy.shadow {
        (None, Tally::ShadowDenied, Vec::new())
    } else {
        let mut h = headers;
        h.push(("content-type".to_string(), "application/json".to_string()));
        let tally = if fallback {
            Tally::FallbackDenied
        } else {
            Tally::Denied
        };
        (
            Some(LocalResponse {
                status: u32::from(policy.status),
                headers: h,
                body: deny_body(route, policy, decision),
            }),
            tally,
            Vec::new(),
        )
    };
    Verdict {
        deny,
        response_headers: if policy.shadow {
            Vec::new()
        } else {
            response_headers
        },
        tally,
        from_deny_cache: false,
        redis_error: fallback,
    }
}

/// The verdict when Redis could not decide: by the policy's failure mode.
pub fn verdict_for_failure(
    route: &str,
    policy: &RateLimitPolicy,
    identity: &str,
    local: &mut LocalLimiter,
    now_ms: u64,
) -> Verdict {
    match policy.failure_mode {
        FailureMode::Allow => Verdict {
            deny: None,
            response_headers: Vec::new(),
            tally: Tally::FallbackAllowed,
            from_deny_cache: false,
            redis_error: true,
        },
        FailureMode::Deny if policy.shadow => Verdict {
            deny: None,
            response_headers: Vec::new(),
            tally: Tally::ShadowDenied,
            from_deny_cache: false,
            redis_error: true,
        },
        FailureMode::Deny => Verdict {
            deny: Some(LocalResponse {
                status: 503,
                headers: vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    ("retry-after".to_string(), "1".to_string()),
                ],
                body: serde_json::json!({
                    "error": "rate_limit_unavailable",
                    "message": "The rate limiter cannot reach its store; try again shortly",
                    "route": route,
                })
                .to_string()
                .into_bytes(),
            }),
            response_headers: Vec::new(),
            tally: Tally::FallbackDenied,
            from_deny_cache: false,
            redis_error: true,
        },
        FailureMode::Local => {
            let decision = local.decide(identity, &policy.limits, now_ms);
            verdict_for_decision(route, policy, &decision, true)
        }
    }
}

/// The rate limiter of one VM: the script, the deny cache, the local buckets and how many VMs
/// share them.
#[derive(Debug)]
pub struct RateLimiter {
    script: Script,
    deny_cache: DenyCache,
    local: LocalLimiter,
    share: Share,
    sync: SyncLimits,
}

/// A request's rate limit while Redis decides.
#[derive(Debug)]
pub struct RateLimitCall {
    /// The client within the route (the deny cache's and the local buckets' key).
    identity: String,
    /// Redis' answer, once it came.
    answer: Option<Result<Decision, RedisError>>,
}

/// How a request's rate limit starts.
#[derive(Debug)]
pub enum Start {
    /// A keyed value is missing and the policy says `missing_key: skip`.
    Skipped,
    /// Decided without waiting: from the deny cache, or by the failure mode when Redis cannot
    /// be called.
    Decided(Verdict),
    /// The script call is out.
    Asked(RateLimitCall),
}

impl RateLimiter {
    /// The rate limiter for `config`; `member` names this VM in the registry of VMs sharing
    /// the limits (unique across gateways).
    pub fn new(config: &Config, member: String) -> RateLimiter {
        let local_mode = config.routes.iter().any(|r| {
            r.rate_limit
                .as_ref()
                .is_some_and(|p| p.failure_mode == FailureMode::Local)
        });
        RateLimiter {
            script: Script::new("rate_limit", RATE_LIMIT_LUA),
            deny_cache: DenyCache::default(),
            local: LocalLimiter::default(),
            share: Share::new(&config.redis.key_prefix, member, local_mode),
            sync: SyncLimits::new(config.redis.transport),
        }
    }

    /// The shortest `sync` interval of any route (the tick must come that often).
    pub fn sync_interval_ms(config: &Config) -> Option<u64> {
        config
            .routes
            .iter()
            .filter_map(|r| r.rate_limit.as_ref()?.sync)
            .map(|d| d.as_millis())
            .min()
    }

    /// On the tick: the registry of VMs sharing the limits, and the `sync` counters, when it
    /// is time.
    pub fn tick(&mut self, client: &mut RedisClient, wire: &mut dyn Wire, now_ms: u64) {
        self.share.tick(client, wire, now_ms);
        self.sync.tick(client, wire, now_ms);
    }

    /// The answer to a sync of the `sync` counters.
    pub fn on_sync_answer(&mut self, id: u32, now_ms: u64, result: Result<Reply, RedisError>) {
        self.sync.on_answer(id, now_ms, result);
    }

    /// The registry's answer.
    pub fn on_registry_answer(&mut self, result: Result<Reply, RedisError>) {
        self.share.on_answer(result);
        self.local.set_vms(self.share.vms());
    }

    /// Starts request `ctx`'s decision on route `route` (keys under `prefix`): the deny cache
    /// answers a known denial, else the script call goes out.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        route: &str,
        prefix: &str,
        policy: &RateLimitPolicy,
        facts: &RequestFacts<'_>,
    ) -> Start {
        let group = match derive_keys(route, prefix, policy, facts) {
            KeyDecision::Skip => return Start::Skipped,
            KeyDecision::Limit(group) => group,
        };
        if let Some(interval) = policy.sync {
            if let Some(decision) = self
                .sync
                .decide(&group, policy, interval.as_millis(), now_ms)
            {
                return Start::Decided(verdict_for_decision(route, policy, &decision, false));
            }
        }
        if policy.failure_mode == FailureMode::Local {
            self.share.note_request(now_ms);
        }
        if policy.deny_cache && !policy.shadow {
            if let Some(decision) = self.deny_cache.lookup(&group.identity, now_ms) {
                return Start::Decided(verdict_for_cached_denial(route, policy, &decision));
            }
        }
        let (evalsha, eval) = script_call(&self.script, policy, &group);
        match client.call(wire, now_ms, Owner::RateLimit(ctx), &evalsha, Some(eval)) {
            Ok(_) => Start::Asked(RateLimitCall {
                identity: group.identity,
                answer: None,
            }),
            Err(e) => {
                log_undecided(route, &e);
                Start::Decided(verdict_for_failure(
                    route,
                    policy,
                    &group.identity,
                    &mut self.local,
                    now_ms,
                ))
            }
        }
    }

    /// Redis answered the call (or it failed).
    pub fn on_answer(
        call: &mut RateLimitCall,
        policy: &RateLimitPolicy,
        result: Result<Reply, RedisError>,
    ) {
        call.answer = Some(result.and_then(|r| parse_decision(&r, policy.limits.len())));
    }

    /// The verdict on Redis' answer (or, when it failed, by the failure mode); None while
    /// Redis has not answered.
    pub fn decide(
        &mut self,
        now_ms: u64,
        route: &str,
        policy: &RateLimitPolicy,
        call: &mut RateLimitCall,
    ) -> Option<Verdict> {
        match call.answer.take()? {
            Ok(decision) => {
                if !decision.allowed && policy.deny_cache && !policy.shadow {
                    self.deny_cache.insert(&call.identity, now_ms, &decision);
                }
                Some(verdict_for_decision(route, policy, &decision, false))
            }
            Err(e) => {
                log_undecided(route, &e);
                Some(verdict_for_failure(
                    route,
                    policy,
                    &call.identity,
                    &mut self.local,
                    now_ms,
                ))
            }
        }
    }
}

fn log_undecided(route: &str, e: &RedisError) {
    // Debug level: during an outage every request fails the same way; the breaker logs once.
    host::log(
        LogLevel::Debug,
        &format!("krowoc-edge: route {route}: rate limit undecided: {e}"),
    );
}

/// The verdict for a request the deny cache already knows to be over its limit.
pub fn verdict_for_cached_denial(
    route: &str,
    policy: &RateLimitPolicy,
    decision: &Decision,
) -> Verdict {
    let mut v = verdict_for_decision(route, policy, decision, false);
    v.from_deny_cache = true;
    v
}

/// The verdict when `missing_key: skip` applies.
pub fn verdict_skipped() -> Verdict {
    Verdict {
        deny: None,
        response_headers: Vec::new(),
        tally: Tally::Skipped,
        from_deny_cache: false,
        redis_error: false,
    }
}

/// A route's policy from its JSON, read and validated as the configuration is (for tests).
#[cfg(test)]
fn test_policy(json: &str) -> RateLimitPolicy {
    let route = format!(r#"{{"name": "r", "match": {{"prefix": "/"}}, "rate_limit": {json}}}"#);
    let cfg = crate::config::parse_config(format!(r#"{{"routes": [{route}]}}"#).as_bytes())
        .expect("valid policy");
    cfg.routes[0].rate_limit.clone().expect("policy")
}

#[cfg(test)]
mod tests {
    use super::test_policy as policy;
    use super::*;

    #[test]
    fn script_arguments_list_every_limit() {
        let p = policy(
            r#"{"limits": [{"limit": 10, "window": "1s", "algorithm": "gcra", "burst": 20},
                          {"limit": 1000, "window": "1h", "algorithm": "sliding_window"}]}"#,
        );
        assert_eq!(
            script_args(&p),
            vec![
                "2",
                "gcra",
                "10",
                "1000",
                "20",
                "sliding_window",
                "1000",
                "3600000",
                "1000"
            ]
        );
    }

    #[test]
    fn script_reply_parses_into_a_decision() {
        let reply = Reply::Array(vec![
            Reply::Int(0),
            Reply::Int(1500),
            Reply::Int(3),
            Reply::Int(200),
            Reply::Int(0),
            Reply::Int(0),
            Reply::Int(1500),
            Reply::Int(1),
        ]);
        let d = parse_decision(&reply, 2).expect("decision");
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1500);
        assert_eq!(
            d.limits,
            vec![
                LimitStatus {
                    remaining: 3,
                    reset_ms: 200,
                    over: false
                },
                LimitStatus {
                    remaining: 0,
                    reset_ms: 1500,
                    over: true
                }
            ]
        );
    }

    #[test]
    fn malformed_script_replies_are_protocol_errors() {
        let bad = [
            Reply::Int(1),
            Reply::Array(vec![Reply::Int(1), Reply::Int(0)]),
            Reply::Array(vec![
                Reply::Int(7),
                Reply::Int(0),
                Reply::Int(1),
                Reply::Int(1),
                Reply::Int(0),
            ]),
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Int(0),
                Reply::Int(-1),
                Reply::Int(1),
                Reply::Int(0),
            ]),
            Reply::Array(vec![
                Reply::Int(1),
                Reply::Int(0),
                Reply::Nil,
                Reply::Int(1),
                Reply::Int(0),
            ]),
        ];
        for r in bad {
            assert!(
                parse_decision(&r, 1).expect_err("bad").is_protocol(),
                "{r:?}"
            );
        }
        let e = parse_decision(&Reply::Error("NOSCRIPT x".into()), 1).expect_err("server error");
        assert!(e.is_noscript());
    }

    fn denial(retry_ms: u64) -> Decision {
        Decision {
            allowed: false,
            retry_after_ms: retry_ms,
            limits: vec![LimitStatus {
                remaining: 0,
                reset_ms: retry_ms,
                over: true,
            }],
        }
    }

    #[test]
    fn deny_cache_holds_until_retry_time() {
        let mut c = DenyCache::default();
        c.insert("r:a", 1000, &denial(5000));
        let d = c.lookup("r:a", 3000).expect("still denied");
        assert_eq!(d.retry_after_ms, 3000);
        assert_eq!(d.limits[0].reset_ms, 3000);
        assert!(c.lookup("r:b", 3000).is_none());
        assert!(c.lookup("r:a", 6000).is_none());
        assert!(c.is_empty(), "expired entry removed");
        let allowed = Decision {
            allowed: true,
            retry_after_ms: 0,
            limits: vec![],
        };
        c.insert("r:c", 0, &allowed);
        assert!(c.is_empty());
    }

    #[test]
    fn deny_cache_is_bounded() {
        let mut c = DenyCache::default();
        for i in 0..DENY_CACHE_MAX_ENTRIES + 50 {
            c.insert(&format!("k{i}"), 0, &denial(1000));
        }
        assert_eq!(c.len(), DENY_CACHE_MAX_ENTRIES);
        // Once the old ones expired, new ones fit again.
        c.insert("late", 2000, &denial(1000));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn verdicts_follow_shadow_and_failure_modes() {
        let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}], "headers": "both"}"#);
        let d = denial(30_000);
        let v = verdict_for_decision("r", &p, &d, false);
        let resp = v.deny.expect("denied");
        assert_eq!(resp.status, 429);
        assert!(resp
            .headers
            .iter()
            .any(|(k, v)| k == "retry-after" && v == "30"));
        let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("json body");
        assert_eq!(body["violated_policies"][0], "per_1m");
        assert_eq!(v.tally, Tally::Denied);

        let shadow = policy(r#"{"limits": [{"limit": 5, "window": "60s"}], "shadow": true}"#);
        let v = verdict_for_decision("r", &shadow, &d, false);
        assert!(v.deny.is_none() && v.response_headers.is_empty());
        assert_eq!(v.tally, Tally::ShadowDenied);

        let custom = policy(
            r#"{"limits": [{"limit": 5, "window": "60s"}], "status": 503, "body": {"x": 1}}"#,
        );
        let resp = verdict_for_decision("r", &custom, &d, false)
            .deny
            .expect("denied");
        assert_eq!(resp.status, 503);
        assert_eq!(resp.body, br#"{"x":1}"#.to_vec());

        let mut local = LocalLimiter::default();
        let v = verdict_for_failure("r", &p, "id", &mut local, 0);
        assert!(v.deny.is_none() && v.redis_error);
        assert_eq!(v.tally, Tally::FallbackAllowed);
        let deny = policy(r#"{"limits": [{"limit": 5, "window": "60s"}], "failure_mode": "deny"}"#);
        let v = verdict_for_failure("r", &deny, "id", &mut local, 0);
        assert_eq!(v.deny.expect("503").status, 503);
        assert_eq!(v.tally, Tally::FallbackDenied);
        let loc = policy(r#"{"limits": [{"limit": 1, "window": "60s"}], "failure_mode": "local"}"#);
        let v = verdict_for_failure("r", &loc, "id", &mut local, 0);
        assert_eq!(v.tally, Tally::FallbackAllowed);
        assert!(!v.response_headers.is_empty());
        let v = verdict_for_failure("r", &loc, "id", &mut local, 0);
        assert_eq!(v.tally, Tally::FallbackDenied);
        assert_eq!(v.deny.expect("429").status, 429);
    }

    #[test]
    fn allowed_verdict_carries_headers_without_retry_after() {
        let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}]}"#);
        let d = Decision {
            allowed: true,
            retry_after_ms: 0,
            limits: vec![LimitStatus {
                remaining: 4,
                reset_ms: 60_000,
                over: false,
            }],
        };
        let v = verdict_for_decision("r", &p, &d, false);
        assert!(v.deny.is_none());
        assert_eq!(
            v.response_headers,
            vec![
                (
                    "ratelimit-policy".to_string(),
                    "\"per_1m\";q=5;w=60".to_string()
                ),
                ("ratelimit".to_string(), "\"per_1m\";r=4;t=60".to_string()),
            ]
        );
    }
}
