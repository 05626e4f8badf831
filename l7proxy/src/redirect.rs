//! Transparent mode: serves the TCP connections the datapath redirects to the proxy
//! (`bpf_sk_assign` onto an `IP_TRANSPARENT` listener, ARCHITECTURE.md "redirect") with
//! per-endpoint HTTP policy, and forwards allowed requests to the original destination on
//! upstream connections marked with the source identity.
//!
//! Owns, per accepted connection (cilium-semantics.md §3.3):
//! - the direction: which listener accepted it (egress and ingress have their own ports, as
//!   Cilium's listeners do; the datapath's redirect entry names the port);
//! - the original destination: the accepted socket's local address;
//! - per request, the identities ([`IdentitySource`]: the agent's ipcache) and the policy
//!   ([`PolicySource`], keyed by direction, the endpoint's address — the source for egress,
//!   the destination for ingress —, the destination port and the remote identity). Both are
//!   looked up for every request, so a new policy snapshot or a changed identity applies to
//!   the next request of a kept-alive connection without dropping it. No policy means every
//!   request is denied (403), never a bypass;
//! - the upstream: one hyper-util pool per (direction, source identity), keyed inside by
//!   destination, whose sockets carry `SO_MARK` = [`upstream_mark`] so the datapath knows
//!   the traffic is the proxy's and attributes it to the original source identity.
//!
//! Request handling itself (strict parsing, 403 `Access denied\r\n`, upstream failures as
//! 502/503/504, upgrades, access records) is the shared `proxy` module's. A connection to a
//! `serverNames` port is not HTTP: [`tls_sni`] checks its ClientHello and relays it.
//!
//! Must not depend on the datapath crate or aya: identities and policies come in through the
//! two traits (the agent implements them; tests use maps), the mark layout from
//! `membrane-common`'s kernel ABI (without its `user` feature). [`store`] holds the
//! [`PolicySource`] the agent feeds and its snapshot file.
//!
//! Needs CAP_NET_ADMIN (`IP_TRANSPARENT`, `SO_MARK`) and must run in the node's network
//! namespace (where the datapath's policy routing delivers redirected packets).

pub mod store;
pub mod tls_sni;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use membrane_common::mark;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::AccessLog;
use crate::policy::HttpPolicy;
use crate::proxy::{ProxyCore, Route, Router, UpstreamClient, serve_connection};
use crate::strict::HeaderLimits;
use crate::transparent::bind_transparent;
use crate::upstream::upstream_client;

/// Default port of the egress listener (flows leaving local endpoints).
pub const DEFAULT_EGRESS_PORT: u16 = 15001;
/// Default port of the ingress listener (flows entering local endpoints).
pub const DEFAULT_INGRESS_PORT: u16 = 15002;

/// Pools kept at most (one per direction and source identity in use); past this an arbitrary
/// pool is dropped (its idle connections close; requests using it finish).
const MAX_UPSTREAM_POOLS: usize = 4096;

/// Which side of a local endpoint a redirected flow is on (declared with the snapshots
/// that carry it).
pub use membrane_agent_api::snapshot::Direction;

/// The `SO_MARK` of upstream connections: "from the egress/ingress proxy" plus the source
/// identity in Cilium's layout (`membrane_common::mark::encode_identity`: the low 16 bits in
/// the upper half, bits 16..24 in the low byte; higher bits do not fit and are lost, as in
/// Cilium).
pub const fn upstream_mark(direction: Direction, source_identity: u32) -> u32 {
    let magic = match direction {
        Direction::Egress => mark::MAGIC_PROXY_EGRESS,
        Direction::Ingress => mark::MAGIC_PROXY_INGRESS,
    };
    mark::encode_identity(magic, source_identity)
}

/// The `SO_MARK` of the Wasm filters' callout connections (`proxy_http_call` to a
/// `WasmFilter`'s upstream): "from the egress proxy" with identity `reserved:host`.
///
/// A callout is the node's own request, not the client pod's: it is attributed to the host,
/// as the node's processes are (Cilium's Envoy connects to its own clusters from the host
/// too). The egress magic matters twice: the datapath never redirects a marked packet back to
/// the proxy (without a mark, a callout to a pod whose ingress has L7 rules on that port is
/// hairpinned back to the proxy's ingress listener and, in the lab, never completes:
/// `agent/tests/lab.rs` `wasm_filter_callouts_and_peer_properties_on_the_node`), and,
/// unlike the ingress magic, it does not skip the destination's ingress policy: a pod that
/// serves callouts must allow `reserved:host` on that port — which `allow-localhost` (on by
/// default) does. Destinations outside the node see the node's address, as for any node
/// traffic.
pub const CALLOUT_MARK: u32 = upstream_mark(Direction::Egress, membrane_common::identity::HOST);

/// Security identity of an address (the agent implements it over the ipcache: longest
/// prefix, unknown ⇒ world). Called for every request, on the request path: it must be fast
/// and must not block.
pub trait IdentitySource: Send + Sync {
    fn identity_of(&self, ip: IpAddr) -> u32;
}

/// What a [`PolicySource`] is asked for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyQuery {
    pub direction: Direction,
    /// The local endpoint's address: the source for egress, the destination for ingress.
    pub endpoint_ip: IpAddr,
    /// The original destination port.
    pub port: u16,
    /// The peer's identity: the destination's for egress, the source's for ingress.
    pub remote_identity: u32,
}

/// The HTTP policy of redirected flows ([`store::PolicyStore`] is the implementation the
/// agent feeds). Called for every request, on the request path: it must be fast and must not
/// block.
pub trait PolicySource: Send + Sync {
    /// `None`: no L7 policy covers this flow, so the request is denied (403).
    fn http_policy(&self, query: &PolicyQuery) -> Option<Arc<HttpPolicy>>;

    /// The filters that run on allowed requests of this flow (`WasmFilter` resources on a
    /// node). Default: none.
    fn http_filters(&self, _query: &PolicyQuery) -> Option<Arc<dyn crate::filter::HttpFilters>> {
        None
    }

    /// The TCP (stream) filters of a flow the proxy relays at L4 (the TLS relay): they see
    /// every byte both ways after the policy allowed the connection. Default: none.
    fn tcp_filters(
        &self,
        _query: &PolicyQuery,
    ) -> Option<Arc<dyn crate::tcp_filter::ConnectionFilters>> {
        None
    }

    /// The TLS server-name policy when the flow's port is a `serverNames` port (then the
    /// connection is never parsed as HTTP; a policy that allows nothing resets it), `None`
    /// when it is not (HTTP). Asked once per connection, before any byte is read. The default
    /// knows no TLS ports.
    fn tls_policy(&self, query: &PolicyQuery) -> Option<Arc<tls_sni::TlsPolicy>> {
        let _ = query;
        None
    }
}

/// Configuration of the transparent proxy. [`TransparentConfig::default`] gives the values
/// documented on each field.
#[derive(Debug, Clone)]
pub struct TransparentConfig {
    /// Egress listener; `None` for none. Default `0.0.0.0:15001`. The datapath looks the
    /// listener up at `127.0.0.1:<port>`, so bind `0.0.0.0` or `127.0.0.1`.
    pub egress_listen: Option<SocketAddr>,
    /// Ingress listener; `None` for none. Default `0.0.0.0:15002`.
    pub ingress_listen: Option<SocketAddr>,
    /// Upstream TCP connect timeout; on expiry the client gets 504. Default 5 s.
    pub connect_timeout: Duration,
    /// A client connection with no bytes moving and no request in flight is closed after
    /// this. Default 60 s.
    pub idle_timeout: Duration,
    /// Idle pooled upstream connections are closed after this. Default 30 s (Envoy's hour
    /// kept connections around long after their clients, cilium#24771).
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per (destination, source identity, direction).
    /// Default 16.
    pub upstream_max_idle_per_destination: usize,
    /// Request head limits (HTTP/1 raw bytes, HTTP/2 decoded header list).
    pub header_limits: HeaderLimits,
    /// Where access records go. Default: disabled.
    pub access_log: AccessLog,
    /// On shutdown, how long open connections may finish their requests. Default 5 s.
    pub shutdown_grace: Duration,
    /// A relayed TLS (`serverNames`) connection with no byte moving either way for this
    /// long is closed, both sides. Default 1 h (Envoy's TCP proxy default): TLS sessions
    /// may rightly idle, but not forever.
    pub tls_idle_timeout: Duration,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Self {
            egress_listen: Some(SocketAddr::new(any, DEFAULT_EGRESS_PORT)),
            ingress_listen: Some(SocketAddr::new(any, DEFAULT_INGRESS_PORT)),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(30),
            upstream_max_idle_per_destination: 16,
            header_limits: HeaderLimits::default(),
            access_log: AccessLog::disabled(),
            shutdown_grace: Duration::from_secs(5),
            tls_idle_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot open the {direction} transparent listener on {addr}: {source}")]
    Bind {
        direction: Direction,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves redirected connections, whoever accepted them: [`TransparentProxy`] hands in what
/// its listeners accept; tests (and other acceptors) can hand in connections whose original
/// destination they know.
pub struct RedirectHandler {
    core: Arc<ProxyCore>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

/// What every connection's router needs.
struct Shared {
    policies: Arc<dyn PolicySource>,
    identities: Arc<dyn IdentitySource>,
    pools: UpstreamPools,
    tls_idle_timeout: Duration,
}

impl RedirectHandler {
    pub fn new(
        config: &TransparentConfig,
        policies: Arc<dyn PolicySource>,
        identities: Arc<dyn IdentitySource>,
    ) -> Self {
        let core = Arc::new(ProxyCore::new(
            config.access_log.clone(),
            config.header_limits,
            config.idle_timeout,
            Some(CALLOUT_MARK),
        ));
        let pools = UpstreamPools {
            clients: Mutex::new(HashMap::new()),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.upstream_idle_timeout,
            max_idle_per_destination: config.upstream_max_idle_per_destination,
        };
        Self {
            core,
            shared: Arc::new(Shared {
                policies,
                identities,
                pools,
                tls_idle_timeout: config.tls_idle_timeout,
            }),
            stop: watch::channel(false).0,
        }
    }

    /// Serves one redirected connection until it closes, idles out, or finishes draining
    /// after [`RedirectHandler::stop`]. `original_destination` is where the client connected
    /// to (for an accepted transparent socket, its local address) and where allowed requests
    /// go.
    pub fn serve_connection(
        &self,
        direction: Direction,
        stream: TcpStream,
        original_destination: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        let source = stream
            .peer_addr()
            .map(canonical)
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let destination = canonical(original_destination);
        let router = Arc::new(ConnRouter {
            shared: self.shared.clone(),
            direction,
            source,
            destination,
        });
        let tls = router.tls_route(self.core.access());
        let (core, stop) = (self.core.clone(), self.stop.subscribe());
        async move {
            match tls {
                Some((connection, policy)) => connection.serve(stream, policy).await,
                None => serve_connection(core, stream, source, destination, router, stop).await,
            }
        }
    }

    /// Asks every connection to finish its in-flight requests and close.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// One connection's view: the direction and the two addresses are fixed, identities and
/// policy are looked up per request.
struct ConnRouter {
    shared: Arc<Shared>,
    direction: Direction,
    source: SocketAddr,
    destination: SocketAddr,
}

impl Router for ConnRouter {
    fn route(&self) -> Route {
        let (source_identity, destination_identity) = self.identity_pair();
        let (endpoint_ip, remote_identity) = match self.direction {
            Direction::Egress => (self.source.ip(), destination_identity),
            Direction::Ingress => (self.destination.ip(), source_identity),
        };
        let query = PolicyQuery {
            direction: self.direction,
            endpoint_ip,
            port: self.destination.port(),
            remote_identity,
        };
        let policy = self.shared.policies.http_policy(&query);
        let filters = self.shared.policies.http_filters(&query);
        Route {
            policy,
            source_identity: Some(source_identity),
            destination_identity: Some(destination_identity),
            upstream: self.shared.pools.client(self.direction, source_identity),
            filters,
        }
    }

    fn identities(&self) -> (Option<u32>, Option<u32>) {
        let (source, destination) = self.identity_pair();
        (Some(source), Some(destination))
    }
}

impl ConnRouter {
    fn identity_pair(&self) -> (u32, u32) {
        let identities = &self.shared.identities;
        (
            identities.identity_of(self.source.ip()),
            identities.identity_of(self.destination.ip()),
        )
    }
}

/// Upstream pools per (direction, source identity): the identity is in the socket mark, so
/// connections of different identities must never be shared.
struct UpstreamPools {
    clients: Mutex<HashMap<(Direction, u32), UpstreamClient>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_destination: usize,
}

impl UpstreamPools {
    fn client(&self, direction: Direction, source_identity: u32) -> UpstreamClient {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(&(direction, source_identity)) {
            return client.clone();
        }
        if clients.len() >= MAX_UPSTREAM_POOLS
            && let Some(victim) = clients.keys().next().copied()
        {
            clients.remove(&victim);
        }
        let client = upstream_client(
            Some(upstream_mark(direction, source_identity)),
            self.connect_timeout,
            self.idle_timeout,
            self.max_idle_per_destination,
        );
        clients.insert((direction, source_identity), client.clone());
        client
    }
}

/// IPv4 clients of a dual-stack listener show up as `::ffff:a.b.c.d`; identities, policies
/// and upstream connections use the plain IPv4 address.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The transparent listeners (egress and ingress) and the [`RedirectHandler`] behind them.
pub struct TransparentProxy {
    egress: Option<TcpListener>,
    ingress: Option<TcpListener>,
    handler: Arc<RedirectHandler>,
    shutdown_grace: Duration,
}

/// Binds the listeners of `config` and serves until `shutdown` completes, then drains open
/// connections for up to `config.shutdown_grace`.
pub async fn run(
    config: TransparentConfig,
    policies: Arc<dyn PolicySource>,
    identities: Arc<dyn IdentitySource>,
    shutdown: impl Future,
) -> Result<(), RedirectError> {
    TransparentProxy::bind(config, policies, identities)?
        .serve(shutdown)
        .await;
    Ok(())
}

impl TransparentProxy {
    /// Binds the configured listeners with `IP_TRANSPARENT` (needs CAP_NET_ADMIN, in the
    /// node's network namespace). Must be called inside a tokio runtime.
    pub fn bind(
        config: TransparentConfig,
        policies: Arc<dyn PolicySource>,
        identities: Arc<dyn IdentitySource>,
    ) -> Result<Self, RedirectError> {
        let bind = |direction, addr: Option<SocketAddr>| {
            addr.map(|addr| {
                bind_transparent(addr).map_err(|source| RedirectError::Bind {
                    direction,
                    addr,
                    source,
                })
            })
            .transpose()
        };
        let egress = bind(Direction::Egress, config.egress_listen)?;
        let ingress = bind(Direction::Ingress, config.ingress_listen)?;
        let handler = Arc::new(RedirectHandler::new(&config, policies, identities));
        Ok(Self {
            egress,
            ingress,
            handler,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The bound address of a direction's listener (useful with port 0).
    pub fn local_addr(&self, direction: Direction) -> Option<SocketAddr> {
        let listener = match direction {
            Direction::Egress => self.egress.as_ref(),
            Direction::Ingress => self.ingress.as_ref(),
        };
        listener.and_then(|listener| listener.local_addr().ok())
    }

    /// The handler, to serve connections accepted elsewhere.
    pub fn handler(&self) -> Arc<RedirectHandler> {
        self.handler.clone()
    }

    /// Accepts and serves connections until `shutdown` completes; then closes the listeners
    /// (from then on the datapath drops new redirected flows: no bypass) and lets open
    /// connections finish for up to the shutdown grace.
    pub async fn serve(self, shutdown: impl Future) {
        let Self {
            egress,
            ingress,
            handler,
            shutdown_grace,
        } = self;
        let listener_ports: Vec<u16> = [&egress, &ingress]
            .into_iter()
            .flatten()
            .filter_map(|listener| listener.local_addr().ok())
            .map(|addr| addr.port())
            .collect();
        tracing::info!(
            egress = ?egress.as_ref().and_then(|l| l.local_addr().ok()),
            ingress = ?ingress.as_ref().and_then(|l| l.local_addr().ok()),
            "transparent proxy serving"
        );
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (direction, accepted) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = accept(egress.as_ref()) => (Direction::Egress, accepted),
                accepted = accept(ingress.as_ref()) => (Direction::Ingress, accepted),
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning; the listeners stay
                    // open and their backlogs hold new clients meanwhile.
                    tracing::warn!(%error, %direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(original) = crate::transparent::original_destination(&stream) else {
                continue;
            };
            let original = canonical(original);
            if is_loop(original, &listener_ports) {
                // A client that connected to the proxy's own port (not a redirected flow):
                // forwarding would connect the proxy to itself, again and again.
                tracing::debug!(%original, %direction, "refusing a direct connection to the proxy");
                continue;
            }
            connections.spawn(handler.serve_connection(direction, stream, original));
        }
        drop(egress);
        drop(ingress);
        handler.stop();
        let drained = tokio::time::timeout(shutdown_grace, async {
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

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Whether a connection's "original destination" is the proxy itself: one of its listener
/// ports on an address of this host. Redirected flows go to other hosts (pods, the world),
/// so only a connection to a listener port needs the (cheap, syscall-only) local check.
fn is_loop(original: SocketAddr, listener_ports: &[u16]) -> bool {
    if !listener_ports.contains(&original.port()) {
        return false;
    }
    let ip = original.ip();
    ip.is_loopback() || ip.is_unspecified() || is_local_address(ip)
}

/// An address of this network namespace is one a plain (non-transparent) socket can bind.
fn is_local_address(ip: IpAddr) -> bool {
    let domain = match ip {
        IpAddr::V4(_) => socket2::Domain::IPV4,
        IpAddr::V6(_) => socket2::Domain::IPV6,
    };
    socket2::Socket::new(domain, socket2::Type::STREAM, None)
        .and_then(|socket| socket.bind(&SocketAddr::new(ip, 0).into()))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_carry_the_magic_and_the_identity() {
        assert_eq!(upstream_mark(Direction::Egress, 1000), 0x03E8_0B00);
        assert_eq!(upstream_mark(Direction::Ingress, 1000), 0x03E8_0A00);
        assert_eq!(CALLOUT_MARK, 0x0001_0B00, "egress magic, reserved:host");
        // Bits 16..24 of the identity go to the low byte.
        assert_eq!(upstream_mark(Direction::Egress, 0x12_3456), 0x3456_0B12);
        for identity in [1, 2, 1000, 0xFFFF, 0x10000, 0xFF_FFFF] {
            assert_eq!(
                mark::decode_identity(upstream_mark(Direction::Egress, identity)),
                identity
            );
        }
    }

    #[test]
    fn loops_are_connections_to_our_own_ports_on_local_addresses() {
        let ports = [15001, 15002];
        assert!(is_loop("127.0.0.1:15001".parse().expect("addr"), &ports));
        assert!(is_loop("127.0.0.53:15002".parse().expect("addr"), &ports));
        assert!(!is_loop("127.0.0.1:8080".parse().expect("addr"), &ports));
        // TEST-NET-3 is never an address of this host.
        assert!(!is_loop("203.0.113.7:15001".parse().expect("addr"), &ports));
    }

    /// Needs CAP_NET_ADMIN (the suite runs as root); fails loudly otherwise, never skips.
    #[tokio::test]
    async fn the_connector_marks_its_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mark = upstream_mark(Direction::Ingress, 4242);
        let stream = crate::upstream::connect_upstream(addr, Some(mark), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("SO_MARK needs CAP_NET_ADMIN (run as root): {e}"));
        assert_eq!(
            socket2::SockRef::from(&stream).mark().expect("SO_MARK"),
            mark
        );
        let unmarked = crate::upstream::connect_upstream(addr, None, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(
            socket2::SockRef::from(&unmarked).mark().expect("SO_MARK"),
            0
        );
    }
}
