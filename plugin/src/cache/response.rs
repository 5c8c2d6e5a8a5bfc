//! The response phase: the fields an answer gets (`X-Cache`, `Cache-Status`), a stale copy for
//! an upstream error (stale-if-error), invalidations held until their purges are done, and a
//! storable response collected on its way to the client.

use super::*;

/// What the response phase does for the cache.
#[derive(Debug)]
pub enum CacheResponse {
    /// Let the response pass with these fields added.
    Pass(Vec<(String, String)>),
    /// Add these fields and hold the response until these purges are done
    /// (`HostAction::ResumeResponse`).
    Hold(Vec<(String, String)>, PurgeRequest),
    /// Answer with this instead (a stale copy for an upstream error).
    Replace(LocalResponse),
}

impl CacheEngine {
    /// The upstream's response headers (or a local reply's) for a request on route
    /// `route_idx`: fields to add, or a replacement. `read_headers` gives the response's fields
    /// (asked only when the cache needs them); `passed` are the fields the request was let
    /// through with (the rate limit's), which a replacement carries too.
    ///
    /// A response that invalidates (the route's invalidation header, or a successful unsafe
    /// request to a cached route) is held until its purges are done, so that a client that
    /// reads after it sees the invalidation: one Redis round trip, the purges going out
    /// together. Pattern purges scan and stay off the response path.
    #[allow(clippy::too_many_arguments)]
    pub fn response_headers(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        route_idx: usize,
        request: Option<&mut CacheRequest>,
        passed: &[(String, String)],
        end_of_stream: bool,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
    ) -> CacheResponse {
        let mut purges = Vec::new();
        let step = self.response_step(
            client,
            wire,
            now_ms,
            route_idx,
            request,
            passed,
            end_of_stream,
            read_headers,
            &mut purges,
        );
        if purges.is_empty() {
            return step;
        }
        let mut held = PurgeRequest {
            response: true,
            ..PurgeRequest::default()
        };
        for kind in purges {
            let job = Job {
                kind,
                notify: Some(ctx),
            };
            match self.dispatch_job(client, wire, now_ms, job) {
                Ok(()) => held.outstanding += 1,
                Err(failed) => {
                    let (job, e) = *failed;
                    self.job_failed(&job, &e);
                }
            }
        }
        match step {
            CacheResponse::Pass(fields) if held.outstanding > 0 => {
                CacheResponse::Hold(fields, held)
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn response_step(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        route_idx: usize,
        request: Option<&mut CacheRequest>,
        passed: &[(String, String)],
        end_of_stream: bool,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
        purges: &mut Vec<JobKind>,
    ) -> CacheResponse {
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        let wanted = route.invalidation.is_some()
            || request
                .as_ref()
                .is_some_and(|r| matches!(r.phase, Phase::Forwarded { .. } | Phase::Bypass(_)));
        if !wanted {
            return CacheResponse::Pass(Vec::new());
        }
        let headers = read_headers();
        let status = first(&headers, ":status")
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(502);
        if let Some(inv) = &route.invalidation {
            if (200..300).contains(&status) {
                self.honour_invalidation(client, wire, now_ms, &headers, &inv.header, purges);
            }
        }
        let Some(request) = request else {
            return CacheResponse::Pass(Vec::new());
        };
        let settings = &config.cache;
        let Some(policy) = &route.cache else {
            return CacheResponse::Pass(Vec::new());
        };
        match std::mem::replace(&mut request.phase, Phase::Finished) {
            Phase::Bypass(reason) => {
                let (fwd, detail) = reason.forward();
                let mut s = CacheStatus::forward(fwd);
                s.fwd_status = Some(status);
                s.detail = Some(detail);
                // RFC 9111 4.4: a successful unsafe request invalidates its target URI.
                let unsafe_method = !matches!(
                    request.method.as_str(),
                    "GET" | "HEAD" | "OPTIONS" | "TRACE"
                );
                let invalidate =
                    (reason == Bypass::Method && unsafe_method && (200..400).contains(&status))
                        .then(|| PurgeStep::Index {
                            index_key: request.keys.url_index(&request.key.url),
                            entry_prefix: request.keys.entry_prefix(),
                            mark_key: request.keys.purge_mark(),
                        });
                request.phase = Phase::Bypass(reason);
                purges.extend(invalidate.map(JobKind::Purge));
                request.outcome = Some(Outcome::Bypass);
                CacheResponse::Pass(status_fields(settings, Outcome::Bypass, &s))
            }
            Phase::Forwarded { outcome, stale } => {
                let fwd = if request.refreshed {
                    "request"
                } else if outcome == Outcome::Expired {
                    "stale"
                } else {
                    "uri-miss"
                };
                if status >= 500 {
                    if let Some(stale) = stale.filter(|s| s.usable_for_error(now_ms)) {
                        let age = stale.age_at(now_ms);
                        let mut s = CacheStatus::forward(fwd);
                        s.fwd_status = Some(status);
                        s.ttl_s = Some(ttl_seconds(stale.fresh_ms, age));
                        s.detail = Some("stale-if-error");
                        let mut resp = serve(
                            settings,
                            request,
                            std::borrow::Cow::Borrowed(&stale.response),
                            age,
                            Outcome::Stale,
                            s,
                        );
                        request.outcome = Some(Outcome::Stale);
                        self.metrics.count(route_idx, Count::Stale);
                        self.release_lock(client, wire, now_ms, request, 0);
                        resp.headers.extend(passed.iter().cloned());
                        return CacheResponse::Replace(resp);
                    }
                }
                let mut s = CacheStatus::forward(fwd);
                s.fwd_status = Some(status);
                let now_s = i64::try_from(now_ms / 1000).unwrap_or(0);
                match storable(policy, status, &headers, now_s) {
                    Ok(freshness) => {
                        s.stored = true;
                        let fields = stored_fields(
                            settings,
                            route.invalidation.as_ref().map(|i| i.header.as_str()),
                            &headers,
                        );
                        let content_length = first(&headers, "content-length")
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        let collector = Collector {
                            status,
                            tags: policy::tags(policy, &headers),
                            fields,
                            freshness,
                            body: Vec::with_capacity(content_length.unwrap_or(0).min(1 << 20)),
                            content_length,
                        };
                        request.phase = Phase::Collecting(collector);
                        // A HEAD answer has no body even when its fields describe one.
                        if end_of_stream || request.method == "HEAD" {
                            self.finish_collecting(client, wire, now_ms, request);
                        }
                    }
                    Err(why) => {
                        s.detail = Some(why.as_str());
                        self.metrics.count(route_idx, Count::NotStored);
                        self.release_lock(
                            client,
                            wire,
                            now_ms,
                            request,
                            pass_for(why, status, policy),
                        );
                    }
                }
                request.outcome = Some(outcome);
                CacheResponse::Pass(status_fields(settings, outcome, &s))
            }
            other => {
                request.phase = other;
                CacheResponse::Pass(Vec::new())
            }
        }
    }

    /// Whether the request keeps a copy of its response body (to store it).
    pub fn collects(request: &CacheRequest) -> bool {
        matches!(request.phase, Phase::Collecting(_))
    }

    /// A chunk of the response body passed.
    pub fn response_body(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
        chunk: &[u8],
        end_of_stream: bool,
    ) {
        let Phase::Collecting(c) = &mut request.phase else {
            return;
        };
        let route = request.route;
        let policy = self.config.routes[route].cache.as_ref();
        let max = policy.map(|p| p.max_body_bytes).unwrap_or(0);
        c.body.extend_from_slice(chunk);
        if u64::try_from(c.body.len()).unwrap_or(u64::MAX) > max {
            request.phase = Phase::Finished;
            self.metrics.count(route, Count::NotStored);
            let pass = policy.map(|p| p.coalesce.lock.as_millis()).unwrap_or(0);
            self.release_lock(client, wire, now_ms, request, pass);
            return;
        }
        if end_of_stream {
            self.finish_collecting(client, wire, now_ms, request);
        }
    }
}
