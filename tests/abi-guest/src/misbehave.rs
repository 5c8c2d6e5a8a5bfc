//! Misbehaviour: what the host does when a plugin traps, runs forever or asks for too much
//! memory.
//!
//! * `/panic` — panics in `on_http_request_headers` (the wasm profile aborts: a trap).
//! * `/panic-response` — panics in `on_http_response_headers`.
//! * `/panic-body` — panics in `on_http_request_body`.
//! * `/spin` — loops forever in `on_http_request_headers`.
//! * `/grow-raw?pages=N` — `memory.grow` by N pages (default 1024 = 64 MiB) and reports the
//!   instruction's result as `x-grow-result` (-1 when refused) and the memory size in pages.
//! * `/grow-vec?mib=N` — allocates and touches an N MiB vector (default 64); past the host's cap
//!   the allocator fails and the guest aborts.
//! * `/stall` — pauses in `on_http_request_headers` and never resumes.
//! * `/stall-body` — holds the whole request body (pauses on every body call: Envoy delivers
//!   the data and the end in separate calls) and never resumes.
//! * `/stall-response-body` — holds the whole response body (pauses on every body call) and
//!   never resumes.
//! * `/ok` — a local 200 with `x-ok: yes`.
//! * anything else — passes through to the upstream untouched.

use proxy_wasm::types::Action;

use crate::{path_only, query_param, AbiStream};

#[cfg(target_arch = "wasm32")]
fn grow(pages: usize) -> (isize, usize) {
    let result = core::arch::wasm32::memory_grow(0, pages) as isize;
    (result, core::arch::wasm32::memory_size(0))
}

#[cfg(not(target_arch = "wasm32"))]
fn grow(_pages: usize) -> (isize, usize) {
    (-1, 0)
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let path = s.state.path.clone();
    match path_only(&path) {
        "/panic" => panic!("abi-test-guest panics in on_http_request_headers on purpose"),
        "/panic-response" => {
            s.state.panic_on_response = true;
            Action::Continue
        }
        "/spin" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "/grow-raw" => {
            let pages = query_param(&path, "pages")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1024);
            let (result, size) = grow(pages);
            s.reply(
                200,
                &[
                    ("x-grow-result", result.to_string()),
                    ("x-memory-pages", size.to_string()),
                ],
                b"",
            );
            Action::Pause
        }
        "/grow-vec" => {
            let mib: usize = query_param(&path, "mib")
                .and_then(|p| p.parse().ok())
                .unwrap_or(64);
            let v = vec![1u8; mib << 20];
            let len = std::hint::black_box(&v).len();
            s.reply(200, &[("x-grew", len.to_string())], b"");
            Action::Pause
        }
        "/ok" => {
            s.reply(200, &[("x-ok", "yes".into())], b"");
            Action::Pause
        }
        "/stall" => Action::Pause,
        _ => Action::Continue,
    }
}

pub fn on_request_body(s: &mut AbiStream, _eos: bool) -> Action {
    match path_only(&s.state.path) {
        "/panic-body" => panic!("abi-test-guest panics in on_http_request_body on purpose"),
        "/stall-body" => Action::Pause,
        _ => Action::Continue,
    }
}

pub fn on_response_body(s: &mut AbiStream, _eos: bool) -> Action {
    if path_only(&s.state.path) == "/stall-response-body" {
        return Action::Pause;
    }
    Action::Continue
}

pub fn on_response_headers(s: &mut AbiStream) -> Action {
    if s.state.panic_on_response {
        panic!("abi-test-guest panics in on_http_response_headers on purpose");
    }
    Action::Continue
}
