//! `GET /health` (liveness: the process answers; nothing else is checked) and `GET /health/deep`
//! (Redis and the subscriber), both `application/health+json` after
//! draft-inadarei-api-health-check.
//!
//! `/health/deep` checks, each a one-element array as the draft shapes them:
//!
//! | key                  | observedValue / unit       | extra fields                                   |
//! |----------------------|----------------------------|------------------------------------------------|
//! | `redis:responseTime` | PING latency, `ms`         | `reachable`, `output` (the error) when failing |
//! | `redis:memory`       | `used_memory`, `bytes`     | `used_memory_human`, `maxmemory`, `maxmemory_human`, `maxmemory_policy` |
//! | `redis:connections`  | `connected_clients`        | `connected_clients`                            |
//! | `redis:uptime`       | `uptime_in_seconds`, `s`   | `uptime_in_seconds`, `redis_version`, `role`, `redis_mode` |
//! | `redis:subscriber`   | the state, e.g. `subscribed` | channels, since, last_error, retry_in_ms ... |
//!
//! Overall status: `fail` (503) when PING fails — then only `redis:responseTime` and
//! `redis:subscriber` are present; `warn` (200) when PING works but the subscriber is not
//! subscribed, INFO fails, or memory is at ≥ 90% of a set `maxmemory`; else `pass` (200).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::clock::Timestamp;
use crate::subscriber::SubscriberPhase;
use crate::AppState;

pub const HEALTH_JSON: &str = "application/health+json";

const SERVICE_ID: &str = "krowoc-upstream";

/// Memory use at or above this share of `maxmemory` turns the status to `warn`.
const MEMORY_WARN_RATIO: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// `GET /health` — always `{"status": "pass", ...}` with the process uptime.
pub async fn health(State(state): State<AppState>) -> Response {
    let body = json!({
        "status": Status::Pass.as_str(),
        "version": "1",
        "releaseId": env!("CARGO_PKG_VERSION"),
        "serviceId": SERVICE_ID,
        "description": "liveness: the process answers; dependencies are checked by /health/deep",
        "checks": {
            "uptime": [{
                "componentType": "system",
                "observedValue": state.uptime().as_secs(),
                "observedUnit": "s",
                "status": Status::Pass.as_str(),
                "time": Timestamp::now().rfc3339(),
            }]
        }
    });
    health_response(Status::Pass, body)
}

/// `GET /health/deep` — see the module docs.
pub async fn health_deep(State(state): State<AppState>) -> Response {
    let time = Timestamp::now().rfc3339();
    let redis = state.redis();
    let component = |status: Status| {
        let mut check = Map::new();
        check.insert("componentId".into(), json!(redis.shown()));
        check.insert("componentType".into(), json!("datastore"));
        check.insert("status".into(), json!(status.as_str()));
        check.insert("time".into(), json!(time));
        check
    };
    let mut checks = Map::new();
    let mut status = Status::Pass;
    let mut problems: Vec<String> = Vec::new();

    match redis.ping().await {
        Err(e) => {
            status = Status::Fail;
            problems.push(e.message().to_string());
            let mut check = component(Status::Fail);
            check.insert("reachable".into(), json!(false));
            check.insert("output".into(), json!(e.message()));
            checks.insert("redis:responseTime".into(), json!([check]));
        }
        Ok(latency) => {
            let mut check = component(Status::Pass);
            check.insert("reachable".into(), json!(true));
            let ms = (latency.as_secs_f64() * 1e6).round() / 1e3;
            check.insert("observedValue".into(), json!(ms));
            check.insert("observedUnit".into(), json!("ms"));
            checks.insert("redis:responseTime".into(), json!([check]));

            match redis.info().await {
                Ok(text) => {
                    let info = parse_info(&text);
                    let number = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok());
                    let text = |k: &str| info.get(k).map(|v| v.to_string());

                    let used = number("used_memory");
                    let max = number("maxmemory").unwrap_or(0);
                    let memory_status = match used {
                        Some(used) if max > 0 && used as f64 >= MEMORY_WARN_RATIO * max as f64 => {
                            problems.push(format!(
                                "Redis uses {used} of maxmemory {max} bytes (≥ {}%)",
                                (MEMORY_WARN_RATIO * 100.0) as u32
                            ));
                            Status::Warn
                        }
                        _ => Status::Pass,
                    };
                    status = status.max(memory_status);
                    let mut memory = component(memory_status);
                    memory.insert("observedValue".into(), json!(used));
                    memory.insert("observedUnit".into(), json!("bytes"));
                    memory.insert("used_memory".into(), json!(used));
                    memory.insert("used_memory_human".into(), json!(text("used_memory_human")));
                    memory.insert("maxmemory".into(), json!(number("maxmemory")));
                    memory.insert("maxmemory_human".into(), json!(text("maxmemory_human")));
                    memory.insert("maxmemory_policy".into(), json!(text("maxmemory_policy")));
                    checks.insert("redis:memory".into(), json!([memory]));

                    let mut connections = component(Status::Pass);
                    connections.insert("observedValue".into(), json!(number("connected_clients")));
                    connections.insert("observedUnit".into(), json!("clients"));
                    connections.insert(
                        "connected_clients".into(),
                        json!(number("connected_clients")),
                    );
                    checks.insert("redis:connections".into(), json!([connections]));

                    let mut uptime = component(Status::Pass);
                    uptime.insert("observedValue".into(), json!(number("uptime_in_seconds")));
                    uptime.insert("observedUnit".into(), json!("s"));
                    uptime.insert(
                        "uptime_in_seconds".into(),
                        json!(number("uptime_in_seconds")),
                    );
                    uptime.insert("redis_version".into(), json!(text("redis_version")));
                    uptime.insert("role".into(), json!(text("role")));
                    uptime.insert("redis_mode".into(), json!(text("redis_mode")));
                    checks.insert("redis:uptime".into(), json!([uptime]));
                }
                Err(e) => {
                    status = status.max(Status::Warn);
                    problems.push(e.message().to_string());
                    let mut check = component(Status::Warn);
                    check.insert("output".into(), json!(e.message()));
                    checks.insert("redis:info".into(), json!([check]));
                }
            }
        }
    }

    let subscriber = state.subscriber().snapshot();
    let subscriber_status = match subscriber.phase {
        SubscriberPhase::Subscribed | SubscriberPhase::Disabled => Status::Pass,
        SubscriberPhase::Connecting | SubscriberPhase::Reconnecting => Status::Warn,
    };
    if subscriber_status != Status::Pass {
        problems.push(format!(
            "the event subscriber is {}{}",
            subscriber.phase.as_str(),
            subscriber
                .last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    status = status.max(subscriber_status);
    let mut check = match subscriber.to_json() {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    check.insert("componentType".into(), json!("component"));
    check.insert("observedValue".into(), json!(subscriber.phase.as_str()));
    check.insert("status".into(), json!(subscriber_status.as_str()));
    check.insert("time".into(), json!(time));
    check.insert("messages_received".into(), json!(state.events().received()));
    if let Some(e) = &subscriber.last_error {
        if subscriber_status != Status::Pass {
            check.insert("output".into(), json!(e));
        }
    }
    checks.insert("redis:subscriber".into(), json!([check]));

    let mut body = json!({
        "status": status.as_str(),
        "version": "1",
        "releaseId": env!("CARGO_PKG_VERSION"),
        "serviceId": SERVICE_ID,
        "description": "the demo upstream, its Redis and its event subscriber",
        "checks": checks,
    });
    if !problems.is_empty() {
        body["output"] = json!(problems.join("; "));
    }
    health_response(status, body)
}

fn health_response(status: Status, body: Value) -> Response {
    let code = match status {
        Status::Pass | Status::Warn => StatusCode::OK,
        Status::Fail => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (code, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(HEALTH_JSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `INFO`'s `key:value` lines (sections and comments skipped).
pub fn parse_info(text: &str) -> HashMap<&str, &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_become_pairs() {
        let info = parse_info(
            "# Server\r\nredis_version:7.0.15\r\nrole:master\r\n\r\n# Memory\r\nused_memory:1024\r\n",
        );
        assert_eq!(info.get("redis_version"), Some(&"7.0.15"));
        assert_eq!(info.get("role"), Some(&"master"));
        assert_eq!(info.get("used_memory"), Some(&"1024"));
        assert_eq!(info.len(), 3);
    }

    #[test]
    fn the_worst_status_wins() {
        assert_eq!(Status::Pass.max(Status::Warn), Status::Warn);
        assert_eq!(Status::Fail.max(Status::Warn), Status::Fail);
    }
}
