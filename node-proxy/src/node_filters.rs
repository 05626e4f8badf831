//! `WasmFilter` resources on the node: the agent resolves them per endpoint into a snapshot
//! sent over the proxy channel when it changes (`membrane_agent_api::proxy_channel`; the proxy saves it as
//! `/run/membrane/<name>/proxy-filters.json`); `membrane-proxy` loads the modules (checking each against its
//! sha256), builds one chain per (endpoint address, direction, port rule) and protocol and
//! hands it to the transparent proxy: `protocol: http` filters run on requests the HTTP
//! policy allowed, `protocol: tcp` filters on the connections the TLS relay relays after the
//! server-name policy allowed them (every byte both ways, as proxy-wasm stream contexts). A
//! filter whose module declares only the other protocol's callbacks is refused at load (the
//! whole snapshot with it), with the reason. A new snapshot is
//! compiled and booted off the data path and swapped in whole; if any filter fails to load,
//! the previous chains keep serving and the error is logged with the filter named.
//!
//! Callouts: each filter's `spec.upstreams` travel in the snapshot; the filter may call those
//! names with `proxy_http_call` (others get BAD_ARGUMENT) or `proxy_grpc_call` /
//! `proxy_grpc_stream` (others get PARSE_FAILURE, as Envoy) and the proxy sends the calls to
//! their addresses — gRPC over HTTP/2 — marked as the proxy's own traffic from the host
//! (`membrane_l7proxy::redirect::CALLOUT_MARK`), while the stream waits paused.
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
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use membrane_filters::{
    FailurePolicy, Filter, FilterChain, FilterHost, FilterProtocol, FilterSpec, HostConfig,
};
use membrane_l7proxy::{
    filter::{FilterStream, HttpFilters, PeerMeta, StreamMeta},
    redirect::Direction,
    tcp_filter::{ConnectionFilterStream, ConnectionFilters, ConnectionMeta},
};

use membrane_agent_api::wasm_resource::{self, FilterDirection};

/// Kubernetes' namespace label (without its `k8s:` source).
const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

use membrane_agent_api::snapshot::{FilterSnapshot, SnapshotFilter, SnapshotPeers};

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
        crate::wasm::start_stream(&self.chain, meta)
    }

    fn callout_upstream(&self, filter: &str, name: &str) -> Option<SocketAddr> {
        self.upstreams.get(filter)?.get(name).copied()
    }
}

impl ConnectionFilters for NodeChain {
    fn start(&self, mut meta: ConnectionMeta) -> Option<Box<dyn ConnectionFilterStream>> {
        self.peers.fill(&mut meta.source);
        self.peers.fill(&mut meta.destination);
        crate::wasm::start_connection(&self.chain, meta)
    }
}

pub fn load(path: &Path) -> Result<FilterSnapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// (endpoint address, direction, port; 0 = any other port) → chain.
type Key = (IpAddr, Direction, u16);

/// The chains of one snapshot, by protocol.
#[derive(Default)]
struct Tables {
    http: HashMap<Key, Arc<dyn HttpFilters>>,
    tcp: HashMap<Key, Arc<dyn ConnectionFilters>>,
}

/// The proxy's filters, swapped whole per snapshot.
pub struct NodeFilters {
    host: FilterHost,
    /// Loaded filters by (key, sha256, config, protocol, failure), reused across snapshots.
    loaded: RwLock<HashMap<String, (SnapshotFilter, Arc<Filter>)>>,
    tables: RwLock<Arc<Tables>>,
}

impl NodeFilters {
    pub fn new() -> Result<Arc<Self>, String> {
        let host = FilterHost::new(HostConfig::default()).map_err(|e| e.to_string())?;
        let filters = Arc::new(Self {
            host,
            loaded: RwLock::new(HashMap::new()),
            tables: RwLock::new(Arc::new(Tables::default())),
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
            let protocol = match f.protocol {
                wasm_resource::FilterProtocol::Http => FilterProtocol::Http,
                wasm_resource::FilterProtocol::Tcp => FilterProtocol::Tcp,
            };
            let spec = FilterSpec::new(&f.key, bytes)
                .with_protocol(protocol)
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
        let mut tables = Tables::default();
        for a in &snapshot.attachments {
            // One attachment's filters split by protocol, each keeping the attachment's order.
            let mut http = Vec::new();
            let mut tcp = Vec::new();
            for k in &a.filters {
                let (spec, filter) = loaded.get(k).ok_or_else(|| {
                    format!(
                        "attachment of endpoint {} names unknown filter {k}",
                        a.endpoint
                    )
                })?;
                match spec.protocol {
                    wasm_resource::FilterProtocol::Http => http.push(filter.clone()),
                    wasm_resource::FilterProtocol::Tcp => tcp.push(filter.clone()),
                }
            }
            let chain = |filters: Vec<Arc<Filter>>| {
                Arc::new(NodeChain {
                    chain: FilterChain::new(filters),
                    upstreams: upstreams.clone(),
                    peers: peers.clone(),
                })
            };
            let http = (!http.is_empty()).then(|| chain(http));
            let tcp = (!tcp.is_empty()).then(|| chain(tcp));
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
                    let key = (IpAddr::V4(*ip), direction, *port);
                    if let Some(c) = &http {
                        tables.http.insert(key, c.clone());
                    }
                    if let Some(c) = &tcp {
                        tables.tcp.insert(key, c.clone());
                    }
                }
            }
        }
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        *self.tables.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tables);
        Ok(())
    }

    fn tables(&self) -> Arc<Tables> {
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The HTTP chain for a request to or from `endpoint_ip` on `port`.
    pub fn lookup(
        &self,
        endpoint_ip: IpAddr,
        direction: Direction,
        port: u16,
    ) -> Option<Arc<dyn HttpFilters>> {
        let tables = self.tables();
        tables
            .http
            .get(&(endpoint_ip, direction, port))
            .or_else(|| tables.http.get(&(endpoint_ip, direction, 0)))
            .cloned()
    }

    /// The TCP chain for a connection to or from `endpoint_ip` on `port`.
    pub fn lookup_tcp(
        &self,
        endpoint_ip: IpAddr,
        direction: Direction,
        port: u16,
    ) -> Option<Arc<dyn ConnectionFilters>> {
        let tables = self.tables();
        tables
            .tcp
            .get(&(endpoint_ip, direction, port))
            .or_else(|| tables.tcp.get(&(endpoint_ip, direction, 0)))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membrane_agent::proxy::snapshots::{
        EndpointView, filter_snapshot as snapshot_of, peers_of,
    };
    use membrane_agent_api::wasm_resource::WasmFilterResource;
    use membrane_policy::Labels;
    use std::{net::Ipv4Addr, path::PathBuf};

    fn resource(name: &str, app: &str, ports: Vec<u16>, order: i64) -> WasmFilterResource {
        WasmFilterResource {
            name: name.into(),
            namespace: "default".into(),
            match_labels: vec![("app".into(), app.into())],
            match_expressions: Vec::new(),
            direction: FilterDirection::Ingress,
            protocol: wasm_resource::FilterProtocol::Http,
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
