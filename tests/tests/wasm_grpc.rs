//! gRPC callouts end to end: an authorization filter written with the upstream proxy-wasm SDK
//! (`grpc_auth_random` style) calls a real gRPC server (tonic's health service, standing in
//! for an ext_authz-like service) through the filter host's `GrpcOp`s and the proxy's HTTP/2
//! client (`membrane_l7proxy::grpc_callout`), driven here step by step as the proxy's pause
//! loop (`membrane_l7proxy::filter_path`) drives a paused request: send what the filters
//! asked for, deliver what comes back, until the phase goes on. The same filters through
//! the proxies themselves (standalone and node): `node-proxy/tests/grpc_tcp_filters.rs`. Covered: allowed, denied (HTTP and gRPC clients), server error statuses (with the
//! message), server down (connect refused), a server that never answers (timeout), an unknown
//! upstream (ParseFailure, as Envoy). The same cases run with the example filter written with
//! membrane's SDK (`examples/filters/grpc-authz`).

#[path = "../../filters/tests/common/mod.rs"]
mod guests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use membrane_filters::{
    Action, ChainStream, DecisionKind, FilterChain, FilterHost, FilterSpec, GrpcCallId, GrpcEvent,
    GrpcOp, Headers, HostConfig, StreamInfo,
};
use membrane_l7proxy::grpc_callout::{
    GrpcCalloutClient, GrpcCalloutEvent, GrpcCallouts, GrpcRequest,
};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

fn membrane_sdk_filter() -> Vec<u8> {
    guests::guest_at("examples/filters/grpc-authz", "grpc-authz")
}

fn upstream_sdk_filter() -> Vec<u8> {
    guests::guest_at(
        "filters/tests/guests/grpc-auth-upstream",
        "grpc-auth-upstream",
    )
}

/// The gRPC server: health statuses per service, the metadata each call carried, and an
/// error every call gets while `fail_with` is a code (≥ 0).
struct AuthServer {
    addr: SocketAddr,
    seen_from: Arc<Mutex<Vec<String>>>,
    fail_with: Arc<AtomicI32>,
}

async fn start_auth_server() -> Result<AuthServer> {
    let reporter = HealthReporter::new();
    reporter
        .set_service_status("allowed", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("denied", ServingStatus::NotServing)
        .await;
    let seen_from = Arc::new(Mutex::new(Vec::new()));
    let fail_with = Arc::new(AtomicI32::new(-1));
    let (seen, fail) = (seen_from.clone(), fail_with.clone());
    let service = HealthServer::with_interceptor(
        HealthService::from_health_reporter(reporter),
        move |req: tonic::Request<()>| {
            let from = req
                .metadata()
                .get("x-authz-from")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            seen.lock().unwrap().push(from);
            match fail.load(Ordering::SeqCst) {
                code if code >= 0 => Err(tonic::Status::new(
                    tonic::Code::from_i32(code),
                    "backend says: no, really",
                )),
                _ => Ok(req),
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(AuthServer {
        addr,
        seen_from,
        fail_with,
    })
}

fn pairs(headers: &Headers) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
        .collect()
}

fn headers(pairs: Vec<(String, Vec<u8>)>) -> Headers {
    Headers::from_pairs(pairs)
}

/// What the node proxy does while a phase is paused: carry the filters' gRPC operations,
/// deliver the events, until the phase goes on (or nothing is left to wait for).
async fn settle(
    stream: &mut ChainStream,
    mut action: Action,
    calls: &mut GrpcCallouts,
    upstreams: &HashMap<String, SocketAddr>,
) -> Action {
    let mut ids: HashMap<u64, GrpcCallId> = HashMap::new();
    let mut by_call: HashMap<GrpcCallId, u64> = HashMap::new();
    let mut next = 0u64;
    loop {
        for op in stream.take_grpc_ops() {
            match op {
                GrpcOp::Start(start) => {
                    next += 1;
                    ids.insert(next, start.id);
                    by_call.insert(start.id, next);
                    let request = GrpcRequest {
                        authority: start.upstream.clone(),
                        path: start.path(),
                        metadata: pairs(&start.initial_metadata),
                        timeout: Some(start.timeout),
                    };
                    let addr = upstreams.get(&start.upstream).copied();
                    calls.start(next, addr, request, start.message.map(Bytes::from));
                }
                GrpcOp::Send {
                    id,
                    message,
                    end_stream,
                } => {
                    if let Some(n) = by_call.get(&id) {
                        calls.send(*n, &message, end_stream);
                    }
                }
                GrpcOp::Close { id } => {
                    if let Some(n) = by_call.get(&id) {
                        calls.close(*n);
                    }
                }
                GrpcOp::Cancel { id } => {
                    if let Some(n) = by_call.get(&id) {
                        calls.cancel(*n);
                    }
                }
            }
        }
        if action != Action::Pause {
            return action;
        }
        let Some((n, event)) = calls.next().await else {
            return action;
        };
        let event = match event {
            GrpcCalloutEvent::InitialMetadata(h) => GrpcEvent::InitialMetadata(headers(h)),
            GrpcCalloutEvent::Message(m) => GrpcEvent::Message(m.to_vec()),
            GrpcCalloutEvent::TrailingMetadata(h) => GrpcEvent::TrailingMetadata(headers(h)),
            GrpcCalloutEvent::Close { status, message } => GrpcEvent::Close { status, message },
        };
        action = stream.on_grpc_event(ids[&n], event);
    }
}

struct Outcome {
    action: Action,
    response_headers: Headers,
    decisions: Vec<DecisionKind>,
    elapsed: Duration,
}

/// One request through the chain: request headers (settled), then an upstream 200.
async fn request(
    chain: &FilterChain,
    client: &GrpcCalloutClient,
    upstreams: &HashMap<String, SocketAddr>,
    service: &str,
    content_type: &str,
) -> Outcome {
    let started = Instant::now();
    let mut stream = chain.start_stream(StreamInfo::default());
    let mut calls = client.calls();
    let head = Headers::request(
        "POST",
        "/pkg.Svc/Do",
        "api.test",
        [("x-authz-service", service), ("content-type", content_type)],
    );
    let first = stream.on_request_headers(head, true);
    let action = settle(&mut stream, first, &mut calls, upstreams).await;
    let elapsed = started.elapsed();
    let mut response_headers = Headers::new();
    if action == Action::Continue {
        let r = stream.on_response_headers(Headers::response(200, [("x-backend", "1")]), true);
        assert_eq!(r, Action::Continue);
        response_headers = stream.response_headers().clone();
    }
    let decisions = stream.finish().into_iter().map(|d| d.kind).collect();
    Outcome {
        action,
        response_headers,
        decisions,
        elapsed,
    }
}

fn reply(action: &Action) -> (u16, String, Option<u32>, Headers) {
    match action {
        Action::LocalReply(r) => (
            r.status,
            String::from_utf8_lossy(&r.body).into_owned(),
            r.grpc_status,
            r.headers.clone(),
        ),
        other => panic!("expected a local reply, got {other:?}"),
    }
}

fn grpc_statuses(decisions: &[DecisionKind]) -> Vec<u32> {
    decisions
        .iter()
        .filter_map(|d| match d {
            DecisionKind::GrpcCallout { grpc_status, .. } => Some(*grpc_status),
            _ => None,
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn load(host: &FilterHost, config: &str) -> Result<FilterChain> {
    let filter = host.load(
        FilterSpec::new("grpc-auth", upstream_sdk_filter())
            .with_config(config)
            .with_callout_upstreams(["authz".to_owned()]),
    )?;
    Ok(FilterChain::new(vec![filter]))
}

#[test]
fn upstream_sdk_grpc_authorization_allowed_denied_and_server_errors() -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let server = start_auth_server().await?;
        let host = FilterHost::new(HostConfig::default())?;
        let chain = load(&host, "authz")?;
        let client = GrpcCalloutClient::new(None, Duration::from_secs(1));
        let upstreams = HashMap::from([("authz".to_owned(), server.addr)]);

        // Allowed: the call answers SERVING, the filter resumes the request.
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        assert_eq!(out.action, Action::Continue, "{:?}", out.decisions);
        assert_eq!(
            out.response_headers.get_str("powered-by"),
            Some("proxy-wasm")
        );
        assert_eq!(grpc_statuses(&out.decisions), vec![0]);
        assert_eq!(
            server.seen_from.lock().unwrap().last().map(String::as_str),
            Some("membrane"),
            "the filter's initial metadata reached the server"
        );

        // Denied (NOT_SERVING): 403 with the SDK's body, decorated by the response path.
        let out = request(&chain, &client, &upstreams, "denied", "text/plain").await;
        let (status, body, _, headers) = reply(&out.action);
        assert_eq!((status, body.as_str()), (403, "Access forbidden.\n"));
        assert_eq!(headers.get_str("powered-by"), Some("proxy-wasm"));

        // Denied for a gRPC client: a trailers-only gRPC reply (PERMISSION_DENIED).
        let out = request(&chain, &client, &upstreams, "denied", "application/grpc").await;
        let (_, _, grpc, _) = reply(&out.action);
        assert_eq!(grpc, Some(7));

        // A server error status: unknown service ⇒ NOT_FOUND (5) from tonic-health.
        let out = request(&chain, &client, &upstreams, "unknown", "text/plain").await;
        let (status, _, _, headers) = reply(&out.action);
        assert_eq!(status, 503);
        assert_eq!(headers.get_str("x-authz-grpc-status"), Some("5"));
        assert_eq!(grpc_statuses(&out.decisions), vec![5]);

        // Error statuses with a message (percent-encoded on the wire, decoded for the filter).
        for code in [13, 14, 16] {
            server.fail_with.store(code, Ordering::SeqCst);
            let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
            let (status, _, _, headers) = reply(&out.action);
            assert_eq!(status, 503);
            assert_eq!(
                headers.get_str("x-authz-grpc-status"),
                Some(code.to_string().as_str())
            );
            assert_eq!(
                headers.get_str("x-authz-grpc-message"),
                Some("backend says: no, really")
            );
        }
        server.fail_with.store(-1, Ordering::SeqCst);
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        assert_eq!(out.action, Action::Continue, "the server is healthy again");
        Ok(())
    })
}

#[test]
fn upstream_sdk_grpc_authorization_server_down_and_timeout() -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let host = FilterHost::new(HostConfig::default())?;
        let chain = load(&host, "authz")?;
        let client = GrpcCalloutClient::new(None, Duration::from_secs(1));

        // Server down: nothing listens on the port ⇒ UNAVAILABLE (14).
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let upstreams = HashMap::from([("authz".to_owned(), closed)]);
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        let (status, _, _, headers) = reply(&out.action);
        assert_eq!(status, 503);
        assert_eq!(headers.get_str("x-authz-grpc-status"), Some("14"));

        // A server that accepts and never answers: the filter's 500 ms timeout ⇒
        // DEADLINE_EXCEEDED (4), "upstream request timeout", well before the 30 s bound.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let silent_addr = silent.local_addr()?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = silent.accept().await {
                keep.lock().unwrap().push(s);
            }
        });
        let upstreams = HashMap::from([("authz".to_owned(), silent_addr)]);
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        let (status, _, _, headers) = reply(&out.action);
        assert_eq!(status, 503);
        assert_eq!(headers.get_str("x-authz-grpc-status"), Some("4"));
        assert_eq!(
            headers.get_str("x-authz-grpc-message"),
            Some("upstream request timeout")
        );
        assert!(
            out.elapsed >= Duration::from_millis(450) && out.elapsed < Duration::from_secs(5),
            "took {:?}",
            out.elapsed
        );

        // An upstream the filter may not call: ParseFailure at dispatch, as Envoy answers
        // for an unknown cluster (the SDK returns it; this filter answers 500).
        let chain = load(&host, "not-configured")?;
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        let (status, body, _, _) = reply(&out.action);
        assert_eq!(status, 500);
        assert_eq!(body, "dispatch failed: ParseFailure\n");
        Ok(())
    })
}

fn load_ours(host: &FilterHost, config: &str) -> Result<FilterChain> {
    let filter = host.load(
        FilterSpec::new("grpc-authz", membrane_sdk_filter())
            .with_config(config)
            .with_callout_upstreams(["authz".to_owned()]),
    )?;
    Ok(FilterChain::new(vec![filter]))
}

#[test]
fn membrane_sdk_grpc_authorization_allowed_denied_errors_down_and_timeout() -> Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let server = start_auth_server().await?;
        let host = FilterHost::new(HostConfig::default())?;
        let chain = load_ours(&host, "upstream=authz\ntimeout_ms=300\n")?;
        let client = GrpcCalloutClient::new(None, Duration::from_secs(1));
        let upstreams = HashMap::from([("authz".to_owned(), server.addr)]);

        // Allowed: resumed, with the header the filter added on the way.
        let mut stream = chain.start_stream(StreamInfo::default());
        let mut calls = client.calls();
        let head = Headers::request("GET", "/", "api.test", [("x-authz-service", "allowed")]);
        let first = stream.on_request_headers(head, true);
        let action = settle(&mut stream, first, &mut calls, &upstreams).await;
        assert_eq!(action, Action::Continue);
        assert_eq!(stream.request_headers().get_str("x-authz"), Some("allowed"));
        drop(stream);
        assert_eq!(
            server.seen_from.lock().unwrap().last().map(String::as_str),
            Some("membrane-sdk")
        );

        // Denied: 403; for a gRPC client PERMISSION_DENIED.
        let out = request(&chain, &client, &upstreams, "denied", "text/plain").await;
        let (status, body, _, _) = reply(&out.action);
        assert_eq!((status, body.as_str()), (403, "access denied\n"));
        let out = request(&chain, &client, &upstreams, "denied", "application/grpc").await;
        assert_eq!(reply(&out.action).2, Some(7));

        // Server error statuses: NOT_FOUND from the service, then injected ones.
        let out = request(&chain, &client, &upstreams, "unknown", "text/plain").await;
        let (status, _, _, headers) = reply(&out.action);
        assert_eq!(status, 503);
        assert_eq!(headers.get_str("x-authz-grpc-status"), Some("5"));
        server.fail_with.store(13, Ordering::SeqCst);
        let out = request(&chain, &client, &upstreams, "allowed", "text/plain").await;
        assert_eq!(
            reply(&out.action).3.get_str("x-authz-grpc-status"),
            Some("13")
        );
        server.fail_with.store(-1, Ordering::SeqCst);

        // Server down: UNAVAILABLE.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let down = HashMap::from([("authz".to_owned(), closed)]);
        let out = request(&chain, &client, &down, "allowed", "text/plain").await;
        assert_eq!(
            reply(&out.action).3.get_str("x-authz-grpc-status"),
            Some("14")
        );

        // A server that never answers: the configured 300 ms ⇒ DEADLINE_EXCEEDED.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let silent_addr = silent.local_addr()?;
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let hung = HashMap::from([("authz".to_owned(), silent_addr)]);
        let out = request(&chain, &client, &hung, "allowed", "text/plain").await;
        assert_eq!(
            reply(&out.action).3.get_str("x-authz-grpc-status"),
            Some("4")
        );
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);

        // Fail open: a failed call lets the request through.
        let open = load_ours(&host, "upstream=authz\ntimeout_ms=300\nfail_open=true\n")?;
        let out = request(&open, &client, &down, "allowed", "text/plain").await;
        assert_eq!(out.action, Action::Continue);

        // An upstream the filter may not call: the SDK returns the error (ParseFailure)
        // and the stream's on_error answers 503 — no trap.
        let other = load_ours(&host, "upstream=nosuch\n")?;
        let out = request(&other, &client, &upstreams, "allowed", "text/plain").await;
        assert_eq!(reply(&out.action).0, 503);
        assert!(
            !out.decisions
                .iter()
                .any(|d| matches!(d, DecisionKind::Failed { .. })),
            "{:?}",
            out.decisions
        );
        Ok(())
    })
}
