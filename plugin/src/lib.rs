//! Krowoc Edge: a proxy-wasm filter that moves a backend's Redis integration (rate limiting,
//! response caching, request events) into the edge proxy.
//!
//! Build it for a proxy with
//! `cargo build -p krowoc-plugin --target wasm32-wasip1 --profile wasm`; load the `.wasm` as an
//! `envoy.filters.http.wasm` filter whose `configuration` is the JSON described in [`config`].
//!
//! The default build has both Redis transports. The `redis_call` transport (Higress ABI)
//! imports `proxy_redis_init`/`proxy_redis_call`, which stock Envoy does not provide and so
//! refuses to load; for stock Envoy build with `--no-default-features` (transport `relay`).
//!
//! Layout: [`config`] (the user's contract), [`keys`], [`ratelimit`], [`headers`] and the Lua
//! in `src/scripts/` (the rate limiter), [`client`], [`resp`], [`breaker`], [`error`] (the Redis
//! command layer), [`event_config`] and [`events`] (request events), [`cache_config`],
//! [`cache_policy`], [`cache_key`], [`cache_entry`], [`cache_purge`] and [`cache`] (the response
//! cache), [`metrics`], and the host glue: [`host`] (every FFI call) and [`filter`]
//! (the proxy-wasm contexts). Everything but the glue is plain Rust, tested natively
//! (`cargo test -p krowoc-plugin`).

pub mod breaker;
pub mod cache;
pub mod cache_config;
pub mod cache_entry;
pub mod cache_key;
pub mod cache_policy;
pub mod cache_purge;
pub mod client;
pub mod config;
pub mod duration;
pub mod error;
pub mod event_config;
pub mod events;
pub mod filter;
pub mod headers;
pub mod host;
pub mod keys;
pub mod metrics;
pub mod ratelimit;
pub mod resp;
pub mod scripts;

/// The value of the `x-krowoc-edge` response header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| Box::new(filter::EdgeRoot::new(context_id)));
}}
