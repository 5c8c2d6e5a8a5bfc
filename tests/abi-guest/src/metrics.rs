//! Metrics: `proxy_define_metric` (counter, gauge, histogram), `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric`.
//!
//! Defined when configured: counter `abi.requests`, gauge `abi.gauge`, histogram
//! `abi.latency_ms`. Every request adds 1 to the counter; the query may carry `gauge=N`
//! (record), `inc_gauge=D` (increment, may be negative), `hist=M` (record into the histogram)
//! and `dec_counter` (increment the counter by -1, which a counter refuses). The local reply
//! reports `x-counter` and `x-gauge` (read back with `proxy_get_metric`) and `x-dec-counter`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, LogLevel, MetricType};

use crate::{log, query_param, AbiStream};

#[derive(Debug, Default, Clone, Copy)]
pub struct MetricIds {
    pub requests: u32,
    pub gauge: u32,
    pub latency: u32,
}

pub fn define() -> MetricIds {
    let define = |kind, name: &str| match hostcalls::define_metric(kind, name) {
        Ok(id) => id,
        Err(e) => {
            log(LogLevel::Error, &format!("define_metric({name}): {e:?}"));
            u32::MAX
        }
    };
    MetricIds {
        requests: define(MetricType::Counter, "abi.requests"),
        gauge: define(MetricType::Gauge, "abi.gauge"),
        latency: define(MetricType::Histogram, "abi.latency_ms"),
    }
}

fn status_text(r: Result<(), proxy_wasm::types::Status>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let ids = s.info.metrics;
    let path = s.state.path.clone();
    let mut report = vec![(
        "x-increment",
        status_text(hostcalls::increment_metric(ids.requests, 1)),
    )];
    if let Some(v) = query_param(&path, "gauge").and_then(|v| v.parse::<u64>().ok()) {
        report.push((
            "x-record-gauge",
            status_text(hostcalls::record_metric(ids.gauge, v)),
        ));
    }
    if let Some(d) = query_param(&path, "inc_gauge").and_then(|v| v.parse::<i64>().ok()) {
        report.push((
            "x-inc-gauge",
            status_text(hostcalls::increment_metric(ids.gauge, d)),
        ));
    }
    if let Some(v) = query_param(&path, "hist").and_then(|v| v.parse::<u64>().ok()) {
        report.push((
            "x-record-hist",
            status_text(hostcalls::record_metric(ids.latency, v)),
        ));
    }
    if query_param(&path, "dec_counter").is_some() {
        report.push((
            "x-dec-counter",
            status_text(hostcalls::increment_metric(ids.requests, -1)),
        ));
    }
    let get = |id| match hostcalls::get_metric(id) {
        Ok(v) => v.to_string(),
        Err(e) => format!("{e:?}"),
    };
    report.push(("x-counter", get(ids.requests)));
    report.push(("x-gauge", get(ids.gauge)));
    s.reply(200, &report, b"");
    Action::Pause
}
