//! `GET /api/events/stream` against a real redis-server: the subscriber's state first, then each
//! received message as it arrives; keep-alive comments; slow clients skip and are told; the
//! number of streams is bounded and a client that goes away frees its slot; Redis going down is
//! reported on the open stream, which carries on when Redis returns; a client that reconnects
//! with `Last-Event-ID` gets what it missed; shutdown ends every stream.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{blocking, eventually, fast_config, get, open_stream, publish, wait_for_phase, Next};
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{app, AppState, UpstreamConfig};
use serde_json::{json, Value};
use testkit::RedisServer;

const WAIT: Duration = Duration::from_secs(10);

/// A subscribed service on `redis` with `change` applied to its configuration.
async fn subscribed(
    redis: &RedisServer,
    change: impl FnOnce(&mut UpstreamConfig),
) -> (AppState, axum::Router) {
    let mut config = fast_config(&redis.url());
    change(&mut config);
    let state = AppState::start(config).expect("config");
    let router = app(state.clone());
    wait_for_phase(&state, SubscriberPhase::Subscribed).await;
    (state, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_opens_with_the_subscriber_state_then_delivers_each_message() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |_| {}).await;

    let mut stream = open_stream(&app, &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-cache"));
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    assert_eq!(stream.header("content-length"), None);

    let first = stream.event("the first status", WAIT).await;
    assert_eq!(first.kind(), "status");
    assert_eq!(first.retry, Some(1000), "the reconnect delay");
    let status = first.json();
    assert_eq!(status["state"], json!("subscribed"), "{status}");
    assert_eq!(status["channels"], json!(["krowoc:requests", "app:events"]));

    // The guide's publish endpoint, and the filter's request events on their channel.
    let r = publish(&app, json!({"order": 7})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let request_event = r#"{"event_type":"http_request","path":"/api/rate-limited","status":429}"#;
    assert_eq!(redis.int(&["PUBLISH", "krowoc:requests", request_event]), 1);

    let published = stream.event("the published message", WAIT).await;
    assert_eq!(published.kind(), "message");
    let data = published.json();
    assert_eq!(data["channel"], json!("app:events"));
    assert_eq!(data["message"], json!({"order": 7}));
    assert_eq!(data["seq"], json!(1));
    assert!(data["received_at"]
        .as_str()
        .expect("received_at")
        .ends_with('Z'));
    let id = published.id.clone().expect("an id");
    assert!(id.ends_with("-1"), "{id}");

    let from_filter = stream.event("the request event", WAIT).await.json();
    assert_eq!(from_filter["channel"], json!("krowoc:requests"));
    assert_eq!(from_filter["message"]["status"], json!(429));
    assert_eq!(from_filter["seq"], json!(2));

    let stats = get(&app, "/api/stats").await;
    assert_eq!(stats.json["event_streams_open"], json!(1), "{}", stats.text);
    assert_eq!(stats.json["event_streams_opened"], json!(1));
    assert_eq!(state.events().followers(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_sends_keep_alive_comments() {
    let redis = RedisServer::start();
    let (_state, app) = subscribed(&redis, |c| {
        c.event_stream_keep_alive = Duration::from_millis(50)
    })
    .await;
    let mut stream = open_stream(&app, &[]).await;
    stream.event("the first status", WAIT).await;
    for _ in 0..3 {
        match stream.next(Duration::from_secs(2)).await {
            Next::Event(e) => assert_eq!(e.comment.as_deref(), Some("keep-alive"), "{e:?}"),
            other => panic!("a keep-alive comment, not {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_skips_the_oldest_events_and_is_told_how_many() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |c| c.event_stream_buffer = 4).await;
    let mut stream = open_stream(&app, &[]).await;
    stream.event("the first status", WAIT).await;

    // The client reads nothing while ten messages arrive: only four wait for it.
    for n in 1..=10 {
        redis.int(&["PUBLISH", "app:events", &n.to_string()]);
    }
    eventually("10 messages received", WAIT, || async {
        (state.events().received() == 10).then_some(())
    })
    .await;

    let lagged = stream.event("the lag notice", WAIT).await;
    assert_eq!(lagged.kind(), "lagged");
    assert_eq!(lagged.json(), json!({"skipped": 6}));
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(stream.event("a kept message", WAIT).await.json()["message"].clone());
    }
    assert_eq!(rest, vec![json!(7), json!(8), json!(9), json!(10)]);

    let stats = get(&app, "/api/stats").await;
    assert_eq!(
        stats.json["event_stream_skipped"],
        json!(6),
        "{}",
        stats.text
    );
    // The ring buffer of /api/recent-events is not the stream's: it kept every one.
    assert_eq!(state.events().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |c| c.max_event_streams = 2).await;
    let first = open_stream(&app, &[]).await;
    let second = open_stream(&app, &[]).await;
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );

    let refused = get(&app, "/api/events/stream").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text
    );
    assert_eq!(refused.error_kind(), Some("too_many_streams"));
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-event-streams")),
        "{}",
        refused.text
    );
    assert_eq!(state.event_streams_open(), 2);

    // A client that goes away (its body dropped) frees its slot and its receiver at once.
    drop(first);
    assert_eq!(state.event_streams_open(), 1);
    assert_eq!(state.events().followers(), 1);
    let third = open_stream(&app, &[]).await;
    assert_eq!(third.status, StatusCode::OK);

    let stats = get(&app, "/api/stats").await;
    assert_eq!(
        stats.json["event_streams_refused"],
        json!(1),
        "{}",
        stats.text
    );
    assert_eq!(stats.json["event_streams_opened"], json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot_and_receiver_at_once() {
    let redis = RedisServer::start();
    // No write for a minute: the server notices the closed connection itself.
    let (state, app) = subscribed(&redis, |c| {
        c.event_stream_keep_alive = Duration::from_secs(60)
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let stream = tokio::task::spawn_blocking(move || {
        let mut stream =
            testkit::sse::EventStream::open(addr, "/api/events/stream", &[]).expect("open");
        assert_eq!(stream.status, 200);
        assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
        let first = stream
            .wait_for(WAIT, |e| e.kind() == "status")
            .expect("read")
            .expect("the status");
        assert_eq!(first.json()["state"], json!("subscribed"));
        stream
    })
    .await
    .expect("client");
    assert_eq!(state.event_streams_open(), 1);
    assert_eq!(state.events().followers(), 1);

    drop(stream.into_inner());
    eventually("the stream's slot and receiver freed", WAIT, || async {
        (state.event_streams_open() == 0 && state.events().followers() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_the_stream_says_so_and_goes_on_when_it_returns() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |_| {}).await;
    let mut stream = open_stream(&app, &[]).await;
    stream
        .until("subscribed", WAIT, "status", |s| s["state"] == "subscribed")
        .await;

    let redis = blocking(redis, RedisServer::stop).await;
    let down = stream
        .until("reconnecting", WAIT, "status", |s| {
            s["state"] == "reconnecting"
        })
        .await;
    assert!(
        down["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    assert!(down["retry_in_ms"].as_u64().is_some(), "{down}");

    let redis = blocking(redis, RedisServer::restart).await;
    let back = stream
        .until("subscribed again", WAIT, "status", |s| {
            s["state"] == "subscribed"
        })
        .await;
    assert_eq!(back["resubscriptions"], json!(1), "{back}");
    redis.int(&["PUBLISH", "app:events", r#"{"after":"the outage"}"#]);
    let message = stream
        .until("the message after the outage", WAIT, "message", |_| true)
        .await;
    assert_eq!(message["message"], json!({"after": "the outage"}));
    assert_eq!(state.event_streams_open(), 1, "the same stream throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_last_event_id_gets_what_it_missed() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |c| c.events_buffer = 4).await;
    let mut stream = open_stream(&app, &[]).await;
    redis.int(&["PUBLISH", "app:events", "1"]);
    let seen = stream.until("message 1", WAIT, "message", |_| true).await;
    assert_eq!(seen["message"], json!(1));
    drop(stream);

    // Two more while it is away: both are replayed, in order, then live messages follow.
    let last_id = state.events().event_id(1);
    for n in [2, 3] {
        redis.int(&["PUBLISH", "app:events", &n.to_string()]);
    }
    eventually("3 received", WAIT, || async {
        (state.events().received() == 3).then_some(())
    })
    .await;
    let mut resumed = open_stream(&app, &[("last-event-id", &last_id)]).await;
    assert_eq!(resumed.event("status", WAIT).await.kind(), "status");
    let replayed: Vec<Value> = [
        resumed.event("replayed 2", WAIT).await,
        resumed.event("replayed 3", WAIT).await,
    ]
    .iter()
    .map(|e| e.json()["message"].clone())
    .collect();
    assert_eq!(replayed, vec![json!(2), json!(3)]);
    redis.int(&["PUBLISH", "app:events", "4"]);
    let live = resumed.event("live 4", WAIT).await.json();
    assert_eq!(live["message"], json!(4));

    // Past what the buffer (4 events) holds: told how many are gone, then the rest.
    for n in 5..=9 {
        redis.int(&["PUBLISH", "app:events", &n.to_string()]);
    }
    eventually("9 received", WAIT, || async {
        (state.events().received() == 9).then_some(())
    })
    .await;
    let mut late = open_stream(&app, &[("last-event-id", &last_id)]).await;
    late.event("status", WAIT).await;
    let lagged = late.event("the gap", WAIT).await;
    assert_eq!(lagged.kind(), "lagged");
    assert_eq!(lagged.json(), json!({"skipped": 4}), "2..=5 are gone");
    let first_kept = late.event("replayed 6", WAIT).await.json();
    assert_eq!(first_kept["message"], json!(6));

    // An id from another run of the service (or anything else) replays nothing.
    let mut stranger = open_stream(&app, &[("last-event-id", "1-1")]).await;
    stranger.event("status", WAIT).await;
    redis.int(&["PUBLISH", "app:events", "10"]);
    let next = stranger
        .until("message 10", WAIT, "message", |_| true)
        .await;
    assert_eq!(next["message"], json!(10), "no replay for a stranger's id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream() {
    let redis = RedisServer::start();
    let (state, app) = subscribed(&redis, |_| {}).await;
    let mut stream = open_stream(&app, &[]).await;
    stream.event("status", WAIT).await;
    state.close_event_streams();
    loop {
        match stream.next(WAIT).await {
            Next::Ended => break,
            Next::Event(e) if e.is_comment() => continue,
            other => panic!("the end of the stream, not {other:?}"),
        }
    }
    assert_eq!(state.event_streams_open(), 0);
    // A stream asked for during shutdown ends after its status.
    let mut late = open_stream(&app, &[]).await;
    late.event("status", WAIT).await;
    assert!(matches!(late.next(WAIT).await, Next::Ended));
}
