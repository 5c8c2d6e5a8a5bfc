//! Coalescing: a miss whose fill lock another request holds waits for that fill. On the tick,
//! the first waiter of a key polls it (the lookup script, with its own lock token); a filled
//! entry is served to every waiter, a given-up lock is taken by the poller, and a wait that is
//! over goes upstream (or gets a usable stale copy).

use super::*;

/// What a coalescing poll found, acted on at the next tick.
#[derive(Debug)]
pub(super) struct PollResult {
    pub(super) token: String,
    pub(super) result: Result<Lookup, RedisError>,
    pub(super) read_at_ms: u64,
}

impl CacheEngine {
    /// The tick's coalescing step: answers of polls, waits that are over, new polls.
    pub(super) fn settle_coalesced(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        requests: &mut dyn CacheRequests,
    ) -> Vec<HostAction> {
        let mut actions = Vec::new();
        let keys: Vec<String> = self.waiting.keys().cloned().collect();
        for entry_key in keys {
            let Some(mut waiters) = self.waiting.remove(&entry_key) else {
                continue;
            };
            waiters.retain(|c| {
                requests
                    .cache_mut(*c)
                    .is_some_and(|r| matches!(r.phase, Phase::Waiting { .. }))
            });
            if let Some(poll) = self.poll_results.remove(&entry_key) {
                waiters = self.settle_waiters(
                    client,
                    wire,
                    now_ms,
                    waiters,
                    poll,
                    requests,
                    &mut actions,
                );
            }
            let mut still = Vec::with_capacity(waiters.len());
            for ctx in waiters {
                let Some(r) = requests.cache_mut(ctx) else {
                    continue;
                };
                let wait = self.config.routes[r.route]
                    .cache
                    .as_ref()
                    .map(|p| p.coalesce.wait.as_millis())
                    .unwrap_or(0);
                let expired =
                    matches!(r.phase, Phase::Waiting { since_ms, .. } if since_ms + wait <= now_ms);
                if expired {
                    actions.extend(self.stop_waiting(now_ms, ctx, r));
                } else {
                    still.push(ctx);
                }
            }
            if let Some(first_ctx) = still.first().copied() {
                if !self.polling.contains(&entry_key) {
                    if let Some(r) = requests.cache_mut(first_ctx) {
                        self.poll(client, wire, now_ms, r);
                    }
                }
                self.waiting.insert(entry_key, still);
            }
        }
        let waiting = &self.waiting;
        self.poll_results.retain(|k, _| waiting.contains_key(k));
        actions
    }

    /// Sends a coalescing poll for the key `request` waits on, with its lock token.
    pub(super) fn poll(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        request: &CacheRequest,
    ) {
        let lock_ms = self.config.routes[request.route]
            .cache
            .as_ref()
            .map(|p| p.coalesce.lock.as_millis())
            .unwrap_or(0);
        let job = Job {
            kind: JobKind::Poll {
                entry_key: request.entry_key(),
                lock_key: request.lock_key(),
                token: request.token.clone(),
                lock_ms,
            },
            notify: None,
        };
        if let Err(failed) = self.dispatch_job(client, wire, now_ms, job) {
            let (job, e) = *failed;
            self.job_failed(&job, &e);
        }
    }

    /// Acts on a poll's answer for the requests waiting on one key; returns those still waiting.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle_waiters(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        waiters: Vec<u32>,
        poll: PollResult,
        requests: &mut dyn CacheRequests,
        actions: &mut Vec<HostAction>,
    ) -> Vec<u32> {
        let config = Rc::clone(&self.config);
        let lookup = match poll.result {
            Ok(l) => l,
            Err(e) => {
                log_debug(&format!("krowoc-edge: coalescing poll failed: {e}"));
                for ctx in waiters {
                    if let Some(r) = requests.cache_mut(ctx) {
                        r.phase = Phase::Bypass(Bypass::Redis);
                        self.metrics.count(r.route, Count::Bypass);
                        self.metrics.count(r.route, Count::RedisError);
                        actions.push(HostAction::Resume(ctx));
                    }
                }
                return Vec::new();
            }
        };
        let servable = matches!(lookup.state, EntryState::Hit | EntryState::Stale);
        let stored = if servable {
            lookup.blob.clone().and_then(|b| entry_decode(b).ok())
        } else {
            None
        };
        if let Some(stored) = stored {
            let outcome = if lookup.state == EntryState::Hit {
                Outcome::Hit
            } else {
                Outcome::Stale
            };
            let age_ms = lookup.age_ms + now_ms.saturating_sub(poll.read_at_ms);
            for ctx in &waiters {
                let Some(r) = requests.cache_mut(*ctx) else {
                    continue;
                };
                let mut status = CacheStatus::hit(ttl_seconds(lookup.fresh_ms, age_ms));
                status.collapsed = true;
                let resp = serve(
                    &config.cache,
                    r,
                    std::borrow::Cow::Borrowed(&stored),
                    age_ms,
                    outcome,
                    status,
                );
                r.outcome = Some(outcome);
                r.phase = Phase::Served;
                self.metrics.count(
                    r.route,
                    if outcome == Outcome::Hit {
                        Count::Hit
                    } else {
                        Count::Stale
                    },
                );
                actions.push(HostAction::Respond(*ctx, resp));
            }
            if lookup.lock == LockState::Taken {
                // The poll took the refresh lock of a stale entry: give it back.
                let lock_key = waiters
                    .first()
                    .and_then(|c| requests.cache_mut(*c))
                    .map(|r| r.lock_key());
                if let Some(lock_key) = lock_key {
                    let job = JobKind::Unlock {
                        lock_key,
                        token: poll.token.clone(),
                        pass_ms: 0,
                    };
                    self.queue_job(client, wire, now_ms, job);
                }
            }
            return Vec::new();
        }
        match lookup.lock {
            LockState::Taken => {
                // The filler gave up (or its lock expired): the poll's request fills instead.
                let mut rest = Vec::with_capacity(waiters.len());
                let mut handed = false;
                for ctx in waiters {
                    let owner = requests
                        .cache_mut(ctx)
                        .filter(|r| r.token == poll.token && !handed);
                    match owner {
                        Some(r) => {
                            handed = true;
                            actions.extend(self.stop_waiting_as_filler(
                                client,
                                wire,
                                now_ms,
                                ctx,
                                r,
                                lookup.now_ms,
                            ));
                        }
                        None => rest.push(ctx),
                    }
                }
                rest
            }
            LockState::Pass | LockState::NotTried => {
                for ctx in waiters {
                    if let Some(r) = requests.cache_mut(ctx) {
                        actions.extend(self.stop_waiting(now_ms, ctx, r));
                    }
                }
                Vec::new()
            }
            LockState::Held => waiters,
        }
    }

    /// A waiting request goes upstream holding the fill lock.
    pub(super) fn stop_waiting_as_filler(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
        looked_up_at: u64,
    ) -> Option<HostAction> {
        request.holds_lock = true;
        request.looked_up_at = looked_up_at;
        let action = self.stop_waiting(now_ms, ctx, request);
        if !matches!(request.phase, Phase::Forwarded { .. }) {
            // Served stale instead: the lock goes back.
            self.release_lock(client, wire, now_ms, request, 0);
        }
        action
    }

    /// A waiting request stops waiting: a usable stale copy, or upstream.
    pub(super) fn stop_waiting(
        &mut self,
        now_ms: u64,
        ctx: u32,
        request: &mut CacheRequest,
    ) -> Option<HostAction> {
        let Phase::Waiting { stale, .. } = std::mem::replace(&mut request.phase, Phase::Finished)
        else {
            return None;
        };
        if !request.holds_lock {
            if let Some(stale) = stale.as_ref().filter(|s| s.usable_for_error(now_ms)) {
                let age = stale.age_at(now_ms);
                let mut status = CacheStatus::hit(ttl_seconds(stale.fresh_ms, age));
                status.collapsed = true;
                status.detail = Some("stale-if-error");
                let resp = serve(
                    &self.config.cache,
                    request,
                    std::borrow::Cow::Borrowed(&stale.response),
                    age,
                    Outcome::Stale,
                    status,
                );
                request.outcome = Some(Outcome::Stale);
                request.phase = Phase::Served;
                self.metrics.count(request.route, Count::Stale);
                return Some(HostAction::Respond(ctx, resp));
            }
        }
        let outcome = if stale.is_some() {
            Outcome::Expired
        } else {
            Outcome::Miss
        };
        self.metrics.count(request.route, forwarded(outcome));
        request.phase = Phase::Forwarded { outcome, stale };
        Some(HostAction::Resume(ctx))
    }
}
