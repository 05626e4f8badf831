//! A filter written against the upstream proxy-wasm Rust SDK: it touches most of what that
//! SDK imports (logging, header maps in both directions, local replies, the log callback),
//! so the host proves it links every import and returns statuses the SDK accepts.
//!
//! Behaviour: requests to `/teapot` are answered locally with 418; every other request gets
//! an `x-compat-seen: 1` request header; every response gets `x-compat: ok`; each stream logs
//! one line per phase, prefixed with its context id.

use log::info;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CompatRoot) });
}}

struct CompatRoot;

impl Context for CompatRoot {}

impl RootContext for CompatRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(CompatStream { id }))
    }
}

struct CompatStream {
    id: u32,
}

impl Context for CompatStream {}

impl HttpContext for CompatStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let count = self.get_http_request_headers().len();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        info!("ctx {}: request {} with {} headers", self.id, path, count);
        if path == "/teapot" {
            self.send_http_response(418, vec![("x-compat", "teapot")], Some(b"short and stout\n"));
            return Action::Pause;
        }
        self.add_http_request_header("x-compat-seen", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        info!("ctx {}: response {}", self.id, status);
        self.set_http_response_header("x-compat", Some("ok"));
        Action::Continue
    }

    fn on_log(&mut self) {
        info!("ctx {}: done", self.id);
    }
}
