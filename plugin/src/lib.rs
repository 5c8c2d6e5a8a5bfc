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
//! A request's life, read top to bottom in [`filter::driver`]: its route is matched once; its
//! event is started; the purge endpoint is answered by the filter; otherwise the rate limit's
//! call and the cache's lookup go to Redis together (one round trip at most); once both
//! answered, the verdict is decided, then the cache's answer (serve, wait for another request's
//! fill, or forward); the upstream's response gets the cache's and the rate limit's fields and
//! is stored on the way; on log the event is queued, and flushed in batches on the tick.
//!
//! Modules:
//! - [`filter`]: the proxy-wasm contexts, the phase driver and the per-request record;
//! - [`host`]: every FFI call, and the two wires Redis calls go out on;
//! - [`http`]: header lookups, HTTP dates, query strings, the client address, local responses;
//! - [`config`]: the user's contract, section by section, with one problem type;
//! - [`redis`]: the command layer, RESP, errors, the circuit breaker, every Lua script;
//! - [`ratelimit`], [`cache`], [`events`]: the three features, each taking values in and
//!   giving decisions out;
//! - [`metrics`]: every metric the filter defines.
//!
//! Everything but the contexts and the host is plain Rust, tested natively
//! (`cargo test -p krowoc-plugin`).

pub mod cache;
pub mod config;
pub mod events;
pub mod filter;
pub mod host;
pub mod http;
pub mod metrics;
pub mod ratelimit;
pub mod redis;

/// The value of the `x-krowoc-edge` response header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| Box::new(filter::EdgeRoot::new(context_id)));
}}
