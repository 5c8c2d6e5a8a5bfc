//! A request's lookup: the script's call (sent with the rate limit's), its reply, and the
//! decision once the rate limit let the request pass — serve a fresh or stale entry, wait for
//! another request's fill, or go upstream.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    Hit,
    Stale,
    Expired,
    Miss,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// This request holds the fill lock.
    Taken,
    /// Another request is filling the key.
    Held,
    NotTried,
    /// The key was found uncacheable recently: go upstream without waiting.
    Pass,
}

/// The lookup script's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub state: EntryState,
    pub age_ms: u64,
    pub blob: Option<Vec<u8>>,
    pub lock: LockState,
    pub fresh_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
    pub corrupt: bool,
    /// Redis' clock at the lookup.
    pub now_ms: u64,
}

pub(super) fn as_u64(r: &Reply) -> Option<u64> {
    r.as_int().map(|i| u64::try_from(i).unwrap_or(0))
}

/// Reads `cache_lookup.lua`'s reply.
pub fn parse_lookup(reply: &Reply) -> Result<Lookup, RedisError> {
    let bad = || RedisError::protocol(format!("cache_lookup answered {reply:?}"));
    let Reply::Array(items) = reply else {
        return Err(bad());
    };
    if items.len() != 9 {
        return Err(bad());
    }
    let state = match &items[0] {
        Reply::Bulk(b) => match b.as_slice() {
            b"hit" => EntryState::Hit,
            b"stale" => EntryState::Stale,
            b"expired" => EntryState::Expired,
            b"miss" => EntryState::Miss,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    let blob = match &items[2] {
        Reply::Bulk(b) => Some(b.clone()),
        Reply::Nil => None,
        _ => return Err(bad()),
    };
    let lock = match items[3].as_int().ok_or_else(bad)? {
        1 => LockState::Taken,
        0 => LockState::Held,
        -2 => LockState::Pass,
        _ => LockState::NotTried,
    };
    let num = |i: usize| as_u64(&items[i]).ok_or_else(bad);
    Ok(Lookup {
        state,
        age_ms: num(1)?,
        blob,
        lock,
        fresh_ms: num(4)?,
        swr_ms: num(5)?,
        sie_ms: num(6)?,
        corrupt: num(7)? == 1,
        now_ms: num(8)?,
    })
}

/// What a request does once its lookup answered and the rate limit let it pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Proceed {
    /// Answered from the cache.
    Serve(LocalResponse),
    /// Waits for another request's fill (the tick lets it go).
    Wait,
    /// Goes upstream.
    Forward,
}

/// KEYS and ARGV of `cache_lookup.lua`: a request's lookup, and a coalescing poll's.
pub(super) fn lookup_call(
    entry_key: String,
    lock_key: String,
    lock_ms: u64,
    token: &str,
) -> (Vec<String>, Vec<String>) {
    (
        vec![entry_key, lock_key],
        vec![
            String::from_utf8_lossy(MAGIC).into_owned(),
            lock_ms.to_string(),
            token.to_string(),
        ],
    )
}

impl CacheEngine {
    /// The cache's part of a request on route `route_idx`: the lookup is sent (it goes out
    /// with the rate limit's call, so the request waits for one round trip at most), or the
    /// request bypasses the cache. None when the route has no cache.
    /// `route_cluster` tells where the route sends requests (asked only for a policy that
    /// refreshes in the background).
    #[allow(clippy::too_many_arguments)]
    pub fn lookup(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        route_idx: usize,
        req: &RequestInfo,
        route_cluster: impl FnOnce() -> Option<String>,
    ) -> Option<CacheRequest> {
        let config = Rc::clone(&self.config);
        let route = &config.routes[route_idx];
        let policy = route.cache.as_ref()?;
        let key = key::derive(
            policy,
            &KeyInput {
                scheme: req.header(":scheme").unwrap_or("http"),
                host: req.header(":authority").unwrap_or(""),
                method: &req.method,
                path: req.path(),
                query: req.query(),
                headers: &req.headers,
            },
        );
        let mut request = CacheRequest {
            route: route_idx,
            method: req.method.clone(),
            key,
            keys: RouteKeys::new(&config.redis.key_prefix, &route.name),
            token: self.new_token(ctx),
            holds_lock: false,
            conditional: req
                .headers
                .iter()
                .filter(|(k, _)| {
                    k.eq_ignore_ascii_case("if-none-match")
                        || k.eq_ignore_ascii_case("if-modified-since")
                })
                .cloned()
                .collect(),
            revalidate: None,
            delete_on_end: false,
            no_cache: policy.honor_request_cache_control
                && policy::request_directives(&req.headers).no_cache,
            refreshed: false,
            looked_up_at: 0,
            phase: Phase::Looking,
            outcome: None,
        };
        if let Some(reason) = policy::request_bypass(policy, &req.method, &req.headers) {
            request.phase = Phase::Bypass(reason);
            self.metrics.count(route_idx, Count::Bypass);
            return Some(request);
        }
        if policy.stale_while_revalidate.as_millis() > 0 || policy.honor_cache_control {
            request.revalidate = route_cluster()
                .filter(|c| !c.is_empty())
                .and_then(|cluster| revalidate_target(policy, req, cluster));
        }
        let lock_ms = if policy.coalesce.enabled {
            policy.coalesce.lock.as_millis()
        } else {
            0
        };
        let (keys, args) = lookup_call(
            request.entry_key(),
            request.lock_key(),
            lock_ms,
            &request.token,
        );
        let lookup = &self.scripts.lookup;
        let (evalsha, eval) = (lookup.evalsha(&keys, &args), lookup.eval(&keys, &args));
        let sent = client.call(wire, now_ms, Owner::CacheLookup(ctx), &evalsha, Some(eval));
        if let Err(e) = sent {
            log_debug(&format!(
                "krowoc-edge: route {}: cache bypassed: {e}",
                route.name
            ));
            request.phase = Phase::Bypass(Bypass::Redis);
            self.metrics.count(route_idx, Count::Bypass);
            self.metrics.count(route_idx, Count::RedisError);
        }
        Some(request)
    }

    /// The lookup's answer; false when the request was not waiting for one.
    pub fn on_lookup(request: &mut CacheRequest, result: Result<Reply, RedisError>) -> bool {
        if !matches!(request.phase, Phase::Looking) {
            return false;
        }
        let lookup = result.and_then(|r| parse_lookup(&r));
        if let Ok(l) = &lookup {
            request.holds_lock = l.lock == LockState::Taken;
            request.looked_up_at = l.now_ms;
        }
        request.phase = Phase::Found(lookup);
        true
    }

    /// The rate limit let the request pass: answer it from the cache, let it wait for a
    /// fill, or send it upstream.
    pub fn proceed(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
    ) -> Proceed {
        let config = Rc::clone(&self.config);
        if !matches!(request.phase, Phase::Found(_)) {
            // A bypass: nothing to decide.
            return Proceed::Forward;
        }
        let Phase::Found(result) = std::mem::replace(&mut request.phase, Phase::Finished) else {
            return Proceed::Forward;
        };
        let route = request.route;
        let mut lookup = match result {
            Ok(l) => l,
            Err(e) => {
                log_debug(&format!(
                    "krowoc-edge: route {}: cache bypassed: {e}",
                    config.routes[route].name
                ));
                self.metrics.count(route, Count::Bypass);
                self.metrics.count(route, Count::RedisError);
                request.phase = Phase::Bypass(Bypass::Redis);
                return Proceed::Forward;
            }
        };
        if lookup.corrupt {
            self.metrics.count(route, Count::Corrupt);
        }
        let decoded = match lookup.blob.take().map(entry_decode) {
            Some(Err(())) => {
                self.metrics.count(route, Count::Corrupt);
                request.delete_on_end = true;
                None
            }
            Some(Ok(r)) => Some(r),
            None => None,
        };
        let settings = &config.cache;
        let servable = matches!(lookup.state, EntryState::Hit | EntryState::Stale);
        if request.no_cache && servable && decoded.is_some() {
            // The client wants a fresh answer: upstream, and the answer replaces the entry
            // (with the fill lock when the lookup took it for a stale entry).
            request.refreshed = true;
            self.metrics.count(route, Count::Miss);
            request.phase = Phase::Forwarded {
                outcome: Outcome::Miss,
                stale: None,
            };
            return Proceed::Forward;
        }
        match (lookup.state, decoded) {
            (EntryState::Hit, Some(stored)) => {
                self.metrics.count(route, Count::Hit);
                let ttl = ttl_seconds(lookup.fresh_ms, lookup.age_ms);
                let resp = serve(
                    settings,
                    request,
                    std::borrow::Cow::Owned(stored),
                    lookup.age_ms,
                    Outcome::Hit,
                    CacheStatus::hit(ttl),
                );
                request.outcome = Some(Outcome::Hit);
                if resp.status == 304 {
                    self.metrics.count(route, Count::NotModified);
                }
                request.phase = Phase::Served;
                Proceed::Serve(resp)
            }
            (EntryState::Stale, Some(stored)) => {
                self.metrics.count(route, Count::Stale);
                let mut status = CacheStatus::hit(ttl_seconds(lookup.fresh_ms, lookup.age_ms));
                status.detail = Some("stale-while-revalidate");
                let resp = serve(
                    settings,
                    request,
                    std::borrow::Cow::Owned(stored),
                    lookup.age_ms,
                    Outcome::Stale,
                    status,
                );
                request.outcome = Some(Outcome::Stale);
                request.phase = Phase::Served;
                if request.holds_lock {
                    request.holds_lock = false;
                    let job = match request.revalidate.clone() {
                        Some(target) => JobKind::Revalidate {
                            route,
                            key: request.key.clone(),
                            token: request.token.clone(),
                            looked_up_at: lookup.now_ms,
                            target,
                        },
                        None => JobKind::Unlock {
                            lock_key: request.lock_key(),
                            token: request.token.clone(),
                            pass_ms: 0,
                        },
                    };
                    self.queue_job(client, wire, now_ms, job);
                }
                Proceed::Serve(resp)
            }
            (state, stored) => {
                let stale = stored.map(|response| StaleCopy {
                    response,
                    age_ms: lookup.age_ms,
                    fresh_ms: lookup.fresh_ms,
                    sie_ms: lookup.sie_ms,
                    read_at_ms: now_ms,
                });
                let outcome = if stale.is_some() && state != EntryState::Miss {
                    Outcome::Expired
                } else {
                    Outcome::Miss
                };
                if lookup.lock == LockState::Held {
                    self.metrics.count(route, Count::Coalesced);
                    request.phase = Phase::Waiting {
                        since_ms: now_ms,
                        stale,
                    };
                    self.waiting
                        .entry(request.entry_key())
                        .or_default()
                        .push(ctx);
                    return Proceed::Wait;
                }
                self.metrics.count(route, forwarded(outcome));
                request.phase = Phase::Forwarded { outcome, stale };
                Proceed::Forward
            }
        }
    }
}
