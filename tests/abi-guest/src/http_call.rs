//! HTTP calls: `proxy_http_call`, then `proxy_on_http_call_response` with the call's status,
//! headers and body (`proxy_get_header_map_pairs(6)`, `proxy_get_buffer_bytes(4)`).
//!
//! Request headers steer the call:
//! * `x-call-cluster` (default `upstream`), `x-call-path` (default `/callout`),
//!   `x-call-timeout-ms` (default 5000), `x-call-omit-authority` (send no `:authority`),
//!   `x-call-body` (POST this body; otherwise GET), `x-call-upstream-delay-ms` (passed to the
//!   upstream as `x-upstream-delay-ms`).
//! * `x-call-mode: resume` — the callback adds `x-call-status` and `x-call-body-len` to the
//!   request and resumes it (the upstream sees them); otherwise the callback answers locally
//!   with `x-call-status`, `x-call-headers` (count), `x-call-token-ok`, `x-call-get-status`
//!   (the code `proxy_get_status` reports) and the call's body.
//!
//! When the dispatch itself fails the reply is a local 500 with `x-dispatch-error: <Status>`.

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::AbiStream;

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let cluster = s
        .request_header("x-call-cluster")
        .unwrap_or_else(|| "upstream".into());
    let path = s
        .request_header("x-call-path")
        .unwrap_or_else(|| "/callout".into());
    let timeout_ms: u64 = s
        .request_header("x-call-timeout-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let body = s.request_header("x-call-body");
    let delay = s.request_header("x-call-upstream-delay-ms");
    s.state.call_mode = s.request_header("x-call-mode").unwrap_or_default();

    let method = if body.is_some() { "POST" } else { "GET" };
    let mut headers = vec![
        (":method", method),
        (":path", path.as_str()),
        ("x-callout-from", "abi-test-guest"),
    ];
    if s.request_header("x-call-omit-authority").is_none() {
        headers.push((":authority", "upstream"));
    }
    if let Some(d) = &delay {
        headers.push(("x-upstream-delay-ms", d.as_str()));
    }
    match s.dispatch_http_call(
        &cluster,
        headers,
        body.as_deref().map(str::as_bytes),
        vec![],
        Duration::from_millis(timeout_ms),
    ) {
        Ok(token) => {
            s.state.call_token = Some(token);
            Action::Pause
        }
        Err(status) => {
            s.reply(
                500,
                &[("x-dispatch-error", format!("{status:?}"))],
                b"dispatch failed",
            );
            Action::Pause
        }
    }
}

pub fn on_response(
    s: &mut AbiStream,
    token: u32,
    n_headers: usize,
    body_size: usize,
    _n_trailers: usize,
) {
    let status = s
        .get_http_call_response_header(":status")
        .unwrap_or_else(|| "<none>".into());
    let body = s
        .get_http_call_response_body(0, body_size)
        .unwrap_or_default();
    let token_ok = (s.state.call_token == Some(token)).to_string();
    if s.state.call_mode == "resume" {
        s.add_http_request_header("x-call-status", &status);
        s.add_http_request_header("x-call-body-len", &body.len().to_string());
        s.add_http_request_header("x-call-token-ok", &token_ok);
        s.resume_http_request();
        return;
    }
    let content_type = s
        .get_http_call_response_header("content-type")
        .unwrap_or_default();
    // proxy_get_status: Ok (0) for any response, BrokenConnection (11) after a reset.
    let call_status = proxy_wasm::hostcalls::get_grpc_status()
        .map_or_else(|e| format!("{e:?}"), |(code, _)| code.to_string());
    s.reply(
        200,
        &[
            ("x-call-status", status),
            ("x-call-headers", n_headers.to_string()),
            ("x-call-token-ok", token_ok),
            ("x-call-content-type", content_type),
            ("x-call-get-status", call_status),
        ],
        &body,
    );
}
