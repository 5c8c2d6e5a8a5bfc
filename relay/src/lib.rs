//! krowoc-relay: the RESP-over-HTTP relay that lets the filter reach Redis from stock Envoy, a
//! component platform teams deploy beside Envoy (`krowoc-relay --redis … --token-file …`; also
//! `host-shim relay`, the same code). Its Redis pool ([`pool`]) also carries host-shim's Higress
//! `redis_call`s; [`redis_url`] reads Redis URLs and redacts them, for the upstream too.
//!
//! The plugin sends `POST /resp` to the `redis_relay` cluster with one or more RESP commands as
//! the body; the relay checks the token, the size, and every command against its allow-list,
//! sends them on a pooled, pipelined Redis connection ([`crate::pool`]) and answers `200`
//! with the raw replies, concatenated in order. A Redis error reply (`-NOSCRIPT …`) is a normal
//! reply inside the 200. Failures are distinct statuses with a plain-text body naming the
//! problem: 400 malformed RESP, 403 token or command refused, 413 body or command count too
//! large, 502 Redis unreachable (or its TLS refused), 504 Redis timeout. Nothing of a refused request reaches Redis.
//!
//! Also: `GET /ready` (200 when Redis answers PING, else 503 saying why) and `GET /metrics`
//! (Prometheus text: requests, commands, errors by kind).
//!
//! To Redis: `--redis rediss://…` connects over TLS ([`tls`]: `--tls-ca`, and `--tls-cert`
//! with `--tls-key` for mutual TLS), and `--redis-password-file` keeps the password off the
//! command line; the relay should log in as the filter's least-privilege ACL user (README).
//!
//! The relay is not an open proxy: it listens on loopback unless told otherwise, compares the
//! token in constant time, allows only the commands the filter uses ([`FILTER_COMMANDS`]);
//! [`ALWAYS_REFUSED`] commands cannot be allowed at all), and runs only the filter's own Lua
//! scripts ([`scripts`]: `EVAL`, `EVALSHA` and `SCRIPT LOAD` of any other script are refused, so
//! the token does not grant arbitrary Lua, nor a busy script that stalls Redis for everyone).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub mod acl;
pub mod cluster;
pub mod pool;
pub mod process;
pub mod redis_url;
pub mod scripts;
pub mod sentinel;
pub mod tls;

use crate::cluster::{ClusterConfig, ClusterPool};
use crate::pool::{CommandInfo, PoolError, RedisEndpoint, RedisPool};
use crate::scripts::ScriptList;
use crate::sentinel::{SentinelConfig, SentinelPool};
use crate::tls::{RedisTls, TlsFiles};

/// `host:port` as a connect address or a URL authority, an IPv6 literal in brackets
/// (`[::1]:6379`): the one spelling of an address that the pool and host-shim share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort<'a>(pub &'a str, pub u16);

impl fmt::Display for HostPort<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let HostPort(host, port) = *self;
        if host.contains(':') {
            write!(f, "[{host}]:{port}")
        } else {
            write!(f, "{host}:{port}")
        }
    }
}

/// `host:port` of each node, for logs and errors.
pub(crate) fn addresses(nodes: &[(String, u16)]) -> Vec<String> {
    nodes
        .iter()
        .map(|(h, p)| HostPort(h, *p).to_string())
        .collect()
}

/// The header that carries the shared token.
pub const TOKEN_HEADER: &str = "x-krowoc-relay-token";
/// Content type of request and response bodies.
pub const RESP_CONTENT_TYPE: &str = "application/x-resp";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_COMMANDS: usize = 64;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The commands the filter sends: allowed by default.
pub const FILTER_COMMANDS: &[&str] = &[
    "PING",
    "EVALSHA",
    "EVAL",
    "SCRIPT",
    "GET",
    "SET",
    "DEL",
    "UNLINK",
    "EXPIRE",
    "PEXPIRE",
    "TTL",
    "PTTL",
    "MGET",
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
    "PUBLISH",
    "XADD",
    "TIME",
    "EXISTS",
    "SCAN",
    "GETEX",
    "PSETEX",
    "SETEX",
];

/// SCRIPT subcommands the filter needs; FLUSH and KILL are refused.
pub const SCRIPT_SUBCOMMANDS: &[&str] = &["LOAD", "EXISTS"];

/// Refused even when named with `--allow`: they wipe or reconfigure the server, read the whole
/// keyspace, or take over the shared connection (see also
/// [`pool::SHARED_CONNECTION_UNSAFE`], which is refused as well).
pub const ALWAYS_REFUSED: &[&str] = &[
    "FLUSHALL",
    "FLUSHDB",
    "CONFIG",
    "KEYS",
    "DEBUG",
    "SHUTDOWN",
    "MONITOR",
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "CLIENT",
    "REPLICAOF",
    "SLAVEOF",
    "MIGRATE",
    "MODULE",
    "ACL",
    "SYNC",
    "PSYNC",
    "SAVE",
    "BGSAVE",
    "BGREWRITEAOF",
    "SELECT",
    "AUTH",
    "HELLO",
    "QUIT",
    "RESET",
    // Functions are Lua the relay's script list cannot vouch for.
    "FUNCTION",
    "FCALL",
    "FCALL_RO",
];

fn always_refused(name: &str) -> bool {
    ALWAYS_REFUSED.contains(&name) || pool::SHARED_CONNECTION_UNSAFE.contains(&name)
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The relay's flags (`krowoc-relay …`, `host-shim relay …`).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Address to listen on. Loopback by default: put the relay next to Envoy, not on the
    /// internet.
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,
    /// The Redis to relay to: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], or rediss://… for
    /// TLS.
    #[arg(long, default_value = "redis://127.0.0.1:6379", value_name = "URL")]
    pub redis: String,
    /// Relay to a Redis Cluster instead: seed nodes HOST:PORT[,HOST:PORT…], optionally as
    /// redis[s]://[[USER]:PASSWORD@]HOST:PORT,HOST:PORT… for a login and TLS shared by every
    /// node. The relay learns the slot map from them and sends each command to its master.
    #[arg(long, value_name = "SEEDS", conflicts_with_all = ["redis", "redis_sentinel"])]
    pub redis_cluster: Option<String>,
    /// Relay to the master a set of sentinels names: SENTINELS is HOST:PORT[,HOST:PORT…],
    /// optionally as redis[s]://[[USER]:PASSWORD@]HOST:PORT,…[/DB] for the master's login, TLS
    /// and database (the sentinels are asked without a login). Needs --sentinel-master.
    #[arg(
        long,
        value_name = "SENTINELS",
        conflicts_with = "redis",
        requires = "sentinel_master"
    )]
    pub redis_sentinel: Option<String>,
    /// The name the sentinels monitor the master as.
    #[arg(long, value_name = "NAME", requires = "redis_sentinel")]
    pub sentinel_master: Option<String>,
    /// Cluster: how old the slot map may get before it is read again (redirects and failed
    /// masters refresh it sooner).
    #[arg(long, default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub cluster_refresh: Duration,
    /// Read the Redis password from a file (trailing newline removed), keeping it out of `ps`;
    /// the URL may then name the user (redis://USER@HOST) but holds no password.
    #[arg(long, value_name = "PATH")]
    pub redis_password_file: Option<PathBuf>,
    /// TLS (rediss://): trust the CA certificates in this PEM file instead of the system's
    /// trusted roots.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// TLS (rediss://): show this PEM certificate chain to Redis (mutual TLS, Redis's
    /// `tls-auth-clients yes`); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS (rediss://): the PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Shared token the caller must send in the x-krowoc-relay-token header.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Read the token from a file (trailing newline removed), keeping it out of `ps`.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted (bytes); larger is 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES, value_name = "N")]
    pub max_body_bytes: usize,
    /// Most commands accepted in one request; more is 413.
    #[arg(long, default_value_t = DEFAULT_MAX_COMMANDS, value_name = "N")]
    pub max_commands: usize,
    /// Allow a command beyond the filter's own (repeatable). FLUSHALL, CONFIG, KEYS and the
    /// like cannot be allowed.
    #[arg(long = "allow", value_name = "CMD")]
    pub allow: Vec<String>,
    /// Also let this Lua script run (repeatable): the text of another plugin version's script,
    /// during a rolling upgrade. The filter's own scripts are always allowed; others are 403.
    #[arg(long = "allow-script", value_name = "FILE")]
    pub allow_script: Vec<PathBuf>,
    /// How long Redis may take to answer a request (e.g. 1s, 250ms, 0.5s); then 504.
    #[arg(long, default_value = "1s", value_parser = parse_timeout, value_name = "DURATION")]
    pub timeout: Duration,
    /// How long connecting to Redis (TCP, AUTH, SELECT) may take; then 502.
    #[arg(long, default_value = "1s", value_parser = parse_timeout, value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Redis connections shared by all requests (each pipelines many requests).
    #[arg(long, default_value_t = pool::DEFAULT_CONNECTIONS, value_name = "N")]
    pub pool_size: usize,
}

/// Parses a duration flag with humantime: `250ms`, `1s`, `0.5s`, `2m`, `100us`, `1h 30m` or a
/// bare `0`. The error quotes the value and says what is wrong with it. The upstream's flags
/// use it too.
pub fn parse_flag_duration(s: &str) -> Result<Duration, String> {
    use humantime::DurationError;
    let s = s.trim();
    humantime::parse_duration(s).map_err(|e| match e {
        DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("{s:?} has no unit (e.g. 1s, 250ms, 0.5s)")
        }
        DurationError::UnknownUnit { unit, .. } => {
            format!("{s:?} has unknown unit {unit:?} (use us, ms, s, m or h)")
        }
        DurationError::NumberOverflow => {
            format!("{s:?} is out of range or finer than a nanosecond")
        }
        DurationError::Empty => "the duration is empty (e.g. 1s, 250ms, 0.5s)".to_string(),
        other => format!("{s:?} is not a number with a unit, e.g. 1s, 250ms, 0.5s ({other})"),
    })
}

/// The longest `--timeout` and `--connect-timeout`: more than a day is a mistake.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_flag_duration(s)? {
        d if d > MAX_TIMEOUT => Err(format!("{:?} is longer than a day", s.trim())),
        d => Ok(d),
    }
}

/// Which commands the relay lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandPolicy {
    allowed: BTreeSet<String>,
}

impl Default for CommandPolicy {
    fn default() -> Self {
        CommandPolicy::filter_default()
    }
}

impl CommandPolicy {
    /// The commands the filter uses ([`FILTER_COMMANDS`]).
    pub fn filter_default() -> CommandPolicy {
        CommandPolicy {
            allowed: FILTER_COMMANDS.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// Allows one more command (case-insensitive). Refuses names in [`ALWAYS_REFUSED`] and
    /// names that are not a single word.
    pub fn allow(&mut self, name: &str) -> Result<(), String> {
        let upper = name.trim().to_ascii_uppercase();
        if upper.is_empty()
            || !upper.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-' || b == b'|'
            })
        {
            return Err(format!("--allow {name:?}: not a command name"));
        }
        if always_refused(&upper) {
            return Err(format!(
                "--allow {upper}: this command is always refused by the relay (it wipes, reconfigures or scans Redis, or takes over the shared connection)"
            ));
        }
        self.allowed.insert(upper);
        Ok(())
    }

    pub fn allowed(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }

    /// Ok when the command may be sent; else why not.
    pub fn check(&self, cmd: &CommandInfo) -> Result<(), String> {
        if always_refused(&cmd.name) {
            return Err(format!(
                "command {} is refused by the relay",
                printable(&cmd.name)
            ));
        }
        if !self.allowed.contains(&cmd.name) {
            return Err(format!(
                "command {} is not in the relay's allow-list",
                printable(&cmd.name)
            ));
        }
        if cmd.name == "SCRIPT" {
            match cmd.subcommand.as_deref() {
                Some(sub) if SCRIPT_SUBCOMMANDS.contains(&sub) => {}
                Some(sub) => {
                    return Err(format!(
                        "command SCRIPT {} is refused by the relay (only SCRIPT LOAD and SCRIPT EXISTS)",
                        printable(sub)
                    ))
                }
                None => return Err("command SCRIPT without LOAD or EXISTS is refused".into()),
            }
        }
        Ok(())
    }
}

/// A command name safe to echo in a response: at most 64 printable characters.
fn printable(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .take(64)
        .collect();
    if name.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Everything [`serve`] needs.
#[derive(Clone)]
pub struct RelayConfig {
    /// The Redis; with `cluster`, only its login, TLS and connect timeout count.
    pub redis: RedisEndpoint,
    /// Relay to this Redis Cluster instead of `redis`.
    pub cluster: Option<ClusterConfig>,
    /// Relay to the master these sentinels name instead of `redis`.
    pub sentinel: Option<SentinelConfig>,
    /// TLS to Redis, when `redis.tls`; `None` there trusts the system's roots.
    pub tls: Option<RedisTls>,
    /// When set, requests must carry it in [`TOKEN_HEADER`].
    pub token: Option<String>,
    pub max_body_bytes: usize,
    pub max_commands: usize,
    pub commands: CommandPolicy,
    /// The scripts `EVAL`, `EVALSHA` and `SCRIPT LOAD` may name.
    pub scripts: ScriptList,
    /// Per request: how long Redis may take to answer.
    pub timeout: Duration,
    pub pool_size: usize,
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayConfig")
            .field("redis", &self.redis)
            .field("cluster", &self.cluster)
            .field("sentinel", &self.sentinel)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_commands", &self.max_commands)
            .field("commands", &self.commands)
            .field("scripts", &self.scripts.len())
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl RelayConfig {
    /// Defaults for everything but the Redis to talk to: no token, 1 MiB, 64 commands, the
    /// filter's commands and scripts, 1 s, 2 connections.
    pub fn new(redis: RedisEndpoint) -> RelayConfig {
        RelayConfig {
            redis,
            cluster: None,
            sentinel: None,
            tls: None,
            token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_commands: DEFAULT_MAX_COMMANDS,
            commands: CommandPolicy::filter_default(),
            scripts: ScriptList::plugin(),
            timeout: DEFAULT_TIMEOUT,
            pool_size: pool::DEFAULT_CONNECTIONS,
        }
    }

    /// Validates the flags; every error names the flag and the bad value.
    pub fn from_args(args: &RelayArgs) -> anyhow::Result<RelayConfig> {
        let password = match &args.redis_password_file {
            None => None,
            Some(path) => {
                let flag = || format!("--redis-password-file {}", path.display());
                let text = std::fs::read_to_string(path).with_context(flag)?;
                let password = text.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    anyhow::bail!("{}: the file is empty", flag());
                }
                Some(password.to_string())
            }
        };
        let (mut redis, seeds, sentinels) = match (&args.redis_cluster, &args.redis_sentinel) {
            (Some(text), _) => {
                let (login, seeds) =
                    cluster::parse_seeds(text, password).context("--redis-cluster")?;
                (login, Some(seeds), None)
            }
            (None, Some(text)) => {
                let (login, sentinels) =
                    cluster::parse_node_list(text, password).context("--redis-sentinel")?;
                (login, None, Some(sentinels))
            }
            (None, None) => {
                let redis = match password {
                    None => RedisEndpoint::from_url(&args.redis),
                    Some(password) => RedisEndpoint::from_url_and_password(&args.redis, password),
                };
                (redis.context("--redis")?, None, None)
            }
        };
        redis.connect_timeout = args.connect_timeout;
        let files = TlsFiles {
            ca: args.tls_ca.clone(),
            cert: args.tls_cert.clone(),
            key: args.tls_key.clone(),
        };
        if files.any() && !redis.tls {
            anyhow::bail!(
                "--tls-ca, --tls-cert and --tls-key are for TLS: write the --redis URL as rediss://…"
            );
        }
        let tls = match redis.tls {
            true => Some(files.build().context("--redis rediss://")?),
            false => None,
        };
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => {
                let flag = || format!("--token-file {}", path.display());
                let text = std::fs::read_to_string(path).with_context(flag)?;
                let token = text.trim_end_matches(['\r', '\n']);
                if token.is_empty() {
                    anyhow::bail!("{}: the file is empty", flag());
                }
                Some(token.to_string())
            }
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            anyhow::bail!("--token: the token is empty (leave it out to run without one)");
        }
        if args.max_body_bytes == 0 {
            anyhow::bail!("--max-body-bytes 0: must be at least 1");
        }
        if args.max_commands == 0 {
            anyhow::bail!("--max-commands 0: must be at least 1");
        }
        if args.pool_size == 0 || args.pool_size > 64 {
            anyhow::bail!("--pool-size {}: must be from 1 to 64", args.pool_size);
        }
        if args.timeout.is_zero() {
            anyhow::bail!("--timeout 0: must be more than zero");
        }
        let mut commands = CommandPolicy::filter_default();
        for name in &args.allow {
            commands.allow(name).map_err(anyhow::Error::msg)?;
        }
        let mut scripts = ScriptList::plugin();
        for path in &args.allow_script {
            scripts.allow_file(path)?;
        }
        let cluster = seeds.map(|seeds| ClusterConfig {
            seeds,
            login: redis.clone(),
            tls: tls.clone(),
            connections: args.pool_size,
            refresh: args.cluster_refresh,
        });
        let sentinel = match (sentinels, &args.sentinel_master) {
            (Some(sentinels), Some(name)) if !name.trim().is_empty() => Some(SentinelConfig {
                sentinels,
                master_name: name.trim().to_string(),
                login: redis.clone(),
                tls: tls.clone(),
                connections: args.pool_size,
                refresh: sentinel::DEFAULT_REFRESH,
            }),
            (Some(_), _) => anyhow::bail!("--sentinel-master: the master's name is empty"),
            (None, _) => None,
        };
        Ok(RelayConfig {
            redis,
            cluster,
            sentinel,
            tls,
            token,
            max_body_bytes: args.max_body_bytes,
            max_commands: args.max_commands,
            commands,
            scripts,
            timeout: args.timeout,
            pool_size: args.pool_size,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

/// Binds `--listen`, prints `relay listening on ADDR`, and relays until Ctrl-C.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let config = RelayConfig::from_args(&args)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let addr = listener
        .local_addr()
        .context("local address of the listener")?;
    if !addr.ip().is_loopback() && config.token.is_none() {
        tracing::warn!(%addr, "relay listens beyond loopback without a token: anyone who reaches it can use Redis");
    }
    for (sha1, origin) in config.scripts.iter() {
        tracing::debug!(sha1, origin, "script allowed");
    }
    if let Some(tls) = &config.tls {
        tracing::info!(
            trust = tls.trust(),
            client_certificate = tls.has_client_certificate(),
            "redis over TLS"
        );
    }
    match &config.cluster {
        None => {
            tracing::info!(%addr, redis = %config.redis, pool_size = config.pool_size, scripts = config.scripts.len(), "relay ready")
        }
        Some(cluster) => {
            tracing::info!(%addr, cluster = ?cluster.seeds, pool_size = config.pool_size, scripts = config.scripts.len(), "relay ready (redis cluster)")
        }
    }
    if let Some(sentinel) = &config.sentinel {
        tracing::info!(%addr, sentinels = ?sentinel.sentinels, master = %sentinel.master_name, "redis behind sentinel");
    }
    println!("relay listening on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = serve(listener, config) => {}
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for Ctrl-C")?;
            tracing::info!("relay stopping");
        }
        _ = term.recv() => tracing::info!("relay stopping (SIGTERM)"),
    }
    Ok(())
}

/// Serves the relay on an already bound listener until the future is dropped. The Redis pool is
/// created here, on the runtime that runs this future.
pub async fn serve(listener: TcpListener, config: RelayConfig) {
    let relay = Arc::new(Relay::new(config));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment instead of spinning.
                tracing::warn!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let relay = relay.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let relay = relay.clone();
                async move { Ok::<_, Infallible>(relay.handle(req).await) }
            });
            let served = http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "relay connection ended with an error");
            }
        });
    }
}

struct Relay {
    config: RelayConfig,
    backend: Backend,
    metrics: Metrics,
}

/// One Redis, a Redis Cluster, or the master Sentinel names.
enum Backend {
    One(RedisPool),
    Cluster(ClusterPool),
    Sentinel(SentinelPool),
}

/// Why a request was not relayed; each maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Malformed,
    Token,
    Command,
    Script,
    TooLarge,
    Unreachable,
    Tls,
    Timeout,
    Unroutable,
}

impl Failure {
    const ALL: [Failure; 9] = [
        Failure::Malformed,
        Failure::Token,
        Failure::Command,
        Failure::Script,
        Failure::TooLarge,
        Failure::Unreachable,
        Failure::Tls,
        Failure::Timeout,
        Failure::Unroutable,
    ];

    fn status(self) -> StatusCode {
        match self {
            Failure::Malformed | Failure::Unroutable => StatusCode::BAD_REQUEST,
            Failure::Token | Failure::Command | Failure::Script => StatusCode::FORBIDDEN,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::Unreachable | Failure::Tls => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::Token => "token",
            Failure::Command => "command_refused",
            Failure::Script => "script_refused",
            Failure::TooLarge => "too_large",
            Failure::Unreachable => "redis_unreachable",
            Failure::Tls => "redis_tls",
            Failure::Timeout => "redis_timeout",
            Failure::Unroutable => "cluster_unroutable",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    relayed: AtomicU64,
    commands: AtomicU64,
    request_bytes: AtomicU64,
    reply_bytes: AtomicU64,
    errors: [AtomicU64; Failure::ALL.len()],
}

impl Metrics {
    fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        };
        counter(
            "krowoc_relay_requests_total",
            "POST /resp requests received.",
            get(&self.requests),
        );
        counter(
            "krowoc_relay_relayed_total",
            "Requests answered 200 with Redis replies.",
            get(&self.relayed),
        );
        counter(
            "krowoc_relay_commands_total",
            "Commands sent to Redis.",
            get(&self.commands),
        );
        counter(
            "krowoc_relay_request_bytes_total",
            "RESP bytes sent to Redis.",
            get(&self.request_bytes),
        );
        counter(
            "krowoc_relay_reply_bytes_total",
            "RESP bytes answered by Redis.",
            get(&self.reply_bytes),
        );
        out.push_str("# HELP krowoc_relay_errors_total Requests not relayed, by reason.\n");
        out.push_str("# TYPE krowoc_relay_errors_total counter\n");
        for failure in Failure::ALL {
            out.push_str(&format!(
                "krowoc_relay_errors_total{{kind=\"{}\"}} {}\n",
                failure.label(),
                get(&self.errors[failure.index()])
            ));
        }
        out
    }
}

type RelayResponse = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> RelayResponse {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn method_not_allowed(allow: &'static str) -> RelayResponse {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Compares in time that depends only on the expected token's length.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

impl Relay {
    fn new(config: RelayConfig) -> Relay {
        let backend = if let Some(cluster) = &config.cluster {
            Backend::Cluster(ClusterPool::new(cluster.clone()))
        } else if let Some(sentinel) = &config.sentinel {
            Backend::Sentinel(SentinelPool::new(sentinel.clone()))
        } else {
            Backend::One(match &config.tls {
                Some(tls) => {
                    RedisPool::with_tls(config.redis.clone(), config.pool_size, tls.clone())
                }
                None => RedisPool::new(config.redis.clone(), config.pool_size),
            })
        };
        Relay {
            config,
            backend,
            metrics: Metrics::default(),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> RelayResponse {
        match req.uri().path() {
            "/resp" if req.method() == Method::POST => {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                match self.relay(req).await {
                    Ok(replies) => {
                        self.metrics.relayed.fetch_add(1, Ordering::Relaxed);
                        let mut resp = Response::new(Full::new(replies));
                        resp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static(RESP_CONTENT_TYPE),
                        );
                        resp
                    }
                    Err((failure, message)) => {
                        self.metrics.errors[failure.index()].fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(kind = failure.label(), %message, "relay refused a request");
                        text(failure.status(), message)
                    }
                }
            }
            "/resp" => method_not_allowed("POST"),
            "/ready" if req.method() == Method::GET => match &self.backend {
                Backend::One(pool) => match pool.ping(self.config.timeout).await {
                    Ok(()) => text(StatusCode::OK, "ready"),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
                },
                Backend::Cluster(cluster) => match cluster.ready(self.config.timeout).await {
                    Ok(state) if state.healthy() => text(StatusCode::OK, format!("ready\n{state}")),
                    Ok(state) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {state}"),
                    ),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
                },
                Backend::Sentinel(sentinel) => match sentinel.ready(self.config.timeout).await {
                    Ok(state) => text(StatusCode::OK, format!("ready\n{state}")),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")),
                },
            },
            "/metrics" if req.method() == Method::GET => {
                let mut body = self.metrics.render();
                match &self.backend {
                    Backend::One(_) => {}
                    Backend::Cluster(cluster) => body.push_str(&cluster.render_metrics()),
                    Backend::Sentinel(sentinel) => body.push_str(&sentinel.render_metrics()),
                }
                let mut resp = text(StatusCode::OK, body);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            "/ready" | "/metrics" => method_not_allowed("GET"),
            other => text(
                StatusCode::NOT_FOUND,
                format!(
                    "no such path {:?}; the relay serves POST /resp",
                    printable(other)
                ),
            ),
        }
    }

    /// Checks, in order: token, size, RESP, command count, allow-list and script list; then
    /// sends.
    async fn relay(&self, req: Request<Incoming>) -> Result<Bytes, (Failure, String)> {
        if let Some(expected) = &self.config.token {
            let given = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
            match given {
                None => return Err((Failure::Token, format!("missing {TOKEN_HEADER} header"))),
                Some(given) if !token_matches(given, expected.as_bytes()) => {
                    return Err((Failure::Token, format!("wrong {TOKEN_HEADER}")))
                }
                Some(_) => {}
            }
        }
        let limit = self.config.max_body_bytes;
        let too_big = || {
            (
                Failure::TooLarge,
                format!("request body larger than the relay's limit of {limit} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_big());
        }
        let body = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_big()),
            Err(e) => {
                return Err((
                    Failure::Malformed,
                    format!("could not read the request body: {e}"),
                ))
            }
        };
        if body.is_empty() {
            return Err((
                Failure::Malformed,
                "empty body: expected one or more RESP commands".into(),
            ));
        }
        let max = self.config.max_commands;
        let mut commands = Vec::new();
        for parsed in pool::commands(&body) {
            let cmd = parsed.map_err(|e| (Failure::Malformed, e.to_string()))?;
            if commands.len() == max {
                return Err((
                    Failure::TooLarge,
                    format!("more than the relay's limit of {max} commands in one request"),
                ));
            }
            commands.push(cmd);
        }
        for cmd in &commands {
            self.config
                .commands
                .check(cmd)
                .map_err(|reason| (Failure::Command, reason))?;
            self.config
                .scripts
                .check(cmd, &body)
                .map_err(|reason| (Failure::Script, reason))?;
        }
        let count = commands.len();
        let sent = body.len();
        let replies = match &self.backend {
            Backend::One(pool) => pool.call_parsed(body, &commands, self.config.timeout).await,
            Backend::Cluster(cluster) => {
                cluster
                    .call_parsed(body, &commands, self.config.timeout)
                    .await
            }
            Backend::Sentinel(sentinel) => {
                sentinel
                    .call_parsed(body, &commands, self.config.timeout)
                    .await
            }
        };
        let replies = replies.map_err(|e| match &self.backend {
            Backend::Cluster(_) if e.is_invalid_request() => (Failure::Unroutable, e.to_string()),
            _ => pool_failure(&e),
        })?;
        self.metrics
            .commands
            .fetch_add(count as u64, Ordering::Relaxed);
        self.metrics
            .request_bytes
            .fetch_add(sent as u64, Ordering::Relaxed);
        self.metrics
            .reply_bytes
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        Ok(replies)
    }
}

fn pool_failure(e: &PoolError) -> (Failure, String) {
    let failure = if e.is_timeout() {
        Failure::Timeout
    } else if e.is_tls() {
        Failure::Tls
    } else if e.is_invalid_request() {
        // The relay checked the body already; kept distinct in case the pool's rules grow.
        Failure::Command
    } else {
        Failure::Unreachable
    };
    // The pool logs outages as they start and end; per request, debug only.
    tracing::debug!(error = %e, "relay could not complete a request");
    (failure, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, sub: Option<&str>) -> CommandInfo {
        CommandInfo {
            name: name.into(),
            args: usize::from(sub.is_some()),
            subcommand: sub.map(Into::into),
            span: 0..0,
            arg_spans: Vec::new(),
        }
    }

    #[test]
    fn host_port_brackets_ipv6_literals_only() {
        assert_eq!(HostPort("redis", 6379).to_string(), "redis:6379");
        assert_eq!(HostPort("127.0.0.1", 80).to_string(), "127.0.0.1:80");
        assert_eq!(HostPort("::1", 7379).to_string(), "[::1]:7379");
    }

    #[test]
    fn default_policy_allows_the_filters_commands_only() {
        let p = CommandPolicy::filter_default();
        assert!(p.check(&info("EVALSHA", None)).is_ok());
        assert!(p.check(&info("SCRIPT", Some("LOAD"))).is_ok());
        assert!(p.check(&info("SCRIPT", Some("EXISTS"))).is_ok());
        let err = p.check(&info("SCRIPT", Some("FLUSH"))).unwrap_err();
        assert!(err.contains("SCRIPT FLUSH"), "{err}");
        assert!(p.check(&info("SCRIPT", None)).is_err());
        let err = p.check(&info("LPUSH", None)).unwrap_err();
        assert!(err.contains("LPUSH") && err.contains("allow-list"), "{err}");
        let err = p.check(&info("FLUSHALL", None)).unwrap_err();
        assert!(err.contains("FLUSHALL"), "{err}");
    }

    #[test]
    fn allow_adds_commands_but_never_the_dangerous_ones() {
        let mut p = CommandPolicy::filter_default();
        p.allow("lpush").unwrap();
        assert!(p.check(&info("LPUSH", None)).is_ok());
        for name in [
            "FLUSHALL",
            "config",
            "KEYS",
            "subscribe",
            "BLPOP",
            "multi",
            "function",
            "FCALL",
        ] {
            let err = p.allow(name).unwrap_err();
            assert!(err.contains("always refused"), "{name}: {err}");
        }
        assert!(p.allow("").is_err());
        assert!(p.allow("GET X").is_err());
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret2", b"secret"));
        assert!(!token_matches(b"secre", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[test]
    fn flag_durations_take_units() {
        assert_eq!(parse_flag_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_flag_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_flag_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_flag_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_flag_duration("5").is_err());
        assert!(parse_flag_duration("-1s").is_err());
        assert!(parse_flag_duration("xs").is_err());
        assert_eq!(parse_timeout("24h"), Ok(MAX_TIMEOUT));
        assert!(parse_timeout("25h")
            .unwrap_err()
            .contains("longer than a day"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_flag_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_flag_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_flag_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_flag_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_flag_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_flag_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_flag_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_flag_duration(" 1h "), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_flag_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_flag_duration("5 parsecs")
            .unwrap_err()
            .contains("unit"));
        assert!(parse_flag_duration("ms").unwrap_err().contains("number"));
        assert!(parse_flag_duration("1..2s").unwrap_err().contains("number"));
        assert!(parse_flag_duration("").unwrap_err().contains("empty"));
    }

    #[test]
    fn metrics_render_every_error_kind() {
        let m = Metrics::default();
        m.errors[Failure::Timeout.index()].fetch_add(2, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("krowoc_relay_errors_total{kind=\"redis_timeout\"} 2"));
        assert!(text.contains("krowoc_relay_errors_total{kind=\"malformed\"} 0"));
        assert!(text.contains("krowoc_relay_errors_total{kind=\"script_refused\"} 0"));
        assert!(text.contains("krowoc_relay_requests_total 0"));
    }
}
