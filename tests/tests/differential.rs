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
use krowoc_tests::{workspace_root, Host, Stack, StackOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
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
}

fn case(name: &'static str, raw: &str) -> Case {
    Case {
        name,
        raw: raw.to_string(),
        times: 1,
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
        },
        Case {
            name: "cache hit",
            raw: "GET /api/cached-data?user_id=diff HTTP/1.1\r\nhost: {host}\r\n\r\n".into(),
            times: 2,
        },
    ]
}

/// Sends `raw` on a new connection from `from` and reads the answer until the server closes.
fn exchange(from: IpAddr, to: SocketAddr, raw: &str) -> Vec<u8> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .expect("bind client");
    socket
        .connect_timeout(&to.into(), Duration::from_secs(2))
        .expect("connect");
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // One request per connection: the server closes after answering it.
    let raw = raw.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1);
    stream.write_all(raw.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
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

/// `host_name` and `client` (each host's own, so that rate limits and cache keys stay apart)
/// read as `HOST` and `CLIENT`.
fn normalise(raw: &[u8], host_name: &str, client: IpAddr) -> Seen {
    let text = String::from_utf8_lossy(raw)
        .replace(host_name, "HOST")
        .replace(&client.to_string(), "CLIENT");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            let k = k.trim().to_ascii_lowercase();
            let v = if VARYING_VALUES.contains(&k.as_str()) {
                "…".to_string()
            } else {
                v.trim().to_string()
            };
            (k, v)
        })
        .collect();
    Seen {
        status,
        headers,
        body: normalise_body(body),
    }
}

/// The echo's JSON with request ids and timings blanked; other bodies as they are.
fn normalise_body(body: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<Value>(body) else {
        // A chunked or empty body; the framing itself is compared through the headers.
        return body.chars().take(400).collect();
    };
    if let Some(headers) = v.get_mut("headers").and_then(Value::as_array_mut) {
        for pair in headers.iter_mut() {
            if let Some([k, value]) = pair.as_array_mut().map(|a| a.as_mut_slice()) {
                if VARYING_VALUES.contains(&k.as_str().unwrap_or_default()) {
                    *value = json!("…");
                }
            }
        }
    }
    for field in ["retry_after"] {
        if v.get(field).is_some() {
            v[field] = json!("…");
        }
    }
    v.to_string()
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

#[test]
fn envoy_and_host_shim_answer_the_same_table_alike() {
    let stack = Stack::start_with(StackOptions {
        host: Host::Envoy,
        connection_manager: Some(Box::new(|hcm| {
            hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] = "1s".into();
        })),
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
    let hosts = [
        ("envoy", &envoy, "envoy.test", [127, 0, 0, 11]),
        ("host-shim", &shim, "shim.test", [127, 0, 0, 12]),
    ];

    let mut found = Vec::new();
    for c in cases() {
        let mut seen = Vec::new();
        for (_, gateway, host_name, client) in &hosts {
            let raw = c.raw.replace("{host}", host_name);
            let mut answer = Vec::new();
            for _ in 0..c.times {
                answer = exchange(IpAddr::from(*client), gateway.addr, &raw);
                // The cache stores after the client has its answer: give it a moment.
                std::thread::sleep(Duration::from_millis(50));
            }
            seen.push(normalise(&answer, host_name, IpAddr::from(*client)));
        }
        found.extend(differences(c.name, &seen[0], &seen[1]));
    }
    // An upstream that is down (nothing listens on its port).
    let dead = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
    let down = [
        stack.spawn_gateway_on(Host::Envoy, 1, &[("upstream", dead)]),
        stack.spawn_gateway_on(Host::HostShim, 1, &[("upstream", dead)]),
    ];
    let raw = "GET /echo/down HTTP/1.1\r\nhost: down.test\r\n\r\n";
    let seen: Vec<Seen> = down
        .iter()
        .map(|g| {
            normalise(
                &exchange(IpAddr::from([127, 0, 0, 13]), g.addr, raw),
                "down.test",
                IpAddr::from([127, 0, 0, 13]),
            )
        })
        .collect();
    found.extend(differences("upstream down", &seen[0], &seen[1]));

    // The plugin's own counters after the same requests (event flushes vary with timing).
    let counters = |gateway: &krowoc_tests::Gateway| -> Vec<String> {
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
         longer different:\n{}\n\nEnvoy's log:\n{}",
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
        envoy.log()
    );
}
