//! `WasmFilter` resources on the node: the agent resolves them per endpoint into a snapshot
//! sent over the proxy channel when it changes (`crate::proxy_channel`; the proxy saves it as
//! `/run/membrane/<name>/proxy-filters.json`); `membrane-proxy` loads the modules (checking each against its
//! sha256), builds one chain per (endpoint address, direction, port rule) and hands it to the
//! transparent proxy, which runs it on requests the HTTP policy allowed. A new snapshot is
//! compiled and booted off the data path and swapped in whole; if any filter fails to load,
//! the previous chains keep serving and the error is logged with the filter named.
//!
//! Callouts: each filter's `spec.upstreams` travel in the snapshot; the filter may call those
//! names (others get BAD_ARGUMENT) and the proxy sends the calls to their addresses, marked
//! as the proxy's own traffic from the host (`membrane_l7proxy::redirect::CALLOUT_MARK`).
//!
//! Peers: the proxy knows each request's identities (ipcache); what Kubernetes would say
//! about them comes from the agent in the same snapshot ([`PeerDirectory`]): the labels of
//! every identity in use (bounded by [`MAX_SNAPSHOT_IDENTITIES`]; `fqdn:` identities, which
//! come and go with DNS answers, are left out so learning a name never rewrites the snapshot)
//! and each local endpoint's namespace and pod name. The filters then read `source.labels`,
//! `.namespace`, `.workload`, `.identity` (and `destination.*`) as on Kubernetes:
//! - labels: the identity's labels; Kubernetes ones without their `k8s:` source (`app` →
//!   `web`, `io.kubernetes.pod.namespace` → `default`: the pod's labels), others with it
//!   (`reserved:world` → ``, `cidr:192.0.2.0/24` → ``);
//! - namespace: the endpoint's, else the identity's `io.kubernetes.pod.namespace` label;
//! - workload: the pod name (the lab registers pods, not deployments; there is no owner to
//!   name). Unknown for peers that are not local endpoints;
//! - identity: the numeric security identity, 8-byte little-endian.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use membrane_filters::{FailurePolicy, Filter, FilterChain, FilterHost, FilterSpec, HostConfig};
use membrane_l7proxy::{
    filter::{FilterStream, HttpFilters, PeerMeta, StreamMeta},
    redirect::Direction,
};
use membrane_policy::{LabelSource, Labels};
use serde::{Deserialize, Serialize};

use crate::wasm_resource::{self, CalloutUpstream, FilterDirection, WasmFilterResource};

/// Most identities the snapshot carries labels for (the rest answer `source.identity` but no
/// labels); far above a node's endpoint and CIDR identities.
pub const MAX_SNAPSHOT_IDENTITIES: usize = 16_384;

/// Kubernetes' namespace label (without its `k8s:` source).
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// File name of the filter snapshot in the run's state directory.
pub const FILTER_SNAPSHOT_NAME: &str = "proxy-filters.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// `WasmFilter NAMESPACE/NAME`.
    pub key: String,
    pub module: PathBuf,
    pub sha256: String,
    pub config: String,
    pub failure_policy: wasm_resource::FailurePolicy,
    pub failure_status: u16,
    /// `spec.upstreams`: the callout names the filter may use and their addresses.
    #[serde(default)]
    pub upstreams: Vec<CalloutUpstream>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAttachment {
    pub endpoint: u64,
    pub ips: Vec<Ipv4Addr>,
    pub direction: FilterDirection,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Filter keys, in the order they run.
    pub filters: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSnapshot {
    pub revision: u64,
    pub filters: Vec<SnapshotFilter>,
    pub attachments: Vec<SnapshotAttachment>,
    /// What the filters' `source.*` / `destination.*` properties say about peers. Empty when
    /// no filter is attached.
    #[serde(default)]
    pub peers: SnapshotPeers,
}

/// Identity labels and endpoint metadata for the filters' peer properties.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPeers {
    /// By identity (sorted): the labels as filters see them (`source.labels`).
    pub identities: Vec<SnapshotIdentity>,
    /// Local endpoints (sorted by address).
    pub endpoints: Vec<SnapshotEndpointMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIdentity {
    pub id: u32,
    /// `(key, value)`: Kubernetes labels without their `k8s:` source, others as
    /// `source:key`.
    pub labels: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEndpointMeta {
    pub ip: Ipv4Addr,
    pub namespace: String,
    /// The pod name (`source.workload` / `destination.workload`).
    pub pod: String,
}

/// One local endpoint as the filter snapshot needs it.
pub struct EndpointView<'a> {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub labels: &'a Labels,
}

/// Labels as the filters' `*.labels` properties show them: Kubernetes labels as the pod's
/// (`app` → `web`), others with their source (`reserved:world` → ``).
pub fn property_labels(labels: &Labels) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|l| match l.source {
            LabelSource::K8s => (l.key, l.value),
            other => (format!("{}:{}", other.as_str(), l.key), l.value),
        })
        .collect()
}

/// The peer tables: every identity but `fqdn:` ones (at most
/// [`MAX_SNAPSHOT_IDENTITIES`], lowest ids first; returns how many were left out) and every
/// endpoint.
pub fn peers_of<'a>(
    endpoints: &[EndpointView<'a>],
    identities: impl IntoIterator<Item = (u32, &'a Labels)>,
) -> (SnapshotPeers, usize) {
    let mut ids: Vec<SnapshotIdentity> = identities
        .into_iter()
        .filter(|(_, labels)| !labels.has_source(LabelSource::Fqdn))
        .map(|(id, labels)| SnapshotIdentity {
            id,
            labels: property_labels(labels),
        })
        .collect();
    ids.sort_by_key(|i| i.id);
    ids.dedup_by_key(|i| i.id);
    let dropped = ids.len().saturating_sub(MAX_SNAPSHOT_IDENTITIES);
    ids.truncate(MAX_SNAPSHOT_IDENTITIES);
    let mut eps: Vec<SnapshotEndpointMeta> = endpoints
        .iter()
        .map(|e| SnapshotEndpointMeta {
            ip: e.ip,
            namespace: e.namespace.to_owned(),
            pod: e.pod.to_owned(),
        })
        .collect();
    eps.sort_by_key(|e| e.ip);
    (
        SnapshotPeers {
            identities: ids,
            endpoints: eps,
        },
        dropped,
    )
}

/// The filters of every endpoint: for each endpoint and direction, the resources that select
/// it, grouped by their port list, each group's chain in `order` (then name) order. A
/// resource with ports joins the groups of those ports; one without joins every group.
/// `peers` is kept only when some filter is attached.
pub fn snapshot_of(
    endpoints: &[EndpointView<'_>],
    resources: &[&WasmFilterResource],
    peers: SnapshotPeers,
) -> FilterSnapshot {
    let mut snapshot = FilterSnapshot::default();
    let mut used = std::collections::BTreeSet::new();
    for &EndpointView { id, ip, labels, .. } in endpoints {
        for direction in [FilterDirection::Ingress, FilterDirection::Egress] {
            let mut selected: Vec<&WasmFilterResource> = resources
                .iter()
                .copied()
                .filter(|r| r.direction == direction && r.selects(labels))
                .collect();
            if selected.is_empty() {
                continue;
            }
            selected.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.key().cmp(&b.key())));
            // One attachment per distinct port, plus one for "any other port".
            let mut ports: Vec<u16> = selected.iter().flat_map(|r| r.ports.clone()).collect();
            ports.sort_unstable();
            ports.dedup();
            for port in ports {
                let chain: Vec<String> = selected
                    .iter()
                    .filter(|r| r.ports.is_empty() || r.ports.contains(&port))
                    .map(|r| r.key())
                    .collect();
                used.extend(chain.iter().cloned());
                snapshot.attachments.push(SnapshotAttachment {
                    endpoint: id,
                    ips: vec![ip],
                    direction,
                    ports: vec![port],
                    filters: chain,
                });
            }
            let any: Vec<String> = selected
                .iter()
                .filter(|r| r.ports.is_empty())
                .map(|r| r.key())
                .collect();
            if !any.is_empty() {
                used.extend(any.iter().cloned());
                snapshot.attachments.push(SnapshotAttachment {
                    endpoint: id,
                    ips: vec![ip],
                    direction,
                    ports: Vec::new(),
                    filters: any,
                });
            }
        }
    }
    for r in resources {
        if used.contains(&r.key()) {
            snapshot.filters.push(SnapshotFilter {
                key: r.key(),
                module: r.module.clone(),
                sha256: r.sha256.clone(),
                config: r.config.clone(),
                failure_policy: r.failure_policy,
                failure_status: r.failure_status,
                upstreams: r.upstreams.clone(),
            });
        }
    }
    snapshot.filters.sort_by(|a, b| a.key.cmp(&b.key));
    if !snapshot.attachments.is_empty() {
        snapshot.peers = peers;
    }
    snapshot
}

/// The snapshot's peer tables, indexed for the request path.
#[derive(Default)]
pub struct PeerDirectory {
    labels: HashMap<u32, Arc<[(String, String)]>>,
    endpoints: HashMap<IpAddr, (Arc<str>, Arc<str>)>,
}

impl PeerDirectory {
    pub fn new(peers: &SnapshotPeers) -> Self {
        Self {
            labels: peers
                .identities
                .iter()
                .map(|i| (i.id, Arc::from(i.labels.clone())))
                .collect(),
            endpoints: peers
                .endpoints
                .iter()
                .map(|e| {
                    (
                        IpAddr::V4(e.ip),
                        (Arc::from(e.namespace.as_str()), Arc::from(e.pod.as_str())),
                    )
                })
                .collect(),
        }
    }

    /// Fills what the proxy does not know (labels, namespace, workload) from the tables.
    pub fn fill(&self, peer: &mut PeerMeta) {
        if let Some(labels) = peer.identity.and_then(|id| self.labels.get(&id)) {
            peer.labels = labels.to_vec();
            if peer.namespace.is_none() {
                peer.namespace = labels
                    .iter()
                    .find(|(k, _)| k == NAMESPACE_LABEL)
                    .map(|(_, v)| v.clone());
            }
        }
        if let Some((namespace, pod)) = peer.address.and_then(|a| self.endpoints.get(&a.ip())) {
            peer.namespace = Some(namespace.to_string());
            peer.workload = Some(pod.to_string());
        }
    }
}

/// One attachment's chain on the node: the filters, their callout upstreams, and the peer
/// tables of the snapshot it came from.
pub struct NodeChain {
    chain: FilterChain,
    /// filter key → upstream name → address.
    upstreams: Arc<HashMap<String, HashMap<String, SocketAddr>>>,
    peers: Arc<PeerDirectory>,
}

impl HttpFilters for NodeChain {
    fn start(&self, mut meta: StreamMeta) -> Option<Box<dyn FilterStream>> {
        self.peers.fill(&mut meta.source);
        self.peers.fill(&mut meta.destination);
        crate::wasm_filters::start_stream(&self.chain, meta)
    }

    fn callout_upstream(&self, filter: &str, name: &str) -> Option<SocketAddr> {
        self.upstreams.get(filter)?.get(name).copied()
    }
}

pub fn load(path: &Path) -> Result<FilterSnapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// (endpoint address, direction, port; 0 = any other port) → chain.
type Table = HashMap<(IpAddr, Direction, u16), Arc<dyn HttpFilters>>;

/// The proxy's filters, swapped whole per snapshot.
pub struct NodeFilters {
    host: FilterHost,
    /// Loaded filters by (key, sha256, config, failure), reused across snapshots.
    loaded: RwLock<HashMap<String, (SnapshotFilter, Arc<Filter>)>>,
    table: RwLock<Arc<Table>>,
}

impl NodeFilters {
    pub fn new() -> Result<Arc<Self>, String> {
        let host = FilterHost::new(HostConfig::default()).map_err(|e| e.to_string())?;
        let filters = Arc::new(Self {
            host,
            loaded: RwLock::new(HashMap::new()),
            table: RwLock::new(Arc::new(HashMap::new())),
        });
        // proxy_on_tick for every loaded filter (each filter's own period applies).
        let weak = Arc::downgrade(&filters);
        std::thread::Builder::new()
            .name("membrane-wasm-tick".into())
            .spawn(move || {
                while let Some(filters) = weak.upgrade() {
                    let loaded: Vec<Arc<Filter>> = filters
                        .loaded
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .map(|(_, f)| f.clone())
                        .collect();
                    drop(filters);
                    for f in loaded {
                        f.tick();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(filters)
    }

    /// Loads what the snapshot names (unchanged filters are kept) and swaps the table in.
    /// Blocking (compiles modules): call off the async runtime. On error nothing changes.
    pub fn install(&self, snapshot: &FilterSnapshot) -> Result<(), String> {
        let previous = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut loaded = HashMap::new();
        for f in &snapshot.filters {
            if let Some((spec, filter)) = previous.get(&f.key)
                && spec == f
            {
                loaded.insert(f.key.clone(), (spec.clone(), filter.clone()));
                continue;
            }
            let bytes = std::fs::read(&f.module)
                .map_err(|e| format!("{}: cannot read {}: {e}", f.key, f.module.display()))?;
            let sum = wasm_resource::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if sum != f.sha256 {
                return Err(format!(
                    "{}: {} has sha256 {sum}, not {} (the file changed after the resource was applied)",
                    f.key,
                    f.module.display(),
                    f.sha256
                ));
            }
            let failure = match f.failure_policy {
                wasm_resource::FailurePolicy::FailClosed => FailurePolicy::FailClosed {
                    status: f.failure_status,
                },
                wasm_resource::FailurePolicy::FailOpen => FailurePolicy::FailOpen,
                wasm_resource::FailurePolicy::Reload => FailurePolicy::Reload {
                    status: f.failure_status,
                    backoff_base: Duration::from_millis(100),
                    backoff_max: Duration::from_secs(30),
                },
            };
            let spec = FilterSpec::new(&f.key, bytes)
                .with_config(f.config.as_bytes().to_vec())
                .with_failure_policy(failure)
                .with_callout_upstreams(f.upstreams.iter().map(|u| u.name.clone()));
            let filter = self
                .host
                .load(spec)
                .map_err(|e| format!("{} ({}): {e}", f.key, f.module.display()))?;
            loaded.insert(f.key.clone(), (f.clone(), filter));
        }
        let upstreams: Arc<HashMap<String, HashMap<String, SocketAddr>>> = Arc::new(
            snapshot
                .filters
                .iter()
                .map(|f| {
                    let names = f.upstreams.iter().map(|u| (u.name.clone(), u.address));
                    (f.key.clone(), names.collect())
                })
                .collect(),
        );
        let peers = Arc::new(PeerDirectory::new(&snapshot.peers));
        let mut table: Table = HashMap::new();
        for a in &snapshot.attachments {
            let chain: Vec<Arc<Filter>> = a
                .filters
                .iter()
                .map(|k| {
                    loaded.get(k).map(|(_, f)| f.clone()).ok_or_else(|| {
                        format!(
                            "attachment of endpoint {} names unknown filter {k}",
                            a.endpoint
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let filters: Arc<dyn HttpFilters> = Arc::new(NodeChain {
                chain: FilterChain::new(chain),
                upstreams: upstreams.clone(),
                peers: peers.clone(),
            });
            let direction = match a.direction {
                FilterDirection::Ingress => Direction::Ingress,
                FilterDirection::Egress => Direction::Egress,
            };
            let ports = if a.ports.is_empty() {
                vec![0]
            } else {
                a.ports.clone()
            };
            for ip in &a.ips {
                for port in &ports {
                    table.insert((IpAddr::V4(*ip), direction, *port), filters.clone());
                }
            }
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }

    /// The chain for a request to or from `endpoint_ip` on `port`.
    pub fn lookup(
        &self,
        endpoint_ip: IpAddr,
        direction: Direction,
        port: u16,
    ) -> Option<Arc<dyn HttpFilters>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        table
            .get(&(endpoint_ip, direction, port))
            .or_else(|| table.get(&(endpoint_ip, direction, 0)))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, app: &str, ports: Vec<u16>, order: i64) -> WasmFilterResource {
        WasmFilterResource {
            name: name.into(),
            namespace: "default".into(),
            match_labels: vec![("app".into(), app.into())],
            match_expressions: Vec::new(),
            direction: FilterDirection::Ingress,
            ports,
            module: PathBuf::from("/m.wasm"),
            sha256: "0".repeat(64),
            config: String::new(),
            order,
            failure_policy: wasm_resource::FailurePolicy::FailClosed,
            failure_status: 503,
            upstreams: Vec::new(),
        }
    }

    fn view<'a>(id: u64, ip: Ipv4Addr, pod: &'a str, labels: &'a Labels) -> EndpointView<'a> {
        EndpointView {
            id,
            ip,
            namespace: "default",
            pod,
            labels,
        }
    }

    #[test]
    fn chains_follow_selectors_ports_and_order() {
        let api =
            Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=default"]).unwrap();
        let web =
            Labels::parse(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]).unwrap();
        let a = resource("a", "api", vec![8080], 20);
        let b = resource("b", "api", vec![], 10);
        let c = resource("c", "web", vec![], 0);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        let s = snapshot_of(
            &[
                view(1, ip, "api", &api),
                view(2, Ipv4Addr::new(10, 0, 0, 2), "web", &web),
            ],
            &[&a, &b, &c],
            SnapshotPeers::default(),
        );
        let api_chains: Vec<(Vec<u16>, Vec<String>)> = s
            .attachments
            .iter()
            .filter(|x| x.endpoint == 1)
            .map(|x| (x.ports.clone(), x.filters.clone()))
            .collect();
        assert_eq!(
            api_chains,
            vec![
                (
                    vec![8080],
                    vec![
                        "WasmFilter default/b".to_owned(),
                        "WasmFilter default/a".to_owned()
                    ]
                ),
                (vec![], vec!["WasmFilter default/b".to_owned()]),
            ]
        );
        assert_eq!(s.filters.len(), 3);
        // Nothing selects an endpoint in another namespace.
        let other = Labels::parse(["k8s:app=api", "k8s:io.kubernetes.pod.namespace=prod"]).unwrap();
        let (peers, _) = peers_of(&[view(3, ip, "x", &other)], [(300, &other)]);
        let none = snapshot_of(&[view(3, ip, "x", &other)], &[&a, &b], peers);
        assert!(none.attachments.is_empty());
        assert_eq!(
            none.peers,
            SnapshotPeers::default(),
            "no peer tables without filters"
        );
    }

    #[test]
    fn peer_tables_answer_as_kubernetes_would() {
        let web = Labels::parse(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]).unwrap();
        let world = Labels::parse(["reserved:world"]).unwrap();
        let fqdn = Labels::parse(["fqdn:*.github.com", "reserved:world"]).unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        let (peers, dropped) = peers_of(
            &[view(1, ip, "web-0", &web)],
            [(2, &world), (300, &web), (16_777_300, &fqdn)],
        );
        assert_eq!(dropped, 0);
        assert_eq!(
            peers.identities.iter().map(|i| i.id).collect::<Vec<_>>(),
            vec![2, 300],
            "fqdn: identities are left out"
        );
        let dir = PeerDirectory::new(&peers);
        let mut pod = PeerMeta {
            address: Some(SocketAddr::new(IpAddr::V4(ip), 40000)),
            identity: Some(300),
            ..PeerMeta::default()
        };
        dir.fill(&mut pod);
        assert_eq!(
            pod.labels,
            vec![
                ("app".to_owned(), "web".to_owned()),
                ("io.kubernetes.pod.namespace".to_owned(), "shop".to_owned())
            ]
        );
        assert_eq!(pod.namespace.as_deref(), Some("default"), "the endpoint's");
        assert_eq!(pod.workload.as_deref(), Some("web-0"));
        let mut remote = PeerMeta {
            address: Some("192.0.2.10:80".parse().unwrap()),
            identity: Some(2),
            ..PeerMeta::default()
        };
        dir.fill(&mut remote);
        assert_eq!(
            remote.labels,
            vec![("reserved:world".to_owned(), String::new())]
        );
        assert_eq!((remote.namespace, remote.workload), (None, None));
        // A remote pod identity: the namespace from its labels, no workload.
        let mut other = PeerMeta {
            address: Some("10.0.0.99:1".parse().unwrap()),
            identity: Some(300),
            ..PeerMeta::default()
        };
        dir.fill(&mut other);
        assert_eq!(other.namespace.as_deref(), Some("shop"));
        assert_eq!(other.workload, None);
    }
}
