//! The invalidation header: how an upstream response asks the filter to purge cached entries.
//!
//! ```text
//! x-krowoc-invalidate: directive *( OWS "," OWS directive )
//! directive = kind "=" value
//! kind      = "tag" / "route" / "url" / "pattern"      ; lower case
//! value     = 1*( %x21-2B / %x2D-7E )                  ; visible ASCII except ","
//! ```
//!
//! * `tag=user:42` — every entry whose response carried `Cache-Tag: user:42`;
//! * `route=/api/cached-data` — every entry stored for that route (path, no query);
//! * `url=/api/cached-data?user_id=42` — the one entry for that path and query;
//! * `pattern=...` — the guide's key pattern form (the filter may SCAN for it).
//!
//! Several directives in one header are all applied, e.g.
//! `x-krowoc-invalidate: tag=user:42, route=/api/other`. The header is only honoured on a 2xx
//! response. Receivers skip directives of a kind they do not know, so kinds can be added.
//! This upstream emits `tag=user:<id>` and `route=/api/cached-data`.

use std::fmt;

/// The response header's name (lower case, as HTTP/2 and the proxy-wasm ABI carry it).
pub const HEADER: &str = "x-krowoc-invalidate";

/// One thing to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Tag(String),
    Route(String),
    Url(String),
    Pattern(String),
}

impl Invalidation {
    pub fn kind(&self) -> &'static str {
        match self {
            Invalidation::Tag(_) => "tag",
            Invalidation::Route(_) => "route",
            Invalidation::Url(_) => "url",
            Invalidation::Pattern(_) => "pattern",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            Invalidation::Tag(v)
            | Invalidation::Route(v)
            | Invalidation::Url(v)
            | Invalidation::Pattern(v) => v,
        }
    }
}

impl fmt::Display for Invalidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.kind(), self.value())
    }
}

/// True when `value` can stand in a directive: non-empty visible ASCII without ",".
pub fn is_valid_value(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Renders directives as one header value, e.g. `tag=user:42, route=/api/cached-data`.
/// Values must satisfy [`is_valid_value`]; callers validate their input first.
pub fn header_value(directives: &[Invalidation]) -> String {
    directives
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a header value. Unknown kinds are skipped; a malformed directive is an error that
/// quotes it.
pub fn parse(header: &str) -> Result<Vec<Invalidation>, String> {
    let mut out = Vec::new();
    for item in header.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            continue;
        }
        let Some((kind, value)) = item.split_once('=') else {
            return Err(format!("directive {item:?} has no \"=\""));
        };
        if !is_valid_value(value) {
            return Err(format!("directive {item:?} has an empty or invalid value"));
        }
        let value = value.to_string();
        match kind {
            "tag" => out.push(Invalidation::Tag(value)),
            "route" => out.push(Invalidation::Route(value)),
            "url" => out.push(Invalidation::Url(value)),
            "pattern" => out.push(Invalidation::Pattern(value)),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_parses_back() {
        let d = vec![
            Invalidation::Tag("user:42".into()),
            Invalidation::Route("/api/cached-data".into()),
        ];
        let v = header_value(&d);
        assert_eq!(v, "tag=user:42, route=/api/cached-data");
        assert_eq!(parse(&v), Ok(d));
    }

    #[test]
    fn parsing_tolerates_spacing_and_skips_unknown_kinds() {
        assert_eq!(
            parse(" tag=a ,\tfuture=x,,url=/p?q=1 "),
            Ok(vec![
                Invalidation::Tag("a".into()),
                Invalidation::Url("/p?q=1".into())
            ])
        );
    }

    #[test]
    fn malformed_directives_are_errors() {
        assert!(parse("tag").unwrap_err().contains("\"tag\""));
        assert!(parse("tag=").is_err());
        assert!(parse("tag=a b").is_err());
    }

    #[test]
    fn values_exclude_commas_spaces_and_controls() {
        assert!(is_valid_value("user:42"));
        assert!(!is_valid_value("a,b"));
        assert!(!is_valid_value("a b"));
        assert!(!is_valid_value("a\nb"));
        assert!(!is_valid_value("é"));
        assert!(!is_valid_value(""));
    }
}
