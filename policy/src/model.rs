//! The validated policy model: what `parse.rs` produces and `resolve.rs` consumes.
//!
//! Owns the typed form of CNP/CCNP/KNP rules after validation and namespace scoping. The
//! nil / empty distinctions of Cilium (reference §1.2) are kept explicitly: an L3 member
//! given as an empty list is [`Peers::Endpoints`] (etc.) with no items and selects nothing,
//! while a rule without any L3 member is [`Peers::Unspecified`] (wildcard when it has
//! `toPorts`/`icmps`, nothing otherwise).

use std::fmt;

use serde::Serialize;

use crate::cidr::IpPrefix;
use crate::fqdn::FqdnSelector;
use crate::http::HttpRule;
use crate::labels::Labels;
use crate::selector::EndpointSelector;
use crate::server_name::ServerName;

/// The resource kinds this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    /// `cilium.io/v2` CiliumNetworkPolicy (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` CiliumClusterwideNetworkPolicy (cluster-scoped).
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` NetworkPolicy (namespaced).
    NetworkPolicy,
}

impl PolicyKind {
    /// The `kind:` string.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// True for the namespaced kinds.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, PolicyKind::CiliumClusterwideNetworkPolicy)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a policy resource in a [`crate::Repository`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyRef {
    /// Resource kind.
    pub kind: PolicyKind,
    /// Namespace (`None` for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One parsed and validated policy resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Resource kind.
    pub kind: PolicyKind,
    /// Namespace (`None` for CCNP).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`, if present.
    pub uid: Option<String>,
    /// `metadata.labels` of the resource.
    pub labels: Labels,
    /// The rules (`spec` first, then `specs` in order; KNP gives one rule).
    pub rules: Vec<Rule>,
    /// Non-fatal findings (e.g. an illegal namespace match that was removed, §1.5).
    pub warnings: Vec<String>,
}

impl Policy {
    /// The repository key of this policy.
    pub fn policy_ref(&self) -> PolicyRef {
        PolicyRef {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// What a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Subject {
    /// `endpointSelector`: local endpoints other than the host endpoint.
    Endpoints(EndpointSelector),
    /// `nodeSelector` (CCNP only): the host endpoint ("host policy").
    Nodes(EndpointSelector),
}

/// Per-direction default-deny flags after Cilium's defaulting (reference §1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DefaultDeny {
    /// Ingress default deny requested.
    pub ingress: bool,
    /// Egress default deny requested.
    pub egress: bool,
}

/// One rule of a policy (a `spec`/`specs[i]` entry, or the translated KNP).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// Subject selector (namespace-scoped for CNP/KNP).
    pub subject: Subject,
    /// `ingress` allow rules.
    pub ingress: Vec<PeerRule>,
    /// `ingressDeny` rules (no L7).
    pub ingress_deny: Vec<PeerRule>,
    /// `egress` allow rules.
    pub egress: Vec<PeerRule>,
    /// `egressDeny` rules (no L7, no toFQDNs).
    pub egress_deny: Vec<PeerRule>,
    /// Default-deny flags (explicit `enableDefaultDeny` or the defaults).
    pub enable_default_deny: DefaultDeny,
    /// The rule's `labels` plus the policy labels of §1.5 point 7.
    pub labels: Labels,
    /// `description`.
    pub description: Option<String>,
    /// Human-readable origin, e.g. `CiliumNetworkPolicy default/web specs[1]`; names
    /// the rule in cookies and flow logs.
    pub origin: String,
}

/// One ingress/egress (allow or deny) rule: peers plus optional L4/L7.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerRule {
    /// Who the peer is.
    pub peers: Peers,
    /// `toPorts` (empty: all ports, unless `icmps` is set).
    pub to_ports: Vec<PortRule>,
    /// `icmps` fields, flattened (never together with `to_ports`).
    pub icmps: Vec<IcmpField>,
}

impl PeerRule {
    /// True if the rule restricts L4 (has `toPorts` or `icmps`).
    pub fn has_l4(&self) -> bool {
        !self.to_ports.is_empty() || !self.icmps.is_empty()
    }
}

/// The L3 member of a rule (at most one kind per rule, reference §1.2).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Peers {
    /// No L3 member given (nil): any peer if the rule has L4, nothing otherwise.
    Unspecified,
    /// `fromEndpoints`/`toEndpoints` (namespace-scoped); empty = selects nothing.
    Endpoints(Vec<EndpointSelector>),
    /// `fromEntities`/`toEntities`; empty = selects nothing.
    Entities(Vec<Entity>),
    /// `fromCIDR`/`fromCIDRSet`/`toCIDR`/`toCIDRSet`; empty = selects nothing.
    Cidrs(Vec<CidrRule>),
    /// `toFQDNs`; empty = selects nothing.
    Fqdns(Vec<FqdnSelector>),
    /// `toServices`; parsed and validated, **not resolved yet** (selects nothing).
    Services(Vec<ServiceSelector>),
}

/// A CIDR with exceptions (`cidr` + `except`), or a bare `toCIDR` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CidrRule {
    /// Allowed prefix.
    pub cidr: IpPrefix,
    /// Excluded sub-prefixes (each contained in `cidr`).
    pub except: Vec<IpPrefix>,
}

/// `toServices` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ServiceSelector {
    /// `k8sService {serviceName, namespace}`.
    Named {
        /// Service name.
        name: String,
        /// Namespace (defaults to the policy's).
        namespace: Option<String>,
    },
    /// `k8sServiceSelector {selector, namespace}`.
    Selector {
        /// Label selector over service labels.
        selector: EndpointSelector,
        /// Namespace (defaults to the policy's).
        namespace: Option<String>,
    },
}

/// Cilium entities (reference §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Entity {
    /// Everything, including world.
    All,
    /// Outside the cluster: `reserved:world`, `world-ipv4`, `world-ipv6`.
    World,
    /// Everything in the cluster (needs the cluster name).
    Cluster,
    /// The local host.
    Host,
    /// Endpoints without labels yet.
    Init,
    /// The ingress (L7 LB) identity.
    Ingress,
    /// Unmanaged endpoints.
    Unmanaged,
    /// Other nodes.
    RemoteNode,
    /// Health endpoints.
    Health,
    /// Selects nothing.
    None,
    /// The Kubernetes API server.
    KubeApiserver,
}

impl Entity {
    /// Parses the CRD enum value.
    pub fn from_name(s: &str) -> Option<Entity> {
        Some(match s {
            "all" => Entity::All,
            "world" => Entity::World,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "init" => Entity::Init,
            "ingress" => Entity::Ingress,
            "unmanaged" => Entity::Unmanaged,
            "remote-node" => Entity::RemoteNode,
            "health" => Entity::Health,
            "none" => Entity::None,
            "kube-apiserver" => Entity::KubeApiserver,
            _ => return None,
        })
    }
}

/// A `toPorts` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortRule {
    /// `ports` (at most 40). Empty: all ports.
    pub ports: Vec<PortProtocol>,
    /// `rules` (L7), if any type was given (nil-based: `http: []` is an allow-all HTTP rule set).
    /// A non-empty `serverNames` is [`L7Rules::Tls`] here: it cannot be combined with `rules`
    /// (that needs `terminatingTLS`), and it is enforced by the proxy like an L7 rule set.
    pub rules: Option<L7Rules>,
}

/// A port or port range with protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortProtocol {
    /// Number (0 = all ports) or IANA service name (lower-cased).
    pub port: Port,
    /// `endPort` (a range when greater than `port`).
    pub end_port: Option<u16>,
    /// Protocol; `Any` = TCP, UDP and SCTP.
    pub protocol: Protocol,
}

/// A port number or a named port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Port {
    /// Numeric port (0 = all).
    Number(u16),
    /// Named port, resolved per endpoint.
    Named(String),
}

/// Port protocols of `toPorts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
    /// TCP, UDP and SCTP.
    Any,
}

impl Protocol {
    /// IP protocol number; 0 for `Any`.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Any => 0,
        }
    }

    /// The concrete protocols this stands for.
    pub fn expand(self) -> &'static [Protocol] {
        match self {
            Protocol::Tcp => &[Protocol::Tcp],
            Protocol::Udp => &[Protocol::Udp],
            Protocol::Sctp => &[Protocol::Sctp],
            Protocol::Any => &[Protocol::Tcp, Protocol::Udp, Protocol::Sctp],
        }
    }

    /// Upper-case name as in the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Any => "ANY",
        }
    }
}

/// L7 rules of one `toPorts` entry (one type per entry).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum L7Rules {
    /// `rules.http`; empty = allow all requests (still proxied).
    Http(Vec<HttpRule>),
    /// `rules.dns`; empty = allow all names (still proxied).
    Dns(Vec<FqdnSelector>),
    /// `serverNames`: the TLS ClientHello's server name must match one (checked by the proxy
    /// without terminating TLS). Empty only as the L7 wildcard an L4-only rule on the same
    /// port becomes (any connection, TLS or not, still proxied).
    Tls(Vec<ServerName>),
}

/// ICMP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IcmpFamily {
    /// ICMP (protocol 1).
    IPv4,
    /// ICMPv6 (protocol 58).
    IPv6,
}

/// One `icmps[].fields[]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IcmpField {
    /// Family (default IPv4).
    pub family: IcmpFamily,
    /// ICMP type (numeric, names resolved).
    pub icmp_type: u8,
}

impl IcmpField {
    /// IP protocol number of the family.
    pub fn protocol(&self) -> u8 {
        match self.family {
            IcmpFamily::IPv4 => 1,
            IcmpFamily::IPv6 => 58,
        }
    }
}

/// ICMPv4 type names accepted by Cilium (`pkg/policy/api/icmp.go`).
pub(crate) const ICMPV4_TYPES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// ICMPv6 type names accepted by Cilium.
pub(crate) const ICMPV6_TYPES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];
