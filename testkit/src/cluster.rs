//! A real Redis Cluster on loopback for tests: `masters` redis-server processes in cluster mode,
//! each with `replicas` replicas, joined by `redis-cli --cluster create`, every node in its own
//! temp dir, all killed on drop. Failover is fast (`cluster-node-timeout` 1000 ms) so tests can
//! kill a master and watch its replica take over.
//!
//! ```no_run
//! let cluster = testkit::cluster::RedisCluster::start(3, 1);
//! let owner = cluster.owner_of("user:{42}");
//! assert_eq!(cluster.node(owner).cli(&["SET", "user:{42}", "x"]), "OK");
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::RedisServer;

/// A cluster's `cluster-node-timeout`: how long a master may be silent before its replica takes
/// over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    running: Vec<bool>,
    masters: usize,
    /// With [`RedisCluster::start_tls`]: each node's TLS port, in `nodes`' order.
    tls_ports: Vec<u16>,
}

/// A port whose cluster-bus companion is also free.
fn node_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let ports = (
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    );
    drop((a, b));
    ports
}

pub fn redis_cli_binary() -> PathBuf {
    let server = crate::redis_server_binary();
    let beside = server.with_file_name("redis-cli");
    if beside.is_file() {
        return beside;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("redis-cli");
        if p.is_file() {
            return p;
        }
    }
    panic!("redis-cli is not installed: run `cargo xtask test` (it installs redis-tools)");
}

impl RedisCluster {
    /// Starts `masters` masters (at least 3, as Redis Cluster wants) with `replicas` replicas
    /// each and waits until every node reports `cluster_state:ok` with all 16384 slots.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, None)
    }

    /// Like [`RedisCluster::start`], every node also listening for TLS with `server`'s
    /// certificate (signed by `ca`, from [`crate::tls::TestCa::issue_peer`]: the nodes show it
    /// to each other as clients too; clients need none), and the cluster bus and
    /// replication over TLS (`tls-cluster`, `tls-replication`): a TLS client's `CLUSTER SLOTS`
    /// names the TLS ports. The plain ports stay for the test's own commands.
    pub fn start_tls(
        masters: usize,
        replicas: usize,
        ca: &crate::tls::TestCa,
        server: &crate::tls::CertFiles,
    ) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, Some((ca, server)))
    }

    fn start_with(
        masters: usize,
        replicas: usize,
        tls: Option<(&crate::tls::TestCa, &crate::tls::CertFiles)>,
    ) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create wants 3 masters or more"
        );
        let total = masters * (1 + replicas);
        let mut tls_ports = Vec::new();
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                let (port, bus) = node_ports();
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    "--cluster-replica-validity-factor",
                    "0",
                    "--cluster-require-full-coverage",
                    "yes",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some((ca, server)) = tls {
                    let tls_port = crate::free_port();
                    tls_ports.push(tls_port);
                    for (flag, value) in [
                        ("--tls-port", tls_port.to_string()),
                        ("--tls-cert-file", server.cert.display().to_string()),
                        ("--tls-key-file", server.key.display().to_string()),
                        ("--tls-ca-cert-file", ca.ca_file().display().to_string()),
                        ("--tls-auth-clients", "no".to_string()),
                        ("--tls-cluster", "yes".to_string()),
                        ("--tls-replication", "yes".to_string()),
                    ] {
                        args.push(flag.to_string());
                        args.push(value);
                    }
                }
                RedisServer::start_with_args(port, &args)
            })
            .collect();
        let mut create = Command::new(redis_cli_binary());
        create.arg("--cluster").arg("create");
        match tls {
            None => {
                for n in &nodes {
                    create.arg(format!("127.0.0.1:{}", n.port));
                }
            }
            Some((ca, _)) => {
                // The bus is TLS: redis-cli meets the nodes on their TLS ports.
                for p in &tls_ports {
                    create.arg(format!("127.0.0.1:{p}"));
                }
                create.arg("--tls").arg("--cacert").arg(ca.ca_file());
            }
        }
        create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // redis-cli waits for the nodes to join for as long as it takes: never, when their bus
        // cannot connect. Stop it then, saying so.
        let mut child = create.spawn().expect("run redis-cli --cluster create");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().expect("redis-cli's output");
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create {}:\n{}\n{}",
            if status.is_none() {
                "did not finish in 60 s (do the nodes' buses connect?)"
            } else {
                "failed"
            },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster {
            running: vec![true; nodes.len()],
            nodes,
            masters,
            tls_ports,
        };
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicas_synced(Duration::from_secs(30));
        cluster
    }

    /// `127.0.0.1:PORT,…` of the nodes started as masters: the seeds a client is given.
    pub fn seeds(&self) -> String {
        self.nodes[..self.masters]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `127.0.0.1:TLS_PORT,…` of the nodes started as masters ([`RedisCluster::start_tls`]).
    pub fn tls_seeds(&self) -> String {
        assert!(
            !self.tls_ports.is_empty(),
            "started with RedisCluster::start_tls"
        );
        self.tls_ports[..self.masters]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.running[i]
    }

    /// Kills node `i` (SIGKILL); its nodes.conf stays for [`RedisCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
        self.running[i] = false;
    }

    /// Starts node `i` again on its port with its nodes.conf: a former master rejoins as a
    /// replica of whoever took over.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.running[i] = true;
    }

    fn any_live(&self) -> &RedisServer {
        self.nodes
            .iter()
            .zip(&self.running)
            .find(|(_, up)| **up)
            .map(|(n, _)| n)
            .expect("a running node")
    }

    /// The hash slot of `key`, as Redis computes it.
    pub fn slot(&self, key: &str) -> u16 {
        self.any_live().int(&["CLUSTER", "KEYSLOT", key]) as u16
    }

    /// Index of the node that serves `slot` now, as a live node's `CLUSTER NODES` says.
    pub fn owner_of_slot(&self, slot: u16) -> usize {
        let nodes = self.any_live().cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port = self.port_of(fields[1]);
            for range in &fields[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let (lo, hi) = match range.split_once('-') {
                    Some((lo, hi)) => (lo.parse::<u16>(), hi.parse::<u16>()),
                    None => (range.parse::<u16>(), range.parse::<u16>()),
                };
                if let (Ok(lo), Ok(hi)) = (lo, hi) {
                    if (lo..=hi).contains(&slot) {
                        if let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                            return i;
                        }
                    }
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// Index of the node that serves `key` now.
    pub fn owner_of(&self, key: &str) -> usize {
        self.owner_of_slot(self.slot(key))
    }

    fn port_of(&self, address: &str) -> Option<u16> {
        // ip:port@cport[,hostname]
        let host_port = address.split('@').next()?;
        host_port.rsplit_once(':')?.1.parse().ok()
    }

    /// The node id of node `i`.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"])
    }

    /// Indexes of the live nodes that are masters serving slots.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.running[i])
            .filter(|&i| {
                let role = self.nodes[i].cli(&["ROLE"]);
                role.lines().next() == Some("master")
            })
            .filter(|&i| {
                let info = self.nodes[i].cli(&["CLUSTER", "INFO"]);
                let myself = self.nodes[i].cli(&["CLUSTER", "NODES"]);
                let serves = myself
                    .lines()
                    .any(|l| l.contains("myself") && l.split(' ').count() > 8);
                info.contains("cluster_state:ok") && serves
            })
            .collect()
    }

    /// Keys held by node `i` (`DBSIZE`).
    pub fn keys_on(&self, i: usize) -> i64 {
        self.nodes[i].int(&["DBSIZE"])
    }

    /// Waits until every live node says `cluster_state:ok` with all slots assigned and agrees
    /// on who serves them.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<String> = (0..self.nodes.len())
                .filter(|&i| self.running[i])
                .map(|i| {
                    self.nodes[i]
                        .try_command(&["CLUSTER", "INFO"])
                        .map(|r| crate::render_reply(&r))
                        .unwrap_or_default()
                })
                .collect();
            let ok = states.iter().all(|s| {
                s.contains("cluster_state:ok") && s.contains("cluster_slots_assigned:16384")
            });
            if ok && self.slots_agree() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok in {timeout:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every live node's `CLUSTER SLOTS` names the same masters for the same ranges.
    fn slots_agree(&self) -> bool {
        let maps: Vec<Vec<(String, String, String)>> = (0..self.nodes.len())
            .filter(|&i| self.running[i])
            .map(|i| {
                let mut ranges = Vec::new();
                if let Ok(raw) = self.nodes[i].try_command(&["CLUSTER", "SLOTS"]) {
                    let text = crate::render_reply(&raw);
                    let lines: Vec<&str> = text.lines().collect();
                    // Rendered flat: lo, hi, ip, port, id, [replicas...]; take the first
                    // three numbers-or-ports after each range by scanning.
                    let mut j = 0;
                    while j + 3 < lines.len() {
                        if let (Ok(_), Ok(_)) =
                            (lines[j].parse::<u16>(), lines[j + 1].parse::<u16>())
                        {
                            if lines[j + 2] == "127.0.0.1" {
                                ranges.push((
                                    lines[j].to_string(),
                                    lines[j + 1].to_string(),
                                    lines[j + 3].to_string(),
                                ));
                                j += 4;
                                continue;
                            }
                        }
                        j += 1;
                    }
                }
                ranges.sort();
                ranges
            })
            .collect();
        maps.windows(2).all(|w| w[0] == w[1]) && maps.first().is_some_and(|m| !m.is_empty())
    }

    fn wait_replicas_synced(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            loop {
                let info = self.nodes[i].cli(&["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {} did not sync with its master: {info}",
                    self.nodes[i].port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Moves `slot` from node `from` to node `to` the way `redis-cli --cluster reshard` does:
    /// IMPORTING and MIGRATING, MIGRATE of its keys, then the new owner told to every master.
    /// `between` runs while the slot is half-moved (clients get ASK for moved keys).
    pub fn move_slot(&self, slot: u16, from: usize, to: usize, between: impl FnOnce()) {
        let (from_id, to_id) = (self.id(from), self.id(to));
        let s = slot.to_string();
        assert_eq!(
            self.nodes[to].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]),
            "OK"
        );
        assert_eq!(
            self.nodes[from].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]),
            "OK"
        );
        let to_port = self.nodes[to].port.to_string();
        loop {
            let keys = self.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let reply = self.nodes[from].cli(&args);
            assert!(reply == "OK" || reply == "NOKEY", "MIGRATE: {reply}");
        }
        between();
        for i in self.masters() {
            let reply = self.nodes[i].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            assert_eq!(reply, "OK", "CLUSTER SETSLOT {s} NODE on node {i}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_forms_serves_every_slot_and_moves_one() {
        let cluster = RedisCluster::start(3, 1);
        assert_eq!(cluster.len(), 6);
        let masters = cluster.masters();
        assert_eq!(masters.len(), 3, "{masters:?}");
        let owner = cluster.owner_of("k{a}");
        assert!(masters.contains(&owner));
        assert_eq!(cluster.node(owner).cli(&["SET", "k{a}", "1"]), "OK");
        let to = *masters.iter().find(|&&m| m != owner).unwrap();
        let slot = cluster.slot("k{a}");
        cluster.move_slot(slot, owner, to, || {});
        assert_eq!(cluster.owner_of("k{a}"), to);
        assert_eq!(cluster.node(to).cli(&["GET", "k{a}"]), "1");
    }
}
