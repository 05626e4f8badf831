//! Standalone reverse-proxy mode: one listener, one upstream, one HTTP policy.
//!
//! Owns the listener loop and the per-connection driver: HTTP/1.1 (keep-alive, pipelining,
//! streamed bodies) and HTTP/2 cleartext with prior knowledge on the same port (hyper-util's
//! auto builder detects the h2 preface), the strict HTTP/1 framing checks in front of hyper,
//! the idle timeout, and graceful shutdown. Requests are handled by `proxy::ProxyCore`.
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
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::{AccessLog, AccessRecord, RecordKind};
use crate::policy::HttpPolicy;
use crate::proxy::{ConnInfo, ProxyCore, idle_expired};
use crate::strict::{Activity, HeaderLimits, StrictIo};

/// Configuration of the standalone proxy. Build it with [`StandaloneConfig::new`] and
/// change the fields that differ from the defaults.
#[derive(Debug, Clone)]
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
    config: StandaloneConfig,
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
            config.policy.take().unwrap_or_default(),
            config.access_log.clone(),
            config.header_limits,
            config.connect_timeout,
            config.idle_timeout,
        ));
        Ok(Self {
            listener,
            local_addr,
            core,
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
            config,
        } = self;
        tracing::info!(listen = %local_addr, upstream = %config.upstream, "standalone proxy serving");
        let builder = Arc::new(http_builder(config.header_limits, config.idle_timeout));
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
                            builder.clone(),
                            stream,
                            peer,
                            config.upstream,
                            config.idle_timeout,
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

fn http_builder(limits: HeaderLimits, idle_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The raw-byte validator (strict.rs) enforces the real limits first; hyper's must not
        // be tighter or it would answer 431 where the configuration allows a head.
        .max_headers(limits.max_headers.max(100))
        .max_buf_size((limits.max_header_bytes + 16 * 1024).max(400 * 1024))
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

async fn serve_connection(
    core: Arc<ProxyCore>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Small requests and responses must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut io = StrictIo::new(stream, core.limits(), activity.clone());
    if core.access().is_enabled() {
        let access = core.access().clone();
        io = io.on_violation(Box::new(move |violation| {
            access.record(AccessRecord {
                kind: RecordKind::Denied,
                timestamp: std::time::SystemTime::now(),
                version: http::Version::HTTP_11,
                method: String::new(),
                url: String::new(),
                status: Some(400),
                latency: None,
                source,
                destination,
                rule: None,
                header_log: Vec::new(),
                error: Some(violation.to_string()),
            });
        }));
    }
    let info = Arc::new(ConnInfo {
        source,
        destination,
        inflight: inflight.clone(),
        activity: activity.clone(),
        idle_timeout,
        stop: stop.clone(),
    });
    let service = service_fn(move |request| core.clone().handle(info.clone(), request));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%source, %error, "client connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stopped| *stopped), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_expired(&activity, &inflight, idle_timeout) => {
                tracing::debug!(%source, "client connection idle timeout");
                return;
            }
        }
    }
}
