//! TCP (stream) filters on the proxy's L4 relays: a filter written with the upstream
//! proxy-wasm SDK (`filters/tests/guests/tcp-rewrite-upstream`) reads and rewrites the bytes
//! of real connections both ways, on the standalone proxy's TCP mode and on the TLS relay of
//! the transparent mode (after the SNI policy allowed the connection), through the filter
//! host's stream context adapted to `membrane_l7proxy::tcp_filter` by the node proxy's
//! adapter (`membrane_node_proxy::wasm::start_connection`). The same through the node's
//! policy source and `WasmFilter` snapshots: `node-proxy/tests/grpc_tcp_filters.rs`.
//! Also: the filter closing a connection, and membrane's SDK example (`tcp-rewrite`).

#[path = "../../filters/tests/common/mod.rs"]
mod guests;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use membrane_filters::{
    FilterChain, FilterHost, FilterLog, FilterProtocol, FilterSpec, HostConfig,
};
use membrane_l7proxy::policy::HttpPolicy;
use membrane_l7proxy::redirect::store::{
    L7Protocol, PolicySnapshot, PolicyStore, Remotes, SNAPSHOT_FORMAT, SnapshotEndpoint,
    SnapshotPeer, SnapshotPort,
};
use membrane_l7proxy::redirect::tls_sni::TlsPolicy;
use membrane_l7proxy::redirect::{
    Direction, IdentitySource, PolicyQuery, PolicySource, RedirectHandler, TransparentConfig,
};
use membrane_l7proxy::tcp_filter::{
    ConnectionFilterStream, ConnectionFilters, ConnectionMeta, TcpProxy, TcpProxyConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Bound of every wait for something that should happen (not a timing assertion).
const WAIT: Duration = Duration::from_secs(10);

const HELLO: &[u8] =
    include_bytes!("../../l7proxy/src/redirect/testdata/openssl-3.0-client-hello.bin");

// ---- the node proxy's adapter (filter host ⇄ l7proxy's L4 trait) over one chain ----

struct WasmConnections {
    chain: FilterChain,
}

impl ConnectionFilters for WasmConnections {
    fn start(&self, meta: ConnectionMeta) -> Option<Box<dyn ConnectionFilterStream>> {
        membrane_node_proxy::wasm::start_connection(&self.chain, meta)
    }
}

// ---- fixtures ----

fn host_with_logs() -> (FilterHost, Arc<Mutex<Vec<FilterLog>>>) {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    let host = FilterHost::new(HostConfig {
        max_instances: 8,
        log_sink: Some(Arc::new(move |l: &FilterLog| {
            sink.lock().unwrap().push(l.clone())
        })),
        ..HostConfig::default()
    })
    .expect("filter host");
    (host, logs)
}

fn upstream_sdk_chain(host: &FilterHost) -> Result<FilterChain> {
    let wasm = guests::guest_at(
        "filters/tests/guests/tcp-rewrite-upstream",
        "tcp-rewrite-upstream",
    );
    let filter =
        host.load(FilterSpec::new("tcp-rewrite", wasm).with_protocol(FilterProtocol::Tcp))?;
    Ok(FilterChain::new(vec![filter]))
}

/// A line server: answers every line it receives with `got: <line>`, and reports the lines.
async fn line_server(bind: IpAddr) -> Result<(SocketAddr, tokio::sync::mpsc::Receiver<String>)> {
    let listener = TcpListener::bind(SocketAddr::new(bind, 0)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = tx.send(line.clone()).await;
                    if write
                        .write_all(format!("got: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
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

// ---- standalone TCP mode ----

#[tokio::test]
async fn upstream_sdk_tcp_filter_on_the_standalone_tcp_mode() -> Result<()> {
    let (server, mut lines) = line_server(IpAddr::V4(Ipv4Addr::LOCALHOST)).await?;
    let (host, logs) = host_with_logs();
    let mut config = TcpProxyConfig::new("127.0.0.1:0".parse()?, server);
    config.filters = Some(Arc::new(WasmConnections {
        chain: upstream_sdk_chain(&host)?,
    }));
    let proxy = TcpProxy::bind(config).await?;
    let addr = proxy.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.serve(async move {
        let _ = stop_rx.await;
    }));

    let mut client = TcpStream::connect(addr).await?;
    // A line split over two writes: the filter holds the first part (Pause) and rewrites
    // the whole line once it is complete.
    client.write_all(b"say pi").await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.write_all(b"ng twice: ping\n").await?;
    let seen = tokio::time::timeout(WAIT, lines.recv())
        .await?
        .context("server")?;
    assert_eq!(seen, "say PING twice: PING");
    assert_eq!(
        read_line(&mut client).await?,
        "[wasm] got: say PING twice: PING"
    );

    // The filter closes the connection on `quit`; the server never sees it.
    client.write_all(b"quit\n").await?;
    expect_closed(&mut client).await?;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), lines.recv())
            .await
            .is_err(),
        "the server must not get the quit line"
    );

    // A second connection is filtered on its own (a new stream context).
    let mut again = TcpStream::connect(addr).await?;
    again.write_all(b"ping\n").await?;
    assert_eq!(read_line(&mut again).await?, "[wasm] got: PING");
    drop(again);

    let messages: Vec<String> = {
        // Give the relay a moment to deliver the closes of the second connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        logs.lock()
            .unwrap()
            .iter()
            .map(|l| l.message.clone())
            .collect()
    };
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("new connection from 127.0.0.1:")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "downstream closed by remote"),
        "{messages:?}"
    );
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(WAIT, serving).await;
    Ok(())
}

#[tokio::test]
async fn membrane_sdk_tcp_filter_on_the_standalone_tcp_mode() -> Result<()> {
    let (server, mut lines) = line_server(IpAddr::V4(Ipv4Addr::LOCALHOST)).await?;
    let (host, _logs) = host_with_logs();
    let wasm = guests::guest_at("examples/filters/tcp-rewrite", "tcp-rewrite");
    let filter = host.load(
        FilterSpec::new("tcp-rewrite", wasm)
            .with_protocol(FilterProtocol::Tcp)
            .with_config("secret=[redacted]\nblock=shutdown\nprefix=> "),
    )?;
    let mut config = TcpProxyConfig::new("127.0.0.1:0".parse()?, server);
    config.filters = Some(Arc::new(WasmConnections {
        chain: FilterChain::new(vec![filter]),
    }));
    let proxy = TcpProxy::bind(config).await?;
    let addr = proxy.local_addr();
    tokio::spawn(proxy.serve(std::future::pending::<()>()));

    let mut client = TcpStream::connect(addr).await?;
    client.write_all(b"the secret is out\n").await?;
    let seen = tokio::time::timeout(WAIT, lines.recv())
        .await?
        .context("server")?;
    assert_eq!(seen, "the [redacted] is out");
    assert_eq!(
        read_line(&mut client).await?,
        "> got: the [redacted] is out"
    );
    client.write_all(b"shutdown\n").await?;
    expect_closed(&mut client).await?;
    Ok(())
}

// ---- the TLS relay ----

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ID_A: u32 = 1000;
const ID_SERVER: u32 = 2000;

struct Identities(HashMap<IpAddr, u32>);

impl IdentitySource for Identities {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).copied().unwrap_or(2)
    }
}

/// The node's policy store plus the TCP filters of the flow (what the node proxy's policy
/// source will return for a `WasmFilter` with `protocol: tcp`).
struct WithTcpFilters {
    store: PolicyStore,
    filters: Arc<dyn ConnectionFilters>,
}

impl PolicySource for WithTcpFilters {
    fn http_policy(&self, query: &PolicyQuery) -> Option<Arc<HttpPolicy>> {
        self.store.http_policy(query)
    }
    fn tls_policy(&self, query: &PolicyQuery) -> Option<Arc<TlsPolicy>> {
        self.store.tls_policy(query)
    }
    fn tcp_filters(&self, _query: &PolicyQuery) -> Option<Arc<dyn ConnectionFilters>> {
        Some(self.filters.clone())
    }
}

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

/// A raw server for the TLS port: reads the ClientHello, then answers each line.
async fn tls_server() -> Result<(SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut hello = vec![0u8; HELLO.len()];
            if stream.read_exact(&mut hello).await.is_err() {
                continue;
            }
            let _ = tx.send(hello).await;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line.clone().into_bytes()).await;
                let _ = write.write_all(format!("got: {line}\n").as_bytes()).await;
            }
        }
    });
    Ok((addr, rx))
}

#[tokio::test]
async fn upstream_sdk_tcp_filter_on_the_tls_relay() -> Result<()> {
    let (server, mut received) = tls_server().await?;
    let (host, logs) = host_with_logs();
    let store = PolicyStore::new();
    store.install(tls_snapshot(server.port(), &["api.example.com"]))?;
    let policies = Arc::new(WithTcpFilters {
        store,
        filters: Arc::new(WasmConnections {
            chain: upstream_sdk_chain(&host)?,
        }),
    });
    let identities = Arc::new(Identities(HashMap::from([
        (IpAddr::V4(A), ID_A),
        (IpAddr::V4(Ipv4Addr::LOCALHOST), ID_SERVER),
    ])));
    let config = TransparentConfig {
        connect_timeout: Duration::from_millis(500),
        ..TransparentConfig::default()
    };
    let handler = Arc::new(RedirectHandler::new(&config, policies, identities));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?;
    let serving = handler.clone();
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serving.serve_connection(Direction::Egress, stream, server));
        }
    });

    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(A), 0))?;
    let mut client = tokio::time::timeout(WAIT, socket.connect(proxy)).await??;
    // The ClientHello (read by the SNI check, then handed to the filter as the first client
    // bytes), then a line after it in the same flight.
    client.write_all(HELLO).await?;
    client.write_all(b"ping from a TLS client\n").await?;
    let hello = tokio::time::timeout(WAIT, received.recv())
        .await?
        .context("server")?;
    assert_eq!(hello, HELLO, "the ClientHello passes the filter unchanged");
    let line = tokio::time::timeout(WAIT, received.recv())
        .await?
        .context("server")?;
    assert_eq!(
        line, b"PING from a TLS client",
        "the filter rewrote the bytes"
    );
    assert_eq!(
        read_line(&mut client).await?,
        "[wasm] got: PING from a TLS client"
    );
    client.write_all(b"quit\n").await?;
    expect_closed(&mut client).await?;
    let messages: Vec<String> = logs
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.message.clone())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("new connection from 127.0.0.2:")),
        "source.address is the client's: {messages:?}"
    );
    handler.stop();
    accept.abort();
    Ok(())
}
