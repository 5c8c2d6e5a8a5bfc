//! Redis behind Sentinel: the handlers talk to the master the sentinels name, found with the
//! redis crate's sentinel client (it asks the sentinels in turn and checks that the node named
//! answers `ROLE` as a master). A failover is followed two ways:
//!
//! * a task subscribed to one sentinel's `+switch-master` channel moves the link to the new
//!   master as soon as it is announced (and, on each new subscription, asks that sentinel where
//!   the master is, in case an announcement was missed);
//! * a call that finds the master gone or read-only asks the sentinels again and is retried
//!   once (Sentinel also disconnects the clients of a demoted master, so none stays on it).
//!
//! The subscriber follows [`SentinelLink::master_moves`] to re-subscribe on the new master.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{FromRedisValue, RedisResult, TlsCertificates};
use tokio::sync::watch;

use crate::clock::Timestamp;
use crate::deployment::{NodeAddress, NodeList};
use crate::error::Error;
use crate::redis_link::{connection_config, node_client};
use crate::subscriber::Backoff;
use crate::AbortOnDrop;

/// Sentinels publish a failover's outcome on this channel:
/// `<master name> <old ip> <old port> <new ip> <new port>`.
pub const SWITCH_MASTER_CHANNEL: &str = "+switch-master";

/// How often the failover watcher PINGs its sentinel, so that a dead one is noticed.
const WATCH_PING_INTERVAL: Duration = Duration::from_secs(5);

pub struct SentinelLink {
    shared: Arc<Shared>,
    _watcher: AbortOnDrop,
}

struct Shared {
    master_name: String,
    /// The master's scheme, credentials and database.
    data_nodes: NodeList,
    /// The sentinels, asked without credentials.
    sentinels: NodeList,
    certs: Option<TlsCertificates>,
    timeout: Duration,
    /// Lookups through the sentinels, one at a time.
    lookup: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Current>,
    moves: watch::Sender<Option<NodeAddress>>,
    /// The sentinel whose `+switch-master` the watcher hears now.
    watching: Mutex<Option<NodeAddress>>,
}

#[derive(Default)]
struct Current {
    master: Option<Master>,
    /// Bumped whenever `master` is replaced, so a failed call forgets only the master it used.
    generation: u64,
    /// The master address seen last, kept while `master` is forgotten.
    last_address: Option<NodeAddress>,
    /// Changes of the master's address since the first one was found.
    changes: u64,
    changed_at: Option<Timestamp>,
}

struct Master {
    address: NodeAddress,
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
}

/// What `/health/deep` shows about Sentinel.
#[derive(Debug, Clone)]
pub struct SentinelView {
    pub master_name: String,
    pub master: Option<NodeAddress>,
    pub sentinels: Vec<NodeAddress>,
    pub watching: Option<NodeAddress>,
    pub master_changes: u64,
    pub last_change_at: Option<Timestamp>,
}

impl SentinelLink {
    /// Prepares the lookups and starts the failover watcher. Must be called inside a Tokio
    /// runtime.
    pub fn start(
        sentinels: &NodeList,
        master_name: &str,
        certs: Option<TlsCertificates>,
        timeout: Duration,
    ) -> Result<SentinelLink, Error> {
        let lookup = sentinel_client(sentinels, master_name, certs.as_ref()).map_err(|e| {
            Error::config(
                "--redis-sentinel",
                format!("cannot prepare the sentinel client for {sentinels}: {e}"),
            )
        })?;
        let shared = Arc::new(Shared {
            master_name: master_name.to_string(),
            data_nodes: sentinels.clone(),
            sentinels: sentinels.without_credentials(),
            certs,
            timeout,
            lookup: tokio::sync::Mutex::new(lookup),
            current: Mutex::new(Current::default()),
            moves: watch::Sender::new(None),
            watching: Mutex::new(None),
        });
        let watcher = AbortOnDrop(tokio::spawn(watch_failovers(shared.clone())));
        Ok(SentinelLink {
            shared,
            _watcher: watcher,
        })
    }

    pub fn master_name(&self) -> &str {
        &self.shared.master_name
    }

    /// The master found or announced last.
    pub fn master_address(&self) -> Option<NodeAddress> {
        self.shared.lock().last_address.clone()
    }

    /// The master's address, as it changes.
    pub fn master_moves(&self) -> watch::Receiver<Option<NodeAddress>> {
        self.shared.moves.subscribe()
    }

    pub fn view(&self) -> SentinelView {
        let current = self.shared.lock();
        SentinelView {
            master_name: self.shared.master_name.clone(),
            master: current.last_address.clone(),
            sentinels: self.shared.sentinels.nodes.clone(),
            watching: self
                .shared
                .watching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            master_changes: current.changes,
            last_change_at: current.changed_at,
        }
    }

    /// Runs `cmd` on the master; see the module docs for what a failure triggers.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        let (generation, mut connection) = self.shared.connection().await?;
        match cmd.query_async::<T>(&mut connection).await {
            Err(e) if needs_another_master(&e) => {
                tracing::debug!("{e}; asking the sentinels for the master again");
                self.shared.forget(generation);
                let (_, mut connection) = self.shared.connection().await?;
                cmd.query_async::<T>(&mut connection).await
            }
            other => other,
        }
    }

    /// A client for the master (found through the sentinels if need be), for the subscriber.
    pub async fn master_client(&self) -> RedisResult<(redis::Client, NodeAddress)> {
        if let Some(found) = self.shared.current_client() {
            return Ok(found);
        }
        let mut lookup = self.shared.lookup.lock().await;
        if let Some(found) = self.shared.current_client() {
            return Ok(found);
        }
        let (client, address) = discover(&mut lookup).await?;
        self.shared.install(address.clone(), client.clone(), None);
        Ok((client, address))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Plain data, always written whole: a poisoned lock still holds a consistent state.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_connection(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.lock();
        let connection = current.master.as_ref()?.connection.clone()?;
        Some((current.generation, connection))
    }

    fn current_client(&self) -> Option<(redis::Client, NodeAddress)> {
        self.current_master()
            .map(|(client, address, _)| (client, address))
    }

    fn current_master(&self) -> Option<(redis::Client, NodeAddress, u64)> {
        let current = self.lock();
        let master = current.master.as_ref()?;
        Some((
            master.client.clone(),
            master.address.clone(),
            current.generation,
        ))
    }

    /// The master's connection: the one held, or a new one to the master announced last, or
    /// to the one the sentinels name now.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(found) = self.current_connection() {
            return Ok(found);
        }
        let mut lookup = self.lookup.lock().await;
        if let Some(found) = self.current_connection() {
            return Ok(found);
        }
        // The master announced last (no connection yet), else the one the sentinels name.
        let (client, address, announced) = match self.current_master() {
            Some((client, address, generation)) => (client, address, Some(generation)),
            None => {
                let (client, address) = discover(&mut lookup).await?;
                (client, address, None)
            }
        };
        match client
            .get_multiplexed_async_connection_with_config(&connection_config(self.timeout))
            .await
        {
            Ok(connection) => {
                let generation = self.install(address, client, Some(connection.clone()));
                Ok((generation, connection))
            }
            Err(e) => {
                if let Some(generation) = announced {
                    self.forget(generation);
                }
                Err(e)
            }
        }
    }

    /// Makes `address` the master; returns the new generation.
    fn install(
        &self,
        address: NodeAddress,
        client: redis::Client,
        connection: Option<MultiplexedConnection>,
    ) -> u64 {
        let mut current = self.lock();
        let moved = current.last_address.as_ref() != Some(&address);
        if moved {
            if let Some(old) = &current.last_address {
                tracing::info!(
                    "sentinel: master {:?} moved from {old} to {address}",
                    self.master_name
                );
                current.changes += 1;
                current.changed_at = Some(Timestamp::now());
            } else {
                tracing::info!("sentinel: master {:?} is {address}", self.master_name);
            }
            current.last_address = Some(address.clone());
        }
        current.generation += 1;
        current.master = Some(Master {
            address: address.clone(),
            client,
            connection,
        });
        let generation = current.generation;
        drop(current);
        if moved {
            self.moves.send_replace(Some(address));
        }
        generation
    }

    /// Drops the master of `generation` (if it is still the one held): the next call asks the
    /// sentinels again.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if current.generation == generation {
            current.master = None;
            current.generation += 1;
        }
    }

    /// A sentinel said the master is now `address`.
    fn switch_to(&self, address: NodeAddress) {
        if self.lock().last_address.as_ref() == Some(&address) {
            return;
        }
        match node_client(&self.data_nodes, &address, self.certs.as_ref()) {
            Ok(client) => {
                self.install(address, client, None);
            }
            Err(e) => {
                tracing::warn!("sentinel: cannot prepare a connection to {address}: {e}");
                let generation = self.lock().generation;
                self.forget(generation);
            }
        }
    }
}

/// Asks the sentinels for the master: a client for it and its address.
async fn discover(lookup: &mut SentinelClient) -> RedisResult<(redis::Client, NodeAddress)> {
    let client = lookup.async_get_client().await?;
    let address = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => NodeAddress::new(host.clone(), *port),
        redis::ConnectionAddr::TcpTls { host, port, .. } => NodeAddress::new(host.clone(), *port),
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "the sentinels named a master that is not a TCP address",
                other.to_string(),
            )))
        }
    };
    Ok((client, address))
}

/// The failures after which the master is looked up again: the connection is gone, or the
/// node is no longer (or not yet) a master.
fn needs_another_master(e: &redis::RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

fn sentinel_client(
    sentinels: &NodeList,
    master_name: &str,
    certs: Option<&TlsCertificates>,
) -> RedisResult<SentinelClient> {
    let addresses = sentinels.nodes.iter().map(|n| {
        if sentinels.tls {
            redis::ConnectionAddr::TcpTls {
                host: n.host.clone(),
                port: n.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(n.host.clone(), n.port)
        }
    });
    let mut builder =
        SentinelClientBuilder::new(addresses, master_name, SentinelServerType::Master)?;
    if sentinels.tls {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs.clone());
        }
    }
    if let Some(user) = &sentinels.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &sentinels.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(db) = sentinels.db {
        builder = builder.set_client_to_redis_db(i64::from(db));
    }
    builder.build()
}

/// Parses a `+switch-master` message; the new address if it is about `master_name`.
pub fn parse_switch_master(payload: &str, master_name: &str) -> Option<NodeAddress> {
    let fields: Vec<&str> = payload.split_whitespace().collect();
    match fields[..] {
        [name, _, _, host, port] if name == master_name => {
            Some(NodeAddress::new(host, port.parse().ok()?))
        }
        _ => None,
    }
}

/// Hears one sentinel's `+switch-master` at a time, moving to the next sentinel when it fails.
async fn watch_failovers(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let count = shared.sentinels.nodes.len();
    for turn in 0.. {
        let sentinel = shared.sentinels.nodes[turn % count].clone();
        match watch_one(&shared, &sentinel).await {
            Ok(why) => {
                backoff.reset();
                tracing::warn!("sentinel {sentinel}: {why}; watching another sentinel");
            }
            Err(e) => tracing::debug!("sentinel {sentinel}: {e}"),
        }
        *shared.watching.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Subscribes to `sentinel`'s announcements and applies them until the connection fails;
/// returns why it did. An error means it could not subscribe.
async fn watch_one(shared: &Shared, sentinel: &NodeAddress) -> RedisResult<String> {
    let client = node_client(&shared.sentinels, sentinel, shared.certs.as_ref())?;
    let subscribe = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(SWITCH_MASTER_CHANNEL).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(shared.timeout, subscribe)
        .await
        .map_err(|_| timed_out("subscribing to +switch-master"))??;
    *shared.watching.lock().unwrap_or_else(|p| p.into_inner()) = Some(sentinel.clone());
    catch_up(shared, &client).await;

    let (mut sink, mut stream) = pubsub.split();
    let mut keepalive = tokio::time::interval(WATCH_PING_INTERVAL);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    let payload = String::from_utf8_lossy(message.get_payload_bytes());
                    if let Some(address) = parse_switch_master(&payload, &shared.master_name) {
                        shared.switch_to(address);
                    }
                }
                None => return Ok("the connection was closed".to_string()),
            },
            _ = keepalive.tick() => {
                match tokio::time::timeout(shared.timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ok(format!("keep-alive PING failed: {e}")),
                    Err(_) => return Ok("keep-alive PING got no answer".to_string()),
                }
            }
        }
    }
}

/// A failover may have happened while no sentinel was heard: when a master is known, ask where
/// it is now.
async fn catch_up(shared: &Shared, sentinel: &redis::Client) {
    if shared.lock().last_address.is_none() {
        return;
    }
    let ask = async {
        let mut connection = sentinel
            .get_multiplexed_async_connection_with_config(&connection_config(shared.timeout))
            .await?;
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&shared.master_name)
            .query_async::<Option<(String, u16)>>(&mut connection)
            .await
    };
    match tokio::time::timeout(shared.timeout, ask).await {
        Ok(Ok(Some((host, port)))) => shared.switch_to(NodeAddress::new(host, port)),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::debug!("sentinel: asking for the master failed: {e}"),
        Err(_) => tracing::debug!("sentinel: asking for the master timed out"),
    }
}

fn timed_out(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} took too long"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_master_messages_name_the_new_address() {
        assert_eq!(
            parse_switch_master("krowoc 127.0.0.1 6379 127.0.0.1 6380", "krowoc"),
            Some(NodeAddress::new("127.0.0.1", 6380))
        );
        assert_eq!(
            parse_switch_master("other 127.0.0.1 6379 127.0.0.1 6380", "krowoc"),
            None
        );
        assert_eq!(parse_switch_master("krowoc 127.0.0.1 6379", "krowoc"), None);
        assert_eq!(parse_switch_master("krowoc a 1 b notaport", "krowoc"), None);
    }

    #[test]
    fn lost_connections_and_read_only_replies_send_the_link_back_to_the_sentinels() {
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_string(),
        ));
        assert!(needs_another_master(&readonly));
        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(needs_another_master(&refused));
        let wrongtype = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
            "Operation against a key holding the wrong kind of value".to_string(),
        ));
        assert!(!needs_another_master(&wrongtype));
    }
}
