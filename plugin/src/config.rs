//! The filter's JSON configuration: typed, `deny_unknown_fields`, validated once in
//! `on_configure`. Every problem is reported as a [`ConfigError`] naming the field path and the
//! offending value; the filter refuses a configuration with any problem.
//!
//! Sections are deserialized one by one (`redis`, `client_ip`, each `routes[i]`), so a
//! configuration with mistakes in several places reports each of them, not only the first.
//!
//! Secrets (`redis.token`, `redis.password`, `cache.purge.token`) are the exception to "every
//! error shows the value": their values, and serde messages that would quote them, are replaced
//! by `(redacted)`, since refused configurations end up in the host's logs.

use crate::cache_config::{
    validate_invalidation, validate_policy, validate_settings, CachePolicy, CacheSettings,
    InvalidationConfig,
};
use crate::duration::{format_duration, ConfigDuration};
use crate::event_config::{resolve_events, EventsConfig, EventsSpec, RouteEventsSpec};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

/// The whole configuration of one filter instance.
#[derive(Clone, Debug)]
pub struct Config {
    pub redis: RedisConfig,
    pub client_ip: ClientIpConfig,
    pub routes: Vec<Route>,
    /// Request events, resolved per route (see [`crate::event_config`]).
    pub events: EventsConfig,
    /// Filter-wide cache settings (see [`crate::cache_config`]).
    pub cache: CacheSettings,
}

impl Config {
    /// The route a request line matches: the first in order (`path` without its query).
    pub fn route_for(&self, path: &str, method: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.matcher.matches(path, method))
    }
}

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
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Relay,
    RedisCall,
}

/// Per-VM circuit breaker: after `failures` consecutive failed calls, no Redis calls for
/// `cooldown`, then one probe.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    pub cooldown: ConfigDuration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_breaker_failures(),
            cooldown: default_breaker_cooldown(),
        }
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

/// One route: a match and the policies applied to requests that match it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    #[serde(default)]
    pub rate_limit: Option<RateLimitPolicy>,
    /// Overrides the top-level `events` for this route (see [`crate::event_config`]).
    #[serde(default)]
    pub events: Option<RouteEventsSpec>,
    /// The route's response cache (see [`crate::cache_config`]).
    #[serde(default)]
    pub cache: Option<CachePolicy>,
    /// Honour purge directives in the upstream's responses (2xx only).
    #[serde(default)]
    pub invalidation: Option<InvalidationConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact path (without the query string).
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Methods the route applies to; empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
}

impl RouteMatch {
    /// True when a request's path (query string already removed) and method match.
    pub fn matches(&self, path: &str, method: &str) -> bool {
        let path_ok = match (&self.path, &self.prefix) {
            (Some(exact), _) => path == exact,
            (None, Some(prefix)) => path.starts_with(prefix.as_str()),
            (None, None) => false,
        };
        path_ok && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }
}

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
}

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

fn default_redis_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(200)
}
fn default_key_prefix() -> String {
    "krowoc:".to_string()
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> ConfigDuration {
    ConfigDuration::from_millis(5_000)
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

impl RedisConfig {
    /// The Envoy cluster Redis calls go to.
    pub fn cluster(&self) -> &str {
        match (&self.cluster, self.transport) {
            (Some(c), _) => c,
            (None, Transport::Relay) => "redis_relay",
            (None, Transport::RedisCall) => "redis",
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
        }
    }
}

/// One problem in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `routes[0].rate_limit.limits[1].window`; `.` for the document itself.
    pub path: String,
    /// The offending value as JSON (shortened), or `(missing)`.
    pub value: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at {} (value {}): {}",
            self.path, self.value, self.message
        )
    }
}

const MAX_VALUE_CHARS: usize = 120;
const MAX_KEY_PREFIX_BYTES: usize = 64;
const MAX_NAME_BYTES: usize = 64;
const MAX_LIMITS_PER_ROUTE: usize = 16;
const MAX_KEY_PARTS: usize = 8;
const MAX_WINDOW_MS: u64 = 30 * 24 * 3_600_000;
const MAX_LIMIT: u64 = 1_000_000_000;
const MAX_TRUSTED_HOPS: u32 = 16;

/// Fields whose values are secrets, as error paths name them.
const SECRET_FIELDS: &[&str] = &["redis.token", "redis.password", "cache.purge.token"];
/// Objects that hold secrets: an unknown field in one may be a misspelt secret.
const SECRET_HOLDERS: &[&str] = &["redis", "cache.purge"];
/// What an error line shows instead of a secret.
const REDACTED: &str = "(redacted)";

fn is_secret(path: &str) -> bool {
    SECRET_FIELDS.contains(&path)
}

/// A copy of the document with every secret's value replaced, for showing parts of it.
fn without_secrets(root: &Value) -> Value {
    let mut shown = root.clone();
    for secret in SECRET_FIELDS {
        let mut cur = Some(&mut shown);
        for key in secret.split('.') {
            cur = cur.and_then(|v| v.get_mut(key));
        }
        if let Some(v) = cur {
            *v = Value::String(REDACTED.into());
        }
    }
    shown
}

/// serde's messages quote the value they got (`invalid type: integer `5`, expected a string`);
/// for a secret only what was expected is kept.
fn without_value(message: &str) -> String {
    match (message.split_once(':'), message.rsplit_once(", expected ")) {
        (Some((what, _)), Some((_, expected))) => format!("{what}, expected {expected}"),
        _ => "not an accepted value".to_string(),
    }
}

/// Renders a JSON value for an error line, shortened to a readable length.
fn render_value(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "(missing)".to_string();
    };
    let text = v.to_string();
    if text.chars().count() > MAX_VALUE_CHARS {
        let short: String = text.chars().take(MAX_VALUE_CHARS).collect();
        format!("{short}…")
    } else {
        text
    }
}

/// Collects problems with the path and value of each.
pub(crate) struct Problems<'a> {
    /// The document with its secrets redacted ([`without_secrets`]).
    root: &'a Value,
    list: Vec<ConfigError>,
}

impl Problems<'_> {
    /// Records a problem at `path` (segments like `routes`, `0`, `name`), reading the value from
    /// the document so the line shows what the user wrote (a secret shows as `(redacted)`).
    pub(crate) fn at(&mut self, path: &[PathSeg<'_>], message: impl Into<String>) {
        let path_text = render_path(path);
        let value = if is_secret(&path_text) {
            REDACTED.to_string()
        } else {
            render_value(lookup(self.root, path))
        };
        self.list.push(ConfigError {
            path: path_text,
            value,
            message: message.into(),
        });
    }

    /// Records a problem without showing the value at `path`.
    fn at_redacted(&mut self, path: &[PathSeg<'_>], message: String) {
        self.list.push(ConfigError {
            path: render_path(path),
            value: REDACTED.to_string(),
            message,
        });
    }
}

#[derive(Clone, Debug)]
pub(crate) enum PathSeg<'a> {
    Key(&'a str),
    KeyOwned(String),
    Index(usize),
}

fn render_path(path: &[PathSeg<'_>]) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let mut out = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => push_key(&mut out, k),
            PathSeg::KeyOwned(k) => push_key(&mut out, k),
            PathSeg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn push_key(out: &mut String, key: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(key);
}

fn lookup<'v>(root: &'v Value, path: &[PathSeg<'_>]) -> Option<&'v Value> {
    let mut cur = root;
    for seg in path {
        cur = match seg {
            PathSeg::Key(k) => cur.get(*k)?,
            PathSeg::KeyOwned(k) => cur.get(k.as_str())?,
            PathSeg::Index(i) => cur.get(*i)?,
        };
    }
    Some(cur)
}

/// Deserializes one section, reporting a failure with its full path.
fn section<T: serde::de::DeserializeOwned>(
    problems: &mut Problems<'_>,
    base: &[PathSeg<'_>],
    value: &Value,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(err) => {
            let mut path: Vec<PathSeg<'_>> = base.to_vec();
            for seg in err.path().iter() {
                match seg {
                    serde_path_to_error::Segment::Seq { index } => {
                        path.push(PathSeg::Index(*index))
                    }
                    serde_path_to_error::Segment::Map { key } => {
                        path.push(PathSeg::KeyOwned(key.clone()))
                    }
                    serde_path_to_error::Segment::Enum { variant } => {
                        path.push(PathSeg::KeyOwned(variant.clone()))
                    }
                    serde_path_to_error::Segment::Unknown => {}
                }
            }
            let message = strip_position(&err.inner().to_string());
            let path_text = render_path(&path);
            let parent = path_text.rsplit_once('.').map_or("", |(parent, _)| parent);
            if is_secret(&path_text) {
                problems.at_redacted(&path, without_value(&message));
            } else if SECRET_HOLDERS.contains(&parent) && message.starts_with("unknown field") {
                // The message names only the field; its value may be a secret under a typo.
                problems.at_redacted(&path, message);
            } else {
                problems.at(&path, message);
            }
            None
        }
    }
}

/// serde_json appends " at line L column C", meaningless for a value deserialized from a tree.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

const TOP_LEVEL_FIELDS: &[&str] = &["redis", "client_ip", "routes", "events", "cache"];

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
            events: EventsConfig::default(),
            cache: CacheSettings::default(),
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
    let mut problems = Problems {
        root: &shown,
        list: Vec::new(),
    };
    let Some(object) = root.as_object() else {
        problems.at(&[], "the configuration must be a JSON object");
        return Err(problems.list);
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
                let found = validate_settings(&mut c);
                report_cache_problems(&mut problems, &[PathSeg::Key("cache")], found);
                c
            })
        }
        None => Some(CacheSettings::default()),
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
        validate_redis(&mut problems, redis);
    }
    if let Some(client_ip) = &client_ip {
        if client_ip.trusted_hops > MAX_TRUSTED_HOPS {
            problems.at(
                &[PathSeg::Key("client_ip"), PathSeg::Key("trusted_hops")],
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            );
        }
    }
    validate_routes(&mut problems, &mut routes);
    let events = match (&redis, &events_spec) {
        (Some(redis), Some(spec)) => Some(resolve_events(
            &mut problems,
            spec.as_ref(),
            routes.iter().map(|(i, r)| (*i, r.events.as_ref())),
            redis,
        )),
        _ => None,
    };
    let routes = routes.into_iter().map(|(_, r)| r).collect();

    match (redis, client_ip, events, cache) {
        (Some(redis), Some(client_ip), Some(events), Some(cache)) if problems.list.is_empty() => {
            Ok(Config {
                redis,
                client_ip,
                routes,
                events,
                cache,
            })
        }
        _ => Err(problems.list),
    }
}

fn validate_redis(p: &mut Problems<'_>, redis: &RedisConfig) {
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
}

/// Route names and limit names go into metric names and header fields: keep them simple.
fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
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

/// An HTTP token (RFC 9110 `tchar`s): header names, methods. Callers add their own length caps.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn validate_routes(p: &mut Problems<'_>, routes: &mut [(usize, Route)]) {
    let mut names = HashSet::new();
    for (i, route) in routes.iter_mut() {
        let i = *i;
        let base = [PathSeg::Key("routes"), PathSeg::Index(i)];
        let path = |rest: &[PathSeg<'static>]| -> Vec<PathSeg<'static>> {
            let mut v = base.to_vec();
            v.extend_from_slice(rest);
            v
        };
        if !is_simple_name(&route.name) {
            p.at(
                &path(&[PathSeg::Key("name")]),
                format!("must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 _ - ."),
            );
        } else if !names.insert(route.name.clone()) {
            p.at(
                &path(&[PathSeg::Key("name")]),
                "a route of this name already exists",
            );
        }
        let m = &route.matcher;
        match (&m.path, &m.prefix) {
            (Some(_), Some(_)) => p.at(
                &path(&[PathSeg::Key("match")]),
                "give either `path` or `prefix`, not both",
            ),
            (None, None) => p.at(
                &path(&[PathSeg::Key("match")]),
                "give `path` (exact) or `prefix`",
            ),
            (Some(v), None) | (None, Some(v)) => {
                if !v.starts_with('/') || v.contains('?') || v.contains('#') {
                    let field = if m.path.is_some() { "path" } else { "prefix" };
                    p.at(
                        &path(&[PathSeg::Key("match"), PathSeg::Key(field)]),
                        "must start with '/' and contain no '?' or '#'",
                    );
                }
            }
        }
        for (j, method) in m.methods.iter().enumerate() {
            if !is_token(method) || method.bytes().any(|b| b.is_ascii_lowercase()) {
                p.at(
                    &path(&[
                        PathSeg::Key("match"),
                        PathSeg::Key("methods"),
                        PathSeg::Index(j),
                    ]),
                    "must be an upper-case HTTP method such as GET",
                );
            }
        }
        if let Some(rl) = route.rate_limit.as_mut() {
            let rl_path = path(&[PathSeg::Key("rate_limit")]);
            validate_rate_limit(p, &rl_path, rl);
        }
        if let Some(cache) = route.cache.as_mut() {
            let found = validate_policy(cache);
            report_cache_problems(p, &path(&[PathSeg::Key("cache")]), found);
        }
        if let Some(inv) = route.invalidation.as_mut() {
            let found = validate_invalidation(inv);
            report_cache_problems(p, &path(&[PathSeg::Key("invalidation")]), found);
        }
    }
}

/// Records the cache section's problems under `base`.
fn report_cache_problems(
    p: &mut Problems<'_>,
    base: &[PathSeg<'static>],
    found: Vec<crate::cache_config::Problem>,
) {
    for problem in found {
        let mut path = base.to_vec();
        path.extend(problem.path.iter().map(|f| match f {
            crate::cache_config::Field::Key(k) => PathSeg::Key(k),
            crate::cache_config::Field::Index(i) => PathSeg::Index(*i),
        }));
        p.at(&path, problem.message);
    }
}

fn validate_rate_limit(p: &mut Problems<'_>, base: &[PathSeg<'static>], rl: &mut RateLimitPolicy) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(cfg.redis.breaker.cooldown.as_millis(), 5000);
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
