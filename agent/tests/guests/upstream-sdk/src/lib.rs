//! Acceptance filter for `membrane proxy --filter`, built with the upstream proxy-wasm SDK.
//!
//! Configuration (plugin configuration, UTF-8): the value of the `x-config` response header;
//! `reject` makes `on_configure` fail.
//!
//! Every request: `x-filter-added: 1` added, `x-remove-me` removed, `x-replace-me` set to
//! `replaced`. Every response: `x-config: <configuration>`. By path prefix:
//!
//! | path | behaviour |
//! |---|---|
//! | `/redact` | response body buffered; every `secret` becomes `******`; `content-length` removed |
//! | `/upper` | request body buffered and upper-cased; `content-length` removed |
//! | `/auth` | callout to upstream `authz` (`GET /check`, `x-token` copied); 200 ⇒ `x-auth: ok` added and the request resumes; other ⇒ 403 `denied by authz`; failed call ⇒ 503 |
//! | `/ticks` | local reply 200 with the number of `on_tick`s this instance saw (period 10 ms) |
//! | `/loop` | never returns (the host's deadline must stop it) |
//! | `/bomb` | grows its memory without bound (the host's memory cap must stop it) |
//! | `/trap` | panics (a trap) |

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: String::new(), ticks: 0 })
    });
}}

struct Root {
    config: String,
    ticks: u64,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|c| String::from_utf8_lossy(&c).trim().to_owned())
            .unwrap_or_default();
        if config == "reject" {
            return false;
        }
        self.config = config;
        self.set_tick_period(Duration::from_millis(10));
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        // Shared with this instance's streams through shared data (keyed per instance is not
        // needed: any instance's count shows ticks are delivered).
        let _ = self.set_shared_data("ticks", Some(self.ticks.to_string().as_bytes()), None);
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            path: String::new(),
        }))
    }
}

struct Stream {
    config: String,
    path: String,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, _body: usize, _t: usize) {
        if headers == 0 {
            self.send_http_response(503, vec![], Some(b"authz unavailable\n"));
            return;
        }
        match self.get_http_call_response_header(":status").as_deref() {
            Some("200") => {
                let who = self
                    .get_http_call_response_body(0, 1024)
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .unwrap_or_default();
                self.set_http_request_header("x-auth", Some(&format!("ok {who}")));
                self.resume_http_request();
            }
            _ => self.send_http_response(403, vec![("x-denied-by", "authz")], Some(b"denied by authz\n")),
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        self.add_http_request_header("x-filter-added", "1");
        self.set_http_request_header("x-remove-me", None);
        self.set_http_request_header("x-replace-me", Some("replaced"));
        let path = self.path.clone();
        if path.starts_with("/upper") {
            self.set_http_request_header("content-length", None);
        } else if path.starts_with("/auth") {
            let token = self.get_http_request_header("x-token").unwrap_or_default();
            let dispatched = self.dispatch_http_call(
                "authz",
                vec![(":method", "GET"), (":path", "/check"), (":authority", "authz"), ("x-token", &token)],
                None,
                vec![],
                Duration::from_secs(5),
            );
            return match dispatched {
                Ok(_) => Action::Pause,
                Err(_) => {
                    self.send_http_response(500, vec![], Some(b"callout refused\n"));
                    Action::Pause
                }
            };
        } else if path.starts_with("/ticks") {
            let ticks = self
                .get_shared_data("ticks")
                .0
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|| "0".into());
            self.send_http_response(200, vec![], Some(format!("{ticks}\n").as_bytes()));
            return Action::Pause;
        } else if path.starts_with("/loop") {
            #[expect(clippy::empty_loop, reason = "the deadline test needs a guest that never returns")]
            loop {}
        } else if path.starts_with("/bomb") {
            // Grow linear memory 1 MiB at a time until refused (no memset: the cap, not the
            // deadline, must be what stops it), then die as an allocator would.
            loop {
                if core::arch::wasm32::memory_grow(0, 16) == usize::MAX {
                    panic!("out of memory");
                }
            }
        } else if path.starts_with("/trap") {
            panic!("trap requested by {path}");
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.path.starts_with("/upper") {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_request_body(0, size) {
            self.set_http_request_body(0, size, &body.to_ascii_uppercase());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.set_http_response_header("x-config", Some(&self.config.clone()));
        if self.path.starts_with("/redact") {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        if !self.path.starts_with("/redact") {
            return Action::Continue;
        }
        if !eos {
            return Action::Pause;
        }
        if let Some(body) = self.get_http_response_body(0, size) {
            let text = String::from_utf8_lossy(&body).replace("secret", "******");
            self.set_http_response_body(0, size, text.as_bytes());
        }
        Action::Continue
    }
}
