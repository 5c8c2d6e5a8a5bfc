//! The thin layer over proxy-wasm hostcalls; every `unsafe` FFI call of the filter is here.
//!
//! The SDK's hostcall wrappers panic on a status they do not expect (a panic traps the VM), and
//! its header-map readers panic on non-UTF-8 bytes, which HTTP allows in header values. So this
//! module declares the raw imports it needs and handles every status itself. The SDK is used
//! only for `proxy_log` (the host always answers Ok) and `dispatch_http_call`, whose token the
//! SDK must register to route the answer back to the calling context (its accepted statuses are
//! Ok, BadArgument and InternalFailure, which is what Envoy returns).
//!
//! Natively (unit tests) the raw imports are replaced by stubs that answer Unimplemented, logs
//! go nowhere and HTTP calls are refused, so code that reaches the host still links and runs.
//!
//! Map, buffer, stream and metric kinds are `proxy_wasm::types` enums; the two Redis wires
//! (relay and `proxy_redis_call`) and the refresh calls are in [`wire`].

pub mod wire;

pub use wire::{
    redis_call_reply, redis_init, relay_reply, HostUpstream, RedisCallWire, RelayWire,
    HAS_REDIS_CALL,
};

#[cfg(target_arch = "wasm32")]
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, StreamType};
use std::ptr::null_mut;

/// ABI status codes used here.
pub const STATUS_OK: u32 = 0;
pub const STATUS_NOT_FOUND: u32 = 1;
pub const STATUS_UNIMPLEMENTED: u32 = 12;

/// Higress's buffer of a Redis call's reply (not in the proxy-wasm ABI's `BufferType`).
const BUFFER_REDIS_CALL_RESPONSE: u32 = 9;

#[cfg(target_arch = "wasm32")]
mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_current_time_nanoseconds(ret_time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            ret_data: *mut *mut u8,
            ret_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            ret_data: *mut *mut u8,
            ret_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            ret_data: *mut *mut u8,
            ret_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            ret_data: *mut *mut u8,
            ret_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            ret_id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: i64) -> u32;
        pub fn proxy_register_shared_queue(
            name_data: *const u8,
            name_size: usize,
            ret_id: *mut u32,
        ) -> u32;
        pub fn proxy_enqueue_shared_queue(
            queue_id: u32,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_dequeue_shared_queue(
            queue_id: u32,
            ret_data: *mut *mut u8,
            ret_size: *mut usize,
        ) -> u32;
    }

    // std imports it too (for its hashers' keys); declared here to see its errno, not trap.
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        pub fn random_get(buf: *mut u8, buf_len: usize) -> i32;
    }

    #[cfg(feature = "redis-call")]
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_redis_init(
            upstream_data: *const u8,
            upstream_size: usize,
            username_data: *const u8,
            username_size: usize,
            password_data: *const u8,
            password_size: usize,
            timeout_ms: u32,
        ) -> u32;
        pub fn proxy_redis_call(
            upstream_data: *const u8,
            upstream_size: usize,
            query_data: *const u8,
            query_size: usize,
            ret_token: *mut u32,
        ) -> u32;
    }
}

/// Stand-ins for native builds (unit tests never reach the host).
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod ffi {
    use super::STATUS_UNIMPLEMENTED as U;
    pub unsafe fn proxy_get_current_time_nanoseconds(_: *mut u64) -> u32 {
        U
    }
    pub unsafe fn proxy_set_tick_period_milliseconds(_: u32) -> u32 {
        U
    }
    pub unsafe fn proxy_get_buffer_bytes(
        _: u32,
        _: usize,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_get_header_map_pairs(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        U
    }
    pub unsafe fn proxy_get_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_replace_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_get_property(
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_set_effective_context(_: u32) -> u32 {
        U
    }
    pub unsafe fn proxy_continue_stream(_: u32) -> u32 {
        U
    }
    pub unsafe fn proxy_send_local_response(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: i32,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
        U
    }
    pub unsafe fn proxy_increment_metric(_: u32, _: i64) -> u32 {
        U
    }
    pub unsafe fn proxy_record_metric(_: u32, _: i64) -> u32 {
        U
    }
    pub unsafe fn proxy_register_shared_queue(_: *const u8, _: usize, _: *mut u32) -> u32 {
        U
    }
    pub unsafe fn proxy_enqueue_shared_queue(_: u32, _: *const u8, _: usize) -> u32 {
        U
    }
    pub unsafe fn proxy_dequeue_shared_queue(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        U
    }
    /// WASI errno 52 (`nosys`).
    pub unsafe fn random_get(_: *mut u8, _: usize) -> i32 {
        52
    }
}

#[cfg(not(all(target_arch = "wasm32", feature = "redis-call")))]
#[allow(clippy::missing_safety_doc)]
mod ffi_redis {
    use super::STATUS_UNIMPLEMENTED as U;
    pub unsafe fn proxy_redis_init(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
    ) -> u32 {
        U
    }
    pub unsafe fn proxy_redis_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut u32,
    ) -> u32 {
        U
    }
}
#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
use ffi as ffi_redis;

/// Takes ownership of bytes the host allocated in this module (with the SDK's allocator, as
/// a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data`/`size` must come from a successful hostcall that hands over a buffer.
unsafe fn take_host_bytes(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    Some(Vec::from_raw_parts(data, size, size))
}

/// Logs one line; a failing log call is ignored (there is nowhere else to report it).
#[cfg(target_arch = "wasm32")]
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Natively (unit tests) there is no host to log to: the SDK's `proxy_log` import is absent.
#[cfg(not(target_arch = "wasm32"))]
pub fn log(_level: LogLevel, _message: &str) {}

/// Milliseconds of the host's wall clock; 0 if the host cannot tell.
pub fn now_ms() -> u64 {
    let mut ns: u64 = 0;
    // SAFETY: the host writes one u64 through the pointer.
    let status = unsafe { ffi::proxy_get_current_time_nanoseconds(&mut ns) };
    if status == STATUS_OK {
        ns / 1_000_000
    } else {
        0
    }
}

/// Nanoseconds of the host's wall clock; 0 if the host cannot tell.
pub fn now_ns() -> u64 {
    let mut ns: u64 = 0;
    // SAFETY: the host writes one u64 through the pointer.
    let status = unsafe { ffi::proxy_get_current_time_nanoseconds(&mut ns) };
    if status == STATUS_OK {
        ns
    } else {
        0
    }
}

/// Eight bytes from the host's WASI `random_get` (Envoy's and wasmtime's draw from the OS);
/// None when the host refuses (natively: always).
pub fn random_u64() -> Option<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is valid and writable for its 8 bytes during the call.
    let errno = unsafe { ffi::random_get(buf.as_mut_ptr(), buf.len()) };
    (errno == 0).then(|| u64::from_le_bytes(buf))
}

pub fn set_tick_period_ms(ms: u32) -> bool {
    // SAFETY: plain value argument.
    unsafe { ffi::proxy_set_tick_period_milliseconds(ms) == STATUS_OK }
}

/// A host buffer's bytes (up to `max_size`); None when absent or refused.
pub fn buffer(buffer_type: BufferType, max_size: usize) -> Option<Vec<u8>> {
    buffer_raw(buffer_type as u32, max_size)
}

/// [`buffer`] by number, for buffers the ABI's `BufferType` lacks (Higress's Redis reply).
fn buffer_raw(buffer_type: u32, max_size: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers to locals; on Ok the host hands over `size` bytes at `data`.
    unsafe {
        match ffi::proxy_get_buffer_bytes(buffer_type, 0, max_size, &mut data, &mut size) {
            STATUS_OK => take_host_bytes(data, size),
            _ => None,
        }
    }
}

/// The plugin configuration bytes (`configuration` of the wasm filter); empty when none.
pub fn plugin_configuration() -> Vec<u8> {
    buffer(BufferType::PluginConfiguration, usize::MAX).unwrap_or_default()
}

/// All pairs of a header map, values decoded lossily (non-UTF-8 bytes become U+FFFD).
pub fn header_pairs(map_type: MapType) -> Vec<(String, String)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `buffer`.
    let bytes = unsafe {
        match ffi::proxy_get_header_map_pairs(map_type as u32, &mut data, &mut size) {
            STATUS_OK => take_host_bytes(data, size),
            _ => None,
        }
    };
    bytes.map(|b| parse_header_map(&b)).unwrap_or_default()
}

/// One header's value, decoded lossily; `None` when absent.
pub fn header_value(map_type: MapType, name: &str) -> Option<String> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `buffer`; `name` is a live string.
    let bytes = unsafe {
        match ffi::proxy_get_header_map_value(
            map_type as u32,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        ) {
            STATUS_OK => take_host_bytes(data, size),
            _ => None,
        }
    };
    bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Sets a header (replacing any value of that name); false if the host refused.
pub fn replace_header(map_type: MapType, name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths of live strings.
    unsafe {
        ffi::proxy_replace_header_map_value(
            map_type as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        ) == STATUS_OK
    }
}

/// A host property such as `["source", "address"]`.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `buffer`.
    unsafe {
        match ffi::proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) {
            STATUS_OK => take_host_bytes(data, size),
            _ => None,
        }
    }
}

/// Makes `context_id` the context later hostcalls act on; false if it no longer exists.
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: plain value argument.
    unsafe { ffi::proxy_set_effective_context(context_id) == STATUS_OK }
}

/// Registers a shared queue named `name` for the calling root context (its
/// `on_queue_ready` is called after each enqueue); its id, None if the host refuses.
pub fn register_shared_queue(name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: `name` is live for the call; the host writes one u32.
    let status = unsafe { ffi::proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
    (status == STATUS_OK).then_some(id)
}

/// Puts `value` on shared queue `id`; false if the host refuses.
pub fn enqueue_shared_queue(id: u32, value: &[u8]) -> bool {
    // SAFETY: `value` is live for the call.
    unsafe { ffi::proxy_enqueue_shared_queue(id, value.as_ptr(), value.len()) == STATUS_OK }
}

/// Takes every item off shared queue `id` (they carry nothing but the wake-up).
pub fn drain_shared_queue(id: u32) {
    // A bound, not a loop on the host's word: a queue holds a handful of wake-ups.
    for _ in 0..1024 {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer and a size it allocated in this module.
        let status = unsafe { ffi::proxy_dequeue_shared_queue(id, &mut data, &mut size) };
        if status != STATUS_OK {
            return;
        }
        // SAFETY: ownership of the host's allocation passes to us; dropped at once.
        drop(unsafe { take_host_bytes(data, size) });
    }
}

/// Resumes the paused request of the effective context.
pub fn resume_request() -> bool {
    // SAFETY: plain value argument.
    unsafe { ffi::proxy_continue_stream(StreamType::HttpRequest as u32) == STATUS_OK }
}

/// Resumes the held response of the effective context.
pub fn resume_response() -> bool {
    // SAFETY: plain value argument.
    unsafe { ffi::proxy_continue_stream(StreamType::HttpResponse as u32) == STATUS_OK }
}

/// Answers the effective context's request from the filter.
pub fn send_local_response(
    status: u32,
    details: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> bool {
    let map = serialize_header_map(headers);
    // SAFETY: pointers and lengths of live buffers.
    unsafe {
        ffi::proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        ) == STATUS_OK
    }
}

pub fn define_metric(metric_type: MetricType, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: pointer and length of a live string; the host writes one u32.
    let status =
        unsafe { ffi::proxy_define_metric(metric_type as u32, name.as_ptr(), name.len(), &mut id) };
    (status == STATUS_OK).then_some(id)
}

pub fn increment_metric(id: Option<u32>, delta: i64) {
    if let Some(id) = id {
        // SAFETY: plain value arguments.
        let _ = unsafe { ffi::proxy_increment_metric(id, delta) };
    }
}

/// Records a value of a histogram (or sets a gauge).
pub fn record_metric(id: Option<u32>, value: i64) {
    if let Some(id) = id {
        // SAFETY: plain value arguments.
        let _ = unsafe { ffi::proxy_record_metric(id, value) };
    }
}

/// The header map byte layout of the ABI: u32 count, (key_len, value_len) pairs, then each key
/// and value followed by a NUL. Malformed input yields the pairs read before the problem.
pub fn parse_header_map(bytes: &[u8]) -> Vec<(String, String)> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let Some(count) = u32_at(0) else {
        return Vec::new();
    };
    let Some(mut p) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(count.min(256));
    for i in 0..count {
        let (Some(klen), Some(vlen)) = (u32_at(4 + i * 8), u32_at(8 + i * 8)) else {
            break;
        };
        let Some(key) = p.checked_add(klen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p += klen + 1;
        let Some(value) = p.checked_add(vlen).and_then(|end| bytes.get(p..end)) else {
            break;
        };
        p += vlen + 1;
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    out
}

pub fn serialize_header_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip() {
        let pairs = vec![
            (":status".to_string(), "200".to_string()),
            ("x-a".to_string(), String::new()),
        ];
        let bytes = serialize_header_map(&pairs);
        assert_eq!(&bytes[..4], &2u32.to_le_bytes());
        assert_eq!(parse_header_map(&bytes), pairs);
        assert!(parse_header_map(&[]).is_empty());
    }

    #[test]
    fn non_utf8_header_values_do_not_trap() {
        let mut bytes = serialize_header_map(&[("x".to_string(), "ab".to_string())]);
        let at = bytes.len() - 3;
        bytes[at] = 0xff;
        let parsed = parse_header_map(&bytes);
        assert_eq!(parsed[0].1, "\u{fffd}b");
    }

    #[test]
    fn truncated_header_maps_yield_what_was_complete() {
        let bytes = serialize_header_map(&[
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        assert_eq!(parse_header_map(&bytes[..bytes.len() - 2]).len(), 1);
        assert!(parse_header_map(&[0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(parse_header_map(&[1, 0]).is_empty());
    }
}
