//! The relay's `observer.Observer`: GetFlows fanned out and merged ([`crate::flows`]),
//! ServerStatus summed over the nodes with the connected and unavailable ones counted and
//! named, GetNodes (`hubble list nodes`), GetNamespaces merged; GetAgentEvents and
//! GetDebugEvents are Unimplemented, as at Hubble Relay. Served with gRPC health
//! (`hubble status` checks `hubble.server.Observer`), and Prometheus metrics on their own
//! port.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use membrane_observer::proto::observer::observer_server::{self, ObserverServer};
use membrane_observer::proto::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest, ServerStatusResponse,
    Tls,
};
use membrane_observer::proto::relay::NodeState;
use membrane_observer::{FlowFilters, FlowMask};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::codegen::{BoxStream, http};
use tonic::{Request, Response, Status};

use crate::flows::{MergeConfig, get_flows};
use crate::peers::{Peers, RelayMetrics};

/// ServerStatus names at most this many unavailable nodes (Hubble Relay's limit).
const UNAVAILABLE_NODES_LISTED: usize = 10;
/// The relay's version string in ServerStatus.
pub const RELAY_VERSION: &str = concat!("membrane-relay ", env!("CARGO_PKG_VERSION"));

/// The relay's observer service.
#[derive(Clone)]
pub struct RelayService {
    peers: Peers,
    metrics: Arc<RelayMetrics>,
    merge: MergeConfig,
}

impl RelayService {
    pub fn new(peers: Peers, metrics: Arc<RelayMetrics>, merge: MergeConfig) -> Self {
        Self {
            peers,
            metrics,
            merge,
        }
    }

    /// The tonic service: the generated server, with GetFlows taken over by
    /// [`RelayRoutes`] so the request reaches the nodes exactly as the client sent it.
    pub fn into_server(self) -> RelayRoutes {
        RelayRoutes {
            inner: ObserverServer::new(self.clone()),
            service: self,
        }
    }

    fn validate(request: &GetFlowsRequest) -> Result<(), Status> {
        if request.first && request.follow {
            return Err(Status::invalid_argument(
                "first cannot be specified with follow",
            ));
        }
        // The same checks as a node's, so a bad request is refused once, up front, rather
        // than as one NODE_ERROR per node.
        FlowFilters::new(&request.whitelist, &request.blacklist).map_err(|e| match e {
            membrane_observer::FilterError::Invalid { .. } => {
                Status::invalid_argument(e.to_string())
            }
            membrane_observer::FilterError::Unsupported { .. } => {
                Status::unimplemented(e.to_string())
            }
        })?;
        let paths = request
            .field_mask
            .as_ref()
            .or(request
                .experimental
                .as_ref()
                .and_then(|e| e.field_mask.as_ref()))
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        FlowMask::new(&paths).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(())
    }

    fn get_flows_raw(&self, raw: Bytes) -> Result<BoxStream<Bytes>, Status> {
        let request = GetFlowsRequest::decode(raw.clone())
            .map_err(|e| Status::invalid_argument(format!("GetFlowsRequest: {e}")))?;
        Self::validate(&request)?;
        Ok(Box::pin(get_flows(
            self.peers.clone(),
            self.metrics.clone(),
            self.merge,
            raw,
            &request,
        )))
    }
}

/// `observer.Observer` as the relay serves it (GetFlows on raw bytes, the rest generated).
#[derive(Clone)]
pub struct RelayRoutes {
    inner: ObserverServer<RelayService>,
    service: RelayService,
}

impl tonic::server::NamedService for RelayRoutes {
    const NAME: &'static str = "observer.Observer";
}

impl<B> tonic::codegen::Service<http::Request<B>> for RelayRoutes
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
            let mut grpc = tonic::server::Grpc::new(crate::flows::RawCodec);
            Ok(grpc.server_streaming(RawGetFlows(service), request).await)
        })
    }
}

struct RawGetFlows(RelayService);

impl tonic::server::ServerStreamingService<Bytes> for RawGetFlows {
    type Response = Bytes;
    type ResponseStream = BoxStream<Bytes>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let started = self
            .0
            .get_flows_raw(request.into_inner())
            .map(Response::new);
        Box::pin(async move { started })
    }
}

#[tonic::async_trait]
impl observer_server::Observer for RelayService {
    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BoxStream<GetFlowsResponse>>, Status> {
        // Served by [`RelayRoutes`] on raw bytes; this typed form is for callers of the trait.
        use tokio_stream::StreamExt as _;
        let raw = Bytes::from(request.into_inner().encode_to_vec());
        let stream = self.get_flows_raw(raw)?;
        Ok(Response::new(Box::pin(stream.map(|item| {
            item.and_then(|bytes| {
                GetFlowsResponse::decode(bytes).map_err(|e| Status::internal(e.to_string()))
            })
        }))))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let mut reply = ServerStatusResponse {
            version: RELAY_VERSION.to_owned(),
            ..ServerStatusResponse::default()
        };
        let (mut connected, mut unavailable) = (0u32, Vec::new());
        for (view, status) in self.peers.statuses().await {
            match status {
                Ok(s) => {
                    connected += 1;
                    reply.num_flows += s.num_flows;
                    reply.max_flows += s.max_flows;
                    reply.seen_flows += s.seen_flows;
                    reply.uptime_ns = reply.uptime_ns.max(s.uptime_ns);
                    reply.flows_rate += s.flows_rate;
                }
                Err(_) => unavailable.push(view.name),
            }
        }
        reply.num_connected_nodes = Some(connected);
        reply.num_unavailable_nodes = Some(unavailable.len() as u32);
        unavailable.truncate(UNAVAILABLE_NODES_LISTED);
        reply.unavailable_nodes = unavailable;
        Ok(Response::new(reply))
    }

    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let tls = self.peers.dialer().tls_enabled();
        let nodes = self
            .peers
            .statuses()
            .await
            .into_iter()
            .map(|(view, status)| {
                let mut node = Node {
                    name: view.name,
                    address: view.address,
                    tls: Some(Tls {
                        enabled: tls,
                        server_name: if tls {
                            view.tls_server_name
                        } else {
                            String::new()
                        },
                    }),
                    ..Node::default()
                };
                match status {
                    Ok(s) => {
                        node.state = NodeState::NodeConnected as i32;
                        node.version = s.version;
                        node.uptime_ns = s.uptime_ns;
                        node.num_flows = s.num_flows;
                        node.max_flows = s.max_flows;
                        node.seen_flows = s.seen_flows;
                    }
                    Err(_) => node.state = NodeState::NodeUnavailable as i32,
                }
                node
            })
            .collect();
        Ok(Response::new(GetNodesResponse { nodes }))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let timeout = self.peers.dialer().dial_timeout();
        let mut set = tokio::task::JoinSet::new();
        for view in self.peers.snapshot() {
            let Some(channel) = view.channel else {
                continue;
            };
            set.spawn(async move {
                let mut client =
                    membrane_observer::proto::observer::observer_client::ObserverClient::new(
                        channel,
                    );
                tokio::time::timeout(timeout, client.get_namespaces(GetNamespacesRequest {})).await
            });
        }
        let mut namespaces = BTreeSet::new();
        while let Some(joined) = set.join_next().await {
            if let Ok(Ok(Ok(reply))) = joined {
                for ns in reply.into_inner().namespaces {
                    namespaces.insert((ns.cluster, ns.namespace));
                }
            }
        }
        Ok(Response::new(GetNamespacesResponse {
            namespaces: namespaces
                .into_iter()
                .map(|(cluster, namespace)| Namespace { cluster, namespace })
                .collect(),
        }))
    }

    async fn get_agent_events(
        &self,
        _request: Request<GetAgentEventsRequest>,
    ) -> Result<Response<BoxStream<GetAgentEventsResponse>>, Status> {
        Err(Status::unimplemented(
            "GetAgentEvents is not served by the relay (as at Hubble Relay); ask a node",
        ))
    }

    async fn get_debug_events(
        &self,
        _request: Request<GetDebugEventsRequest>,
    ) -> Result<Response<BoxStream<GetDebugEventsResponse>>, Status> {
        Err(Status::unimplemented(
            "GetDebugEvents is not served by the relay (as at Hubble Relay); ask a node",
        ))
    }
}

/// Prometheus text of the relay's own metrics.
pub fn render_metrics(peers: &Peers, metrics: &RelayMetrics) -> String {
    let nodes = peers.snapshot();
    let connected = nodes.iter().filter(|n| n.channel.is_some()).count();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "membrane_relay_connected_nodes",
        "gauge",
        "Nodes whose observer the relay is connected to.",
        connected as u64,
    );
    metric(
        "membrane_relay_unavailable_nodes",
        "gauge",
        "Nodes the Peer service announced that the relay cannot reach.",
        (nodes.len() - connected) as u64,
    );
    metric(
        "membrane_relay_peer_service_connected",
        "gauge",
        "1 while the relay follows a Peer service.",
        u64::from(peers.discovering()),
    );
    metric(
        "membrane_relay_flows_forwarded_total",
        "counter",
        "Flows sent to clients.",
        metrics.flows_forwarded.load(Ordering::Relaxed),
    );
    metric(
        "membrane_relay_lost_events_total",
        "counter",
        "Events the nodes reported lost, forwarded to clients.",
        metrics.lost_events_forwarded.load(Ordering::Relaxed),
    );
    metric(
        "membrane_relay_node_stream_errors_total",
        "counter",
        "GetFlows streams from nodes that failed.",
        metrics.node_stream_errors.load(Ordering::Relaxed),
    );
    metric(
        "membrane_relay_peer_service_errors_total",
        "counter",
        "Failed attempts to follow a Peer service.",
        metrics.peer_service_errors.load(Ordering::Relaxed),
    );
    out
}

/// Bound on reading a metrics request.
const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /metrics` on `listener`, one connection at a time (scrapes are seconds apart).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    peers: Peers,
    metrics: Arc<RelayMetrics>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(METRICS_READ_TIMEOUT, conn.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let (status, body) = if request.starts_with("GET /metrics") {
            ("200 OK", render_metrics(&peers, &metrics))
        } else {
            ("404 Not Found", "only /metrics is served here\n".to_owned())
        };
        let _ = conn
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
    }
}
