//! Work off the request path: stores, lock releases, deletes, purges, pattern-purge steps,
//! coalescing polls and refreshes. Jobs are queued for the tick (transport `relay`: a proxy
//! cancels a stream's calls when the stream ends) or sent at once (`redis_call`); their answers
//! come back by job id.

use super::*;

/// SCAN COUNT of one pattern-purge step.
pub(super) const SCAN_COUNT: u32 = 500;

/// Most jobs waiting for the tick; beyond, new ones are dropped (and counted as failures).
pub(super) const MAX_QUEUED_JOBS: usize = 4096;

/// Work off the request path.
#[derive(Debug)]
pub(super) enum JobKind {
    Store {
        route: usize,
        keys: Vec<String>,
        /// ARGV[1]: the encoded response (bytes, not UTF-8 in general).
        blob: Vec<u8>,
        /// ARGV[2..].
        args: Vec<String>,
    },
    Unlock {
        lock_key: String,
        token: String,
        pass_ms: u64,
    },
    Delete {
        key: String,
    },
    Purge(PurgeStep),
    /// A pattern purge's next step.
    Scan {
        step: PurgeStep,
        cursor: String,
    },
    /// Coalescing: look again for waiters of one key (with the first waiter's lock token).
    Poll {
        entry_key: String,
        lock_key: String,
        token: String,
        lock_ms: u64,
    },
    Revalidate {
        route: usize,
        key: CacheKey,
        token: String,
        looked_up_at: u64,
        target: RevalidateTarget,
    },
}

#[derive(Debug)]
pub(super) struct Job {
    pub(super) kind: JobKind,
    /// The purge-endpoint request to tell when this job ends.
    pub(super) notify: Option<u32>,
}

impl CacheEngine {
    pub(super) fn job_id(&mut self) -> u32 {
        self.next_job = self.next_job.wrapping_add(1);
        self.next_job
    }

    pub(super) fn queue_job(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        kind: JobKind,
    ) {
        self.enqueue(client, wire, now_ms, Job { kind, notify: None });
    }

    pub(super) fn enqueue(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        job: Job,
    ) {
        // Higress Redis calls belong to the root context: no need to wait for the tick.
        let immediate = client.transport == Transport::RedisCall
            && !matches!(job.kind, JobKind::Revalidate { .. });
        if immediate {
            if let Err(failed) = self.dispatch_job(client, wire, now_ms, job) {
                let (job, e) = *failed;
                self.job_failed(&job, &e);
            }
            return;
        }
        if self.queue.len() >= MAX_QUEUED_JOBS {
            self.job_failed(&job, &RedisError::protocol("cache job queue full"));
            return;
        }
        self.queue.push_back(job);
    }

    /// Sends one job now; the job comes back with the error when it could not be sent.
    pub(super) fn dispatch_job(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        job: Job,
    ) -> Result<(), Box<(Job, RedisError)>> {
        let id = self.job_id();
        let scripts = &self.scripts;
        let (cmd, eval) = match &job.kind {
            JobKind::Store {
                keys, blob, args, ..
            } => scripts.store.pair(keys, Some(blob), args),
            JobKind::Unlock {
                lock_key,
                token,
                pass_ms,
            } => scripts.unlock.pair(
                std::slice::from_ref(lock_key),
                None,
                &[token.clone(), pass_ms.to_string()],
            ),
            JobKind::Delete { key } => (Command::new("DEL").arg(key), None),
            JobKind::Purge(PurgeStep::Index {
                index_key,
                entry_prefix,
                mark_key,
            }) => scripts.purge.pair(
                &[index_key.clone(), mark_key.clone()],
                None,
                std::slice::from_ref(entry_prefix),
            ),
            JobKind::Purge(PurgeStep::Scan { .. }) => {
                let e = RedisError::protocol("a scan is sent as a Scan job");
                return Err(Box::new((job, e)));
            }
            JobKind::Scan {
                step:
                    PurgeStep::Scan {
                        match_pattern,
                        lua_pattern,
                        mark_keys,
                    },
                cursor,
            } => scripts.scan.pair(
                mark_keys,
                None,
                &[
                    cursor.clone(),
                    match_pattern.clone(),
                    SCAN_COUNT.to_string(),
                    lua_pattern.clone(),
                ],
            ),
            JobKind::Scan { .. } => {
                let e = RedisError::protocol("a Scan job needs a scan step");
                return Err(Box::new((job, e)));
            }
            JobKind::Poll {
                entry_key,
                lock_key,
                token,
                lock_ms,
            } => {
                let (keys, args) =
                    lookup_call(entry_key.clone(), lock_key.clone(), *lock_ms, token);
                scripts.lookup.pair(&keys, None, &args)
            }
            JobKind::Revalidate { .. } => {
                let e = RedisError::protocol("a refresh is sent to the upstream on the tick");
                return Err(Box::new((job, e)));
            }
        };
        match client.call(wire, now_ms, Owner::Job(id), &cmd, eval) {
            Ok(_) => {
                if let JobKind::Poll { entry_key, .. } = &job.kind {
                    self.polling.insert(entry_key.clone());
                }
                self.jobs.insert(id, job);
                Ok(())
            }
            Err(e) => Err(Box::new((job, e))),
        }
    }

    /// A job could not be sent, or failed.
    pub(super) fn job_failed(&mut self, job: &Job, e: &RedisError) {
        match &job.kind {
            JobKind::Store { route, .. } => {
                log_debug(&format!("krowoc-edge: cache store failed: {e}"));
                self.metrics.count(*route, Count::StoreFailure);
            }
            JobKind::Purge(_) | JobKind::Scan { .. } => {
                host::log(
                    LogLevel::Warn,
                    &format!("krowoc-edge: cache purge failed: {e}"),
                );
                increment_metric(self.metrics.purge_failures, 1);
            }
            JobKind::Poll {
                entry_key, token, ..
            } => {
                self.polling.remove(entry_key);
                self.poll_results.insert(
                    entry_key.clone(),
                    PollResult {
                        token: token.clone(),
                        result: Err(e.clone()),
                        read_at_ms: 0,
                    },
                );
            }
            JobKind::Revalidate {
                route, key, token, ..
            } => {
                log_debug(&format!("krowoc-edge: cache refresh not sent: {e}"));
                let keys = RouteKeys::new(
                    &self.config.redis.key_prefix,
                    &self.config.routes[*route].name,
                );
                self.queue.push_back(Job {
                    kind: JobKind::Unlock {
                        lock_key: keys.lock(&key.hash),
                        token: token.clone(),
                        pass_ms: 0,
                    },
                    notify: None,
                });
            }
            JobKind::Unlock { .. } | JobKind::Delete { .. } => {}
        }
    }

    /// The answer to job `id` (a completion of [`Owner::Job`]).
    pub fn on_job_answer(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        now_ms: u64,
        id: u32,
        result: Result<Reply, RedisError>,
        requests: &mut dyn CacheRequests,
    ) -> Option<HostAction> {
        let job = self.jobs.remove(&id)?;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.job_failed(&job, &e);
                return job
                    .notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, 0, Some(e.to_string())));
            }
        };
        match job.kind {
            JobKind::Store { route, .. } => {
                // -1: the route was purged after the lookup; the response may predate it.
                let count = if result == Reply::Int(-1) {
                    Count::NotStored
                } else {
                    Count::Store
                };
                self.metrics.count(route, count);
                None
            }
            JobKind::Unlock { .. } | JobKind::Delete { .. } | JobKind::Revalidate { .. } => None,
            JobKind::Purge(_) => {
                let deleted = as_u64(&result).unwrap_or(0);
                increment_metric(self.metrics.purges, 1);
                increment_metric(
                    self.metrics.purged_entries,
                    i64::try_from(deleted).unwrap_or(0),
                );
                job.notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, deleted, None))
            }
            JobKind::Scan { step, .. } => {
                let (cursor, deleted) = match &result {
                    Reply::Array(items) if items.len() == 2 => {
                        let cursor = match &items[0] {
                            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                            other => other.as_int().map(|i| i.to_string()).unwrap_or_default(),
                        };
                        (cursor, as_u64(&items[1]).unwrap_or(0))
                    }
                    _ => (String::new(), 0),
                };
                increment_metric(
                    self.metrics.purged_entries,
                    i64::try_from(deleted).unwrap_or(0),
                );
                if !cursor.is_empty() && cursor != "0" {
                    // The next step goes out from the context that got this answer.
                    let next = Job {
                        kind: JobKind::Scan { step, cursor },
                        notify: job.notify,
                    };
                    if let Some(ctx) = job.notify {
                        if let Some(Some(p)) = requests.purge_mut(ctx) {
                            p.deleted += deleted;
                        }
                    }
                    return match self.dispatch_job(client, wire, now_ms, next) {
                        Ok(()) => None,
                        Err(failed) => {
                            let (next, e) = *failed;
                            self.job_failed(&next, &e);
                            next.notify.and_then(|ctx| {
                                Self::purge_progress(requests, ctx, 0, Some(e.to_string()))
                            })
                        }
                    };
                }
                let failure = cursor
                    .is_empty()
                    .then(|| format!("cache_scan_purge answered {result:?}"));
                if failure.is_none() {
                    increment_metric(self.metrics.purges, 1);
                }
                job.notify
                    .and_then(|ctx| Self::purge_progress(requests, ctx, deleted, failure))
            }
            JobKind::Poll {
                entry_key, token, ..
            } => {
                self.polling.remove(&entry_key);
                self.poll_results.insert(
                    entry_key,
                    PollResult {
                        token,
                        result: parse_lookup(&result),
                        read_at_ms: now_ms,
                    },
                );
                None
            }
        }
    }

    /// The tick: coalesced requests (answers of polls, time-outs, new polls) and queued jobs
    /// (refreshes go to the route's upstream).
    pub fn tick(
        &mut self,
        client: &mut RedisClient,
        wire: &mut dyn Wire,
        upstream: &mut dyn Upstream,
        now_ms: u64,
        requests: &mut dyn CacheRequests,
    ) -> Vec<HostAction> {
        let actions = self.settle_coalesced(client, wire, now_ms, requests);
        let queued: Vec<Job> = self.queue.drain(..).collect();
        for job in queued {
            let sent = match job.kind {
                JobKind::Revalidate { .. } => self.send_refresh(upstream, job),
                _ => self.dispatch_job(client, wire, now_ms, job),
            };
            if let Err(failed) = sent {
                let (job, e) = *failed;
                self.job_failed(&job, &e);
            }
        }
        actions
    }
}
