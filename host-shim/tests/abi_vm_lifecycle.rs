//! A VM's life, driven by abi-test-guest: WASI (log, environment, clocks, randomness,
//! `proc_exit`), a trap in each phase under both failure policies, a runaway callback stopped at
//! its deadline, memory capped per VM, a failed VM replaced, and a plugin refusing its
//! configuration.

mod abi_support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use abi_support::{
    echoed, guest, header, request, start, try_start_module, wait_for, GatewayOptions, Response,
    TestGateway,
};
use host_shim::vm::{FailurePolicy, VmError};

/// Everything host-shim logs in this test process (INFO and above), as text.
fn log_capture() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text(log: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

fn one_worker(failure_policy: FailurePolicy) -> GatewayOptions {
    GatewayOptions {
        workers: 1,
        failure_policy,
        ..GatewayOptions::default()
    }
}

/// With `fail_open: true` the plugin is bypassed after a failure: `/ok` reaches the upstream.
fn bypasses_the_plugin(gw: &TestGateway) {
    let (resp, _) = request(gw.addr, "GET", "/ok", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("x-ok"),
        None,
        "the failed plugin did not answer"
    );
    assert_eq!(echoed(&resp.body)["path"], "/ok");
}

/// Polls `/ok` until the plugin itself answers it (the failed VM has been replaced).
fn served_by_a_fresh_vm(gw: &TestGateway) -> Response {
    wait_for(
        Duration::from_secs(5),
        "a replaced VM to answer /ok",
        || {
            let (resp, _) = request(gw.addr, "GET", "/ok", &[], b"");
            (resp.status == 200 && resp.header("x-ok") == Some("yes")).then_some(resp)
        },
    )
}

// ---- WASI -----------------------------------------------------------------------------------

#[test]
fn wasi_output_reaches_the_log_and_environment_clocks_and_randomness_work() {
    let log = log_capture();
    let opts = GatewayOptions {
        env: vec![("ABI_ENV".into(), "from-settings".into())],
        ..one_worker(FailurePolicy::FailReload)
    };
    let gw = start("wasi", &opts);
    let (resp, _) = request(gw.addr, "GET", "/w", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(header(&resp, "x-env"), "from-settings");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let guest_now: u64 = header(&resp, "x-realtime-secs").parse().unwrap_or(0);
    assert!(
        guest_now.abs_diff(now) < 60,
        "realtime clock: guest {guest_now}, host {now}"
    );
    assert_eq!(header(&resp, "x-monotonic-ok"), "true");
    assert_eq!(
        header(&resp, "x-random-ok"),
        "true",
        "random_get gives fresh bytes"
    );

    let wanted = [
        ("INFO", "abi-test-guest stdout: configured"),
        ("ERROR", "abi-test-guest stderr: configured"),
        ("INFO", "abi-test-guest stdout: request /w"),
        ("ERROR", "abi-test-guest stderr: request /w"),
    ];
    wait_for(
        Duration::from_secs(2),
        "the guest's lines in the log",
        || {
            let text = log_text(&log);
            wanted
                .iter()
                .all(|(level, line)| text.lines().any(|l| l.contains(level) && l.contains(line)))
                .then_some(())
        },
    );
    // The log is shared by every test of this binary (some fail VMs on purpose): this
    // gateway's own counter says whether printing failed its VM.
    assert_eq!(
        gw.host_counter("vm_traps_total"),
        0,
        "printing must not fail the VM"
    );
}

#[test]
fn wasi_proc_exit_fails_the_request_and_the_vm_is_replaced() {
    let gw = start("wasi", &one_worker(FailurePolicy::FailReload));
    let (resp, _) = request(gw.addr, "GET", "/exit", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(gw.host_counter("vm_traps_total"), 1);
    wait_for(
        Duration::from_secs(5),
        "the wasi scenario to answer again",
        || {
            let (resp, _) = request(gw.addr, "GET", "/w", &[], b"");
            (resp.status == 200).then_some(())
        },
    );
}

// ---- traps ----------------------------------------------------------------------------------

/// Envoy 1.40 with `failure_policy: FAIL_RELOAD`: the failing request gets an empty 503; so does
/// every request until the reload interval (`reload_config.backoff.base_interval` to 1.5 × it)
/// has passed since the VM was loaded; the first request after that loads a new VM and is served
/// by it.
#[test]
fn trap_in_request_headers_with_fail_reload_answers_503_until_the_reload_interval_then_a_new_vm_serves(
) {
    let gw = start(
        "misbehave",
        &GatewayOptions {
            reload_base_interval: Duration::from_secs(2),
            ..one_worker(FailurePolicy::FailReload)
        },
    );
    let (resp, _) = request(gw.addr, "GET", "/panic", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        resp.body.is_empty(),
        "Envoy's 503 has no body: {:?}",
        resp.text()
    );
    assert_eq!(resp.header("content-length"), Some("0"));
    assert_eq!(resp.header("content-type"), None);
    let (early, _) = request(gw.addr, "GET", "/ok", &[], b"");
    assert_eq!(
        (early.status, early.body.len()),
        (503, 0),
        "within the reload interval the failed VM stays"
    );
    assert_eq!(gw.host_counter("vm_replacements_total"), 0);
    std::thread::sleep(Duration::from_millis(3100));
    let (next, _) = request(gw.addr, "GET", "/ok", &[], b"");
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(
        header(&next, "x-vm"),
        "3",
        "the replacement is a new VM (after the base, main-thread and worker VMs)"
    );
    assert!(
        gw.upstream.seen().is_empty(),
        "nothing reached the upstream"
    );
    assert_eq!(gw.host_counter("vm_traps_total"), 1);
    assert_eq!(gw.host_counter("vm_replacements_total"), 1);
}

#[test]
fn trap_in_request_headers_with_fail_open_passes_the_request_through() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailOpenLegacy));
    let (resp, _) = request(gw.addr, "GET", "/panic", &[("x-probe", "p")], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let echo = echoed(&resp.body);
    assert_eq!(echo["path"], "/panic");
    assert_eq!(gw.upstream.last("/panic").header("x-probe"), Some("p"));
    assert_eq!(gw.host_counter("fail_open_passes_total"), 1);
    bypasses_the_plugin(&gw);
}

#[test]
fn trap_in_response_headers_fails_closed_with_503() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailReload));
    let (resp, _) = request(gw.addr, "GET", "/panic-response", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    served_by_a_fresh_vm(&gw);
}

/// Envoy (proxy-wasm-cpp-host's CHECK_FAIL_HTTP after the call): with fail_open a VM that
/// failed in `on_response_headers` lets the upstream's response continue to the client.
#[test]
fn trap_in_response_headers_with_fail_open_passes_the_upstream_response() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailOpenLegacy));
    let (resp, _) = request(gw.addr, "GET", "/panic-response", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(echoed(&resp.body)["path"], "/panic-response");
    bypasses_the_plugin(&gw);
}

#[test]
fn trap_in_request_body_fails_closed_with_503() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailReload));
    let (resp, _) = request(gw.addr, "POST", "/panic-body", &[], b"abc");
    assert_eq!(resp.status, 503, "{}", resp.text());
    served_by_a_fresh_vm(&gw);
}

/// Envoy: with fail_open a VM that failed in `on_request_body` lets the body continue upstream.
#[test]
fn trap_in_request_body_with_fail_open_passes_the_request_through() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailOpenLegacy));
    let (resp, _) = request(gw.addr, "POST", "/panic-body", &[], b"abc");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(gw.upstream.last("/panic-body").body, "abc");
    bypasses_the_plugin(&gw);
}

/// Envoy 1.40's default (`failure_policy` unset or `FAIL_CLOSED`): the plugin stays failed and
/// every later request gets the same empty 503; nothing is reloaded.
#[test]
fn trap_with_the_default_policy_keeps_the_plugin_failed_and_every_later_request_gets_503() {
    let gw = start("misbehave", &one_worker(FailurePolicy::default()));
    let (resp, _) = request(gw.addr, "GET", "/panic", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/ok", "/ok", "/passthru"] {
        let (resp, _) = request(gw.addr, "GET", path, &[], b"");
        assert_eq!(resp.status, 503, "{path}: {}", resp.text());
        assert!(resp.body.is_empty(), "{path}: {:?}", resp.text());
        assert_eq!(resp.header("content-length"), Some("0"));
    }
    assert!(
        gw.upstream.seen().is_empty(),
        "nothing reached the upstream"
    );
    assert_eq!(gw.host_counter("vm_replacements_total"), 0);
}

/// Envoy 1.40 with `failure_policy: FAIL_OPEN`: the failing request still gets the empty 503;
/// later requests bypass the failed plugin.
#[test]
fn trap_with_fail_open_policy_answers_503_then_later_requests_bypass_the_plugin() {
    let gw = start("misbehave", &one_worker(FailurePolicy::FailOpen));
    let (resp, _) = request(gw.addr, "GET", "/panic", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.body.is_empty());
    bypasses_the_plugin(&gw);
    assert_eq!(gw.host_counter("vm_replacements_total"), 0);
}

// ---- deadlines and memory -------------------------------------------------------------------

fn idle_after(timeout: Duration) -> GatewayOptions {
    GatewayOptions {
        stream_idle_timeout: Some(timeout),
        ..one_worker(FailurePolicy::FailReload)
    }
}

/// Envoy's `stream_idle_timeout`: a plugin that pauses and never resumes gets 408, whether it
/// holds the request's headers or its whole body; the VM is not at fault and is kept.
#[test]
fn a_stream_the_plugin_never_resumes_gets_408_at_the_idle_timeout() {
    let gw = start("misbehave", &idle_after(Duration::from_millis(700)));
    for (method, path, body) in [("GET", "/stall", &b""[..]), ("POST", "/stall-body", b"abc")] {
        let started = Instant::now();
        let (resp, _) = request(gw.addr, method, path, &[], body);
        let took = started.elapsed();
        assert_eq!(resp.status, 408, "{path}: {}", resp.text());
        assert_eq!(resp.text(), "stream timeout", "{path}");
        assert!(took >= Duration::from_millis(600), "{path}: after {took:?}");
        assert!(took < Duration::from_secs(5), "{path}: after {took:?}");
    }
    assert_eq!(gw.host_counter("vm_traps_total"), 0);
    let (resp, _) = request(gw.addr, "GET", "/ok", &[], b"");
    assert_eq!(resp.header("x-ok"), Some("yes"));
}

/// Once the response has started (its body too large to be answered in one piece), an idle
/// timeout can only reset the stream: the client gets the headers and part of the body.
#[test]
fn a_response_body_the_plugin_never_releases_is_reset_at_the_idle_timeout() {
    use std::io::{Read, Write};
    let gw = start("misbehave", &idle_after(Duration::from_millis(700)));
    let body = vec![b'x'; 4 << 20];
    let mut conn = std::net::TcpStream::connect(gw.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST /stall-response-body HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&body).unwrap();
    let mut got = Vec::new();
    // EOF or a reset: either way the stream ended.
    let _ = conn.read_to_end(&mut got);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    let (headers, rest) = text.split_once("\r\n\r\n").expect("response headers");
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    assert!(rest.len() < length, "the whole body came through");
    assert!(
        (Duration::from_millis(600)..Duration::from_secs(10)).contains(&took),
        "reset after {took:?}"
    );
}

#[test]
fn runaway_callback_is_stopped_at_its_deadline_and_fails_by_policy() {
    let opts = GatewayOptions {
        callback_deadline: Duration::from_millis(200),
        ..one_worker(FailurePolicy::FailReload)
    };
    let gw = start("misbehave", &opts);
    let started = Instant::now();
    let (resp, _) = request(gw.addr, "GET", "/spin", &[], b"");
    let took = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        took >= Duration::from_millis(150),
        "stopped after {took:?}, before its deadline"
    );
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    assert_eq!(gw.host_counter("vm_traps_total"), 1);
    served_by_a_fresh_vm(&gw);
}

#[test]
fn memory_growth_beyond_the_cap_is_refused_and_an_allocation_failure_fails_cleanly() {
    let opts = GatewayOptions {
        memory_limit_bytes: 16 << 20,
        ..one_worker(FailurePolicy::FailReload)
    };
    let gw = start("misbehave", &opts);
    let (resp, _) = request(gw.addr, "GET", "/grow-raw?pages=1024", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        header(&resp, "x-grow-result"),
        "-1",
        "memory.grow past the cap returns -1"
    );
    let pages: usize = header(&resp, "x-memory-pages")
        .parse()
        .unwrap_or(usize::MAX);
    assert!(pages * 65536 <= 16 << 20, "{pages} pages");

    let (resp, _) = request(gw.addr, "GET", "/grow-raw?pages=16", &[], b"");
    let grown: i64 = header(&resp, "x-grow-result").parse().unwrap_or(-1);
    assert!(
        grown > 0,
        "growth within the cap works (previous size {grown})"
    );

    let (resp, _) = request(gw.addr, "GET", "/grow-vec?mib=64", &[], b"");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(gw.host_counter("vm_traps_total"), 1);
    served_by_a_fresh_vm(&gw);
}

// ---- configuration --------------------------------------------------------------------------

#[test]
fn plugin_refusing_its_configuration_stops_the_start_with_its_log_line() {
    match try_start_module(guest(), "refuse", &GatewayOptions::default()) {
        Ok(_) => panic!("the gateway started with a plugin that refused its configuration"),
        Err(VmError::ConfigurationRefused(lines)) => {
            assert!(
                lines
                    .iter()
                    .any(|l| l
                        .contains("abi-test-guest refuses its configuration on purpose: refuse")),
                "{lines:?}"
            );
            let shown = VmError::ConfigurationRefused(lines).to_string();
            assert!(
                shown.contains("proxy_on_configure returned false"),
                "{shown}"
            );
            assert!(
                shown.contains("refuses its configuration on purpose"),
                "{shown}"
            );
        }
        Err(other) => panic!("expected ConfigurationRefused, got {other}"),
    }
}

#[test]
fn unknown_scenario_is_refused_with_the_reason() {
    match try_start_module(
        guest(),
        r#"{"scenario": "nope"}"#,
        &GatewayOptions::default(),
    ) {
        Err(VmError::ConfigurationRefused(lines)) => {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(r#"unknown scenario "nope""#)),
                "{lines:?}"
            );
        }
        Err(other) => panic!("expected ConfigurationRefused, got {other}"),
        Ok(_) => panic!("started with an unknown scenario"),
    }
}
