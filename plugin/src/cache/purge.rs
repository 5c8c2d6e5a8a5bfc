//! Invalidation: purge directives (from the purge endpoint or an upstream's invalidation
//! header) and the Redis work each one becomes.
//!
//! ```text
//! x-krowoc-invalidate: directive *( OWS "," OWS directive )
//! directive = kind "=" value        ; kind: tag / route / url / pattern
//! ```
//!
//! * `tag=user:42` — every entry whose response carried that tag (`Cache-Tag`, `Surrogate-Key`);
//! * `route=/api/cached-data` — every entry of that path (any query); `route=<name>` — every
//!   entry of the configured route of that name;
//! * `url=/api/cached-data?user_id=42` — the entries of one URL (the query normalised as keys
//!   are: allowed parameters only, sorted);
//! * `pattern=/api/cached-data?user_id=4*` — a glob over entry URLs; the only purge that scans
//!   the keyspace (SCAN, in steps, never on a request's path).
//!
//! Tag, route and URL purges read an index set and delete what it lists: no scan. Unknown kinds
//! are skipped, so senders may add kinds.

use crate::cache::key::{glob_to_lua_pattern, normalized_url, sha1_hex, RouteKeys};
use crate::config::{Config, RouteMatch};

/// One thing to purge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directive {
    Tag(String),
    Route(String),
    Url(String),
    Pattern(String),
}

impl Directive {
    pub fn render(&self) -> String {
        match self {
            Directive::Tag(v) => format!("tag={v}"),
            Directive::Route(v) => format!("route={v}"),
            Directive::Url(v) => format!("url={v}"),
            Directive::Pattern(v) => format!("pattern={v}"),
        }
    }
}

/// Most directives one header may carry.
pub const MAX_DIRECTIVES: usize = 32;

/// Parses a directive list. A malformed directive is an error quoting it; unknown kinds are
/// skipped.
pub fn parse_directives(header: &str) -> Result<Vec<Directive>, String> {
    let mut out = Vec::new();
    for item in header.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            continue;
        }
        let Some((kind, value)) = item.split_once('=') else {
            return Err(format!("directive {item:?} has no \"=\""));
        };
        let valid = !value.is_empty()
            && value.len() <= 2048
            && value
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',');
        if !valid {
            return Err(format!("directive {item:?} has an empty or invalid value"));
        }
        let value = value.to_string();
        match kind {
            "tag" => out.push(Directive::Tag(value)),
            "route" => out.push(Directive::Route(value)),
            "url" => out.push(Directive::Url(value)),
            "pattern" => out.push(Directive::Pattern(value)),
            _ => continue,
        }
        if out.len() > MAX_DIRECTIVES {
            return Err(format!("more than {MAX_DIRECTIVES} directives"));
        }
    }
    Ok(out)
}

/// The Redis work of one directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurgeStep {
    /// `cache_purge.lua` on one index set of one route.
    Index {
        index_key: String,
        entry_prefix: String,
        /// The route's purge mark (set by the purge).
        mark_key: String,
    },
    /// `cache_scan_purge.lua`, from cursor 0 until the cursor comes back "0".
    Scan {
        match_pattern: String,
        lua_pattern: String,
        /// Every cached route's purge mark.
        mark_keys: Vec<String>,
    },
}

/// Whether a path falls under a route's match, whatever the method.
fn path_matches(m: &RouteMatch, path: &str) -> bool {
    match (&m.path, &m.prefix) {
        (Some(exact), _) => path == exact,
        (None, Some(prefix)) => path.starts_with(prefix.as_str()),
        (None, None) => false,
    }
}

/// The steps of a directive under a configuration (empty when no cached route is concerned).
pub fn plan(config: &Config, d: &Directive) -> Vec<PurgeStep> {
    let prefix = &config.redis.key_prefix;
    let cached = config
        .routes
        .iter()
        .filter_map(|r| r.cache.as_ref().map(|policy| (r, policy)));
    let index = |keys: &RouteKeys, index_key: String| PurgeStep::Index {
        index_key,
        entry_prefix: keys.entry_prefix(),
        mark_key: keys.purge_mark(),
    };
    match d {
        Directive::Tag(tag) => cached
            .map(|(r, _)| {
                let keys = RouteKeys::new(prefix, &r.name);
                index(&keys, keys.tag_index(tag))
            })
            .collect(),
        Directive::Url(url) => {
            let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
            cached
                .filter(|(r, _)| path_matches(&r.matcher, path))
                .map(|(r, policy)| {
                    let keys = RouteKeys::new(prefix, &r.name);
                    let normalized = normalized_url(&policy.key.query, path, query);
                    index(&keys, keys.url_index(&normalized))
                })
                .collect()
        }
        Directive::Route(v) if v.starts_with('/') => cached
            .filter(|(r, _)| path_matches(&r.matcher, v))
            .map(|(r, _)| {
                let keys = RouteKeys::new(prefix, &r.name);
                index(&keys, keys.path_index(v))
            })
            .collect(),
        Directive::Route(name) => cached
            .filter(|(r, _)| r.name == *name)
            .map(|(r, _)| {
                let keys = RouteKeys::new(prefix, &r.name);
                index(&keys, keys.route_index())
            })
            .collect(),
        // One scan per route: a route's entries share its slot, so on a Redis Cluster each
        // scan runs on the node that holds them, touching keys of that slot only.
        Directive::Pattern(glob) => cached
            .map(|(r, _)| {
                let keys = RouteKeys::new(prefix, &r.name);
                PurgeStep::Scan {
                    match_pattern: keys.entries_match(),
                    lua_pattern: glob_to_lua_pattern(glob),
                    mark_keys: vec![keys.purge_mark()],
                }
            })
            .collect(),
    }
}

/// Compares two secrets in time that depends on neither their contents nor their lengths
/// (both are hashed first, then every byte of the digests is compared).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (sha1_hex(a), sha1_hex(b));
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

// ---- the engine's purges ----------------------------------------------------------------

use super::{CacheEngine, CacheRequests, Job, JobKind};
use crate::host;
use crate::host::increment_metric;
use crate::http::{joined, HostAction, LocalResponse, RequestInfo};
use crate::redis::client::{RedisClient, Wire};
use proxy_wasm::types::LogLevel;
use std::rc::Rc;

/// A request waiting for its purges: a purge-endpoint request (answered with the outcome), or
/// a response that announced an invalidation (let go once the purges are done).
#[derive(Debug, Default)]
pub struct PurgeRequest {
    /// A held response, not a purge-endpoint request.
    pub(super) response: bool,
    pub(super) outstanding: usize,
    pub(super) deleted: u64,
    pub(super) failures: Vec<String>,
    pub(super) directives: Vec<String>,
}

/// How the purge endpoint answers.
#[derive(Debug)]
pub enum PurgeStart {
    /// At once (refused, or nothing could be sent).
    Answer(LocalResponse),
    /// Once these purges are done (the request waits, keeping this in its record).
    Wait(PurgeRequest),
}

pub(super) fn json_response(status: u32, body: serde_json::Value) -> LocalResponse {
    LocalResponse {
        status,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "no-store".into()),
        ],
        body: body.to_string().into_bytes(),
    }
}

/// The job of one purge step.
pub(super) fn purge_job(step: PurgeStep) -> JobKind {
    match step {
        PurgeStep::Scan { .. } => JobKind::Scan {
            step,
            cursor: "0".into(),
        },
        index => JobKind::Purge(index),
    }
}

pub(super) fn purge_answer(p: &PurgeRequest) -> LocalResponse {
    if p.failures.is_empty() {
        json_response(
            200,
            serde_json::json!({"purged": p.deleted, "directives": p.directives}),
        )
    } else {
        json_response(
            502,
            serde_json::json!({
                "error": "some purges failed",
                "failures": p.failures,
                "purged": p.deleted,
                "directives": p.directives,
            }),
        )
    }
}

impl CacheEngine {
    /// The purge endpoint: answered by the filter, never forwarded. None for other paths.
    pub fn purge_endpoint(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        req: &RequestInfo,
    ) -> Option<PurgeStart> {
        let config = Rc::clone(&self.config);
        let purge = config.cache.purge.as_ref()?;
        if req.path() != purge.path {
            return None;
        }
        let respond = |status: u32, error: &str| {
            Some(PurgeStart::Answer(json_response(
                status,
                serde_json::json!({ "error": error }),
            )))
        };
        if req.method != "POST" && req.method != "PURGE" {
            let mut resp = json_response(405, serde_json::json!({"error": "use POST"}));
            resp.headers.push(("allow".into(), "POST, PURGE".into()));
            return Some(PurgeStart::Answer(resp));
        }
        let token = req.header(&purge.token_header).unwrap_or("");
        if !constant_time_eq(token.as_bytes(), purge.token.as_bytes()) {
            return respond(403, "missing or wrong purge token");
        }
        let directives = joined(&req.headers, &purge.header).unwrap_or_default();
        let directives = match parse_directives(&directives) {
            Ok(d) if d.is_empty() => {
                return respond(
                    400,
                    &format!(
                        "give directives in the {} header, e.g. tag=user:42",
                        purge.header
                    ),
                )
            }
            Ok(d) => d,
            Err(e) => return respond(400, &e),
        };
        let mut request = PurgeRequest {
            directives: directives.iter().map(Directive::render).collect(),
            ..PurgeRequest::default()
        };
        let mut jobs = Vec::new();
        for d in &directives {
            for step in plan(&config, d) {
                jobs.push(Job {
                    kind: purge_job(step),
                    notify: Some(ctx),
                });
            }
        }
        // The endpoint's own calls go out from its context: it waits for them (alive).
        for job in jobs {
            match self.dispatch_job(client, wire, now_ms, job) {
                Ok(()) => request.outstanding += 1,
                Err(failed) => {
                    let (job, e) = *failed;
                    self.job_failed(&job, &e);
                    request.failures.push(e.to_string());
                }
            }
        }
        if request.outstanding == 0 {
            return Some(PurgeStart::Answer(purge_answer(&request)));
        }
        Some(PurgeStart::Wait(request))
    }

    /// Applies an upstream's invalidation header (its route has `invalidation`, status 2xx):
    /// index purges go to `purges` (the response waits for them), scans to the job queue.
    pub(super) fn honour_invalidation(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        headers: &[(String, String)],
        name: &str,
        purges: &mut Vec<JobKind>,
    ) {
        let Some(value) = joined(headers, name).filter(|v| !v.is_empty()) else {
            return;
        };
        let directives = match parse_directives(&value) {
            Ok(d) => d,
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    &format!("krowoc-edge: ignored invalidation header {name}: {e}"),
                );
                increment_metric(self.metrics.purge_failures, 1);
                return;
            }
        };
        let config = Rc::clone(&self.config);
        for d in &directives {
            for step in plan(&config, d) {
                match purge_job(step) {
                    scan @ JobKind::Scan { .. } => self.queue_job(client, wire, now_ms, scan),
                    index => purges.push(index),
                }
            }
        }
    }

    /// A purge of request `ctx` finished (or made progress); once the last is done, the
    /// purge endpoint answers or the held response goes on.
    pub(super) fn purge_progress(
        requests: &mut dyn CacheRequests,
        ctx: u32,
        deleted: u64,
        failure: Option<String>,
    ) -> Option<HostAction> {
        let slot = requests.purge_mut(ctx)?;
        let p = slot.as_mut()?;
        p.deleted += deleted;
        p.failures.extend(failure);
        p.outstanding = p.outstanding.saturating_sub(1);
        if p.outstanding > 0 {
            return None;
        }
        let p = slot.take()?;
        if p.response {
            return Some(HostAction::ResumeResponse(ctx));
        }
        Some(HostAction::Respond(ctx, purge_answer(&p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn config() -> Config {
        parse_config(
            br#"{"redis": {"key_prefix": "k:"},
                 "routes": [
                   {"name": "cached-data", "match": {"path": "/api/cached-data"},
                    "cache": {"ttl": "60s", "key": {"query": ["user_id"]}}},
                   {"name": "docs", "match": {"prefix": "/docs/"}, "cache": {"ttl": "1h"}},
                   {"name": "plain", "match": {"prefix": "/"}}
                 ]}"#,
        )
        .expect("config")
    }

    #[test]
    fn directives_parse_like_the_upstream_writes_them() {
        assert_eq!(
            parse_directives("tag=user:42, route=/api/cached-data,,url=/a?b=1 ,pattern=/a*"),
            Ok(vec![
                Directive::Tag("user:42".into()),
                Directive::Route("/api/cached-data".into()),
                Directive::Url("/a?b=1".into()),
                Directive::Pattern("/a*".into()),
            ])
        );
        assert_eq!(
            parse_directives("future=x, tag=a"),
            Ok(vec![Directive::Tag("a".into())])
        );
        assert!(parse_directives("tag").is_err());
        assert!(parse_directives("tag=").is_err());
        assert!(parse_directives("tag=a b").is_err());
        assert_eq!(parse_directives(""), Ok(vec![]));
        let many = vec!["tag=a"; MAX_DIRECTIVES + 1].join(",");
        assert!(parse_directives(&many).is_err());
        assert_eq!(Directive::Tag("a".into()).render(), "tag=a");
    }

    #[test]
    fn tags_purge_every_cached_route_and_urls_only_matching_ones() {
        let cfg = config();
        let tag = plan(&cfg, &Directive::Tag("user:1".into()));
        assert_eq!(tag.len(), 2, "one index per cached route");
        let url = plan(
            &cfg,
            &Directive::Url("/api/cached-data?x=1&user_id=42".into()),
        );
        let keys = RouteKeys::new("k:", "cached-data");
        assert_eq!(
            url,
            vec![PurgeStep::Index {
                index_key: keys.url_index("/api/cached-data?user_id=42"),
                entry_prefix: "k:c:{cached-data}:e:".into(),
                mark_key: "k:c:{cached-data}:purged".into(),
            }],
            "the query is normalised as keys are"
        );
        assert!(plan(&cfg, &Directive::Url("/elsewhere".into())).is_empty());
    }

    #[test]
    fn routes_purge_by_path_or_by_name() {
        let cfg = config();
        let keys = RouteKeys::new("k:", "cached-data");
        assert_eq!(
            plan(&cfg, &Directive::Route("/api/cached-data".into())),
            vec![PurgeStep::Index {
                index_key: keys.path_index("/api/cached-data"),
                entry_prefix: keys.entry_prefix(),
                mark_key: keys.purge_mark(),
            }]
        );
        assert_eq!(
            plan(&cfg, &Directive::Route("cached-data".into())),
            vec![PurgeStep::Index {
                index_key: keys.route_index(),
                entry_prefix: keys.entry_prefix(),
                mark_key: keys.purge_mark(),
            }]
        );
        assert_eq!(plan(&cfg, &Directive::Route("/docs/a".into())).len(), 1);
        assert!(plan(&cfg, &Directive::Route("plain".into())).is_empty());
    }

    #[test]
    fn patterns_scan_entry_keys_with_an_anchored_pattern() {
        assert_eq!(
            plan(&config(), &Directive::Pattern("/api/*".into())),
            vec![
                PurgeStep::Scan {
                    match_pattern: "k:c:{cached-data}:e:*".into(),
                    lua_pattern: "^/api/.*$".into(),
                    mark_keys: vec!["k:c:{cached-data}:purged".into()],
                },
                PurgeStep::Scan {
                    match_pattern: "k:c:{docs}:e:*".into(),
                    lua_pattern: "^/api/.*$".into(),
                    mark_keys: vec!["k:c:{docs}:purged".into()],
                }
            ]
        );
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
