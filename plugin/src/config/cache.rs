//! The cache's part of the configuration: a route's `cache` policy, a route's `invalidation`
//! header, and the filter-wide `cache` settings (status header names, the purge endpoint).
//! Deserialized by [`super`] with the rest of the document (`deny_unknown_fields`);
//! checked here once, each problem naming its field. Header names are lower-cased during
//! validation, so the request path compares them without case folding.
//!
//! ```json
//! "cache": {"purge": {"path": "/_krowoc/cache/purge", "token": "a-long-random-token"}},
//! "routes": [
//!   {"name": "cached-data", "match": {"path": "/api/cached-data"},
//!    "cache": {"ttl": "60s", "key": {"query": ["user_id"]}, "stale_if_error": "5m"}},
//!   {"name": "invalidate-cache", "match": {"path": "/api/invalidate-cache"}, "invalidation": {}}
//! ]
//! ```
//!
//! A route's `cache` policy:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `ttl` | (required) | freshness of a stored response when the upstream gives none (or `honor_cache_control` is false) |
//! | `methods` | `["GET", "HEAD"]` | methods looked up and stored; each method has its own entries |
//! | `statuses` | `[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]` | statuses stored (never 206 or 304) |
//! | `key.query` | `[]` | query parameters in the key, sorted by name; all others are ignored |
//! | `key.headers` | `[]` | request headers in the key; a response may only `Vary` on these |
//! | `max_body_bytes` | `524288` | larger responses pass unstored; keep it below the relay's `--max-body-bytes` (1 MiB) |
//! | `honor_cache_control` | `true` | obey the upstream's `no-store`, `private`, `no-cache`, `s-maxage`, `max-age`, `Expires`, `stale-while-revalidate`, `stale-if-error`, `must-revalidate` |
//! | `stale_while_revalidate` | `"0s"` | past freshness, serve stale this long while one request refreshes the entry in the background |
//! | `stale_if_error` | `"0s"` | past freshness, serve stale this long when the upstream fails or answers 5xx |
//! | `honor_request_cache_control` | `false` | obey the client's `Cache-Control`: `no-cache` goes upstream and stores the answer instead of serving a stored one (`Cache-Status: fwd=request`), `no-store` bypasses the cache; off, as CDNs do, so clients cannot empty the cache's benefit |
//! | `allow_authorized` | `false` | use the cache for requests with `Authorization`, `Proxy-Authorization` or `Cookie` |
//! | `allow_set_cookie` | `false` | store responses with `Set-Cookie` |
//! | `tag_headers` | `["cache-tag", "surrogate-key"]` | response headers whose values (comma or space separated) tag the entry |
//! | `coalesce.enabled` | `true` | concurrent misses for a key wait for one fill |
//! | `coalesce.lock` | `"10s"` | how long a fill lock holds (and how long an uncacheable answer sends misses straight upstream) |
//! | `coalesce.wait` | `"5s"` | how long a concurrent miss waits for the fill before going upstream (or to a stale copy) |
//!
//! The filter-wide `cache` section:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `x_cache_header` | `"x-cache"` | `HIT`, `MISS`, `STALE`, `BYPASS` or `EXPIRED`; `""`: not sent |
//! | `cache_status_header` | `"cache-status"` | the RFC 9211 field; `""`: not sent |
//! | `name` | `"krowoc"` | this cache's name in `Cache-Status` |
//! | `purge` | off | the purge endpoint: `path` and `token` (16+ characters) required |
//! | `purge.token_header` | `"x-krowoc-purge-token"` | the request header carrying the token (compared in constant time) |
//! | `purge.header` | `"x-krowoc-invalidate"` | the request header carrying the directives |
//!
//! A route's `invalidation`: `{"header": "x-krowoc-invalidate"}` (the default) — purge directives
//! in the upstream's 2xx responses on that route are applied (see [`crate::cache::purge`]).

use super::duration::ConfigDuration;
use super::problems::{PathSeg, Problems};
use serde::Deserialize;

/// A route's response cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    /// Freshness lifetime of a stored response when the upstream gives none (or when
    /// `honor_cache_control` is false).
    pub ttl: ConfigDuration,
    /// Request methods whose responses are looked up and stored; each has its own entries.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Response statuses that are stored.
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
    /// What besides scheme, host, path and method tells entries apart.
    #[serde(default)]
    pub key: CacheKeyConfig,
    /// Larger responses are passed on and not stored.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Obey the upstream's `Cache-Control` (`no-store`, `private`, `no-cache`, `s-maxage`,
    /// `max-age`, `stale-while-revalidate`, `stale-if-error`) and `Expires`.
    #[serde(default = "default_true")]
    pub honor_cache_control: bool,
    /// How long past its freshness an entry is still served while one request refreshes it.
    #[serde(default = "zero")]
    pub stale_while_revalidate: ConfigDuration,
    /// How long past its freshness an entry is served when the upstream fails or answers 5xx.
    #[serde(default = "zero")]
    pub stale_if_error: ConfigDuration,
    /// Obey the request's `no-cache` (go upstream, store the answer) and `no-store` (bypass).
    #[serde(default)]
    pub honor_request_cache_control: bool,
    /// Look up and store for requests carrying `Authorization`, `Proxy-Authorization` or
    /// `Cookie`.
    #[serde(default)]
    pub allow_authorized: bool,
    /// Store responses carrying `Set-Cookie` (the cookie is then served to everyone).
    #[serde(default)]
    pub allow_set_cookie: bool,
    /// Response headers whose values (comma or space separated) tag the entry for purges.
    #[serde(default = "default_tag_headers")]
    pub tag_headers: Vec<String>,
    #[serde(default)]
    pub coalesce: CoalesceConfig,
}

impl CachePolicy {
    pub fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis()
    }

    pub fn caches_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    pub fn caches_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    /// Whether a request header is part of the key (`name` lower case).
    pub fn keys_header(&self, name: &str) -> bool {
        self.key.headers.iter().any(|h| h == name)
    }
}

/// The allow-lists of the cache key. Query parameters outside `query` are ignored (and so
/// cannot split or poison entries); the parameters kept are sorted.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKeyConfig {
    #[serde(default)]
    pub query: Vec<String>,
    #[serde(default)]
    pub headers: Vec<String>,
}

/// Request coalescing: the first miss for a key takes a short Redis lock and goes upstream;
/// concurrent misses for the key (on any gateway) wait up to `wait` for its entry.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long the lock holds if its owner never stores (it crashed, or the upstream hangs).
    #[serde(default = "default_lock")]
    pub lock: ConfigDuration,
    /// How long a concurrent miss waits for the fill before going upstream itself.
    #[serde(default = "default_wait")]
    pub wait: ConfigDuration,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig {
            enabled: true,
            lock: default_lock(),
            wait: default_wait(),
        }
    }
}

/// A route whose upstream responses may carry purge directives (`x-krowoc-invalidate:
/// tag=user:42, route=/api/cached-data`); they are applied only on 2xx responses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidationConfig {
    #[serde(default = "default_invalidation_header")]
    pub header: String,
}

/// The filter-wide `cache` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// `X-Cache: HIT|MISS|STALE|BYPASS|EXPIRED`; empty: not sent.
    #[serde(default = "default_x_cache_header")]
    pub x_cache_header: String,
    /// The RFC 9211 field; empty: not sent.
    #[serde(default = "default_cache_status_header")]
    pub cache_status_header: String,
    /// This cache's name in `Cache-Status`.
    #[serde(default = "default_cache_name")]
    pub name: String,
    /// Off unless given.
    #[serde(default)]
    pub purge: Option<PurgeEndpoint>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            x_cache_header: default_x_cache_header(),
            cache_status_header: default_cache_status_header(),
            name: default_cache_name(),
            purge: None,
        }
    }
}

/// `POST <path>` with `<token_header>: <token>` and the directives in the invalidation header
/// (`x-krowoc-invalidate: tag=user:42`) is answered by the filter after the purge.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeEndpoint {
    pub path: String,
    pub token: String,
    #[serde(default = "default_token_header")]
    pub token_header: String,
    /// The request header carrying the directives.
    #[serde(default = "default_invalidation_header")]
    pub header: String,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}
/// RFC 9110's heuristically cacheable statuses, less 206 (ranges are not cached).
fn default_statuses() -> Vec<u16> {
    vec![200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501]
}
/// Half the relay's default body cap, so a stored response fits in one relay call.
fn default_max_body_bytes() -> u64 {
    512 * 1024
}
fn default_true() -> bool {
    true
}
fn zero() -> ConfigDuration {
    ConfigDuration::from_millis(0)
}
fn default_tag_headers() -> Vec<String> {
    vec!["cache-tag".into(), "surrogate-key".into()]
}
fn default_lock() -> ConfigDuration {
    ConfigDuration::from_millis(10_000)
}
fn default_wait() -> ConfigDuration {
    ConfigDuration::from_millis(5_000)
}
fn default_invalidation_header() -> String {
    "x-krowoc-invalidate".into()
}
fn default_x_cache_header() -> String {
    "x-cache".into()
}
fn default_cache_status_header() -> String {
    "cache-status".into()
}
fn default_cache_name() -> String {
    "krowoc".into()
}
fn default_token_header() -> String {
    "x-krowoc-purge-token".into()
}

const MAX_TTL_MS: u64 = 365 * 24 * 3_600_000;
const MAX_STALE_MS: u64 = 30 * 24 * 3_600_000;
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
const MAX_KEY_ITEMS: usize = 32;
const MAX_TOKEN_HEADER_BYTES: usize = 256;
const MIN_PURGE_TOKEN_BYTES: usize = 16;

/// An HTTP token (RFC 9110 `tchar`s) no longer than a header name may be here.
pub fn is_token(s: &str) -> bool {
    s.len() <= MAX_TOKEN_HEADER_BYTES && super::problems::is_token(s)
}

/// Checks a header-name list and lower-cases it.
fn header_list(p: &mut Problems<'_>, at: &[PathSeg<'static>], names: &mut [String]) {
    if names.len() > MAX_KEY_ITEMS {
        p.at(at, format!("give at most {MAX_KEY_ITEMS} header names"));
    }
    for (i, name) in names.iter_mut().enumerate() {
        if !is_token(name) {
            p.at(
                &[at, &[PathSeg::Index(i)]].concat(),
                "must be a header name (an HTTP token)",
            );
        }
        *name = name.to_ascii_lowercase();
    }
}

/// Checks a route's cache policy; lower-cases its header names.
pub(crate) fn validate_policy(
    p: &mut Problems<'_>,
    base: &[PathSeg<'static>],
    c: &mut CachePolicy,
) {
    let at = |rest: &[PathSeg<'static>]| [base, rest].concat();
    let ttl = c.ttl.as_millis();
    if ttl == 0 || ttl > MAX_TTL_MS {
        p.at(&at(&[PathSeg::Key("ttl")]), "must be between 1ms and 8760h")
    }
    if c.methods.is_empty() || c.methods.len() > 8 {
        p.at(&at(&[PathSeg::Key("methods")]), "give 1 to 8 methods")
    }
    for (i, m) in c.methods.iter().enumerate() {
        if !is_token(m) || m.bytes().any(|b| b.is_ascii_lowercase()) {
            p.at(
                &at(&[PathSeg::Key("methods"), PathSeg::Index(i)]),
                "must be an upper-case HTTP method such as GET",
            )
        }
    }
    if c.statuses.is_empty() {
        p.at(&at(&[PathSeg::Key("statuses")]), "give at least 1 status")
    }
    for (i, s) in c.statuses.iter().enumerate() {
        if !(200..=599).contains(s) || *s == 206 || *s == 304 {
            p.at(
                &at(&[PathSeg::Key("statuses"), PathSeg::Index(i)]),
                "must be an HTTP status between 200 and 599, not 206 or 304",
            )
        }
    }
    if c.key.query.len() > MAX_KEY_ITEMS {
        p.at(
            &at(&[PathSeg::Key("key"), PathSeg::Key("query")]),
            format!("give at most {MAX_KEY_ITEMS} query parameters"),
        )
    }
    for (i, q) in c.key.query.iter().enumerate() {
        if q.is_empty() || q.len() > 256 {
            p.at(
                &at(&[
                    PathSeg::Key("key"),
                    PathSeg::Key("query"),
                    PathSeg::Index(i),
                ]),
                "must be a query parameter name of 1 to 256 bytes",
            )
        }
    }
    header_list(
        p,
        &at(&[PathSeg::Key("key"), PathSeg::Key("headers")]),
        &mut c.key.headers,
    );
    if c.max_body_bytes == 0 || c.max_body_bytes > MAX_BODY_BYTES {
        p.at(
            &at(&[PathSeg::Key("max_body_bytes")]),
            format!("must be between 1 and {MAX_BODY_BYTES}"),
        )
    }
    for (field, d) in [
        ("stale_while_revalidate", c.stale_while_revalidate),
        ("stale_if_error", c.stale_if_error),
    ] {
        if d.as_millis() > MAX_STALE_MS {
            p.at(&at(&[PathSeg::Key(field)]), "must be at most 720h")
        }
    }
    header_list(p, &at(&[PathSeg::Key("tag_headers")]), &mut c.tag_headers);
    let lock = c.coalesce.lock.as_millis();
    if !(100..=600_000).contains(&lock) {
        p.at(
            &at(&[PathSeg::Key("coalesce"), PathSeg::Key("lock")]),
            "must be between 100ms and 10m",
        )
    }
    let wait = c.coalesce.wait.as_millis();
    if wait > 60_000 || wait > lock {
        p.at(
            &at(&[PathSeg::Key("coalesce"), PathSeg::Key("wait")]),
            "must be at most 60s and at most `lock`",
        )
    }
}

/// Checks a policy outside a document (problems' paths start at the policy), for tests.
#[cfg(test)]
pub(crate) fn policy_problems(c: &mut CachePolicy) -> Vec<super::ConfigError> {
    let root = serde_json::Value::Null;
    let mut found = Problems::new(&root);
    validate_policy(&mut found, &[], c);
    found.into_list()
}

/// Checks a route's invalidation header.
pub(crate) fn validate_invalidation(
    p: &mut Problems<'_>,
    base: &[PathSeg<'static>],
    c: &mut InvalidationConfig,
) {
    let at = |rest: &[PathSeg<'static>]| [base, rest].concat();
    if !is_token(&c.header) {
        p.at(
            &at(&[PathSeg::Key("header")]),
            "must be a header name (an HTTP token)",
        )
    }
    c.header = c.header.to_ascii_lowercase();
}

/// Checks the filter-wide settings.
pub(crate) fn validate_settings(
    p: &mut Problems<'_>,
    base: &[PathSeg<'static>],
    c: &mut CacheSettings,
) {
    let at = |rest: &[PathSeg<'static>]| [base, rest].concat();
    for (field, name) in [
        ("x_cache_header", &mut c.x_cache_header),
        ("cache_status_header", &mut c.cache_status_header),
    ] {
        if !name.is_empty() && !is_token(name) {
            p.at(
                &at(&[PathSeg::Key(field)]),
                "must be a header name (an HTTP token), or empty for none",
            )
        }
        *name = name.to_ascii_lowercase();
    }
    if !is_token(&c.name) {
        p.at(
            &at(&[PathSeg::Key("name")]),
            "must be an HTTP token (it is a Cache-Status item)",
        )
    }
    if let Some(purge) = c.purge.as_mut() {
        let at = |f: &'static str| at(&[PathSeg::Key("purge"), PathSeg::Key(f)]);
        if !purge.path.starts_with('/') || purge.path.contains(['?', '#']) || purge.path.len() > 256
        {
            p.at(
                &at("path"),
                "must start with '/', contain no '?' or '#', and be at most 256 bytes",
            )
        }
        if purge.token.len() < MIN_PURGE_TOKEN_BYTES
            || purge.token.len() > MAX_TOKEN_HEADER_BYTES
            || !purge.token.bytes().all(|b| (0x21..0x7f).contains(&b))
        {
            p.at(&at("token"), format!(
                    "must be {MIN_PURGE_TOKEN_BYTES} to {MAX_TOKEN_HEADER_BYTES} visible ASCII characters"
                ))
        }
        for (field, name) in [
            ("token_header", &mut purge.token_header),
            ("header", &mut purge.header),
        ] {
            if !is_token(name) {
                p.at(&at(field), "must be a header name (an HTTP token)")
            }
            *name = name.to_ascii_lowercase();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The paths of the problems `check` finds.
    fn problem_paths(check: impl FnOnce(&mut Problems<'_>)) -> Vec<String> {
        let root = Value::Null;
        let mut p = Problems::new(&root);
        check(&mut p);
        p.into_list().into_iter().map(|e| e.path).collect()
    }

    fn policy(json: &str) -> CachePolicy {
        serde_json::from_str(json).expect("policy deserializes")
    }

    #[test]
    fn policy_defaults_are_the_safe_ones() {
        let mut p = policy(r#"{"ttl": "60s"}"#);
        assert!(problem_paths(|found| validate_policy(found, &[], &mut p)).is_empty());
        assert_eq!(p.ttl_ms(), 60_000);
        assert_eq!(p.methods, vec!["GET", "HEAD"]);
        assert!(p.caches_status(200) && !p.caches_status(206) && !p.caches_status(500));
        assert!(p.key.query.is_empty() && p.key.headers.is_empty());
        assert_eq!(p.max_body_bytes, 512 * 1024);
        assert!(p.honor_cache_control);
        assert_eq!(p.stale_while_revalidate.as_millis(), 0);
        assert_eq!(p.stale_if_error.as_millis(), 0);
        assert!(!p.allow_authorized && !p.allow_set_cookie);
        assert_eq!(p.tag_headers, vec!["cache-tag", "surrogate-key"]);
        assert!(p.coalesce.enabled);
        assert_eq!(p.coalesce.lock.as_millis(), 10_000);
        assert_eq!(p.coalesce.wait.as_millis(), 5_000);
        let s = CacheSettings::default();
        assert_eq!(
            (s.x_cache_header.as_str(), s.cache_status_header.as_str()),
            ("x-cache", "cache-status")
        );
        assert!(s.purge.is_none(), "the purge endpoint is off by default");
    }

    #[test]
    fn header_names_are_lower_cased_and_checked() {
        let mut p = policy(
            r#"{"ttl": "1s", "key": {"headers": ["Accept-Language", "bad header"]}, "tag_headers": ["X-Tags"]}"#,
        );
        let root = Value::Null;
        let mut found = Problems::new(&root);
        validate_policy(&mut found, &[], &mut p);
        let problems: Vec<(String, String)> = found
            .into_list()
            .into_iter()
            .map(|e| (e.path, e.message))
            .collect();
        assert_eq!(
            problems,
            vec![(
                "key.headers[1]".to_string(),
                "must be a header name (an HTTP token)".to_string()
            )]
        );
        assert_eq!(p.key.headers[0], "accept-language");
        assert_eq!(p.tag_headers, vec!["x-tags"]);
    }

    #[test]
    fn bad_values_name_their_fields() {
        let mut p = policy(
            r#"{"ttl": "0s", "methods": ["get"], "statuses": [206], "max_body_bytes": 0,
                "coalesce": {"lock": "1s", "wait": "2s"}}"#,
        );
        assert_eq!(
            problem_paths(|found| validate_policy(found, &[], &mut p)),
            vec![
                "ttl",
                "methods[0]",
                "statuses[0]",
                "max_body_bytes",
                "coalesce.wait",
            ]
        );
    }

    #[test]
    fn purge_endpoint_needs_a_path_and_a_long_token() {
        let mut s: CacheSettings =
            serde_json::from_str(r#"{"purge": {"path": "purge", "token": "short"}}"#)
                .expect("settings");
        assert_eq!(
            problem_paths(|found| validate_settings(found, &[], &mut s)),
            vec!["purge.path", "purge.token"]
        );
        let mut s: CacheSettings = serde_json::from_str(
            r#"{"x_cache_header": "", "purge": {"path": "/_purge", "token": "0123456789abcdef", "token_header": "X-Token"}}"#,
        )
        .expect("settings");
        assert!(problem_paths(|found| validate_settings(found, &[], &mut s)).is_empty());
        let purge = s.purge.expect("purge");
        assert_eq!(purge.token_header, "x-token");
        assert_eq!(purge.header, "x-krowoc-invalidate");
        assert_eq!(s.x_cache_header, "");
    }
}
