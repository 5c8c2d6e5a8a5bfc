//! Cache keys: what tells two requests' entries apart, and the Redis keys of an entry and its
//! indexes.
//!
//! The key material is scheme, host, path, method, the allowed query parameters (sorted by
//! name) and the allowed request fields, each part tagged and length-prefixed so different
//! combinations never produce the same bytes; it is hashed (SHA1, hex), so a key's length is
//! bounded whatever the client sends. Fields and parameters outside the allow-lists never reach
//! the key: a client cannot split entries with them, nor poison an entry others get.
//!
//! Every key of a route shares the hash tag `{<route>}`, so one script can store an entry and
//! update its indexes atomically on Redis Cluster as well (a route's cache lives in one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>c:{<route>}:e:<hash>` | hash | the entry: `v` encoded response, `t` stored at (ms, Redis clock), `f`/`w`/`e` fresh, stale-while-revalidate, stale-if-error (ms), `u` its URL |
//! | `<prefix>c:{<route>}:l:<hash>` | string | the fill lock (a token, or `pass` while the key is uncacheable) |
//! | `<prefix>c:{<route>}:t:<sha1(tag)>` | set | hashes of entries tagged `tag` |
//! | `<prefix>c:{<route>}:u:<sha1(url)>` | set | hashes of entries of one URL (any host, method, varied field) |
//! | `<prefix>c:{<route>}:p:<sha1(path)>` | set | hashes of entries of one path (any query) |
//! | `<prefix>c:{<route>}:a` | set | hashes of every entry of the route |
//! | `<prefix>c:{<route>}:purged` | string | Redis time (ms) of the route's last purge |
//!
//! Index sets expire with the longest-lived entry they list.

use crate::config::cache::CachePolicy;
use crate::http::{encode_component, query_pairs};

/// One request's cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    /// SHA1 (hex) of the key material.
    pub hash: String,
    /// `path` or `path?query` with only the allowed parameters, sorted and re-encoded: what
    /// `url=` purges and `pattern=` purges match.
    pub url: String,
    pub path: String,
}

/// What a request offers for its cache key.
#[derive(Clone, Copy, Debug)]
pub struct KeyInput<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Query string without `?` (may be empty).
    pub query: &'a str,
    /// Request fields, names lower case.
    pub headers: &'a [(String, String)],
}

fn push_part(material: &mut Vec<u8>, tag: &str, value: Option<&str>) {
    material.extend_from_slice(tag.as_bytes());
    match value {
        Some(v) => {
            material.extend_from_slice(format!("+{}:", v.len()).as_bytes());
            material.extend_from_slice(v.as_bytes());
        }
        None => material.push(b'-'),
    }
    material.push(b';');
}

/// The allowed parameters of a query string, decoded, sorted by name (the order of one name's
/// values is kept, it may mean something to the application), re-encoded canonically.
pub fn normalized_query(allowed: &[String], query: &str) -> String {
    let mut kept: Vec<(String, String)> = query_pairs(query)
        .filter(|(k, _)| allowed.iter().any(|a| a == k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    kept.iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `path` or `path?normalized-query`.
pub fn normalized_url(allowed: &[String], path: &str, query: &str) -> String {
    let q = normalized_query(allowed, query);
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    }
}

/// Derives a request's key under a policy.
pub fn derive(policy: &CachePolicy, input: &KeyInput<'_>) -> CacheKey {
    let url = normalized_url(&policy.key.query, input.path, input.query);
    let mut material = Vec::with_capacity(128);
    push_part(
        &mut material,
        "scheme",
        Some(&input.scheme.to_ascii_lowercase()),
    );
    push_part(
        &mut material,
        "host",
        Some(&input.host.to_ascii_lowercase()),
    );
    push_part(&mut material, "method", Some(input.method));
    push_part(&mut material, "url", Some(&url));
    for name in &policy.key.headers {
        let joined = crate::http::joined(input.headers, name);
        push_part(&mut material, name, joined.as_deref());
    }
    CacheKey {
        hash: sha1_hex(&material),
        url,
        path: input.path.to_string(),
    }
}

pub fn sha1_hex(bytes: &[u8]) -> String {
    sha1_smol::Sha1::from(bytes).digest().to_string()
}

/// The Redis keys of one route's cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteKeys {
    /// `<prefix>c:{<route>}:`
    base: String,
}

impl RouteKeys {
    pub fn new(prefix: &str, route: &str) -> RouteKeys {
        RouteKeys {
            base: format!("{prefix}c:{{{route}}}:"),
        }
    }

    /// What entry keys start with (the purge script appends an entry's hash).
    pub fn entry_prefix(&self) -> String {
        format!("{}e:", self.base)
    }

    /// The `SCAN MATCH` pattern of the route's entry keys (prefix and route escaped): a
    /// pattern purge scans route by route, each scan on the Redis Cluster node of the route's
    /// slot.
    pub fn entries_match(&self) -> String {
        format!("{}*", escape_redis_glob(&self.entry_prefix()))
    }

    pub fn entry(&self, hash: &str) -> String {
        format!("{}e:{hash}", self.base)
    }

    pub fn lock(&self, hash: &str) -> String {
        format!("{}l:{hash}", self.base)
    }

    pub fn tag_index(&self, tag: &str) -> String {
        format!("{}t:{}", self.base, sha1_hex(tag.as_bytes()))
    }

    pub fn url_index(&self, url: &str) -> String {
        format!("{}u:{}", self.base, sha1_hex(url.as_bytes()))
    }

    pub fn path_index(&self, path: &str) -> String {
        format!("{}p:{}", self.base, sha1_hex(path.as_bytes()))
    }

    pub fn route_index(&self) -> String {
        format!("{}a", self.base)
    }

    /// Redis time (ms) of the route's last purge: fills that looked up before it are not
    /// stored, so a response fetched before a purge cannot land after it.
    pub fn purge_mark(&self) -> String {
        format!("{}purged", self.base)
    }
}

/// Escapes Redis glob specials (`* ? [ ] \`) so a prefix matches only itself in `SCAN MATCH`.
pub fn escape_redis_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Turns a purge pattern (a glob over entry URLs: `*` any run, `?` one character, `\x` a
/// literal x) into an anchored Lua pattern for the scan script.
pub fn glob_to_lua_pattern(glob: &str) -> String {
    let mut out = String::from("^");
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '\\' => {
                if let Some(next) = chars.next() {
                    push_lua_literal(&mut out, next);
                }
            }
            other => push_lua_literal(&mut out, other),
        }
    }
    out.push('$');
    out
}

fn push_lua_literal(out: &mut String, c: char) {
    if matches!(
        c,
        '^' | '$' | '(' | ')' | '%' | '.' | '[' | ']' | '*' | '+' | '-' | '?'
    ) {
        out.push('%');
    }
    out.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cache::policy_problems;

    fn policy(json: &str) -> CachePolicy {
        let mut p: CachePolicy = serde_json::from_str(json).expect("policy");
        assert_eq!(policy_problems(&mut p), Vec::new());
        p
    }

    fn input<'a>(path: &'a str, query: &'a str, headers: &'a [(String, String)]) -> KeyInput<'a> {
        KeyInput {
            scheme: "http",
            host: "localhost",
            method: "GET",
            path,
            query,
            headers,
        }
    }

    #[test]
    fn only_allowed_parameters_count_and_they_are_sorted() {
        let p = policy(r#"{"ttl": "60s", "key": {"query": ["user_id", "lang"]}}"#);
        let a = derive(
            &p,
            &input("/api/x", "user_id=42&lang=de&utm_source=ad", &[]),
        );
        let b = derive(
            &p,
            &input("/api/x", "lang=de&cachebust=1&user_id=%34%32", &[]),
        );
        assert_eq!(a, b);
        assert_eq!(a.url, "/api/x?lang=de&user_id=42");
        assert_eq!(a.hash.len(), 40);
        let c = derive(&p, &input("/api/x", "user_id=43&lang=de", &[]));
        assert_ne!(a.hash, c.hash, "per user_id");
        let none = derive(&p, &input("/api/x", "", &[]));
        assert_eq!(none.url, "/api/x");
        assert_ne!(none.hash, a.hash);
    }

    #[test]
    fn repeated_values_keep_their_order_and_are_encoded_canonically() {
        assert_eq!(
            normalized_query(&["a".into(), "b".into()], "b=2&a=y&a=x+z&c=1"),
            "a=y&a=x%20z&b=2"
        );
        assert_eq!(normalized_query(&["k".into()], "k"), "k=");
        assert_eq!(normalized_query(&["k".into()], "&&k=%2F&"), "k=%2F");
    }

    #[test]
    fn scheme_host_path_and_method_are_part_of_the_key() {
        let p = policy(r#"{"ttl": "60s"}"#);
        let base = derive(&p, &input("/a", "", &[]));
        let mut other = input("/a", "", &[]);
        other.host = "evil.example";
        assert_ne!(derive(&p, &other).hash, base.hash);
        let mut upper = input("/a", "", &[]);
        upper.host = "LOCALHOST";
        assert_eq!(
            derive(&p, &upper).hash,
            base.hash,
            "hosts are case-insensitive"
        );
        let mut head = input("/a", "", &[]);
        head.method = "HEAD";
        assert_ne!(derive(&p, &head).hash, base.hash);
        let mut https = input("/a", "", &[]);
        https.scheme = "https";
        assert_ne!(derive(&p, &https).hash, base.hash);
        assert_ne!(derive(&p, &input("/b", "", &[])).hash, base.hash);
    }

    #[test]
    fn unkeyed_fields_do_not_change_the_key_and_keyed_ones_do() {
        let p = policy(r#"{"ttl": "60s", "key": {"headers": ["accept-language"]}}"#);
        let plain = derive(&p, &input("/a", "", &[]));
        let poisoned = vec![
            ("x-forwarded-host".to_string(), "evil.example".to_string()),
            ("x-original-url".to_string(), "/admin".to_string()),
        ];
        assert_eq!(derive(&p, &input("/a", "", &poisoned)).hash, plain.hash);
        let de = vec![("accept-language".to_string(), "de".to_string())];
        assert_ne!(derive(&p, &input("/a", "", &de)).hash, plain.hash);
        let empty = vec![("accept-language".to_string(), String::new())];
        assert_ne!(
            derive(&p, &input("/a", "", &empty)).hash,
            plain.hash,
            "an empty field is not an absent one"
        );
    }

    #[test]
    fn redis_keys_share_the_routes_hash_tag() {
        let k = RouteKeys::new("krowoc:", "cached-data");
        assert_eq!(k.entry("ab"), "krowoc:c:{cached-data}:e:ab");
        assert_eq!(k.lock("ab"), "krowoc:c:{cached-data}:l:ab");
        assert_eq!(k.entry_prefix(), "krowoc:c:{cached-data}:e:");
        assert_eq!(k.route_index(), "krowoc:c:{cached-data}:a");
        assert!(k
            .tag_index("user:1")
            .starts_with("krowoc:c:{cached-data}:t:"));
        assert_eq!(
            k.tag_index("user:1").len(),
            "krowoc:c:{cached-data}:t:".len() + 40
        );
        assert_ne!(k.url_index("/a"), k.path_index("/a"));
    }

    #[test]
    fn globs_become_anchored_lua_patterns() {
        assert_eq!(
            glob_to_lua_pattern("/api/cached-data?user_id=4*"),
            "^/api/cached%-data.user_id=4.*$"
        );
        assert_eq!(glob_to_lua_pattern("a\\*b%"), "^a%*b%%$");
        assert_eq!(glob_to_lua_pattern("*"), "^.*$");
        assert_eq!(
            RouteKeys::new("k*:", "r[1]").entries_match(),
            "k\\*:c:{r\\[1\\]}:e:*"
        );
    }
}
