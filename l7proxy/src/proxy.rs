//! Per-request HTTP proxying and the per-connection driver shared by every listener mode
//! (standalone and transparent): policy check, the 403 reply, forwarding to the upstream
//! over pooled connections (optionally `SO_MARK`ed), upstream failure replies, upgrade
//! (WebSocket) tunnels, and access records.
//!
//! Owns the request phases, in order: (1) reject what the proxy cannot carry (CONNECT, an
//! HTTP/2 request over the header limits); (2) the policy decides, possibly rewriting headers;
//! a denial is answered `403 Access denied\r\n` and never forwarded; (3) hop-by-hop headers
//! are dropped (RFC 9110 §7.6.1) and the request is sent upstream as HTTP/1.1 with its body
//! streamed; (4) the response head is recorded and the body streamed back. Nothing here
//! buffers a body.
//!
//! Must not know how connections were accepted: a listener hands in a [`ConnInfo`] whose
//! [`Router`] says, for every request, which policy applies, which identities the access
//! records carry and which upstream client (connection pool) carries the request. Asking per
//! request (not per connection) is what lets a new policy snapshot or a changed identity
//! apply to the next request of a kept-alive connection without dropping it.

use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access::{AccessLog, AccessRecord, RecordKind};
use crate::filter::{FilterAction, FilterReply, HttpFilters, PeerMeta, StreamMeta};
use crate::filter_path::{
    BoxError, CalloutClient, FilteredBody, RequestBody, SharedFilters, apply_request_head,
    apply_response_head, callout_client, request_head, response_head, settle,
};
use crate::grpc_callout::GrpcCalloutClient;
use crate::policy::{HttpPolicy, RequestParts, RuleRef, Verdict};
use crate::strict::{Activity, H2_PREFACE, HeaderLimits, StrictIo};

/// Cilium's deny body (cilium/proxy l7policy.proto `denied_403_body` default plus CRLF).
pub const ACCESS_DENIED_BODY: &str = "Access denied\r\n";

/// How much of a denied HTTP/1 request's body we read and discard so the connection can
/// serve the next keep-alive request; beyond this (or the time below) we close instead.
const DENIED_BODY_DRAIN_LIMIT: usize = 64 * 1024;
const DENIED_BODY_DRAIN_TIME: Duration = Duration::from_secs(1);
/// Connect timeout of filters' callout connections (HTTP and gRPC); a call's own timeout
/// bounds the whole exchange.
const CALLOUT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listener knows about one accepted client connection.
pub(crate) struct ConnInfo {
    pub source: SocketAddr,
    /// Where this connection's requests go (the upstream, or the original destination).
    pub destination: SocketAddr,
    /// Decides each request's policy, identities and upstream pool.
    pub router: Arc<dyn Router>,
    /// Requests whose response body is still being sent; the idle timeout waits for 0.
    pub inflight: Arc<AtomicUsize>,
    /// Requests handed to [`ProxyCore::handle`] so far (compared with the heads the strict
    /// reader released to tell when hyper holds no request).
    pub requests: AtomicU64,
    /// Bytes moving on the client socket (upgraded tunnels included).
    pub activity: Arc<Activity>,
    pub idle_timeout: Duration,
    /// Flips to true when the listener shuts down; tunnels end then.
    pub stop: watch::Receiver<bool>,
}

/// The upstream HTTP client: hyper-util's pool (keyed by scheme and authority, i.e. the
/// destination address) over [`UpstreamConnector`].
pub(crate) type UpstreamClient = Client<crate::upstream::UpstreamConnector, RequestBody>;

/// What one request needs to know about the connection it came on, looked up per request.
pub(crate) struct Route {
    /// `None`: no L7 policy is known for this flow, so every request is denied (403); a
    /// missing policy must never turn into a bypass.
    pub policy: Option<Arc<HttpPolicy>>,
    /// Security identities for the access records (transparent mode only).
    pub source_identity: Option<u32>,
    pub destination_identity: Option<u32>,
    /// Carries allowed requests upstream.
    pub upstream: UpstreamClient,
    /// HTTP filters run after the policy allowed a request (`None`: no filters).
    pub filters: Option<Arc<dyn HttpFilters>>,
}

/// Chooses the [`Route`] of each request of one connection.
pub(crate) trait Router: Send + Sync {
    fn route(&self) -> Route;
    /// The identities alone, for records of requests rejected before routing (framing
    /// violations).
    fn identities(&self) -> (Option<u32>, Option<u32>);
}

/// Shared by every connection of a listener.
pub(crate) struct ProxyCore {
    access: AccessLog,
    limits: HeaderLimits,
    /// Client connections with no bytes moving and no request in flight close after this.
    idle_timeout: Duration,
    /// HTTP/1.1 or HTTP/2 (prior knowledge), for connections whose first bytes could be the
    /// HTTP/2 preface.
    builder: auto::Builder<TokioExecutor>,
    /// HTTP/1.1 only, with the same settings: every other connection.
    http1: http1::Builder,
    /// Carries filters' callouts.
    callouts: CalloutClient,
    /// Carries filters' gRPC calls (marked as `callouts` are).
    grpc_callouts: GrpcCalloutClient,
}

/// Counts a request as in flight until dropped (with the response body).
pub(crate) struct InflightGuard(Arc<AtomicUsize>);

impl InflightGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Response body: the upstream's, streamed, or a small local reply.
pub(crate) struct ProxyBody {
    kind: BodyKind,
    _inflight: Option<InflightGuard>,
}

enum BodyKind {
    Upstream(Incoming),
    Local(Option<Bytes>),
    /// The upstream's, through the filters' response body phase.
    Filtered(FilteredBody),
    /// A filter closed the stream: fail the body so hyper resets it.
    Reset(bool),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            BodyKind::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            BodyKind::Local(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            BodyKind::Filtered(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            BodyKind::Reset(done) => {
                if std::mem::replace(done, true) {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err("a filter closed the stream".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Upstream(body) => body.is_end_stream(),
            BodyKind::Local(data) => data.is_none(),
            BodyKind::Filtered(body) => body.is_end_stream(),
            BodyKind::Reset(done) => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Upstream(body) => body.size_hint(),
            BodyKind::Filtered(body) => body.size_hint(),
            BodyKind::Reset(_) => SizeHint::default(),
            BodyKind::Local(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the de-facto ones; `upgrade` is kept only for
/// a request that is being upgraded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // The client's 100-continue was answered by hyper already.
    "expect",
    // h2c upgrade settings: never forwarded (h2c upgrades are not passed through, see below).
    "http2-settings",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (*name == "upgrade" || *name == "connection") {
            continue;
        }
        headers.remove(*name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `Connection: upgrade` plus an `Upgrade` header, except h2c: passing an h2c upgrade through
/// would turn the connection into an HTTP/2 tunnel whose later requests bypass the policy
/// (the "h2c smuggling" attack), so it is forwarded as a plain request instead.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocols: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    connection_upgrade
        && !protocols.is_empty()
        && !protocols
            .iter()
            .any(|p| p.eq_ignore_ascii_case("h2c") || p.is_empty())
}

fn request_url(uri: &Uri, headers: &HeaderMap) -> String {
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"))
}

/// A reply the proxy writes itself.
fn local_reply(
    status: StatusCode,
    body: &'static str,
    close: bool,
    inflight: Option<InflightGuard>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody {
        kind: BodyKind::Local(Some(Bytes::from_static(body.as_bytes()))),
        _inflight: inflight,
    });
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A filter's local reply. Framing is ours: the body is sent whole with its length.
fn filter_reply(
    reply: FilterReply,
    close: bool,
    inflight: Option<InflightGuard>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody {
        kind: BodyKind::Local(Some(reply.body)),
        _inflight: inflight,
    });
    *response.status_mut() = reply.status;
    let mut headers = reply.headers;
    strip_hop_by_hop(&mut headers, false);
    headers.remove(header::CONTENT_LENGTH);
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    *response.headers_mut() = headers;
    response
}

/// A filter closed the stream: a head, then a failing body, so hyper aborts the response
/// (HTTP/1: the connection closes mid-response; HTTP/2: the stream is reset).
fn reset_reply(inflight: Option<InflightGuard>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody {
        kind: BodyKind::Reset(false),
        _inflight: inflight,
    });
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Maps a client error to the status the proxy answers with (Envoy's choices: 503 when
/// the upstream cannot be reached, 504 on a connect timeout, 502 for a broken response).
fn classify_upstream_error(
    error: &hyper_util::client::legacy::Error,
) -> (StatusCode, &'static str, String) {
    let mut io_kind = None;
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            io_kind = Some(io.kind());
        }
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_connect() {
        return match io_kind {
            Some(io::ErrorKind::TimedOut) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream connect timeout\r\n",
                detail,
            ),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error\r\n",
                detail,
            ),
        };
    }
    (
        StatusCode::BAD_GATEWAY,
        "upstream protocol error or reset\r\n",
        detail,
    )
}

/// Reads and discards a denied request's body so the HTTP/1 connection stays usable.
/// Returns false when the body was too large, too slow, or broken.
async fn drain_body(mut body: Incoming) -> bool {
    let drain = async {
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > DENIED_BODY_DRAIN_LIMIT {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DENIED_BODY_DRAIN_TIME, drain)
        .await
        .unwrap_or(false)
}

/// Waits until the connection has been idle (no bytes moved, no request in flight) for
/// `timeout`.
pub(crate) async fn idle_expired(activity: &Activity, inflight: &AtomicUsize, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        let now = Instant::now();
        if now >= deadline {
            if inflight.load(Ordering::Relaxed) == 0 {
                return;
            }
            // A request is still being answered: look again one period later.
            tokio::time::sleep(timeout).await;
        } else {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Everything a request's access records share.
struct RecordBase {
    version: Version,
    method: String,
    url: String,
    source: SocketAddr,
    destination: SocketAddr,
    source_identity: Option<u32>,
    destination_identity: Option<u32>,
    rule: RuleRef,
    header_log: Vec<crate::policy::HeaderLog>,
}

impl RecordBase {
    fn record(
        &self,
        kind: RecordKind,
        status: Option<StatusCode>,
        latency: Option<Duration>,
        error: Option<String>,
    ) -> AccessRecord {
        AccessRecord {
            kind,
            timestamp: SystemTime::now(),
            version: self.version,
            method: self.method.clone(),
            url: self.url.clone(),
            status: status.map(|s| s.as_u16()),
            latency,
            source: self.source,
            destination: self.destination,
            source_identity: self.source_identity,
            destination_identity: self.destination_identity,
            rule: Some(self.rule),
            header_log: self.header_log.clone(),
            error,
            filters: Vec::new(),
        }
    }
}

impl ProxyCore {
    /// `callout_mark`: the `SO_MARK` of the filters' callout connections (transparent mode).
    pub(crate) fn new(
        access: AccessLog,
        limits: HeaderLimits,
        idle_timeout: Duration,
        callout_mark: Option<u32>,
    ) -> Self {
        Self {
            access,
            limits,
            idle_timeout,
            builder: http_builder(limits, idle_timeout),
            http1: http1_builder(limits, idle_timeout),
            callouts: callout_client(callout_mark, CALLOUT_CONNECT_TIMEOUT),
            grpc_callouts: GrpcCalloutClient::new(callout_mark, CALLOUT_CONNECT_TIMEOUT),
        }
    }

    pub(crate) fn access(&self) -> &AccessLog {
        &self.access
    }

    pub(crate) fn limits(&self) -> HeaderLimits {
        self.limits
    }

    /// Handles one request; never fails (every failure is an HTTP reply).
    pub(crate) async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let inflight = InflightGuard::new(&conn.inflight);
        conn.requests.fetch_add(1, Ordering::Relaxed);
        let version = request.version();
        let http1 = version < Version::HTTP_2;
        // After a request carrying Upgrade, the strict parser passes the client's bytes
        // through unchecked (strict.rs); every reply that is not a switch must close.
        let requested_upgrade = http1 && request.headers().contains_key(header::UPGRADE);

        let route = conn.router.route();
        let (mut parts, body) = request.into_parts();
        let verdict = match &route.policy {
            Some(policy) => policy.check(&mut RequestParts {
                method: &parts.method,
                uri: &parts.uri,
                headers: &mut parts.headers,
            }),
            None => Verdict {
                allowed: false,
                rule: RuleRef::DefaultDeny,
                header_log: Vec::new(),
            },
        };
        let mut request = Request::from_parts(parts, body);
        // Filters run only on what the policy allowed: a denied request never reaches filter
        // code, and a filter cannot rewrite a request into one the policy would have denied
        // (Cilium's cilium.l7policy precedes every other HTTP filter in the same way).
        let filters = match (&route.filters, verdict.allowed) {
            (Some(chain), true) => chain
                .start(StreamMeta {
                    source: PeerMeta {
                        address: Some(conn.source),
                        identity: route.source_identity,
                        ..PeerMeta::default()
                    },
                    destination: PeerMeta {
                        address: Some(conn.destination),
                        identity: route.destination_identity,
                        ..PeerMeta::default()
                    },
                    protocol: match version {
                        Version::HTTP_10 => "HTTP/1.0",
                        Version::HTTP_2 => "HTTP/2",
                        _ => "HTTP/1.1",
                    },
                })
                .map(|stream| {
                    SharedFilters::new(
                        stream,
                        chain.clone(),
                        self.callouts.clone(),
                        self.grpc_callouts.clone(),
                    )
                }),
            _ => None,
        };
        let base = self.access.is_enabled().then(|| RecordBase {
            version,
            method: request.method().as_str().to_owned(),
            url: request_url(request.uri(), request.headers()),
            source: conn.source,
            destination: conn.destination,
            source_identity: route.source_identity,
            destination_identity: route.destination_identity,
            rule: verdict.rule,
            header_log: verdict.header_log.clone(),
        });
        let record = |kind, status, latency, error| {
            if let Some(base) = &base {
                let mut record = base.record(kind, status, latency, error);
                if let Some(filters) = &filters {
                    record.filters = filters.stream().records();
                }
                self.access.record(record);
            }
        };

        // HTTP/1 header counts are enforced on the raw bytes (strict.rs); HTTP/2 arrives
        // decoded, so count here (its byte size is bounded by max_header_list_size).
        if !http1 && request.headers().len() > self.limits.max_headers {
            let error = format!("more than {} header fields", self.limits.max_headers);
            record(
                RecordKind::Denied,
                Some(StatusCode::BAD_REQUEST),
                None,
                Some(error),
            );
            return Ok(local_reply(
                StatusCode::BAD_REQUEST,
                "Bad Request\r\n",
                requested_upgrade,
                Some(inflight),
            ));
        }

        if !verdict.allowed {
            let why = route
                .policy
                .is_none()
                .then(|| "no HTTP policy for this flow".to_owned());
            record(RecordKind::Denied, Some(StatusCode::FORBIDDEN), None, why);
            let expects_continue = request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            let body = request.into_body();
            // Reading the body would send "100 Continue" and invite it; do not.
            let close = http1
                && (requested_upgrade
                    || expects_continue
                    || !(body.is_end_stream() || drain_body(body).await));
            record(
                RecordKind::Response,
                Some(StatusCode::FORBIDDEN),
                Some(start.elapsed()),
                None,
            );
            return Ok(local_reply(
                StatusCode::FORBIDDEN,
                ACCESS_DENIED_BODY,
                close,
                Some(inflight),
            ));
        }

        // A reverse proxy has no use for CONNECT, and a transparent one sees the tunnel's
        // destination already; do not open arbitrary tunnels.
        if request.method() == Method::CONNECT {
            let error = "CONNECT is not supported".to_owned();
            record(
                RecordKind::Response,
                Some(StatusCode::NOT_IMPLEMENTED),
                Some(start.elapsed()),
                Some(error),
            );
            return Ok(local_reply(
                StatusCode::NOT_IMPLEMENTED,
                "CONNECT is not supported\r\n",
                http1,
                Some(inflight),
            ));
        }

        let upgrade = http1 && wants_upgrade(request.headers());
        strip_hop_by_hop(request.headers_mut(), upgrade);
        // The upstream must see the host the policy judged: the URI's authority (HTTP/2
        // :authority, or an HTTP/1 absolute-form target, which overrides Host per RFC 9112
        // §3.2.2) replaces any Host header; HTTP/1.0 may have no host at all.
        let host = match request.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None if !request.headers().contains_key(header::HOST) => {
                HeaderValue::from_str(&conn.destination.to_string()).ok()
            }
            None => None,
        };
        if let Some(host) = host {
            request.headers_mut().insert(header::HOST, host);
        }
        let expects_continue = request
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let mut request = match &filters {
            None => request.map(RequestBody::Plain),
            Some(shared) => {
                let (mut parts, body) = request.into_parts();
                let mut head = request_head(&parts);
                let end = body.is_end_stream();
                let action = shared.stream().on_request_headers(&mut head, end);
                match settle(shared, action, &mut head).await {
                    FilterAction::Continue | FilterAction::Pause => {
                        if let Err(error) = apply_request_head(&mut parts, &head) {
                            record(
                                RecordKind::Response,
                                Some(StatusCode::INTERNAL_SERVER_ERROR),
                                Some(start.elapsed()),
                                Some(error),
                            );
                            return Ok(local_reply(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "filter produced an invalid request\r\n",
                                http1,
                                Some(inflight),
                            ));
                        }
                        // Upgraded requests carry no body phase (their bytes become a tunnel).
                        let body = if end || upgrade {
                            RequestBody::Plain(body)
                        } else {
                            RequestBody::Filtered(FilteredBody::new(body, shared.clone(), true))
                        };
                        Request::from_parts(parts, body)
                    }
                    FilterAction::LocalReply(reply) => {
                        let status = reply.status;
                        // As for a denial: keep the HTTP/1 connection only if the unread body
                        // can be drained quickly (reading it would invite a 100-continue).
                        let close = http1
                            && (requested_upgrade
                                || expects_continue
                                || !(body.is_end_stream() || drain_body(body).await));
                        record(
                            RecordKind::Response,
                            Some(status),
                            Some(start.elapsed()),
                            None,
                        );
                        return Ok(filter_reply(reply, close, Some(inflight)));
                    }
                    FilterAction::Close => {
                        record(
                            RecordKind::Response,
                            None,
                            Some(start.elapsed()),
                            Some("a filter closed the stream".into()),
                        );
                        return Ok(reset_reply(Some(inflight)));
                    }
                }
            }
        };
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let upstream_uri = Uri::builder()
            .scheme("http")
            .authority(conn.destination.to_string())
            .path_and_query(path)
            .build();
        match upstream_uri {
            Ok(uri) => *request.uri_mut() = uri,
            Err(error) => {
                let error = format!("cannot build the upstream URI: {error}");
                record(
                    RecordKind::Response,
                    Some(StatusCode::BAD_REQUEST),
                    Some(start.elapsed()),
                    Some(error),
                );
                return Ok(local_reply(
                    StatusCode::BAD_REQUEST,
                    "Bad Request\r\n",
                    http1,
                    Some(inflight),
                ));
            }
        }
        *request.version_mut() = Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));

        record(RecordKind::Request, None, None, None);
        let mut response = match route.upstream.request(request).await {
            Ok(response) => response,
            Err(error) => {
                // A request-body filter answered locally (the body failed on purpose).
                if let Some(reply) = filters.as_ref().and_then(|f| f.take_reply()) {
                    record(
                        RecordKind::Response,
                        Some(reply.status),
                        Some(start.elapsed()),
                        None,
                    );
                    return Ok(filter_reply(reply, http1, Some(inflight)));
                }
                let (status, body, detail) = classify_upstream_error(&error);
                tracing::debug!(%detail, %status, "upstream request failed");
                record(
                    RecordKind::Response,
                    Some(status),
                    Some(start.elapsed()),
                    Some(detail),
                );
                return Ok(local_reply(status, body, requested_upgrade, Some(inflight)));
            }
        };
        let status = response.status();
        let filtered = filters
            .as_ref()
            .filter(|_| status != StatusCode::SWITCHING_PROTOCOLS);
        if filtered.is_none() {
            record(
                RecordKind::Response,
                Some(status),
                Some(start.elapsed()),
                None,
            );
        }

        if status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                // The upstream switched protocols unasked: we cannot follow.
                return Ok(local_reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream protocol error or reset\r\n",
                    true,
                    Some(inflight),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, conn.clone()));
            strip_hop_by_hop(response.headers_mut(), true);
        } else {
            strip_hop_by_hop(response.headers_mut(), false);
            if requested_upgrade {
                // The client side already switched the strict parser to passthrough for
                // this connection (strict.rs); make sure no further request is read on it.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        if let Some(shared) = filtered {
            let (mut parts, body) = response.into_parts();
            let mut head = response_head(parts.status, &parts.headers);
            let end = body.is_end_stream();
            let action = shared.stream().on_response_headers(&mut head, end);
            let action = settle(shared, action, &mut head).await;
            let applied = match action {
                FilterAction::Continue | FilterAction::Pause => {
                    apply_response_head(&mut parts, &head).map_err(|error| {
                        FilterAction::LocalReply(FilterReply {
                            status: StatusCode::BAD_GATEWAY,
                            headers: HeaderMap::new(),
                            body: Bytes::from(format!("{error}\r\n")),
                        })
                    })
                }
                other => Err(other),
            };
            return Ok(match applied {
                Ok(()) => {
                    record(
                        RecordKind::Response,
                        Some(parts.status),
                        Some(start.elapsed()),
                        None,
                    );
                    let kind = if end {
                        BodyKind::Upstream(body)
                    } else {
                        BodyKind::Filtered(FilteredBody::new(body, shared.clone(), false))
                    };
                    Response::from_parts(
                        parts,
                        ProxyBody {
                            kind,
                            _inflight: Some(inflight),
                        },
                    )
                }
                Err(FilterAction::LocalReply(reply)) => {
                    record(
                        RecordKind::Response,
                        Some(reply.status),
                        Some(start.elapsed()),
                        None,
                    );
                    filter_reply(reply, requested_upgrade, Some(inflight))
                }
                Err(_) => {
                    record(
                        RecordKind::Response,
                        None,
                        Some(start.elapsed()),
                        Some("a filter closed the stream".into()),
                    );
                    reset_reply(Some(inflight))
                }
            });
        }
        Ok(response.map(|body| ProxyBody {
            kind: BodyKind::Upstream(body),
            _inflight: Some(inflight),
        }))
    }
}

/// Copies bytes both ways between the upgraded client and upstream connections until one
/// side closes, the connection idles out, or the listener stops.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    conn: Arc<ConnInfo>,
) {
    let (client, upstream) = tokio::join!(client, upstream);
    let (client, upstream) = match (client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            tracing::debug!(
                client = ?client.err(),
                upstream = ?upstream.err(),
                "upgrade did not complete"
            );
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let mut stop = conn.stop.clone();
    let idle = AtomicUsize::new(0);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "upgraded tunnel ended with an error");
            }
        }
        _ = idle_expired(&conn.activity, &idle, conn.idle_timeout) => {
            tracing::debug!("upgraded tunnel idle timeout");
        }
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// The hyper server settings of every client connection: HTTP/1.1 (keep-alive, pipelining,
/// streamed bodies) and HTTP/2 cleartext with prior knowledge on the same port (the auto
/// builder detects the h2 preface).
fn http_builder(limits: HeaderLimits, idle_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_headers(http1_max_headers(limits))
        .max_buf_size(http1_max_buf_size(limits))
        .header_read_timeout(idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// The raw-byte validator (strict.rs) enforces the real limits first; hyper's must not be
/// tighter or it would answer 431 where the configuration allows a head.
fn http1_max_headers(limits: HeaderLimits) -> usize {
    limits.max_headers.max(100)
}

fn http1_max_buf_size(limits: HeaderLimits) -> usize {
    (limits.max_header_bytes + 16 * 1024).max(400 * 1024)
}

/// The HTTP/1 half of [`http_builder`], for connections known not to be HTTP/2.
fn http1_builder(limits: HeaderLimits, idle_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_headers(http1_max_headers(limits))
        .max_buf_size(http1_max_buf_size(limits))
        .header_read_timeout(idle_timeout);
    builder
}

/// Waits for the client's first bytes (without reading them); `Some(true)` when they are, or
/// may still become, the HTTP/2 preface, `None` at end of stream.
async fn sniff_h2(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok((n > 0).then(|| H2_PREFACE.starts_with(&first[..n])))
}

/// How long an HTTP/1 connection stays with hyper after its last byte moved while hyper
/// holds no request. Rebuilding hyper's state (two 8 KiB buffers and the dispatcher,
/// allocated and freed) for every request cost about 8% of the proxy's requests/s per core
/// with busy keep-alive clients (wrk); a connection quiet for 10 ms pays it at most 100 times
/// a second, which is noise, while one that waits for its next request gives the memory back
/// almost at once.
const REST_AFTER: Duration = Duration::from_millis(10);

/// How a session of hyper on a connection ended.
enum SessionEnd {
    /// The connection is done (closed, failed, upgraded, idled out or drained).
    Closed,
    /// hyper let go of an idle keep-alive connection whose socket stays open.
    Rested,
}

/// Drives one hyper connection future until it ends, the connection idles out, or `stop`
/// flips (then it finishes the requests in flight). With `rest`, an HTTP/1 connection that
/// holds no request — every head the strict reader released was handled, its response fully
/// written — and has moved no byte for [`REST_AFTER`] is shut down gracefully with the socket
/// kept open ([`SessionEnd::Rested`]).
async fn drive<C, E>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: fn(Pin<&mut C>),
    conn: &ConnInfo,
    rest: bool,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut draining = false;
    let mut resting = false;
    // Armed when hyper was last seen holding no request; fires REST_AFTER after the last
    // byte moved, and is only re-armed lazily then, so a busy connection pays one timer
    // update per REST_AFTER rather than one per request.
    let rest_timer = tokio::time::sleep(Duration::ZERO);
    let mut rest_timer = std::pin::pin!(rest_timer);
    let mut rest_armed = false;
    let rest_due =
        |conn: &ConnInfo| tokio::time::Instant::from_std(conn.activity.last() + REST_AFTER);
    loop {
        // `None`: hyper is idle between requests and the rest timer is not armed. Checked
        // right after hyper returned Pending, so it has parsed and dispatched every head it
        // read (each one counted in `requests`) and written what it could.
        let step = std::future::poll_fn(|cx| match connection.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending if rest && !draining && !resting && !rest_armed && conn.at_rest() => {
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            ended = step => match ended {
                Some(Err(error)) => {
                    tracing::debug!(source = %conn.source, %error, "client connection ended with an error");
                    return SessionEnd::Closed;
                }
                Some(Ok(())) if resting => return SessionEnd::Rested,
                Some(Ok(())) => return SessionEnd::Closed,
                None => {
                    rest_timer.as_mut().reset(rest_due(conn));
                    rest_armed = true;
                }
            },
            () = &mut rest_timer, if rest_armed => {
                rest_armed = false;
                // hyper was last polled before this (its state only changes when polled), so
                // `at_rest` still describes it; bytes that arrived since wait in the socket.
                if !draining && !resting && conn.at_rest() {
                    let due = rest_due(conn);
                    if tokio::time::Instant::now() >= due {
                        // hyper is idle (keep-alive state `Idle`), so this closes it at once:
                        // nothing is cut short and no `Connection: close` is added anywhere.
                        resting = true;
                        conn.activity.set_keep_open(true);
                        graceful_shutdown(connection.as_mut());
                    } else {
                        rest_timer.as_mut().reset(due);
                        rest_armed = true;
                    }
                }
            }
            _ = stop.wait_for(|stopped| *stopped), if !draining => {
                draining = true;
                // A rest already under way ends in a close below instead.
                conn.activity.set_keep_open(false);
                resting = false;
                graceful_shutdown(connection.as_mut());
            }
            _ = idle_expired(&conn.activity, &conn.inflight, conn.idle_timeout) => {
                tracing::debug!(source = %conn.source, "client connection idle timeout");
                return SessionEnd::Closed;
            }
        }
    }
}

impl ConnInfo {
    /// hyper holds no request of this connection: every head the strict reader released was
    /// handed to [`ProxyCore::handle`], every response is complete and written, and no byte
    /// of a next request reached hyper.
    fn at_rest(&self) -> bool {
        self.activity.at_rest()
            && self.inflight.load(Ordering::Relaxed) == 0
            && self.activity.heads() == self.requests.load(Ordering::Relaxed)
    }
}

/// Serves one accepted client connection until it ends, idles out, or (after `stop` flips)
/// finishes its in-flight requests: the strict HTTP/1 framing checks in front of hyper,
/// every request through [`ProxyCore::handle`] with `router` deciding its route.
///
/// Memory: an idle keep-alive connection holds no hyper state. hyper keeps an 8 KiB read
/// buffer, an 8 KiB write buffer and its dispatcher for as long as its connection object
/// lives, so an HTTP/1 connection gets one only while it has something to do: the socket is
/// handed to hyper when the client's bytes arrive, and taken back (a graceful hyper shutdown
/// that leaves the socket open) once every request it read is answered and written and
/// nothing has moved for [`REST_AFTER`]. What stays while idle is the socket, the strict
/// reader's state and this task (about 3.4 KB in all, measured by `membrane-perf http`).
pub(crate) async fn serve_connection(
    core: Arc<ProxyCore>,
    stream: TcpStream,
    source: SocketAddr,
    destination: SocketAddr,
    router: Arc<dyn Router>,
    mut stop: watch::Receiver<bool>,
) {
    let idle_timeout = core.idle_timeout;
    // Small requests and responses must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let inflight = Arc::new(AtomicUsize::new(0));
    // Nothing is allocated for HTTP until the client sends something.
    let maybe_h2 = tokio::select! {
        first = sniff_h2(&stream) => match first {
            Ok(Some(maybe_h2)) => maybe_h2,
            Ok(None) | Err(_) => return,
        },
        _ = stop.wait_for(|stopped| *stopped) => return,
        _ = idle_expired(&activity, &inflight, idle_timeout) => return,
    };
    let mut io = StrictIo::new(stream, core.limits(), activity.clone());
    if core.access().is_enabled() {
        let access = core.access().clone();
        let (source_identity, destination_identity) = router.identities();
        io = io.on_violation(Box::new(move |violation| {
            access.record(AccessRecord {
                kind: RecordKind::Denied,
                timestamp: SystemTime::now(),
                version: Version::HTTP_11,
                method: String::new(),
                url: String::new(),
                status: Some(400),
                latency: None,
                source,
                destination,
                source_identity,
                destination_identity,
                rule: None,
                header_log: Vec::new(),
                error: Some(violation.to_string()),
                filters: Vec::new(),
            });
        }));
    }
    let info = Arc::new(ConnInfo {
        source,
        destination,
        router,
        inflight,
        requests: AtomicU64::new(0),
        activity: activity.clone(),
        idle_timeout,
        stop: stop.clone(),
    });
    let mut service = {
        let (core, info) = (core.clone(), info.clone());
        service_fn(move |request| core.clone().handle(info.clone(), request))
    };
    if maybe_h2 {
        // HTTP/2 multiplexes streams; its connection stays with hyper until it ends.
        let mut connection = Box::pin(
            core.builder
                .serve_connection_with_upgrades(TokioIo::new(io), service),
        );
        drive(
            connection.as_mut(),
            |c| c.graceful_shutdown(),
            &info,
            false,
            &mut stop,
        )
        .await;
        return;
    }
    loop {
        // Boxed: the task itself stays small while the connection rests.
        let mut connection = Box::new(
            core.http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let end = drive(
            Pin::new(&mut *connection),
            |c| c.graceful_shutdown(),
            &info,
            true,
            &mut stop,
        )
        .await;
        let parts = match end {
            SessionEnd::Rested => connection.into_parts(),
            SessionEnd::Closed => return,
        };
        // `None`: upgraded meanwhile (then the tunnel owns the socket).
        let Some(parts) = parts else { return };
        activity.set_keep_open(false);
        // The empty rest of hyper's read buffer still owns the whole buffer: drop it now,
        // not at the end of this iteration (after the wait below).
        let read_buf = parts.read_buf;
        if !read_buf.is_empty() {
            // No head can be in there (every released head was handled), so these are the
            // unread rest of a request body the upstream answered without reading; hyper
            // would have had to drain them. They must never be parsed as a request (the
            // strict reader judged them body bytes), so the connection ends here.
            return;
        }
        drop(read_buf);
        io = parts.io.into_inner();
        service = parts.service;
        if io.has_pending() {
            // Defensive: bytes the strict reader holds go to hyper without waiting.
            continue;
        }
        tokio::select! {
            ready = io.get_ref().readable() => if ready.is_err() { return },
            _ = stop.wait_for(|stopped| *stopped) => return,
            _ = idle_expired(&activity, &info.inflight, idle_timeout) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
            ("host", "h"),
        ]);
        strip_hop_by_hop(&mut map, false);
        let mut names: Vec<&str> = map.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn upgrade_headers_survive_for_upgrades() {
        let mut map = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(wants_upgrade(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(
            map.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            map.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert!(map.contains_key("sec-websocket-key"));
    }

    #[test]
    fn h2c_upgrades_are_not_passed_through() {
        let map = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!wants_upgrade(&map));
        assert!(!wants_upgrade(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn url_prefers_the_uri_authority() {
        let h = headers(&[("host", "b.test")]);
        assert_eq!(
            request_url(&"/p?q=1".parse().expect("uri"), &h),
            "http://b.test/p?q=1"
        );
        assert_eq!(
            request_url(&"http://a.test/x".parse().expect("uri"), &h),
            "http://a.test/x"
        );
    }
}
