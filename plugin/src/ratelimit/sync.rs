//! Approximate limits for very hot keys (`rate_limit.sync`). A VM decides every request alone,
//! from the window's shared count it last saw plus what it admitted since, and adds its count
//! to Redis every `sync` interval in one exchange for all its keys (`rate_limit_sync.lua`
//! answers each key's shared count and Redis's clock). Redis calls per request fall from one to
//! about `keys / (rate × interval)`.
//!
//! The price is overshoot: what other VMs admitted since this VM's last sync is unknown to it.
//! Every admitted unit reaches Redis within one interval (plus a round trip), so a window admits
//! at most `limit` plus what all VMs admit in one interval: `VMs × rate per VM × (interval +
//! round trip)`. While Redis is unreachable a VM goes on deciding from the last shared count it
//! saw, and sends its count when Redis is back.
//!
//! Windows are aligned on Redis's clock (`TIME`, from every answer), so every VM counts into
//! the same key for the same window: `<limit key>:w<window number>`, in the limit key's hash
//! tag.

use super::keys::KeyGroup;
use super::{Decision, LimitStatus};
use crate::config::RateLimitPolicy;
use crate::config::Transport;
use crate::redis::client::{Owner, RedisClient, Wire};
use crate::redis::error::RedisError;
use crate::redis::resp::{encode_pipeline, Command, Reply};
use crate::redis::scripts::{Script, RATE_LIMIT_SYNC_LUA};
use std::collections::HashMap;

/// Most counters a VM keeps; a new key beyond them is decided by Redis, exactly.
pub const MAX_COUNTERS: usize = 100_000;
/// Most commands in one sync exchange (the relay's default `--max-commands`).
const MAX_COMMANDS: usize = 64;

/// One limit's count for one client in the current window.
#[derive(Debug)]
struct Counter {
    limit: u64,
    window_ms: u64,
    interval_ms: u64,
    /// The current window's number (Redis's milliseconds / window).
    window: u64,
    /// The window's count over every VM at the last answer.
    shared: u64,
    /// Admitted here since, not sent yet.
    unsent: u64,
    /// In the sync out now.
    sending: u64,
    /// Units of the previous window still to send.
    leftover: Option<(u64, u64)>,
    next_sync_ms: u64,
    last_used_ms: u64,
}

impl Counter {
    /// Moves to `window`; what was not sent of the one before is kept for the next sync.
    fn roll(&mut self, window: u64) {
        if window == self.window {
            return;
        }
        let units = self.unsent;
        // One leftover at most: a sync interval is shorter than the window.
        self.leftover = (units > 0 && window == self.window + 1).then_some((self.window, units));
        self.window = window;
        self.shared = 0;
        self.unsent = 0;
        self.sending = 0;
    }

    fn used(&self) -> u64 {
        self.shared + self.unsent + self.sending
    }
}

/// What one command of a sync carried, to apply its answer.
#[derive(Debug)]
struct Sent {
    key: String,
    window: u64,
    units: u64,
    /// The window's own units (not a leftover).
    current: bool,
}

/// A VM's `sync` counters.
#[derive(Debug)]
pub struct SyncLimits {
    script: Script,
    transport: Transport,
    counters: HashMap<String, Counter>,
    /// Redis's clock minus the VM's, milliseconds, from the last answer.
    offset_ms: i64,
    /// NOSCRIPT seen: send EVAL until a sync succeeds.
    use_eval: bool,
    next_id: u32,
    outstanding: HashMap<u32, Vec<Sent>>,
    /// Units whose sync failed in a way that may have counted them (a timeout): counted once
    /// more when sent again.
    pub possibly_double_counted: u64,
}

impl SyncLimits {
    pub fn new(transport: Transport) -> SyncLimits {
        SyncLimits {
            script: Script::new("rate_limit_sync", RATE_LIMIT_SYNC_LUA),
            transport,
            counters: HashMap::new(),
            offset_ms: 0,
            use_eval: false,
            next_id: 0,
            outstanding: HashMap::new(),
            possibly_double_counted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    fn redis_now(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add_signed(self.offset_ms)
    }

    /// Decides a request locally; None when the VM keeps too many counters already (Redis
    /// decides then).
    pub fn decide(
        &mut self,
        group: &KeyGroup,
        policy: &RateLimitPolicy,
        interval_ms: u64,
        now_ms: u64,
    ) -> Option<Decision> {
        let fresh = group
            .keys
            .iter()
            .filter(|k| !self.counters.contains_key(*k))
            .count();
        if self.counters.len() + fresh > MAX_COUNTERS {
            return None;
        }
        let now = self.redis_now(now_ms);
        let mut limits = Vec::with_capacity(group.keys.len());
        let mut allowed = true;
        let mut retry_after_ms = 0;
        for (key, rule) in group.keys.iter().zip(&policy.limits) {
            let window_ms = rule.window_ms().max(1);
            let window = now / window_ms;
            let c = self.counters.entry(key.clone()).or_insert_with(|| Counter {
                limit: rule.limit,
                window_ms,
                interval_ms,
                window,
                shared: 0,
                unsent: 0,
                sending: 0,
                leftover: None,
                next_sync_ms: now_ms + interval_ms,
                last_used_ms: now_ms,
            });
            c.roll(window);
            c.last_used_ms = now_ms;
            let reset_ms = (window + 1) * window_ms - now;
            let used = c.used();
            let over = used >= c.limit;
            if over {
                allowed = false;
                retry_after_ms = retry_after_ms.max(reset_ms);
            }
            limits.push(LimitStatus {
                remaining: c.limit.saturating_sub(used),
                reset_ms,
                over,
            });
        }
        if allowed {
            for (key, status) in group.keys.iter().zip(limits.iter_mut()) {
                if let Some(c) = self.counters.get_mut(key) {
                    c.unsent += 1;
                }
                status.remaining = status.remaining.saturating_sub(1);
            }
        }
        Some(Decision {
            allowed,
            retry_after_ms,
            limits,
        })
    }

    /// Sends the counts of every counter whose interval is up, in as few exchanges as the
    /// transport allows; forgets counters unused for two windows with nothing to send.
    pub fn tick(&mut self, client: &mut RedisClient, wire: &mut dyn Wire, now_ms: u64) {
        let mut batch: Vec<Sent> = Vec::new();
        for (key, c) in &mut self.counters {
            if c.next_sync_ms > now_ms || c.sending > 0 {
                continue;
            }
            c.next_sync_ms = now_ms + c.interval_ms;
            if let Some((window, units)) = c.leftover.take() {
                batch.push(Sent {
                    key: key.clone(),
                    window,
                    units,
                    current: false,
                });
            }
            // A counter in use learns what the other VMs admitted even when it admitted none.
            let in_use = now_ms.saturating_sub(c.last_used_ms) < 2 * c.interval_ms;
            if c.unsent > 0 || in_use {
                c.sending = c.unsent;
                c.unsent = 0;
                batch.push(Sent {
                    key: key.clone(),
                    window: c.window,
                    units: c.sending,
                    current: true,
                });
            }
        }
        self.counters.retain(|_, c| {
            c.sending > 0
                || c.unsent > 0
                || c.leftover.is_some()
                || now_ms.saturating_sub(c.last_used_ms) < 2 * c.window_ms
        });
        if batch.is_empty() {
            return;
        }
        match self.transport {
            Transport::Relay => {
                while !batch.is_empty() {
                    let rest = batch.split_off(batch.len().min(MAX_COMMANDS));
                    let chunk = std::mem::replace(&mut batch, rest);
                    let commands: Vec<Command> = chunk
                        .iter()
                        .map(|s| self.command(s, self.use_eval))
                        .collect();
                    let id = self.id();
                    let payload = encode_pipeline(&commands);
                    match client.call_pipeline(wire, now_ms, Owner::Sync(id), &payload, chunk.len())
                    {
                        Ok(_) => {
                            self.outstanding.insert(id, chunk);
                        }
                        Err(_) => self.unsent_again(chunk, false),
                    }
                }
            }
            Transport::RedisCall => {
                for sent in batch {
                    let id = self.id();
                    let (evalsha, eval) = (self.command(&sent, false), self.command(&sent, true));
                    match client.call(wire, now_ms, Owner::Sync(id), &evalsha, Some(eval)) {
                        Ok(_) => {
                            self.outstanding.insert(id, vec![sent]);
                        }
                        Err(_) => self.unsent_again(vec![sent], false),
                    }
                }
            }
        }
    }

    fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn command(&self, sent: &Sent, eval: bool) -> Command {
        let keys = [format!("{}:w{}", sent.key, sent.window)];
        let window_ms = self.counters.get(&sent.key).map_or(1, |c| c.window_ms);
        let args = [sent.units.to_string(), window_ms.to_string()];
        if eval {
            self.script.eval(&keys, &args)
        } else {
            self.script.evalsha(&keys, &args)
        }
    }

    /// The answer to sync `id`.
    pub fn on_answer(&mut self, id: u32, now_ms: u64, result: Result<Reply, RedisError>) {
        let Some(sent) = self.outstanding.remove(&id) else {
            return;
        };
        let replies = match result {
            Ok(Reply::Array(items)) if self.transport == Transport::Relay => items,
            Ok(reply) if self.transport == Transport::RedisCall => vec![reply],
            Ok(other) => {
                let e = RedisError::protocol(format!("sync answered {other:?}"));
                return self.failed(sent, &e);
            }
            Err(e) => return self.failed(sent, &e),
        };
        if replies.len() != sent.len() {
            let e = RedisError::protocol("sync answered the wrong number of replies");
            return self.failed(sent, &e);
        }
        let mut failed = Vec::new();
        for (s, reply) in sent.into_iter().zip(replies) {
            match parse_sync_reply(&reply) {
                Ok((count, redis_ms)) => {
                    self.use_eval = false;
                    self.offset_ms =
                        i64::try_from(redis_ms).unwrap_or(0) - i64::try_from(now_ms).unwrap_or(0);
                    if let Some(c) = self.counters.get_mut(&s.key) {
                        if s.current && c.window == s.window {
                            // Counts only grow within a window: an older answer says less.
                            c.shared = c.shared.max(count);
                            c.sending = 0;
                        }
                    }
                }
                Err(e) => {
                    if e.is_noscript() {
                        self.use_eval = true;
                    }
                    failed.push(s);
                }
            }
        }
        // An error reply means the command did not run: its units are sent again.
        self.unsent_again(failed, false);
    }

    fn failed(&mut self, sent: Vec<Sent>, e: &RedisError) {
        // A timeout may have counted them; anything else did not reach Redis.
        self.unsent_again(sent, e.is_timeout());
    }

    /// Puts units of a sync that failed back, to be sent with the next one.
    fn unsent_again(&mut self, sent: Vec<Sent>, maybe_counted: bool) {
        for s in sent {
            if maybe_counted {
                self.possibly_double_counted += s.units;
            }
            let Some(c) = self.counters.get_mut(&s.key) else {
                continue;
            };
            if s.current && c.window == s.window {
                c.sending = 0;
                c.unsent += s.units;
            } else if c.window == s.window + 1 {
                let (_, before) = c.leftover.unwrap_or((s.window, 0));
                c.leftover = Some((s.window, before + s.units));
            }
        }
    }
}

/// `{count, now_ms}` from `rate_limit_sync.lua`.
fn parse_sync_reply(reply: &Reply) -> Result<(u64, u64), RedisError> {
    let items = match reply {
        Reply::Array(items) if items.len() == 2 => items,
        Reply::Error(e) => return Err(RedisError::server(e.clone())),
        other => {
            return Err(RedisError::protocol(format!(
                "rate_limit_sync answered {other:?}"
            )))
        }
    };
    let num = |i: usize| {
        items[i]
            .as_int()
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| {
                RedisError::protocol(format!("rate_limit_sync value {i} is {:?}", items[i]))
            })
    };
    Ok((num(0)?, num(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::ratelimit::test_policy as policy;
    use crate::redis::client::recording::RecordingWire;
    use crate::redis::client::RawReply;
    use crate::redis::resp::decode_replies;

    const INTERVAL: u64 = 100;

    /// One VM: its client, wire and counters.
    struct Vm {
        client: RedisClient,
        wire: RecordingWire,
        sync: SyncLimits,
        answered: usize,
    }

    impl Vm {
        fn new() -> Vm {
            let cfg = parse_config(b"{}").expect("config");
            Vm {
                client: RedisClient::new(&cfg.redis),
                wire: RecordingWire::default(),
                sync: SyncLimits::new(Transport::Relay),
                answered: 0,
            }
        }

        fn admit(&mut self, group: &KeyGroup, p: &RateLimitPolicy, now: u64) -> bool {
            self.sync
                .decide(group, p, INTERVAL, now)
                .expect("decided locally")
                .allowed
        }

        /// Ticks, and answers what the tick sent as the shared Redis would (`fail`: the
        /// relay could not reach Redis).
        fn tick(&mut self, redis: &mut HashMap<String, u64>, now: u64, fail: bool) {
            self.sync.tick(&mut self.client, &mut self.wire, now);
            let sent: Vec<(u32, Vec<u8>)> = self.wire.sent[self.answered..].to_vec();
            self.answered = self.wire.sent.len();
            for (token, payload) in sent {
                let raw = if fail {
                    RawReply::Relay {
                        status: Some(502),
                        body: b"redis unreachable".to_vec(),
                    }
                } else {
                    RawReply::Relay {
                        status: Some(200),
                        body: answer(redis, &payload, now),
                    }
                };
                let done = self.client.on_answer(&mut self.wire, now, token, raw, true);
                for c in done {
                    let Owner::Sync(id) = c.owner else {
                        panic!("{:?}", c.owner)
                    };
                    self.sync.on_answer(id, now, c.result);
                }
            }
        }
    }

    /// What `rate_limit_sync.lua` answers, for every command of a payload.
    fn answer(redis: &mut HashMap<String, u64>, payload: &[u8], now: u64) -> Vec<u8> {
        let n = (1..=MAX_COMMANDS)
            .find(|n| decode_replies(payload, *n).is_ok())
            .expect("some commands");
        let mut out = Vec::new();
        for cmd in decode_replies(payload, n).expect("commands") {
            let Reply::Array(args) = cmd else { panic!() };
            let text = |i: usize| match &args[i] {
                Reply::Bulk(b) => String::from_utf8(b.clone()).expect("utf-8"),
                other => panic!("{other:?}"),
            };
            assert_eq!(text(2), "1", "one key per command");
            let count = redis.entry(text(3)).or_default();
            *count += text(4).parse::<u64>().expect("units");
            out.extend_from_slice(format!("*2\r\n:{count}\r\n:{now}\r\n").as_bytes());
        }
        out
    }

    fn group(identity: &str) -> KeyGroup {
        KeyGroup {
            identity: identity.into(),
            keys: vec![format!("rl:{{{identity}}}:fixed_window:100:60000")],
        }
    }

    fn limit_100() -> RateLimitPolicy {
        policy(
            r#"{"limits": [{"limit": 100, "window": "60s", "algorithm": "fixed_window"}],
                "sync": "100ms"}"#,
        )
    }

    /// Redis's count of the window starting at 0 for `g`.
    fn shared(redis: &HashMap<String, u64>, g: &KeyGroup) -> u64 {
        redis
            .get(&format!("{}:w0", g.keys[0]))
            .copied()
            .unwrap_or(0)
    }

    #[test]
    fn one_vm_admits_exactly_the_limit_with_a_sync_per_interval() {
        let (p, g) = (limit_100(), group("r:a"));
        let mut redis = HashMap::new();
        let mut vm = Vm::new();
        let mut admitted = 0;
        for i in 0..300u64 {
            let now = i * 10;
            if vm.admit(&g, &p, now) {
                admitted += 1;
            }
            vm.tick(&mut redis, now, false);
        }
        assert_eq!(admitted, 100);
        assert_eq!(shared(&redis, &g), 100, "every admitted unit reached Redis");
        let calls = vm.client.stats.calls;
        assert!(
            calls <= 31,
            "about one sync per interval, not one call per request: {calls}"
        );
    }

    #[test]
    fn vms_overshoot_by_at_most_what_they_admit_in_one_interval() {
        const VMS: usize = 4;
        const PER_TICK: u64 = 5;
        let (p, g) = (limit_100(), group("r:hot"));
        let mut redis = HashMap::new();
        let mut vms: Vec<Vm> = (0..VMS).map(|_| Vm::new()).collect();
        let mut admitted = 0u64;
        // Each VM sees PER_TICK requests per interval and syncs once per interval.
        for step in 0..100u64 {
            let now = step * INTERVAL;
            for vm in &mut vms {
                for _ in 0..PER_TICK {
                    if vm.admit(&g, &p, now) {
                        admitted += 1;
                    }
                }
            }
            for vm in &mut vms {
                vm.tick(&mut redis, now + 1, false);
            }
        }
        let bound = 100 + VMS as u64 * PER_TICK;
        assert!(admitted >= 100, "the limit is reached: {admitted}");
        assert!(admitted <= bound, "{admitted} admitted, bound {bound}");
        assert_eq!(
            shared(&redis, &g),
            admitted,
            "Redis counted every admitted unit"
        );
    }

    #[test]
    fn counts_of_a_failed_sync_are_sent_with_the_next_one() {
        let (p, g) = (limit_100(), group("r:b"));
        let mut redis = HashMap::new();
        let mut vm = Vm::new();
        for _ in 0..10 {
            assert!(vm.admit(&g, &p, 0));
        }
        vm.tick(&mut redis, 100, true);
        assert_eq!(shared(&redis, &g), 0);
        for _ in 0..5 {
            assert!(vm.admit(&g, &p, 150));
        }
        vm.tick(&mut redis, 200, false);
        assert_eq!(
            shared(&redis, &g),
            15,
            "nothing lost, nothing counted twice"
        );
        assert_eq!(vm.sync.possibly_double_counted, 0);
    }

    #[test]
    fn while_redis_is_down_a_vm_keeps_deciding_from_the_last_shared_count() {
        let (p, g) = (limit_100(), group("r:c"));
        let mut redis = HashMap::new();
        redis.insert(format!("{}:w0", g.keys[0]), 90);
        let mut vm = Vm::new();
        assert!(vm.admit(&g, &p, 0));
        vm.tick(&mut redis, 100, false);
        // The shared count (91 with this VM's unit) is known: 9 more, then denials.
        let mut admitted = 0;
        for i in 0..20 {
            if vm.admit(&g, &p, 110 + i) {
                admitted += 1;
            }
            vm.tick(&mut redis, 200 + i * 100, true);
        }
        assert_eq!(admitted, 9);
        vm.tick(&mut redis, 5_000, false);
        assert_eq!(shared(&redis, &g), 100);
    }

    #[test]
    fn a_new_window_starts_at_zero_and_the_old_windows_units_still_reach_its_key() {
        let p = policy(
            r#"{"limits": [{"limit": 3, "window": "1s", "algorithm": "fixed_window"}],
                "sync": "100ms"}"#,
        );
        let g = KeyGroup {
            identity: "r:d".into(),
            keys: vec!["rl:{r:d}:fixed_window:3:1000".into()],
        };
        let mut redis = HashMap::new();
        let mut vm = Vm::new();
        let d = vm.sync.decide(&g, &p, INTERVAL, 900).expect("decided");
        assert!(d.allowed);
        assert_eq!(d.limits[0].remaining, 2);
        assert_eq!(d.limits[0].reset_ms, 100, "the window ends at 1 s");
        assert!(vm.admit(&g, &p, 950));
        assert!(vm.admit(&g, &p, 990));
        assert!(!vm.admit(&g, &p, 995), "the fourth in a window of 3");
        // The next window admits again; the last window's units go to their own key.
        assert!(vm.admit(&g, &p, 1_000));
        vm.tick(&mut redis, 1_001, false);
        assert_eq!(redis.get("rl:{r:d}:fixed_window:3:1000:w0"), Some(&3));
        assert_eq!(redis.get("rl:{r:d}:fixed_window:3:1000:w1"), Some(&1));
    }

    #[test]
    fn noscript_switches_to_eval_and_loses_no_count() {
        let (p, g) = (limit_100(), group("r:e"));
        let mut vm = Vm::new();
        for _ in 0..4 {
            assert!(vm.admit(&g, &p, 0));
        }
        vm.sync.tick(&mut vm.client, &mut vm.wire, 100);
        let (token, _) = vm.wire.sent[0].clone();
        let raw = RawReply::Relay {
            status: Some(200),
            body: b"-NOSCRIPT No matching script.\r\n".to_vec(),
        };
        for c in vm.client.on_answer(&mut vm.wire, 100, token, raw, true) {
            let Owner::Sync(id) = c.owner else { panic!() };
            vm.sync.on_answer(id, 100, c.result);
        }
        vm.sync.tick(&mut vm.client, &mut vm.wire, 200);
        let again = String::from_utf8_lossy(&vm.wire.sent[1].1).into_owned();
        assert!(again.starts_with("*6\r\n$4\r\nEVAL\r\n"), "{again}");
        assert!(
            again.contains("\r\n$1\r\n4\r\n"),
            "the 4 units again: {again}"
        );
    }

    #[test]
    fn past_the_counter_cap_redis_decides() {
        let p = limit_100();
        let mut sync = SyncLimits::new(Transport::Relay);
        for i in 0..MAX_COUNTERS {
            assert!(sync
                .decide(&group(&format!("r:{i}")), &p, INTERVAL, 0)
                .is_some());
        }
        assert!(sync.decide(&group("r:one-more"), &p, INTERVAL, 0).is_none());
        assert!(
            sync.decide(&group("r:7"), &p, INTERVAL, 0).is_some(),
            "known keys go on"
        );
    }
}
