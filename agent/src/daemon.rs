//! The agent's state ([`State`]) and its main function ([`run`]): load the datapath, take
//! over what a previous agent left (endpoints, applied policies, the proxy), reconcile, then
//! serve — the local API ([`crate::api_server`]), Hubble and the flow page
//! ([`crate::servers`]), datapath events ([`crate::flows`]), the proxy channel and
//! supervision ([`crate::proxy`]), FQDN expiry ([`crate::fqdn`]) and the policy directory
//! ([`crate::policies`]) — until the process's shutdown signal.
//!
//! The agent manages one node network namespace, entering it per operation (`Netns::run`)
//! rather than running inside it: the process stays in the host's mount namespace, where the
//! bpffs holding its pins lives. It never detaches programs on exit: stopping the agent
//! leaves enforcement running from the pinned maps and links.

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use membrane_agent_api::{
    api::EndpointSpec,
    proxy_channel::AgentChannel,
    shutdown::Shutdown,
    snapshot::{DnsSnapshot, FilterSnapshot, PolicySnapshot},
    wasm_resource::WasmFilterResource,
};
use membrane_datapath::{
    Datapath, FlowEventView, Netns,
    bpffs::{DEFAULT_BPFFS, PinDir},
};
use membrane_observer::{Observer, ObserverConfig, StaticEnricher};
use membrane_policy::{
    EndpointInfo, EndpointPolicy, Identity, IdentitySet, IpPrefix, Labels, LocalAllocator,
    Repository, ResolveOptions, resolve_endpoint,
};

use crate::{
    cluster::{ClusterClient, SYNC_DEBOUNCE},
    config::{AgentConfig, FIRST_ENDPOINT_ID},
    error::{AgentError, dp_err, io_err},
    fqdn,
    policies::{AppliedPolicies, PolicyFile},
    proxy::PendingPublish,
    reconcile::{self, LocalEndpoint},
};

pub(crate) struct Endpoint {
    pub(crate) spec: EndpointSpec,
    pub(crate) id: u32,
    pub(crate) identity: Identity,
    pub(crate) labels: Labels,
}

pub(crate) struct State {
    pub(crate) config: AgentConfig,
    pub(crate) datapath: Datapath,
    pub(crate) node: Netns,
    pub(crate) repo: Repository,
    pub(crate) files: BTreeMap<std::path::PathBuf, PolicyFile>,
    /// Problems of the last policy-directory scan, by file.
    pub(crate) file_errors: BTreeMap<std::path::PathBuf, String>,
    pub(crate) allocator: LocalAllocator,
    pub(crate) identities: IdentitySet,
    pub(crate) endpoints: BTreeMap<(String, String), Endpoint>,
    pub(crate) next_endpoint_id: u32,
    pub(crate) resolved: BTreeMap<u32, EndpointPolicy>,
    pub(crate) flows: VecDeque<FlowEventView>,
    pub(crate) flows_seen: u64,
    pub(crate) started: Instant,
    pub(crate) reconciles: u64,
    /// Policies applied over the API, kept on disk so a restarted agent enforces them too.
    pub(crate) applied: Vec<AppliedPolicies>,
    /// What the flow pipeline knows about addresses and identities.
    pub(crate) enricher: Arc<StaticEnricher>,
    /// Rule cookie → policy, from the last reconcile.
    pub(crate) cookies: BTreeMap<u32, String>,
    /// Names the DNS proxy learned, their addresses' identities (see `fqdn`).
    pub(crate) fqdn: fqdn::FqdnState,
    /// `WasmFilter` resources in force, by key (`WasmFilter NAMESPACE/NAME`).
    pub(crate) wasm_filters: BTreeMap<String, WasmFilterResource>,
    /// The snapshots last sent to the proxy (to send only changes).
    pub(crate) proxy_snapshot: Option<PolicySnapshot>,
    pub(crate) dns_snapshot: Option<DnsSnapshot>,
    pub(crate) filter_snapshot: Option<FilterSnapshot>,
    /// Where the snapshots go to the proxy (and its acknowledgements come from).
    pub(crate) channel: Arc<AgentChannel>,
    /// Snapshots sent and not yet confirmed: whoever changed the state waits for them after
    /// releasing the state lock ([`confirm`]).
    pub(crate) pending: Vec<PendingPublish>,
    /// The cluster store (`--kvstore`); `None` on a node of its own.
    pub(crate) cluster: Option<Arc<ClusterClient>>,
    /// Other nodes' endpoints (from the cluster ipcache), written into this node's ipcache.
    pub(crate) remote_ipcache: BTreeMap<std::net::Ipv4Addr, crate::cluster::RemoteEndpoint>,
    /// Other nodes (from the store's `nodes/`): their addresses go into the ipcache, their
    /// pod CIDRs into the routes (with `--routing-mode`).
    pub(crate) remote_nodes: Vec<crate::cluster::RemoteNode>,
    /// Cross-node routing (`--routing-mode`); `None`: the node's routes are not ours.
    pub(crate) routing: Option<crate::routing::NodeRouting>,
    /// Policy documents of the cluster store in force here.
    pub(crate) cluster_docs: BTreeMap<membrane_cluster::PolicyName, crate::policies::ClusterDoc>,
    /// Stored documents that do not parse here, by name (their previous version, if any,
    /// stays in force).
    /// (revision, problem).
    pub(crate) cluster_doc_errors: BTreeMap<membrane_cluster::PolicyName, (i64, String)>,
    /// The node's pod addresses (`crate::ipam`).
    pub(crate) ipam: crate::ipam::NodeIpam,
    /// The conflist written for the container runtime, removed at stop.
    pub(crate) cni_announced: Option<std::path::PathBuf>,
}

/// Runs the agent until `shutdown` (SIGTERM/SIGINT in the binary).
pub fn run(mut config: AgentConfig, shutdown: Shutdown) -> Result<(), AgentError> {
    let run_dir = config.run_dir();
    let state_dir = run_dir.path().to_owned();
    std::fs::create_dir_all(&state_dir)
        .map_err(io_err(format!("create {}", state_dir.display())))?;
    let ui_listener = crate::servers::bind_ui(&config)?;
    // Before the cluster store: the node registers the bound Hubble address.
    let hubble_listener = crate::servers::bind_hubble(&mut config)?;
    let node = Netns::open(&config.node_netns).map_err(dp_err("open the node namespace"))?;
    let pins =
        PinDir::under(Path::new(DEFAULT_BPFFS), &config.name).map_err(dp_err("pin directory"))?;
    let mut datapath =
        Datapath::load(pins.path(), config.map_sizes).map_err(dp_err("load the datapath"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("membrane-agent-rt")
        .enable_all()
        .build()
        .map_err(io_err("start the async runtime"))?;
    let cluster = ClusterClient::start(&config, &runtime).map_err(AgentError::from)?;
    let routing =
        crate::routing::NodeRouting::setup(&config, cluster.as_deref(), &node, &mut datapath)?;
    // Flows name their node as the Peer service does (`<cluster>/<node>` outside the
    // default cluster) in cluster mode, so the relay's merged stream says where each came
    // from; a node of its own keeps its namespace's name.
    let flow_node_name = match &cluster {
        Some(c) => membrane_observer::peer::peer_name(c.cluster_name(), c.node()),
        None => config.node_netns.clone(),
    };
    let enricher = Arc::new(StaticEnricher::new(flow_node_name));
    let observer = {
        let _context = runtime.enter();
        Observer::spawn(
            ObserverConfig {
                max_flows: config.flow_capacity.max(1),
                ..ObserverConfig::default()
            },
            enricher.clone(),
        )
        .map_err(AgentError::FlowPipeline)?
    };
    let events = datapath.take_events();

    let mut state = State {
        config: config.clone(),
        datapath,
        node,
        repo: Repository::new(),
        files: BTreeMap::new(),
        file_errors: BTreeMap::new(),
        allocator: LocalAllocator::new(),
        identities: IdentitySet::with_reserved(),
        endpoints: BTreeMap::new(),
        next_endpoint_id: FIRST_ENDPOINT_ID,
        resolved: BTreeMap::new(),
        flows: VecDeque::new(),
        flows_seen: 0,
        started: Instant::now(),
        reconciles: 0,
        applied: Vec::new(),
        enricher,
        cookies: BTreeMap::new(),
        fqdn: fqdn::FqdnState::load(&run_dir),
        wasm_filters: BTreeMap::new(),
        proxy_snapshot: None,
        dns_snapshot: None,
        filter_snapshot: None,
        channel: AgentChannel::new(),
        pending: Vec::new(),
        cluster: cluster.clone(),
        remote_ipcache: BTreeMap::new(),
        remote_nodes: Vec::new(),
        routing,
        cluster_docs: BTreeMap::new(),
        cluster_doc_errors: BTreeMap::new(),
        ipam: crate::ipam::NodeIpam::default(),
        cni_announced: None,
    };
    // Serving the proxy channel before the first reconcile: an adopted proxy reconnects and
    // is brought up to date by it.
    if config.proxy {
        let path = run_dir.proxy_channel();
        state
            .channel
            .serve(&path, shutdown.clone())
            .map_err(io_err(format!("bind {}", path.display())))?;
    }
    state.restore_applied();
    state.restore_ipam();
    state.restore_endpoints();
    state.reserve_endpoint_addresses();
    state.scan_policy_dir();
    if let Some(c) = &cluster {
        state.take_cluster_view(c.view());
    }
    state.reconcile()?;

    let state = Arc::new(Mutex::new(state));
    // The first publish is confirmed before the API opens: a client that sees the socket
    // sees a proxy that enforces what the agent restored.
    confirm(&state);
    let socket = run_dir.agent_socket();
    let _ = std::fs::remove_file(&socket);
    let listener = {
        let _context = runtime.enter();
        tokio::net::UnixListener::bind(&socket)
            .map_err(io_err(format!("bind {}", socket.display())))?
    };
    let socket_inode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    tracing::info!(socket = %socket.display(), node = %config.node_netns, "agent serving");
    lock(&state).announce_to_runtime();

    let peers = crate::peer::peer_set(&runtime, &config, cluster.as_ref());
    crate::servers::start(
        &runtime,
        &config,
        &observer,
        crate::servers::Listeners {
            ui: ui_listener,
            hubble: hubble_listener,
        },
        peers,
        &shutdown,
    )?;
    let mut threads = Vec::new();
    if config.proxy {
        crate::proxy::start(&config, &state, &observer, pins.path(), &shutdown)?;
    }
    if let Some(reader) = events {
        threads.push(crate::flows::start_reader(
            reader,
            state.clone(),
            observer.clone(),
            shutdown.clone(),
        ));
    }
    {
        // FQDN expiry (addresses past their TTL that no connection uses) and saving.
        let (state, shutdown) = (state.clone(), shutdown.clone());
        threads.push(std::thread::spawn(move || {
            while !shutdown.wait_timeout(fqdn::EXPIRY_INTERVAL) {
                let mut s = lock(&state);
                if let Err(e) = s.fqdn_expire() {
                    tracing::error!(error = %e, "FQDN expiry failed");
                }
                s.fqdn_save();
                drop(s);
                confirm(&state);
            }
            lock(&state).fqdn_save();
        }));
    }
    if let Some(c) = &cluster {
        start_cluster_sync(&runtime, c, &state);
    }
    if config.policy_dir.is_some() {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        threads.push(std::thread::spawn(move || {
            while !shutdown.wait_timeout(crate::policies::DIR_SCAN_INTERVAL) {
                let mut s = lock(&state);
                if s.scan_policy_dir()
                    && let Err(e) = s.reconcile()
                {
                    tracing::error!(error = %e, "reconcile after a policy file change failed");
                }
                drop(s);
                confirm(&state);
            }
        }));
    }

    runtime.block_on(crate::api_server::serve(
        listener,
        state.clone(),
        shutdown.clone(),
    ));
    lock(&state).withdraw_from_runtime();
    for t in threads {
        let _ = t.join();
    }
    if let Some(c) = &cluster {
        c.halt();
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(run_dir.hubble_socket());
    // Only our own socket: a successor may already have bound the path.
    let current = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    if current.is_some() && current == socket_inode {
        let _ = std::fs::remove_file(&socket);
    }
    tracing::info!("agent stopped; the datapath keeps enforcing from its pinned maps and links");
    Ok(())
}

/// Brings the model in line with the cluster store whenever it changes: waits for a change,
/// lets more accumulate for [`SYNC_DEBOUNCE`], then takes one view (memory, no request) and
/// reconciles once on a blocking thread. At most one sync runs at a time and nothing queues:
/// however many events arrive, the next sync reads the state they left.
fn start_cluster_sync(
    runtime: &tokio::runtime::Runtime,
    cluster: &Arc<ClusterClient>,
    state: &Arc<Mutex<State>>,
) {
    let (cluster, state) = (cluster.clone(), state.clone());
    let mut changes = cluster.changes();
    runtime.spawn(async move {
        while changes.changed().await.is_ok() {
            tokio::time::sleep(SYNC_DEBOUNCE).await;
            changes.borrow_and_update();
            let (cluster, state) = (cluster.clone(), state.clone());
            let synced = tokio::task::spawn_blocking(move || {
                let view = cluster.view();
                let mut s = lock(&state);
                if s.take_cluster_view(view)
                    && let Err(e) = s.reconcile()
                {
                    tracing::error!(error = %e, "reconcile after a cluster store change failed");
                }
                drop(s);
                confirm(&state);
            })
            .await;
            if let Err(e) = synced {
                tracing::error!(error = %e, "cluster sync task failed");
            }
        }
    });
}

pub(crate) fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits (bounded) for the proxy to confirm what the last changes sent it — with the state
/// lock released, so the API and the proxy's own requests (FQDN learning) keep being served
/// meanwhile.
pub(crate) fn confirm(state: &Mutex<State>) {
    let (channel, pending, expected) = {
        let mut s = lock(state);
        let expected = s.config.proxy && s.proxy_running();
        (s.channel.clone(), std::mem::take(&mut s.pending), expected)
    };
    for p in pending {
        p.wait(&channel, expected);
    }
}

impl State {
    /// Makes the kernel maps match the desired state, and sends the proxy its part.
    pub(crate) fn reconcile(&mut self) -> Result<(), AgentError> {
        // FQDN identities first: the resolve below writes their policy entries.
        self.refresh_fqdn()?;
        let mut options =
            ResolveOptions::new(self.config.http_proxy_port, self.config.dns_proxy_port);
        options.cluster_name = self.config.cluster.cluster_name.clone();
        // Resolve, allocating CIDR identities on the way (they only exist once a policy
        // references the prefix).
        let mut desired: BTreeMap<u32, EndpointPolicy> = BTreeMap::new();
        let mut prefixes: BTreeMap<IpPrefix, Identity> = BTreeMap::new();
        for endpoint in self.endpoints.values() {
            let info = EndpointInfo::new(u64::from(endpoint.id), endpoint.labels.clone());
            let mut policy = resolve_endpoint(&self.repo, &info, &self.identities, &options);
            if !policy.missing_cidr_identities.is_empty() {
                self.identities
                    .ensure_cidr_identities(
                        policy.missing_cidr_identities.iter().copied(),
                        &mut self.allocator,
                    )
                    .map_err(AgentError::Identity)?;
                policy = resolve_endpoint(&self.repo, &info, &self.identities, &options);
            }
            prefixes.extend(policy.cidr_prefixes.iter().map(|(p, id)| (*p, *id)));
            desired.insert(endpoint.id, policy);
        }
        let mut locals = Vec::with_capacity(self.endpoints.len());
        for endpoint in self.endpoints.values() {
            locals.push(LocalEndpoint {
                id: endpoint.id,
                ifindex: self.node_ifindex(&endpoint.spec.host_ifname)?,
                ipv4: endpoint.spec.ipv4,
                identity: endpoint.identity.0,
                policy: &desired[&endpoint.id],
            });
        }
        let own_node_ip = match self.config.cluster.node_ip {
            Some(std::net::IpAddr::V4(ip)) if self.cluster.is_some() => Some(ip),
            _ => None,
        };
        let remote = crate::routing::remote_entries(
            self.routing.as_ref(),
            own_node_ip,
            &self.remote_ipcache,
            &self.remote_nodes,
        );
        let want = reconcile::desired_state(
            &locals,
            &remote,
            &prefixes,
            &self.fqdn.ips,
            self.config.http_proxy_port,
        )
        .map_err(AgentError::PolicyEntry)?;
        reconcile::apply(&mut self.datapath, &want)?;
        if let Some(routing) = &mut self.routing {
            routing.sync(&self.node, &self.remote_nodes)?;
        }
        self.cookies = want.cookies;
        for (id, labels) in self.identities.iter() {
            self.enricher
                .insert_identity(id.0, labels.iter().map(|l| l.to_string()).collect());
        }
        if let Some(c) = &self.cluster {
            // What this node publishes to the cluster ipcache (the publisher, a task of its
            // own, diffs it; nothing here waits on the store).
            c.set_local_endpoints(
                self.endpoints
                    .values()
                    .map(|e| {
                        let ip = std::net::IpAddr::V4(e.spec.ipv4);
                        (
                            ip,
                            c.local_entry(ip, e.identity, &e.spec.namespace, &e.spec.name),
                        )
                    })
                    .collect(),
            );
        }
        self.send_proxy_snapshots(&desired)?;
        self.resolved = desired;
        self.reconciles += 1;
        Ok(())
    }
}
