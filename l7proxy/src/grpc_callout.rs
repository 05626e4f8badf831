//! gRPC callouts: the HTTP/2 client that carries filters' gRPC calls and streams
//! (`proxy_grpc_call`, `proxy_grpc_stream`) to their upstreams, with plain types in and out so
//! this crate stays free of the filter host.
//!
//! One [`GrpcCallouts`] per filtered stream: [`GrpcCallouts::start`] opens a call
//! (`POST /service/method`, `content-type: application/grpc`, `te: trailers`,
//! `grpc-timeout`), [`GrpcCallouts::send`] / [`GrpcCallouts::close`] /
//! [`GrpcCallouts::cancel`] feed it, and [`GrpcCallouts::next`] yields what comes back, as
//! Envoy's async gRPC client reports it: initial metadata (response headers), each message
//! (the 5-byte length prefix removed), trailing metadata, and exactly one close with the
//! `grpc-status` and percent-decoded `grpc-message`. Failures the client sees itself close
//! the call with the status Envoy's client gives them: connect error UNAVAILABLE, timeout
//! DEADLINE_EXCEEDED ("upstream request timeout"), a non-200 HTTP status mapped as Envoy's
//! `httpToGrpcStatus`, a reset or a malformed frame INTERNAL, an oversized message
//! RESOURCE_EXHAUSTED. Dropping the [`GrpcCallouts`] resets every call still open.
//!
//! Connections: HTTP/2 with prior knowledge (h2c), one per upstream address shared by the
//! calls of one [`GrpcCalloutClient`], re-dialled when it closed. In transparent mode the
//! sockets carry [`crate::redirect::CALLOUT_MARK`], as HTTP callouts do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use http_body::{Body, Frame};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::filter::HeadPairs;

/// Bound on a call without a timeout of its own, and on any call (as HTTP callouts).
pub const MAX_GRPC_CALLOUT_TIME: Duration = Duration::from_secs(30);
/// Largest message accepted from an upstream (gRPC's default receive limit).
pub const MAX_GRPC_MESSAGE: usize = 4 << 20;
/// Messages a filter may queue on one call before the proxy has written them.
const OUTGOING_QUEUE: usize = 256;
/// Events of all calls of one stream waiting for the filters.
const EVENT_QUEUE: usize = 256;

/// gRPC status codes this client produces.
pub mod code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// One call to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcRequest {
    /// `:authority` (Envoy sends the cluster name: the filter's upstream name).
    pub authority: String,
    /// `/service/method`.
    pub path: String,
    /// Request metadata; pseudo-headers and the names the client sets itself are skipped.
    pub metadata: HeadPairs,
    /// `None`: [`MAX_GRPC_CALLOUT_TIME`].
    pub timeout: Option<Duration>,
}

/// What an upstream sent back, in order; every call ends with one `Close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcCalloutEvent {
    InitialMetadata(HeadPairs),
    Message(Bytes),
    TrailingMetadata(HeadPairs),
    Close { status: u32, message: String },
}

type Conn = SendRequest<OutgoingBody>;

/// Carries gRPC callouts; cheap to clone (one connection per upstream address, shared).
#[derive(Clone)]
pub struct GrpcCalloutClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    mark: Option<u32>,
    connect_timeout: Duration,
    conns: Mutex<HashMap<SocketAddr, Conn>>,
}

impl GrpcCalloutClient {
    /// `mark`: the `SO_MARK` of the sockets (transparent mode; `None` standalone).
    pub fn new(mark: Option<u32>, connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                mark,
                connect_timeout,
                conns: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A call set for one stream.
    pub fn calls(&self) -> GrpcCallouts {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        GrpcCallouts {
            client: self.clone(),
            events_tx,
            events,
            calls: HashMap::new(),
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Conn, String> {
        if let Some(conn) = lock(&self.inner.conns).get(&addr)
            && !conn.is_closed()
        {
            return Ok(conn.clone());
        }
        let stream = connect(addr, self.inner.mark, self.inner.connect_timeout).await?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, "gRPC callout connection ended: {e}");
            }
        });
        lock(&self.inner.conns).insert(addr, send.clone());
        Ok(send)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connect(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket for {addr}: {e}"))?;
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket)
            .set_mark(mark)
            .map_err(|e| format!("SO_MARK on the callout socket to {addr}: {e}"))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out after {timeout:?}"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The gRPC calls of one stream, with one event queue for all of them.
pub struct GrpcCallouts {
    client: GrpcCalloutClient,
    events_tx: mpsc::Sender<(u64, GrpcCalloutEvent)>,
    events: mpsc::Receiver<(u64, GrpcCalloutEvent)>,
    calls: HashMap<u64, OpenCall>,
}

struct OpenCall {
    /// `None` once the sending side is closed.
    outgoing: Option<mpsc::Sender<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        // Aborting drops the request: hyper resets the HTTP/2 stream.
        self.task.abort();
    }
}

impl GrpcCallouts {
    /// Opens call `id` to `addr`. `message`: a unary call's request (the sending side is
    /// closed after it); `None` opens a stream fed by [`GrpcCallouts::send`]. `addr: None`
    /// (no address for the upstream name) closes the call with UNAVAILABLE at once.
    pub fn start(
        &mut self,
        id: u64,
        addr: Option<SocketAddr>,
        request: GrpcRequest,
        message: Option<Bytes>,
    ) {
        let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
        let unary = message.is_some();
        if let Some(m) = message {
            let _ = tx.try_send(frame(&m));
        }
        let events = self.events_tx.clone();
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let status = match addr {
                Some(addr) => run_call(&client, addr, request, rx, id, &events).await,
                None => (
                    code::UNAVAILABLE,
                    "no address for the callout upstream".to_owned(),
                ),
            };
            let (status, message) = status;
            let _ = events
                .send((id, GrpcCalloutEvent::Close { status, message }))
                .await;
        });
        self.calls.insert(
            id,
            OpenCall {
                outgoing: (!unary).then_some(tx),
                task,
            },
        );
    }

    /// Sends one message on stream `id` (framed here); `end_stream` half-closes after it. A
    /// full queue (the upstream does not read) resets the call with RESOURCE_EXHAUSTED.
    pub fn send(&mut self, id: u64, message: &[u8], end_stream: bool) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if let Some(tx) = &call.outgoing
            && tx.try_send(frame(message)).is_err()
        {
            // Reset it; the close below is the last thing reported for it.
            call.task.abort();
            call.outgoing = None;
            let _ = self.events_tx.try_send((
                id,
                GrpcCalloutEvent::Close {
                    status: code::RESOURCE_EXHAUSTED,
                    message: "too many messages queued on the callout".into(),
                },
            ));
            return;
        }
        if end_stream {
            call.outgoing = None;
        }
    }

    /// Half-closes stream `id`: no more messages; the answer still comes.
    pub fn close(&mut self, id: u64) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.outgoing = None;
        }
    }

    /// Resets call `id`; nothing more is reported for it.
    pub fn cancel(&mut self, id: u64) {
        self.calls.remove(&id);
    }

    /// Calls that have not reported their close yet.
    pub fn open_calls(&self) -> usize {
        self.calls.len()
    }

    /// The next event of any open call; `None` when no call is open. After a `Close` the
    /// call is forgotten.
    pub async fn next(&mut self) -> Option<(u64, GrpcCalloutEvent)> {
        loop {
            if self.calls.is_empty() {
                return None;
            }
            let (id, event) = self.events.recv().await?;
            if !self.calls.contains_key(&id) {
                // A cancelled call's last words.
                continue;
            }
            if matches!(event, GrpcCalloutEvent::Close { .. }) {
                self.calls.remove(&id);
            }
            return Some((id, event));
        }
    }
}

/// The 5-byte gRPC message prefix (uncompressed, big-endian length) and the message.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Runs one call to its end; returns the close status. Events before the close go to
/// `events`.
async fn run_call(
    client: &GrpcCalloutClient,
    addr: SocketAddr,
    request: GrpcRequest,
    outgoing: mpsc::Receiver<Bytes>,
    id: u64,
    events: &mpsc::Sender<(u64, GrpcCalloutEvent)>,
) -> (u32, String) {
    let timeout = request
        .timeout
        .filter(|t| !t.is_zero())
        .map_or(MAX_GRPC_CALLOUT_TIME, |t| t.min(MAX_GRPC_CALLOUT_TIME));
    let exchange = async {
        let mut conn = client
            .connection(addr)
            .await
            .map_err(|e| (code::UNAVAILABLE, format!("upstream connect error: {e}")))?;
        let request = build_request(&request, timeout, outgoing)
            .map_err(|e| (code::INTERNAL, format!("invalid callout request: {e}")))?;
        conn.ready()
            .await
            .map_err(|e| (code::UNAVAILABLE, format!("upstream connection: {e}")))?;
        let response = conn
            .send_request(request)
            .await
            .map_err(|e| (code::UNAVAILABLE, format!("upstream reset: {e}")))?;
        read_response(response, id, events).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(status)) | Ok(Err(status)) => status,
        Err(_) => (
            code::DEADLINE_EXCEEDED,
            "upstream request timeout".to_owned(),
        ),
    }
}

/// Names the client sets itself (a filter's metadata must not override them).
fn reserved(name: &str) -> bool {
    name.starts_with(':')
        || matches!(
            name,
            "content-type" | "te" | "grpc-timeout" | "connection" | "host" | "transfer-encoding"
        )
}

fn build_request(
    request: &GrpcRequest,
    timeout: Duration,
    outgoing: mpsc::Receiver<Bytes>,
) -> Result<Request<OutgoingBody>, String> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(request.authority.as_str())
        .path_and_query(request.path.as_str())
        .build()
        .map_err(|e| format!("{}{}: {e}", request.authority, request.path))?;
    let mut req = Request::new(OutgoingBody { rx: outgoing });
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let headers = req.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    // grpc-timeout: at most 8 digits; milliseconds cover MAX_GRPC_CALLOUT_TIME.
    if let Ok(v) = HeaderValue::from_str(&format!("{}m", timeout.as_millis().max(1))) {
        headers.insert("grpc-timeout", v);
    }
    for (name, value) in &request.metadata {
        let lower = name.to_ascii_lowercase();
        if reserved(&lower) {
            continue;
        }
        let name = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| format!("invalid metadata name {name:?}"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("invalid value for metadata {name}"))?;
        headers.append(name, value);
    }
    Ok(req)
}

fn pairs(headers: &http::HeaderMap) -> HeadPairs {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// The close status in trailers (or a trailers-only head).
fn trailer_status(trailers: &http::HeaderMap) -> (u32, String) {
    let status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let message = trailers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    match status {
        Some(s) => (s, message),
        None => (code::UNKNOWN, "no grpc-status in the trailers".into()),
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
pub fn http_to_grpc_status(http: u16) -> u32 {
    match http {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec); invalid escapes stay as is.
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(h) = std::str::from_utf8(hex)
            && let Ok(b) = u8::from_str_radix(h, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_response(
    response: http::Response<hyper::body::Incoming>,
    id: u64,
    events: &mpsc::Sender<(u64, GrpcCalloutEvent)>,
) -> Result<(u32, String), (u32, String)> {
    let emit = |event| async move {
        // The stream's event queue is gone: the stream ended; nobody listens.
        events
            .send((id, event))
            .await
            .map_err(|_| (code::UNKNOWN, "stream gone".to_owned()))
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err((
            http_to_grpc_status(parts.status.as_u16()),
            format!("upstream answered HTTP {}", parts.status.as_u16()),
        ));
    }
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only: Envoy reports the head as trailing metadata.
        emit(GrpcCalloutEvent::TrailingMetadata(pairs(&parts.headers))).await?;
        return Ok(trailer_status(&parts.headers));
    }
    emit(GrpcCalloutEvent::InitialMetadata(pairs(&parts.headers))).await?;
    let mut buf = BytesMut::new();
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => {
                return Err((
                    code::INTERNAL,
                    "the upstream ended the stream without trailers".into(),
                ));
            }
            Some(Err(e)) => return Err((code::INTERNAL, format!("upstream reset: {e}"))),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                buf.extend_from_slice(&data);
                while let Some(message) = next_message(&mut buf)? {
                    emit(GrpcCalloutEvent::Message(message)).await?;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            if !buf.is_empty() {
                return Err((
                    code::INTERNAL,
                    "a truncated message before the trailers".into(),
                ));
            }
            emit(GrpcCalloutEvent::TrailingMetadata(pairs(&trailers))).await?;
            return Ok(trailer_status(&trailers));
        }
    }
}

/// Takes one complete message off `buf`, if there is one.
fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, (u32, String)> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err((
            code::INTERNAL,
            "compressed messages are not supported (no grpc-encoding was offered)".into(),
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_GRPC_MESSAGE {
        return Err((
            code::RESOURCE_EXHAUSTED,
            format!("message of {len} bytes exceeds the limit of {MAX_GRPC_MESSAGE}"),
        ));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// The request body: framed messages as the filter sends them; ends when the sending side is
/// closed (the sender dropped).
pub struct OutgoingBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_unframed() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b"hello"));
        buf.extend_from_slice(&frame(b""));
        buf.extend_from_slice(&frame(b"xy")[..4]);
        assert_eq!(
            next_message(&mut buf),
            Ok(Some(Bytes::from_static(b"hello")))
        );
        assert_eq!(next_message(&mut buf), Ok(Some(Bytes::new())));
        assert_eq!(next_message(&mut buf), Ok(None), "a partial prefix waits");
        let mut bad = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert_eq!(next_message(&mut bad).map_err(|e| e.0), Err(code::INTERNAL));
        let mut big = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            next_message(&mut big).map_err(|e| e.0),
            Err(code::RESOURCE_EXHAUSTED)
        );
    }

    #[test]
    fn statuses_as_envoy_maps_them() {
        assert_eq!(http_to_grpc_status(503), code::UNAVAILABLE);
        assert_eq!(http_to_grpc_status(404), code::UNIMPLEMENTED);
        assert_eq!(http_to_grpc_status(500), code::UNKNOWN);
        assert_eq!(percent_decode(b"a%20b%zz%"), "a b%zz%");
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("7"));
        t.insert("grpc-message", HeaderValue::from_static("no%21"));
        assert_eq!(trailer_status(&t), (7, "no!".to_owned()));
        assert_eq!(trailer_status(&http::HeaderMap::new()).0, code::UNKNOWN);
    }
}
