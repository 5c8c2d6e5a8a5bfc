//! The two wires a Redis call goes out on, and how their answers are read: the relay (RESP as
//! the body of an HTTP call to the relay cluster, for stock Envoy) and Higress's
//! `proxy_redis_call`. Also the HTTP calls of background cache refreshes.

use super::ffi_redis;
use super::{buffer_raw, header_pairs, BUFFER_REDIS_CALL_RESPONSE, STATUS_OK};
use crate::http::Upstream;
use crate::redis::client::{RawReply, Wire};
use crate::redis::error::{RedisError, RedisErrorKind};
#[cfg(target_arch = "wasm32")]
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use std::time::Duration;

/// Reads the answer of a relay call inside `on_http_call_response`.
pub fn relay_reply(num_headers: usize, body_size: usize) -> RawReply {
    let status = if num_headers == 0 {
        None
    } else {
        header_pairs(MapType::HttpCallResponseHeaders)
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.trim().parse::<u16>().ok())
    };
    let body = if body_size > 0 {
        super::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default()
    } else {
        Vec::new()
    };
    RawReply::Relay { status, body }
}

/// Reads the raw reply of a Higress Redis call inside `proxy_on_redis_call_response`.
pub fn redis_call_reply(status: u32, response_size: usize) -> RawReply {
    let body = if status == STATUS_OK && response_size > 0 {
        buffer_raw(BUFFER_REDIS_CALL_RESPONSE, response_size).unwrap_or_default()
    } else {
        Vec::new()
    };
    RawReply::RedisCall { status, body }
}

/// `dispatch_http_call` through the SDK, which registers the token so that the answer reaches
/// the calling context.
#[cfg(target_arch = "wasm32")]
fn http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers, body, vec![], timeout)
}

/// Natively (unit tests) no host answers: every call is refused.
#[cfg(not(target_arch = "wasm32"))]
fn http_call(
    _cluster: &str,
    _headers: Vec<(&str, &str)>,
    _body: Option<&[u8]>,
    _timeout: Duration,
) -> Result<u32, Status> {
    Err(Status::InternalFailure)
}

/// The relay transport: RESP as the body of `POST /resp` to the relay cluster.
pub struct RelayWire {
    pub cluster: String,
    pub authority: String,
    pub token: Option<String>,
    /// The VM's own shared queue, whose `on_queue_ready` brings the root context in to send
    /// shared exchanges (None: registered lazily, or refused by the host).
    pub kick_queue: Option<u32>,
}

impl Wire for RelayWire {
    fn can_kick(&self) -> bool {
        self.kick_queue.is_some()
    }

    fn kick(&mut self) -> bool {
        self.kick_queue
            .is_some_and(|id| super::enqueue_shared_queue(id, b"k"))
    }

    fn send(&mut self, payload: &[u8], timeout_ms: u64) -> Result<u32, RedisError> {
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/resp"),
            (":authority", self.authority.as_str()),
            ("content-type", "application/x-resp"),
        ];
        if let Some(t) = &self.token {
            headers.push(("x-krowoc-relay-token", t.as_str()));
        }
        http_call(
            &self.cluster,
            headers,
            Some(payload),
            Duration::from_millis(timeout_ms),
        )
        .map_err(|status| {
            RedisError::new(
                RedisErrorKind::Dispatch,
                format!(
                    "host refused the relay call to cluster {:?} (status {status:?})",
                    self.cluster
                ),
            )
        })
    }
}

/// HTTP calls to the upstream clusters Envoy knows (background cache refreshes).
pub struct HostUpstream;

impl Upstream for HostUpstream {
    fn call(
        &mut self,
        cluster: &str,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> Result<u32, String> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        http_call(cluster, headers, None, timeout).map_err(|status| format!("{status:?}"))
    }
}

/// The Higress transport: raw RESP through `proxy_redis_call`.
pub struct RedisCallWire {
    /// Cluster name, with `?db=N` when a database is configured.
    pub upstream: String,
}

impl Wire for RedisCallWire {
    fn send(&mut self, payload: &[u8], _timeout_ms: u64) -> Result<u32, RedisError> {
        let mut token: u32 = 0;
        // SAFETY: pointers and lengths of live buffers; the host writes one u32.
        let status = unsafe {
            ffi_redis::proxy_redis_call(
                self.upstream.as_ptr(),
                self.upstream.len(),
                payload.as_ptr(),
                payload.len(),
                &mut token,
            )
        };
        if status == STATUS_OK {
            Ok(token)
        } else {
            Err(RedisError::new(
                RedisErrorKind::Dispatch,
                format!(
                    "host refused proxy_redis_call to {:?} (status {status})",
                    self.upstream
                ),
            ))
        }
    }
}

/// `proxy_redis_init`: tells the host the credentials and timeout for `upstream`.
pub fn redis_init(
    upstream: &str,
    username: &str,
    password: &str,
    timeout_ms: u64,
) -> Result<(), u32> {
    let timeout = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
    // SAFETY: pointers and lengths of live strings.
    let status = unsafe {
        ffi_redis::proxy_redis_init(
            upstream.as_ptr(),
            upstream.len(),
            username.as_ptr(),
            username.len(),
            password.as_ptr(),
            password.len(),
            timeout,
        )
    };
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(status)
    }
}

/// Whether this build has the Higress Redis imports.
pub const HAS_REDIS_CALL: bool = cfg!(feature = "redis-call");
