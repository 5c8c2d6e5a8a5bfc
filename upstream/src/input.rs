//! Reading client input — JSON bodies with a size cap, and query parameters — so that every
//! refusal is this crate's JSON [`Error`] naming what is wrong, never axum's plain-text
//! rejections.

use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind};
use crate::AppState;

/// A request body parsed as a JSON object; `None` when the body is empty (or only
/// whitespace). The content type is not checked, so `curl -d '{...}'` works as is.
///
/// Refusals: over `max_body_bytes` → 413; not JSON, or JSON but not an object → 400.
#[derive(Debug)]
pub struct JsonObject(pub Option<Map<String, Value>>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        let limit = state.config().max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(declared) = declared {
            if declared > limit as u64 {
                return Err(too_large(limit, Some(declared)));
            }
        }
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large(limit, None))
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::MalformedJson,
                    format!("could not read the request body: {e}"),
                ))
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonObject(None));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(Some(map))),
            Ok(other) => Err(Error::new(
                ErrorKind::MalformedJson,
                format!(
                    "the body must be a JSON object, got {}",
                    json_type_name(&other)
                ),
            )),
            Err(e) => Err(Error::new(
                ErrorKind::MalformedJson,
                format!("the body is not valid JSON: {e}"),
            )),
        }
    }
}

fn too_large(limit: usize, declared: Option<u64>) -> Error {
    let size = match declared {
        Some(n) => format!("{n} bytes"),
        None => "larger than that".to_string(),
    };
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!("the body may be at most {limit} bytes; this one is {size}"),
    )
}

/// Refuses fields outside `allowed`, naming the first unknown one (a misspelt `user_id` must
/// not silently turn into "purge everything").
pub fn reject_unknown_fields(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), Error> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(Error::invalid_field(
            unknown,
            format!(
                "unknown field `{unknown}`; expected only {}",
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// "string", "number", ... for error messages.
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The query string's parameters, in order. Malformed query strings are a 400 naming `query`.
#[derive(Debug, Default)]
pub struct QueryParams(pub Vec<(String, String)>);

impl QueryParams {
    /// The value of `name` if given once; given twice is an error naming it.
    pub fn single(&self, name: &str) -> Result<Option<&str>, Error> {
        let mut found = self.0.iter().filter(|(k, _)| k == name);
        let first = found.next();
        if found.next().is_some() {
            return Err(Error::invalid_field(
                name,
                format!("query parameter `{name}` is given more than once"),
            ));
        }
        Ok(first.map(|(_, v)| v.as_str()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Query::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Query(params)) => Ok(QueryParams(params)),
            Err(e) => Err(Error::invalid_field(
                "query",
                format!("the query string cannot be read: {}", e.body_text()),
            )),
        }
    }
}

/// `text` for an error message, cut to 64 characters so a huge input cannot flood a response.
pub fn preview(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}
