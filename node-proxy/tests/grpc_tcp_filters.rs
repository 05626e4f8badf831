//! Acceptance of gRPC callouts and TCP filters on the proxy's real paths, with real servers on
//! loopback and filters built for wasm32-wasip1 by the test:
//!
//! - gRPC authorization (`proxy_grpc_call` to tonic's health service standing in for an
//!   ext_authz-like service): the upstream proxy-wasm SDK's style of filter on the standalone
//!   proxy (`membrane proxy --filter … --filter-upstream authz=…`, what
//!   `membrane_node_proxy::wasm::WasmFilterSet` serves), and membrane's SDK example
//!   (`examples/filters/grpc-authz`) on the node path — a `FilterSnapshot` installed in
//!   `NodeFilters`, the transparent proxy asking `NodePolicies` — with real HTTP clients:
//!   allowed (the request reaches the upstream), denied (403), server error statuses, server
//!   down, a server that never answers (the filter's timeout). On the node the callout's
//!   socket carries `CALLOUT_MARK`.
//! - TCP (stream) filters written with the upstream SDK (`filters/tests/guests/
//!   tcp-rewrite-upstream`) reading and rewriting the bytes both ways: on the standalone TCP
//!   mode (`membrane proxy --tcp`: a `WasmFilterSet` loaded for TCP in front of
//!   `TcpProxy`) and on the node's TLS relay (a `WasmFilter` with `protocol: tcp`).
//! - A module whose callbacks do not match the protocol it is attached with is refused at
//!   load, with the reason; on the node the previous chains keep serving.
//!
//! No timing assertions: every wait is bounded (`WAIT`) only so a broken run cannot hang.

#[path = "../../l7proxy/tests/common/mod.rs"]
mod common;
#[path = "../../filters/tests/common/mod.rs"]
mod guests;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use membrane_agent_api::snapshot::{FilterSnapshot, SnapshotAttachment, SnapshotFilter};
use membrane_agent_api::wasm_resource::{
    self, CalloutUpstream, FilterDirection, FilterProtocol as ResourceProtocol,
};
use membrane_filters::{FilterProtocol, HostConfig};
use membrane_l7proxy::access::{FilterOutcome, RecordKind};
use membrane_l7proxy::redirect::store::{
    L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
    SnapshotPeer, SnapshotPort,
};
use membrane_l7proxy::redirect::{
    CALLOUT_MARK, Direction, IdentitySource, RedirectHandler, TransparentConfig,
};
use membrane_l7proxy::tcp_filter::{TcpProxy, TcpProxyConfig};
use membrane_node_proxy::node_filters::NodeFilters;
use membrane_node_proxy::process::NodePolicies;
use membrane_node_proxy::wasm::{FilterSource, WasmFilterError, WasmFilterSet};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use common::WAIT;

// ---- fixtures ----

/// A directory for module and configuration files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "membrane-grpc-tcp-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn upstream_sdk_grpc_auth() -> Vec<u8> {
    guests::guest_at(
        "filters/tests/guests/grpc-auth-upstream",
        "grpc-auth-upstream",
    )
}

fn membrane_sdk_grpc_authz() -> Vec<u8> {
    guests::guest_at("examples/filters/grpc-authz", "grpc-authz")
}

fn upstream_sdk_tcp_rewrite() -> Vec<u8> {
    guests::guest_at(
        "filters/tests/guests/tcp-rewrite-upstream",
        "tcp-rewrite-upstream",
    )
}

/// The gRPC server: health statuses per service, the `x-authz-from` metadata of each call,
/// and an error every call gets while `fail_with` is a code (≥ 0).
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
    let listener = TcpListener::bind("127.0.0.1:0").await?;
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

/// An address nothing listens on (server down).
fn closed_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A server that accepts and never answers (held open until the test ends).
async fn silent_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Ok(addr)
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`) on `stream` and reads the response to the end.
async fn exchange(mut stream: TcpStream, service: &str) -> Result<Reply> {
    let request = format!(
        "GET /resource HTTP/1.1\r\nHost: api.test\r\nx-authz-service: {service}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no response head in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The `SO_MARK` of this process's open TCP sockets connected to `peer`.
fn marks_of_sockets_to(peer: SocketAddr) -> Vec<u32> {
    let mut marks = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return marks;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for two getsockopt/getpeername calls while
        // the socket's owner (a task of this test's runtime) keeps it open; a descriptor that
        // closed meanwhile (or was never a socket) makes the calls fail, which is skipped.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&borrowed);
        let Some(addr) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        if addr == peer
            && let Ok(mark) = sock.mark()
        {
            marks.push(mark);
        }
    }
    marks
}

/// A callback deadline a busy test machine cannot hit by descheduling a callback (these
/// tests are about callouts and streams, not deadlines; a callback past the default 10 ms
/// fails the stream closed).
fn relaxed_limits() -> membrane_filters::FilterLimits {
    membrane_filters::FilterLimits {
        callback_deadline: std::time::Duration::from_millis(300),
        ..membrane_filters::FilterLimits::default()
    }
}

// ---- gRPC authorization on the standalone proxy (upstream SDK) ----

/// The standalone proxy (`membrane proxy --filter grpc-auth.wasm=CONFIG --filter-upstream
/// authz=ADDR`) in front of the harness's upstream.
async fn standalone_with_authz(
    dir: &TempDir,
    authz: SocketAddr,
    upstream: SocketAddr,
) -> Result<(common::Proxy, Arc<WasmFilterSet>)> {
    let module = dir.write("grpc-auth.wasm", &upstream_sdk_grpc_auth());
    let config = dir.write("grpc-auth.conf", b"authz");
    let set = WasmFilterSet::load(
        vec![FilterSource {
            name: "grpc-auth".into(),
            module,
            config: Some(config),
            limits: relaxed_limits(),
            protocol: FilterProtocol::Http,
        }],
        HashMap::from([("authz".to_owned(), authz)]),
        HostConfig::default(),
    )?;
    let mut config = common::config(upstream, None);
    config.filters = Some(set.clone());
    Ok((common::start_proxy_with(config).await?, set))
}

async fn standalone_request(proxy: &common::Proxy, service: &str) -> Result<Reply> {
    exchange(TcpStream::connect(proxy.addr).await?, service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sdk_grpc_authorization_on_the_standalone_proxy() -> Result<()> {
    let dir = TempDir::new("standalone-grpc");
    let server = start_auth_server().await?;
    let upstream = common::start_upstream().await?;
    let (mut proxy, _set) = standalone_with_authz(&dir, server.addr, upstream.addr).await?;

    // Allowed: the paused request resumes and reaches the upstream; the response path ran.
    let reply = standalone_request(&proxy, "allowed").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("powered-by"), Some("proxy-wasm"));
    assert_eq!(upstream.count(), 1);
    assert_eq!(
        server.seen_from.lock().unwrap().last().map(String::as_str),
        Some("membrane"),
        "the filter's initial metadata reached the gRPC server"
    );
    // The access record names the callout and its gRPC status.
    let record = loop {
        let r = proxy.record().await?;
        if r.kind == RecordKind::Response {
            break r;
        }
    };
    assert!(
        record.filters.iter().any(|f| matches!(
            &f.outcome,
            FilterOutcome::GrpcCallout { upstream, method, grpc_status: 0 }
                if upstream == "authz" && method == "grpc.health.v1.Health/Check"
        )),
        "{:?}",
        record.filters
    );

    // Denied (NOT_SERVING): 403 from the filter; the upstream never sees it.
    let reply = standalone_request(&proxy, "denied").await?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (403, "Access forbidden.\n")
    );
    assert_eq!(upstream.count(), 1);

    // A server error status: an unknown service is NOT_FOUND (5) from tonic-health.
    let reply = standalone_request(&proxy, "unknown").await?;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("x-authz-grpc-status"), Some("5"));

    // Error statuses with their message.
    for code in [13, 16] {
        server.fail_with.store(code, Ordering::SeqCst);
        let reply = standalone_request(&proxy, "allowed").await?;
        assert_eq!(reply.status, 503);
        assert_eq!(
            reply.header("x-authz-grpc-status"),
            Some(code.to_string().as_str())
        );
        assert_eq!(
            reply.header("x-authz-grpc-message"),
            Some("backend says: no, really")
        );
    }
    server.fail_with.store(-1, Ordering::SeqCst);
    assert_eq!(upstream.count(), 1, "no failed authorization reached it");
    proxy.stop().await?;

    // Server down: UNAVAILABLE (14).
    let (proxy, _set) = standalone_with_authz(&dir, closed_port()?, upstream.addr).await?;
    let reply = standalone_request(&proxy, "allowed").await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-authz-grpc-status"), Some("14"));
    proxy.stop().await?;

    // A server that never answers: the filter's 500 ms timeout ⇒ DEADLINE_EXCEEDED (4).
    let (proxy, _set) = standalone_with_authz(&dir, silent_server().await?, upstream.addr).await?;
    let reply = standalone_request(&proxy, "allowed").await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-authz-grpc-status"), Some("4"));
    assert_eq!(
        reply.header("x-authz-grpc-message"),
        Some("upstream request timeout")
    );
    proxy.stop().await?;
    assert_eq!(upstream.count(), 1);
    Ok(())
}

// ---- the node path: NodeFilters + NodePolicies + the transparent proxy ----

/// The client endpoint (a local endpoint's address on loopback).
const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ENDPOINT: u64 = 7;
const ID_A: u32 = 1000;
const ID_SERVER: u32 = 2000;

struct Identities;

impl IdentitySource for Identities {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        match ip {
            IpAddr::V4(a) if a == A => ID_A,
            IpAddr::V4(a) if a == Ipv4Addr::LOCALHOST => ID_SERVER,
            _ => 2,
        }
    }
}

/// Endpoint A's egress policy: `port` allowed for the server (HTTP rules that allow every
/// request, or `serverNames`).
fn policy(port: u16, l7: L7Protocol, server_names: &[&str]) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision: 1,
        endpoints: vec![SnapshotEndpoint {
            id: ENDPOINT,
            ips: vec![IpAddr::V4(A)],
            ports: vec![SnapshotPort {
                direction: Direction::Egress,
                port,
                end_port: 0,
                l7,
                peers: vec![SnapshotPeer {
                    remotes: Remotes::Identities([ID_SERVER].into()),
                    http: Vec::new(),
                    server_names: server_names.iter().map(|n| (*n).to_owned()).collect(),
                }],
            }],
        }],
    }
}

/// A snapshot attaching one filter to endpoint A's egress on `port`, as the agent builds it
/// for a `WasmFilter` resource.
fn filter_snapshot(
    dir: &TempDir,
    name: &str,
    module: &[u8],
    protocol: ResourceProtocol,
    config: &str,
    upstreams: Vec<CalloutUpstream>,
    port: u16,
) -> FilterSnapshot {
    let path = dir.write(&format!("{name}.wasm"), module);
    let key = format!("WasmFilter default/{name}");
    FilterSnapshot {
        revision: 1,
        filters: vec![SnapshotFilter {
            key: key.clone(),
            sha256: wasm_resource::module_sha256(&path).expect("sha256"),
            module: path,
            config: config.to_owned(),
            protocol,
            failure_policy: wasm_resource::FailurePolicy::FailClosed,
            failure_status: 503,
            upstreams,
        }],
        attachments: vec![SnapshotAttachment {
            endpoint: ENDPOINT,
            ips: vec![A],
            direction: FilterDirection::Egress,
            ports: vec![port],
            filters: vec![key],
        }],
        peers: Default::default(),
    }
}

/// The transparent proxy's handler with the node's policy source, and a listener that hands
/// every connection to it as redirected to `original`.
struct NodeProxy {
    addr: SocketAddr,
    handler: Arc<RedirectHandler>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        self.handler.stop();
        self.accept.abort();
    }
}

async fn node_proxy(
    store: PolicyStore,
    filters: Arc<NodeFilters>,
    original: SocketAddr,
) -> Result<NodeProxy> {
    let policies = Arc::new(NodePolicies::new(Arc::new(store), Some(filters)));
    let config = TransparentConfig {
        connect_timeout: std::time::Duration::from_secs(2),
        ..TransparentConfig::default()
    };
    let handler = Arc::new(RedirectHandler::new(
        &config,
        policies,
        Arc::new(Identities),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serving = handler.clone();
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serving.serve_connection(Direction::Egress, stream, original));
        }
    });
    Ok(NodeProxy {
        addr,
        handler,
        accept,
    })
}

/// A connection from endpoint A to the node proxy.
async fn connect_from_a(proxy: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(A), 0))?;
    Ok(tokio::time::timeout(WAIT, socket.connect(proxy)).await??)
}

/// `NodeFilters::install` compiles: off the runtime's workers.
async fn install(filters: &Arc<NodeFilters>, snapshot: FilterSnapshot) -> Result<(), String> {
    let filters = filters.clone();
    tokio::task::spawn_blocking(move || filters.install(&snapshot))
        .await
        .map_err(|e| e.to_string())?
}

/// Needs CAP_NET_ADMIN for the marks (the suite runs as root); fails loudly otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membrane_sdk_grpc_authorization_on_the_node_path() -> Result<()> {
    let dir = TempDir::new("node-grpc");
    let server = start_auth_server().await?;
    let upstream = common::start_upstream().await?;
    let store = PolicyStore::new();
    store.install(policy(upstream.addr.port(), L7Protocol::Http, &[]))?;
    let filters = NodeFilters::new().map_err(anyhow::Error::msg)?;
    let authz = |addr: SocketAddr| {
        vec![CalloutUpstream {
            name: "authz".into(),
            address: addr,
        }]
    };
    let module = membrane_sdk_grpc_authz();
    let snapshot = |addr| {
        filter_snapshot(
            &dir,
            "grpc-authz",
            &module,
            ResourceProtocol::Http,
            "upstream=authz\ntimeout_ms=300\n",
            authz(addr),
            upstream.addr.port(),
        )
    };
    install(&filters, snapshot(server.addr))
        .await
        .map_err(anyhow::Error::msg)?;
    let proxy = node_proxy(store, filters.clone(), upstream.addr).await?;
    let request = |service: &'static str| async move {
        exchange(connect_from_a(proxy.addr).await?, service).await
    };

    // Allowed: resumed, with the header the filter added on the way.
    let reply = request("allowed").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = upstream.seen();
    assert_eq!(
        seen.last()
            .and_then(|s| s.headers.get("x-authz"))
            .map(|v| v.as_bytes()),
        Some(&b"allowed"[..])
    );
    assert_eq!(
        server.seen_from.lock().unwrap().last().map(String::as_str),
        Some("membrane-sdk")
    );
    // The callout's connection (kept for the next calls) is marked as the proxy's own
    // traffic from the host, so the datapath never redirects it back to the proxy.
    assert_eq!(marks_of_sockets_to(server.addr), vec![CALLOUT_MARK]);

    // Denied: 403 from the filter, nothing upstream.
    let reply = request("denied").await?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (403, "access denied\n")
    );
    assert_eq!(upstream.count(), 1);

    // Server error statuses: NOT_FOUND from the service, then an injected one.
    let reply = request("unknown").await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-authz-grpc-status"), Some("5"));
    server.fail_with.store(14, Ordering::SeqCst);
    let reply = request("allowed").await?;
    assert_eq!(reply.header("x-authz-grpc-status"), Some("14"));
    server.fail_with.store(-1, Ordering::SeqCst);

    // Server down, then a server that never answers (the configured 300 ms).
    install(&filters, snapshot(closed_port()?))
        .await
        .map_err(anyhow::Error::msg)?;
    let reply = request("allowed").await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-authz-grpc-status"), Some("14"));
    install(&filters, snapshot(silent_server().await?))
        .await
        .map_err(anyhow::Error::msg)?;
    let reply = request("allowed").await?;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-authz-grpc-status"), Some("4"));
    assert_eq!(upstream.count(), 1, "only the allowed request went through");
    Ok(())
}

// ---- TCP filters ----

/// A line server: reports the first `preamble` bytes of a connection as one message (a TLS
/// ClientHello, binary), then answers every line with `got: <line>` and reports the lines.
async fn line_server(
    preamble: usize,
) -> Result<(SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if preamble > 0 {
                    let mut first = vec![0u8; preamble];
                    if stream.read_exact(&mut first).await.is_err() {
                        return;
                    }
                    let _ = tx.send(first).await;
                }
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    let mut answer = b"got: ".to_vec();
                    answer.extend_from_slice(&line);
                    answer.push(b'\n');
                    let _ = tx.send(line).await;
                    if write.write_all(&answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, rx))
}

async fn read_line(stream: &mut TcpStream) -> Result<String> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .context("read timed out")??;
        if n == 0 {
            bail!("closed after {:?}", String::from_utf8_lossy(&out));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(byte[0]);
    }
}

async fn expect_closed(stream: &mut TcpStream) -> Result<()> {
    let mut rest = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        Ok(Err(e)) => bail!("read failed: {e}"),
        Err(_) => bail!("still open"),
    }
}

async fn next_line(lines: &mut tokio::sync::mpsc::Receiver<Vec<u8>>) -> Result<Vec<u8>> {
    tokio::time::timeout(WAIT, lines.recv())
        .await
        .context("the server got nothing")?
        .context("server gone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sdk_tcp_filter_on_the_standalone_tcp_mode() -> Result<()> {
    let dir = TempDir::new("tcp-mode");
    let (server, mut lines) = line_server(0).await?;
    // What `membrane proxy --tcp --listen … --upstream … --filter tcp-rewrite.wasm` runs.
    let module = dir.write("tcp-rewrite.wasm", &upstream_sdk_tcp_rewrite());
    let source =
        FilterSource::parse(&module.display().to_string())?.with_protocol(FilterProtocol::Tcp);
    let set = WasmFilterSet::load(vec![source], HashMap::new(), HostConfig::default())?;
    let mut config = TcpProxyConfig::new("127.0.0.1:0".parse()?, server);
    config.filters = Some(set.clone());
    let proxy = TcpProxy::bind(config).await?;
    let addr = proxy.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));

    let mut client = TcpStream::connect(addr).await?;
    client.write_all(b"say ping twice: ping\n").await?;
    assert_eq!(next_line(&mut lines).await?, b"say PING twice: PING");
    assert_eq!(
        read_line(&mut client).await.context("first answer")?,
        "[wasm] got: say PING twice: PING"
    );
    // The filter closes the connection on `quit`; the server never gets that line.
    client.write_all(b"quit\n").await?;
    expect_closed(&mut client).await?;
    // A second connection is filtered on its own.
    let mut again = TcpStream::connect(addr).await?;
    again.write_all(b"ping\n").await?;
    assert_eq!(next_line(&mut lines).await?, b"PING", "not the quit line");
    assert_eq!(
        read_line(&mut again).await.context("second connection")?,
        "[wasm] got: PING"
    );
    drop(again);
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, serving).await;

    // A module that declares HTTP callbacks only (membrane's SDK declares what it registers;
    // upstream-SDK modules export every callback and so declare both) is refused for the TCP
    // mode, with the reason.
    let http_only = dir.write("grpc-authz.wasm", &membrane_sdk_grpc_authz());
    let source =
        FilterSource::parse(&http_only.display().to_string())?.with_protocol(FilterProtocol::Tcp);
    let err = WasmFilterSet::load(vec![source], HashMap::new(), HostConfig::default())
        .err()
        .context("an HTTP filter loaded for TCP")?;
    assert!(matches!(err, WasmFilterError::Load { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("attached as a tcp filter") && text.contains("proxy_on_new_connection"),
        "{text}"
    );
    Ok(())
}

const HELLO: &[u8] =
    include_bytes!("../../l7proxy/src/redirect/testdata/openssl-3.0-client-hello.bin");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sdk_tcp_filter_on_the_node_tls_relay() -> Result<()> {
    let dir = TempDir::new("node-tls");
    let (server, mut received) = line_server(HELLO.len()).await?;
    let store = PolicyStore::new();
    store.install(policy(server.port(), L7Protocol::Tls, &["api.example.com"]))?;
    let filters = NodeFilters::new().map_err(anyhow::Error::msg)?;
    let tcp_module = upstream_sdk_tcp_rewrite();
    install(
        &filters,
        filter_snapshot(
            &dir,
            "tcp-rewrite",
            &tcp_module,
            ResourceProtocol::Tcp,
            "",
            Vec::new(),
            server.port(),
        ),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    assert!(
        filters
            .lookup(IpAddr::V4(A), Direction::Egress, server.port())
            .is_none(),
        "a tcp filter is no HTTP filter"
    );
    let proxy = node_proxy(store, filters.clone(), server).await?;

    // The ClientHello (read by the SNI check, then the filter's first client bytes), then a
    // line in the same flight.
    let mut client = connect_from_a(proxy.addr).await?;
    client.write_all(HELLO).await?;
    client.write_all(b"ping from a TLS client\n").await?;
    assert_eq!(
        next_line(&mut received).await?,
        HELLO,
        "the ClientHello passes the filter unchanged"
    );
    assert_eq!(
        next_line(&mut received).await?,
        b"PING from a TLS client",
        "the filter rewrote the client's bytes"
    );
    assert_eq!(
        read_line(&mut client).await?,
        "[wasm] got: PING from a TLS client",
        "the filter rewrote the server's bytes"
    );
    client.write_all(b"quit\n").await?;
    expect_closed(&mut client).await?;

    // A snapshot attaching a TCP-only module (membrane's SDK `tcp-rewrite` example declares
    // only the stream context) as an HTTP filter is refused with the reason, and the TCP
    // chain keeps serving.
    let err = install(
        &filters,
        filter_snapshot(
            &dir,
            "tcp-rewrite",
            &guests::guest_at("examples/filters/tcp-rewrite", "tcp-rewrite"),
            ResourceProtocol::Http,
            "",
            Vec::new(),
            server.port(),
        ),
    )
    .await
    .expect_err("a TCP filter attached to HTTP");
    assert!(
        err.contains("WasmFilter default/tcp-rewrite")
            && err.contains("attached as a http filter")
            && err.contains("proxy_on_request_headers"),
        "{err}"
    );
    let mut client = connect_from_a(proxy.addr).await?;
    client.write_all(HELLO).await?;
    client.write_all(b"ping again\n").await?;
    assert_eq!(next_line(&mut received).await?, HELLO);
    assert_eq!(next_line(&mut received).await?, b"PING again");
    assert_eq!(read_line(&mut client).await?, "[wasm] got: PING again");
    Ok(())
}
