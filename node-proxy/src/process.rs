//! The node's L7 proxy process (`membrane-proxy`).
//!
//! The proxy is a separate process (DESIGN §1): an agent restart must not break L7 traffic.
//! The agent sends the HTTP rules of every local endpoint, the DNS rules and the filter
//! attachments over the proxy channel ([`membrane_agent_api::proxy_channel`]: a Unix socket, the HTTP
//! policy as per-endpoint deltas); the proxy applies each change to new requests without
//! dropping connections, keeps the last one it applied in its snapshot files
//! (`/run/membrane/<name>/proxy-policy.json` and the DNS and filter ones), and after a restart
//! serves from them while the agent is away. Source and destination identities come from the
//! pinned ipcache, read directly. Access records go to the agent as JSON datagrams; the agent
//! turns them into Hubble flows.
//!
//! The proxy enters the node network namespace on its main thread before it starts its
//! runtime, so every thread and socket it creates lives there (its transparent listeners,
//! its marked upstream connections), while it stays in the host's mount namespace where the
//! bpffs pins are.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use membrane_agent_api::{
    args::ProxyArgs,
    proxy_channel::{Held, ProxyHandler, ToProxy, run_proxy_side, write_json_atomic},
    shutdown::Shutdown,
    snapshot::DnsSnapshot,
};
use membrane_datapath::{IpcacheMap, Netns};
use membrane_l7proxy::{
    access::{AccessLog, AccessRecord, RecordKind},
    redirect::{
        self, IdentitySource, TransparentConfig,
        store::{PolicyStore, read_snapshot},
    },
};

/// Identities from the pinned ipcache (longest prefix; unknown = world).
struct PinnedIpcache(Mutex<IpcacheMap>);

impl IdentitySource for PinnedIpcache {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        let IpAddr::V4(v4) = ip else {
            return membrane_common::identity::WORLD;
        };
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.lookup(v4)
            .ok()
            .flatten()
            .unwrap_or(membrane_common::identity::WORLD)
    }
}

/// `membrane-proxy` settings.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub node_netns: String,
    pub pin_dir: PathBuf,
    /// Where the proxy keeps the last HTTP policy it applied (restored at start).
    pub snapshot: PathBuf,
    /// The agent's proxy channel ([`membrane_agent_api::proxy_channel`]); without it the proxy serves the
    /// snapshots it finds at start and never changes them.
    pub agent_channel: Option<PathBuf>,
    pub egress_port: u16,
    pub ingress_port: u16,
    /// Unix datagram socket of the agent's flow pipeline; each access record is sent there
    /// as one JSON datagram (dropped, never waited for, when the agent is away).
    pub records_socket: Option<PathBuf>,
    /// The DNS proxy's listeners (none: no DNS proxy).
    pub dns: DnsListen,
    /// Where the proxy keeps the last DNS rules it applied (see `dns_node`).
    pub dns_snapshot: Option<PathBuf>,
    /// The agent's API socket, for FQDN learning; without it answers are released at once
    /// and nothing is learned.
    pub agent_socket: Option<PathBuf>,
    /// Where the proxy keeps the last `WasmFilter` attachments it applied (see `wasm_node`).
    pub filter_snapshot: Option<PathBuf>,
    /// Deny reply, FQDN learning bounds.
    pub dns_settings: membrane_agent_api::args::DnsSettings,
}

/// The node's policy source: HTTP rules from the snapshot store, HTTP and TCP filters per
/// endpoint (what the transparent proxy asks per request and per relayed connection).
pub struct NodePolicies {
    store: Arc<PolicyStore>,
    filters: Option<Arc<crate::node_filters::NodeFilters>>,
}

impl NodePolicies {
    pub fn new(
        store: Arc<PolicyStore>,
        filters: Option<Arc<crate::node_filters::NodeFilters>>,
    ) -> Self {
        Self { store, filters }
    }
}

impl redirect::PolicySource for NodePolicies {
    fn http_policy(
        &self,
        query: &redirect::PolicyQuery,
    ) -> Option<Arc<membrane_l7proxy::policy::HttpPolicy>> {
        self.store.http_policy(query)
    }

    fn tls_policy(
        &self,
        query: &redirect::PolicyQuery,
    ) -> Option<Arc<membrane_l7proxy::redirect::tls_sni::TlsPolicy>> {
        self.store.tls_policy(query)
    }

    fn http_filters(
        &self,
        query: &redirect::PolicyQuery,
    ) -> Option<Arc<dyn membrane_l7proxy::filter::HttpFilters>> {
        self.filters
            .as_ref()?
            .lookup(query.endpoint_ip, query.direction, query.port)
    }

    fn tcp_filters(
        &self,
        query: &redirect::PolicyQuery,
    ) -> Option<Arc<dyn membrane_l7proxy::tcp_filter::ConnectionFilters>> {
        self.filters
            .as_ref()?
            .lookup_tcp(query.endpoint_ip, query.direction, query.port)
    }
}

/// Applies DNS rules to the running DNS proxy.
type DnsApply = Arc<dyn Fn(&DnsSnapshot) -> Result<(), String> + Send + Sync>;

/// What the agent's channel messages do to this proxy: each kind applied to its part (the
/// previous one stays on error), then written to its snapshot file for the next start.
struct NodeHandler {
    store: Arc<PolicyStore>,
    policy_path: PathBuf,
    dns: Option<DnsApply>,
    dns_path: Option<PathBuf>,
    dns_revision: u64,
    filters: Option<Arc<crate::node_filters::NodeFilters>>,
    filter_path: Option<PathBuf>,
    filters_revision: u64,
}

impl NodeHandler {
    fn persist_policy(&self) {
        if let Err(e) = self.store.save_snapshot(&self.policy_path) {
            tracing::error!(error = %e, "policy applied but not saved; a restart would serve an older one");
        }
    }
}

impl ProxyHandler for NodeHandler {
    fn held(&self) -> Held {
        Held {
            policy: self.store.revision(),
            dns: self.dns_revision,
            filters: self.filters_revision,
        }
    }

    fn apply(&mut self, message: ToProxy) -> Result<(), (String, bool)> {
        match message {
            ToProxy::PolicyFull(snapshot) => {
                let rejected = self
                    .store
                    .install(snapshot)
                    .map_err(|e| (e.to_string(), false))?;
                for r in rejected {
                    tracing::warn!(rule = ?r, "HTTP rule rejected; it allows nothing");
                }
                tracing::info!(revision = self.store.revision(), "policy applied (whole)");
                self.persist_policy();
            }
            ToProxy::PolicyDelta(delta) => {
                let (upserts, removes) = (delta.upsert.len(), delta.remove.len());
                let rejected = self.store.apply_delta(delta).map_err(|e| {
                    let resync = matches!(
                        e,
                        membrane_l7proxy::redirect::store::SnapshotError::Base { .. }
                    );
                    (e.to_string(), resync)
                })?;
                for r in rejected {
                    tracing::warn!(rule = ?r, "HTTP rule rejected; it allows nothing");
                }
                tracing::info!(
                    revision = self.store.revision(),
                    upserts,
                    removes,
                    "policy change applied"
                );
                self.persist_policy();
            }
            ToProxy::Dns(snapshot) => {
                if let Some(apply) = &self.dns {
                    apply(&snapshot).map_err(|e| (e, false))?;
                }
                self.dns_revision = snapshot.revision;
                tracing::info!(revision = snapshot.revision, "DNS rules applied");
                if let Some(path) = &self.dns_path
                    && let Err(e) = write_json_atomic(path, &snapshot)
                {
                    tracing::error!(error = %e, "DNS rules applied but not saved");
                }
            }
            ToProxy::Filters(snapshot) => {
                if let Some(filters) = &self.filters {
                    // Compiles and boots changed modules here, off the data path; on error
                    // the previous chains keep serving.
                    filters.install(&snapshot).map_err(|e| (e, false))?;
                }
                self.filters_revision = snapshot.revision;
                tracing::info!(revision = snapshot.revision, "filters applied");
                if let Some(path) = &self.filter_path
                    && let Err(e) = write_json_atomic(path, &snapshot)
                {
                    tracing::error!(error = %e, "filters applied but not saved");
                }
            }
        }
        Ok(())
    }
}

/// Where the DNS proxy listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsListen {
    None,
    /// Descriptors 3 (UDP) and 4 (TCP), inherited from the agent.
    Inherited,
    /// Bind this port (UDP and TCP, all addresses) itself.
    Port(u16),
}

impl ProxySettings {
    /// The settings `membrane-proxy`'s command line gives.
    pub fn from_args(args: ProxyArgs) -> Self {
        Self {
            node_netns: args.node_netns,
            pin_dir: args.pin_dir,
            snapshot: args.snapshot,
            agent_channel: args.agent_channel,
            egress_port: args.egress_port,
            ingress_port: args.ingress_port,
            records_socket: args.records_socket,
            dns: match (args.dns_fds, args.dns_port) {
                (true, _) => DnsListen::Inherited,
                (false, Some(port)) => DnsListen::Port(port),
                (false, None) => DnsListen::None,
            },
            dns_snapshot: args.dns_snapshot,
            agent_socket: args.agent_socket,
            filter_snapshot: args.filter_snapshot,
            dns_settings: args.dns,
        }
    }
}

/// The process's shutdown signal as a future (a blocking task waits for it).
async fn signalled(shutdown: Shutdown) {
    let _ = tokio::task::spawn_blocking(move || shutdown.wait()).await;
}

/// Runs the proxy until `shutdown` (SIGTERM/SIGINT in the binary).
pub fn run(settings: ProxySettings, shutdown: Shutdown) -> anyhow::Result<()> {
    let node = Netns::open(&settings.node_netns)?;
    let file = std::fs::File::open(node.path())?;
    // SAFETY: `file` is an open namespace file; setns affects this thread, and the threads
    // it starts from now on (the runtime's) inherit the namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "enter {}: {}",
            settings.node_netns,
            std::io::Error::last_os_error()
        );
    }
    let ipcache = IpcacheMap::open_pinned(&settings.pin_dir)?;
    // The last configuration this proxy applied is in force before the first request is
    // read: a proxy restarted while the agent is away serves by it.
    let store = Arc::new(PolicyStore::new());
    if settings.snapshot.exists() {
        match read_snapshot(&settings.snapshot).and_then(|s| store.install(s)) {
            Ok(_) => tracing::info!(revision = store.revision(), "policy restored"),
            Err(e) => {
                tracing::error!(error = %e, "saved policy not restored; denying until the agent sends one")
            }
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (log, records) = AccessLog::channel(membrane_l7proxy::access::DEFAULT_CHANNEL_CAPACITY);
    let config = TransparentConfig {
        egress_listen: Some((Ipv4Addr::UNSPECIFIED, settings.egress_port).into()),
        ingress_listen: Some((Ipv4Addr::UNSPECIFIED, settings.ingress_port).into()),
        access_log: log,
        ..TransparentConfig::default()
    };
    let mut filters_revision = 0;
    let node_filters = match &settings.filter_snapshot {
        Some(path) => {
            let filters = crate::node_filters::NodeFilters::new().map_err(anyhow::Error::msg)?;
            if path.exists() {
                match crate::node_filters::load(path)
                    .and_then(|s| filters.install(&s).map(|()| s.revision))
                {
                    Ok(revision) => {
                        filters_revision = revision;
                        tracing::info!(revision, "filters restored");
                    }
                    Err(e) => tracing::error!(error = %e, "saved filters not restored"),
                }
            }
            Some(filters)
        }
        None => None,
    };
    let policies: Arc<dyn redirect::PolicySource> =
        Arc::new(NodePolicies::new(store.clone(), node_filters.clone()));
    let identities: Arc<dyn IdentitySource> = Arc::new(PinnedIpcache(Mutex::new(ipcache)));
    let (dns_log, dns_records) =
        membrane_l7proxy::dns::DnsLog::channel(membrane_l7proxy::access::DEFAULT_CHANNEL_CAPACITY);
    let (dns_task, dns_apply, dns_revision) = {
        let _context = runtime.enter();
        match start_dns(&settings, identities.clone(), dns_log, shutdown.clone())? {
            Some((task, apply, revision)) => (Some(task), Some(apply), revision),
            None => (None, None, 0),
        }
    };
    if let Some(channel) = settings.agent_channel.clone() {
        let mut handler = NodeHandler {
            store: store.clone(),
            policy_path: settings.snapshot.clone(),
            dns: dns_apply,
            dns_path: settings.dns_snapshot.clone(),
            dns_revision,
            filters: node_filters.clone(),
            filter_path: settings.filter_snapshot.clone(),
            filters_revision,
        };
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("membrane-agent-channel".into())
            .spawn(move || run_proxy_side(&channel, &mut handler, shutdown.flag()))?;
    }
    runtime.block_on(async move {
        tokio::spawn(forward_records(
            dns_records,
            dns_record_json,
            settings.records_socket.clone(),
        ));
        tokio::spawn(forward_records(
            records,
            record_json,
            settings.records_socket.clone(),
        ));
        let served = redirect::run(config, policies, identities, signalled(shutdown)).await;
        if let Some(task) = dns_task {
            let _ = task.await;
        }
        served
    })?;
    Ok(())
}

/// Sends each record as one JSON datagram to the agent's record socket (stdout without
/// one). The agent may be restarting: records are then dropped; traffic never waits.
async fn forward_records<T>(
    mut records: tokio::sync::mpsc::Receiver<T>,
    to_json: fn(&T) -> String,
    socket: Option<PathBuf>,
) {
    let sender = std::os::unix::net::UnixDatagram::unbound().ok();
    if let Some(s) = &sender {
        let _ = s.set_nonblocking(true);
    }
    while let Some(record) = records.recv().await {
        let line = to_json(&record);
        match (&sender, &socket) {
            (Some(s), Some(path)) => {
                let _ = s.send_to(line.as_bytes(), path);
            }
            _ => println!("{line}"),
        }
    }
}

/// Starts the DNS proxy (transparent, on the listeners of `settings.dns`) with the DNS rules
/// it saved last; returns the task (it ends after `stop`, once queries in progress are
/// answered), what applies new rules, and the revision restored (0: none).
fn start_dns(
    settings: &ProxySettings,
    identities: Arc<dyn IdentitySource>,
    records: membrane_l7proxy::dns::DnsLog,
    shutdown: Shutdown,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, DnsApply, u64)>> {
    use crate::dns::{AgentObserver, NodeRouter};
    use membrane_l7proxy::dns::{DnsProxy, DnsProxyConfig, DnsRequestInfo};
    let listen_port = match settings.dns {
        DnsListen::None => return Ok(None),
        DnsListen::Inherited => 0,
        DnsListen::Port(port) => port,
    };
    let router = Arc::new(NodeRouter {
        endpoints: std::sync::RwLock::new(Arc::new(std::collections::HashMap::new())),
        identities,
    });
    let route = router.clone();
    let mut config = DnsProxyConfig::new(
        (Ipv4Addr::UNSPECIFIED, listen_port).into(),
        move |request: &DnsRequestInfo| route.route(request),
    );
    config.transparent = true;
    config.records = records;
    config.deny_response = match settings.dns_settings.deny_response.as_str() {
        "nxdomain" => membrane_l7proxy::dns::DenyResponse::NameError,
        _ => membrane_l7proxy::dns::DenyResponse::Refused,
    };
    config.fqdn.min_ttl = settings.dns_settings.min_ttl;
    config.fqdn.max_ips_per_name = settings.dns_settings.max_ips_per_name.max(1);
    config.fqdn.deadline = Duration::from_millis(settings.dns_settings.response_max_delay_ms);
    if let Some(agent) = &settings.agent_socket {
        config = config.with_observer(AgentObserver::new(agent.clone(), Duration::from_secs(2)));
    }
    let proxy = match settings.dns {
        DnsListen::Inherited => {
            // SAFETY: the agent passes the listeners as descriptors 3 and 4 with
            // `--dns-fds`; nothing else in this process uses those numbers.
            let (udp, tcp) = unsafe { crate::dns::inherited_listeners() };
            DnsProxy::from_std(config, udp, tcp)?
        }
        _ => {
            let handle = tokio::runtime::Handle::current();
            handle.block_on(DnsProxy::bind(config))?
        }
    };
    tracing::info!(listen = %proxy.local_addr(), "DNS proxy listening");
    let handle = proxy.handle();
    let apply: DnsApply = Arc::new(move |snapshot: &DnsSnapshot| {
        let (policy, by_ip) = crate::dns::compile(snapshot)?;
        handle.set_policy(policy);
        *router.endpoints.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(by_ip);
        Ok(())
    });
    // The last rules are in force before the first query is read (a restarted proxy answers
    // the queries that queued while it was away by the same rules).
    let mut revision = 0;
    if let Some(path) = settings.dns_snapshot.as_ref().filter(|p| p.exists()) {
        match crate::dns::load(path).and_then(|s| apply(&s).map(|()| s.revision)) {
            Ok(restored) => {
                revision = restored;
                tracing::info!(revision, "DNS rules restored");
            }
            Err(e) => tracing::error!(error = %e, "saved DNS rules not restored"),
        }
    }
    let task = tokio::spawn(async move {
        proxy.serve(signalled(shutdown)).await;
    });
    Ok(Some((task, apply, revision)))
}

/// One DNS record as a JSON line for the agent's flow pipeline.
pub fn dns_record_json(r: &membrane_l7proxy::dns::DnsRecord) -> String {
    use membrane_l7proxy::dns::{DnsRecordKind, DnsVerdict};
    let time = r
        .timestamp
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    serde_json::json!({
        "type": "dns",
        "kind": match r.kind { DnsRecordKind::Query => "query", DnsRecordKind::Response => "response" },
        "verdict": match r.verdict { DnsVerdict::Forwarded => "forwarded", DnsVerdict::Denied => "denied", DnsVerdict::Error => "error" },
        "time_ns": time.to_string(),
        "protocol": r.transport.protocol_number(),
        "source": r.source.to_string(),
        "destination": r.destination.to_string(),
        "endpoint": r.endpoint,
        "qname": r.qname,
        "qtypes": r.qtypes,
        "rcode": r.rcode,
        "ips": r.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ttl": r.ttl,
        "cnames": r.cnames,
        "rrtypes": r.rrtypes,
        "cookie": r.rule.and_then(|rule| rule.cookie),
        "latency_ns": r.latency.map(|l| l.as_nanos() as u64),
        "error": r.error,
    })
    .to_string()
}

/// One access record as a JSON line (the agent's reader turns it into a Hubble flow).
pub fn record_json(r: &AccessRecord) -> String {
    let kind = match r.kind {
        RecordKind::Request => "request",
        RecordKind::Response => "response",
        RecordKind::Denied => "denied",
    };
    let time = r
        .timestamp
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    serde_json::json!({
        "kind": kind,
        "time_ns": time.to_string(),
        "version": format!("{:?}", r.version),
        "method": r.method,
        "url": r.url,
        "status": r.status,
        "latency_ns": r.latency.map(|l| l.as_nanos() as u64),
        "source": r.source.to_string(),
        "destination": r.destination.to_string(),
        "source_identity": r.source_identity,
        "destination_identity": r.destination_identity,
        "rule": r.rule.as_ref().map(|rule| rule.to_string()),
        "error": r.error,
        "filters": r.filters.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod snapshot_tests {
    //! What the agent builds (`membrane_agent::proxy`), the proxy compiles and reports: the
    //! snapshot's rules and the record lines' round trip.
    use super::*;
    use membrane_agent::proxy::{
        records::{FILTER_HEADER, record_to_flow},
        snapshots::policy_snapshot as snapshot_of,
    };
    use membrane_l7proxy::redirect::store::L7Protocol;
    use membrane_policy::{
        EndpointInfo, EndpointPolicy, IdentitySet, Labels, Repository, ResolveOptions,
        parse_documents, resolve_endpoint,
    };

    fn resolved(yaml: &str) -> EndpointPolicy {
        let mut repo = Repository::new();
        for policy in parse_documents(yaml, "test.yaml").expect("parse") {
            repo.add(policy).expect("add");
        }
        let labels = Labels::parse(["k8s:app=client", "k8s:io.kubernetes.pod.namespace=default"])
            .expect("labels");
        resolve_endpoint(
            &repo,
            &EndpointInfo::new(1, labels),
            &IdentitySet::with_reserved(),
            &ResolveOptions::new(15001, 15053),
        )
    }

    #[test]
    fn tls_rule_sets_become_tls_ports_with_server_names() {
        let policy = resolved(
            "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tls}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
      serverNames: [API.example.com, '*.cdn.example.com']
  - toEntities: [world]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules: {http: [{method: GET}]}
",
        );
        let snapshot = snapshot_of([(1, Ipv4Addr::new(10, 0, 0, 1), &policy)], 3);
        let ports = &snapshot.endpoints[0].ports;
        let tls = ports.iter().find(|p| p.port == 443).expect("port 443");
        assert_eq!(tls.l7, L7Protocol::Tls);
        // One peer per selector of `world` (world, world-ipv4, world-ipv6).
        assert!(!tls.peers.is_empty());
        for peer in &tls.peers {
            assert_eq!(peer.server_names, ["api.example.com", "*.cdn.example.com"]);
            assert!(peer.http.is_empty());
        }
        let http = ports.iter().find(|p| p.port == 80).expect("port 80");
        assert_eq!(http.l7, L7Protocol::Http);
        assert!(http.peers[0].server_names.is_empty());
        // The proxy installs it and answers per port.
        let store = PolicyStore::new();
        assert_eq!(store.install(snapshot).expect("install"), []);
    }

    #[test]
    fn a_peer_whose_every_http_rule_is_left_out_allows_nothing() {
        let policy = resolved(
            "
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: secret}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http:
        - headerMatches: [{name: x-token, secret: {namespace: default, name: token}}]
",
        );
        let snapshot = snapshot_of([(1, Ipv4Addr::new(10, 0, 0, 1), &policy)], 1);
        let port = &snapshot.endpoints[0].ports[0];
        assert!(
            port.peers.is_empty(),
            "never an empty (wildcard) peer: {port:?}"
        );
    }

    #[test]
    fn filter_decisions_travel_to_the_flow_as_headers() {
        use membrane_l7proxy::access::{FilterOutcome, FilterRecord};
        let record = AccessRecord {
            kind: RecordKind::Response,
            timestamp: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            version: http::Version::HTTP_11,
            method: "GET".into(),
            url: "http://api:8080/api/v1/internal/keys".into(),
            status: Some(403),
            latency: Some(Duration::from_millis(1)),
            source: "10.200.0.10:5000".parse().unwrap(),
            destination: "10.200.0.12:8080".parse().unwrap(),
            source_identity: Some(256),
            destination_identity: Some(258),
            rule: None,
            error: None,
            header_log: Vec::new(),
            filters: vec![FilterRecord {
                filter: "WasmFilter default/deny-internal".into(),
                phase: "request_headers",
                outcome: FilterOutcome::LocalReply { status: 403 },
            }],
        };
        let flow = record_to_flow(&record_json(&record), |_| None).expect("a flow");
        assert_eq!(flow.protocol, "HTTP/1.1");
        // A relayed TLS connection is labelled TLS, not HTTP.
        let tls = AccessRecord {
            kind: RecordKind::Request,
            method: String::new(),
            url: "tls://api.github.com:443".into(),
            version: http::Version::default(),
            filters: Vec::new(),
            ..record.clone()
        };
        let tls_flow = record_to_flow(&record_json(&tls), |_| None).expect("a flow");
        assert_eq!(
            (tls_flow.protocol.as_str(), tls_flow.url.as_str()),
            ("TLS", "tls://api.github.com:443")
        );
        assert_eq!(
            flow.headers,
            vec![(
                FILTER_HEADER.to_owned(),
                "WasmFilter default/deny-internal request_headers: local reply 403".to_owned()
            )]
        );
        assert_eq!(flow.status, Some(403));
    }
}
