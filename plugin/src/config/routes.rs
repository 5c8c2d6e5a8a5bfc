//! The `routes` section: each route's name and match, and the checks of what it holds (its rate
//! limit, cache and invalidation are checked by their own sections).

use super::cache::{validate_invalidation, validate_policy, CachePolicy, InvalidationConfig};
use super::events::RouteEventsSpec;
use super::problems::{is_token, PathSeg, Problems};
use super::rate_limit::{validate_rate_limit, RateLimitPolicy};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};

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

/// Paths (or prefixes) → the routes matching them, in configuration order.
type RoutesByPath = HashMap<Box<[u8]>, Vec<usize>>;

/// Up to this many routes, a request's route is found by scanning them.
const SCAN_UP_TO: usize = 16;

/// The routes by what they match, so that finding a request's route costs a hash lookup per
/// distinct prefix length, not a comparison per route. The answer is the linear scan's: the
/// first route in configuration order that matches.
#[derive(Clone, Debug, Default)]
pub struct RouteIndex {
    /// Few routes are scanned: a handful of comparisons costs less than hashing the path.
    scan: bool,
    /// Exact path → the routes matching it, in order.
    exact: RoutesByPath,
    /// Prefix length → prefix → the routes with that prefix, in order.
    prefixes: Vec<(usize, RoutesByPath)>,
}

impl RouteIndex {
    pub fn new(routes: &[Route]) -> RouteIndex {
        if routes.len() <= SCAN_UP_TO {
            return RouteIndex {
                scan: true,
                ..RouteIndex::default()
            };
        }
        let mut exact = RoutesByPath::new();
        let mut by_len: HashMap<usize, RoutesByPath> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            match (&r.matcher.path, &r.matcher.prefix) {
                (Some(path), _) => exact.entry(path.as_bytes().into()).or_default().push(i),
                (None, Some(prefix)) => by_len
                    .entry(prefix.len())
                    .or_default()
                    .entry(prefix.as_bytes().into())
                    .or_default()
                    .push(i),
                (None, None) => {}
            }
        }
        let mut prefixes: Vec<_> = by_len.into_iter().collect();
        prefixes.sort_by_key(|(len, _)| *len);
        RouteIndex {
            scan: false,
            exact,
            prefixes,
        }
    }

    /// The first route (in `routes`' order) matching `path` (without its query) and `method`.
    pub fn route_for(&self, routes: &[Route], path: &str, method: &str) -> Option<usize> {
        if self.scan {
            return routes.iter().position(|r| r.matcher.matches(path, method));
        }
        let bytes = path.as_bytes();
        let method_ok = |i: &usize| {
            let m = &routes[*i].matcher.methods;
            m.is_empty() || m.iter().any(|x| x == method)
        };
        let mut best = self
            .exact
            .get(bytes)
            .and_then(|list| list.iter().copied().find(|i| method_ok(i)));
        for (len, table) in &self.prefixes {
            let Some(head) = bytes.get(..*len) else { break };
            if let Some(list) = table.get(head) {
                if let Some(i) = list.iter().copied().find(|i| method_ok(i)) {
                    best = Some(best.map_or(i, |b| b.min(i)));
                }
            }
        }
        best
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(i: usize, path: Option<&str>, prefix: Option<&str>, methods: &[&str]) -> Route {
        Route {
            name: format!("r{i}"),
            matcher: RouteMatch {
                path: path.map(str::to_string),
                prefix: prefix.map(str::to_string),
                methods: methods.iter().map(|m| m.to_string()).collect(),
            },
            rate_limit: None,
            events: None,
            cache: None,
            invalidation: None,
        }
    }

    fn linear(routes: &[Route], path: &str, method: &str) -> Option<usize> {
        routes.iter().position(|r| r.matcher.matches(path, method))
    }

    #[test]
    fn the_index_finds_the_first_matching_route_as_a_scan_does() {
        let mut rng = fastrand::Rng::with_seed(7);
        let segments = ["a", "ab", "api", "v1", "users", "é", "x"];
        let pick = |rng: &mut fastrand::Rng| {
            let n = rng.usize(0..4);
            let mut p = String::new();
            for _ in 0..n {
                p.push('/');
                p.push_str(segments[rng.usize(..segments.len())]);
            }
            if p.is_empty() || rng.bool() {
                p.push('/');
            }
            p
        };
        for _ in 0..200 {
            let routes: Vec<Route> = (0..rng.usize(SCAN_UP_TO + 1..60))
                .map(|i| {
                    let p = pick(&mut rng);
                    let methods: &[&str] = match rng.usize(0..3) {
                        0 => &[],
                        1 => &["GET"],
                        _ => &["POST", "PUT"],
                    };
                    if rng.bool() {
                        route(i, Some(&p), None, methods)
                    } else {
                        route(i, None, Some(&p), methods)
                    }
                })
                .collect();
            let index = RouteIndex::new(&routes);
            for _ in 0..50 {
                let path = pick(&mut rng);
                let method = ["GET", "POST", "DELETE"][rng.usize(0..3)];
                assert_eq!(
                    index.route_for(&routes, &path, method),
                    linear(&routes, &path, method),
                    "{path} {method} in {:?}",
                    routes.iter().map(|r| &r.matcher).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn a_path_shorter_than_a_prefix_or_cut_inside_a_character_matches_nothing_wrongly() {
        let mut routes = vec![
            route(0, None, Some("/é"), &[]),
            route(1, None, Some("/"), &[]),
        ];
        // Enough routes to be indexed.
        routes.extend((2..=SCAN_UP_TO + 1).map(|i| route(i, Some(&format!("/r{i}")), None, &[])));
        let index = RouteIndex::new(&routes);
        // "/\u{e9}" is 3 bytes; a one-byte-longer prefix table must not slice inside it.
        assert_eq!(index.route_for(&routes, "/é", "GET"), Some(0));
        assert_eq!(index.route_for(&routes, "/e", "GET"), Some(1));
        assert_eq!(index.route_for(&routes, "", "GET"), None);
    }
}
