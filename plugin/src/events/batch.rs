//! A batch on the wire: for transport `relay`, the events' `PUBLISH`/`XADD` commands pipelined
//! in one relay body and one reply per command; for `redis_call`, one `EVALSHA` of the flush
//! script running the same commands inside Redis. Either way, what each event's commands got.

use super::*;

/// Field name of the event in stream entries (`XADD key ... * event <json>`).
pub const STREAM_FIELD: &str = "event";

/// The relay form of a batch: each event's PUBLISH and/or XADD, in queue order, encoded back
/// to back (straight from the queued events: no per-command copies); and how many commands.
pub fn pipeline_payload(batch: &[QueuedEvent], config: &EventsConfig) -> (Vec<u8>, usize) {
    let size: usize = batch.iter().map(|e| 2 * e.payload.len() + 160).sum();
    let mut out = Vec::with_capacity(size);
    let mut commands = 0;
    let mut maxlen = String::new();
    for event in batch {
        let Some(policy) = config.policy(event.route) else {
            continue;
        };
        let payload = event.payload.as_bytes();
        if let Some(channel) = &policy.channel {
            encode_array(&mut out, &[b"PUBLISH", channel.as_bytes(), payload]);
            commands += 1;
        }
        if let Some(stream) = &policy.stream {
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
    let stream = batch
        .iter()
        .find_map(|e| config.policy(e.route).and_then(|p| p.stream.as_ref()));
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
            let channel = policy.and_then(|p| p.channel.as_deref()).unwrap_or("");
            let to_stream = policy.is_some_and(|p| p.stream.is_some());
            c = c
                .arg(channel)
                .arg(if to_stream { "1" } else { "0" })
                .arg(&event.payload);
        }
        c
    };
    (build("EVALSHA", &script.sha1), build("EVAL", script.source))
}

/// What Redis did with a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    pub written: u64,
    pub refused: u64,
    pub first_error: String,
}

/// Reads the replies of a pipelined batch: an event is written when every command for it
/// succeeded. None when the reply does not match the batch.
pub fn pipeline_outcome(
    batch: &[QueuedEvent],
    config: &EventsConfig,
    reply: &Reply,
) -> Option<FlushOutcome> {
    let Reply::Array(replies) = reply else {
        return None;
    };
    let mut replies = replies.iter();
    let mut outcome = FlushOutcome::default();
    for event in batch {
        let n = config
            .policy(event.route)
            .map_or(0, EventPolicy::commands_per_event);
        let mut good = true;
        for _ in 0..n {
            if let Reply::Error(msg) = replies.next()? {
                good = false;
                if outcome.first_error.is_empty() {
                    outcome.first_error = msg.clone();
                }
            }
        }
        if good {
            outcome.written += 1;
        } else {
            outcome.refused += 1;
        }
    }
    replies.next().is_none().then_some(outcome)
}

/// Reads the flush script's reply `{written, refused, first_error}`.
pub fn script_outcome(reply: &Reply) -> Option<FlushOutcome> {
    let Reply::Array(items) = reply else {
        return None;
    };
    let [written, refused, error] = items.as_slice() else {
        return None;
    };
    Some(FlushOutcome {
        written: u64::try_from(written.as_int()?).ok()?,
        refused: u64::try_from(refused.as_int()?).ok()?,
        first_error: match error {
            Reply::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        },
    })
}
