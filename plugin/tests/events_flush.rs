//! Request-event flushes against a real redis-server, made exactly as the filter makes them:
//! the pipelined PUBLISH/XADD body of transport `relay`, and the flush script of transport
//! `redis_call` (EVALSHA, NOSCRIPT, then EVAL), read back by a SUBSCRIBE client and XRANGE.

use krowoc_plugin::config::{parse_config, Config};
use krowoc_plugin::events::{EventPublisher, ResponseFacts};
use krowoc_plugin::http::RequestInfo;
use krowoc_plugin::redis::client::{Owner, RawReply, RedisClient, Wire};
use krowoc_plugin::redis::error::RedisError;
use krowoc_plugin::redis::resp::{decode_replies, Reply};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use testkit::{encode_command, RedisServer};

/// Writes each payload on a fresh connection and keeps the raw answer (as many replies as the
/// payload has commands) for the test to hand back.
struct TcpWire {
    port: u16,
    next: u32,
    replies: HashMap<u32, Vec<u8>>,
}

fn command_count(payload: &[u8]) -> usize {
    (1..=10_000)
        .find(|n| decode_replies(payload, *n).is_ok())
        .expect("payload is RESP")
}

impl Wire for TcpWire {
    fn send(&mut self, payload: &[u8], _timeout_ms: u64) -> Result<u32, RedisError> {
        let expected = command_count(payload);
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.write_all(payload).expect("write");
        let buf = read_frames(&mut s, expected);
        self.next += 4;
        self.replies.insert(self.next, buf);
        Ok(self.next)
    }
}

fn read_frames(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while decode_replies(&buf, n).is_err() {
        let got = s.read(&mut chunk).expect("read");
        assert!(got > 0, "connection closed");
        buf.extend_from_slice(&chunk[..got]);
    }
    buf
}

/// A raw SUBSCRIBE client.
struct Subscriber(TcpStream);

impl Subscriber {
    fn new(redis: &RedisServer, channel: &str) -> Subscriber {
        let mut s = TcpStream::connect(redis.addr()).expect("connect");
        s.write_all(&encode_command(&["SUBSCRIBE", channel]))
            .expect("subscribe");
        read_frames(&mut s, 1);
        Subscriber(s)
    }

    /// The payloads of the next `n` messages.
    fn messages(&mut self, n: usize) -> Vec<serde_json::Value> {
        let raw = read_frames(&mut self.0, n);
        decode_replies(&raw, n)
            .expect("messages")
            .into_iter()
            .map(|m| match m {
                Reply::Array(parts) => match parts.as_slice() {
                    [Reply::Bulk(kind), _, Reply::Bulk(payload)] if kind == b"message" => {
                        serde_json::from_slice(payload).expect("JSON event")
                    }
                    other => panic!("not a message: {other:?}"),
                },
                other => panic!("not a message: {other:?}"),
            })
            .collect()
    }
}

fn config(transport: &str) -> Config {
    let redis = if transport == "redis_call" {
        r#"{"transport": "redis_call"}"#
    } else {
        r#"{"transport": "relay"}"#
    };
    parse_config(
        format!(
            r#"{{"redis": {redis},
                "events": {{"batch_size": 10, "stream": {{"maxlen": 1000}}}},
                "routes": [{{"name": "api", "match": {{"prefix": "/api/"}}}}]}}"#
        )
        .as_bytes(),
    )
    .expect("config")
}

/// A publisher with its command layer and a wire to `redis`.
struct Flusher {
    p: EventPublisher,
    client: RedisClient,
    wire: TcpWire,
    transport: krowoc_plugin::config::Transport,
}

impl Flusher {
    fn new(redis: &RedisServer, cfg: &Config) -> Flusher {
        Flusher {
            p: EventPublisher::new(cfg),
            client: RedisClient::new(&cfg.redis),
            wire: TcpWire {
                port: redis.port,
                next: 3,
                replies: HashMap::new(),
            },
            transport: cfg.redis.transport,
        }
    }

    /// Flushes what is due at `now_ms` and hands every answer back.
    fn flush(&mut self, now_ms: u64) {
        self.p.flush(&mut self.client, &mut self.wire, now_ms);
        // Answer every call (an EVALSHA answered NOSCRIPT goes on as EVAL under a new token).
        while let Some(&token) = self.wire.replies.keys().next() {
            let body = self.wire.replies.remove(&token).expect("reply");
            let raw = match self.transport {
                krowoc_plugin::config::Transport::Relay => RawReply::Relay {
                    status: Some(200),
                    body,
                },
                krowoc_plugin::config::Transport::RedisCall => {
                    RawReply::RedisCall { status: 0, body }
                }
            };
            if let Some(c) = self.client.on_reply(&mut self.wire, now_ms + 1, token, raw) {
                let Owner::Flush(flush) = c.owner else {
                    panic!("not a flush: {:?}", c.owner);
                };
                self.p.on_flush_done(flush, c.result);
            }
        }
    }
}

/// Records `n` requests and flushes them through the command layer; returns the publisher.
fn publish(redis: &RedisServer, cfg: &Config, n: u32) -> EventPublisher {
    let mut f = Flusher::new(redis, cfg);
    record(&mut f.p, cfg, n);
    f.flush(10_000);
    f.p
}

/// Records `n` requests (request ids `req-1`…).
fn record(p: &mut EventPublisher, cfg: &Config, n: u32) {
    for ctx in 1..=n {
        let req = RequestInfo {
            path: format!("/api/item/{ctx}?q=1"),
            method: "GET".into(),
            headers: vec![("x-request-id".into(), format!("req-{ctx}"))],
            source_address: Some("192.0.2.7:40000".into()),
        };
        let route = cfg.route_for(req.path(), &req.method);
        let event = p.on_request(1_000_000_000, &req, route).expect("an event");
        p.on_log(event, 1_002_000_000, |_| ResponseFacts {
            status: Some(200),
            headers: vec![],
        });
    }
}

fn events_reach_subscribers_and_the_stream(transport: &str) {
    let redis = RedisServer::start();
    let cfg = config(transport);
    let mut sub = Subscriber::new(&redis, "krowoc:requests");
    let p = publish(&redis, &cfg, 3);
    assert_eq!(p.stats.published, 3, "{:?}", p.stats);
    assert_eq!(p.stats.flushes, 1, "one call for the batch");
    let got = sub.messages(3);
    let ids: Vec<&str> = got
        .iter()
        .map(|e| e["request_id"].as_str().expect("request_id"))
        .collect();
    assert_eq!(ids, vec!["req-1", "req-2", "req-3"]);
    assert_eq!(got[0]["route"], "api");
    assert_eq!(got[0]["path"], "/api/item/1");
    assert_eq!(got[0]["client"], "192.0.2.7");
    assert_eq!(got[0]["duration_ms"], 2.0);
    assert_eq!(redis.int(&["XLEN", "krowoc:events"]), 3);
    let entries = redis.cli(&["XRANGE", "krowoc:events", "-", "+", "COUNT", "1"]);
    assert!(entries.contains("event"), "{entries}");
    assert!(entries.contains("\"request_id\":\"req-1\""), "{entries}");
}

#[test]
fn relay_pipeline_reaches_subscribers_and_the_stream() {
    events_reach_subscribers_and_the_stream("relay");
}

#[test]
fn redis_call_script_reaches_subscribers_and_the_stream() {
    events_reach_subscribers_and_the_stream("redis_call");
}

fn a_refused_stream_write_does_not_stop_the_publishes(transport: &str) {
    let redis = RedisServer::start();
    redis.cli(&["SET", "krowoc:events", "not a stream"]);
    let cfg = config(transport);
    let mut sub = Subscriber::new(&redis, "krowoc:requests");
    let p = publish(&redis, &cfg, 2);
    // Both reached the channel: published, but partial (the stream refused them).
    assert_eq!(
        (
            p.stats.published,
            p.stats.partial,
            p.stats.rejected,
            p.stats.dropped
        ),
        (2, 2, 2, 0),
        "{:?}",
        p.stats
    );
    assert_eq!(sub.messages(2).len(), 2, "PUBLISH still happened");
    assert_eq!(p.queue_len(), 0, "refused events are not retried");
}

#[test]
fn relay_pipeline_counts_refused_events() {
    a_refused_stream_write_does_not_stop_the_publishes("relay");
}

#[test]
fn redis_call_script_counts_refused_events() {
    a_refused_stream_write_does_not_stop_the_publishes("redis_call");
}

/// Redis full (`noeviction`): PUBLISH still works, XADD answers OOM. Only the XADDs are sent
/// again, and once Redis has room every event is in the stream once and on the channel once.
fn out_of_memory_sends_only_the_xadds_again(transport: &str) {
    let redis = RedisServer::start();
    let cfg = config(transport);
    let mut sub = Subscriber::new(&redis, "krowoc:requests");
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "1"]), "OK");
    let mut f = Flusher::new(&redis, &cfg);
    record(&mut f.p, &cfg, 3);
    for tick in 0..5 {
        f.flush(10_000 + tick * 100);
    }
    let s = f.p.stats;
    assert_eq!((s.published, s.dropped), (0, 0), "{s:?}");
    assert_eq!(f.p.queue_len(), 3, "waiting for their XADD");
    assert_eq!(s.requeued, 15, "{s:?}");
    assert_eq!(s.possible_duplicates, 0);
    assert_eq!(redis.int(&["EXISTS", "krowoc:events"]), 0);
    assert_eq!(sub.messages(3).len(), 3, "each PUBLISH once");

    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    f.flush(20_000);
    let s = f.p.stats;
    assert_eq!((s.published, s.partial, s.dropped), (3, 0, 0), "{s:?}");
    assert_eq!(f.p.queue_len(), 0);
    assert_eq!(redis.int(&["XLEN", "krowoc:events"]), 3);
    // No fourth message: a PING through the subscription comes back next.
    sub.0.write_all(&encode_command(&["PING"])).expect("ping");
    let next = decode_replies(&read_frames(&mut sub.0, 1), 1).expect("reply");
    assert!(
        matches!(next.as_slice(), [Reply::Array(parts)] if parts.first() == Some(&Reply::Bulk(b"pong".to_vec()))),
        "a message came before the pong: {next:?}"
    );
}

#[test]
fn relay_pipeline_under_oom_sends_only_the_xadds_again() {
    out_of_memory_sends_only_the_xadds_again("relay");
}

#[test]
fn redis_call_script_under_oom_sends_only_the_xadds_again() {
    out_of_memory_sends_only_the_xadds_again("redis_call");
}

#[test]
fn the_stream_is_capped_approximately() {
    let redis = RedisServer::start();
    let cfg = parse_config(
        br#"{"redis": {"transport": "redis_call"},
             "events": {"batch_size": 500, "queue_limit": 500, "publish": {"enabled": false},
                        "stream": {"maxlen": 100}}}"#,
    )
    .expect("config");
    let p = publish(&redis, &cfg, 500);
    assert_eq!(p.stats.published, 500);
    let len = redis.int(&["XLEN", "krowoc:events"]);
    assert!(
        (100..500).contains(&len),
        "XLEN {len}: MAXLEN ~ 100 trims whole nodes"
    );
}

#[test]
fn envoy_yaml_publishes_an_event_for_every_request() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).expect("envoy/envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let filters = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    let wasm = filters
        .as_sequence()
        .expect("http_filters")
        .iter()
        .find(|f| f["name"].as_str() == Some("envoy.filters.http.wasm"))
        .expect("wasm filter");
    let json = wasm["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .expect("configuration value");
    let cfg = parse_config(json.as_bytes()).unwrap_or_else(|errs| panic!("refused: {errs:#?}"));
    let unrouted = cfg.events.policy(None).expect("requests on no route");
    assert_eq!(unrouted.channel.as_deref(), Some("krowoc:requests"));
    assert_eq!(unrouted.sample_ratio, 1.0);
    for (i, route) in cfg.routes.iter().enumerate() {
        let policy = cfg
            .events
            .policy(Some(i))
            .unwrap_or_else(|| panic!("route {} has no events", route.name));
        assert_eq!(policy.channel.as_deref(), Some("krowoc:requests"));
        assert!(policy.stream.is_some(), "route {}", route.name);
    }
}
