//! Phases: which header maps and properties a host lets a plugin read in which callback, and how
//! request bodies are delivered. The reads use the raw imports (`proxy_get_header_map_pairs`,
//! `proxy_get_property`), because the SDK panics on a status it does not expect.
//!
//! Each callback — `rh` (request headers), `rb` (request body, every call), `sh` (response
//! headers), `sb` (response body, every call), `log` — records:
//! * `maps`: for map types 0–3, `"0": [pairs status, pair count, value status]` — the status of
//!   `proxy_get_header_map_pairs`, the count it returned, and the status of
//!   `proxy_get_header_map_value` for a name the map would hold ([`MAP_PROBES`]);
//! * `props`: for each path of [`PROPERTIES`], `null` (NotFound) or the value as hex, or
//!   `"status N"` for any other status;
//! * for bodies, `n` and `eos`.
//!
//! * `/report?id=X` — answers locally with the `log` record (which also lists the names in
//!   the request and response header maps as `names`) that the request with
//!   `x-phase-id: X` left in shared data (`abi/phases/X`), `404` when there is none yet.
//! * `/pause-call` — pauses the request headers on an HTTP call to cluster `upstream`, records
//!   `cb` in the call's callback and resumes the request there; then as below.
//! * anything else — passes through to the upstream; drops the response's `content-length`,
//!   holds the response body to its end and replaces it with the JSON
//!   `{"rh": …, "rb": [ … ], "sh": …, "sb": [ … ], "upstream": <the body it replaced>}`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use serde_json::{json, Map, Value};

use crate::{path_only, query_param, AbiStream};

/// Header maps probed in every phase (request/response headers and trailers), each with a name
/// read through `proxy_get_header_map_value`.
const MAP_PROBES: &[(u32, &str)] = &[
    (0, ":path"),
    (1, "x-trailer"),
    (2, ":status"),
    (3, "x-trailer"),
];

/// Properties probed in every phase.
pub const PROPERTIES: &[&str] = &[
    "request.size",
    "request.total_size",
    "response.size",
    "response.total_size",
    "response.code",
    "response.code_details",
    "response.flags",
    "connection.mtls",
    "upstream.address",
    "upstream.port",
    "cluster_name",
    "route_name",
    "xds.route_name",
    "xds.cluster_name",
];

#[cfg(target_arch = "wasm32")]
#[allow(clashing_extern_declarations)] // the SDK declares the same imports with its enum types
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        ret_ptr: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_ptr: *const u8,
        key_len: usize,
        ret_ptr: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_ptr: *const u8,
        path_len: usize,
        ret_ptr: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
}

/// Takes ownership of bytes the host allocated with our allocator.
#[cfg(target_arch = "wasm32")]
unsafe fn owned(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: the host allocated exactly `len` bytes with `proxy_on_memory_allocate`.
        unsafe { Vec::from_raw_parts(ptr, len, len) }
    }
}

/// The raw status of reading header map `map_type` and its number of pairs (the count word of
/// the returned bytes, 0 for no bytes).
#[cfg(target_arch = "wasm32")]
pub fn map_pairs(map_type: u32) -> (u32, u32) {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: valid out-pointers; a returned buffer is taken over.
    let (status, bytes) = unsafe {
        let status = proxy_get_header_map_pairs(map_type, &mut ptr, &mut len);
        (
            status,
            if status == 0 {
                owned(ptr, len)
            } else {
                Vec::new()
            },
        )
    };
    let count = bytes
        .get(0..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    (status, count)
}

/// The raw status of reading one header of map `map_type`.
#[cfg(target_arch = "wasm32")]
pub fn map_value_status(map_type: u32, key: &str) -> u32 {
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `key` lives for the call; valid out-pointers; a returned buffer is taken over.
    unsafe {
        let status =
            proxy_get_header_map_value(map_type, key.as_ptr(), key.len(), &mut ptr, &mut len);
        if status == 0 {
            drop(owned(ptr, len));
        }
        status
    }
}

/// The raw status and value of a property (`.` separates path segments).
#[cfg(target_arch = "wasm32")]
pub fn property(path: &str) -> (u32, Vec<u8>) {
    let raw = path.replace('.', "\0");
    let (mut ptr, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `raw` lives for the call; valid out-pointers.
    unsafe {
        let status = proxy_get_property(raw.as_ptr(), raw.len(), &mut ptr, &mut len);
        if status == 0 {
            (0, owned(ptr, len))
        } else {
            (status, Vec::new())
        }
    }
}

// Natively there is no host.
#[cfg(not(target_arch = "wasm32"))]
pub fn map_pairs(_map_type: u32) -> (u32, u32) {
    (12, 0)
}
#[cfg(not(target_arch = "wasm32"))]
pub fn map_value_status(_map_type: u32, _key: &str) -> u32 {
    12
}
#[cfg(not(target_arch = "wasm32"))]
pub fn property(_path: &str) -> (u32, Vec<u8>) {
    (12, Vec::new())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one callback could read.
pub fn observe() -> Map<String, Value> {
    let maps: Map<String, Value> = MAP_PROBES
        .iter()
        .map(|(m, key)| {
            let (status, count) = map_pairs(*m);
            (
                m.to_string(),
                json!([status, count, map_value_status(*m, key)]),
            )
        })
        .collect();
    let props: Map<String, Value> = PROPERTIES
        .iter()
        .map(|p| {
            let v = match property(p) {
                (0, bytes) => json!(hex(&bytes)),
                (1, _) => Value::Null,
                (status, _) => json!(format!("status {status}")),
            };
            (p.to_string(), v)
        })
        .collect();
    let mut out = Map::new();
    out.insert("maps".into(), Value::Object(maps));
    out.insert("props".into(), Value::Object(props));
    out
}

fn report_key(id: &str) -> String {
    format!("abi/phases/{id}")
}

fn is_report(s: &AbiStream) -> bool {
    path_only(&s.state.path) == "/report"
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    if is_report(s) {
        let id = query_param(&s.state.path, "id").unwrap_or_default();
        match s.get_shared_data(&report_key(&id)).0 {
            Some(record) => s.reply(200, &[("content-type", "application/json".into())], &record),
            None => s.reply(404, &[], b"no report yet"),
        }
        return Action::Pause;
    }
    s.state.phase_id = s.request_header("x-phase-id").unwrap_or_default();
    s.state.phases.insert("rh".into(), Value::Object(observe()));
    if path_only(&s.state.path) == "/pause-call" {
        let call = s.dispatch_http_call(
            "upstream",
            vec![
                (":method", "GET"),
                (":path", "/side"),
                (":authority", "upstream"),
            ],
            None,
            vec![],
            Duration::from_secs(5),
        );
        return match call {
            Ok(_) => Action::Pause,
            Err(status) => {
                s.reply(500, &[], format!("dispatch failed: {status:?}").as_bytes());
                Action::Pause
            }
        };
    }
    Action::Continue
}

/// The `/pause-call` callback: records what it can read, then resumes the request.
pub fn on_http_call_response(s: &mut AbiStream) {
    s.state.phases.insert("cb".into(), Value::Object(observe()));
    s.resume_http_request();
}

fn push_body_call(s: &mut AbiStream, phase: &str, n: usize, eos: bool) {
    let mut call = observe();
    call.insert("n".into(), json!(n));
    call.insert("eos".into(), json!(eos));
    let calls = s
        .state
        .phases
        .entry(phase.to_string())
        .or_insert_with(|| json!([]));
    if let Value::Array(list) = calls {
        list.push(Value::Object(call));
    }
}

pub fn on_request_body(s: &mut AbiStream, n: usize, eos: bool) -> Action {
    if !is_report(s) {
        push_body_call(s, "rb", n, eos);
    }
    Action::Continue
}

pub fn on_response_headers(s: &mut AbiStream) -> Action {
    if is_report(s) {
        return Action::Continue;
    }
    s.state.phases.insert("sh".into(), Value::Object(observe()));
    s.set_http_response_header("content-length", None);
    Action::Continue
}

pub fn on_response_body(s: &mut AbiStream, n: usize, eos: bool) -> Action {
    if is_report(s) {
        return Action::Continue;
    }
    push_body_call(s, "sb", n, eos);
    if !eos {
        return Action::Pause;
    }
    let upstream = s.get_http_response_body(0, n).unwrap_or_default();
    let mut report = s.state.phases.clone();
    report.insert(
        "upstream".into(),
        json!(String::from_utf8_lossy(&upstream).into_owned()),
    );
    s.set_http_response_body(0, n, Value::Object(report).to_string().as_bytes());
    Action::Continue
}

pub fn on_log(s: &mut AbiStream) {
    if is_report(s) || s.state.phase_id.is_empty() {
        return;
    }
    let mut record = observe();
    // Both header maps are reachable in the log phase: which names they hold by then.
    let names = |pairs: Vec<(String, String)>| -> Vec<String> {
        pairs.into_iter().map(|(k, _)| k).collect()
    };
    record.insert(
        "names".into(),
        json!({
            "0": names(s.get_http_request_headers()),
            "2": names(s.get_http_response_headers()),
        }),
    );
    let record = Value::Object(record).to_string();
    let _ = s.set_shared_data(
        &report_key(&s.state.phase_id),
        Some(record.as_bytes()),
        None,
    );
}
