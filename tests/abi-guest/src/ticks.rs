//! Ticks: `proxy_set_tick_period_milliseconds` and `proxy_on_tick` on every VM; an HTTP call
//! dispatched from the root context in the first tick (the usual pattern) and answered in the
//! root's `proxy_on_http_call_response`.
//!
//! Each tick adds one to `abi/ticks/<vm index>` in shared data. The first tick of each VM calls
//! `GET /tick-call` on cluster `upstream`; the answer is stored in `abi/tick-call/<vm index>` as
//! `<:status> <body length> token-ok=<bool>`.

use std::time::Duration;

use proxy_wasm::traits::Context;

use crate::{cas_increment, AbiRoot};

/// The tick period the `ticks` and `shared` scenarios ask for.
pub const PERIOD: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct TickState {
    pub ticks: u32,
    pub call_token: Option<u32>,
}

pub fn on_tick(root: &mut AbiRoot) {
    root.ticks.ticks += 1;
    cas_increment(root, &format!("abi/ticks/{}", root.vm_index));
    if root.ticks.ticks != 1 {
        return;
    }
    match root.dispatch_http_call(
        "upstream",
        vec![
            (":method", "GET"),
            (":path", "/tick-call"),
            (":authority", "upstream"),
        ],
        None,
        vec![],
        Duration::from_secs(2),
    ) {
        Ok(token) => root.ticks.call_token = Some(token),
        Err(e) => {
            let key = format!("abi/tick-call/{}", root.vm_index);
            let _ =
                root.set_shared_data(&key, Some(format!("dispatch error {e:?}").as_bytes()), None);
        }
    }
}

pub fn on_root_call_response(root: &mut AbiRoot, token: u32, _n_headers: usize, body_size: usize) {
    let status = root
        .get_http_call_response_header(":status")
        .unwrap_or_else(|| "<none>".into());
    let body_len = root
        .get_http_call_response_body(0, body_size)
        .map_or(0, |b| b.len());
    let token_ok = root.ticks.call_token == Some(token);
    let key = format!("abi/tick-call/{}", root.vm_index);
    let value = format!("{status} {body_len} token-ok={token_ok}");
    let _ = root.set_shared_data(&key, Some(value.as_bytes()), None);
}
