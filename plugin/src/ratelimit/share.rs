//! How many VMs share each limit, so that `failure_mode: local` admits a share of a limit in
//! each VM during an outage rather than all of it in every one. While Redis is up, every VM
//! that decided a rate-limited request lately keeps a registration in one sorted set
//! (`vm_registry.lua`, on the tick, off the request path); every VM reads the count. A VM that
//! has not registered (idle, or Envoy's main-thread VM, which serves no request) counts itself
//! as one more. The last count read stays in force while Redis is down.

use crate::redis::client::{Owner, RedisClient, Wire};
use crate::redis::error::RedisError;
use crate::redis::resp::Reply;
use crate::redis::scripts::{Script, VM_REGISTRY_LUA};

/// How often a VM registers (and reads the count).
pub const REGISTER_EVERY_MS: u64 = 2_000;
/// How long a registration lasts: a VM that stops (or stops deciding) drops out after this.
pub const REGISTRATION_MS: u64 = 3 * REGISTER_EVERY_MS;

/// This VM's view of how many VMs share the limits.
#[derive(Debug)]
pub struct Share {
    script: Script,
    /// The registry's key.
    key: String,
    /// This VM's member in it.
    member: String,
    /// Whether any route has `failure_mode: local` (else nothing is registered).
    wanted: bool,
    /// Until when this VM counts as deciding requests.
    deciding_until_ms: u64,
    next_ms: u64,
    in_flight: bool,
    registered: bool,
    /// VMs sharing each limit, this one included; 1 until Redis told.
    vms: u64,
}

impl Share {
    /// `prefix`: the configured key prefix; `member`: this VM's id (unique across gateways).
    pub fn new(prefix: &str, member: String, wanted: bool) -> Share {
        Share {
            script: Script::new("vm_registry", VM_REGISTRY_LUA),
            key: format!("{prefix}vms"),
            member,
            wanted,
            deciding_until_ms: 0,
            next_ms: 0,
            in_flight: false,
            registered: false,
            vms: 1,
        }
    }

    /// VMs sharing each limit (at least 1).
    pub fn vms(&self) -> u64 {
        self.vms
    }

    /// This VM decided a rate-limited request.
    pub fn note_request(&mut self, now_ms: u64) {
        self.deciding_until_ms = now_ms + REGISTRATION_MS;
    }

    /// On the tick: registers (or deregisters) and reads the count when it is time.
    pub fn tick(&mut self, client: &mut RedisClient, wire: &mut dyn Wire, now_ms: u64) {
        if !self.wanted || self.in_flight || now_ms < self.next_ms {
            return;
        }
        self.next_ms = now_ms + REGISTER_EVERY_MS;
        let deciding = now_ms < self.deciding_until_ms;
        let keys = [self.key.clone()];
        let args = [
            self.member.clone(),
            REGISTRATION_MS.to_string(),
            if deciding { "1" } else { "0" }.to_string(),
        ];
        let (evalsha, eval) = self.script.pair(&keys, None, &args);
        if client
            .call(wire, now_ms, Owner::Registry, &evalsha, eval)
            .is_ok()
        {
            self.in_flight = true;
            self.registered = deciding;
        }
    }

    /// The registry's answer: the count, unless Redis failed (the last count stays).
    pub fn on_answer(&mut self, result: Result<Reply, RedisError>) {
        self.in_flight = false;
        let Ok(Reply::Int(n)) = result else {
            return;
        };
        let others = u64::try_from(n).unwrap_or(0);
        self.vms = if self.registered { others } else { others + 1 }.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::redis::client::recording::RecordingWire;
    use crate::redis::client::RawReply;

    fn answer(client: &mut RedisClient, wire: &mut RecordingWire, share: &mut Share, n: i64) {
        let raw = RawReply::Relay {
            status: Some(200),
            body: format!(":{n}\r\n").into_bytes(),
        };
        let token = wire.last_token();
        let c = client.on_reply(wire, 0, token, raw).expect("a completion");
        assert_eq!(c.owner, Owner::Registry);
        share.on_answer(c.result);
    }

    #[test]
    fn a_deciding_vm_registers_and_an_idle_one_counts_itself_in() {
        let config = parse_config(b"{}").expect("config");
        let mut client = RedisClient::new(&config.redis);
        let mut wire = RecordingWire::default();
        let mut share = Share::new("krowoc:", "vm-a".into(), true);
        assert_eq!(share.vms(), 1, "alone until Redis says otherwise");

        share.tick(&mut client, &mut wire, 1_000);
        let call = wire.last_command();
        assert_eq!(call[0], "EVALSHA");
        assert_eq!(call[2..], ["1", "krowoc:vms", "vm-a", "6000", "0"]);
        answer(&mut client, &mut wire, &mut share, 3);
        assert_eq!(share.vms(), 4, "three deciding VMs and this idle one");

        share.note_request(2_000);
        share.tick(&mut client, &mut wire, 2_500);
        assert_eq!(wire.sent.len(), 1, "not before the interval");
        share.tick(&mut client, &mut wire, 3_000);
        assert_eq!(wire.last_command()[6], "1", "a deciding VM registers");
        answer(&mut client, &mut wire, &mut share, 4);
        assert_eq!(share.vms(), 4);

        share.tick(&mut client, &mut wire, 5_000);
        share.on_answer(Err(RedisError::protocol("down")));
        assert_eq!(share.vms(), 4, "the last count stays while Redis fails");
    }

    #[test]
    fn nothing_is_registered_without_a_local_failure_mode() {
        let config = parse_config(b"{}").expect("config");
        let mut client = RedisClient::new(&config.redis);
        let mut wire = RecordingWire::default();
        let mut share = Share::new("krowoc:", "vm-a".into(), false);
        share.note_request(0);
        share.tick(&mut client, &mut wire, 10_000);
        assert!(wire.sent.is_empty());
    }
}
