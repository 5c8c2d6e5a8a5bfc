//! The Redis command layer shared by every feature: one interface over both transports,
//! pending calls tracked by token (several in flight per request context), a deadline on every
//! call, EVALSHA with EVAL on NOSCRIPT, and the per-VM circuit breaker.
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
}

impl Owner {
    /// The request context that waits for this call, if a request made it.
    pub fn request(self) -> Option<u32> {
        match self {
            Owner::RateLimit(ctx) | Owner::CacheLookup(ctx) => Some(ctx),
            Owner::Flush(_) | Owner::Job(_) | Owner::Registry => None,
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

    /// Calls in flight for a request context.
    pub fn pending_for(&self, context_id: u32) -> usize {
        self.pending
            .values()
            .filter(|p| p.owner.request() == Some(context_id))
            .count()
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
        self.dispatch(wire, now_ms, owner, command, on_noscript)
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

    /// Handles the host's answer for `token`. None when the token is unknown (a late answer
    /// after its deadline) or when the call continues (NOSCRIPT → EVAL sent).
    pub fn on_reply(
        &mut self,
        wire: &mut dyn Wire,
        now_ms: u64,
        token: u32,
        raw: RawReply,
    ) -> Option<Completion> {
        let call = self.pending.remove(&token)?;
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

    /// Gives up on calls past their deadline; each becomes a timeout for its context.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Completion> {
        let expired: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now_ms)
            .map(|(t, _)| *t)
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for token in expired {
            if let Some(call) = self.pending.remove(&token) {
                let e = RedisError::new(
                    RedisErrorKind::Timeout,
                    format!("no reply within {}ms", self.timeout_ms),
                );
                self.record_failure(&e, now_ms);
                out.push(Completion {
                    owner: call.owner,
                    result: Err(e),
                });
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
    }

    impl Default for RecordingWire {
        fn default() -> RecordingWire {
            RecordingWire {
                next: 3,
                sent: Vec::new(),
                fail: None,
            }
        }
    }

    impl Wire for RecordingWire {
        fn send(&mut self, payload: &[u8], _timeout_ms: u64) -> Result<u32, RedisError> {
            if let Some(e) = self.fail.clone() {
                return Err(e);
            }
            self.next += 4;
            self.sent.push((self.next, payload.to_vec()));
            Ok(self.next)
        }
    }

    /// Shared, so that a test reads what a wire it boxed away sent.
    impl Wire for std::rc::Rc<std::cell::RefCell<RecordingWire>> {
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
}
