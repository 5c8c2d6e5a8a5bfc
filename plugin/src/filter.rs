//! The proxy-wasm contexts: the root context (configuration, factory) and the per-request
//! context. Logic lives in plain modules; this file only wires hooks to it.

use crate::config::{parse_config, Config};
use crate::host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

/// Name of the response header that proves the filter ran.
pub const EDGE_HEADER: &str = "x-krowoc-edge";

/// Root context: parses the configuration once and creates request contexts.
pub struct EdgeRoot {
    context_id: u32,
    config: Option<Rc<Config>>,
}

impl EdgeRoot {
    pub fn new(context_id: u32) -> EdgeRoot {
        EdgeRoot {
            context_id,
            config: None,
        }
    }
}

impl Context for EdgeRoot {}

impl RootContext for EdgeRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match parse_config(&host::plugin_configuration()) {
            Ok(config) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "krowoc-edge {} configured (root context {}): {} route(s)",
                        crate::VERSION,
                        self.context_id,
                        config.routes.len()
                    ),
                );
                self.config = Some(Rc::new(config));
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

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EdgeRequest {
            context_id,
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request context.
pub struct EdgeRequest {
    #[allow(dead_code)]
    context_id: u32,
    #[allow(dead_code)]
    config: Option<Rc<Config>>,
}

impl Context for EdgeRequest {}

impl HttpContext for EdgeRequest {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        host::add_response_header(EDGE_HEADER, crate::VERSION);
        Action::Continue
    }
}
