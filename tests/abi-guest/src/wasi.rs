//! WASI preview 1 as a plugin uses it through std: `fd_write` to stdout/stderr (the host's log),
//! `environ_get` (the VM's environment), `clock_time_get` (realtime and monotonic),
//! `random_get`, and `proc_exit` (a VM failure).
//!
//! * `/exit` — `std::process::exit(7)`.
//! * anything else — prints a line to stdout and to stderr, then answers locally with `x-env`
//!   (the value of `ABI_ENV`), `x-realtime-secs` (seconds since the epoch), `x-monotonic-ok`,
//!   `x-random-ok` (two 32-byte draws succeed and differ).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proxy_wasm::types::Action;

use crate::{path_only, AbiStream};

pub const STDOUT_MARK: &str = "abi-test-guest stdout:";
pub const STDERR_MARK: &str = "abi-test-guest stderr:";

pub fn on_configure() {
    println!("{STDOUT_MARK} configured");
    eprintln!("{STDERR_MARK} configured");
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

#[cfg(target_arch = "wasm32")]
fn random_bytes() -> Result<[u8; 32], u16> {
    let mut buf = [0u8; 32];
    // SAFETY: `buf` is a valid, writable 32-byte buffer for the call.
    let errno = unsafe { random_get(buf.as_mut_ptr(), buf.len()) };
    if errno == 0 {
        Ok(buf)
    } else {
        Err(errno)
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn random_bytes() -> Result<[u8; 32], u16> {
    Err(52)
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let path = s.state.path.clone();
    if path_only(&path) == "/exit" {
        std::process::exit(7);
    }
    println!("{STDOUT_MARK} request {path}");
    eprintln!("{STDERR_MARK} request {path}");
    let env = std::env::var("ABI_ENV").unwrap_or_else(|_| "<unset>".into());
    let realtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let first = Instant::now();
    let mut spin = 0u64;
    for i in 0..10_000u64 {
        spin = std::hint::black_box(spin.wrapping_add(i));
    }
    let monotonic_ok = Instant::now() >= first && spin > 0;
    let random_ok = match (random_bytes(), random_bytes()) {
        (Ok(a), Ok(b)) => (a != b && a != [0; 32]).to_string(),
        (Err(e), _) | (_, Err(e)) => format!("errno {e}"),
    };
    s.reply(
        200,
        &[
            ("x-env", env),
            ("x-realtime-secs", realtime.to_string()),
            ("x-monotonic-ok", monotonic_ok.to_string()),
            ("x-random-ok", random_ok),
        ],
        b"",
    );
    Action::Pause
}
