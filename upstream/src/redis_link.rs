//! The handlers' Redis connection: one reconnecting, multiplexed connection (the redis crate's
//! `ConnectionManager`, created lazily so the service starts while Redis is down), and every
//! call bounded by a timeout so a dead Redis never hangs a request.
//!
//! The background subscriber uses its own connection (see `subscriber.rs`): a connection in
//! subscribed mode cannot run other commands.

use std::time::{Duration, Instant};

use krowoc_relay::redis_url::redact_url;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::FromRedisValue;

use crate::error::Error;

#[derive(Clone)]
pub struct RedisLink {
    client: redis::Client,
    manager: ConnectionManager,
    timeout: Duration,
    shown_url: String,
}

impl RedisLink {
    /// Prepares the connection without dialling: the first command connects. Must be called
    /// inside a Tokio runtime.
    pub fn new(
        url: &str,
        tls_ca: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<RedisLink, Error> {
        let shown_url = redact_url(url);
        let client = match tls_ca {
            None => redis::Client::open(url),
            Some(path) => {
                let ca = std::fs::read(path).map_err(|e| {
                    Error::config("--redis-tls-ca", format!("{}: {e}", path.display()))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca),
                };
                redis::Client::build_with_tls(url, certificates)
            }
        }
        .map_err(|e| Error::config("--redis", format!("{shown_url:?} is not a Redis URL: {e}")))?;
        // One dial per reconnect, no backoff inside the manager: `query` decides about retries,
        // so an outage costs each request at most `timeout` (and on loopback, ~nothing).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| Error::config("--redis", format!("cannot prepare {shown_url}: {e}")))?;
        Ok(RedisLink {
            client,
            manager,
            timeout,
            shown_url,
        })
    }

    /// The client, for connections of another kind (the subscriber's).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The Redis URL with any password hidden.
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one command within the timeout. `operation` names it in errors, e.g. `PING`.
    ///
    /// A command that fails because the connection was refused or found closed is sent once
    /// more, within the same timeout: the manager answers the first call after an outage with
    /// the failed connection it still holds, and dials afresh for the next one. (So a PUBLISH
    /// is at-least-once across a reconnect; one Redis executed and then lost before answering
    /// would be sent twice.)
    pub async fn query<T: FromRedisValue>(
        &self,
        operation: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, Error> {
        let mut conn = self.manager.clone();
        let attempts = async {
            match cmd.query_async::<T>(&mut conn).await {
                Err(e) if e.is_connection_refusal() || e.is_connection_dropped() => {
                    tracing::debug!("{operation}: {e}; retrying on a fresh connection");
                    cmd.query_async::<T>(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, attempts).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::redis(operation, e)),
            Err(_) => Err(Error::redis_timeout(operation, self.timeout)),
        }
    }

    /// `PUBLISH channel payload`; answers how many subscribers received it.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<u64, Error> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        self.query(&format!("PUBLISH to {channel:?}"), &cmd).await
    }

    /// `PING`, and how long the answer took.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let reply: String = self.query("PING", &redis::cmd("PING")).await?;
        if reply != "PONG" {
            return Err(Error::new(
                crate::error::ErrorKind::RedisReply,
                format!("PING answered {reply:?}, not PONG"),
            ));
        }
        Ok(started.elapsed())
    }

    /// `INFO` (the default sections), as text.
    pub async fn info(&self) -> Result<String, Error> {
        self.query("INFO", &redis::cmd("INFO")).await
    }
}
