//! `membrane-perf grpc`: what a Wasm filter's gRPC callout adds to a unary call. The same
//! `grpc.health.v1.Health/Check` on a local tonic server is made (a) directly with tonic's
//! client and (b) by the `grpc-authz` example filter (membrane's SDK) through the filter host
//! and the proxy's gRPC callout client (`membrane_l7proxy::grpc_callout`), driven as the node
//! proxy drives a paused request: start the stream, request headers, carry the call, deliver
//! the answer, resume, finish. Sequential calls on one warm connection each; the two are
//! measured in alternating rounds so machine noise hits both; p50/p99 per call and the
//! difference are printed. In process, loopback only, no root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use membrane_filters::{
    Action, FilterChain, FilterHost, FilterSpec, GrpcEvent, GrpcOp, Headers, HostConfig, StreamInfo,
};
use membrane_l7proxy::grpc_callout::{GrpcCalloutClient, GrpcCalloutEvent, GrpcRequest};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

const TARGET: &str = "wasm32-wasip1";
const ROUNDS: usize = 5;
const CALLS_PER_ROUND: usize = 2000;

pub fn run() {
    let exe = std::env::current_exe().expect("current exe");
    let module = build_guest(&exe);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let addr = start_server().await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to the health server");
        let mut direct = HealthClient::new(channel);
        let host = FilterHost::new(HostConfig::default()).expect("filter host");
        let filter = host
            .load(
                FilterSpec::new("grpc-authz", std::fs::read(&module).expect("read module"))
                    .with_config("upstream=authz\ntimeout_ms=1000\n")
                    .with_callout_upstreams(["authz".to_owned()]),
            )
            .expect("load grpc-authz");
        let chain = FilterChain::new(vec![filter]);
        let client = GrpcCalloutClient::new(None, Duration::from_secs(1));

        // Warm both paths.
        for _ in 0..200 {
            call_direct(&mut direct).await;
            call_through_filter(&chain, &client, addr).await;
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            for _ in 0..CALLS_PER_ROUND {
                a.push(call_direct(&mut direct).await);
            }
            for _ in 0..CALLS_PER_ROUND {
                b.push(call_through_filter(&chain, &client, addr).await);
            }
        }
        let (a50, a99) = percentiles(&mut a);
        let (b50, b99) = percentiles(&mut b);
        println!(
            "unary gRPC call, one warm HTTP/2 connection, {} calls each, current-thread runtime",
            ROUNDS * CALLS_PER_ROUND
        );
        println!("direct (tonic client)             p50 {a50:>7.1} us  p99 {a99:>7.1} us");
        println!("through the filter (grpc-authz)   p50 {b50:>7.1} us  p99 {b99:>7.1} us");
        println!(
            "added by the callout path         p50 {:>7.1} us  p99 {:>7.1} us",
            b50 - a50,
            b99 - a99
        );
    });
}

fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|x, y| x.total_cmp(y));
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99))
}

async fn start_server() -> SocketAddr {
    let reporter = HealthReporter::new();
    reporter
        .set_service_status("allowed", ServingStatus::Serving)
        .await;
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

/// One direct call; microseconds.
async fn call_direct(client: &mut HealthClient<tonic::transport::Channel>) -> f64 {
    let started = Instant::now();
    let response = client
        .check(HealthCheckRequest {
            service: "allowed".into(),
        })
        .await
        .expect("direct call");
    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
    started.elapsed().as_secs_f64() * 1e6
}

/// One request through the filter (which makes the same call); microseconds.
async fn call_through_filter(
    chain: &FilterChain,
    client: &GrpcCalloutClient,
    addr: SocketAddr,
) -> f64 {
    let started = Instant::now();
    let mut stream = chain.start_stream(StreamInfo::default());
    let mut calls = client.calls();
    let head = Headers::request("GET", "/", "api.test", [("x-authz-service", "allowed")]);
    let mut action = stream.on_request_headers(head, true);
    let mut ids = Vec::new();
    loop {
        for op in stream.take_grpc_ops() {
            if let GrpcOp::Start(start) = op {
                let n = ids.len() as u64;
                ids.push(start.id);
                let request = GrpcRequest {
                    authority: start.upstream.clone(),
                    path: start.path(),
                    metadata: start
                        .initial_metadata
                        .iter()
                        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
                        .collect(),
                    timeout: Some(start.timeout),
                };
                calls.start(n, Some(addr), request, start.message.map(Bytes::from));
            }
        }
        if action != Action::Pause {
            break;
        }
        let Some((n, event)) = calls.next().await else {
            break;
        };
        let event = match event {
            GrpcCalloutEvent::InitialMetadata(h) => {
                GrpcEvent::InitialMetadata(Headers::from_pairs(h))
            }
            GrpcCalloutEvent::Message(m) => GrpcEvent::Message(m.to_vec()),
            GrpcCalloutEvent::TrailingMetadata(h) => {
                GrpcEvent::TrailingMetadata(Headers::from_pairs(h))
            }
            GrpcCalloutEvent::Close { status, message } => GrpcEvent::Close { status, message },
        };
        action = stream.on_grpc_event(ids[n as usize], event);
    }
    assert_eq!(action, Action::Continue, "the filter allowed the request");
    drop(stream.finish());
    started.elapsed().as_secs_f64() * 1e6
}

/// Builds the example filter for wasm32-wasip1 next to this binary's target directory.
fn build_guest(exe: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/filters/grpc-authz");
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("tmp/wasm-guests");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&dir)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run cargo for the grpc-authz filter");
    assert!(status.success(), "building {} failed", dir.display());
    target_dir.join(TARGET).join("release/grpc_authz.wasm")
}
