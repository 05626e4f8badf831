//! Strict HTTP/1 framing checks on the raw client byte stream, in front of hyper.
//!
//! Owns the request-smuggling defences that hyper does not give us by itself. hyper (1.x)
//! silently repairs several ambiguous messages instead of rejecting them: it drops a
//! Content-Length that comes with Transfer-Encoding, collapses duplicate equal
//! Content-Lengths, and accepts bare LF line endings. Repairing is safe for hyper's own view,
//! but a proxy must not guess when the client and another hop could disagree, so such
//! requests are answered 400 and never forwarded (RFC 9112 §6.3, §2.2, §5.2).
//!
//! How: [`StrictIo`] wraps the accepted socket. It tracks HTTP/1 message framing (head, then
//! a Content-Length or chunked body, then the next pipelined head) and releases the bytes of a
//! request head to hyper only once the whole head has been validated. On a violation it hands
//! hyper a few bytes that hyper's parser rejects (so hyper itself writes `400 Bad Request`
//! and closes the connection after answering the requests before it), then end-of-stream.
//! Nothing of the offending head ever reaches the policy or the upstream.
//!
//! HTTP/2 (prior-knowledge preface) and upgraded connections (after a request with
//! `Connection: upgrade` or `CONNECT`) are passed through untouched: h2 has its own framing,
//! checked by the `h2` crate, and a tunnel is no longer HTTP. The proxy closes a connection
//! whose upgrade did not happen, so no HTTP request is ever read in passthrough mode.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Limits on one request head (and on chunked trailers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Bytes of request line plus header lines plus the empty line. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Number of header fields. Default 100.
    pub max_headers: usize,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}

/// Why a request was rejected as malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("line ending is a bare LF, not CRLF")]
    BareLf,
    #[error("obsolete line folding (a header line starting with whitespace)")]
    ObsFold,
    #[error("invalid request line")]
    RequestLine,
    #[error("invalid header name in line {line:?}")]
    HeaderName { line: String },
    #[error("invalid byte {byte:#04x} in the value of header {name:?}")]
    HeaderValueByte { name: String, byte: u8 },
    #[error("Content-Length together with Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    #[error("more than one Content-Length header")]
    DuplicateContentLength,
    #[error("invalid Content-Length {value:?}")]
    InvalidContentLength { value: String },
    #[error("unsupported Transfer-Encoding {value:?}: only a single \"chunked\" is accepted")]
    UnsupportedTransferEncoding { value: String },
    #[error("more than one Transfer-Encoding header")]
    DuplicateTransferEncoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkDataEnd,
}

/// Result of feeding bytes to the [`FramingValidator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// Leading bytes of the input that are validated and may be handed to hyper.
    pub released: usize,
    /// Set when the bytes after `released` break the rules; the connection is done.
    pub violation: Option<Violation>,
}

pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A chunk-size line is hex digits plus extensions; nothing legitimate comes near this.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunk sizes above 16 hex digits overflow u64.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;

#[derive(Debug, Clone)]
enum State {
    /// Connection start: is it the HTTP/2 preface?
    Start,
    Head(Head),
    FixedBody {
        remaining: u64,
    },
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    ChunkDataEnd,
    Trailers {
        bytes: usize,
        fields: usize,
    },
    /// HTTP/2 or an upgraded connection: no more HTTP/1 framing to check.
    Passthrough,
    Failed,
}

/// What we learned while scanning one request head.
#[derive(Debug, Clone, Default)]
struct Head {
    /// Bytes of the head already validated (complete lines), from its first byte.
    scanned: usize,
    request_line_seen: bool,
    http10: bool,
    connect: bool,
    fields: usize,
    content_length: Option<u64>,
    transfer_encoding: bool,
    hosts: usize,
    upgrade: bool,
    connection_upgrade: bool,
}

/// The HTTP/1 framing state machine over the client byte stream.
#[derive(Debug, Clone)]
pub struct FramingValidator {
    limits: HeaderLimits,
    state: State,
    /// The message being read asked to switch protocols: pass through after it.
    upgrade_after_message: bool,
    /// Request heads validated so far.
    heads: u64,
}

fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// field-vchar / SP / HTAB (obs-text allowed as RFC 9110 §5.5 does).
fn is_field_byte(byte: u8) -> bool {
    byte == b'\t' || byte == b' ' || (0x21..=0x7e).contains(&byte) || byte >= 0x80
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Finds the next line in `data` from `start`: returns the line without its CRLF and the
/// offset after the LF, or `None` when no LF has arrived yet.
fn next_line(data: &[u8], start: usize) -> Option<Result<(&[u8], usize), Violation>> {
    let newline = start + data[start..].iter().position(|&b| b == b'\n')?;
    if newline == start || data[newline - 1] != b'\r' {
        return Some(Err(Violation::BareLf));
    }
    Some(Ok((&data[start..newline - 1], newline + 1)))
}

impl Head {
    fn request_line(&mut self, line: &[u8]) -> Result<(), Violation> {
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Violation::RequestLine);
        };
        if method.is_empty()
            || !method.iter().copied().all(is_tchar)
            || target.is_empty()
            || !target.iter().all(|b| (0x21..=0x7e).contains(b))
        {
            return Err(Violation::RequestLine);
        }
        self.http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return Err(Violation::RequestLine),
        };
        self.connect = method == b"CONNECT";
        self.request_line_seen = true;
        Ok(())
    }

    fn field_line(&mut self, line: &[u8], limits: &HeaderLimits) -> Result<(), Violation> {
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(Violation::ObsFold);
        }
        self.fields += 1;
        if self.fields > limits.max_headers {
            return Err(Violation::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        let colon = line.iter().position(|&b| b == b':');
        let name = match colon {
            // No whitespace before the colon (RFC 9112 §5.1): ' ' is not a tchar.
            Some(colon) if colon > 0 && line[..colon].iter().copied().all(is_tchar) => {
                &line[..colon]
            }
            _ => {
                return Err(Violation::HeaderName {
                    line: String::from_utf8_lossy(line).into_owned(),
                });
            }
        };
        let value = &line[name.len() + 1..];
        if let Some(&byte) = value.iter().find(|&&b| !is_field_byte(b)) {
            return Err(Violation::HeaderValueByte {
                name: String::from_utf8_lossy(name).into_owned(),
                byte,
            });
        }
        let value = trim_ows(value);
        if name.eq_ignore_ascii_case(b"content-length") {
            if self.content_length.is_some() {
                return Err(Violation::DuplicateContentLength);
            }
            let invalid = || Violation::InvalidContentLength {
                value: String::from_utf8_lossy(value).into_owned(),
            };
            // Digits only: no sign, no list ("5, 5"), no whitespace inside; 19 digits fit u64.
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return Err(invalid());
            }
            let text = std::str::from_utf8(value).map_err(|_| invalid())?;
            self.content_length = Some(text.parse().map_err(|_| invalid())?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if self.transfer_encoding {
                return Err(Violation::DuplicateTransferEncoding);
            }
            // Other codings in requests are practically unused and each is one more way for
            // two parsers to disagree.
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(Violation::UnsupportedTransferEncoding {
                    value: String::from_utf8_lossy(value).into_owned(),
                });
            }
            self.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            self.hosts += 1;
            if self.hosts > 1 {
                return Err(Violation::DuplicateHost);
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.connection_upgrade |= value
                .split(|&b| b == b',')
                .any(|token| trim_ows(token).eq_ignore_ascii_case(b"upgrade"));
        }
        Ok(())
    }
}

impl FramingValidator {
    pub fn new(limits: HeaderLimits) -> Self {
        Self {
            limits,
            state: State::Start,
            upgrade_after_message: false,
            heads: 0,
        }
    }

    /// True once the stream is HTTP/2 or upgraded: no more checks.
    pub fn is_passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Request heads validated so far (released once each).
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// True between two HTTP/1 messages: every byte validated so far belongs to a complete
    /// message, and no line of the next head has been seen.
    pub fn between_messages(&self) -> bool {
        match &self.state {
            State::Start => true,
            State::Head(head) => head.scanned == 0,
            _ => false,
        }
    }

    fn next_message(&mut self) -> State {
        if self.upgrade_after_message {
            State::Passthrough
        } else {
            State::Head(Head::default())
        }
    }

    /// Validates `data`, which must start at the first byte not yet released by an earlier
    /// call (unreleased bytes are passed again, followed by new ones).
    pub fn advance(&mut self, data: &[u8]) -> Advance {
        let mut released = 0;
        let violation = loop {
            match self.step(&data[released..]) {
                Ok(None) => break None,
                // Some(0) is a state change without bytes; every state makes progress or
                // returns None on the next call, so this loop ends.
                Ok(Some(n)) => released += n,
                Err(violation) => {
                    self.state = State::Failed;
                    break Some(violation);
                }
            }
        };
        Advance {
            released,
            violation,
        }
    }

    /// One step: `Some(n)` released n bytes (0 = state change only, call again), `None` needs
    /// more input.
    fn step(&mut self, data: &[u8]) -> Result<Option<usize>, Violation> {
        let limits = self.limits;
        match &mut self.state {
            State::Start => {
                let n = data.len().min(H2_PREFACE.len());
                if data[..n] != H2_PREFACE[..n] {
                    self.state = State::Head(Head::default());
                    return Ok(Some(0));
                }
                if n == H2_PREFACE.len() {
                    self.state = State::Passthrough;
                    return Ok(Some(data.len()));
                }
                Ok(None)
            }
            State::Passthrough => Ok(if data.is_empty() {
                None
            } else {
                Some(data.len())
            }),
            State::Failed => Ok(None),
            State::Head(head) => loop {
                let Some(line) = next_line(data, head.scanned) else {
                    if data.len() > limits.max_header_bytes {
                        return Err(Violation::HeadTooLarge {
                            limit: limits.max_header_bytes,
                        });
                    }
                    return Ok(None);
                };
                let (line, end) = line?;
                if end > limits.max_header_bytes {
                    return Err(Violation::HeadTooLarge {
                        limit: limits.max_header_bytes,
                    });
                }
                head.scanned = end;
                if !head.request_line_seen {
                    // RFC 9112 §2.2: a server SHOULD ignore empty lines before the
                    // request line (they still count towards the size limit).
                    if !line.is_empty() {
                        head.request_line(line)?;
                    }
                    continue;
                }
                if !line.is_empty() {
                    head.field_line(line, &limits)?;
                    continue;
                }
                // End of head: decide the body framing (RFC 9112 §6.3).
                let head = std::mem::take(head);
                if head.transfer_encoding && head.content_length.is_some() {
                    return Err(Violation::ContentLengthWithTransferEncoding);
                }
                if head.transfer_encoding && head.http10 {
                    return Err(Violation::TransferEncodingInHttp10);
                }
                if !head.http10 && head.hosts == 0 {
                    return Err(Violation::MissingHost);
                }
                self.upgrade_after_message =
                    head.connect || (head.upgrade && head.connection_upgrade);
                self.heads += 1;
                self.state = if head.transfer_encoding {
                    State::ChunkSize
                } else {
                    match head.content_length {
                        Some(remaining) if remaining > 0 => State::FixedBody { remaining },
                        _ => self.next_message(),
                    }
                };
                return Ok(Some(head.scanned));
            },
            State::FixedBody { remaining } | State::ChunkData { remaining } => {
                if data.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                // `take` ≤ `remaining`, so this cannot underflow.
                *remaining -= take as u64;
                if *remaining == 0 {
                    self.state = match self.state {
                        State::ChunkData { .. } => State::ChunkDataEnd,
                        _ => self.next_message(),
                    };
                }
                Ok(Some(take))
            }
            State::ChunkDataEnd => match data {
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkSize;
                    Ok(Some(2))
                }
                [] | [b'\r'] => Ok(None),
                _ => Err(Violation::ChunkDataEnd),
            },
            State::ChunkSize => {
                let Some(line) = next_line(data, 0) else {
                    return if data.len() > MAX_CHUNK_LINE {
                        Err(Violation::ChunkSize)
                    } else {
                        Ok(None)
                    };
                };
                let (line, end) = line.map_err(|_| Violation::ChunkSize)?;
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS || end > MAX_CHUNK_LINE {
                    return Err(Violation::ChunkSize);
                }
                // chunk-ext: BWS ";" ... ; any field bytes after the ';', nothing else.
                let ext = trim_ows(&line[digits..]);
                if !ext.is_empty() && (ext[0] != b';' || !ext.iter().copied().all(is_field_byte)) {
                    return Err(Violation::ChunkSize);
                }
                let size = std::str::from_utf8(&line[..digits])
                    .ok()
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .ok_or(Violation::ChunkSize)?;
                self.state = if size == 0 {
                    State::Trailers {
                        bytes: 0,
                        fields: 0,
                    }
                } else {
                    State::ChunkData { remaining: size }
                };
                Ok(Some(end))
            }
            State::Trailers { bytes, fields } => {
                let Some(line) = next_line(data, 0) else {
                    return if *bytes + data.len() > limits.max_header_bytes {
                        Err(Violation::HeadTooLarge {
                            limit: limits.max_header_bytes,
                        })
                    } else {
                        Ok(None)
                    };
                };
                let (line, end) = line?;
                *bytes += end;
                if *bytes > limits.max_header_bytes {
                    return Err(Violation::HeadTooLarge {
                        limit: limits.max_header_bytes,
                    });
                }
                if line.is_empty() {
                    self.state = self.next_message();
                    return Ok(Some(end));
                }
                *fields += 1;
                // Trailer lines follow the header-line grammar; framing fields in trailers
                // are ignored by hyper, so only the syntax matters here.
                let mut scratch = Head {
                    fields: *fields - 1,
                    ..Head::default()
                };
                scratch.field_line(line, &limits)?;
                Ok(Some(end))
            }
        }
    }
}

/// Bytes hyper's HTTP/1 parser rejects as a request head (NUL is not a token character), so
/// hyper answers `400 Bad Request` and closes.
const POISON: &[u8] = b"\0\r\n\r\n";

/// Called once with the violation when a connection is rejected (for access records).
pub type ViolationHook = Box<dyn FnOnce(&Violation) + Send + Sync>;

/// What moves on a connection, shared between the [`StrictIo`] hyper owns and the driver of
/// the connection: the last time bytes moved (the idle timeout), and where the request stream
/// stands, so the driver can tell when hyper holds nothing but an idle keep-alive connection
/// and put it to rest (`proxy::serve_connection`).
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    /// Request heads handed over (or about to be: see `between_messages`).
    heads: AtomicU64,
    /// Every byte handed to hyper so far ends a complete message, none is held back, the
    /// stream is HTTP/1 and not rejected.
    between_messages: AtomicBool,
    /// The last write to the socket would have blocked: hyper still holds bytes to send.
    write_blocked: AtomicBool,
    /// Set by the driver before a graceful hyper shutdown that must leave the socket open:
    /// `poll_shutdown` then only flushes.
    keep_open: AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            between_messages: AtomicBool::new(true),
            write_blocked: AtomicBool::new(false),
            keep_open: AtomicBool::new(false),
        })
    }

    /// Request heads handed to hyper so far.
    pub fn heads(&self) -> u64 {
        self.heads.load(Ordering::Relaxed)
    }

    /// Between two HTTP/1 messages with nothing held back and nothing left to write.
    pub fn at_rest(&self) -> bool {
        self.between_messages.load(Ordering::Relaxed) && !self.write_blocked.load(Ordering::Relaxed)
    }

    /// While set, shutting the [`StrictIo`] down flushes it and leaves the socket open.
    pub fn set_keep_open(&self, keep_open: bool) {
        self.keep_open.store(keep_open, Ordering::Relaxed);
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When bytes last moved.
    pub fn last(&self) -> Instant {
        self.origin + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The client socket as hyper sees it: validated HTTP/1 heads only (see the module docs).
pub struct StrictIo<S> {
    inner: S,
    validator: FramingValidator,
    /// Bytes read from `inner` that hyper has not received yet; the first `released` of
    /// them are validated.
    pending: Vec<u8>,
    released: usize,
    /// After a violation: the poison still to hand over, then end-of-stream.
    poison: Option<&'static [u8]>,
    failed: bool,
    on_violation: Option<ViolationHook>,
    activity: Arc<Activity>,
}

impl<S> StrictIo<S> {
    pub fn new(inner: S, limits: HeaderLimits, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            validator: FramingValidator::new(limits),
            pending: Vec::new(),
            released: 0,
            poison: None,
            failed: false,
            on_violation: None,
            activity,
        }
    }

    /// Runs `hook` when the connection is rejected.
    pub fn on_violation(mut self, hook: ViolationHook) -> Self {
        self.on_violation = Some(hook);
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// True when bytes read from the socket wait to be handed over.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.poison.is_some()
    }

    /// Tells the driver where the request stream stands (see [`Activity`]).
    fn publish(&self) {
        self.activity
            .heads
            .store(self.validator.heads(), Ordering::Relaxed);
        self.activity.between_messages.store(
            self.validator.between_messages() && self.pending.is_empty() && !self.failed,
            Ordering::Relaxed,
        );
    }

    fn fail(&mut self, violation: Violation) {
        tracing::debug!(%violation, "rejecting malformed HTTP/1 request");
        self.failed = true;
        self.poison = Some(POISON);
        if let Some(hook) = self.on_violation.take() {
            hook(&violation);
        }
    }

    /// Hands over released bytes from `pending`; returns false when there are none.
    fn drain_released(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.released == 0 || out.remaining() == 0 {
            return false;
        }
        let n = self.released.min(out.remaining());
        out.put_slice(&self.pending[..n]);
        self.pending.drain(..n);
        self.released -= n;
        if self.pending.is_empty() && self.pending.capacity() > 16 * 1024 {
            // Do not keep a large head's buffer on an idle keep-alive connection.
            self.pending = Vec::new();
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StrictIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = this.poll_read_validated(cx, out);
        this.publish();
        polled
    }
}

impl<S: AsyncRead + Unpin> StrictIo<S> {
    fn poll_read_validated(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.drain_released(out) {
                return Poll::Ready(Ok(()));
            }
            if let Some(poison) = this.poison.take() {
                let n = poison.len().min(out.remaining());
                out.put_slice(&poison[..n]);
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Ok(()));
            }
            if this.pending.is_empty() {
                if this.validator.is_passthrough() {
                    let before = out.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                    if out.filled().len() > before {
                        this.activity.touch();
                    }
                    return Poll::Ready(Ok(()));
                }
                // Fast path: read straight into hyper's buffer and hold back only what is
                // not validated yet (an incomplete head).
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                let read = out.filled().len() - before;
                if read == 0 {
                    return Poll::Ready(Ok(()));
                }
                this.activity.touch();
                let advance = this.validator.advance(&out.filled()[before..]);
                this.pending
                    .extend_from_slice(&out.filled()[before + advance.released..]);
                out.set_filled(before + advance.released);
                if let Some(violation) = advance.violation {
                    this.pending.clear();
                    this.fail(violation);
                }
                if advance.released > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Slow path: an incomplete head is waiting in `pending`; append and re-validate.
            let old = this.pending.len();
            this.pending.resize(old + 8 * 1024, 0);
            let mut buf = ReadBuf::new(&mut this.pending[old..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut buf);
            let read = buf.filled().len();
            this.pending.truncate(old + read);
            ready!(polled)?;
            if read == 0 {
                // End of stream inside a head: hyper sees a clean EOF.
                this.pending.clear();
                return Poll::Ready(Ok(()));
            }
            this.activity.touch();
            let advance = this.validator.advance(&this.pending);
            this.released = advance.released;
            if let Some(violation) = advance.violation {
                this.pending.truncate(advance.released);
                this.fail(violation);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StrictIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        let written = ready!(polled)?;
        this.activity.touch();
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity
            .write_blocked
            .store(polled.is_pending(), Ordering::Relaxed);
        let written = ready!(polled)?;
        this.activity.touch();
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.keep_open.load(Ordering::Relaxed) {
            // The driver takes the socket back to wait for the next request.
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (usize, Option<Violation>) {
        let mut validator = FramingValidator::new(HeaderLimits::default());
        let advance = validator.advance(input);
        (advance.released, advance.violation)
    }

    /// Feeds `input` one byte at a time, the way a slow client would, re-passing unreleased
    /// bytes like `StrictIo` does.
    fn run_bytewise(input: &[u8], limits: HeaderLimits) -> (usize, Option<Violation>) {
        let mut validator = FramingValidator::new(limits);
        let mut released = 0;
        for end in 1..=input.len() {
            let advance = validator.advance(&input[released..end]);
            released += advance.released;
            if advance.violation.is_some() {
                return (released, advance.violation);
            }
        }
        (released, None)
    }

    #[test]
    fn accepts_well_formed_pipelines() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\nA;name=value\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Obs-Text: caf\xc3\xa9\r\nX-Tab:\tv\t\r\n\r\n",
        ];
        for input in cases {
            assert_eq!(
                run(input),
                (input.len(), None),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            let default = HeaderLimits::default();
            assert_eq!(
                run_bytewise(input, default),
                (input.len(), None),
                "bytewise {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn rejects_smuggling_vectors() {
        use Violation as V;
        let cases: Vec<(&[u8], Violation)> = vec![
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", V::ContentLengthWithTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", V::ContentLengthWithTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", V::DuplicateContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", V::InvalidContentLength { value: "5, 5".into() }),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", V::InvalidContentLength { value: "+5".into() }),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", V::InvalidContentLength { value: "99999999999999999999".into() }),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", V::UnsupportedTransferEncoding { value: "gzip, chunked".into() }),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", V::DuplicateTransferEncoding),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", V::TransferEncodingInHttp10),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", V::ObsFold),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", V::BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", V::BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\n", V::BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", V::HeaderValueByte { name: "X-A".into(), byte: b'\r' }),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n", V::HeaderValueByte { name: "X-A".into(), byte: 0 }),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", V::HeaderName { line: "X-A : b".into() }),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n", V::HeaderName { line: "X(A): b".into() }),
            (b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", V::HeaderName { line: "no colon".into() }),
            (b"GET / HTTP/1.1\r\n\r\n", V::MissingHost),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", V::DuplicateHost),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", V::RequestLine),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", V::RequestLine),
            (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", V::RequestLine),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", V::ChunkSize),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n", V::ChunkDataEnd),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n", V::ChunkSize),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", V::ChunkSize),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\n", V::ChunkSize),
        ];
        for (input, want) in cases {
            let text = String::from_utf8_lossy(input).into_owned();
            let (released, violation) = run(input);
            assert_eq!(violation.as_ref(), Some(&want), "{text:?}");
            // An offending head is never released; a chunked body is checked as it streams.
            if !matches!(want, V::ChunkSize | V::ChunkDataEnd) {
                assert_eq!(released, 0, "{text:?}");
            }
            assert_eq!(
                run_bytewise(input, HeaderLimits::default()).1,
                Some(want),
                "bytewise {text:?}"
            );
        }
    }

    #[test]
    fn a_bad_second_request_releases_only_the_first() {
        let first = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(
            b"GET /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            run(&input),
            (first.len(), Some(Violation::DuplicateContentLength))
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = HeaderLimits {
            max_header_bytes: 64,
            max_headers: 3,
        };
        let mut validator = FramingValidator::new(limits);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64)
        );
        assert_eq!(
            validator.advance(big.as_bytes()).violation,
            Some(Violation::HeadTooLarge { limit: 64 })
        );
        // No end of line yet, but already too long: rejected without waiting for more.
        let mut validator = FramingValidator::new(limits);
        let partial = format!("GET /{} ", "a".repeat(80));
        assert_eq!(
            validator.advance(partial.as_bytes()).violation,
            Some(Violation::HeadTooLarge { limit: 64 })
        );
        let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(
            run_bytewise(many.as_bytes(), limits).1,
            Some(Violation::TooManyHeaders { limit: 3 })
        );
        let three = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(run_bytewise(three.as_bytes(), limits), (three.len(), None));
    }

    #[test]
    fn http2_preface_and_upgrades_pass_through() {
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything \n goes");
        assert_eq!(run(&h2), (h2.len(), None));
        assert_eq!(run_bytewise(&h2, HeaderLimits::default()), (h2.len(), None));
        let ws = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello\n\n";
        assert_eq!(run(ws), (ws.len(), None));
        // Upgrade without the Connection token is a plain request: checks continue.
        let not_ws = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(run(not_ws).1, Some(Violation::BareLf));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Fragments that assemble into valid, invalid and borderline HTTP/1 streams.
        fn fragment() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(b"GET / HTTP/1.1\r\n".to_vec()),
                Just(b"POST /x HTTP/1.0\r\n".to_vec()),
                Just(b"Host: a\r\n".to_vec()),
                Just(b"Content-Length: 3\r\n".to_vec()),
                Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
                Just(b"Connection: upgrade\r\nUpgrade: x\r\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"abc".to_vec()),
                Just(b"3\r\nabc\r\n".to_vec()),
                Just(b"0\r\n\r\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b" x".to_vec()),
                Just(H2_PREFACE[..10].to_vec()),
                proptest::collection::vec(any::<u8>(), 0..8),
            ]
        }

        fn stream() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(fragment(), 0..24).prop_map(|parts| parts.concat())
        }

        proptest! {
            /// However the bytes are split across reads, the validator releases the same
            /// bytes and finds the same violation (StrictIo re-passes unreleased bytes).
            #[test]
            fn split_points_do_not_change_the_outcome(
                input in stream(),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let limits = HeaderLimits { max_header_bytes: 256, max_headers: 8 };
                let mut whole = FramingValidator::new(limits);
                let expected = whole.advance(&input);

                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
                points.push(input.len());
                points.sort_unstable();
                let mut split = FramingValidator::new(limits);
                let mut released = 0;
                let mut violation = None;
                for end in points {
                    if end < released || violation.is_some() {
                        continue;
                    }
                    let advance = split.advance(&input[released..end]);
                    released += advance.released;
                    violation = advance.violation;
                }
                prop_assert_eq!(released, expected.released);
                prop_assert_eq!(violation, expected.violation);
                prop_assert!(released <= input.len());
            }
        }
    }
}
