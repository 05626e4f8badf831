//! The proxy's upstream side: connections to the original destination (or a standalone
//! upstream, or a filter's callout target), with a connect timeout, `TCP_NODELAY` and the
//! `SO_MARK` that tells the datapath this is the proxy's own traffic, and the pooled hyper
//! client over them. Its own module because both the request path (`proxy`) and the filter
//! path (`filter_path`, callouts) use it, and neither should depend on the other for it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::proxy::UpstreamClient;

/// Opens upstream TCP connections for the pooled client: the destination is the request
/// URI's authority, always an IP literal and port (the proxy builds it from a socket
/// address, so no name is ever resolved), with a connect timeout, `TCP_NODELAY`, and an
/// optional `SO_MARK`.
///
/// The mark is how the datapath recognises the proxy's own traffic and learns the original
/// source identity (cilium-semantics.md §3.1): without it the upstream connection would be
/// judged as traffic from the node and could even be redirected back to the proxy.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamConnector {
    mark: Option<u32>,
    connect_timeout: Duration,
}

impl UpstreamConnector {
    pub(crate) fn new(mark: Option<u32>, connect_timeout: Duration) -> Self {
        Self {
            mark,
            connect_timeout,
        }
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mark, timeout) = (self.mark, self.connect_timeout);
        Box::pin(async move {
            let addr = uri
                .authority()
                .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("upstream URI {uri} does not name an IP address and port"),
                    )
                })?;
            connect_upstream(addr, mark, timeout)
                .await
                .map(TokioIo::new)
        })
    }
}

/// Connects to `addr` with `SO_MARK` = `mark` (when given; needs CAP_NET_ADMIN) within
/// `timeout`. A timeout is reported as [`io::ErrorKind::TimedOut`] (the client then gets 504).
pub(crate) async fn connect_upstream(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        SockRef::from(&socket).set_mark(mark).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("setting SO_MARK {mark:#010x} for {addr} (needs CAP_NET_ADMIN): {error}"),
            )
        })?;
    }
    // Small requests and responses must not wait for Nagle.
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {timeout:?}"),
        )),
    }
}

/// A pooled upstream client over [`UpstreamConnector`].
pub(crate) fn upstream_client(
    mark: Option<u32>,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        .pool_max_idle_per_host(pool_max_idle_per_host)
        // The request keeps the client's Host; we set it ourselves when it has none.
        .set_host(false)
        .build(UpstreamConnector::new(mark, connect_timeout))
}
