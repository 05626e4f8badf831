//! What producers hand to the pipeline: datapath events, HTTP access records and DNS records.
//!
//! These types mirror the datapath's `FlowEventView` and the proxy's `AccessRecord` without
//! depending on either crate; the agent converts its events into [`FlowInput`]. Times are
//! wall-clock (`SystemTime`): the datapath stamps events with the monotonic clock, and the
//! agent converts that before handing them over.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// Which producer an input came from; lost events are counted per source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowSource {
    /// The eBPF programs (ring buffer events).
    Datapath,
    /// The L7 proxy's HTTP access records.
    Proxy,
    /// The DNS proxy's query and answer records.
    Dns,
}

impl FlowSource {
    pub const ALL: [FlowSource; 3] = [FlowSource::Datapath, FlowSource::Proxy, FlowSource::Dns];

    /// The label value used in `membrane_flows_lost_total{source}`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Datapath => "datapath",
            Self::Proxy => "proxy",
            Self::Dns => "dns",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            Self::Datapath => 0,
            Self::Proxy => 1,
            Self::Dns => 2,
        }
    }
}

/// One event for the flow pipeline.
#[derive(Clone, Debug, PartialEq)]
pub enum FlowInput {
    Datapath(DatapathEvent),
    Http(HttpRecord),
    Dns(DnsRecord),
}

impl FlowInput {
    pub fn source(&self) -> FlowSource {
        match self {
            Self::Datapath(_) => FlowSource::Datapath,
            Self::Http(_) => FlowSource::Proxy,
            Self::Dns(_) => FlowSource::Dns,
        }
    }
}

/// Traffic direction from the local endpoint's point of view (Cilium's convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Traffic entering the endpoint.
    Ingress,
    /// Traffic leaving the endpoint.
    Egress,
}

/// Cilium's monitor message types that the datapath emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatapathEventKind {
    /// A dropped packet (monitor type 1).
    Drop,
    /// A forwarded packet seen at an observation point (monitor type 4).
    Trace,
    /// A policy decision on the first packet of a connection (monitor type 5).
    PolicyVerdict,
}

/// The datapath's verdict (Hubble's `Verdict` subset the datapath produces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatapathVerdict {
    Forwarded,
    Dropped,
    /// Sent to the L7 proxy.
    Redirected,
}

/// Where a trace event was observed (Cilium's `TRACE_*` points, the trace sub-type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObservationPoint {
    ToEndpoint,
    ToProxy,
    ToHost,
    ToStack,
    ToOverlay,
    FromEndpoint,
    FromProxy,
    FromHost,
    FromStack,
    FromOverlay,
    FromNetwork,
    ToNetwork,
}

impl ObservationPoint {
    /// Cilium's `TRACE_*` number, used as `event_type.sub_type`.
    pub const fn monitor_sub_type(self) -> i32 {
        match self {
            Self::ToEndpoint => 0,
            Self::ToProxy => 1,
            Self::ToHost => 2,
            Self::ToStack => 3,
            Self::ToOverlay => 4,
            Self::FromEndpoint => 5,
            Self::FromProxy => 6,
            Self::FromHost => 7,
            Self::FromStack => 8,
            Self::FromOverlay => 9,
            Self::FromNetwork => 10,
            Self::ToNetwork => 11,
        }
    }
}

/// The policy that allowed or denied a flow, as the agent resolved it from a rule cookie
/// (datapath) or a rule reference (proxy). Filled into Hubble's `*_allowed_by` /
/// `*_denied_by` fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRef {
    pub name: String,
    pub namespace: String,
    /// `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` or `NetworkPolicy`.
    pub kind: String,
    pub labels: Vec<String>,
    pub revision: u64,
}

/// A decoded datapath event (the datapath's `FlowEventView`, converted by the agent).
#[derive(Clone, Debug, PartialEq)]
pub struct DatapathEvent {
    pub time: SystemTime,
    pub kind: DatapathEventKind,
    pub verdict: DatapathVerdict,
    /// Cilium drop reason (130–205) when dropped.
    pub drop_reason: Option<u8>,
    pub direction: Direction,
    /// Cilium's policy match type (0 none, 1 L3-only, 2 L3-L4, 3 L4-only, 4 all, 5 L3-proto,
    /// 6 proto-only); only meaningful for policy verdicts.
    pub match_type: u8,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP).
    pub protocol: u8,
    /// Byte 13 of the TCP header (FIN 0x01 … CWR 0x80); 0 for other protocols.
    pub tcp_flags: u8,
    /// The local endpoint the event was seen at.
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    /// Destination port; for ICMP the ICMP type (the datapath's convention).
    pub dport: u16,
    /// ICMP code, 0 when the datapath does not carry it.
    pub icmp_code: u8,
    pub proxy_port: Option<u16>,
    /// Interface index the event was seen on (0 = unknown).
    pub ifindex: u32,
    /// Whether the packet is a reply, when the datapath knows. Policy verdicts that
    /// forward are first packets, so `None` there is reported as "not a reply" (as Hubble
    /// does); drops stay unknown.
    pub is_reply: Option<bool>,
    /// Trace observation point; `None` derives it from the direction (egress: from-endpoint,
    /// ingress: to-endpoint), which is where membrane's programs sit.
    pub observation_point: Option<ObservationPoint>,
    /// The policy behind the verdict, if the agent could resolve the rule cookie.
    pub policy: Option<PolicyRef>,
}

/// Cilium's access-log entry type, reduced to what Hubble maps to `l7.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L7Kind {
    Request,
    Response,
}

/// Cilium's access-log verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L7Verdict {
    Forwarded,
    /// Denied by policy: reported as DROPPED.
    Denied,
    Redirected,
    Error,
}

/// One HTTP access record (the proxy's `AccessRecord`). `client` and `server` are the
/// request's source and destination; for responses the flow is reported from the server
/// to the client, as Cilium's access log does.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRecord {
    pub time: SystemTime,
    pub kind: L7Kind,
    pub verdict: L7Verdict,
    pub method: String,
    /// `scheme://authority/path?query`; a password in the userinfo is redacted.
    pub url: String,
    /// `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`.
    pub protocol: String,
    /// Response status (responses only).
    pub status: Option<u16>,
    /// Request head to response head (responses only).
    pub latency: Option<Duration>,
    /// Headers to show in the flow, in order (the agent decides which, e.g. redaction).
    pub headers: Vec<(String, String)>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub client_identity: u32,
    pub server_identity: u32,
    /// The local endpoint whose traffic the proxy handled (0 = unknown).
    pub endpoint_id: u32,
    /// Ingress: the local endpoint is the server; egress: it is the client.
    pub direction: Direction,
    pub policy: Option<PolicyRef>,
}

/// Where a DNS record was observed (Hubble's `observation_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsObservationSource {
    Proxy,
}

/// One DNS proxy record: a query (allowed or denied) or an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsRecord {
    pub time: SystemTime,
    pub kind: L7Kind,
    pub verdict: L7Verdict,
    /// The queried name, with its trailing dot (`example.com.`).
    pub query: String,
    /// Query types (1 A, 28 AAAA, …).
    pub qtypes: Vec<u16>,
    /// Answer record types (responses).
    pub rrtypes: Vec<u16>,
    pub ips: Vec<IpAddr>,
    pub cnames: Vec<String>,
    /// Minimum TTL of the answer (responses).
    pub ttl: u32,
    pub rcode: u16,
    pub observation_source: DnsObservationSource,
    /// Transport of the query: 17 UDP or 6 TCP.
    pub protocol: u8,
    /// The querying pod.
    pub client: SocketAddr,
    /// The DNS server the query was sent to.
    pub server: SocketAddr,
    pub client_identity: u32,
    pub server_identity: u32,
    pub endpoint_id: u32,
    pub direction: Direction,
    pub latency: Option<Duration>,
    pub policy: Option<PolicyRef>,
}
