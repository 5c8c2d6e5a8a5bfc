//! Every endpoint in-process (`oneshot`) against a real redis-server: happy paths, headers and
//! every bad-input case.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::{fast_config, get, post, send};
use krowoc_upstream::{app, invalidation, AppState, UpstreamConfig};
use serde_json::{json, Value};
use testkit::RedisServer;

fn start(redis: &RedisServer, tweak: impl FnOnce(&mut UpstreamConfig)) -> (AppState, Router) {
    let mut config = fast_config(&redis.url());
    tweak(&mut config);
    let state = AppState::start(config).expect("valid config");
    let router = app(state.clone());
    (state, router)
}

// ---- GET /api/cached-data -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_sends_cache_control_and_the_users_cache_tag() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = get(&app, "/api/cached-data?user_id=42").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(r.header("cache-tag"), Some("user:42"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json["user_id"], json!("42"));
    assert!(r.json["data"].is_object(), "{}", r.text);
    let generated = r.json["generated_at"].as_str().expect("generated_at");
    assert!(
        generated.len() == 24 && generated.ends_with('Z') && &generated[10..11] == "T",
        "{generated}"
    );
    assert!(r.json["generated_at_unix_ms"].as_u64().expect("unix ms") > 1_600_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_without_user_id_is_tagged_anonymous() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = get(&app, "/api/cached-data").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("cache-tag"), Some("user:anonymous"));
    assert_eq!(r.json["user_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_calls_are_counted_in_stats() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    for i in 1..=3u64 {
        let r = get(&app, "/api/cached-data?user_id=7").await;
        assert_eq!(r.json["call"], json!(i));
    }
    let stats = get(&app, "/api/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json["cached_data_calls"], json!(3));
    assert_eq!(stats.header("cache-control"), Some("no-store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_takes_the_configured_delay_and_honours_max_age() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| {
        c.cached_data_delay = Duration::from_millis(150);
        c.cache_max_age = Duration::from_secs(5);
    });
    let started = Instant::now();
    let r = get(&app, "/api/cached-data?user_id=1").await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(r.header("cache-control"), Some("public, max-age=5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_refuses_user_ids_unsafe_in_tags_without_counting_a_call() {
    let redis = RedisServer::start();
    let (state, app) = start(&redis, |_| {});
    for query in [
        "user_id=a%20b",
        "user_id=a,b",
        "user_id=",
        "user_id=1&user_id=2",
    ] {
        let r = get(&app, &format!("/api/cached-data?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.text);
        assert_eq!(r.error_field(), Some("user_id"), "{query}: {}", r.text);
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    let calls = &state.stats().cached_data_calls;
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
}

// ---- POST /api/invalidate-cache ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_user_answers_that_users_tag() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    for body in [r#"{"user_id":"42"}"#, r#"{"user_id":42}"#] {
        let r = post(&app, "/api/invalidate-cache", body).await;
        assert_eq!(r.status, StatusCode::OK, "{body}: {}", r.text);
        assert_eq!(r.header(invalidation::HEADER), Some("tag=user:42"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(
            r.json,
            json!({
                "scope": "user",
                "user_id": "42",
                "invalidate": [{"kind": "tag", "value": "user:42"}],
                "header": "tag=user:42",
            })
        );
        let parsed = invalidation::parse(r.header(invalidation::HEADER).unwrap_or_default());
        assert_eq!(
            parsed,
            Ok(vec![invalidation::Invalidation::Tag("user:42".into())])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_without_a_user_answers_the_whole_route() {
    let redis = RedisServer::start();
    let (state, app) = start(&redis, |_| {});
    for body in ["", "  \n", "{}", r#"{"user_id":null}"#] {
        let r = post(&app, "/api/invalidate-cache", body).await;
        assert_eq!(r.status, StatusCode::OK, "{body:?}: {}", r.text);
        assert_eq!(
            r.header("x-krowoc-invalidate"),
            Some("route=/api/cached-data"),
            "{body:?}"
        );
        assert_eq!(r.json["scope"], json!("all"));
        assert_eq!(r.json["user_id"], Value::Null);
    }
    let stats = state.stats().to_json();
    assert_eq!(stats["invalidations"], json!(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_bad_input_is_400_naming_the_problem() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let cases = [
        (r#"{"userid":"42"}"#, Some("userid"), "invalid_field"),
        (r#"{"user_id":true}"#, Some("user_id"), "invalid_field"),
        (r#"{"user_id":-1}"#, Some("user_id"), "invalid_field"),
        (r#"{"user_id":"a b"}"#, Some("user_id"), "invalid_field"),
        (r#"{"user_id":"#, None, "malformed_json"),
        (r#"["user_id"]"#, None, "malformed_json"),
    ];
    for (body, field, kind) in cases {
        let r = post(&app, "/api/invalidate-cache", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error_field(), field, "{body}: {}", r.text);
        assert_eq!(r.error_kind(), Some(kind), "{body}: {}", r.text);
        assert!(r.header("x-krowoc-invalidate").is_none());
    }
}

// ---- POST /api/publish-event ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_event_answers_the_number_of_receivers() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| c.channels.clear());
    let r = post(
        &app,
        "/api/publish-event",
        r#"{"channel":"nobody:listens","message":{"event_type":"user_registered","user_id":123}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["receivers"], json!(0));
    assert_eq!(r.json["channel"], json!("nobody:listens"));
    assert_eq!(r.json["published"], json!(true));
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_event_bad_fields_are_400_naming_the_field() {
    let redis = RedisServer::start();
    let (state, app) = start(&redis, |_| {});
    let long_channel = "c".repeat(257);
    let too_long = format!(r#"{{"channel":"{long_channel}","message":1}}"#);
    let cases: Vec<(&str, &str)> = vec![
        (r#"{"message":"hi"}"#, "channel"),
        (r#"{"channel":null,"message":"hi"}"#, "channel"),
        (r#"{"channel":5,"message":"hi"}"#, "channel"),
        (r#"{"channel":["a"],"message":"hi"}"#, "channel"),
        (r#"{"channel":"","message":"hi"}"#, "channel"),
        (&too_long, "channel"),
        (r#"{"channel":"app:events"}"#, "message"),
        (r#"{"channel":"app:events","message":null}"#, "message"),
        (r#"{"channel":"app:events","message":1,"extra":2}"#, "extra"),
        ("", "channel"),
    ];
    for (body, field) in cases {
        let r = post(&app, "/api/publish-event", body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error_field(), Some(field), "{body}: {}", r.text);
        assert_eq!(r.error_kind(), Some("invalid_field"));
        let message = r.json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body}: {message}");
    }
    let published = state.stats().to_json()["events_published"].clone();
    assert_eq!(published, json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_event_malformed_json_is_400() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    for body in [
        r#"{"channel":"a","message":"#,
        "channel=a&message=b",
        r#""just a string""#,
    ] {
        let r = post(&app, "/api/publish-event", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error_kind(), Some("malformed_json"), "{body}: {}", r.text);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_event_body_over_the_cap_is_413() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| c.max_body_bytes = 1024);
    let big = format!(r#"{{"channel":"a","message":"{}"}}"#, "x".repeat(2000));

    // Declared by Content-Length: refused before reading.
    let declared = Request::post("/api/publish-event")
        .header("content-type", "application/json")
        .header("content-length", big.len().to_string())
        .body(Body::from(big.clone()))
        .expect("request");
    let r = send(&app, declared).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_eq!(r.error_kind(), Some("payload_too_large"));

    // Streamed without a length: refused once the cap is crossed.
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let streamed = Request::post("/api/publish-event")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("request");
    let r = send(&app, streamed).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);

    // Just under the cap is fine.
    let small = format!(r#"{{"channel":"a","message":"{}"}}"#, "x".repeat(900));
    let r = post(&app, "/api/publish-event", small).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

// ---- GET /api/recent-events -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_events_bad_limit_is_400_naming_limit() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    for limit in ["abc", "0", "-1", "1.5", "", "99999999999999999999999"] {
        let r = get(&app, &format!("/api/recent-events?limit={limit}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{limit:?}: {}", r.text);
        assert_eq!(r.error_field(), Some("limit"), "{limit:?}: {}", r.text);
    }
    let r = get(&app, "/api/recent-events?limit=1&limit=2").await;
    assert_eq!(r.error_field(), Some("limit"));
    let r = get(&app, "/api/recent-events?channel=").await;
    assert_eq!(r.error_field(), Some("channel"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_events_limit_defaults_to_20_and_is_capped_at_the_buffer() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| c.events_buffer = 50);
    let r = get(&app, "/api/recent-events").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["limit"], json!(20));
    assert_eq!(r.json["events"], json!([]));
    assert_eq!(r.json["buffer"]["capacity"], json!(50));
    assert!(r.json["subscriber"]["state"].is_string());
    let r = get(&app, "/api/recent-events?limit=1000").await;
    assert_eq!(r.json["limit"], json!(50));
}

// ---- the limited endpoints, index, fallbacks ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_endpoints_answer_plain_json() {
    let redis = RedisServer::start();
    let (state, app) = start(&redis, |_| {});
    let r = get(&app, "/api/rate-limited").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["endpoint"], json!("/api/rate-limited"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = get(&app, "/api/slow-limited").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["endpoint"], json!("/api/slow-limited"));
    assert_eq!(r.json["took_ms"], json!(0));
    let stats = state.stats().to_json();
    assert_eq!(stats["rate_limited_calls"], json!(1));
    assert_eq!(stats["slow_limited_calls"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_limited_takes_the_configured_delay() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| c.slow_delay = Duration::from_millis(120));
    let started = Instant::now();
    let r = get(&app, "/api/slow-limited").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(120));
    assert_eq!(r.json["took_ms"], json!(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_lists_every_endpoint() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = get(&app, "/").await;
    assert_eq!(r.status, StatusCode::OK);
    let paths: Vec<&str> = r.json["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    for path in [
        "/health",
        "/health/deep",
        "/api/cached-data",
        "/api/invalidate-cache",
        "/api/publish-event",
        "/api/recent-events",
        "/api/rate-limited",
        "/api/slow-limited",
        "/api/stats",
        "/api/bytes",
        "/api/events/stream",
        "/demo",
    ] {
        assert!(paths.contains(&path), "{path} missing from {paths:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_json_and_wrong_methods_405_json() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = get(&app, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_kind(), Some("not_found"));
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("/nope"));
    let r = post(&app, "/api/cached-data", "{}").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.text);
    assert_eq!(r.error_kind(), Some("method_not_allowed"));
    let r = get(&app, "/api/publish-event").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_get_the_cache_headers() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = send(
        &app,
        Request::head("/api/cached-data?user_id=9")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("cache-tag"), Some("user:9"));
    assert!(r.text.is_empty());
}

// ---- health -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_a_pass_without_touching_redis() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |_| {});
    let r = get(&app, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("application/health+json"));
    assert_eq!(r.json["status"], json!("pass"));
    assert_eq!(r.json["checks"]["uptime"][0]["observedUnit"], json!("s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_health_reports_redis_memory_clients_version_uptime_and_the_subscriber() {
    let redis = RedisServer::start();
    let (state, app) = start(&redis, |_| {});
    common::wait_for_phase(
        &state,
        krowoc_upstream::subscriber::SubscriberPhase::Subscribed,
    )
    .await;
    let r = get(&app, "/health/deep").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/health+json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.json["status"], json!("pass"), "{}", r.text);
    let checks = &r.json["checks"];

    let ping = &checks["redis:responseTime"][0];
    assert_eq!(ping["reachable"], json!(true));
    assert_eq!(ping["observedUnit"], json!("ms"));
    assert!(ping["observedValue"].as_f64().expect("latency") >= 0.0);
    assert_eq!(ping["status"], json!("pass"));
    assert_eq!(ping["componentType"], json!("datastore"));

    let memory = &checks["redis:memory"][0];
    assert!(memory["used_memory"].as_u64().expect("used_memory") > 0);
    assert!(memory["used_memory_human"]
        .as_str()
        .expect("human")
        .ends_with(['B', 'K', 'M', 'G']));
    assert_eq!(memory["maxmemory"], json!(0));
    assert_eq!(memory["observedUnit"], json!("bytes"));

    let connections = &checks["redis:connections"][0];
    assert!(connections["connected_clients"].as_u64().expect("clients") >= 2);

    let uptime = &checks["redis:uptime"][0];
    assert_eq!(uptime["role"], json!("master"));
    assert!(uptime["redis_version"]
        .as_str()
        .expect("version")
        .starts_with('7'));
    assert!(uptime["uptime_in_seconds"].is_u64());

    let subscriber = &checks["redis:subscriber"][0];
    assert_eq!(subscriber["observedValue"], json!("subscribed"));
    assert_eq!(subscriber["status"], json!("pass"));
    assert_eq!(
        subscriber["channels"],
        json!(["krowoc:requests", "app:events"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_health_warns_when_memory_nears_maxmemory() {
    let redis = RedisServer::start();
    let (_state, app) = start(&redis, |c| c.channels.clear());
    // A limit just above what an empty server uses: ≥ 90% of it is in use.
    let used: u64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("used_memory:"))
        .and_then(|v| v.parse().ok())
        .expect("used_memory");
    let limit = (used + used / 20).to_string();
    assert_eq!(redis.cli(&["CONFIG", "SET", "maxmemory", &limit]), "OK");
    let r = get(&app, "/health/deep").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["status"], json!("warn"), "{}", r.text);
    assert_eq!(r.json["checks"]["redis:memory"][0]["status"], json!("warn"));
    assert!(r.json["output"]
        .as_str()
        .unwrap_or_default()
        .contains("maxmemory"));
}
