//! Enrichment: what the agent knows about addresses and identities that the raw events do
//! not carry (labels, namespace, pod, DNS names, services, the node's name).
//!
//! The ingest task calls the [`Enricher`] once or twice per flow, on its own task: lookups
//! must be cheap and must not block (in-memory maps, no I/O).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;

use crate::names;

/// A workload the agent knows by address (a pod on this node or, via ipcache metadata, on
/// another one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointMeta {
    /// The local endpoint id, 0 when the address is not an endpoint of this node.
    pub id: u32,
    pub namespace: String,
    pub pod_name: String,
    /// Security-relevant labels as `source:key=value` (`k8s:app=frontend`); empty means
    /// "use the identity's labels".
    pub labels: Vec<String>,
}

/// A Kubernetes service an address and port belong to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMeta {
    pub name: String,
    pub namespace: String,
}

/// What the agent provides to turn events into Hubble flows.
pub trait Enricher: Send + Sync + 'static {
    /// The workload owning `ip`, if known.
    fn endpoint(&self, ip: IpAddr) -> Option<EndpointMeta>;

    /// Labels of a security identity as `source:key=value`; empty when unknown (reserved
    /// identities then fall back to `reserved:<name>`).
    fn identity_labels(&self, identity: u32) -> Vec<String>;

    /// DNS names `endpoint_id` resolved to `ip` (Hubble's `source_names` /
    /// `destination_names`).
    fn dns_names(&self, endpoint_id: u32, ip: IpAddr) -> Vec<String> {
        let _ = (endpoint_id, ip);
        Vec::new()
    }

    /// The service `ip:port` is a frontend of.
    fn service(&self, ip: IpAddr, port: u16) -> Option<ServiceMeta> {
        let _ = (ip, port);
        None
    }

    /// This node's name (Hubble's `node_name`).
    fn node_name(&self) -> String;
}

/// `reserved:<name>` for a reserved identity.
pub fn reserved_identity_label(identity: u32) -> Option<String> {
    names::reserved_identity_name(identity).map(|name| format!("reserved:{name}"))
}

#[derive(Default)]
struct Tables {
    node_name: String,
    endpoints: HashMap<IpAddr, EndpointMeta>,
    identities: HashMap<u32, Vec<String>>,
    dns_names: HashMap<IpAddr, Vec<String>>,
    services: HashMap<(IpAddr, u16), ServiceMeta>,
}

/// An in-memory [`Enricher`] for tests, the lab and early wiring: tables the caller fills.
/// Reads take a read lock; updates are rare.
#[derive(Default)]
pub struct StaticEnricher {
    tables: RwLock<Tables>,
}

impl StaticEnricher {
    pub fn new(node_name: impl Into<String>) -> Self {
        let enricher = Self::default();
        enricher.write().node_name = node_name.into();
        enricher
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is
        // one insert), so a poisoned lock is still usable.
        self.tables.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert_endpoint(&self, ip: IpAddr, meta: EndpointMeta) {
        self.write().endpoints.insert(ip, meta);
    }

    pub fn insert_identity(&self, identity: u32, labels: Vec<String>) {
        self.write().identities.insert(identity, labels);
    }

    pub fn insert_dns_names(&self, ip: IpAddr, names: Vec<String>) {
        self.write().dns_names.insert(ip, names);
    }

    pub fn insert_service(&self, ip: IpAddr, port: u16, service: ServiceMeta) {
        self.write().services.insert((ip, port), service);
    }

    /// Builder form of [`Self::insert_endpoint`].
    #[must_use]
    pub fn with_endpoint(self, ip: IpAddr, meta: EndpointMeta) -> Self {
        self.insert_endpoint(ip, meta);
        self
    }

    /// Builder form of [`Self::insert_identity`].
    #[must_use]
    pub fn with_identity(self, identity: u32, labels: Vec<String>) -> Self {
        self.insert_identity(identity, labels);
        self
    }

    /// Builder form of [`Self::insert_dns_names`].
    #[must_use]
    pub fn with_dns_names(self, ip: IpAddr, names: Vec<String>) -> Self {
        self.insert_dns_names(ip, names);
        self
    }
}

impl Enricher for StaticEnricher {
    fn endpoint(&self, ip: IpAddr) -> Option<EndpointMeta> {
        self.read().endpoints.get(&ip).cloned()
    }

    fn identity_labels(&self, identity: u32) -> Vec<String> {
        self.read()
            .identities
            .get(&identity)
            .cloned()
            .unwrap_or_default()
    }

    fn dns_names(&self, _endpoint_id: u32, ip: IpAddr) -> Vec<String> {
        self.read().dns_names.get(&ip).cloned().unwrap_or_default()
    }

    fn service(&self, ip: IpAddr, port: u16) -> Option<ServiceMeta> {
        self.read().services.get(&(ip, port)).cloned()
    }

    fn node_name(&self) -> String {
        self.read().node_name.clone()
    }
}
