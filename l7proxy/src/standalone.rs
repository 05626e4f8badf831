//! Standalone reverse-proxy mode: one listener, one upstream, one HTTP policy, optional
//! HTTP filters (run after the policy, see [`crate::filter`]).
//!
//! Owns the listener loop and graceful shutdown. Connections are served by the driver in
//! `proxy` (HTTP/1.1 and HTTP/2 cleartext with prior knowledge on the same port, the strict
//! HTTP/1 framing checks, the idle timeout); every request gets the one policy and the one
//! upstream pool of this listener (no `SO_MARK`, no identities).
//!
//! The binary side is meant to be a few lines:
//!
//! ```no_run
//! # async fn example(ctrl_c: impl std::future::Future) -> Result<(), Box<dyn std::error::Error>> {
//! use membrane_l7proxy::standalone::{self, StandaloneConfig};
//! let mut config = StandaloneConfig::new("127.0.0.1:8080".parse()?, "127.0.0.1:9090".parse()?);
//! config.policy = Some(membrane_l7proxy::policy_file::load_policy_file("policy.yaml")?);
//! // In a `#[tokio::main]` binary: `ctrl_c` is `tokio::signal::ctrl_c()`.
//! standalone::run(config, ctrl_c).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::AccessLog;
use crate::filter::HttpFilters;
use crate::policy::HttpPolicy;
use crate::proxy::{ProxyCore, Route, Router, UpstreamClient, serve_connection};
use crate::strict::HeaderLimits;
use crate::upstream::upstream_client;

/// Configuration of the standalone proxy. Build it with [`StandaloneConfig::new`] and
/// change the fields that differ from the defaults.
#[derive(Clone)]
pub struct StandaloneConfig {
    /// Address to listen on (port 0 picks a free port; see [`StandaloneProxy::local_addr`]).
    pub listen: SocketAddr,
    /// Where allowed requests go.
    pub upstream: SocketAddr,
    /// `None` allows every request (Cilium's L7 wildcard); requests still get parsed
    /// strictly and recorded.
    pub policy: Option<HttpPolicy>,
    /// Upstream TCP connect timeout; on expiry the client gets 504. Default 5 s.
    pub connect_timeout: Duration,
    /// A client connection with no bytes moving and no request in flight is closed after
    /// this; idle pooled upstream connections too. Default 60 s.
    pub idle_timeout: Duration,
    /// Request head limits (HTTP/1 raw bytes, HTTP/2 decoded header list).
    pub header_limits: HeaderLimits,
    /// Where access records go. Default: disabled.
    pub access_log: AccessLog,
    /// On shutdown, how long open connections may finish their requests. Default 5 s.
    pub shutdown_grace: Duration,
    /// HTTP filters every allowed request runs through (after the policy). Default none.
    /// The implementation may swap its chain at any time (hot reload); each request uses
    /// the chain it started with.
    pub filters: Option<Arc<dyn HttpFilters>>,
}

impl std::fmt::Debug for StandaloneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneConfig")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("policy", &self.policy)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("header_limits", &self.header_limits)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("filters", &self.filters.is_some())
            .finish_non_exhaustive()
    }
}

impl StandaloneConfig {
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            policy: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            header_limits: HeaderLimits::default(),
            access_log: AccessLog::disabled(),
            shutdown_grace: Duration::from_secs(5),
            filters: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound standalone proxy, not yet serving.
pub struct StandaloneProxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    core: Arc<ProxyCore>,
    router: Arc<StandaloneRouter>,
    config: StandaloneConfig,
}

/// Every request: the one policy, the one upstream pool.
struct StandaloneRouter {
    policy: Arc<HttpPolicy>,
    upstream: UpstreamClient,
    filters: Option<Arc<dyn HttpFilters>>,
}

impl Router for StandaloneRouter {
    fn route(&self) -> Route {
        Route {
            policy: Some(self.policy.clone()),
            source_identity: None,
            destination_identity: None,
            upstream: self.upstream.clone(),
            filters: self.filters.clone(),
        }
    }

    fn identities(&self) -> (Option<u32>, Option<u32>) {
        (None, None)
    }
}

/// Binds `config.listen` and serves until `shutdown` completes, then drains open
/// connections for up to `config.shutdown_grace`.
pub async fn run(config: StandaloneConfig, shutdown: impl Future) -> Result<(), StandaloneError> {
    StandaloneProxy::bind(config).await?.serve(shutdown).await;
    Ok(())
}

impl StandaloneProxy {
    pub async fn bind(mut config: StandaloneConfig) -> Result<Self, StandaloneError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StandaloneError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StandaloneError::Bind { addr, source })?;
        let core = Arc::new(ProxyCore::new(
            config.access_log.clone(),
            config.header_limits,
            config.idle_timeout,
            None,
        ));
        let router = Arc::new(StandaloneRouter {
            policy: Arc::new(config.policy.take().unwrap_or_default()),
            // One upstream: keeping every idle connection is what a reverse proxy wants.
            upstream: upstream_client(
                None,
                config.connect_timeout,
                config.idle_timeout,
                usize::MAX,
            ),
            filters: config.filters.clone(),
        });
        Ok(Self {
            listener,
            local_addr,
            core,
            router,
            config,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts and serves connections until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future) {
        let Self {
            listener,
            local_addr,
            core,
            router,
            config,
        } = self;
        tracing::info!(listen = %local_addr, upstream = %config.upstream, "standalone proxy serving");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(serve_connection(
                            core.clone(),
                            stream,
                            peer,
                            config.upstream,
                            router.clone(),
                            stop_rx.clone(),
                        ));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning; the listener
                        // stays open and the backlog holds new clients meanwhile.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                remaining = connections.len(),
                "shutdown grace over, closing connections"
            );
        }
        connections.shutdown().await;
    }
}
