//! abi-test-guest: a proxy-wasm 0.2.5 guest that exercises one family of host functions per
//! configuration, so that host-shim's tests (`host-shim/tests/abi_*.rs`) can check each family
//! over real HTTP.
//!
//! The plugin configuration picks the scenario: a plain word (`headers`) or JSON
//! (`{"scenario": "headers"}`). Each scenario reports what it observed as response headers and
//! bodies (mostly through `send_local_response`), or in shared data and metrics the test reads
//! from the host. Request paths and `x-…` request headers pick variants within a scenario; each
//! module documents its own.
//!
//! Every reply carries `x-vm: N`, the index this VM took from a shared-data counter at start
//! (with compare-and-swap), so tests can tell the worker VMs apart.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};

mod buffers;
mod headers;
mod http_call;
mod metrics;
mod misbehave;
mod phases;
mod properties;
mod queues;
mod redis;
mod shared;
mod ticks;
mod wasi;

/// The family of host functions a VM exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Headers,
    Buffers,
    HttpCall,
    Redis,
    Shared,
    Queues,
    Metrics,
    Ticks,
    Properties,
    /// Which header maps and properties each callback can read; how bodies arrive.
    Phases,
    Wasi,
    Misbehave,
    /// Refuses its configuration (`proxy_on_configure` returns false) after logging why.
    Refuse,
}

impl Scenario {
    fn parse(word: &str) -> Option<Scenario> {
        Some(match word {
            "headers" => Scenario::Headers,
            "buffers" => Scenario::Buffers,
            "http_call" => Scenario::HttpCall,
            "redis" => Scenario::Redis,
            "shared" => Scenario::Shared,
            "queues" => Scenario::Queues,
            "metrics" => Scenario::Metrics,
            "ticks" => Scenario::Ticks,
            "properties" => Scenario::Properties,
            "phases" => Scenario::Phases,
            "wasi" => Scenario::Wasi,
            "misbehave" => Scenario::Misbehave,
            "refuse" => Scenario::Refuse,
            _ => return None,
        })
    }
}

/// The scenario named by a configuration: a plain word or `{"scenario": "<word>"}`.
fn scenario_of(config: &str) -> Result<Scenario, String> {
    let text = config.trim();
    let word = if text.starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("configuration is not JSON: {e}"))?;
        match value.get("scenario").and_then(|s| s.as_str()) {
            Some(s) => s.to_string(),
            None => return Err("configuration: field `scenario` (a string) is missing".into()),
        }
    } else {
        text.to_string()
    };
    Scenario::parse(&word).ok_or_else(|| format!("configuration: unknown scenario {word:?}"))
}

/// What every context of one VM knows once the VM has started and been configured.
pub struct VmInfo {
    pub scenario: Scenario,
    /// This VM's index among the VMs of the gateway (0, 1, …), taken at start.
    pub vm_index: u32,
    pub plugin_configuration: String,
    pub vm_configuration: String,
    pub metrics: metrics::MetricIds,
    pub queue_id: u32,
}

/// The root context: picks the scenario, takes a VM index, and runs the root-side parts of the
/// scenarios (ticks, queues, root HTTP calls).
pub struct AbiRoot {
    vm_index: u32,
    vm_configuration: String,
    info: Option<Rc<VmInfo>>,
    ticks: ticks::TickState,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(AbiRoot {
        vm_index: 0,
        vm_configuration: String::new(),
        info: None,
        ticks: ticks::TickState::default(),
    }));
}}

/// Key of the shared-data counter every VM increments at start to get its index.
const VM_COUNTER_KEY: &str = "abi/vm_counter";

/// Adds one to a decimal counter in shared data with compare-and-swap, retrying on a conflict;
/// returns the value before the increment.
pub fn cas_increment(ctx: &dyn Context, key: &str) -> u32 {
    loop {
        let (value, cas) = ctx.get_shared_data(key);
        let current: u32 = value
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let next = (current + 1).to_string();
        match ctx.set_shared_data(key, Some(next.as_bytes()), cas) {
            Ok(()) => return current,
            Err(Status::CasMismatch) => continue,
            Err(other) => {
                proxy_wasm::hostcalls::log(
                    LogLevel::Error,
                    &format!("set_shared_data({key}) failed: {other:?}"),
                )
                .ok();
                return current;
            }
        }
    }
}

/// Appends `item` to a comma-separated list in shared data, with compare-and-swap.
pub fn cas_append(ctx: &dyn Context, key: &str, item: &str) {
    loop {
        let (value, cas) = ctx.get_shared_data(key);
        let mut list = value
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default();
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(item);
        match ctx.set_shared_data(key, Some(list.as_bytes()), cas) {
            Err(Status::CasMismatch) => continue,
            _ => return,
        }
    }
}

pub fn log(level: LogLevel, msg: &str) {
    // A failing log call is not worth trapping the VM for.
    let _ = proxy_wasm::hostcalls::log(level, msg);
}

impl Context for AbiRoot {
    fn on_http_call_response(&mut self, token: u32, n_headers: usize, body_size: usize, _: usize) {
        ticks::on_root_call_response(self, token, n_headers, body_size);
    }
}

impl RootContext for AbiRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm_index = cas_increment(self, VM_COUNTER_KEY);
        self.vm_configuration = self
            .get_vm_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let scenario = match scenario_of(&config) {
            Ok(s) => s,
            Err(e) => {
                log(LogLevel::Error, &format!("abi-test-guest: {e}"));
                return false;
            }
        };
        let mut metric_ids = metrics::MetricIds::default();
        let mut queue_id = 0;
        match scenario {
            Scenario::Refuse => {
                log(
                    LogLevel::Error,
                    &format!("abi-test-guest refuses its configuration on purpose: {config}"),
                );
                return false;
            }
            Scenario::Metrics => metric_ids = metrics::define(),
            Scenario::Queues => queue_id = queues::register(self),
            Scenario::Shared | Scenario::Ticks => self.set_tick_period(ticks::PERIOD),
            Scenario::Wasi => wasi::on_configure(),
            _ => {}
        }
        self.info = Some(Rc::new(VmInfo {
            scenario,
            vm_index: self.vm_index,
            plugin_configuration: config,
            vm_configuration: self.vm_configuration.clone(),
            metrics: metric_ids,
            queue_id,
        }));
        true
    }

    fn on_tick(&mut self) {
        match self.info.as_ref().map(|i| i.scenario) {
            Some(Scenario::Shared) => shared::on_tick(self, self.vm_index),
            Some(Scenario::Ticks) => ticks::on_tick(self),
            _ => {}
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        queues::on_queue_ready(self, queue_id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let info = self.info.clone()?;
        Some(Box::new(AbiStream {
            context_id,
            info,
            state: StreamState::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What a stream remembers between its callbacks.
#[derive(Default)]
pub struct StreamState {
    pub path: String,
    /// Request-body observations, reported on the response headers.
    pub body_callbacks: u32,
    pub body_seen_size: usize,
    pub body_slice: String,
    pub body_tail_len: usize,
    pub call_token: Option<u32>,
    pub call_mode: String,
    pub panic_on_response: bool,
    /// The `phases` scenario: `x-phase-id`, and what each callback could read.
    pub phase_id: String,
    pub phases: serde_json::Map<String, serde_json::Value>,
}

/// One HTTP stream.
pub struct AbiStream {
    pub context_id: u32,
    pub info: Rc<VmInfo>,
    pub state: StreamState,
}

impl AbiStream {
    /// Answers with a local response carrying `x-vm` and the given headers; the caller returns
    /// `Action::Pause`.
    pub fn reply(&self, status: u32, headers: &[(&str, String)], body: &[u8]) {
        let vm = self.info.vm_index.to_string();
        let mut all: Vec<(&str, &str)> = vec![("x-vm", vm.as_str())];
        all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        self.send_http_response(status, all, Some(body));
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }
}

/// The value of `name` in the query string of `path` (no percent-decoding: tests send plain
/// values).
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_string())
    })
}

/// `/a/b?x=1` → `/a/b`.
pub fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

impl Context for AbiStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        n_headers: usize,
        body_size: usize,
        n_trailers: usize,
    ) {
        if self.info.scenario == Scenario::Phases {
            return phases::on_http_call_response(self);
        }
        http_call::on_response(self, token, n_headers, body_size, n_trailers);
    }
}

impl HttpContext for AbiStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.state.path = self.request_header(":path").unwrap_or_default();
        match self.info.scenario {
            Scenario::Headers => headers::on_request_headers(self),
            Scenario::Buffers => buffers::on_request_headers(self),
            Scenario::HttpCall => http_call::on_request_headers(self),
            Scenario::Redis => redis::on_request_headers(self),
            Scenario::Shared => shared::on_request_headers(self),
            Scenario::Queues => queues::on_request_headers(self),
            Scenario::Metrics => metrics::on_request_headers(self),
            Scenario::Ticks => Action::Continue,
            Scenario::Properties => properties::on_request_headers(self),
            Scenario::Phases => phases::on_request_headers(self),
            Scenario::Wasi => wasi::on_request_headers(self),
            Scenario::Misbehave => misbehave::on_request_headers(self),
            Scenario::Refuse => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        match self.info.scenario {
            Scenario::Buffers => buffers::on_request_body(self, size, eos),
            Scenario::Phases => phases::on_request_body(self, size, eos),
            Scenario::Misbehave => misbehave::on_request_body(self, eos),
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        match self.info.scenario {
            Scenario::Headers => headers::on_response_headers(self),
            Scenario::Buffers => buffers::on_response_headers(self),
            Scenario::Phases => phases::on_response_headers(self),
            Scenario::Misbehave => misbehave::on_response_headers(self),
            _ => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        match self.info.scenario {
            Scenario::Buffers => buffers::on_response_body(self, size, eos),
            Scenario::Phases => phases::on_response_body(self, size, eos),
            Scenario::Misbehave => misbehave::on_response_body(self, eos),
            _ => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        if self.info.scenario == Scenario::Phases {
            phases::on_log(self);
        }
    }
}
