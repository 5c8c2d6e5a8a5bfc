//! The `routes` section: each route's name and match, and the checks of what it holds (its rate
//! limit, cache and invalidation are checked by their own sections).

use super::cache::{validate_invalidation, validate_policy, CachePolicy, InvalidationConfig};
use super::events::RouteEventsSpec;
use super::problems::{is_token, PathSeg, Problems};
use super::rate_limit::{validate_rate_limit, RateLimitPolicy};
use serde::Deserialize;
use std::collections::HashSet;

const MAX_NAME_BYTES: usize = 64;

/// One route: a match and the policies applied to requests that match it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    #[serde(default)]
    pub rate_limit: Option<RateLimitPolicy>,
    /// Overrides the top-level `events` for this route (see [`super::events`]).
    #[serde(default)]
    pub events: Option<RouteEventsSpec>,
    /// The route's response cache (see [`super::cache`]).
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

/// Route names and limit names go into metric names and header fields: keep them simple.
fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

pub(super) fn validate_routes(p: &mut Problems<'_>, routes: &mut [(usize, Route)]) {
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
            validate_policy(p, &path(&[PathSeg::Key("cache")]), cache);
        }
        if let Some(inv) = route.invalidation.as_mut() {
            validate_invalidation(p, &path(&[PathSeg::Key("invalidation")]), inv);
        }
    }
}
