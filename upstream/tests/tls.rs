//! The upstream's Redis over TLS (`REDIS_URL=rediss://…`, `--redis-tls-ca`), against a real
//! redis-server listening for TLS with a test CA.

mod common;

use axum::http::StatusCode;
use common::{fast_config, get, post, wait_for_phase};
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState};
use serde_json::json;
use testkit::tls::TestCa;
use testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_and_the_subscriber_reach_redis_over_tls_with_the_given_ca() {
    let ca = TestCa::new("krowoc test CA");
    let redis = RedisServer::start_tls(&ca, &ca.issue_server(&["localhost", "127.0.0.1"]), false);
    let mut config = fast_config(&redis.tls_url());
    config.redis_tls_ca = Some(ca.ca_file());
    let state = AppState::start(config).expect("valid config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    let deep = get(&app, "/health/deep").await;
    assert_eq!(deep.status, StatusCode::OK, "{}", deep.text);
    let r = post(
        &app,
        "/api/publish-event",
        r#"{"channel":"app:events","message":{"over":"tls"}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["receivers"], json!(1), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_is_not_trusted() {
    let ca = TestCa::new("krowoc test CA");
    let redis = RedisServer::start_tls(&ca, &ca.issue_server(&["localhost"]), false);
    let other = TestCa::new("another CA");
    let mut config = fast_config(&redis.tls_url());
    config.redis_tls_ca = Some(other.ca_file());
    config.channels = Vec::new();
    let state = AppState::start(config).expect("valid config");
    let deep = get(&app(state), "/health/deep").await;
    assert_eq!(
        deep.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        deep.text
    );
}

#[test]
fn a_ca_without_a_rediss_url_is_refused_naming_the_flag() {
    let mut config = fast_config("redis://127.0.0.1:6379");
    config.redis_tls_ca = Some("/etc/ca.pem".into());
    let err = config.validate().expect_err("a CA without TLS");
    assert!(err.to_string().contains("--redis-tls-ca"), "{err}");
}
