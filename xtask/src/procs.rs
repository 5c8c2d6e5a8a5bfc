//! Long-running child processes (redis-server, the upstream, the relay, host-shim): started in
//! their own process group with their output captured to a log file, waited on until they
//! serve, watched while they run, and stopped — all of them, on every way out — so a demo or a
//! bench leaves no orphans. Also SIGINT/SIGTERM handling and port checks.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a child's output kept in memory to show when it dies.
const TAIL_LINES: usize = 30;
/// How long a stopped child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: the one thing that is async-signal-safe here.
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag the main loop polls ([`stop_requested`]), so
/// xtask outlives the signal long enough to stop what it started.
pub fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The name of the stop signal received so far, if any.
pub fn stop_requested() -> Option<&'static str> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => Some("a signal"),
    }
}

/// True when something on this machine holds `addr` (it accepts connections, or we cannot
/// bind it).
pub fn port_busy(addr: SocketAddr) -> bool {
    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        return true;
    }
    TcpListener::bind(addr).is_err()
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How to start one service and how to know it serves.
pub struct ServiceSpec {
    pub name: String,
    pub command: Command,
    /// Ready once this address accepts TCP connections...
    pub ready_addr: SocketAddr,
    /// ...and the service printed a line containing this (if given; a missing line only
    /// warns, after a grace period, as long as the port accepts).
    pub ready_line: Option<String>,
    pub startup_timeout: Duration,
}

struct Service {
    name: String,
    child: Child,
    log_path: PathBuf,
    tail: Arc<Mutex<VecDeque<String>>>,
    saw_ready_line: Arc<AtomicBool>,
    /// The threads copying its stdout and stderr to the log.
    pumps: Vec<std::thread::JoinHandle<()>>,
}

/// Every service started so far; dropping it stops them all, newest first.
pub struct Services {
    log_dir: PathBuf,
    follow_logs: bool,
    running: Vec<Service>,
}

impl Services {
    /// Logs go to `<log_dir>/<name>.log` (truncated per run); with `follow_logs` they are also
    /// echoed to stderr with a `[name]` prefix.
    pub fn new(log_dir: &Path, follow_logs: bool) -> Result<Services> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create the log directory {}", log_dir.display()))?;
        Ok(Services {
            log_dir: log_dir.to_path_buf(),
            follow_logs,
            running: Vec::new(),
        })
    }

    /// The process id of the running service `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.running
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.child.id())
    }

    /// Starts a service and waits until it serves. On failure the service is stopped and the
    /// error carries its last output lines; services started before stay running (the caller
    /// drops `Services` to stop them).
    pub fn start(&mut self, mut spec: ServiceSpec) -> Result<()> {
        if port_busy(spec.ready_addr) {
            bail!(
                "port {} is busy (something else listens there), so {} cannot start; \
                 stop whatever holds it and run again",
                spec.ready_addr,
                spec.name
            );
        }
        let log_path = self.log_dir.join(format!("{}.log", spec.name));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));
        eprintln!(
            "xtask: starting {}: {}",
            spec.name,
            crate::workspace::describe(&spec.command)
        );
        spec.command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches xtask only, and xtask stops
            // the children in order.
            .process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            // If xtask itself is killed (SIGKILL), the kernel stops the child.
            spec.command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = spec
            .command
            .spawn()
            .with_context(|| format!("cannot start {}: {:?}", spec.name, spec.command))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let saw_ready_line = Arc::new(AtomicBool::new(false));
        let prefix = self.follow_logs.then(|| format!("[{}] ", spec.name));
        let mut pumps = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let capture = OutputCapture {
                log: log.clone(),
                tail: tail.clone(),
                ready_line: spec.ready_line.clone(),
                saw_ready_line: saw_ready_line.clone(),
                prefix: prefix.clone(),
            };
            pumps.push(std::thread::spawn(move || capture.pump(stream)));
        }
        let mut service = Service {
            name: spec.name.clone(),
            child,
            log_path,
            tail,
            saw_ready_line,
            pumps,
        };
        match wait_until_ready(&mut service, &spec) {
            Ok(()) => {
                eprintln!("xtask: {} is ready on {}", spec.name, spec.ready_addr);
                self.running.push(service);
                Ok(())
            }
            Err(e) => {
                stop(&mut service);
                let last = service.last_lines();
                Err(anyhow!(
                    "{} did not start: {e:#}; its last output ({}):\n{}",
                    service.name,
                    service.log_path.display(),
                    last
                ))
            }
        }
    }

    /// Fails, naming the service and showing its last output, if any service has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for s in &mut self.running {
            if let Some(status) = s.child.try_wait().ok().flatten() {
                let last = s.last_lines();
                bail!(
                    "{} exited unexpectedly ({status}); its last output ({}):\n{}",
                    s.name,
                    s.log_path.display(),
                    last
                );
            }
        }
        Ok(())
    }

    /// Stops one service by name (started by [`Services::start`]); unknown names are ignored.
    pub fn stop_one(&mut self, name: &str) {
        if let Some(i) = self.running.iter().position(|s| s.name == name) {
            let mut s = self.running.remove(i);
            stop(&mut s);
        }
    }

    /// Stops every service, newest first.
    pub fn stop_all(&mut self) {
        while let Some(mut s) = self.running.pop() {
            stop(&mut s);
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl Service {
    /// The last lines the service wrote. Once it has exited, its output is read to the end
    /// first (the capture threads may not have seen the final lines yet), waiting at most a
    /// second in case a descendant still holds the pipe.
    fn last_lines(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_some() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.is_empty() {
            return "    (no output)".to_string();
        }
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn wait_until_ready(service: &mut Service, spec: &ServiceSpec) -> Result<()> {
    const READY_LINE_GRACE: Duration = Duration::from_secs(2);
    let deadline = Instant::now() + spec.startup_timeout;
    let mut accepting_since: Option<Instant> = None;
    loop {
        if let Some(signal) = stop_requested() {
            bail!("interrupted by {signal}");
        }
        if let Some(status) = service.child.try_wait().context("waitpid")? {
            bail!("{} exited during startup ({status})", service.name);
        }
        if accepting_since.is_none() && accepts(spec.ready_addr) {
            accepting_since = Some(Instant::now());
        }
        if let Some(since) = accepting_since {
            match &spec.ready_line {
                None => return Ok(()),
                Some(_) if service.saw_ready_line.load(Ordering::SeqCst) => return Ok(()),
                Some(line) if since.elapsed() >= READY_LINE_GRACE => {
                    eprintln!(
                        "xtask: warning: {} accepts connections on {} but never printed {line:?}",
                        service.name, spec.ready_addr
                    );
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not accept connections on {} within {:?}",
                service.name,
                spec.ready_addr,
                spec.startup_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when a listener accepts a connection to `addr`. A loopback connect to a port in the
/// ephemeral range where nothing listens yet can connect to itself (TCP simultaneous open:
/// the kernel picked the same port as the source); that is no listener.
fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

/// SIGTERM to the child's process group, SIGKILL after a grace period, then reap it.
fn stop(service: &mut Service) {
    if service.child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pid = service.child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; -pid is the group we created.
    unsafe {
        libc::kill(-pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        match service.child.try_wait() {
            Ok(Some(status)) => {
                eprintln!(
                    "xtask: stopped {} ({})",
                    service.name,
                    describe_exit(status)
                );
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break,
        }
    }
    eprintln!(
        "xtask: {} ignored SIGTERM for {STOP_GRACE:?}; killing it",
        service.name
    );
    // SAFETY: as above.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = service.child.wait();
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(libc::SIGTERM)) => "on SIGTERM".to_string(),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Copies one output stream of a child to its log file (and stderr when following), keeps
/// the last lines, and notices the ready line.
struct OutputCapture {
    log: Arc<Mutex<std::fs::File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    ready_line: Option<String>,
    saw_ready_line: Arc<AtomicBool>,
    prefix: Option<String>,
}

impl OutputCapture {
    fn pump(self, stream: Box<dyn Read + Send>) {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if let Ok(mut log) = self.log.lock() {
                let _ = writeln!(log, "{line}");
            }
            if let Some(prefix) = &self.prefix {
                eprintln!("{prefix}{line}");
            }
            if let Some(ready) = &self.ready_line {
                if line.contains(ready.as_str()) {
                    self.saw_ready_line.store(true, Ordering::SeqCst);
                }
            }
            let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(strip_ansi(line));
        }
    }
}

/// Drops ANSI colour sequences (tracing colours its output) so error messages read cleanly.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte(0x40..=0x7e)
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A temporary directory removed on drop (for redis-server's working directory).
pub struct TempDir(PathBuf);

impl TempDir {
    /// In the system's temp dir (tests).
    #[cfg(test)]
    pub fn new(label: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("krowoc-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    /// `parent/name`, emptied first: what a run killed before it could clean up (SIGKILL)
    /// left there goes at the next run, not into the system's temp dir.
    pub fn fresh(parent: &Path, name: &str) -> Result<TempDir> {
        let path = parent.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| {
                format!("cannot remove {} (left by an earlier run)", path.display())
            })?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_dir_drops_what_an_earlier_run_left_and_goes_on_drop() {
        let parent = TempDir::new("procs-test-fresh").unwrap();
        let left = parent.path().join("redis");
        std::fs::create_dir_all(&left).unwrap();
        std::fs::write(left.join("dump.rdb"), b"old").unwrap();
        let dir = TempDir::fresh(parent.path(), "redis").unwrap();
        assert!(dir.path().is_dir());
        assert!(!dir.path().join("dump.rdb").exists());
        drop(dir);
        assert!(!left.exists());
    }

    #[test]
    fn a_listening_port_is_busy_and_a_released_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(port_busy(addr));
        drop(listener);
        assert!(!port_busy(addr));
    }

    #[test]
    fn only_a_listener_counts_as_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(accepts(addr));
        drop(listener);
        assert!(!accepts(addr));
    }

    #[test]
    fn colour_codes_are_stripped_from_captured_lines() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready"),
            "2025  INFO ready"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    fn sh(name: &str, script: &str, port: u16) -> ServiceSpec {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        ServiceSpec {
            name: name.to_string(),
            command,
            ready_addr: loopback(port),
            ready_line: None,
            startup_timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn a_child_dying_at_startup_is_reported_with_its_last_output() {
        let dir = TempDir::new("procs-test-dies").unwrap();
        let mut services = Services::new(dir.path(), false).unwrap();
        let port = free_port().unwrap();
        let e = services
            .start(sh(
                "dier",
                "echo 'bad config: listeners[0]' >&2; exit 3",
                port,
            ))
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("dier did not start"), "{text}");
        assert!(text.contains("bad config: listeners[0]"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
    }

    #[test]
    fn a_busy_port_is_named_before_anything_starts() {
        let dir = TempDir::new("procs-test-busy").unwrap();
        let mut services = Services::new(dir.path(), false).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = services.start(sh("late", "sleep 5", port)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("port 127.0.0.1:{port} is busy")),
            "{e}"
        );
    }

    #[test]
    fn stopping_kills_the_whole_process_group() {
        let dir = TempDir::new("procs-test-group").unwrap();
        let mut services = Services::new(dir.path(), false).unwrap();
        let port = free_port().unwrap();
        // A shell whose child (python) listens; the grandchild must die with the group.
        let script = format!(
            "python3 -c 'import socket,time; s=socket.socket(); \
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
             s.bind((\"127.0.0.1\",{port})); s.listen(); time.sleep(60)' & wait"
        );
        services.start(sh("group", &script, port)).unwrap();
        services.check_alive().unwrap();
        services.stop_all();
        let deadline = Instant::now() + Duration::from_secs(3);
        while port_busy(loopback(port)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !port_busy(loopback(port)),
            "the grandchild still holds {port}"
        );
    }
}
