//! `membrane-perf proxy`'s filter: on every request, 20 header sets, 20 gets and 20 removes
//! (DESIGN §8's "60 header operations"), nothing else. Upstream proxy-wasm SDK.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const NAMES: [&str; 20] = [
    "x-perf-0", "x-perf-1", "x-perf-2", "x-perf-3", "x-perf-4", "x-perf-5", "x-perf-6",
    "x-perf-7", "x-perf-8", "x-perf-9", "x-perf-10", "x-perf-11", "x-perf-12", "x-perf-13",
    "x-perf-14", "x-perf-15", "x-perf-16", "x-perf-17", "x-perf-18", "x-perf-19",
];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HeaderOps))
    }
}

struct HeaderOps;

impl Context for HeaderOps {}

impl HttpContext for HeaderOps {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for name in NAMES {
            self.set_http_request_header(name, Some("value"));
        }
        let mut found = 0;
        for name in NAMES {
            found += usize::from(self.get_http_request_header(name).is_some());
        }
        for name in NAMES {
            self.set_http_request_header(name, None);
        }
        std::hint::black_box(found);
        Action::Continue
    }
}
