//! `grpc-authz`: ask a gRPC service whether a request may go on (the ext_authz pattern),
//! with membrane's SDK: no panics on host statuses, typed gRPC answers.
//!
//! Per request it calls `grpc.health.v1.Health/Check` on the configured upstream with the
//! `x-authz-service` header as the checked name (any unary service works the same way; the
//! health service is one every gRPC stack ships):
//! - `SERVING` ⇒ the request goes on, tagged `x-authz: allowed`;
//! - any other answer ⇒ `403 access denied` (gRPC clients: PERMISSION_DENIED);
//! - the call failed (server down, timeout, error status) ⇒ `503` with
//!   `x-authz-grpc-status: <code>` (fail closed), or the request goes on when configured
//!   `fail_open=true`.
//!
//! Configuration, one `key=value` per line: `upstream=` (default `authz`), `timeout_ms=`
//! (default 500), `fail_open=` (default false).

use std::time::Duration;

use membrane_filter_sdk::{
    Action, Error, Filter, GrpcResponse, Http, Reply, StreamFilter, dispatch_grpc_call, info,
    register,
};

struct GrpcAuthz {
    upstream: String,
    timeout: Duration,
    fail_open: bool,
}

impl Filter for GrpcAuthz {
    type Stream = AuthzStream;

    fn configure(config: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(config).map_err(|e| Error::Config(e.to_string()))?;
        let mut out = GrpcAuthz {
            upstream: "authz".into(),
            timeout: Duration::from_millis(500),
            fail_open: false,
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                return Err(Error::Config(format!("expected key=value, got {line:?}")));
            };
            match key.trim() {
                "upstream" => out.upstream = value.trim().to_owned(),
                "timeout_ms" => {
                    let ms = value
                        .trim()
                        .parse()
                        .map_err(|_| Error::Config(format!("timeout_ms: {value:?}")))?;
                    out.timeout = Duration::from_millis(ms);
                }
                "fail_open" => out.fail_open = value.trim() == "true",
                other => return Err(Error::Config(format!("unknown key {other:?}"))),
            }
        }
        Ok(out)
    }

    fn new_stream(&self) -> AuthzStream {
        AuthzStream {
            upstream: self.upstream.clone(),
            timeout: self.timeout,
            fail_open: self.fail_open,
            grpc_client: false,
        }
    }
}

struct AuthzStream {
    upstream: String,
    timeout: Duration,
    fail_open: bool,
    grpc_client: bool,
}

/// `HealthCheckRequest { service = 1 }`, protobuf wire format.
fn check_request(service: &str) -> Vec<u8> {
    let name = &service.as_bytes()[..service.len().min(127)];
    let mut out = vec![0x0a, name.len() as u8];
    out.extend_from_slice(name);
    out
}

impl AuthzStream {
    fn deny(&self) -> Action {
        if self.grpc_client {
            Action::Reply(Reply::grpc(7, "access denied"))
        } else {
            Action::Reply(Reply::new(403).body("access denied\n"))
        }
    }
}

impl StreamFilter for AuthzStream {
    fn on_request_headers(&mut self, http: &Http, _eos: bool) -> Result<Action, Error> {
        self.grpc_client = http
            .request_header("content-type")?
            .is_some_and(|c| c.starts_with("application/grpc"));
        let service = http.request_header("x-authz-service")?.unwrap_or_default();
        dispatch_grpc_call(
            &self.upstream,
            "grpc.health.v1.Health",
            "Check",
            &[("x-authz-from", b"membrane-sdk")],
            &check_request(&service),
            self.timeout,
        )?;
        Ok(Action::Pause)
    }

    fn on_grpc(
        &mut self,
        http: &Http,
        _token: u32,
        response: GrpcResponse,
    ) -> Result<Action, Error> {
        match response {
            // HealthCheckResponse { status = SERVING (1) }
            GrpcResponse::Message(body) if body == [0x08, 0x01] => {
                http.set_request_header("x-authz", "allowed")?;
                Ok(Action::Continue)
            }
            GrpcResponse::Message(_) => {
                info!("access denied");
                Ok(self.deny())
            }
            GrpcResponse::Close { status, message } => {
                info!("authorization call failed: {status} {message}");
                if self.fail_open {
                    return Ok(Action::Continue);
                }
                Ok(Action::Reply(
                    Reply::new(503)
                        .header("x-authz-grpc-status", &status.to_string())
                        .body("authorization unavailable\n"),
                ))
            }
            // Unary calls carry no metadata events; keep waiting for the answer.
            GrpcResponse::InitialMetadata(_) | GrpcResponse::TrailingMetadata(_) => {
                Ok(Action::Pause)
            }
        }
    }
}

register!(GrpcAuthz);
