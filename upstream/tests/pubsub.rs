//! Publishing reaches real SUBSCRIBE clients, and the background subscriber's ring buffer shows
//! what arrived, newest first, bounded.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{eventually, fast_config, get, post, wait_for_phase};
use futures_util::StreamExt;
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState};
use serde_json::{json, Value};
use testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_event_reaches_a_subscribe_client() {
    let redis = RedisServer::start();
    let state = AppState::start(fast_config(&redis.url())).expect("config");
    let app = app(state.clone());

    let client = redis::Client::open(redis.url()).expect("url");
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .expect("subscriber connects");
    pubsub.subscribe("orders").await.expect("SUBSCRIBE");

    let r = post(
        &app,
        "/api/publish-event",
        r#"{"channel":"orders","message":{"event_type":"order_placed","order_id":7}}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["receivers"], json!(1));

    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a message within 5 s")
        .expect("the stream is open");
    assert_eq!(message.get_channel_name(), "orders");
    let payload: Value =
        serde_json::from_slice(message.get_payload_bytes()).expect("the payload is JSON");
    assert_eq!(
        payload,
        json!({"event_type": "order_placed", "order_id": 7})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_appear_in_recent_events_newest_first() {
    let redis = RedisServer::start();
    let state = AppState::start(fast_config(&redis.url())).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    for n in 1..=3 {
        let body = json!({"channel": "app:events", "message": {"n": n}}).to_string();
        let r = post(&app, "/api/publish-event", body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // The background subscriber is one receiver.
        assert_eq!(r.json["receivers"], json!(1));
    }
    let events = eventually("3 events in the buffer", Duration::from_secs(5), || async {
        let r = get(&app, "/api/recent-events").await;
        (r.json["count"] == json!(3)).then_some(r.json)
    })
    .await;
    let messages: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["message"])
        .collect();
    assert_eq!(
        messages,
        vec![&json!({"n": 3}), &json!({"n": 2}), &json!({"n": 1})]
    );
    let first = &events["events"][0];
    assert_eq!(first["channel"], json!("app:events"));
    assert!(first["received_at"]
        .as_str()
        .expect("received_at")
        .ends_with('Z'));
    assert_eq!(first["truncated"], json!(false));
    assert_eq!(events["subscriber"]["state"], json!("subscribed"));

    let r = get(&app, "/api/recent-events?limit=2").await;
    assert_eq!(r.json["count"], json!(2));
    assert_eq!(r.json["events"][0]["message"], json!({"n": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_events_from_other_publishers_are_recorded_json_or_not() {
    let redis = RedisServer::start();
    let state = AppState::start(fast_config(&redis.url())).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    // As the filter would: a JSON request event on krowoc:requests; then a plain-text payload.
    let event = r#"{"event_type":"http_request","path":"/api/cached-data","status":200}"#;
    assert_eq!(redis.int(&["PUBLISH", "krowoc:requests", event]), 1);
    assert_eq!(redis.int(&["PUBLISH", "app:events", "plain text"]), 1);
    assert_eq!(redis.int(&["PUBLISH", "not:subscribed", "ignored"]), 0);

    let r = eventually("2 events", Duration::from_secs(5), || async {
        let r = get(&app, "/api/recent-events").await;
        (r.json["count"] == json!(2)).then_some(r)
    })
    .await;
    assert_eq!(r.json["events"][0]["message"], json!("plain text"));
    assert_eq!(r.json["events"][1]["channel"], json!("krowoc:requests"));
    assert_eq!(
        r.json["events"][1]["message"]["event_type"],
        json!("http_request")
    );

    let only = get(&app, "/api/recent-events?channel=krowoc:requests").await;
    assert_eq!(only.json["count"], json!(1));
    assert_eq!(only.json["channel"], json!("krowoc:requests"));
    assert_eq!(only.json["events"][0]["message"]["status"], json!(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_buffer_keeps_only_the_newest_events() {
    let redis = RedisServer::start();
    let mut config = fast_config(&redis.url());
    config.events_buffer = 3;
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    for n in 1..=5 {
        redis.int(&["PUBLISH", "app:events", &n.to_string()]);
    }
    let r = eventually("5 events received", Duration::from_secs(5), || async {
        let r = get(&app, "/api/recent-events?limit=100").await;
        (r.json["buffer"]["received"] == json!(5)).then_some(r)
    })
    .await;
    assert_eq!(r.json["limit"], json!(3));
    let got: Vec<&Value> = r.json["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["message"])
        .collect();
    assert_eq!(got, vec![&json!(5), &json!(4), &json!(3)]);
    assert_eq!(r.json["buffer"]["buffered"], json!(3));
    assert_eq!(r.json["buffer"]["evicted"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_kept_truncated() {
    let redis = RedisServer::start();
    let mut config = fast_config(&redis.url());
    config.max_event_bytes = 10;
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    redis.int(&["PUBLISH", "app:events", "0123456789abcdef"]);
    let r = eventually("1 event", Duration::from_secs(5), || async {
        let r = get(&app, "/api/recent-events").await;
        (r.json["count"] == json!(1)).then_some(r)
    })
    .await;
    let e = &r.json["events"][0];
    assert_eq!(e["message"], json!("0123456789"));
    assert_eq!(e["truncated"], json!(true));
    assert_eq!(e["bytes"], json!(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pings_do_not_disturb_the_subscription() {
    let redis = RedisServer::start();
    let mut config = fast_config(&redis.url());
    config.subscriber_ping_interval = Duration::from_millis(20);
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;

    // Several PINGs go by; the subscription stays up and still delivers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snapshot = state.subscriber().snapshot();
    assert_eq!(snapshot.phase, SubscriberPhase::Subscribed, "{snapshot:?}");
    assert_eq!(snapshot.resubscriptions, 0, "{snapshot:?}");
    assert_eq!(snapshot.last_error, None, "{snapshot:?}");
    assert_eq!(
        redis.int(&["PUBLISH", "app:events", r#"{"after":"pings"}"#]),
        1
    );
    eventually(
        "the event after the pings",
        Duration::from_secs(5),
        || async {
            let r = get(&app, "/api/recent-events").await;
            (r.json["events"][0]["message"] == json!({"after": "pings"})).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_channels_means_no_subscriber() {
    let redis = RedisServer::start();
    let mut config = fast_config(&redis.url());
    config.channels.clear();
    let state = AppState::start(config).expect("config");
    let app = app(state.clone());
    assert_eq!(redis.int(&["PUBLISH", "app:events", "x"]), 0);
    let r = get(&app, "/health/deep").await;
    assert_eq!(r.json["status"], json!("pass"), "{}", r.text);
    assert_eq!(
        r.json["checks"]["redis:subscriber"][0]["observedValue"],
        json!("disabled")
    );
}
