//! Redis Cluster: the handlers' cluster connection (the redis crate's, which keeps one
//! connection per master, routes each command by slot, follows MOVED and ASK, and reloads the
//! slot map when a replica is promoted), the cluster's own view for `/health/deep`
//! (`CLUSTER INFO`, `CLUSTER NODES`, each master's `INFO`), and the subscriber's choice of node.
//!
//! Classic Pub/Sub is cluster-wide in Redis Cluster: a PUBLISH on any node reaches the
//! subscribers of every node. So the subscriber SUBSCRIBEs on one node, the first it reaches
//! among those the cluster lists (seeds before the first answer), and moves to the next when that
//! one dies. Sharded Pub/Sub (SSUBSCRIBE) would spread the load but tie each channel to its slot's
//! master; the upstream's few channels do not need that.

use std::sync::Mutex;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{FromRedisValue, RedisResult, TlsCertificates};

use crate::deployment::{NodeAddress, NodeList};
use crate::error::Error;
use crate::redis_link::{node_client, RedisLink, SubscriptionNode};

/// Hash slots in a Redis Cluster.
pub const CLUSTER_SLOTS: u32 = 16384;

pub struct ClusterLink {
    client: ClusterClient,
    /// Made on first use (the service starts while the cluster is down); the redis crate
    /// repairs it afterwards.
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
    seeds: NodeList,
    certs: Option<TlsCertificates>,
    /// The nodes to try for the subscription: the seeds, then what `CLUSTER NODES` last said.
    known: Mutex<Vec<NodeAddress>>,
}

impl ClusterLink {
    pub fn new(
        seeds: &NodeList,
        certs: Option<TlsCertificates>,
        timeout: Duration,
    ) -> Result<ClusterLink, Error> {
        let initial: Vec<redis::ConnectionInfo> = seeds
            .nodes
            .iter()
            .map(|n| seeds.connection_info(n))
            .collect();
        let mut builder = ClusterClientBuilder::new(initial)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(certs) = &certs {
            builder = builder.certs(certs.clone());
        }
        let client = builder.build().map_err(|e| {
            Error::config(
                "--redis-cluster",
                format!("cannot prepare the cluster client for {seeds}: {e}"),
            )
        })?;
        Ok(ClusterLink {
            client,
            connection: tokio::sync::Mutex::new(None),
            seeds: seeds.clone(),
            certs,
            known: Mutex::new(seeds.nodes.clone()),
        })
    }

    pub fn seeds(&self) -> &NodeList {
        &self.seeds
    }

    async fn connection(&self) -> RedisResult<ClusterConnection> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = &*slot {
            return Ok(connection.clone());
        }
        let connection = self.client.get_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `cmd` where the redis crate routes it.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        let mut connection = self.connection().await?;
        cmd.query_async(&mut connection).await
    }

    /// Runs `cmd` on the node(s) `routing` names.
    pub async fn query_routed<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        routing: RoutingInfo,
    ) -> RedisResult<T> {
        let mut connection = self.connection().await?;
        let value = connection.route_command(cmd.clone(), routing).await?;
        Ok(T::from_redis_value(value)?)
    }

    /// Runs `cmd` on the node at `address` (one the cluster connection is connected to: a
    /// master serving slots).
    pub async fn query_node<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        address: &NodeAddress,
    ) -> RedisResult<T> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: address.host.clone(),
            port: address.port,
        });
        self.query_routed(cmd, routing).await
    }

    /// `CLUSTER INFO` of any node, as `key → value`.
    pub async fn cluster_info(&self, link: &RedisLink) -> Result<ClusterInfo, Error> {
        let any_node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let text: String = link
            .bounded(
                "CLUSTER INFO",
                self.query_routed(&redis::cmd("CLUSTER").arg("INFO").clone(), any_node),
            )
            .await?;
        Ok(ClusterInfo::parse(&text))
    }

    /// `CLUSTER NODES` of any node, parsed; also refreshes the nodes the subscriber may use.
    pub async fn cluster_nodes(&self, link: &RedisLink) -> Result<Vec<ClusterNode>, Error> {
        let any_node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let text: String = link
            .bounded(
                "CLUSTER NODES",
                self.query_routed(&redis::cmd("CLUSTER").arg("NODES").clone(), any_node),
            )
            .await?;
        let nodes = parse_cluster_nodes(&text);
        let usable: Vec<NodeAddress> = nodes
            .iter()
            .filter(|n| !n.failed && n.linked)
            .map(|n| n.address.clone())
            .collect();
        if !usable.is_empty() {
            *self.known.lock().unwrap_or_else(|p| p.into_inner()) = usable;
        }
        Ok(nodes)
    }

    /// The known node after `after` (or the first), refreshed from `CLUSTER NODES` when the
    /// cluster answers.
    pub async fn subscription_node(
        &self,
        after: Option<&str>,
        link: &RedisLink,
    ) -> Result<SubscriptionNode, Error> {
        if let Err(e) = self.cluster_nodes(link).await {
            tracing::debug!("subscriber: keeping the known nodes: {e}");
        }
        let node = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let next = after
                .and_then(|a| known.iter().position(|n| n.to_string() == a))
                .map_or(0, |i| (i + 1) % known.len());
            known[next].clone()
        };
        let client = node_client(&self.seeds, &node, self.certs.as_ref())
            .map_err(|e| Error::redis(&format!("preparing a connection to {node}"), e))?;
        Ok(SubscriptionNode {
            client,
            address: node.to_string(),
            master_moves: None,
        })
    }
}

/// `CLUSTER INFO`'s fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterInfo {
    /// `ok` or `fail`.
    pub state: Option<String>,
    pub slots_assigned: Option<u32>,
    pub slots_ok: Option<u32>,
    pub slots_pfail: Option<u32>,
    pub slots_fail: Option<u32>,
    pub known_nodes: Option<u32>,
    /// Masters serving at least one slot.
    pub size: Option<u32>,
}

impl ClusterInfo {
    pub fn parse(text: &str) -> ClusterInfo {
        let fields = crate::health::parse_info(text);
        let number = |k: &str| fields.get(k).and_then(|v| v.parse::<u32>().ok());
        ClusterInfo {
            state: fields.get("cluster_state").map(|s| s.to_string()),
            slots_assigned: number("cluster_slots_assigned"),
            slots_ok: number("cluster_slots_ok"),
            slots_pfail: number("cluster_slots_pfail"),
            slots_fail: number("cluster_slots_fail"),
            known_nodes: number("cluster_known_nodes"),
            size: number("cluster_size"),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.state.as_deref() == Some("ok")
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterNode {
    pub id: String,
    pub address: NodeAddress,
    pub master: bool,
    /// Flagged `fail` (agreed) or `fail?` (suspected by the node asked).
    pub failed: bool,
    /// The cluster bus link is `connected`.
    pub linked: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slots served (a master's ranges, without slots being migrated or imported).
    pub slots: u32,
}

/// Parses `CLUSTER NODES`: `id ip:port@cport[,hostname] flags master ping pong epoch link
/// slot…`. Nodes without an address (`noaddr`, `:0`) or still in handshake are left out.
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let flags: Vec<&str> = fields[2].split(',').collect();
            if flags.iter().any(|f| matches!(*f, "noaddr" | "handshake")) {
                return None;
            }
            let host_port = fields[1].split(['@', ',']).next()?;
            let (host, port) = host_port.rsplit_once(':')?;
            let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return None;
            }
            let slots = fields[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| match r.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?)),
                    None => r.parse::<u32>().ok().map(|s| (s, s)),
                })
                .map(|(lo, hi)| hi.saturating_sub(lo) + 1)
                .sum();
            Some(ClusterNode {
                id: fields[0].to_string(),
                address: NodeAddress::new(host, port),
                master: flags.contains(&"master"),
                failed: flags.iter().any(|f| matches!(*f, "fail" | "fail?")),
                linked: fields[7] == "connected",
                master_id: (fields[3] != "-").then(|| fields[3].to_string()),
                slots,
            })
        })
        .collect()
}

/// Reads one `INFO` keyspace line's key count: `db0:keys=12,expires=0,avg_ttl=0`.
pub fn keyspace_keys(value: &str) -> Option<u64> {
    value
        .split(',')
        .find_map(|part| part.strip_prefix("keys="))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,hostname4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,hostname2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,hostname3 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,hostname5 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 disconnected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,hostname1 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
a1b2 :0@0 master,noaddr - 0 0 0 disconnected
";

    #[test]
    fn cluster_nodes_lines_become_nodes_with_slot_counts() {
        let nodes = parse_cluster_nodes(NODES);
        assert_eq!(nodes.len(), 5, "{nodes:?}");
        let masters: Vec<(String, u32)> = nodes
            .iter()
            .filter(|n| n.master)
            .map(|n| (n.address.to_string(), n.slots))
            .collect();
        assert_eq!(
            masters,
            [
                ("127.0.0.1:30002".to_string(), 5462),
                ("127.0.0.1:30003".to_string(), 5461),
                ("127.0.0.1:30001".to_string(), 5461),
            ]
        );
        assert_eq!(masters.iter().map(|m| m.1).sum::<u32>(), CLUSTER_SLOTS);
        let failed = &nodes[3];
        assert!(failed.failed && !failed.linked && !failed.master);
        assert_eq!(
            failed.master_id.as_deref(),
            Some("67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1")
        );
    }

    #[test]
    fn cluster_info_fields_are_read() {
        let info = ClusterInfo::parse(
            "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n\
             cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:6\r\ncluster_size:3\r\n",
        );
        assert!(info.is_ok());
        assert_eq!(info.slots_ok, Some(16384));
        assert_eq!(info.known_nodes, Some(6));
        assert_eq!(info.size, Some(3));
        assert!(!ClusterInfo::parse("cluster_state:fail\r\n").is_ok());
    }

    #[test]
    fn keyspace_lines_give_key_counts() {
        assert_eq!(keyspace_keys("keys=12,expires=0,avg_ttl=0"), Some(12));
        assert_eq!(keyspace_keys("expires=0"), None);
    }
}
