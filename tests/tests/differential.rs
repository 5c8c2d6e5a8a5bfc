//! The differential suite: one table of requests sent to real Envoy and to host-shim, both
//! running envoy/envoy.yaml with the real plugin in front of the same Redis, relay and an echo
//! upstream that answers with what it received. Responses (status, header names, values and
//! order, body), the upstream's view of each request and the plugin's counters are compared
//! after normalising what differs from run to run (dates, request ids, timings, the `Host` each
//! client sent). Every difference fails the test unless `tests/differential-allowed.txt` lists
//! it with its reason; a listed difference that no longer occurs fails it too, so the list stays
//! as short as the truth.

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use krowoc_tests::{workspace_root, Gateway, Host, Stack, StackOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

const ALLOWED: &str = "tests/differential-allowed.txt";

/// The echo upstream: the request as it arrived (method, path, headers in order, body size),
/// cacheable when the path asks for it.
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    if uri.path() == "/echo/slow" {
        // Past the route timeout this suite sets (1 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let seen: Vec<Value> = headers
        .iter()
        .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let view = json!({
        "method": method.as_str(),
        "uri": uri.to_string(),
        "headers": seen,
        "body_bytes": body.len(),
    });
    let cache = if uri.path().starts_with("/api/cached-data") {
        "public, max-age=60"
    } else {
        "no-store"
    };
    let mut fields = vec![
        ("content-type", "application/json".to_string()),
        ("cache-control", cache.to_string()),
    ];
    if uri.path().ends_with("/etag") {
        fields.push(("etag", "\"v1\"".into()));
    }
    if uri.path().starts_with("/abi/") {
        // What the ABI guest's `headers` scenario rewrites and removes on the response.
        fields.push(("x-upstream-tag", "original".into()));
        fields.push(("x-upstream-secret", "s3cret".into()));
    }
    let mut response = axum::response::Response::new(axum::body::Body::from(view.to_string()));
    for (k, v) in fields {
        response
            .headers_mut()
            .insert(k, v.parse().expect("header value"));
    }
    if headers
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == b"\"v1\"")
    {
        *response.status_mut() = axum::http::StatusCode::NOT_MODIFIED;
        *response.body_mut() = axum::body::Body::empty();
    }
    response
}

/// One request of the table: raw bytes (so case, repetition and framing are exactly as given),
/// sent from a client address of its own on each host (rate limits are per client).
struct Case {
    name: &'static str,
    /// The request with `{host}` where the Host value goes.
    raw: String,
    /// How many times it is sent (the last answer is compared).
    times: usize,
    /// A wait before it is sent to either host.
    wait_first: Duration,
}

fn case(name: &'static str, raw: &str) -> Case {
    Case {
        name,
        raw: raw.to_string(),
        times: 1,
        wait_first: Duration::ZERO,
    }
}

/// A case sent after `wait` (past the reload interval after a trap).
fn case_after(wait: Duration, name: &'static str, raw: &str) -> Case {
    Case {
        wait_first: wait,
        ..case(name, raw)
    }
}

fn cases() -> Vec<Case> {
    let big = "x".repeat(1 << 20);
    vec![
        case("get", "GET /echo/plain HTTP/1.1\r\nhost: {host}\r\nuser-agent: diff/1\r\n\r\n"),
        case(
            "repeated and mixed-case headers",
            "GET /echo/headers HTTP/1.1\r\nHost: {host}\r\nX-Dup: a\r\nx-other: 1\r\nx-dup: b\r\nX-Mixed-Case: V\r\n\r\n",
        ),
        case(
            "small body",
            "POST /echo/body HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\n\r\n0123456789",
        ),
        case(
            "chunked body",
            "POST /echo/chunked HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        Case {
            name: "one mebibyte body",
            raw: format!(
                "POST /echo/big HTTP/1.1\r\nhost: {{host}}\r\ncontent-length: {}\r\n\r\n{big}",
                big.len()
            ),
            times: 1,
            wait_first: Duration::ZERO,
        },
        case("head", "HEAD /echo/head HTTP/1.1\r\nhost: {host}\r\n\r\n"),
        case(
            "conditional request",
            "GET /echo/etag HTTP/1.1\r\nhost: {host}\r\nif-none-match: \"v1\"\r\n\r\n",
        ),
        case(
            "client forwarding headers",
            "GET /echo/xff HTTP/1.1\r\nhost: {host}\r\nx-forwarded-for: 10.9.0.1\r\nx-request-id: client-chosen\r\nx-envoy-internal: true\r\n\r\n",
        ),
        case(
            "normalised path",
            "GET /echo//a/./b/../c HTTP/1.1\r\nhost: {host}\r\n\r\n",
        ),
        case(
            "header with underscore",
            "GET /echo/underscore HTTP/1.1\r\nhost: {host}\r\nx_y: 1\r\n\r\n",
        ),
        case(
            "local reply with a body",
            "POST /_krowoc/cache/purge HTTP/1.1\r\nhost: {host}\r\nx-krowoc-purge-token: wrong-token-wrong-token\r\ncontent-length: 0\r\n\r\n",
        ),
        case("http/1.0", "GET /echo/old HTTP/1.0\r\nhost: {host}\r\n\r\n"),
        case("a fragment in the target", "GET /echo/frag#part HTTP/1.1\r\nhost: {host}\r\n\r\n"),
        case(
            "content-length with chunked",
            "POST /echo/smuggle HTTP/1.1\r\nhost: {host}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        case(
            "chunked with content-length",
            "POST /echo/smuggle HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        case(
            "local reply before the body is read",
            "POST /_krowoc/cache/purge HTTP/1.1\r\nhost: {host}\r\nx-krowoc-purge-token: wrong-token-wrong-token\r\nconnection: keep-alive\r\ncontent-length: 10\r\n\r\n0123456789",
        ),
        case(
            "local reply to head",
            "HEAD /_krowoc/cache/purge HTTP/1.1\r\nhost: {host}\r\n\r\n",
        ),
        case(
            "upstream slower than the route timeout",
            "GET /echo/slow HTTP/1.1\r\nhost: {host}\r\n\r\n",
        ),
        Case {
            name: "rate limit denial",
            raw: "GET /api/rate-limited HTTP/1.1\r\nhost: {host}\r\n\r\n".into(),
            times: 6,
            wait_first: Duration::ZERO,
        },
        Case {
            name: "cache hit",
            raw: "GET /api/cached-data?user_id=diff HTTP/1.1\r\nhost: {host}\r\n\r\n".into(),
            times: 2,
            wait_first: Duration::ZERO,
        },
    ]
}

/// Sends `raw` on a new connection from `from` and reads one response: to the end of its
/// framing (content-length, the last chunk, or no body for HEAD, 1xx, 204 and 304), else until
/// the server closes. Not waiting for the close keeps each exchange short whatever the host's
/// delayed close, so that timings (the reload interval after a trap) stay apart from it.
fn exchange(from: IpAddr, to: SocketAddr, raw: &str) -> Vec<u8> {
    let mut stream =
        testkit::http::connect_from(from, to, Duration::from_secs(2)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // One request per connection: the server closes after answering it (unless the case says
    // how its connection goes on).
    let raw = if raw.to_ascii_lowercase().contains("\r\nconnection:") {
        raw.to_string()
    } else {
        raw.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1)
    };
    stream.write_all(raw.as_bytes()).expect("write");
    let head_request = raw.starts_with("HEAD ");
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if response_complete(&out, head_request) {
            return out;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether `bytes` hold a whole response.
fn response_complete(bytes: &[u8], head_request: bool) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let body = &bytes[end + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if head_request || status < 200 || status == 204 || status == 304 {
        return true;
    }
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if let Some(n) = field("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

/// A response as compared: the status line, `name: value` lines in order, the body — each
/// normalised.
#[derive(Debug)]
struct Seen {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

const VARYING_VALUES: [&str; 5] = [
    "date",
    "x-request-id",
    "x-envoy-upstream-service-time",
    "age",
    "content-length",
];

/// `host_name`, `client` and the gateway's `listener` (each host's own, so that rate limits and
/// cache keys stay apart) read as `HOST`, `CLIENT` and `LISTENER`; UUIDs (request and event
/// ids) as `UUID`.
fn normalise(raw: &[u8], host_name: &str, client: IpAddr, listener: SocketAddr) -> Seen {
    let names = |text: &str| {
        blank_client_ports(&blank_uuids(
            &text
                .replace(host_name, "HOST")
                .replace(&listener.to_string(), "LISTENER")
                .replace(&client.to_string(), "CLIENT"),
        ))
    };
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head = names(head);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            let k = k.trim().to_ascii_lowercase();
            let v = if VARYING_VALUES.contains(&k.as_str()) {
                "…".to_string()
            } else if k == "cache-status" {
                // The remaining freshness counts down with the clock.
                blank_ttl(v.trim())
            } else {
                v.trim().to_string()
            };
            (k, v)
        })
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    // The framing itself is compared through the headers; the body as its data (de-chunked
    // before any name is replaced, since the chunk sizes count the original bytes).
    let body = names(&if chunked {
        dechunk(body)
    } else {
        body.to_string()
    });
    Seen {
        status,
        headers,
        body: normalise_body(&body),
    }
}

/// The data of a chunked body (what is left unparsed is kept as it is).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            return out;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out.push_str(body);
    out
}

/// Fields of JSON bodies (the echo's view, the ABI guest's reports) whose values differ from
/// run to run or between the two gateways' listeners.
const VARYING_FIELDS: [&str; 5] = [
    "retry_after",
    "request.time",
    "source.port",
    "destination.port",
    "x-envoy-upstream-service-time",
];

/// JSON bodies with their varying values blanked, at any depth (the ABI guest reports nest the
/// echo's view as a string); other bodies as they are.
fn normalise_body(body: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(body) else {
        // Not JSON: compared as it is.
        return body.to_string();
    };
    blank_varying(&mut v);
    v.to_string()
}

fn blank_varying(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, value) in map.iter_mut() {
                if VARYING_FIELDS.contains(&k.as_str()) {
                    *value = json!("…");
                } else {
                    blank_varying(value);
                }
                // Envoy lists a header-map attribute in its hash order, which varies.
                if k.ends_with(".headers") {
                    if let Value::Array(pairs) = value {
                        pairs.sort_by_key(|p| p.to_string());
                    }
                }
            }
        }
        Value::Array(items) => {
            // `[name, value]` header pairs.
            if let [Value::String(k), value] = items.as_mut_slice() {
                if VARYING_VALUES.contains(&k.as_str()) {
                    *value = json!("…");
                    return;
                }
            }
            items.iter_mut().for_each(blank_varying);
        }
        Value::String(text) => {
            if let Ok(mut inner) = serde_json::from_str::<Value>(text) {
                if inner.is_object() || inner.is_array() {
                    blank_varying(&mut inner);
                    *text = inner.to_string();
                }
            }
        }
        _ => {}
    }
}

/// `ttl=<seconds>` in a Cache-Status value reads as `ttl=…`.
fn blank_ttl(value: &str) -> String {
    value
        .split("; ")
        .map(|p| if p.starts_with("ttl=") { "ttl=…" } else { p })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `CLIENT:<port>` (the client's ephemeral port) reads as `CLIENT:PORT`.
fn blank_client_ports(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("CLIENT:") {
        let (before, after) = rest.split_at(at + "CLIENT:".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            out.push_str("PORT");
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// `8-4-4-4-12` hex groups read as `UUID`.
fn blank_uuids(text: &str) -> String {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let bytes = text.as_bytes();
    let uuid_at = |at: usize| -> bool {
        let mut pos = at;
        for (i, n) in GROUPS.iter().enumerate() {
            if i > 0 {
                if bytes.get(pos) != Some(&b'-') {
                    return false;
                }
                pos += 1;
            }
            match bytes.get(pos..pos + n) {
                Some(g) if g.iter().all(u8::is_ascii_hexdigit) => pos += n,
                _ => return false,
            }
        }
        true
    };
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        if text.is_char_boundary(at) && uuid_at(at) {
            out.push_str("UUID");
            at += 36;
        } else {
            let c = text[at..].chars().next().unwrap_or(' ');
            out.push(c);
            at += c.len_utf8();
        }
    }
    out
}

/// The plugin's log lines (`wasm log <plugin> <root_id>: message`) as `[level] message`,
/// sorted (VMs on different threads interleave).
fn plugin_log_lines(log: &str) -> Vec<String> {
    let mut lines: Vec<String> = log
        .lines()
        .filter_map(|line| {
            let (head, rest) = line.split_once("wasm log ")?;
            let level = head
                .split("][")
                .find(|f| ["trace", "debug", "info", "warning", "error", "critical"].contains(f))?;
            let (_, message) = rest.split_once(": ")?;
            Some(format!("[{level}] {}", blank_uuids(message)))
        })
        .collect();
    lines.sort();
    lines
}

/// The differences between the two answers to one case, as `case: what`.
fn differences(case: &str, envoy: &Seen, shim: &Seen) -> Vec<String> {
    let mut out = Vec::new();
    if envoy.status != shim.status {
        out.push(format!(
            "{case}: status (envoy {:?}, host-shim {:?})",
            envoy.status, shim.status
        ));
    }
    let names = |s: &Seen| s.headers.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    let (en, sn) = (names(envoy), names(shim));
    let all: BTreeSet<&String> = en.iter().chain(sn.iter()).collect();
    for name in all {
        let values = |s: &Seen| {
            s.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        let (ev, sv) = (values(envoy), values(shim));
        if ev != sv {
            out.push(format!(
                "{case}: header {name} (envoy {ev:?}, host-shim {sv:?})"
            ));
        }
    }
    let common = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|n| b.contains(n)).cloned().collect()
    };
    if common(&en, &sn) != common(&sn, &en) {
        out.push(format!(
            "{case}: header order (envoy {en:?}, host-shim {sn:?})"
        ));
    }
    if envoy.body != shim.body {
        out.push(format!(
            "{case}: body (envoy {:?}, host-shim {:?})",
            envoy.body, shim.body
        ));
    }
    out
}

/// The allow-list: `case: what` keys (the text before ` (`), each with its reason after ` — `.
fn allowed() -> Vec<String> {
    let text =
        std::fs::read_to_string(workspace_root().join(ALLOWED)).expect("read the allow-list");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (key, reason) = l
                .split_once(" — ")
                .unwrap_or_else(|| panic!("{ALLOWED}: no ` — reason` in {l:?}"));
            assert!(
                !reason.trim().is_empty(),
                "{ALLOWED}: empty reason in {l:?}"
            );
            key.trim().to_string()
        })
        .collect()
}

fn key(difference: &str) -> &str {
    difference.split_once(" (").map_or(difference, |(k, _)| k)
}

/// One host's side of a comparison: its gateway, the `Host` its clients send and the address
/// they connect from.
struct Side<'a> {
    gateway: &'a Gateway,
    host_name: &'static str,
    client: IpAddr,
}

/// Waits (up to 3 s) until the plugin's cache counters have not moved for 250 ms, longer than
/// the plugin's store tick and a Redis round trip: a store the previous answer started has
/// been counted (stored, not stored or failed).
fn settled(gateway: &Gateway) {
    let counters = || -> Vec<String> {
        testkit::http::get(gateway.admin, "/stats/prometheus")
            .text()
            .lines()
            .filter(|l| l.starts_with("krowoc_cache_"))
            .map(str::to_string)
            .collect()
    };
    let mut last = counters();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(250));
        let now = counters();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Envoy's side and host-shim's: each with a `Host` and a client address of its own.
fn sides<'a>(envoy: &'a Gateway, shim: &'a Gateway) -> [Side<'a>; 2] {
    [
        Side {
            gateway: envoy,
            host_name: "envoy.test",
            client: IpAddr::from([127, 0, 0, 11]),
        },
        Side {
            gateway: shim,
            host_name: "hshim.test",
            client: IpAddr::from([127, 0, 0, 12]),
        },
    ]
}

/// Sends every case to both sides (Envoy first) and returns the differences, each case named
/// `prefix` + its name.
fn compare(prefix: &str, cases: &[Case], sides: &[Side; 2]) -> Vec<String> {
    let mut found = Vec::new();
    for c in cases {
        std::thread::sleep(c.wait_first);
        let seen: Vec<Seen> = sides
            .iter()
            .map(|side| {
                let raw = c.raw.replace("{host}", side.host_name);
                let mut answer = Vec::new();
                for i in 0..c.times {
                    answer = exchange(side.client, side.gateway.addr, &raw);
                    if i + 1 < c.times {
                        // The cache stores after the client has its answer (on a tick).
                        settled(side.gateway);
                    }
                }
                normalise(&answer, side.host_name, side.client, side.gateway.addr)
            })
            .collect();
        found.extend(differences(
            &format!("{prefix}{}", c.name),
            &seen[0],
            &seen[1],
        ));
    }
    found
}

/// The plugin's log lines on both sides, compared as sorted lists.
fn compare_logs(what: &str, envoy: &Gateway, shim: &Gateway) -> Vec<String> {
    let (e, s) = (
        plugin_log_lines(&envoy.log()),
        plugin_log_lines(&shim.log()),
    );
    if e == s {
        return Vec::new();
    }
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    vec![format!(
        "{what}: plugin log (only envoy {:?}, only host-shim {:?}, envoy {} lines, host-shim {})",
        only(&e, &s),
        only(&s, &e),
        e.len(),
        s.len()
    )]
}

/// The ABI test guest's scenarios that show a host's behaviour: header edits, a trap in each
/// phase (the shipped yaml reloads the VM after one), properties, and what each phase can
/// read and how bodies arrive.
fn guest_tables() -> Vec<(&'static str, Vec<Case>)> {
    // Envoy's reload interval is 1 s (base_interval) to 1.5 s, drawn at random.
    let past_reload = Duration::from_millis(1600);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: {{host}}\r\n\r\n");
    vec![
        (
            "headers",
            vec![
                case(
                    "edits seen by the upstream and the client",
                    "GET /abi/edit HTTP/1.1\r\nhost: {host}\r\nx-replace-me: a\r\nx-dup: 1\r\nx-replace-me: b\r\nx-remove-me: c\r\nx-remove-too: d\r\nx-dup: 2\r\n\r\n",
                ),
                case(
                    "pairs in the host's order",
                    "GET /echo HTTP/1.1\r\nhost: {host}\r\nx-probe: p\r\nX-Dup: 1\r\nx-b: 2\r\nx-dup: 3\r\n\r\n",
                ),
                case(
                    "edits read back",
                    "GET /edit-echo HTTP/1.1\r\nhost: {host}\r\nx-added: zero\r\nx-replace-me: a\r\nx-remove-me: c\r\n\r\n",
                ),
                case(
                    "path rewritten",
                    "GET /abi/from HTTP/1.1\r\nhost: {host}\r\nx-rewrite-path: /abi/to?q=1\r\n\r\n",
                ),
                case("maps replaced", &get("/set-pairs-keep-proto")),
                case("maps replaced without x-forwarded-proto", &get("/set-pairs")),
            ],
        ),
        (
            // The shipped yaml's FAIL_RELOAD: within the reload interval (1 s to 1.5 s) of the
            // last load a trapped VM stays failed; the first request after it loads a new one.
            "misbehave",
            vec![
                case("trap in request headers", &get("/panic")),
                case_after(past_reload, "reloaded after the interval", &get("/ok")),
                case("trap in response headers", &get("/panic-response")),
                case("failed within the interval", &get("/ok")),
                case_after(past_reload, "reloaded after the response trap", &get("/ok")),
                case(
                    "trap in the request body",
                    "POST /panic-body HTTP/1.1\r\nhost: {host}\r\ncontent-length: 4\r\n\r\nbody",
                ),
                case("failed within the interval after the body trap", &get("/ok")),
                case_after(past_reload, "reloaded after the body trap", &get("/ok")),
                case("passed through", &get("/abi/through")),
            ],
        ),
        (
            "properties",
            vec![case(
                "request properties",
                "GET /props/a?x=1&y=2 HTTP/1.1\r\nhost: {host}\r\nx-probe: 1\r\nx-probe: 2\r\nuser-agent: diff/1\r\n\r\n",
            )],
        ),
        (
            "phases",
            vec![
                case("no body", &get("/abi/phases-get")),
                case(
                    "small body",
                    "POST /abi/phases-post HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\nx-phase-id: small\r\n\r\n0123456789",
                ),
                case(
                    "chunked body",
                    "POST /abi/phases-chunked HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\nx-phase-id: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                ),
                case("log phase of the small body", &get("/report?id=small")),
                case("log phase of the chunked body", &get("/report?id=chunked")),
                case(
                    "paused on a call",
                    "POST /pause-call HTTP/1.1\r\nhost: {host}\r\ncontent-length: 10\r\n\r\n0123456789",
                ),
            ],
        ),
    ]
}

/// An upstream on raw sockets: for each request it answers with the field names of the head it
/// received, in order, as a JSON list, and with repeated response fields interleaved
/// (`x-dup`, `x-mid`, `x-dup`), which neither axum nor hyper would write.
fn raw_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the raw upstream");
    let addr = listener.local_addr().expect("raw upstream address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let names: Vec<String> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, _)| k.trim().to_ascii_lowercase())
                        .collect();
                    let body = json!({ "names": names }).to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nx-dup: a\r\ncontent-type: application/json\r\nx-mid: m\r\nx-dup: b\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The ABI test guest as stock Envoy loads it, built beside the stock plugin.
fn stock_guest_wasm() -> PathBuf {
    let path = krowoc_tests::stock_plugin_wasm().with_file_name("abi_test_guest.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

#[test]
fn envoy_and_host_shim_answer_the_same_table_alike() {
    let stack = Stack::start_with(StackOptions {
        host: Host::Envoy,
        connection_manager: Some(krowoc_tests::catch_all_timeout("1s")),
        ..StackOptions::default()
    });
    let echo_addr = stack.runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let app = axum::Router::new().fallback(echo);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    });
    let envoy = stack.spawn_gateway_on(Host::Envoy, 1, &[("upstream", echo_addr)]);
    let shim = stack.spawn_gateway_on(Host::HostShim, 1, &[("upstream", echo_addr)]);
    let mut found = compare("", &cases(), &sides(&envoy, &shim));

    // An upstream that is down (nothing listens on its port).
    let dead = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
    let down = [
        stack.spawn_gateway_on(Host::Envoy, 1, &[("upstream", dead)]),
        stack.spawn_gateway_on(Host::HostShim, 1, &[("upstream", dead)]),
    ];
    found.extend(compare(
        "",
        &[case(
            "upstream down",
            "GET /echo/down HTTP/1.1\r\nhost: {host}\r\n\r\n",
        )],
        &sides(&down[0], &down[1]),
    ));

    // The plugin's own counters after the same requests (event flushes vary with timing).
    let counters = |gateway: &Gateway| -> Vec<String> {
        testkit::http::get(gateway.admin, "/stats/prometheus")
            .text()
            .lines()
            .filter(|l| l.starts_with("krowoc_rate_limit_") || l.starts_with("krowoc_cache_"))
            .map(str::to_string)
            .collect()
    };
    let (ec, sc) = (counters(&envoy), counters(&shim));
    if ec != sc {
        found.push(format!(
            "metrics: plugin counters (envoy {ec:?}, host-shim {sc:?})"
        ));
    }
    found.extend(compare_logs("plugin", &envoy, &shim));

    // The ABI test guest, one gateway per scenario on each host, the same module in both.
    let guest = stock_guest_wasm();
    let mut envoy_logs = vec![envoy.log()];
    for (scenario, table) in guest_tables() {
        let on =
            |host| stack.spawn_module_on(host, 1, &[("upstream", echo_addr)], &guest, scenario);
        let (e, s) = (on(Host::Envoy), on(Host::HostShim));
        found.extend(compare(
            &format!("abi {scenario}: "),
            &table,
            &sides(&e, &s),
        ));
        found.extend(compare_logs(&format!("abi {scenario}"), &e, &s));
        envoy_logs.push(e.log());
    }

    // Repeated fields in wire order, through an upstream that reads and writes raw bytes: it
    // answers with the request's field names as it received them and interleaved repeated
    // response fields; the phases guest reports the response map's names in the log phase.
    let raw = raw_upstream();
    let on = |host| stack.spawn_module_on(host, 1, &[("upstream", raw)], &guest, "phases");
    let (e, s) = (on(Host::Envoy), on(Host::HostShim));
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: {{host}}\r\n\r\n");
    found.extend(compare(
        "field order: ",
        &[
            case(
                "repeated fields",
                "GET /raw HTTP/1.1\r\nhost: {host}\r\nx-phase-id: order\r\nx-dup: 1\r\nx-mid: 2\r\nx-dup: 3\r\n\r\n",
            ),
            case("as the plugin read them", &get("/report?id=order")),
        ],
        &sides(&e, &s),
    ));

    let allowed = allowed();
    let unexplained: Vec<&String> = found
        .iter()
        .filter(|d| !allowed.iter().any(|a| a == key(d)))
        .collect();
    let stale: Vec<&String> = allowed
        .iter()
        .filter(|a| !found.iter().any(|d| key(d) == a.as_str()))
        .collect();
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "differences between Envoy and host-shim not in {ALLOWED}:\n{}\n\nlisted there but no \
         longer different:\n{}\n\nEnvoy's logs:\n{}",
        unexplained
            .iter()
            .map(|d| format!("  {d}"))
            .collect::<Vec<_>>()
            .join("\n"),
        stale
            .iter()
            .map(|d| format!("  {d}"))
            .collect::<Vec<_>>()
            .join("\n"),
        envoy_logs.join("\n---\n")
    );
}
