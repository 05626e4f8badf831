//! TCP (stream) filters on the proxy's L4 relays: the trait a filter chain implements (the
//! Wasm host's stream context, adapted by the node proxy, so this crate carries no wasmtime
//! types), the filtered relay that calls it per chunk, and the standalone proxy's TCP mode.
//!
//! Chart, per connection (Envoy's network-filter order):
//!
//! ```text
//! accept (+ the TLS relay's policy check: the ClientHello already read)
//!   on_new_connection ──▶ Continue | Close (reset the client)
//!   connect upstream
//!   client bytes ──▶ on_downstream_data(data, eos) ──▶ Continue: write what it left upstream
//!                                                      Pause: hold (the filter sees them again
//!                                                             with the next bytes)
//!                                                      Close: close both sides
//!   server bytes ──▶ on_upstream_data(data, eos)   ──▶ the same, towards the client
//!   a side ends ──▶ on_downstream_close / on_upstream_close (remote: the peer closed it;
//!                   local: the proxy did, after a Close)
//! ```
//!
//! Each direction is its own task; the filter is behind a mutex only for its callbacks
//! (synchronous, bounded by the filter host's deadline), never across an await. The relay
//! ends when both directions ended, either failed, a filter closed, or nothing moved either
//! way for the idle timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::filter::PeerMeta;

/// Bytes read per chunk and direction (one callback per chunk).
const CHUNK: usize = 16 * 1024;

/// What the proxy knows about a connection, for the filters (`source.*`, `destination.*`,
/// `connection.requested_server_name`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionMeta {
    pub source: PeerMeta,
    pub destination: PeerMeta,
    /// The TLS relay's SNI, when the connection is TLS.
    pub server_name: Option<String>,
}

/// What a connection callback decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Action {
    Continue,
    /// Hold the bytes (they are presented again with the next ones).
    Pause,
    /// Close the connection (both sides).
    Close,
}

/// One connection through a filter chain.
pub trait ConnectionFilterStream: Send {
    fn on_new_connection(&mut self) -> L4Action;
    /// `data` in: the new client bytes; out: what to send upstream now.
    fn on_downstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> L4Action;
    /// `data` in: the new server bytes; out: what to send to the client now.
    fn on_upstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> L4Action;
    /// `local`: the proxy closed it (after a filter's Close), else the client did.
    fn on_downstream_close(&mut self, local: bool);
    fn on_upstream_close(&mut self, local: bool);
}

/// The TCP filter chains of a listener.
pub trait ConnectionFilters: Send + Sync {
    /// Starts one connection; `None` when no filter applies to it.
    fn start(&self, meta: ConnectionMeta) -> Option<Box<dyn ConnectionFilterStream>>;
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions ended (or one failed).
    Closed,
    /// A filter closed the connection.
    ClosedByFilter,
    /// Nothing moved either way for the idle timeout.
    IdledOut,
}

type Shared = Arc<Mutex<Box<dyn ConnectionFilterStream>>>;

fn lock(filter: &Shared) -> MutexGuard<'_, Box<dyn ConnectionFilterStream>> {
    filter.lock().unwrap_or_else(|e| e.into_inner())
}

/// Relays `client` ↔ `upstream` through `filter`. `client_first`: client bytes already read
/// (the TLS relay's ClientHello): they are the first downstream chunk. The caller has run
/// `on_new_connection`.
pub async fn relay_filtered(
    client: TcpStream,
    upstream: TcpStream,
    client_first: Vec<u8>,
    filter: Box<dyn ConnectionFilterStream>,
    idle: Duration,
) -> RelayEnd {
    let filter: Shared = Arc::new(Mutex::new(filter));
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` of the last read that returned bytes, either way.
    let last = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed_rx) = watch::channel(false);
    let closed_tx = Arc::new(closed_tx);
    let down = pump(Pump {
        read: client_read,
        write: upstream_write,
        filter: filter.clone(),
        downstream: true,
        first: client_first,
        start,
        last: last.clone(),
        idle,
        closed: closed_tx.clone(),
        closed_rx: closed_rx.clone(),
    });
    let up = pump(Pump {
        read: upstream_read,
        write: client_write,
        filter: filter.clone(),
        downstream: false,
        first: Vec::new(),
        start,
        last,
        idle,
        closed: closed_tx,
        closed_rx,
    });
    let (down, up) = tokio::join!(down, up);
    let end = match (down, up) {
        (PumpEnd::ClosedByFilter, _) | (_, PumpEnd::ClosedByFilter) => RelayEnd::ClosedByFilter,
        (PumpEnd::IdledOut, _) | (_, PumpEnd::IdledOut) => RelayEnd::IdledOut,
        _ => RelayEnd::Closed,
    };
    if end == RelayEnd::ClosedByFilter {
        let mut f = lock(&filter);
        f.on_downstream_close(true);
        f.on_upstream_close(true);
    }
    end
}

struct Pump {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    filter: Shared,
    /// Client → server (else server → client).
    downstream: bool,
    first: Vec<u8>,
    start: tokio::time::Instant,
    last: Arc<AtomicU64>,
    idle: Duration,
    /// Set when a filter closes or a side fails: the other direction stops too.
    closed: Arc<watch::Sender<bool>>,
    closed_rx: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    Ended,
    ClosedByFilter,
    IdledOut,
    Stopped,
}

impl Pump {
    /// Runs the filter on a chunk and writes what it let through. `None`: keep going.
    async fn pass(&mut self, mut data: Vec<u8>, end: bool) -> Option<PumpEnd> {
        let action = {
            let mut f = lock(&self.filter);
            if self.downstream {
                f.on_downstream_data(&mut data, end)
            } else {
                f.on_upstream_data(&mut data, end)
            }
        };
        match action {
            L4Action::Close => {
                let _ = self.closed.send(true);
                return Some(PumpEnd::ClosedByFilter);
            }
            L4Action::Pause => return None,
            L4Action::Continue => {}
        }
        if !data.is_empty() && self.write.write_all(&data).await.is_err() {
            let _ = self.closed.send(true);
            return Some(PumpEnd::Ended);
        }
        None
    }
}

async fn pump(mut p: Pump) -> PumpEnd {
    if !p.first.is_empty() {
        let first = std::mem::take(&mut p.first);
        p.last
            .store(p.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Some(end) = p.pass(first, false).await {
            return end;
        }
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let since = p.start + Duration::from_millis(p.last.load(Ordering::Relaxed));
        let deadline = since + p.idle;
        if tokio::time::Instant::now() >= deadline {
            let _ = p.closed.send(true);
            return PumpEnd::IdledOut;
        }
        let read = tokio::select! {
            r = p.read.read(&mut buf) => r,
            _ = tokio::time::sleep_until(deadline) => continue,
            _ = p.closed_rx.wait_for(|closed| *closed) => return PumpEnd::Stopped,
        };
        match read {
            Ok(0) => {
                // The peer finished sending: the filter sees the end, the other side gets
                // a FIN after what the filter released.
                if let Some(end) = p.pass(Vec::new(), true).await {
                    return end;
                }
                let _ = p.write.shutdown().await;
                let mut f = lock(&p.filter);
                if p.downstream {
                    f.on_downstream_close(false);
                } else {
                    f.on_upstream_close(false);
                }
                return PumpEnd::Ended;
            }
            Ok(n) => {
                p.last
                    .store(p.start.elapsed().as_millis() as u64, Ordering::Relaxed);
                if let Some(end) = p.pass(buf[..n].to_vec(), false).await {
                    return end;
                }
            }
            Err(_) => {
                let _ = p.closed.send(true);
                let mut f = lock(&p.filter);
                if p.downstream {
                    f.on_downstream_close(false);
                } else {
                    f.on_upstream_close(false);
                }
                return PumpEnd::Ended;
            }
        }
    }
}

/// Resets `stream` (`SO_LINGER` 0: the close sends RST), as a denied connection is answered.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

// ---- standalone TCP mode ----

/// The standalone proxy's TCP mode (`membrane proxy --tcp`): one listener, one upstream,
/// every connection relayed through the TCP filters (or as is without any).
#[derive(Clone)]
pub struct TcpProxyConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// Upstream connect timeout; on expiry the client is reset. Default 5 s.
    pub connect_timeout: Duration,
    /// A connection with no byte moving either way for this long is closed. Default 1 h
    /// (Envoy's TCP proxy default).
    pub idle_timeout: Duration,
    /// On shutdown, how long open connections may go on. Default 5 s.
    pub shutdown_grace: Duration,
    pub filters: Option<Arc<dyn ConnectionFilters>>,
}

impl TcpProxyConfig {
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(5),
            filters: None,
        }
    }
}

impl std::fmt::Debug for TcpProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxyConfig")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("filters", &self.filters.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TcpProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound TCP-mode proxy, not yet serving.
pub struct TcpProxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: TcpProxyConfig,
}

impl TcpProxy {
    pub async fn bind(config: TcpProxyConfig) -> Result<Self, TcpProxyError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TcpProxyError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TcpProxyError::Bind { addr, source })?;
        Ok(Self {
            listener,
            local_addr,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts and relays until `shutdown` completes, then lets open connections go on for
    /// up to `shutdown_grace`.
    pub async fn serve(self, shutdown: impl Future) {
        let Self {
            listener,
            local_addr,
            config,
        } = self;
        tracing::info!(listen = %local_addr, upstream = %config.upstream, "TCP proxy serving");
        let config = Arc::new(config);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(serve_tcp(config.clone(), stream, peer, local_addr));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(config.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.shutdown().await;
    }
}

async fn serve_tcp(
    config: Arc<TcpProxyConfig>,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let meta = ConnectionMeta {
        source: PeerMeta {
            address: Some(peer),
            ..PeerMeta::default()
        },
        destination: PeerMeta {
            address: Some(local),
            ..PeerMeta::default()
        },
        server_name: None,
    };
    let _ = client.set_nodelay(true);
    let mut filter = config.filters.as_ref().and_then(|f| f.start(meta));
    if let Some(f) = filter.as_mut()
        && f.on_new_connection() == L4Action::Close
    {
        reset(client);
        return;
    }
    let upstream = match crate::upstream::connect_upstream(
        config.upstream,
        None,
        config.connect_timeout,
    )
    .await
    {
        Ok(u) => u,
        Err(error) => {
            tracing::debug!(%error, upstream = %config.upstream, "TCP upstream connect failed");
            if let Some(f) = filter.as_mut() {
                f.on_upstream_close(false);
                f.on_downstream_close(true);
            }
            reset(client);
            return;
        }
    };
    match filter {
        Some(filter) => {
            relay_filtered(client, upstream, Vec::new(), filter, config.idle_timeout).await;
        }
        None => {
            let (mut client, mut upstream) = (client, upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    }
}
