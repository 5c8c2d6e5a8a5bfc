//! The ring buffer of events the background subscriber received, newest first, which
//! `GET /api/recent-events` shows, and the live feed of the same events that
//! `GET /api/events/stream` follows ([`EventLog::follow`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::clock::Timestamp;

/// One message received on a subscribed channel.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentEvent {
    /// 1 for the first message this process received, then counting up.
    pub seq: u64,
    pub channel: String,
    pub received_at: Timestamp,
    /// The payload parsed as JSON when it is JSON, else the payload as a (lossy UTF-8) string.
    pub message: Value,
    /// The payload's size in bytes as published.
    pub bytes: usize,
    /// True when the payload was longer than the configured cap and only its start is kept.
    pub truncated: bool,
}

impl RecentEvent {
    /// Reads a payload as the API shows it; payloads over `max_bytes` keep their first
    /// `max_bytes` as a string.
    pub fn new(
        seq: u64,
        channel: &str,
        payload: &[u8],
        max_bytes: usize,
        received_at: Timestamp,
    ) -> RecentEvent {
        let truncated = payload.len() > max_bytes;
        let message = if truncated {
            Value::String(String::from_utf8_lossy(&payload[..max_bytes]).into_owned())
        } else {
            serde_json::from_slice(payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
        };
        RecentEvent {
            seq,
            channel: channel.to_string(),
            received_at,
            message,
            bytes: payload.len(),
            truncated,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "channel": self.channel,
            "received_at": self.received_at.rfc3339(),
            "received_at_unix_ms": self.received_at.unix_ms,
            "message": self.message,
            "bytes": self.bytes,
            "truncated": self.truncated,
        })
    }
}

/// A bounded buffer: when full, the oldest event is dropped (and counted) for each new one.
/// Every event is also sent to the log's followers, each of which may fall behind by at most
/// the feed's buffer.
#[derive(Debug)]
pub struct EventLog {
    capacity: usize,
    max_event_bytes: usize,
    /// When this log began (Unix ms): event ids carry it, so an id from before a restart is
    /// not taken for one of this log's.
    epoch: u64,
    inner: Mutex<Ring>,
    feed: broadcast::Sender<Arc<RecentEvent>>,
}

/// A new follower of the log: the buffered events after its resume point, and a receiver of
/// every event recorded after those.
#[derive(Debug)]
pub struct Follow {
    /// Oldest first.
    pub backlog: Vec<RecentEvent>,
    /// Events after the resume point that the buffer no longer holds.
    pub missed: u64,
    pub receiver: broadcast::Receiver<Arc<RecentEvent>>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<RecentEvent>,
    received: u64,
    evicted: u64,
}

/// What [`EventLog::recent`] saw, all read at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentSnapshot {
    /// Newest first.
    pub events: Vec<RecentEvent>,
    /// Events in the buffer (all channels).
    pub buffered: usize,
    /// Messages received since start.
    pub received: u64,
    /// Events dropped from the buffer to make room for newer ones.
    pub evicted: u64,
}

impl EventLog {
    /// A log keeping `capacity` events, each follower at most `feed_buffer` behind.
    pub fn new(capacity: usize, max_event_bytes: usize, feed_buffer: usize) -> EventLog {
        let capacity = capacity.max(1);
        EventLog {
            capacity,
            max_event_bytes,
            epoch: Timestamp::now().unix_ms,
            inner: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity),
                ..Ring::default()
            }),
            feed: broadcast::Sender::new(feed_buffer.max(1)),
        }
    }

    /// Records a message received now on `channel`.
    pub fn record(&self, channel: &str, payload: &[u8]) {
        let received_at = Timestamp::now();
        let mut ring = self.lock();
        ring.received += 1;
        let event = RecentEvent::new(
            ring.received,
            channel,
            payload,
            self.max_event_bytes,
            received_at,
        );
        if ring.events.len() >= self.capacity {
            ring.events.pop_back();
            ring.evicted += 1;
        }
        // Sent under the lock, so that a follower sees each event once: in its backlog or
        // through its receiver (see `follow`).
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(Arc::new(event.clone()));
        }
        ring.events.push_front(event);
    }

    /// Starts following the log: with `after` (an event's `seq`), the buffered events after it
    /// come first; then every event as it is recorded.
    pub fn follow(&self, after: Option<u64>) -> Follow {
        let ring = self.lock();
        let receiver = self.feed.subscribe();
        let Some(after) = after.filter(|a| *a < ring.received) else {
            return Follow {
                backlog: Vec::new(),
                missed: 0,
                receiver,
            };
        };
        let backlog: Vec<RecentEvent> = ring
            .events
            .iter()
            .rev()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        let missed = ring.received - after - backlog.len() as u64;
        Follow {
            backlog,
            missed,
            receiver,
        }
    }

    /// The id a stream gives event `seq`: `<epoch>-<seq>`.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    /// The `seq` of one of this log's event ids (a client's `Last-Event-ID`); `None` for an id
    /// of another log (the service restarted) or anything else.
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        let (epoch, seq) = id.trim().split_once('-')?;
        (epoch.parse::<u64>().ok()? == self.epoch)
            .then(|| seq.parse().ok())
            .flatten()
    }

    /// Followers connected now.
    pub fn followers(&self) -> usize {
        self.feed.receiver_count()
    }

    /// Up to `limit` events, newest first, only those on `channel` when given; with the
    /// buffer's counters as of the same moment.
    pub fn recent(&self, limit: usize, channel: Option<&str>) -> RecentSnapshot {
        let ring = self.lock();
        RecentSnapshot {
            events: ring
                .events
                .iter()
                .filter(|e| channel.is_none_or(|c| e.channel == c))
                .take(limit)
                .cloned()
                .collect(),
            buffered: ring.events.len(),
            received: ring.received,
            evicted: ring.evicted,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages received since start.
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// Events dropped from the buffer to make room for newer ones.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The ring holds plain data, updated whole under the lock: a panic elsewhere cannot
        // leave it half-updated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_and_bounded() {
        let log = EventLog::new(3, 1024, 8);
        for i in 1..=5 {
            log.record("c", format!("{{\"n\":{i}}}").as_bytes());
        }
        let snapshot = log.recent(10, None);
        let got: Vec<Value> = snapshot.events.into_iter().map(|e| e.message).collect();
        assert_eq!(got, vec![json!({"n":5}), json!({"n":4}), json!({"n":3})]);
        assert_eq!(
            (snapshot.buffered, snapshot.received, snapshot.evicted),
            (3, 5, 2)
        );
        assert_eq!((log.len(), log.received(), log.evicted()), (3, 5, 2));
    }

    #[test]
    fn filters_by_channel_before_limiting() {
        let log = EventLog::new(10, 1024, 8);
        log.record("a", b"1");
        log.record("b", b"2");
        log.record("a", b"3");
        log.record("b", b"4");
        let got: Vec<Value> = log
            .recent(1, Some("a"))
            .events
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(got, vec![json!(3)]);
        let none = log.recent(5, Some("none"));
        assert!(none.events.is_empty());
        assert_eq!(none.buffered, 4);
    }

    #[test]
    fn a_follower_gets_each_event_once_backlog_then_live() {
        let log = EventLog::new(3, 1024, 8);
        for i in 1..=5 {
            log.record("c", i.to_string().as_bytes());
        }
        // Resuming after event 1: 2 is gone from the buffer, 3..=5 are replayed.
        let mut follow = log.follow(Some(1));
        let replayed: Vec<u64> = follow.backlog.iter().map(|e| e.seq).collect();
        assert_eq!(replayed, vec![3, 4, 5]);
        assert_eq!(follow.missed, 1);
        log.record("c", b"6");
        assert_eq!(follow.receiver.try_recv().expect("event 6").seq, 6);
        assert!(follow.receiver.try_recv().is_err(), "nothing twice");

        // No resume point, or one this log never gave: live events only.
        for after in [None, Some(6), Some(99)] {
            let follow = log.follow(after);
            assert!(follow.backlog.is_empty(), "{after:?}");
            assert_eq!(follow.missed, 0, "{after:?}");
        }
        assert_eq!(log.followers(), 1, "dropped followers are gone");
    }

    #[test]
    fn a_follower_that_falls_behind_the_feed_buffer_is_told_how_far() {
        let log = EventLog::new(100, 1024, 4);
        let mut follow = log.follow(None);
        for i in 1..=10 {
            log.record("c", i.to_string().as_bytes());
        }
        assert!(matches!(
            follow.receiver.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(6))
        ));
        let rest: Vec<u64> = std::iter::from_fn(|| follow.receiver.try_recv().ok())
            .map(|e| e.seq)
            .collect();
        assert_eq!(rest, vec![7, 8, 9, 10]);
    }

    #[test]
    fn event_ids_name_their_log() {
        let log = EventLog::new(3, 1024, 8);
        let id = log.event_id(42);
        assert_eq!(log.seq_of(&id), Some(42));
        assert_eq!(log.seq_of("1-42"), None, "another log's id");
        assert_eq!(log.seq_of("42"), None);
        assert_eq!(log.seq_of(""), None);
    }

    #[test]
    fn json_payloads_parse_and_others_stay_strings() {
        let now = Timestamp { unix_ms: 0 };
        let e = RecentEvent::new(1, "c", br#"{"a":[1,2]}"#, 100, now);
        assert_eq!(e.message, json!({"a":[1,2]}));
        let e = RecentEvent::new(1, "c", b"hello world", 100, now);
        assert_eq!(e.message, json!("hello world"));
        let e = RecentEvent::new(1, "c", &[0xff, b'a'], 100, now);
        assert_eq!(e.message, json!("\u{fffd}a"));
    }

    #[test]
    fn oversized_payloads_are_truncated_and_flagged() {
        let e = RecentEvent::new(1, "c", b"[1,2,3,4,5]", 4, Timestamp { unix_ms: 0 });
        assert!(e.truncated);
        assert_eq!(e.bytes, 11);
        assert_eq!(e.message, json!("[1,2"));
    }
}
