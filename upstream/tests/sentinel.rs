//! The upstream behind real sentinels (`REDIS_SENTINEL`, `REDIS_SENTINEL_MASTER`): a master, its
//! replica and three sentinels. The upstream finds the master, follows a failover asked for
//! under traffic (`SENTINEL FAILOVER`) and one forced by killing the master, re-subscribes on
//! the new master, and `/health/deep` names it.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use common::{
    blocking, eventually, fast_config_for, get, publish, wait_for_event, wait_for_phase, Reply,
    TrafficRun, SETTLE,
};
use futures_util::StreamExt;
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState, RedisDeployment, UpstreamConfig};
use serde_json::{json, Value};
use testkit::sentinel::RedisSentinel;

const MASTER: &str = "krowoc";

fn sentinel_config(redis: &RedisSentinel) -> UpstreamConfig {
    let deployment =
        RedisDeployment::sentinel(&redis.sentinels(), redis.master_name()).expect("sentinels");
    UpstreamConfig {
        redis_timeout: Duration::from_secs(2),
        ..fast_config_for(deployment)
    }
}

fn sentinel_check(deep: &Reply) -> &Value {
    &deep.json["checks"]["redis:sentinel"][0]
}

fn address(redis: &RedisSentinel, node: usize) -> String {
    format!("127.0.0.1:{}", redis.node(node).port)
}

/// Waits until `/health/deep` passes naming `master` as the master, and the subscriber is
/// subscribed there.
async fn wait_until_on(app: &Router, state: &AppState, master: &str) -> Reply {
    let deep = eventually(&format!("/health/deep naming {master}"), SETTLE, || async {
        let deep = get(app, "/health/deep").await;
        let check = sentinel_check(&deep);
        let on_master = check["master"] == json!(master) && check["role"] == json!("master");
        (on_master && deep.json["status"] == json!("pass")).then_some(deep)
    })
    .await;
    eventually(&format!("the subscriber on {master}"), SETTLE, || async {
        let s = state.subscriber().snapshot();
        (s.phase == SubscriberPhase::Subscribed && s.node.as_deref() == Some(master)).then_some(())
    })
    .await;
    deep
}

/// A message published through the upstream reaches a client subscribed directly on `node`:
/// the upstream publishes on that node.
async fn assert_publishes_reach(app: &Router, redis: &RedisSentinel, node: usize, message: Value) {
    let client = redis::Client::open(redis.node(node).url()).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("connects");
    pubsub.subscribe("app:events").await.expect("SUBSCRIBE");
    let r = publish(app, message.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The upstream's subscriber and this client.
    assert_eq!(r.json["receivers"], json!(2), "{}", r.text);
    let received = tokio::time::timeout(SETTLE, pubsub.on_message().next())
        .await
        .expect("a message")
        .expect("the stream is open");
    let payload: Value = serde_json::from_slice(received.get_payload_bytes()).expect("JSON");
    assert_eq!(payload, message);
    wait_for_event(app, &message).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_finds_the_master_through_the_sentinels() {
    let redis = RedisSentinel::start(MASTER);
    let state = AppState::start(sentinel_config(&redis)).expect("a sentinel config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    let master = address(&redis, redis.master());
    let deep = wait_until_on(&app, &state, &master).await;
    assert_eq!(deep.status, StatusCode::OK, "{}", deep.text);
    let check = sentinel_check(&deep);
    assert_eq!(check["master_name"], json!(MASTER), "{check}");
    assert_eq!(check["master_changes"], json!(0), "{check}");
    assert_eq!(
        check["sentinels"].as_array().map(Vec::len),
        Some(3),
        "{check}"
    );
    assert!(check["watching"].is_string(), "{check}");
    assert_eq!(
        deep.json["checks"]["redis:responseTime"][0]["componentId"],
        json!(master)
    );
    assert_eq!(
        deep.json["checks"]["redis:uptime"][0]["role"],
        json!("master")
    );
    assert_publishes_reach(&app, &redis, redis.master(), json!({"through": "sentinel"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_traffic_moves_the_upstream_to_the_new_master() {
    let redis = RedisSentinel::start(MASTER);
    let state = AppState::start(sentinel_config(&redis)).expect("a sentinel config");
    let app = app(state.clone());
    let old = redis.master();
    wait_until_on(&app, &state, &address(&redis, old)).await;

    let traffic = TrafficRun::start(&app);
    let (redis, new) = tokio::task::spawn_blocking(move || {
        let new = redis.failover(SETTLE);
        (redis, new)
    })
    .await
    .expect("the failover");
    assert_ne!(new, old);

    let deep = wait_until_on(&app, &state, &address(&redis, new)).await;
    let check = sentinel_check(&deep);
    assert!(check["master_changes"].as_u64() >= Some(1), "{check}");
    assert!(check["last_change_at"].is_string(), "{check}");
    assert_publishes_reach(&app, &redis, new, json!("on the new master")).await;

    let seen = traffic.stop().await;
    // The failover cost only 503s (Redis unavailable or slow), never another error.
    assert!(seen.unexpected.is_empty(), "{:?}", seen.unexpected);
    assert!(seen.published > 0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_the_upstream_follows() {
    let redis = RedisSentinel::start(MASTER);
    let state = AppState::start(sentinel_config(&redis)).expect("a sentinel config");
    let app = app(state.clone());
    let old = redis.master();
    wait_until_on(&app, &state, &address(&redis, old)).await;

    let redis = blocking(redis, move |redis| redis.kill(old)).await;
    let new = 1 - old;
    let redis = blocking(redis, move |redis| redis.wait_master_is(new, SETTLE)).await;
    wait_until_on(&app, &state, &address(&redis, new)).await;
    let r = eventually("a successful PUBLISH", SETTLE, || async {
        let r = publish(&app, json!("after the kill")).await;
        (r.status == StatusCode::OK).then_some(r)
    })
    .await;
    assert_eq!(r.json["receivers"], json!(1), "{}", r.text);
    wait_for_event(&app, &json!("after the kill")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_sentinels_degrade_to_503_and_failing_health() {
    let sentinels = format!(
        "127.0.0.1:{},127.0.0.1:{}",
        testkit::free_port(),
        testkit::free_port()
    );
    let mut config =
        fast_config_for(RedisDeployment::sentinel(&sentinels, MASTER).expect("sentinels"));
    config.channels.clear();
    let state = AppState::start(config).expect("starts without the sentinels");
    let app = app(state);
    let r = publish(&app, json!("nobody hears this")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    let deep = get(&app, "/health/deep").await;
    assert_eq!(
        deep.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        deep.text
    );
    assert_eq!(deep.json["status"], json!("fail"));
    let check = sentinel_check(&deep);
    assert_eq!(check["master_name"], json!(MASTER), "{}", deep.text);
    assert_eq!(check["master"], json!(null), "{}", deep.text);
    assert_eq!(check["status"], json!("fail"), "{}", deep.text);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
}
