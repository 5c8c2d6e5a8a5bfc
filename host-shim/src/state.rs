//! What a VM's host functions work on: the per-VM state kept in the wasmtime store, the state of
//! each HTTP stream the VM has a context for, and the outbox of callouts (HTTP and Redis calls)
//! that the worker carries out after a callback returns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use wasmtime::StoreLimits;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{HeaderList, Status};
use crate::shared::SharedState;

/// A response the plugin asked for with `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: HeaderList,
    /// The connection closes after it (sent before the request was read to its end).
    pub closes_connection: bool,
}

/// Facts about a stream that properties expose.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub connection_id: u64,
    pub start_time: SystemTime,
    pub route_name: String,
    pub cluster_name: String,
    /// The client asked to close the connection after this exchange (its response says
    /// `connection: close`).
    pub client_closes: bool,
}

/// One HTTP stream (request + response) as the plugin sees it.
pub struct StreamState {
    pub info: StreamInfo,
    pub request_headers: HeaderList,
    /// The request body the plugin can see: what has been buffered so far.
    pub request_body: Vec<u8>,
    pub request_trailers: Option<HeaderList>,
    /// `None` until the upstream (or a local reply) has produced headers.
    pub response_headers: Option<HeaderList>,
    pub response_body: Vec<u8>,
    pub response_trailers: Option<HeaderList>,
    pub local_response: Option<LocalResponse>,
    /// Set by `proxy_continue_stream`.
    pub resume_request: bool,
    pub resume_response: bool,
    /// Set by `proxy_close_stream`.
    pub closed: bool,
    /// Set when the plugin replaced a body with `proxy_set_buffer_bytes`.
    pub request_body_modified: bool,
    pub response_body_modified: bool,
    /// Whether the request has gone past its headers phase (Envoy has picked the upstream host
    /// by then: `upstream.address` is known).
    pub past_request_headers: bool,
    /// Which header maps the plugin may read and edit now, as in Envoy 1.40 (see
    /// [`StreamState::enter`]).
    pub readable: Readable,
    /// Response body bytes the plugin let through (`response.size` in the log phase).
    pub response_body_sent: usize,
    /// Request body bytes received from the client so far (`request.size` without a
    /// content-length).
    pub request_body_received: usize,
    /// The details of the plugin's local reply (`response.code_details`), once it sent one.
    pub local_details: Option<String>,
    /// Properties the plugin set on this stream.
    pub properties: HashMap<String, Vec<u8>>,
    /// Wakes the task driving this stream when the plugin resumes it or answers locally.
    pub wake: Arc<Notify>,
}

impl StreamState {
    pub fn new(info: StreamInfo, request_headers: HeaderList) -> StreamState {
        StreamState {
            info,
            request_headers,
            request_body: Vec::new(),
            request_trailers: None,
            response_headers: None,
            response_body: Vec::new(),
            response_trailers: None,
            local_response: None,
            resume_request: false,
            resume_response: false,
            closed: false,
            request_body_modified: false,
            response_body_modified: false,
            readable: Readable::default(),
            past_request_headers: false,
            local_details: None,
            response_body_sent: 0,
            request_body_received: 0,
            properties: HashMap::new(),
            wake: Arc::new(Notify::new()),
        }
    }
}

/// Which of a stream's header maps the plugin can reach through the header-map calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readable {
    pub request_headers: bool,
    pub response_headers: bool,
}

/// The stream callbacks, for the header maps each one may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    /// `on_done`, `on_log`, `on_delete`.
    Log,
}

impl StreamState {
    /// Envoy 1.40 (measured with the abi-test-guest's `phases` scenario): the request headers are
    /// reachable in `on_request_headers` and, if it paused, until the next stream callback (so in
    /// callout callbacks while paused); the response headers likewise from
    /// `on_response_headers`; both again in the log phase (their final state). Outside that,
    /// `get_header_map_pairs` gives an empty map and the other header calls BadArgument (which
    /// the Rust SDK panics on). Trailers are reachable once they arrived, and in the log phase
    /// absent trailers are an empty map.
    pub fn enter(&mut self, phase: Phase) {
        self.readable = Readable {
            request_headers: matches!(phase, Phase::RequestHeaders | Phase::Log),
            response_headers: matches!(phase, Phase::ResponseHeaders | Phase::Log),
        };
        if phase != Phase::RequestHeaders {
            self.past_request_headers = true;
        }
        if phase == Phase::Log {
            self.request_trailers.get_or_insert_with(Vec::new);
            if self.response_headers.is_some() {
                self.response_trailers.get_or_insert_with(Vec::new);
            }
        }
    }

    /// After a headers callback: a `Continue` ends the reach of its map.
    pub fn leave(&mut self, phase: Phase, action: crate::abi::Action) {
        if action == crate::abi::Action::Continue {
            match phase {
                Phase::RequestHeaders => self.readable.request_headers = false,
                Phase::ResponseHeaders => self.readable.response_headers = false,
                _ => {}
            }
        }
    }
}

/// What the plugin decided for a stream direction it had paused.
#[derive(Debug)]
pub enum PauseOutcome {
    /// `proxy_close_stream`: reset the stream.
    Closed,
    /// `proxy_send_local_response`: answer with this instead.
    Local(LocalResponse),
    /// `proxy_continue_stream` for this direction.
    Resumed,
}

impl StreamState {
    /// Takes the plugin's decision for the request (`response` false) or response direction,
    /// if it has made one; `None` while the direction is still paused.
    pub fn take_pause_outcome(&mut self, response: bool) -> Option<PauseOutcome> {
        if self.closed {
            return Some(PauseOutcome::Closed);
        }
        if let Some(local) = self.local_response.take() {
            return Some(PauseOutcome::Local(local));
        }
        let resumed = if response {
            std::mem::take(&mut self.resume_response)
        } else {
            std::mem::take(&mut self.resume_request)
        };
        resumed.then_some(PauseOutcome::Resumed)
    }
}

/// A call the plugin dispatched; carried out by the worker after the callback returns.
#[derive(Debug)]
pub enum Callout {
    Http {
        token: u32,
        cluster: String,
        headers: HeaderList,
        body: Vec<u8>,
        trailers: HeaderList,
        /// `None`: no timeout (the plugin passed 0).
        timeout: Option<Duration>,
    },
    Redis {
        token: u32,
        cluster: String,
        query: Vec<u8>,
    },
}

/// The answer to an HTTP callout, visible to the plugin during `proxy_on_http_call_response`.
#[derive(Debug, Default)]
pub struct HttpCallResponse {
    pub headers: HeaderList,
    pub body: Vec<u8>,
    pub trailers: HeaderList,
    /// What `proxy_get_status` reports: Ok, or BrokenConnection after a reset.
    pub status: Option<Status>,
    pub message: String,
}

/// Credentials and timeout a plugin gave `proxy_redis_init` for one Redis cluster.
#[derive(Debug, Clone)]
pub struct RedisInit {
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
    /// `?db=N` in the name given to init.
    pub db: Option<u32>,
}

/// Fixed facts about a VM.
#[derive(Debug, Clone)]
pub struct VmIdentity {
    pub worker: usize,
    pub plugin_name: String,
    pub root_id: String,
    pub vm_id: String,
}

/// The data of one wasmtime store: one plugin VM.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub limits: StoreLimits,
    pub shared: Arc<SharedState>,
    pub identity: VmIdentity,
    pub vm_configuration: Vec<u8>,
    pub plugin_configuration: Vec<u8>,
    /// Clusters a callout may name (HTTP calls and Redis calls).
    pub clusters: Arc<HashMap<String, crate::envoy_config::SocketAddress>>,
    pub root_context_id: u32,
    /// The context the current callback acts on (`proxy_set_effective_context` changes it).
    pub current_context: u32,
    pub streams: HashMap<u32, StreamState>,
    pub callouts: Vec<Callout>,
    pub next_token: u32,
    pub http_call_response: Option<HttpCallResponse>,
    pub redis_call_response: Option<Vec<u8>>,
    /// Initialised Redis clusters by cluster name (the part before `?`).
    pub redis_clusters: HashMap<String, RedisInit>,
    pub tick_period: Option<Duration>,
    pub log_level: i32,
    /// `--log-path`: where the plugin's log lines are also written.
    pub log_file: Option<Arc<crate::host::misc::PluginLogFile>>,
    /// The last lines the plugin logged at warn or above (shown when it refuses to start).
    pub recent_errors: Vec<String>,
    /// The guest's `memory` export, looked up once at instantiation: every hostcall that reads
    /// or writes guest memory uses it (a lookup by name per call cost ~10% of a request).
    pub memory: Option<wasmtime::Memory>,
    /// The guest's allocator (`malloc`, else `proxy_on_memory_allocate`), for hostcalls that
    /// return data; `None` when it has neither or the wrong signature.
    pub guest_alloc: Option<std::sync::Arc<wasmtime::TypedFunc<i32, i32>>>,
}

impl HostState {
    /// The stream of the current context, if the current context is a stream.
    pub fn current_stream(&mut self) -> Option<&mut StreamState> {
        let id = self.current_context;
        self.streams.get_mut(&id)
    }

    /// A fresh callout token; Redis tokens carry the Higress tag in their low two bits.
    pub fn new_token(&mut self, redis: bool) -> u32 {
        self.next_token = self.next_token.wrapping_add(1).max(1);
        let base = self.next_token << 2;
        if redis {
            base | crate::abi::REDIS_TOKEN_TAG
        } else {
            base
        }
    }

    pub fn remember_error_line(&mut self, line: String) {
        const KEEP: usize = 32;
        if self.recent_errors.len() == KEEP {
            self.recent_errors.remove(0);
        }
        self.recent_errors.push(line);
    }
}
