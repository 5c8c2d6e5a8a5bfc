//! Shared by the integration tests: a fast configuration, in-process requests, polling.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{AppState, RedisDeployment, UpstreamConfig};
use serde_json::{json, Value};
use testkit::sse::{SseEvent, SseParser};
use tower::ServiceExt;

/// Delays at zero, short backoff, so the suite stays fast; the Redis timeout leaves room for a
/// machine busy with other builds.
pub fn fast_config(redis_url: &str) -> UpstreamConfig {
    fast_config_for(RedisDeployment::standalone(redis_url))
}

/// [`fast_config`] for any deployment (a cluster, Sentinel).
pub fn fast_config_for(redis: RedisDeployment) -> UpstreamConfig {
    UpstreamConfig {
        redis,
        cached_data_delay: Duration::ZERO,
        slow_delay: Duration::ZERO,
        redis_timeout: Duration::from_secs(1),
        subscriber_backoff_initial: Duration::from_millis(20),
        subscriber_backoff_max: Duration::from_millis(200),
        subscriber_ping_interval: Duration::from_millis(200),
        ..UpstreamConfig::default()
    }
}

/// A response, its body read whole and parsed as JSON (`Value::Null` if it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `error.field` of a JSON error body.
    pub fn error_field(&self) -> Option<&str> {
        self.json["error"]["field"].as_str()
    }

    pub fn error_kind(&self) -> Option<&str> {
        self.json["error"]["kind"].as_str()
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("read response body")
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        json,
        text,
    }
}

pub async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).expect("request")).await
}

pub async fn post(app: &Router, uri: &str, body: impl Into<Body>) -> Reply {
    send(
        app,
        Request::post(uri)
            .header("content-type", "application/json")
            .body(body.into())
            .expect("request"),
    )
    .await
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_for_phase(state: &AppState, phase: SubscriberPhase) {
    eventually(
        &format!("subscriber {}", phase.as_str()),
        Duration::from_secs(10),
        || async { (state.subscriber().snapshot().phase == phase).then_some(()) },
    )
    .await
}

/// Generous: a loaded 2-core machine runs a cluster's six redis-servers, or Sentinel's five
/// processes, and a failover.
pub const SETTLE: Duration = Duration::from_secs(60);

/// Runs a blocking testkit action off the async workers.
pub async fn blocking<T: Send + 'static>(
    value: T,
    action: impl FnOnce(&mut T) + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || {
        let mut value = value;
        action(&mut value);
        value
    })
    .await
    .expect("testkit action")
}

/// `POST /api/publish-event` of `message` to `app:events`.
pub async fn publish(app: &Router, message: Value) -> Reply {
    let body = json!({"channel": "app:events", "message": message}).to_string();
    post(app, "/api/publish-event", body).await
}

/// Waits until the subscriber's buffer holds an event whose message is `message`.
pub async fn wait_for_event(app: &Router, message: &Value) {
    eventually(
        &format!("event {message} in recent-events"),
        SETTLE,
        || async {
            let r = get(app, "/api/recent-events?channel=app:events&limit=100").await;
            let events = r.json["events"].as_array()?;
            events
                .iter()
                .any(|e| &e["message"] == message)
                .then_some(())
        },
    )
    .await
}

/// What the traffic during a failover saw.
#[derive(Debug, Default)]
pub struct Traffic {
    pub published: u64,
    pub unavailable: u64,
    /// Anything but 200 or 503: it must stay empty.
    pub unexpected: Vec<String>,
}

/// PUBLISHes and `/health/deep` in a loop, in the background, until stopped.
pub struct TrafficRun {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Traffic>,
}

impl TrafficRun {
    pub fn start(app: &Router) -> TrafficRun {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_traffic(app.clone(), stop.clone()));
        TrafficRun { stop, task }
    }

    pub async fn stop(self) -> Traffic {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the traffic task")
    }
}

async fn run_traffic(app: Router, stop: Arc<AtomicBool>) -> Traffic {
    let mut seen = Traffic::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = publish(&app, json!({"traffic": n})).await;
        match r.status {
            StatusCode::OK => seen.published += 1,
            StatusCode::SERVICE_UNAVAILABLE => seen.unavailable += 1,
            _ => seen
                .unexpected
                .push(format!("publish: {} {}", r.status, r.text)),
        }
        let deep = get(&app, "/health/deep").await;
        if ![StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&deep.status) {
            seen.unexpected
                .push(format!("health: {} {}", deep.status, deep.text));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// `GET /api/events/stream` in-process (with `headers`): the response head, and its body to
/// read event by event. Dropping it is the client going away.
pub async fn open_stream(app: &Router, headers: &[(&str, &str)]) -> EventBody {
    let mut request = Request::get("/api/events/stream");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("the router is infallible");
    let (parts, body) = response.into_parts();
    EventBody {
        status: parts.status,
        headers: parts.headers,
        body,
        parser: SseParser::default(),
        ready: VecDeque::new(),
    }
}

/// What reading an event stream gave.
#[derive(Debug)]
pub enum Next {
    Event(SseEvent),
    /// Nothing within the time given.
    Quiet,
    /// The response ended.
    Ended,
}

pub struct EventBody {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Body,
    parser: SseParser,
    ready: VecDeque<SseEvent>,
}

impl EventBody {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next event or comment within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Next::Event(event);
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Next::Quiet,
                Ok(None) => return Next::Ended,
                Ok(Some(frame)) => {
                    let frame = frame.expect("the stream's body never fails");
                    if let Some(data) = frame.data_ref() {
                        self.ready.extend(self.parser.push(data));
                    }
                }
            }
        }
    }

    /// The next event that is not a comment; panics naming `what` after `timeout` or at the end.
    pub async fn event(&mut self, what: &str, timeout: Duration) -> SseEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Next::Event(e) if e.is_comment() => continue,
                Next::Event(e) => return e,
                Next::Quiet => panic!("no event within {timeout:?} waiting for {what}"),
                Next::Ended => panic!("the stream ended waiting for {what}"),
            }
        }
    }

    /// Events until one is of type `kind` and satisfies `wanted`; panics after `timeout`.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        kind: &str,
        mut wanted: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.event(what, left).await;
            if e.kind() == kind {
                let data = e.json();
                if wanted(&data) {
                    return data;
                }
            }
        }
    }
}
