//! The one way a configuration problem is reported: a [`ConfigError`] naming the field path and
//! the offending value, collected by `Problems` while each section is checked. Secrets
//! (`redis.token`, `redis.password`, `cache.purge.token`) show as `(redacted)`, and serde
//! messages that would quote them are cut, since refused configurations end up in the host's
//! logs.

use serde_json::Value;
use std::fmt;

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

/// How much of an offending value an error line shows.
pub(crate) const MAX_VALUE_CHARS: usize = 120;

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
pub(crate) fn without_secrets(root: &Value) -> Value {
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

impl<'a> Problems<'a> {
    /// Problems found in `root`, a document whose secrets are already redacted.
    pub(crate) fn new(root: &'a Value) -> Problems<'a> {
        Problems {
            root,
            list: Vec::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn into_list(self) -> Vec<ConfigError> {
        self.list
    }

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

/// A key as a path segment: `.name`, or `["…"]` (JSON-quoted) for a key that is empty or has
/// characters a plain segment cannot show, so that every path names one place.
fn push_key(out: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !plain {
        out.push('[');
        out.push_str(&Value::String(key.to_string()).to_string());
        out.push(']');
        return;
    }
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
pub(crate) fn section<T: serde::de::DeserializeOwned>(
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
