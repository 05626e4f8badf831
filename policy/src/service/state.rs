//! The service repository and the load balancer's desired state.
//!
//! [`ServiceRepository`] holds the services and slices of the node's view. A service whose
//! frontend (address, port, protocol) is already another service's is refused, naming the
//! field and the other service, and nothing changes: the services already in place are never
//! disturbed by a bad newcomer. [`ServiceRepository::desired_state`] is a pure function of
//! the repository and the [`LbOptions`]: the frontends with their backends in slot order
//! (active first, then the ones that take no new connections), deterministic (sorted) so a
//! reconcile compares states cheaply and every node computes the same thing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use super::maglev::{self, MaglevBackend, MaglevConfig, MaglevError};
use super::{
    EndpointSlice, L4Protocol, Service, ServiceError, ServiceName, ServicePort, ServiceResource,
    ServiceType, TargetPort, TrafficPolicy,
};

/// Node-dependent inputs of the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbOptions {
    /// This node's name, compared with the endpoints' `nodeName` for traffic policy
    /// `Local`. `None` (a single-node setup): every endpoint counts as local.
    pub node_name: Option<String>,
}

/// Where a frontend comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIP,
    /// Address 0.0.0.0: every address of the node.
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    /// Cilium's `cilium service list` type names.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIP => "ExternalIPs",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }

    /// Reached from outside the cluster (north-south): subject to `externalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIP)
    }
}

/// Which clients a frontend entry serves (Cilium's lookup scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbScope {
    /// Traffic from outside the cluster; also everyone's when the frontend has one scope.
    External,
    /// In-cluster clients, when the frontend has two scopes.
    Internal,
}

/// A backend's state (Cilium's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    /// Takes new connections.
    Active,
    /// Draining: keeps its connections, takes no new ones.
    Terminating,
    /// Not ready: kept for its connections, takes no new ones.
    Quarantined,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
            BackendState::Quarantined => "quarantined",
        }
    }

    /// From an EndpointSlice's conditions (module docs).
    pub fn from_conditions(c: &super::EndpointConditions) -> BackendState {
        if c.terminating == Some(true) {
            BackendState::Terminating
        } else if c.ready.unwrap_or(true) {
            BackendState::Active
        } else {
            BackendState::Quarantined
        }
    }
}

/// One backend of a frontend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
    /// The endpoint's node, if the slice names it.
    pub node_name: Option<String>,
}

impl LbBackend {
    /// The name Maglev hashes (`addr:port/PROTO`, the same on every node).
    pub fn maglev_name(&self, protocol: L4Protocol) -> String {
        format!("{}:{}/{protocol}", self.address, self.port)
    }
}

/// One frontend in one scope, with its backends in slot order: the active ones (sorted by
/// address and port), then the others (sorted the same way).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: L4Protocol,
    pub scope: LbScope,
    pub kind: FrontendKind,
    /// The frontend has an internal-scope entry too (set on the external one).
    pub two_scopes: bool,
    /// The backends are the node-local ones only (traffic policy `Local` for this scope).
    pub local_only: bool,
    pub service: ServiceName,
    /// The service port's name.
    pub port_name: Option<String>,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_secs: Option<u32>,
    pub backends: Vec<LbBackend>,
}

impl LbFrontend {
    /// Active backends (they come first).
    pub fn active_count(&self) -> usize {
        self.backends
            .iter()
            .take_while(|b| b.state == BackendState::Active)
            .count()
    }

    /// The Maglev table over the active backends: entry `i` is an index into
    /// [`LbFrontend::backends`]. Empty when there is no active backend.
    pub fn maglev_table(&self, config: &MaglevConfig) -> Result<Vec<u32>, MaglevError> {
        let active = &self.backends[..self.active_count()];
        let names: Vec<String> = active
            .iter()
            .map(|b| b.maglev_name(self.protocol))
            .collect();
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .map(|n| MaglevBackend { name: n, weight: 1 })
            .collect();
        maglev::build_table(&backends, config)
    }
}

impl fmt::Display for LbFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)?;
        if self.scope == LbScope::Internal {
            f.write_str("/i")?;
        }
        Ok(())
    }
}

/// The load balancer's desired state: every frontend entry, sorted by (address, port,
/// protocol, scope).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbState {
    pub frontends: Vec<LbFrontend>,
    /// Service ports that found no slice port, and similar things worth telling a user.
    pub warnings: Vec<String>,
}

/// Services and EndpointSlices of the node's view.
#[derive(Debug, Clone, Default)]
pub struct ServiceRepository {
    services: BTreeMap<ServiceName, Service>,
    /// By (namespace, slice name).
    slices: BTreeMap<(String, String), EndpointSlice>,
}

/// A frontend key: (address, port, protocol).
type FrontendKey = (Ipv4Addr, u16, L4Protocol);

/// Every frontend of a service, with the field it comes from.
fn frontends_of(svc: &Service) -> Vec<(FrontendKey, FrontendKind, usize, String)> {
    let mut out = Vec::new();
    if svc.headless || svc.service_type == ServiceType::ExternalName {
        return out;
    }
    for (i, p) in svc.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        for ip in &svc.cluster_ips {
            out.push((
                (*ip, p.port, p.protocol),
                FrontendKind::ClusterIP,
                i,
                format!("{at} with spec.clusterIP {ip}"),
            ));
        }
        for ip in &svc.external_ips {
            out.push((
                (*ip, p.port, p.protocol),
                FrontendKind::ExternalIP,
                i,
                format!("{at} with spec.externalIPs {ip}"),
            ));
        }
        for ip in &svc.load_balancer_ips {
            out.push((
                (*ip, p.port, p.protocol),
                FrontendKind::LoadBalancer,
                i,
                format!("{at} with status.loadBalancer.ingress {ip}"),
            ));
        }
        if let Some(np) = p.node_port {
            out.push((
                (Ipv4Addr::UNSPECIFIED, np, p.protocol),
                FrontendKind::NodePort,
                i,
                format!("{at}.nodePort"),
            ));
        }
    }
    out
}

fn frontend_string((addr, port, proto): FrontendKey) -> String {
    format!("{addr}:{port}/{proto}")
}

impl ServiceRepository {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values()
    }

    pub fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.services.get(name)
    }

    /// The first other service holding one of `svc`'s frontends.
    fn conflict(&self, svc: &Service) -> Option<ServiceError> {
        let mine: BTreeMap<FrontendKey, String> = frontends_of(svc)
            .into_iter()
            .map(|(k, _, _, field)| (k, field))
            .collect();
        for other in self.services.values() {
            if other.name == svc.name {
                continue;
            }
            for (key, _, _, _) in frontends_of(other) {
                if let Some(field) = mine.get(&key) {
                    return Some(ServiceError::FrontendConflict {
                        service: svc.name.to_string(),
                        field: field.clone(),
                        frontend: frontend_string(key),
                        other: other.name.to_string(),
                    });
                }
            }
        }
        None
    }

    /// Adds or replaces a service; refused (and nothing changes) if one of its frontends is
    /// another service's.
    pub fn upsert_service(&mut self, svc: Service) -> Result<(), ServiceError> {
        if let Some(err) = self.conflict(&svc) {
            return Err(err);
        }
        self.services.insert(svc.name.clone(), svc);
        Ok(())
    }

    /// Adds or replaces a slice.
    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        self.slices
            .insert((slice.namespace.clone(), slice.name.clone()), slice);
    }

    pub fn remove_service(&mut self, name: &ServiceName) -> Option<Service> {
        self.services.remove(name)
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) -> Option<EndpointSlice> {
        self.slices.remove(&(namespace.to_owned(), name.to_owned()))
    }

    /// Applies a set of parsed documents all or nothing: on a conflict (with the services
    /// in place or among the documents) nothing changes.
    pub fn apply(&mut self, resources: Vec<ServiceResource>) -> Result<(), ServiceError> {
        let mut next = self.clone();
        for r in resources {
            match r {
                ServiceResource::Service(s) => next.upsert_service(s)?,
                ServiceResource::EndpointSlice(s) => next.upsert_slice(s),
            }
        }
        *self = next;
        Ok(())
    }

    /// The frontends of every service with their backends (module docs).
    pub fn desired_state(&self, opts: &LbOptions) -> LbState {
        let mut state = LbState::default();
        // Slices by service.
        let mut by_service: BTreeMap<ServiceName, Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in self.slices.values() {
            by_service
                .entry(slice.service_name())
                .or_default()
                .push(slice);
        }
        for svc in self.services.values() {
            let slices = by_service.get(&svc.name).map(Vec::as_slice).unwrap_or(&[]);
            for (key, kind, port_index, _) in frontends_of(svc) {
                let port = &svc.ports[port_index];
                let all = backends_for(svc, port, slices, &mut state.warnings);
                push_frontend(&mut state, svc, port, key, kind, all, opts);
            }
        }
        state.frontends.sort();
        state.warnings.sort();
        state.warnings.dedup();
        state
    }
}

fn is_local(b: &LbBackend, opts: &LbOptions) -> bool {
    match &opts.node_name {
        None => true,
        Some(node) => b.node_name.as_deref() == Some(node.as_str()),
    }
}

fn push_frontend(
    state: &mut LbState,
    svc: &Service,
    port: &ServicePort,
    (address, fport, protocol): FrontendKey,
    kind: FrontendKind,
    all: Vec<LbBackend>,
    opts: &LbOptions,
) {
    let local: Vec<LbBackend> = all.iter().filter(|b| is_local(b, opts)).cloned().collect();
    let int_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let ext_local = kind.is_external() && svc.external_traffic_policy == TrafficPolicy::Local;
    let base = LbFrontend {
        address,
        port: fport,
        protocol,
        scope: LbScope::External,
        kind,
        two_scopes: false,
        local_only: false,
        service: svc.name.clone(),
        port_name: port.name.clone(),
        affinity_timeout_secs: svc.affinity_timeout_secs,
        backends: Vec::new(),
    };
    if !kind.is_external() {
        // A ClusterIP is in-cluster only: one scope, the internal policy's backends.
        state.frontends.push(LbFrontend {
            local_only: int_local,
            backends: if int_local { local } else { all },
            ..base
        });
        return;
    }
    if ext_local == int_local {
        state.frontends.push(LbFrontend {
            local_only: ext_local,
            backends: if ext_local { local } else { all },
            ..base
        });
        return;
    }
    let (ext, int) = if ext_local {
        (local, all)
    } else {
        (all, local)
    };
    state.frontends.push(LbFrontend {
        two_scopes: true,
        local_only: ext_local,
        backends: ext,
        ..base.clone()
    });
    state.frontends.push(LbFrontend {
        scope: LbScope::Internal,
        local_only: int_local,
        backends: int,
        ..base
    });
}

/// The backends of one service port across the service's slices, deduplicated by
/// (address, port) keeping the best state, in slot order.
fn backends_for(
    svc: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    warnings: &mut Vec<String>,
) -> Vec<LbBackend> {
    let mut best: BTreeMap<(Ipv4Addr, u16), LbBackend> = BTreeMap::new();
    for slice in slices {
        let by_name = slice
            .ports
            .iter()
            .find(|p| p.protocol == port.protocol && p.name == port.name);
        let by_target = || match &port.target_port {
            TargetPort::Name(n) => slice
                .ports
                .iter()
                .find(|p| p.protocol == port.protocol && p.name.as_deref() == Some(n.as_str())),
            TargetPort::Number(_) => None,
        };
        let Some(slice_port) = by_name.or_else(by_target) else {
            if !slice.endpoints.is_empty() {
                warnings.push(format!(
                    "service {}: port {} ({}/{}) has no port in EndpointSlice {}/{}",
                    svc.name,
                    port.name.as_deref().unwrap_or("<unnamed>"),
                    port.port,
                    port.protocol,
                    slice.namespace,
                    slice.name
                ));
            }
            continue;
        };
        let backend_port = match (slice_port.port, &port.target_port) {
            (Some(p), _) => p,
            (None, TargetPort::Number(p)) => *p,
            (None, TargetPort::Name(_)) => continue,
        };
        for ep in &slice.endpoints {
            let state = BackendState::from_conditions(&ep.conditions);
            for addr in &ep.addresses {
                let candidate = LbBackend {
                    address: *addr,
                    port: backend_port,
                    state,
                    node_name: ep.node_name.clone(),
                };
                match best.get(&(*addr, backend_port)) {
                    Some(existing) if existing.state <= state => {}
                    _ => {
                        best.insert((*addr, backend_port), candidate);
                    }
                }
            }
        }
    }
    let mut out: Vec<LbBackend> = best.into_values().collect();
    // Slot order: active first; within a state by address and port (the map's order).
    out.sort_by_key(|b| (b.state != BackendState::Active, b.address, b.port));
    out
}
