//! The handlers' Redis link, for each deployment ([`crate::deployment`]):
//!
//! * standalone: one reconnecting, multiplexed connection (the redis crate's
//!   `ConnectionManager`, created lazily so the service starts while Redis is down);
//! * cluster: the redis crate's cluster connection, which routes by slot, follows MOVED and ASK,
//!   and finds a promoted replica ([`crate::cluster`]);
//! * sentinel: a connection to the master the sentinels name, replaced when they announce a
//!   failover or when it fails ([`crate::sentinel`]).
//!
//! Every call is bounded by a timeout so a dead Redis never hangs a request.
//!
//! The background subscriber uses its own connection, to the node [`RedisLink::subscription_node`]
//! picks (see `subscriber.rs`): a connection in subscribed mode cannot run other commands.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use krowoc_relay::redis_url::redact_url;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, FromRedisValue, RedisResult, TlsCertificates};
use tokio::sync::watch;

use crate::cluster::ClusterLink;
use crate::deployment::{NodeAddress, NodeList, RedisDeployment};
use crate::error::Error;
use crate::sentinel::SentinelLink;

#[derive(Clone)]
pub struct RedisLink {
    backend: Backend,
    timeout: Duration,
}

#[derive(Clone)]
enum Backend {
    Standalone(Arc<Standalone>),
    Cluster(Arc<ClusterLink>),
    Sentinel(Arc<SentinelLink>),
}

struct Standalone {
    client: redis::Client,
    manager: ConnectionManager,
    shown_url: String,
}

/// The deployment behind the link, for code that reports on it (`/health/deep`).
pub enum Topology<'a> {
    Standalone,
    Cluster(&'a ClusterLink),
    Sentinel(&'a SentinelLink),
}

/// Where the subscriber is to SUBSCRIBE next.
pub struct SubscriptionNode {
    pub client: redis::Client,
    /// `HOST:PORT`, or a standalone server's URL with any password hidden.
    pub address: String,
    /// With Sentinel: the master's address, which changes on a failover; the subscriber moves
    /// to the new master when it does.
    pub master_moves: Option<watch::Receiver<Option<NodeAddress>>>,
}

impl RedisLink {
    /// Prepares the link without dialling: the first command connects (with Sentinel, a task
    /// starts watching the sentinels for failovers). Must be called inside a Tokio runtime.
    pub fn new(
        deployment: &RedisDeployment,
        tls_ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<RedisLink, Error> {
        let certs = tls_ca.map(read_ca).transpose()?;
        let backend = match deployment {
            RedisDeployment::Standalone { url } => {
                Backend::Standalone(Arc::new(Standalone::new(url, certs, timeout)?))
            }
            RedisDeployment::Cluster { seeds } => {
                Backend::Cluster(Arc::new(ClusterLink::new(seeds, certs, timeout)?))
            }
            RedisDeployment::Sentinel { sentinels, master } => Backend::Sentinel(Arc::new(
                SentinelLink::start(sentinels, master, certs, timeout)?,
            )),
        };
        Ok(RedisLink { backend, timeout })
    }

    pub fn topology(&self) -> Topology<'_> {
        match &self.backend {
            Backend::Standalone(_) => Topology::Standalone,
            Backend::Cluster(cluster) => Topology::Cluster(cluster),
            Backend::Sentinel(sentinel) => Topology::Sentinel(sentinel),
        }
    }

    /// What the link talks to, password hidden: the URL, the cluster's seeds, or the master
    /// the sentinels named last.
    pub fn shown(&self) -> String {
        match &self.backend {
            Backend::Standalone(s) => s.shown_url.clone(),
            Backend::Cluster(cluster) => cluster.seeds().to_string(),
            Backend::Sentinel(sentinel) => match sentinel.master_address() {
                Some(address) => address.to_string(),
                None => format!("sentinel master {:?}", sentinel.master_name()),
            },
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one command within the timeout. `operation` names it in errors, e.g. `PING`.
    /// In a cluster the command goes where the redis crate routes it (by key; keyless
    /// commands such as `PING` to every master).
    ///
    /// A command that fails because the connection was refused or found closed is sent once
    /// more, within the same timeout, on a fresh connection (to the master the sentinels name
    /// then, with Sentinel). So a PUBLISH is at-least-once across a reconnect: one Redis
    /// executed and then lost before answering would be sent twice.
    pub async fn query<T: FromRedisValue>(
        &self,
        operation: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, Error> {
        match &self.backend {
            Backend::Standalone(s) => self.bounded(operation, s.query(cmd)).await,
            Backend::Cluster(cluster) => self.bounded(operation, cluster.query(cmd)).await,
            Backend::Sentinel(sentinel) => self.bounded(operation, sentinel.query(cmd)).await,
        }
    }

    /// Runs `call` within the timeout and names `operation` in its error.
    pub(crate) async fn bounded<T>(
        &self,
        operation: &str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::redis(operation, e)),
            Err(_) => Err(Error::redis_timeout(operation, self.timeout)),
        }
    }

    /// `PUBLISH channel payload`; answers how many subscribers received it. In a cluster the
    /// message goes to any one node, which forwards it to every other, and the answer counts
    /// the subscribers of that node only.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<u64, Error> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        let operation = format!("PUBLISH to {channel:?}");
        match &self.backend {
            Backend::Cluster(cluster) => {
                let any_node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                self.bounded(&operation, cluster.query_routed(&cmd, any_node))
                    .await
            }
            _ => self.query(&operation, &cmd).await,
        }
    }

    /// `PING`, and how long the answer took (in a cluster: from every master).
    pub async fn ping(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let reply: String = self.query("PING", &redis::cmd("PING")).await?;
        check_pong(&reply)?;
        Ok(started.elapsed())
    }

    /// `INFO` (the default sections), as text: of the server, or the master with Sentinel.
    /// In a cluster, of any one node (one master's: [`ClusterLink::query_node`]).
    pub async fn info(&self) -> Result<String, Error> {
        match &self.backend {
            Backend::Cluster(cluster) => {
                let any_node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                self.bounded("INFO", cluster.query_routed(&redis::cmd("INFO"), any_node))
                    .await
            }
            _ => self.query("INFO", &redis::cmd("INFO")).await,
        }
    }

    /// The node the subscriber should SUBSCRIBE on next, `after` the one it lost (if any):
    /// the standalone server; in a cluster, the next known node (classic Pub/Sub is
    /// cluster-wide, so any node hears every PUBLISH); with Sentinel, the current master.
    pub async fn subscription_node(&self, after: Option<&str>) -> Result<SubscriptionNode, Error> {
        match &self.backend {
            Backend::Standalone(s) => Ok(SubscriptionNode {
                client: s.client.clone(),
                address: s.shown_url.clone(),
                master_moves: None,
            }),
            Backend::Cluster(cluster) => cluster.subscription_node(after, self).await,
            Backend::Sentinel(sentinel) => {
                let (client, address) = self
                    .bounded("finding the master", sentinel.master_client())
                    .await?;
                Ok(SubscriptionNode {
                    client,
                    address: address.to_string(),
                    master_moves: Some(sentinel.master_moves()),
                })
            }
        }
    }
}

impl Standalone {
    fn new(
        url: &str,
        certs: Option<TlsCertificates>,
        timeout: Duration,
    ) -> Result<Standalone, Error> {
        let shown_url = redact_url(url);
        let client = match certs {
            None => redis::Client::open(url),
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
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
        Ok(Standalone {
            client,
            manager,
            shown_url,
        })
    }

    /// The manager answers the first call after an outage with the failed connection it still
    /// holds, and dials afresh for the next one: hence one retry.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        let mut conn = self.manager.clone();
        match cmd.query_async::<T>(&mut conn).await {
            Err(e) if e.is_connection_refusal() || e.is_connection_dropped() => {
                tracing::debug!("{e}; retrying on a fresh connection");
                cmd.query_async::<T>(&mut conn).await
            }
            other => other,
        }
    }
}

fn read_ca(path: &Path) -> Result<TlsCertificates, Error> {
    let ca = std::fs::read(path)
        .map_err(|e| Error::config("--redis-tls-ca", format!("{}: {e}", path.display())))?;
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    })
}

/// A client for one node of a list, with the list's scheme and credentials (and the CA when
/// given).
pub(crate) fn node_client(
    list: &NodeList,
    node: &NodeAddress,
    certs: Option<&TlsCertificates>,
) -> RedisResult<redis::Client> {
    let info = list.connection_info(node);
    match certs {
        Some(certs) if list.tls => redis::Client::build_with_tls(info, certs.clone()),
        _ => redis::Client::open(info),
    }
}

/// Connection settings bounded by `timeout`, for the connections opened by hand.
pub(crate) fn connection_config(timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

/// `PING`'s reply must be `PONG`.
pub(crate) fn check_pong(reply: &str) -> Result<(), Error> {
    if reply != "PONG" {
        return Err(Error::new(
            crate::error::ErrorKind::RedisReply,
            format!("PING answered {reply:?}, not PONG"),
        ));
    }
    Ok(())
}
