//! `GET /health` (liveness: the process answers; nothing else is checked) and `GET /health/deep`
//! (Redis and the subscriber), both `application/health+json` after
//! draft-inadarei-api-health-check.
//!
//! `/health/deep` checks, each an array as the draft shapes them: the per-server checks hold
//! one element per Redis server checked (the server; the master the sentinels name; in a
//! cluster, each master), told apart by `componentId` (`HOST:PORT`, or the standalone URL):
//!
//! | key                  | observedValue / unit       | extra fields                                   |
//! |----------------------|----------------------------|------------------------------------------------|
//! | `redis:responseTime` | PING latency, `ms`         | `reachable`, `output` (the error) when failing |
//! | `redis:memory`       | `used_memory`, `bytes`     | `used_memory_human`, `maxmemory`, `maxmemory_human`, `maxmemory_policy` |
//! | `redis:connections`  | `connected_clients`        | `connected_clients`                            |
//! | `redis:uptime`       | `uptime_in_seconds`, `s`   | `uptime_in_seconds`, `redis_version`, `role`, `redis_mode` |
//! | `redis:cluster`      | `slots_ok`, `slots`        | `cluster_state`, `slots_assigned`, `slots_pfail`, `slots_fail`, `known_nodes`, `cluster_size`, `nodes`, `replicas`, `masters` [{`address`, `id`, `slots`, `keys`}], `failed_nodes` |
//! | `redis:sentinel`     | the master's `HOST:PORT`   | `master_name`, `master`, `role` (the master's own), `sentinels`, `watching` (the sentinel heard for failovers), `master_changes`, `last_change_at` |
//! | `redis:subscriber`   | the state, e.g. `subscribed` | channels, node, since, last_error, retry_in_ms ... |
//!
//! `redis:cluster` only in a cluster, `redis:sentinel` only with Sentinel.
//!
//! Overall status: `fail` (503) when Redis cannot be reached — the server's or the master's PING
//! fails, the sentinels name no master, or no cluster node answers `CLUSTER INFO` — and then
//! only `redis:responseTime` (with `redis:sentinel`) and `redis:subscriber` are present; `fail`
//! too when `cluster_state` is not `ok`. `warn` (200) when the subscriber is not subscribed,
//! INFO fails, memory is at ≥ 90% of a set `maxmemory`, a cluster master does not answer, a
//! node is marked failing or fewer than 16384 slots are `ok`, the master the sentinels name says
//! it is a replica, or no sentinel is heard; else `pass` (200).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::clock::Timestamp;
use crate::cluster::{keyspace_keys, ClusterLink, ClusterNode, CLUSTER_SLOTS};
use crate::deployment::NodeAddress;
use crate::error::Error;
use crate::redis_link::{check_pong, RedisLink, Topology};
use crate::sentinel::SentinelLink;
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
    let mut report = Report::new();
    let redis = state.redis();
    match redis.topology() {
        Topology::Standalone => {
            let ping = redis.ping().await;
            let info = match &ping {
                Ok(_) => Some(redis.info().await),
                Err(_) => None,
            };
            report.node(&redis.shown(), ping, info, Status::Fail);
        }
        Topology::Sentinel(sentinel) => sentinel_checks(&mut report, redis, sentinel).await,
        Topology::Cluster(cluster) => cluster_checks(&mut report, redis, cluster).await,
    }
    report.subscriber(&state);

    let mut body = json!({
        "status": report.status.as_str(),
        "version": "1",
        "releaseId": env!("CARGO_PKG_VERSION"),
        "serviceId": SERVICE_ID,
        "description": "the demo upstream, its Redis and its event subscriber",
        "checks": report.checks,
    });
    if !report.problems.is_empty() {
        body["output"] = json!(report.problems.join("; "));
    }
    health_response(report.status, body)
}

/// The master the sentinels name, checked as a standalone server, and `redis:sentinel`.
async fn sentinel_checks(report: &mut Report, redis: &RedisLink, sentinel: &SentinelLink) {
    let ping = redis.ping().await;
    let info = match &ping {
        Ok(_) => Some(redis.info().await),
        Err(_) => None,
    };
    let info = report.node(&redis.shown(), ping, info, Status::Fail);
    let role = info
        .as_deref()
        .and_then(|text| parse_info(text).get("role").map(|r| r.to_string()));
    let view = sentinel.view();
    let mut status = Status::Pass;
    if view.master.is_none() {
        status = Status::Fail;
    } else if role.as_deref().is_some_and(|r| r != "master") {
        status = Status::Warn;
        report.problem(format!(
            "the node the sentinels name as master {:?} says it is a {}",
            view.master_name,
            role.as_deref().unwrap_or_default()
        ));
    }
    if view.watching.is_none() {
        status = status.max(Status::Warn);
        report.problem("no sentinel is being heard for failover announcements".to_string());
    }
    report.worsen(status);
    let shown = |a: &Option<NodeAddress>| a.as_ref().map(|a| a.to_string());
    let mut check = report.component(&format!("sentinel master {}", view.master_name), status);
    check.insert("observedValue".into(), json!(shown(&view.master)));
    check.insert("master_name".into(), json!(view.master_name));
    check.insert("master".into(), json!(shown(&view.master)));
    check.insert("role".into(), json!(role));
    check.insert(
        "sentinels".into(),
        json!(view
            .sentinels
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()),
    );
    check.insert("watching".into(), json!(shown(&view.watching)));
    check.insert("master_changes".into(), json!(view.master_changes));
    check.insert(
        "last_change_at".into(),
        json!(view.last_change_at.map(|t| t.rfc3339())),
    );
    report.push("redis:sentinel", check);
}

/// `CLUSTER INFO` and `CLUSTER NODES` as `redis:cluster`, and each master checked as a
/// standalone server (one entry per master in each check).
async fn cluster_checks(report: &mut Report, redis: &RedisLink, cluster: &ClusterLink) {
    let info = match cluster.cluster_info(redis).await {
        Ok(info) => info,
        Err(e) => {
            report.node(&redis.shown(), Err(e), None, Status::Fail);
            return;
        }
    };
    let nodes = cluster.cluster_nodes(redis).await;
    let mut status = if info.is_ok() {
        Status::Pass
    } else {
        report.problem(format!(
            "the cluster state is {}",
            info.state.as_deref().unwrap_or("unknown")
        ));
        Status::Fail
    };
    if info.slots_ok.unwrap_or(0) < CLUSTER_SLOTS {
        status = status.max(Status::Warn);
        report.problem(format!(
            "{} of {CLUSTER_SLOTS} slots are served without trouble",
            info.slots_ok.unwrap_or(0)
        ));
    }
    let nodes = match nodes {
        Ok(nodes) => nodes,
        Err(e) => {
            status = status.max(Status::Warn);
            report.problem(e.message().to_string());
            Vec::new()
        }
    };
    let masters: Vec<&ClusterNode> = nodes
        .iter()
        .filter(|n| n.master && !n.failed && n.slots > 0)
        .collect();
    let failed: Vec<String> = nodes
        .iter()
        .filter(|n| n.failed)
        .map(|n| n.address.to_string())
        .collect();
    if !failed.is_empty() {
        status = status.max(Status::Warn);
        report.problem(format!(
            "cluster nodes marked failing: {}",
            failed.join(", ")
        ));
    }

    let probes = masters.iter().map(|m| async move {
        let started = Instant::now();
        let ping = redis
            .bounded(
                &format!("PING to {}", m.address),
                cluster.query_node::<String>(&redis::cmd("PING"), &m.address),
            )
            .await
            .and_then(|reply| check_pong(&reply).map(|()| started.elapsed()));
        let info = match &ping {
            Ok(_) => Some(
                redis
                    .bounded(
                        &format!("INFO on {}", m.address),
                        cluster.query_node::<String>(&redis::cmd("INFO"), &m.address),
                    )
                    .await,
            ),
            Err(_) => None,
        };
        (ping, info)
    });
    let results = futures_util::future::join_all(probes).await;
    let mut master_views = Vec::new();
    for (master, (ping, info)) in masters.iter().zip(results) {
        let text = report.node(&master.address.to_string(), ping, info, Status::Warn);
        let keys = text.as_deref().map(|t| {
            parse_info(t)
                .get("db0")
                .and_then(|v| keyspace_keys(v))
                .unwrap_or(0)
        });
        master_views.push(json!({
            "address": master.address.to_string(),
            "id": master.id,
            "slots": master.slots,
            "keys": keys,
        }));
    }

    report.worsen(status);
    let mut check = report.component(&cluster.seeds().to_string(), status);
    check.insert("observedValue".into(), json!(info.slots_ok));
    check.insert("observedUnit".into(), json!("slots"));
    check.insert("cluster_state".into(), json!(info.state));
    check.insert("slots_assigned".into(), json!(info.slots_assigned));
    check.insert("slots_ok".into(), json!(info.slots_ok));
    check.insert("slots_pfail".into(), json!(info.slots_pfail));
    check.insert("slots_fail".into(), json!(info.slots_fail));
    check.insert("known_nodes".into(), json!(info.known_nodes));
    check.insert("cluster_size".into(), json!(info.size));
    check.insert("nodes".into(), json!(nodes.len()));
    check.insert(
        "replicas".into(),
        json!(nodes.iter().filter(|n| !n.master).count()),
    );
    check.insert("masters".into(), json!(master_views));
    check.insert("failed_nodes".into(), json!(failed));
    report.push("redis:cluster", check);
}

/// The checks being gathered, the worst status so far and the problems to report.
struct Report {
    time: String,
    checks: Map<String, Value>,
    status: Status,
    problems: Vec<String>,
}

impl Report {
    fn new() -> Report {
        Report {
            time: Timestamp::now().rfc3339(),
            checks: Map::new(),
            status: Status::Pass,
            problems: Vec::new(),
        }
    }

    fn component(&self, id: &str, status: Status) -> Map<String, Value> {
        let mut check = Map::new();
        check.insert("componentId".into(), json!(id));
        check.insert("componentType".into(), json!("datastore"));
        check.insert("status".into(), json!(status.as_str()));
        check.insert("time".into(), json!(self.time));
        check
    }

    /// Appends `check` to the array under `key` (one element per node checked).
    fn push(&mut self, key: &str, check: Map<String, Value>) {
        match self.checks.get_mut(key) {
            Some(Value::Array(entries)) => entries.push(Value::Object(check)),
            _ => {
                self.checks.insert(key.into(), json!([check]));
            }
        }
    }

    fn worsen(&mut self, status: Status) {
        self.status = self.status.max(status);
    }

    fn problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// One Redis server's checks: `redis:responseTime` from its PING, and from its INFO
    /// `redis:memory`, `redis:connections` and `redis:uptime` (or `redis:info` when INFO
    /// fails). A failed PING makes the status `down`. Returns the INFO text.
    fn node(
        &mut self,
        id: &str,
        ping: Result<Duration, Error>,
        info: Option<Result<String, Error>>,
        down: Status,
    ) -> Option<String> {
        let latency = match ping {
            Err(e) => {
                self.worsen(down);
                self.problem(e.message().to_string());
                let mut check = self.component(id, down);
                check.insert("reachable".into(), json!(false));
                check.insert("output".into(), json!(e.message()));
                self.push("redis:responseTime", check);
                return None;
            }
            Ok(latency) => latency,
        };
        let mut check = self.component(id, Status::Pass);
        check.insert("reachable".into(), json!(true));
        let ms = (latency.as_secs_f64() * 1e6).round() / 1e3;
        check.insert("observedValue".into(), json!(ms));
        check.insert("observedUnit".into(), json!("ms"));
        self.push("redis:responseTime", check);

        let text = match info? {
            Ok(text) => text,
            Err(e) => {
                self.worsen(Status::Warn);
                self.problem(e.message().to_string());
                let mut check = self.component(id, Status::Warn);
                check.insert("output".into(), json!(e.message()));
                self.push("redis:info", check);
                return None;
            }
        };
        let info = parse_info(&text);
        let number = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok());
        let text_of = |k: &str| info.get(k).map(|v| v.to_string());

        let used = number("used_memory");
        let max = number("maxmemory").unwrap_or(0);
        let memory_status = match used {
            Some(used) if max > 0 && used as f64 >= MEMORY_WARN_RATIO * max as f64 => {
                self.problem(format!(
                    "Redis {id} uses {used} of maxmemory {max} bytes (≥ {}%)",
                    (MEMORY_WARN_RATIO * 100.0) as u32
                ));
                Status::Warn
            }
            _ => Status::Pass,
        };
        self.worsen(memory_status);
        let mut memory = self.component(id, memory_status);
        memory.insert("observedValue".into(), json!(used));
        memory.insert("observedUnit".into(), json!("bytes"));
        memory.insert("used_memory".into(), json!(used));
        memory.insert(
            "used_memory_human".into(),
            json!(text_of("used_memory_human")),
        );
        memory.insert("maxmemory".into(), json!(number("maxmemory")));
        memory.insert("maxmemory_human".into(), json!(text_of("maxmemory_human")));
        memory.insert(
            "maxmemory_policy".into(),
            json!(text_of("maxmemory_policy")),
        );
        self.push("redis:memory", memory);

        let mut connections = self.component(id, Status::Pass);
        connections.insert("observedValue".into(), json!(number("connected_clients")));
        connections.insert("observedUnit".into(), json!("clients"));
        connections.insert(
            "connected_clients".into(),
            json!(number("connected_clients")),
        );
        self.push("redis:connections", connections);

        let mut uptime = self.component(id, Status::Pass);
        uptime.insert("observedValue".into(), json!(number("uptime_in_seconds")));
        uptime.insert("observedUnit".into(), json!("s"));
        uptime.insert(
            "uptime_in_seconds".into(),
            json!(number("uptime_in_seconds")),
        );
        uptime.insert("redis_version".into(), json!(text_of("redis_version")));
        uptime.insert("role".into(), json!(text_of("role")));
        uptime.insert("redis_mode".into(), json!(text_of("redis_mode")));
        self.push("redis:uptime", uptime);
        Some(text)
    }

    /// `redis:subscriber`: `warn` unless subscribed (or disabled).
    fn subscriber(&mut self, state: &AppState) {
        let subscriber = state.subscriber().snapshot();
        let status = match subscriber.phase {
            SubscriberPhase::Subscribed | SubscriberPhase::Disabled => Status::Pass,
            SubscriberPhase::Connecting | SubscriberPhase::Reconnecting => Status::Warn,
        };
        if status != Status::Pass {
            self.problem(format!(
                "the event subscriber is {}{}",
                subscriber.phase.as_str(),
                subscriber
                    .last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        self.worsen(status);
        let mut check = match subscriber.to_json() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        check.insert("componentType".into(), json!("component"));
        check.insert("observedValue".into(), json!(subscriber.phase.as_str()));
        check.insert("status".into(), json!(status.as_str()));
        check.insert("time".into(), json!(self.time));
        check.insert("messages_received".into(), json!(state.events().received()));
        if let Some(e) = &subscriber.last_error {
            if status != Status::Pass {
                check.insert("output".into(), json!(e));
            }
        }
        self.push("redis:subscriber", check);
    }
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
