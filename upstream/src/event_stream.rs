//! `GET /api/events/stream`: what the background subscriber receives, live, as Server-Sent
//! Events — the guide's `RedisPubSub.subscribe` for a browser
//! (`new EventSource("/api/events/stream")`).
//!
//! What a client gets, in order:
//! * `event: status` first (with `retry: 1000`, the reconnect delay), and again whenever the
//!   subscriber's state changes ([`SubscriberState::to_json`]): while Redis is down the stream
//!   stays open and says `reconnecting`, with the last error and the next retry; what is
//!   published meanwhile is lost (Pub/Sub keeps nothing), and `subscribed` says it is back;
//! * one event per received message (no `event:` field, so `EventSource.onmessage` gets it),
//!   `id: <epoch>-<seq>`, its data the JSON of an event of `GET /api/recent-events`. A client
//!   that reconnects with `Last-Event-ID` first gets the buffered events it missed;
//! * `event: lagged` with `{"skipped": N}` when the client fell more than
//!   `event_stream_buffer` events behind (a slow reader, a full socket: the stream never buffers
//!   more for it) and skipped the N oldest, or resumed past what the buffer holds; counted in
//!   `/api/stats` as `event_stream_skipped`;
//! * a `: keep-alive` comment when `event_stream_keep_alive` passes without an event.
//!
//! At most `max_event_streams` are open at once; more get 503 (`too_many_streams`, with
//! `Retry-After`). A client that goes away frees its slot and its receiver as soon as the
//! server notices: at once when its connection closes, else when a write to it fails (the next
//! keep-alive at the latest). Shutdown ends every stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit};

use crate::error::{Error, ErrorKind};
use crate::events::RecentEvent;
use crate::subscriber::SubscriberState;
use crate::AppState;

/// How long a browser waits before it reconnects a broken stream.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What a refused client is told to wait before trying again (seconds).
const REFUSED_RETRY_AFTER: &str = "5";

pub async fn event_stream(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(slot) = state.take_stream_slot() else {
        state
            .stats()
            .event_streams_refused
            .fetch_add(1, Ordering::Relaxed);
        let max = state.config().max_event_streams;
        let mut response = Error::new(
            ErrorKind::TooManyStreams,
            format!(
                "{max} event streams are open, the most this service serves at once \
                 (--max-event-streams); try again later"
            ),
        )
        .into_response();
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(REFUSED_RETRY_AFTER),
        );
        return response;
    };
    state
        .stats()
        .event_streams_opened
        .fetch_add(1, Ordering::Relaxed);
    let keep_alive = state.config().event_stream_keep_alive;
    let follower = Follower::new(state, &headers, slot);
    let events = futures_util::stream::unfold(follower, |mut follower| async move {
        let event = follower.next().await?;
        Some((Ok::<Event, Infallible>(event), follower))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response();
    // For proxies that buffer responses unless told otherwise (nginx); Envoy passes chunks on.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One open stream: what it still has to send, and where the next events come from. Dropping
/// it (the client went away, or shutdown) drops its receivers and frees its slot.
struct Follower {
    state: AppState,
    /// Sent before anything live: the first status, then a resuming client's backlog.
    queued: VecDeque<Event>,
    receiver: broadcast::Receiver<Arc<RecentEvent>>,
    subscriber: watch::Receiver<SubscriberState>,
    closing: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
    opened: Instant,
    sent: u64,
    skipped: u64,
}

/// What woke a follower up.
enum Wake {
    Closing,
    StatusChanged,
    Received(Result<Arc<RecentEvent>, RecvError>),
}

impl Follower {
    fn new(state: AppState, headers: &HeaderMap, slot: OwnedSemaphorePermit) -> Follower {
        let log = state.events();
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|id| log.seq_of(id));
        // Watched before the log is followed: a change in between is sent, not lost.
        let mut subscriber = state.subscriber().watch();
        let follow = log.follow(after);
        let mut queued = VecDeque::with_capacity(follow.backlog.len() + 2);
        queued.push_back(status_event(&subscriber.borrow_and_update()).retry(RECONNECT_DELAY));
        let mut skipped = 0;
        if follow.missed > 0 {
            queued.push_back(lagged_event(follow.missed));
            skipped = follow.missed;
            state
                .stats()
                .event_stream_skipped
                .fetch_add(follow.missed, Ordering::Relaxed);
        }
        queued.extend(follow.backlog.iter().map(|e| message_event(&state, e)));
        Follower {
            closing: state.closing(),
            state,
            queued,
            receiver: follow.receiver,
            subscriber,
            _slot: slot,
            opened: Instant::now(),
            sent: 0,
            skipped,
        }
    }

    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        if let Some(event) = self.queued.pop_front() {
            self.sent += 1;
            return Some(event);
        }
        let wake = tokio::select! {
            biased;
            _ = self.closing.wait_for(|closing| *closing) => Wake::Closing,
            changed = self.subscriber.changed() => match changed {
                Ok(()) => Wake::StatusChanged,
                Err(_) => Wake::Closing,
            },
            received = self.receiver.recv() => Wake::Received(received),
        };
        let event = match wake {
            Wake::Closing => return None,
            Wake::StatusChanged => status_event(&self.subscriber.borrow_and_update()),
            Wake::Received(Ok(event)) => message_event(&self.state, &event),
            Wake::Received(Err(RecvError::Lagged(n))) => {
                self.skipped += n;
                self.state
                    .stats()
                    .event_stream_skipped
                    .fetch_add(n, Ordering::Relaxed);
                lagged_event(n)
            }
            Wake::Received(Err(RecvError::Closed)) => return None,
        };
        self.sent += 1;
        Some(event)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        tracing::debug!(
            open_ms = self.opened.elapsed().as_millis() as u64,
            sent = self.sent,
            skipped = self.skipped,
            "event stream closed"
        );
    }
}

fn status_event(state: &SubscriberState) -> Event {
    Event::default()
        .event("status")
        .data(state.to_json().to_string())
}

fn message_event(state: &AppState, event: &RecentEvent) -> Event {
    Event::default()
        .id(state.events().event_id(event.seq))
        .data(event.to_json().to_string())
}

fn lagged_event(skipped: u64) -> Event {
    Event::default()
        .event("lagged")
        .data(json!({ "skipped": skipped }).to_string())
}
