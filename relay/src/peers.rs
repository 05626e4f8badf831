//! The nodes: discovered through a Hubble Peer service (`peer.Peer/Notify`), one gRPC
//! connection per node, kept healthy by a task per node.
//!
//! - Discovery: one task follows `Notify` on the first Peer service that answers (the list
//!   of `--peer-service` addresses is tried in order, again after `--retry-timeout-ms`
//!   when the stream ends). PEER_ADDED/UPDATED (re)start a node's task, PEER_DELETED stops it.
//! - A node's task dials it (bounded by `--dial-timeout-ms`), checks it with ServerStatus,
//!   then asks again every `--health-interval-ms`; an unreachable or failing node is marked
//!   unavailable and dialled again after `--retry-timeout-ms`, or at once when a GetFlows
//!   stream reports it failed ([`Peers::report_failure`]).
//! - Every change of a node's state bumps a `watch` counter that following GetFlows streams
//!   wait on to attach nodes that came back.
//!
//! No lock is held across an await.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membrane_observer::peer::tls_server_name;
use membrane_observer::proto::observer::observer_client::ObserverClient;
use membrane_observer::proto::observer::{ServerStatusRequest, ServerStatusResponse};
use membrane_observer::proto::peer::peer_client::PeerClient;
use membrane_observer::proto::peer::{ChangeNotification, ChangeNotificationType, NotifyRequest};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::args::RelayArgs;

/// HTTP/2 keep-alive to the nodes: a node that vanishes mid-stream (killed, cable cut) is
/// noticed within interval + timeout even when no flow is due.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a node (or a Peer service) could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("address {address:?} is not host:port or unix:///path: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("TLS settings for {address}: {source}")]
    Tls {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect to {address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// How the relay dials: timeouts and, when configured, mutual TLS.
#[derive(Clone)]
pub struct Dialer {
    dial_timeout: Duration,
    tls: Option<TlsFiles>,
}

#[derive(Clone)]
struct TlsFiles {
    ca: Vec<Certificate>,
    identity: Option<Identity>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, PeersError> {
    std::fs::read(path).map_err(|source| PeersError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl Dialer {
    /// Reads the TLS files the arguments name (a missing file fails the start, naming it).
    pub fn from_args(args: &RelayArgs) -> Result<Self, PeersError> {
        let tls = if args.tls_hubble_server_ca_files.is_empty() {
            None
        } else {
            let ca = args
                .tls_hubble_server_ca_files
                .iter()
                .map(|p| read("the CA file", p).map(Certificate::from_pem))
                .collect::<Result<_, _>>()?;
            let identity = match (&args.tls_client_cert_file, &args.tls_client_key_file) {
                (Some(cert), Some(key)) => Some(Identity::from_pem(
                    read("the client certificate", cert)?,
                    read("the client key", key)?,
                )),
                _ => None,
            };
            Some(TlsFiles { ca, identity })
        };
        Ok(Self {
            dial_timeout: args.dial_timeout(),
            tls,
        })
    }

    pub fn dial_timeout(&self) -> Duration {
        self.dial_timeout
    }

    /// Whether nodes are dialled with TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `address` (`host:port`, or `unix:///path` without TLS); with TLS the
    /// node's certificate must carry `server_name`.
    pub async fn dial(
        &self,
        address: &str,
        server_name: Option<&str>,
    ) -> Result<Channel, DialError> {
        let timeout = self.dial_timeout;
        let connect = async {
            if let Some(path) = address.strip_prefix("unix://") {
                let path = PathBuf::from(path);
                return Endpoint::from_static("http://localhost")
                    .connect_timeout(timeout)
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(|source| DialError::Connect {
                        address: address.to_owned(),
                        source,
                    });
            }
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                .map_err(|source| DialError::Address {
                    address: address.to_owned(),
                    source,
                })?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            if let Some(tls) = &self.tls {
                let mut config = ClientTlsConfig::new().ca_certificates(tls.ca.clone());
                if let Some(identity) = &tls.identity {
                    config = config.identity(identity.clone());
                }
                if let Some(name) = server_name {
                    config = config.domain_name(name);
                }
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|source| DialError::Tls {
                        address: address.to_owned(),
                        source,
                    })?;
            }
            endpoint
                .connect()
                .await
                .map_err(|source| DialError::Connect {
                    address: address.to_owned(),
                    source,
                })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| DialError::Timeout {
                address: address.to_owned(),
                timeout,
            })?
    }
}

/// A node as the relay currently sees it.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    /// The name its certificate must carry (with TLS on).
    pub tls_server_name: String,
    /// `Some` while the node is connected and healthy.
    pub channel: Option<Channel>,
    /// Why it is not connected (`None` before the first attempt ends).
    pub error: Option<String>,
}

struct NodeEntry {
    view: NodeView,
    kick: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for NodeEntry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counters the relay exports.
#[derive(Default)]
pub struct RelayMetrics {
    pub flows_forwarded: AtomicU64,
    pub lost_events_forwarded: AtomicU64,
    pub node_stream_errors: AtomicU64,
    pub peer_service_errors: AtomicU64,
}

impl RelayMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

struct Inner {
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    changed: watch::Sender<u64>,
    dialer: Dialer,
    retry: Duration,
    health_interval: Duration,
    /// Whether the Peer service stream is up.
    discovering: watch::Sender<bool>,
}

/// The nodes the Peer service announced and their connections.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

impl Peers {
    /// Starts discovery through `args.peer_service` on the current runtime.
    pub fn start(
        args: &RelayArgs,
        dialer: Dialer,
        metrics: Arc<RelayMetrics>,
    ) -> (Peers, JoinHandle<()>) {
        let peers = Peers {
            inner: Arc::new(Inner {
                nodes: Mutex::new(BTreeMap::new()),
                changed: watch::Sender::new(0),
                dialer,
                retry: args.retry_timeout(),
                health_interval: args.health_interval(),
                discovering: watch::Sender::new(false),
            }),
        };
        let task = tokio::spawn(peers.clone().discover(args.peer_service.clone(), metrics));
        (peers, task)
    }

    /// Every known node, by name.
    pub fn snapshot(&self) -> Vec<NodeView> {
        self.inner
            .nodes
            .lock()
            .map(|nodes| nodes.values().map(|n| n.view.clone()).collect())
            .unwrap_or_default()
    }

    /// Bumped whenever a node is added, removed, connects or fails.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Whether the Peer service stream is currently up.
    pub fn discovering(&self) -> bool {
        *self.inner.discovering.borrow()
    }

    pub fn dialer(&self) -> &Dialer {
        &self.inner.dialer
    }

    /// A stream from `name` failed: check it now rather than at the next health interval.
    pub fn report_failure(&self, name: &str) {
        if let Ok(nodes) = self.inner.nodes.lock()
            && let Some(node) = nodes.get(name)
        {
            node.kick.notify_one();
        }
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn update(&self, name: &str, channel: Option<Channel>, error: Option<String>) {
        if let Ok(mut nodes) = self.inner.nodes.lock()
            && let Some(node) = nodes.get_mut(name)
        {
            node.view.channel = channel;
            node.view.error = error;
        }
        self.bump();
    }

    async fn discover(self, addresses: Vec<String>, metrics: Arc<RelayMetrics>) {
        let mut attempt = 0usize;
        loop {
            let address = &addresses[attempt % addresses.len()];
            attempt += 1;
            match self.follow_notify(address).await {
                Ok(()) => tracing::warn!(%address, "Peer service stream ended"),
                Err(e) => {
                    RelayMetrics::add(&metrics.peer_service_errors, 1);
                    tracing::warn!(%address, error = %e, "Peer service unavailable");
                }
            }
            self.inner.discovering.send_replace(false);
            // The next address at once; a full round waits for the retry timeout.
            if attempt.is_multiple_of(addresses.len()) {
                tokio::time::sleep(self.inner.retry).await;
            }
        }
    }

    async fn follow_notify(&self, address: &str) -> Result<(), String> {
        let channel = self
            .inner
            .dialer
            .clone()
            .without_tls()
            .dial(address, None)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = PeerClient::new(channel)
            .notify(NotifyRequest {})
            .await
            .map_err(|e| format!("Notify: {}", e.message()))?
            .into_inner();
        self.inner.discovering.send_replace(true);
        tracing::info!(%address, "following the Peer service");
        while let Some(change) = stream
            .message()
            .await
            .map_err(|e| format!("Notify stream: {}", e.message()))?
        {
            self.apply(change);
        }
        Ok(())
    }

    fn apply(&self, change: ChangeNotification) {
        let kind = ChangeNotificationType::try_from(change.r#type)
            .unwrap_or(ChangeNotificationType::Unknown);
        match kind {
            ChangeNotificationType::PeerAdded | ChangeNotificationType::PeerUpdated => {
                let server_name = change
                    .tls
                    .as_ref()
                    .map(|t| t.server_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| {
                        let (cluster, node) =
                            change.name.split_once('/').unwrap_or(("", &change.name));
                        tls_server_name(cluster, node)
                    });
                let unchanged = self.inner.nodes.lock().is_ok_and(|nodes| {
                    nodes.get(&change.name).is_some_and(|n| {
                        n.view.address == change.address && n.view.tls_server_name == server_name
                    })
                });
                if unchanged {
                    return;
                }
                tracing::info!(node = %change.name, address = %change.address, "node announced");
                let kick = Arc::new(Notify::new());
                let view = NodeView {
                    name: change.name.clone(),
                    address: change.address,
                    tls_server_name: server_name,
                    channel: None,
                    error: None,
                };
                let task = tokio::spawn(self.clone().keep_connected(view.clone(), kick.clone()));
                if let Ok(mut nodes) = self.inner.nodes.lock() {
                    // Replacing an entry drops it, which stops its task.
                    nodes.insert(change.name, NodeEntry { view, kick, task });
                }
                self.bump();
            }
            ChangeNotificationType::PeerDeleted => {
                tracing::info!(node = %change.name, "node left");
                if let Ok(mut nodes) = self.inner.nodes.lock() {
                    nodes.remove(&change.name);
                }
                self.bump();
            }
            ChangeNotificationType::Unknown => {
                tracing::warn!(node = %change.name, "Peer service sent a change of unknown type");
            }
        }
    }

    async fn status(&self, channel: Channel) -> Result<ServerStatusResponse, String> {
        let mut client = ObserverClient::new(channel);
        let call = client.server_status(ServerStatusRequest {});
        match tokio::time::timeout(self.inner.dialer.dial_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(format!("ServerStatus: {}", status.message())),
            Err(_) => Err(format!(
                "ServerStatus: no answer within {:?}",
                self.inner.dialer.dial_timeout
            )),
        }
    }

    /// One node's connection: dial, check, re-check; on failure wait and dial again.
    async fn keep_connected(self, view: NodeView, kick: Arc<Notify>) {
        loop {
            let dialled = self
                .inner
                .dialer
                .dial(&view.address, Some(&view.tls_server_name))
                .await
                .map_err(|e| e.to_string());
            let checked = match dialled {
                Ok(channel) => self.status(channel.clone()).await.map(|_| channel),
                Err(e) => Err(e),
            };
            match checked {
                Ok(channel) => {
                    tracing::info!(node = %view.name, address = %view.address, "node connected");
                    self.update(&view.name, Some(channel.clone()), None);
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(self.inner.health_interval) => {}
                            () = kick.notified() => {}
                        }
                        if let Err(e) = self.status(channel.clone()).await {
                            tracing::warn!(node = %view.name, error = %e, "node unavailable");
                            self.update(&view.name, None, Some(e));
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %view.name, error = %e, "node unreachable");
                    self.update(&view.name, None, Some(e));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.inner.retry) => {}
                () = kick.notified() => {}
            }
        }
    }

    /// Status of every connected node, asked concurrently (each bounded by the dial
    /// timeout); a node that does not answer is reported with its error.
    pub async fn statuses(&self) -> Vec<(NodeView, Result<ServerStatusResponse, String>)> {
        let mut set = tokio::task::JoinSet::new();
        for view in self.snapshot() {
            let peers = self.clone();
            set.spawn(async move {
                let result = match &view.channel {
                    Some(channel) => peers.status(channel.clone()).await,
                    None => Err(view
                        .error
                        .clone()
                        .unwrap_or_else(|| "not connected yet".to_owned())),
                };
                (view, result)
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok(item) = joined {
                out.push(item);
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }
}

impl Dialer {
    /// The same timeouts without TLS: the Peer service is the agent's own socket or plain
    /// port (the relay's TLS is for the nodes' observers).
    fn without_tls(mut self) -> Self {
        self.tls = None;
        self
    }
}
