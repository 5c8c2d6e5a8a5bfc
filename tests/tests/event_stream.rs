//! The upstream's live event feed through a real gateway (Envoy and host-shim running
//! envoy/envoy.yaml with the real plugin): `GET /api/events/stream` is passed on as the upstream
//! writes it, neither held back nor cached by the filter, and the event the filter publishes for
//! a request made through the same gateway arrives on it; the stream outlives the response
//! timeout of the other routes, and a response timeout on its own route would cut it (in Envoy
//! and host-shim alike).

use std::time::{Duration, Instant};

use krowoc_tests::{eventually, Host, Stack, StackOptions};
use serde_json::{json, Value};
use testkit::sse::{EventStream, SseEvent};

const WAIT: Duration = Duration::from_secs(10);

/// Waits until the upstream's subscriber is subscribed (so that what is published next is heard).
fn wait_subscribed(stack: &Stack) {
    let subscribed = eventually(WAIT, || {
        stack.get("/api/stats").json()["subscriber_state"] == json!("subscribed")
    });
    assert!(subscribed, "the upstream's subscriber never subscribed");
}

/// The next message event on `channel` whose message satisfies `wanted`.
fn message_on(
    stream: &mut EventStream,
    channel: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let matches = |e: &SseEvent| {
        e.kind() == "message" && {
            let data = e.json();
            data["channel"] == channel && wanted(&data["message"])
        }
    };
    stream
        .wait_for(WAIT, matches)
        .expect("the stream stays open")
        .map(|e| e.json()["message"].clone())
}

fn a_request_through_the_gateway_arrives_on_its_event_stream(host: Host) {
    let stack = Stack::on(host);
    wait_subscribed(&stack);
    let mut stream =
        EventStream::open(stack.gateway, "/api/events/stream", &[]).expect("open the stream");
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("content-length"), None);
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert!(
        stream.header("x-krowoc-edge").is_some(),
        "the filter saw it"
    );
    assert_eq!(stream.header("x-cache"), None, "no cache policy");

    // The first event arrives while the response is open: nothing waits for its end.
    let status = stream
        .wait_for(WAIT, |e| e.kind() == "status")
        .expect("read")
        .expect("the status event");
    assert_eq!(status.json()["state"], json!("subscribed"));

    // A request through the gateway: the filter publishes its event, the subscriber streams it.
    let r = stack.get("/api/cached-data?user_id=sse");
    assert_eq!(r.status, 200, "{}", r.text());
    let event = message_on(&mut stream, "krowoc:requests", |m| {
        m["path"] == "/api/cached-data"
    })
    .expect("the request's event on the stream");
    assert_eq!(event["event_type"], json!("http_request"));
    assert_eq!(event["route"], json!("cached-data"));
    assert_eq!(event["status"], json!(200));
    assert_eq!(event["cache"], json!("MISS"));

    // The guide's publish endpoint, called through the gateway, reaches the stream as well.
    let body = json!({"channel": "app:events", "message": {"through": host_name(host)}});
    let r = stack.request(
        "POST",
        "/api/publish-event",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let app_event = message_on(&mut stream, "app:events", |_| true).expect("the app event");
    assert_eq!(app_event, json!({"through": host_name(host)}));
}

fn the_event_stream_outlives_the_other_routes_response_timeout(host: Host) {
    // Every route but the stream's answers within 1 s, or is cut.
    let stack = Stack::start_with(StackOptions {
        host,
        connection_manager: Some(krowoc_tests::catch_all_timeout("1s")),
        ..StackOptions::default()
    });
    wait_subscribed(&stack);
    let mut stream =
        EventStream::open(stack.gateway, "/api/events/stream", &[]).expect("open the stream");
    assert_eq!(stream.status, 200);
    stream
        .wait_for(WAIT, |e| e.kind() == "status")
        .expect("read")
        .expect("the status event");

    // Quiet for longer than the timeout (the upstream's keep-alive is 15 s away), then an event.
    std::thread::sleep(Duration::from_millis(2500));
    let r = stack.get("/api/rate-limited");
    assert_eq!(r.status, 200, "{}", r.text());
    let event = message_on(&mut stream, "krowoc:requests", |m| {
        m["path"] == "/api/rate-limited"
    })
    .expect("an event after the timeout: the stream was not cut");
    assert_eq!(event["rate_limit"], json!("allowed"));
}

fn a_response_timeout_cuts_the_open_stream(host: Host) {
    // Why the stream's route has none: with one of 1 s, the open stream is cut at 1 s.
    let stack = Stack::start_with(StackOptions {
        host,
        connection_manager: Some(Box::new(|hcm| {
            let routes = &mut hcm["route_config"]["virtual_hosts"][0]["routes"];
            for route in routes.as_sequence_mut().expect("routes") {
                if route["match"]["path"] == "/api/events/stream" {
                    route["route"]["timeout"] = "1s".into();
                }
            }
        })),
        ..StackOptions::default()
    });
    let opened = Instant::now();
    let mut stream =
        EventStream::open(stack.gateway, "/api/events/stream", &[]).expect("open the stream");
    assert_eq!(stream.status, 200, "the head came before the timeout");
    let ended = loop {
        match stream.next_event(WAIT) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream was still open {WAIT:?} after a 1 s timeout"),
            Err(e) => break (e, opened.elapsed()),
        }
    };
    assert_eq!(
        ended.0.kind(),
        std::io::ErrorKind::UnexpectedEof,
        "{}",
        ended.0
    );
    assert!(
        ended.1 >= Duration::from_millis(900),
        "cut after {:?}",
        ended.1
    );
    assert!(!stream.finished(), "cut short, not ended by its framing");
}

fn host_name(host: Host) -> &'static str {
    match host {
        Host::Envoy => "envoy",
        Host::HostShim => "host-shim",
    }
}

krowoc_tests::on_both_hosts!(
    a_request_through_the_gateway_arrives_on_its_event_stream,
    the_event_stream_outlives_the_other_routes_response_timeout,
    a_response_timeout_cuts_the_open_stream,
);
