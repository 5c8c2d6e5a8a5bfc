//! Storing a response once it ended (one script: the entry, its indexes and tags, the fill
//! lock), and giving the fill lock back when nothing is stored.

use super::*;

/// KEYS, and ARGV after the encoded response, of `cache_store.lua`: the entry of `key`, its
/// indexes and tags, its freshness, the fill lock `token` releases (empty: none), and the Redis
/// time of the lookup (a purge since then refuses the store).
pub fn store_call(
    keys: &RouteKeys,
    key: &CacheKey,
    tags: &[String],
    f: &Freshness,
    token: &str,
    looked_up_at: u64,
) -> (Vec<String>, Vec<String>) {
    let mut store_keys = vec![
        keys.entry(&key.hash),
        keys.lock(&key.hash),
        keys.purge_mark(),
        keys.route_index(),
        keys.path_index(&key.path),
        keys.url_index(&key.url),
    ];
    store_keys.extend(tags.iter().map(|t| keys.tag_index(t)));
    let args = vec![
        f.fresh_ms.to_string(),
        f.stale_while_revalidate_ms.to_string(),
        f.stale_if_error_ms.to_string(),
        f.initial_age_ms.to_string(),
        key.url.clone(),
        key.hash.clone(),
        token.to_string(),
        looked_up_at.to_string(),
    ];
    (store_keys, args)
}

/// How long to mark a key uncacheable after a response that was not stored: a deterministic
/// refusal (private, too large, ...) keeps concurrent misses from waiting for a fill that never
/// comes; a 5xx may be passing, so it only releases the lock.
pub(super) fn pass_for(why: NotStored, status: u16, policy: &CachePolicy) -> u64 {
    if why == NotStored::Status && status >= 500 {
        0
    } else {
        policy.coalesce.lock.as_millis()
    }
}

impl CacheEngine {
    /// The response ended: store what was collected.
    pub(super) fn finish_collecting(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
    ) {
        let Phase::Collecting(c) = std::mem::replace(&mut request.phase, Phase::Finished) else {
            return;
        };
        // The store replaces the entry: no delete needed.
        request.delete_on_end = false;
        let blob = entry::encode(c.status, &c.fields, &c.body);
        let token = if request.holds_lock {
            request.token.as_str()
        } else {
            ""
        };
        let call = store_call(
            &request.keys,
            &request.key,
            &c.tags,
            &c.freshness,
            token,
            request.looked_up_at,
        );
        request.holds_lock = false;
        self.queue_store(client, wire, now_ms, request.route, call, blob);
    }

    pub(super) fn queue_store(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        route: usize,
        (keys, args): (Vec<String>, Vec<String>),
        blob: Vec<u8>,
    ) {
        let job = Job {
            kind: JobKind::Store {
                route,
                keys,
                blob,
                args,
            },
            notify: None,
        };
        self.enqueue(client, wire, now_ms, job);
    }

    /// Releases this request's fill lock (off the request path); `pass_ms` > 0 marks the key
    /// uncacheable for that long.
    pub(super) fn release_lock(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &mut CacheRequest,
        pass_ms: u64,
    ) {
        if !request.holds_lock {
            return;
        }
        request.holds_lock = false;
        let job = JobKind::Unlock {
            lock_key: request.lock_key(),
            token: request.token.clone(),
            pass_ms,
        };
        self.queue_job(client, wire, now_ms, job);
    }
}
