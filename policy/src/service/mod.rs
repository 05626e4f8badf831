//! Kubernetes services for the load balancer: `v1` `Service` and `discovery.k8s.io/v1`
//! `EndpointSlice` parsed and validated ([`parse`]), kept in a [`ServiceRepository`] that
//! refuses conflicting frontends, and resolved into an [`LbState`] — the frontends of the
//! node with their backends, in slot order — that the agent writes into the datapath's
//! service maps. Maglev lookup tables ([`maglev`]) are computed from a frontend's backends.
//!
//! Pure like the rest of the crate: no I/O, no clocks, no aya. Semantics follow Cilium's
//! kube-proxy replacement (`shared/reference/services-lb.md` §1, §3, §6):
//!
//! - Frontends per service port: every ClusterIP (`spec.clusterIP(s)`; headless services
//!   have none), every `spec.externalIPs` address, every `status.loadBalancer.ingress[].ip`,
//!   and for NodePort/LoadBalancer types with a `nodePort` the wildcard `0.0.0.0:nodePort`
//!   (every address of the node). IPv4 only for now: IPv6 addresses are skipped with a
//!   warning.
//! - Backends: the EndpointSlices labelled `kubernetes.io/service-name: <service>` in the
//!   service's namespace; a service port takes the slice port of the same name and
//!   protocol (Kubernetes' rule: the slice already carries the resolved target port), else
//!   the slice port named like a named `targetPort` (hand-written slices), else none.
//! - States from the slice's conditions: `terminating: true` ⇒ terminating; otherwise
//!   `ready` (nil = true) ⇒ active; otherwise quarantined (kept so readiness flaps do not
//!   cut existing connections, never chosen for new ones — Cilium since #42170).
//! - `externalTrafficPolicy`/`internalTrafficPolicy: Local`: node-local backends only (the
//!   endpoint's `nodeName` equals [`LbOptions::node_name`]) for external frontends
//!   (NodePort, ExternalIP, LoadBalancer) resp. in-cluster clients. When the two sets
//!   differ a frontend gets two scopes (external and internal entries, Cilium's
//!   `SVC_FLAG_TWO_SCOPES`); ClusterIPs have only the internal set.
//! - `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`
//!   (default 10800 s, at most 86400 s as Kubernetes validates).
//!
//! # API
//! - [`parse_service_documents`]`(text, source_name) -> Result<Vec<`[`ServiceResource`]`>,
//!   `[`ServiceError`]`>` (YAML multi-document or JSON, `kind: List`), [`parse_service_value`]
//!   for one decoded document, [`ServiceParseOptions`] (default namespace, NodePort range).
//! - [`ServiceRepository`]: `apply` (all or nothing), `upsert_service`, `upsert_slice`,
//!   `remove_service`, `remove_slice`; `desired_state(&LbOptions) -> LbState`.
//! - [`maglev::build_table`] and [`LbFrontend::maglev_table`].

pub mod maglev;
mod parse;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::Ipv4Addr;

pub use parse::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, MAX_AFFINITY_TIMEOUT_SECS, NODEPORT_RANGE_DEFAULT,
    SERVICE_NAME_LABEL, ServiceParseOptions, parse_service_documents, parse_service_value,
};
pub use state::{
    BackendState, FrontendKind, LbBackend, LbFrontend, LbOptions, LbScope, LbState,
    ServiceRepository,
};

/// A service's `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocols the load balancer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

impl L4Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            L4Protocol::Tcp => "TCP",
            L4Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    /// A DNS alias: no frontends.
    ExternalName,
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// `spec.ports[].targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One `spec.ports[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// `None` for an unnamed (single) port.
    pub name: Option<String>,
    pub protocol: L4Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

/// A parsed `v1` `Service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: ServiceName,
    pub service_type: ServiceType,
    /// IPv4 cluster IPs (`spec.clusterIPs`, else `spec.clusterIP`); empty when headless.
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `clusterIP: None`: no frontends (DNS returns the pods).
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `sessionAffinity: ClientIP` ⇒ the timeout in seconds.
    pub affinity_timeout_secs: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// What was accepted but is not acted on (IPv6 addresses, `healthCheckNodePort`, …).
    pub warnings: Vec<String>,
}

/// `addressType` of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
}

/// One `ports[]` entry of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub protocol: L4Protocol,
    /// `None`: unset (all ports; only meaningful for headless services).
    pub port: Option<u16>,
}

/// `endpoints[].conditions` (nil = unknown; Kubernetes reads unknown ready/serving as true).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

/// One `endpoints[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub conditions: EndpointConditions,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// A parsed `discovery.k8s.io/v1` `EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPort>,
    /// Empty for IPv6/FQDN slices (not served; see `warnings`).
    pub endpoints: Vec<Endpoint>,
    pub warnings: Vec<String>,
}

impl EndpointSlice {
    pub fn service_name(&self) -> ServiceName {
        ServiceName {
            namespace: self.namespace.clone(),
            name: self.service.clone(),
        }
    }
}

/// One parsed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceResource {
    Service(Service),
    EndpointSlice(EndpointSlice),
}

/// A service document that does not parse, or a change the repository refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The text is not valid YAML/JSON.
    #[error("{source_name}: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    /// A document is well-formed but not a valid Service or EndpointSlice.
    #[error("{source_name}: document {document}{resource}: {path}: {message}")]
    Invalid {
        source_name: String,
        /// 0-based index of the document (`kind: List` items count as their list's).
        document: usize,
        /// ` (Kind namespace/name)` when known, else empty.
        resource: String,
        /// Field path (`spec.ports[1].nodePort`).
        path: String,
        message: String,
    },
    /// A frontend of the service is already another service's.
    #[error("service {service}: {field}: frontend {frontend} is already used by service {other}")]
    FrontendConflict {
        /// `namespace/name` of the refused service.
        service: String,
        /// Where the frontend comes from (`spec.ports[0]` with `spec.clusterIP`, …).
        field: String,
        frontend: String,
        /// `namespace/name` of the service holding the frontend.
        other: String,
    },
}

impl ServiceError {
    /// The field path of an [`ServiceError::Invalid`] or [`ServiceError::FrontendConflict`].
    pub fn path(&self) -> Option<&str> {
        match self {
            ServiceError::Invalid { path, .. } => Some(path),
            ServiceError::FrontendConflict { field, .. } => Some(field),
            ServiceError::Syntax { .. } => None,
        }
    }
}
