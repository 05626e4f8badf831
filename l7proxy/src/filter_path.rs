//! Driving a [`FilterStream`] on the request path: head conversions between `http` types and
//! filter head pairs, the callout loop (send the calls a paused filter made, deliver their
//! outcomes until the phase resumes), and streamed body wrappers that run the body phases
//! chunk by chunk (and wait for a body phase's callouts before reading on). Used only by
//! `proxy`.
//!
//! Callouts leave on their own clients ([`callout_client`] for HTTP, a
//! [`GrpcCalloutClient`] for gRPC): in transparent mode their sockets carry
//! [`crate::redirect::CALLOUT_MARK`] ("from the egress proxy", identity `reserved:host`), so
//! the datapath neither redirects them back to the proxy nor takes them for the client pod's
//! traffic.
//!
//! One loop ([`dispatch`]) waits for both kinds while a phase is paused: HTTP callouts
//! in flight and the events of the stream's open gRPC calls, delivered in arrival order,
//! with what the filters ask for next started at once, until an outcome ends the pause.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::filter::{
    Callout, CalloutResponse, FilterAction, FilterReply, FilterStream, GrpcCalloutOp, HeadPairs,
    HttpFilters,
};
use crate::grpc_callout::{GrpcCalloutClient, GrpcCalloutEvent, GrpcCallouts};
use crate::upstream::UpstreamConnector;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Most callout rounds one phase may wait for (a filter that keeps calling is answered 500).
const MAX_CALLOUT_ROUNDS: usize = 16;
/// Bound on a callout without a timeout of its own, and on any callout.
const MAX_CALLOUT_TIME: Duration = Duration::from_secs(30);
/// Largest callout response body handed to a filter.
const MAX_CALLOUT_BODY: usize = 1 << 20;

/// A request's filter stream, shared by the handler and the body wrappers (callbacks are
/// short and synchronous, so a plain mutex; it is never held across an await).
pub(crate) struct SharedFilters {
    stream: Mutex<Box<dyn FilterStream>>,
    /// A local reply a request-body phase produced (the handler answers with it).
    reply: Mutex<Option<FilterReply>>,
    pub filters: Arc<dyn HttpFilters>,
    /// Carries the callouts of this stream's filters.
    pub callouts: CalloutClient,
    /// Carries their gRPC calls.
    grpc_client: GrpcCalloutClient,
    /// This stream's gRPC calls (made on first use; taken out while a pause waits on them).
    /// Dropped with the stream: calls still open are reset.
    grpc: Mutex<Option<GrpcCallouts>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedFilters {
    pub fn new(
        stream: Box<dyn FilterStream>,
        filters: Arc<dyn HttpFilters>,
        callouts: CalloutClient,
        grpc_client: GrpcCalloutClient,
    ) -> Arc<Self> {
        Arc::new(Self {
            stream: Mutex::new(stream),
            reply: Mutex::new(None),
            filters,
            callouts,
            grpc_client,
            grpc: Mutex::new(None),
        })
    }

    pub fn stream(&self) -> MutexGuard<'_, Box<dyn FilterStream>> {
        lock(&self.stream)
    }

    pub fn take_reply(&self) -> Option<FilterReply> {
        lock(&self.reply).take()
    }
}

/// The client that carries callouts (its own pool: callout upstreams are not the route's).
pub(crate) type CalloutClient = Client<UpstreamConnector, Full<Bytes>>;

/// `mark`: the `SO_MARK` of callout sockets (transparent mode; `None` standalone).
pub(crate) fn callout_client(mark: Option<u32>, connect_timeout: Duration) -> CalloutClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .set_host(false)
        .build(UpstreamConnector::new(mark, connect_timeout))
}

// ---- heads ----

pub(crate) fn request_head(parts: &http::request::Parts) -> HeadPairs {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = Vec::with_capacity(parts.headers.len() + 4);
    head.push((":authority".to_owned(), authority.into_bytes()));
    head.push((":path".to_owned(), path.as_bytes().to_vec()));
    head.push((
        ":method".to_owned(),
        parts.method.as_str().as_bytes().to_vec(),
    ));
    head.push((
        ":scheme".to_owned(),
        parts.uri.scheme_str().unwrap_or("http").as_bytes().to_vec(),
    ));
    push_fields(&mut head, &parts.headers, true);
    head
}

pub(crate) fn response_head(status: StatusCode, headers: &HeaderMap) -> HeadPairs {
    let mut head = Vec::with_capacity(headers.len() + 1);
    head.push((":status".to_owned(), status.as_str().as_bytes().to_vec()));
    push_fields(&mut head, headers, false);
    head
}

fn push_fields(head: &mut HeadPairs, headers: &HeaderMap, skip_host: bool) {
    for (name, value) in headers {
        // `:authority` already carries the host.
        if skip_host && name == header::HOST {
            continue;
        }
        head.push((name.as_str().to_owned(), value.as_bytes().to_vec()));
    }
}

/// Builds a header map from the non-pseudo entries; names and values a filter produced are
/// checked (a filter must not be able to inject CR/LF into the upstream request).
fn header_map(head: &HeadPairs, filter_phase: &str) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(head.len());
    for (name, value) in head.iter().filter(|(n, _)| !n.starts_with(':')) {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{filter_phase}: invalid header name {name:?}"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("{filter_phase}: invalid value for header {name}"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn pseudo<'a>(head: &'a HeadPairs, name: &str) -> Option<&'a [u8]> {
    head.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// Writes a head the request filters left back into `parts` (method, path, authority as
/// `Host`, header fields). Errors name what the filter produced that HTTP cannot carry.
pub(crate) fn apply_request_head(
    parts: &mut http::request::Parts,
    head: &HeadPairs,
) -> Result<(), String> {
    let mut headers = header_map(head, "request headers")?;
    if let Some(method) = pseudo(head, ":method") {
        parts.method = Method::from_bytes(method)
            .map_err(|_| format!("filters set an invalid :method {:?}", lossy(method)))?;
    }
    let mut uri = parts.uri.clone().into_parts();
    if let Some(path) = pseudo(head, ":path") {
        uri.path_and_query = Some(
            http::uri::PathAndQuery::try_from(path)
                .map_err(|_| format!("filters set an invalid :path {:?}", lossy(path)))?,
        );
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| format!("filters left an invalid URI: {e}"))?;
    if let Some(authority) = pseudo(head, ":authority").filter(|a| !a.is_empty()) {
        let value = HeaderValue::from_bytes(authority)
            .map_err(|_| format!("filters set an invalid :authority {:?}", lossy(authority)))?;
        headers.insert(header::HOST, value);
    }
    parts.headers = headers;
    Ok(())
}

/// Writes a head the response filters left back (`:status` and header fields).
pub(crate) fn apply_response_head(
    parts: &mut http::response::Parts,
    head: &HeadPairs,
) -> Result<(), String> {
    let headers = header_map(head, "response headers")?;
    if let Some(status) = pseudo(head, ":status") {
        parts.status = std::str::from_utf8(status)
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| format!("filters set an invalid :status {:?}", lossy(status)))?;
    }
    parts.headers = headers;
    Ok(())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---- callouts ----

/// While a headers phase is paused: sends the filters' callouts (HTTP and gRPC), delivers
/// their outcomes, and returns the first action that is not `Pause`. A pause with nothing to
/// wait for (no callout pending, no gRPC call open) can never resume here, so it is answered
/// 500 rather than left hanging.
pub(crate) async fn settle(
    shared: &SharedFilters,
    mut action: FilterAction,
    head: &mut HeadPairs,
) -> FilterAction {
    if action == FilterAction::Pause {
        let (calls, ops) = {
            let mut stream = shared.stream();
            (stream.take_callouts(), stream.take_grpc_ops())
        };
        action = dispatch(shared, calls, ops, head).await;
    }
    if action == FilterAction::Pause {
        tracing::debug!("a filter paused the stream with no callout to wait for: 500");
        return paused_reply();
    }
    action
}

fn paused_reply() -> FilterAction {
    FilterAction::LocalReply(FilterReply {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        headers: HeaderMap::new(),
        body: Bytes::from_static(b"filter paused the request\r\n"),
    })
}

/// Sends `calls`, carries `ops`, and whatever their outcomes lead to, until an outcome ends
/// the pause; `Pause` when the filters stay paused with nothing left to wait for (the caller
/// decides what that means for its phase). At most [`MAX_CALLOUT_ROUNDS`] batches of new
/// calls (then 500).
async fn dispatch(
    shared: &SharedFilters,
    calls: Vec<Callout>,
    ops: Vec<GrpcCalloutOp>,
    head: &mut HeadPairs,
) -> FilterAction {
    // The stream's gRPC calls are taken out while this pause waits on them (no lock across
    // an await) and put back after, still open if the filters resumed before they ended.
    let mut grpc = lock(&shared.grpc).take();
    let action = dispatch_with(shared, calls, ops, &mut grpc, head).await;
    *lock(&shared.grpc) = grpc;
    action
}

async fn dispatch_with(
    shared: &SharedFilters,
    mut calls: Vec<Callout>,
    mut ops: Vec<GrpcCalloutOp>,
    grpc: &mut Option<GrpcCallouts>,
    head: &mut HeadPairs,
) -> FilterAction {
    let mut rounds = 0;
    // HTTP callouts in flight; dropped (cancelled) when the pause ends.
    let mut http = tokio::task::JoinSet::new();
    loop {
        // A round is a batch of new calls; messages on open gRPC streams do not count.
        let new_calls = !calls.is_empty()
            || ops
                .iter()
                .any(|op| matches!(op, GrpcCalloutOp::Start { .. }));
        if new_calls {
            if rounds == MAX_CALLOUT_ROUNDS {
                tracing::debug!("a filter kept making callouts: 500");
                return paused_reply();
            }
            rounds += 1;
        }
        for call in calls.drain(..) {
            let addr = shared
                .filters
                .callout_upstream(&call.filter, &call.upstream);
            let client = shared.callouts.clone();
            http.spawn(async move {
                let id = call.id;
                (id, send_callout(&client, addr, call).await)
            });
        }
        if !ops.is_empty() {
            let open = grpc.get_or_insert_with(|| shared.grpc_client.calls());
            for op in ops.drain(..) {
                carry_grpc_op(shared, open, op);
            }
        }
        let grpc_open = grpc.as_ref().is_some_and(|g| g.open_calls() > 0);
        if http.is_empty() && !grpc_open {
            return FilterAction::Pause;
        }
        // Outcomes in arrival order, whichever kind.
        let action = tokio::select! {
            Some(joined) = http.join_next(), if !http.is_empty() => match joined {
                Ok((id, response)) => shared.stream().on_callout_response(id, response, head),
                Err(_) => continue,
            },
            event = next_grpc_event(grpc), if grpc_open => match event {
                Some((id, event)) => shared.stream().on_grpc_event(id, event, head),
                None => continue,
            },
            // Unreachable while either kind is pending (checked above).
            else => return FilterAction::Pause,
        };
        if action != FilterAction::Pause {
            return action;
        }
        let mut stream = shared.stream();
        calls = stream.take_callouts();
        ops = stream.take_grpc_ops();
    }
}

/// The next event of one of the stream's open gRPC calls (never ready without calls).
async fn next_grpc_event(grpc: &mut Option<GrpcCallouts>) -> Option<(u64, GrpcCalloutEvent)> {
    match grpc {
        Some(calls) => calls.next().await,
        None => std::future::pending().await,
    }
}

/// Hands one gRPC operation to the stream's calls; a start is sent to the address of the
/// filter's upstream name (none: the call closes with UNAVAILABLE).
fn carry_grpc_op(shared: &SharedFilters, calls: &mut GrpcCallouts, op: GrpcCalloutOp) {
    match op {
        GrpcCalloutOp::Start {
            id,
            filter,
            upstream,
            request,
            message,
        } => {
            let addr = shared.filters.callout_upstream(&filter, &upstream);
            calls.start(id, addr, request, message);
        }
        GrpcCalloutOp::Send {
            id,
            message,
            end_stream,
        } => calls.send(id, &message, end_stream),
        GrpcCalloutOp::Close { id } => calls.close(id),
        GrpcCalloutOp::Cancel { id } => calls.cancel(id),
    }
}

/// What a body phase's callouts decided, and the bytes a resume released.
type BodySettled = (FilterAction, Vec<u8>);

/// A body phase paused with callouts: sends them (as [`settle`] does) and returns the outcome
/// with the bytes to forward when a filter resumed the body.
async fn settle_body(
    shared: Arc<SharedFilters>,
    calls: Vec<Callout>,
    ops: Vec<GrpcCalloutOp>,
) -> BodySettled {
    let mut head = HeadPairs::new();
    let action = dispatch(&shared, calls, ops, &mut head).await;
    let data = if action == FilterAction::Continue {
        shared.stream().resumed_body()
    } else {
        Vec::new()
    };
    (action, data)
}

async fn send_callout(
    client: &CalloutClient,
    addr: Option<SocketAddr>,
    call: Callout,
) -> Option<CalloutResponse> {
    let Some(addr) = addr else {
        tracing::debug!(upstream = %call.upstream, "callout upstream has no address");
        return None;
    };
    let timeout = call
        .timeout
        .filter(|t| !t.is_zero())
        .map_or(MAX_CALLOUT_TIME, |t| t.min(MAX_CALLOUT_TIME));
    let method = pseudo(&call.head, ":method").unwrap_or(b"GET");
    let path = pseudo(&call.head, ":path").unwrap_or(b"/");
    let authority = pseudo(&call.head, ":authority").unwrap_or_default();
    let uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .ok()?;
    let mut request = Request::new(Full::new(call.body));
    *request.method_mut() = Method::from_bytes(method).ok()?;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = header_map(&call.head, "callout headers").ok()?;
    if let Ok(host) = HeaderValue::from_bytes(authority) {
        request.headers_mut().insert(header::HOST, host);
    }
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_CALLOUT_BODY).collect().await.ok()?;
        Some(CalloutResponse {
            head: response_head(parts.status, &parts.headers),
            body: body.to_bytes(),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(response) => response,
        Err(_) => {
            tracing::debug!(upstream = %call.upstream, ?timeout, "callout timed out");
            None
        }
    }
}

// ---- bodies ----

/// Why a filtered body stopped: the handler or hyper turns it into a reset.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FilteredBodyError {
    #[error("a filter answered locally during the body")]
    LocalReply,
    #[error("a filter closed the stream")]
    Closed,
    #[error("a filter kept the body paused at its end")]
    PausedAtEnd,
    #[error("body: {0}")]
    Inner(#[from] hyper::Error),
}

/// A body whose chunks pass through the filters' body phase (request or response).
pub(crate) struct FilteredBody {
    inner: Incoming,
    shared: Arc<SharedFilters>,
    request: bool,
    /// The end of stream was delivered to the filters.
    ended: bool,
    /// Trailers that arrived after the data (sent after the filters' last chunk).
    trailers: Option<Frame<Bytes>>,
    /// A paused body phase's callouts in flight; nothing more is read until they settle.
    callouts: Option<Pin<Box<dyn Future<Output = BodySettled> + Send>>>,
}

impl FilteredBody {
    pub fn new(inner: Incoming, shared: Arc<SharedFilters>, request: bool) -> Self {
        Self {
            inner,
            shared,
            request,
            ended: false,
            trailers: None,
            callouts: None,
        }
    }

    /// Runs the body phase on a chunk. A pause with callouts starts them (`self.callouts`)
    /// and forwards nothing for now.
    fn run(&mut self, data: &mut Vec<u8>, end: bool) -> Result<(), FilteredBodyError> {
        let (action, calls, ops) = {
            let mut stream = self.shared.stream();
            let action = if self.request {
                stream.on_request_body(data, end)
            } else {
                stream.on_response_body(data, end)
            };
            let (calls, ops) = match action {
                FilterAction::Pause => (stream.take_callouts(), stream.take_grpc_ops()),
                _ => (Vec::new(), Vec::new()),
            };
            (action, calls, ops)
        };
        // A body pause waits only for callouts made in it; one that merely buffers goes on
        // reading (calls still open from an earlier phase deliver at a later pause).
        if !calls.is_empty() || !ops.is_empty() {
            data.clear();
            self.callouts = Some(Box::pin(settle_body(self.shared.clone(), calls, ops)));
            return Ok(());
        }
        self.after(action, data, end)
    }

    /// What a phase's action means for the chunk in `data`.
    fn after(
        &mut self,
        action: FilterAction,
        data: &mut Vec<u8>,
        end: bool,
    ) -> Result<(), FilteredBodyError> {
        match action {
            FilterAction::Continue => Ok(()),
            FilterAction::Pause if end => Err(FilteredBodyError::PausedAtEnd),
            FilterAction::Pause => {
                data.clear();
                Ok(())
            }
            FilterAction::LocalReply(reply) => {
                *lock(&self.shared.reply) = Some(reply);
                Err(FilteredBodyError::LocalReply)
            }
            FilterAction::Close => Err(FilteredBodyError::Closed),
        }
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = FilteredBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FilteredBodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(callouts) = this.callouts.as_mut() {
                let (action, mut data) = ready!(callouts.as_mut().poll(cx));
                this.callouts = None;
                // `ended` says whether the chunk that paused was the last one.
                let end = this.ended;
                if let Err(e) = this.after(action, &mut data, end) {
                    this.ended = true;
                    this.trailers = None;
                    return Poll::Ready(Some(Err(e)));
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))));
                }
                continue;
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            let (mut data, end) = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => (data.to_vec(), this.inner.is_end_stream()),
                    Err(trailers) => {
                        this.trailers = Some(trailers);
                        (Vec::new(), true)
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => (Vec::new(), true),
            };
            this.ended = end;
            if let Err(e) = this.run(&mut data, end) {
                this.ended = true;
                this.trailers = None;
                return Poll::Ready(Some(Err(e)));
            }
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.trailers.is_none() && self.callouts.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Filters may change the length: never promise one.
        SizeHint::default()
    }
}

/// The body sent upstream: the client's as is, or through the filters.
pub(crate) enum RequestBody {
    Plain(Incoming),
    Filtered(FilteredBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Plain(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Filtered(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Plain(b) => b.is_end_stream(),
            RequestBody::Filtered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Plain(b) => b.size_hint(),
            RequestBody::Filtered(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = Request::get(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn request_heads_round_trip_and_filters_may_rewrite_them() {
        let mut p = parts(
            "/a?b=1",
            &[("host", "svc.test"), ("x-one", "1"), ("x-one", "2")],
        );
        let mut head = request_head(&p);
        assert_eq!(head[0], (":authority".into(), b"svc.test".to_vec()));
        assert_eq!(head[1], (":path".into(), b"/a?b=1".to_vec()));
        assert_eq!(head[2], (":method".into(), b"GET".to_vec()));
        assert_eq!(
            head.iter().filter(|(n, _)| n == "x-one").count(),
            2,
            "repeated fields stay separate"
        );
        assert!(
            !head.iter().any(|(n, _)| n == "host"),
            "host travels as :authority"
        );
        for (name, value) in &mut head {
            match name.as_str() {
                ":path" => *value = b"/rewritten".to_vec(),
                ":method" => *value = b"POST".to_vec(),
                ":authority" => *value = b"other.test".to_vec(),
                _ => {}
            }
        }
        head.push(("x-added".into(), b"yes".to_vec()));
        apply_request_head(&mut p, &head).expect("valid head");
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.uri.path(), "/rewritten");
        assert_eq!(
            p.headers.get("host").map(|v| v.as_bytes()),
            Some(&b"other.test"[..])
        );
        assert_eq!(p.headers.get_all("x-one").iter().count(), 2);
        assert_eq!(
            p.headers.get("x-added").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
    }

    #[test]
    fn heads_http_cannot_carry_are_refused_with_the_reason() {
        let mut p = parts("/", &[("host", "h")]);
        let mut head = request_head(&p);
        head.push(("x-evil".into(), b"a\r\nx-injected: 1".to_vec()));
        let err = apply_request_head(&mut p, &head).expect_err("CR/LF in a value");
        assert!(err.contains("x-evil"), "{err}");
        let mut head = request_head(&p);
        head.push(("bad name".into(), b"v".to_vec()));
        assert!(apply_request_head(&mut p, &head).is_err());
        let mut head = request_head(&p);
        head[1].1 = b"no slash \x01".to_vec();
        let err = apply_request_head(&mut p, &head).expect_err("bad path");
        assert!(err.contains(":path"), "{err}");

        let mut r = http::Response::new(()).into_parts().0;
        let mut head = response_head(StatusCode::OK, &HeaderMap::new());
        head[0].1 = b"99".to_vec();
        let err = apply_response_head(&mut r, &head).expect_err("status 99");
        assert!(err.contains(":status"), "{err}");
        head[0].1 = b"418".to_vec();
        apply_response_head(&mut r, &head).expect("valid status");
        assert_eq!(r.status, StatusCode::IM_A_TEAPOT);
    }
}
