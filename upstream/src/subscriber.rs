//! The background subscriber (the guide's listener thread): a Tokio task that SUBSCRIBEs to the
//! configured channels on its own connection and records every message in the [`EventLog`].
//!
//! When the connection fails, is closed, or stops answering its periodic PING, the task
//! reconnects after a delay that doubles from `subscriber_backoff_initial` up to
//! `subscriber_backoff_max`, and resets once subscribed again. Its state
//! (connecting / subscribed / reconnecting, since when, on which node, the last error) is
//! published through [`SubscriberMonitor`] for `/health/deep`, `/api/recent-events` and the
//! event streams, which [watch](SubscriberMonitor::watch) it change.
//!
//! Which node it subscribes on is the link's choice ([`RedisLink::subscription_node`]): the
//! server; in a cluster any node, the next one after a node is lost (a PUBLISH anywhere in a
//! cluster reaches every node's subscribers); with Sentinel the master, and the new master as
//! soon as the sentinels announce a failover.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::deployment::NodeAddress;
use crate::events::EventLog;
use crate::redis_link::{RedisLink, SubscriptionNode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberPhase {
    /// No channels are configured; nothing runs.
    Disabled,
    /// The first connection attempt is under way.
    Connecting,
    /// Subscribed; messages are being recorded.
    Subscribed,
    /// The last attempt failed or the connection was lost; retrying with backoff.
    Reconnecting,
}

impl SubscriberPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberPhase::Disabled => "disabled",
            SubscriberPhase::Connecting => "connecting",
            SubscriberPhase::Subscribed => "subscribed",
            SubscriberPhase::Reconnecting => "reconnecting",
        }
    }
}

/// A snapshot of the subscriber's state.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberState {
    pub phase: SubscriberPhase,
    pub channels: Vec<String>,
    /// The node subscribed on (or tried last): `HOST:PORT`, or a standalone server's URL.
    pub node: Option<String>,
    /// When the current phase began.
    pub since: Timestamp,
    /// The most recent failure, kept after recovery so an operator can see what happened.
    pub last_error: Option<String>,
    pub last_error_at: Option<Timestamp>,
    /// Failed attempts since the subscription was last established.
    pub failed_attempts: u32,
    /// When the first subscription was established, if ever.
    pub first_subscribed_at: Option<Timestamp>,
    /// How many times the subscription was re-established after the first time.
    pub resubscriptions: u64,
    /// While reconnecting: the delay before the next attempt.
    pub retry_in: Option<Duration>,
}

impl SubscriberState {
    pub fn to_json(&self) -> Value {
        json!({
            "state": self.phase.as_str(),
            "channels": self.channels,
            "node": self.node,
            "since": self.since.rfc3339(),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.map(|t| t.rfc3339()),
            "failed_attempts": self.failed_attempts,
            "first_subscribed_at": self.first_subscribed_at.map(|t| t.rfc3339()),
            "resubscriptions": self.resubscriptions,
            "retry_in_ms": self.retry_in.map(|d| d.as_millis() as u64),
        })
    }
}

/// The subscriber's state, shared between its task (writer) and the handlers (readers).
#[derive(Debug)]
pub struct SubscriberMonitor {
    state: watch::Sender<SubscriberState>,
}

impl SubscriberMonitor {
    pub fn new(channels: &[String]) -> SubscriberMonitor {
        let phase = if channels.is_empty() {
            SubscriberPhase::Disabled
        } else {
            SubscriberPhase::Connecting
        };
        SubscriberMonitor {
            state: watch::Sender::new(SubscriberState {
                phase,
                channels: channels.to_vec(),
                node: None,
                since: Timestamp::now(),
                last_error: None,
                last_error_at: None,
                failed_attempts: 0,
                first_subscribed_at: None,
                resubscriptions: 0,
                retry_in: None,
            }),
        }
    }

    pub fn snapshot(&self) -> SubscriberState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change of state from now on.
    pub fn watch(&self) -> watch::Receiver<SubscriberState> {
        self.state.subscribe()
    }

    fn subscribed(&self, node: &str) {
        self.state.send_modify(|s| s.subscribed(node));
    }

    fn failed(&self, error: String, node: Option<&str>, retry_in: Duration) {
        self.state.send_modify(|s| s.failed(error, node, retry_in));
    }
}

impl SubscriberState {
    fn subscribed(&mut self, node: &str) {
        self.node = Some(node.to_string());
        let now = Timestamp::now();
        match self.first_subscribed_at {
            Some(_) => self.resubscriptions += 1,
            None => self.first_subscribed_at = Some(now),
        }
        self.phase = SubscriberPhase::Subscribed;
        self.since = now;
        self.failed_attempts = 0;
        self.retry_in = None;
    }

    fn failed(&mut self, error: String, node: Option<&str>, retry_in: Duration) {
        if let Some(node) = node {
            self.node = Some(node.to_string());
        }
        let now = Timestamp::now();
        if self.phase != SubscriberPhase::Reconnecting {
            self.phase = SubscriberPhase::Reconnecting;
            self.since = now;
        }
        self.last_error = Some(error);
        self.last_error_at = Some(now);
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        self.retry_in = Some(retry_in);
    }
}

/// What the subscriber task needs to know.
#[derive(Debug, Clone)]
pub struct SubscriberSettings {
    pub channels: Vec<String>,
    /// Bounds connecting + subscribing, and each keep-alive PING.
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub ping_interval: Duration,
}

/// Capped exponential backoff: `initial`, `2*initial`, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial.min(max),
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial.min(self.max);
    }
}

/// Starts the subscriber task; it runs until aborted.
pub fn spawn(
    link: RedisLink,
    settings: SubscriberSettings,
    log: Arc<EventLog>,
    monitor: Arc<SubscriberMonitor>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(link, settings, log, monitor))
}

async fn run(
    link: RedisLink,
    settings: SubscriberSettings,
    log: Arc<EventLog>,
    monitor: Arc<SubscriberMonitor>,
) {
    let mut backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
    // The node lost last: in a cluster the next attempt goes to another one.
    let mut lost: Option<String> = None;
    loop {
        let (failure, node) = match subscribe(&link, lost.as_deref(), &settings).await {
            Ok((pubsub, node)) => {
                monitor.subscribed(&node.address);
                backoff.reset();
                tracing::info!(
                    channels = ?settings.channels,
                    node = %node.address,
                    "subscriber: subscribed"
                );
                let why = receive(pubsub, &log, &settings, &node.address, node.master_moves).await;
                (why, Some(node.address))
            }
            Err(failed) => failed,
        };
        let delay = backoff.next_delay();
        tracing::warn!("subscriber: {failure}; retrying in {delay:?}");
        monitor.failed(failure, node.as_deref(), delay);
        if node.is_some() {
            lost = node;
        }
        tokio::time::sleep(delay).await;
    }
}

/// Connects to the link's next node and subscribes; on failure, why and on which node.
async fn subscribe(
    link: &RedisLink,
    after: Option<&str>,
    settings: &SubscriberSettings,
) -> Result<(redis::aio::PubSub, SubscriptionNode), (String, Option<String>)> {
    let node = link
        .subscription_node(after)
        .await
        .map_err(|e| (format!("finding a node to subscribe on failed: {e}"), None))?;
    let attempt = async {
        let mut pubsub = node.client.get_async_pubsub().await?;
        pubsub.subscribe(&settings.channels).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(Ok(pubsub)) => Ok((pubsub, node)),
        Ok(Err(e)) => Err((
            format!("connecting to {} and subscribing failed: {e}", node.address),
            Some(node.address),
        )),
        Err(_) => Err((
            format!(
                "connecting to {} and subscribing took longer than {:?}",
                node.address, settings.timeout
            ),
            Some(node.address),
        )),
    }
}

/// Records messages until the connection is lost; returns why it was.
async fn receive(
    pubsub: redis::aio::PubSub,
    log: &EventLog,
    settings: &SubscriberSettings,
    node: &str,
    master_moves: Option<watch::Receiver<Option<NodeAddress>>>,
) -> String {
    let (mut sink, mut stream) = pubsub.split();
    // With Sentinel: resolves once the master is announced elsewhere than `node`.
    let moved = async {
        let Some(mut moves) = master_moves else {
            return std::future::pending().await;
        };
        let elsewhere =
            |to: &Option<NodeAddress>| to.as_ref().is_some_and(|to| to.to_string() != node);
        let why = match moves.wait_for(elsewhere).await {
            Ok(to) => to.as_ref().map(|to| format!("the master moved to {to}")),
            Err(_) => None, // the link is gone: nothing will move any more
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(moved);
    let mut keepalive = tokio::time::interval(settings.ping_interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => log.record(message.get_channel_name(), message.get_payload_bytes()),
                None => return "the subscription connection was closed".to_string(),
            },
            why = &mut moved => return why,
            _ = keepalive.tick() => {
                match tokio::time::timeout(settings.timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keep-alive PING failed: {e}"),
                    Err(_) => {
                        return format!("keep-alive PING got no answer within {:?}", settings.timeout)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn monitor_tracks_phases_and_counts_resubscriptions() {
        let m = SubscriberMonitor::new(&["a".to_string()]);
        assert_eq!(m.snapshot().phase, SubscriberPhase::Connecting);
        m.subscribed("127.0.0.1:7000");
        assert_eq!(m.snapshot().resubscriptions, 0);
        m.failed("boom".into(), None, Duration::from_millis(100));
        m.failed(
            "boom again".into(),
            Some("127.0.0.1:7001"),
            Duration::from_millis(200),
        );
        let s = m.snapshot();
        assert_eq!(s.phase, SubscriberPhase::Reconnecting);
        assert_eq!(s.failed_attempts, 2);
        assert_eq!(s.last_error.as_deref(), Some("boom again"));
        assert_eq!(s.retry_in, Some(Duration::from_millis(200)));
        assert_eq!(s.node.as_deref(), Some("127.0.0.1:7001"));
        m.subscribed("127.0.0.1:7002");
        let s = m.snapshot();
        assert_eq!(s.phase, SubscriberPhase::Subscribed);
        assert_eq!(s.resubscriptions, 1);
        assert_eq!(s.failed_attempts, 0);
        assert_eq!(s.last_error.as_deref(), Some("boom again"));
        assert_eq!(s.node.as_deref(), Some("127.0.0.1:7002"));
    }

    #[test]
    fn a_failed_first_attempt_is_not_a_resubscription() {
        let m = SubscriberMonitor::new(&["a".to_string()]);
        m.failed("refused".into(), None, Duration::from_millis(100));
        m.subscribed("127.0.0.1:6379");
        let s = m.snapshot();
        assert_eq!(s.resubscriptions, 0);
        assert!(s.first_subscribed_at.is_some());
    }

    #[test]
    fn no_channels_means_disabled() {
        let m = SubscriberMonitor::new(&[]);
        assert_eq!(m.snapshot().phase, SubscriberPhase::Disabled);
    }
}
