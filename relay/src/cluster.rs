//! Redis Cluster for the relay (`--redis-cluster`): a slot map learnt from `CLUSTER SLOTS`, one
//! pipelined [`RedisPool`] per master, and requests split by node.
//!
//! # Routing
//! Every command of a request body is routed by the hash slot of its keys ([`key_slot`]); a
//! command whose keys fall in different slots is refused before anything is sent. Keyless
//! commands (PING, TIME, PUBLISH, EVAL with no keys) go with the body's first keyed command, or
//! to any master. `SCRIPT LOAD` and `SCRIPT EXISTS` go to every master, so that an EVALSHA
//! finds its script wherever its keys live. `SCAN` walks one node's keys only and is refused.
//!
//! A body's commands are grouped per master, the groups are sent at the same time (each one
//! pipelined on its master's pool), and the replies are put back in the body's order.
//!
//! # Redirects and topology
//! A `-MOVED slot host:port` reply points the slot at its new master at once, schedules a full
//! refresh of the map, and sends the command again there; `-ASK` sends it again once, after
//! `ASKING`, to the importing node; `-TRYAGAIN` (a multi-key command during a migration) waits a
//! moment and sends it again. At most [`MAX_ROUNDS`] sends per command: a command still
//! redirected after that is answered with the last redirect, as Redis answered it.
//!
//! The map is refreshed from any node that answers (the known masters and replicas first, then
//! the seeds): after a redirect, after a master failed a request (during a failover, until the
//! promoted replica is in the map), and when it is older than the refresh interval. A request
//! that reaches a failed master fails like a request to a single unreachable Redis (502 or
//! 504); the ones after the promotion is known succeed, without a restart.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use redis_protocol::resp2::types::OwnedFrame;

use crate::pool::{
    encode_command, reply_len, CommandInfo, PoolError, PoolErrorKind, RedisEndpoint, RedisPool,
};
use crate::tls::RedisTls;

/// Redis Cluster's hash slots.
pub const SLOTS: usize = 16384;
/// Sends of one command at most: the first, then redirects.
pub const MAX_ROUNDS: usize = 4;
/// How often the slot map is refreshed when nothing else asks for it.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);
/// Refreshes asked for by errors and redirects are at least this far apart.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long a `-TRYAGAIN` command waits before it is sent again.
const TRYAGAIN_WAIT: Duration = Duration::from_millis(25);
const NO_NODE: u16 = u16::MAX;

// ---------------------------------------------------------------------------------------------
// Hash slots

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys
/// with, as a 256-entry table built at compile time.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The hash slot of `key`: of its hash tag (the bytes between the first `{` and the first `}`
/// after it) when the tag is not empty, else of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// Where one command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The master serving this slot.
    Slot(u16),
    /// Any master: the command touches no key.
    Any,
    /// Every master, replies combined ([`Broadcast`]).
    Every(Broadcast),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broadcast {
    /// SCRIPT LOAD: the same SHA1 from every master.
    ScriptLoad,
    /// SCRIPT EXISTS: a script exists when every master has it.
    ScriptExists,
}

/// The commands whose only key is their first argument.
const FIRST_ARG_KEY: &[&str] = &[
    "GET",
    "SET",
    "EXPIRE",
    "PEXPIRE",
    "TTL",
    "PTTL",
    "HGET",
    "HSET",
    "HGETALL",
    "HDEL",
    "INCR",
    "INCRBY",
    "DECR",
    "ZADD",
    "ZREM",
    "ZRANGE",
    "ZCARD",
    "ZREMRANGEBYSCORE",
    "SADD",
    "SREM",
    "SMEMBERS",
    "SCARD",
    "XADD",
    "GETEX",
    "PSETEX",
    "SETEX",
];
/// The commands whose every argument is a key.
const ALL_ARGS_KEYS: &[&str] = &["DEL", "UNLINK", "EXISTS", "MGET"];
/// The commands that touch no key.
const KEYLESS: &[&str] = &["PING", "TIME", "PUBLISH"];

/// Where `cmd` (parsed from `body`) goes, or why it cannot go anywhere in a cluster.
pub fn route(cmd: &CommandInfo, body: &[u8]) -> Result<Target, String> {
    let name = cmd.name.as_str();
    let key = |i: usize| {
        cmd.arg(body, i)
            .ok_or_else(|| format!("{name} without its key"))
    };
    let keys: Vec<&[u8]> = if FIRST_ARG_KEY.contains(&name) {
        vec![key(0)?]
    } else if ALL_ARGS_KEYS.contains(&name) {
        (0..cmd.args).map(key).collect::<Result<_, _>>()?
    } else if name == "EVAL" || name == "EVALSHA" {
        let numkeys = cmd
            .arg(body, 1)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| format!("{name} without a key count"))?;
        if numkeys + 2 > cmd.args {
            return Err(format!(
                "{name} names {numkeys} keys but has {} arguments",
                cmd.args
            ));
        }
        (2..2 + numkeys).map(key).collect::<Result<_, _>>()?
    } else if KEYLESS.contains(&name) {
        Vec::new()
    } else if name == "SCRIPT" {
        return match cmd.subcommand.as_deref() {
            Some("LOAD") => Ok(Target::Every(Broadcast::ScriptLoad)),
            Some("EXISTS") => Ok(Target::Every(Broadcast::ScriptExists)),
            _ => Err("SCRIPT without LOAD or EXISTS".into()),
        };
    } else if name == "SCAN" {
        return Err(
            "SCAN walks the keys of one node only, so the relay does not route it in a cluster"
                .into(),
        );
    } else {
        return Err(format!(
            "the relay does not know where {name}'s keys are, so it cannot route it in a cluster"
        ));
    };
    let mut slots = keys.iter().map(|k| key_slot(k));
    let Some(first) = slots.next() else {
        return Ok(Target::Any);
    };
    match slots.find(|&s| s != first) {
        None => Ok(Target::Slot(first)),
        Some(other) => Err(format!(
            "{name}'s keys are in hash slots {first} and {other}: in a Redis Cluster one command's keys must share a slot (give them one {{hash tag}})"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The slot map

/// One master in the map, with its pool.
#[derive(Clone)]
struct Node {
    host: String,
    port: u16,
    id: String,
    replicas: Vec<(String, u16)>,
    pool: RedisPool,
    /// Whether its last request succeeded.
    up: Arc<AtomicBool>,
}

impl Node {
    fn addr(&self) -> String {
        crate::HostPort(&self.host, self.port).to_string()
    }
}

/// Who serves each slot.
struct Topology {
    /// Per slot, an index into `nodes`, or [`NO_NODE`].
    slots: Vec<u16>,
    nodes: Vec<Node>,
    /// When it was read from the cluster; `None` before the first read.
    fetched: Option<Instant>,
    /// Per node, how many slots it serves: counted once per map, not per request.
    slot_counts: Vec<usize>,
}

impl Topology {
    fn empty() -> Topology {
        Topology::new(vec![NO_NODE; SLOTS], Vec::new(), None)
    }

    fn new(slots: Vec<u16>, nodes: Vec<Node>, fetched: Option<Instant>) -> Topology {
        let mut slot_counts = vec![0; nodes.len()];
        for &n in &slots {
            if let Some(count) = slot_counts.get_mut(usize::from(n)) {
                *count += 1;
            }
        }
        Topology {
            slots,
            nodes,
            fetched,
            slot_counts,
        }
    }

    fn covered(&self) -> usize {
        self.slot_counts.iter().sum()
    }

    fn node_of(&self, slot: u16) -> Option<usize> {
        match self.slots[usize::from(slot)] {
            NO_NODE => None,
            n => Some(usize::from(n)),
        }
    }

    fn find(&self, host: &str, port: u16) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.host == host && n.port == port)
    }
}

/// One slot range of a `CLUSTER SLOTS` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotRange {
    first: u16,
    last: u16,
    master: (String, u16, String),
    replicas: Vec<(String, u16)>,
}

/// Reads a `CLUSTER SLOTS` reply. A node whose address is empty or NULL is at `asked_host`, the
/// host the reply came from; one whose address is unknown (`?`) is left out.
fn parse_slots(raw: &[u8], asked_host: &str) -> Result<Vec<SlotRange>, String> {
    let (frame, _) = redis_protocol::resp2::decode::decode(&Bytes::copy_from_slice(raw))
        .map_err(|e| format!("CLUSTER SLOTS reply: {e:?}"))?
        .ok_or("CLUSTER SLOTS reply is incomplete")?;
    let ranges = match frame {
        OwnedFrame::Array(ranges) => ranges,
        OwnedFrame::Error(e) => return Err(format!("CLUSTER SLOTS: {e}")),
        other => return Err(format!("CLUSTER SLOTS answered {other:?}")),
    };
    let int = |f: &OwnedFrame| match f {
        OwnedFrame::Integer(i) => Some(*i),
        _ => None,
    };
    let text = |f: &OwnedFrame| match f {
        OwnedFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        OwnedFrame::SimpleString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        OwnedFrame::Null => Some(String::new()),
        _ => None,
    };
    let node = |f: &OwnedFrame| -> Option<(String, u16, String)> {
        let OwnedFrame::Array(parts) = f else {
            return None;
        };
        let host = text(parts.first()?)?;
        let port = u16::try_from(int(parts.get(1)?)?).ok()?;
        let id = parts.get(2).and_then(text).unwrap_or_default();
        let host = match host.as_str() {
            "" => asked_host.to_string(),
            "?" => return None,
            _ => host,
        };
        Some((host, port, id))
    };
    let mut out = Vec::new();
    for range in &ranges {
        let OwnedFrame::Array(parts) = range else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let bound = |i: usize| {
            parts
                .get(i)
                .and_then(int)
                .and_then(|v| u16::try_from(v).ok())
                .filter(|&v| usize::from(v) < SLOTS)
                .ok_or("CLUSTER SLOTS: a range without its slot numbers")
        };
        let (first, last) = (bound(0)?, bound(1)?);
        let Some(master) = parts.get(2).and_then(node) else {
            continue;
        };
        let replicas = parts[3.min(parts.len())..]
            .iter()
            .filter_map(node)
            .map(|(h, p, _)| (h, p))
            .collect();
        out.push(SlotRange {
            first,
            last,
            master,
            replicas,
        });
    }
    Ok(out)
}

/// Reads `--redis-cluster`: `HOST:PORT[,HOST:PORT…]`, or
/// `redis[s]://[[USER]:PASSWORD@]HOST:PORT,HOST:PORT…` with one login (and TLS) for every node.
/// `password` (from a file) is the password when given. Returns the login (the first seed's
/// endpoint) and the seeds. A database number is refused: a cluster has database 0 only.
pub fn parse_seeds(
    text: &str,
    password: Option<String>,
) -> Result<(RedisEndpoint, Vec<(String, u16)>), crate::pool::EndpointError> {
    let (login, seeds) = parse_node_list(text, password)?;
    if login.db.is_some() {
        return Err(crate::pool::EndpointError {
            url: crate::redis_url::redact_url(text),
            reason: "a database number: a Redis Cluster has database 0 only".into(),
        });
    }
    Ok((login, seeds))
}

/// Reads a list of nodes with one login: `HOST:PORT[,HOST:PORT…]`, or
/// `redis[s]://[[USER]:PASSWORD@]HOST:PORT,HOST:PORT…[/DB]` (the database, if any, after the
/// last node). Returns the login (the first node's endpoint, with the database) and the nodes.
pub fn parse_node_list(
    text: &str,
    password: Option<String>,
) -> Result<(RedisEndpoint, Vec<(String, u16)>), crate::pool::EndpointError> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => ("redis://".to_string(), text),
    };
    let (login, hosts) = match rest.rsplit_once('@') {
        Some((login, hosts)) => (format!("{login}@"), hosts),
        None => (String::new(), rest),
    };
    let fail = |reason: &str| crate::pool::EndpointError {
        url: crate::redis_url::redact_url(text),
        reason: reason.to_string(),
    };
    let mut first: Option<RedisEndpoint> = None;
    let mut nodes = Vec::new();
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    for (i, host) in hosts.iter().enumerate() {
        if host.is_empty() {
            return Err(fail("an empty node; expected HOST:PORT[,HOST:PORT…]"));
        }
        let url = format!("{scheme}{login}{host}");
        let endpoint = match &password {
            None => RedisEndpoint::from_url(&url)?,
            Some(p) => RedisEndpoint::from_url_and_password(&url, p.clone())?,
        };
        if endpoint.db.is_some() && i + 1 < hosts.len() {
            return Err(fail("a database number goes after the last HOST:PORT"));
        }
        nodes.push((endpoint.host.clone(), endpoint.port));
        match &mut first {
            None => first = Some(endpoint),
            Some(login) => login.db = endpoint.db,
        }
    }
    match first {
        Some(login) => Ok((login, nodes)),
        None => Err(fail("no nodes; expected HOST:PORT[,HOST:PORT…]")),
    }
}

// ---------------------------------------------------------------------------------------------
// The pool

/// Where a cluster is and how to log in to its nodes.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Nodes to learn the map from (`host`, `port`).
    pub seeds: Vec<(String, u16)>,
    /// User, password, TLS and connect timeout for every node; its host and port are unused.
    pub login: RedisEndpoint,
    pub tls: Option<RedisTls>,
    /// Connections per master.
    pub connections: usize,
    /// How old the map may get before a request refreshes it.
    pub refresh: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seeds: Vec<String> = crate::addresses(&self.seeds);
        f.debug_struct("ClusterConfig")
            .field("seeds", &seeds)
            .field("login", &self.login)
            .field("tls", &self.tls)
            .field("connections", &self.connections)
            .field("refresh", &self.refresh)
            .finish()
    }
}

#[derive(Default)]
struct ClusterCounters {
    moved: AtomicU64,
    ask: AtomicU64,
    tryagain: AtomicU64,
    refresh_ok: AtomicU64,
    refresh_failed: AtomicU64,
}

/// A cheap-to-clone handle on a Redis Cluster: the slot map and a pool per master. Like
/// [`RedisPool`], its connections live on the runtime that first uses them.
#[derive(Clone)]
pub struct ClusterPool {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    config: ClusterConfig,
    map: RwLock<Arc<Topology>>,
    /// One refresh at a time; holds when the last one ended.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
    next_any: AtomicUsize,
    counters: ClusterCounters,
}

/// What [`ClusterPool::ready`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub masters: Vec<MasterState>,
    pub slots_covered: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterState {
    pub addr: String,
    /// Its cluster node id (empty when only a redirect named it).
    pub id: String,
    pub slots: usize,
    pub replicas: usize,
    /// `None` when it answered PING, else why not.
    pub error: Option<String>,
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster: {}/{SLOTS} slots covered by {} masters",
            self.slots_covered,
            self.masters.len()
        )?;
        for m in &self.masters {
            write!(
                f,
                "\n  {} ({} slots, {} replicas): {}",
                m.addr,
                m.slots,
                m.replicas,
                m.error.as_deref().unwrap_or("ok")
            )?;
        }
        Ok(())
    }
}

impl ClusterState {
    pub fn healthy(&self) -> bool {
        self.slots_covered == SLOTS && self.masters.iter().all(|m| m.error.is_none())
    }
}

impl ClusterPool {
    /// A pool for the cluster `config` names. Nothing connects until the first call.
    pub fn new(config: ClusterConfig) -> ClusterPool {
        ClusterPool {
            inner: Arc::new(ClusterInner {
                config,
                map: RwLock::new(Arc::new(Topology::empty())),
                refreshing: tokio::sync::Mutex::new(None),
                next_any: AtomicUsize::new(0),
                counters: ClusterCounters::default(),
            }),
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    fn map(&self) -> Arc<Topology> {
        self.inner
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_map(&self, topology: Topology) {
        *self.inner.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(topology);
    }

    fn error(&self, kind: PoolErrorKind, detail: impl Into<String>) -> PoolError {
        let seeds: Vec<String> = crate::addresses(&self.inner.config.seeds);
        PoolError::at(kind, format!("cluster {}", seeds.join(",")), detail)
    }

    fn node_pool(&self, host: &str, port: u16, connections: usize) -> RedisPool {
        let mut endpoint = self.inner.config.login.clone();
        endpoint.host = host.to_string();
        endpoint.port = port;
        endpoint.db = None;
        match &self.inner.config.tls {
            Some(tls) => RedisPool::with_tls(endpoint, connections, tls.clone()),
            None => RedisPool::new(endpoint, connections),
        }
    }

    /// The map, read from the cluster first when it never was.
    async fn loaded_map(&self, deadline: Instant) -> Result<Arc<Topology>, PoolError> {
        let map = self.map();
        if map.fetched.is_some() {
            if map
                .fetched
                .is_some_and(|at| at.elapsed() > self.inner.config.refresh)
            {
                self.refresh_soon();
            }
            return Ok(map);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.refresh(true)).await {
            Ok(Ok(())) => Ok(self.map()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.error(
                PoolErrorKind::Timeout,
                format!("no slot map within {wait:?}"),
            )),
        }
    }

    /// Refreshes the map in the background (at most every [`MIN_REFRESH_GAP`]).
    fn refresh_soon(&self) {
        let pool = self.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                let _ = pool.refresh(false).await;
            });
        }
    }

    /// Reads `CLUSTER SLOTS` from the first node that answers: the known masters, their
    /// replicas, then the seeds. Without `force`, does nothing when a refresh ended less than
    /// [`MIN_REFRESH_GAP`] ago or one is running (that one will do).
    async fn refresh(&self, force: bool) -> Result<(), PoolError> {
        let mut last = match self.inner.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(_) if !force => return Ok(()),
            Err(_) => {
                // Someone else is reading the map: wait for theirs.
                let guard = self.inner.refreshing.lock().await;
                if self.map().fetched.is_some() {
                    return Ok(());
                }
                guard
            }
        };
        if !force && last.is_some_and(|at| at.elapsed() < MIN_REFRESH_GAP) {
            return Ok(());
        }
        let old = self.map();
        let mut candidates: Vec<(String, u16)> = Vec::new();
        for n in &old.nodes {
            candidates.push((n.host.clone(), n.port));
        }
        for n in &old.nodes {
            candidates.extend(n.replicas.iter().cloned());
        }
        candidates.extend(self.inner.config.seeds.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|c| seen.insert(c.clone()));
        let timeout = self.inner.config.login.connect_timeout;
        let mut last_error = None;
        let ask = encode_command(&["CLUSTER", "SLOTS"]);
        for (host, port) in candidates {
            let pool = match old.find(&host, port) {
                Some(i) => old.nodes[i].pool.clone(),
                None => self.node_pool(&host, port, 1),
            };
            let reply = match pool.call_raw(ask.clone(), 1, timeout).await {
                Ok(reply) => reply,
                Err(e) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            };
            match parse_slots(&reply, &host) {
                Ok(ranges) if !ranges.is_empty() => {
                    self.set_map(self.build(&old, &ranges));
                    *last = Some(Instant::now());
                    self.inner
                        .counters
                        .refresh_ok
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(_) => last_error = Some(format!("{host}:{port} knows no slots")),
                Err(e) => last_error = Some(format!("{host}:{port}: {e}")),
            }
        }
        *last = Some(Instant::now());
        self.inner
            .counters
            .refresh_failed
            .fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "no node answered CLUSTER SLOTS (last: {})",
            last_error.unwrap_or_else(|| "no nodes to ask".into())
        );
        tracing::warn!(error = %detail, "redis cluster slot map not refreshed");
        Err(self.error(PoolErrorKind::Unreachable, detail))
    }

    /// A map from `ranges`, keeping the pools of masters already known.
    fn build(&self, old: &Topology, ranges: &[SlotRange]) -> Topology {
        let mut map = Topology::empty();
        map.fetched = Some(Instant::now());
        for r in ranges {
            let (host, port, id) = &r.master;
            let i = match map.find(host, *port) {
                Some(i) => i,
                None => {
                    let (pool, up) = match old.find(host, *port) {
                        Some(o) => (old.nodes[o].pool.clone(), old.nodes[o].up.clone()),
                        None => (
                            self.node_pool(host, *port, self.inner.config.connections),
                            Arc::new(AtomicBool::new(true)),
                        ),
                    };
                    map.nodes.push(Node {
                        host: host.clone(),
                        port: *port,
                        id: id.clone(),
                        replicas: Vec::new(),
                        pool,
                        up,
                    });
                    map.nodes.len() - 1
                }
            };
            for replica in &r.replicas {
                if !map.nodes[i].replicas.contains(replica) {
                    map.nodes[i].replicas.push(replica.clone());
                }
            }
            for slot in r.first..=r.last {
                map.slots[usize::from(slot)] = i as u16;
            }
        }
        self.keep_live_owners(old, &mut map);
        Topology::new(map.slots, map.nodes, map.fetched)
    }

    /// Right after a failover, a node that has not heard of it yet still names the failed
    /// master. A slot the new map gives to a master whose last request failed, while the old
    /// map gives it to another master whose last request succeeded, keeps the old owner: a
    /// late view must not send traffic back to a dead master. A redirect corrects a kept
    /// owner that is wrong.
    fn keep_live_owners(&self, old: &Topology, map: &mut Topology) {
        for slot in 0..SLOTS {
            let (Some(new), Some(was)) = (map.node_of(slot as u16), old.node_of(slot as u16))
            else {
                continue;
            };
            let (new_node, old_node) = (&map.nodes[new], &old.nodes[was]);
            let same = new_node.host == old_node.host && new_node.port == old_node.port;
            if same || new_node.up.load(Ordering::Relaxed) || !old_node.up.load(Ordering::Relaxed) {
                continue;
            }
            let keep = match map.find(&old_node.host, old_node.port) {
                Some(i) => i,
                None => {
                    map.nodes.push(old_node.clone());
                    map.nodes.len() - 1
                }
            };
            map.slots[slot] = keep as u16;
        }
    }

    /// The masters that serve slots.
    fn serving(map: &Topology) -> Vec<Node> {
        map.nodes
            .iter()
            .zip(&map.slot_counts)
            .filter(|(_, &count)| count > 0)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The node at `host:port`, added to the map (serving no slot yet) when it is new: an ASK
    /// may name an importing node the map has not seen.
    fn node_at(&self, host: &str, port: u16) -> Node {
        let mut guard = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = guard.find(host, port) {
            return guard.nodes[i].clone();
        }
        let node = Node {
            host: host.to_string(),
            port,
            id: String::new(),
            replicas: Vec::new(),
            pool: self.node_pool(host, port, self.inner.config.connections),
            up: Arc::new(AtomicBool::new(true)),
        };
        let old = guard.clone();
        let mut nodes = old.nodes.clone();
        nodes.push(node.clone());
        *guard = Arc::new(Topology::new(old.slots.clone(), nodes, old.fetched));
        node
    }

    /// A node for a keyless command: the node of the body's first keyed command, else the next
    /// master round robin.
    fn any_node(&self, map: &Topology, routes: &[Target]) -> Option<Node> {
        let keyed = routes.iter().find_map(|t| match t {
            Target::Slot(s) => map.node_of(*s),
            _ => None,
        });
        if let Some(n) = keyed {
            return Some(map.nodes[n].clone());
        }
        let serving = Self::serving(map);
        (!serving.is_empty()).then(|| {
            serving[self.inner.next_any.fetch_add(1, Ordering::Relaxed) % serving.len()].clone()
        })
    }

    /// Like [`ClusterPool::call_parsed`] for a caller that has not parsed the body (host-shim's
    /// `proxy_redis_call`): parsed here, once; a body that is not RESP commands, or holds one
    /// that cannot run on a shared connection, is refused before anything is sent.
    pub async fn call(&self, body: Bytes, timeout: Duration) -> Result<Bytes, PoolError> {
        let parsed = crate::pool::parse_commands(&body)
            .map_err(|e| self.error(PoolErrorKind::InvalidRequest, e.to_string()))?;
        if let Some(why) = crate::pool::unshareable(&parsed) {
            return Err(self.error(PoolErrorKind::InvalidRequest, why));
        }
        self.call_parsed(body, &parsed, timeout).await
    }

    /// Sends the commands of `body` (parsed as `parsed`) to the masters serving their keys and
    /// returns one reply per command, in the body's order. `timeout` covers everything,
    /// redirects included. A command refused by routing ([`route`]) refuses the whole body
    /// before anything is sent.
    pub async fn call_parsed(
        &self,
        body: Bytes,
        parsed: &[CommandInfo],
        timeout: Duration,
    ) -> Result<Bytes, PoolError> {
        let deadline = Instant::now() + timeout;
        if let Some(why) = crate::pool::unshareable(parsed) {
            return Err(self.error(PoolErrorKind::InvalidRequest, why));
        }
        let routes: Vec<Target> = parsed
            .iter()
            .enumerate()
            .map(|(i, c)| {
                route(c, &body).map_err(|e| {
                    self.error(
                        PoolErrorKind::InvalidRequest,
                        format!("command {}: {e}", i + 1),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let map = self.loaded_map(deadline).await?;
        let mut replies: Vec<Option<Bytes>> = vec![None; parsed.len()];
        let mut broadcasts = Vec::new();
        let mut sends: Vec<(usize, Node, bool)> = Vec::new();
        for (i, target) in routes.iter().enumerate() {
            let node = match target {
                Target::Slot(slot) => map.node_of(*slot).map(|n| map.nodes[n].clone()),
                Target::Any => self.any_node(&map, &routes),
                Target::Every(kind) => {
                    broadcasts.push((i, *kind));
                    continue;
                }
            };
            match node {
                Some(node) => sends.push((i, node, false)),
                None => {
                    let reply = match target {
                        Target::Slot(slot) => format!(
                            "-CLUSTERDOWN the relay knows no master for hash slot {slot}\r\n"
                        ),
                        _ => "-CLUSTERDOWN the relay knows no master\r\n".to_string(),
                    };
                    replies[i] = Some(Bytes::from(reply));
                }
            }
        }
        let everywhere = join_all(
            broadcasts
                .iter()
                .map(|(i, kind)| self.broadcast(&map, &body, &parsed[*i], *kind, deadline)),
        );
        let (first, everywhere) =
            tokio::join!(self.round(&body, parsed, sends, deadline), everywhere);
        for ((i, _), reply) in broadcasts.iter().zip(everywhere) {
            replies[*i] = Some(reply?);
        }
        let mut round = first?;
        let mut sent = 1;
        loop {
            let mut again = Vec::new();
            let mut wait = false;
            for (i, node, reply) in round {
                let redirect = match sent < MAX_ROUNDS {
                    true => Redirect::of(&reply),
                    false => None,
                };
                match redirect {
                    None => replies[i] = Some(reply),
                    Some(Redirect::Moved { slot, host, port }) => {
                        self.inner.counters.moved.fetch_add(1, Ordering::Relaxed);
                        again.push((i, self.moved(slot, &host, port), false));
                        self.refresh_soon();
                    }
                    Some(Redirect::Ask { host, port, .. }) => {
                        self.inner.counters.ask.fetch_add(1, Ordering::Relaxed);
                        again.push((i, self.node_at(&host, port), true));
                    }
                    Some(Redirect::TryAgain) => {
                        self.inner.counters.tryagain.fetch_add(1, Ordering::Relaxed);
                        again.push((i, node, false));
                        wait = true;
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            if wait && Instant::now() + TRYAGAIN_WAIT < deadline {
                tokio::time::sleep(TRYAGAIN_WAIT).await;
            }
            round = self.round(&body, parsed, again, deadline).await?;
            sent += 1;
        }
        let mut out = BytesMut::new();
        for reply in replies.into_iter().flatten() {
            out.extend_from_slice(&reply);
        }
        Ok(out.freeze())
    }

    /// Points `slot` at `host:port` after a MOVED, adding the node when it is new.
    fn moved(&self, slot: u16, host: &str, port: u16) -> Node {
        let node = self.node_at(host, port);
        let mut guard = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = guard.find(host, port) {
            let old = guard.clone();
            let mut slots = old.slots.clone();
            slots[usize::from(slot)] = i as u16;
            *guard = Arc::new(Topology::new(slots, old.nodes.clone(), old.fetched));
        }
        node
    }

    /// One send of `sends` (command index, node, preceded by ASKING): one pipelined call per
    /// node, all at once. Each command's reply comes back with the node that gave it. A node
    /// that fails fails the whole send, and the map is refreshed in case it is gone.
    async fn round(
        &self,
        body: &Bytes,
        parsed: &[CommandInfo],
        sends: Vec<(usize, Node, bool)>,
        deadline: Instant,
    ) -> Result<Vec<(usize, Node, Bytes)>, PoolError> {
        let mut groups: BTreeMap<String, (Node, Vec<(usize, bool)>)> = BTreeMap::new();
        for (i, node, asking) in sends {
            groups
                .entry(node.addr())
                .or_insert_with(|| (node, Vec::new()))
                .1
                .push((i, asking));
        }
        let calls = groups.into_values().map(|(node, commands)| async move {
            let mut out = BytesMut::new();
            let mut count = 0;
            for &(i, asking) in &commands {
                if asking {
                    out.extend_from_slice(ASKING);
                    count += 1;
                }
                out.extend_from_slice(&body[parsed[i].span.clone()]);
                count += 1;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            // Parsed and checked once, in `call_parsed`.
            let result = node.pool.send(out.freeze(), count, wait).await;
            (node, commands, result)
        });
        let mut out = Vec::new();
        let mut failed = None;
        for (node, commands, result) in join_all(calls).await {
            let replies = match result {
                Ok(replies) => replies,
                Err(e) => {
                    node.up.store(false, Ordering::Relaxed);
                    failed.get_or_insert(e);
                    continue;
                }
            };
            node.up.store(true, Ordering::Relaxed);
            let mut at = 0;
            let mut next = || -> Result<Bytes, PoolError> {
                let n = reply_len(&replies[at..])
                    .ok()
                    .flatten()
                    .ok_or_else(|| self.error(PoolErrorKind::Protocol, "a reply cut short"))?;
                let reply = replies.slice(at..at + n);
                at += n;
                Ok(reply)
            };
            for (i, asking) in commands {
                if asking {
                    next()?;
                }
                out.push((i, node.clone(), next()?));
            }
        }
        match failed {
            Some(e) => {
                self.refresh_soon();
                Err(e)
            }
            None => Ok(out),
        }
    }

    /// Sends one command to every master and combines their replies: SCRIPT LOAD answers the
    /// SHA1 when every master loaded it, SCRIPT EXISTS says 1 for a script every master has.
    /// An error reply from any master is the answer.
    async fn broadcast(
        &self,
        map: &Topology,
        body: &Bytes,
        cmd: &CommandInfo,
        kind: Broadcast,
        deadline: Instant,
    ) -> Result<Bytes, PoolError> {
        let masters = Self::serving(map);
        if masters.is_empty() {
            return Ok(Bytes::from_static(
                b"-CLUSTERDOWN the relay knows no master\r\n",
            ));
        }
        let command = body.slice(cmd.span.clone());
        let wait = deadline.saturating_duration_since(Instant::now());
        let replies = join_all(
            masters
                .iter()
                .map(|m| m.pool.send(command.clone(), 1, wait)),
        )
        .await;
        let mut answers = Vec::new();
        for (m, reply) in masters.iter().zip(replies) {
            match reply {
                Ok(r) => {
                    m.up.store(true, Ordering::Relaxed);
                    answers.push(r);
                }
                Err(e) => {
                    m.up.store(false, Ordering::Relaxed);
                    self.refresh_soon();
                    return Err(e);
                }
            }
        }
        if let Some(error) = answers.iter().find(|r| r.first() == Some(&b'-')) {
            return Ok(error.clone());
        }
        match kind {
            Broadcast::ScriptLoad => Ok(answers.swap_remove(0)),
            Broadcast::ScriptExists => {
                let mut all: Option<Vec<bool>> = None;
                for answer in &answers {
                    let flags = exists_flags(answer).ok_or_else(|| {
                        self.error(PoolErrorKind::Protocol, "SCRIPT EXISTS answered no array")
                    })?;
                    all = Some(match all {
                        None => flags,
                        Some(prev) => prev.iter().zip(&flags).map(|(a, b)| *a && *b).collect(),
                    });
                }
                let all = all.unwrap_or_default();
                let mut out = format!("*{}\r\n", all.len());
                for flag in all {
                    out.push_str(if flag { ":1\r\n" } else { ":0\r\n" });
                }
                Ok(Bytes::from(out))
            }
        }
    }

    /// The map (refreshed now) and whether every master answers PING within `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<ClusterState, PoolError> {
        let deadline = Instant::now() + timeout;
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.refresh(true)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(self.error(
                    PoolErrorKind::Timeout,
                    format!("no slot map within {wait:?}"),
                ))
            }
        }
        let map = self.map();
        let masters = Self::serving(&map);
        let wait = deadline.saturating_duration_since(Instant::now());
        let pings = join_all(masters.iter().map(|m| m.pool.ping(wait))).await;
        let states = masters
            .iter()
            .zip(pings)
            .map(|(m, ping)| {
                let index = map.find(&m.host, m.port);
                MasterState {
                    addr: m.addr(),
                    id: m.id.clone(),
                    slots: index.map_or(0, |i| map.slot_counts[i]),
                    replicas: m.replicas.len(),
                    error: ping.err().map(|e| e.to_string()),
                }
            })
            .collect();
        Ok(ClusterState {
            masters: states,
            slots_covered: map.covered(),
        })
    }

    /// Prometheus lines: the map (masters, slots covered, each master's state) and the
    /// redirect, retry and refresh counters.
    pub fn render_metrics(&self) -> String {
        let map = self.map();
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        out.push_str("# HELP krowoc_relay_cluster_masters Masters serving slots in the relay's slot map.\n# TYPE krowoc_relay_cluster_masters gauge\n");
        let masters = Self::serving(&map);
        out.push_str(&format!("krowoc_relay_cluster_masters {}\n", masters.len()));
        out.push_str("# HELP krowoc_relay_cluster_slots_covered Hash slots with a master in the relay's slot map.\n# TYPE krowoc_relay_cluster_slots_covered gauge\n");
        out.push_str(&format!(
            "krowoc_relay_cluster_slots_covered {}\n",
            map.covered()
        ));
        out.push_str("# HELP krowoc_relay_cluster_node_up Whether the master's last request succeeded.\n# TYPE krowoc_relay_cluster_node_up gauge\n");
        for m in &masters {
            out.push_str(&format!(
                "krowoc_relay_cluster_node_up{{node=\"{}\"}} {}\n",
                m.addr(),
                u8::from(m.up.load(Ordering::Relaxed))
            ));
        }
        out.push_str("# HELP krowoc_relay_cluster_redirects_total Replies that sent a command to another node.\n# TYPE krowoc_relay_cluster_redirects_total counter\n");
        for (kind, value) in [
            ("moved", get(&c.moved)),
            ("ask", get(&c.ask)),
            ("tryagain", get(&c.tryagain)),
        ] {
            out.push_str(&format!(
                "krowoc_relay_cluster_redirects_total{{kind=\"{kind}\"}} {value}\n"
            ));
        }
        out.push_str("# HELP krowoc_relay_cluster_refreshes_total Slot map reads, by result.\n# TYPE krowoc_relay_cluster_refreshes_total counter\n");
        for (result, value) in [
            ("ok", get(&c.refresh_ok)),
            ("failed", get(&c.refresh_failed)),
        ] {
            out.push_str(&format!(
                "krowoc_relay_cluster_refreshes_total{{result=\"{result}\"}} {value}\n"
            ));
        }
        out
    }
}

const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";

/// The flags of a `SCRIPT EXISTS` reply (`*N` of `:0`/`:1`).
fn exists_flags(reply: &[u8]) -> Option<Vec<bool>> {
    let (frame, _) = redis_protocol::resp2::decode::decode(&Bytes::copy_from_slice(reply))
        .ok()
        .flatten()?;
    match frame {
        OwnedFrame::Array(items) => items
            .iter()
            .map(|f| match f {
                OwnedFrame::Integer(i) => Some(*i == 1),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A reply that sends the command elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Redirect {
    Moved { slot: u16, host: String, port: u16 },
    Ask { slot: u16, host: String, port: u16 },
    TryAgain,
}

impl Redirect {
    fn of(reply: &[u8]) -> Option<Redirect> {
        let line = reply.strip_prefix(b"-")?;
        let line = std::str::from_utf8(line).ok()?.trim_end();
        if line.starts_with("TRYAGAIN") {
            return Some(Redirect::TryAgain);
        }
        let mut words = line.split(' ');
        let kind = words.next()?;
        if kind != "MOVED" && kind != "ASK" {
            return None;
        }
        let slot: u16 = words.next()?.parse().ok()?;
        let (host, port) = words.next()?.rsplit_once(':')?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port: u16 = port.parse().ok()?;
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, host, port }),
            _ => Some(Redirect::Ask { slot, host, port }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::parse_commands;

    #[test]
    fn key_slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b""), 0);
    }

    fn routes(cmds: &[&[&str]]) -> Vec<Result<Target, String>> {
        let body: Vec<u8> = cmds
            .iter()
            .flat_map(|c| encode_command(c).to_vec())
            .collect();
        parse_commands(&body)
            .unwrap()
            .iter()
            .map(|c| route(c, &body))
            .collect()
    }

    #[test]
    fn commands_route_by_their_keys() {
        let r = routes(&[
            &["GET", "foo"],
            &["DEL", "{u}a", "{u}b"],
            &["EVALSHA", "abc", "2", "k:{t}:1", "k:{t}:2", "arg"],
            &["EVAL", "return 1", "0"],
            &["PING"],
            &["PUBLISH", "chan", "msg"],
            &["SCRIPT", "LOAD", "return 1"],
            &["SCRIPT", "EXISTS", "abc"],
        ]);
        assert_eq!(r[0], Ok(Target::Slot(12182)));
        assert_eq!(r[1], Ok(Target::Slot(key_slot(b"u"))));
        assert_eq!(r[2], Ok(Target::Slot(key_slot(b"t"))));
        assert_eq!(r[3], Ok(Target::Any));
        assert_eq!(r[4], Ok(Target::Any));
        assert_eq!(r[5], Ok(Target::Any));
        assert_eq!(r[6], Ok(Target::Every(Broadcast::ScriptLoad)));
        assert_eq!(r[7], Ok(Target::Every(Broadcast::ScriptExists)));
    }

    #[test]
    fn keys_in_two_slots_scans_and_unknown_commands_are_refused_saying_why() {
        let r = routes(&[
            &["MGET", "foo", "bar"],
            &["EVALSHA", "abc", "2", "foo", "bar"],
            &["EVALSHA", "abc", "5", "foo"],
            &["SCAN", "0"],
            &["LPUSH", "l", "x"],
        ]);
        let e = r[0].clone().unwrap_err();
        assert!(
            e.contains("slots 12182 and 5061") && e.contains("hash tag"),
            "{e}"
        );
        assert!(r[1].clone().unwrap_err().starts_with("EVALSHA's keys"));
        assert!(r[2].clone().unwrap_err().contains("names 5 keys"));
        assert!(r[3].clone().unwrap_err().contains("one node"));
        assert!(r[4].clone().unwrap_err().contains("LPUSH"));
    }

    #[test]
    fn seeds_are_read_with_one_login() {
        let (login, seeds) = parse_seeds("10.0.0.1:7000, 10.0.0.2:7001", None).unwrap();
        assert_eq!(
            seeds,
            vec![("10.0.0.1".into(), 7000), ("10.0.0.2".into(), 7001)]
        );
        assert!(!login.tls && login.password.is_none());
        let (login, seeds) =
            parse_seeds("rediss://edge:s%3Acret@a.internal:7000,b.internal", None).unwrap();
        assert_eq!(
            seeds,
            vec![("a.internal".into(), 7000), ("b.internal".into(), 6379)]
        );
        assert!(login.tls);
        assert_eq!(login.username.as_deref(), Some("edge"));
        assert_eq!(login.password.as_deref(), Some("s:cret"));
        let (login, _) = parse_seeds("redis://edge@a:1", Some("pw".into())).unwrap();
        assert_eq!(login.password.as_deref(), Some("pw"));
        let e = parse_seeds("redis://:hunter2@a:1/3", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("database 0 only") && !e.contains("hunter2"),
            "{e}"
        );
        let e = parse_seeds("a:1,,b:2", None).unwrap_err().to_string();
        assert!(e.contains("empty node"), "{e}");
        let (login, nodes) = parse_node_list("s1:26379,s2:26379/2", None).unwrap();
        assert_eq!((login.db, nodes.len()), (Some(2), 2));
        let e = parse_node_list("s1:1/2,s2:2", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("after the last"), "{e}");
        assert!(parse_seeds("http://a:1", None).is_err());
    }

    #[test]
    fn cluster_slots_replies_are_read() {
        let raw = b"*2\r\n*4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n*3\r\n$0\r\n\r\n:7003\r\n$2\r\nr1\r\n*3\r\n:5461\r\n:16383\r\n*3\r\n$1\r\n?\r\n:7001\r\n$2\r\nx2\r\n";
        let ranges = parse_slots(raw, "redis-a").unwrap();
        assert_eq!(
            ranges.len(),
            1,
            "the range of an unknown endpoint is left out"
        );
        assert_eq!(ranges[0].first, 0);
        assert_eq!(ranges[0].last, 5460);
        assert_eq!(ranges[0].master, ("127.0.0.1".into(), 7000, "id".into()));
        assert_eq!(ranges[0].replicas, vec![("redis-a".to_string(), 7003)]);
        assert!(
            parse_slots(b"-ERR This instance has cluster support disabled\r\n", "h")
                .unwrap_err()
                .contains("cluster support disabled")
        );
    }

    #[test]
    fn redirects_are_read() {
        assert_eq!(
            Redirect::of(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some(Redirect::Moved {
                slot: 3999,
                host: "127.0.0.1".into(),
                port: 6381
            })
        );
        assert_eq!(
            Redirect::of(b"-ASK 12 [::1]:7000\r\n"),
            Some(Redirect::Ask {
                slot: 12,
                host: "::1".into(),
                port: 7000
            })
        );
        assert_eq!(
            Redirect::of(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"),
            Some(Redirect::TryAgain)
        );
        assert_eq!(Redirect::of(b"-ERR MOVED is not a thing\r\n"), None);
        assert_eq!(Redirect::of(b"+MOVED 1 a:1\r\n"), None);
    }
}
