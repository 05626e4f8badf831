//! Plain Rust types the proxy exchanges with the filter chain: header lists, what is known
//! about a stream's peers, and the actions filters ask for. No wasmtime types, so the proxy
//! can adapt them to its own filter-chain trait without seeing the engine.

use std::net::SocketAddr;
use std::sync::Arc;

/// An ordered HTTP header list as Envoy exposes it to filters: names lower-case, repeated names
/// kept as separate entries, pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`,
/// `:status`) included as ordinary entries, values as raw bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a list from `(name, value)` pairs, lower-casing the names.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut headers = Self::new();
        for (k, v) in pairs {
            headers.add(k.as_ref(), v.as_ref());
        }
        headers
    }

    /// A request head: the four pseudo-headers first (as Envoy orders them), then `headers`.
    pub fn request<I, K, V>(method: &str, path: &str, authority: &str, headers: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut out = Self::from_pairs([
            (":authority", authority),
            (":path", path),
            (":method", method),
            (":scheme", "http"),
        ]);
        for (k, v) in headers {
            out.add(k.as_ref(), v.as_ref());
        }
        out
    }

    /// A response head: `:status` first, then `headers`.
    pub fn response<I, K, V>(status: u16, headers: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut out = Self::new();
        out.add(b":status", status.to_string().as_bytes());
        for (k, v) in headers {
            out.add(k.as_ref(), v.as_ref());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// The first value of `name` (Envoy's `get_header_map_value` semantics).
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        let name = name.as_ref();
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` as UTF-8, if it is.
    pub fn get_str(&self, name: impl AsRef<[u8]>) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Appends an entry (the name is lower-cased).
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        self.entries
            .push((name.to_ascii_lowercase(), value.to_vec()));
    }

    /// Replaces the first entry of `name` and removes the others; adds it when absent.
    pub fn replace(&mut self, name: &[u8], value: &[u8]) {
        let mut found = false;
        self.entries.retain_mut(|(k, v)| {
            if !k.eq_ignore_ascii_case(name) {
                return true;
            }
            if found {
                return false;
            }
            found = true;
            v.clear();
            v.extend_from_slice(value);
            true
        });
        if !found {
            self.add(name, value);
        }
    }

    /// Removes every entry of `name`.
    pub fn remove(&mut self, name: &[u8]) {
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// Replaces the whole list (names lower-cased).
    pub fn set_all(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) {
        self.entries = pairs;
        for (k, _) in &mut self.entries {
            k.make_ascii_lowercase();
        }
    }

    /// The values of repeated names joined with `,` (Envoy's `request.headers` property).
    pub(crate) fn joined(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(self.entries.len());
        for (k, v) in &self.entries {
            if let Some((_, existing)) = out.iter_mut().find(|(ek, _)| ek == k) {
                existing.push(b',');
                existing.extend_from_slice(v);
            } else {
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }

    pub(crate) fn entries(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.entries
    }
}

/// What the node knows about one side of a stream: its security identity (from the ipcache),
/// its labels and its workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub address: Option<SocketAddr>,
    /// Numeric security identity (exposed to filters as an 8-byte little-endian uint).
    pub identity: Option<u64>,
    /// `key=value` labels of the identity (exposed as a map).
    pub labels: Vec<(String, String)>,
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub principal: Option<String>,
}

/// Per-stream facts the proxy hands in when a stream starts; read by `proxy_get_property`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamInfo {
    pub source: PeerInfo,
    pub destination: PeerInfo,
    /// `HTTP/1.0`, `HTTP/1.1`, `HTTP/2` or `HTTP/3`.
    pub protocol: Option<String>,
    pub connection_id: Option<u64>,
}

/// A reply generated instead of forwarding the request (`proxy_send_local_response`, or a
/// failure policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    /// Response headers without `:status` (the filter's, plus whatever the response path of the
    /// chain added).
    pub headers: Headers,
    pub body: Vec<u8>,
    /// `details` argument of `proxy_send_local_response` (Envoy's response code details), or
    /// `wasm_fail_stream` for a failure policy.
    pub details: String,
    /// gRPC status for trailers-only gRPC replies; `None` for the ABI's `-1` sentinel.
    pub grpc_status: Option<u32>,
    /// The filter that produced the reply.
    pub filter: Arc<str>,
}

/// What the chain asks the proxy to do after a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Go on: forward what the phase produced (headers possibly modified, body bytes returned).
    Continue,
    /// Headers phase: hold the stream (a filter paused it and did not resume). Body phase: the
    /// data was buffered by a filter; pass the next chunk (or end of stream) when it arrives.
    Pause,
    /// Answer the client with this reply; never forward the request (or the upstream response).
    LocalReply(LocalReply),
    /// Reset the stream (`proxy_close_stream`).
    Close,
}

/// Identifies one callout of one stream (which filter made it, and its token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HttpCallId {
    pub(crate) filter: usize,
    pub(crate) token: u32,
}

/// An HTTP callout a filter made (`proxy_http_call`) for the proxy to dispatch. The proxy
/// sends it to the address it maps `upstream` to and hands the outcome back with
/// [`crate::ChainStream::on_http_call_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub id: HttpCallId,
    /// The filter that made it.
    pub filter: Arc<str>,
    /// The upstream name (one of the filter's `callout_upstreams`).
    pub upstream: String,
    /// Request head: `:method`, `:path`, `:authority` (always present) and the other headers.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    /// 0 means none (Envoy); the proxy should still bound it.
    pub timeout: std::time::Duration,
}

/// A callout's response (`None` in [`crate::ChainStream::on_http_call_response`] means it
/// failed: connect error, reset or timeout; the filter then sees 0 headers and an empty body,
/// as in Envoy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Response head with `:status` first.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// Identifies one gRPC call or stream of one stream (which filter made it, and its token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrpcCallId {
    pub(crate) filter: usize,
    pub(crate) token: u32,
}

/// What a filter asked of a gRPC upstream (`proxy_grpc_call`, `proxy_grpc_stream`,
/// `proxy_grpc_send`, `proxy_grpc_close`, `proxy_grpc_cancel`), in the order it asked. The
/// proxy carries them over HTTP/2 and hands what comes back to
/// [`crate::ChainStream::on_grpc_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcOp {
    /// Open a call: `POST /{service}/{method}` to the address of `upstream`.
    Start(GrpcStart),
    /// Send one message (unframed: the proxy adds the 5-byte gRPC prefix); `end_stream`
    /// half-closes the sending side after it.
    Send {
        id: GrpcCallId,
        message: Vec<u8>,
        end_stream: bool,
    },
    /// Half-close the sending side (`proxy_grpc_close` of a stream): the server may still
    /// answer; its events keep coming.
    Close { id: GrpcCallId },
    /// Abandon the call (`proxy_grpc_cancel`, `proxy_grpc_close` of a unary call): reset the
    /// HTTP/2 stream; nothing more is delivered for it (as Envoy).
    Cancel { id: GrpcCallId },
}

/// A new gRPC call. A unary call (`proxy_grpc_call`) carries its one message and is
/// half-closed at once; a stream (`proxy_grpc_stream`) starts empty and is fed with
/// [`GrpcOp::Send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStart {
    pub id: GrpcCallId,
    /// The filter that made it.
    pub filter: Arc<str>,
    /// The upstream name (one of the filter's `callout_upstreams`).
    pub upstream: String,
    /// Fully qualified service name (`grpc.health.v1.Health`).
    pub service: String,
    pub method: String,
    /// Request metadata (sent as HTTP/2 headers after the gRPC ones).
    pub initial_metadata: Headers,
    /// `Some` for a unary call: its request message.
    pub message: Option<Vec<u8>>,
    /// 0 means none (Envoy); the proxy should still bound it. Sent as `grpc-timeout`.
    pub timeout: std::time::Duration,
}

impl GrpcStart {
    /// `/{service}/{method}`, the HTTP/2 `:path`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }
}

/// What came back from a gRPC upstream, in arrival order. Every call ends with exactly one
/// `Close` (unless the filter cancelled it); the proxy synthesizes it for failures it sees
/// itself (connect error: UNAVAILABLE, timeout: DEADLINE_EXCEEDED, reset: INTERNAL...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcEvent {
    /// The response headers.
    InitialMetadata(Headers),
    /// One response message (unframed).
    Message(Vec<u8>),
    /// The response trailers.
    TrailingMetadata(Headers),
    /// The call ended with this `grpc-status` and (percent-decoded) `grpc-message`.
    Close { status: u32, message: String },
}

/// gRPC status codes (`google.rpc.Code`) the host and the proxy produce themselves.
pub mod grpc_status {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// One filter decision for the flow record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDecision {
    pub filter: Arc<str>,
    pub phase: Phase,
    pub kind: DecisionKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionKind {
    /// The filter replied locally with this status.
    LocalReply { status: u16 },
    /// The filter changed the phase's headers.
    HeadersModified,
    /// The filter changed the body.
    BodyModified,
    /// The filter reset the stream.
    Closed,
    /// A callout of the filter (`proxy_http_call`) came back: `status` is the response's
    /// `:status`, `None` when the call failed (connect error, reset, timeout, no address, or
    /// never sent because the phase that made it went on).
    Callout {
        upstream: String,
        status: Option<u16>,
    },
    /// A gRPC call or stream of the filter ended (`proxy_on_grpc_close`, or the unary
    /// response): `grpc_status` 0 is OK.
    GrpcCallout {
        upstream: String,
        service: String,
        method: String,
        grpc_status: u32,
    },
    /// The filter's instance failed; `outcome` says what the failure policy did.
    Failed {
        reason: String,
        outcome: FailureOutcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The stream was answered with this status.
    Rejected { status: u16 },
    /// The filter was skipped for the rest of the stream.
    Bypassed,
}

/// Which side of a TCP connection closed, as `proxy_on_*_connection_close` reports it
/// (`proxy_peer_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerType {
    Unknown = 0,
    /// The proxy closed it.
    Local = 1,
    /// The peer closed it.
    Remote = 2,
}

/// The request/response phases a filter runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    StreamStart,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    /// TCP filters: `proxy_on_new_connection`.
    NewConnection,
    /// TCP filters: `proxy_on_downstream_data` / `_connection_close`.
    Downstream,
    /// TCP filters: `proxy_on_upstream_data` / `_connection_close`.
    Upstream,
    Log,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::StreamStart => "stream_start",
            Phase::RequestHeaders => "request_headers",
            Phase::RequestBody => "request_body",
            Phase::ResponseHeaders => "response_headers",
            Phase::ResponseBody => "response_body",
            Phase::NewConnection => "new_connection",
            Phase::Downstream => "downstream",
            Phase::Upstream => "upstream",
            Phase::Log => "log",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_list_semantics() {
        let mut h = Headers::from_pairs([("Accept", "a"), ("X-A", "1"), ("x-a", "2")]);
        assert_eq!(h.get("accept"), Some(&b"a"[..]));
        assert_eq!(h.get("X-a"), Some(&b"1"[..]));
        assert_eq!(h.get_all(b"x-a").count(), 2);
        assert_eq!(h.joined()[1], (b"x-a".to_vec(), b"1,2".to_vec()));
        h.replace(b"X-A", b"3");
        assert_eq!(h.get_all(b"x-a").collect::<Vec<_>>(), vec![&b"3"[..]]);
        h.replace(b"new", b"v");
        assert_eq!(h.get("new"), Some(&b"v"[..]));
        h.remove(b"accept");
        assert_eq!(h.get("accept"), None);
        assert_eq!(h.len(), 2);
    }
}
