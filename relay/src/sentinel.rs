//! Redis behind Sentinel for the relay (`--redis-sentinel`, `--sentinel-master`): the master's
//! address asked of the sentinels, one pipelined [`RedisPool`] to it, and a new pool when the
//! sentinels name another master.
//!
//! The master is asked for (`SENTINEL GET-MASTER-ADDR-BY-NAME`, of each sentinel in turn until
//! one answers) before the first request, when a sentinel announces a failover (the relay
//! subscribes to `+switch-master` on one sentinel at a time), when a request fails to reach it,
//! when it answers
//! `-READONLY` (a former master demoted to replica), and at least every refresh interval. A body
//! answered `-READONLY` is sent once more to the new master: a replica ran none of its writes,
//! and running its reads again changes nothing. Requests that reach a failed master fail like
//! requests to a single unreachable Redis (502 or 504) until the sentinels have promoted its
//! replica; the relay follows without a restart.
//!
//! Sentinels are asked over plain TCP without a login; the URL's user, password and TLS are for
//! the data nodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;

use crate::pool::{
    encode_command, CommandInfo, PoolError, PoolErrorKind, RedisEndpoint, RedisPool,
};
use crate::tls::RedisTls;

/// How often the sentinels are asked for the master when nothing else asks.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);
/// Lookups asked for by failures are at least this far apart.
const MIN_LOOKUP_GAP: Duration = Duration::from_millis(100);

/// Where the sentinels are and how to log in to the master they name.
#[derive(Clone)]
pub struct SentinelConfig {
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master as.
    pub master_name: String,
    /// User, password, database, TLS and connect timeout for the master; its host and port are
    /// replaced by the sentinels' answer.
    pub login: RedisEndpoint,
    pub tls: Option<RedisTls>,
    pub connections: usize,
    /// How old the master's address may get before a request asks the sentinels again.
    pub refresh: Duration,
}

impl std::fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sentinels: Vec<String> = crate::addresses(&self.sentinels);
        f.debug_struct("SentinelConfig")
            .field("sentinels", &sentinels)
            .field("master_name", &self.master_name)
            .field("login", &self.login)
            .field("tls", &self.tls)
            .field("connections", &self.connections)
            .field("refresh", &self.refresh)
            .finish()
    }
}

/// The master in use: its address and pool.
#[derive(Clone)]
struct Master {
    host: String,
    port: u16,
    pool: RedisPool,
}

impl Master {
    fn addr(&self) -> String {
        crate::HostPort(&self.host, self.port).to_string()
    }
}

#[derive(Default)]
struct Counters {
    lookups_ok: AtomicU64,
    lookups_failed: AtomicU64,
    master_changes: AtomicU64,
    readonly_retries: AtomicU64,
}

/// A cheap-to-clone handle on the master that a set of sentinels names. Like [`RedisPool`], its
/// connections live on the runtime that first uses them.
#[derive(Clone)]
pub struct SentinelPool {
    inner: Arc<Inner>,
}

struct Inner {
    config: SentinelConfig,
    /// One connection to each sentinel, kept between lookups.
    sentinel_pools: Vec<RedisPool>,
    /// Whether the `+switch-master` subscription task runs.
    watching: std::sync::atomic::AtomicBool,
    master: RwLock<Option<Master>>,
    /// One lookup at a time; holds when the last one ended.
    looking: tokio::sync::Mutex<Option<Instant>>,
    counters: Counters,
}

impl SentinelPool {
    /// A pool for the master `config` names. Nothing connects until the first call.
    pub fn new(config: SentinelConfig) -> SentinelPool {
        let sentinel_pools = config
            .sentinels
            .iter()
            .map(|(host, port)| {
                let mut endpoint = RedisEndpoint::new(host.clone(), *port);
                endpoint.connect_timeout = config.login.connect_timeout;
                RedisPool::new(endpoint, 1)
            })
            .collect();
        SentinelPool {
            inner: Arc::new(Inner {
                sentinel_pools,
                config,
                watching: std::sync::atomic::AtomicBool::new(false),
                master: RwLock::new(None),
                looking: tokio::sync::Mutex::new(None),
                counters: Counters::default(),
            }),
        }
    }

    fn error(&self, kind: PoolErrorKind, detail: impl Into<String>) -> PoolError {
        PoolError::at(
            kind,
            format!("sentinel master {}", self.inner.config.master_name),
            detail,
        )
    }

    fn current(&self) -> Option<Master> {
        self.inner
            .master
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the sentinels for the master (unless `force` is false and a lookup ended less than
    /// [`MIN_LOOKUP_GAP`] ago, or one is running) and switches to it when it moved.
    async fn look_up(&self, force: bool) -> Result<(), PoolError> {
        let mut last = match self.inner.looking.try_lock() {
            Ok(guard) => guard,
            Err(_) if !force => return Ok(()),
            Err(_) => {
                let guard = self.inner.looking.lock().await;
                if self.current().is_some() {
                    return Ok(());
                }
                guard
            }
        };
        if !force && last.is_some_and(|at| at.elapsed() < MIN_LOOKUP_GAP) {
            return Ok(());
        }
        let result = self.ask_sentinels().await;
        *last = Some(Instant::now());
        let (host, port) = match result {
            Ok(addr) => addr,
            Err(e) => {
                self.inner
                    .counters
                    .lookups_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "no sentinel named the redis master");
                return Err(e);
            }
        };
        self.inner
            .counters
            .lookups_ok
            .fetch_add(1, Ordering::Relaxed);
        let mut guard = self.inner.master.write().unwrap_or_else(|p| p.into_inner());
        if guard
            .as_ref()
            .is_some_and(|m| m.host == host && m.port == port)
        {
            return Ok(());
        }
        if let Some(old) = guard.as_ref() {
            self.inner
                .counters
                .master_changes
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(from = %old.addr(), to = %crate::HostPort(&host, port), "redis master moved");
        }
        let mut endpoint = self.inner.config.login.clone();
        endpoint.host = host.clone();
        endpoint.port = port;
        let connections = self.inner.config.connections;
        let pool = match &self.inner.config.tls {
            Some(tls) => RedisPool::with_tls(endpoint, connections, tls.clone()),
            None => RedisPool::new(endpoint, connections),
        };
        *guard = Some(Master { host, port, pool });
        Ok(())
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` of each sentinel in turn: the first address given.
    async fn ask_sentinels(&self) -> Result<(String, u16), PoolError> {
        let config = &self.inner.config;
        let ask = encode_command(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &config.master_name]);
        let mut why = Vec::new();
        for ((host, port), sentinel) in config.sentinels.iter().zip(&self.inner.sentinel_pools) {
            let at = crate::HostPort(host, *port);
            match sentinel
                .call_raw(ask.clone(), 1, config.login.connect_timeout)
                .await
            {
                Ok(reply) => match master_addr(&reply) {
                    Ok(Some(addr)) => return Ok(addr),
                    Ok(None) => why.push(format!(
                        "{at} knows no master named {:?}",
                        config.master_name
                    )),
                    Err(e) => why.push(format!("{at}: {e}")),
                },
                Err(e) => why.push(format!("{at}: {}: {}", e.kind().as_str(), e.detail())),
            }
        }
        Err(self.error(
            PoolErrorKind::Unreachable,
            format!("no sentinel named the master ({})", why.join("; ")),
        ))
    }

    /// The master now, asking the sentinels first when none is known (within `deadline`) or
    /// in the background when the last answer is older than the refresh interval.
    async fn master(&self, deadline: Instant) -> Result<Master, PoolError> {
        self.watch();
        if let Some(master) = self.current() {
            let stale = self
                .inner
                .looking
                .try_lock()
                .ok()
                .and_then(|last| *last)
                .is_some_and(|at| at.elapsed() > self.inner.config.refresh);
            if stale {
                self.look_up_soon();
            }
            return Ok(master);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.look_up(true)).await {
            Ok(Ok(())) => self
                .current()
                .ok_or_else(|| self.error(PoolErrorKind::Unreachable, "no master known")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.error(
                PoolErrorKind::Timeout,
                format!("no sentinel answered within {wait:?}"),
            )),
        }
    }

    /// Starts the task that listens for `+switch-master` on the sentinels (once; it ends when
    /// the pool is dropped).
    fn watch(&self) {
        if self.inner.watching.swap(true, Ordering::Relaxed) {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            self.inner.watching.store(false, Ordering::Relaxed);
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(watch_switches(weak));
    }

    fn look_up_soon(&self) {
        let pool = self.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                let _ = pool.look_up(false).await;
            });
        }
    }

    /// Sends `body` (parsed as `parsed`) to the master and returns its replies; once more, to
    /// the master the sentinels name then, when a reply is `-READONLY`.
    pub async fn call_parsed(
        &self,
        body: Bytes,
        parsed: &[CommandInfo],
        timeout: Duration,
    ) -> Result<Bytes, PoolError> {
        let deadline = Instant::now() + timeout;
        let master = self.master(deadline).await?;
        let wait = deadline.saturating_duration_since(Instant::now());
        let replies = match master.pool.call_parsed(body.clone(), parsed, wait).await {
            Ok(replies) => replies,
            Err(e) => {
                if !e.is_invalid_request() {
                    self.look_up_soon();
                }
                return Err(e);
            }
        };
        if !any_readonly(&replies) {
            return Ok(replies);
        }
        self.inner
            .counters
            .readonly_retries
            .fetch_add(1, Ordering::Relaxed);
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.look_up(true)).await {
            Ok(Ok(())) => {}
            _ => return Ok(replies),
        }
        let Some(now) = self.current().filter(|m| m.addr() != master.addr()) else {
            return Ok(replies);
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        now.pool.call_parsed(body, parsed, wait).await
    }

    /// PING of the master the sentinels name now.
    pub async fn ready(&self, timeout: Duration) -> Result<String, PoolError> {
        let deadline = Instant::now() + timeout;
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.look_up(true)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(self.error(
                    PoolErrorKind::Timeout,
                    format!("no sentinel answered within {wait:?}"),
                ))
            }
        }
        let master = self.master(deadline).await?;
        let wait = deadline.saturating_duration_since(Instant::now());
        master.pool.ping(wait).await?;
        Ok(format!(
            "sentinel master {} at {}",
            self.inner.config.master_name,
            master.addr()
        ))
    }

    /// Prometheus lines: the lookups, master changes and READONLY retries.
    pub fn render_metrics(&self) -> String {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        out.push_str("# HELP krowoc_relay_sentinel_lookups_total Questions to the sentinels for the master, by result.\n# TYPE krowoc_relay_sentinel_lookups_total counter\n");
        for (result, value) in [
            ("ok", get(&c.lookups_ok)),
            ("failed", get(&c.lookups_failed)),
        ] {
            out.push_str(&format!(
                "krowoc_relay_sentinel_lookups_total{{result=\"{result}\"}} {value}\n"
            ));
        }
        out.push_str("# HELP krowoc_relay_sentinel_master_changes_total Times the sentinels named another master.\n# TYPE krowoc_relay_sentinel_master_changes_total counter\n");
        out.push_str(&format!(
            "krowoc_relay_sentinel_master_changes_total {}\n",
            get(&c.master_changes)
        ));
        out.push_str("# HELP krowoc_relay_sentinel_readonly_retries_total Requests answered READONLY by a demoted master and sent again.\n# TYPE krowoc_relay_sentinel_readonly_retries_total counter\n");
        out.push_str(&format!(
            "krowoc_relay_sentinel_readonly_retries_total {}\n",
            get(&c.readonly_retries)
        ));
        out
    }
}

/// Listens for `+switch-master` on each sentinel in turn (the next one when a connection
/// ends) and asks for the master whenever one comes; ends when the pool is gone.
async fn watch_switches(weak: std::sync::Weak<Inner>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut next = 0usize;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let sentinels = inner.config.sentinels.clone();
        let connect_timeout = inner.config.login.connect_timeout;
        drop(inner);
        if sentinels.is_empty() {
            return;
        }
        let (host, port) = sentinels[next % sentinels.len()].clone();
        next += 1;
        let connected = tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await;
        let Ok(Ok(mut stream)) = connected else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if stream
            .write_all(&encode_command(&["SUBSCRIBE", "+switch-master"]))
            .await
            .is_err()
        {
            continue;
        }
        let mut buf = bytes::BytesMut::with_capacity(1024);
        let mut confirmed = false;
        loop {
            // Wake up now and then to notice a dropped pool.
            let read =
                tokio::time::timeout(Duration::from_secs(1), stream.read_buf(&mut buf)).await;
            let Some(inner) = weak.upgrade() else { return };
            match read {
                Err(_) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
            // Each complete message: the first is the subscription's confirmation.
            let mut announced = false;
            while let Ok(Some(n)) = crate::pool::reply_len(&buf) {
                let _ = buf.split_to(n);
                match confirmed {
                    false => confirmed = true,
                    true => announced = true,
                }
            }
            if announced {
                let pool = SentinelPool { inner };
                let _ = pool.look_up(true).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a concatenation of replies holds a top-level `-READONLY` error.
fn any_readonly(replies: &[u8]) -> bool {
    let mut at = 0;
    while at < replies.len() {
        if replies[at..].starts_with(b"-READONLY") {
            return true;
        }
        match crate::pool::reply_len(&replies[at..]) {
            Ok(Some(n)) => at += n,
            _ => return false,
        }
    }
    false
}

/// The address in a `SENTINEL GET-MASTER-ADDR-BY-NAME` reply; `None` for a name the sentinel
/// does not monitor (a null reply).
fn master_addr(reply: &[u8]) -> Result<Option<(String, u16)>, String> {
    let (frame, _) = redis_protocol::resp2::decode::decode(&Bytes::copy_from_slice(reply))
        .map_err(|e| format!("unreadable reply: {e:?}"))?
        .ok_or("incomplete reply")?;
    match frame {
        OwnedFrame::Null => Ok(None),
        OwnedFrame::Array(items) if items.is_empty() => Ok(None),
        OwnedFrame::Array(items) if items.len() == 2 => {
            let text = |f: &OwnedFrame| match f {
                OwnedFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            let host = text(&items[0]).ok_or("the master's host is not a string")?;
            let port = text(&items[1])
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or("the master's port is not a number")?;
            Ok(Some((host, port)))
        }
        OwnedFrame::Error(e) => Err(e.to_string()),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses_are_read() {
        assert_eq!(
            master_addr(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n"),
            Ok(Some(("127.0.0.1".to_string(), 6380)))
        );
        assert_eq!(master_addr(b"*-1\r\n"), Ok(None));
        assert_eq!(master_addr(b"$-1\r\n"), Ok(None));
        assert!(master_addr(b"-ERR unknown\r\n")
            .unwrap_err()
            .contains("unknown"));
        assert!(master_addr(b"*2\r\n$1\r\nh\r\n$2\r\nxx\r\n").is_err());
    }

    #[test]
    fn readonly_replies_are_found_among_others() {
        assert!(any_readonly(
            b"+OK\r\n-READONLY You can't write against a read only replica.\r\n"
        ));
        assert!(!any_readonly(b"+OK\r\n*1\r\n-READONLY nested\r\n"));
        assert!(!any_readonly(b"-ERR READONLY\r\n"));
    }
}
