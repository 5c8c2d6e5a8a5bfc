//! A YAML walker that knows where it is: every node carries its path
//! (`static_resources.clusters[1].name`), refuses fields outside the subset by that path, and
//! names the path and the bad value in every type error.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::{parse_duration, EnvoyConfigError, Result};

#[derive(Clone)]
pub(super) struct Node<'a> {
    pub(super) value: &'a Value,
    pub(super) path: String,
}

pub(super) struct Object<'a> {
    pub(super) map: &'a Mapping,
    pub(super) path: String,
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

pub(super) fn invalid(path: &str, message: impl Into<String>) -> EnvoyConfigError {
    EnvoyConfigError::Invalid {
        path: if path.is_empty() {
            "(top level)".into()
        } else {
            path.to_string()
        },
        message: message.into(),
    }
}

impl<'a> Node<'a> {
    pub(super) fn root(value: &'a Value) -> Node<'a> {
        Node {
            value,
            path: String::new(),
        }
    }

    pub(super) fn invalid(&self, message: impl Into<String>) -> EnvoyConfigError {
        invalid(&self.path, message)
    }

    pub(super) fn expected(&self, what: &str) -> EnvoyConfigError {
        self.invalid(format!("expected {what}, found {}", describe(self.value)))
    }

    /// A mapping whose keys are all among `fields`.
    pub(super) fn object(&self, fields: &[&str]) -> Result<Object<'a>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.expected("a mapping"));
        };
        for key in map.keys() {
            let Value::String(key) = key else {
                return Err(self.invalid(format!("keys must be strings, found {}", describe(key))));
            };
            if !fields.contains(&key.as_str()) {
                return Err(invalid(
                    &join(&self.path, key),
                    format!(
                        "field not supported by host-shim (fields read here: {})",
                        fields.join(", ")
                    ),
                ));
            }
        }
        Ok(Object {
            map,
            path: self.path.clone(),
        })
    }

    pub(super) fn list(&self) -> Result<Vec<Node<'a>>> {
        let Value::Sequence(items) = self.value else {
            return Err(self.expected("a list"));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, value)| Node {
                value,
                path: format!("{}[{i}]", self.path),
            })
            .collect())
    }

    /// A list of exactly one item.
    pub(super) fn only_one(&self, what: &str) -> Result<Node<'a>> {
        let mut items = self.list()?;
        match items.len() {
            0 => Err(self.invalid(format!("needs one {what}, the list is empty"))),
            1 => Ok(items.remove(0)),
            _ => Err(items[1].invalid(format!("host-shim supports exactly one {what}"))),
        }
    }

    pub(super) fn string(&self) -> Result<&'a str> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    pub(super) fn boolean(&self) -> Result<bool> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.expected("true or false")),
        }
    }

    pub(super) fn port(&self) -> Result<u16> {
        match self.value.as_u64() {
            Some(n) if n <= u64::from(u16::MAX) => Ok(n as u16),
            _ => Err(self.expected("a port number from 0 to 65535")),
        }
    }

    /// An integer from `min` to `max`.
    pub(super) fn integer(&self, min: u64, max: u64) -> Result<u64> {
        match self.value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.expected(&format!("an integer from {min} to {max}"))),
        }
    }

    pub(super) fn duration(&self) -> Result<Duration> {
        let s = self
            .string()
            .map_err(|_| self.expected("a duration string such as \"5s\""))?;
        parse_duration(s).map_err(|e| self.invalid(e))
    }

    /// One of `allowed` (case-insensitive); returned uppercased.
    pub(super) fn enumeration(&self, allowed: &[&str]) -> Result<String> {
        let s = self.string()?;
        let upper = s.to_ascii_uppercase();
        if allowed.contains(&upper.as_str()) {
            Ok(upper)
        } else {
            Err(self.invalid(format!(
                "{s:?} is not supported by host-shim (one of: {})",
                allowed.join(", ")
            )))
        }
    }
}

impl<'a> Object<'a> {
    /// The field, unless absent or null.
    pub(super) fn get(&self, key: &str) -> Option<Node<'a>> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node {
                value,
                path: join(&self.path, key),
            }),
        }
    }

    pub(super) fn req(&self, key: &str) -> Result<Node<'a>> {
        self.get(key)
            .ok_or_else(|| invalid(&join(&self.path, key), "missing required field"))
    }

    pub(super) fn string_or_empty(&self, key: &str) -> Result<String> {
        Ok(self
            .get(key)
            .map(|n| n.string())
            .transpose()?
            .unwrap_or("")
            .to_string())
    }
}

/// The `@type` of a typed_config mapping, before its fields are known.
pub(super) fn type_url<'a>(node: &Node<'a>) -> Result<&'a str> {
    let Value::Mapping(map) = node.value else {
        return Err(node.expected("a mapping"));
    };
    match map.get("@type") {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(
            &join(&node.path, "@type"),
            format!("expected a type URL string, found {}", describe(other)),
        )),
        None => Err(invalid(
            &join(&node.path, "@type"),
            "missing required field",
        )),
    }
}
