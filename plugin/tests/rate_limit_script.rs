//! The rate-limit Lua script against a real redis-server, called exactly as the filter calls
//! it (same script source, same arguments, same reply parsing), plus the command layer's
//! EVALSHA → NOSCRIPT → EVAL path against real Redis.

use krowoc_plugin::config::{parse_config, RateLimitPolicy};
use krowoc_plugin::ratelimit::keys::{derive_keys, KeyDecision, KeyGroup, RequestFacts};
use krowoc_plugin::ratelimit::{parse_decision, script_args, Decision};
use krowoc_plugin::redis::client::{Owner, RawReply, RedisClient, Wire};
use krowoc_plugin::redis::error::RedisError;
use krowoc_plugin::redis::resp::{decode_replies, Reply};
use krowoc_plugin::redis::scripts::{Script, RATE_LIMIT_LUA};
use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};
use testkit::RedisServer;

fn policy(json: &str) -> RateLimitPolicy {
    let cfg = parse_config(
        format!(
            r#"{{"routes": [{{"name": "t", "match": {{"prefix": "/"}}, "rate_limit": {json}}}]}}"#
        )
        .as_bytes(),
    )
    .expect("valid policy");
    cfg.routes[0].rate_limit.clone().expect("policy")
}

fn keys_for(policy: &RateLimitPolicy, client: &str) -> KeyGroup {
    let facts = RequestFacts {
        client_ip: Some(client.to_string()),
        path: "/",
        ..Default::default()
    };
    match derive_keys("t", "test:", policy, &facts) {
        KeyDecision::Limit(g) => g,
        KeyDecision::Skip => panic!("no keys"),
    }
}

/// One decision, via EVAL (so no script loading is needed).
fn decide(redis: &RedisServer, policy: &RateLimitPolicy, keys: &KeyGroup) -> Decision {
    let script = Script::new("rate_limit", RATE_LIMIT_LUA);
    let args = script_args(policy);
    let mut cmd: Vec<String> = vec![
        "EVAL".into(),
        script.source.into(),
        keys.keys.len().to_string(),
    ];
    cmd.extend(keys.keys.iter().cloned());
    cmd.extend(args);
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let raw = redis.try_command(&refs).expect("redis reachable");
    let reply = decode_replies(&raw, 1).expect("one reply").remove(0);
    parse_decision(&reply, policy.limits.len()).unwrap_or_else(|e| panic!("script failed: {e}"))
}

/// `n` requests at once (one connection each, released together); their decisions.
fn burst(
    redis: &RedisServer,
    policy: &RateLimitPolicy,
    keys: &KeyGroup,
    n: usize,
) -> Vec<Decision> {
    let redis_port = redis.port;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (p, k, b) = (policy.clone(), keys.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                let view = RedisView(redis_port);
                b.wait();
                view.decide(&p, &k)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

/// A handle usable from threads (RedisServer itself is owned by the test).
struct RedisView(u16);

impl RedisView {
    fn decide(&self, policy: &RateLimitPolicy, keys: &KeyGroup) -> Decision {
        use std::io::{Read, Write};
        let script = Script::new("rate_limit", RATE_LIMIT_LUA);
        let mut cmd: Vec<String> = vec![
            "EVAL".into(),
            script.source.into(),
            keys.keys.len().to_string(),
        ];
        cmd.extend(keys.keys.iter().cloned());
        cmd.extend(script_args(policy));
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.0)).expect("connect");
        s.write_all(&testkit::encode_command(&refs)).expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).expect("read");
            assert!(n > 0, "redis closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(mut replies) = decode_replies(&buf, 1) {
                let reply = replies.remove(0);
                return parse_decision(&reply, policy.limits.len()).expect("decision");
            }
        }
    }
}

fn admitted(ds: &[Decision]) -> usize {
    ds.iter().filter(|d| d.allowed).count()
}

#[test]
fn sliding_log_admits_exactly_the_limit_under_concurrency_and_denials_do_not_consume() {
    let redis = RedisServer::start();
    let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    let ds = burst(&redis, &p, &k, 9);
    assert_eq!(admitted(&ds), 5);
    let mut remaining: Vec<u64> = ds
        .iter()
        .filter(|d| d.allowed)
        .map(|d| d.limits[0].remaining)
        .collect();
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        vec![0, 1, 2, 3, 4],
        "each admission saw the one before"
    );
    for d in ds.iter().filter(|d| !d.allowed) {
        assert!(d.limits[0].over);
        assert!(
            d.retry_after_ms > 59_000 && d.retry_after_ms <= 60_000,
            "{}",
            d.retry_after_ms
        );
    }
    assert_eq!(
        redis.int(&["ZCARD", &k.keys[0]]),
        5,
        "the 4 denied requests left no trace"
    );
    let ttl = redis.int(&["PTTL", &k.keys[0]]);
    assert!(ttl > 59_000 && ttl <= 60_001, "{ttl}");
    // Another client is not affected.
    assert!(decide(&redis, &p, &keys_for(&p, "2.2.2.2")).allowed);
}

#[test]
fn sliding_log_slides_instead_of_resetting() {
    let redis = RedisServer::start();
    let p = policy(r#"{"limits": [{"limit": 3, "window": "1000ms"}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    let t0 = Instant::now();
    assert!(decide(&redis, &p, &k).allowed);
    assert!(decide(&redis, &p, &k).allowed);
    thread::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed()));
    assert!(decide(&redis, &p, &k).allowed, "third at ~500ms");
    let d = decide(&redis, &p, &k);
    assert!(!d.allowed, "fourth within the window");
    // The first decision happens a little after t0 (and Redis rounds its clock), so allow a few
    // milliseconds over 500; a window that reset would say ~1000.
    assert!(
        d.retry_after_ms <= 510,
        "the first two leave at ~1000ms: {}",
        d.retry_after_ms
    );
    thread::sleep(Duration::from_millis(1150).saturating_sub(t0.elapsed()));
    // The first two have left the window; the one from ~500ms has not.
    assert!(decide(&redis, &p, &k).allowed);
    assert!(decide(&redis, &p, &k).allowed);
    let d = decide(&redis, &p, &k);
    assert!(
        !d.allowed,
        "a fixed window would admit a third here; the log still holds the ~500ms one"
    );
    assert!(d.retry_after_ms <= 400, "{}", d.retry_after_ms);
}

#[test]
fn fixed_window_admits_the_limit_per_window_from_the_first_request() {
    let redis = RedisServer::start();
    let p =
        policy(r#"{"limits": [{"limit": 5, "window": "1000ms", "algorithm": "fixed_window"}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    let ds = burst(&redis, &p, &k, 8);
    assert_eq!(admitted(&ds), 5);
    let denied = ds.iter().find(|d| !d.allowed).expect("a denial");
    assert!(denied.retry_after_ms > 0 && denied.retry_after_ms <= 1000);
    assert_eq!(
        redis.cli(&["HGET", &k.keys[0], "c"]),
        "5",
        "denials are not counted"
    );
    thread::sleep(Duration::from_millis(denied.retry_after_ms + 30));
    let ds = burst(&redis, &p, &k, 8);
    assert_eq!(admitted(&ds), 5, "a new window");
}

#[test]
fn sliding_window_admits_the_limit_then_weighs_the_previous_window() {
    let redis = RedisServer::start();
    let p =
        policy(r#"{"limits": [{"limit": 10, "window": "2000ms", "algorithm": "sliding_window"}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    let ds = burst(&redis, &p, &k, 15);
    assert_eq!(admitted(&ds), 10);
    let retry = ds
        .iter()
        .filter(|d| !d.allowed)
        .map(|d| d.retry_after_ms)
        .max()
        .expect("denials");
    assert!(retry > 0 && retry <= 4000, "{retry}");
    // Right after the retry time exactly one more fits (the weight of the previous window
    // dropped by one request's worth), not a whole new window's worth.
    thread::sleep(Duration::from_millis(retry + 20));
    let ds: Vec<Decision> = (0..3).map(|_| decide(&redis, &p, &k)).collect();
    let n = admitted(&ds);
    assert!(
        (1..=2).contains(&n),
        "admitted {n} right after the retry time"
    );
}

#[test]
fn gcra_admits_the_burst_then_one_per_emission_interval() {
    let redis = RedisServer::start();
    let p =
        policy(r#"{"limits": [{"limit": 10, "window": "1s", "algorithm": "gcra", "burst": 4}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    let ds = burst(&redis, &p, &k, 9);
    assert_eq!(admitted(&ds), 4, "the burst");
    let retry = ds
        .iter()
        .filter(|d| !d.allowed)
        .map(|d| d.retry_after_ms)
        .min()
        .expect("denials");
    assert!(
        retry > 0 && retry <= 100,
        "next cell within one 100ms interval: {retry}"
    );
    thread::sleep(Duration::from_millis(retry + 5));
    assert!(decide(&redis, &p, &k).allowed, "one cell came back");
    assert!(!decide(&redis, &p, &k).allowed, "only one");
}

#[test]
fn several_limits_decide_together_and_a_denial_consumes_none() {
    let redis = RedisServer::start();
    let p = policy(
        r#"{"limits": [{"name": "short", "limit": 2, "window": "60s"},
                      {"name": "long", "limit": 100, "window": "1h", "algorithm": "fixed_window"},
                      {"name": "smooth", "limit": 50, "window": "1h", "algorithm": "gcra"}]}"#,
    );
    let k = keys_for(&p, "1.1.1.1");
    assert_eq!(k.keys.len(), 3);
    let a = decide(&redis, &p, &k);
    let b = decide(&redis, &p, &k);
    let c = decide(&redis, &p, &k);
    assert!(a.allowed && b.allowed && !c.allowed);
    assert_eq!(b.limits[1].remaining, 98);
    assert!(c.limits[0].over && !c.limits[1].over && !c.limits[2].over);
    assert_eq!(
        c.limits[1].remaining, 98,
        "the long limit was not charged for the denial"
    );
    assert_eq!(redis.cli(&["HGET", &k.keys[1], "c"]), "2");
    assert_eq!(redis.int(&["ZCARD", &k.keys[0]]), 2);
    // All keys of one request carry one hash tag, so Redis Cluster puts them in one slot
    // (it hashes only what is between the first `{` and the next `}`).
    let tag = |key: &str| -> String {
        let open = key.find('{').expect("hash tag");
        let close = key[open..].find('}').expect("closed tag") + open;
        key[open + 1..close].to_string()
    };
    assert!(
        k.keys.iter().all(|key| tag(key) == k.identity),
        "{:?}",
        k.keys
    );
}

#[test]
fn time_comes_from_redis() {
    let redis = RedisServer::start();
    let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}]}"#);
    let k = keys_for(&p, "1.1.1.1");
    // No clock travels with the call: the arguments are the policy only.
    let args = script_args(&p);
    assert!(
        args.iter()
            .all(|a| a.parse::<u64>().map(|n| n < 1_000_000_000).unwrap_or(true)),
        "{args:?}"
    );
    let time_us = |r: &RedisServer| {
        let t = r.cli(&["TIME"]);
        let mut parts = t.lines().map(|l| l.parse::<u64>().expect("TIME"));
        parts.next().expect("s") * 1_000_000 + parts.next().expect("us")
    };
    let before = time_us(&redis);
    assert!(decide(&redis, &p, &k).allowed);
    let after = time_us(&redis);
    let entry = redis.cli(&["ZRANGE", &k.keys[0], "0", "0", "WITHSCORES"]);
    let score: u64 = entry
        .lines()
        .nth(1)
        .expect("score")
        .parse()
        .expect("integer score");
    assert!(
        before <= score && score <= after,
        "{before} <= {score} <= {after}"
    );
}

#[test]
fn script_sha_matches_redis_and_evalsha_needs_the_script_loaded() {
    let redis = RedisServer::start();
    let rate_limit = Script::new("rate_limit", RATE_LIMIT_LUA);
    let loaded = redis.cli(&["SCRIPT", "LOAD", RATE_LIMIT_LUA]);
    assert_eq!(loaded, rate_limit.sha1);
    redis.cli(&["SCRIPT", "FLUSH"]);
    let raw = redis
        .try_command(&["EVALSHA", &rate_limit.sha1, "0", "0"])
        .expect("reachable");
    let reply = decode_replies(&raw, 1).expect("reply").remove(0);
    assert_eq!(reply.error_prefix(), Some("NOSCRIPT"));
}

/// A wire that sends to a real Redis and keeps each reply until the test hands it back.
struct TcpWire {
    port: u16,
    next: u32,
    replies: HashMap<u32, Vec<u8>>,
}

impl Wire for TcpWire {
    fn send(&mut self, payload: &[u8], _timeout_ms: u64) -> Result<u32, RedisError> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.write_all(payload).expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while decode_replies(&buf, 1).is_err() {
            let n = s.read(&mut chunk).expect("read");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        self.next += 4;
        self.replies.insert(self.next, buf);
        Ok(self.next)
    }
}

#[test]
fn command_layer_falls_back_to_eval_on_noscript_against_real_redis() {
    let redis = RedisServer::start();
    let cfg = parse_config(b"{}").expect("config");
    let mut client = RedisClient::new(&cfg.redis);
    let mut wire = TcpWire {
        port: redis.port,
        next: 3,
        replies: HashMap::new(),
    };
    let rate_limit = Script::new("rate_limit", RATE_LIMIT_LUA);
    let p = policy(r#"{"limits": [{"limit": 1, "window": "60s"}]}"#);
    let k = keys_for(&p, "9.9.9.9");
    let args = script_args(&p);
    let run = |client: &mut RedisClient, wire: &mut TcpWire| -> Decision {
        let token = client
            .call(
                wire,
                0,
                Owner::RateLimit(1),
                &rate_limit.evalsha(&k.keys, &args),
                Some(rate_limit.eval(&k.keys, &args)),
            )
            .expect("sent");
        let mut token = token;
        loop {
            let body = wire.replies.remove(&token).expect("reply kept");
            let before = wire.next;
            match client.on_reply(wire, 0, token, RawReply::RedisCall { status: 0, body }) {
                Some(done) => {
                    let reply: Reply = done.result.expect("script ran");
                    return parse_decision(&reply, 1).expect("decision");
                }
                None => {
                    assert_ne!(wire.next, before, "NOSCRIPT made a second call");
                    token = wire.next;
                }
            }
        }
    };
    assert!(
        run(&mut client, &mut wire).allowed,
        "first call: NOSCRIPT, then EVAL"
    );
    assert_eq!(client.stats.noscript, 1);
    assert!(
        !run(&mut client, &mut wire).allowed,
        "second call: EVALSHA hits the loaded script"
    );
    assert_eq!(client.stats.noscript, 1);
    redis.cli(&["SCRIPT", "FLUSH"]);
    assert!(
        !run(&mut client, &mut wire).allowed,
        "after SCRIPT FLUSH: NOSCRIPT, EVAL, same state"
    );
    assert_eq!(client.stats.noscript, 2);
}

#[test]
fn envoy_yaml_plugin_configuration_is_accepted_with_the_guides_limits() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).expect("envoy/envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let filters = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    let wasm = filters
        .as_sequence()
        .expect("http_filters")
        .iter()
        .find(|f| f["name"].as_str() == Some("envoy.filters.http.wasm"))
        .expect("wasm filter");
    let json = wasm["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .expect("configuration value");
    let cfg = parse_config(json.as_bytes()).unwrap_or_else(|errs| panic!("refused: {errs:#?}"));
    let limit = |path: &str| {
        let route = cfg
            .routes
            .iter()
            .find(|r| r.matcher.matches(path, "GET"))
            .unwrap_or_else(|| panic!("no route for {path}"));
        let rl = route.rate_limit.as_ref().expect("rate limit");
        assert_eq!(rl.limits.len(), 1);
        assert_eq!(rl.key, vec![krowoc_plugin::config::KeyPart::ClientIp]);
        (rl.limits[0].limit, rl.limits[0].window_ms())
    };
    assert_eq!(limit("/api/rate-limited"), (5, 60_000));
    assert_eq!(limit("/api/slow-limited"), (2, 300_000));
}

#[test]
fn the_sync_script_adds_a_vms_units_and_answers_the_shared_count_and_redis_time() {
    use krowoc_plugin::redis::scripts::RATE_LIMIT_SYNC_LUA;
    let redis = RedisServer::start();
    let key = "test:rl:{t:abc}:fixed_window:100:60000:w7";
    let sync = |units: &str| {
        let raw = redis
            .try_command(&["EVAL", RATE_LIMIT_SYNC_LUA, "1", key, units, "60000"])
            .expect("redis reachable");
        match decode_replies(&raw, 1).expect("one reply").remove(0) {
            Reply::Array(items) => (
                items[0].as_int().expect("count"),
                items[1].as_int().expect("time"),
            ),
            other => panic!("{other:?}"),
        }
    };
    let (count, now_ms) = sync("5");
    assert_eq!(count, 5);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!(
        (now_ms - wall).abs() < 5_000,
        "Redis TIME in ms: {now_ms} vs {wall}"
    );
    assert_eq!(sync("3").0, 8, "another VM's units add up");
    assert_eq!(sync("0").0, 8, "a refresh counts nothing");
    let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().expect("pttl");
    assert!(ttl > 60_000 && ttl <= 120_000, "lives two windows: {ttl}");
}
