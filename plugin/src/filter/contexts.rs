//! The proxy-wasm contexts: the SDK's traits and the Higress callback, nothing else. Each
//! callback reads the host, calls the phase driver ([`Edge`]) and performs what it decided.
//!
//! State shared by the root context, the request contexts and the Higress callback lives in
//! one [`Edge`] per root context, reachable from `proxy_on_redis_call_response` through a
//! thread-local table. Host actions (resume, local response) are collected while the state is
//! borrowed and performed after the borrow ends, so a host that calls back synchronously finds
//! the state free.

use super::driver::{Begin, Edge, ResponseStep};
use super::EDGE_HEADER;
use crate::config::parse_config;
use crate::events::ResponseFacts;
use crate::host;
use crate::http::{HostAction, LocalResponse, RequestInfo};
use crate::redis::client::RawReply;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    /// Root context id → its state, for the Higress callback (the SDK does not know it).
    static INSTANCES: RefCell<HashMap<u32, Rc<RefCell<Edge>>>> = RefCell::new(HashMap::new());
}

/// The fields of the HTTP call answer being delivered (inside `on_http_call_response`).
fn call_response_headers() -> Vec<(String, String)> {
    host::header_pairs(MapType::HttpCallResponseHeaders)
}

/// Hands the answer to HTTP call `token` (a relay reply, or a cache refresh) to the instance
/// and performs what follows; `current` is the context the host is calling.
fn deliver_http_answer(
    edge: Option<&Rc<RefCell<Edge>>>,
    token: u32,
    num_headers: usize,
    body_size: usize,
    current: Option<u32>,
) {
    let Some(edge) = edge else { return };
    deliver(
        edge,
        token,
        host::relay_reply(num_headers, body_size),
        current,
    );
}

/// Hands a call's answer to the instance and performs what follows.
fn deliver(edge: &Rc<RefCell<Edge>>, token: u32, raw: RawReply, current: Option<u32>) {
    let in_root = current.is_none();
    let (actions, mark) = match edge.try_borrow_mut() {
        Ok(mut e) => (
            e.on_reply(host::now_ms(), token, raw, call_response_headers, in_root),
            e.config.version_header,
        ),
        // Re-entered while busy: the call stays pending and times out on a tick.
        Err(_) => (Vec::new(), false),
    };
    perform(actions, current, mark);
}

/// Performs actions outside any borrow of the state. `current` is the context the host is
/// already calling (no switch needed); `mark`: local responses carry the version header.
fn perform(actions: Vec<HostAction>, current: Option<u32>, mark: bool) {
    for action in actions {
        let ctx = match &action {
            HostAction::Resume(c) | HostAction::Respond(c, _) | HostAction::ResumeResponse(c) => *c,
        };
        if current != Some(ctx) && !host::set_effective_context(ctx) {
            // The request is gone (client closed): nothing to resume.
            continue;
        }
        match action {
            HostAction::Resume(_) => {
                host::resume_request();
            }
            HostAction::ResumeResponse(_) => {
                host::resume_response();
            }
            HostAction::Respond(_, resp) => {
                send_response(&resp, mark);
            }
        }
    }
}

/// Answers from the filter; `mark` adds the version header (`version_header`).
fn send_response(resp: &LocalResponse, mark: bool) {
    if !mark {
        host::send_local_response(resp.status, "krowoc_edge", &resp.headers, &resp.body);
        return;
    }
    let mut headers = resp.headers.clone();
    headers.push((EDGE_HEADER.to_string(), crate::VERSION.to_string()));
    host::send_local_response(resp.status, "krowoc_edge", &headers, &resp.body);
}

/// Root context: parses the configuration once and creates request contexts.
pub struct EdgeRoot {
    context_id: u32,
    edge: Option<Rc<RefCell<Edge>>>,
    /// `version_header` of the configuration, for every request context it creates.
    mark: bool,
}

impl EdgeRoot {
    pub fn new(context_id: u32) -> EdgeRoot {
        EdgeRoot {
            context_id,
            edge: None,
            mark: false,
        }
    }
}

impl Context for EdgeRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        // Calls made from the root context: event flushes and cache jobs.
        deliver_http_answer(self.edge.as_ref(), token, num_headers, body_size, None);
    }

    fn on_done(&mut self) -> bool {
        INSTANCES.with(|i| i.borrow_mut().remove(&self.context_id));
        true
    }
}

impl RootContext for EdgeRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let built = parse_config(&host::plugin_configuration())
            .and_then(|config| Edge::new(config).map_err(|e| vec![e]));
        match built {
            Ok(edge) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "krowoc-edge {} configured (root context {}): {} route(s), transport {:?}",
                        crate::VERSION,
                        self.context_id,
                        edge.config.routes.len(),
                        edge.config.redis.transport
                    ),
                );
                if edge.uses_redis() {
                    host::set_tick_period_ms(edge.tick_period_ms());
                }
                let edge = Rc::new(RefCell::new(edge));
                INSTANCES.with(|i| i.borrow_mut().insert(self.context_id, Rc::clone(&edge)));
                self.mark = edge.borrow().config.version_header;
                self.edge = Some(edge);
                true
            }
            Err(problems) => {
                for problem in &problems {
                    host::log(LogLevel::Error, &format!("krowoc-edge: {problem}"));
                }
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // The VM's kick (see `redis::client`): requests' calls are waiting for an exchange.
        host::drain_shared_queue(queue_id);
        let Some(edge) = &self.edge else { return };
        let actions = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_kick(host::now_ms()),
            Err(_) => Vec::new(),
        };
        perform(actions, None, self.mark);
    }

    fn on_tick(&mut self) {
        let Some(edge) = &self.edge else { return };
        let actions = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_tick(host::now_ms()),
            Err(_) => Vec::new(),
        };
        perform(actions, None, self.mark);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EdgeRequest {
            context_id,
            edge: self.edge.clone(),
            mark: self.mark,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request context.
pub struct EdgeRequest {
    context_id: u32,
    edge: Option<Rc<RefCell<Edge>>>,
    /// `version_header`: responses carry `x-krowoc-edge`.
    mark: bool,
}

impl EdgeRequest {
    fn request_info(&self) -> RequestInfo {
        let headers = host::header_pairs(MapType::HttpRequestHeaders);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        RequestInfo {
            path: get(":path"),
            method: get(":method"),
            source_address: host::property(&["source", "address"])
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            headers,
        }
    }
}

impl Context for EdgeRequest {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let current = Some(self.context_id);
        deliver_http_answer(self.edge.as_ref(), token, num_headers, body_size, current);
    }
}

impl HttpContext for EdgeRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(edge) = &self.edge else {
            return Action::Continue;
        };
        let routed = match edge.try_borrow() {
            Ok(e) if e.filters_requests() => {
                // Where some requests need nothing, two header lookups decide before reading
                // them whole.
                let path =
                    host::header_value(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
                let method =
                    host::header_value(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
                let route = e.route(&path, &method);
                if !e.wants(&path, route) {
                    return Action::Continue;
                }
                Some((self.request_info(), route))
            }
            Ok(e) => {
                let info = self.request_info();
                let route = e.route(&info.path, &info.method);
                Some((info, route))
            }
            Err(_) => None,
        };
        let Some((info, route)) = routed else {
            return Action::Continue;
        };
        let begin = match edge.try_borrow_mut() {
            Ok(mut e) => e.on_request_headers(
                self.context_id,
                host::now_ms(),
                host::now_ns(),
                &info,
                route,
                || {
                    host::property(&["xds", "cluster_name"])
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                },
            ),
            Err(_) => Begin::Continue,
        };
        match begin {
            Begin::Continue => Action::Continue,
            Begin::Pause => Action::Pause,
            Begin::Respond(resp) => {
                send_response(&resp, self.mark);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let step = self.edge.as_ref().and_then(|edge| {
            let mut e = edge.try_borrow_mut().ok()?;
            Some(
                e.on_response_headers(self.context_id, host::now_ms(), end_of_stream, || {
                    host::header_pairs(MapType::HttpResponseHeaders)
                }),
            )
        });
        let (cache, passed, hold) = match step {
            Some(ResponseStep::Replace(resp)) => {
                send_response(&resp, self.mark);
                return Action::Pause;
            }
            Some(ResponseStep::Fields {
                cache,
                passed,
                hold,
            }) => (cache, passed, hold),
            None => (Vec::new(), Vec::new(), false),
        };
        for (k, v) in cache {
            host::replace_header(MapType::HttpResponseHeaders, &k, &v);
        }
        if self.mark {
            host::replace_header(MapType::HttpResponseHeaders, EDGE_HEADER, crate::VERSION);
        }
        for (k, v) in passed {
            host::replace_header(MapType::HttpResponseHeaders, &k, &v);
        }
        // Held until the response's purges are done; the fields above go with it.
        if hold {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Chunks pass on as they come; the cache keeps a copy of a response it will store.
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.on_response_body(self.context_id, host::now_ms(), end_of_stream, || {
                    if body_size == 0 {
                        return Vec::new();
                    }
                    host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default()
                });
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.on_log(
                    self.context_id,
                    host::now_ms(),
                    host::now_ns(),
                    host_response,
                );
            }
        }
    }
}

impl Drop for EdgeRequest {
    fn drop(&mut self) {
        if let Some(edge) = &self.edge {
            if let Ok(mut e) = edge.try_borrow_mut() {
                e.end(self.context_id, host::now_ms());
            }
        }
    }
}

/// Higress calls this with the root context that made the call. Unknown tokens (a reply
/// after its deadline) are ignored, never a trap.
#[cfg(all(target_arch = "wasm32", feature = "redis-call"))]
#[no_mangle]
pub extern "C" fn proxy_on_redis_call_response(
    root_context_id: u32,
    token: u32,
    status: u32,
    response_size: usize,
) {
    let edge = INSTANCES.with(|i| {
        let map = i.borrow();
        map.get(&root_context_id).cloned().or_else(|| {
            map.values()
                .find(|e| e.try_borrow().map(|e| e.owns_call(token)).unwrap_or(false))
                .cloned()
        })
    });
    let Some(edge) = edge else { return };
    deliver(
        &edge,
        token,
        host::redis_call_reply(status, response_size),
        None,
    );
}

/// Reads the response's status (and its headers when `want_headers`) from the host, in `on_log`.
fn host_response(want_headers: bool) -> ResponseFacts {
    let headers = if want_headers {
        host::header_pairs(MapType::HttpResponseHeaders)
    } else {
        Vec::new()
    };
    let from_headers = |h: &[(String, String)]| {
        h.iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.trim().parse::<u16>().ok())
    };
    let status = from_headers(&headers)
        .or_else(|| {
            // Envoy serialises integers as 8 bytes little-endian; 0 means no response.
            let b = host::property(&["response", "code"])?;
            let code = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
            u16::try_from(code).ok().filter(|c| *c > 0)
        })
        .or_else(|| {
            if want_headers {
                None
            } else {
                from_headers(&host::header_pairs(MapType::HttpResponseHeaders))
            }
        });
    ResponseFacts { status, headers }
}
