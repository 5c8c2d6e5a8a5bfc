//! Request events end to end: real redis-server, relay, upstream, host-shim running
//! envoy/envoy.yaml (which turns events on for every request) with the real plugin.wasm —
//! with transport `relay` and with `redis_call`. Events are read the ways a consumer reads them:
//! a raw SUBSCRIBE connection, the stream (XRANGE), and the upstream's `/api/recent-events`.

use krowoc_tests::{eventually, Host, Stack, StackOptions};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const RELAY: &str = "relay";
const REDIS_CALL: &str = "redis_call";
const CHANNEL: &str = "krowoc:requests";
const STREAM: &str = "krowoc:events";

use krowoc_tests::use_transport;

fn stack_with(
    host: Host,
    transport: &'static str,
    workers: usize,
    tweak: impl Fn(&mut Value) + 'static,
) -> Stack {
    Stack::start_with(StackOptions {
        host,
        plugin_config: Some(Box::new(move |cfg: &mut Value| {
            use_transport(cfg, transport);
            tweak(cfg);
        })),
        // These tests find a request's event by the x-request-id they send: the gateway keeps
        // it, as it would behind a trusted edge (envoy.yaml as shipped regenerates it).
        connection_manager: Some(Box::new(|hcm| {
            hcm.insert("preserve_external_request_id".into(), true.into());
        })),
        workers,
        ..StackOptions::default()
    })
}

// ---- a raw RESP subscriber --------------------------------------------------------------------

/// One RESP value (enough of RESP2 for SUBSCRIBE traffic).
#[derive(Debug)]
enum Resp {
    Bulk(Vec<u8>),
    /// A status, error or integer line (these tests never look inside).
    Line,
    Array(Vec<Resp>),
    Nil,
}

/// Parses one value at the start of `buf`: the value and its length, or None if incomplete.
fn parse_resp(buf: &[u8]) -> Option<(Resp, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b'+' | b'-' | b':' => Some((Resp::Line, after)),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some((Resp::Nil, after));
            }
            let end = after + usize::try_from(n).ok()?;
            (buf.len() >= end + 2).then(|| (Resp::Bulk(buf[after..end].to_vec()), end + 2))
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut items = Vec::new();
            let mut pos = after;
            for _ in 0..n.max(0) {
                let (item, used) = parse_resp(&buf[pos..])?;
                items.push(item);
                pos += used;
            }
            Some((Resp::Array(items), pos))
        }
        _ => panic!("not RESP: {:?}", String::from_utf8_lossy(buf)),
    }
}

/// A client that SUBSCRIBEs on its own connection, as the guide's listener thread does.
struct Subscriber {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Subscriber {
    fn connect(redis: SocketAddr, channels: &[&str]) -> Subscriber {
        let stream = TcpStream::connect(redis).expect("connect to redis");
        let mut args = vec!["SUBSCRIBE"];
        args.extend_from_slice(channels);
        let mut s = Subscriber {
            stream,
            buf: Vec::new(),
        };
        s.stream
            .write_all(&testkit::encode_command(&args))
            .expect("SUBSCRIBE");
        for _ in channels {
            match s.next_value(Duration::from_secs(5)) {
                Some(Resp::Array(parts)) if matches!(parts.first(), Some(Resp::Bulk(k)) if k == b"subscribe") =>
                    {}
                other => panic!("SUBSCRIBE answered {other:?}"),
            }
        }
        s
    }

    fn next_value(&mut self, timeout: Duration) -> Option<Resp> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((value, used)) = parse_resp(&self.buf) {
                self.buf.drain(..used);
                return Some(value);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    /// The next message's channel and payload within `timeout`.
    fn next_message(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if let Resp::Array(parts) = self.next_value(left)? {
                if let [Resp::Bulk(kind), Resp::Bulk(channel), Resp::Bulk(payload)] =
                    parts.as_slice()
                {
                    if kind == b"message" {
                        return Some((
                            String::from_utf8_lossy(channel).into_owned(),
                            payload.clone(),
                        ));
                    }
                }
            }
        }
    }

    /// The first JSON message on `channel` that `wanted` accepts, within `timeout`.
    fn wait_for(
        &mut self,
        channel: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (ch, payload) = self.next_message(left)?;
            let value: Value = serde_json::from_slice(&payload)
                .unwrap_or_else(|e| panic!("message on {ch} is not JSON ({e}): {payload:?}"));
            if ch == channel && wanted(&value) {
                return Some(value);
            }
        }
    }
}

// ---- helpers ------------------------------------------------------------------------------------

fn get_with_id(stack: &Stack, path: &str, id: &str) -> krowoc_tests::Response {
    stack.request(
        "GET",
        path,
        &[("x-request-id", id), ("user-agent", "krowoc-e2e/1")],
        b"",
    )
}

/// The events in the stream, oldest first.
fn stream_events(stack: &Stack) -> Vec<Value> {
    let raw = stack
        .redis
        .try_command(&["XRANGE", STREAM, "-", "+"])
        .unwrap_or_default();
    let Some((Resp::Array(entries), _)) = parse_resp(&raw) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| match entry {
            Resp::Array(parts) => match parts.as_slice() {
                [_, Resp::Array(fields)] => match fields.as_slice() {
                    [Resp::Bulk(name), Resp::Bulk(event)] if name == b"event" => {
                        serde_json::from_slice(event).ok()
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The `request_id` (the client's `x-request-id`) of the events in the stream, oldest first.
fn stream_request_ids(stack: &Stack) -> Vec<String> {
    stream_events(stack)
        .iter()
        .filter_map(|e| e["request_id"].as_str().map(str::to_string))
        .collect()
}

/// The `request_id` of the events the upstream's background subscriber received on the
/// request channel.
fn recent_request_ids(stack: &Stack) -> Vec<String> {
    let resp = stack.get("/api/recent-events?channel=krowoc:requests&limit=100");
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["message"]["request_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

const WAIT: Duration = Duration::from_secs(10);

// ---- tests ----------------------------------------------------------------------------------------

fn a_request_is_published_to_subscribers_the_stream_and_recent_events(
    host: Host,
    transport: &'static str,
) {
    let stack = stack_with(host, transport, 2, |_| {});
    let mut sub = Subscriber::connect(stack.redis.addr(), &[CHANNEL]);

    let id = format!("e2e-{transport}-1");
    let resp = get_with_id(&stack, "/api/rate-limited", &id);
    assert_eq!(resp.status, 200, "{}", resp.text());

    let event = sub
        .wait_for(CHANNEL, WAIT, |e| e["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no event with request_id {id} on {CHANNEL}"));
    assert_eq!(event["event_type"], "http_request");
    assert_eq!(event["method"], "GET");
    assert_eq!(event["path"], "/api/rate-limited");
    assert_eq!(event["route"], "rate-limited");
    assert_eq!(event["status"], 200);
    assert_eq!(event["rate_limit"], "allowed");
    assert_eq!(event["cache"], Value::Null);
    assert_eq!(event["client"], "127.0.0.1");
    assert_eq!(event["user_agent"], "krowoc-e2e/1");
    assert_eq!(event["sample_ratio"], 1.0);
    assert!(
        event["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{event}"
    );
    assert!(
        event["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{event}"
    );
    let ts = event["timestamp_unix_ms"]
        .as_u64()
        .expect("timestamp_unix_ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        now_ms.abs_diff(ts) < 60_000,
        "timestamp {ts} vs now {now_ms}"
    );

    // The same event in the replayable stream and in the upstream's subscriber.
    assert!(
        eventually(WAIT, || stream_request_ids(&stack).contains(&id)),
        "{id} not in {STREAM}: {:?}",
        stream_request_ids(&stack)
    );
    assert!(
        eventually(WAIT, || recent_request_ids(&stack).contains(&id)),
        "{id} not in /api/recent-events: {:?}",
        recent_request_ids(&stack)
    );

    // A request the filter answers itself is published with the filter's decision.
    for i in 2..=5 {
        assert_eq!(
            get_with_id(&stack, "/api/rate-limited", &format!("e2e-{transport}-{i}")).status,
            200
        );
    }
    let denied_id = format!("e2e-{transport}-denied");
    assert_eq!(
        get_with_id(&stack, "/api/rate-limited", &denied_id).status,
        429
    );
    let denied = sub
        .wait_for(CHANNEL, WAIT, |e| e["request_id"] == denied_id.as_str())
        .unwrap_or_else(|| panic!("no event for the denied request"));
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["rate_limit"], "denied");

    // A request without x-request-id gets the gateway's (as from an edge Envoy); one on no route
    // has route null.
    assert_eq!(stack.get("/health").status, 200);
    let unrouted = sub
        .wait_for(CHANNEL, WAIT, |e| e["path"] == "/health")
        .expect("event for /health");
    assert_eq!(unrouted["route"], Value::Null);
    assert_eq!(unrouted["rate_limit"], Value::Null);
    assert_eq!(
        unrouted["id"].as_str().map(str::len),
        Some(36),
        "{unrouted}"
    );
    assert_eq!(
        unrouted["request_id"].as_str().map(str::len),
        Some(36),
        "{unrouted}"
    );

    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_published") >= 8),
        "published: {}",
        stack.metrics()
    );
    // Envoy merges the workers' histograms into what it prints at each stats flush (every 5 s).
    assert!(
        eventually(Duration::from_secs(12), || stack
            .metric("krowoc_events_batch_size_count")
            >= 1),
        "{}",
        stack.metrics()
    );
    let metrics = stack.metrics();
    for name in ["krowoc_events_flushes", "krowoc_events_recorded"] {
        assert!(
            krowoc_tests::metric_value(&metrics, name) >= 1,
            "{name}:\n{metrics}"
        );
    }
    assert_eq!(
        krowoc_tests::metric_value(&metrics, "krowoc_events_dropped"),
        0
    );
}

krowoc_tests::on_both_hosts!(
    relay_requests_are_published_to_subscribers_the_stream_and_recent_events
);
fn relay_requests_are_published_to_subscribers_the_stream_and_recent_events(host: Host) {
    a_request_is_published_to_subscribers_the_stream_and_recent_events(host, RELAY);
}

krowoc_tests::on_host_shim_only!(
    redis_call: redis_call_requests_are_published_to_subscribers_the_stream_and_recent_events
);
fn redis_call_requests_are_published_to_subscribers_the_stream_and_recent_events(host: Host) {
    a_request_is_published_to_subscribers_the_stream_and_recent_events(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(a_clients_request_id_is_reported_and_never_becomes_the_event_id);
fn a_clients_request_id_is_reported_and_never_becomes_the_event_id(host: Host) {
    let stack = stack_with(host, RELAY, 2, |_| {});
    let mut sub = Subscriber::connect(stack.redis.addr(), &[CHANNEL]);
    let chosen = "another-requests-id";
    for _ in 0..2 {
        assert_eq!(get_with_id(&stack, "/health", chosen).status, 200);
    }
    let mut event_ids = Vec::new();
    for _ in 0..2 {
        let event = sub
            .wait_for(CHANNEL, WAIT, |e| e["request_id"] == chosen)
            .unwrap_or_else(|| panic!("no event with request_id {chosen}"));
        let id = event["id"].as_str().expect("id").to_string();
        assert_ne!(id, chosen, "{event}");
        assert_eq!(id.len(), 36, "a generated UUID: {event}");
        event_ids.push(id);
    }
    assert_ne!(
        event_ids[0], event_ids[1],
        "one client x-request-id, two events"
    );
}

krowoc_tests::on_both_hosts!(publish_event_through_the_gateway_reaches_a_subscriber);
fn publish_event_through_the_gateway_reaches_a_subscriber(host: Host) {
    let stack = stack_with(host, RELAY, 1, |_| {});
    let mut sub = Subscriber::connect(stack.redis.addr(), &["app:events", CHANNEL]);
    let body = json!({
        "channel": "app:events",
        "message": {"event_type": "user_registered", "user_id": 123},
    });
    let resp = stack.request(
        "POST",
        "/api/publish-event",
        &[
            ("content-type", "application/json"),
            ("x-request-id", "pub-1"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.json()["receivers"].as_i64().is_some_and(|n| n >= 1),
        "{}",
        resp.text()
    );
    let app = sub
        .wait_for("app:events", WAIT, |_| true)
        .expect("the app event");
    assert_eq!(app["event_type"], "user_registered");
    assert_eq!(app["user_id"], 123);
    // And the request itself is an event on the request channel.
    let request = sub
        .wait_for(CHANNEL, WAIT, |e| e["request_id"] == "pub-1")
        .expect("the request event");
    assert_eq!(request["method"], "POST");
    assert_eq!(request["path"], "/api/publish-event");
    assert_eq!(request["status"], 200);
}

fn redis_down_costs_nothing_and_queued_events_arrive_after_it_returns(
    host: Host,
    transport: &'static str,
) {
    // One worker (one VM, one queue) so the bound is exact; a short cool-down so the test is quick.
    let mut stack = stack_with(host, transport, 1, |cfg| {
        cfg["events"]["queue_limit"] = json!(10);
        cfg["events"]["batch_size"] = json!(5);
        cfg["redis"]["breaker"] = json!({"failures": 2, "cooldown": "300ms"});
    });
    let baseline = stack.get("/health");
    assert_eq!(baseline.status, 200);
    assert!(
        eventually(WAIT, || stream_events(&stack).len() == 1),
        "the first event reaches Redis while it is up"
    );
    // And the filter has the flush's answer: stopped between the flush's XADD and its PUBLISH,
    // Redis would fail the flush and the event would be queued again (at least once delivery),
    // one more than the counts below expect.
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_published") == 1),
        "{}",
        stack.metrics()
    );
    stack.redis.stop();

    let started = Instant::now();
    for i in 0..30 {
        let resp = get_with_id(&stack, "/health", &format!("down-{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} with Redis down: {}",
            resp.text()
        );
        assert_eq!(resp.json()["status"], "pass");
        assert!(resp.header("x-krowoc-edge").is_some());
        // Let ticks run so flushes are attempted (and fail) while requests keep coming.
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "30 requests with Redis down took {elapsed:?}"
    );
    // 30 events, 10 kept: the 20 oldest are dropped and counted.
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_dropped") == 20),
        "dropped: {}\n{}",
        stack.metric("krowoc_events_dropped"),
        stack.metrics()
    );
    assert!(stack.metric("krowoc_events_flush_failures") >= 1);
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_queued") == 10),
        "{}",
        stack.metrics()
    );

    // Redis returns (empty: no persistence): the 10 newest queued events are written.
    stack.redis.restart();
    let expected: Vec<String> = (20..30).map(|i| format!("down-{i}")).collect();
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    assert!(
        eventually(Duration::from_secs(15), || sorted(stream_request_ids(
            &stack
        )) == expected),
        "stream after restart: {:?}",
        stream_request_ids(&stack)
    );
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_queued") == 0),
        "{}",
        stack.metrics()
    );
    assert_eq!(stack.metric("krowoc_events_published"), 11);
    // And events flow normally again.
    assert_eq!(get_with_id(&stack, "/health", "after").status, 200);
    assert!(
        eventually(WAIT, || stream_request_ids(&stack)
            .contains(&"after".to_string())),
        "{:?}",
        stream_request_ids(&stack)
    );
}

krowoc_tests::on_both_hosts!(
    relay_with_redis_down_responses_are_unaffected_and_events_wait_up_to_the_bound
);
fn relay_with_redis_down_responses_are_unaffected_and_events_wait_up_to_the_bound(host: Host) {
    redis_down_costs_nothing_and_queued_events_arrive_after_it_returns(host, RELAY);
}

krowoc_tests::on_host_shim_only!(
    redis_call: redis_call_with_redis_down_responses_are_unaffected_and_events_wait_up_to_the_bound
);
fn redis_call_with_redis_down_responses_are_unaffected_and_events_wait_up_to_the_bound(host: Host) {
    redis_down_costs_nothing_and_queued_events_arrive_after_it_returns(host, REDIS_CALL);
}

krowoc_tests::on_both_hosts!(sampling_and_disabled_routes_publish_fewer_events);
fn sampling_and_disabled_routes_publish_fewer_events(host: Host) {
    let stack = stack_with(host, RELAY, 1, |cfg| {
        cfg["events"]["sample_ratio"] = json!(0.0);
        let limited = krowoc_tests::route_named(cfg, "rate-limited");
        limited["events"] = json!({"sample_ratio": 1.0});
        cfg["routes"].as_array_mut().expect("routes").push(
            json!({"name": "quiet", "match": {"prefix": "/api/recent-events"},
                           "events": {"enabled": false}}),
        );
    });
    for i in 0..5 {
        assert_eq!(
            get_with_id(&stack, "/health", &format!("h-{i}")).status,
            200
        );
        assert_eq!(stack.get("/api/recent-events").status, 200);
    }
    assert_eq!(get_with_id(&stack, "/api/rate-limited", "kept").status, 200);
    assert!(
        eventually(WAIT, || stream_request_ids(&stack)
            == vec!["kept".to_string()]),
        "{:?}",
        stream_request_ids(&stack)
    );
    assert!(eventually(WAIT, || stack
        .metric("krowoc_events_sampled_out")
        == 5));
    assert_eq!(stack.metric("krowoc_events_recorded"), 1);
}

krowoc_tests::on_both_hosts!(events_carry_the_caches_decision);
fn events_carry_the_caches_decision(host: Host) {
    let stack = stack_with(host, RELAY, 1, |_| {});
    let path = "/api/cached-data?user_id=events";
    assert_eq!(stack.get(path).header("x-cache"), Some("MISS"));
    let hit = eventually(Duration::from_secs(5), || {
        stack.get(path).header("x-cache") == Some("HIT")
    });
    assert!(hit, "the second lookup never became a hit");
    let decisions = |stack: &Stack| -> Vec<String> {
        stream_events(stack)
            .iter()
            .filter(|e| e["path"] == "/api/cached-data")
            .filter_map(|e| e["cache"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(5), || {
            let d = decisions(&stack);
            d.first().map(String::as_str) == Some("MISS")
                && d.last().map(String::as_str) == Some("HIT")
        }),
        "events of a miss then a hit: {:?}",
        decisions(&stack)
    );
    // Requests the cache does not cover keep `cache: null`.
    stack.get("/health");
    assert!(eventually(Duration::from_secs(5), || {
        stream_events(&stack)
            .iter()
            .any(|e| e["path"] == "/health" && e["cache"].is_null())
    }));
}

/// How many times each value occurs in `ids`, for those that occur more than once.
fn repeats(ids: &[String]) -> std::collections::BTreeMap<&str, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for id in ids {
        *seen.entry(id.as_str()).or_insert(0) += 1;
    }
    seen.retain(|_, n| *n > 1);
    seen
}

fn out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for(
    host: Host,
    transport: &'static str,
) {
    let stack = stack_with(host, transport, 2, |_| {});
    let mut sub = Subscriber::connect(stack.redis.addr(), &[CHANNEL]);
    // Full, and refusing to evict: PUBLISH still works, XADD answers OOM.
    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        assert_eq!(stack.redis.cli(&["CONFIG", "SET", k, v]), "OK");
    }
    let n = 30;
    for i in 0..n {
        let r = get_with_id(&stack, "/health", &format!("oom-{i}"));
        assert_eq!(r.status, 200, "request {i} with Redis full: {}", r.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Flushes keep trying the XADDs while Redis stays full.
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_requeued") >= 2 * n),
        "{}",
        stack.metrics()
    );
    assert!(
        eventually(WAIT, || stack.metric("krowoc_events_recorded") == n),
        "{}",
        stack.metrics()
    );
    assert_eq!(stack.metric("krowoc_events_dropped"), 0);
    assert_eq!(stream_events(&stack).len(), 0, "no XADD went through");

    // Redis has room again: the XADDs are written, the PUBLISHes are not sent again.
    assert_eq!(stack.redis.cli(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    assert!(
        eventually(WAIT, || {
            stack.metric("krowoc_events_published") + stack.metric("krowoc_events_dropped") == n
                && stack.metric("krowoc_events_queued") == 0
        }),
        "published + dropped + queued = recorded:\n{}",
        stack.metrics()
    );
    let metrics = stack.metrics();
    let m = |name: &str| krowoc_tests::metric_value(&metrics, name);
    assert_eq!(m("krowoc_events_recorded"), n, "{metrics}");
    assert_eq!(m("krowoc_events_published"), n, "{metrics}");
    assert_eq!(m("krowoc_events_dropped"), 0, "{metrics}");
    assert_eq!(m("krowoc_events_partial"), 0, "{metrics}");
    let duplicates_allowed = usize::try_from(m("krowoc_events_possible_duplicates")).unwrap();

    // Everything on the channel, read until it is quiet.
    let mut published = Vec::new();
    while let Some((channel, payload)) = sub.next_message(Duration::from_secs(2)) {
        let event: Value = serde_json::from_slice(&payload).expect("JSON event");
        if channel == CHANNEL {
            if let Some(id) = event["request_id"].as_str() {
                published.push(id.to_string());
            }
        }
    }
    let expected: Vec<String> = (0..n).map(|i| format!("oom-{i}")).collect();
    let mut distinct = published.clone();
    distinct.sort();
    distinct.dedup();
    let mut sorted_expected = expected.clone();
    sorted_expected.sort();
    assert_eq!(distinct, sorted_expected, "every event on the channel");
    assert!(
        published.len() <= expected.len() + duplicates_allowed,
        "{} channel messages for {n} events ({duplicates_allowed} possible duplicates): {:?}",
        published.len(),
        repeats(&published)
    );
    let streamed = stream_request_ids(&stack);
    let mut distinct = streamed.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, sorted_expected, "every event in the stream");
    assert!(
        streamed.len() <= expected.len() + duplicates_allowed,
        "{} stream entries: {:?}",
        streamed.len(),
        repeats(&streamed)
    );
}

krowoc_tests::on_both_hosts!(
    relay_out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for
);
fn relay_out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for(host: Host) {
    out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for(host, RELAY);
}

krowoc_tests::on_host_shim_only!(
    redis_call: redis_call_out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for
);
fn redis_call_out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for(
    host: Host,
) {
    out_of_memory_redis_gets_each_publish_once_and_every_event_is_accounted_for(host, REDIS_CALL);
}
