//! The plugin's parsers under mutated input (see `testkit::fuzz`): Redis replies, the
//! configuration, stored cache entries, purge directives and the host's header maps. Each must
//! answer every input with a value or an error, never a panic (which would trap the VM), and
//! keep the bounds it promises.

use krowoc_plugin::cache::entry::{decode, encode};
use krowoc_plugin::cache::parse_lookup;
use krowoc_plugin::cache::purge::{parse_directives, MAX_DIRECTIVES};
use krowoc_plugin::config::parse_config;
use krowoc_plugin::host::{parse_header_map, serialize_header_map};
use krowoc_plugin::redis::resp::decode_replies;
use testkit::fuzz::fuzz;

/// envoy.yaml's plugin configuration, the richest valid document there is.
fn shipped_configuration() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/envoy.yaml");
    let yaml = std::fs::read_to_string(root).expect("envoy/envoy.yaml");
    let start = yaml.find("value: |").expect("a configuration block") + "value: |".len();
    let block: Vec<&str> = yaml[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim().is_empty() || l.starts_with("                  "))
        .collect();
    block.join("\n")
}

#[test]
fn fuzz_redis_replies() {
    let seeds: [&[u8]; 6] = [
        b"+OK\r\n",
        b"-NOSCRIPT No matching script\r\n",
        b":-42\r\n",
        b"$5\r\nhello\r\n$-1\r\n",
        b"*9\r\n$3\r\nhit\r\n:10\r\n$4\r\nKRC1\r\n:-1\r\n:60000\r\n:0\r\n:0\r\n:0\r\n:1700000000000\r\n",
        b"*2\r\n*2\r\n:1\r\n:2\r\n*1\r\n*1\r\n*0\r\n",
    ];
    fuzz("redis replies", &seeds, |case| {
        for expected in [1, 2, 3] {
            if let Ok(replies) = decode_replies(case, expected) {
                assert_eq!(replies.len(), expected);
                for r in &replies {
                    let _ = parse_lookup(r);
                }
            }
        }
    });
}

#[test]
fn fuzz_configuration() {
    let shipped = shipped_configuration();
    assert!(
        parse_config(shipped.as_bytes()).is_ok(),
        "the seed is valid: {shipped}"
    );
    let seeds: [&[u8]; 3] = [
        shipped.as_bytes(),
        br#"{"redis": {"transport": "redis_call", "cluster": "redis", "password": "p"},
            "routes": [{"name": "a", "match": {"prefix": "/"},
              "rate_limit": {"limits": [{"limit": 5, "window": "1s", "algorithm": "gcra"}],
                             "key": ["client_ip", {"header": "x-api-key"}], "failure_mode": "local"},
              "cache": {"ttl": "1m", "key": {"query": ["q"], "headers": ["accept"]},
                        "coalesce": {"lock": "1s", "wait": "500ms"}},
              "events": {"sample_ratio": 0.5}}]}"#,
        b"{}",
    ];
    fuzz("configuration", &seeds, |case| {
        if let Err(errors) = parse_config(case) {
            assert!(!errors.is_empty(), "a refusal names at least one problem");
            for e in errors {
                assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
    });
}

#[test]
fn fuzz_cache_entries() {
    let fields = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("etag".to_string(), "\"v1\"".to_string()),
    ];
    let stored = encode(200, &fields, b"{\"user_id\":\"1\"}");
    let empty = encode(204, &[], b"");
    fuzz("cache entries", &[&stored, &empty], |case| {
        if let Ok(entry) = decode(case.to_vec()) {
            // A readable entry writes back to the same bytes.
            assert_eq!(encode(entry.status, &entry.headers, &entry.body), case);
        }
    });
}

#[test]
fn fuzz_purge_directives() {
    let seeds: [&[u8]; 2] = [
        b"tag=user:42, route=/api/cached-data, url=/api/cached-data?user_id=1",
        b"pattern=/api/cached-data?user_id=4*, route=cached-data, future=kind",
    ];
    fuzz("purge directives", &seeds, |case| {
        let text = String::from_utf8_lossy(case);
        if let Ok(directives) = parse_directives(&text) {
            assert!(directives.len() <= MAX_DIRECTIVES, "{}", directives.len());
        }
    });
}

#[test]
fn fuzz_header_maps() {
    let pairs = vec![
        (":status".to_string(), "200".to_string()),
        ("set-cookie".to_string(), "a=1".to_string()),
        ("x-empty".to_string(), String::new()),
    ];
    let map = serialize_header_map(&pairs);
    fuzz("header maps", &[&map, &serialize_header_map(&[])], |case| {
        let parsed = parse_header_map(case);
        // Every pair takes at least 10 bytes (two lengths, two terminators): no more than that.
        assert!(parsed.len() <= case.len() / 10, "{} pairs", parsed.len());
    });
}
