//! Higress Redis calls: `proxy_redis_init`, `proxy_redis_call`, the reply through the exported
//! `proxy_on_redis_call_response` and buffer 9 (RedisCallResponse). The SDK knows none of these,
//! so this module declares the imports and the export itself and switches to the calling stream
//! with `proxy_set_effective_context`, as the SDK does for HTTP calls.
//!
//! * `/ping` — `PING`; `/eval` — `EVAL <script> 1 <key> <arg>` where the script returns
//!   `{KEYS[1], ARGV[1], INCR(KEYS[1])}`; `/set` — `SET <key> <arg>`; `/malformed` — bytes that
//!   are not a RESP command (an array holding a simple string). Key from `x-redis-key`
//!   (default `abi:counter`), arg from `x-redis-arg` (default `hello`).
//! * `x-redis-cluster` (default `redis`) names the cluster for init, possibly with `?db=N` and
//!   other options; `x-redis-call-cluster` (default: the same) names it for the call;
//!   `x-redis-timeout-ms` (default 1000) goes to `proxy_redis_init`.
//!
//! The reply is a local 200 whose body is the raw RESP reply, with `x-redis-status` (the
//! callback's status), `x-redis-token-tag` (token & 3) and `x-redis-size`. A failing init or call
//! answers 500 with `x-redis-init-status` / `x-redis-call-status` (the raw status number).

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::types::{Action, LogLevel};

use crate::{log, path_only, AbiStream};

/// Higress's buffer type of a Redis reply.
#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
const REDIS_CALL_RESPONSE: u32 = 9;

#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_redis_init(
        upstream_ptr: *const u8,
        upstream_len: usize,
        username_ptr: *const u8,
        username_len: usize,
        password_ptr: *const u8,
        password_len: usize,
        timeout_ms: u32,
    ) -> u32;
    fn proxy_redis_call(
        upstream_ptr: *const u8,
        upstream_len: usize,
        query_ptr: *const u8,
        query_len: usize,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_ptr: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
}

thread_local! {
    /// Redis call token → the stream context that made the call.
    static PENDING: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
}

/// Encodes one command as a RESP array of bulk strings.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

const EVAL_SCRIPT: &str = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}";

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let cluster = s
        .request_header("x-redis-cluster")
        .unwrap_or_else(|| "redis".into());
    let key = s
        .request_header("x-redis-key")
        .unwrap_or_else(|| "abi:counter".into());
    let arg = s
        .request_header("x-redis-arg")
        .unwrap_or_else(|| "hello".into());
    let timeout_ms: u32 = s
        .request_header("x-redis-timeout-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let query = match path_only(&s.state.path) {
        "/ping" => encode_command(&[b"PING"]),
        "/eval" => encode_command(&[
            b"EVAL",
            EVAL_SCRIPT.as_bytes(),
            b"1",
            key.as_bytes(),
            arg.as_bytes(),
        ]),
        "/set" => encode_command(&[b"SET", key.as_bytes(), arg.as_bytes()]),
        "/malformed" => b"*1\r\n+PING\r\n".to_vec(),
        other => {
            s.reply(404, &[], format!("no redis variant {other}").as_bytes());
            return Action::Pause;
        }
    };
    let init = redis_init(&cluster, timeout_ms);
    if init != 0 {
        s.reply(
            500,
            &[("x-redis-init-status", init.to_string())],
            b"redis init failed",
        );
        return Action::Pause;
    }
    let call_cluster = s
        .request_header("x-redis-call-cluster")
        .unwrap_or_else(|| cluster.clone());
    match redis_call(&call_cluster, &query) {
        Ok(token) => {
            PENDING.with(|p| p.borrow_mut().insert(token, s.context_id));
            Action::Pause
        }
        Err(status) => {
            s.reply(
                500,
                &[("x-redis-call-status", status.to_string())],
                b"redis call failed",
            );
            Action::Pause
        }
    }
}

#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
fn redis_init(cluster: &str, timeout_ms: u32) -> u32 {
    // SAFETY: every pointer/length pair names a live slice for the duration of the call.
    unsafe {
        proxy_redis_init(
            cluster.as_ptr(),
            cluster.len(),
            [].as_ptr(),
            0,
            [].as_ptr(),
            0,
            timeout_ms,
        )
    }
}

#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
fn redis_call(cluster: &str, query: &[u8]) -> Result<u32, u32> {
    let mut token = 0u32;
    // SAFETY: the slices live for the call; `token` is a valid out-pointer.
    let status = unsafe {
        proxy_redis_call(
            cluster.as_ptr(),
            cluster.len(),
            query.as_ptr(),
            query.len(),
            &mut token,
        )
    };
    if status == 0 {
        Ok(token)
    } else {
        Err(status)
    }
}

/// The reply bytes in buffer 9; the host allocated them with our allocator.
#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
fn redis_reply(size: usize) -> Result<Vec<u8>, u32> {
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len: usize = 0;
    // SAFETY: valid out-pointers; on success the host hands us an allocation of exactly `len`
    // bytes from `proxy_on_memory_allocate`, which we own (as the SDK does for every buffer).
    unsafe {
        let status = proxy_get_buffer_bytes(REDIS_CALL_RESPONSE, 0, size, &mut ptr, &mut len);
        if status != 0 {
            return Err(status);
        }
        if ptr.is_null() {
            return Ok(Vec::new());
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

// Natively (clippy, `cargo test --workspace`) there is no host, and without the `redis-call`
// feature (the build for stock Envoy) no import: the calls report Unimplemented.
#[cfg(not(all(target_arch = "wasm32", feature = "redis-call")))]
fn redis_init(_cluster: &str, _timeout_ms: u32) -> u32 {
    12
}
#[cfg(not(all(target_arch = "wasm32", feature = "redis-call")))]
fn redis_call(_cluster: &str, _query: &[u8]) -> Result<u32, u32> {
    Err(12)
}
#[cfg(not(all(target_arch = "wasm32", feature = "redis-call")))]
fn redis_reply(_size: usize) -> Result<Vec<u8>, u32> {
    Err(12)
}

/// Higress's callback: the reply to `token` is in buffer 9 (`size` bytes) when `status` is 0.
#[no_mangle]
pub extern "C" fn proxy_on_redis_call_response(_root: u32, token: u32, status: u32, size: usize) {
    let Some(context_id) = PENDING.with(|p| p.borrow_mut().remove(&token)) else {
        log(
            LogLevel::Error,
            &format!("redis reply for unknown token {token}"),
        );
        return;
    };
    if let Err(s) = proxy_wasm::hostcalls::set_effective_context(context_id) {
        log(
            LogLevel::Error,
            &format!("set_effective_context({context_id}): {s:?}"),
        );
        return;
    }
    let (reply, read_status) = match redis_reply(size) {
        Ok(r) => (r, 0),
        Err(s) => (Vec::new(), s),
    };
    let headers = [
        ("x-redis-status", status.to_string()),
        ("x-redis-token-tag", (token & 3).to_string()),
        ("x-redis-size", size.to_string()),
        ("x-redis-read-status", read_status.to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(s) = proxy_wasm::hostcalls::send_http_response(200, headers, Some(&reply)) {
        log(
            LogLevel::Error,
            &format!("send_http_response after a redis reply: {s:?}"),
        );
    }
}
