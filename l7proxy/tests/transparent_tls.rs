//! Transparent mode on a `serverNames` (TLS) port, without a datapath: the redirect handler
//! serves loopback connections as if redirected to a raw TCP "server" the test runs, and the
//! client sends a real ClientHello (captured from `openssl s_client -servername
//! api.example.com`). Covers: an allowed name relayed byte for byte both ways on an upstream
//! socket marked with the source identity; a denied name, a plain-text client and a remote
//! without a rule reset before the server sees a connection; the L7 wildcard relaying
//! anything; an upstream failure; the access records; the snapshot's TLS fields.
//!
//! Loopback addresses stand for pods: 127.0.0.2 is the client endpoint "A" (identity
//! 1000), 127.0.0.1 the server (identity 2000); identity 3000 is another remote ("C"). Needs CAP_NET_ADMIN for `SO_MARK` (the suite runs as root).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use membrane_l7proxy::access::{AccessLog, AccessRecord, RecordKind};
use membrane_l7proxy::policy::RuleRef;
use membrane_l7proxy::redirect::store::{
    L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
    SnapshotPeer, SnapshotPort,
};
use membrane_l7proxy::redirect::{
    Direction, IdentitySource, PolicyQuery, PolicySource, RedirectHandler, TransparentConfig,
    upstream_mark,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::LOCALHOST;
const ID_A: u32 = 1000;
const ID_SERVER: u32 = 2000;
const ID_C: u32 = 3000;
const ID_WORLD: u32 = 2;
/// Bound of every wait for something that should happen (not a timing assertion).
const WAIT: Duration = Duration::from_secs(10);
/// How long the server is watched for a connection that must not come.
const QUIET: Duration = Duration::from_millis(300);

/// `openssl s_client -servername api.example.com` (OpenSSL 3.0): one record, 321 bytes.
const HELLO: &[u8] = include_bytes!("../src/redirect/testdata/openssl-3.0-client-hello.bin");

struct Identities(HashMap<IpAddr, u32>);

impl IdentitySource for Identities {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(ID_WORLD)
    }
}

fn identities() -> Arc<Identities> {
    Arc::new(Identities(HashMap::from([
        (IpAddr::V4(A), ID_A),
        (IpAddr::V4(SERVER), ID_SERVER),
    ])))
}

/// A's egress to the server's port: a TLS port whose server-identity peer allows `names`
/// (empty: the L7 wildcard).
fn tls_snapshot(port: u16, names: &[&str]) -> PolicySnapshot {
    PolicySnapshot {
        format: SNAPSHOT_FORMAT,
        revision: 1,
        endpoints: vec![SnapshotEndpoint {
            id: 7,
            ips: vec![IpAddr::V4(A)],
            ports: vec![SnapshotPort {
                direction: Direction::Egress,
                port,
                end_port: 0,
                l7: L7Protocol::Tls,
                peers: vec![SnapshotPeer {
                    remotes: Remotes::Identities([ID_SERVER].into()),
                    http: Vec::new(),
                    server_names: names.iter().map(|n| (*n).to_owned()).collect(),
                }],
            }],
        }],
    }
}

/// A raw TCP server: for each connection, reads `expect` bytes, remembers them, answers
/// `reply` and closes.
struct Server {
    addr: SocketAddr,
    received: mpsc::Receiver<Vec<u8>>,
    listener: Option<TcpListener>,
    reply: &'static [u8],
    expect: usize,
}

impl Server {
    async fn start(expect: usize, reply: &'static [u8]) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(SERVER), 0)).await?;
        Ok(Self {
            addr: listener.local_addr()?,
            received: mpsc::channel(1).1,
            listener: Some(listener),
            reply,
            expect,
        })
    }

    /// Starts serving; returns a task to abort at the end.
    fn serve(&mut self) -> JoinHandle<()> {
        let (sender, received) = mpsc::channel(16);
        self.received = received;
        let listener = self.listener.take().expect("serve once");
        let (reply, expect) = (self.reply, self.expect);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut bytes = vec![0; expect];
                if stream.read_exact(&mut bytes).await.is_err() {
                    continue;
                }
                let _ = stream.write_all(reply).await;
                let _ = sender.send(bytes).await;
            }
        })
    }

    async fn next(&mut self) -> Result<Vec<u8>> {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .context("the server received nothing")?
            .context("server gone")
    }

    /// Asserts that no connection reaches the (not yet serving) listener.
    async fn assert_untouched(&mut self) -> Result<()> {
        let listener = self.listener.as_ref().context("still listening")?;
        if let Ok(accepted) = tokio::time::timeout(QUIET, listener.accept()).await {
            bail!("the server got a connection: {accepted:?}");
        }
        Ok(())
    }
}

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
        original_destination: SocketAddr,
        policies: Arc<dyn PolicySource>,
    ) -> Result<Self> {
        Self::start_with(original_destination, policies, TransparentConfig::default()).await
    }

    async fn start_with(
        original_destination: SocketAddr,
        policies: Arc<dyn PolicySource>,
        config: TransparentConfig,
    ) -> Result<Self> {
        let (access, records) = AccessLog::channel(64);
        let config = TransparentConfig {
            access_log: access,
            connect_timeout: Duration::from_millis(500),
            ..config
        };
        let handler = Arc::new(RedirectHandler::new(&config, policies, identities()));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serving = handler.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serving.serve_connection(
                    Direction::Egress,
                    stream,
                    original_destination,
                ));
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

async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    Ok(tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .context("connect timed out")??)
}

/// Reads until the peer closes; a reset is an `Err` with `ConnectionReset`.
async fn read_all(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await {
        Ok(result) => result.map(|_| out),
        Err(_) => Err(std::io::Error::new(ErrorKind::TimedOut, "read timed out")),
    }
}

/// Sends `bytes` and expects the proxy to reset the connection without answering.
async fn expect_reset(from: Ipv4Addr, proxy: SocketAddr, bytes: &[u8]) -> Result<()> {
    let mut client = connect_from(from, proxy).await?;
    client.write_all(bytes).await?;
    match read_all(&mut client).await {
        Err(error) if error.kind() == ErrorKind::ConnectionReset => Ok(()),
        other => bail!("expected a reset, got {other:?}"),
    }
}

#[tokio::test]
async fn an_allowed_server_name_is_relayed_both_ways_with_the_identity_mark() -> Result<()> {
    let mut server = Server::start(HELLO.len() + 6, b"server-bytes").await?;
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(
        server.addr.port(),
        &["other.example.com", "API.example.com"],
    ))?;
    let mut proxy = Harness::start(server.addr, store).await?;
    let serving = server.serve();

    let mut client = connect_from(A, proxy.addr).await?;
    // The hello in two segments, then bytes that follow it.
    client.write_all(&HELLO[..7]).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.write_all(&HELLO[7..]).await?;
    client.write_all(b"after!").await?;
    let received = server.next().await?;
    assert_eq!(&received[..HELLO.len()], HELLO, "the ClientHello unchanged");
    assert_eq!(&received[HELLO.len()..], b"after!");
    assert_eq!(read_all(&mut client).await?, b"server-bytes");

    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Request);
    assert_eq!(
        record.url,
        format!("tls://api.example.com:{}", server.addr.port())
    );
    assert_eq!(record.rule, Some(RuleRef::Rule(1)));
    assert_eq!(record.method, "");
    assert_eq!(record.source.ip(), IpAddr::V4(A));
    assert_eq!(record.destination, server.addr);
    assert_eq!(
        (record.source_identity, record.destination_identity),
        (Some(ID_A), Some(ID_SERVER))
    );
    assert_eq!(record.error, None);
    serving.abort();
    Ok(())
}

/// A relayed connection lives while bytes move, and is closed on both sides once nothing
/// moved for the idle timeout.
#[tokio::test]
async fn a_relayed_connection_is_closed_after_idling() -> Result<()> {
    // An echo server that keeps each connection open until the peer closes it.
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(SERVER), 0)).await?;
    let server_addr = listener.local_addr()?;
    let (closed_tx, mut closed) = mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        if let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = closed_tx.send(()).await;
        }
    });
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(server_addr.port(), &["api.example.com"]))?;
    let idle = Duration::from_millis(400);
    let _proxy = Harness::start_with(
        server_addr,
        store,
        TransparentConfig {
            tls_idle_timeout: idle,
            ..TransparentConfig::default()
        },
    )
    .await?;
    let mut client = connect_from(A, _proxy.addr).await?;
    client.write_all(HELLO).await?;
    let mut echoed = vec![0u8; HELLO.len()];
    tokio::time::timeout(WAIT, client.read_exact(&mut echoed)).await??;
    // Traffic every 100 ms for three idle periods: never cut.
    for i in 0..12u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&[i]).await?;
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, client.read_exact(&mut byte)).await??;
        assert_eq!(
            byte,
            [i],
            "still relayed after {} ms",
            (u32::from(i) + 1) * 100
        );
    }
    // Then silence: the proxy closes both sides.
    let rest = read_all(&mut client).await;
    assert!(
        matches!(&rest, Ok(bytes) if bytes.is_empty())
            || matches!(&rest, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client side closed: {rest:?}"
    );
    tokio::time::timeout(WAIT, closed.recv())
        .await
        .context("the server side was never closed")?;
    server.abort();
    Ok(())
}

#[tokio::test]
async fn the_upstream_socket_carries_the_source_identity_mark() -> Result<()> {
    // A server that keeps the connection open, so the proxy's socket can be inspected.
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(SERVER), 0)).await?;
    let server_addr = listener.local_addr()?;
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(server_addr.port(), &["api.example.com"]))?;
    let _proxy = Harness::start(server_addr, store).await?;
    let mut client = connect_from(A, _proxy.addr).await?;
    client.write_all(HELLO).await?;
    let (mut accepted, proxy_side) = tokio::time::timeout(WAIT, listener.accept()).await??;
    let mut hello = vec![0; HELLO.len()];
    accepted.read_exact(&mut hello).await?;
    // The proxy's upstream socket is this process's socket bound to `proxy_side`.
    let mut marks = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for two getsockopt calls; if it was closed
        // or reused meanwhile, they fail or read another socket, which is then ignored.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        if socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(proxy_side)
            && socket.peer_addr().ok().and_then(|a| a.as_socket()) == Some(server_addr)
        {
            marks.push(socket.mark()?);
        }
    }
    assert_eq!(marks, [upstream_mark(Direction::Egress, ID_A)]);
    Ok(())
}

#[tokio::test]
async fn denied_names_plain_text_and_unknown_remotes_are_reset_before_the_server() -> Result<()> {
    let mut server = Server::start(1, b"").await?;
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(
        server.addr.port(),
        &["*.internal.example.com"],
    ))?;
    let mut proxy = Harness::start(server.addr, store.clone()).await?;

    // A name that is not allowed (the wildcard covers one label under internal.example.com).
    expect_reset(A, proxy.addr, HELLO).await?;
    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Denied);
    assert_eq!(
        record.url,
        format!("tls://api.example.com:{}", server.addr.port())
    );
    assert_eq!(record.rule, Some(RuleRef::DefaultDeny));
    assert_eq!(record.error.as_deref(), Some("server name not allowed"));
    assert_eq!(
        (record.source_identity, record.destination_identity),
        (Some(ID_A), Some(ID_SERVER))
    );

    // Not TLS at all: reset at the first byte.
    expect_reset(A, proxy.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Denied);
    assert_eq!(record.url, format!("tls://{}", server.addr));
    assert_eq!(record.error.as_deref(), Some("not a TLS connection"));

    // A client that closes halfway through its hello.
    let mut client = connect_from(A, proxy.addr).await?;
    client.write_all(&HELLO[..100]).await?;
    client.shutdown().await?;
    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Denied);
    assert_eq!(
        record.error.as_deref(),
        Some("closed before the ClientHello was complete")
    );

    // The port's only peer rule is for another remote (C): the server's identity has no
    // rule on this TLS port, so A's connection is reset, never treated as HTTP.
    let mut other_remote = tls_snapshot(server.addr.port(), &["api.example.com"]);
    other_remote.endpoints[0].ports[0].peers[0].remotes = Remotes::Identities([ID_C].into());
    store.install(other_remote)?;
    expect_reset(A, proxy.addr, HELLO).await?;
    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Denied);
    assert_eq!(record.error.as_deref(), Some("server name not allowed"));

    server.assert_untouched().await?;
    Ok(())
}

#[tokio::test]
async fn the_l7_wildcard_relays_any_connection_unread() -> Result<()> {
    let mut server = Server::start(5, b"pong").await?;
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(server.addr.port(), &[]))?;
    let mut proxy = Harness::start(server.addr, store).await?;
    let serving = server.serve();
    let mut client = connect_from(A, proxy.addr).await?;
    client.write_all(b"ping!").await?;
    assert_eq!(server.next().await?, b"ping!");
    assert_eq!(read_all(&mut client).await?, b"pong");
    let record = proxy.record().await?;
    assert_eq!(record.kind, RecordKind::Request);
    assert_eq!(record.rule, Some(RuleRef::AllowAll));
    assert_eq!(record.url, format!("tcp://{}", server.addr));
    serving.abort();
    Ok(())
}

#[tokio::test]
async fn an_upstream_failure_resets_the_client_with_a_record() -> Result<()> {
    // A port nothing listens on: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let store = Arc::new(PolicyStore::new());
    store.install(tls_snapshot(closed.port(), &["api.example.com"]))?;
    let mut proxy = Harness::start(closed, store).await?;
    expect_reset(A, proxy.addr, HELLO).await?;
    assert_eq!(proxy.record().await?.kind, RecordKind::Request);
    let failure = proxy.record().await?;
    assert_eq!(failure.kind, RecordKind::Response);
    assert!(
        failure
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("upstream connect failed")),
        "{failure:?}"
    );
    Ok(())
}

#[test]
fn snapshots_carry_tls_ports_and_older_ones_still_load() -> Result<()> {
    // Older snapshots have neither `l7` nor `server_names`: HTTP ports.
    let old = r#"{"format": 1, "revision": 3, "endpoints": [{"id": 7, "ips": ["127.0.0.2"],
        "ports": [{"direction": "egress", "port": 80, "peers": [{"remotes": "any", "http": []}]}]}]}"#;
    let snapshot: PolicySnapshot = serde_json::from_str(old)?;
    assert_eq!(snapshot.endpoints[0].ports[0].l7, L7Protocol::Http);
    let store = PolicyStore::new();
    store.install(snapshot)?;
    let query = |port| PolicyQuery {
        direction: Direction::Egress,
        endpoint_ip: IpAddr::V4(A),
        port,
        remote_identity: ID_SERVER,
    };
    assert!(store.http_policy(&query(80)).is_some());
    assert!(store.tls_policy(&query(80)).is_none(), "an HTTP port");

    let tls = tls_snapshot(443, &["api.example.com", "bad name"]);
    let json = serde_json::to_string(&tls)?;
    assert!(
        json.contains(r#""l7":"tls""#) && json.contains(r#""server_names":["#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<PolicySnapshot>(&json)?, tls);
    let rejected = store.install(tls)?;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0]
            .to_string()
            .contains("peers[0].server_names[1] dropped"),
        "{}",
        rejected[0]
    );
    let policy = store.tls_policy(&query(443)).context("a TLS port")?;
    assert_eq!(policy.check("API.example.com"), RuleRef::Rule(0));
    assert!(
        store.http_policy(&query(443)).is_none(),
        "never HTTP on a TLS port"
    );
    // An identity no peer names: a TLS port that allows it nothing.
    let other = store
        .tls_policy(&PolicyQuery {
            remote_identity: ID_C,
            ..query(443)
        })
        .context("still a TLS port")?;
    assert_eq!(other.check("api.example.com"), RuleRef::DefaultDeny);
    Ok(())
}
