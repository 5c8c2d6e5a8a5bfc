//! The HTTP caching rules of the response cache (RFC 9111 as a shared cache applies it, with
//! the policy's safe defaults): whether a request may use the cache, whether a response may be
//! stored and for how long, which of its fields are stored, conditional requests, and the
//! `Age`, `X-Cache` and RFC 9211 `Cache-Status` fields of an answer. Plain functions over
//! header lists (names lower case, as proxies hand them over); no host calls.
//!
//! Cache-Control is parsed by hand: a shared cache acts on a dozen directives with RFC 9111's
//! rules for repeated and malformed ones, and the crates that parse it bring a whole private
//! cache's policy with them.

use crate::config::cache::{CachePolicy, CacheSettings};

pub use crate::http::{first, list_members, parse_http_date, values, Headers};

/// The directives of `Cache-Control` that matter to a shared cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    /// Seconds; an unreadable value counts as 0 (stale), as RFC 9111 advises.
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// The largest delta-seconds a cache considers (RFC 9111 1.2.2: 2^31).
const MAX_DELTA_SECONDS: u64 = 2_147_483_648;

/// Reads `delta-seconds` (digits, possibly quoted); larger values count as 2^31.
fn delta_seconds(v: &str) -> u64 {
    let v = v.trim().trim_matches('"');
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    v.parse::<u64>()
        .unwrap_or(MAX_DELTA_SECONDS)
        .min(MAX_DELTA_SECONDS)
}

impl CacheControl {
    /// Parses every `Cache-Control` line of `headers`. Directive names are case-insensitive;
    /// of a repeated directive the first counts.
    pub fn parse(headers: &Headers) -> CacheControl {
        let mut cc = CacheControl::default();
        for item in list_members(headers, "cache-control") {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v)),
                None => (item, None),
            };
            let seconds = |slot: &mut Option<u64>| {
                if slot.is_none() {
                    *slot = Some(value.map(delta_seconds).unwrap_or(0));
                }
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => cc.no_store = true,
                // The qualified forms (`no-cache="set-cookie"`) are treated as the plain ones:
                // this cache never revalidates, so it does not store such responses at all.
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "public" => cc.public = true,
                "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                "max-age" => seconds(&mut cc.max_age),
                "s-maxage" => seconds(&mut cc.s_maxage),
                "stale-while-revalidate" => seconds(&mut cc.stale_while_revalidate),
                "stale-if-error" => seconds(&mut cc.stale_if_error),
                _ => {}
            }
        }
        cc
    }
}

// ---- requests --------------------------------------------------------------------------------

/// Why a request does not use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// The method is not one the policy caches.
    Method,
    /// `Authorization`, `Proxy-Authorization` or `Cookie` without `allow_authorized`.
    Authorized,
    /// The request's `Cache-Control: no-store` (with `honor_request_cache_control`).
    NoStore,
    /// Redis failed or the breaker is open.
    Redis,
}

impl Bypass {
    /// RFC 9211 `fwd` value and `detail` of the `Cache-Status` entry.
    pub fn forward(self) -> (&'static str, &'static str) {
        match self {
            Bypass::Method => ("method", "method"),
            Bypass::Authorized => ("request", "authorized"),
            Bypass::NoStore => ("request", "no-store"),
            Bypass::Redis => ("bypass", "redis-unavailable"),
        }
    }
}

/// Whether a request may be answered from (and fill) the cache.
pub fn request_bypass(policy: &CachePolicy, method: &str, headers: &Headers) -> Option<Bypass> {
    if !policy.caches_method(method) {
        return Some(Bypass::Method);
    }
    let credentials = ["authorization", "proxy-authorization", "cookie"]
        .iter()
        .any(|name| first(headers, name).is_some());
    if credentials && !policy.allow_authorized {
        return Some(Bypass::Authorized);
    }
    if policy.honor_request_cache_control && request_directives(headers).no_store {
        return Some(Bypass::NoStore);
    }
    None
}

/// What a request's own `Cache-Control` asks of the cache. `Pragma: no-cache` counts as
/// `no-cache` only without a `Cache-Control` field (RFC 9111 5.4).
pub fn request_directives(headers: &Headers) -> CacheControl {
    if first(headers, "cache-control").is_none() {
        let pragma_no_cache =
            list_members(headers, "pragma").any(|m| m.eq_ignore_ascii_case("no-cache"));
        return CacheControl {
            no_cache: pragma_no_cache,
            ..CacheControl::default()
        };
    }
    CacheControl::parse(headers)
}

// ---- responses -------------------------------------------------------------------------------

/// Why a response is not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    Status,
    SetCookie,
    NoStore,
    Private,
    NoCache,
    VaryStar,
    /// `Vary` names a request field the key does not include.
    VaryUnkeyed,
    /// No freshness left (max-age=0, an Expires in the past, or an Age beyond the lifetime).
    Expired,
    TooLarge,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Status => "status",
            NotStored::SetCookie => "set-cookie",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::NoCache => "no-cache",
            NotStored::VaryStar => "vary-star",
            NotStored::VaryUnkeyed => "vary-unkeyed",
            NotStored::Expired => "expired",
            NotStored::TooLarge => "too-large",
        }
    }
}

/// How long a stored response stays fresh and servable, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// Lifetime from the response's generation (its age counts against it).
    pub fresh_ms: u64,
    pub stale_while_revalidate_ms: u64,
    pub stale_if_error_ms: u64,
    /// The age the response had when it arrived (its `Age` field).
    pub initial_age_ms: u64,
}

impl Freshness {
    /// How long Redis keeps the entry: fresh plus the longer stale window.
    pub fn keep_ms(&self) -> u64 {
        self.fresh_ms
            .saturating_add(self.stale_while_revalidate_ms.max(self.stale_if_error_ms))
    }
}

const SECOND: u64 = 1000;

/// Decides whether a response may be stored and for how long. `now_s` is the gateway's clock
/// (used only to read `Expires` against a response without `Date`).
pub fn storable(
    policy: &CachePolicy,
    status: u16,
    headers: &Headers,
    now_s: i64,
) -> Result<Freshness, NotStored> {
    if !policy.caches_status(status) {
        return Err(NotStored::Status);
    }
    if !policy.allow_set_cookie && first(headers, "set-cookie").is_some() {
        return Err(NotStored::SetCookie);
    }
    for name in list_members(headers, "vary") {
        if name == "*" {
            return Err(NotStored::VaryStar);
        }
        if !policy.keys_header(&name.to_ascii_lowercase()) {
            return Err(NotStored::VaryUnkeyed);
        }
    }
    if let Some(len) = first(headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
        if len > policy.max_body_bytes {
            return Err(NotStored::TooLarge);
        }
    }
    let initial_age_ms = first(headers, "age")
        .map(delta_seconds)
        .unwrap_or(0)
        .saturating_mul(SECOND);
    let policy_swr = policy.stale_while_revalidate.as_millis();
    let policy_sie = policy.stale_if_error.as_millis();
    if !policy.honor_cache_control {
        return Ok(Freshness {
            fresh_ms: policy.ttl_ms(),
            stale_while_revalidate_ms: policy_swr,
            stale_if_error_ms: policy_sie,
            initial_age_ms: 0,
        });
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if cc.no_cache {
        return Err(NotStored::NoCache);
    }
    let expires = || -> Option<u64> {
        let expires = first(headers, "expires")?;
        // An unreadable Expires (such as "0") means "already expired".
        let Some(at) = parse_http_date(expires) else {
            return Some(0);
        };
        let date = first(headers, "date")
            .and_then(parse_http_date)
            .unwrap_or(now_s);
        Some(u64::try_from(at - date).unwrap_or(0))
    };
    let lifetime_ms = match cc.s_maxage.or(cc.max_age).or_else(expires) {
        Some(s) => s.saturating_mul(SECOND),
        None => policy.ttl_ms(),
    };
    if lifetime_ms <= initial_age_ms {
        return Err(NotStored::Expired);
    }
    let (swr, sie) = if cc.must_revalidate {
        (0, 0)
    } else {
        (
            cc.stale_while_revalidate
                .map(|s| s.saturating_mul(SECOND))
                .unwrap_or(policy_swr),
            cc.stale_if_error
                .map(|s| s.saturating_mul(SECOND))
                .unwrap_or(policy_sie),
        )
    };
    Ok(Freshness {
        fresh_ms: lifetime_ms,
        stale_while_revalidate_ms: swr,
        stale_if_error_ms: sie,
        initial_age_ms,
    })
}

/// Hop-by-hop fields (RFC 9110 7.6.1) and the pseudo/length fields a stored copy never keeps.
const NOT_STORED_FIELDS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
    "content-length",
    "age",
    "x-krowoc-edge",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

/// Envoy's own fields (`x-envoy-upstream-service-time`, …) describe one hop's exchange; a hit
/// replaying them would report the original miss's timings and routing.
const ENVOY_FIELD_PREFIX: &str = "x-envoy-";

/// The fields of a response that go into its entry: without pseudo-fields, hop-by-hop fields
/// (including those `Connection` names), Envoy's `x-envoy-*` fields, `Content-Length`
/// (recomputed), `Age` (recomputed), the filter's own per-request fields, and the invalidation
/// directive.
pub fn stored_fields(
    settings: &CacheSettings,
    invalidation_header: Option<&str>,
    headers: &Headers,
) -> Vec<(String, String)> {
    let listed: Vec<String> = list_members(headers, "connection")
        .map(|m| m.to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !k.starts_with(':')
                && !k.starts_with(ENVOY_FIELD_PREFIX)
                && !NOT_STORED_FIELDS.contains(&k.as_str())
                && !listed.contains(&k)
                && k != settings.x_cache_header
                && k != settings.cache_status_header
                && Some(k.as_str()) != invalidation_header
        })
        .cloned()
        .collect()
}

/// Tags of a response from the policy's tag fields (`Cache-Tag: a, b` or `Surrogate-Key: a b`),
/// de-duplicated, in order.
pub fn tags(policy: &CachePolicy, headers: &Headers) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in &policy.tag_headers {
        for value in values(headers, name) {
            for tag in value.split([',', ' ', '\t']).filter(|t| !t.is_empty()) {
                if tag.len() <= 1024 && !out.iter().any(|t| t == tag) {
                    out.push(tag.to_string());
                }
            }
        }
    }
    out
}

/// Weak comparison of entity tags (`W/"a"` matches `"a"`).
fn etag_matches(a: &str, b: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    strip(a) == strip(b)
}

/// Whether a conditional request can be answered 304 from a stored response (RFC 9110 13.2.2:
/// `If-None-Match` first; `If-Modified-Since` only without it, and only for GET and HEAD).
pub fn not_modified(method: &str, request: &Headers, stored: &Headers) -> bool {
    let inm: Vec<&str> = list_members(request, "if-none-match").collect();
    if !inm.is_empty() {
        let Some(etag) = first(stored, "etag") else {
            return false;
        };
        return inm.iter().any(|t| *t == "*" || etag_matches(t, etag));
    }
    if method != "GET" && method != "HEAD" {
        return false;
    }
    let Some(since) = first(request, "if-modified-since").and_then(parse_http_date) else {
        return false;
    };
    let modified = first(stored, "last-modified")
        .or_else(|| first(stored, "date"))
        .and_then(parse_http_date);
    matches!(modified, Some(m) if m <= since)
}

/// The fields a 304 carries (RFC 9110 15.4.5).
pub fn not_modified_fields(stored: &Headers) -> Vec<(String, String)> {
    const KEPT: &[&str] = &[
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "vary",
        "last-modified",
    ];
    stored
        .iter()
        .filter(|(k, _)| KEPT.contains(&k.to_ascii_lowercase().as_str()))
        .cloned()
        .collect()
}

/// What the cache did for a request, as `X-Cache` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Bypass,
    /// A miss that found an entry past every window it may be served in.
    Expired,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
            Outcome::Expired => "EXPIRED",
        }
    }
}

/// An RFC 9211 `Cache-Status` entry, e.g. `krowoc; hit; ttl=42` or
/// `krowoc; fwd=uri-miss; stored`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    pub hit: bool,
    pub fwd: Option<&'static str>,
    pub fwd_status: Option<u16>,
    /// Seconds of freshness left (negative when stale).
    pub ttl_s: Option<i64>,
    pub stored: bool,
    pub collapsed: bool,
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    pub fn hit(ttl_s: i64) -> CacheStatus {
        CacheStatus {
            hit: true,
            fwd: None,
            fwd_status: None,
            ttl_s: Some(ttl_s),
            stored: false,
            collapsed: false,
            detail: None,
        }
    }

    pub fn forward(fwd: &'static str) -> CacheStatus {
        CacheStatus {
            hit: false,
            fwd: Some(fwd),
            fwd_status: None,
            ttl_s: None,
            stored: false,
            collapsed: false,
            detail: None,
        }
    }

    pub fn render(&self, name: &str) -> String {
        let mut out = name.to_string();
        if self.hit {
            out.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(f);
        }
        if let Some(s) = self.fwd_status {
            out.push_str(&format!("; fwd-status={s}"));
        }
        if let Some(t) = self.ttl_s {
            out.push_str(&format!("; ttl={t}"));
        }
        if self.stored {
            out.push_str("; stored");
        }
        if self.collapsed {
            out.push_str("; collapsed");
        }
        if let Some(d) = self.detail {
            out.push_str("; detail=");
            out.push_str(d);
        }
        out
    }
}

/// The `X-Cache` and `Cache-Status` fields (those with a configured name).
pub fn status_fields(
    settings: &CacheSettings,
    outcome: Outcome,
    status: &CacheStatus,
) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(2);
    if !settings.x_cache_header.is_empty() {
        out.push((
            settings.x_cache_header.clone(),
            outcome.as_str().to_string(),
        ));
    }
    if !settings.cache_status_header.is_empty() {
        out.push((
            settings.cache_status_header.clone(),
            status.render(&settings.name),
        ));
    }
    out
}

/// Seconds of freshness left for an entry of age `age_ms` (negative once stale), rounded down.
pub fn ttl_seconds(fresh_ms: u64, age_ms: u64) -> i64 {
    let left = i128::from(fresh_ms) - i128::from(age_ms);
    i64::try_from(left.div_euclid(1000)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cache::policy_problems;
    use crate::http::fields as h;

    fn policy(json: &str) -> CachePolicy {
        let mut p: CachePolicy = serde_json::from_str(json).expect("policy");
        assert_eq!(policy_problems(&mut p), Vec::new());
        p
    }

    #[test]
    fn cache_control_directives_are_read_case_insensitively_across_lines() {
        let cc = CacheControl::parse(&h(&[
            ("cache-control", "Public, MAX-AGE=60"),
            (
                "cache-control",
                "s-maxage=\"120\", stale-while-revalidate=30, x-ext=1",
            ),
        ]));
        assert!(cc.public && !cc.private && !cc.no_store);
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(120));
        assert_eq!(cc.stale_while_revalidate, Some(30));
        assert_eq!(cc.stale_if_error, None);
        let cc = CacheControl::parse(&h(&[(
            "cache-control",
            "private=\"x\", no-cache=\"set-cookie\", no-store, must-revalidate",
        )]));
        assert!(cc.private && cc.no_cache && cc.no_store && cc.must_revalidate);
    }

    #[test]
    fn unreadable_or_repeated_max_age_is_conservative() {
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=abc")]));
        assert_eq!(cc.max_age, Some(0));
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=10, max-age=99")]));
        assert_eq!(cc.max_age, Some(10), "the first occurrence counts");
        let cc = CacheControl::parse(&h(&[("cache-control", "max-age=99999999999999999999999")]));
        assert_eq!(
            cc.max_age,
            Some(2_147_483_648),
            "RFC 9111 1.2.2: at most 2^31"
        );
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let t = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 23:59:59 GMT"),
            Some(1_709_251_199)
        );
        for bad in [
            "0",
            "",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 99999999999999999 08:49:37 GMT",
            "Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            // The day name must be the date's.
            "Wed, 29 Feb 2024 23:59:59 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn requests_with_credentials_or_other_methods_bypass() {
        let p = policy(r#"{"ttl": "60s"}"#);
        assert_eq!(request_bypass(&p, "GET", &h(&[("accept", "*/*")])), None);
        assert_eq!(request_bypass(&p, "HEAD", &[]), None);
        assert_eq!(request_bypass(&p, "POST", &[]), Some(Bypass::Method));
        assert_eq!(
            request_bypass(&p, "GET", &h(&[("authorization", "Bearer x")])),
            Some(Bypass::Authorized)
        );
        assert_eq!(
            request_bypass(&p, "GET", &h(&[("cookie", "s=1")])),
            Some(Bypass::Authorized)
        );
        assert_eq!(
            request_bypass(&p, "GET", &h(&[("Proxy-Authorization", "Basic eA==")])),
            Some(Bypass::Authorized),
            "a proxy credential is a credential too"
        );
        let p = policy(r#"{"ttl": "60s", "allow_authorized": true}"#);
        assert_eq!(request_bypass(&p, "GET", &h(&[("cookie", "s=1")])), None);
    }

    #[test]
    fn upstream_lifetime_wins_over_the_policy_ttl() {
        let p = policy(r#"{"ttl": "60s", "stale_if_error": "5m"}"#);
        let f =
            storable(&p, 200, &h(&[("cache-control", "public, max-age=30")]), 0).expect("storable");
        assert_eq!(f.fresh_ms, 30_000);
        assert_eq!(f.stale_if_error_ms, 300_000);
        assert_eq!(f.keep_ms(), 330_000);
        let f = storable(
            &p,
            200,
            &h(&[("cache-control", "max-age=30, s-maxage=90")]),
            0,
        )
        .expect("storable");
        assert_eq!(f.fresh_ms, 90_000, "s-maxage is the shared cache's");
        let f = storable(&p, 200, &[], 0).expect("no directives: the policy's ttl");
        assert_eq!(f.fresh_ms, 60_000);
        let f = storable(
            &p,
            200,
            &h(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ]),
            0,
        )
        .expect("Expires - Date");
        assert_eq!(f.fresh_ms, 60_000);
        let f = storable(
            &p,
            200,
            &h(&[("cache-control", "max-age=30"), ("age", "10")]),
            0,
        )
        .expect("storable");
        assert_eq!((f.fresh_ms, f.initial_age_ms), (30_000, 10_000));
        let f = storable(
            &p,
            200,
            &h(&[(
                "cache-control",
                "max-age=30, must-revalidate, stale-if-error=60",
            )]),
            0,
        )
        .expect("storable");
        assert_eq!(
            (f.stale_while_revalidate_ms, f.stale_if_error_ms),
            (0, 0),
            "must-revalidate forbids serving stale"
        );
        let p = policy(r#"{"ttl": "60s", "honor_cache_control": false}"#);
        let f =
            storable(&p, 200, &h(&[("cache-control", "private, max-age=1")]), 0).expect("ignored");
        assert_eq!(f.fresh_ms, 60_000);
    }

    #[test]
    fn responses_the_defaults_refuse_to_store() {
        let p = policy(r#"{"ttl": "60s", "max_body_bytes": 10}"#);
        let no = |status: u16, pairs: &[(&str, &str)]| {
            storable(&p, status, &h(pairs), 0).expect_err("not storable")
        };
        assert_eq!(no(500, &[]), NotStored::Status);
        assert_eq!(no(206, &[]), NotStored::Status);
        assert_eq!(no(200, &[("set-cookie", "s=1")]), NotStored::SetCookie);
        assert_eq!(
            no(200, &[("cache-control", "no-store")]),
            NotStored::NoStore
        );
        assert_eq!(
            no(200, &[("cache-control", "private, max-age=60")]),
            NotStored::Private
        );
        assert_eq!(
            no(200, &[("cache-control", "no-cache")]),
            NotStored::NoCache
        );
        assert_eq!(
            no(200, &[("cache-control", "max-age=0")]),
            NotStored::Expired
        );
        assert_eq!(no(200, &[("expires", "0")]), NotStored::Expired);
        assert_eq!(
            no(200, &[("cache-control", "max-age=5"), ("age", "5")]),
            NotStored::Expired
        );
        assert_eq!(no(200, &[("content-length", "11")]), NotStored::TooLarge);
        let p = policy(r#"{"ttl": "60s", "allow_set_cookie": true}"#);
        assert!(storable(&p, 200, &h(&[("set-cookie", "s=1")]), 0).is_ok());
    }

    #[test]
    fn vary_is_stored_only_on_keyed_fields() {
        let p = policy(r#"{"ttl": "60s", "key": {"headers": ["Accept-Language"]}}"#);
        assert!(storable(&p, 200, &h(&[("vary", "Accept-Language")]), 0).is_ok());
        assert_eq!(
            storable(
                &p,
                200,
                &h(&[("vary", "accept-language, Accept-Encoding")]),
                0
            ),
            Err(NotStored::VaryUnkeyed)
        );
        assert_eq!(
            storable(&p, 200, &h(&[("vary", "*")]), 0),
            Err(NotStored::VaryStar)
        );
        let p = policy(r#"{"ttl": "60s"}"#);
        assert_eq!(
            storable(&p, 200, &h(&[("vary", "origin")]), 0),
            Err(NotStored::VaryUnkeyed)
        );
    }

    #[test]
    fn stored_fields_drop_hop_by_hop_and_per_request_fields() {
        let settings = CacheSettings::default();
        let stored = stored_fields(
            &settings,
            Some("x-krowoc-invalidate"),
            &h(&[
                (":status", "200"),
                ("content-type", "application/json"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("content-length", "10"),
                ("age", "3"),
                ("x-cache", "MISS"),
                ("x-krowoc-invalidate", "tag=a"),
                ("ratelimit", "\"x\";r=1;t=1"),
                ("cache-tag", "user:1"),
                ("etag", "\"v1\""),
            ]),
        );
        assert_eq!(
            stored,
            h(&[
                ("content-type", "application/json"),
                ("cache-tag", "user:1"),
                ("etag", "\"v1\""),
            ])
        );
    }

    #[test]
    fn stored_fields_drop_envoy_and_hop_by_hop_fields_whatever_their_case() {
        let settings = CacheSettings::default();
        let stored = stored_fields(
            &settings,
            None,
            &h(&[
                ("content-type", "text/plain"),
                ("x-envoy-upstream-service-time", "1025"),
                ("X-Envoy-Foo", "bar"),
                ("x-envoy-decorator-operation", "origin"),
                ("Connection", "close, X-Hop-A"),
                ("connection", "x-hop-b"),
                ("x-hop-a", "1"),
                ("X-Hop-B", "2"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authorization", "Basic eA=="),
                ("x-envoyish", "not an x-envoy- field"),
                ("etag", "\"v1\""),
            ]),
        );
        assert_eq!(
            stored,
            h(&[
                ("content-type", "text/plain"),
                ("x-envoyish", "not an x-envoy- field"),
                ("etag", "\"v1\""),
            ])
        );
    }

    #[test]
    fn tags_come_from_cache_tag_and_surrogate_key() {
        let p = policy(r#"{"ttl": "60s"}"#);
        assert_eq!(
            tags(
                &p,
                &h(&[
                    ("cache-tag", "user:1, list"),
                    ("surrogate-key", "list  blue"),
                ])
            ),
            vec!["user:1", "list", "blue"]
        );
        assert!(tags(&p, &[]).is_empty());
    }

    #[test]
    fn conditional_requests_match_etag_then_dates() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let req = |pairs: &[(&str, &str)]| h(pairs);
        assert!(not_modified(
            "GET",
            &req(&[("if-none-match", "\"v0\", W/\"v1\"")]),
            &stored
        ));
        assert!(not_modified(
            "GET",
            &req(&[("if-none-match", "*")]),
            &stored
        ));
        assert!(!not_modified(
            "GET",
            &req(&[("if-none-match", "\"v2\"")]),
            &stored
        ));
        // If-None-Match decides alone, even when the date would match.
        assert!(!not_modified(
            "GET",
            &req(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")
            ]),
            &stored
        ));
        assert!(not_modified(
            "GET",
            &req(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            "GET",
            &req(&[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")]),
            &stored
        ));
        assert!(!not_modified("GET", &[], &stored));
        assert_eq!(
            not_modified_fields(&h(&[("content-type", "x"), ("etag", "\"v1\"")])),
            h(&[("etag", "\"v1\"")])
        );
    }

    #[test]
    fn cache_status_renders_rfc_9211_parameters() {
        assert_eq!(CacheStatus::hit(42).render("krowoc"), "krowoc; hit; ttl=42");
        let mut s = CacheStatus::forward("uri-miss");
        s.stored = true;
        s.fwd_status = Some(200);
        assert_eq!(
            s.render("krowoc"),
            "krowoc; fwd=uri-miss; fwd-status=200; stored"
        );
        let mut s = CacheStatus::hit(-3);
        s.detail = Some("stale-while-revalidate");
        assert_eq!(
            s.render("edge"),
            "edge; hit; ttl=-3; detail=stale-while-revalidate"
        );
        assert_eq!(ttl_seconds(60_000, 1_500), 58);
        assert_eq!(ttl_seconds(60_000, 61_000), -1);
        let settings = CacheSettings {
            x_cache_header: String::new(),
            ..CacheSettings::default()
        };
        let fields = status_fields(&settings, Outcome::Hit, &CacheStatus::hit(1));
        assert_eq!(fields, h(&[("cache-status", "krowoc; hit; ttl=1")]));
    }
}
