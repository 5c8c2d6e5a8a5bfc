//! A pooled, pipelined RESP connection to one Redis, shared by the relay (`krowoc-relay`) and
//! by host-shim's Higress `proxy_redis_call`. Bytes in, bytes out: the pool frames replies but
//! never interprets them, so a Redis error reply (`-NOSCRIPT …`) is an ordinary reply. It is
//! hand-written rather than a Redis client crate because those decode every reply into values,
//! and both of its callers want Redis' bytes passed through unchanged.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use krowoc_relay::pool::{RedisEndpoint, RedisPool};
//! use std::time::Duration;
//! let pool = RedisPool::new(RedisEndpoint::from_url("redis://127.0.0.1:6379/0")?, 2);
//! let replies = pool
//!     .call_raw(bytes::Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"), 1, Duration::from_secs(1))
//!     .await?;
//! assert_eq!(&replies[..], b"+PONG\r\n");
//! # Ok(()) }
//! ```
//!
//! # How it works
//! Each of the pool's N connections is one tokio task owning one `TcpStream`. Requests (one or
//! more encoded commands plus how many replies they expect) are queued to a connection round
//! robin; the task writes them back to back without waiting for replies (pipelining) and reads
//! replies in order, handing each requester exactly its `count` replies. A connection connects
//! (AUTH, SELECT) on its first request, fails everything in flight with `Unreachable` when it
//! breaks, and reconnects on the next request: no background retry loop, no reconnect storm.
//!
//! # Runtimes
//! A connection task is spawned with `tokio::spawn` on the runtime that sends it its first
//! request, and lives there. A pool therefore belongs to one runtime: with one current-thread
//! runtime per worker thread (as host-shim runs), give each worker its own pool. That runtime
//! must have time enabled (timeouts) and must keep being driven for replies to arrive.
//!
//! # What a shared connection cannot carry
//! Commands that change the state of the connection they run on (SELECT, AUTH, HELLO,
//! SUBSCRIBE, MONITOR, MULTI/EXEC, WATCH, CLIENT, QUIT, RESET …) or block it (BLPOP and friends,
//! WAIT) would corrupt or stall every other request pipelined on it; [`RedisPool::call_raw`]
//! refuses them ([`SHARED_CONNECTION_UNSAFE`]). Atomic multi-step work belongs in a Lua script.
//! Not detected: `XREAD … BLOCK`; keep blocking reads off a shared pool.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::tls::{describe_tls_failure, RedisStream, RedisTls};

/// Redis's default port, used when a URL names none.
pub const DEFAULT_PORT: u16 = 6379;
/// How long connecting (TCP connect plus AUTH and SELECT) may take before the endpoint counts as
/// unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections per pool unless told otherwise: pipelining makes a few connections enough.
pub const DEFAULT_CONNECTIONS: usize = 2;

/// Requests written but not yet answered, per connection; past this a connection stops taking
/// new requests (they wait in its queue, within their own timeout).
const MAX_IN_FLIGHT: usize = 4096;
/// Requests waiting for a connection task to pick them up.
const QUEUE_DEPTH: usize = 1024;
/// How many bytes of queued requests one write gathers.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Commands refused on a shared, pipelined connection: they change its state for everyone
/// pipelined behind them, or block it.
pub const SHARED_CONNECTION_UNSAFE: &[&str] = &[
    "AUTH",
    "HELLO",
    "SELECT",
    "QUIT",
    "RESET",
    "CLIENT",
    "MONITOR",
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "UNSUBSCRIBE",
    "PUNSUBSCRIBE",
    "SUNSUBSCRIBE",
    "MULTI",
    "EXEC",
    "DISCARD",
    "WATCH",
    "UNWATCH",
    "BLPOP",
    "BRPOP",
    "BRPOPLPUSH",
    "BLMOVE",
    "BLMPOP",
    "BZPOPMIN",
    "BZPOPMAX",
    "BZMPOP",
    "WAIT",
    "WAITAOF",
    "SYNC",
    "PSYNC",
    "REPLCONF",
];

// ---------------------------------------------------------------------------------------------
// Endpoint

/// Where one Redis is and how to log in to it; [`RedisEndpoint::from_url`] reads it from a
/// `redis://` or `rediss://` URL ([`crate::redis_url`]).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisEndpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: Option<u32>,
    pub connect_timeout: Duration,
    /// Connect with TLS (`rediss://`), verifying the certificate against `host`; see
    /// [`RedisPool::with_tls`] for whom it trusts.
    pub tls: bool,
}

/// A Redis URL that cannot be used; the message names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis URL {url:?}: {reason}")]
pub struct EndpointError {
    /// The URL with any password replaced by `***`.
    pub url: String,
    pub reason: String,
}

impl RedisEndpoint {
    /// An endpoint without credentials or database, with the default connect timeout.
    pub fn new(host: impl Into<String>, port: u16) -> RedisEndpoint {
        RedisEndpoint {
            host: host.into(),
            port,
            username: None,
            password: None,
            db: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: false,
        }
    }

    /// `host:port` (IPv6 in brackets), the address this endpoint connects to.
    pub fn address(&self) -> String {
        crate::HostPort(&self.host, self.port).to_string()
    }
}

impl fmt::Display for RedisEndpoint {
    /// `host:port[/db]`, never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address())?;
        if let Some(db) = self.db {
            write!(f, "/{db}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// What went wrong with a pooled call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolErrorKind {
    /// Could not connect, the connection broke, or no runtime could run the connection.
    Unreachable,
    /// The replies did not arrive within the call's timeout.
    Timeout,
    /// Redis refused AUTH or SELECT on connect.
    Auth,
    /// The TLS handshake failed: an untrusted or misnamed certificate, a server that speaks no
    /// TLS, a client certificate missing or refused, or no usable TLS configuration.
    Tls,
    /// Redis answered bytes that are not RESP.
    Protocol,
    /// The caller's commands are malformed, do not match `count`, or cannot run on a shared
    /// connection; nothing was sent.
    InvalidRequest,
}

impl PoolErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolErrorKind::Unreachable => "unreachable",
            PoolErrorKind::Timeout => "timeout",
            PoolErrorKind::Auth => "auth",
            PoolErrorKind::Tls => "tls",
            PoolErrorKind::Protocol => "protocol",
            PoolErrorKind::InvalidRequest => "invalid request",
        }
    }
}

/// A failed pooled call: what went wrong, at which endpoint, and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolError {
    kind: PoolErrorKind,
    endpoint: String,
    detail: String,
}

impl PoolError {
    /// An error at `endpoint`, named as `host:port[/db]`.
    pub(crate) fn at(
        kind: PoolErrorKind,
        endpoint: String,
        detail: impl Into<String>,
    ) -> PoolError {
        PoolError {
            kind,
            endpoint,
            detail: detail.into(),
        }
    }

    fn new(kind: PoolErrorKind, endpoint: &RedisEndpoint, detail: impl Into<String>) -> PoolError {
        PoolError {
            kind,
            endpoint: endpoint.to_string(),
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> PoolErrorKind {
        self.kind
    }
    /// The endpoint, as `host:port[/db]`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
    pub fn detail(&self) -> &str {
        &self.detail
    }
    pub fn is_timeout(&self) -> bool {
        self.kind == PoolErrorKind::Timeout
    }
    pub fn is_unreachable(&self) -> bool {
        self.kind == PoolErrorKind::Unreachable
    }
    pub fn is_auth(&self) -> bool {
        self.kind == PoolErrorKind::Auth
    }
    pub fn is_tls(&self) -> bool {
        self.kind == PoolErrorKind::Tls
    }
    pub fn is_protocol(&self) -> bool {
        self.kind == PoolErrorKind::Protocol
    }
    pub fn is_invalid_request(&self) -> bool {
        self.kind == PoolErrorKind::InvalidRequest
    }
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "redis at {}: {}: {}",
            self.endpoint,
            self.kind.as_str(),
            self.detail
        )
    }
}

impl std::error::Error for PoolError {}

// ---------------------------------------------------------------------------------------------
// Commands in a request body

/// One command found in a body of RESP commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandInfo {
    /// The command name, ASCII-uppercased (non-UTF-8 bytes replaced).
    pub name: String,
    /// How many arguments follow the name.
    pub args: usize,
    /// The first argument, ASCII-uppercased, when there is one and it is short (≤ 64 bytes):
    /// `SCRIPT LOAD`, `CLIENT KILL`, `CONFIG GET`.
    pub subcommand: Option<String>,
    /// Where the command's bytes are in the body.
    pub span: Range<usize>,
    /// Where each argument's bytes (without the bulk framing) are in the body, in order: the
    /// relay reads a script's body or SHA1 from them.
    pub arg_spans: Vec<Range<usize>>,
}

impl CommandInfo {
    /// Argument `i` (0 is the first after the name), from the body this was parsed from.
    pub fn arg<'b>(&self, body: &'b [u8], i: usize) -> Option<&'b [u8]> {
        self.arg_spans.get(i).and_then(|r| body.get(r.clone()))
    }
}

/// Why a body is not a sequence of RESP commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespErrorKind {
    /// Bytes that are not a RESP array of bulk strings.
    Malformed,
    /// The body ends inside a command.
    Incomplete,
}

/// A body that is not a sequence of complete RESP commands; names the byte offset and command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct RespError {
    pub kind: RespErrorKind,
    /// Byte offset of the problem in the body.
    pub offset: usize,
    /// 1-based number of the command the problem is in.
    pub command: usize,
    pub reason: String,
}

impl RespError {
    fn describe(&self) -> String {
        match self.kind {
            RespErrorKind::Malformed => format!(
                "malformed RESP in command {} at byte {}: {}",
                self.command, self.offset, self.reason
            ),
            RespErrorKind::Incomplete => format!(
                "incomplete RESP: the body ends inside command {} (at byte {}): {}",
                self.command, self.offset, self.reason
            ),
        }
    }
}

/// Splits a body into its commands. Each command must be a RESP array of bulk strings, as
/// Redis clients send them (no inline commands, no nested arrays, no empty arrays); a trailing
/// partial command is an error. An empty body has no commands.
pub fn parse_commands(body: &[u8]) -> Result<Vec<CommandInfo>, RespError> {
    commands(body).collect()
}

/// The commands of a body, one at a time; stops after the first error. Lets a caller stop early
/// (e.g. after a command limit) without parsing the rest.
pub fn commands(body: &[u8]) -> CommandIter<'_> {
    CommandIter {
        body,
        pos: 0,
        index: 0,
        failed: false,
    }
}

/// Iterator returned by [`commands`].
pub struct CommandIter<'a> {
    body: &'a [u8],
    pos: usize,
    index: usize,
    failed: bool,
}

impl Iterator for CommandIter<'_> {
    type Item = Result<CommandInfo, RespError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.body.len() {
            return None;
        }
        self.index += 1;
        let mut parser = CommandParser {
            body: self.body,
            pos: self.pos,
            command: self.index,
        };
        match parser.command() {
            Ok(info) => {
                self.pos = parser.pos;
                Some(Ok(info))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

struct CommandParser<'a> {
    body: &'a [u8],
    pos: usize,
    command: usize,
}

impl CommandParser<'_> {
    fn malformed(&self, at: usize, reason: impl Into<String>) -> RespError {
        RespError {
            kind: RespErrorKind::Malformed,
            offset: at,
            command: self.command,
            reason: reason.into(),
        }
    }

    fn incomplete(&self, reason: impl Into<String>) -> RespError {
        RespError {
            kind: RespErrorKind::Incomplete,
            offset: self.body.len(),
            command: self.command,
            reason: reason.into(),
        }
    }

    /// Reads `<marker><digits>\r\n` and returns the number.
    fn length_line(&mut self, marker: u8, what: &str) -> Result<usize, RespError> {
        let start = self.pos;
        match self.body.get(start) {
            None => return Err(self.incomplete(format!("expected {what}"))),
            Some(&b) if b != marker => {
                return Err(self.malformed(
                    start,
                    format!(
                        "expected {what} starting with '{}', found {}",
                        marker as char,
                        describe_byte(b)
                    ),
                ))
            }
            Some(_) => {}
        }
        // A length is at most 19 digits; don't scan far for a CRLF that is not there.
        let window = &self.body[start + 1..self.body.len().min(start + 1 + 22)];
        let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
            if window.len() < 22 && window.iter().all(|b| b.is_ascii_digit() || *b == b'\r') {
                return Err(self.incomplete(format!("{what} length line is cut off")));
            }
            return Err(self.malformed(start, format!("{what} length is not digits then CRLF")));
        };
        let digits = &window[..cr];
        if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(self.malformed(
                start,
                format!(
                    "{what} length {:?} is not a non-negative number",
                    String::from_utf8_lossy(digits)
                ),
            ));
        }
        let n = digits
            .iter()
            .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
        self.pos = start + 1 + cr + 2;
        Ok(n)
    }

    fn bulk(&mut self) -> Result<Range<usize>, RespError> {
        let len = self.length_line(b'$', "a bulk string")?;
        let start = self.pos;
        let end = start.saturating_add(len);
        if end.saturating_add(2) > self.body.len() {
            return Err(self.incomplete(format!("bulk string of {len} bytes is cut off")));
        }
        if &self.body[end..end + 2] != b"\r\n" {
            return Err(self.malformed(
                end,
                format!("bulk string of {len} bytes not followed by CRLF"),
            ));
        }
        self.pos = end + 2;
        Ok(start..end)
    }

    fn command(&mut self) -> Result<CommandInfo, RespError> {
        let start = self.pos;
        let n = self.length_line(b'*', "a command (an array of bulk strings)")?;
        if n == 0 {
            return Err(self.malformed(start, "empty command (array of 0 elements)"));
        }
        let name = self.bulk()?;
        let name = upper(&self.body[name]);
        if name.is_empty() {
            return Err(self.malformed(start, "empty command name"));
        }
        let mut subcommand = None;
        // Capacity from the declared count only up to a bound: the count is the client's word.
        let mut arg_spans = Vec::with_capacity((n - 1).min(16));
        for i in 1..n {
            let arg = self.bulk()?;
            if i == 1 && arg.len() <= 64 {
                subcommand = Some(upper(&self.body[arg.clone()]));
            }
            arg_spans.push(arg);
        }
        Ok(CommandInfo {
            name,
            args: n - 1,
            subcommand,
            span: start..self.pos,
            arg_spans,
        })
    }
}

fn upper(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_ascii_uppercase()
}

fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// Encodes one command as a RESP array of bulk strings, with `redis-protocol`'s encoder (the
/// pool passes callers' commands through; it encodes only its own PING, AUTH and SELECT).
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Bytes {
    let frame = OwnedFrame::Array(
        args.iter()
            .map(|a| OwnedFrame::BulkString(a.as_ref().to_vec()))
            .collect(),
    );
    let mut out = vec![0u8; frame.encode_len(false)];
    // The buffer has the frame's own length: encoding cannot run out of room.
    let written = redis_protocol::resp2::encode::encode(&mut out, &frame, false).unwrap_or(0);
    out.truncate(written);
    Bytes::from(out)
}

/// The length of the first complete RESP2 reply in `buf`, `Ok(None)` if more bytes are needed.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, String> {
    match redis_protocol::resp2::decode::decode_range(buf) {
        Ok(Some((_, n))) => Ok(Some(n)),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("unparseable reply: {e}")),
    }
}

/// Why `parsed` cannot run on a shared pipelined connection, if it cannot
/// ([`SHARED_CONNECTION_UNSAFE`]).
pub(crate) fn unshareable(parsed: &[CommandInfo]) -> Option<String> {
    parsed
        .iter()
        .find(|c| SHARED_CONNECTION_UNSAFE.contains(&c.name.as_str()))
        .map(|cmd| format!("{} cannot run on a shared pipelined connection", cmd.name))
}

// ---------------------------------------------------------------------------------------------
// The pool

/// A cheap-to-clone handle on N pipelined connections to one Redis. See the module docs for
/// which runtime its connections run on.
#[derive(Clone)]
pub struct RedisPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    endpoint: Arc<RedisEndpoint>,
    tls: Tls,
    slots: Vec<Mutex<Option<mpsc::Sender<Request>>>>,
    /// Per slot, what its connection is doing while it connects ([`Phase`]).
    phases: Vec<Arc<AtomicU8>>,
    next: AtomicUsize,
}

struct Request {
    commands: Bytes,
    count: usize,
    reply: oneshot::Sender<Result<Bytes, PoolError>>,
}

impl fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPool")
            .field("endpoint", &self.inner.endpoint)
            .field("connections", &self.inner.slots.len())
            .finish()
    }
}

/// How a pool's connections do TLS, decided once when the pool is made.
#[derive(Clone)]
enum Tls {
    Off,
    On(RedisTls),
    /// `rediss://` without a usable configuration (no system roots): every connect fails so.
    Unusable(String),
}

impl RedisPool {
    /// A pool of `connections` (at least 1) connections. Nothing connects until the first call.
    /// A `rediss://` endpoint trusts the system's roots; [`RedisPool::with_tls`] names a CA or
    /// a client certificate.
    pub fn new(endpoint: RedisEndpoint, connections: usize) -> RedisPool {
        let tls = match endpoint.tls {
            false => Tls::Off,
            true => match RedisTls::new(None, None) {
                Ok(tls) => Tls::On(tls),
                Err(e) => Tls::Unusable(e.to_string()),
            },
        };
        RedisPool::build(endpoint, connections, tls)
    }

    /// A pool whose connections all use TLS with `tls` (built once, shared; each connection
    /// does its own handshake), whatever the endpoint's scheme.
    pub fn with_tls(mut endpoint: RedisEndpoint, connections: usize, tls: RedisTls) -> RedisPool {
        endpoint.tls = true;
        RedisPool::build(endpoint, connections, Tls::On(tls))
    }

    fn build(endpoint: RedisEndpoint, connections: usize, tls: Tls) -> RedisPool {
        let slots = (0..connections.max(1)).map(|_| Mutex::new(None)).collect();
        let phases = (0..connections.max(1))
            .map(|_| Arc::new(AtomicU8::new(Phase::Connected as u8)))
            .collect();
        RedisPool {
            inner: Arc::new(PoolInner {
                endpoint: Arc::new(endpoint),
                tls,
                slots,
                phases,
                next: AtomicUsize::new(0),
            }),
        }
    }

    pub fn endpoint(&self) -> &RedisEndpoint {
        &self.inner.endpoint
    }

    /// Sends `commands` (exactly `count` RESP commands, back to back) on one pooled connection
    /// and returns exactly `count` raw replies, concatenated in order. `timeout` covers
    /// everything: waiting for a connection, connecting, writing and reading.
    ///
    /// Refuses, before sending anything, a body that does not parse as `count` commands or that
    /// holds a command listed in [`SHARED_CONNECTION_UNSAFE`].
    pub async fn call_raw(
        &self,
        commands: Bytes,
        count: usize,
        timeout: Duration,
    ) -> Result<Bytes, PoolError> {
        self.check(&commands, Some(count))?;
        self.send(commands, count, timeout).await
    }

    /// Like [`RedisPool::call_raw`] for a caller that has not counted the commands: the body is
    /// parsed once, here, and answered with one reply per command it holds.
    pub async fn call(&self, commands: Bytes, timeout: Duration) -> Result<Bytes, PoolError> {
        let count = self.check(&commands, None)?;
        self.send(commands, count, timeout).await
    }

    /// Like [`RedisPool::call_raw`] for a caller that parsed the body itself with
    /// [`commands`] (the relay, for its checks): `parsed` are the body's commands, checked here
    /// for the shared connection and not parsed again.
    pub async fn call_parsed(
        &self,
        body: Bytes,
        parsed: &[CommandInfo],
        timeout: Duration,
    ) -> Result<Bytes, PoolError> {
        self.shareable(parsed)?;
        self.send(body, parsed.len(), timeout).await
    }

    /// How many commands `commands` holds (`expected`, when given), or why it cannot be sent.
    fn check(&self, commands: &[u8], expected: Option<usize>) -> Result<usize, PoolError> {
        let parsed = parse_commands(commands).map_err(|e| self.invalid(e.to_string()))?;
        if let Some(count) = expected.filter(|&count| count != parsed.len()) {
            return Err(self.invalid(format!(
                "{} commands in the body but {count} replies expected",
                parsed.len()
            )));
        }
        self.shareable(&parsed)?;
        Ok(parsed.len())
    }

    /// Refuses commands that cannot run on a connection other callers share.
    fn shareable(&self, parsed: &[CommandInfo]) -> Result<(), PoolError> {
        match unshareable(parsed) {
            Some(why) => Err(self.invalid(why)),
            None => Ok(()),
        }
    }

    fn invalid(&self, detail: String) -> PoolError {
        PoolError::new(PoolErrorKind::InvalidRequest, &self.inner.endpoint, detail)
    }

    /// Queues `count` checked commands on a connection and waits for their replies. The
    /// cluster pool sends so the parts of a body it has parsed and checked once.
    pub(crate) async fn send(
        &self,
        commands: Bytes,
        count: usize,
        timeout: Duration,
    ) -> Result<Bytes, PoolError> {
        if count == 0 {
            return Ok(Bytes::new());
        }
        let endpoint = &self.inner.endpoint;
        let (slot, sender) = self.sender()?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = Request {
            commands,
            count,
            reply: reply_tx,
        };
        let exchange = async {
            sender.send(request).await.map_err(|_| {
                PoolError::new(
                    PoolErrorKind::Unreachable,
                    endpoint,
                    "connection task stopped",
                )
            })?;
            reply_rx.await.map_err(|_| {
                PoolError::new(
                    PoolErrorKind::Unreachable,
                    endpoint,
                    "connection task stopped",
                )
            })?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Phase::of(&self.inner.phases[slot])
                .timed_out(endpoint, format!("no reply within {timeout:?}"))),
        }
    }

    /// PING; Ok when Redis answers PONG within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), PoolError> {
        let reply = self.call_raw(encode_command(&["PING"]), 1, timeout).await?;
        if reply.starts_with(b"+PONG") {
            Ok(())
        } else {
            Err(PoolError::new(
                PoolErrorKind::Protocol,
                &self.inner.endpoint,
                format!(
                    "PING answered {:?}",
                    String::from_utf8_lossy(&reply).trim_end()
                ),
            ))
        }
    }

    /// The next connection (round robin): its slot and queue, starting its task if it has none.
    fn sender(&self) -> Result<(usize, mpsc::Sender<Request>), PoolError> {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
        // A poisoned slot only means another thread panicked while swapping a sender in.
        let mut slot = self.inner.slots[n]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok((n, sender.clone()));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            PoolError::new(
                PoolErrorKind::Unreachable,
                &self.inner.endpoint,
                "no tokio runtime to run the connection on",
            )
        })?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let endpoint = self.inner.endpoint.clone();
        let phase = self.inner.phases[n].clone();
        runtime.spawn(connection_task(
            endpoint,
            self.inner.tls.clone(),
            n,
            phase,
            rx,
        ));
        *slot = Some(tx.clone());
        Ok((n, tx))
    }
}

/// What a connection is doing: connected (or idle), or which step of connecting it is in. A call
/// that times out while its connection connects says which step got no answer. A failed connect
/// leaves its step in place until the next attempt, so a call whose own timeout fires in the same
/// instant as the connect timeout still names that step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Connected = 0,
    Tcp = 1,
    TlsHandshake = 2,
    Login = 3,
}

/// Why a TLS handshake goes unanswered, nearly always.
const TLS_UNANSWERED: &str =
    "the TLS handshake got no answer: is this a plain-TCP Redis on a rediss:// URL?";

impl Phase {
    fn of(phase: &AtomicU8) -> Phase {
        match phase.load(Ordering::Relaxed) {
            1 => Phase::Tcp,
            2 => Phase::TlsHandshake,
            3 => Phase::Login,
            _ => Phase::Connected,
        }
    }

    fn set(self, phase: &AtomicU8) {
        phase.store(self as u8, Ordering::Relaxed);
    }

    /// The error for a wait that ran out in this phase.
    fn timed_out(self, endpoint: &RedisEndpoint, detail: String) -> PoolError {
        match self {
            Phase::Connected => PoolError::new(PoolErrorKind::Timeout, endpoint, detail),
            Phase::Tcp => PoolError::new(
                PoolErrorKind::Timeout,
                endpoint,
                format!("{detail}: still connecting (TCP)"),
            ),
            Phase::TlsHandshake => PoolError::new(
                PoolErrorKind::Tls,
                endpoint,
                format!("{detail}: {TLS_UNANSWERED}"),
            ),
            Phase::Login => PoolError::new(
                PoolErrorKind::Timeout,
                endpoint,
                format!("{detail}: still logging in (AUTH, SELECT)"),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One connection

/// A request written to Redis and waiting for its replies.
struct InFlight {
    count: usize,
    /// Replies of this request complete so far, and the bytes they take at the read buffer's
    /// front.
    done: usize,
    scanned: usize,
    reply: oneshot::Sender<Result<Bytes, PoolError>>,
}

struct Connection {
    stream: RedisStream,
    read_buf: BytesMut,
    in_flight: VecDeque<InFlight>,
}

async fn connection_task(
    endpoint: Arc<RedisEndpoint>,
    tls: Tls,
    slot: usize,
    phase: Arc<AtomicU8>,
    mut queue: mpsc::Receiver<Request>,
) {
    let mut conn: Option<Connection> = None;
    // Log an outage once when it starts and once when it ends, not once per request.
    let mut failing = false;
    loop {
        let Some(c) = conn.as_mut() else {
            // Disconnected: wait for work, then connect for it.
            let Some(first) = queue.recv().await else {
                return;
            };
            let connected = connect(&endpoint, &tls, &phase).await;
            match connected {
                Ok(stream) => {
                    Phase::Connected.set(&phase);
                    if failing {
                        tracing::info!(endpoint = %endpoint, slot, "redis reachable again");
                        failing = false;
                    } else {
                        tracing::debug!(endpoint = %endpoint, slot, "redis connection up");
                    }
                    let mut c = Connection {
                        stream,
                        read_buf: BytesMut::with_capacity(16 * 1024),
                        in_flight: VecDeque::new(),
                    };
                    match c.write_batch(first, &mut queue).await {
                        Ok(()) => conn = Some(c),
                        Err(e) => {
                            c.fail_all(&PoolError::new(PoolErrorKind::Unreachable, &endpoint, e))
                        }
                    }
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(endpoint = %endpoint, slot, error = %e, "redis connect failed");
                    } else {
                        tracing::warn!(endpoint = %endpoint, slot, error = %e, "redis connect failed");
                        failing = true;
                    }
                    let _ = first.reply.send(Err(e.clone()));
                    // Everything already queued would fail the same way: fail it now, fast.
                    while let Ok(req) = queue.try_recv() {
                        let _ = req.reply.send(Err(e.clone()));
                    }
                }
            }
            continue;
        };
        let broken: Option<(PoolErrorKind, String)> = tokio::select! {
            req = queue.recv(), if c.in_flight.len() < MAX_IN_FLIGHT => match req {
                None => return,
                Some(req) => c
                    .write_batch(req, &mut queue)
                    .await
                    .err()
                    .map(|e| (PoolErrorKind::Unreachable, e)),
            },
            read = c.stream.read_buf(&mut c.read_buf) => match read {
                Ok(0) => Some((PoolErrorKind::Unreachable, "connection closed by Redis".to_string())),
                Ok(_) => c.deliver().err().map(|e| (PoolErrorKind::Protocol, e)),
                Err(e) => Some((PoolErrorKind::Unreachable, format!("read: {e}"))),
            },
        };
        if let Some((kind, reason)) = broken {
            if c.in_flight.is_empty() {
                // An idle connection closed (Redis `timeout`, a restart): reconnect on next use.
                tracing::debug!(endpoint = %endpoint, slot, reason = %reason, "idle redis connection closed");
            } else {
                tracing::warn!(endpoint = %endpoint, slot, reason = %reason, in_flight = c.in_flight.len(), "redis connection lost");
            }
            c.fail_all(&PoolError::new(kind, &endpoint, reason));
            conn = None;
        }
    }
}

impl Connection {
    /// Writes `first` and whatever else is already queued, in one write.
    async fn write_batch(
        &mut self,
        first: Request,
        queue: &mut mpsc::Receiver<Request>,
    ) -> Result<(), String> {
        let mut out = BytesMut::new();
        let mut next = Some(first);
        while let Some(req) = next.take() {
            // A caller that already gave up (timeout) gets nothing sent on its behalf.
            if !req.reply.is_closed() {
                out.extend_from_slice(&req.commands);
                self.in_flight.push_back(InFlight {
                    count: req.count,
                    done: 0,
                    scanned: 0,
                    reply: req.reply,
                });
            }
            if out.len() < WRITE_BATCH_BYTES && self.in_flight.len() < MAX_IN_FLIGHT {
                next = queue.try_recv().ok();
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
        // TLS holds records until flushed; for TCP this is a no-op.
        self.stream.flush().await.map_err(|e| format!("write: {e}"))
    }

    /// Hands complete replies to their requesters, in order.
    fn deliver(&mut self) -> Result<(), String> {
        loop {
            let Some(front) = self.in_flight.front_mut() else {
                if self.read_buf.is_empty() {
                    return Ok(());
                }
                return Err(format!(
                    "unexpected {} bytes from Redis with no request waiting",
                    self.read_buf.len()
                ));
            };
            match reply_len(&self.read_buf[front.scanned..])? {
                None => return Ok(()),
                Some(n) => {
                    front.scanned += n;
                    front.done += 1;
                    if front.done == front.count {
                        let Some(done) = self.in_flight.pop_front() else {
                            return Ok(());
                        };
                        let replies = self.read_buf.split_to(done.scanned).freeze();
                        let _ = done.reply.send(Ok(replies));
                    }
                }
            }
        }
    }

    fn fail_all(&mut self, error: &PoolError) {
        for waiting in self.in_flight.drain(..) {
            let _ = waiting.reply.send(Err(error.clone()));
        }
    }
}

/// TCP connect, the TLS handshake (`rediss://`), then AUTH and SELECT, all within the
/// endpoint's connect timeout.
async fn connect(
    endpoint: &RedisEndpoint,
    tls: &Tls,
    phase: &AtomicU8,
) -> Result<RedisStream, PoolError> {
    let attempt = async {
        Phase::Tcp.set(phase);
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| {
                PoolError::new(
                    PoolErrorKind::Unreachable,
                    endpoint,
                    format!("connect: {e}"),
                )
            })?;
        let _ = tcp.set_nodelay(true);
        let tls_failure = |detail: String| PoolError::new(PoolErrorKind::Tls, endpoint, detail);
        let (mut stream, tls) = match tls {
            Tls::Off => (RedisStream::Plain(tcp), None),
            Tls::Unusable(reason) => return Err(tls_failure(reason.clone())),
            Tls::On(tls) => (
                {
                    Phase::TlsHandshake.set(phase);
                    tls.handshake(tcp, &endpoint.host)
                }
                .await
                .map_err(tls_failure)?,
                Some(tls),
            ),
        };
        Phase::Login.set(phase);
        let mut hello = BytesMut::new();
        let mut steps = Vec::new();
        if let Some(password) = &endpoint.password {
            match &endpoint.username {
                Some(user) => hello.extend_from_slice(&encode_command(&["AUTH", user, password])),
                None => hello.extend_from_slice(&encode_command(&["AUTH", password])),
            }
            steps.push("AUTH");
        }
        if let Some(db) = endpoint.db {
            hello.extend_from_slice(&encode_command(&["SELECT", &db.to_string()]));
            steps.push("SELECT");
        }
        if steps.is_empty() && tls.is_some() {
            // In TLS 1.3 a server that refuses the client's certificate says so after the
            // handshake: one reply here makes that a connect failure, not a request's.
            hello.extend_from_slice(&encode_command(&["PING"]));
            steps.push("PING");
        }
        if steps.is_empty() {
            return Ok(stream);
        }
        // An I/O error during the handshake replies is TLS's when rustls raised it.
        let handshake_err = |detail: String, e: Option<&std::io::Error>| match e
            .zip(tls)
            .and_then(|(e, tls)| describe_tls_failure(e, &endpoint.host, tls))
        {
            Some(tls_detail) => tls_failure(tls_detail),
            None => PoolError::new(PoolErrorKind::Unreachable, endpoint, detail),
        };
        let written = match stream.write_all(&hello).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        written.map_err(|e| handshake_err(format!("write {}: {e}", steps.join("+")), Some(&e)))?;
        let mut buf = BytesMut::with_capacity(256);
        for step in steps {
            let n = loop {
                match reply_len(&buf) {
                    Ok(Some(n)) => break n,
                    Ok(None) => {}
                    Err(e) => {
                        return Err(PoolError::new(
                            PoolErrorKind::Protocol,
                            endpoint,
                            format!("{step}: {e}"),
                        ))
                    }
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) => {
                        return Err(handshake_err(
                            format!("connection closed during {step}"),
                            None,
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(handshake_err(format!("read {step} reply: {e}"), Some(&e)))
                    }
                }
            };
            let reply = buf.split_to(n);
            if reply.first() == Some(&b'-') {
                let text = String::from_utf8_lossy(&reply[1..]).trim_end().to_string();
                return Err(PoolError::new(
                    PoolErrorKind::Auth,
                    endpoint,
                    format!("{step} refused: {text}"),
                ));
            }
        }
        if !buf.is_empty() {
            return Err(PoolError::new(
                PoolErrorKind::Protocol,
                endpoint,
                "unexpected bytes after the handshake replies",
            ));
        }
        Ok(stream)
    };
    match tokio::time::timeout(endpoint.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => {
            let detail = format!("connect timed out after {:?}", endpoint.connect_timeout);
            Err(match Phase::of(phase) {
                Phase::TlsHandshake => Phase::TlsHandshake.timed_out(endpoint, detail),
                _ => PoolError::new(PoolErrorKind::Unreachable, endpoint, detail),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_url_reads_every_part() {
        let e = RedisEndpoint::from_url("redis://user:p%40ss@cache.internal:6380/3").unwrap();
        assert_eq!(e.host, "cache.internal");
        assert_eq!(e.port, 6380);
        assert_eq!(e.username.as_deref(), Some("user"));
        assert_eq!(e.password.as_deref(), Some("p@ss"));
        assert_eq!(e.db, Some(3));
        assert_eq!(e.to_string(), "cache.internal:6380/3");
    }

    #[test]
    fn from_url_defaults_port_and_has_no_credentials() {
        let e = RedisEndpoint::from_url("redis://127.0.0.1").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.db), ("127.0.0.1", 6379, None));
        assert!(e.username.is_none() && e.password.is_none());
        let e = RedisEndpoint::from_url("redis://localhost:7000/").unwrap();
        assert_eq!((e.port, e.db), (7000, None));
    }

    #[test]
    fn from_url_accepts_password_only_and_ipv6() {
        let e = RedisEndpoint::from_url("redis://:secret@[::1]:6390/0").unwrap();
        assert_eq!(e.username, None);
        assert_eq!(e.password.as_deref(), Some("secret"));
        assert_eq!(e.host, "::1");
        assert_eq!(e.address(), "[::1]:6390");
        assert_eq!(e.db, Some(0));
    }

    #[test]
    fn from_url_errors_name_the_wrong_part_and_hide_the_password() {
        let cases = [
            ("127.0.0.1:6379", "no scheme"),
            ("http://x:1", "scheme \"http\""),
            ("rediss://x:99999", "port \"99999\""),
            ("redis://x:99999", "port \"99999\""),
            ("redis://x:abc", "port \"abc\""),
            ("redis://x:6379/db1", "database \"db1\""),
            ("redis://:6379", "host is empty"),
            ("redis://x:1?db=2", "query parameters"),
            ("redis://user@x:1", "no ':'"),
            ("redis://::1:6379", "brackets"),
            ("redis://u:%zz@x", "percent escape"),
        ];
        for (url, expected) in cases {
            let err = RedisEndpoint::from_url(url).unwrap_err().to_string();
            assert!(err.contains(expected), "{url}: {err}");
        }
        let err = RedisEndpoint::from_url("redis://u:hunter2@x:0")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("u:***@x:0"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let e = RedisEndpoint::from_url("redis://u:hunter2@x").unwrap();
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn parse_commands_names_counts_and_spans() {
        let body = b"*1\r\n$4\r\nping\r\n*3\r\n$6\r\nscript\r\n$4\r\nload\r\n$8\r\nreturn 1\r\n";
        let cmds = parse_commands(body).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].name, "PING");
        assert_eq!(cmds[0].args, 0);
        assert_eq!(cmds[0].subcommand, None);
        assert_eq!(cmds[0].span, 0..14);
        assert_eq!(cmds[1].name, "SCRIPT");
        assert_eq!(cmds[1].args, 2);
        assert_eq!(cmds[1].subcommand.as_deref(), Some("LOAD"));
        assert_eq!(cmds[1].span, 14..body.len());
        assert!(cmds[0].arg_spans.is_empty());
        assert_eq!(cmds[1].arg(body, 0), Some(&b"load"[..]));
        assert_eq!(cmds[1].arg(body, 1), Some(&b"return 1"[..]));
        assert_eq!(cmds[1].arg(body, 2), None);
        assert_eq!(parse_commands(b"").unwrap(), vec![]);
    }

    #[test]
    fn parse_commands_accepts_binary_arguments() {
        let body = encode_command(&[&b"SET"[..], b"k", b"\r\n\0\xff*1\r\n"]);
        let cmds = parse_commands(&body).unwrap();
        assert_eq!((cmds[0].name.as_str(), cmds[0].args), ("SET", 2));
    }

    #[test]
    fn parse_commands_refuses_a_trailing_partial_command() {
        let mut body = encode_command(&["PING"]).to_vec();
        body.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$5\r\nab");
        let err = parse_commands(&body).unwrap_err();
        assert_eq!(err.kind, RespErrorKind::Incomplete);
        assert_eq!(err.command, 2);
        assert!(err.to_string().contains("command 2"), "{err}");
        for cut in [
            &b"*"[..],
            b"*1",
            b"*1\r\n",
            b"*1\r\n$4\r",
            b"*1\r\n$4\r\nPI",
        ] {
            let err = parse_commands(cut).unwrap_err();
            assert_eq!(err.kind, RespErrorKind::Incomplete, "{cut:?}: {err}");
        }
    }

    #[test]
    fn parse_commands_refuses_what_is_not_an_array_of_bulk_strings() {
        let cases: [(&[u8], &str); 8] = [
            (b"PING\r\n", "found 'P'"),
            (b"*1\r\n:1\r\n", "found ':'"),
            (b"*0\r\n", "empty command"),
            (b"*-1\r\n", "not a non-negative number"),
            (b"*1\r\n$-1\r\n", "not a non-negative number"),
            (b"*1\r\n$4\r\nPINGxx", "not followed by CRLF"),
            (b"*1\r\n*1\r\n$4\r\nPING\r\n", "found '*'"),
            (b"*1x\r\n$4\r\nPING\r\n", "not a non-negative number"),
        ];
        for (body, expected) in cases {
            let err = parse_commands(body).unwrap_err();
            assert_eq!(err.kind, RespErrorKind::Malformed, "{body:?}: {err}");
            assert!(err.to_string().contains(expected), "{body:?}: {err}");
        }
        let err = parse_commands(b"*1\r\n$0\r\n\r\n").unwrap_err();
        assert!(err.to_string().contains("empty command name"), "{err}");
    }

    #[test]
    fn huge_declared_lengths_are_incomplete_not_allocated() {
        let err = parse_commands(b"*999999999999\r\n$3\r\nGET\r\n").unwrap_err();
        assert_eq!(err.kind, RespErrorKind::Incomplete);
        let err = parse_commands(b"*1\r\n$999999999999999999\r\nx").unwrap_err();
        assert_eq!(err.kind, RespErrorKind::Incomplete);
    }

    #[test]
    fn reply_len_frames_nested_replies() {
        assert_eq!(reply_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n:5\r\n+x"), Ok(Some(15)));
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n"), Ok(None));
        assert_eq!(reply_len(b"$-1\r\n"), Ok(Some(5)));
        assert!(reply_len(b"?x\r\n").is_err());
    }

    #[test]
    fn encode_command_writes_resp() {
        assert_eq!(
            &encode_command(&["SET", "k", "hello"])[..],
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n"
        );
        assert_eq!(&encode_command::<&str>(&[])[..], b"*0\r\n");
        let long = "x".repeat(12_345);
        for args in [&["PING"][..], &["EVALSHA", "abc", "1", "k", "", &long]] {
            assert_eq!(
                encode_command(args),
                testkit::encode_command(args),
                "{args:?}"
            );
        }
    }
}
