//! The gRPC side: Hubble's `observer.Observer` service and `grpc.health.v1.Health`, served
//! on a Unix socket or TCP.
//!
//! GetFlows follows Hubble's local server (`pkg/hubble/observer/local_observer.go`):
//! - `first` starts at the oldest flow; `follow` without `number`/`since` starts at the
//!   newest; otherwise the ring is walked back from the newest flow until `number`
//!   matching flows (or the first one older than `since`) are found;
//! - without `follow`, the stream ends after `number` flows (0 = no limit) or at the flow
//!   that was newest when the request arrived; a flow after `until` ends it too;
//! - lost-event notices in the ring are sent regardless of filters and time bounds, and a
//!   reader that falls more than a ring behind gets a `HUBBLE_RING_BUFFER` notice;
//! - `first` with `follow` is INVALID_ARGUMENT; filters membrane cannot evaluate are
//!   UNIMPLEMENTED, malformed ones INVALID_ARGUMENT.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::codegen::{BoxStream, Bytes, http};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::fieldmask::FlowMask;
use crate::filter::{FilterError, FlowFilters};
use crate::peer::PeerService;
use crate::pipeline::{Observer, Shared};
use crate::proto::flow::{Flow, LostEvent, LostEventSource};
use crate::proto::observer::observer_server::{self, ObserverServer};
use crate::proto::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse, Namespace,
    ServerStatusRequest, ServerStatusResponse, get_flows_response::ResponseTypes,
};
use crate::ring::{Entry, RingEvent};
use crate::timefmt;

/// Hubble's default TCP port for a node's observer.
pub const DEFAULT_TCP_PORT: u16 = 4244;
/// Where the agent serves the observer locally (Hubble: `/var/run/cilium/hubble.sock`).
pub const DEFAULT_UNIX_SOCKET: &str = "/run/membrane/hubble.sock";
/// The service name `hubble status` health-checks.
pub const HEALTH_SERVICE_NAME: &str = "hubble.server.Observer";

/// Entries copied out of the ring per lock; bounds how long a reader holds it.
const READ_BATCH: usize = 256;
/// Responses buffered per stream before the reader waits for the client.
const STREAM_BUFFER: usize = 64;
/// GetNamespaces reports namespaces with flows in this window, like Hubble.
const NAMESPACE_WINDOW_NANOS: i128 = 3600 * 1_000_000_000;

/// Errors from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind the observer socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("observer gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The `observer.Observer` implementation.
#[derive(Clone)]
pub struct ObserverService {
    shared: Arc<Shared>,
}

impl ObserverService {
    pub fn new(observer: &Observer) -> Self {
        Self {
            shared: Arc::clone(observer.shared()),
        }
    }

    /// The tonic service to add to a router: the generated server, with GetFlows answered
    /// from encoded responses ([`ObserverRoutes`]).
    pub fn into_server(self) -> ObserverRoutes {
        ObserverRoutes {
            inner: ObserverServer::new(self.clone()),
            service: self,
        }
    }

    /// GetFlows as a stream of encoded `GetFlowsResponse`s.
    fn get_flows_encoded(
        &self,
        request: &GetFlowsRequest,
    ) -> Result<ReceiverStream<Result<Bytes, Status>>, Status> {
        let plan = Plan::new(request)?;
        let position = Cursor::new(&self.shared, &plan);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(stream_flows(Arc::clone(&self.shared), plan, position, tx));
        Ok(ReceiverStream::new(rx))
    }
}

/// `observer.Observer` as served: every method by the generated server except GetFlows,
/// whose responses are encoded straight from the ring's flows (a subscriber costs one
/// encoding per flow, not a deep copy of it and then an encoding).
#[derive(Clone)]
pub struct ObserverRoutes {
    inner: ObserverServer<ObserverService>,
    service: ObserverService,
}

impl tonic::server::NamedService for ObserverRoutes {
    const NAME: &'static str = "observer.Observer";
}

impl<B> tonic::codegen::Service<http::Request<B>> for ObserverRoutes
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != "/observer.Observer/GetFlows" {
            return self.inner.call(request);
        }
        let service = self.service.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(EncodedCodec);
            Ok(grpc
                .server_streaming(GetFlowsEncoded(service), request)
                .await)
        })
    }
}

struct GetFlowsEncoded(ObserverService);

impl tonic::server::ServerStreamingService<GetFlowsRequest> for GetFlowsEncoded {
    type Response = Bytes;
    type ResponseStream = BoxStream<Bytes>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<GetFlowsRequest>) -> Self::Future {
        let started = self
            .0
            .get_flows_encoded(request.get_ref())
            .map(|stream| Response::new(Box::pin(stream) as BoxStream<Bytes>));
        Box::pin(async move { started })
    }
}

/// Decodes `GetFlowsRequest`s, writes already-encoded responses as they are.
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = GetFlowsRequest;
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        EncodedCodec
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut as _;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedCodec {
    type Item = GetFlowsRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<GetFlowsRequest>, Status> {
        use prost::Message as _;
        GetFlowsRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("GetFlowsRequest: {e}")))
    }
}

fn filter_status(e: FilterError) -> Status {
    match e {
        FilterError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        FilterError::Unsupported { .. } => Status::unimplemented(e.to_string()),
    }
}

fn timestamp_nanos(
    name: &str,
    ts: Option<&prost_types::Timestamp>,
) -> Result<Option<i128>, Status> {
    ts.map(|ts| {
        timefmt::nanos(ts).ok_or_else(|| {
            Status::invalid_argument(format!(
                "GetFlowsRequest.{name} is not a valid timestamp: {ts:?}"
            ))
        })
    })
    .transpose()
}

/// A validated GetFlows request.
struct Plan {
    number: u64,
    first: bool,
    follow: bool,
    since: Option<i128>,
    until: Option<i128>,
    filters: FlowFilters,
    mask: FlowMask,
}

impl Plan {
    fn new(req: &GetFlowsRequest) -> Result<Self, Status> {
        if req.first && req.follow {
            return Err(Status::invalid_argument(
                "first cannot be specified with follow",
            ));
        }
        let filters = FlowFilters::new(&req.whitelist, &req.blacklist).map_err(filter_status)?;
        let paths = req
            .field_mask
            .as_ref()
            .or_else(|| req.experimental.as_ref()?.field_mask.as_ref())
            .map(|m| m.paths.as_slice())
            .unwrap_or_default();
        let mask = FlowMask::new(paths).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Self {
            number: req.number,
            first: req.first,
            follow: req.follow,
            since: timestamp_nanos("since", req.since.as_ref())?,
            until: timestamp_nanos("until", req.until.as_ref())?,
            filters,
            mask,
        })
    }

    fn flow_nanos(flow: &Flow) -> Option<i128> {
        flow.time.as_ref().and_then(timefmt::nanos)
    }

    /// The sequence number to start reading at (Hubble's `newRingReader`).
    fn start(&self, snapshot: &[Entry], next: u64) -> u64 {
        let oldest = snapshot.first().map_or(next, |e| e.seq);
        if self.first && self.since.is_none() {
            return oldest;
        }
        if self.follow && self.number == 0 && self.since.is_none() {
            return next;
        }
        let mut count = 0u64;
        for entry in snapshot.iter().rev() {
            let RingEvent::Flow(flow) = &entry.event else {
                continue;
            };
            if !self.filters.matches(flow) {
                continue;
            }
            count += 1;
            if let Some(since) = self.since {
                if Self::flow_nanos(flow).is_none_or(|t| t < since) {
                    return entry.seq + 1;
                }
            } else if count == self.number {
                return entry.seq;
            }
        }
        oldest
    }
}

enum Step {
    /// An encoded `GetFlowsResponse`, and whether it carries a flow.
    Send(Bytes, bool),
    Skip,
    /// A flow after `until`: the stream ends.
    Stop,
}

/// A `GetFlowsResponse` carrying `flow`, encoded straight from the ring's copy: no clone of
/// the flow per subscriber (field numbers from Hubble's observer.proto: `flow` 1,
/// `node_name` 1000, `time` 1001; like Hubble, time and node come from the flow).
fn encode_flow_response(flow: &Flow) -> Bytes {
    // A typical flow encodes to a few hundred bytes; the buffer grows for larger ones
    // (measuring first would walk the whole flow once more).
    let mut buf = BytesMut::with_capacity(1024);
    prost::encoding::message::encode(1, flow, &mut buf);
    if !flow.node_name.is_empty() {
        prost::encoding::string::encode(1000, &flow.node_name, &mut buf);
    }
    if let Some(time) = &flow.time {
        prost::encoding::message::encode(1001, time, &mut buf);
    }
    buf.freeze()
}

fn encode_response(response: &GetFlowsResponse) -> Bytes {
    use prost::Message as _;
    Bytes::from(response.encode_to_vec())
}

fn lost_response(
    lost: LostEvent,
    time: prost_types::Timestamp,
    node_name: String,
) -> GetFlowsResponse {
    GetFlowsResponse {
        response_types: Some(ResponseTypes::LostEvents(lost)),
        node_name,
        time: Some(time),
    }
}

impl Plan {
    fn step(&self, entry: &Entry, node_name: &str) -> Step {
        match &entry.event {
            RingEvent::Lost(lost, time) => Step::Send(
                encode_response(&lost_response(*lost, *time, node_name.to_owned())),
                false,
            ),
            RingEvent::Flow(flow) => {
                if self.since.is_some() || self.until.is_some() {
                    let Some(t) = Self::flow_nanos(flow) else {
                        return Step::Skip;
                    };
                    if self.until.is_some_and(|until| t > until) {
                        return Step::Stop;
                    }
                    if self.since.is_some_and(|since| t < since) {
                        return Step::Skip;
                    }
                }
                if !self.filters.matches(flow) {
                    return Step::Skip;
                }
                // Like Hubble, the response's time and node come from the (masked) flow.
                let encoded = if self.mask.is_active() {
                    encode_flow_response(&self.mask.apply(flow))
                } else {
                    encode_flow_response(flow)
                };
                Step::Send(encoded, true)
            }
        }
    }
}

/// Where a stream starts and (without follow) ends, fixed when the request is accepted so
/// that a client that saw the response headers knows which flows it will get.
struct Cursor {
    start: u64,
    end: Option<u64>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Cursor {
    fn new(shared: &Shared, plan: &Plan) -> Self {
        let mut changes = shared.ring.subscribe();
        changes.borrow_and_update();
        let (snapshot, next) = shared.ring.snapshot();
        Self {
            start: plan.start(&snapshot, next),
            // Without follow, the stream ends at what was newest when the request arrived.
            end: (!plan.follow).then_some(next),
            changes,
        }
    }
}

async fn stream_flows(
    shared: Arc<Shared>,
    plan: Plan,
    position: Cursor,
    tx: mpsc::Sender<Result<Bytes, Status>>,
) {
    let Cursor {
        start: mut cursor,
        end,
        mut changes,
    } = position;
    let node_name = shared.node_name();
    let mut sent_flows = 0u64;
    loop {
        if end.is_some_and(|end| cursor >= end) {
            return;
        }
        changes.borrow_and_update();
        let read = shared.ring.read(cursor, READ_BATCH);
        if read.overwritten > 0 {
            let lost = LostEvent {
                source: LostEventSource::HubbleRingBuffer as i32,
                num_events_lost: read.overwritten,
                cpu: None,
            };
            let now = timefmt::timestamp(SystemTime::now());
            if tx
                .send(Ok(encode_response(&lost_response(
                    lost,
                    now,
                    node_name.clone(),
                ))))
                .await
                .is_err()
            {
                return;
            }
        }
        let empty = read.entries.is_empty();
        for entry in &read.entries {
            if end.is_some_and(|end| entry.seq >= end) {
                return;
            }
            let (response, is_flow) = match plan.step(entry, &node_name) {
                Step::Send(response, is_flow) => (response, is_flow),
                Step::Skip => continue,
                Step::Stop => return,
            };
            if tx.send(Ok(response)).await.is_err() {
                return; // The client went away.
            }
            if is_flow {
                sent_flows += 1;
                if !plan.follow && plan.number > 0 && sent_flows >= plan.number {
                    return;
                }
            }
        }
        cursor = read.next;
        if empty {
            if !plan.follow {
                return;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return; // The pipeline is gone.
                    }
                }
                () = tx.closed() => return,
            }
        }
    }
}

#[tonic::async_trait]
impl observer_server::Observer for ObserverService {
    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BoxStream<GetFlowsResponse>>, Status> {
        // Served by [`ObserverRoutes`] from encoded responses; this typed form (for callers
        // of the trait) decodes them again.
        use prost::Message as _;
        use tokio_stream::StreamExt as _;
        let encoded = self.get_flows_encoded(request.get_ref())?;
        Ok(Response::new(Box::pin(encoded.map(|item| {
            item.and_then(|bytes| {
                GetFlowsResponse::decode(bytes).map_err(|e| Status::internal(e.to_string()))
            })
        }))))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let cutoff = timefmt::system_nanos(SystemTime::now()) - NAMESPACE_WINDOW_NANOS;
        let (entries, _) = self.shared.ring.snapshot();
        let mut namespaces = BTreeSet::new();
        for entry in &entries {
            let RingEvent::Flow(flow) = &entry.event else {
                continue;
            };
            if Plan::flow_nanos(flow).is_none_or(|t| t < cutoff) {
                continue;
            }
            for ep in [flow.source.as_ref(), flow.destination.as_ref()]
                .into_iter()
                .flatten()
            {
                if !ep.namespace.is_empty() {
                    namespaces.insert(ep.namespace.clone());
                }
            }
        }
        Ok(Response::new(GetNamespacesResponse {
            namespaces: namespaces
                .into_iter()
                .map(|namespace| Namespace {
                    cluster: String::new(),
                    namespace,
                })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(self.shared.server_status()))
    }

    async fn get_agent_events(
        &self,
        _request: Request<GetAgentEventsRequest>,
    ) -> Result<Response<BoxStream<GetAgentEventsResponse>>, Status> {
        Err(Status::unimplemented(AGENT_EVENTS_UNIMPLEMENTED))
    }

    async fn get_debug_events(
        &self,
        _request: Request<GetDebugEventsRequest>,
    ) -> Result<Response<BoxStream<GetDebugEventsResponse>>, Status> {
        Err(Status::unimplemented(DEBUG_EVENTS_UNIMPLEMENTED))
    }
}

/// Why GetAgentEvents is refused (Cilium's agent streams endpoint, policy and ipcache
/// changes; membrane's records none of them as events yet).
pub const AGENT_EVENTS_UNIMPLEMENTED: &str = "GetAgentEvents is not implemented by membrane: \
     the agent records no agent events (endpoint, policy and ipcache changes); \
     `membrane status` and `membrane endpoint list` show the current state";
/// Why GetDebugEvents is refused (Cilium's come from datapath debug builds).
pub const DEBUG_EVENTS_UNIMPLEMENTED: &str = "GetDebugEvents is not implemented by membrane: \
     its datapath emits no debug events (`membrane bpf metrics` counts drops by reason)";

/// The gRPC health service, answering SERVING for `""` and `hubble.server.Observer`.
pub async fn health_service()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(HEALTH_SERVICE_NAME, ServingStatus::Serving)
        .await;
    service
}

async fn router(
    observer: &Observer,
    peers: Option<PeerService>,
) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(health_service().await)
        .add_service(ObserverService::new(observer).into_server())
        .add_optional_service(peers.map(PeerService::into_server))
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by a previous run.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                return Err(bind_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    UnixListener::bind(path).map_err(bind_err)
}

/// Serves the observer and health services on a bound Unix socket until `shutdown`
/// completes.
pub async fn serve_unix(
    observer: &Observer,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_unix_with_peers(observer, None, listener, shutdown).await
}

/// [`serve_unix`], plus Hubble's Peer service when `peers` is given.
pub async fn serve_unix_with_peers(
    observer: &Observer,
    peers: Option<PeerService>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    router(observer, peers)
        .await
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Serves the observer and health services on a bound TCP listener (Hubble's port is
/// [`DEFAULT_TCP_PORT`]) until `shutdown` completes.
pub async fn serve_tcp(
    observer: &Observer,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_tcp_with_peers(observer, None, listener, shutdown).await
}

/// [`serve_tcp`], plus Hubble's Peer service when `peers` is given.
pub async fn serve_tcp_with_peers(
    observer: &Observer,
    peers: Option<PeerService>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    router(observer, peers)
        .await
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::convert::tests::{at, datapath, enricher};
    use crate::input::{DatapathEventKind, DatapathVerdict, FlowInput};
    use crate::pipeline::ObserverConfig;
    use crate::proto::flow::layer4;
    use crate::proto::observer::observer_server::Observer as _;

    const WAIT: Duration = Duration::from_secs(10);

    /// Flows with source ports 0..6, one second apart.
    async fn observer(max_flows: usize) -> Observer {
        let config = ObserverConfig {
            max_flows,
            ..ObserverConfig::default()
        };
        let observer = Observer::spawn(config, Arc::new(enricher())).expect("config");
        let sender = observer.sender();
        for n in 0..6u16 {
            let mut ev = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
            ev.time = at(n.into());
            ev.sport = n;
            assert!(sender.send(FlowInput::Datapath(ev)));
        }
        tokio::time::timeout(WAIT, observer.flush())
            .await
            .expect("flush in time");
        observer
    }

    async fn ports(observer: &Observer, req: GetFlowsRequest) -> Vec<Option<u32>> {
        let service = ObserverService::new(observer);
        let stream = service
            .get_flows(Request::new(req))
            .await
            .expect("request accepted")
            .into_inner();
        let responses: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
            .await
            .expect("stream ends");
        responses
            .into_iter()
            .map(|r| match r.expect("no error").response_types {
                Some(ResponseTypes::Flow(f)) => match f.l4?.protocol? {
                    layer4::Protocol::Tcp(t) => Some(t.source_port),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    fn ts(secs: u64) -> Option<prost_types::Timestamp> {
        Some(timefmt::timestamp(at(secs)))
    }

    #[tokio::test]
    async fn time_bounds_and_counts() {
        let o = observer(16).await;
        let cases = [
            (GetFlowsRequest::default(), vec![0, 1, 2, 3, 4, 5]),
            (
                GetFlowsRequest {
                    since: ts(3),
                    ..GetFlowsRequest::default()
                },
                vec![3, 4, 5],
            ),
            (
                GetFlowsRequest {
                    until: ts(1),
                    ..GetFlowsRequest::default()
                },
                vec![0, 1],
            ),
            (
                GetFlowsRequest {
                    since: ts(2),
                    until: ts(3),
                    ..GetFlowsRequest::default()
                },
                vec![2, 3],
            ),
            (
                GetFlowsRequest {
                    since: ts(2),
                    first: true,
                    number: 2,
                    ..GetFlowsRequest::default()
                },
                vec![2, 3],
            ),
            (
                GetFlowsRequest {
                    number: 3,
                    ..GetFlowsRequest::default()
                },
                vec![3, 4, 5],
            ),
            (
                GetFlowsRequest {
                    number: 100,
                    first: true,
                    ..GetFlowsRequest::default()
                },
                vec![0, 1, 2, 3, 4, 5],
            ),
        ];
        for (req, want) in cases {
            let got = ports(&o, req.clone()).await;
            let want: Vec<Option<u32>> = want.into_iter().map(Some).collect();
            assert_eq!(got, want, "request {req:?}");
        }
    }

    #[tokio::test]
    async fn bad_timestamps_are_invalid_arguments() {
        let o = observer(4).await;
        let err = ObserverService::new(&o)
            .get_flows(Request::new(GetFlowsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..GetFlowsRequest::default()
            }))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn agent_and_debug_events_are_refused_saying_why() {
        let o = observer(2).await;
        let service = ObserverService::new(&o);
        let agent = service
            .get_agent_events(Request::new(GetAgentEventsRequest::default()))
            .await
            .err()
            .expect("refused");
        assert_eq!(agent.code(), tonic::Code::Unimplemented);
        assert!(agent.message().contains("agent records no agent events"));
        let debug = service
            .get_debug_events(Request::new(GetDebugEventsRequest::default()))
            .await
            .err()
            .expect("refused");
        assert_eq!(debug.code(), tonic::Code::Unimplemented);
        assert!(debug.message().contains("no debug events"));
    }

    #[tokio::test]
    async fn a_small_ring_keeps_the_newest() {
        let o = observer(2).await;
        assert_eq!(
            ports(&o, GetFlowsRequest::default()).await,
            [Some(4), Some(5)]
        );
    }
}
