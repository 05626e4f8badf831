//! End to end: the datapath redirects a pod's HTTP flow to the transparent proxy running in
//! the node namespace, the proxy enforces the HTTP rules and forwards allowed requests to
//! the backend pod on an upstream connection marked with the client's identity, which the
//! backend's own ingress policy then judges. Real clients (`curl` inside the pod's
//! namespace), a real backend, a real proxy; every wait is bounded.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    path::PathBuf,
    process::Output,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use membrane_common::{Direction as DatapathDirection, identity, proto};
use membrane_datapath::{Netns, PolicyRule, PolicyVerdict, PortMatch};
use membrane_l7proxy::{
    ACCESS_DENIED_BODY,
    access::{AccessLog, AccessRecord, RecordKind},
    redirect::{
        Direction, IdentitySource, PolicySource, TransparentConfig,
        store::{
            L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
            SnapshotHttpRule, SnapshotPeer, SnapshotPort,
        },
    },
};
use membrane_tests::{TestNode, TestPod, proxy::RunningProxy, unique_name};
use tokio::sync::mpsc;

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const ID_A: u32 = 1000;
const ID_B: u32 = 2000;
const BACKEND_PORT: u16 = 8080;
const EGRESS_PROXY_PORT: u16 = 15001;
const INGRESS_PROXY_PORT: u16 = 15002;
/// Bound of every wait for something that should happen (not a timing assertion).
const WAIT: Duration = Duration::from_secs(10);
/// curl's limit for a request that should fail (a dropped SYN never completes).
const CURL_FAIL_SECONDS: &str = "3";

/// The ipcache as the proxy sees it.
struct Ipcache(HashMap<IpAddr, u32>);

impl IdentitySource for Ipcache {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(identity::WORLD)
    }
}

fn ipcache() -> Arc<Ipcache> {
    Arc::new(Ipcache(HashMap::from([
        (IpAddr::V4(A_IP), ID_A),
        (IpAddr::V4(B_IP), ID_B),
    ])))
}

/// `endpoint`'s HTTP rules on the backend port: `GET /api/v1/...` from or to `remote`.
fn api_snapshot(endpoint: &TestPod, direction: Direction, remote: u32) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision: 1,
        endpoints: vec![SnapshotEndpoint {
            id: u64::from(endpoint.endpoint_id),
            ips: vec![IpAddr::V4(endpoint.ip)],
            ports: vec![SnapshotPort {
                direction,
                port: BACKEND_PORT,
                end_port: 0,
                l7: L7Protocol::Http,
                peers: vec![SnapshotPeer {
                    remotes: Remotes::Identities([remote].into()),
                    http: vec![SnapshotHttpRule {
                        method: Some("GET".into()),
                        path: Some("/api/v1/.*".into()),
                        ..SnapshotHttpRule::default()
                    }],
                    server_names: Vec::new(),
                }],
            }],
        }],
    }
}

/// The transparent proxy in the node namespace (see `membrane_tests::proxy`).
fn start_proxy(node: &Netns, policies: Arc<dyn PolicySource>, access: AccessLog) -> RunningProxy {
    let config = TransparentConfig {
        egress_listen: Some(SocketAddr::from(([0, 0, 0, 0], EGRESS_PROXY_PORT))),
        ingress_listen: Some(SocketAddr::from(([0, 0, 0, 0], INGRESS_PROXY_PORT))),
        connect_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(1),
        access_log: access,
        ..TransparentConfig::default()
    };
    RunningProxy::start(node, config, policies, ipcache())
}

/// What the backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    peer: SocketAddr,
    request_line: String,
}

/// A small HTTP/1.1 server in a pod: answers every request `200 hello from b` and closes;
/// remembers what it saw. Bounded by its lifetime and the test's stop.
struct Backend {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(ns: &Netns, addr: SocketAddrV4) -> Self {
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("enter {}: {e}", ns.name()))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut conn, peer)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let request_line = text.lines().next().unwrap_or_default().to_owned();
                seen2
                    .lock()
                    .expect("seen lock")
                    .push(Seen { peer, request_line });
                let body = "hello from b\n";
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `curl -X method http://B:8080/path` from `pod`: (exit success, the exact response body,
/// the status code as curl prints it).
fn curl(pod: &TestPod, method: &str, path: &str, max_seconds: &str) -> (bool, String, String) {
    let url = format!("http://{B_IP}:{BACKEND_PORT}{path}");
    let Output {
        status,
        stdout,
        stderr,
    } = pod
        .netns
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            max_seconds,
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            &url,
        ])
        .output()
        .expect("run curl (is it installed?)");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    if !status.success() {
        eprintln!(
            "curl {method} {url}: {status}: {}",
            String::from_utf8_lossy(&stderr)
        );
    }
    (status.success(), body.to_owned(), code.to_owned())
}

/// Receives `count` access records (bounded).
fn wait_records(receiver: &mut mpsc::Receiver<AccessRecord>, count: usize) -> Vec<AccessRecord> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < deadline {
        match receiver.try_recv() {
            Ok(record) => out.push(record),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert_eq!(out.len(), count, "access records so far: {out:#?}");
    out
}

fn rule(
    pod: &TestPod,
    direction: DatapathDirection,
    remote: u32,
    verdict: PolicyVerdict,
) -> PolicyRule {
    PolicyRule::new(
        pod.endpoint_id,
        direction,
        remote,
        proto::TCP,
        PortMatch::Exact(BACKEND_PORT),
        verdict,
    )
    .with_cookie(7)
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn egress_redirect_enforces_http_rules_and_marks_the_identity() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_A, false, true);
    let b = node.add_pod("b", B_IP, ID_B, true, false);
    // A's egress to B:8080 goes through the proxy. B's ingress allows only A's identity: the
    // proxy connects from the node's address, so only the identity in its SO_MARK lets the
    // forwarded request in.
    for r in [
        rule(
            &a,
            DatapathDirection::Egress,
            ID_B,
            PolicyVerdict::Redirect(EGRESS_PROXY_PORT),
        ),
        rule(&b, DatapathDirection::Ingress, ID_A, PolicyVerdict::Allow),
    ] {
        node.datapath().policy().insert(&r).expect("insert rule");
    }
    let backend = Backend::start(
        &b.netns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, BACKEND_PORT),
    );
    let store = Arc::new(PolicyStore::new());
    store
        .install(api_snapshot(&a, Direction::Egress, ID_B))
        .expect("install the policy");
    let (access, mut receiver) = AccessLog::channel(64);
    let proxy = start_proxy(node.node_netns(), store.clone(), access.clone());

    // Allowed: reaches B through the proxy.
    let (ok, body, code) = curl(&a, "GET", "/api/v1/x", "10");
    assert!(ok, "GET through the proxy");
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from b\n"));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].request_line, "GET /api/v1/x HTTP/1.1");
    assert_ne!(
        seen[0].peer.ip(),
        IpAddr::V4(A_IP),
        "the backend's peer is the proxy (in the node namespace), not A"
    );

    // Denied: 403 from the proxy, never at B.
    let (ok, body, code) = curl(&a, "DELETE", "/api/v1/x", "10");
    assert!(ok, "DELETE gets an answer");
    assert_eq!(code, "403");
    assert_eq!(body, ACCESS_DENIED_BODY);
    assert_eq!(
        backend.seen().len(),
        1,
        "the denied request never reached B"
    );

    let records = wait_records(&mut receiver, 4);
    let kinds: Vec<(RecordKind, Option<u16>, &str)> = records
        .iter()
        .map(|r| (r.kind, r.status, r.method.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (RecordKind::Request, None, "GET"),
            (RecordKind::Response, Some(200), "GET"),
            (RecordKind::Denied, Some(403), "DELETE"),
            (RecordKind::Response, Some(403), "DELETE"),
        ]
    );
    for record in &records {
        assert_eq!(record.source.ip(), IpAddr::V4(A_IP), "{record}");
        assert_eq!(
            record.destination,
            SocketAddr::from((B_IP, BACKEND_PORT)),
            "the original destination: {record}"
        );
        assert_eq!(record.source_identity, Some(ID_A), "{record}");
        assert_eq!(record.destination_identity, Some(ID_B), "{record}");
    }

    // The agent's last policy, saved for a restart.
    let snapshot = TempFile(std::env::temp_dir().join(format!("{}.json", unique_name("l7"))));
    store.save_snapshot(&snapshot.0).expect("save the snapshot");

    // Proxy down: the redirected connection fails; nothing bypasses to B.
    proxy.stop();
    let (ok, body, _) = curl(&a, "GET", "/api/v1/x", CURL_FAIL_SECONDS);
    assert!(!ok, "no proxy listener: curl fails, got body {body:?}");
    assert_eq!(
        backend.seen().len(),
        1,
        "nothing reached B while the proxy was down"
    );

    // Restarted from the file alone (no policy update from anyone): enforcing again.
    let restored = Arc::new(PolicyStore::new());
    restored
        .load_snapshot(&snapshot.0)
        .expect("load the snapshot");
    let _proxy = start_proxy(node.node_netns(), restored, access);
    let (ok, body, code) = curl(&a, "GET", "/api/v1/x", "10");
    assert!(ok, "GET after the restart");
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from b\n"));
    let (_, body, code) = curl(&a, "DELETE", "/api/v1/x", "10");
    assert_eq!(code, "403", "{body}");
    assert_eq!(backend.seen().len(), 2);
    let after = wait_records(&mut receiver, 4);
    assert!(after.iter().all(|r| r.source_identity == Some(ID_A)));
}

#[test]
fn ingress_redirect_enforces_the_destination_pods_http_rules() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_A, false, false);
    let b = node.add_pod("b", B_IP, ID_B, true, false);
    // B's ingress from A on 8080 goes through the (ingress) proxy; the proxy's upstream
    // connection is marked "from the ingress proxy", which B's ingress policy lets through
    // (the proxy already enforced it at L7).
    node.datapath()
        .policy()
        .insert(&rule(
            &b,
            DatapathDirection::Ingress,
            ID_A,
            PolicyVerdict::Redirect(INGRESS_PROXY_PORT),
        ))
        .expect("insert rule");
    let backend = Backend::start(
        &b.netns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, BACKEND_PORT),
    );
    let store = Arc::new(PolicyStore::new());
    store
        .install(api_snapshot(&b, Direction::Ingress, ID_A))
        .expect("install the policy");
    let (access, mut receiver) = AccessLog::channel(64);
    let _proxy = start_proxy(node.node_netns(), store, access);

    let (ok, body, code) = curl(&a, "GET", "/api/v1/x", "10");
    assert!(ok, "GET through the ingress proxy");
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from b\n"));
    let (_, body, code) = curl(&a, "DELETE", "/api/v1/x", "10");
    assert_eq!(code, "403", "{body}");
    let seen = backend.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the allowed request reached B: {seen:?}"
    );
    assert_eq!(seen[0].request_line, "GET /api/v1/x HTTP/1.1");
    for record in wait_records(&mut receiver, 4) {
        assert_eq!(
            (record.source_identity, record.destination_identity),
            (Some(ID_A), Some(ID_B)),
            "{record}"
        );
    }
}
