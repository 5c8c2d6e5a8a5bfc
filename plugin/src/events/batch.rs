//! A batch on the wire: for transport `relay`, the events' `PUBLISH`/`XADD` commands pipelined
//! in one relay body and one reply per command; for `redis_call`, one `EVALSHA` of the flush
//! script running the same commands inside Redis and answering with the same replies. Either
//! way, what each command got, so that only the commands that failed are sent again.

use super::*;

/// Field name of the event in stream entries (`XADD key ... * event <json>`).
pub const STREAM_FIELD: &str = "event";

/// The targets an event still has to reach: its channel (`PUBLISH`) and its stream (`XADD`).
/// Intersected with the event's policy when sent, so a new event asks for [`Targets::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    pub publish: bool,
    pub stream: bool,
}

impl Targets {
    pub const ALL: Targets = Targets {
        publish: true,
        stream: true,
    };

    /// What of these targets `policy` has.
    pub fn within(self, policy: Option<&EventPolicy>) -> Targets {
        Targets {
            publish: self.publish && policy.is_some_and(|p| p.channel.is_some()),
            stream: self.stream && policy.is_some_and(|p| p.stream.is_some()),
        }
    }

    pub fn commands(self) -> usize {
        usize::from(self.publish) + usize::from(self.stream)
    }

    pub fn is_empty(self) -> bool {
        !self.publish && !self.stream
    }
}

/// What an event's commands go to in this flush.
pub fn targets_now(event: &QueuedEvent, config: &EventsConfig) -> Targets {
    event.pending.within(config.policy(event.route))
}

/// The relay form of a batch: each event's PUBLISH and/or XADD still to do, in queue order,
/// encoded back to back (straight from the queued events: no per-command copies); and how many
/// commands.
pub fn pipeline_payload(batch: &[QueuedEvent], config: &EventsConfig) -> (Vec<u8>, usize) {
    let size: usize = batch.iter().map(|e| 2 * e.payload.len() + 160).sum();
    let mut out = Vec::with_capacity(size);
    let mut commands = 0;
    let mut maxlen = String::new();
    for event in batch {
        let Some(policy) = config.policy(event.route) else {
            continue;
        };
        let targets = event.pending.within(Some(policy));
        let payload = event.payload.as_bytes();
        if let (true, Some(channel)) = (targets.publish, &policy.channel) {
            encode_array(&mut out, &[b"PUBLISH", channel.as_bytes(), payload]);
            commands += 1;
        }
        if let (true, Some(stream)) = (targets.stream, &policy.stream) {
            maxlen.clear();
            maxlen.push_str(&stream.maxlen.to_string());
            encode_array(
                &mut out,
                &[
                    b"XADD".as_slice(),
                    stream.key.as_bytes(),
                    b"MAXLEN",
                    b"~",
                    maxlen.as_bytes(),
                    b"*",
                    STREAM_FIELD.as_bytes(),
                    payload,
                ],
            );
            commands += 1;
        }
    }
    (out, commands)
}

/// The `redis_call` form of a batch: `EVALSHA` of the flush script, and the `EVAL` sent instead
/// on NOSCRIPT (see `scripts/events_flush.lua` for the arguments).
pub fn script_commands(
    script: &Script,
    batch: &[QueuedEvent],
    config: &EventsConfig,
) -> (Command, Command) {
    let stream = batch.iter().find_map(|e| {
        let policy = config.policy(e.route)?;
        policy
            .stream
            .as_ref()
            .filter(|_| e.pending.within(Some(policy)).stream)
    });
    let keys = usize::from(stream.is_some()).to_string();
    let maxlen = stream.map_or_else(|| "0".to_string(), |s| s.maxlen.to_string());
    let build = |name: &str, first: &str| {
        let mut c = Command::new(name).arg(first).arg(&keys);
        if let Some(s) = stream {
            c = c.arg(&s.key);
        }
        c = c.arg(&maxlen);
        for event in batch {
            let policy = config.policy(event.route);
            let targets = event.pending.within(policy);
            let channel = policy
                .and_then(|p| p.channel.as_deref())
                .filter(|_| targets.publish)
                .unwrap_or("");
            c = c
                .arg(channel)
                .arg(if targets.stream { "1" } else { "0" })
                .arg(&event.payload);
        }
        c
    };
    (build("EVALSHA", &script.sha1), build("EVAL", script.source))
}

/// What one command of a flush got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Redis took it (a PUBLISH's receiver count, an XADD's entry id).
    Written,
    /// An error reply that says Redis cannot take it now (`OOM`, `LOADING`, `BUSY`…): the
    /// command is sent again with a later flush.
    Retry(String),
    /// An error reply about the command itself (`WRONGTYPE`, `ERR`…): sending it again would get
    /// the same answer.
    Refused(String),
}

impl CommandOutcome {
    pub fn of(reply: &Reply) -> CommandOutcome {
        match reply {
            Reply::Error(msg) => {
                let unhealthy = RedisError::server(msg.clone())
                    .server_kind()
                    .is_some_and(ServerErrorKind::is_unhealthy);
                if unhealthy {
                    CommandOutcome::Retry(msg.clone())
                } else {
                    CommandOutcome::Refused(msg.clone())
                }
            }
            _ => CommandOutcome::Written,
        }
    }
}

/// What one event's commands got in a flush (None: that command was not sent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventOutcome {
    pub publish: Option<CommandOutcome>,
    pub stream: Option<CommandOutcome>,
}

/// Reads a flush's replies, one per command sent, in order (the relay's pipeline replies, or the
/// flush script's array): per event of the batch, what its commands got. None when the reply
/// does not match the batch.
pub fn flush_outcomes(
    batch: &[QueuedEvent],
    config: &EventsConfig,
    reply: &Reply,
) -> Option<Vec<EventOutcome>> {
    let Reply::Array(replies) = reply else {
        return None;
    };
    let mut replies = replies.iter();
    let mut outcomes = Vec::with_capacity(batch.len());
    for event in batch {
        let targets = targets_now(event, config);
        let mut outcome = EventOutcome::default();
        if targets.publish {
            outcome.publish = Some(CommandOutcome::of(replies.next()?));
        }
        if targets.stream {
            outcome.stream = Some(CommandOutcome::of(replies.next()?));
        }
        outcomes.push(outcome);
    }
    replies.next().is_none().then_some(outcomes)
}
