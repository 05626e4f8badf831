//! The channel between the agent and its node proxy (`membrane-proxy`): a Unix stream socket
//! in the agent's state directory ([`CHANNEL_SOCKET_NAME`]) carrying the proxy's three kinds
//! of configuration — the HTTP/TLS policy, the DNS rules and the `WasmFilter` attachments — as
//! JSON lines.
//!
//! The proxy connects (and reconnects, with backoff, whenever the agent goes away) and says
//! which revision of each kind it holds ([`ToAgent::Hello`]); the agent sends whatever differs
//! from its own, whole. From then on every change the agent makes is sent as it happens: the
//! HTTP policy as a [`PolicyDelta`] (only the endpoints that changed, applied by the proxy on
//! exactly the revision it is based on), the DNS rules and the filters whole (small, and
//! compiled whole anyway). The proxy answers each message with [`ToAgent::Applied`] once it is
//! in force for new requests, or [`ToAgent::Refused`] naming the problem; a delta on the wrong
//! base is refused with `resync`, and the agent sends the whole policy. The agent waits
//! (bounded) for the answer before a policy change returns, as Cilium waits for Envoy's ACK;
//! sending and waiting are separate calls ([`AgentChannel::publish_policy`] returns a
//! [`Pending`], [`AgentChannel::wait_for`] waits for it), so the agent never holds its state
//! lock while it waits for the proxy.
//!
//! The proxy writes every applied configuration to its snapshot files, so a proxy restarted
//! while the agent is away serves from the last configuration it had, and says so in its next
//! hello (nothing is resent when the revisions match). Revisions start from the agent's start
//! time in microseconds ([`first_revision`]), so a restarted agent never reuses a revision
//! number for different content.
//!
//! Owns the message types and both ends' socket handling; what a message does to the proxy is
//! its caller's ([`ProxyHandler`]). Blocking I/O on threads of its own; never on a data path.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;
use crate::snapshot::{DnsSnapshot, FilterSnapshot, PolicyDelta, PolicySnapshot};

/// The longest message either end reads (a policy snapshot of many endpoints fits easily).
const MAX_MESSAGE: usize = 256 << 20;

/// How long the accept loop waits between polls of a listener with no proxy connecting.
const ACCEPT_IDLE: Duration = Duration::from_millis(20);

/// How long a read may block before the stop flag is checked again.
const POLL: Duration = Duration::from_millis(200);

/// What the agent sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToProxy {
    /// The whole HTTP/TLS policy.
    PolicyFull(PolicySnapshot),
    /// A change to the HTTP/TLS policy the proxy holds.
    PolicyDelta(PolicyDelta),
    /// The whole DNS rule set.
    Dns(DnsSnapshot),
    /// The whole `WasmFilter` attachment set.
    Filters(FilterSnapshot),
}

impl ToProxy {
    pub fn kind(&self) -> Kind {
        match self {
            Self::PolicyFull(_) | Self::PolicyDelta(_) => Kind::Policy,
            Self::Dns(_) => Kind::Dns,
            Self::Filters(_) => Kind::Filters,
        }
    }

    /// The revision the proxy holds once this is applied.
    pub fn revision(&self) -> u64 {
        match self {
            Self::PolicyFull(s) => s.revision,
            Self::PolicyDelta(d) => d.revision,
            Self::Dns(s) => s.revision,
            Self::Filters(s) => s.revision,
        }
    }
}

/// What the proxy sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgent {
    /// First message on every connection: the revisions the proxy holds (0: none).
    Hello(Held),
    /// The message of this kind and revision is in force for new requests.
    Applied { kind: Kind, revision: u64 },
    /// It was not applied (the previous configuration of that kind stays); with `resync` the
    /// proxy asks for the whole configuration (a delta on a revision it does not hold).
    Refused {
        kind: Kind,
        revision: u64,
        error: String,
        #[serde(default)]
        resync: bool,
    },
}

/// The three kinds of configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Policy,
    Dns,
    Filters,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Policy, Kind::Dns, Kind::Filters];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::Dns => "DNS",
            Kind::Filters => "filter",
        }
    }
}

/// Revisions by kind (0: nothing held).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    #[serde(default)]
    pub policy: u64,
    #[serde(default)]
    pub dns: u64,
    #[serde(default)]
    pub filters: u64,
}

impl Held {
    fn get(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Policy => self.policy,
            Kind::Dns => self.dns,
            Kind::Filters => self.filters,
        }
    }
}

/// The first revision of a freshly started agent: its start time in microseconds, so
/// revisions keep growing across agent restarts (a restarted agent never sends different
/// content under a number the proxy already holds).
pub fn first_revision() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

/// A configuration sent to the proxy, whose answer [`AgentChannel::wait_for`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a publish is confirmed only by waiting for the proxy's answer"]
pub struct Pending {
    pub kind: Kind,
    pub revision: u64,
}

/// How a publish ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy applied it.
    Applied,
    /// The proxy refused it; its previous configuration of that kind stays.
    Refused(String),
    /// No answer within the bound (a proxy that is starting applies it when it connects).
    TimedOut,
    /// No proxy is connected and none was expected.
    NoProxy,
}

/// Counters for `membrane status` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    /// Proxy connections accepted (with a valid hello).
    pub connections: u64,
    /// Whole configurations sent, of any kind.
    pub full_sent: u64,
    /// Policy deltas sent.
    pub deltas_sent: u64,
    /// Messages the proxy refused.
    pub refused: u64,
}

/// The agent's end: the latest configuration of each kind, the connected proxy (at most
/// one: a new connection replaces the old one) and what it has acknowledged.
pub struct AgentChannel {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    policy: Option<PolicySnapshot>,
    dns: Option<DnsSnapshot>,
    filters: Option<FilterSnapshot>,
    connection: Option<Connection>,
    next_connection: u64,
    /// The revision the proxy last said it holds, by kind (kept across reconnects, for status).
    applied: [u64; 3],
    /// The last refusal, by kind: (revision, error).
    refused: [Option<(u64, String)>; 3],
    stats: ChannelStats,
}

struct Connection {
    id: u64,
    writer: UnixStream,
    /// What the proxy holds once it has read everything sent so far, by kind (`None`:
    /// unknown, so the next message of that kind is sent whole).
    sent: [Option<u64>; 3],
}

impl Inner {
    /// The whole current configuration of `kind`, if the agent has one.
    fn full(&self, kind: Kind) -> Option<ToProxy> {
        match kind {
            Kind::Policy => self.policy.clone().map(ToProxy::PolicyFull),
            Kind::Dns => self.dns.clone().map(ToProxy::Dns),
            Kind::Filters => self.filters.clone().map(ToProxy::Filters),
        }
    }

    /// Sends `message` on the current connection; a failed write drops the connection (the
    /// proxy reconnects and says what it holds).
    fn send(&mut self, message: &ToProxy) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let mut line = match serde_json::to_vec(message) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message for the proxy");
                return;
            }
        };
        line.push(b'\n');
        match connection.writer.write_all(&line) {
            Ok(()) => {
                connection.sent[message.kind().index()] = Some(message.revision());
                match message {
                    ToProxy::PolicyDelta(_) => self.stats.deltas_sent += 1,
                    _ => self.stats.full_sent += 1,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the proxy channel broke; waiting for the proxy to reconnect");
                let _ = connection.writer.shutdown(std::net::Shutdown::Both);
                self.connection = None;
            }
        }
    }
}

impl AgentChannel {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds the socket at `path` (replacing a stale one) and serves proxies on a thread of
    /// its own until `stop`.
    pub fn serve(self: &Arc<Self>, path: &Path, shutdown: Shutdown) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let channel = self.clone();
        std::thread::Builder::new()
            .name("membrane-proxy-channel".into())
            .spawn(move || {
                while !shutdown.is_triggered() {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (channel, shutdown) = (channel.clone(), shutdown.clone());
                            let _ = std::thread::Builder::new()
                                .name("membrane-proxy-conn".into())
                                .spawn(move || channel.serve_connection(stream, shutdown.flag()));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // A proxy connects once per start: a short sleep, ended at once
                            // on shutdown, costs nothing.
                            shutdown.wait_timeout(ACCEPT_IDLE);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "proxy channel accept failed");
                            shutdown.wait_timeout(ACCEPT_IDLE * 5);
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// One proxy connection: its hello, the sync, then its answers until it goes away.
    fn serve_connection(&self, stream: UnixStream, stop: &AtomicBool) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(POLL));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let mut reader = LineReader::new(stream);
        let hello_by = Instant::now() + Duration::from_secs(5);
        let held = loop {
            match reader.next(stop) {
                Ok(Some(line)) => match serde_json::from_slice::<ToAgent>(&line) {
                    Ok(ToAgent::Hello(held)) => break held,
                    Ok(other) => {
                        tracing::warn!(message = ?other, "proxy channel: expected a hello first");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy channel: unreadable hello");
                        return;
                    }
                },
                Ok(None) if Instant::now() < hello_by => continue,
                Ok(None) | Err(_) => return,
            }
        };
        let id = {
            let mut inner = self.lock();
            if let Some(old) = inner.connection.take() {
                let _ = old.writer.shutdown(std::net::Shutdown::Both);
            }
            inner.next_connection += 1;
            let id = inner.next_connection;
            inner.stats.connections += 1;
            inner.connection = Some(Connection {
                id,
                writer,
                sent: [None; 3],
            });
            for kind in Kind::ALL {
                let held_revision = held.get(kind);
                inner.applied[kind.index()] = held_revision;
                match inner.full(kind) {
                    Some(full) if full.revision() == held_revision => {
                        if let Some(c) = inner.connection.as_mut() {
                            c.sent[kind.index()] = Some(held_revision);
                        }
                    }
                    Some(full) => inner.send(&full),
                    // Nothing resolved yet: the first publish sends it whole.
                    None => {}
                }
            }
            tracing::info!(?held, "proxy connected to the channel");
            self.changed.notify_all();
            id
        };
        loop {
            let line = match reader.next(stop) {
                Ok(Some(line)) => line,
                Ok(None) => {
                    if self.lock().connection.as_ref().is_some_and(|c| c.id == id) {
                        continue;
                    }
                    break;
                }
                Err(_) => break,
            };
            let message = match serde_json::from_slice::<ToAgent>(&line) {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy channel: unreadable answer; reconnecting");
                    break;
                }
            };
            let mut inner = self.lock();
            if inner.connection.as_ref().is_none_or(|c| c.id != id) {
                break;
            }
            match message {
                ToAgent::Hello(_) => tracing::warn!("proxy channel: a second hello, ignored"),
                ToAgent::Applied { kind, revision } => {
                    inner.applied[kind.index()] = revision;
                }
                ToAgent::Refused {
                    kind,
                    revision,
                    error,
                    resync,
                } => {
                    inner.stats.refused += 1;
                    if resync {
                        tracing::info!(kind = kind.name(), revision, %error, "the proxy asks for the whole configuration");
                        if let Some(full) = inner.full(kind) {
                            inner.send(&full);
                        }
                    } else {
                        tracing::error!(kind = kind.name(), revision, %error, "the proxy refused a configuration; its previous one stays");
                        inner.refused[kind.index()] = Some((revision, error));
                    }
                }
            }
            self.changed.notify_all();
        }
        let mut inner = self.lock();
        if inner.connection.as_ref().is_some_and(|c| c.id == id) {
            inner.connection = None;
            tracing::info!("proxy left the channel");
        }
        self.changed.notify_all();
    }

    /// Makes `snapshot` the HTTP policy and sends it (a delta when the proxy holds the
    /// previous revision); [`AgentChannel::wait_for`] waits for the proxy's answer.
    pub fn publish_policy(&self, snapshot: PolicySnapshot) -> Pending {
        let revision = snapshot.revision;
        {
            let mut inner = self.lock();
            let previous = inner.policy.replace(snapshot);
            let holds_previous = match (&previous, &inner.connection) {
                (Some(p), Some(c)) => c.sent[Kind::Policy.index()] == Some(p.revision),
                _ => false,
            };
            let message = match (previous, holds_previous) {
                (Some(previous), true) => {
                    let current = inner.policy.as_ref().expect("just set");
                    ToProxy::PolicyDelta(PolicyDelta::between(&previous, current))
                }
                _ => inner.full(Kind::Policy).expect("just set"),
            };
            inner.send(&message);
        }
        Pending {
            kind: Kind::Policy,
            revision,
        }
    }

    /// Makes `snapshot` the DNS rules and sends it whole.
    pub fn publish_dns(&self, snapshot: DnsSnapshot) -> Pending {
        let revision = snapshot.revision;
        self.publish_whole(Kind::Dns, revision, |inner| {
            inner.dns = Some(snapshot);
        })
    }

    /// Makes `snapshot` the filter attachments and sends it whole.
    pub fn publish_filters(&self, snapshot: FilterSnapshot) -> Pending {
        let revision = snapshot.revision;
        self.publish_whole(Kind::Filters, revision, |inner| {
            inner.filters = Some(snapshot);
        })
    }

    /// Stores a configuration of `kind` (`store`) and sends it whole.
    fn publish_whole(&self, kind: Kind, revision: u64, store: impl FnOnce(&mut Inner)) -> Pending {
        let mut inner = self.lock();
        store(&mut inner);
        if let Some(message) = inner.full(kind) {
            inner.send(&message);
        }
        Pending { kind, revision }
    }

    /// Waits at most `wait` for the proxy's answer to a publish. Without a connection it
    /// waits only when a proxy is expected (one starting up connects, is sent everything and
    /// answers). Call it without holding any lock the channel's users share.
    pub fn wait_for(&self, pending: &Pending, wait: Duration, proxy_expected: bool) -> Outcome {
        let Pending { kind, revision } = *pending;
        let deadline = Instant::now() + wait;
        let mut inner = self.lock();
        loop {
            if inner.applied[kind.index()] == revision {
                return Outcome::Applied;
            }
            if let Some((refused, error)) = &inner.refused[kind.index()]
                && *refused == revision
            {
                return Outcome::Refused(error.clone());
            }
            if inner.connection.is_none() && !proxy_expected {
                return Outcome::NoProxy;
            }
            let now = Instant::now();
            if now >= deadline {
                return Outcome::TimedOut;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The revision the proxy holds of `kind` (0: none known).
    pub fn applied(&self, kind: Kind) -> u64 {
        self.lock().applied[kind.index()]
    }

    /// Whether a proxy is connected.
    pub fn connected(&self) -> bool {
        self.lock().connection.is_some()
    }

    pub fn stats(&self) -> ChannelStats {
        self.lock().stats
    }
}

/// What the proxy does with the agent's messages.
pub trait ProxyHandler {
    /// The revisions in force (0: none).
    fn held(&self) -> Held;
    /// Applies `message`; on error the previous configuration of its kind stays. `Err((why,
    /// true))` asks the agent for the whole configuration.
    fn apply(&mut self, message: ToProxy) -> Result<(), (String, bool)>;
}

/// The proxy's end: connects to the agent's channel at `path`, says what it holds, applies
/// what it is sent and answers, reconnecting (100 ms backoff doubling to 500 ms) whenever the
/// agent goes away, until `stop`.
pub fn run_proxy_side(path: &Path, handler: &mut dyn ProxyHandler, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    let mut logged_away = false;
    while !stop.load(Ordering::Relaxed) {
        let stream = match UnixStream::connect(path) {
            Ok(stream) => stream,
            Err(e) => {
                if !logged_away {
                    tracing::info!(socket = %path.display(), error = %e, "agent channel unavailable; serving the last configuration");
                    logged_away = true;
                }
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        logged_away = false;
        backoff = Duration::from_millis(100);
        match serve_agent(stream, handler, stop) {
            Ok(()) => {}
            Err(e) => tracing::info!(error = %e, "agent channel closed; reconnecting"),
        }
    }
}

fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) {
    let until = Instant::now() + duration;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_agent(
    stream: UnixStream,
    handler: &mut dyn ProxyHandler,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = LineReader::new(stream);
    let say = |writer: &mut UnixStream, message: &ToAgent| -> std::io::Result<()> {
        let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
        line.push(b'\n');
        writer.write_all(&line)
    };
    say(&mut writer, &ToAgent::Hello(handler.held()))?;
    tracing::info!(held = ?handler.held(), "connected to the agent channel");
    while !stop.load(Ordering::Relaxed) {
        let Some(line) = reader.next(stop)? else {
            continue;
        };
        let message: ToProxy = serde_json::from_slice(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable message from the agent: {e}"),
            )
        })?;
        let (kind, revision) = (message.kind(), message.revision());
        let answer = match handler.apply(message) {
            Ok(()) => ToAgent::Applied { kind, revision },
            Err((error, resync)) => ToAgent::Refused {
                kind,
                revision,
                error,
                resync,
            },
        };
        say(&mut writer, &answer)?;
    }
    Ok(())
}

/// Reads newline-terminated messages from a socket with a read timeout, keeping a partial
/// line across timeouts.
struct LineReader {
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl LineReader {
    fn new(stream: UnixStream) -> Self {
        Self {
            reader: BufReader::new(stream),
            partial: Vec::new(),
        }
    }

    /// `Ok(Some(line))`, `Ok(None)` after a timeout or when stopped, `Err` at the end of the
    /// stream or on a message over [`MAX_MESSAGE`].
    fn next(&mut self, stop: &AtomicBool) -> std::io::Result<Option<Vec<u8>>> {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let limit = (MAX_MESSAGE + 1 - self.partial.len().min(MAX_MESSAGE)) as u64;
        let result =
            std::io::Read::take(&mut self.reader, limit).read_until(b'\n', &mut self.partial);
        match result {
            Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if self.partial.ends_with(b"\n") => Ok(Some(std::mem::take(&mut self.partial))),
            Ok(_) if self.partial.len() > MAX_MESSAGE => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message over {MAX_MESSAGE} bytes"),
            )),
            // The stream ended in the middle of a line.
            Ok(_) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Writes `value` as JSON to `path` atomically (a temporary file, flushed, renamed over).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    crate::run_dir::write_atomically(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_split_across_reads_is_read_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut reader = LineReader::new(b);
        let stop = AtomicBool::new(false);
        let mut writer = a;
        writer.write_all(b"{\"hello\":").unwrap();
        assert_eq!(reader.next(&stop).unwrap(), None, "half a line is kept");
        writer.write_all(b"{}}\n").unwrap();
        let line = reader.next(&stop).unwrap().expect("the whole line");
        assert_eq!(
            serde_json::from_slice::<ToAgent>(&line).unwrap(),
            ToAgent::Hello(Held::default())
        );
        drop(writer);
        assert!(reader.next(&stop).is_err(), "end of stream");
    }
}
