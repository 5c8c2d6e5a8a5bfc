//! host-shim: a proxy-wasm ABI 0.2.1 host on wasmtime that runs the filter from `envoy/envoy.yaml`
//! as Envoy would; it also runs the RESP-over-HTTP relay of the krowoc-relay crate
//! (`host-shim relay`), whose Redis pool carries its Higress `redis_call`s.
//!
//! * [`vm`] compiles a plugin once and runs one instance per worker thread;
//! * [`host`] implements the ABI's imports, one module per family;
//! * [`gateway`] is the HTTP front: workers, the request phases, forwarding and callouts;
//! * [`conn_manager`] and [`downstream`] are Envoy's HTTP connection manager behaviour: request
//!   headers and addresses, path normalisation, connection timers; [`field_order`] keeps
//!   header fields in the order they came;
//! * [`admin`] serves `/stats/prometheus` and `/ready`.

pub mod abi;
pub mod admin;
pub mod body;
pub mod conn_manager;
pub mod downstream;
pub mod envoy_config;
pub mod field_order;
pub mod gateway;
pub mod host;
/// The relay and its Redis pool live in the krowoc-relay crate; host-shim runs the relay as
/// `host-shim relay` and uses the pool for Higress `redis_call`s.
pub use krowoc_relay as relay;
pub use krowoc_relay::pool as redis_pool;
pub mod run;
pub mod shared;
pub mod state;
pub mod vm;
