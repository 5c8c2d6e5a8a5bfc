//! Test support shared by every crate's tests: a real `redis-server` on a free loopback port in
//! its own temp dir (killed on drop), free ports, waiting for a port, and child processes that
//! are killed on drop.
//!
//! ```no_run
//! let redis = testkit::RedisServer::start();
//! let reply = redis.cli(&["PING"]);
//! assert_eq!(reply.trim(), "PONG");
//! ```

pub mod cluster;
pub mod dashboard;
pub mod docs;
pub mod envoy;
pub mod fuzz;
pub mod http;
pub mod link;
pub mod sentinel;
pub mod sse;
pub mod tls;

use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Waits until something accepts TCP connections on `addr`; panics after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr} after {timeout:?}");
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ChildGuard {
            child,
            name: name.to_string(),
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real `redis-server` on 127.0.0.1 with no persistence, in a temp dir removed on drop.
pub struct RedisServer {
    /// The plain-TCP port (also open on a TLS server, for the test's own commands).
    pub port: u16,
    dir: tempfile::TempDir,
    process: Option<ChildGuard>,
    tls: Option<TlsListener>,
    /// More redis-server flags, e.g. a cluster node's (see [`cluster`]).
    extra_args: Vec<String>,
}

/// The TLS port of a server started with [`RedisServer::start_tls`].
struct TlsListener {
    port: u16,
    ca: PathBuf,
    server: tls::CertFiles,
    auth_clients: bool,
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// Starts a server that also listens for TLS on [`RedisServer::tls_port`], with `server`'s
    /// certificate, trusting `ca` for client certificates; `auth_clients` makes a client
    /// certificate required (`--tls-auth-clients yes`; else `no`). The plain port stays open
    /// for the test's own commands ([`RedisServer::cli`]).
    pub fn start_tls(ca: &tls::TestCa, server: &tls::CertFiles, auth_clients: bool) -> RedisServer {
        RedisServer::start_with(Some(TlsListener {
            port: free_port(),
            ca: ca.ca_file(),
            server: server.clone(),
            auth_clients,
        }))
    }

    /// A redis-server with more flags (`["--cluster-enabled", "yes", …]`).
    pub fn start_with_args(port: u16, args: &[String]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = RedisServer {
            port,
            dir,
            process: None,
            tls: None,
            extra_args: args.to_vec(),
        };
        server.restart();
        server
    }

    fn start_with(tls: Option<TlsListener>) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            process: None,
            tls,
            extra_args: Vec::new(),
        };
        server.restart();
        server
    }

    /// The TLS port; panics on a server started without TLS.
    pub fn tls_port(&self) -> u16 {
        self.tls
            .as_ref()
            .map(|t| t.port)
            .expect("redis-server was started with TLS (RedisServer::start_tls)")
    }

    /// `rediss://localhost:TLS_PORT` (the server certificate must name `localhost`).
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}", self.tls_port())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (the port stays reserved for [`RedisServer::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Stalls the server (SIGSTOP): connections stay open and nothing is answered, as when
    /// Redis hangs on a long command or the host pauses it.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT); it answers what queued meanwhile.
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&mut self, signal: &str) {
        let pid = self
            .process
            .as_ref()
            .map(|p| p.child.id())
            .expect("redis-server is running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the server again on the same port (after [`RedisServer::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let bin = redis_server_binary();
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--dir",
        ])
        .arg(self.dir.path());
        if let Some(tls) = &self.tls {
            cmd.arg("--tls-port")
                .arg(tls.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.server.cert)
                .arg("--tls-key-file")
                .arg(&tls.server.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .arg("--tls-auth-clients")
                .arg(if tls.auth_clients { "yes" } else { "no" });
        }
        cmd.args(&self.extra_args);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        self.process = Some(ChildGuard::spawn("redis-server", &mut cmd));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(reply) = self.try_command(&["PING"]) {
                if reply.starts_with(b"+PONG") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command as RESP and returns the raw reply bytes (one read after the first bytes
    /// arrive until the socket goes quiet; fine for the small replies tests look at).
    pub fn try_command(&self, args: &[&str]) -> std::io::Result<Vec<u8>> {
        try_command_at(self.addr(), args)
    }

    /// Runs one command and returns its reply rendered as text: simple strings and bulk strings
    /// as their content, integers as digits, errors as `ERR ...`, arrays one element per line,
    /// nil as an empty string.
    pub fn cli(&self, args: &[&str]) -> String {
        let raw = self
            .try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"));
        render_reply(&raw)
    }

    /// The integer a command answers (e.g. `DBSIZE`, `EXISTS k`), panicking on anything else.
    pub fn int(&self, args: &[&str]) -> i64 {
        let text = self.cli(args);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("redis {args:?} answered {text:?}, not an integer"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `redis-server` from `REDIS_SERVER`, else PATH, else Debian's /usr/bin.
pub fn redis_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("REDIS_SERVER") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("redis-server");
        if p.is_file() {
            return p;
        }
    }
    let p = PathBuf::from("/usr/bin/redis-server");
    assert!(
        p.is_file(),
        "redis-server is not installed: run `cargo xtask test` (it installs it) or `apt-get install redis-server`"
    );
    p
}

/// Sends one command to whatever listens on `addr` (a redis-server, a sentinel) and returns the
/// raw reply bytes, as [`RedisServer::try_command`] does.
pub fn try_command_at(addr: SocketAddr, args: &[&str]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&encode_command(args))?;
    read_one_reply(&mut stream)
}

/// Encodes a command as a RESP array of bulk strings, with `redis-protocol`'s encoder (as
/// `krowoc_relay::pool::encode_command` does; testkit does not depend on the relay, so that
/// `cargo xtask`'s first build need not compile tokio and hyper).
pub fn encode_command(args: &[&str]) -> Vec<u8> {
    let frame = OwnedFrame::Array(
        args.iter()
            .map(|a| OwnedFrame::BulkString(a.as_bytes().to_vec()))
            .collect(),
    );
    let mut out = vec![0u8; frame.encode_len(false)];
    let written = redis_protocol::resp2::encode::encode(&mut out, &frame, false).unwrap_or(0);
    out.truncate(written);
    out
}

fn read_one_reply(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = reply_len(&buf, 0) {
            buf.truncate(end);
            return Ok(buf);
        }
    }
}

/// Length of the complete RESP2 reply starting at `at`, or None if more bytes are needed.
fn reply_len(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
    let line = std::str::from_utf8(&buf[at + 1..line_end]).ok()?;
    match buf.get(at)? {
        b'+' | b'-' | b':' => Some(line_end + 2),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some(line_end + 2);
            }
            let end = line_end + 2 + n as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut pos = line_end + 2;
            for _ in 0..n.max(0) {
                pos = reply_len(buf, pos)?;
            }
            Some(pos)
        }
        _ => Some(buf.len()),
    }
}

/// Renders a raw RESP2 reply as text (see [`RedisServer::cli`]).
pub fn render_reply(raw: &[u8]) -> String {
    let mut out = Vec::new();
    render_at(raw, 0, &mut out);
    out.join("\n")
}

fn render_at(buf: &[u8], at: usize, out: &mut Vec<String>) -> usize {
    let Some(rel) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        out.push(String::from_utf8_lossy(&buf[at..]).into_owned());
        return buf.len();
    };
    let line_end = at + rel;
    let line = String::from_utf8_lossy(&buf[at + 1..line_end]).into_owned();
    match buf.get(at) {
        Some(b'+') | Some(b':') => {
            out.push(line);
            line_end + 2
        }
        Some(b'-') => {
            out.push(line);
            line_end + 2
        }
        Some(b'$') => {
            let n: i64 = line.parse().unwrap_or(-1);
            if n < 0 {
                out.push(String::new());
                return line_end + 2;
            }
            let start = line_end + 2;
            let end = (start + n as usize).min(buf.len());
            out.push(String::from_utf8_lossy(&buf[start..end]).into_owned());
            end + 2
        }
        Some(b'*') => {
            let n: i64 = line.parse().unwrap_or(0);
            let mut pos = line_end + 2;
            for _ in 0..n.max(0) {
                pos = render_at(buf, pos, out);
            }
            pos
        }
        _ => buf.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_server_starts_answers_and_restarts() {
        let mut redis = RedisServer::start();
        assert_eq!(redis.cli(&["SET", "k", "v"]), "OK");
        assert_eq!(redis.cli(&["GET", "k"]), "v");
        assert_eq!(redis.int(&["EXISTS", "k"]), 1);
        redis.stop();
        assert!(redis.try_command(&["PING"]).is_err());
        redis.restart();
        // No persistence: the restarted server is empty.
        assert_eq!(redis.int(&["DBSIZE"]), 0);
    }

    #[test]
    fn replies_render_as_text() {
        assert_eq!(render_reply(b"*2\r\n$1\r\na\r\n:5\r\n"), "a\n5");
        assert_eq!(render_reply(b"$-1\r\n"), "");
        assert_eq!(render_reply(b"-ERR nope\r\n"), "ERR nope");
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n", 0), None);
    }
}
