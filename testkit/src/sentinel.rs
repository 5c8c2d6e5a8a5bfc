//! A real Sentinel-managed Redis on loopback for tests: a master, one replica of it, and three
//! sentinels watching them (quorum 2), every process in its own temp dir, all killed on drop.
//! Detection is fast (`down-after-milliseconds` 1000) so tests can kill the master or ask for a
//! failover and watch the replica take over.
//!
//! ```no_run
//! let mut redis = testkit::sentinel::RedisSentinel::start("krowoc");
//! let before = redis.master();
//! let after = redis.failover(std::time::Duration::from_secs(30));
//! assert_ne!(before, after);
//! assert_eq!(redis.node(after).cli(&["ROLE"]).lines().next(), Some("master"));
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, render_reply, try_command_at, ChildGuard, RedisServer};

/// How long a sentinel waits for an answer before it calls a node down (`down-after-milliseconds`).
pub const DOWN_AFTER_MS: u64 = 1000;

/// `failover-timeout`: also how long a sentinel waits before trying a failed failover again.
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;

const SENTINELS: usize = 3;
const QUORUM: usize = 2;

pub struct RedisSentinel {
    name: String,
    /// The data nodes: 0 starts as the master, 1 as its replica.
    nodes: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

struct SentinelProcess {
    port: u16,
    _dir: tempfile::TempDir,
    _process: ChildGuard,
}

impl SentinelProcess {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// `redis-sentinel` beside redis-server or on PATH; `None` means run `redis-server --sentinel`
/// (the same program: Debian packages the name apart).
fn redis_sentinel_binary() -> Option<PathBuf> {
    let beside = crate::redis_server_binary().with_file_name("redis-sentinel");
    if beside.is_file() {
        return Some(beside);
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("redis-sentinel"))
        .find(|p| p.is_file())
}

impl RedisSentinel {
    /// Starts the master, its replica and three sentinels monitoring it as `name`, and waits
    /// until every sentinel knows the replica and the other two sentinels (so that a failover
    /// can be agreed on at once).
    pub fn start(name: &str) -> RedisSentinel {
        let master = RedisServer::start();
        let replica_args: Vec<String> = ["--replicaof", "127.0.0.1", &master.port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let replica = RedisServer::start_with_args(free_port(), &replica_args);
        let sentinels = (0..SENTINELS)
            .map(|_| start_sentinel(name, master.port))
            .collect();
        let redis = RedisSentinel {
            name: name.to_string(),
            nodes: vec![master, replica],
            sentinels,
        };
        redis.wait_replica_synced(1, Duration::from_secs(30));
        redis.wait_sentinels_agree(Duration::from_secs(30));
        redis
    }

    /// The name the sentinels monitor the master as (`REDIS_SENTINEL_MASTER`).
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:PORT,…` of the sentinels (`REDIS_SENTINEL`).
    pub fn sentinels(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The data node `i` (0: the first master, 1: its replica).
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Runs one command on sentinel `i` and renders the reply as [`RedisServer::cli`] does.
    pub fn sentinel_cli(&self, i: usize, args: &[&str]) -> String {
        let raw = try_command_at(self.sentinels[i].addr(), args)
            .unwrap_or_else(|e| panic!("sentinel {i} {args:?}: {e}"));
        render_reply(&raw)
    }

    /// `SENTINEL MASTER <name>` as seen by sentinel `i`, as field → value.
    pub fn master_state(&self, i: usize) -> HashMap<String, String> {
        let text = self.sentinel_cli(i, &["SENTINEL", "MASTER", &self.name]);
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0].to_string(), pair[1].to_string()))
            .collect()
    }

    /// The port sentinel `i` names for the master now.
    pub fn master_port_by(&self, i: usize) -> Option<u16> {
        let text = self.sentinel_cli(i, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name]);
        text.lines().nth(1)?.parse().ok()
    }

    /// Index of the data node sentinel 0 names as the master now.
    pub fn master(&self) -> usize {
        let port = self.master_port_by(0).expect("sentinel 0 names a master");
        self.index_of(port)
    }

    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data node listens on port {port}"))
    }

    /// `SENTINEL FAILOVER <name>` (retried while the sentinel has no replica it trusts yet),
    /// then waits until every sentinel names the other node and that node says it is master.
    /// Returns the new master's index.
    pub fn failover(&self, timeout: Duration) -> usize {
        let old = self.master();
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.sentinel_cli(0, &["SENTINEL", "FAILOVER", &self.name]);
            if reply == "OK" {
                break;
            }
            assert!(
                Instant::now() < deadline && reply.starts_with("NOGOODSLAVE"),
                "SENTINEL FAILOVER {}: {reply}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let new = 1 - old;
        self.wait_master_is(new, deadline.saturating_duration_since(Instant::now()));
        new
    }

    /// Waits until every sentinel names node `i` as the master and node `i` says it is one.
    pub fn wait_master_is(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let port = self.nodes[i].port;
        loop {
            let named = (0..self.sentinels.len()).all(|s| self.master_port_by(s) == Some(port));
            let role = self.nodes[i]
                .try_command(&["ROLE"])
                .map(|r| render_reply(&r))
                .unwrap_or_default();
            if named && role.lines().next() == Some("master") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} (port {port}) did not become the master in {timeout:?}: role {role:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills data node `i` (SIGKILL); [`RedisSentinel::restart`] brings it back empty.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Waits until data node `i` is a replica whose link to its master is up.
    pub fn wait_replica_synced(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.nodes[i].cli(&["INFO", "replication"]);
            if info.contains("role:slave") && info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} did not sync with its master in {timeout:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every sentinel sees the replica and the other sentinels, and names the same master.
    fn wait_sentinels_agree(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let others = (self.sentinels.len() - 1).to_string();
        loop {
            let states: Vec<HashMap<String, String>> = (0..self.sentinels.len())
                .map(|i| self.master_state(i))
                .collect();
            let ready = states.iter().all(|s| {
                s.get("num-slaves").map(String::as_str) == Some("1")
                    && s.get("num-other-sentinels") == Some(&others)
                    && s.get("flags").map(String::as_str) == Some("master")
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not find the replica and each other in {timeout:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start_sentinel(name: &str, master_port: u16) -> SentinelProcess {
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir for a sentinel");
    // A sentinel rewrites its configuration file as it learns, so each gets its own.
    let conf = dir.path().join("sentinel.conf");
    let text = format!(
        "port {port}\n\
         bind 127.0.0.1\n\
         daemonize no\n\
         loglevel warning\n\
         logfile \"\"\n\
         dir {dir}\n\
         sentinel monitor {name} 127.0.0.1 {master_port} {QUORUM}\n\
         sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {name} 1\n",
        dir = dir.path().display(),
    );
    std::fs::write(&conf, text).expect("write sentinel.conf");
    let mut cmd = match redis_sentinel_binary() {
        Some(bin) => {
            let mut cmd = Command::new(bin);
            cmd.arg(&conf);
            cmd
        }
        None => {
            let mut cmd = Command::new(crate::redis_server_binary());
            cmd.arg(&conf).arg("--sentinel");
            cmd
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
    let process = ChildGuard::spawn("redis-sentinel", &mut cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(reply) = try_command_at(addr, &["PING"]) {
            if reply.starts_with(b"+PONG") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-sentinel on port {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    SentinelProcess {
        port,
        _dir: dir,
        _process: process,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinels_fail_over_to_the_replica_on_request() {
        let redis = RedisSentinel::start("testkit");
        assert_eq!(redis.master(), 0);
        assert_eq!(redis.node(0).cli(&["SET", "k", "v"]), "OK");
        let new = redis.failover(Duration::from_secs(60));
        assert_eq!(new, 1);
        // The promoted replica has the data and takes writes.
        assert_eq!(redis.node(1).cli(&["GET", "k"]), "v");
        assert_eq!(redis.node(1).cli(&["SET", "k", "w"]), "OK");
    }
}
