//! The filter-chain hook: how HTTP filters (the Wasm host in `membrane-filters`, adapted by
//! the agent) plug into the proxy's request path without this crate knowing wasmtime.
//!
//! Phase chart, per request (driven by `proxy`):
//!
//! ```text
//! L7 policy ── denied ──▶ 403 (no filter sees it: policy runs first, as Cilium's
//!    │                         cilium.l7policy filter precedes any other HTTP filter)
//!    ▼ allowed (headers as the policy left them)
//! on_request_headers ──▶ Continue | LocalReply | Close
//!    │  Pause: take_callouts → the proxy sends them to the named upstreams →
//!    │         on_callout_response (repeat until not paused);
//!    │         take_grpc_ops → the proxy carries them over HTTP/2 (`grpc_callout`) →
//!    │         on_grpc_event per event (initial metadata, message, trailers, close)
//!    ▼
//! request body chunks ──▶ on_request_body (streamed; a filter that pauses buffers)
//!    │  Pause with callouts: sent as above before the next chunk is read; a resume
//!    │  releases the buffered bytes (resumed_body)
//!    ▼ upstream response head
//! on_response_headers ──▶ Continue | LocalReply | Close  (Pause: as above)
//!    ▼
//! response body chunks ─▶ on_response_body (streamed; buffering only on Pause; callouts as
//!                         for the request body)
//!    ▼
//! finish ──▶ the filters' decisions (records)
//! ```
//!
//! Callbacks are synchronous and bounded by the filter host's deadline (10 ms by default), so
//! the proxy calls them inline; only callouts are awaited. gRPC calls are started and fed only
//! while a phase is paused (as HTTP callouts); a call still open when its phase resumes
//! stays open, its events wait in its queue and are delivered at the stream's next pause,
//! and it is reset when the stream ends (the host then tells the filter it was cancelled). While a body phase waits for a
//! callout the proxy stops reading that body (backpressure), where Envoy would keep
//! buffering and calling the filter with each new chunk: the filter sees the same bytes,
//! later. A local reply from a response body phase cannot be sent (the response head is on
//! its way): the stream is reset instead. Body framing is the filter's job,
//! as in Envoy: a filter that changes a body's length removes `content-length` in its headers
//! phase (the upstream SDK's `http_body` example does); otherwise the proxy would send a
//! mismatched length, so it resets the stream instead.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::access::FilterRecord;
use crate::grpc_callout::{GrpcCalloutEvent, GrpcRequest};

/// What the proxy knows about a request's peers, handed to the filters (`source.*`,
/// `destination.*` properties).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMeta {
    pub address: Option<SocketAddr>,
    pub identity: Option<u32>,
    /// `key=value` labels of the identity, when the route knows them.
    pub labels: Vec<(String, String)>,
    pub namespace: Option<String>,
    pub workload: Option<String>,
}

/// Per-request facts for [`HttpFilters::start`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamMeta {
    pub source: PeerMeta,
    pub destination: PeerMeta,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
}

/// A request or response head as filters see it: pseudo-headers (`:method`, `:path`,
/// `:authority`, `:scheme` / `:status`) plus the header fields, names lower-case, values raw.
pub type HeadPairs = Vec<(String, Vec<u8>)>;

/// A reply a filter produced instead of forwarding (or instead of the upstream's response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a phase decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterAction {
    /// Go on with the (possibly modified) head or chunk.
    Continue,
    /// Headers: wait for callouts. Body: the chunk was buffered by a filter.
    Pause,
    /// Answer with this reply.
    LocalReply(FilterReply),
    /// Reset the stream.
    Close,
}

/// An HTTP call a filter asked for; the proxy sends it to the address of `upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Opaque; hand it back with [`FilterStream::on_callout_response`].
    pub id: u64,
    /// The filter that made it (its upstream names are its own).
    pub filter: String,
    pub upstream: String,
    /// Request head, pseudo-headers included.
    pub head: HeadPairs,
    pub body: Bytes,
    /// `None`: the proxy's own bound applies.
    pub timeout: Option<Duration>,
}

/// A callout's response (`None` where it is passed means the call failed or timed out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutResponse {
    /// `:status` first.
    pub head: HeadPairs,
    pub body: Bytes,
}

/// A gRPC operation a filter asked for (`proxy_grpc_call`, `proxy_grpc_stream`,
/// `proxy_grpc_send`, `proxy_grpc_close`, `proxy_grpc_cancel`), in the order it asked; the
/// proxy carries it with [`crate::grpc_callout::GrpcCallouts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcCalloutOp {
    /// Open call `id` to the address of `filter`'s upstream `upstream`. `message`: a unary
    /// call's request (half-closed after it); `None` opens a stream.
    Start {
        id: u64,
        filter: String,
        upstream: String,
        request: GrpcRequest,
        message: Option<Bytes>,
    },
    /// One message on stream `id` (unframed); `end_stream` half-closes after it.
    Send {
        id: u64,
        message: Bytes,
        end_stream: bool,
    },
    /// Half-close stream `id`: the answer still comes.
    Close { id: u64 },
    /// Reset call `id`: nothing more is delivered for it.
    Cancel { id: u64 },
}

/// One request through a filter chain. The head methods take and give back the head as
/// [`HeadPairs`] so the proxy owns the conversion to and from `http` types.
pub trait FilterStream: Send {
    fn on_request_headers(&mut self, head: &mut HeadPairs, end_of_stream: bool) -> FilterAction;
    /// `data` in: the chunk; out: what to forward now.
    fn on_request_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> FilterAction;
    fn on_response_headers(&mut self, head: &mut HeadPairs, end_of_stream: bool) -> FilterAction;
    fn on_response_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> FilterAction;
    /// Callouts made since the last call.
    fn take_callouts(&mut self) -> Vec<Callout>;
    /// Delivers a callout outcome; when this resumes the paused headers phase, `head` is the
    /// head of that phase (request or response) as the filters left it.
    fn on_callout_response(
        &mut self,
        id: u64,
        response: Option<CalloutResponse>,
        head: &mut HeadPairs,
    ) -> FilterAction;
    /// gRPC operations made since the last call. Default: none.
    fn take_grpc_ops(&mut self) -> Vec<GrpcCalloutOp> {
        Vec::new()
    }
    /// Delivers one event of gRPC call `id` (every call ends with one `Close`); `head` as for
    /// [`FilterStream::on_callout_response`]. Default: stays paused.
    fn on_grpc_event(
        &mut self,
        id: u64,
        event: GrpcCalloutEvent,
        head: &mut HeadPairs,
    ) -> FilterAction {
        let _ = (id, event, head);
        FilterAction::Pause
    }
    /// After [`FilterStream::on_callout_response`] resumed a paused body phase
    /// (`Continue`): the bytes to forward now. Default: none.
    fn resumed_body(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// What the filters did so far, for access records.
    fn records(&self) -> Vec<FilterRecord>;
}

/// A filter chain the proxy runs for each request of a route.
pub trait HttpFilters: Send + Sync {
    /// Starts one request; `None` when no filter applies to it.
    fn start(&self, meta: StreamMeta) -> Option<Box<dyn FilterStream>>;
    /// The address of `filter`'s callout upstream `name` (`--filter-upstream NAME=ADDR`, a
    /// `WasmFilter`'s `spec.upstreams`); calls to a name without one fail (the filter sees a
    /// failed call).
    fn callout_upstream(&self, filter: &str, name: &str) -> Option<SocketAddr>;
}
