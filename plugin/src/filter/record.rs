//! The one record of a request in flight: every feature's state for it, kept under its context
//! id from its headers to its end.

use crate::cache::{CacheRequest, CacheRequests, PurgeRequest};
use crate::events::OpenEvent;
use crate::ratelimit::{RateLimitCall, Tally};
use std::collections::HashMap;

/// What the filter keeps about one request. Each feature reads and writes its own part; the
/// request's end drops the record, after each feature's cleanup.
#[derive(Debug, Default)]
pub struct Request {
    /// The route it matched (matched once, on its request line); None: no route.
    pub route: Option<usize>,
    /// Its Redis calls not answered yet (the rate limit and the cache lookup go out together).
    pub outstanding: usize,
    /// Its event, built at the log (None: events off for it, or sampled out).
    pub event: Option<OpenEvent>,
    /// The rate limit while Redis decides.
    pub rate_limit: Option<RateLimitCall>,
    /// How the rate limit decided (for the event).
    pub tally: Option<Tally>,
    pub cache: Option<CacheRequest>,
    /// The purges it waits for: the purge endpoint's, or those its response announced.
    pub purge: Option<PurgeRequest>,
    /// Fields added to the upstream's response (the rate limit's).
    pub response_headers: Vec<(String, String)>,
}

impl Request {
    pub fn on(route: Option<usize>) -> Request {
        Request {
            route,
            ..Request::default()
        }
    }
}

/// The requests in flight on one VM, by context id.
pub type Requests = HashMap<u32, Request>;

impl CacheRequests for Requests {
    fn cache_mut(&mut self, ctx: u32) -> Option<&mut CacheRequest> {
        self.get_mut(&ctx).and_then(|r| r.cache.as_mut())
    }

    fn purge_mut(&mut self, ctx: u32) -> Option<&mut Option<PurgeRequest>> {
        self.get_mut(&ctx).map(|r| &mut r.purge)
    }
}
