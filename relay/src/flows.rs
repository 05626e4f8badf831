//! GetFlows across the cluster: the request goes, byte for byte, to every connected node
//! (so filters, field masks and fields this build does not know reach the nodes as the
//! client sent them); the answers are merged in time order.
//!
//! - Without `follow` every node's answer is collected (each is bounded by its ring and
//!   the request's `number`), sorted by time and cut to `number` flows across the cluster
//!   (the newest, or the oldest with `first`). A node silent for the idle timeout is left
//!   out with a NODE_ERROR, so one hung node never holds the answer back.
//! - With `follow`, flows pass a sort window as in Hubble Relay: at most `sort_len` are
//!   held, the oldest goes out when a new one arrives and the window is full, and when
//!   nothing arrives for the drain timeout everything older than that is sent. Nodes that
//!   connect later are attached (NODE_CONNECTED); a node whose stream fails is reported
//!   (NODE_ERROR) and attached again once it is back.
//! - Responses start with NODE_CONNECTED and NODE_UNAVAILABLE events naming the nodes.
//!
//! Only each response's head is decoded (its time, and lost-event counts); flows are
//! forwarded as the node encoded them. Every queue is bounded: a slow client slows the
//! nodes' streams (each node's own ring then reports what it lost), never the relay's
//! memory.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf as _, Bytes};
use membrane_observer::proto::flow::LostEvent;
use membrane_observer::proto::observer::get_flows_response::ResponseTypes;
use membrane_observer::proto::observer::{GetFlowsRequest, GetFlowsResponse};
use membrane_observer::proto::relay::{NodeState, NodeStatusEvent};
use membrane_observer::timefmt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::{DecodeBuf, EncodeBuf};
use tonic::transport::Channel;

use crate::peers::{Peers, RelayMetrics};

/// Responses buffered towards the client.
const OUT_BUFFER: usize = 64;
/// Responses buffered from the nodes (per request), at least.
const IN_BUFFER_MIN: usize = 64;

/// The knobs of the merge.
#[derive(Clone, Copy, Debug)]
pub struct MergeConfig {
    pub sort_len: usize,
    pub drain_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The part of a `GetFlowsResponse` the relay reads (field numbers of Hubble's
/// observer.proto); the rest is skipped on decode and forwarded untouched.
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHead {
    #[prost(bytes = "bytes", optional, tag = "1")]
    flow: Option<Bytes>,
    #[prost(message, optional, tag = "3")]
    lost_events: Option<LostEvent>,
    #[prost(message, optional, tag = "1001")]
    time: Option<prost_types::Timestamp>,
}

/// A flow's time (field 1 of `flow.Flow`), for responses that lack the top-level time.
#[derive(Clone, PartialEq, prost::Message)]
struct FlowHead {
    #[prost(message, optional, tag = "1")]
    time: Option<prost_types::Timestamp>,
}

/// One response from a node, ready to be ordered.
#[derive(Debug)]
struct Item {
    nanos: i128,
    /// Arrival order: keeps equal times in the order they came.
    seq: u64,
    is_flow: bool,
    lost: u64,
    bytes: Bytes,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.nanos, self.seq) == (other.nanos, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.nanos, self.seq).cmp(&(other.nanos, other.seq))
    }
}

fn head(bytes: &Bytes) -> Result<(i128, bool, u64), prost::DecodeError> {
    let head = ResponseHead::decode(bytes.clone())?;
    let time = match (head.time, &head.flow) {
        (Some(t), _) => Some(t),
        (None, Some(flow)) => FlowHead::decode(flow.clone())?.time,
        (None, None) => None,
    };
    // A response without a time sorts as "now": it goes out with what arrives with it.
    let nanos = time
        .as_ref()
        .and_then(timefmt::nanos)
        .unwrap_or_else(|| timefmt::system_nanos(SystemTime::now()));
    let lost = head.lost_events.map_or(0, |l| l.num_events_lost);
    Ok((nanos, head.flow.is_some(), lost))
}

enum Incoming {
    Item(Item),
    /// A node's stream ended; with the error when it failed.
    Done(String, Option<String>),
}

/// Writes already-encoded requests and reads responses as bytes.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut as _;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A node's GetFlows stream into the merge.
async fn node_stream(
    name: String,
    channel: Channel,
    request: Bytes,
    follow: bool,
    open_ended: bool,
    idle: Duration,
    tx: mpsc::Sender<Incoming>,
) {
    let error = async {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/observer.Observer/GetFlows");
        let mut stream = grpc
            .server_streaming(tonic::Request::new(request), path, RawCodec)
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        let mut seq = 0u64;
        loop {
            let next = if follow {
                stream.message().await
            } else {
                tokio::time::timeout(idle, stream.message())
                    .await
                    .map_err(|_| format!("no response within {idle:?}"))?
            };
            let Some(bytes) = next.map_err(|e| e.message().to_owned())? else {
                // A following stream ends only when the node goes (an agent shutting down
                // ends its streams cleanly): that is news for the client.
                return if open_ended {
                    Err("the node ended its stream".to_owned())
                } else {
                    Ok(())
                };
            };
            let (nanos, is_flow, lost) =
                head(&bytes).map_err(|e| format!("undecodable response: {e}"))?;
            seq += 1;
            let item = Item {
                nanos,
                seq,
                is_flow,
                lost,
                bytes,
            };
            if tx.send(Incoming::Item(item)).await.is_err() {
                return Ok(()); // The request is over.
            }
        }
    }
    .await
    .err();
    let _ = tx.send(Incoming::Done(name, error)).await;
}

fn status_response(state: NodeState, names: Vec<String>, message: String) -> Bytes {
    Bytes::from(
        GetFlowsResponse {
            response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
                state_change: state as i32,
                node_names: names,
                message,
            })),
            node_name: String::new(),
            time: Some(timefmt::timestamp(SystemTime::now())),
        }
        .encode_to_vec(),
    )
}

/// One GetFlows request across the cluster.
struct Merge {
    peers: Peers,
    metrics: Arc<RelayMetrics>,
    config: MergeConfig,
    request: Bytes,
    follow: bool,
    /// Following without `until`: the nodes' streams never end by themselves.
    open_ended: bool,
    number: u64,
    first: bool,
    out: mpsc::Sender<Result<Bytes, Status>>,
    tx: mpsc::Sender<Incoming>,
    attached: BTreeSet<String>,
    streams: tokio::task::JoinSet<()>,
    /// Global arrival order across nodes, for ties.
    seq: u64,
}

impl Merge {
    /// Attaches every connected node not attached yet; returns the newly connected and the
    /// unavailable nodes.
    fn attach(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut connected, mut unavailable) = (Vec::new(), Vec::new());
        for view in self.peers.snapshot() {
            if self.attached.contains(&view.name) {
                continue;
            }
            let Some(channel) = view.channel else {
                unavailable.push(view.name);
                continue;
            };
            self.attached.insert(view.name.clone());
            self.streams.spawn(node_stream(
                view.name.clone(),
                channel,
                self.request.clone(),
                self.follow,
                self.open_ended,
                self.config.idle_timeout,
                self.tx.clone(),
            ));
            connected.push(view.name);
        }
        (connected, unavailable)
    }

    async fn send(&self, item: Item) -> bool {
        if item.is_flow {
            RelayMetrics::add(&self.metrics.flows_forwarded, 1);
        }
        if item.lost > 0 {
            RelayMetrics::add(&self.metrics.lost_events_forwarded, item.lost);
        }
        self.out.send(Ok(item.bytes)).await.is_ok()
    }

    async fn send_status(&self, state: NodeState, names: Vec<String>, message: String) -> bool {
        if names.is_empty() {
            return true;
        }
        self.out
            .send(Ok(status_response(state, names, message)))
            .await
            .is_ok()
    }

    /// A node's stream ended: report a failure and forget the node, so that a following
    /// request attaches it again once it is back.
    async fn done(&mut self, name: String, error: Option<String>) -> bool {
        self.attached.remove(&name);
        match error {
            Some(message) => {
                RelayMetrics::add(&self.metrics.node_stream_errors, 1);
                tracing::warn!(node = %name, error = %message, "GetFlows stream from node failed");
                self.peers.report_failure(&name);
                self.send_status(NodeState::NodeError, vec![name], message)
                    .await
            }
            None => true,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Incoming>) {
        let (connected, unavailable) = self.attach();
        if !self
            .send_status(NodeState::NodeConnected, connected, String::new())
            .await
            || !self
                .send_status(NodeState::NodeUnavailable, unavailable, String::new())
                .await
        {
            return;
        }
        if self.follow {
            self.follow_loop(rx).await;
        } else {
            // Every response, then one sort: bounded by the nodes' rings and `number`.
            let mut items = Vec::new();
            while !self.attached.is_empty() {
                tokio::select! {
                    incoming = rx.recv() => match incoming {
                        Some(Incoming::Item(mut item)) => {
                            self.seq += 1;
                            item.seq = self.seq;
                            items.push(item);
                        }
                        Some(Incoming::Done(name, error)) => {
                            if !self.done(name, error).await {
                                return;
                            }
                        }
                        None => break,
                    },
                    () = self.out.closed() => return,
                }
            }
            items.sort();
            for item in cut(items, self.number, self.first) {
                if !self.send(item).await {
                    return;
                }
            }
        }
    }

    async fn follow_loop(&mut self, mut rx: mpsc::Receiver<Incoming>) {
        let mut changes = self.peers.subscribe();
        changes.borrow_and_update();
        let mut window: BinaryHeap<Reverse<Item>> = BinaryHeap::new();
        loop {
            tokio::select! {
                incoming = rx.recv() => match incoming {
                    Some(Incoming::Item(mut item)) => {
                        self.seq += 1;
                        item.seq = self.seq;
                        window.push(Reverse(item));
                        if window.len() > self.config.sort_len
                            && let Some(Reverse(oldest)) = window.pop()
                            && !self.send(oldest).await
                        {
                            return;
                        }
                    }
                    Some(Incoming::Done(name, error)) => {
                        if !self.done(name, error).await {
                            return;
                        }
                    }
                    None => return,
                },
                () = tokio::time::sleep(self.config.drain_timeout) => {
                    // Nothing new for the drain timeout: what is older than it goes out.
                    let horizon = timefmt::system_nanos(SystemTime::now())
                        - self.config.drain_timeout.as_nanos() as i128;
                    while window.peek().is_some_and(|Reverse(i)| i.nanos <= horizon) {
                        if let Some(Reverse(item)) = window.pop()
                            && !self.send(item).await
                        {
                            return;
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (connected, _) = self.attach();
                    if !self.send_status(NodeState::NodeConnected, connected, String::new()).await {
                        return;
                    }
                }
                () = self.out.closed() => return,
            }
        }
    }
}

/// The `number` flows of a sorted answer: the newest, or the oldest with `first`
/// (0 = all). Lost-event notices inside the kept span stay.
fn cut(items: Vec<Item>, number: u64, first: bool) -> Vec<Item> {
    if number == 0 {
        return items;
    }
    let flows = items.iter().filter(|i| i.is_flow).count() as u64;
    if flows <= number {
        return items;
    }
    let mut seen = 0u64;
    if first {
        let mut out = Vec::new();
        for item in items {
            if item.is_flow {
                if seen == number {
                    break;
                }
                seen += 1;
            }
            out.push(item);
        }
        out
    } else {
        let mut out: Vec<Item> = Vec::new();
        for item in items.into_iter().rev() {
            if seen == number {
                break; // Notices before the oldest kept flow are outside the span.
            }
            if item.is_flow {
                seen += 1;
            }
            out.push(item);
        }
        out.reverse();
        out
    }
}

/// Starts one GetFlows request across the cluster; `raw` is the request as the client
/// encoded it, `request` the same decoded (already validated by the caller).
pub fn get_flows(
    peers: Peers,
    metrics: Arc<RelayMetrics>,
    config: MergeConfig,
    raw: Bytes,
    request: &GetFlowsRequest,
) -> ReceiverStream<Result<Bytes, Status>> {
    let (out, out_rx) = mpsc::channel(OUT_BUFFER);
    let (tx, rx) = mpsc::channel(config.sort_len.max(IN_BUFFER_MIN));
    let merge = Merge {
        peers,
        metrics,
        config,
        request: raw,
        follow: request.follow,
        open_ended: request.follow && request.until.is_none(),
        number: request.number,
        first: request.first,
        out,
        tx,
        attached: BTreeSet::new(),
        streams: tokio::task::JoinSet::new(),
        seq: 0,
    };
    // Dropping the merge (the client left, or all done) aborts its node streams.
    tokio::spawn(merge.run(rx));
    ReceiverStream::new(out_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(nanos: i128, is_flow: bool) -> Item {
        Item {
            nanos,
            seq: nanos as u64,
            is_flow,
            lost: 0,
            bytes: Bytes::new(),
        }
    }

    fn times(items: &[Item]) -> Vec<i128> {
        items.iter().map(|i| i.nanos).collect()
    }

    #[test]
    fn cut_keeps_the_newest_or_the_oldest_flows() {
        let all = || vec![item(1, true), item(2, false), item(3, true), item(4, true)];
        assert_eq!(times(&cut(all(), 0, false)), [1, 2, 3, 4]);
        assert_eq!(times(&cut(all(), 2, false)), [3, 4]);
        assert_eq!(times(&cut(all(), 2, true)), [1, 2, 3]);
        assert_eq!(times(&cut(all(), 9, true)), [1, 2, 3, 4]);
    }

    #[test]
    fn heads_read_the_time_from_either_place() {
        let flow = membrane_observer::proto::flow::Flow {
            time: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 7,
            }),
            ..Default::default()
        };
        let mut with_top = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(flow)),
            node_name: "n".into(),
            time: Some(prost_types::Timestamp {
                seconds: 6,
                nanos: 0,
            }),
        };
        let bytes = Bytes::from(with_top.encode_to_vec());
        assert_eq!(head(&bytes).expect("decodes"), (6_000_000_000, true, 0));
        with_top.time = None;
        let bytes = Bytes::from(with_top.encode_to_vec());
        assert_eq!(head(&bytes).expect("decodes"), (5_000_000_007, true, 0));
        let lost = GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(LostEvent {
                source: 3,
                num_events_lost: 9,
                cpu: None,
            })),
            node_name: String::new(),
            time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
        };
        let bytes = Bytes::from(lost.encode_to_vec());
        assert_eq!(head(&bytes).expect("decodes"), (1_000_000_000, false, 9));
    }
}
