//! Shared data: `proxy_get_shared_data` and `proxy_set_shared_data` with compare-and-swap, and
//! values visible across VMs (one VM per worker thread).
//!
//! * `/set?key=K&value=V[&cas=N]` — sets K (cas 0 or absent: unconditional); answers with
//!   `x-status: Ok` or the failing status (`CasMismatch`).
//! * `/get?key=K` — answers with the value as the body, `x-found` and `x-cas`.
//! * every tick, each VM copies the value of `abi/probe` to `abi/seen/<vm index>`, so a test can
//!   see that a value one VM wrote is read by every VM.

use proxy_wasm::traits::Context;
use proxy_wasm::types::Action;

use crate::{path_only, query_param, AbiRoot, AbiStream};

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let path = s.state.path.clone();
    let key = query_param(&path, "key").unwrap_or_default();
    match path_only(&path) {
        "/set" => {
            let value = query_param(&path, "value").unwrap_or_default();
            let cas = query_param(&path, "cas")
                .and_then(|c| c.parse::<u32>().ok())
                .filter(|c| *c != 0);
            let status = match s.set_shared_data(&key, Some(value.as_bytes()), cas) {
                Ok(()) => "Ok".to_string(),
                Err(e) => format!("{e:?}"),
            };
            s.reply(200, &[("x-status", status)], b"");
        }
        "/get" => {
            let (value, cas) = s.get_shared_data(&key);
            let found = value.is_some().to_string();
            s.reply(
                200,
                &[("x-found", found), ("x-cas", cas.unwrap_or(0).to_string())],
                &value.unwrap_or_default(),
            );
        }
        other => s.reply(
            404,
            &[],
            format!("no shared-data variant {other}").as_bytes(),
        ),
    }
    Action::Pause
}

pub fn on_tick(root: &AbiRoot, vm_index: u32) {
    let (value, _) = root.get_shared_data("abi/probe");
    if let Some(v) = value {
        let _ = root.set_shared_data(&format!("abi/seen/{vm_index}"), Some(&v), None);
    }
}
