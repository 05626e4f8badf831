//! Upstream exchange: forwards allowed queries to their DNS server over the client's
//! transport and hands each response back to the query that asked.
//!
//! One [`Channel`] per (server address, transport) carries every query to that server:
//! - UDP: one connected socket (the kernel accepts datagrams from the server only);
//! - TCP: one connection with queries pipelined on it (RFC 7766 §6.2.1), not one
//!   connection per query, so a busy node does not exhaust ports or the server's
//!   connection slots.
//!
//! Queries are told apart by message ID: each forwarded query gets a fresh unpredictable ID
//! that is unique among the channel's outstanding queries (the client's ID is restored by
//! the caller). A response is delivered only if its ID is outstanding *and* its question
//! is the one asked (case-insensitively); anything else is counted and dropped, so an
//! off-path attacker must guess both. A channel reads responses in one task; it closes
//! after `idle_timeout` without outstanding queries, and the pool opens a new one on
//! demand. A query whose channel closed before its response arrived (the server closed
//! an idle TCP connection, say) is retried once on a fresh channel: DNS queries are
//! idempotent.
//!
//! Not here yet (transparent mode): sockets with `SO_MARK` and, for in-cluster servers,
//! bound to the client pod's address as Cilium does.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hickory_proto::op::Query;
use tokio::net::UdpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::frame::{FrameReader, write_frame};
use super::policy::DnsTransport;
use super::wire::{response_key, same_question, set_id};

/// Largest DNS message over UDP (and the receive buffer for upstream datagrams: a
/// response larger than the client accepts is trimmed later, never cut by the socket).
pub(crate) const MAX_UDP_MESSAGE: usize = 65535;

/// How long to wait before giving up on a reader task that keeps failing; keeps a socket
/// in a persistent error state from spinning a core.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Consecutive read errors after which a UDP channel is closed and replaced.
const MAX_READ_ERRORS: u32 = 100;

/// Why a query got no response from its server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no response from {upstream} within the upstream timeout")]
    Timeout { upstream: SocketAddr },
    #[error("connection to {upstream} failed: {reason}")]
    Connect {
        upstream: SocketAddr,
        reason: String,
    },
    #[error("channel to {upstream} closed: {reason}")]
    Closed {
        upstream: SocketAddr,
        reason: String,
    },
    #[error("sending to {upstream} failed: {reason}")]
    Send {
        upstream: SocketAddr,
        reason: String,
    },
    #[error("{upstream} has {limit} queries outstanding, the limit")]
    Busy { upstream: SocketAddr, limit: usize },
}

/// Counters of the upstream side, shared with the proxy's stats.
#[derive(Debug, Default)]
pub(crate) struct UpstreamCounters {
    /// TCP connections opened to servers.
    pub(crate) tcp_connects: AtomicU64,
    /// UDP channels (sockets) opened.
    pub(crate) udp_channels: AtomicU64,
    /// Responses whose ID was not outstanding (late after a timeout, or forged).
    pub(crate) unmatched_responses: AtomicU64,
    /// Responses with an outstanding ID but another question (forged or confused server).
    pub(crate) mismatched_responses: AtomicU64,
}

/// Pool settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamSettings {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_outstanding: usize,
}

/// Server, transport, and the `SO_MARK` of the channel's socket (0 = none): queries marked
/// with different identities never share a socket.
type Key = (SocketAddr, DnsTransport, u32);
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Channel>>>>;

/// Every channel of the proxy, keyed by server address and transport.
pub(crate) struct UpstreamPool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    slots: Mutex<HashMap<Key, Slot>>,
    settings: UpstreamSettings,
    counters: Arc<UpstreamCounters>,
    ids: IdSource,
}

impl UpstreamPool {
    pub(crate) fn new(settings: UpstreamSettings, counters: Arc<UpstreamCounters>) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                slots: Mutex::new(HashMap::new()),
                settings,
                counters,
                ids: IdSource::new(),
            }),
        }
    }

    /// Sends `query` (its ID is replaced) to `upstream` over `transport` and waits until
    /// `deadline` for the response to `question`. Returns the response bytes with the ID
    /// the proxy chose; the caller restores the client's.
    pub(crate) async fn exchange(
        &self,
        upstream: SocketAddr,
        transport: DnsTransport,
        mark: u32,
        query: &[u8],
        question: &Query,
        deadline: Instant,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut result = Err(ForwardError::Timeout { upstream });
        // Two attempts: the second only after the first channel closed under the query.
        for _ in 0..2 {
            let channel = match tokio::time::timeout_at(
                deadline,
                self.shared.channel(upstream, transport, mark, deadline),
            )
            .await
            {
                Ok(channel) => channel?,
                Err(_) => return Err(ForwardError::Timeout { upstream }),
            };
            result = channel
                .exchange(&self.shared, query, question, deadline)
                .await;
            match &result {
                Err(ForwardError::Closed { .. } | ForwardError::Send { .. })
                    if Instant::now() < deadline =>
                {
                    continue;
                }
                _ => return result,
            }
        }
        result
    }

    /// Channels currently open (for tests and status).
    pub(crate) fn open_channels(&self) -> usize {
        let slots: Vec<Slot> = match self.shared.slots.lock() {
            Ok(slots) => slots.values().cloned().collect(),
            Err(_) => return 0,
        };
        slots
            .iter()
            .filter(|slot| {
                slot.try_lock()
                    .map(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }
}

impl PoolShared {
    /// The open channel for a key, or a new one. Concurrent callers for one key wait on the
    /// key's slot, so a burst of queries to a new server opens one connection, not many;
    /// other servers are not held up.
    async fn channel(
        self: &Arc<Self>,
        upstream: SocketAddr,
        transport: DnsTransport,
        mark: u32,
        deadline: Instant,
    ) -> Result<Arc<Channel>, ForwardError> {
        let key = (upstream, transport, mark);
        // A slot can be removed (idle channel cleanup) between looking it up and locking
        // it; then look it up again. Three rounds are plenty: removal needs an idle
        // channel, and ours is brand new.
        for _ in 0..3 {
            let slot = self.slot(key);
            let mut guard = slot.lock().await;
            if !self.slot_is_current(key, &slot) {
                continue;
            }
            if let Some(channel) = guard.as_ref().filter(|c| !c.is_closed()) {
                return Ok(channel.clone());
            }
            let channel = Channel::open(self, upstream, transport, mark, deadline).await?;
            *guard = Some(channel.clone());
            return Ok(channel);
        }
        Err(ForwardError::Connect {
            upstream,
            reason: "the channel kept being replaced while connecting".to_owned(),
        })
    }

    fn slot(&self, key: Key) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key).or_default().clone()
    }

    fn slot_is_current(&self, key: Key, slot: &Slot) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// Forgets the slot of a channel that closed, if the slot still holds that channel and
    /// nobody is using it (a user would replace the channel itself).
    fn release(&self, key: Key, channel: &Arc<Channel>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Entry::Occupied(entry) = slots.entry(key) {
            let unused = entry
                .get()
                .try_lock()
                .is_ok_and(|c| c.as_ref().is_some_and(|c| Arc::ptr_eq(c, channel)));
            if unused {
                entry.remove();
            }
        }
    }
}

/// Source of unpredictable message IDs: SipHash with per-process random keys over a
/// counter. No dependency on a RNG crate, and IDs cannot be predicted from earlier ones.
struct IdSource {
    keys: RandomState,
    counter: AtomicU64,
}

impl IdSource {
    fn new() -> Self {
        Self {
            keys: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u16 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Truncation keeps 16 uniformly distributed bits of the hash.
        self.keys.hash_one(n) as u16
    }
}

/// Where a query's outcome goes, and where the query waits for it.
type ReplySender = oneshot::Sender<Result<Vec<u8>, ForwardError>>;
type ReplyReceiver = oneshot::Receiver<Result<Vec<u8>, ForwardError>>;

struct Waiter {
    /// Tells this registration apart from a later one that drew the same ID.
    token: u64,
    question: Query,
    reply: ReplySender,
}

struct Outstanding {
    /// Set once the channel stops: no new query may register after that.
    closed: Option<String>,
    waiters: HashMap<u16, Waiter>,
    last_activity: Instant,
}

enum Writer {
    Udp(Arc<UdpSocket>),
    Tcp(tokio::sync::Mutex<OwnedWriteHalf>),
}

/// One socket or connection to one server, shared by all queries to it.
pub(crate) struct Channel {
    upstream: SocketAddr,
    transport: DnsTransport,
    mark: u32,
    outstanding: Mutex<Outstanding>,
    writer: Writer,
}

impl Channel {
    async fn open(
        pool: &Arc<PoolShared>,
        upstream: SocketAddr,
        transport: DnsTransport,
        mark: u32,
        deadline: Instant,
    ) -> Result<Arc<Self>, ForwardError> {
        let connect_error = |e: io::Error| ForwardError::Connect {
            upstream,
            reason: e.to_string(),
        };
        let outstanding = Mutex::new(Outstanding {
            closed: None,
            waiters: HashMap::new(),
            last_activity: Instant::now(),
        });
        let weak_pool = Arc::downgrade(pool);
        match transport {
            DnsTransport::Udp => {
                let local: SocketAddr = match upstream {
                    SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                    SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let socket = UdpSocket::bind(local).await.map_err(connect_error)?;
                if mark != 0 {
                    socket2::SockRef::from(&socket)
                        .set_mark(mark)
                        .map_err(connect_error)?;
                }
                socket.connect(upstream).await.map_err(connect_error)?;
                let socket = Arc::new(socket);
                let channel = Arc::new(Self {
                    upstream,
                    transport,
                    mark,
                    outstanding,
                    writer: Writer::Udp(socket.clone()),
                });
                pool.counters.udp_channels.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(read_udp(channel.clone(), socket, weak_pool));
                Ok(channel)
            }
            DnsTransport::Tcp => {
                let socket = match upstream {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .map_err(connect_error)?;
                if mark != 0 {
                    socket2::SockRef::from(&socket)
                        .set_mark(mark)
                        .map_err(connect_error)?;
                }
                let stream = tokio::time::timeout_at(deadline, socket.connect(upstream))
                    .await
                    .map_err(|_| ForwardError::Timeout { upstream })?
                    .map_err(connect_error)?;
                // Queries are small and latency-bound: do not let Nagle hold them.
                stream.set_nodelay(true).map_err(connect_error)?;
                let (read, write) = stream.into_split();
                let channel = Arc::new(Self {
                    upstream,
                    transport,
                    mark,
                    outstanding,
                    writer: Writer::Tcp(tokio::sync::Mutex::new(write)),
                });
                pool.counters.tcp_connects.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(read_tcp(channel.clone(), read, weak_pool));
                Ok(channel)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outstanding> {
        // A poisoned lock only means a panic elsewhere while holding it; the table itself
        // is still consistent (every mutation is a single insert/remove).
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Marks the channel closed and fails every outstanding query with `reason`.
    fn close(&self, reason: &str) {
        let waiters = {
            let mut out = self.lock();
            if out.closed.is_none() {
                out.closed = Some(reason.to_owned());
            }
            std::mem::take(&mut out.waiters)
        };
        for (_, waiter) in waiters {
            let _ = waiter.reply.send(Err(ForwardError::Closed {
                upstream: self.upstream,
                reason: reason.to_owned(),
            }));
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        pool: &PoolShared,
        query: &[u8],
        question: &Query,
        deadline: Instant,
    ) -> Result<Vec<u8>, ForwardError> {
        let (id, token, receiver) = self.register(pool, question)?;
        // Removes the entry however this future ends (response, timeout, cancellation).
        let _registration = Registration {
            channel: self,
            id,
            token,
        };
        let mut message = query.to_vec();
        set_id(&mut message, id);
        // The send is bounded by the deadline too: a server that stops reading fills the
        // TCP window, and the writer lock would otherwise hold every query to it.
        let mut writing = false;
        let send = async {
            match &self.writer {
                Writer::Udp(socket) => socket.send(&message).await.map(drop),
                Writer::Tcp(write) => {
                    let mut write = write.lock().await;
                    writing = true;
                    write_frame(&mut *write, &message).await
                }
            }
        };
        let sent = tokio::time::timeout_at(deadline, send).await;
        let error = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) if writing => Some("write timed out".to_owned()),
            Err(_) => {
                return Err(ForwardError::Timeout {
                    upstream: self.upstream,
                });
            }
        };
        if let Some(reason) = error {
            if self.transport == DnsTransport::Tcp {
                // A failed or cut-off write leaves the stream in an unknown state (maybe
                // half a frame): nobody may use it any more.
                self.close(&format!("write failed: {reason}"));
            }
            return Err(ForwardError::Send {
                upstream: self.upstream,
                reason,
            });
        }
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ForwardError::Closed {
                upstream: self.upstream,
                reason: "the reader stopped".to_owned(),
            }),
            Err(_) => Err(ForwardError::Timeout {
                upstream: self.upstream,
            }),
        }
    }

    fn register(
        &self,
        pool: &PoolShared,
        question: &Query,
    ) -> Result<(u16, u64, ReplyReceiver), ForwardError> {
        let mut out = self.lock();
        if let Some(reason) = &out.closed {
            return Err(ForwardError::Closed {
                upstream: self.upstream,
                reason: reason.clone(),
            });
        }
        let limit = pool
            .settings
            .max_outstanding
            .clamp(1, usize::from(u16::MAX));
        if out.waiters.len() >= limit {
            return Err(ForwardError::Busy {
                upstream: self.upstream,
                limit,
            });
        }
        // With at most `limit` (< 65536) IDs taken, a random draw is free with probability
        // ≥ 1/65536; 64 draws then a linear scan bound the work in the worst case.
        let mut id = pool.ids.next();
        let mut draws = 0;
        while out.waiters.contains_key(&id) {
            draws += 1;
            id = if draws < 64 {
                pool.ids.next()
            } else {
                id.wrapping_add(1)
            };
        }
        let (reply, receiver) = oneshot::channel();
        let token = pool.ids.counter.fetch_add(1, Ordering::Relaxed);
        out.waiters.insert(
            id,
            Waiter {
                token,
                question: question.clone(),
                reply,
            },
        );
        out.last_activity = Instant::now();
        Ok((id, token, receiver))
    }

    /// Routes one response to its query.
    fn deliver(&self, counters: &UpstreamCounters, response: &[u8]) {
        let Some((id, answered)) = response_key(response) else {
            counters.unmatched_responses.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %self.upstream, len = response.len(), "unreadable upstream response dropped");
            return;
        };
        let mut out = self.lock();
        out.last_activity = Instant::now();
        let Entry::Occupied(entry) = out.waiters.entry(id) else {
            counters.unmatched_responses.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !same_question(&entry.get().question, &answered) {
            counters
                .mismatched_responses
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %self.upstream, id, "upstream response for another question dropped");
            return;
        }
        let waiter = entry.remove();
        let _ = waiter.reply.send(Ok(response.to_vec()));
    }

    /// True if the channel has been idle long enough to close; marks it closed under the
    /// same lock that registration takes, so no query can slip in afterwards.
    fn close_if_idle(&self, idle: Duration) -> bool {
        let mut out = self.lock();
        if out.waiters.is_empty() && out.last_activity.elapsed() >= idle {
            out.closed = Some("idle".to_owned());
            return true;
        }
        false
    }
}

/// Drops a query's entry when its exchange ends, whatever the way.
struct Registration<'a> {
    channel: &'a Channel,
    id: u16,
    token: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut out = self.channel.lock();
        // The response may have been delivered and the ID drawn again by another query.
        if let Entry::Occupied(entry) = out.waiters.entry(self.id)
            && entry.get().token == self.token
        {
            entry.remove();
        }
    }
}

async fn read_udp(channel: Arc<Channel>, socket: Arc<UdpSocket>, pool: Weak<PoolShared>) {
    let Some((settings, counters)) = pool.upgrade().map(|p| (p.settings, p.counters.clone()))
    else {
        return;
    };
    let mut buf = vec![0u8; MAX_UDP_MESSAGE];
    let mut errors = 0u32;
    loop {
        match tokio::time::timeout(settings.idle_timeout, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                errors = 0;
                channel.deliver(&counters, &buf[..n]);
            }
            Ok(Err(e)) => {
                // ECONNREFUSED (the server's ICMP port unreachable) lands here; the query
                // it concerned times out, as with a lost datagram.
                errors += 1;
                tracing::debug!(upstream = %channel.upstream, error = %e, "upstream UDP receive error");
                if errors >= MAX_READ_ERRORS {
                    channel.close(&format!("{errors} consecutive receive errors, last: {e}"));
                    break;
                }
                tokio::time::sleep(READ_ERROR_BACKOFF).await;
            }
            Err(_) => {
                if channel.close_if_idle(settings.idle_timeout) {
                    break;
                }
            }
        }
    }
    if let Some(pool) = pool.upgrade() {
        pool.release(
            (channel.upstream, channel.transport, channel.mark),
            &channel,
        );
    }
}

async fn read_tcp(channel: Arc<Channel>, read: OwnedReadHalf, pool: Weak<PoolShared>) {
    let Some((settings, counters)) = pool.upgrade().map(|p| (p.settings, p.counters.clone()))
    else {
        return;
    };
    let mut frames = FrameReader::new(read);
    let reason = loop {
        match tokio::time::timeout(settings.idle_timeout, frames.next_frame()).await {
            Ok(Ok(Some(frame))) => channel.deliver(&counters, &frame),
            Ok(Ok(None)) => break "closed by the server".to_owned(),
            Ok(Err(e)) => break format!("read failed: {e}"),
            Err(_) => {
                if channel.close_if_idle(settings.idle_timeout) {
                    break "idle".to_owned();
                }
            }
        }
    };
    channel.close(&reason);
    if let Writer::Tcp(write) = &channel.writer {
        // Tell the server we are done (FIN) rather than leaving the socket to linger.
        let mut write = write.lock().await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut *write).await;
    }
    if let Some(pool) = pool.upgrade() {
        pool.release(
            (channel.upstream, channel.transport, channel.mark),
            &channel,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_vary() {
        let ids = IdSource::new();
        let drawn: std::collections::HashSet<u16> = (0..1000).map(|_| ids.next()).collect();
        // 1000 draws from 65536 values: a handful of collisions at most.
        assert!(drawn.len() > 950, "only {} distinct ids", drawn.len());
    }
}
