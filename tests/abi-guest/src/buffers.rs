//! Buffers: `proxy_get_buffer_bytes` / `proxy_set_buffer_bytes` on the request body (seen by the
//! upstream) and the response body (seen by the client), buffered with `Pause` until the end of
//! the stream; the VM and plugin configuration buffers.
//!
//! * `/config` — answers locally with JSON `{"plugin": <plugin configuration>, "vm": <vm
//!   configuration>}` as read in `on_vm_start`/`on_configure` (and leaves that reply alone when
//!   it passes back through the response callbacks).
//! * anything else — drops `content-length` on the request and the response (the bodies change
//!   size, as an Envoy plugin must); pauses every request-body chunk until the end, then reads
//!   the whole body, a slice (start 2, size 3) and the tail from 1 with `max_size = usize::MAX`,
//!   and replaces the body with `rewritten:` + the body in upper case. The response headers report
//!   `x-req-body-size`, `x-req-body-slice`, `x-req-body-tail-len`, `x-req-body-callbacks`. The
//!   response body is paused to its end and replaced with `wrapped(` + body + `)`.

use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Action;

use crate::{path_only, AbiStream};

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    if path_only(&s.state.path) == "/config" {
        let body = serde_json::json!({
            "plugin": s.info.plugin_configuration,
            "vm": s.info.vm_configuration,
        });
        s.reply(200, &[], body.to_string().as_bytes());
        return Action::Pause;
    }
    s.set_http_request_header("content-length", None);
    Action::Continue
}

pub fn on_request_body(s: &mut AbiStream, size: usize, eos: bool) -> Action {
    s.state.body_callbacks += 1;
    if !eos {
        return Action::Pause;
    }
    let body = s.get_http_request_body(0, size).unwrap_or_default();
    s.state.body_seen_size = body.len();
    s.state.body_slice =
        String::from_utf8_lossy(&s.get_http_request_body(2, 3).unwrap_or_default()).into_owned();
    s.state.body_tail_len = s
        .get_http_request_body(1, usize::MAX)
        .map_or(0, |b| b.len());
    let mut rewritten = b"rewritten:".to_vec();
    rewritten.extend(body.to_ascii_uppercase());
    s.set_http_request_body(0, size, &rewritten);
    Action::Continue
}

/// The `/config` reply is the plugin's own local response: it is left as it is.
fn is_config(s: &AbiStream) -> bool {
    path_only(&s.state.path) == "/config"
}

pub fn on_response_headers(s: &mut AbiStream) -> Action {
    if is_config(s) {
        return Action::Continue;
    }
    s.set_http_response_header("content-length", None);
    let st = &s.state;
    let report = [
        ("x-req-body-size", st.body_seen_size.to_string()),
        ("x-req-body-slice", st.body_slice.clone()),
        ("x-req-body-tail-len", st.body_tail_len.to_string()),
        ("x-req-body-callbacks", st.body_callbacks.to_string()),
    ];
    for (k, v) in report {
        s.add_http_response_header(k, &v);
    }
    Action::Continue
}

pub fn on_response_body(s: &mut AbiStream, size: usize, eos: bool) -> Action {
    if is_config(s) {
        return Action::Continue;
    }
    if !eos {
        return Action::Pause;
    }
    let body = s.get_http_response_body(0, size).unwrap_or_default();
    let mut wrapped = b"wrapped(".to_vec();
    wrapped.extend_from_slice(&body);
    wrapped.push(b')');
    s.set_http_response_body(0, size, &wrapped);
    Action::Continue
}
