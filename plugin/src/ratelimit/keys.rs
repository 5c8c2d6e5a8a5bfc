//! The Redis keys of a rate limit. Keys built from client input are hashed (SHA1, hex) so their length is bounded whatever the client sends; all keys of one
//! request share one hash tag `{route:hash}`, so one script call touches one Redis Cluster slot.

use crate::config::{KeyPart, LimitRule, MissingKey, RateLimitPolicy};
use crate::http::query_pairs;

/// What a request offers for key derivation.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts<'a> {
    pub client_ip: Option<String>,
    /// Path without the query string.
    pub path: &'a str,
    /// The query string without `?` (may be empty).
    pub query: &'a str,
    /// Request headers (names lower-case, as proxies hand them over).
    pub headers: &'a [(String, String)],
}

impl RequestFacts<'_> {
    /// All values of a header (case-insensitive name), joined by `,`; None when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        crate::http::joined(self.headers, name)
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_pairs(self.query).find_map(|(k, v)| (k == name).then(|| v.into_owned()))
    }
}

/// The keys of one request under one rate-limit policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyGroup {
    /// `route:sha1hex`: identifies the client within the route (also the deny-cache key).
    pub identity: String,
    /// One Redis key per limit, in the policy's order.
    pub keys: Vec<String>,
}

/// Result of key derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyDecision {
    Limit(KeyGroup),
    /// A keyed value is missing and the policy says `missing_key: skip`.
    Skip,
}

/// Derives the keys of a request. Each part is written with a tag and a length, so different
/// combinations can never produce the same material.
pub fn derive_keys(
    route: &str,
    prefix: &str,
    policy: &RateLimitPolicy,
    facts: &RequestFacts<'_>,
) -> KeyDecision {
    let mut material = Vec::new();
    for part in &policy.key {
        let (tag, value) = match part {
            KeyPart::ClientIp => ("ip", facts.client_ip.clone()),
            KeyPart::Path => ("path", Some(facts.path.to_string())),
            KeyPart::Route => ("route", Some(String::new())),
            KeyPart::Header(name) => ("header", facts.header(name).map(|v| format!("{name}={v}"))),
            KeyPart::Query(name) => (
                "query",
                facts.query_param(name).map(|v| format!("{name}={v}")),
            ),
        };
        material.extend_from_slice(tag.as_bytes());
        match value {
            Some(v) => {
                material.extend_from_slice(format!("+{}:", v.len()).as_bytes());
                material.extend_from_slice(v.as_bytes());
            }
            None if policy.missing_key == MissingKey::Skip => return KeyDecision::Skip,
            None => material.extend_from_slice(b"-"),
        }
        material.push(b';');
    }
    let hash = sha1_smol::Sha1::from(&material).digest().to_string();
    let identity = format!("{route}:{hash}");
    let keys = policy
        .limits
        .iter()
        .map(|limit| limit_key(prefix, &identity, limit))
        .collect();
    KeyDecision::Limit(KeyGroup { identity, keys })
}

/// `<prefix>rl:{<route>:<hash>}:<algorithm>:<limit>:<window_ms>[:<burst>]` — a changed limit
/// starts from fresh state instead of misreading the old one.
fn limit_key(prefix: &str, identity: &str, limit: &LimitRule) -> String {
    let mut key = format!(
        "{prefix}rl:{{{identity}}}:{}:{}:{}",
        limit.algorithm.as_str(),
        limit.limit,
        limit.window_ms()
    );
    if limit.algorithm == crate::config::Algorithm::Gcra {
        key.push_str(&format!(":{}", limit.burst()));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::test_policy as policy;

    #[test]
    fn query_parameters_are_decoded() {
        let facts = RequestFacts {
            query: "a=1&user%5Fid=j%C3%B3+n&user_id=second&flag",
            ..Default::default()
        };
        assert_eq!(facts.query_param("user_id").as_deref(), Some("jó n"));
        assert_eq!(facts.query_param("flag").as_deref(), Some(""));
        assert_eq!(facts.query_param("nope"), None);
        let value = |query| {
            RequestFacts {
                query,
                ..Default::default()
            }
            .query_param("v")
        };
        assert_eq!(value("v=100%").as_deref(), Some("100%"));
        assert_eq!(value("v=%zz%4").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn keys_share_one_hash_tag_and_stay_bounded() {
        let p = policy(
            r#"{"limits": [{"limit": 10, "window": "1s", "algorithm": "gcra", "burst": 20},
                          {"limit": 1000, "window": "1h", "algorithm": "sliding_window"}],
                "key": ["client_ip", {"header": "x-api-key"}, {"query": "user_id"}, "path"]}"#,
        );
        let huge = "x".repeat(100_000);
        let headers = vec![("x-api-key".to_string(), huge.clone())];
        let facts = RequestFacts {
            client_ip: Some("1.2.3.4".into()),
            path: &huge,
            query: "user_id=7",
            headers: &headers,
        };
        let KeyDecision::Limit(group) = derive_keys("api", "krowoc:", &p, &facts) else {
            panic!("expected keys");
        };
        assert_eq!(group.keys.len(), 2);
        assert!(group.identity.starts_with("api:") && group.identity.len() == 4 + 40);
        for key in &group.keys {
            assert!(key.len() < 200, "{key}");
            assert!(key.starts_with("krowoc:rl:{api:"), "{key}");
            assert_eq!(key.matches('{').count(), 1);
            assert!(key.contains(&format!("{{{}}}", group.identity)), "{key}");
        }
        assert!(
            group.keys[0].ends_with(":gcra:10:1000:20"),
            "{}",
            group.keys[0]
        );
        assert!(group.keys[1].ends_with(":sliding_window:1000:3600000"));
    }

    #[test]
    fn different_clients_get_different_keys_and_same_client_the_same() {
        let p = policy(r#"{"limits": [{"limit": 5, "window": "60s"}]}"#);
        let facts = |ip: &str| RequestFacts {
            client_ip: Some(ip.to_string()),
            path: "/a",
            ..Default::default()
        };
        let a1 = derive_keys("r", "p:", &p, &facts("1.1.1.1"));
        let a2 = derive_keys("r", "p:", &p, &facts("1.1.1.1"));
        let b = derive_keys("r", "p:", &p, &facts("1.1.1.2"));
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        // Another route, same client: another key.
        assert_ne!(a1, derive_keys("s", "p:", &p, &facts("1.1.1.1")));
    }

    #[test]
    fn part_boundaries_cannot_be_forged() {
        let p = policy(
            r#"{"limits": [{"limit": 5, "window": "60s"}], "key": [{"header": "a"}, {"header": "b"}]}"#,
        );
        let h1 = vec![
            ("a".to_string(), "x;b".to_string()),
            ("b".to_string(), "y".to_string()),
        ];
        let h2 = vec![
            ("a".to_string(), "x".to_string()),
            ("b".to_string(), "b;y".to_string()),
        ];
        let k1 = derive_keys(
            "r",
            "",
            &p,
            &RequestFacts {
                headers: &h1,
                ..Default::default()
            },
        );
        let k2 = derive_keys(
            "r",
            "",
            &p,
            &RequestFacts {
                headers: &h2,
                ..Default::default()
            },
        );
        assert_ne!(k1, k2);
    }

    #[test]
    fn missing_keyed_header_groups_or_skips() {
        let group = policy(
            r#"{"limits": [{"limit": 5, "window": "60s"}], "key": [{"header": "x-api-key"}]}"#,
        );
        let skip = policy(
            r#"{"limits": [{"limit": 5, "window": "60s"}], "key": [{"header": "x-api-key"}], "missing_key": "skip"}"#,
        );
        let none = RequestFacts::default();
        let empty_headers = vec![("x-api-key".to_string(), String::new())];
        let empty = RequestFacts {
            headers: &empty_headers,
            ..Default::default()
        };
        let a = derive_keys("r", "", &group, &none);
        assert!(matches!(a, KeyDecision::Limit(_)));
        assert_eq!(
            a,
            derive_keys("r", "", &group, &none),
            "missing values share one group"
        );
        assert_ne!(
            a,
            derive_keys("r", "", &group, &empty),
            "an empty value is not a missing one"
        );
        assert_eq!(derive_keys("r", "", &skip, &none), KeyDecision::Skip);
        assert!(matches!(
            derive_keys("r", "", &skip, &empty),
            KeyDecision::Limit(_)
        ));
    }

    #[test]
    fn header_names_match_case_insensitively_and_join_values() {
        let h = vec![
            ("X-Api-Key".to_string(), "a".to_string()),
            ("x-api-key".to_string(), "b".to_string()),
        ];
        let facts = RequestFacts {
            headers: &h,
            ..Default::default()
        };
        assert_eq!(facts.header("x-api-key").as_deref(), Some("a,b"));
    }
}
