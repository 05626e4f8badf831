//! `membrane-agent`: owns the datapath of one node and keeps it in line with the desired
//! state — endpoints (registered over the local API), policies (a watched directory of YAML,
//! like Cilium's static policy path, plus the local API), identities allocated from labels —
//! and keeps the datapath's flow events in a bounded ring.
//!
//! Every change reconciles the kernel maps against the desired state: resolve each
//! endpoint's policy with the policy engine, then write what is missing and remove what is
//! stale (entries, ipcache prefixes, endpoints). Reconciling from the full desired state
//! (rather than trusting remembered diffs) is also what makes a restart safe: the new agent
//! reloads its registry, reuses the pinned maps and links (the datapath kept enforcing while
//! it was away) and removes whatever changed in between.
//!
//! The agent manages one node network namespace, entering it per operation (`Netns::run`)
//! rather than running inside it: the process stays in the host's mount namespace, where the
//! bpffs holding its pins lives. It never detaches programs on exit: stopping the agent
//! leaves enforcement running from the pinned maps and links.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use membrane_datapath::{
    Datapath, EndpointEntry, FlowEventView, Ipv4Prefix, MapSizes, Netns, PolicyRule,
    bpffs::{DEFAULT_BPFFS, PinDir},
    plumbing::POD_GATEWAY,
};
use membrane_observer::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, EndpointMeta, FlowInput, FlowSource,
    Observer, ObserverConfig, StaticEnricher,
};
use membrane_policy::{
    EndpointInfo, EndpointPolicy, Identity, IdentityAllocator as _, IdentitySet, IpPrefix, Labels,
    LocalAllocator, PolicyKind, PolicyRef, Repository, ResolveOptions, parse_documents,
    resolve_endpoint,
};
use serde_json::json;

use crate::{
    api::{EndpointSpec, Request, Response, SOCKET_NAME},
    bpf_cmd::{RegisteredEndpoint, STATE_ROOT},
    datapath_sync,
};

mod fqdn;
pub use fqdn::{CACHE_NAME as FQDN_CACHE_NAME, LearnedAddress};

/// File name of the Hubble observer socket in the agent's state directory.
pub const HUBBLE_SOCKET_NAME: &str = "hubble.sock";

/// File in the agent's state directory holding the address the flow page listens on.
pub const UI_ADDR_NAME: &str = "ui-addr";

/// Cluster name for the `cluster` entity (Cilium's default).
pub const CLUSTER_NAME: &str = "default";

/// Agent configuration (command-line flags of `membrane-agent`).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Run name: pins under `/sys/fs/bpf/membrane/NAME`, state under `/run/membrane/NAME`.
    pub name: String,
    /// The node network namespace the agent runs in and attaches programs inside.
    pub node_netns: String,
    /// Directory of policy files (YAML/JSON) to watch; `None` = API only.
    pub policy_dir: Option<PathBuf>,
    /// Proxy ports used for L7 redirects.
    pub http_proxy_port: u16,
    pub dns_proxy_port: u16,
    /// Flow events kept in memory (Hubble's default ring is 4095).
    pub flow_capacity: usize,
    /// Hubble observer API on TCP inside the node namespace (`None` = Unix socket only).
    pub hubble_port: Option<u16>,
    /// Prometheus `/metrics` on TCP inside the node namespace (`None` = off).
    pub metrics_port: Option<u16>,
    /// The flow page (`/ui` and its JSON) on this loopback address of the host's network
    /// namespace, where a browser on the machine can reach it (`None` = off; port 0 = any,
    /// the bound address is written to `ui-addr` in the state directory).
    pub ui_listen: Option<std::net::SocketAddr>,
    /// An inherited listening socket for the flow page instead of `ui_listen` (how
    /// `membrane lab up`, which binds it first, hands it over).
    pub ui_listen_fd: Option<i32>,
    /// Run and supervise `membrane-proxy` (the L7 proxy) for this node.
    pub proxy: bool,
    /// The DNS proxy's knobs, passed to `membrane-proxy`.
    pub dns: DnsSettings,
    pub map_sizes: MapSizes,
}

/// DNS proxy settings (Cilium's `tofqdns-*` flags), the same flags on `membrane-agent` and
/// `membrane-proxy`.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct DnsSettings {
    /// The DNS proxy's reply to a denied query: `refused` (Cilium's default) or `nxdomain`
    /// (musl resolvers stop walking the search list on REFUSED).
    #[arg(long = "dns-deny-response", default_value = "refused", value_parser = ["refused", "nxdomain"])]
    pub deny_response: String,
    /// Lower bound of the TTL an address learned from a DNS answer is kept for, seconds
    /// (Cilium's tofqdns-min-ttl).
    #[arg(long = "fqdn-min-ttl", default_value_t = 0)]
    pub min_ttl: u32,
    /// At most this many addresses of one answer are learned
    /// (tofqdns-endpoint-max-ip-per-hostname).
    #[arg(long = "fqdn-max-ips-per-name", default_value_t = 1000)]
    pub max_ips_per_name: usize,
    /// How long an allowed answer is held for its addresses to reach the maps, milliseconds;
    /// an overrun releases it and is counted (tofqdns-proxy-response-max-delay).
    #[arg(long = "fqdn-response-max-delay-ms", default_value_t = 100)]
    pub response_max_delay_ms: u64,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            deny_response: "refused".into(),
            min_ttl: 0,
            max_ips_per_name: 1000,
            response_max_delay_ms: 100,
        }
    }
}

impl DnsSettings {
    /// As `membrane-proxy` flags.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--dns-deny-response".into(),
            self.deny_response.clone(),
            "--fqdn-min-ttl".into(),
            self.min_ttl.to_string(),
            "--fqdn-max-ips-per-name".into(),
            self.max_ips_per_name.to_string(),
            "--fqdn-response-max-delay-ms".into(),
            self.response_max_delay_ms.to_string(),
        ]
    }
}

impl AgentConfig {
    pub fn new(name: &str, node_netns: &str) -> Self {
        Self {
            name: name.to_owned(),
            node_netns: node_netns.to_owned(),
            policy_dir: None,
            http_proxy_port: 15001,
            dns_proxy_port: 15053,
            flow_capacity: 4095,
            hubble_port: Some(membrane_observer::DEFAULT_TCP_PORT),
            metrics_port: Some(9965),
            ui_listen: None,
            ui_listen_fd: None,
            proxy: cfg!(feature = "proxy"),
            dns: DnsSettings::default(),
            map_sizes: MapSizes::default(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(&self.name)
    }

    pub fn socket_path(&self) -> PathBuf {
        self.state_dir().join(SOCKET_NAME)
    }

    /// The Hubble observer API's Unix socket.
    pub fn hubble_socket_path(&self) -> PathBuf {
        self.state_dir().join(HUBBLE_SOCKET_NAME)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Datapath {
        what: String,
        #[source]
        source: Box<membrane_datapath::DatapathError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn dp_err(what: impl Into<String>) -> impl FnOnce(membrane_datapath::DatapathError) -> AgentError {
    let what = what.into();
    move |source| AgentError::Datapath {
        what,
        source: Box::new(source),
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

struct Endpoint {
    spec: EndpointSpec,
    id: u32,
    identity: Identity,
    labels: Labels,
}

/// A policy file as last read successfully.
struct PolicyFile {
    modified: SystemTime,
    len: u64,
    refs: Vec<PolicyRef>,
    /// Keys of the `WasmFilter` resources it holds.
    wasm: Vec<String>,
}

/// Policies and `WasmFilter` resources of one input (file or API text).
fn parse_all(
    text: &str,
    source: &str,
) -> Result<
    (
        Vec<membrane_policy::Policy>,
        Vec<crate::wasm_resource::WasmFilterResource>,
    ),
    String,
> {
    let (rest, filters) = crate::wasm_resource::split_documents(text, source)?;
    let policies = parse_documents(&rest, source).map_err(|e| e.to_string())?;
    Ok((policies, filters))
}

struct State {
    config: AgentConfig,
    datapath: Datapath,
    node: Netns,
    repo: Repository,
    files: BTreeMap<PathBuf, PolicyFile>,
    /// Problems of the last policy-directory scan, by file.
    file_errors: BTreeMap<PathBuf, String>,
    allocator: LocalAllocator,
    identities: IdentitySet,
    endpoints: BTreeMap<(String, String), Endpoint>,
    next_endpoint_id: u32,
    resolved: BTreeMap<u32, EndpointPolicy>,
    flows: VecDeque<FlowEventView>,
    flows_seen: u64,
    started: Instant,
    reconciles: u64,
    /// Policies applied over the API, kept on disk so a restarted agent enforces them too.
    applied: Vec<AppliedPolicies>,
    /// What the flow pipeline knows about addresses and identities.
    enricher: Arc<StaticEnricher>,
    /// Rule cookie → policy, from the last reconcile.
    cookies: BTreeMap<u32, String>,
    /// Names the DNS proxy learned, their addresses' identities (see `fqdn`).
    fqdn: fqdn::FqdnState,
    /// `WasmFilter` resources in force, by key (`WasmFilter NAMESPACE/NAME`).
    wasm_filters: BTreeMap<String, crate::wasm_resource::WasmFilterResource>,
    /// The proxy policy snapshot last written (to write only changes).
    #[cfg(feature = "proxy")]
    proxy_snapshot: Option<membrane_l7proxy::redirect::store::PolicySnapshot>,
    /// The DNS snapshot last written.
    #[cfg(feature = "proxy")]
    dns_snapshot: Option<crate::dns_node::DnsSnapshot>,
    /// The filter snapshot last written.
    #[cfg(feature = "proxy")]
    filter_snapshot: Option<crate::wasm_node::FilterSnapshot>,
    /// Where the snapshots go to the proxy (and its acknowledgements come from).
    #[cfg(feature = "proxy")]
    channel: Arc<crate::proxy_channel::AgentChannel>,
}

/// One `policy apply`: its text and which of its policies are still in force (later
/// applies replace, deletes remove).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct AppliedPolicies {
    source: String,
    text: String,
    live: Vec<String>,
}

/// Runs the agent until `stop` is set (SIGTERM/SIGINT in the binary).
pub fn run(config: AgentConfig, stop: Arc<AtomicBool>) -> Result<(), AgentError> {
    let state_dir = config.state_dir();
    std::fs::create_dir_all(&state_dir)
        .map_err(io_err(format!("create {}", state_dir.display())))?;
    let ui_listener = bind_ui(&config)?;
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
    let enricher = Arc::new(StaticEnricher::new(config.node_netns.clone()));
    let observer = {
        let _context = runtime.enter();
        Observer::spawn(
            ObserverConfig {
                max_flows: config.flow_capacity.max(1),
                ..ObserverConfig::default()
            },
            enricher.clone(),
        )
        .map_err(|e| AgentError::Invalid(format!("flow pipeline: {e}")))?
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
        next_endpoint_id: 1001,
        resolved: BTreeMap::new(),
        flows: VecDeque::new(),
        flows_seen: 0,
        started: Instant::now(),
        reconciles: 0,
        applied: Vec::new(),
        enricher,
        cookies: BTreeMap::new(),
        fqdn: fqdn::FqdnState::load(&state_dir),
        wasm_filters: BTreeMap::new(),
        #[cfg(feature = "proxy")]
        proxy_snapshot: None,
        #[cfg(feature = "proxy")]
        dns_snapshot: None,
        #[cfg(feature = "proxy")]
        filter_snapshot: None,
        #[cfg(feature = "proxy")]
        channel: crate::proxy_channel::AgentChannel::new(),
    };
    // Serving the proxy channel before the first reconcile: an adopted proxy reconnects and
    // is brought up to date by it.
    #[cfg(feature = "proxy")]
    if config.proxy {
        let path = state_dir.join(crate::proxy_channel::CHANNEL_SOCKET_NAME);
        state
            .channel
            .serve(&path, stop.clone())
            .map_err(io_err(format!("bind {}", path.display())))?;
    }
    state.restore_applied();
    // A restart: take over the endpoints the previous agent registered, in identity order so
    // the deterministic allocator hands out the same numbers again.
    let mut saved_endpoints = load_registry(&state_dir);
    saved_endpoints.sort_by_key(|e| e.identity);
    for saved in saved_endpoints {
        let spec = EndpointSpec {
            name: saved.name.clone(),
            namespace: saved.namespace.clone(),
            labels: saved
                .labels
                .iter()
                .filter_map(|l| l.strip_prefix("k8s:"))
                .filter(|l| {
                    !l.starts_with("io.kubernetes.pod.namespace=")
                        && !l.starts_with("io.cilium.k8s.policy.cluster=")
                })
                .map(str::to_owned)
                .collect(),
            ipv4: saved.ipv4,
            host_ifname: saved.host_ifname.clone(),
        };
        state.next_endpoint_id = state.next_endpoint_id.max(saved.endpoint_id + 1);
        match state.add_endpoint(spec, Some(saved.endpoint_id)) {
            Ok(_) => {
                let restored = state
                    .endpoints
                    .get(&(saved.namespace.clone(), saved.name.clone()))
                    .map(|e| e.identity.0);
                if restored != Some(saved.identity) {
                    tracing::warn!(endpoint = %saved.name, before = saved.identity, now = ?restored, "identity changed across the restart");
                }
            }
            Err(e) => {
                tracing::warn!(endpoint = %saved.name, error = %e, "could not restore endpoint")
            }
        }
    }
    state.scan_policy_dir();
    state.reconcile()?;

    let state = Arc::new(Mutex::new(state));
    let socket = config.socket_path();
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(io_err(format!("bind {}", socket.display())))?;
    let socket_inode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .ok();
    listener.set_nonblocking(true).map_err(io_err("listener"))?;
    tracing::info!(socket = %socket.display(), node = %config.node_netns, "agent serving");

    // Hubble's observer API: a Unix socket, and TCP inside the node namespace.
    let (stop_serving, serving_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    {
        let _context = runtime.enter();
        let hubble_socket = config.hubble_socket_path();
        let listener = membrane_observer::bind_unix(&hubble_socket)
            .map_err(|e| AgentError::Invalid(format!("bind {}: {e}", hubble_socket.display())))?;
        let (obs, done) = (observer.clone(), stopped(serving_stopped.clone()));
        runtime.spawn(async move {
            if let Err(e) = membrane_observer::serve_unix(&obs, listener, done).await {
                tracing::error!(error = %e, "Hubble API on the Unix socket stopped");
            }
        });
        if let Some(port) = config.hubble_port {
            let bound = node_listener(&config.node_netns, port)?;
            let listener =
                tokio::net::TcpListener::from_std(bound).map_err(io_err("Hubble TCP listener"))?;
            let (obs, done) = (observer.clone(), stopped(serving_stopped.clone()));
            runtime.spawn(async move {
                if let Err(e) = membrane_observer::serve_tcp(&obs, listener, done).await {
                    tracing::error!(error = %e, "Hubble API on TCP stopped");
                }
            });
        }
    }
    if let Some(listener) = ui_listener {
        let _context = runtime.enter();
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("UI listener"))?;
        let (obs, done) = (observer.clone(), stopped(serving_stopped.clone()));
        runtime.spawn(membrane_observer::serve_ui(
            obs,
            listener,
            membrane_observer::UiLimits::default(),
            done,
        ));
    }
    if let Some(port) = config.metrics_port {
        let listener = node_listener(&config.node_netns, port)?;
        let (obs, stop) = (observer.clone(), stop.clone());
        std::thread::spawn(move || serve_metrics(listener, &obs, &stop));
    }
    #[cfg(feature = "proxy")]
    if config.proxy {
        let records = config.state_dir().join(PROXY_RECORDS_SOCKET);
        let _ = std::fs::remove_file(&records);
        let socket = std::os::unix::net::UnixDatagram::bind(&records)
            .map_err(io_err(format!("bind {}", records.display())))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(io_err("record socket"))?;
        let (state2, stop2, sender) = (state.clone(), stop.clone(), observer.sender());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !stop2.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                let line = String::from_utf8_lossy(&buf[..n]);
                let endpoints: Vec<(std::net::IpAddr, u32)> = lock(&state2)
                    .endpoints
                    .values()
                    .map(|e| (std::net::IpAddr::V4(e.spec.ipv4), e.id))
                    .collect();
                let endpoint_of = |ip| endpoints.iter().find(|(a, _)| *a == ip).map(|(_, id)| *id);
                if let Some(record) =
                    crate::proxy_process::dns_record_to_flow(&line, |ip| identity_of(&state2, ip))
                {
                    sender.send(FlowInput::Dns(record));
                } else if let Some(record) =
                    crate::proxy_process::record_to_flow(&line, endpoint_of)
                {
                    sender.send(FlowInput::Http(record));
                }
            }
        });
        let (config2, stop3) = (config.clone(), stop.clone());
        let pins = pins.path().to_owned();
        std::thread::spawn(move || supervise_proxy(&config2, &pins, &stop3));
    }

    let mut threads = Vec::new();
    if let Some(mut reader) = events {
        let (state, stop, sender, observer) = (
            state.clone(),
            stop.clone(),
            observer.sender(),
            observer.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let (mut kernel_lost, mut undecodable) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                // The datapath wakes this reader at most every 10 ms per CPU (or when 64 KiB
                // wait), so events written in between wait for this timeout: it bounds how
                // late a flow reaches the observer.
                let batch = reader.wait(Duration::from_millis(50)).unwrap_or_default();
                let mut s = lock(&state);
                for event in batch {
                    s.flows_seen += 1;
                    sender.send(FlowInput::Datapath(to_observer_event(&event, &s.cookies)));
                    if s.flows.len() >= s.config.flow_capacity {
                        s.flows.pop_front();
                    }
                    s.flows.push_back(event);
                }
                // Losses the kernel counted (ring full) and records the reader could not decode.
                let now_lost = s.datapath.metrics().events_lost().unwrap_or(kernel_lost);
                let now_undecodable = reader.undecodable();
                let delta = now_lost.saturating_sub(kernel_lost)
                    + now_undecodable.saturating_sub(undecodable);
                if delta > 0 {
                    observer.report_lost(FlowSource::Datapath, delta);
                }
                (kernel_lost, undecodable) = (now_lost, now_undecodable);
            }
        }));
    }
    {
        // FQDN expiry (addresses past their TTL that no connection uses) and saving.
        let (state, stop) = (state.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(fqdn::EXPIRY_INTERVAL);
                let mut s = lock(&state);
                if let Err(e) = s.fqdn_expire() {
                    tracing::error!(error = %e, "FQDN expiry failed");
                }
                s.fqdn_save();
            }
            lock(&state).fqdn_save();
        }));
    }
    if config.policy_dir.is_some() {
        let (state, stop) = (state.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let mut s = lock(&state);
                if s.scan_policy_dir()
                    && let Err(e) = s.reconcile()
                {
                    tracing::error!(error = %e, "reconcile after a policy file change failed");
                }
            }
        }));
    }

    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let state = state.clone();
                std::thread::spawn(move || serve_client(conn, &state));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on the API socket failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = stop_serving.send(true);
    runtime.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(config.hubble_socket_path());
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

/// A proxy snapshot with a revision number.
#[cfg(feature = "proxy")]
trait Revisioned: Clone + PartialEq {
    fn revision(&self) -> u64;
    fn revision_mut(&mut self) -> &mut u64;
}

#[cfg(feature = "proxy")]
impl Revisioned for membrane_l7proxy::redirect::store::PolicySnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

#[cfg(feature = "proxy")]
impl Revisioned for crate::dns_node::DnsSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

#[cfg(feature = "proxy")]
impl Revisioned for crate::wasm_node::FilterSnapshot {
    fn revision(&self) -> u64 {
        self.revision
    }
    fn revision_mut(&mut self) -> &mut u64 {
        &mut self.revision
    }
}

/// Endpoint id and identity of an address, for proxy records.
#[cfg(feature = "proxy")]
fn identity_of(state: &Mutex<State>, ip: std::net::IpAddr) -> (u32, u32) {
    let s = lock(state);
    if let Some(e) = s
        .endpoints
        .values()
        .find(|e| std::net::IpAddr::V4(e.spec.ipv4) == ip)
    {
        return (e.id, e.identity.0);
    }
    let std::net::IpAddr::V4(v4) = ip else {
        return (0, membrane_common::identity::WORLD);
    };
    let id = s
        .fqdn
        .ips
        .get(&v4)
        .map(|i| i.0)
        .unwrap_or(membrane_common::identity::WORLD);
    (0, id)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve_client(conn: UnixStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let reader = BufReader::new(conn);
    // Bounded: a client gets at most this many requests per connection.
    for line in reader.lines().take(1000) {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => lock(state).handle(request),
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

fn load_registry(state_dir: &Path) -> Vec<RegisteredEndpoint> {
    std::fs::read(state_dir.join("endpoints.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn kind_from_str(kind: &str) -> Option<PolicyKind> {
    match kind {
        "CiliumNetworkPolicy" | "cnp" => Some(PolicyKind::CiliumNetworkPolicy),
        "CiliumClusterwideNetworkPolicy" | "ccnp" => {
            Some(PolicyKind::CiliumClusterwideNetworkPolicy)
        }
        "NetworkPolicy" | "netpol" => Some(PolicyKind::NetworkPolicy),
        _ => None,
    }
}

impl State {
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::ok(self.status()),
            Request::EndpointAdd { endpoint } => {
                let name = format!("{}/{}", endpoint.namespace, endpoint.name);
                match self
                    .add_endpoint(endpoint, None)
                    .and_then(|id| self.reconcile().map(|()| id))
                {
                    Ok(id) => Response::ok(json!({ "endpoint_id": id })),
                    Err(e) => Response::err(format!("endpoint {name}: {e}")),
                }
            }
            Request::EndpointDelete { namespace, name } => {
                match self
                    .delete_endpoint(&namespace, &name)
                    .and_then(|()| self.reconcile())
                {
                    Ok(()) => Response::ok(json!(null)),
                    Err(e) => Response::err(format!("endpoint {namespace}/{name}: {e}")),
                }
            }
            Request::EndpointList => Response::ok(json!(self.registry())),
            Request::IdentityList => {
                let rows: Vec<_> = self
                    .identities
                    .iter()
                    .map(|(id, labels)| {
                        json!({ "identity": id.0, "labels": labels.iter().map(|l| l.to_string()).collect::<Vec<_>>() })
                    })
                    .collect();
                Response::ok(json!(rows))
            }
            Request::PolicyList => {
                let mut rows: Vec<_> = self
                    .repo
                    .iter()
                    .map(
                        |p| json!({ "policy": p.policy_ref().to_string(), "rules": p.rules.len() }),
                    )
                    .collect();
                rows.extend(self.wasm_filters.values().map(|f| {
                    json!({ "policy": f.key(), "rules": 1, "module": f.module.display().to_string(), "direction": format!("{:?}", f.direction), "ports": f.ports, "order": f.order })
                }));
                Response::ok(json!(rows))
            }
            Request::PolicyApply { text, source } => self.apply_text(&text, &source),
            Request::PolicyDelete {
                kind,
                namespace,
                name,
            } => {
                if kind == crate::wasm_resource::KIND {
                    let key = format!(
                        "{kind} {}/{name}",
                        namespace.as_deref().unwrap_or("default")
                    );
                    return match self.wasm_filters.remove(&key) {
                        Some(_) => {
                            match self.forget_applied(&key).and_then(|()| self.reconcile()) {
                                Ok(()) => Response::ok(json!({ "deleted": key })),
                                Err(e) => Response::err(e.to_string()),
                            }
                        }
                        None => Response::err(format!("no {key}")),
                    };
                }
                let Some(kind) = kind_from_str(&kind) else {
                    return Response::err(format!(
                        "unknown policy kind `{kind}` (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)"
                    ));
                };
                let key = PolicyRef {
                    kind,
                    namespace,
                    name,
                };
                match self.repo.remove(&key) {
                    Some(_) => match self
                        .forget_applied(&key.to_string())
                        .and_then(|()| self.reconcile())
                    {
                        Ok(()) => Response::ok(json!({ "deleted": key.to_string() })),
                        Err(e) => Response::err(e.to_string()),
                    },
                    None => Response::err(format!("no policy {key}")),
                }
            }
            Request::FqdnLearn { name, ips } => match self.fqdn_learn(&name, &ips) {
                Ok(data) => Response::ok(data),
                Err(e) => Response::err(format!("FQDN {name}: {e}")),
            },
            Request::FqdnCacheList => Response::ok(self.fqdn_rows()),
            Request::Flows { last } => {
                let skip = self.flows.len().saturating_sub(last);
                let rows: Vec<_> = self.flows.iter().skip(skip).map(flow_json).collect();
                Response::ok(json!(rows))
            }
        }
    }

    fn status(&mut self) -> serde_json::Value {
        let lost = self.datapath.metrics().events_lost().unwrap_or(0);
        json!({
            "node": self.config.node_netns,
            "uptime_secs": self.started.elapsed().as_secs(),
            "datapath": {
                "pin_dir": self.datapath.pin_dir().display().to_string(),
                "abi_version": membrane_common::ABI_VERSION,
                "attached_interfaces": self.datapath.attached_interfaces().count(),
            },
            "endpoints": self.endpoints.len(),
            "identities": self.identities.len(),
            "policies": self.repo.len(),
            "policy_dir": self.config.policy_dir.as_ref().map(|d| d.display().to_string()),
            "policy_errors": self.file_errors.iter().map(|(f, e)| format!("{}: {e}", f.display())).collect::<Vec<_>>(),
            "reconciles": self.reconciles,
            "flows": { "kept": self.flows.len(), "capacity": self.config.flow_capacity, "seen": self.flows_seen, "lost_in_kernel": lost },
            "proxy": self.proxy_status(),
            "dns_proxy": self.dns_proxy_status(),
            "fqdn": self.fqdn_status(),
            "filters": self.filters_status(),
        })
    }

    /// The DNS proxy: its port, what it answers on deny, the endpoints with DNS rules and the
    /// revision the proxy applied.
    fn dns_proxy_status(&self) -> serde_json::Value {
        #[cfg(feature = "proxy")]
        let (endpoints, applied) = (
            self.dns_snapshot.as_ref().map_or(0, |s| s.endpoints.len()),
            self.channel.applied(crate::proxy_channel::Kind::Dns),
        );
        #[cfg(not(feature = "proxy"))]
        let (endpoints, applied) = (0, 0);
        json!({
            "port": self.config.dns_proxy_port,
            "deny_response": self.config.dns.deny_response,
            "endpoints_with_dns_rules": endpoints,
            "revision_applied": applied,
        })
    }

    /// `WasmFilter` resources and where they are attached.
    fn filters_status(&self) -> serde_json::Value {
        #[cfg(feature = "proxy")]
        let (attachments, revision) = self
            .filter_snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.attachments.len(), s.revision));
        #[cfg(not(feature = "proxy"))]
        let (attachments, revision) = (0usize, 0u64);
        #[cfg(feature = "proxy")]
        let applied = self.channel.applied(crate::proxy_channel::Kind::Filters);
        #[cfg(not(feature = "proxy"))]
        let applied = 0u64;
        json!({
            "resources": self.wasm_filters.len(),
            "attachments": attachments,
            "revision": revision,
            "revision_applied": applied,
        })
    }

    /// One line about the L7 proxy: supervised or not, its pid and the policy revision it
    /// applied.
    fn proxy_status(&self) -> String {
        if !self.config.proxy {
            return "disabled".into();
        }
        let state = self.config.state_dir();
        let pid = std::fs::read_to_string(state.join("proxy.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
        #[cfg(feature = "proxy")]
        let channel = if self.channel.connected() {
            let stats = self.channel.stats();
            format!(
                "policy revision {} applied; channel connected, {} whole and {} incremental updates sent",
                self.channel.applied(crate::proxy_channel::Kind::Policy),
                stats.full_sent,
                stats.deltas_sent
            )
        } else {
            "not connected to the channel".to_owned()
        };
        #[cfg(not(feature = "proxy"))]
        let channel = String::new();
        match pid {
            Some(pid) => format!(
                "running (pid {pid}; listeners {} egress, {} ingress; {channel})",
                self.config.http_proxy_port,
                self.config.http_proxy_port + 1,
            ),
            None => "not running (the agent restarts it)".into(),
        }
    }

    fn apply_text(&mut self, text: &str, source: &str) -> Response {
        let (policies, filters) = match parse_all(text, source) {
            Ok(p) => p,
            // Nothing of a bad input is applied: the repository is untouched.
            Err(e) => return Response::err(e),
        };
        let mut names: Vec<String> = policies
            .iter()
            .map(|p| p.policy_ref().to_string())
            .collect();
        names.extend(filters.iter().map(|f| f.key()));
        for p in policies {
            self.repo.replace(p);
        }
        for f in filters {
            self.wasm_filters.insert(f.key(), f);
        }
        for entry in &mut self.applied {
            entry.live.retain(|r| !names.contains(r));
        }
        self.applied.retain(|e| !e.live.is_empty());
        self.applied.push(AppliedPolicies {
            source: source.to_owned(),
            text: text.to_owned(),
            live: names.clone(),
        });
        if let Err(e) = self.save_applied() {
            return Response::err(format!("applied, but not saved for restarts: {e}"));
        }
        match self.reconcile() {
            Ok(()) => Response::ok(json!({ "applied": names })),
            Err(e) => Response::err(e.to_string()),
        }
    }

    fn applied_path(&self) -> PathBuf {
        self.config.state_dir().join("applied-policies.json")
    }

    fn save_applied(&self) -> Result<(), AgentError> {
        let path = self.applied_path();
        let bytes = serde_json::to_vec_pretty(&self.applied)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(io_err(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("write {}", path.display())))
    }

    /// Re-applies what earlier agents accepted over the API (only the policies still live).
    fn restore_applied(&mut self) {
        let Ok(bytes) = std::fs::read(self.applied_path()) else {
            return;
        };
        let Ok(applied) = serde_json::from_slice::<Vec<AppliedPolicies>>(&bytes) else {
            tracing::error!(file = %self.applied_path().display(), "unreadable; API-applied policies not restored");
            return;
        };
        for entry in &applied {
            match parse_all(&entry.text, &entry.source) {
                Ok((policies, filters)) => {
                    for p in policies {
                        if entry.live.contains(&p.policy_ref().to_string()) {
                            self.repo.replace(p);
                        }
                    }
                    for f in filters {
                        if entry.live.contains(&f.key()) {
                            self.wasm_filters.insert(f.key(), f);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(source = %entry.source, error = %e, "saved policy no longer parses")
                }
            }
        }
        self.applied = applied;
    }

    fn forget_applied(&mut self, policy: &str) -> Result<(), AgentError> {
        for entry in &mut self.applied {
            entry.live.retain(|r| r != policy);
        }
        self.applied.retain(|e| !e.live.is_empty());
        self.save_applied()
    }

    fn registry(&self) -> Vec<RegisteredEndpoint> {
        self.endpoints
            .values()
            .map(|e| RegisteredEndpoint {
                name: e.spec.name.clone(),
                namespace: e.spec.namespace.clone(),
                endpoint_id: e.id,
                identity: e.identity.0,
                ipv4: e.spec.ipv4,
                host_ifname: e.spec.host_ifname.clone(),
                labels: e.labels.iter().map(|l| l.to_string()).collect(),
            })
            .collect()
    }

    fn save_registry(&self) -> Result<(), AgentError> {
        let path = self.config.state_dir().join("endpoints.json");
        let bytes = serde_json::to_vec_pretty(&self.registry())
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(io_err(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("write {}", path.display())))
    }

    fn add_endpoint(&mut self, spec: EndpointSpec, id: Option<u32>) -> Result<u32, AgentError> {
        if spec.name.is_empty() || spec.namespace.is_empty() {
            return Err(AgentError::Invalid(
                "name and namespace are required".into(),
            ));
        }
        let key = (spec.namespace.clone(), spec.name.clone());
        if let Some(existing) = self.endpoints.get(&key) {
            if existing.spec == spec {
                return Ok(existing.id);
            }
            return Err(AgentError::Invalid(format!(
                "already registered with different settings (endpoint {}); delete it first",
                existing.id
            )));
        }
        if let Some(clash) = self
            .endpoints
            .values()
            .find(|e| e.spec.ipv4 == spec.ipv4 || e.spec.host_ifname == spec.host_ifname)
        {
            return Err(AgentError::Invalid(format!(
                "address {} or interface {} already belongs to {}/{}",
                spec.ipv4, spec.host_ifname, clash.spec.namespace, clash.spec.name
            )));
        }
        let mut texts: Vec<String> = Vec::new();
        for l in &spec.labels {
            if !l.contains('=') {
                return Err(AgentError::Invalid(format!("label `{l}` is not key=value")));
            }
            texts.push(if l.contains(':') && !l.starts_with("app.kubernetes.io") {
                l.clone()
            } else {
                format!("k8s:{l}")
            });
        }
        texts.push(format!(
            "k8s:io.kubernetes.pod.namespace={}",
            spec.namespace
        ));
        // The `cluster` entity selects pods by this label (Cilium adds it to every pod).
        texts.push(format!("k8s:io.cilium.k8s.policy.cluster={CLUSTER_NAME}"));
        let labels = Labels::parse(texts.iter().map(String::as_str))
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let labels = membrane_policy::filter_security_relevant(&labels);
        let identity = match self.identities.lookup(&labels) {
            Some(id) => id,
            None => {
                let id = self
                    .allocator
                    .allocate(&labels)
                    .map_err(|e| AgentError::Invalid(e.to_string()))?;
                self.identities.insert(id, labels.clone());
                id
            }
        };
        let id = id.unwrap_or_else(|| {
            let id = self.next_endpoint_id;
            self.next_endpoint_id += 1;
            id
        });
        self.datapath
            .attach_endpoint(&self.node, &spec.host_ifname)
            .map_err(dp_err(format!("attach programs to {}", spec.host_ifname)))?;
        self.enricher.insert_endpoint(
            std::net::IpAddr::V4(spec.ipv4),
            EndpointMeta {
                id,
                namespace: spec.namespace.clone(),
                pod_name: spec.name.clone(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
            },
        );
        self.endpoints.insert(
            key,
            Endpoint {
                spec,
                id,
                identity,
                labels,
            },
        );
        self.save_registry()?;
        Ok(id)
    }

    fn delete_endpoint(&mut self, namespace: &str, name: &str) -> Result<(), AgentError> {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(endpoint) = self.endpoints.remove(&key) else {
            return Err(AgentError::Invalid("no such endpoint".into()));
        };
        self.datapath
            .detach_endpoint(&endpoint.spec.host_ifname)
            .map_err(dp_err("detach programs"))?;
        let _ = self.datapath.conntrack().flush_endpoint(endpoint.id);
        self.resolved.remove(&endpoint.id);
        self.save_registry()
    }

    /// Re-reads changed policy files. Returns whether the repository changed. A file that does
    /// not parse keeps its previous policies in force and is reported in `status`.
    fn scan_policy_dir(&mut self) -> bool {
        let Some(dir) = self.config.policy_dir.clone() else {
            return false;
        };
        let mut seen = BTreeSet::new();
        let mut changed = false;
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for path in entries {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if !matches!(ext, "yaml" | "yml" | "json") {
                continue;
            }
            seen.insert(path.clone());
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if let Some(known) = self.files.get(&path)
                && known.modified == modified
                && known.len == meta.len()
            {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.file_errors.insert(path.clone(), e.to_string());
                    continue;
                }
            };
            match parse_all(&text, &path.display().to_string()) {
                Ok((policies, filters)) => {
                    if let Some(old) = self.files.remove(&path) {
                        for r in old.refs {
                            self.repo.remove(&r);
                        }
                        for k in old.wasm {
                            self.wasm_filters.remove(&k);
                        }
                    }
                    let refs = policies.iter().map(|p| p.policy_ref()).collect();
                    for p in policies {
                        self.repo.replace(p);
                    }
                    let wasm = filters.iter().map(|f| f.key()).collect();
                    for f in filters {
                        self.wasm_filters.insert(f.key(), f);
                    }
                    self.files.insert(
                        path.clone(),
                        PolicyFile {
                            modified,
                            len: meta.len(),
                            refs,
                            wasm,
                        },
                    );
                    self.file_errors.remove(&path);
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "policy file rejected; its previous version stays in force");
                    self.file_errors.insert(path.clone(), e.to_string());
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(old) = self.files.remove(&path) {
                for r in old.refs {
                    self.repo.remove(&r);
                }
                for k in old.wasm {
                    self.wasm_filters.remove(&k);
                }
                changed = true;
            }
            self.file_errors.remove(&path);
        }
        changed
    }

    /// Makes the kernel maps match the desired state.
    fn reconcile(&mut self) -> Result<(), AgentError> {
        // FQDN identities first: the resolve below writes their policy entries.
        self.refresh_fqdn()?;
        let mut options =
            ResolveOptions::new(self.config.http_proxy_port, self.config.dns_proxy_port);
        options.cluster_name = CLUSTER_NAME.to_owned();
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
                    .map_err(|e| AgentError::Invalid(e.to_string()))?;
                policy = resolve_endpoint(&self.repo, &info, &self.identities, &options);
            }
            prefixes.extend(policy.cidr_prefixes.iter().map(|(p, id)| (*p, *id)));
            desired.insert(endpoint.id, policy);
        }

        // Endpoints map.
        let mut want_endpoints = BTreeMap::new();
        for endpoint in self.endpoints.values() {
            let ifindex = self.node_ifindex(&endpoint.spec.host_ifname)?;
            let policy = &desired[&endpoint.id];
            want_endpoints.insert(
                ifindex,
                EndpointEntry {
                    ifindex,
                    endpoint_id: endpoint.id,
                    identity: endpoint.identity.0,
                    enforce_ingress: policy.enforce_ingress,
                    enforce_egress: policy.enforce_egress,
                },
            );
        }
        let have_endpoints = self
            .datapath
            .endpoints()
            .list()
            .map_err(dp_err("list endpoints"))?;
        for e in &have_endpoints {
            if !want_endpoints.contains_key(&e.ifindex) {
                self.datapath
                    .endpoints()
                    .remove(e.ifindex)
                    .map_err(dp_err("remove endpoint"))?;
            }
        }
        for (ifindex, e) in &want_endpoints {
            if !have_endpoints
                .iter()
                .any(|h| h.ifindex == *ifindex && h == e)
            {
                self.datapath
                    .endpoints()
                    .upsert(*e)
                    .map_err(dp_err("write endpoint"))?;
            }
        }

        // ipcache: endpoint addresses and the CIDR prefixes policies reference.
        let mut want_ipcache: BTreeMap<Ipv4Prefix, u32> = BTreeMap::new();
        // The node's own address (the pods' gateway) is the host (`reserved:host`).
        want_ipcache.insert(
            Ipv4Prefix::host(POD_GATEWAY),
            membrane_common::identity::HOST,
        );
        for endpoint in self.endpoints.values() {
            want_ipcache.insert(Ipv4Prefix::host(endpoint.spec.ipv4), endpoint.identity.0);
        }
        for (prefix, id) in &prefixes {
            if let Some(v4) = datapath_sync::ipv4_prefix(prefix) {
                want_ipcache.entry(v4).or_insert(id.0);
            }
        }
        // Addresses the DNS proxy learned (a pod's own address wins).
        for (ip, id) in &self.fqdn.ips {
            want_ipcache.entry(Ipv4Prefix::host(*ip)).or_insert(id.0);
        }
        let have_ipcache = self
            .datapath
            .ipcache()
            .list()
            .map_err(dp_err("list ipcache"))?;
        for (prefix, id) in &have_ipcache {
            if want_ipcache.get(prefix) != Some(id) && !want_ipcache.contains_key(prefix) {
                self.datapath
                    .ipcache()
                    .remove(*prefix)
                    .map_err(dp_err("remove ipcache entry"))?;
            }
        }
        for (prefix, id) in &want_ipcache {
            if !have_ipcache.iter().any(|(p, i)| p == prefix && i == id) {
                self.datapath
                    .ipcache()
                    .upsert(*prefix, *id)
                    .map_err(dp_err("write ipcache entry"))?;
            }
        }

        // Policy entries: write the desired ones first (no window without them), then remove
        // the stale ones.
        let mut want_rules: BTreeMap<
            (
                u32,
                membrane_common::Direction,
                u32,
                u8,
                membrane_datapath::PortMatch,
            ),
            PolicyRule,
        > = BTreeMap::new();
        for policy in desired.values() {
            for (key, entry) in &policy.entries {
                let mut rule = datapath_sync::to_datapath_rule(policy.endpoint_id, key, entry)
                    .map_err(|e| AgentError::Invalid(e.to_string()))?;
                // The proxy has one listener per direction: ingress HTTP redirects go to the
                // port after the egress one.
                if rule.direction == membrane_common::Direction::Ingress
                    && rule.verdict
                        == membrane_datapath::PolicyVerdict::Redirect(self.config.http_proxy_port)
                {
                    rule.verdict =
                        membrane_datapath::PolicyVerdict::Redirect(self.config.http_proxy_port + 1);
                }
                want_rules.insert(
                    (
                        rule.endpoint_id,
                        rule.direction,
                        rule.remote_identity,
                        rule.protocol,
                        rule.ports,
                    ),
                    rule,
                );
            }
        }
        let have_rules = self
            .datapath
            .policy()
            .list()
            .map_err(dp_err("list policy"))?;
        for rule in want_rules.values() {
            if !have_rules.contains(rule) {
                self.datapath
                    .policy()
                    .insert(rule)
                    .map_err(dp_err("write policy entry"))?;
            }
        }
        for rule in &have_rules {
            let key = (
                rule.endpoint_id,
                rule.direction,
                rule.remote_identity,
                rule.protocol,
                rule.ports,
            );
            if !want_rules.contains_key(&key) {
                self.datapath
                    .policy()
                    .remove(rule)
                    .map_err(dp_err("remove policy entry"))?;
            }
        }
        self.cookies = desired
            .values()
            .flat_map(|p| p.cookies.iter().map(|(c, r)| (*c, r.clone())))
            .collect();
        for (id, labels) in self.identities.iter() {
            self.enricher
                .insert_identity(id.0, labels.iter().map(|l| l.to_string()).collect());
        }
        #[cfg(feature = "proxy")]
        self.write_proxy_snapshot(&desired)?;
        self.resolved = desired;
        self.reconciles += 1;
        Ok(())
    }

    /// Writes the proxy's policy snapshot when the HTTP rules changed.
    #[cfg(feature = "proxy")]
    fn write_proxy_snapshot(
        &mut self,
        desired: &BTreeMap<u32, EndpointPolicy>,
    ) -> Result<(), AgentError> {
        let endpoints: Vec<(u64, std::net::Ipv4Addr, &EndpointPolicy)> = self
            .endpoints
            .values()
            .filter_map(|e| {
                desired
                    .get(&e.id)
                    .map(|p| (u64::from(e.id), e.spec.ipv4, p))
            })
            .collect();
        self.write_dns_snapshot(&endpoints)?;
        self.write_filter_snapshot()?;
        let snapshot = crate::proxy_process::snapshot_of(endpoints, 0);
        let mut previous = self.proxy_snapshot.take();
        let published = self.publish(
            &mut previous,
            snapshot,
            "policy",
            Duration::from_secs(2),
            |channel, snapshot, wait, expected| channel.publish_policy(snapshot, wait, expected),
        );
        self.proxy_snapshot = previous;
        published
    }

    /// Sends the DNS proxy's rules when they changed, and waits (bounded) for a running
    /// proxy to apply them.
    #[cfg(feature = "proxy")]
    fn write_dns_snapshot(
        &mut self,
        endpoints: &[(u64, std::net::Ipv4Addr, &EndpointPolicy)],
    ) -> Result<(), AgentError> {
        let snapshot = crate::dns_node::snapshot_of(endpoints.iter().copied());
        let mut previous = self.dns_snapshot.take();
        let written = self.publish(
            &mut previous,
            snapshot,
            "DNS",
            Duration::from_secs(2),
            |channel, snapshot, wait, expected| channel.publish_dns(snapshot, wait, expected),
        );
        self.dns_snapshot = previous;
        written
    }

    /// Sends the filter snapshot (`WasmFilter` resources per endpoint) when it changed, and
    /// waits (bounded) for a running proxy to apply it. Compiling modules takes a moment: a
    /// longer bound than the policy snapshots'.
    #[cfg(feature = "proxy")]
    fn write_filter_snapshot(&mut self) -> Result<(), AgentError> {
        let endpoints: Vec<crate::wasm_node::EndpointView<'_>> = self
            .endpoints
            .values()
            .map(|e| crate::wasm_node::EndpointView {
                id: u64::from(e.id),
                ip: e.spec.ipv4,
                namespace: &e.spec.namespace,
                pod: &e.spec.name,
                labels: &e.labels,
            })
            .collect();
        let resources: Vec<&crate::wasm_resource::WasmFilterResource> =
            self.wasm_filters.values().collect();
        // Peer tables only matter with filters; skip building them otherwise.
        let peers = if resources.is_empty() {
            crate::wasm_node::SnapshotPeers::default()
        } else {
            let (peers, dropped) = crate::wasm_node::peers_of(
                &endpoints,
                self.identities.iter().map(|(id, labels)| (id.0, labels)),
            );
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    max = crate::wasm_node::MAX_SNAPSHOT_IDENTITIES,
                    "filter snapshot: identities past the bound carry no labels for filters"
                );
            }
            peers
        };
        let snapshot = crate::wasm_node::snapshot_of(&endpoints, &resources, peers);
        let mut previous = self.filter_snapshot.take();
        let written = self.publish(
            &mut previous,
            snapshot,
            "filter",
            Duration::from_secs(10),
            |channel, snapshot, wait, expected| channel.publish_filters(snapshot, wait, expected),
        );
        self.filter_snapshot = previous;
        written
    }

    /// A snapshot for the proxy: unchanged ⇒ nothing; changed ⇒ the next revision (the
    /// first one from [`crate::proxy_channel::first_revision`]) sent over the proxy channel,
    /// then a bounded wait for the proxy's answer when one runs. A proxy that refuses keeps
    /// its previous configuration of that kind (logged; the agent's state is unaffected).
    #[cfg(feature = "proxy")]
    fn publish<T: Revisioned>(
        &self,
        previous: &mut Option<T>,
        mut snapshot: T,
        what: &str,
        wait: Duration,
        send: impl FnOnce(
            &crate::proxy_channel::AgentChannel,
            T,
            Duration,
            bool,
        ) -> crate::proxy_channel::Outcome,
    ) -> Result<(), AgentError> {
        use crate::proxy_channel::Outcome;
        let revision = match previous.as_ref() {
            Some(previous) => {
                *snapshot.revision_mut() = previous.revision();
                if previous == &snapshot {
                    return Ok(());
                }
                previous.revision() + 1
            }
            None => crate::proxy_channel::first_revision(),
        };
        *snapshot.revision_mut() = revision;
        *previous = Some(snapshot.clone());
        let expected = self.config.proxy && self.proxy_running();
        match send(&self.channel, snapshot, wait, expected) {
            Outcome::Applied | Outcome::NoProxy => {}
            Outcome::TimedOut => tracing::warn!(
                revision,
                "the proxy has not applied the {what} configuration within {wait:?} (see proxy.log)"
            ),
            Outcome::Refused(error) => tracing::error!(
                revision,
                %error,
                "the proxy refused the {what} configuration; it keeps its previous one"
            ),
        }
        Ok(())
    }

    fn proxy_running(&self) -> bool {
        std::fs::read_to_string(self.config.state_dir().join("proxy.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    fn node_ifindex(&self, ifname: &str) -> Result<u32, AgentError> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| AgentError::Invalid(format!("interface `{ifname}`")))?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = self
            .node
            .run(move || unsafe { libc::if_nametoindex(name.as_ptr()) })
            .map_err(dp_err("ifindex"))?;
        if index == 0 {
            return Err(AgentError::Invalid(format!(
                "no interface {ifname} in {}",
                self.node.name()
            )));
        }
        Ok(index)
    }
}

fn flow_json(e: &FlowEventView) -> serde_json::Value {
    json!({
        "kind": format!("{:?}", e.kind),
        "verdict": format!("{:?}", e.verdict),
        "drop_reason": e.drop_reason,
        "drop_reason_desc": e.drop_reason.map(membrane_common::reason::describe),
        "direction": e.direction.as_str(),
        "match_type": e.match_type,
        "protocol": membrane_datapath::maps::protocol_name(e.protocol),
        "src": format!("{}:{}", e.src, e.sport),
        "dst": format!("{}:{}", e.dst, e.dport),
        "src_identity": e.src_identity,
        "dst_identity": e.dst_identity,
        "endpoint_id": e.endpoint_id,
        "proxy_port": e.proxy_port,
        "rule_cookie": e.rule_cookie,
    })
}

/// A TCP listener on `0.0.0.0:port` inside the node namespace (reachable from the node and
/// its pods, never from the host's own namespace).
fn node_listener(node: &str, port: u16) -> Result<std::net::TcpListener, AgentError> {
    let ns = Netns::open(node).map_err(dp_err("open the node namespace"))?;
    let listener = ns
        .run(move || std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))
        .map_err(dp_err("enter the node namespace"))?
        .map_err(io_err(format!("bind 0.0.0.0:{port} in {node}")))?;
    listener.set_nonblocking(true).map_err(io_err("listener"))?;
    Ok(listener)
}

/// The flow page's listener, bound (or taken over) first so a taken port fails the start
/// before the datapath is touched. Loopback only: the page has no authentication. The bound
/// address goes to `ui-addr` in the state directory (how `membrane lab up` finds its URL).
fn bind_ui(config: &AgentConfig) -> Result<Option<std::net::TcpListener>, AgentError> {
    use std::os::fd::FromRawFd as _;
    let file = config.state_dir().join(UI_ADDR_NAME);
    let _ = std::fs::remove_file(&file);
    let listener = match (config.ui_listen_fd, config.ui_listen) {
        (Some(fd), _) => {
            // SAFETY: the parent handed this descriptor over for the flow page and does not
            // use it; nothing else in this process owns it. A descriptor that is not a TCP
            // socket fails `local_addr` below.
            unsafe { std::net::TcpListener::from_raw_fd(fd) }
        }
        (None, Some(addr)) => std::net::TcpListener::bind(addr)
            .map_err(io_err(format!("bind the flow page to {addr}")))?,
        (None, None) => return Ok(None),
    };
    let bound = listener
        .local_addr()
        .map_err(io_err("the flow page's listener (--ui-listen-fd)"))?;
    if !bound.ip().is_loopback() {
        return Err(AgentError::Invalid(format!(
            "flow page on {bound}: it has no authentication; give a loopback address such as 127.0.0.1:9966"
        )));
    }
    listener
        .set_nonblocking(true)
        .map_err(io_err("UI listener"))?;
    std::fs::write(&file, format!("{bound}\n"))
        .map_err(io_err(format!("write {}", file.display())))?;
    tracing::info!(url = %format!("http://{bound}/ui"), "flow page serving");
    Ok(Some(listener))
}

/// Prometheus text on `GET /metrics`, one short-lived connection at a time.
fn serve_metrics(listener: std::net::TcpListener, observer: &Observer, stop: &AtomicBool) {
    use std::io::Read as _;
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 2048];
        let n = conn.read(&mut buf).unwrap_or(0);
        let request = String::from_utf8_lossy(&buf[..n]);
        let (status, body) = if request.starts_with("GET /metrics") {
            ("200 OK", observer.render_metrics())
        } else {
            ("404 Not Found", "only /metrics is served here\n".to_owned())
        };
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
}

/// The observer's form of a datapath event. The kernel stamps events with its monotonic
/// clock; wall time is now minus their age.
fn to_observer_event(e: &FlowEventView, cookies: &BTreeMap<u32, String>) -> DatapathEvent {
    let age = membrane_datapath::maps::monotonic_ns().saturating_sub(e.timestamp_ns);
    let time = SystemTime::now() - Duration::from_nanos(age);
    let kind = match e.kind {
        membrane_datapath::EventKind::Drop => DatapathEventKind::Drop,
        membrane_datapath::EventKind::Trace => DatapathEventKind::Trace,
        membrane_datapath::EventKind::PolicyVerdict => DatapathEventKind::PolicyVerdict,
    };
    let verdict = match e.verdict {
        membrane_datapath::EventVerdict::Forwarded => DatapathVerdict::Forwarded,
        membrane_datapath::EventVerdict::Dropped => DatapathVerdict::Dropped,
        membrane_datapath::EventVerdict::Redirected => DatapathVerdict::Redirected,
    };
    let direction = match e.direction {
        membrane_common::Direction::Ingress => membrane_observer::Direction::Ingress,
        membrane_common::Direction::Egress => membrane_observer::Direction::Egress,
    };
    // Cookie origins read "CiliumNetworkPolicy ns/name specs[0] egress[1]" or
    // "CiliumClusterwideNetworkPolicy name spec egress[0]".
    let policy = cookies.get(&e.rule_cookie).map(|origin| {
        let mut words = origin.split(' ');
        let kind = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or_default();
        let (namespace, name) = match target.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (String::new(), target.to_owned()),
        };
        membrane_observer::PolicyRef {
            name,
            namespace,
            kind,
            labels: Vec::new(),
            revision: 0,
        }
    });
    DatapathEvent {
        time,
        kind,
        verdict,
        drop_reason: e.drop_reason,
        direction,
        match_type: e.match_type,
        protocol: e.protocol,
        tcp_flags: e.tcp_flags,
        endpoint_id: e.endpoint_id,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        src: std::net::IpAddr::V4(e.src),
        sport: e.sport,
        dst: std::net::IpAddr::V4(e.dst),
        dport: e.dport,
        icmp_code: 0,
        proxy_port: e.proxy_port,
        ifindex: e.ifindex,
        // The programs report first packets (traces, verdicts); drops may be either.
        is_reply: if kind == DatapathEventKind::Drop {
            None
        } else {
            Some(false)
        },
        observation_point: None,
        policy,
    }
}

/// File name of the Unix datagram socket the proxy sends access records to.
#[cfg(feature = "proxy")]
pub const PROXY_RECORDS_SOCKET: &str = "proxy-records.sock";

/// Keeps one `membrane-proxy` running for the node. It is not the agent's child in any sense
/// that matters: it keeps serving when the agent stops, and a restarted agent adopts it
/// through its pid file instead of starting a second one.
#[cfg(feature = "proxy")]
fn supervise_proxy(config: &AgentConfig, pins: &Path, stop: &AtomicBool) {
    let state = config.state_dir();
    let pid_file = state.join("proxy.pid");
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let running = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|pid| alive(*pid))
    };
    // The DNS listeners outlive every proxy: a running proxy's (after an agent restart),
    // else new ones. Without them the proxy runs without its DNS part.
    let dns = dns_listeners(config, running());
    if let Err(e) = &dns {
        tracing::error!(error = %e, "DNS proxy listeners unavailable; DNS redirects will be dropped");
    }
    let dns = dns.ok();
    // The reaper of a proxy we started tells us when it exits, so the next one starts at once.
    let (exited_tx, exited) = std::sync::mpsc::channel::<u32>();
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        // Never start one while stopping: a teardown may just have stopped the old one.
        if running().is_none() && !stop.load(Ordering::Relaxed) {
            match spawn_proxy(config, pins, dns.as_ref(), exited_tx.clone()) {
                Ok(pid) => {
                    let _ = std::fs::write(&pid_file, format!("{pid}\n"));
                    tracing::info!(pid, "membrane-proxy started");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start membrane-proxy; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        // An adopted proxy (started by an earlier agent) is polled.
        let _ = exited.recv_timeout(Duration::from_millis(200));
    }
}

/// The DNS listeners: duplicated from the running proxy when there is one (it inherited
/// them from the previous agent), else bound in the node namespace.
#[cfg(feature = "proxy")]
fn dns_listeners(
    config: &AgentConfig,
    running: Option<u32>,
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), String> {
    if let Some(pid) = running {
        match fds_of(pid, &[crate::dns_node::UDP_FD, crate::dns_node::TCP_FD]) {
            Ok(mut fds) if fds.len() == 2 => {
                let tcp = fds.pop().expect("two fds");
                let udp = fds.pop().expect("two fds");
                let port = |fd: &std::os::fd::OwnedFd| {
                    socket2::SockRef::from(fd)
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map(|a| a.port())
                };
                if port(&udp) == Some(config.dns_proxy_port)
                    && port(&tcp) == Some(config.dns_proxy_port)
                {
                    tracing::info!(pid, "DNS listeners taken over from the running proxy");
                    return Ok((udp, tcp));
                }
                tracing::warn!(
                    pid,
                    "the running proxy's descriptors 3/4 are not the DNS listeners"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pid, error = %e, "cannot take the DNS listeners over"),
        }
    }
    let node = Netns::open(&config.node_netns).map_err(|e| e.to_string())?;
    let port = config.dns_proxy_port;
    node.run(move || crate::dns_node::bind_listeners(port))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind the DNS listeners on port {port}: {e}"))
}

/// Duplicates descriptors of another process (`pidfd_getfd`, Linux 5.6).
#[cfg(feature = "proxy")]
fn fds_of(pid: u32, fds: &[i32]) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain syscalls; every returned descriptor is owned exactly once below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd as i32);
        let mut out = Vec::new();
        for fd in fds {
            let got = libc::syscall(
                libc::SYS_pidfd_getfd,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                *fd,
                0,
            );
            if got < 0 {
                return Err(std::io::Error::last_os_error());
            }
            out.push(std::os::fd::OwnedFd::from_raw_fd(got as i32));
        }
        Ok(out)
    }
}

#[cfg(feature = "proxy")]
fn spawn_proxy(
    config: &AgentConfig,
    pins: &Path,
    dns: Option<&(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    exited: std::sync::mpsc::Sender<u32>,
) -> std::io::Result<u32> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let exe = std::env::current_exe()?.with_file_name("membrane-proxy");
    let state = config.state_dir();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("proxy.log"))?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["--node-netns", &config.node_netns])
        .arg("--pin-dir")
        .arg(pins)
        .arg("--snapshot")
        .arg(state.join(crate::proxy_process::SNAPSHOT_NAME))
        .arg("--agent-channel")
        .arg(state.join(crate::proxy_channel::CHANNEL_SOCKET_NAME))
        .args(["--egress-port", &config.http_proxy_port.to_string()])
        .args(["--ingress-port", &(config.http_proxy_port + 1).to_string()])
        .arg("--records-socket")
        .arg(state.join(PROXY_RECORDS_SOCKET))
        .arg("--agent-socket")
        .arg(config.socket_path())
        .arg("--dns-snapshot")
        .arg(state.join(crate::dns_node::DNS_SNAPSHOT_NAME))
        .arg("--filter-snapshot")
        .arg(state.join(crate::wasm_node::FILTER_SNAPSHOT_NAME))
        .args(config.dns.args())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if let Some((udp, tcp)) = dns {
        let (udp, tcp) = (udp.as_raw_fd(), tcp.as_raw_fd());
        command.arg("--dns-fds");
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Move both out of the way first, so neither target clobbers the other.
                let high_udp = libc::fcntl(udp, libc::F_DUPFD_CLOEXEC, 10);
                let high_tcp = libc::fcntl(tcp, libc::F_DUPFD_CLOEXEC, 10);
                if high_udp < 0
                    || high_tcp < 0
                    || libc::dup2(high_udp, crate::dns_node::UDP_FD) < 0
                    || libc::dup2(high_tcp, crate::dns_node::TCP_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command.spawn()?;
    // Reap it when it exits (so the pid check sees it gone) and tell the supervisor.
    let pid = child.id();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
        let _ = exited.send(pid);
    });
    Ok(pid)
}
