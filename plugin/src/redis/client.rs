//! The Redis command layer shared by every feature: one interface over both transports,
//! pending calls tracked by token (several in flight per request context), a deadline on every
//! call, EVALSHA with EVAL on NOSCRIPT, and the per-VM circuit breaker.
//!
//! Over the relay, requests' calls (and cache jobs) can share exchanges (`redis.max_in_flight`):
//! while the VM has that many of its requests' exchanges in flight, further calls wait and then
//! ride together in the next exchange, one body of many commands that the relay pipelines. No timer
//! is involved: an idle VM sends each call at once, a busy one makes fewer, larger exchanges.
//! A shared exchange is sent from the root context (a proxy cancels a stream's calls when the
//! stream ends, and the request that freed the slot ends first), reached from a request's
//! callback through a kick on the VM's own shared queue ([`Wire::kick`]).
//!
//! The host side of a transport is the [`Wire`] trait (implemented in `host.rs` over
//! `dispatch_http_call` and `proxy_redis_call`); everything here is plain Rust, so it is
//! tested natively against a real redis-server.

use crate::config::{RedisConfig, Transport};
use crate::redis::breaker::{Breaker, BreakerState, Transition};
use crate::redis::error::{RedisError, RedisErrorKind};
use crate::redis::resp::{decode_replies, encode_pipeline, Command, Reply};
use std::collections::HashMap;

/// Sends encoded commands over one transport; the reply comes later, under the returned token.
pub trait Wire {
    fn send(&mut self, payload: &[u8], timeout_ms: u64) -> Result<u32, RedisError>;

    /// Whether [`Wire::kick`] can reach the root context (shared exchanges need it).
    fn can_kick(&self) -> bool {
        false
    }

    /// Asks the host to call the root context soon (`on_queue_ready`), where shared exchanges
    /// are sent. False when it cannot.
    fn kick(&mut self) -> bool {
        false
    }
}

/// What the host handed back for a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawReply {
    /// A relay answer: the `:status` (None when the call was reset) and the body.
    Relay { status: Option<u16>, body: Vec<u8> },
    /// A Higress `proxy_on_redis_call_response`: host status (0 = OK) and the raw reply.
    RedisCall { status: u32, body: Vec<u8> },
}

/// Who made a call, and so who gets its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// The rate-limit call of the request with this context id.
    RateLimit(u32),
    /// The cache lookup of the request with this context id (joins its rate-limit call).
    CacheLookup(u32),
    /// The flush of request events with this number.
    Flush(u32),
    /// The cache job with this id, off the request path.
    Job(u32),
    /// This VM's registration for the rate limits' shares (`failure_mode: local`).
    Registry,
    /// The sync with this number of the rate limits' `sync` counters.
    Sync(u32),
}

impl Owner {
    /// The request context that waits for this call, if a request made it.
    pub fn request(self) -> Option<u32> {
        match self {
            Owner::RateLimit(ctx) | Owner::CacheLookup(ctx) => Some(ctx),
            Owner::Flush(_) | Owner::Job(_) | Owner::Registry | Owner::Sync(_) => None,
        }
    }
}

/// One call in flight.
#[derive(Clone, Debug)]
pub struct PendingCall {
    pub owner: Owner,
    pub deadline_ms: u64,
    /// Sent instead when Redis answers NOSCRIPT (the EVAL of an EVALSHA).
    pub on_noscript: Option<Command>,
    /// Some(n): a pipeline of n commands, answered by an array of their n replies.
    pub pipeline: Option<usize>,
    /// The requests' calls sharing this exchange, in the order of its commands; empty for a
    /// call of its own.
    pub riders: Vec<Rider>,
}

impl PendingCall {
    /// Whether it is one of the requests' exchanges that `redis.max_in_flight` limits.
    fn is_request_exchange(&self) -> bool {
        !self.riders.is_empty() || self.owner.request().is_some()
    }
}

/// A request's call waiting for, or riding in, a shared exchange.
#[derive(Clone, Debug)]
pub struct Rider {
    pub owner: Owner,
    command: Command,
    on_noscript: Option<Command>,
    /// The call's own deadline, from when it was made.
    deadline_ms: u64,
    /// Answered already (timed out while its exchange was out).
    done: bool,
}

/// Most calls in one shared exchange (the relay's default `--max-commands` is 64).
pub const MAX_RIDERS: usize = 64;
/// Most bytes of commands in one shared exchange (the relay's default body cap is 1 MiB).
const MAX_SHARED_BYTES: usize = 256 * 1024;

/// Calls waiting for a shared exchange.
#[derive(Debug, Default)]
struct Sharing {
    /// `redis.max_in_flight`: 0 sends every call at once in its own exchange.
    max_in_flight: usize,
    waiting: Vec<Rider>,
    /// A kick is on its way to the root context.
    kicked: bool,
}

/// A finished call, handed to the context that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub owner: Owner,
    pub result: Result<Reply, RedisError>,
}

/// Counters the caller turns into metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub noscript: u64,
    pub short_circuited: u64,
    /// Calls sent in an exchange shared with other requests' calls.
    pub shared: u64,
}

/// Extra time past the transport's own timeout before a call is given up on a tick, so the
/// host's timeout answer normally arrives first.
pub const DEADLINE_GRACE_MS: u64 = 10;

pub struct RedisClient {
    pub transport: Transport,
    timeout_ms: u64,
    breaker: Breaker,
    pending: HashMap<u32, PendingCall>,
    pub stats: ClientStats,
    /// Breaker transitions not yet reported (for metrics and logs).
    pub transitions: Vec<Transition>,
    noauth: bool,
    sharing: Sharing,
}

impl RedisClient {
    pub fn new(cfg: &RedisConfig) -> RedisClient {
        RedisClient {
            transport: cfg.transport,
            timeout_ms: cfg.timeout.as_millis(),
            breaker: Breaker::new(
                cfg.breaker.failures,
                cfg.breaker.probe_interval_ms(),
                cfg.breaker.cooldown.as_millis(),
            ),
            pending: HashMap::new(),
            stats: ClientStats::default(),
            transitions: Vec::new(),
            noauth: false,
            sharing: Sharing {
                max_in_flight: cfg.max_in_flight(),
                ..Sharing::default()
            },
        }
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Calls in flight or waiting for a shared exchange, for a request context.
    pub fn pending_for(&self, context_id: u32) -> usize {
        let own = self
            .pending
            .values()
            .filter(|p| p.riders.is_empty() && p.owner.request() == Some(context_id))
            .count();
        let riding = self
            .pending
            .values()
            .flat_map(|p| &p.riders)
            .chain(&self.sharing.waiting)
            .filter(|r| !r.done && r.owner.request() == Some(context_id))
            .count();
        own + riding
    }

    /// The requests' exchanges in flight (what `redis.max_in_flight` limits).
    fn request_exchanges(&self) -> usize {
        self.pending
            .values()
            .filter(|p| p.is_request_exchange())
            .count()
    }

    /// Requests' calls waiting for a shared exchange.
    pub fn waiting_len(&self) -> usize {
        self.sharing.waiting.len()
    }

    /// Whether a call by `owner` waits for a shared exchange instead of going out now.
    fn must_wait(&self, wire: &dyn Wire, owner: Owner) -> bool {
        let max = self.sharing.max_in_flight;
        // Cache jobs (stores, unlocks, purges) ride along too: they are off the request path.
        let rides = owner.request().is_some() || matches!(owner, Owner::Job(_));
        max > 0
            && rides
            && wire.can_kick()
            && (!self.sharing.waiting.is_empty() || self.request_exchanges() >= max)
    }

    /// Sends one command for `owner`; `on_noscript` is sent instead if Redis answers
    /// NOSCRIPT. Fails at once (no call made) when the breaker is open or the host refuses.
    pub fn call(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        owner: Owner,
        command: &Command,
        on_noscript: Option<Command>,
    ) -> Result<u32, RedisError> {
        self.admit(now_ms)?;
        if self.must_wait(wire, owner) {
            self.sharing.waiting.push(Rider {
                owner,
                command: command.clone(),
                on_noscript,
                deadline_ms: now_ms + self.timeout_ms + DEADLINE_GRACE_MS,
                done: false,
            });
            if !self.sharing.kicked {
                // Without a kick the tick sends it (the call still has its deadline).
                self.sharing.kicked = wire.kick();
            }
            return Ok(0);
        }
        self.dispatch(wire, now_ms, owner, command, on_noscript)
    }

    /// The root context was kicked: the waiting calls go out in shared exchanges. Returns the
    /// calls that failed at once.
    pub fn on_kick(&mut self, wire: &mut dyn Wire, now_ms: u64) -> Vec<Completion> {
        self.sharing.kicked = false;
        self.send_waiting(wire, now_ms)
    }

    /// Sends waiting calls, as many per exchange as fit, while the VM has a free exchange
    /// slot. Only from the root context. Returns the calls that failed or timed out meanwhile.
    pub fn send_waiting(&mut self, wire: &mut dyn Wire, now_ms: u64) -> Vec<Completion> {
        let mut failed = self.expire_waiting(now_ms);
        while !self.sharing.waiting.is_empty()
            && self.request_exchanges() < self.sharing.max_in_flight.max(1)
        {
            let mut payload = Vec::new();
            let mut n = 0;
            for r in &self.sharing.waiting {
                let before = payload.len();
                r.command.encode_into(&mut payload);
                if n > 0 && (n == MAX_RIDERS || payload.len() > MAX_SHARED_BYTES) {
                    payload.truncate(before);
                    break;
                }
                n += 1;
            }
            let riders: Vec<Rider> = self.sharing.waiting.drain(..n).collect();
            self.stats.calls += 1;
            self.stats.shared += riders.len() as u64;
            match wire.send(&payload, self.timeout_ms) {
                Ok(token) => {
                    let deadline_ms = riders.iter().map(|r| r.deadline_ms).max().unwrap_or(0);
                    self.pending.insert(
                        token,
                        PendingCall {
                            owner: riders[0].owner,
                            deadline_ms: deadline_ms.max(now_ms + self.timeout_ms),
                            on_noscript: None,
                            pipeline: None,
                            riders,
                        },
                    );
                }
                Err(e) => {
                    self.record_failure(&e, now_ms);
                    failed.extend(riders.into_iter().map(|r| Completion {
                        owner: r.owner,
                        result: Err(e.clone()),
                    }));
                }
            }
        }
        failed
    }

    /// Waiting calls past their deadline become timeouts (the exchanges ahead of them are slow:
    /// their own failures count for the breaker, these do not count again).
    fn expire_waiting(&mut self, now_ms: u64) -> Vec<Completion> {
        let timeout_ms = self.timeout_ms;
        let (late, waiting): (Vec<Rider>, Vec<Rider>) = std::mem::take(&mut self.sharing.waiting)
            .into_iter()
            .partition(|r| r.deadline_ms <= now_ms);
        self.sharing.waiting = waiting;
        self.stats.errors += late.len() as u64;
        self.stats.timeouts += late.len() as u64;
        late.into_iter()
            .map(|r| Completion {
                owner: r.owner,
                result: Err(waited_too_long(timeout_ms)),
            })
            .collect()
    }

    /// Lets a call through the breaker, or fails it at once (counted as short-circuited).
    fn admit(&mut self, now_ms: u64) -> Result<(), RedisError> {
        if self
            .breaker
            .try_acquire(now_ms, self.timeout_ms + DEADLINE_GRACE_MS)
        {
            return Ok(());
        }
        self.stats.short_circuited += 1;
        Err(RedisError::new(
            RedisErrorKind::BreakerOpen,
            "circuit breaker open: Redis is not called during the cool-down",
        ))
    }

    fn dispatch(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        owner: Owner,
        command: &Command,
        on_noscript: Option<Command>,
    ) -> Result<u32, RedisError> {
        self.stats.calls += 1;
        let payload = encode_pipeline(std::slice::from_ref(command));
        self.send_payload(wire, now_ms, owner, &payload, on_noscript, None)
    }

    /// Sends several commands in one call (one relay body): `payload` is `commands` encoded
    /// commands back to back (see [`crate::redis::resp::encode_array`]). The completion's reply is an
    /// array of their replies, in order, error replies included: each is its command's outcome
    /// (an `OOM` answer to one XADD says nothing about the PUBLISH before it), and the call fails
    /// as a whole only when the transport fails or the replies are not RESP. Replies that came
    /// back are a healthy call for the breaker, as the flush script's reply is with
    /// `redis_call`: a full Redis refusing XADDs must not stop cache reads it still serves
    /// (single calls answered `OOM`, `LOADING`… still count). Only for transport `relay`: Higress
    /// hosts forward exactly one command per `redis_call`.
    pub fn call_pipeline(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        owner: Owner,
        payload: &[u8],
        commands: usize,
    ) -> Result<u32, RedisError> {
        self.admit(now_ms)?;
        self.stats.calls += 1;
        let replies = Some(commands);
        self.send_payload(wire, now_ms, owner, payload, None, replies)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_payload(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        owner: Owner,
        payload: &[u8],
        on_noscript: Option<Command>,
        pipeline: Option<usize>,
    ) -> Result<u32, RedisError> {
        match wire.send(payload, self.timeout_ms) {
            Ok(token) => {
                self.pending.insert(
                    token,
                    PendingCall {
                        owner,
                        deadline_ms: now_ms + self.timeout_ms + DEADLINE_GRACE_MS,
                        on_noscript,
                        pipeline,
                        riders: Vec::new(),
                    },
                );
                Ok(token)
            }
            Err(e) => {
                self.record_failure(&e, now_ms);
                Err(e)
            }
        }
    }

    /// The answer to a pipeline: every reply, or the failure of the whole call.
    fn finish_pipeline(
        &mut self,
        now_ms: u64,
        call: PendingCall,
        expected: usize,
        raw: RawReply,
    ) -> Completion {
        let result = reply_bytes(raw).and_then(|bytes| decode_replies(&bytes, expected));
        if result.as_ref().is_ok_and(|replies| {
            replies
                .iter()
                .any(|r| matches!(r, Reply::Error(m) if RedisError::server(m.clone()).is_noauth()))
        }) {
            self.noauth = true;
        }
        match &result {
            Ok(_) => self.record_health(),
            Err(e) => self.record_failure(e, now_ms),
        }
        let result = result.map(Reply::Array);
        Completion {
            owner: call.owner,
            result,
        }
    }

    fn record_failure(&mut self, e: &RedisError, now_ms: u64) {
        self.stats.errors += 1;
        if e.is_timeout() {
            self.stats.timeouts += 1;
        }
        if e.counts_for_breaker() {
            let t = self.breaker.on_failure(now_ms);
            if t != Transition::None {
                self.transitions.push(t);
            }
        } else {
            self.record_health();
        }
    }

    fn record_health(&mut self) {
        let t = self.breaker.on_success();
        if t != Transition::None {
            self.transitions.push(t);
        }
    }

    /// Handles the host's answer for `token`: the finished calls (several for a shared
    /// exchange). `in_root` says the host is calling the root context, where waiting calls can
    /// go out at once; elsewhere the root is kicked for them.
    pub fn on_answer(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        token: u32,
        raw: RawReply,
        in_root: bool,
    ) -> Vec<Completion> {
        let Some(call) = self.pending.remove(&token) else {
            return Vec::new();
        };
        let freed = call.is_request_exchange();
        let mut done = if call.riders.is_empty() {
            self.finish_call(wire, now_ms, call, raw)
                .into_iter()
                .collect()
        } else {
            self.finish_shared(wire, now_ms, call, raw)
        };
        if freed && !self.sharing.waiting.is_empty() {
            if in_root {
                done.extend(self.send_waiting(wire, now_ms));
            } else if !self.sharing.kicked {
                self.sharing.kicked = wire.kick();
            }
        }
        done
    }

    /// [`RedisClient::on_answer`] for a call of its own: None when the token is unknown (a
    /// late answer after its deadline) or when the call continues (NOSCRIPT → EVAL sent).
    pub fn on_reply(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        token: u32,
        raw: RawReply,
    ) -> Option<Completion> {
        let call = self.pending.remove(&token)?;
        self.finish_call(wire, now_ms, call, raw)
    }

    /// The answer to a shared exchange: one reply per rider, in order. A rider answered
    /// NOSCRIPT waits again with its EVAL (sent from here: shared exchanges are answered in
    /// the root context).
    fn finish_shared(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        call: PendingCall,
        raw: RawReply,
    ) -> Vec<Completion> {
        let replies = reply_bytes(raw).and_then(|b| decode_replies(&b, call.riders.len()));
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                self.record_failure(&e, now_ms);
                return call
                    .riders
                    .into_iter()
                    .filter(|r| !r.done)
                    .map(|r| Completion {
                        owner: r.owner,
                        result: Err(e.clone()),
                    })
                    .collect();
            }
        };
        let mut out = Vec::new();
        let mut again = Vec::new();
        for (rider, reply) in call.riders.into_iter().zip(replies) {
            if rider.done {
                continue;
            }
            let result = match reply {
                Reply::Error(msg) => Err(RedisError::server(msg)),
                other => Ok(other),
            };
            match &result {
                Err(e) if e.is_noscript() => {
                    self.stats.noscript += 1;
                    self.record_health();
                    if let Some(eval) = rider.on_noscript {
                        again.push(Rider {
                            command: eval,
                            on_noscript: None,
                            ..rider
                        });
                        continue;
                    }
                }
                Err(e) => {
                    if e.is_noauth() {
                        self.noauth = true;
                    }
                    self.record_failure(e, now_ms);
                }
                Ok(_) => self.record_health(),
            }
            out.push(Completion {
                owner: rider.owner,
                result,
            });
        }
        if !again.is_empty() {
            // Ahead of the others: these were made first.
            again.append(&mut self.sharing.waiting);
            self.sharing.waiting = again;
            out.extend(self.send_waiting(wire, now_ms));
        }
        out
    }

    fn finish_call(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        call: PendingCall,
        raw: RawReply,
    ) -> Option<Completion> {
        if let Some(expected) = call.pipeline {
            return Some(self.finish_pipeline(now_ms, call, expected, raw));
        }
        let result = reply_bytes(raw).and_then(|bytes| {
            let mut replies = decode_replies(&bytes, 1)?;
            // decode_replies(.., 1) yields exactly one reply on success.
            replies
                .pop()
                .ok_or_else(|| RedisError::protocol("no reply"))
        });
        let result = match result {
            Ok(Reply::Error(msg)) => Err(RedisError::server(msg)),
            other => other,
        };
        match &result {
            Err(e) if e.is_noscript() => {
                self.stats.noscript += 1;
                self.record_health();
                if let Some(eval) = call.on_noscript {
                    return match self.dispatch(wire, now_ms, call.owner, &eval, None) {
                        Ok(_) => None,
                        Err(e) => Some(Completion {
                            owner: call.owner,
                            result: Err(e),
                        }),
                    };
                }
            }
            Err(e) => {
                if e.is_noauth() {
                    self.noauth = true;
                }
                self.record_failure(e, now_ms)
            }
            Ok(_) => self.record_health(),
        }
        Some(Completion {
            owner: call.owner,
            result,
        })
    }

    /// Gives up on calls past their deadline; each becomes a timeout for its context. A shared
    /// exchange's riders time out one by one, by their own deadlines.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Completion> {
        let mut out = self.expire_waiting(now_ms);
        let timeout_ms = self.timeout_ms;
        for call in self.pending.values_mut() {
            for r in call.riders.iter_mut().filter(|r| !r.done) {
                if r.deadline_ms <= now_ms {
                    r.done = true;
                    self.stats.errors += 1;
                    self.stats.timeouts += 1;
                    out.push(Completion {
                        owner: r.owner,
                        result: Err(waited_too_long(timeout_ms)),
                    });
                }
            }
        }
        let expired: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.deadline_ms <= now_ms || (!p.riders.is_empty() && p.riders.iter().all(|r| r.done))
            })
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            if let Some(call) = self.pending.remove(&token) {
                if call.riders.is_empty() {
                    let e = waited_too_long(self.timeout_ms);
                    self.record_failure(&e, now_ms);
                    out.push(Completion {
                        owner: call.owner,
                        result: Err(e),
                    });
                } else {
                    // Its riders were counted as they timed out; the exchange is one failure
                    // for the breaker.
                    let t = self.breaker.on_failure(now_ms);
                    if t != Transition::None {
                        self.transitions.push(t);
                    }
                }
            }
        }
        out
    }

    /// Whether `token` is a call in flight.
    pub fn has_pending(&self, token: u32) -> bool {
        self.pending.contains_key(&token)
    }

    /// True once after Redis answered NOAUTH (the host should be given the credentials again).
    pub fn take_noauth(&mut self) -> bool {
        std::mem::take(&mut self.noauth)
    }
}

fn waited_too_long(timeout_ms: u64) -> RedisError {
    RedisError::new(
        RedisErrorKind::Timeout,
        format!("no reply within {timeout_ms}ms"),
    )
}

/// The RESP bytes of a raw answer, or the transport error it stands for.
pub fn reply_bytes(raw: RawReply) -> Result<Vec<u8>, RedisError> {
    match raw {
        RawReply::Relay {
            status: Some(200),
            body,
        } => Ok(body),
        RawReply::Relay { status: None, .. } => Err(RedisError::new(
            RedisErrorKind::Unavailable,
            "relay call was reset before an answer",
        )),
        RawReply::Relay {
            status: Some(status),
            body,
        } => {
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            let kind = match status {
                400 | 403 | 413 => RedisErrorKind::Refused,
                504 => RedisErrorKind::Timeout,
                _ => RedisErrorKind::Unavailable,
            };
            Err(RedisError::new(
                kind,
                format!("relay answered {status}: {}", text.trim()),
            ))
        }
        RawReply::RedisCall { status: 0, body } => Ok(body),
        RawReply::RedisCall { status, .. } => Err(RedisError::new(
            RedisErrorKind::Unavailable,
            format!("host could not reach Redis (status {status})"),
        )),
    }
}

/// A wire for unit tests: collects what would go on the wire; tokens count up like a host's.
/// Redis Cluster's key slots, to check in tests that every command the filter sends keeps its
/// keys in one slot (the cluster refuses a command whose keys span slots).
#[cfg(test)]
pub(crate) mod slots {
    use crate::redis::resp::{decode_replies, Reply};

    /// CRC16-XMODEM, as Redis Cluster hashes keys.
    fn crc16(bytes: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for b in bytes {
            crc ^= u16::from(*b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    /// The slot of `key`: its hash tag (the text between the first `{` and the next `}`, when
    /// not empty) or the whole key, CRC16 mod 16384.
    pub fn slot(key: &[u8]) -> u16 {
        let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        });
        crc16(tagged.unwrap_or(key)) % 16384
    }

    /// The keys a command names, for the commands the filter sends.
    fn keys(args: &[Vec<u8>]) -> Vec<&[u8]> {
        let name = args
            .first()
            .map(|n| n.to_ascii_uppercase())
            .unwrap_or_default();
        match name.as_slice() {
            // (Unit tests also send shortened commands: those name no keys here.)
            b"EVAL" | b"EVALSHA" => {
                let n: Option<usize> = args
                    .get(2)
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|t| t.parse().ok());
                n.and_then(|n| args.get(3..3 + n))
                    .map(|keys| keys.iter().map(Vec::as_slice).collect())
                    .unwrap_or_default()
            }
            b"DEL" | b"UNLINK" => args[1..].iter().map(Vec::as_slice).collect(),
            b"XADD" | b"GET" | b"SET" | b"PEXPIRE" => {
                args.get(1).map(Vec::as_slice).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Panics when a command in `payload` names keys in more than one slot.
    pub fn assert_one_slot_per_command(payload: &[u8]) {
        let Some(commands) = (1..=512).find_map(|n| decode_replies(payload, n).ok()) else {
            return;
        };
        for command in commands {
            let Reply::Array(items) = command else {
                continue;
            };
            let args: Vec<Vec<u8>> = items
                .into_iter()
                .filter_map(|i| match i {
                    Reply::Bulk(b) => Some(b),
                    _ => None,
                })
                .collect();
            let keys = keys(&args);
            if let Some(first) = keys.first() {
                for k in &keys {
                    assert_eq!(
                        slot(k),
                        slot(first),
                        "{} names keys in two Redis Cluster slots: {:?} and {:?}",
                        String::from_utf8_lossy(&args[0]),
                        String::from_utf8_lossy(first),
                        String::from_utf8_lossy(k)
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "two Redis Cluster slots")]
    fn a_script_call_whose_keys_span_slots_is_caught() {
        let call = crate::redis::resp::Command::new("EVALSHA")
            .arg("abc")
            .arg("2")
            .arg("krowoc:rl:{route:a}:x")
            .arg("krowoc:rl:{route:b}:x");
        assert_one_slot_per_command(&call.encode());
    }

    #[test]
    fn slots_are_redis_clusters() {
        // The CRC16 check value, and slots as `CLUSTER KEYSLOT` answers them.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }
}

#[cfg(test)]
pub(crate) mod recording {
    use super::Wire;
    use crate::redis::error::RedisError;
    use crate::redis::resp::{decode_replies, Reply};

    #[derive(Debug)]
    pub struct RecordingWire {
        pub next: u32,
        /// Each call's token and payload, in order.
        pub sent: Vec<(u32, Vec<u8>)>,
        /// Set: every send is refused with it.
        pub fail: Option<RedisError>,
        /// Whether it can kick the root context, and how often it did.
        pub kickable: bool,
        pub kicks: usize,
    }

    impl Default for RecordingWire {
        fn default() -> RecordingWire {
            RecordingWire {
                next: 3,
                sent: Vec::new(),
                fail: None,
                kickable: false,
                kicks: 0,
            }
        }
    }

    impl Wire for RecordingWire {
        fn can_kick(&self) -> bool {
            self.kickable
        }

        fn kick(&mut self) -> bool {
            self.kicks += 1;
            self.kickable
        }

        fn send(&mut self, payload: &[u8], _timeout_ms: u64) -> Result<u32, RedisError> {
            if let Some(e) = self.fail.clone() {
                return Err(e);
            }
            // Every command any test makes the filter send is one a Redis Cluster can run.
            super::slots::assert_one_slot_per_command(payload);
            self.next += 4;
            self.sent.push((self.next, payload.to_vec()));
            Ok(self.next)
        }
    }

    /// Shared, so that a test reads what a wire it boxed away sent.
    impl Wire for std::rc::Rc<std::cell::RefCell<RecordingWire>> {
        fn can_kick(&self) -> bool {
            self.borrow().can_kick()
        }

        fn kick(&mut self) -> bool {
            self.borrow_mut().kick()
        }

        fn send(&mut self, payload: &[u8], timeout_ms: u64) -> Result<u32, RedisError> {
            self.borrow_mut().send(payload, timeout_ms)
        }
    }

    impl RecordingWire {
        /// The arguments of the last call's first command (`EVALSHA`, its SHA1, …), as text.
        pub fn last_command(&self) -> Vec<String> {
            let Some((_, payload)) = self.sent.last() else {
                return Vec::new();
            };
            match decode_replies(payload, 1).ok().and_then(|mut r| r.pop()) {
                Some(Reply::Array(items)) => items
                    .iter()
                    .map(|i| match i {
                        Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect(),
                _ => Vec::new(),
            }
        }

        /// The token of the last call.
        pub fn last_token(&self) -> u32 {
            self.sent.last().map_or(0, |(t, _)| *t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recording::RecordingWire;
    use super::*;
    use crate::config::parse_config;

    fn client(json: &str) -> RedisClient {
        let cfg = parse_config(json.as_bytes()).expect("config");
        RedisClient::new(&cfg.redis)
    }

    fn recorder() -> RecordingWire {
        RecordingWire::default()
    }

    #[test]
    fn relay_status_codes_map_to_error_kinds() {
        let k = |status, body: &[u8]| {
            reply_bytes(RawReply::Relay {
                status: Some(status),
                body: body.to_vec(),
            })
            .expect_err("error")
            .kind
        };
        assert_eq!(k(400, b"malformed"), RedisErrorKind::Refused);
        assert_eq!(k(403, b"token"), RedisErrorKind::Refused);
        assert_eq!(k(413, b"big"), RedisErrorKind::Refused);
        assert_eq!(k(502, b"unreachable"), RedisErrorKind::Unavailable);
        assert_eq!(
            k(503, b"upstream connect error"),
            RedisErrorKind::Unavailable
        );
        assert_eq!(k(504, b"timeout"), RedisErrorKind::Timeout);
        assert_eq!(
            reply_bytes(RawReply::Relay {
                status: None,
                body: vec![]
            })
            .expect_err("reset")
            .kind,
            RedisErrorKind::Unavailable
        );
        assert_eq!(
            reply_bytes(RawReply::RedisCall {
                status: 1,
                body: vec![]
            })
            .expect_err("down")
            .kind,
            RedisErrorKind::Unavailable
        );
        assert_eq!(
            reply_bytes(RawReply::RedisCall {
                status: 0,
                body: b"+OK\r\n".to_vec()
            }),
            Ok(b"+OK\r\n".to_vec())
        );
    }

    #[test]
    fn several_calls_in_flight_complete_independently() {
        let mut c = client("{}");
        let mut w = recorder();
        let a = c
            .call(&mut w, 0, Owner::RateLimit(7), &Command::new("PING"), None)
            .expect("a");
        let b = c
            .call(&mut w, 0, Owner::RateLimit(7), &Command::new("TIME"), None)
            .expect("b");
        let other = c
            .call(&mut w, 0, Owner::RateLimit(9), &Command::new("PING"), None)
            .expect("c");
        assert_eq!(c.pending_for(7), 2);
        let done = c
            .on_reply(
                &mut w,
                1,
                b,
                RawReply::Relay {
                    status: Some(200),
                    body: b":5\r\n".to_vec(),
                },
            )
            .expect("b done");
        assert_eq!(done.owner, Owner::RateLimit(7));
        assert_eq!(done.result, Ok(Reply::Int(5)));
        assert_eq!(c.pending_for(7), 1);
        let done = c
            .on_reply(
                &mut w,
                1,
                a,
                RawReply::Relay {
                    status: Some(200),
                    body: b"garbage".to_vec(),
                },
            )
            .expect("a done");
        assert!(done.result.expect_err("garbage").is_protocol());
        assert_eq!(c.pending_for(7), 0);
        assert_eq!(c.pending_for(9), 1);
        assert!(
            c.on_reply(
                &mut w,
                1,
                a,
                RawReply::Relay {
                    status: Some(200),
                    body: vec![]
                }
            )
            .is_none(),
            "a second answer for a finished token is ignored"
        );
        let _ = other;
    }

    #[test]
    fn noscript_is_answered_with_eval_under_a_new_token() {
        let mut c = client("{}");
        let mut w = recorder();
        let t = c
            .call(
                &mut w,
                0,
                Owner::RateLimit(1),
                &Command::new("EVALSHA").arg("abc"),
                Some(Command::new("EVAL").arg("return 1")),
            )
            .expect("sent");
        let r = c.on_reply(
            &mut w,
            5,
            t,
            RawReply::RedisCall {
                status: 0,
                body: b"-NOSCRIPT No matching script. Please use EVAL.\r\n".to_vec(),
            },
        );
        assert!(r.is_none(), "the call goes on as EVAL");
        assert_eq!(w.sent.len(), 2);
        assert!(w.sent[1].1.starts_with(b"*2\r\n$4\r\nEVAL\r\n"));
        assert_eq!(c.stats.noscript, 1);
        let t2 = w.sent[1].0;
        let done = c
            .on_reply(
                &mut w,
                6,
                t2,
                RawReply::RedisCall {
                    status: 0,
                    body: b":1\r\n".to_vec(),
                },
            )
            .expect("done");
        assert_eq!(done.result, Ok(Reply::Int(1)));
    }

    #[test]
    fn deadlines_expire_calls_and_late_answers_are_ignored() {
        let mut c = client(r#"{"redis": {"timeout": "100ms"}}"#);
        let mut w = recorder();
        let t = c
            .call(
                &mut w,
                1000,
                Owner::RateLimit(3),
                &Command::new("PING"),
                None,
            )
            .expect("sent");
        assert!(c.expire(1100).is_empty(), "grace period");
        let expired = c.expire(1000 + 100 + DEADLINE_GRACE_MS);
        assert_eq!(expired.len(), 1);
        assert!(expired[0]
            .result
            .as_ref()
            .expect_err("timeout")
            .is_timeout());
        assert_eq!(c.stats.timeouts, 1);
        assert!(c
            .on_reply(
                &mut w,
                2000,
                t,
                RawReply::RedisCall {
                    status: 0,
                    body: b"+PONG\r\n".to_vec()
                }
            )
            .is_none());
    }

    #[test]
    fn breaker_opens_after_failures_and_short_circuits_calls() {
        let mut c = client(
            r#"{"redis": {"breaker": {"failures": 2, "probe_interval": "1s", "cooldown": "1s"}}}"#,
        );
        let mut w = recorder();
        for now in [0, 1] {
            let t = c
                .call(
                    &mut w,
                    now,
                    Owner::RateLimit(1),
                    &Command::new("PING"),
                    None,
                )
                .expect("sent");
            c.on_reply(
                &mut w,
                now,
                t,
                RawReply::Relay {
                    status: Some(502),
                    body: b"down".to_vec(),
                },
            );
        }
        assert_eq!(c.breaker_state(), BreakerState::Open);
        assert_eq!(c.transitions, vec![Transition::Opened]);
        let sent_before = w.sent.len();
        let e = c
            .call(
                &mut w,
                500,
                Owner::RateLimit(1),
                &Command::new("PING"),
                None,
            )
            .expect_err("open");
        assert_eq!(e.kind, RedisErrorKind::BreakerOpen);
        assert_eq!(w.sent.len(), sent_before, "nothing sent while open");
        assert_eq!(c.stats.short_circuited, 1);
        // After the cool-down one probe goes out; its success closes the breaker.
        let t = c
            .call(
                &mut w,
                1001,
                Owner::RateLimit(1),
                &Command::new("PING"),
                None,
            )
            .expect("probe");
        assert!(c
            .call(
                &mut w,
                1002,
                Owner::RateLimit(1),
                &Command::new("PING"),
                None
            )
            .is_err());
        c.on_reply(
            &mut w,
            1003,
            t,
            RawReply::Relay {
                status: Some(200),
                body: b"+PONG\r\n".to_vec(),
            },
        );
        assert_eq!(c.breaker_state(), BreakerState::Closed);
        assert_eq!(c.transitions, vec![Transition::Opened, Transition::Closed]);
    }

    #[test]
    fn any_call_can_be_the_probe_and_its_success_closes_the_breaker_at_once() {
        let relay = |status: u16, body: &[u8]| RawReply::Relay {
            status: Some(status),
            body: body.to_vec(),
        };
        for owner in [
            Owner::RateLimit(1),
            Owner::CacheLookup(1),
            Owner::Flush(1),
            Owner::Job(1),
        ] {
            let mut c = client(r#"{"redis": {"breaker": {"failures": 1, "cooldown": "5s"}}}"#);
            let mut w = recorder();
            let t = c
                .call(&mut w, 0, owner, &Command::new("PING"), None)
                .expect("sent");
            c.on_reply(&mut w, 0, t, relay(502, b"down"));
            assert_eq!(c.breaker_state(), BreakerState::Open);
            assert!(c
                .call(&mut w, 99, owner, &Command::new("PING"), None)
                .is_err());
            // 100ms after opening (the default probe interval), not after the 5s cool-down.
            let t = c
                .call(&mut w, 100, owner, &Command::new("PING"), None)
                .unwrap_or_else(|e| panic!("{owner:?} is not let through as the probe: {e}"));
            c.on_reply(&mut w, 101, t, relay(200, b"+PONG\r\n"));
            assert_eq!(c.breaker_state(), BreakerState::Closed, "{owner:?}");
            assert!(c
                .call(
                    &mut w,
                    102,
                    Owner::RateLimit(2),
                    &Command::new("PING"),
                    None
                )
                .is_ok());
        }
    }

    #[test]
    fn failed_probes_back_off_toward_the_cooldown() {
        let mut c = client(r#"{"redis": {"breaker": {"failures": 1, "cooldown": "1s"}}}"#);
        let mut w = recorder();
        let mut probes = Vec::new();
        let t = c
            .call(&mut w, 0, Owner::RateLimit(1), &Command::new("PING"), None)
            .expect("sent");
        let down = || RawReply::Relay {
            status: Some(502),
            body: b"down".to_vec(),
        };
        c.on_reply(&mut w, 0, t, down());
        for now in 1..3_000 {
            if let Ok(t) = c.call(
                &mut w,
                now,
                Owner::Flush(now as u32),
                &Command::new("PING"),
                None,
            ) {
                probes.push(now);
                c.on_reply(&mut w, now, t, down());
            }
        }
        assert_eq!(probes, vec![100, 300, 700, 1500, 2500]);
        assert_eq!(
            c.transitions,
            vec![Transition::Opened],
            "probing is not reopening"
        );
    }

    #[test]
    fn a_pipeline_carries_every_reply_even_when_one_says_out_of_memory() {
        let mut c = client(r#"{"redis": {"breaker": {"failures": 1}}}"#);
        let mut w = recorder();
        let t = c
            .call_pipeline(&mut w, 0, Owner::Flush(1), b"(two commands)", 2)
            .expect("sent");
        let done = c
            .on_reply(
                &mut w,
                1,
                t,
                RawReply::Relay {
                    status: Some(200),
                    body: b":1\r\n-OOM command not allowed when used memory > 'maxmemory'.\r\n"
                        .to_vec(),
                },
            )
            .expect("done");
        assert_eq!(
            done.result,
            Ok(Reply::Array(vec![
                Reply::Int(1),
                Reply::Error("OOM command not allowed when used memory > 'maxmemory'.".into())
            ])),
            "each reply is its command's outcome"
        );
        assert_eq!(c.breaker_state(), BreakerState::Closed);
        // A single call answered OOM does not count for the breaker either (reads still work);
        // one answered LOADING does.
        for (body, state) in [
            (&b"-OOM command not allowed\r\n"[..], BreakerState::Closed),
            (b"-LOADING Redis is loading\r\n", BreakerState::Open),
        ] {
            let t = c
                .call(
                    &mut w,
                    2,
                    Owner::RateLimit(1),
                    &Command::new("EVALSHA"),
                    None,
                )
                .expect("sent");
            c.on_reply(
                &mut w,
                3,
                t,
                RawReply::Relay {
                    status: Some(200),
                    body: body.to_vec(),
                },
            );
            assert_eq!(
                c.breaker_state(),
                state,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_refused_dispatch_is_a_failure_without_pending_state() {
        let mut c = client(r#"{"redis": {"breaker": {"failures": 1}}}"#);
        let mut w = recorder();
        w.fail = Some(RedisError::new(RedisErrorKind::Dispatch, "unknown cluster"));
        assert!(c
            .call(&mut w, 0, Owner::RateLimit(1), &Command::new("PING"), None)
            .is_err());
        assert_eq!(c.pending_len(), 0);
        assert_eq!(c.breaker_state(), BreakerState::Open);
    }

    #[test]
    fn script_errors_do_not_trip_the_breaker() {
        let mut c = client(r#"{"redis": {"breaker": {"failures": 1}}}"#);
        let mut w = recorder();
        let t = c
            .call(&mut w, 0, Owner::RateLimit(1), &Command::new("EVAL"), None)
            .expect("sent");
        let done = c
            .on_reply(
                &mut w,
                0,
                t,
                RawReply::Relay {
                    status: Some(200),
                    body: b"-ERR user_script:1: bad\r\n".to_vec(),
                },
            )
            .expect("done");
        assert_eq!(done.result.expect_err("server").prefix(), Some("ERR"));
        assert_eq!(c.breaker_state(), BreakerState::Closed);
    }

    /// A client sharing exchanges beyond `max` in flight, and a wire that can kick.
    fn sharing(max: usize) -> (RedisClient, RecordingWire) {
        let c = client(&format!(r#"{{"redis": {{"max_in_flight": {max}}}}}"#));
        let wire = RecordingWire {
            kickable: true,
            ..RecordingWire::default()
        };
        (c, wire)
    }

    fn get(key: &str) -> Command {
        Command::new("GET").arg(key)
    }

    fn relay(body: &[u8]) -> RawReply {
        RawReply::Relay {
            status: Some(200),
            body: body.to_vec(),
        }
    }

    fn owners(done: &[Completion]) -> Vec<(Owner, Result<Reply, RedisErrorKind>)> {
        done.iter()
            .map(|c| (c.owner, c.result.clone().map_err(|e| e.kind)))
            .collect()
    }

    #[test]
    fn calls_beyond_the_exchanges_in_flight_ride_together_in_the_next_one() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        assert_eq!(wire.sent.len(), 1, "an idle VM sends at once");
        for (ctx, key) in [(2, "b"), (3, "c")] {
            c.call(&mut wire, 1, Owner::RateLimit(ctx), &get(key), None)
                .expect("waits");
        }
        c.call(&mut wire, 1, Owner::CacheLookup(3), &get("d"), None)
            .expect("waits");
        assert_eq!(wire.sent.len(), 1, "the others wait for the exchange");
        assert_eq!(wire.kicks, 1, "one kick for all of them");
        assert_eq!(c.waiting_len(), 3);
        assert_eq!(c.pending_for(3), 2);

        // The first answer comes in its request's context: the root is kicked, not called.
        let first = wire.sent[0].0;
        let done = c.on_answer(&mut wire, 2, first, relay(b"$1\r\nA\r\n"), false);
        assert_eq!(
            owners(&done),
            vec![(Owner::RateLimit(1), Ok(Reply::Bulk(b"A".to_vec())))]
        );
        assert_eq!(wire.sent.len(), 1);
        assert!(c.on_kick(&mut wire, 3).is_empty());
        assert_eq!(
            wire.sent.len(),
            2,
            "one exchange for the three waiting calls"
        );
        let (shared, body) = wire.sent[1].clone();
        assert_eq!(
            body,
            encode_pipeline(&[get("b"), get("c"), get("d")]),
            "their commands in the order they were made"
        );
        assert_eq!(c.stats.calls, 2);
        assert_eq!(c.stats.shared, 3);

        let done = c.on_answer(&mut wire, 4, shared, relay(b":2\r\n:3\r\n$-1\r\n"), true);
        assert_eq!(
            owners(&done),
            vec![
                (Owner::RateLimit(2), Ok(Reply::Int(2))),
                (Owner::RateLimit(3), Ok(Reply::Int(3))),
                (Owner::CacheLookup(3), Ok(Reply::Nil)),
            ]
        );
        assert_eq!(c.pending_len(), 0);
        assert_eq!(c.breaker_state(), BreakerState::Closed);
    }

    #[test]
    fn in_the_root_context_the_next_shared_exchange_goes_out_at_once() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        c.call(&mut wire, 0, Owner::RateLimit(2), &get("b"), None)
            .expect("waits");
        let first = wire.sent[0].0;
        c.on_answer(&mut wire, 1, first, relay(b":1\r\n"), false);
        c.on_kick(&mut wire, 1);
        // While the shared exchange is out, more calls wait; its answer (in the root context)
        // sends them without another kick.
        c.call(&mut wire, 2, Owner::RateLimit(3), &get("c"), None)
            .expect("waits");
        let kicks = wire.kicks;
        let shared = wire.sent[1].0;
        let done = c.on_answer(&mut wire, 3, shared, relay(b":2\r\n"), true);
        assert_eq!(
            owners(&done),
            vec![(Owner::RateLimit(2), Ok(Reply::Int(2)))]
        );
        assert_eq!(wire.sent.len(), 3);
        assert_eq!(wire.sent[2].1, get("c").encode());
        assert_eq!(
            wire.kicks, kicks,
            "no kick beyond the one made when c waited"
        );
    }

    #[test]
    fn a_rider_answered_noscript_rides_again_with_its_eval() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        let evalsha = Command::new("EVALSHA").arg("abc").arg("0");
        let eval = Command::new("EVAL").arg("return 7").arg("0");
        c.call(
            &mut wire,
            0,
            Owner::RateLimit(2),
            &evalsha,
            Some(eval.clone()),
        )
        .expect("waits");
        c.call(&mut wire, 0, Owner::RateLimit(3), &get("c"), None)
            .expect("waits");
        let first = wire.sent[0].0;
        c.on_answer(&mut wire, 1, first, relay(b":1\r\n"), false);
        c.on_kick(&mut wire, 1);
        let shared = wire.sent[1].0;
        let done = c.on_answer(
            &mut wire,
            2,
            shared,
            relay(b"-NOSCRIPT No matching script.\r\n:3\r\n"),
            true,
        );
        assert_eq!(
            owners(&done),
            vec![(Owner::RateLimit(3), Ok(Reply::Int(3)))]
        );
        assert_eq!(wire.sent.len(), 3, "the EVAL went out");
        assert_eq!(wire.sent[2].1, eval.encode());
        let again = wire.sent[2].0;
        let done = c.on_answer(&mut wire, 3, again, relay(b":7\r\n"), true);
        assert_eq!(
            owners(&done),
            vec![(Owner::RateLimit(2), Ok(Reply::Int(7)))]
        );
        assert_eq!(c.stats.noscript, 1);
    }

    #[test]
    fn waiting_and_riding_calls_time_out_by_their_own_deadlines() {
        let (mut c, mut wire) = sharing(1);
        let timeout = c.timeout_ms();
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        c.call(&mut wire, 0, Owner::RateLimit(2), &get("b"), None)
            .expect("waits");
        c.call(&mut wire, 50, Owner::RateLimit(3), &get("c"), None)
            .expect("waits");
        let late = timeout + DEADLINE_GRACE_MS;
        // The exchange in flight and the first waiting call are past their deadline; the
        // second still has 50 ms.
        let done = c.expire(late);
        let mut kinds = owners(&done);
        kinds.sort_by_key(|(o, _)| format!("{o:?}"));
        assert_eq!(
            kinds,
            vec![
                (Owner::RateLimit(1), Err(RedisErrorKind::Timeout)),
                (Owner::RateLimit(2), Err(RedisErrorKind::Timeout)),
            ]
        );
        assert!(c.send_waiting(&mut wire, late).is_empty());
        assert_eq!(wire.sent.len(), 2, "c rides alone in the next exchange");
        let shared = wire.sent[1].0;
        let done = c.expire(late + 50);
        assert_eq!(
            owners(&done),
            vec![(Owner::RateLimit(3), Err(RedisErrorKind::Timeout))]
        );
        assert_eq!(
            c.pending_len(),
            0,
            "an exchange whose riders all gave up is gone"
        );
        assert!(c
            .on_answer(&mut wire, late + 60, shared, relay(b":3\r\n"), true)
            .is_empty());
    }

    #[test]
    fn a_failed_shared_exchange_fails_each_of_its_riders() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        c.call(&mut wire, 0, Owner::RateLimit(2), &get("b"), None)
            .expect("waits");
        c.call(&mut wire, 0, Owner::CacheLookup(2), &get("c"), None)
            .expect("waits");
        let first = wire.sent[0].0;
        c.on_answer(&mut wire, 1, first, relay(b":1\r\n"), false);
        c.on_kick(&mut wire, 1);
        let shared = wire.sent[1].0;
        let refused = RawReply::Relay {
            status: Some(502),
            body: b"redis unreachable".to_vec(),
        };
        let done = c.on_answer(&mut wire, 2, shared, refused, true);
        assert_eq!(
            owners(&done),
            vec![
                (Owner::RateLimit(2), Err(RedisErrorKind::Unavailable)),
                (Owner::CacheLookup(2), Err(RedisErrorKind::Unavailable)),
            ]
        );
        assert_eq!(c.stats.errors, 1, "one failed round trip");
    }

    #[test]
    fn only_requests_calls_wait_and_only_when_the_root_can_be_kicked() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(1), &get("a"), None)
            .expect("sent");
        for owner in [Owner::Flush(1), Owner::Registry] {
            c.call(&mut wire, 0, owner, &get("x"), None).expect("sent");
        }
        assert_eq!(
            wire.sent.len(),
            3,
            "event flushes and the registry never wait"
        );
        assert_eq!(c.waiting_len(), 0);
        c.call(&mut wire, 0, Owner::Job(2), &get("x"), None)
            .expect("waits");
        assert_eq!(
            c.waiting_len(),
            1,
            "a cache job rides with the requests' calls"
        );

        let mut plain = recorder();
        let mut c = client(r#"{"redis": {"max_in_flight": 1}}"#);
        for ctx in 1..=3 {
            c.call(&mut plain, 0, Owner::RateLimit(ctx), &get("a"), None)
                .expect("sent");
        }
        assert_eq!(
            plain.sent.len(),
            3,
            "a host without a kick: every call at once"
        );

        let mut c = client(r#"{"redis": {"transport": "redis_call"}}"#);
        let mut wire = RecordingWire {
            kickable: true,
            ..RecordingWire::default()
        };
        for ctx in 1..=3 {
            c.call(&mut wire, 0, Owner::RateLimit(ctx), &get("a"), None)
                .expect("sent");
        }
        assert_eq!(wire.sent.len(), 3, "redis_call sends one command per call");
    }

    #[test]
    fn a_shared_exchange_carries_at_most_max_riders() {
        let (mut c, mut wire) = sharing(1);
        c.call(&mut wire, 0, Owner::RateLimit(0), &get("a"), None)
            .expect("sent");
        for ctx in 1..=(MAX_RIDERS as u32 + 5) {
            c.call(&mut wire, 0, Owner::RateLimit(ctx), &get("b"), None)
                .expect("waits");
        }
        let first = wire.sent[0].0;
        c.on_answer(&mut wire, 1, first, relay(b":0\r\n"), false);
        c.on_kick(&mut wire, 1);
        assert_eq!(wire.sent.len(), 2, "one slot: one exchange out");
        assert_eq!(c.waiting_len(), 5, "the rest wait for the next");
        let shared = wire.sent[1].0;
        let body = ":1\r\n".repeat(MAX_RIDERS);
        let done = c.on_answer(&mut wire, 2, shared, relay(body.as_bytes()), true);
        assert_eq!(done.len(), MAX_RIDERS);
        assert_eq!(wire.sent.len(), 3);
        assert_eq!(c.waiting_len(), 0);
    }
}
