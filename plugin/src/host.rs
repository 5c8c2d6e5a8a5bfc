//! The thin layer over proxy-wasm hostcalls. Nothing here panics on a host status: the SDK's
//! wrappers are used only where the ABI says the host always answers Ok (headers, log), and
//! their `Result` is still handled.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};

/// Logs one line; a failing log call is ignored (there is nowhere else to report it).
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The plugin configuration bytes (`configuration` of the wasm filter); empty when none.
pub fn plugin_configuration() -> Vec<u8> {
    match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
        Ok(Some(bytes)) => bytes,
        _ => Vec::new(),
    }
}

/// Adds a response header (keeps existing values of the same name).
pub fn add_response_header(name: &str, value: &str) {
    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
}
