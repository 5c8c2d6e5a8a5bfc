//! The filter's JSON configuration: typed, `deny_unknown_fields`, validated once in
//! `on_configure`. Every problem is reported as a [`ConfigError`] naming the field path and the
//! offending value; the filter refuses a configuration with any problem.
//!
//! Sections are deserialized one by one (`redis`, `client_ip`, each `routes[i]`), so a
//! configuration with mistakes in several places reports each of them, not only the first.
//!
//! Secrets (`redis.token`, `redis.password`, `cache.purge.token`) are the exception to "every
//! error shows the value": they show as `(redacted)` (see [`problems`]).
//!
//! Sections: [`redis`], [`routes`], [`rate_limit`], [`cache`], [`events`]; durations are read
//! by [`duration`]; every problem goes through [`problems`].

pub mod cache;
pub mod duration;
pub mod events;
pub mod problems;
pub mod rate_limit;
pub mod redis;
pub mod routes;

pub use problems::ConfigError;
pub use rate_limit::{
    Algorithm, FailureMode, HeaderStyle, KeyPart, LimitRule, MissingKey, RateLimitPolicy,
};
pub use redis::{BreakerConfig, RedisConfig, Transport};
pub use routes::{Route, RouteIndex, RouteMatch};

use cache::{validate_settings, CacheSettings};
use events::{resolve_events, EventsConfig, EventsSpec};
use problems::{section, without_secrets, PathSeg, Problems};
use serde::Deserialize;
use serde_json::Value;

const MAX_TRUSTED_HOPS: u32 = 16;

/// The whole configuration of one filter instance.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis: RedisConfig,
    pub client_ip: ClientIpConfig,
    pub routes: Vec<Route>,
    /// `routes` by what they match.
    pub route_index: RouteIndex,
    /// Request events, resolved per route (see [`events`]).
    pub events: EventsConfig,
    /// Filter-wide cache settings (see [`cache`]).
    pub cache: CacheSettings,
    /// Every response carries `x-krowoc-edge: <version>` (off by default: it costs a header
    /// write per response and tells clients the filter's version).
    pub version_header: bool,
}

impl Config {
    /// The route a request line matches: the first in order (`path` without its query).
    pub fn route_for(&self, path: &str, method: &str) -> Option<usize> {
        self.route_index.route_for(&self.routes, path, method)
    }
}

/// Which address is "the client".
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    /// Number of proxies in front of this one whose `X-Forwarded-For` entries are trusted;
    /// 0 means the downstream connection's address.
    #[serde(default)]
    pub trusted_hops: u32,
}

const TOP_LEVEL_FIELDS: &[&str] = &[
    "redis",
    "client_ip",
    "routes",
    "events",
    "cache",
    "version_header",
];

/// Parses and validates a configuration. An empty document means every default and no routes.
pub fn parse_config(bytes: &[u8]) -> Result<Config, Vec<ConfigError>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![ConfigError {
            path: ".".into(),
            value: "(bytes)".into(),
            message: format!("configuration is not UTF-8: {e}"),
        }]
    })?;
    if text.trim().is_empty() {
        return Ok(Config {
            redis: RedisConfig::default(),
            client_ip: ClientIpConfig::default(),
            routes: Vec::new(),
            route_index: RouteIndex::default(),
            events: EventsConfig::default(),
            cache: CacheSettings::default(),
            version_header: false,
        });
    }
    let root: Value = serde_json::from_str(text).map_err(|e| {
        vec![ConfigError {
            path: ".".into(),
            // Unparsed text cannot be told apart from its secrets; serde's message has the position.
            value: "(not shown)".into(),
            message: format!("configuration is not valid JSON: {e}"),
        }]
    })?;
    let shown = without_secrets(&root);
    let mut problems = Problems::new(&shown);
    let Some(object) = root.as_object() else {
        problems.at(&[], "the configuration must be a JSON object");
        return Err(problems.into_list());
    };
    for key in object.keys() {
        if !TOP_LEVEL_FIELDS.contains(&key.as_str()) {
            problems.at(
                &[PathSeg::KeyOwned(key.clone())],
                format!(
                    "unknown field `{key}`, expected one of {}",
                    TOP_LEVEL_FIELDS.join(", ")
                ),
            );
        }
    }

    let redis = match object.get("redis") {
        Some(v) => section::<RedisConfig>(&mut problems, &[PathSeg::Key("redis")], v),
        None => Some(RedisConfig::default()),
    };
    let client_ip = match object.get("client_ip") {
        Some(v) => section::<ClientIpConfig>(&mut problems, &[PathSeg::Key("client_ip")], v),
        None => Some(ClientIpConfig::default()),
    };
    let events_spec = match object.get("events") {
        Some(v) => section::<EventsSpec>(&mut problems, &[PathSeg::Key("events")], v).map(Some),
        None => Some(None),
    };
    let cache = match object.get("cache") {
        Some(v) => {
            section::<CacheSettings>(&mut problems, &[PathSeg::Key("cache")], v).map(|mut c| {
                validate_settings(&mut problems, &[PathSeg::Key("cache")], &mut c);
                c
            })
        }
        None => Some(CacheSettings::default()),
    };
    let version_header = match object.get("version_header") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problems.at(&[PathSeg::Key("version_header")], "must be true or false");
            false
        }
    };
    // Routes that deserialized, with their index in the document (for error paths).
    let mut routes: Vec<(usize, Route)> = Vec::new();
    match object.get("routes") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = [PathSeg::Key("routes"), PathSeg::Index(i)];
                if let Some(r) = section::<Route>(&mut problems, &at, item) {
                    routes.push((i, r));
                }
            }
        }
        Some(_) => {
            problems.at(&[PathSeg::Key("routes")], "`routes` must be an array");
        }
    }

    if let Some(redis) = &redis {
        redis::validate_redis(&mut problems, redis);
    }
    if let Some(client_ip) = &client_ip {
        if client_ip.trusted_hops > MAX_TRUSTED_HOPS {
            problems.at(
                &[PathSeg::Key("client_ip"), PathSeg::Key("trusted_hops")],
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            );
        }
    }
    routes::validate_routes(&mut problems, &mut routes);
    let events = match (&redis, &events_spec) {
        (Some(redis), Some(spec)) => Some(resolve_events(
            &mut problems,
            spec.as_ref(),
            routes.iter().map(|(i, r)| (*i, r.events.as_ref())),
            redis,
        )),
        _ => None,
    };
    let routes: Vec<Route> = routes.into_iter().map(|(_, r)| r).collect();
    let route_index = RouteIndex::new(&routes);

    match (redis, client_ip, events, cache) {
        (Some(redis), Some(client_ip), Some(events), Some(cache)) if problems.is_empty() => {
            Ok(Config {
                redis,
                client_ip,
                routes,
                route_index,
                events,
                cache,
                version_header,
            })
        }
        _ => Err(problems.into_list()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use problems::MAX_VALUE_CHARS;

    fn errors(json: &str) -> Vec<ConfigError> {
        parse_config(json.as_bytes()).expect_err("configuration should be refused")
    }

    fn one_error(json: &str) -> ConfigError {
        let errs = errors(json);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs.into_iter().next().expect("one error")
    }

    #[test]
    fn empty_configuration_means_defaults_and_no_routes() {
        for doc in ["", "  ", "{}"] {
            let cfg = parse_config(doc.as_bytes()).expect("defaults");
            assert!(cfg.routes.is_empty());
            assert_eq!(cfg.redis.transport, Transport::Relay);
            assert_eq!(cfg.redis.cluster(), "redis_relay");
            assert_eq!(cfg.redis.authority(), "redis_relay");
            assert_eq!(cfg.redis.timeout.as_millis(), 200);
            assert_eq!(cfg.redis.key_prefix, "krowoc:");
            assert_eq!(cfg.redis.breaker.failures, 5);
            assert_eq!(cfg.redis.breaker.cooldown.as_millis(), 1000);
            assert_eq!(cfg.redis.breaker.probe_interval_ms(), 100);
            assert_eq!(cfg.client_ip.trusted_hops, 0);
        }
    }

    #[test]
    fn full_configuration_parses_with_defaults_filled_in() {
        let cfg = parse_config(
            br#"{
              "redis": {"transport": "redis_call", "username": "u", "password": "p",
                        "timeout": "150ms", "key_prefix": "edge:", "database": 2,
                        "breaker": {"failures": 3, "cooldown": "2s"}},
              "client_ip": {"trusted_hops": 1},
              "routes": [
                {"name": "rate-limited", "match": {"path": "/api/rate-limited", "methods": ["GET"]},
                 "rate_limit": {"limits": [{"limit": 5, "window": "60s"}]}},
                {"name": "api", "match": {"prefix": "/api/"},
                 "rate_limit": {"limits": [{"limit": 10, "window": "1s", "algorithm": "gcra", "burst": 20},
                                           {"limit": 1000, "window": "1h", "algorithm": "sliding_window"}],
                                "key": ["client_ip", {"header": "X-Api-Key"}, {"query": "user_id"}, "path"],
                                "missing_key": "skip", "headers": "both", "status": 503,
                                "body": {"error": "slow down"}, "shadow": true, "failure_mode": "local",
                                "deny_cache": false}}
              ]
            }"#,
        )
        .expect("valid");
        assert_eq!(cfg.redis.cluster(), "redis");
        assert_eq!(cfg.redis.database, 2);
        let rl = cfg.routes[0].rate_limit.as_ref().expect("policy");
        assert_eq!(rl.limits[0].name(), "per_1m");
        assert_eq!(rl.limits[0].algorithm, Algorithm::SlidingLog);
        assert_eq!(rl.key, vec![KeyPart::ClientIp]);
        assert_eq!(rl.status, 429);
        assert_eq!(rl.headers, HeaderStyle::Draft);
        assert_eq!(rl.failure_mode, FailureMode::Allow);
        assert!(rl.deny_cache && !rl.shadow);
        let rl = cfg.routes[1].rate_limit.as_ref().expect("policy");
        assert_eq!(rl.limits[0].burst(), 20);
        assert_eq!(rl.limits[1].name(), "per_1h");
        assert_eq!(rl.key[1], KeyPart::Header("x-api-key".into()));
        assert_eq!(rl.missing_key, MissingKey::Skip);
        assert!(rl.headers.draft() && rl.headers.legacy());
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let e = one_error(r#"{"redis": {}, "routs": []}"#);
        assert_eq!(e.path, "routs");
        assert_eq!(e.value, "[]");
        assert!(e.message.contains("unknown field `routs`"), "{e}");
    }

    #[test]
    fn unknown_nested_field_is_named_with_its_path_and_value() {
        let e = one_error(r#"{"routes": [{"name": "a", "match": {"pth": "/x"}}]}"#);
        assert_eq!(e.path, "routes[0].match.pth");
        assert_eq!(e.value, "\"/x\"");
        assert!(e.message.contains("unknown field `pth`"), "{e}");
        let e = one_error(r#"{"redis": {"breaker": {"failures": 1, "cooldwn": "1s"}}}"#);
        assert_eq!(e.path, "redis.breaker.cooldwn");
    }

    #[test]
    fn bad_duration_names_field_and_value() {
        let e = one_error(
            r#"{"routes": [{"name": "a", "match": {"path": "/a"},
                "rate_limit": {"limits": [{"limit": 5, "window": "60 seconds"}]}}]}"#,
        );
        assert_eq!(e.path, "routes[0].rate_limit.limits[0].window");
        assert_eq!(e.value, "\"60 seconds\"");
        assert!(e.message.contains("invalid duration"), "{e}");
        let e = one_error(r#"{"redis": {"timeout": 5}}"#);
        assert_eq!(e.path, "redis.timeout");
        assert_eq!(e.value, "5");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let e = one_error(r#"{"redis": {"transport": "tcp"}}"#);
        assert_eq!(e.path, "redis.transport");
        assert_eq!(e.value, "\"tcp\"");
        assert!(e.message.contains("unknown variant `tcp`"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_once() {
        let errs = errors(
            r#"{"redis": {"timeout": "0ms", "key_prefix": "a{b}", "breaker": {"failures": 0}},
                "client_ip": {"trusted_hops": 99},
                "routes": [
                  {"name": "a", "match": {"path": "api"}},
                  {"name": "a", "match": {"prefix": "/b", "methods": ["get"]},
                   "rate_limit": {"limits": [{"limit": 0, "window": "0s", "burst": 3}], "key": [], "status": 99}},
                  {"name": "c", "match": {"path": "/c"}, "cache": {}}
                ]}"#,
        );
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "redis.timeout",
            "redis.key_prefix",
            "redis.breaker.failures",
            "client_ip.trusted_hops",
            "routes[2].cache",
        ] {
            assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
        }
        // routes[2] failed to deserialize; the routes that did are still checked.
        for expected in [
            "routes[0].match.path",
            "routes[1].name",
            "routes[1].rate_limit.status",
        ] {
            assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
        }
        let route2 = paths.iter().filter(|p| p.starts_with("routes[2]")).count();
        assert_eq!(route2, 1, "{paths:?}");
        let e = errs
            .iter()
            .find(|e| e.path == "redis.key_prefix")
            .expect("prefix error");
        assert_eq!(e.value, "\"a{b}\"");
    }

    #[test]
    fn route_level_problems_are_each_reported() {
        let errs = errors(
            r#"{"routes": [
                  {"name": "a", "match": {"path": "api"}},
                  {"name": "a", "match": {"prefix": "/b", "methods": ["get"]},
                   "rate_limit": {"limits": [{"limit": 0, "window": "0s", "burst": 3}], "key": [], "status": 99}}
                ]}"#,
        );
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "routes[0].match.path",
                "routes[1].name",
                "routes[1].match.methods[0]",
                "routes[1].rate_limit.limits[0].limit",
                "routes[1].rate_limit.limits[0].window",
                "routes[1].rate_limit.limits[0].burst",
                "routes[1].rate_limit.key",
                "routes[1].rate_limit.status",
            ]
        );
        assert_eq!(errs[0].value, "\"api\"");
        assert_eq!(errs[2].value, "\"get\"");
        assert_eq!(errs[7].value, "99");
    }

    #[test]
    fn transport_specific_fields_are_refused_on_the_other_transport() {
        let e = one_error(r#"{"redis": {"transport": "relay", "password": "x"}}"#);
        assert_eq!(e.path, "redis.password");
        let e = one_error(r#"{"redis": {"transport": "redis_call", "token": "t"}}"#);
        assert_eq!(e.path, "redis.token");
    }

    #[test]
    fn sync_is_for_fixed_windows_longer_than_its_interval() {
        let route = |rl: &str| {
            format!(
                r#"{{"routes": [{{"name": "r", "match": {{"prefix": "/"}}, "rate_limit": {rl}}}]}}"#
            )
        };
        let ok = route(
            r#"{"limits": [{"limit": 10, "window": "1s", "algorithm": "fixed_window"}], "sync": "100ms"}"#,
        );
        let cfg = parse_config(ok.as_bytes()).expect("valid");
        let sync = cfg.routes[0].rate_limit.as_ref().and_then(|p| p.sync);
        assert_eq!(sync.map(|d| d.as_millis()), Some(100));
        let e = one_error(&route(
            r#"{"limits": [{"limit": 10, "window": "1s"}], "sync": "100ms"}"#,
        ));
        assert_eq!(e.path, "routes[0].rate_limit.limits[0].algorithm");
        assert!(e.message.contains("fixed_window"), "{e}");
        let e = one_error(&route(
            r#"{"limits": [{"limit": 10, "window": "50ms", "algorithm": "fixed_window"}], "sync": "100ms"}"#,
        ));
        assert_eq!(e.path, "routes[0].rate_limit.sync");
        let e = one_error(&route(
            r#"{"limits": [{"limit": 10, "window": "1s", "algorithm": "fixed_window"}], "sync": "1ms"}"#,
        ));
        assert_eq!(e.path, "routes[0].rate_limit.sync");
    }

    #[test]
    fn the_version_header_is_opt_in() {
        assert!(!parse_config(b"{}").expect("valid").version_header);
        let cfg = parse_config(br#"{"version_header": true}"#).expect("valid");
        assert!(cfg.version_header);
        let e = one_error(r#"{"version_header": "yes"}"#);
        assert_eq!(e.path, "version_header");
    }

    #[test]
    fn max_in_flight_is_for_the_relay_and_bounded() {
        let cfg = parse_config(br#"{"redis": {"max_in_flight": 4}}"#).expect("valid");
        assert_eq!(cfg.redis.max_in_flight(), 4);
        let cfg = parse_config(b"{}").expect("valid");
        assert_eq!(cfg.redis.max_in_flight(), redis::DEFAULT_MAX_IN_FLIGHT);
        let cfg = parse_config(br#"{"redis": {"transport": "redis_call"}}"#).expect("valid");
        assert_eq!(cfg.redis.max_in_flight(), 0);
        let e = one_error(r#"{"redis": {"max_in_flight": 5000}}"#);
        assert_eq!(e.path, "redis.max_in_flight");
        assert!(e.message.contains("1024"), "{e}");
        let e = one_error(r#"{"redis": {"transport": "redis_call", "max_in_flight": 2}}"#);
        assert_eq!(e.path, "redis.max_in_flight");
        assert!(e.message.contains("relay"), "{e}");
        let e = one_error(r#"{"redis": {"max_in_flight": -1}}"#);
        assert_eq!(e.path, "redis.max_in_flight");
    }

    #[test]
    fn a_probe_interval_longer_than_the_cooldown_is_refused() {
        let e = one_error(r#"{"redis": {"breaker": {"probe_interval": "2s", "cooldown": "1s"}}}"#);
        assert_eq!(e.path, "redis.breaker.probe_interval");
        assert!(e.message.contains("cooldown"), "{e}");
        let e = one_error(r#"{"redis": {"breaker": {"probe_interval": "0ms"}}}"#);
        assert_eq!(e.path, "redis.breaker.probe_interval");
        // Unset, it follows a short cool-down.
        let cfg = parse_config(br#"{"redis": {"breaker": {"cooldown": "40ms"}}}"#).expect("valid");
        assert_eq!(cfg.redis.breaker.probe_interval_ms(), 40);
        let cfg =
            parse_config(br#"{"redis": {"breaker": {"probe_interval": "250ms"}}}"#).expect("valid");
        assert_eq!(cfg.redis.breaker.probe_interval_ms(), 250);
    }

    #[test]
    fn duplicate_limit_names_are_refused() {
        let e = one_error(
            r#"{"routes": [{"name": "a", "match": {"path": "/a"},
                "rate_limit": {"limits": [{"limit": 5, "window": "1m"}, {"limit": 9, "window": "60s"}]}}]}"#,
        );
        assert_eq!(e.path, "routes[0].rate_limit.limits[1].name");
        assert!(e.message.contains("per_1m"), "{e}");
    }

    #[test]
    fn non_object_and_non_json_are_refused() {
        assert_eq!(one_error("[1]").path, ".");
        assert!(one_error("{").message.contains("not valid JSON"));
        assert!(one_error(r#"{"routes": {}}"#).message.contains("array"));
        assert!(parse_config(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn error_line_names_path_and_value() {
        let e = one_error(r#"{"redis": {"transport": "tcp"}}"#);
        let line = e.to_string();
        assert!(
            line.contains("redis.transport") && line.contains("\"tcp\""),
            "{line}"
        );
    }

    #[test]
    fn keys_a_plain_path_cannot_show_are_quoted() {
        // Found by the fuzzer: an empty key made an empty path.
        let e = one_error(r#"{"": 1}"#);
        assert_eq!(e.path, r#"[""]"#);
        let e = one_error(r#"{"routes": [{"name": "a", "match": {"prefix": "/"}, "a.b c": 1}]}"#);
        assert_eq!(e.path, r#"routes[0]["a.b c"]"#);
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = "x".repeat(1000);
        let e = one_error(&format!(r#"{{"redis": {{"key_prefix": "{long}"}}}}"#));
        assert!(
            e.value.chars().count() <= MAX_VALUE_CHARS + 1,
            "{}",
            e.value
        );
    }

    /// Every error line of `json`, which must be refused.
    fn error_lines(json: &str) -> Vec<String> {
        errors(json).iter().map(ToString::to_string).collect()
    }

    fn assert_absent(secret: &str, json: &str) -> Vec<String> {
        let lines = error_lines(json);
        for line in &lines {
            assert!(!line.contains(secret), "{secret:?} shown in: {line}");
        }
        lines
    }

    #[test]
    fn relay_token_values_never_appear_in_error_lines() {
        let lines = assert_absent(
            "sekret-relay-token",
            r#"{"redis": {"transport": "redis_call", "token": "sekret-relay-token"}}"#,
        );
        assert_eq!(
            lines,
            vec!["invalid configuration at redis.token (value (redacted)): only used with transport `relay`"]
        );
        assert_absent(
            "sekret relay token",
            r#"{"redis": {"token": "sekret relay token"}}"#,
        );
        let lines = assert_absent("987654321", r#"{"redis": {"token": 987654321}}"#);
        assert_eq!(
            lines,
            vec!["invalid configuration at redis.token (value (redacted)): invalid type, expected a string"]
        );
        assert_absent("sekret-typo", r#"{"redis": {"tokn": "sekret-typo"}}"#);
    }

    #[test]
    fn redis_password_values_never_appear_in_error_lines() {
        let lines = assert_absent(
            "sekret-password",
            r#"{"redis": {"transport": "relay", "username": "edge", "password": "sekret-password"}}"#,
        );
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("redis.username") && l.contains("\"edge\"")),
            "the user name is no secret: {lines:?}"
        );
        assert_absent(
            "sekret-in-a-list",
            r#"{"redis": {"transport": "redis_call", "password": ["sekret-in-a-list"]}}"#,
        );
        assert_absent(
            "sekret-password",
            r#"{"redis": {"transport": "redis_call", "pasword": "sekret-password"}}"#,
        );
    }

    #[test]
    fn purge_token_values_never_appear_in_error_lines() {
        let lines = assert_absent(
            "sekret-short",
            r#"{"cache": {"purge": {"path": "/_purge", "token": "sekret-short"}}}"#,
        );
        assert_eq!(
            lines,
            vec!["invalid configuration at cache.purge.token (value (redacted)): must be 16 to 256 visible ASCII characters"]
        );
        assert_absent(
            "12345678901234567890",
            r#"{"cache": {"purge": {"path": "/_purge", "token": 12345678901234567890}}}"#,
        );
        // `path` missing: the error is about the purge object, shown without its token.
        let lines = assert_absent(
            "sekret-but-long-enough",
            r#"{"cache": {"purge": {"token": "sekret-but-long-enough"}}}"#,
        );
        assert!(lines[0].contains(r#""token":"(redacted)""#), "{lines:?}");
        assert_absent(
            "sekret-but-long-enough",
            r#"{"cache": {"purge": {"path": "/_purge", "tokne": "sekret-but-long-enough"}}}"#,
        );
    }

    #[test]
    fn unparseable_configuration_text_is_not_echoed() {
        let lines = assert_absent(
            "sekret-relay-token",
            r#"{"redis": {"token": "sekret-relay-token" "timeout": "1s"}}"#,
        );
        assert!(lines[0].contains("not valid JSON"), "{lines:?}");
        assert!(lines[0].contains("line 1 column"), "{lines:?}");
    }

    #[test]
    fn route_match_checks_path_and_method() {
        let m = RouteMatch {
            path: Some("/api/x".into()),
            prefix: None,
            methods: vec!["GET".into()],
        };
        assert!(m.matches("/api/x", "GET"));
        assert!(!m.matches("/api/x", "POST"));
        assert!(!m.matches("/api/xy", "GET"));
        let m = RouteMatch {
            path: None,
            prefix: Some("/api/".into()),
            methods: vec![],
        };
        assert!(m.matches("/api/anything", "DELETE"));
        assert!(!m.matches("/apx", "GET"));
    }
}
