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
//! | `/auth` | callout to upstream `authz` (`GET /check?token=<x-token>`, `x-token` copied); 200 ⇒ `x-auth: ok <callout body>` added and the request resumes; other ⇒ 403 `denied by authz`; failed call ⇒ 503 |
//! | `/body-auth` | request body buffered to its end, then the same callout from the body phase with the body as token (`POST /check?token=<body>`, body sent too); 200 ⇒ the body goes on upstream; other ⇒ 403; failed ⇒ 503 |
//! | `/resp-auth` | the same callout from the response headers phase (token: the request's `x-token`); 200 ⇒ the response goes on with `x-auth: ok`; other ⇒ 403 instead of the upstream's response |
//! | `/fire` | callout to `authz` made, then the request goes on without waiting (fire and forget) |
//! | `/peek` | local reply 200 with the peer properties, one `name=value` line each: `source.identity` (8-byte LE decoded), `.labels` (`k=v` joined by `,`, sorted), `.namespace`, `.workload`, then the same for `destination` (`-` when absent) |
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
            token: String::new(),
        }))
    }
}

struct Stream {
    config: String,
    path: String,
    token: String,
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, _body: usize, _t: usize) {
        if headers == 0 {
            self.send_http_response(503, vec![], Some(b"authz unavailable\n"));
            return;
        }
        match self.get_http_call_response_header(":status").as_deref() {
            Some("200") if self.path.starts_with("/resp-auth") => {
                self.set_http_response_header("x-auth", Some("ok"));
                self.resume_http_response();
            }
            Some("200") => {
                if !self.path.starts_with("/body-auth") {
                    // Still in the request headers phase: the head can change.
                    let who = self
                        .get_http_call_response_body(0, 1024)
                        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                        .unwrap_or_default();
                    self.set_http_request_header("x-auth", Some(&format!("ok {who}")));
                }
                self.resume_http_request();
            }
            _ => self.send_http_response(403, vec![("x-denied-by", "authz")], Some(b"denied by authz\n")),
        }
    }
}

impl Stream {
    /// `GET|POST /check?token=TOKEN` to upstream `authz`; Pause, or a 500 if refused.
    fn ask_authz(&mut self, method: &str, token: &str, body: Option<&[u8]>) -> Action {
        let path = format!("/check?token={token}");
        let dispatched = self.dispatch_http_call(
            "authz",
            vec![(":method", method), (":path", &path), (":authority", "authz"), ("x-token", token)],
            body,
            vec![],
            Duration::from_secs(5),
        );
        if dispatched.is_err() {
            self.send_http_response(500, vec![], Some(b"callout refused\n"));
        }
        Action::Pause
    }

    fn peer_lines(&self, side: &str) -> String {
        let identity = self
            .get_property(vec![side, "identity"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or_else(|| "-".to_owned(), |b| u64::from_le_bytes(b).to_string());
        let mut labels: Vec<String> = self
            .get_property(vec![side, "labels"])
            .map(|b| decode_pairs(&b))
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let text = |name: &str| {
            self.get_property(vec![side, name])
                .map_or_else(|| "-".to_owned(), |b| String::from_utf8_lossy(&b).into_owned())
        };
        format!(
            "{side}.identity={identity}\n{side}.labels={}\n{side}.namespace={}\n{side}.workload={}\n",
            labels.join(","),
            text("namespace"),
            text("workload"),
        )
    }
}

/// The proxy-wasm pairs serialization (how a map property arrives).
fn decode_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let Some(n) = u32_at(0) else { return Vec::new() };
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        match (u32_at(4 + i * 8), u32_at(8 + i * 8)) {
            (Some(k), Some(v)) => sizes.push((k, v)),
            _ => return Vec::new(),
        }
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for (k, v) in sizes {
        let (Some(key), Some(value)) = (bytes.get(at..at + k), bytes.get(at + k + 1..at + k + 1 + v)) else {
            return Vec::new();
        };
        out.push((String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(value).into_owned()));
        at += k + 1 + v + 1;
    }
    out
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        self.path = self.get_http_request_header(":path").unwrap_or_default();
        self.token = self.get_http_request_header("x-token").unwrap_or_default();
        self.add_http_request_header("x-filter-added", "1");
        self.set_http_request_header("x-remove-me", None);
        self.set_http_request_header("x-replace-me", Some("replaced"));
        let path = self.path.clone();
        if path.starts_with("/upper") {
            self.set_http_request_header("content-length", None);
        } else if path.starts_with("/body-auth") {
            // The body goes upstream as it came: the filter only decides.
        } else if path.starts_with("/auth") {
            let token = self.get_http_request_header("x-token").unwrap_or_default();
            return self.ask_authz("GET", &token, None);
        } else if path.starts_with("/fire") {
            let _ = self.dispatch_http_call(
                "authz",
                vec![(":method", "GET"), (":path", "/check?token=fire"), (":authority", "authz")],
                None,
                vec![],
                Duration::from_secs(5),
            );
        } else if path.starts_with("/peek") {
            let body = format!("{}{}", self.peer_lines("source"), self.peer_lines("destination"));
            self.send_http_response(200, vec![], Some(body.as_bytes()));
            return Action::Pause;
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
        if self.path.starts_with("/body-auth") {
            if !eos {
                return Action::Pause;
            }
            let body = self.get_http_request_body(0, size).unwrap_or_default();
            let token = String::from_utf8_lossy(&body).trim().to_owned();
            return self.ask_authz("POST", &token, Some(&body));
        }
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
        if self.path.starts_with("/resp-auth") {
            let token = self.token.clone();
            return self.ask_authz("GET", &token, None);
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
