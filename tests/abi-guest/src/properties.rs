//! Properties: `proxy_get_property` for the attributes plugins commonly read, and
//! `proxy_set_property` followed by a read of the same path.
//!
//! Every request gets a local 200 whose JSON body maps each property path to what the host
//! returned: a string, a number for 8-byte integers, `[[name, value], …]` for header maps
//! (decoded here from the ABI's layout), `null` when the host had none. `abi.note` (two
//! segments) and `abi_note` (one) are set to `round-trip` and read back.

use proxy_wasm::traits::Context;
use proxy_wasm::types::Action;
use serde_json::{json, Map, Value};

use crate::AbiStream;

const STRINGS: &[&str] = &[
    "source.address",
    "destination.address",
    "request.path",
    "request.url_path",
    "request.query",
    "request.method",
    "request.host",
    "request.scheme",
    "request.id",
    "request.headers.x-probe",
    "request.headers.User-Agent",
    "request.headers.x-absent",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "route_name",
    "cluster_name",
    "abi.no_such_property",
];

const INTEGERS: &[&str] = &["source.port", "destination.port", "request.time"];

/// Decodes the header-map layout: u32 count, (key_len, value_len) pairs, then NUL-terminated
/// keys and values. `None` when the bytes do not add up exactly.
pub fn decode_header_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let count = u32_at(0)?;
    let mut pos = 4 + count.checked_mul(8)?;
    let mut out = Vec::new();
    for i in 0..count {
        let (k, v) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(pos..pos + k)?;
        if *bytes.get(pos + k)? != 0 {
            return None;
        }
        pos += k + 1;
        let value = bytes.get(pos..pos + v)?;
        if *bytes.get(pos + v)? != 0 {
            return None;
        }
        pos += v + 1;
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    (pos == bytes.len()).then_some(out)
}

fn split(path: &str) -> Vec<&str> {
    path.split('.').collect()
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let mut out = Map::new();
    for path in STRINGS {
        let v = s.get_property(split(path)).map_or(Value::Null, |b| {
            Value::String(String::from_utf8_lossy(&b).into_owned())
        });
        out.insert(path.to_string(), v);
    }
    for path in INTEGERS {
        let v = match s.get_property(split(path)) {
            Some(b) if b.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b);
                json!(i64::from_le_bytes(a))
            }
            Some(b) => json!(format!("not an 8-byte integer: {} bytes", b.len())),
            None => Value::Null,
        };
        out.insert(path.to_string(), v);
    }
    let headers = match s.get_property(vec!["request", "headers"]) {
        Some(b) => match decode_header_map(&b) {
            Some(pairs) => json!(pairs),
            None => json!(format!("malformed header map: {} bytes", b.len())),
        },
        None => Value::Null,
    };
    out.insert("request.headers".into(), headers);
    s.set_property(vec!["abi", "note"], Some(b"round-trip"));
    let note = s
        .get_property(vec!["abi", "note"])
        .map_or(Value::Null, |b| {
            Value::String(String::from_utf8_lossy(&b).into_owned())
        });
    out.insert("abi.note".into(), note);
    s.set_property(vec!["abi_note"], Some(b"round-trip"));
    let single = s.get_property(vec!["abi_note"]).map_or(Value::Null, |b| {
        Value::String(String::from_utf8_lossy(&b).into_owned())
    });
    out.insert("abi_note".into(), single);
    s.reply(
        200,
        &[("content-type", "application/json".into())],
        Value::Object(out).to_string().as_bytes(),
    );
    Action::Pause
}
