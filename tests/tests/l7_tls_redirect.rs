//! End to end: `serverNames` through the datapath redirect. Pod A's egress to pod B's TLS
//! port is redirected to the transparent proxy in the node namespace, which reads the
//! ClientHello without terminating TLS: an allowed server name gets a real TLS handshake and
//! HTTPS exchange with B's `openssl s_server` (self-signed, `curl -k`) on an upstream
//! connection marked with A's identity (B's ingress admits only that identity); a denied name
//! and a plain-text client are reset and never reach B (counted in the server's handshake
//! log). Real clients (`curl` in A's namespace), a real TLS server, a real proxy; every wait
//! is bounded.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use membrane_common::{Direction as DatapathDirection, identity, proto};
use membrane_datapath::{Netns, PolicyRule, PolicyVerdict, PortMatch};
use membrane_l7proxy::{
    access::{AccessLog, AccessRecord, RecordKind},
    policy::RuleRef,
    redirect::{
        Direction, IdentitySource, PolicySource, TransparentConfig,
        store::{
            L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
            SnapshotPeer, SnapshotPort,
        },
    },
};
use membrane_tests::{TestNode, TestPod, proxy::RunningProxy, unique_name};
use tokio::sync::mpsc;

const A_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
const ID_A: u32 = 1000;
const ID_B: u32 = 2000;
const TLS_PORT: u16 = 8443;
const EGRESS_PROXY_PORT: u16 = 15001;
/// Bound of every wait for something that should happen (not a timing assertion).
const WAIT: Duration = Duration::from_secs(10);
/// The server's handshake log has one such line per ClientHello it read.
const HELLO_READ: &str = "SSL_accept:SSLv3/TLS read client hello";

struct Ipcache(HashMap<IpAddr, u32>);

impl IdentitySource for Ipcache {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(identity::WORLD)
    }
}

/// A's egress to B on the TLS port: only `api.example.com`.
fn tls_snapshot(a: &TestPod) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision: 1,
        endpoints: vec![SnapshotEndpoint {
            id: u64::from(a.endpoint_id),
            ips: vec![IpAddr::V4(a.ip)],
            ports: vec![SnapshotPort {
                direction: Direction::Egress,
                port: TLS_PORT,
                end_port: 0,
                l7: L7Protocol::Tls,
                peers: vec![SnapshotPeer {
                    remotes: Remotes::Identities([ID_B].into()),
                    http: Vec::new(),
                    server_names: vec!["api.example.com".into()],
                }],
            }],
        }],
    }
}

/// The transparent proxy in the node namespace (see `membrane_tests::proxy`).
fn start_proxy(node: &Netns, policies: Arc<dyn PolicySource>, access: AccessLog) -> RunningProxy {
    let config = TransparentConfig {
        egress_listen: Some(SocketAddr::from(([0, 0, 0, 0], EGRESS_PROXY_PORT))),
        ingress_listen: None,
        connect_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(1),
        access_log: access,
        ..TransparentConfig::default()
    };
    let identities = Arc::new(Ipcache(HashMap::from([
        (IpAddr::V4(A_IP), ID_A),
        (IpAddr::V4(B_IP), ID_B),
    ])));
    RunningProxy::start(node, config, policies, identities)
}

/// A directory for the certificate and the server's log, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `openssl s_server -www` in B's namespace with a fresh self-signed certificate; its
/// handshake log (`-state`) goes to a file. Killed on drop.
struct TlsServer {
    child: Child,
    log: PathBuf,
}

impl TlsServer {
    fn start(pod: &TestPod, dir: &Path) -> Self {
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=api.example.com", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("run openssl (is it installed?)");
        assert!(made.success(), "openssl req: {made}");
        let log = dir.join("server.log");
        // `-state` writes to stderr.
        let file = std::fs::File::create(&log).expect("server log");
        let child = pod
            .netns
            .command("openssl")
            .args(["s_server", "-accept", &format!("0.0.0.0:{TLS_PORT}")])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .args(["-www", "-state", "-quiet"])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("server log"))
            .stderr(file)
            .spawn()
            .expect("start openssl s_server");
        let server = Self { child, log };
        let deadline = Instant::now() + WAIT;
        loop {
            let listening = pod
                .netns
                .command("ss")
                .args(["-Hltn", &format!("sport = :{TLS_PORT}")])
                .output()
                .expect("run ss");
            if !listening.stdout.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "s_server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// ClientHellos the server has read so far.
    fn hellos(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(HELLO_READ)
            .count()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` from `pod` to `url` with `name` resolved to B: (success, HTTP code, stderr).
fn curl(pod: &TestPod, name: &str, url: &str) -> (bool, String, String) {
    let output = pod
        .netns
        .command("curl")
        .args([
            "-sSk",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--resolve", &format!("{name}:{TLS_PORT}:{B_IP}"), url])
        .output()
        .expect("run curl (is it installed?)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

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

fn rule(pod: &TestPod, direction: DatapathDirection, verdict: PolicyVerdict) -> PolicyRule {
    let remote = match direction {
        DatapathDirection::Egress => ID_B,
        DatapathDirection::Ingress => ID_A,
    };
    PolicyRule::new(
        pod.endpoint_id,
        direction,
        remote,
        proto::TCP,
        PortMatch::Exact(TLS_PORT),
        verdict,
    )
    .with_cookie(9)
}

#[test]
fn egress_server_names_are_enforced_on_the_client_hello() {
    let mut node = TestNode::new();
    let a = node.add_pod("a", A_IP, ID_A, false, true);
    let b = node.add_pod("b", B_IP, ID_B, true, false);
    for r in [
        rule(
            &a,
            DatapathDirection::Egress,
            PolicyVerdict::Redirect(EGRESS_PROXY_PORT),
        ),
        rule(&b, DatapathDirection::Ingress, PolicyVerdict::Allow),
    ] {
        node.datapath().policy().insert(&r).expect("insert rule");
    }
    let dir = TempDir(std::env::temp_dir().join(unique_name("tls")));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let server = TlsServer::start(&b, &dir.0);
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(&a)).expect("install the policy");
    let (access, mut receiver) = AccessLog::channel(64);
    let _proxy = start_proxy(node.node_netns(), store, access);

    // Allowed: the TLS handshake completes with B's server and HTTPS works end to end.
    let url = |name: &str| format!("https://{name}:{TLS_PORT}/");
    let (ok, code, stderr) = curl(&a, "api.example.com", &url("api.example.com"));
    assert!(ok, "HTTPS to an allowed name: {stderr}");
    assert_eq!(code, "200");
    assert_eq!(server.hellos(), 1);

    // Denied: reset by the proxy, B never reads a ClientHello.
    let (ok, _, stderr) = curl(&a, "evil.example.com", &url("evil.example.com"));
    assert!(!ok, "a denied name must fail");
    assert!(
        stderr.contains("reset") || stderr.contains("SSL_ERROR_SYSCALL"),
        "{stderr}"
    );
    // Plain HTTP to the TLS port: reset too.
    let (ok, _, stderr) = curl(&a, "api.example.com", &format!("http://{B_IP}:{TLS_PORT}/"));
    assert!(!ok, "plain text on a TLS port must fail");
    assert!(stderr.contains("reset"), "{stderr}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.hellos(), 1, "nothing denied reached B");

    let records = wait_records(&mut receiver, 3);
    let summary: Vec<(RecordKind, String, Option<RuleRef>)> = records
        .iter()
        .map(|r| (r.kind, r.url.clone(), r.rule))
        .collect();
    assert_eq!(
        summary,
        [
            (
                RecordKind::Request,
                format!("tls://api.example.com:{TLS_PORT}"),
                Some(RuleRef::Rule(0))
            ),
            (
                RecordKind::Denied,
                format!("tls://evil.example.com:{TLS_PORT}"),
                Some(RuleRef::DefaultDeny)
            ),
            (
                RecordKind::Denied,
                format!("tls://{B_IP}:{TLS_PORT}"),
                Some(RuleRef::DefaultDeny)
            ),
        ]
    );
    for record in &records {
        assert_eq!(record.source.ip(), IpAddr::V4(A_IP), "{record}");
        assert_eq!(
            record.destination,
            SocketAddr::from((B_IP, TLS_PORT)),
            "{record}"
        );
        assert_eq!(
            (record.source_identity, record.destination_identity),
            (Some(ID_A), Some(ID_B)),
            "{record}"
        );
    }
}
