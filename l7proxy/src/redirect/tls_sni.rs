//! TLS without termination: `serverNames` (cilium-semantics.md §1.4) enforced on the server
//! name (SNI) of the client's TLS ClientHello, for redirected connections to a port whose
//! policy is a TLS one ([`PolicySource::tls_policy`]).
//!
//! Owns, per such connection:
//! - reading the ClientHello without answering it: the bytes are buffered (at most
//!   [`MAX_HELLO_BYTES`], for at most [`HELLO_TIMEOUT`]) until the whole handshake message is
//!   in — records split over TCP segments, and a ClientHello fragmented over several records,
//!   are reassembled — and parsed by [`parse_client_hello`];
//! - the decision: the server name must match one of the allowed names
//!   ([`membrane_policy::ServerName`]: case-insensitive, `*.` = one label). A first byte that
//!   is not a TLS handshake record, a malformed ClientHello, one without a `server_name`, or
//!   one too large or too slow is denied. A port that another rule allows at L4 only for
//!   this peer is the L7 wildcard ([`TlsPolicy::any_connection`]): relayed at once, nothing
//!   read, TLS or not (as Envoy's network filter with empty `server_names`);
//! - allowed: a connection to the original destination with the proxy's upstream `SO_MARK`
//!   ([`upstream_mark`]), the buffered bytes replayed first, then both directions relayed
//!   until either side closes, or until no byte has moved either way for
//!   [`super::TransparentConfig::tls_idle_timeout`] (1 h by default, as Envoy's TCP proxy);
//! - denied: the client connection is reset (`SO_LINGER` 0), as Cilium's network filter does
//!   ("access denied" abort), and not a byte reaches the server;
//! - one access record per connection: `request` (allowed) or `denied`, `url`
//!   `tls://<server name>:<port>` (the destination address when there is no name), both
//!   identities, the rule (the index of the matching name, `allow-all` for the wildcard,
//!   `default-deny`); an upstream connect failure adds a `response` record with the error.
//!   The records reuse the HTTP record type: `method` is empty and `version` carries no
//!   meaning for them.
//!
//! The parser is pure and never panics on input; the rest needs a tokio runtime.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_policy::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{ConnRouter, PolicyQuery, upstream_mark};
use crate::access::{AccessLog, AccessRecord, RecordKind};
use crate::policy::RuleRef;

/// Bytes buffered at most before the ClientHello is complete. A ClientHello is a few hundred
/// bytes to ~2 KiB (post-quantum key shares included); TLS allows a handshake message over
/// several 16 KiB records, which no real client needs for a ClientHello.
pub const MAX_HELLO_BYTES: usize = 32 * 1024;
/// How long the client may take to send its whole ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS `ContentType.handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
/// `HandshakeType.client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// `ExtensionType.server_name` (RFC 6066 §3).
const EXTENSION_SERVER_NAME: u16 = 0;
/// `NameType.host_name`.
const NAME_TYPE_HOST: u8 = 0;
/// TLSPlaintext.length limit (RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
/// TLS record header: type, version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Longest host name in a `server_name` entry (RFC 6066: `HostName<1..2^16-1>`, but a DNS
/// name has at most 253 characters, one more for a trailing dot).
const MAX_HOST_NAME_LEN: usize = 254;

/// What a TLS port allows, for one (endpoint, port, remote identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// `None`: any connection (the L7 wildcard). Otherwise the allowed names, OR'ed; empty
    /// allows nothing.
    names: Option<Vec<ServerName>>,
}

impl TlsPolicy {
    /// The L7 wildcard: every connection is relayed without reading it.
    pub fn any_connection() -> Self {
        Self { names: None }
    }

    /// Connections whose ClientHello names one of `names` (none: nothing is allowed).
    pub fn server_names(names: Vec<ServerName>) -> Self {
        Self { names: Some(names) }
    }

    /// Whether every connection is allowed without looking at it.
    pub fn allows_any_connection(&self) -> bool {
        self.names.is_none()
    }

    /// The decision for a ClientHello's server name: the index of the first allowed name
    /// that matches, or [`RuleRef::DefaultDeny`].
    pub fn check(&self, server_name: &str) -> RuleRef {
        match &self.names {
            None => RuleRef::AllowAll,
            Some(names) => names
                .iter()
                .position(|name| name.matches(server_name))
                .map_or(RuleRef::DefaultDeny, RuleRef::Rule),
        }
    }
}

/// The result of [`parse_client_hello`] on the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// More bytes are needed.
    Incomplete,
    /// The whole ClientHello was read; its `host_name` (lower-cased), if it has one.
    Complete { server_name: Option<String> },
}

/// Why a connection's first bytes are not an acceptable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (plain text, SSLv2, another protocol).
    NotTls,
    /// A TLS handshake that does not parse as a ClientHello; says which part.
    Malformed(&'static str),
    /// The ClientHello is longer than [`MAX_HELLO_BYTES`].
    TooLarge,
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotTls => f.write_str("not a TLS connection"),
            Self::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            Self::TooLarge => write!(f, "ClientHello longer than {MAX_HELLO_BYTES} bytes"),
        }
    }
}

/// Parses the start of a client's byte stream as TLS records carrying a ClientHello
/// (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2; RFC 6066 §3 for `server_name`). Bytes after the
/// ClientHello are ignored (they are relayed with it).
pub fn parse_client_hello(stream: &[u8]) -> Result<ClientHello, HelloError> {
    // The record layer: reassemble the handshake message from as many records as it spans.
    let mut handshake: Vec<u8> = Vec::new();
    let mut offset = 0;
    loop {
        let rest = &stream[offset..];
        if let Some(&content_type) = rest.first()
            && content_type != CONTENT_HANDSHAKE
        {
            return Err(if offset == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("another record type before the ClientHello ended")
            });
        }
        if let Some(&major) = rest.get(1)
            && major != 3
        {
            return Err(HelloError::NotTls);
        }
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            return Ok(ClientHello::Incomplete);
        };
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD_LEN {
            return Err(HelloError::Malformed("record length"));
        }
        let Some(fragment) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + length) else {
            return Ok(ClientHello::Incomplete);
        };
        offset += RECORD_HEADER_LEN + length;
        handshake.extend_from_slice(fragment);
        let Some(head) = handshake.get(..4) else {
            continue;
        };
        if head[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::Malformed(
                "the first handshake message is not a ClientHello",
            ));
        }
        let message_len =
            usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
        if message_len > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge);
        }
        if let Some(body) = handshake.get(4..4 + message_len) {
            return parse_hello_body(body).map(|server_name| ClientHello::Complete { server_name });
        }
    }
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The ClientHello body: its `server_name`'s host name, if any.
fn parse_hello_body(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(body);
    r.u16("legacy_version")?;
    r.take(32, "random")?;
    if r.vec8("legacy_session_id")?.len() > 32 {
        return Err(HelloError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("legacy_compression_methods"));
    }
    if r.is_empty() {
        // A TLS 1.2-or-older hello may have no extensions at all: then it has no name.
        return Ok(None);
    }
    let mut extensions = Reader(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen = Vec::new();
    let mut server_name = None;
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        // RFC 8446 §4.2: at most one extension of each type; a second server_name could
        // otherwise show us one name and the server another.
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("an extension appears twice"));
        }
        seen.push(kind);
        if kind == EXTENSION_SERVER_NAME {
            server_name = parse_server_name(data)?;
        }
    }
    Ok(server_name)
}

/// The `server_name` extension's host name (RFC 6066 §3: at most one per name type).
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("server_name list")?);
    if !r.is_empty() || list.is_empty() {
        return Err(HelloError::Malformed("server_name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("server_name type")?;
        let name = list.vec16("server_name entry")?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host names in server_name"));
        }
        host = Some(name);
    }
    let Some(name) = host else {
        return Ok(None);
    };
    // A DNS name in ASCII (RFC 6066 §3); anything else cannot match an allowed name and
    // is a malformed hello rather than a name to log.
    if name.is_empty()
        || name.len() > MAX_HOST_NAME_LEN
        || !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(HelloError::Malformed(
            "server_name host name is not a DNS name",
        ));
    }
    let name: String = name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect();
    Ok(Some(name))
}

/// Why a connection was not relayed.
#[derive(Debug)]
enum Denial {
    Hello(HelloError),
    NoServerName,
    NotAllowed,
    Closed,
    Slow,
    Read(std::io::Error),
    /// A TCP filter closed it in `proxy_on_new_connection`.
    ClosedByFilter,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hello(error) => error.fmt(f),
            Self::NoServerName => f.write_str("no server name in the ClientHello"),
            Self::NotAllowed => f.write_str("server name not allowed"),
            Self::Closed => f.write_str("closed before the ClientHello was complete"),
            Self::Slow => write!(f, "no complete ClientHello within {HELLO_TIMEOUT:?}"),
            Self::Read(error) => write!(f, "reading the ClientHello: {error}"),
            Self::ClosedByFilter => f.write_str("closed by a TCP filter"),
        }
    }
}

/// Reads until the ClientHello is complete: all bytes read so far and its server name.
async fn read_client_hello(client: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), Denial> {
    let mut buffered = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let room = MAX_HELLO_BYTES
            .saturating_sub(buffered.len())
            .min(chunk.len());
        if room == 0 {
            return Err(Denial::Hello(HelloError::TooLarge));
        }
        let read = client
            .read(&mut chunk[..room])
            .await
            .map_err(Denial::Read)?;
        if read == 0 {
            return Err(Denial::Closed);
        }
        buffered.extend_from_slice(&chunk[..read]);
        match parse_client_hello(&buffered).map_err(Denial::Hello)? {
            ClientHello::Incomplete => continue,
            ClientHello::Complete { server_name } => return Ok((buffered, server_name)),
        }
    }
}

/// One redirected connection to a TLS port, with what its record and upstream need.
pub(super) struct TlsConnection {
    source: SocketAddr,
    destination: SocketAddr,
    source_identity: u32,
    destination_identity: u32,
    mark: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    access: AccessLog,
    /// TCP filters of this flow (`PolicySource::tcp_filters`): run on the relayed bytes.
    filters: Option<Arc<dyn crate::tcp_filter::ConnectionFilters>>,
}

impl ConnRouter {
    /// The TLS policy of this connection, if its port is a `serverNames` port (identities
    /// and policy are looked up once: the connection is one "request").
    pub(super) fn tls_route(&self, access: &AccessLog) -> Option<(TlsConnection, Arc<TlsPolicy>)> {
        let (source_identity, destination_identity) = self.identity_pair();
        let (endpoint_ip, remote_identity) = match self.direction {
            super::Direction::Egress => (self.source.ip(), destination_identity),
            super::Direction::Ingress => (self.destination.ip(), source_identity),
        };
        let policy = self.shared.policies.tls_policy(&PolicyQuery {
            direction: self.direction,
            endpoint_ip,
            port: self.destination.port(),
            remote_identity,
        })?;
        let filters = self.shared.policies.tcp_filters(&PolicyQuery {
            direction: self.direction,
            endpoint_ip,
            port: self.destination.port(),
            remote_identity,
        });
        Some((
            TlsConnection {
                source: self.source,
                destination: self.destination,
                source_identity,
                destination_identity,
                mark: upstream_mark(self.direction, source_identity),
                connect_timeout: self.shared.pools.connect_timeout,
                idle_timeout: self.shared.tls_idle_timeout,
                access: access.clone(),
                filters,
            },
            policy,
        ))
    }
}

impl TlsConnection {
    /// Decides and, if allowed, relays until either side closes.
    pub(super) async fn serve(self, mut client: TcpStream, policy: Arc<TlsPolicy>) {
        if policy.allows_any_connection() {
            let url = format!("tcp://{}", self.destination);
            self.relay(client, Vec::new(), url, RuleRef::AllowAll).await;
            return;
        }
        let read = tokio::time::timeout(HELLO_TIMEOUT, read_client_hello(&mut client)).await;
        let (buffered, server_name) = match read {
            Ok(Ok(hello)) => hello,
            Ok(Err(denial)) => return self.deny(client, None, RuleRef::DefaultDeny, denial),
            Err(_elapsed) => return self.deny(client, None, RuleRef::DefaultDeny, Denial::Slow),
        };
        let Some(server_name) = server_name else {
            return self.deny(client, None, RuleRef::DefaultDeny, Denial::NoServerName);
        };
        match policy.check(&server_name) {
            RuleRef::DefaultDeny => self.deny(
                client,
                Some(&server_name),
                RuleRef::DefaultDeny,
                Denial::NotAllowed,
            ),
            rule => {
                let url = self.url(Some(&server_name));
                match self.start_filters(Some(&server_name)) {
                    Ok(filter) => {
                        self.relay_with(client, buffered, url, rule, filter).await;
                    }
                    Err(()) => self.deny(client, Some(&server_name), rule, Denial::ClosedByFilter),
                }
            }
        }
    }

    fn url(&self, server_name: Option<&str>) -> String {
        match server_name {
            Some(name) => format!("tls://{name}:{}", self.destination.port()),
            None => format!("tls://{}", self.destination),
        }
    }

    /// Resets the client: with `SO_LINGER` 0 the close sends RST, and nothing was forwarded.
    fn deny(&self, client: TcpStream, server_name: Option<&str>, rule: RuleRef, why: Denial) {
        tracing::debug!(source = %self.source, destination = %self.destination, %why, "TLS connection denied");
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        drop(client);
        self.record(
            RecordKind::Denied,
            self.url(server_name),
            Some(rule),
            Some(why.to_string()),
        );
    }

    /// Starts this connection's TCP filters and runs `proxy_on_new_connection`; `Err` when
    /// a filter closed it there.
    fn start_filters(
        &self,
        server_name: Option<&str>,
    ) -> Result<Option<Box<dyn crate::tcp_filter::ConnectionFilterStream>>, ()> {
        use crate::filter::PeerMeta;
        use crate::tcp_filter::{ConnectionMeta, L4Action};
        let Some(filters) = &self.filters else {
            return Ok(None);
        };
        let meta = ConnectionMeta {
            source: PeerMeta {
                address: Some(self.source),
                identity: Some(self.source_identity),
                ..PeerMeta::default()
            },
            destination: PeerMeta {
                address: Some(self.destination),
                identity: Some(self.destination_identity),
                ..PeerMeta::default()
            },
            server_name: server_name.map(str::to_owned),
        };
        let Some(mut filter) = filters.start(meta) else {
            return Ok(None);
        };
        if filter.on_new_connection() == L4Action::Close {
            return Err(());
        }
        Ok(Some(filter))
    }

    async fn relay(&self, client: TcpStream, buffered: Vec<u8>, url: String, rule: RuleRef) {
        match self.start_filters(None) {
            Ok(filter) => self.relay_with(client, buffered, url, rule, filter).await,
            Err(()) => self.deny(client, None, rule, Denial::ClosedByFilter),
        }
    }

    async fn relay_with(
        &self,
        client: TcpStream,
        buffered: Vec<u8>,
        url: String,
        rule: RuleRef,
        filter: Option<Box<dyn crate::tcp_filter::ConnectionFilterStream>>,
    ) {
        self.record(RecordKind::Request, url.clone(), Some(rule), None);
        let connected = crate::upstream::connect_upstream(
            self.destination,
            Some(self.mark),
            self.connect_timeout,
        )
        .await;
        let mut upstream = match connected {
            Ok(upstream) => upstream,
            Err(error) => {
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                drop(client);
                self.record(
                    RecordKind::Response,
                    url,
                    Some(rule),
                    Some(format!("upstream connect failed: {error}")),
                );
                return;
            }
        };
        if let Some(filter) = filter {
            // The filters see the buffered ClientHello as the first client bytes.
            let end = crate::tcp_filter::relay_filtered(
                client,
                upstream,
                buffered,
                filter,
                self.idle_timeout,
            )
            .await;
            tracing::debug!(%url, ?end, "filtered TLS relay ended");
            return;
        }
        if upstream.write_all(&buffered).await.is_err() {
            return;
        }
        // Ends when both directions are closed, on the first error (a reset on either
        // side), or after the idle timeout; dropping both streams then closes both sides.
        if relay_until_idle(client, upstream, self.idle_timeout).await == Relayed::IdledOut {
            tracing::debug!(%url, idle = ?self.idle_timeout, "relayed TLS connection closed after idling");
        }
    }

    fn record(&self, kind: RecordKind, url: String, rule: Option<RuleRef>, error: Option<String>) {
        if !self.access.is_enabled() {
            return;
        }
        self.access.record(AccessRecord {
            kind,
            timestamp: SystemTime::now(),
            version: http::Version::default(),
            method: String::new(),
            url,
            status: None,
            latency: None,
            source: self.source,
            destination: self.destination,
            source_identity: Some(self.source_identity),
            destination_identity: Some(self.destination_identity),
            rule,
            header_log: Vec::new(),
            error,
            filters: Vec::new(),
        });
    }
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
enum Relayed {
    /// Both sides closed, or one failed.
    Closed,
    /// No byte moved either way for the idle timeout.
    IdledOut,
}

/// Copies both ways between `client` and `upstream` until both are closed, either fails, or
/// nothing has been read from either side for `idle`.
async fn relay_until_idle(client: TcpStream, upstream: TcpStream, idle: Duration) -> Relayed {
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` of the last read that returned bytes.
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity {
        stream: client,
        start,
        last: last.clone(),
    };
    let mut upstream = Activity {
        stream: upstream,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let since = start + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = since + idle;
        if tokio::time::Instant::now() >= deadline {
            return Relayed::IdledOut;
        }
        tokio::select! {
            _ = &mut copy => return Relayed::Closed,
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// A stream that notes when a read last returned bytes.
struct Activity {
    stream: TcpStream,
    start: tokio::time::Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncRead for Activity {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Activity {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body (RFC 8446 §4.1.2) with these extensions.
    fn hello_body(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0x42; 32]);
        body.push(32);
        body.extend([0x07; 32]);
        body.extend([0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
        body.extend([0x01, 0x00]);
        let mut list = Vec::new();
        for (kind, data) in extensions {
            list.extend(kind.to_be_bytes());
            list.extend(u16::try_from(data.len()).expect("short").to_be_bytes());
            list.extend(data);
        }
        body.extend(u16::try_from(list.len()).expect("short").to_be_bytes());
        body.extend(list);
        body
    }

    /// A `server_name` extension with these (type, name) entries.
    fn server_name(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend(u16::try_from(name.len()).expect("short").to_be_bytes());
            list.extend(*name);
        }
        let mut data = u16::try_from(list.len())
            .expect("short")
            .to_be_bytes()
            .to_vec();
        data.extend(list);
        (EXTENSION_SERVER_NAME, data)
    }

    /// `body` as a ClientHello handshake message in records of at most `fragment` bytes.
    fn records(body: &[u8], fragment: usize) -> Vec<u8> {
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend(&u32::try_from(body.len()).expect("short").to_be_bytes()[1..]);
        message.extend(body);
        let mut out = Vec::new();
        for chunk in message.chunks(fragment) {
            out.extend([CONTENT_HANDSHAKE, 0x03, 0x01]);
            out.extend(u16::try_from(chunk.len()).expect("short").to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    fn named(name: &str) -> Vec<u8> {
        // Another extension before and after, as real clients send (supported_versions, ALPN).
        records(
            &hello_body(&[
                (43, vec![0x02, 0x03, 0x04]),
                server_name(&[(NAME_TYPE_HOST, name.as_bytes())]),
                (16, b"\x00\x03\x02h2".to_vec()),
            ]),
            MAX_RECORD_LEN,
        )
    }

    fn complete(name: &str) -> Result<ClientHello, HelloError> {
        Ok(ClientHello::Complete {
            server_name: Some(name.to_owned()),
        })
    }

    #[test]
    fn reads_the_server_name() {
        assert_eq!(
            parse_client_hello(&named("API.Example.com")),
            complete("api.example.com")
        );
        // Bytes after the ClientHello (a client that does not wait) are not its business.
        let mut more = named("a.io");
        more.extend(b"\x17\x03\x03\x00\x01x");
        assert_eq!(parse_client_hello(&more), complete("a.io"));
    }

    #[test]
    fn a_real_openssl_client_hello() {
        // `openssl s_client -servername api.example.com` (OpenSSL 3.0), captured on loopback.
        let hello = include_bytes!("testdata/openssl-3.0-client-hello.bin");
        assert_eq!(parse_client_hello(hello), complete("api.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Ok(ClientHello::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_records_may_split_the_message() {
        let whole = named("split.example.com");
        for cut in 0..whole.len() {
            assert_eq!(
                parse_client_hello(&whole[..cut]),
                Ok(ClientHello::Incomplete),
                "cut at {cut}"
            );
        }
        // The handshake message fragmented over records of 1, 3 and 50 bytes.
        let body = hello_body(&[server_name(&[(NAME_TYPE_HOST, b"frag.example.com")])]);
        for fragment in [1, 3, 50] {
            let stream = records(&body, fragment);
            assert_eq!(parse_client_hello(&stream), complete("frag.example.com"));
            assert_eq!(
                parse_client_hello(&stream[..stream.len() - 1]),
                Ok(ClientHello::Incomplete)
            );
        }
    }

    #[test]
    fn no_server_name() {
        let none = Ok(ClientHello::Complete { server_name: None });
        // No server_name extension.
        let stream = records(&hello_body(&[(43, vec![0x02, 0x03, 0x04])]), MAX_RECORD_LEN);
        assert_eq!(parse_client_hello(&stream), none);
        // No extensions at all (TLS 1.2 and older may do that).
        let mut body = hello_body(&[]);
        body.truncate(body.len() - 2);
        assert_eq!(parse_client_hello(&records(&body, MAX_RECORD_LEN)), none);
        // Only a name of another type.
        let stream = records(&hello_body(&[server_name(&[(7, b"x")])]), MAX_RECORD_LEN);
        assert_eq!(parse_client_hello(&stream), none);
    }

    #[test]
    fn not_tls() {
        for stream in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x16\x02",
            // SSLv2-compatible hello.
            b"\x80\x2e\x01\x00\x02",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            assert_eq!(
                parse_client_hello(stream),
                Err(HelloError::NotTls),
                "{stream:?}"
            );
        }
    }

    #[test]
    fn malformed_hellos() {
        let malformed =
            |stream: &[u8]| matches!(parse_client_hello(stream), Err(HelloError::Malformed(_)));
        // Empty record.
        assert!(malformed(b"\x16\x03\x01\x00\x00"));
        // Record longer than TLS allows.
        assert!(malformed(b"\x16\x03\x01\x40\x01"));
        // A ServerHello instead of a ClientHello.
        let mut stream = named("a.io");
        stream[5] = 2;
        assert!(malformed(&stream));
        // The message length claims less than the body has: bytes after the extensions.
        let body = hello_body(&[server_name(&[(NAME_TYPE_HOST, b"a.io")])]);
        let mut short = records(&body, MAX_RECORD_LEN);
        let claimed = body.len() - 1;
        short[6..9].copy_from_slice(&u32::try_from(claimed).expect("short").to_be_bytes()[1..]);
        assert!(malformed(&short));
        // Two server_name extensions, two host names, an empty list, a non-DNS name.
        let twice = server_name(&[(NAME_TYPE_HOST, b"a.io")]);
        assert!(malformed(&records(
            &hello_body(&[twice.clone(), twice]),
            MAX_RECORD_LEN
        )));
        let two_hosts = server_name(&[(NAME_TYPE_HOST, b"a.io"), (NAME_TYPE_HOST, b"b.io")]);
        assert!(malformed(&records(
            &hello_body(&[two_hosts]),
            MAX_RECORD_LEN
        )));
        assert!(malformed(&records(
            &hello_body(&[server_name(&[])]),
            MAX_RECORD_LEN
        )));
        for name in [&b""[..], b"a.io\0.evil", b"a b", "bücher.de".as_bytes()] {
            let ext = server_name(&[(NAME_TYPE_HOST, name)]);
            assert!(
                malformed(&records(&hello_body(&[ext]), MAX_RECORD_LEN)),
                "{name:?}"
            );
        }
        // An alert record in the middle of a fragmented hello.
        let mut interleaved = records(&body, 10);
        interleaved.splice(15..15, *b"\x15\x03\x03\x00\x02\x02\x28");
        assert!(malformed(&interleaved));
    }

    #[test]
    fn oversized_hellos_are_refused_before_they_are_buffered() {
        let mut stream = vec![
            CONTENT_HANDSHAKE,
            0x03,
            0x01,
            0x00,
            0x04,
            HANDSHAKE_CLIENT_HELLO,
        ];
        stream.extend(
            &u32::try_from(MAX_HELLO_BYTES + 1)
                .expect("fits")
                .to_be_bytes()[1..],
        );
        assert_eq!(parse_client_hello(&stream), Err(HelloError::TooLarge));
    }

    #[test]
    fn the_parser_never_panics_on_garbage() {
        // Deterministic xorshift noise over a valid prefix and raw bytes.
        let valid = named("fuzz.example.com");
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut stream = valid.clone();
            let at = usize::try_from(state % valid.len() as u64).expect("fits");
            stream[at] ^= (state >> 32) as u8 | 1;
            if round % 2 == 0 {
                stream.truncate(usize::try_from((state >> 40) % valid.len() as u64).expect("fits"));
            }
            let _ = parse_client_hello(&stream);
        }
    }

    #[test]
    fn policies_decide_by_name() {
        let names = |list: &[&str]| {
            TlsPolicy::server_names(
                list.iter()
                    .map(|n| ServerName::parse(n).expect("name"))
                    .collect(),
            )
        };
        let policy = names(&["api.example.com", "*.cdn.example.com"]);
        assert!(!policy.allows_any_connection());
        assert_eq!(policy.check("api.example.com"), RuleRef::Rule(0));
        assert_eq!(policy.check("img.cdn.example.com"), RuleRef::Rule(1));
        assert_eq!(policy.check("cdn.example.com"), RuleRef::DefaultDeny);
        assert_eq!(policy.check("evil.example.com"), RuleRef::DefaultDeny);
        assert_eq!(names(&[]).check("api.example.com"), RuleRef::DefaultDeny);
        let any = TlsPolicy::any_connection();
        assert!(any.allows_any_connection());
        assert_eq!(any.check("whatever"), RuleRef::AllowAll);
    }
}
