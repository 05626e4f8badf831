//! A gRPC authorization filter written against the upstream proxy-wasm Rust SDK, in the style
//! of its `grpc_auth_random` example, so the host's gRPC callouts are checked against the
//! SDK Envoy users build with (it panics on any status it does not expect).
//!
//! Per request it asks `grpc.health.v1.Health/Check` on the upstream named `authz` whether
//! the service named by the `x-authz-service` header is SERVING (the health service stands in
//! for an ext_authz-style service: any unary call works the same way):
//! - SERVING: the request goes on (`Access granted.` logged);
//! - another answer: 403 `Access forbidden.`;
//! - the call failed (gRPC status ≠ 0): 503 with `x-authz-grpc-status` and
//!   `x-authz-grpc-message` (from `proxy_get_status`);
//! - the call could not be made (e.g. an unknown upstream, ParseFailure): 500 naming the
//!   status. gRPC clients (`content-type: application/grpc`) get a gRPC reply instead
//!   (PERMISSION_DENIED, `send_grpc_response`).
//!
//! Plugin configuration: the upstream name (default `authz`); the call timeout is 500 ms.

use std::time::Duration;

use log::info;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, GrpcStatusCode, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(AuthRoot { upstream: "authz".into() })
    });
}}

struct AuthRoot {
    upstream: String,
}

impl Context for AuthRoot {}

impl RootContext for AuthRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        if size > 0
            && let Some(config) = self.get_plugin_configuration()
        {
            self.upstream = String::from_utf8_lossy(&config).trim().to_owned();
        }
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthStream {
            upstream: self.upstream.clone(),
            grpc_client: false,
        }))
    }
}

struct AuthStream {
    upstream: String,
    grpc_client: bool,
}

/// `HealthCheckRequest { service = 1 }` in protobuf wire format.
fn health_request(service: &str) -> Vec<u8> {
    let mut out = vec![0x0a, service.len() as u8];
    out.extend_from_slice(service.as_bytes());
    out
}

impl HttpContext for AuthStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.grpc_client = self
            .get_http_request_header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"));
        let service = self
            .get_http_request_header("x-authz-service")
            .unwrap_or_default();
        let service = &service[..service.len().min(100)];
        match self.dispatch_grpc_call(
            &self.upstream,
            "grpc.health.v1.Health",
            "Check",
            vec![("x-authz-from", b"membrane")],
            Some(&health_request(service)),
            Duration::from_millis(500),
        ) {
            Ok(_) => Action::Pause,
            Err(status) => {
                let body = format!("dispatch failed: {status:?}\n");
                self.send_http_response(500, vec![], Some(body.as_bytes()));
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header("powered-by", Some("proxy-wasm"));
        Action::Continue
    }
}

impl Context for AuthStream {
    fn on_grpc_call_response(&mut self, _token: u32, status_code: u32, size: usize) {
        if status_code != 0 {
            let (_, message) = self.get_grpc_status();
            let message = message.unwrap_or_default();
            info!("Access check failed: {status_code} {message}");
            self.send_http_response(
                503,
                vec![
                    ("x-authz-grpc-status", &status_code.to_string()),
                    ("x-authz-grpc-message", &message),
                ],
                Some(b"Authorization service unavailable.\n"),
            );
            return;
        }
        let body = self
            .get_grpc_call_response_body(0, size)
            .unwrap_or_default();
        // HealthCheckResponse { status = 1 }: SERVING is 1.
        if body == [0x08, 0x01] {
            info!("Access granted.");
            self.resume_http_request();
            return;
        }
        info!("Access forbidden.");
        if self.grpc_client {
            self.send_grpc_response(
                GrpcStatusCode::PermissionDenied,
                Some("Access forbidden by Proxy-Wasm"),
                vec![("powered-by", b"proxy-wasm")],
            );
        } else {
            self.send_http_response(
                403,
                vec![("powered-by", "proxy-wasm")],
                Some(b"Access forbidden.\n"),
            );
        }
    }
}
