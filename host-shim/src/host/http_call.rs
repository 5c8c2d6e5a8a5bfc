//! `proxy_http_call`: validated like Envoy's `httpCall`, queued as a callout, and answered later
//! through `proxy_on_http_call_response`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::Linker;

use super::{read_bytes, read_string, write_u32, HostCaller};
use crate::abi::{decode_header_map, Status};
use crate::state::{Callout, HostState};

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: HostCaller<'_>,
         up_ptr: i32,
         up_len: i32,
         hdrs_ptr: i32,
         hdrs_len: i32,
         body_ptr: i32,
         body_len: i32,
         trl_ptr: i32,
         trl_len: i32,
         timeout_ms: i32,
         ret_token: i32|
         -> i32 {
            let read = |caller: &mut HostCaller<'_>| -> Result<_, Status> {
                let cluster = read_string(caller, up_ptr, up_len)?;
                let headers = decode_header_map(&read_bytes(caller, hdrs_ptr, hdrs_len)?)
                    .ok_or(Status::SerializationFailure)?;
                let body = read_bytes(caller, body_ptr, body_len)?;
                let trailers = decode_header_map(&read_bytes(caller, trl_ptr, trl_len)?)
                    .ok_or(Status::SerializationFailure)?;
                Ok((cluster, headers, body, trailers))
            };
            let (cluster, headers, body, trailers) = match read(&mut caller) {
                Ok(v) => v,
                Err(s) => return s.code(),
            };
            if let Err(s) = validate(caller.data(), &cluster, &headers, timeout_ms) {
                return s.code();
            }
            let state = caller.data_mut();
            let token = state.new_token(false);
            state
                .shared
                .counters
                .http_callouts
                .fetch_add(1, Ordering::Relaxed);
            state.callouts.push(Callout::Http {
                token,
                cluster,
                headers,
                body,
                trailers,
                timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64)),
            });
            match write_u32(&mut caller, ret_token, token) {
                Ok(()) => Status::Ok.code(),
                Err(s) => s.code(),
            }
        },
    )?;
    Ok(())
}

/// Envoy's checks: a known cluster, a non-negative timeout, and `:method`, `:path` and
/// `:authority` present and non-empty.
fn validate(
    state: &HostState,
    cluster: &str,
    headers: &[(String, Vec<u8>)],
    timeout_ms: i32,
) -> Result<(), Status> {
    if timeout_ms < 0 || !state.clusters.contains_key(cluster) {
        return Err(Status::BadArgument);
    }
    for required in [":method", ":path", ":authority"] {
        if !headers.iter().any(|(k, v)| k == required && !v.is_empty()) {
            return Err(Status::BadArgument);
        }
    }
    Ok(())
}
