//! Redis stopped and restarted under a running service: Redis endpoints answer 503 quickly,
//! everything else keeps working, and both the handlers' connection and the subscriber recover
//! by themselves.

mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use common::{eventually, fast_config, get, post, wait_for_phase};
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState};
use serde_json::json;
use testkit::RedisServer;

const PUBLISH: &str = r#"{"channel":"app:events","message":{"probe":true}}"#;

/// Stops (or restarts) the server off the async worker: testkit blocks while it waits.
async fn blocking(redis: RedisServer, action: fn(&mut RedisServer)) -> RedisServer {
    tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        action(&mut redis);
        redis
    })
    .await
    .expect("testkit action")
}

async fn assert_redis_down_behaviour(app: &Router, state: &AppState) {
    let started = Instant::now();
    let r = post(app, "/api/publish-event", PUBLISH).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert!(
        matches!(r.error_kind(), Some("redis_unavailable" | "redis_timeout")),
        "{}",
        r.text
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Redis is unavailable"),
        "{}",
        r.text
    );
    // Refused at once on loopback; in any case bounded by the 1 s Redis timeout, never a hang.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let deep = get(app, "/health/deep").await;
    assert_eq!(
        deep.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        deep.text
    );
    assert_eq!(deep.header("content-type"), Some("application/health+json"));
    assert_eq!(deep.json["status"], json!("fail"));
    let ping = &deep.json["checks"]["redis:responseTime"][0];
    assert_eq!(ping["reachable"], json!(false));
    assert_eq!(ping["status"], json!("fail"));
    assert!(ping["output"].is_string());

    let live = get(app, "/health").await;
    assert_eq!(live.status, StatusCode::OK);
    assert_eq!(live.json["status"], json!("pass"));

    let cached = get(app, "/api/cached-data?user_id=5").await;
    assert_eq!(cached.status, StatusCode::OK);
    assert_eq!(cached.header("cache-tag"), Some("user:5"));
    let invalidate = post(app, "/api/invalidate-cache", r#"{"user_id":"5"}"#).await;
    assert_eq!(invalidate.status, StatusCode::OK);
    assert_eq!(get(app, "/api/recent-events").await.status, StatusCode::OK);
    assert!(state.stats().to_json()["publish_failures"].as_u64() >= Some(1));
}

/// The first PUBLISH once Redis is back succeeds: no request is sacrificed to notice that
/// the old connection is gone.
async fn assert_publish_works_at_once(app: &Router) -> serde_json::Value {
    let r = post(app, "/api/publish-event", PUBLISH).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_only_redis_endpoints_and_recovers() {
    let redis = RedisServer::start();
    let state = AppState::start(fast_config(&redis.url())).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let r = post(&app, "/api/publish-event", PUBLISH).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let redis = blocking(redis, RedisServer::stop).await;
    wait_for_phase(&state, SubscriberPhase::Reconnecting).await;
    assert_redis_down_behaviour(&app, &state).await;

    // While Redis is down the subscriber reports why, and since when.
    let deep = get(&app, "/health/deep").await;
    let sub = &deep.json["checks"]["redis:subscriber"][0];
    assert_eq!(sub["observedValue"], json!("reconnecting"));
    assert_eq!(sub["status"], json!("warn"));
    assert!(sub["last_error"].is_string(), "{sub}");
    assert!(sub["since"].is_string(), "{sub}");

    let redis = blocking(redis, RedisServer::restart).await;
    assert_publish_works_at_once(&app).await;
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let snapshot = state.subscriber().snapshot();
    assert!(snapshot.resubscriptions >= 1, "{snapshot:?}");

    // The new subscription delivers: a fresh event shows up in recent-events.
    let r = post(
        &app,
        "/api/publish-event",
        r#"{"channel":"app:events","message":"after the restart"}"#,
    )
    .await;
    assert_eq!(r.json["receivers"], json!(1), "{}", r.text);
    eventually("the post-restart event", Duration::from_secs(5), || async {
        let r = get(&app, "/api/recent-events?channel=app:events&limit=1").await;
        (r.json["events"][0]["message"] == json!("after the restart")).then_some(())
    })
    .await;

    let deep = get(&app, "/health/deep").await;
    assert_eq!(deep.status, StatusCode::OK, "{}", deep.text);
    assert_eq!(deep.json["status"], json!("pass"), "{}", deep.text);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_starts_while_redis_is_down_and_connects_when_it_appears() {
    let redis = RedisServer::start();
    let redis = blocking(redis, RedisServer::stop).await;

    let state = AppState::start(fast_config(&redis.url())).expect("starts without Redis");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Reconnecting).await;
    assert_redis_down_behaviour(&app, &state).await;
    assert!(state.subscriber().snapshot().first_subscribed_at.is_none());

    let redis = blocking(redis, RedisServer::restart).await;
    let reply = assert_publish_works_at_once(&app).await;
    assert!(reply["receivers"].is_u64());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    let snapshot = state.subscriber().snapshot();
    assert_eq!(
        snapshot.resubscriptions, 0,
        "the first subscription is not a re-subscription"
    );
    assert!(
        snapshot.last_error.is_some(),
        "the outage stays visible: {snapshot:?}"
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_requests_costs_no_failed_request() {
    let redis = RedisServer::start();
    let mut config = fast_config(&redis.url());
    config.channels.clear();
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());
    assert_publish_works_at_once(&app).await;
    let redis = blocking(redis, RedisServer::stop).await;
    let redis = blocking(redis, RedisServer::restart).await;
    assert_publish_works_at_once(&app).await;
    let deep = get(&app, "/health/deep").await;
    assert_eq!(deep.status, StatusCode::OK, "{}", deep.text);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_accepts_but_never_answers_times_out_with_503() {
    // A listener that accepts connections and never replies: the worst kind of dead Redis.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _acceptor = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut config = fast_config(&format!("redis://{addr}"));
    config.channels.clear();
    config.redis_timeout = Duration::from_millis(300);
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());

    let started = Instant::now();
    let r = post(&app, "/api/publish-event", PUBLISH).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    let deep = get(&app, "/health/deep").await;
    assert_eq!(
        deep.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        deep.text
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "two calls bounded by the 300 ms timeout took {:?}",
        started.elapsed()
    );
}
