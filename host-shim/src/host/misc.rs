//! `proxy_log`, `proxy_get_log_level`, `proxy_get_current_time_nanoseconds`,
//! `proxy_set_tick_period_milliseconds`, `proxy_get_status`, `proxy_set_effective_context`,
//! `proxy_done`, `proxy_call_foreign_function`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::Linker;

use super::{read_bytes, return_bytes, status, write_u32, write_u64, HostCaller};
use crate::abi::{log_level_name, Status};
use crate::state::HostState;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut caller: HostCaller<'_>, level: i32, ptr: i32, len: i32| -> i32 {
            let msg = match read_bytes(&mut caller, ptr, len) {
                Ok(m) => String::from_utf8_lossy(&m).into_owned(),
                Err(s) => return s.code(),
            };
            log_plugin_line(caller.data_mut(), level, &msg);
            Status::Ok.code()
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: HostCaller<'_>, ret: i32| -> i32 {
            let level = caller.data().log_level as u32;
            status(write_u32(&mut caller, ret, level))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: HostCaller<'_>, ret: i32| -> i32 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            status(write_u64(&mut caller, ret, now))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: HostCaller<'_>, ms: i32| -> i32 {
            let ms = ms as u32;
            caller.data_mut().tick_period = (ms > 0).then(|| Duration::from_millis(ms as u64));
            Status::Ok.code()
        },
    )?;
    linker.func_wrap_async(
        "env",
        "proxy_get_status",
        |mut caller: HostCaller<'_>, (code_ptr, msg_ptr, msg_size): (i32, i32, i32)| {
            Box::new(async move {
                let (code, msg) = match &caller.data().http_call_response {
                    Some(r) => (
                        r.status.unwrap_or(Status::Ok).code() as u32,
                        r.message.clone().into_bytes(),
                    ),
                    None => (Status::Ok.code() as u32, Vec::new()),
                };
                if let Err(s) = write_u32(&mut caller, code_ptr, code) {
                    return Ok(s.code());
                }
                Ok(status(
                    return_bytes(&mut caller, &msg, msg_ptr, msg_size).await?,
                ))
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: HostCaller<'_>, ctx: i32| -> i32 {
            let ctx = ctx as u32;
            let data = caller.data_mut();
            if ctx == data.root_context_id || data.streams.contains_key(&ctx) {
                data.current_context = ctx;
                Status::Ok.code()
            } else {
                Status::BadArgument.code()
            }
        },
    )?;
    linker.func_wrap("env", "proxy_done", |_: HostCaller<'_>| -> i32 {
        Status::Ok.code()
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: HostCaller<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 {
            // host-shim registers no foreign functions; Envoy answers NotFound for unknown names.
            Status::NotFound.code()
        },
    )?;
    Ok(())
}

/// Writes a plugin log line through `tracing`, as Envoy writes it to its log with the plugin's
/// name; warn and above are also kept for error reports.
pub fn log_plugin_line(state: &mut HostState, level: i32, msg: &str) {
    let plugin = &state.identity.plugin_name;
    let worker = state.identity.worker;
    match level {
        0 => tracing::trace!(target: "wasm", plugin, worker, "{msg}"),
        1 => tracing::debug!(target: "wasm", plugin, worker, "{msg}"),
        2 => tracing::info!(target: "wasm", plugin, worker, "{msg}"),
        3 => tracing::warn!(target: "wasm", plugin, worker, "{msg}"),
        _ => tracing::error!(target: "wasm", plugin, worker, "{msg}"),
    }
    if let Some(file) = &state.log_file {
        file.write_line(level, &state.identity, msg);
    }
    if level >= 3 {
        let line = format!("[{}] {msg}", log_level_name(level));
        state.remember_error_line(line);
    }
}

/// `host-shim run --log-path FILE`: the plugin's log lines, one per line, as Envoy writes them
/// to its own `--log-path` (`[time][thread][level][wasm] wasm log <plugin> <root_id>: msg`).
#[derive(Debug)]
pub struct PluginLogFile(std::sync::Mutex<std::fs::File>);

impl PluginLogFile {
    pub fn create(path: &std::path::Path) -> std::io::Result<PluginLogFile> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|f| PluginLogFile(std::sync::Mutex::new(f)))
    }

    fn write_line(&self, level: i32, identity: &crate::state::VmIdentity, msg: &str) {
        use std::io::Write;
        let now = httpdate::fmt_http_date(SystemTime::now());
        let line = format!(
            "[{now}][worker {}][{}][wasm] wasm log {} {}: {msg}\n",
            identity.worker,
            log_level_name(level),
            identity.plugin_name,
            identity.root_id,
        );
        // A poisoned lock means another writer panicked mid-line; the file is still usable.
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Logging must never fail a callback; a full disk loses lines, as Envoy's log does.
        let _ = file.write_all(line.as_bytes());
    }
}
