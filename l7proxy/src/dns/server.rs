//! The DNS proxy server: UDP and TCP listeners on one address, the per-query pipeline, and
//! the knobs and counters around it.
//!
//! Per query (cilium-semantics.md §3.5 `ServeDNS`):
//! 1. parse and check (see `wire`): no header or a response ⇒ dropped and counted;
//!    otherwise malformed ⇒ FORMERR (NOTIMP for other opcodes) with the client's ID;
//! 2. route: the [`UpstreamResolver`] names the server, the client's endpoint and the
//!    server's identity (static in tests; the accepted socket's local address in
//!    transparent mode); a failure ⇒ SERVFAIL;
//! 3. policy ([`DnsPolicy::check`]); deny ⇒ REFUSED (or NXDOMAIN, [`DenyResponse`]) with
//!    the client's ID and question;
//! 4. forward over the client's transport (see `upstream`), the query's bytes unchanged
//!    except the ID;
//! 5. learn: a NOERROR answer with addresses goes to the [`FqdnObserver`] and the answer
//!    waits for it up to the deadline (see `learn`);
//! 6. release: the client's ID restored, for UDP fitted to the client's size (TC set and
//!    trimmed if needed; an upstream TC answer passes unchanged so the client retries
//!    over TCP).
//!
//! Failure replies: processing errors (routing, upstream unreachable, unreadable upstream
//! answer, overload) ⇒ SERVFAIL. An upstream *timeout* ⇒ no reply over UDP — the client's
//! own retry is the cheapest recovery and is what Cilium does — but SERVFAIL over TCP,
//! where silence would hold the client's connection and pipelined queries hostage until
//! its own (usually longer) timeout.
//!
//! Bounds: concurrent UDP queries (`max_concurrent_queries`, overflow ⇒ SERVFAIL), TCP
//! clients (`max_tcp_clients`, overflow ⇒ connection closed), pipelined queries per TCP
//! client (reading pauses at the limit), idle TCP clients (`tcp_idle_timeout`), upstream
//! outstanding queries per server (overflow ⇒ SERVFAIL).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, ResponseCode};
use membrane_policy::Identity;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::frame::{FrameReader, write_frame};
use super::learn::{
    DynFqdnObserver, FqdnLearningConfig, FqdnObserver, LearnCounters, LearnOutcome, Learner,
    build_learning,
};
use super::origdst;
use super::policy::{DnsPolicy, DnsQueryScope, DnsRuleRef, DnsTransport};
use super::record::{DnsLog, DnsRecord, DnsRecordKind, DnsVerdict};
use super::upstream::{
    ForwardError, MAX_UDP_MESSAGE, UpstreamCounters, UpstreamPool, UpstreamSettings,
};
use super::wire::{
    AnswerDetails, ClientQuery, QueryRejection, answer_details, error_reply, fit_udp, parse_query,
    rejection_reply, set_id,
};

/// How a query reached the proxy; what an [`UpstreamResolver`] decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRequestInfo {
    pub client: SocketAddr,
    /// The address the query was sent to. In transparent mode this is the original
    /// destination (the pod's DNS server): the accepted socket's local address for TCP,
    /// `IP_ORIGDSTADDR` of each datagram for UDP. Otherwise the listener's address.
    pub local: SocketAddr,
    pub transport: DnsTransport,
}

/// Where a query goes and who asks, as decided per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRoute {
    /// The DNS server to forward to.
    pub upstream: SocketAddr,
    /// The client's endpoint; `None` lets only "any endpoint" rules apply.
    pub endpoint: Option<u64>,
    /// The server's security identity; rules restricted to server identities check it.
    pub server_identity: Identity,
    /// `SO_MARK` of the upstream socket (0 = none). On a node, the from-proxy magic plus
    /// the client's identity, so the datapath judges the forwarded query as the client's.
    pub mark: u32,
}

impl DnsRoute {
    /// To `upstream`, client unknown, server identity world (Cilium's default for an
    /// address missing from the ipcache).
    pub fn to(upstream: SocketAddr) -> Self {
        Self {
            upstream,
            endpoint: None,
            server_identity: Identity::WORLD,
            mark: 0,
        }
    }
}

/// Why no route was found; the client gets SERVFAIL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no DNS route for {transport} query from {client} to {local}: {reason}")]
pub struct RouteError {
    pub client: SocketAddr,
    pub local: SocketAddr,
    pub transport: DnsTransport,
    pub reason: String,
}

impl RouteError {
    pub fn new(request: &DnsRequestInfo, reason: impl fmt::Display) -> Self {
        Self {
            client: request.client,
            local: request.local,
            transport: request.transport,
            reason: reason.to_string(),
        }
    }
}

/// Decides, per request, the upstream server (and the client's endpoint). Called once per
/// query on the hot path: keep it a lookup, not I/O.
pub trait UpstreamResolver: Send + Sync + 'static {
    fn route(&self, request: &DnsRequestInfo) -> Result<DnsRoute, RouteError>;
}

/// Every query to one server (the standalone and test mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticUpstream(pub SocketAddr);

impl UpstreamResolver for StaticUpstream {
    fn route(&self, _request: &DnsRequestInfo) -> Result<DnsRoute, RouteError> {
        Ok(DnsRoute::to(self.0))
    }
}

impl<F> UpstreamResolver for F
where
    F: Fn(&DnsRequestInfo) -> Result<DnsRoute, RouteError> + Send + Sync + 'static,
{
    fn route(&self, request: &DnsRequestInfo) -> Result<DnsRoute, RouteError> {
        self(request)
    }
}

/// The reply to a query the policy denies (Cilium's `tofqdns-dns-reject-response-code`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DenyResponse {
    /// REFUSED (Cilium's default).
    #[default]
    Refused,
    /// NXDOMAIN (`nameError`): musl/Alpine stub resolvers stop walking the search list on
    /// REFUSED but continue on NXDOMAIN.
    NameError,
}

impl DenyResponse {
    fn rcode(self) -> ResponseCode {
        match self {
            Self::Refused => ResponseCode::Refused,
            Self::NameError => ResponseCode::NXDomain,
        }
    }
}

/// Configuration of the DNS proxy. Build with [`DnsProxyConfig::new`], then change the
/// fields that differ from the defaults.
pub struct DnsProxyConfig {
    /// UDP and TCP listen address (same port for both: clients retry truncated answers
    /// over TCP on the port they used). Port 0 picks a port free for both.
    pub listen: SocketAddr,
    /// The initial policy; replace it later with [`DnsProxyHandle::set_policy`].
    /// Default: empty (everything denied).
    pub policy: DnsPolicy,
    /// Decides the upstream per request.
    pub upstream: Arc<dyn UpstreamResolver>,
    /// Reply to denied queries. Default REFUSED.
    pub deny_response: DenyResponse,
    /// How long a forwarded query waits for its answer. Default 2 s.
    pub upstream_timeout: Duration,
    /// An upstream socket or connection without outstanding queries is closed after
    /// this. Default 10 s.
    pub upstream_idle_timeout: Duration,
    /// Outstanding queries per upstream channel. Default 4096.
    pub max_outstanding_per_upstream: usize,
    /// UDP queries in progress at once. Default 4096.
    pub max_concurrent_queries: usize,
    /// TCP client connections at once. Default 1024.
    pub max_tcp_clients: usize,
    /// Queries in progress per TCP client connection. Default 32.
    pub max_pipelined_per_tcp_client: usize,
    /// A TCP client connection without queries in progress is closed after this
    /// (RFC 7766 §6.2.3 suggests seconds). Default 10 s.
    pub tcp_idle_timeout: Duration,
    /// FQDN learning (min TTL, per-name cap, deadline).
    pub fqdn: FqdnLearningConfig,
    /// Where DNS records go. Default: disabled.
    pub records: DnsLog,
    /// On shutdown, how long queries in progress may finish. Default 3 s.
    pub shutdown_grace: Duration,
    /// Transparent mode (on a node, behind the datapath's redirect): the listeners get
    /// `IP_TRANSPARENT` (UDP also `IP_RECVORIGDSTADDR`), each query is routed by its
    /// original destination, and UDP replies are sent from that address, as the client
    /// expects. Default off.
    pub transparent: bool,
    observer: Option<Arc<dyn DynFqdnObserver>>,
}

impl fmt::Debug for DnsProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsProxyConfig")
            .field("listen", &self.listen)
            .field("policy", &self.policy)
            .field("deny_response", &self.deny_response)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("upstream_idle_timeout", &self.upstream_idle_timeout)
            .field(
                "max_outstanding_per_upstream",
                &self.max_outstanding_per_upstream,
            )
            .field("max_concurrent_queries", &self.max_concurrent_queries)
            .field("max_tcp_clients", &self.max_tcp_clients)
            .field(
                "max_pipelined_per_tcp_client",
                &self.max_pipelined_per_tcp_client,
            )
            .field("tcp_idle_timeout", &self.tcp_idle_timeout)
            .field("fqdn", &self.fqdn)
            .field("records", &self.records)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("transparent", &self.transparent)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl DnsProxyConfig {
    pub fn new(listen: SocketAddr, upstream: impl UpstreamResolver) -> Self {
        Self {
            listen,
            policy: DnsPolicy::new(),
            upstream: Arc::new(upstream),
            deny_response: DenyResponse::default(),
            upstream_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(10),
            max_outstanding_per_upstream: 4096,
            max_concurrent_queries: 4096,
            max_tcp_clients: 1024,
            max_pipelined_per_tcp_client: 32,
            tcp_idle_timeout: Duration::from_secs(10),
            fqdn: FqdnLearningConfig::default(),
            records: DnsLog::disabled(),
            shutdown_grace: Duration::from_secs(3),
            transparent: false,
            observer: None,
        }
    }

    /// Answers with addresses are held until `observer` has learned them (or the deadline
    /// passed). Without an observer, answers are released at once and nothing is learned.
    pub fn with_observer(mut self, observer: impl FqdnObserver) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }
}

/// Counters since start (a snapshot; see [`DnsProxyHandle::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsProxyStats {
    /// Messages received from clients (UDP datagrams and TCP frames).
    pub queries: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Dropped without a reply: shorter than a header, or a response.
    pub malformed_dropped: u64,
    /// Answered FORMERR or NOTIMP.
    pub malformed_answered: u64,
    /// SERVFAIL replies (processing errors, TCP upstream timeouts, overload).
    pub servfail: u64,
    /// Upstream timeouts (no reply over UDP, SERVFAIL over TCP).
    pub upstream_timeouts: u64,
    /// Other upstream failures: connect, send, closed, busy, unreadable answer.
    pub upstream_errors: u64,
    /// Upstream answers released to clients.
    pub responses: u64,
    /// Answers the proxy truncated (TC set) to fit a UDP client's size.
    pub truncated_for_client: u64,
    /// UDP queries refused with SERVFAIL over `max_concurrent_queries`.
    pub overloaded: u64,
    /// TCP connections closed at once over `max_tcp_clients`.
    pub tcp_clients_rejected: u64,
    /// FQDN observer calls, deadline overruns, failures, abandoned calls.
    pub observer_calls: u64,
    pub observer_overruns: u64,
    pub observer_errors: u64,
    pub observer_abandoned: u64,
    /// Addresses not learned because an answer had more than `max_ips_per_name`.
    pub ips_over_cap: u64,
    /// Upstream TCP connections and UDP sockets opened.
    pub upstream_tcp_connects: u64,
    pub upstream_udp_channels: u64,
    /// Upstream messages dropped: unknown ID (late or forged), or another question.
    pub unmatched_responses: u64,
    pub mismatched_responses: u64,
    /// DNS records dropped because the record channel was full.
    pub records_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    malformed_dropped: AtomicU64,
    malformed_answered: AtomicU64,
    servfail: AtomicU64,
    upstream_timeouts: AtomicU64,
    upstream_errors: AtomicU64,
    responses: AtomicU64,
    truncated_for_client: AtomicU64,
    overloaded: AtomicU64,
    tcp_clients_rejected: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsProxyError {
    #[error("DNS proxy: cannot listen on {addr} ({transport}): {source}")]
    Bind {
        addr: SocketAddr,
        transport: DnsTransport,
        #[source]
        source: io::Error,
    },
}

struct Shared {
    policy: RwLock<Arc<DnsPolicy>>,
    resolver: Arc<dyn UpstreamResolver>,
    pool: UpstreamPool,
    learner: Option<Learner>,
    records: DnsLog,
    deny_response: DenyResponse,
    upstream_timeout: Duration,
    tcp_idle_timeout: Duration,
    max_pipelined_per_tcp_client: usize,
    counters: Counters,
    upstream_counters: Arc<UpstreamCounters>,
    learn_counters: Arc<LearnCounters>,
    transparent: bool,
    reply_sockets: origdst::ReplySockets,
}

/// Controls a running proxy: swap the policy, read counters. Cheap to clone.
#[derive(Clone)]
pub struct DnsProxyHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for DnsProxyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsProxyHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl DnsProxyHandle {
    /// Replaces the policy atomically: queries decided after this see the new one.
    pub fn set_policy(&self, policy: DnsPolicy) {
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<DnsPolicy> {
        self.shared.policy()
    }

    pub fn stats(&self) -> DnsProxyStats {
        let c = &self.shared.counters;
        let u = &self.shared.upstream_counters;
        let l = &self.shared.learn_counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsProxyStats {
            queries: load(&c.queries),
            allowed: load(&c.allowed),
            denied: load(&c.denied),
            malformed_dropped: load(&c.malformed_dropped),
            malformed_answered: load(&c.malformed_answered),
            servfail: load(&c.servfail),
            upstream_timeouts: load(&c.upstream_timeouts),
            upstream_errors: load(&c.upstream_errors),
            responses: load(&c.responses),
            truncated_for_client: load(&c.truncated_for_client),
            overloaded: load(&c.overloaded),
            tcp_clients_rejected: load(&c.tcp_clients_rejected),
            observer_calls: load(&l.calls),
            observer_overruns: load(&l.overruns),
            observer_errors: load(&l.errors),
            observer_abandoned: load(&l.abandoned),
            ips_over_cap: load(&l.capped_ips),
            upstream_tcp_connects: load(&u.tcp_connects),
            upstream_udp_channels: load(&u.udp_channels),
            unmatched_responses: load(&u.unmatched_responses),
            mismatched_responses: load(&u.mismatched_responses),
            records_dropped: self.shared.records.dropped(),
        }
    }

    /// Upstream sockets/connections open right now.
    pub fn open_upstream_channels(&self) -> usize {
        self.shared.pool.open_channels()
    }

    /// Names whose FQDN lock is held or awaited right now (0 when idle: the lock map
    /// forgets unused names).
    pub fn fqdn_names_in_flight(&self) -> usize {
        self.shared
            .learner
            .as_ref()
            .map_or(0, Learner::names_in_flight)
    }
}

/// A bound DNS proxy, not yet serving.
pub struct DnsProxy {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    max_concurrent_queries: usize,
    max_tcp_clients: usize,
    shutdown_grace: Duration,
}

impl fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsProxy")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Attempts at finding a port free for both UDP and TCP when binding port 0.
const BIND_ATTEMPTS: usize = 16;

async fn bind_pair(
    listen: SocketAddr,
    transparent: bool,
) -> Result<(UdpSocket, TcpListener), DnsProxyError> {
    let udp_error = |addr, source| DnsProxyError::Bind {
        addr,
        transport: DnsTransport::Udp,
        source,
    };
    let tcp_error = |addr, source| DnsProxyError::Bind {
        addr,
        transport: DnsTransport::Tcp,
        source,
    };
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = if transparent {
            origdst::bind_transparent_udp(listen)
                .and_then(UdpSocket::from_std)
                .map_err(|e| udp_error(listen, e))?
        } else {
            UdpSocket::bind(listen)
                .await
                .map_err(|e| udp_error(listen, e))?
        };
        let addr = udp.local_addr().map_err(|e| udp_error(listen, e))?;
        let tcp = if transparent {
            crate::transparent::bind_transparent(addr)
        } else {
            TcpListener::bind(addr).await
        };
        match tcp {
            Ok(tcp) => return Ok((udp, tcp)),
            // The kernel picked a UDP port whose TCP twin is taken: try another.
            Err(e) if listen.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(tcp_error(addr, e));
            }
            Err(e) => return Err(tcp_error(addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        tcp_error(
            listen,
            io::Error::new(io::ErrorKind::AddrInUse, "no port free for UDP and TCP"),
        )
    }))
}

impl DnsProxy {
    /// Binds the UDP socket and TCP listener on one port.
    pub async fn bind(config: DnsProxyConfig) -> Result<Self, DnsProxyError> {
        let (udp, tcp) = bind_pair(config.listen, config.transparent).await?;
        Self::assemble(config, udp, tcp)
    }

    /// Serves on sockets bound elsewhere — inherited from a supervisor that keeps them open
    /// across proxy restarts, so queries queue instead of being lost while no proxy runs.
    /// Both must be bound to one port; `config.listen` is ignored. In transparent mode the
    /// sockets get `IP_TRANSPARENT` (and the UDP socket `IP_RECVORIGDSTADDR`) here if they
    /// lack it. Must be called inside a tokio runtime.
    pub fn from_std(
        config: DnsProxyConfig,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<Self, DnsProxyError> {
        let addr = udp.local_addr().unwrap_or(config.listen);
        let udp_error = |source| DnsProxyError::Bind {
            addr,
            transport: DnsTransport::Udp,
            source,
        };
        let tcp_error = |source| DnsProxyError::Bind {
            addr,
            transport: DnsTransport::Tcp,
            source,
        };
        if config.transparent {
            origdst::enable_orig_dst(&udp).map_err(udp_error)?;
            socket2::SockRef::from(&tcp)
                .set_ip_transparent_v4(true)
                .map_err(tcp_error)?;
        }
        udp.set_nonblocking(true).map_err(udp_error)?;
        tcp.set_nonblocking(true).map_err(tcp_error)?;
        let udp = UdpSocket::from_std(udp).map_err(udp_error)?;
        let tcp = TcpListener::from_std(tcp).map_err(tcp_error)?;
        Self::assemble(config, udp, tcp)
    }

    fn assemble(
        config: DnsProxyConfig,
        udp: UdpSocket,
        tcp: TcpListener,
    ) -> Result<Self, DnsProxyError> {
        let local_addr = tcp.local_addr().map_err(|source| DnsProxyError::Bind {
            addr: config.listen,
            transport: DnsTransport::Tcp,
            source,
        })?;
        let upstream_counters = Arc::new(UpstreamCounters::default());
        let learn_counters = Arc::new(LearnCounters::default());
        let shared = Arc::new(Shared {
            policy: RwLock::new(Arc::new(config.policy)),
            resolver: config.upstream,
            pool: UpstreamPool::new(
                UpstreamSettings {
                    idle_timeout: config.upstream_idle_timeout,
                    max_outstanding: config.max_outstanding_per_upstream,
                },
                upstream_counters.clone(),
            ),
            learner: config
                .observer
                .map(|o| Learner::new(o, config.fqdn, learn_counters.clone())),
            records: config.records,
            deny_response: config.deny_response,
            upstream_timeout: config.upstream_timeout,
            tcp_idle_timeout: config.tcp_idle_timeout,
            max_pipelined_per_tcp_client: config.max_pipelined_per_tcp_client.max(1),
            counters: Counters::default(),
            upstream_counters,
            learn_counters,
            transparent: config.transparent,
            reply_sockets: origdst::ReplySockets::default(),
        });
        Ok(Self {
            udp: Arc::new(udp),
            tcp,
            local_addr,
            shared,
            max_concurrent_queries: config.max_concurrent_queries.max(1),
            max_tcp_clients: config.max_tcp_clients.max(1),
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The bound address (UDP and TCP share the port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> DnsProxyHandle {
        DnsProxyHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops reading new queries and lets the ones
    /// in progress finish for up to `shutdown_grace`.
    pub async fn serve(self, shutdown: impl Future) {
        tracing::info!(listen = %self.local_addr, "DNS proxy serving");
        let (stop_tx, stop_rx) = watch::channel(false);
        let udp_loop = serve_udp(
            self.shared.clone(),
            self.udp,
            self.local_addr,
            Arc::new(Semaphore::new(self.max_concurrent_queries)),
            stop_rx.clone(),
        );
        let tcp_loop = serve_tcp(
            self.shared.clone(),
            self.tcp,
            Arc::new(Semaphore::new(self.max_tcp_clients)),
            stop_rx,
        );
        let run = async {
            tokio::join!(udp_loop, tcp_loop);
        };
        let mut run = std::pin::pin!(run);
        tokio::select! {
            () = &mut run => {}
            _ = shutdown => {
                let _ = stop_tx.send(true);
                if tokio::time::timeout(self.shutdown_grace, run).await.is_err() {
                    tracing::warn!(grace = ?self.shutdown_grace, "DNS proxy shutdown grace expired; dropping queries in progress");
                }
            }
        }
    }
}

/// Where the current query came from.
struct ClientCtx {
    client: SocketAddr,
    local: SocketAddr,
    transport: DnsTransport,
    received: Instant,
}

/// Accumulates one query's record fields.
struct RecordDraft<'a> {
    shared: &'a Shared,
    ctx: &'a ClientCtx,
    destination: SocketAddr,
    endpoint: Option<u64>,
    id: u16,
    qname: String,
    qtypes: Vec<String>,
    rule: Option<DnsRuleRef>,
}

impl RecordDraft<'_> {
    fn emit(
        &self,
        kind: DnsRecordKind,
        verdict: DnsVerdict,
        rcode: Option<ResponseCode>,
        answer: Option<&AnswerDetails>,
        truncated_by_proxy: bool,
        error: Option<String>,
    ) {
        if !self.shared.records.is_enabled() {
            return;
        }
        let answer = answer.cloned().unwrap_or_default();
        self.shared.records.record(DnsRecord {
            kind,
            verdict,
            timestamp: SystemTime::now(),
            transport: self.ctx.transport,
            source: self.ctx.client,
            destination: self.destination,
            endpoint: self.endpoint,
            id: self.id,
            qname: self.qname.clone(),
            qtypes: self.qtypes.clone(),
            rcode: rcode.map(u16::from),
            ips: answer.ips,
            ttl: answer.ttl,
            cnames: answer.cnames,
            rrtypes: answer.rrtypes,
            rule: self.rule,
            latency: (kind == DnsRecordKind::Response).then(|| self.ctx.received.elapsed()),
            truncated_by_proxy,
            error,
        });
    }
}

impl Shared {
    fn policy(&self) -> Arc<DnsPolicy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn servfail(&self, query: &ClientQuery) -> Option<Vec<u8>> {
        bump(&self.counters.servfail);
        match error_reply(query, ResponseCode::ServFail) {
            Ok(reply) => Some(reply),
            Err(error) => {
                tracing::warn!(%error, "cannot build SERVFAIL");
                None
            }
        }
    }

    /// The whole pipeline for one client message; `None` means no reply.
    async fn handle(&self, bytes: &[u8], ctx: &ClientCtx) -> Option<Vec<u8>> {
        bump(&self.counters.queries);
        let query = match parse_query(bytes) {
            Ok(query) => query,
            Err(rejection) => return self.reject(&rejection, ctx),
        };
        let mut draft = RecordDraft {
            shared: self,
            ctx,
            destination: ctx.local,
            endpoint: None,
            id: query.id(),
            qname: query.qname.clone(),
            qtypes: vec![query.qtype().to_string()],
            rule: None,
        };
        let info = DnsRequestInfo {
            client: ctx.client,
            local: ctx.local,
            transport: ctx.transport,
        };
        let route = match self.resolver.route(&info) {
            Ok(route) => route,
            Err(error) => {
                tracing::debug!(%error, "DNS query without a route");
                let reply = self.servfail(&query);
                draft.emit(
                    DnsRecordKind::Query,
                    DnsVerdict::Error,
                    Some(ResponseCode::ServFail),
                    None,
                    false,
                    Some(error.to_string()),
                );
                return reply;
            }
        };
        draft.destination = route.upstream;
        draft.endpoint = route.endpoint;
        let scope = DnsQueryScope {
            endpoint: route.endpoint,
            port: route.upstream.port(),
            transport: ctx.transport,
            server_identity: route.server_identity,
        };
        let Some(rule) = self.policy().check(&scope, &query.qname) else {
            bump(&self.counters.denied);
            let rcode = self.deny_response.rcode();
            draft.emit(
                DnsRecordKind::Query,
                DnsVerdict::Denied,
                Some(rcode),
                None,
                false,
                None,
            );
            return match error_reply(&query, rcode) {
                Ok(reply) => Some(reply),
                Err(error) => {
                    tracing::warn!(%error, "cannot build the deny reply");
                    self.servfail(&query)
                }
            };
        };
        bump(&self.counters.allowed);
        draft.rule = Some(rule);
        draft.emit(
            DnsRecordKind::Query,
            DnsVerdict::Forwarded,
            None,
            None,
            false,
            None,
        );
        self.forward(&query, bytes, &route, &draft).await
    }

    async fn forward(
        &self,
        query: &ClientQuery,
        bytes: &[u8],
        route: &DnsRoute,
        draft: &RecordDraft<'_>,
    ) -> Option<Vec<u8>> {
        let transport = draft.ctx.transport;
        let deadline = Instant::now() + self.upstream_timeout;
        let upstream_failure = |error: String| {
            bump(&self.counters.upstream_errors);
            let reply = self.servfail(query);
            draft.emit(
                DnsRecordKind::Response,
                DnsVerdict::Error,
                Some(ResponseCode::ServFail),
                None,
                false,
                Some(error),
            );
            reply
        };
        let mut answer = match self
            .pool
            .exchange(
                route.upstream,
                transport,
                route.mark,
                bytes,
                &query.question,
                deadline,
            )
            .await
        {
            Ok(answer) => answer,
            Err(error @ ForwardError::Timeout { .. }) => {
                bump(&self.counters.upstream_timeouts);
                tracing::debug!(%error, qname = %query.qname, %transport, "DNS upstream timeout");
                let reply = match transport {
                    // Silence: the client retries (Cilium's behaviour).
                    DnsTransport::Udp => None,
                    DnsTransport::Tcp => self.servfail(query),
                };
                draft.emit(
                    DnsRecordKind::Response,
                    DnsVerdict::Error,
                    reply.as_ref().map(|_| ResponseCode::ServFail),
                    None,
                    false,
                    Some(error.to_string()),
                );
                return reply;
            }
            Err(error) => {
                tracing::debug!(%error, qname = %query.qname, "DNS upstream failure");
                return upstream_failure(error.to_string());
            }
        };
        let mut response = match Message::from_vec(&answer) {
            Ok(response) => response,
            Err(error) => {
                return upstream_failure(format!(
                    "unreadable answer from {}: {error}",
                    route.upstream
                ));
            }
        };
        let details = answer_details(&response, &query.qname);
        let rcode = response.metadata.response_code;
        let mut note = None;
        if rcode == ResponseCode::NoError
            && !details.ips.is_empty()
            && let Some(learner) = &self.learner
        {
            let learning = build_learning(
                learner.config(),
                &self.learn_counters,
                &query.qname,
                &details.ips,
                details.ttl.unwrap_or(0),
                details.cnames.clone(),
                route.endpoint,
            );
            match learner.learn(learning).await {
                LearnOutcome::Done => {}
                LearnOutcome::Failed(error) => {
                    note = Some(format!("FQDN update failed: {error}"));
                }
                LearnOutcome::Overrun => {
                    note = Some("FQDN update not confirmed before the deadline".to_owned());
                }
            }
        }
        set_id(&mut answer, query.id());
        response.metadata.id = query.id();
        let mut truncated = false;
        if transport == DnsTransport::Udp && answer.len() > query.udp_limit {
            match fit_udp(&answer, &response, query.udp_limit) {
                Ok((fitted, was_truncated)) => {
                    let fitted = fitted.into_owned();
                    answer = fitted;
                    truncated = was_truncated;
                    if truncated {
                        bump(&self.counters.truncated_for_client);
                    }
                }
                Err(error) => return upstream_failure(error),
            }
        }
        bump(&self.counters.responses);
        draft.emit(
            DnsRecordKind::Response,
            DnsVerdict::Forwarded,
            Some(rcode),
            Some(&details),
            truncated,
            note,
        );
        Some(answer)
    }

    fn reject(&self, rejection: &QueryRejection, ctx: &ClientCtx) -> Option<Vec<u8>> {
        let reply = rejection_reply(rejection);
        let (id, rcode, qname, qtypes) = match rejection {
            QueryRejection::Drop { .. } => {
                bump(&self.counters.malformed_dropped);
                tracing::debug!(client = %ctx.client, %rejection, "DNS message dropped");
                (0, None, String::new(), Vec::new())
            }
            QueryRejection::Reply {
                id,
                rcode,
                question,
                ..
            } => {
                bump(&self.counters.malformed_answered);
                tracing::debug!(client = %ctx.client, %rejection, "malformed DNS query answered");
                let qname = question.as_ref().map_or_else(String::new, |q| {
                    membrane_policy::fqdn::normalize_name(&q.name().to_ascii())
                });
                let qtypes = question
                    .as_ref()
                    .map(|q| vec![q.query_type().to_string()])
                    .unwrap_or_default();
                (*id, reply.as_ref().map(|_| *rcode), qname, qtypes)
            }
        };
        RecordDraft {
            shared: self,
            ctx,
            destination: ctx.local,
            endpoint: None,
            id,
            qname,
            qtypes,
            rule: None,
        }
        .emit(
            DnsRecordKind::Query,
            DnsVerdict::Error,
            rcode,
            None,
            false,
            Some(rejection.to_string()),
        );
        reply
    }
}

/// Pause after a failed receive on the listening socket, so a persistent error cannot
/// spin a core.
const LISTEN_ERROR_BACKOFF: Duration = Duration::from_millis(10);

async fn serve_udp(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    // Queries in progress: on stop, reading ends but these are answered (bounded by the
    // serve grace), so a restarting proxy drops none it has read.
    let mut queries = JoinSet::new();
    loop {
        while queries.try_join_next().is_some() {}
        let received = tokio::select! {
            _ = stop.changed() => break,
            received = receive(&shared, &socket, &mut buf) => received,
        };
        let (len, client, to) = match received {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS proxy UDP receive error");
                tokio::time::sleep(LISTEN_ERROR_BACKOFF).await;
                continue;
            }
        };
        let bytes = buf[..len].to_vec();
        let ctx = ClientCtx {
            client,
            local: to.unwrap_or(local),
            transport: DnsTransport::Udp,
            received: Instant::now(),
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the limit: answer SERVFAIL right here (cheap, no upstream), so clients
            // back off instead of retrying into a queue.
            bump(&shared.counters.overloaded);
            if let Ok(query) = parse_query(&bytes)
                && let Some(reply) = shared.servfail(&query)
            {
                let _ = send_reply(&shared, &socket, &reply, &ctx).await;
            }
            continue;
        };
        let (shared, socket) = (shared.clone(), socket.clone());
        queries.spawn(async move {
            let _permit = permit;
            if let Some(reply) = shared.handle(&bytes, &ctx).await
                && let Err(error) = send_reply(&shared, &socket, &reply, &ctx).await
            {
                tracing::debug!(%error, client = %ctx.client, "DNS reply not sent");
            }
        });
    }
    while queries.join_next().await.is_some() {}
}

/// One datagram: length, sender, and (transparent mode) its original destination.
async fn receive(
    shared: &Shared,
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    if shared.transparent {
        origdst::recv_with_orig_dst(socket, buf).await
    } else {
        let (len, client) = socket.recv_from(buf).await?;
        Ok((len, client, None))
    }
}

/// Sends a UDP reply: from the listener, or in transparent mode from the address the
/// client sent its query to.
async fn send_reply(
    shared: &Shared,
    listener: &UdpSocket,
    reply: &[u8],
    ctx: &ClientCtx,
) -> io::Result<usize> {
    if shared.transparent && Some(ctx.local) != listener.local_addr().ok() {
        let socket = shared.reply_sockets.get(ctx.local)?;
        socket.send_to(reply, ctx.client).await
    } else {
        listener.send_to(reply, ctx.client).await
    }
}

async fn serve_tcp(
    shared: Arc<Shared>,
    listener: TcpListener,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut clients = JoinSet::new();
    loop {
        // Reap finished connections so the set holds live ones only.
        while clients.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on accept.
                tracing::warn!(%error, "DNS proxy TCP accept error");
                tokio::time::sleep(LISTEN_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            bump(&shared.counters.tcp_clients_rejected);
            drop(stream);
            continue;
        };
        clients.spawn(serve_tcp_client(
            shared.clone(),
            stream,
            client,
            stop.clone(),
            permit,
        ));
    }
    // Connections finish their queries in progress (bounded by the serve grace period).
    while clients.join_next().await.is_some() {}
}

async fn serve_tcp_client(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::debug!(%error, %client, "DNS TCP client without a local address");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(write));
    let mut frames = FrameReader::new(read);
    let pipeline = Arc::new(Semaphore::new(shared.max_pipelined_per_tcp_client));
    let idle = shared.tcp_idle_timeout;
    let mut queries = JoinSet::new();
    loop {
        while queries.try_join_next().is_some() {}
        // At the pipelining limit, stop reading: TCP backpressure slows the client.
        let permit = tokio::select! {
            _ = stop.changed() => break,
            permit = pipeline.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let frame = tokio::select! {
            _ = stop.changed() => break,
            frame = frames.next_frame() => frame,
            () = tokio::time::sleep(idle) => {
                if queries.is_empty() {
                    break;
                }
                continue;
            }
        };
        let bytes = match frame {
            Ok(Some(bytes)) => bytes,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, %client, "DNS TCP client read failed");
                break;
            }
        };
        let ctx = ClientCtx {
            client,
            local,
            transport: DnsTransport::Tcp,
            received: Instant::now(),
        };
        let (shared, writer) = (shared.clone(), writer.clone());
        queries.spawn(async move {
            let _permit = permit;
            let Some(reply) = shared.handle(&bytes, &ctx).await else {
                return;
            };
            let mut writer = writer.lock().await;
            // A client that stops reading must not hold the task forever.
            match tokio::time::timeout(idle, write_frame(&mut *writer, &reply)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, client = %ctx.client, "DNS TCP reply not sent");
                }
                Err(_) => {
                    tracing::debug!(client = %ctx.client, "DNS TCP client not reading; reply dropped");
                }
            }
        });
    }
    // Answer what was asked before the client half-closed or the proxy stopped; each
    // query is bounded by the upstream timeout, the FQDN deadline and the write timeout.
    while queries.join_next().await.is_some() {}
    let mut writer = writer.lock().await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut *writer).await;
}
