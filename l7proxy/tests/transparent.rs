//! Transparent mode without a datapath: the redirect handler serves connections accepted on
//! loopback with an original destination the test names (what a transparent listener reads
//! from the accepted socket), against a real upstream. Covers policy selection by direction,
//! endpoint address, port and remote identity; per-request policy on kept-alive connections;
//! identities in access records; `SO_MARK` on the pooled upstream sockets (read back with
//! getsockopt); upstream failures; the snapshot file; and the listeners' loop guard.
//!
//! Loopback addresses stand for pods: 127.0.0.2 is the client endpoint "A" (identity 1000),
//! 127.0.0.3 another client "C" (identity 3000), 127.0.0.1 the backend (identity 2000).
//! Needs CAP_NET_ADMIN for `SO_MARK` and `IP_TRANSPARENT` (the suite runs as root).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use common::{WAIT, read_to_close, send_h1, start_upstream};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use membrane_l7proxy::ACCESS_DENIED_BODY;
use membrane_l7proxy::access::{AccessLog, AccessRecord, RecordKind};
use membrane_l7proxy::policy::{HttpPolicy, RequestParts, RuleRef};
use membrane_l7proxy::redirect::store::{
    L7Protocol, PolicyDelta, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT,
    SnapshotEndpoint, SnapshotError, SnapshotHttpRule, SnapshotPeer, SnapshotPort, read_snapshot,
};
use membrane_l7proxy::redirect::{
    Direction, IdentitySource, PolicyQuery, PolicySource, RedirectHandler, TransparentConfig,
    TransparentProxy, upstream_mark,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const C: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const BACKEND: Ipv4Addr = Ipv4Addr::LOCALHOST;
const ID_A: u32 = 1000;
const ID_BACKEND: u32 = 2000;
const ID_C: u32 = 3000;
const ID_WORLD: u32 = 2;

/// The ipcache of these tests.
struct Identities(HashMap<IpAddr, u32>);

impl IdentitySource for Identities {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(ID_WORLD)
    }
}

fn identities() -> Arc<Identities> {
    Arc::new(Identities(HashMap::from([
        (IpAddr::V4(A), ID_A),
        (IpAddr::V4(BACKEND), ID_BACKEND),
        (IpAddr::V4(C), ID_C),
    ])))
}

fn http(method: &str, path: &str) -> SnapshotHttpRule {
    SnapshotHttpRule {
        method: Some(method.into()),
        path: Some(path.into()),
        ..SnapshotHttpRule::default()
    }
}

fn peer(remotes: &[u32], rules: Vec<SnapshotHttpRule>) -> SnapshotPeer {
    SnapshotPeer {
        remotes: if remotes.is_empty() {
            Remotes::Any
        } else {
            Remotes::Identities(remotes.iter().copied().collect())
        },
        http: rules,
        server_names: Vec::new(),
    }
}

fn port(direction: Direction, port: u16, peers: Vec<SnapshotPeer>) -> SnapshotPort {
    SnapshotPort {
        direction,
        port,
        end_port: 0,
        l7: L7Protocol::Http,
        peers,
    }
}

fn snapshot(revision: u64, endpoints: Vec<(u64, Ipv4Addr, Vec<SnapshotPort>)>) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision,
        endpoints: endpoints
            .into_iter()
            .map(|(id, ip, ports)| SnapshotEndpoint {
                id,
                ips: vec![IpAddr::V4(ip)],
                ports,
            })
            .collect(),
    }
}

/// A's egress policy toward the backend on `backend_port`: `GET /api/v1/.*` only.
fn a_egress_snapshot(backend_port: u16) -> PolicySnapshot {
    snapshot(
        1,
        vec![(
            7,
            A,
            vec![port(
                Direction::Egress,
                backend_port,
                vec![peer(&[ID_BACKEND], vec![http("GET", "/api/v1/.*")])],
            )],
        )],
    )
}

/// What `policy` answers for a request: `None` without a policy (deny), else allowed or not.
fn decide(policy: Option<Arc<HttpPolicy>>, method: &str, path: &str) -> Option<bool> {
    let policy = policy?;
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let uri = path.parse().expect("uri");
    let mut headers = http::HeaderMap::new();
    Some(
        policy
            .check(&mut RequestParts {
                method: &method,
                uri: &uri,
                headers: &mut headers,
            })
            .allowed,
    )
}

fn query(direction: Direction, endpoint: Ipv4Addr, port: u16, remote: u32) -> PolicyQuery {
    PolicyQuery {
        direction,
        endpoint_ip: IpAddr::V4(endpoint),
        port,
        remote_identity: remote,
    }
}

/// The redirect handler behind a plain loopback listener; every accepted connection is
/// served as if it had been redirected to `original_destination` in `direction`.
struct Harness {
    addr: SocketAddr,
    records: mpsc::Receiver<AccessRecord>,
    handler: Arc<RedirectHandler>,
    task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handler.stop();
        self.task.abort();
    }
}

impl Harness {
    async fn start(
        direction: Direction,
        original_destination: SocketAddr,
        policies: Arc<dyn PolicySource>,
    ) -> Result<Self> {
        let (access, records) = AccessLog::channel(256);
        let config = TransparentConfig {
            access_log: access,
            connect_timeout: Duration::from_millis(500),
            ..TransparentConfig::default()
        };
        let handler = Arc::new(RedirectHandler::new(&config, policies, identities()));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serving = handler.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serving.serve_connection(direction, stream, original_destination));
            }
        });
        Ok(Self {
            addr,
            records,
            handler,
            task,
        })
    }

    async fn record(&mut self) -> Result<AccessRecord> {
        tokio::time::timeout(WAIT, self.records.recv())
            .await
            .context("no access record")?
            .context("record channel closed")
    }
}

/// An HTTP/1.1 connection to `addr` from the loopback address `from`.
async fn client_from(
    from: Ipv4Addr,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    let stream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .context("connect timed out")??;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn request(method: Method, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "backend.test")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

#[test]
fn policy_selection_by_direction_endpoint_port_and_identity() {
    let store = PolicyStore::new();
    let rejected = store
        .install(snapshot(
            3,
            vec![
                (
                    7,
                    A,
                    vec![
                        port(
                            Direction::Egress,
                            8080,
                            vec![
                                peer(&[ID_BACKEND], vec![http("GET", "/api/.*")]),
                                peer(&[ID_BACKEND, ID_C], vec![http("POST", "/submit")]),
                                peer(&[], vec![http("GET", "/health")]),
                            ],
                        ),
                        SnapshotPort {
                            end_port: 9099,
                            ..port(Direction::Egress, 9000, vec![peer(&[], vec![])])
                        },
                        port(
                            Direction::Ingress,
                            8080,
                            vec![peer(&[ID_C], vec![http("GET", "/in")])],
                        ),
                    ],
                ),
                (8, C, vec![port(Direction::Egress, 8080, vec![])]),
            ],
        ))
        .expect("install");
    assert_eq!(rejected, []);
    assert_eq!(store.revision(), 3);
    let egress = |port, remote| store.http_policy(&query(Direction::Egress, A, port, remote));

    // The backend identity gets its two rules and the any-peer rule, OR'ed.
    assert_eq!(
        decide(egress(8080, ID_BACKEND), "GET", "/api/x"),
        Some(true)
    );
    assert_eq!(
        decide(egress(8080, ID_BACKEND), "POST", "/submit"),
        Some(true)
    );
    assert_eq!(
        decide(egress(8080, ID_BACKEND), "GET", "/health"),
        Some(true)
    );
    assert_eq!(
        decide(egress(8080, ID_BACKEND), "DELETE", "/api/x"),
        Some(false)
    );
    // C gets the shared POST rule and the any-peer rule, not the backend-only GET rule.
    assert_eq!(decide(egress(8080, ID_C), "POST", "/submit"), Some(true));
    assert_eq!(decide(egress(8080, ID_C), "GET", "/api/x"), Some(false));
    // An identity no rule names gets the any-peer rule only.
    assert_eq!(decide(egress(8080, 4242), "GET", "/health"), Some(true));
    assert_eq!(decide(egress(8080, 4242), "POST", "/submit"), Some(false));
    // A range with a wildcard peer: everything allowed, on every port of the range.
    assert_eq!(decide(egress(9000, 4242), "DELETE", "/x"), Some(true));
    assert_eq!(decide(egress(9099, ID_C), "PUT", "/y"), Some(true));
    // Outside every port: no policy, i.e. deny.
    assert!(egress(9100, ID_BACKEND).is_none());
    assert!(egress(80, ID_BACKEND).is_none());
    // Directions are separate: ingress on 8080 is C's GET /in only.
    let ingress = |remote| store.http_policy(&query(Direction::Ingress, A, 8080, remote));
    assert_eq!(decide(ingress(ID_C), "GET", "/in"), Some(true));
    assert_eq!(decide(ingress(ID_C), "GET", "/api/x"), Some(false));
    assert!(ingress(ID_BACKEND).is_none(), "no peer rule names it");
    // A port entry without peer rules allows nobody.
    assert!(
        store
            .http_policy(&query(Direction::Egress, C, 8080, ID_BACKEND))
            .is_none()
    );
    // Unknown endpoint: no policy.
    assert!(
        store
            .http_policy(&query(Direction::Egress, BACKEND, 8080, ID_A))
            .is_none()
    );
    // An IPv4-mapped IPv6 address is the IPv4 endpoint.
    let mapped = PolicyQuery {
        endpoint_ip: IpAddr::V6(A.to_ipv6_mapped()),
        ..query(Direction::Egress, A, 8080, ID_BACKEND)
    };
    assert_eq!(
        decide(store.http_policy(&mapped), "GET", "/api/x"),
        Some(true)
    );
}

#[test]
fn overlapping_port_ranges_combine_their_rules() {
    let store = PolicyStore::new();
    store
        .install(snapshot(
            1,
            vec![(
                7,
                A,
                vec![
                    SnapshotPort {
                        end_port: 8100,
                        ..port(
                            Direction::Egress,
                            8000,
                            vec![peer(&[], vec![http("GET", "/range")])],
                        )
                    },
                    port(
                        Direction::Egress,
                        8080,
                        vec![peer(&[ID_BACKEND], vec![http("GET", "/exact")])],
                    ),
                ],
            )],
        ))
        .expect("install");
    let policy = |port| store.http_policy(&query(Direction::Egress, A, port, ID_BACKEND));
    assert_eq!(decide(policy(8080), "GET", "/range"), Some(true));
    assert_eq!(decide(policy(8080), "GET", "/exact"), Some(true));
    assert_eq!(decide(policy(8079), "GET", "/range"), Some(true));
    assert_eq!(decide(policy(8079), "GET", "/exact"), Some(false));
    assert_eq!(decide(policy(8100), "GET", "/range"), Some(true));
    assert!(policy(8101).is_none());
}

#[test]
fn a_rule_that_does_not_compile_is_dropped_and_never_widens() {
    let store = PolicyStore::new();
    let bad = http("GET", "/(unclosed");
    let bad_action = SnapshotHttpRule {
        header_matches: vec![membrane_l7proxy::redirect::store::SnapshotHeaderMatch {
            name: "x-a".into(),
            value: "1".into(),
            mismatch: "SHOUT".into(),
        }],
        ..SnapshotHttpRule::default()
    };
    let rejected = store
        .install(snapshot(
            1,
            vec![(
                7,
                A,
                vec![port(
                    Direction::Egress,
                    8080,
                    vec![
                        // Only bad rules: this peer allows nothing (not everything).
                        peer(&[ID_C], vec![bad.clone(), bad_action]),
                        // One good, one bad: the good one applies.
                        peer(&[ID_BACKEND], vec![bad, http("GET", "/ok")]),
                    ],
                )],
            )],
        ))
        .expect("install");
    assert_eq!(rejected.len(), 3, "{rejected:#?}");
    assert_eq!((rejected[0].peer, rejected[0].rule), (0, 0));
    assert!(
        rejected[1].reason.contains("SHOUT"),
        "the reason names the value: {}",
        rejected[1]
    );
    assert_eq!((rejected[2].peer, rejected[2].rule), (1, 0));
    assert!(
        rejected[0]
            .to_string()
            .contains("endpoint 7 egress port 8080")
    );

    let policy = |remote| store.http_policy(&query(Direction::Egress, A, 8080, remote));
    assert!(
        policy(ID_C).is_none(),
        "a peer whose rules all failed denies"
    );
    assert_eq!(decide(policy(ID_BACKEND), "GET", "/ok"), Some(true));
    assert_eq!(decide(policy(ID_BACKEND), "GET", "/other"), Some(false));
}

#[test]
fn snapshot_survives_a_save_and_a_load() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("membrane-l7-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("policy.json");
    let written = PolicyStore::new();
    let mut original = a_egress_snapshot(8080);
    original.revision = 41;
    original.endpoints[0].ports.push(SnapshotPort {
        end_port: 9010,
        ..port(
            Direction::Ingress,
            9000,
            vec![peer(
                &[],
                vec![SnapshotHttpRule {
                    host: Some("api\\.test".into()),
                    headers: vec!["X-Team: blue".into()],
                    header_matches: vec![membrane_l7proxy::redirect::store::SnapshotHeaderMatch {
                        name: "x-env".into(),
                        value: "prod".into(),
                        mismatch: "LOG".into(),
                    }],
                    ..SnapshotHttpRule::default()
                }],
            )],
        )
    });
    written.install(original.clone())?;
    written.save_snapshot(&path)?;

    // A restarted proxy: a new store from the file alone.
    let restored = PolicyStore::new();
    assert_eq!(restored.load_snapshot(&path)?, []);
    assert_eq!(restored.snapshot(), original);
    assert_eq!(restored.revision(), 41);
    let policy = restored.http_policy(&query(Direction::Egress, A, 8080, ID_BACKEND));
    assert_eq!(decide(policy.clone(), "GET", "/api/v1/x"), Some(true));
    assert_eq!(decide(policy, "DELETE", "/api/v1/x"), Some(false));
    // The file is what the agent would send: readable JSON with Cilium's field names.
    let text = std::fs::read_to_string(&path)?;
    assert!(text.contains("\"headerMatches\""), "{text}");
    assert_eq!(read_snapshot(&path)?, original);

    // Saving again replaces the file whole (no temporary left behind).
    restored.install(snapshot(42, Vec::new()))?;
    restored.save_snapshot(&path)?;
    assert_eq!(read_snapshot(&path)?.endpoints, []);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name != "policy.json")
        .collect();
    assert_eq!(leftovers, Vec::<std::ffi::OsString>::new());

    // Errors name the file; a failed load keeps the current policy.
    let missing = dir.join("missing.json");
    let error = restored.load_snapshot(&missing).expect_err("missing file");
    assert!(matches!(error, SnapshotError::Read { .. }));
    assert!(error.to_string().contains("missing.json"), "{error}");
    std::fs::write(&missing, b"{\"format\": 1, \"endpoints\": [{\"id\": 1}]}")?;
    let error = restored.load_snapshot(&missing).expect_err("invalid file");
    assert!(matches!(error, SnapshotError::Parse { .. }), "{error}");
    assert!(error.to_string().contains("missing.json"), "{error}");
    std::fs::write(&missing, b"{\"format\": 2}")?;
    let error = restored.load_snapshot(&missing).expect_err("future format");
    assert!(
        matches!(error, SnapshotError::Format { found: 2, .. }),
        "{error}"
    );
    assert_eq!(restored.revision(), 42);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn incremental_updates_touch_one_endpoint() {
    let store = PolicyStore::new();
    store.install(a_egress_snapshot(8080)).expect("install");
    let c_policy = || store.http_policy(&query(Direction::Egress, C, 8080, ID_BACKEND));
    assert!(c_policy().is_none());
    let rejected = store.upsert_endpoint(
        2,
        SnapshotEndpoint {
            id: 8,
            ips: vec![IpAddr::V4(C)],
            ports: vec![port(Direction::Egress, 8080, vec![peer(&[], vec![])])],
        },
    );
    assert_eq!(rejected, []);
    assert_eq!(decide(c_policy(), "PUT", "/x"), Some(true));
    assert_eq!(store.snapshot().endpoints.len(), 2);
    assert!(store.remove_endpoint(3, 7));
    assert!(!store.remove_endpoint(3, 7));
    assert!(
        store
            .http_policy(&query(Direction::Egress, A, 8080, ID_BACKEND))
            .is_none()
    );
    assert_eq!(store.revision(), 3);
}

#[test]
fn deltas_apply_on_their_base_only_and_rebuild_the_same_policy() {
    let old = a_egress_snapshot(8080);
    let new = snapshot(
        5,
        vec![(
            8,
            C,
            vec![port(
                Direction::Egress,
                8080,
                vec![peer(&[], vec![http("PUT", "/x")])],
            )],
        )],
    );
    let delta = PolicyDelta::between(&old, &new);
    assert_eq!((delta.base, delta.revision), (1, 5));
    assert_eq!(delta.remove, [7]);
    assert_eq!(delta.upsert.iter().map(|e| e.id).collect::<Vec<_>>(), [8]);

    let store = PolicyStore::new();
    // On another revision than its base, a delta changes nothing.
    let error = store
        .apply_delta(delta.clone())
        .expect_err("base 1, store at 0");
    assert!(
        matches!(error, SnapshotError::Base { base: 1, held: 0 }),
        "{error}"
    );
    assert_eq!(store.revision(), 0);
    store.install(old.clone()).expect("install");
    assert_eq!(store.apply_delta(delta).expect("on its base"), []);
    assert_eq!(store.snapshot(), new, "the delta rebuilt the new snapshot");
    let c_policy = store.http_policy(&query(Direction::Egress, C, 8080, ID_BACKEND));
    assert_eq!(decide(c_policy.clone(), "PUT", "/x"), Some(true));
    assert_eq!(decide(c_policy, "GET", "/x"), Some(false));
    assert!(
        store
            .http_policy(&query(Direction::Egress, A, 8080, ID_BACKEND))
            .is_none(),
        "the removed endpoint has no policy (denied)"
    );
    // An unchanged endpoint is not part of a delta.
    let same = PolicyDelta::between(
        &new,
        &PolicySnapshot {
            revision: 6,
            ..new.clone()
        },
    );
    assert!(same.is_empty());
}

#[tokio::test]
async fn egress_requests_follow_the_endpoint_policy_and_carry_identities() -> Result<()> {
    let upstream = start_upstream().await?;
    let store = Arc::new(PolicyStore::new());
    store.install(a_egress_snapshot(upstream.addr.port()))?;
    let mut proxy = Harness::start(Direction::Egress, upstream.addr, store.clone()).await?;
    let mut client = client_from(A, proxy.addr).await?;

    let (status, _, body) = send_h1(&mut client, request(Method::GET, "/api/v1/x")).await?;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "ok GET /api/v1/x")
    );
    let (status, _, body) = send_h1(&mut client, request(Method::DELETE, "/api/v1/x")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, ACCESS_DENIED_BODY);
    assert_eq!(
        upstream.count(),
        1,
        "the denied request never reached the upstream"
    );

    let request_record = proxy.record().await?;
    assert_eq!(request_record.kind, RecordKind::Request);
    assert_eq!(request_record.source.ip(), IpAddr::V4(A));
    assert_eq!(request_record.destination, upstream.addr);
    assert_eq!(request_record.source_identity, Some(ID_A));
    assert_eq!(request_record.destination_identity, Some(ID_BACKEND));
    assert_eq!(request_record.rule, Some(RuleRef::Rule(0)));
    let response = proxy.record().await?;
    assert_eq!(
        (response.kind, response.status),
        (RecordKind::Response, Some(200))
    );
    let denied = proxy.record().await?;
    assert_eq!(
        (denied.kind, denied.status),
        (RecordKind::Denied, Some(403))
    );
    assert_eq!(denied.method, "DELETE");
    assert_eq!(denied.rule, Some(RuleRef::DefaultDeny));
    assert_eq!(
        (denied.source_identity, denied.destination_identity),
        (Some(ID_A), Some(ID_BACKEND))
    );
    let response = proxy.record().await?;
    assert_eq!(
        (response.kind, response.status),
        (RecordKind::Response, Some(403))
    );
    Ok(())
}

#[tokio::test]
async fn no_policy_denies_every_request() -> Result<()> {
    let upstream = start_upstream().await?;
    let mut proxy = Harness::start(
        Direction::Egress,
        upstream.addr,
        Arc::new(PolicyStore::new()),
    )
    .await?;
    let mut client = client_from(A, proxy.addr).await?;
    for method in [Method::GET, Method::POST] {
        let (status, _, body) = send_h1(&mut client, request(method, "/")).await?;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, ACCESS_DENIED_BODY)
        );
    }
    assert_eq!(upstream.count(), 0);
    let denied = proxy.record().await?;
    assert_eq!(denied.kind, RecordKind::Denied);
    assert_eq!(
        denied.error.as_deref(),
        Some("no HTTP policy for this flow")
    );
    Ok(())
}

#[tokio::test]
async fn a_new_snapshot_applies_to_the_next_request_on_the_same_connection() -> Result<()> {
    let upstream = start_upstream().await?;
    let store = Arc::new(PolicyStore::new());
    store.install(a_egress_snapshot(upstream.addr.port()))?;
    let proxy = Harness::start(Direction::Egress, upstream.addr, store.clone()).await?;
    let mut client = client_from(A, proxy.addr).await?;
    let (status, _, _) = send_h1(&mut client, request(Method::GET, "/api/v1/x")).await?;
    assert_eq!(status, StatusCode::OK);

    // The agent narrows the policy: same connection, next request denied.
    let mut narrowed = a_egress_snapshot(upstream.addr.port());
    narrowed.endpoints[0].ports[0].peers[0].http = vec![http("GET", "/api/v2/.*")];
    store.install(narrowed)?;
    let (status, _, _) = send_h1(&mut client, request(Method::GET, "/api/v1/x")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // And widens it to the L7 wildcard: allowed again, still the same connection.
    let mut widened = a_egress_snapshot(upstream.addr.port());
    widened.endpoints[0].ports[0].peers[0].http = Vec::new();
    store.install(widened)?;
    let (status, _, _) = send_h1(&mut client, request(Method::DELETE, "/api/v1/x")).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !client.is_closed(),
        "policy changes never dropped the connection"
    );
    assert_eq!(upstream.count(), 2);
    Ok(())
}

#[tokio::test]
async fn ingress_uses_the_destination_endpoint_and_the_source_identity() -> Result<()> {
    let upstream = start_upstream().await?;
    let store = Arc::new(PolicyStore::new());
    store.install(snapshot(
        1,
        vec![(
            9,
            BACKEND,
            vec![port(
                Direction::Ingress,
                upstream.addr.port(),
                vec![peer(&[ID_A], vec![http("GET", "/.*")])],
            )],
        )],
    ))?;
    let mut proxy = Harness::start(Direction::Ingress, upstream.addr, store).await?;
    let mut from_a = client_from(A, proxy.addr).await?;
    let (status, _, _) = send_h1(&mut from_a, request(Method::GET, "/in")).await?;
    assert_eq!(status, StatusCode::OK);
    let record = proxy.record().await?;
    assert_eq!(
        (record.source_identity, record.destination_identity),
        (Some(ID_A), Some(ID_BACKEND))
    );
    let mut from_c = client_from(C, proxy.addr).await?;
    let (status, _, body) = send_h1(&mut from_c, request(Method::GET, "/in")).await?;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, ACCESS_DENIED_BODY)
    );
    assert_eq!(upstream.count(), 1);
    Ok(())
}

/// The marks on this process's sockets connected to `peer`, read back with getsockopt.
fn marks_of_sockets_connected_to(peer: SocketAddr) -> Result<BTreeSet<u32>> {
    let mut marks = BTreeSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: `fd` was open when listed; if another thread closes (or reuses) it
        // meanwhile, the calls below fail or read another socket's addresses, which only
        // makes this test look at a socket it then ignores. Nothing here closes or changes
        // the descriptor.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let Ok(connected_to) = socket.peer_addr() else {
            continue;
        };
        if connected_to.as_socket() == Some(peer) {
            marks.insert(socket.mark()?);
        }
    }
    Ok(marks)
}

#[tokio::test]
async fn upstream_connections_carry_the_direction_and_source_identity_in_so_mark() -> Result<()> {
    let upstream = start_upstream().await?;
    let store = Arc::new(PolicyStore::new());
    let mut policy = a_egress_snapshot(upstream.addr.port());
    policy.endpoints.push(SnapshotEndpoint {
        id: 9,
        ips: vec![IpAddr::V4(BACKEND)],
        ports: vec![port(
            Direction::Ingress,
            upstream.addr.port(),
            vec![peer(&[], vec![])],
        )],
    });
    store.install(policy)?;
    let egress = Harness::start(Direction::Egress, upstream.addr, store.clone()).await?;
    let ingress = Harness::start(Direction::Ingress, upstream.addr, store).await?;

    let mut client = client_from(A, egress.addr).await?;
    for _ in 0..3 {
        let (status, _, _) = send_h1(&mut client, request(Method::GET, "/api/v1/x")).await?;
        assert_eq!(status, StatusCode::OK);
    }
    let mut client = client_from(C, ingress.addr).await?;
    let (status, _, _) = send_h1(&mut client, request(Method::GET, "/in")).await?;
    assert_eq!(status, StatusCode::OK);

    let expected = BTreeSet::from([
        upstream_mark(Direction::Egress, ID_A),
        upstream_mark(Direction::Ingress, ID_C),
    ]);
    assert_eq!(expected, BTreeSet::from([0x03E8_0B00, 0x0BB8_0A00]));
    // The pooled connections stay open after their requests, so they can be inspected.
    assert_eq!(marks_of_sockets_connected_to(upstream.addr)?, expected);
    Ok(())
}

#[tokio::test]
async fn upstream_failures_answer_503_with_a_record() -> Result<()> {
    // A port nothing listens on: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let store = Arc::new(PolicyStore::new());
    store.install(a_egress_snapshot(closed.port()))?;
    let mut proxy = Harness::start(Direction::Egress, closed, store).await?;
    let mut client = client_from(A, proxy.addr).await?;
    let (status, _, body) = send_h1(&mut client, request(Method::GET, "/api/v1/x")).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(proxy.record().await?.kind, RecordKind::Request);
    let response = proxy.record().await?;
    assert_eq!(response.status, Some(503));
    assert_eq!(response.source_identity, Some(ID_A));
    assert!(response.error.is_some());
    Ok(())
}

#[tokio::test]
async fn listeners_refuse_direct_connections_and_close_on_shutdown() -> Result<()> {
    let upstream = start_upstream().await?;
    let config = TransparentConfig {
        egress_listen: Some("127.0.0.1:0".parse()?),
        ingress_listen: Some("127.0.0.1:0".parse()?),
        ..TransparentConfig::default()
    };
    let store = Arc::new(PolicyStore::new());
    let proxy = TransparentProxy::bind(config, store, identities()).unwrap_or_else(|e| {
        panic!("transparent listeners need CAP_NET_ADMIN (run the suite as root): {e}")
    });
    let egress = proxy.local_addr(Direction::Egress).context("egress")?;
    let ingress = proxy.local_addr(Direction::Ingress).context("ingress")?;
    assert_ne!(egress, ingress);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));

    // Connecting to the proxy's own port is not a redirected flow: the original destination
    // would be the proxy itself. It is closed without a reply, and nothing loops.
    for addr in [egress, ingress] {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let reply = read_to_close(&mut stream).await?;
        assert_eq!(reply, "", "no reply on a direct connection");
    }
    assert_eq!(upstream.count(), 0);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .context("proxy did not stop")??;
    // The listeners are closed now.
    match TcpStream::connect(egress).await {
        Ok(_) => bail!("the egress listener is still open after shutdown"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused),
    }
    Ok(())
}
