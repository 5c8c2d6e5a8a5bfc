//! Krowoc Edge: a proxy-wasm filter that moves a backend's Redis integration (rate limiting,
//! response caching, request events) into the edge proxy.
//!
//! Build it for a proxy with
//! `cargo build -p krowoc-plugin --target wasm32-wasip1 --profile wasm`; load the `.wasm` as an
//! `envoy.filters.http.wasm` filter whose `configuration` is the JSON described in [`config`].
//!
//! The crate is also an rlib: everything except [`host`] and [`filter`] is plain Rust, tested
//! natively (`cargo test -p krowoc-plugin`).

pub mod config;
pub mod duration;
pub mod filter;
pub mod host;

/// The value of the `x-krowoc-edge` response header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| Box::new(filter::EdgeRoot::new(context_id)));
}}
