//! `authz-callout`: asks an authorization service about every request before it goes
//! upstream (external authorization, like Envoy's ext_authz, as a proxy-wasm filter). Written
//! against the upstream proxy-wasm SDK: it runs unmodified in Envoy and in membrane.
//!
//! The request is paused while `GET <path>` goes to the upstream named `<upstream>` (with the
//! request's `authorization` header, method and path as `x-original-method` /
//! `x-original-path`). The service answers:
//! - `200`: the request resumes with `x-authz-user: <response body>` added;
//! - anything else: `403` + `forbidden by authz\n` (the request never reaches the upstream);
//! - no answer (connect failure, timeout): `503` + `authorization service unavailable\n`.
//!
//! Configuration: `upstream=<name>` and optionally `path=<path>` (default `/check`) and
//! `timeout_ms=<ms>` (default 1000), one per line. With membrane's standalone proxy:
//! `membrane proxy ... --filter authz_callout.wasm=authz.conf --filter-upstream authz=127.0.0.1:9001`.

use std::time::Duration;

use log::warn;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AuthzRoot::default()) });
}}

#[derive(Clone, Default)]
struct Settings {
    upstream: String,
    path: String,
    timeout: Duration,
}

#[derive(Default)]
struct AuthzRoot {
    settings: Settings,
}

impl Context for AuthzRoot {}

impl RootContext for AuthzRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let Ok(text) = std::str::from_utf8(&config) else {
            warn!("configuration is not UTF-8");
            return false;
        };
        let mut settings = Settings {
            upstream: String::new(),
            path: "/check".into(),
            timeout: Duration::from_millis(1000),
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.split_once('=') {
                Some(("upstream", v)) => settings.upstream = v.trim().to_owned(),
                Some(("path", v)) if v.trim().starts_with('/') => settings.path = v.trim().to_owned(),
                Some(("timeout_ms", v)) => match v.trim().parse() {
                    Ok(ms) => settings.timeout = Duration::from_millis(ms),
                    Err(_) => {
                        warn!("timeout_ms: not a number: {v:?}");
                        return false;
                    }
                },
                _ => {
                    warn!("unknown configuration line {line:?}");
                    return false;
                }
            }
        }
        if settings.upstream.is_empty() {
            warn!("configuration needs upstream=<name>");
            return false;
        }
        self.settings = settings;
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthzStream {
            settings: self.settings.clone(),
        }))
    }
}

struct AuthzStream {
    settings: Settings,
}

impl Context for AuthzStream {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, body: usize, _t: usize) {
        if headers == 0 {
            self.send_http_response(
                503,
                vec![("content-type", "text/plain")],
                Some(b"authorization service unavailable\n"),
            );
            return;
        }
        if self.get_http_call_response_header(":status").as_deref() == Some("200") {
            let user = self
                .get_http_call_response_body(0, body)
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            self.set_http_request_header("x-authz-user", Some(&user));
            self.resume_http_request();
        } else {
            self.send_http_response(
                403,
                vec![("content-type", "text/plain")],
                Some(b"forbidden by authz\n"),
            );
        }
    }
}

impl HttpContext for AuthzStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        // Never trust an identity header the client sent itself.
        self.set_http_request_header("x-authz-user", None);
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let authorization = self.get_http_request_header("authorization").unwrap_or_default();
        let call = self.dispatch_http_call(
            &self.settings.upstream,
            vec![
                (":method", "GET"),
                (":path", &self.settings.path),
                (":authority", &self.settings.upstream),
                ("authorization", &authorization),
                ("x-original-method", &method),
                ("x-original-path", &path),
            ],
            None,
            vec![],
            self.settings.timeout,
        );
        if let Err(status) = call {
            warn!("dispatch to {} failed: {status:?}", self.settings.upstream);
            self.send_http_response(
                503,
                vec![("content-type", "text/plain")],
                Some(b"authorization service unavailable\n"),
            );
        }
        Action::Pause
    }
}
