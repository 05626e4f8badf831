//! In-process harness for the DNS proxy's end-to-end tests: an authoritative test server
//! written with hickory-proto (UDP and TCP on one port, answers A/AAAA/CNAME chains from a
//! table, can be told to truncate UDP answers or to stay silent, counts TCP connections and
//! remembers the IDs it saw), the proxy in front of it, and raw UDP/TCP clients that build
//! and parse messages with hickory-proto for precise assertions. Everything binds
//! 127.0.0.1 port 0; every wait is bounded by [`WAIT`].

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use membrane_l7proxy::dns::{
    DnsPolicy, DnsPortMatch, DnsProxy, DnsProxyConfig, DnsProxyHandle, EndpointScope, FqdnLearning,
    FqdnObserver, FqdnObserverError,
};
use membrane_policy::FqdnSelector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Upper bound of every wait in these tests. Not a timing assertion: a healthy run finishes
/// each step in milliseconds; the bound only keeps a broken run from hanging.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn name(text: &str) -> Name {
    Name::from_str(text).expect("test names are valid")
}

/// The test server's records, by owner name (lower-case, fully qualified).
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: HashMap<String, Vec<Record>>,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(mut self, owner: &str, ttl: u32, data: RData) -> Self {
        let key = owner.to_ascii_lowercase();
        self.records
            .entry(key)
            .or_default()
            .push(Record::from_rdata(name(owner), ttl, data));
        self
    }

    pub fn a(self, owner: &str, ttl: u32, ip: &str) -> Self {
        self.add(owner, ttl, RData::A(A(ip.parse().expect("ipv4"))))
    }

    pub fn aaaa(self, owner: &str, ttl: u32, ip: &str) -> Self {
        self.add(owner, ttl, RData::AAAA(AAAA(ip.parse().expect("ipv6"))))
    }

    pub fn cname(self, owner: &str, ttl: u32, target: &str) -> Self {
        self.add(owner, ttl, RData::CNAME(CNAME(name(target))))
    }

    /// `count` A records for one name (192.0.2.x / 198.51.100.x), to make big answers.
    pub fn many_a(mut self, owner: &str, ttl: u32, count: usize) -> Self {
        for i in 0..count {
            let ip = format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250);
            self = self.a(owner, ttl, &ip);
        }
        self
    }

    /// Adds an unrelated record to every answer for `owner`'s queries (an upstream trying
    /// to get an address learned for a name nobody asked about).
    pub fn inject(self, owner: &str, ttl: u32, foreign_owner: &str, ip: &str) -> Self {
        let mut zone = self;
        zone.records
            .entry(owner.to_ascii_lowercase())
            .or_default()
            .push(Record::from_rdata(
                name(foreign_owner),
                ttl,
                RData::A(A(ip.parse().expect("ipv4"))),
            ));
        zone
    }

    /// The answer a simple authoritative server gives: CNAMEs followed inside the table,
    /// then the records of the asked type at the end of the chain; NXDOMAIN for an
    /// unknown name. Ignores EDNS sizes on purpose (so the proxy's fitting is tested).
    fn answer(&self, query: &Message) -> Message {
        let mut response = Message::response(query.metadata.id, OpCode::Query);
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        let Some(question) = query.queries.first() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response;
        };
        response.add_query(question.clone());
        if query.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(4096);
            response.set_edns(edns);
        }
        let mut current = question.name().to_ascii().to_ascii_lowercase();
        for hop in 0..8 {
            let Some(records) = self.records.get(&current) else {
                if hop == 0 {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                break;
            };
            let cname = records.iter().find_map(|r| match &r.data {
                RData::CNAME(target) if question.query_type() != RecordType::CNAME => {
                    Some((r.clone(), target.0.to_ascii().to_ascii_lowercase()))
                }
                _ => None,
            });
            if let Some((record, target)) = cname {
                response.add_answer(record);
                current = target;
                continue;
            }
            for record in records {
                let foreign = record.name.to_ascii().to_ascii_lowercase() != current;
                if record.record_type() == question.query_type() || foreign {
                    response.add_answer(record.clone());
                }
            }
            break;
        }
        response
    }
}

/// What the test server does and saw.
#[derive(Debug, Default)]
pub struct AuthState {
    pub zone: Mutex<Zone>,
    /// Answer UDP queries with TC set and no records (TCP answers stay complete).
    pub truncate_udp: AtomicBool,
    /// Answer nothing at all.
    pub silent: AtomicBool,
    pub udp_queries: AtomicUsize,
    pub tcp_queries: AtomicUsize,
    pub tcp_connections: AtomicUsize,
    /// IDs of the queries that arrived, in order.
    pub ids: Mutex<Vec<u16>>,
}

pub struct AuthServer {
    pub addr: SocketAddr,
    pub state: Arc<AuthState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl AuthServer {
    pub async fn start(zone: Zone) -> Result<Self> {
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr()?;
        let state = Arc::new(AuthState {
            zone: Mutex::new(zone),
            ..AuthState::default()
        });
        let udp_task = tokio::spawn(serve_udp(Arc::new(udp), state.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, state.clone()));
        Ok(Self {
            addr,
            state,
            tasks: vec![udp_task, tcp_task],
        })
    }

    pub fn tcp_connections(&self) -> usize {
        self.state.tcp_connections.load(Ordering::SeqCst)
    }

    pub fn tcp_queries(&self) -> usize {
        self.state.tcp_queries.load(Ordering::SeqCst)
    }

    pub fn udp_queries(&self) -> usize {
        self.state.udp_queries.load(Ordering::SeqCst)
    }

    pub fn ids(&self) -> Vec<u16> {
        self.state.ids.lock().expect("ids").clone()
    }
}

/// A UDP socket and a TCP listener on the same 127.0.0.1 port.
async fn bind_pair() -> Result<(UdpSocket, TcpListener)> {
    for _ in 0..16 {
        let udp = UdpSocket::bind("127.0.0.1:0").await?;
        if let Ok(tcp) = TcpListener::bind(udp.local_addr()?).await {
            return Ok((udp, tcp));
        }
    }
    bail!("no 127.0.0.1 port free for both UDP and TCP after 16 attempts")
}

fn respond(state: &AuthState, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    state.ids.lock().expect("ids").push(query.metadata.id);
    if state.silent.load(Ordering::SeqCst) {
        return None;
    }
    let mut response = state.zone.lock().expect("zone").answer(&query);
    if udp && state.truncate_udp.load(Ordering::SeqCst) {
        response.answers.clear();
        response.metadata.truncation = true;
    }
    response.to_vec().ok()
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<AuthState>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            // Back off so a socket stuck in an error state cannot spin the test runtime.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        state.udp_queries.fetch_add(1, Ordering::SeqCst);
        if let Some(reply) = respond(&state, &buf[..len], true) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<AuthState>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        state.tcp_connections.fetch_add(1, Ordering::SeqCst);
        let state = state.clone();
        tokio::spawn(async move {
            // Pipelined queries are answered in arrival order on the same connection.
            while let Ok(frame) = read_frame(&mut stream).await {
                state.tcp_queries.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = respond(&state, &frame, false)
                    && write_frame(&mut stream, &reply).await.is_err()
                {
                    break;
                }
            }
        });
    }
}

pub async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut frame = vec![0u8; usize::from(len)];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}

pub async fn write_frame(stream: &mut TcpStream, message: &[u8]) -> Result<()> {
    let mut framed = u16::try_from(message.len())?.to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await?;
    Ok(())
}

/// A query for `qname`/`qtype` with `id`, RD set, and EDNS with `edns` as payload size.
pub fn query(id: u16, qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name(qname), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        message.set_edns(e);
    }
    message
}

/// A decoded reply and its size on the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub message: Message,
    pub len: usize,
}

impl Reply {
    pub fn rcode(&self) -> ResponseCode {
        self.message.metadata.response_code
    }

    pub fn id(&self) -> u16 {
        self.message.metadata.id
    }

    pub fn truncated(&self) -> bool {
        self.message.metadata.truncation
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        self.message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }
}

fn decode(bytes: &[u8]) -> Result<Reply> {
    Ok(Reply {
        message: Message::from_vec(bytes).context("decoding the reply")?,
        len: bytes.len(),
    })
}

/// Sends raw bytes over UDP and waits up to `wait` for one datagram; `None` if none came.
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Result<Option<Vec<u8>>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(received) => Ok(Some(buf[..received?].to_vec())),
        Err(_) => Ok(None),
    }
}

/// One query over UDP; `None` if no reply came within `wait`.
pub async fn udp_query(
    server: SocketAddr,
    message: &Message,
    wait: Duration,
) -> Result<Option<Reply>> {
    match udp_raw(server, &message.to_vec()?, wait).await? {
        Some(bytes) => Ok(Some(decode(&bytes)?)),
        None => Ok(None),
    }
}

/// One query over UDP that must be answered within [`WAIT`].
pub async fn udp_ask(server: SocketAddr, message: &Message) -> Result<Reply> {
    udp_query(server, message, WAIT)
        .await?
        .context("no UDP reply from the proxy")
}

/// A TCP client connection that can pipeline queries.
pub struct TcpClient {
    stream: TcpStream,
}

impl TcpClient {
    pub async fn connect(server: SocketAddr) -> Result<Self> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(server))
            .await
            .context("connect timed out")??;
        Ok(Self { stream })
    }

    pub async fn send(&mut self, message: &Message) -> Result<()> {
        write_frame(&mut self.stream, &message.to_vec()?).await
    }

    pub async fn recv(&mut self) -> Result<Reply> {
        let frame = tokio::time::timeout(WAIT, read_frame(&mut self.stream))
            .await
            .context("no TCP reply from the proxy")??;
        decode(&frame)
    }
}

/// One query over a fresh TCP connection.
pub async fn tcp_ask(server: SocketAddr, message: &Message) -> Result<Reply> {
    let mut client = TcpClient::connect(server).await?;
    client.send(message).await?;
    client.recv().await
}

/// A policy for every client and port allowing `selectors`.
pub fn policy(selectors: &[FqdnSelector]) -> DnsPolicy {
    let mut policy = DnsPolicy::new();
    policy
        .allow(EndpointScope::Any, DnsPortMatch::any(), selectors)
        .expect("test selectors compile");
    policy
}

pub fn pattern(p: &str) -> FqdnSelector {
    FqdnSelector::pattern(p).expect("pattern")
}

pub fn match_name(n: &str) -> FqdnSelector {
    FqdnSelector::name(n).expect("name")
}

/// The proxy serving in a task of its own; stopped when dropped.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub handle: DnsProxyHandle,
    task: JoinHandle<()>,
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_proxy(config: DnsProxyConfig) -> Result<RunningProxy> {
    let proxy = DnsProxy::bind(config).await?;
    let addr = proxy.local_addr();
    let handle = proxy.handle();
    let task = tokio::spawn(proxy.serve(std::future::pending::<()>()));
    Ok(RunningProxy { addr, handle, task })
}

/// Polls `condition` every few milliseconds until it holds, at most [`WAIT`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("{what}: not true within {WAIT:?}")
}

/// Remembers every learning, in order.
#[derive(Debug, Default)]
pub struct RecordingObserver {
    pub learned: Mutex<Vec<FqdnLearning>>,
}

impl RecordingObserver {
    pub fn learned(&self) -> Vec<FqdnLearning> {
        self.learned.lock().expect("learned").clone()
    }
}

impl FqdnObserver for RecordingObserver {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        self.learned.lock().expect("learned").push(learning.clone());
        Ok(())
    }
}

/// Does not return until the test opens the gate (or [`WAIT`] passes).
#[derive(Debug, Default)]
pub struct GateObserver {
    pub open: AtomicBool,
    pub notify: Notify,
    pub entered: AtomicUsize,
    pub finished: AtomicUsize,
}

impl GateObserver {
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

impl FqdnObserver for GateObserver {
    async fn learned(&self, _learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.open.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            // Registered before the re-check below, so an `open` in between is not missed.
            let notified = self.notify.notified();
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Tracks how many calls per name run at once; each call takes a little while so that
/// unserialized calls would overlap.
#[derive(Debug, Default)]
pub struct ConcurrencyObserver {
    state: Mutex<HashMap<String, (usize, usize, usize)>>,
}

impl ConcurrencyObserver {
    /// (calls, most calls at once) for `name`.
    pub fn seen(&self, name: &str) -> (usize, usize) {
        let state = self.state.lock().expect("state");
        state
            .get(name)
            .map_or((0, 0), |(calls, _, max)| (*calls, *max))
    }
}

impl FqdnObserver for ConcurrencyObserver {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        {
            let mut state = self.state.lock().expect("state");
            let (calls, now, max) = state.entry(learning.name.clone()).or_default();
            *calls += 1;
            *now += 1;
            *max = (*max).max(*now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut state = self.state.lock().expect("state");
        if let Some((_, now, _)) = state.get_mut(&learning.name) {
            *now -= 1;
        }
        Ok(())
    }
}
