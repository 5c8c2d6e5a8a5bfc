//! Background refreshes (stale-while-revalidate): the request that took the lock of a stale
//! entry is served the stale copy, and the entry is fetched again from the route's upstream on
//! the tick and stored.

use super::*;

/// Timeout of a background refresh (the fill lock bounds how long others rely on it).
pub(super) const REVALIDATE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a background refresh goes.
#[derive(Clone, Debug)]
pub(super) struct RevalidateTarget {
    pub(super) cluster: String,
    pub(super) headers: Vec<(String, String)>,
}

/// A background refresh in flight (by HTTP call token).
#[derive(Debug)]
pub(super) struct Revalidation {
    pub(super) route: usize,
    pub(super) key: CacheKey,
    pub(super) token: String,
    pub(super) looked_up_at: u64,
}

/// Where a background refresh of this request's entry would go: the route's `cluster`, with
/// the request line and the keyed fields.
pub(super) fn revalidate_target(
    policy: &CachePolicy,
    req: &RequestInfo,
    cluster: String,
) -> Option<RevalidateTarget> {
    let mut headers = vec![
        (":method".to_string(), req.method.clone()),
        (":path".to_string(), req.path.clone()),
        (
            ":authority".to_string(),
            req.header(":authority")?.to_string(),
        ),
        (
            ":scheme".to_string(),
            req.header(":scheme").unwrap_or("http").to_string(),
        ),
    ];
    for name in &policy.key.headers {
        headers.extend(
            req.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .cloned(),
        );
    }
    Some(RevalidateTarget { cluster, headers })
}

impl CacheEngine {
    /// Sends a background refresh to the route's upstream; the job comes back with the error
    /// when the host refused it.
    pub(super) fn send_refresh(
        &mut self,
        upstream: &mut dyn Upstream,
        job: Job,
    ) -> Result<(), Box<(Job, RedisError)>> {
        let JobKind::Revalidate {
            route,
            key,
            token,
            looked_up_at,
            target,
        } = job.kind
        else {
            return Ok(());
        };
        match upstream.call(&target.cluster, &target.headers, REVALIDATE_TIMEOUT) {
            Ok(call) => {
                increment_metric(self.metrics.revalidations, 1);
                self.revalidations.insert(
                    call,
                    Revalidation {
                        route,
                        key,
                        token,
                        looked_up_at,
                    },
                );
                Ok(())
            }
            Err(why) => {
                let e = RedisError::new(
                    crate::redis::error::RedisErrorKind::Dispatch,
                    format!(
                        "host refused the refresh call to cluster {:?} ({why})",
                        target.cluster
                    ),
                );
                let job = Job {
                    kind: JobKind::Revalidate {
                        route,
                        key,
                        token,
                        looked_up_at,
                        target,
                    },
                    notify: job.notify,
                };
                Err(Box::new((job, e)))
            }
        }
    }

    /// The answer to a background refresh (HTTP call `token`; `read_headers` gives its
    /// response fields); false when the call is not one.
    pub fn on_refresh_answer(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        token: u32,
        raw: &RawReply,
        read_headers: impl FnOnce() -> Vec<(String, String)>,
    ) -> bool {
        let Some(rev) = self.revalidations.remove(&token) else {
            return false;
        };
        let config = Rc::clone(&self.config);
        let route = &config.routes[rev.route];
        let keys = RouteKeys::new(&config.redis.key_prefix, &route.name);
        let unlock = |pass_ms| JobKind::Unlock {
            lock_key: keys.lock(&rev.key.hash),
            token: rev.token.clone(),
            pass_ms,
        };
        let Some(policy) = &route.cache else {
            return true;
        };
        let (status, body) = match raw {
            RawReply::Relay {
                status: Some(s),
                body,
            } => (*s, body),
            _ => {
                self.queue_job(client, wire, now_ms, unlock(0));
                return true;
            }
        };
        let headers = read_headers();
        let now_s = i64::try_from(now_ms / 1000).unwrap_or(0);
        let too_large = u64::try_from(body.len()).unwrap_or(u64::MAX) > policy.max_body_bytes;
        match storable(policy, status, &headers, now_s) {
            Ok(f) if !too_large => {
                let fields = stored_fields(
                    &config.cache,
                    route.invalidation.as_ref().map(|i| i.header.as_str()),
                    &headers,
                );
                let blob = entry::encode(status, &fields, body);
                let tags = policy::tags(policy, &headers);
                let call = store_call(&keys, &rev.key, &tags, &f, &rev.token, rev.looked_up_at);
                self.queue_store(client, wire, now_ms, rev.route, call, blob);
            }
            Ok(_) => {
                self.metrics.count(rev.route, Count::NotStored);
                let lock_ms = policy.coalesce.lock.as_millis();
                self.queue_job(client, wire, now_ms, unlock(lock_ms));
            }
            Err(why) => {
                self.metrics.count(rev.route, Count::NotStored);
                self.queue_job(client, wire, now_ms, unlock(pass_for(why, status, policy)));
            }
        }
        true
    }
}
