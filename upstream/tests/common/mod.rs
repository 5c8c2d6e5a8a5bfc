//! Shared by the integration tests: a fast configuration, in-process requests, polling.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use krowoc_upstream::subscriber::SubscriberPhase;
use krowoc_upstream::{AppState, RedisDeployment, UpstreamConfig};
use serde_json::Value;
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
