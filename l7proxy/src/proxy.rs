//! Per-request HTTP proxying shared by every listener mode (standalone today, transparent
//! next): policy check, the 403 reply, forwarding to the upstream over pooled connections,
//! upstream failure replies, upgrade (WebSocket) tunnels, and access records.
//!
//! Owns the request phases, in order: (1) reject what the proxy cannot carry (CONNECT, an
//! HTTP/2 request over the header limits); (2) the policy decides, possibly rewriting headers;
//! a denial is answered `403 Access denied\r\n` and never forwarded; (3) hop-by-hop headers
//! are dropped (RFC 9110 §7.6.1) and the request is sent upstream as HTTP/1.1 with its body
//! streamed; (4) the response head is recorded and the body streamed back. Nothing here
//! buffers a body.
//!
//! Must not know how connections were accepted: a listener hands in a [`ConnInfo`].

use std::convert::Infallible;
use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::access::{AccessLog, AccessRecord, RecordKind};
use crate::policy::{HttpPolicy, RequestParts, RuleRef};
use crate::strict::{Activity, HeaderLimits};

/// Cilium's deny body (cilium/proxy l7policy.proto `denied_403_body` default plus CRLF).
pub const ACCESS_DENIED_BODY: &str = "Access denied\r\n";

/// How much of a denied HTTP/1 request's body we read and discard so the connection can
/// serve the next keep-alive request; beyond this (or the time below) we close instead.
const DENIED_BODY_DRAIN_LIMIT: usize = 64 * 1024;
const DENIED_BODY_DRAIN_TIME: Duration = Duration::from_secs(1);

/// What a listener knows about one accepted client connection.
pub(crate) struct ConnInfo {
    pub source: SocketAddr,
    /// Where this connection's requests go (the upstream, or the original destination).
    pub destination: SocketAddr,
    /// Requests whose response body is still being sent; the idle timeout waits for 0.
    pub inflight: Arc<AtomicUsize>,
    /// Bytes moving on the client socket (upgraded tunnels included).
    pub activity: Arc<Activity>,
    pub idle_timeout: Duration,
    /// Flips to true when the listener shuts down; tunnels end then.
    pub stop: watch::Receiver<bool>,
}

/// Shared by every connection of a listener.
pub(crate) struct ProxyCore {
    policy: Arc<HttpPolicy>,
    client: Client<HttpConnector, Incoming>,
    access: AccessLog,
    limits: HeaderLimits,
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
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Upstream(body) => Pin::new(body).poll_frame(cx),
            BodyKind::Local(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Upstream(body) => body.is_end_stream(),
            BodyKind::Local(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Upstream(body) => body.size_hint(),
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
            rule: Some(self.rule),
            header_log: self.header_log.clone(),
            error,
        }
    }
}

impl ProxyCore {
    pub(crate) fn new(
        policy: HttpPolicy,
        access: AccessLog,
        limits: HeaderLimits,
        connect_timeout: Duration,
        pool_idle_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle_timeout)
            // The request keeps the client's Host; we set it ourselves when it has none.
            .set_host(false)
            .build(connector);
        Self {
            policy: Arc::new(policy),
            client,
            access,
            limits,
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
        let version = request.version();
        let http1 = version < Version::HTTP_2;
        // After a request carrying Upgrade, the strict parser passes the client's bytes
        // through unchecked (strict.rs); every reply that is not a switch must close.
        let requested_upgrade = http1 && request.headers().contains_key(header::UPGRADE);

        let (mut parts, body) = request.into_parts();
        let verdict = self.policy.check(&mut RequestParts {
            method: &parts.method,
            uri: &parts.uri,
            headers: &mut parts.headers,
        });
        let mut request = Request::from_parts(parts, body);
        let base = self.access.is_enabled().then(|| RecordBase {
            version,
            method: request.method().as_str().to_owned(),
            url: request_url(request.uri(), request.headers()),
            source: conn.source,
            destination: conn.destination,
            rule: verdict.rule,
            header_log: verdict.header_log.clone(),
        });
        let record = |kind, status, latency, error| {
            if let Some(base) = &base {
                self.access
                    .record(base.record(kind, status, latency, error));
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
            record(RecordKind::Denied, Some(StatusCode::FORBIDDEN), None, None);
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
        let mut response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
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
        record(
            RecordKind::Response,
            Some(status),
            Some(start.elapsed()),
            None,
        );

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
