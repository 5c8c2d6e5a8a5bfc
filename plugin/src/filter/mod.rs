//! The filter: the proxy-wasm contexts, the one phase driver and the one per-request record.
//!
//! * [`contexts`] — the SDK's traits (root and request contexts) and the Higress callback:
//!   they read the host, call the driver and perform what it decided.
//! * [`driver`] — [`Edge`], whose phases a request passes in order: route once → start the
//!   event → purge endpoint? → rate limit ∥ cache lookup → decide → upstream → response →
//!   store → log.
//! * [`record`] — [`Request`], everything kept about one request, one per context id.

pub mod contexts;
pub mod driver;
pub mod record;

pub use contexts::{EdgeRequest, EdgeRoot};
pub use driver::{Begin, Edge, ResponseStep};
pub use record::{Request, Requests};

/// Name of the response header that proves the filter ran.
pub const EDGE_HEADER: &str = "x-krowoc-edge";
