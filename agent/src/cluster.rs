//! The agent's side of the cluster store (`--kvstore etcd`): a [`ClusterClient`] over
//! `membrane-cluster` that
//!
//! - allocates endpoint identities cluster-wide (same labels → same number on every node;
//!   CIDR and `fqdn:` identities stay with the node's `LocalAllocator`);
//! - publishes this node's endpoints to the cluster ipcache and withdraws them
//!   ([`ClusterClient::set_local_endpoints`]: the wanted set, diffed by a background task);
//! - registers the node (with `--node-ip`);
//! - stores and deletes policy documents (`policy apply|delete` in cluster mode);
//! - hands the daemon a [`ClusterView`] — every cluster identity, every other node's
//!   endpoint address, every policy document — whenever the store changes
//!   ([`ClusterClient::changes`], coalesced: see [`SYNC_DEBOUNCE`]).
//!
//! Bridging: `membrane-cluster` is async (tokio); the agent's state changes run on blocking
//! threads (API requests on `spawn_blocking`, the directory and FQDN threads, start-up on
//! the main thread). The blocking calls here ([`ClusterClient::allocate`],
//! [`ClusterClient::put_policy`], [`ClusterClient::delete_policy`]) run the future on the
//! agent's runtime with `Handle::block_on` and a bound; they must never be called from a
//! runtime worker, and callers do not hold the state lock across them (the one exception
//! is start-up, before the state is shared: see `State::add_endpoint`). Everything else
//! (the view, the status, releases, publishing) reads memory or spawns, never waits on etcd.
//!
//! While etcd is unreachable: the view keeps the last state the watches saw, so nothing
//! already enforced is loosened; known label sets keep their identities (the allocator's
//! cache); new label sets, policy changes and publications fail or wait with errors naming
//! the store; after the reconnect the crate re-publishes this node's keys and the watches
//! re-list, and the next view removes what went stale meanwhile.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use membrane_agent_api::{
    api::{ClusterNodeRow, ClusterStatus, StoreHealth},
    args::KvstoreKind,
};
use membrane_cluster::{
    AllocError, ClusterPoolConfig, IdentityAllocator, IdentityRange, IpamError, IpcacheEntry,
    IpcacheError, IpcacheSync, Ipv4Cidr, NodeRegistry, PodCidrAllocator, PolicyDocument,
    PolicyFormat, PolicyName, PolicyStore, PolicyStoreError, Store, StoreConfig, StoreError,
    SyncedMap, TlsFiles, keys,
};
use membrane_policy::{Identity, Labels};
use tokio::sync::watch;

use crate::config::AgentConfig;

/// How long the agent waits at start for the first list of each watched prefix
/// (identities, ipcache, nodes, policies) before it reconciles without it.
pub const INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one identity allocation seen from the API: the allocator's own bound is 16
/// attempts of at most one request timeout each; the API client waits 30 s.
pub const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one policy put or delete.
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon lets store events accumulate before it takes one view and
/// reconciles once: a burst (a node with 100 endpoints appearing, a re-list after an
/// outage) costs one reconcile, and an event reaches the maps at most this much later.
pub const SYNC_DEBOUNCE: Duration = Duration::from_millis(20);

/// Underlay address published for this node's endpoints when `--node-ip` is not given.
pub const UNKNOWN_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// What the cluster store failed at.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster store: {0}")]
    Connect(#[source] StoreError),
    #[error("pod CIDR of node `{node}` from the cluster pool: {source}")]
    PodCidr {
        node: String,
        #[source]
        source: IpamError,
    },
    #[error("pod CIDR of node `{node}`: the cluster store did not answer within {ms} ms")]
    PodCidrTimeout { node: String, ms: u128 },
    #[error("--pod-cidr `{cidr}`: {detail}")]
    BadPodCidr { cidr: String, detail: String },
    #[error("registering node `{node}` in the cluster store: {source}")]
    Register {
        node: String,
        #[source]
        source: StoreError,
    },
    #[error("identity of labels `{labels}` from the cluster store: {source}")]
    Allocate {
        labels: String,
        #[source]
        source: AllocError,
    },
    #[error("identity of labels `{labels}`: the cluster store did not answer within {ms} ms")]
    AllocateTimeout { labels: String, ms: u128 },
    #[error("policy {name} in the cluster store: {source}")]
    Policy {
        name: String,
        #[source]
        source: PolicyStoreError,
    },
    #[error("policy {name}: the cluster store did not answer within {ms} ms")]
    PolicyTimeout { name: String, ms: u128 },
    #[error("{input}: document {index}: {detail}")]
    Document {
        input: String,
        index: usize,
        detail: String,
    },
}

/// Another node's endpoint, from the cluster ipcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub identity: Identity,
    /// The underlay address of the node that has it (`None`: it published none).
    pub node_ip: Option<Ipv4Addr>,
}

/// Another node, from the store's `nodes/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteNode {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Option<Ipv4Cidr>,
}

/// The store as the daemon's model needs it, read from the watches' memory.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Every identity of the cluster (the mirror of `id/`).
    pub identities: BTreeMap<Identity, Labels>,
    /// Other nodes' endpoint addresses (IPv4; the datapath has no IPv6).
    pub remote: BTreeMap<Ipv4Addr, RemoteEndpoint>,
    /// Every other node with an IPv4 underlay address.
    pub nodes: Vec<RemoteNode>,
    /// Every policy document, with the revision of its last write.
    pub policies: BTreeMap<PolicyName, (i64, PolicyDocument)>,
}

/// One node's connection to the cluster store and the components on it.
pub struct ClusterClient {
    rt: tokio::runtime::Handle,
    store: Store,
    node: String,
    node_ip: Option<IpAddr>,
    /// This node's pod CIDR (`--pod-cidr`, or a block of the cluster pool).
    pod_cidr: Option<Ipv4Cidr>,
    identities: IdentityAllocator,
    ipcache: IpcacheSync,
    nodes: NodeRegistry,
    policies: PolicyStore,
    documents: SyncedMap<PolicyDocument>,
    registered: AtomicBool,
    /// This node's endpoints as they should be published; the publisher diffs it.
    wanted: watch::Sender<BTreeMap<IpAddr, IpcacheEntry>>,
    published: Arc<AtomicUsize>,
    /// Bumped on every store event the view depends on (and every session change).
    changes: watch::Sender<u64>,
}

/// The store client's configuration from the agent's.
pub fn store_config(config: &AgentConfig) -> StoreConfig {
    let c = &config.cluster;
    let mut sc = StoreConfig::new(c.kvstore_endpoints.clone(), config.node_name());
    sc.cluster = c.cluster_name.clone();
    sc.lease_ttl_secs = c.kvstore_lease_ttl;
    if let Some(ca) = &c.kvstore_ca {
        sc.tls = Some(TlsFiles {
            ca: ca.clone(),
            cert: c.kvstore_cert.clone(),
            key: c.kvstore_key.clone(),
            server_name: None,
        });
    }
    // A node's own keys are re-created every time etcd shows them changed, on every
    // reconnect, and on this interval; the status probe marks an outage within its
    // interval. The defaults (5 min, 5 s) are Cilium's; a short lease asks for more.
    if c.kvstore_lease_ttl < 60 {
        sc.status_interval_ms = 1_000;
        sc.request_timeout_ms = 2_000;
        sc.dial_timeout_ms = 2_000;
    }
    sc
}

impl ClusterClient {
    /// Connects (from the main thread, before the runtime serves anything), starts the
    /// watches, waits (bounded) for their first lists, registers the node and starts the
    /// publisher. `None` without `--kvstore`.
    pub fn start(
        config: &AgentConfig,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Option<Arc<ClusterClient>>, ClusterError> {
        let Some(KvstoreKind::Etcd) = config.cluster.kvstore else {
            return Ok(None);
        };
        let store = rt
            .block_on(Store::connect(store_config(config)))
            .map_err(ClusterError::Connect)?;
        let _context = rt.enter();
        let identities = IdentityAllocator::start(&store, IdentityRange::default());
        let ipcache = IpcacheSync::start(&store);
        let nodes = NodeRegistry::start(&store);
        let policies = PolicyStore::new(&store);
        let documents = policies.watch();
        let synced = rt.block_on(async {
            [
                (
                    "identities",
                    identities.wait_synced(INITIAL_SYNC_TIMEOUT).await,
                ),
                ("ipcache", ipcache.wait_synced(INITIAL_SYNC_TIMEOUT).await),
                ("nodes", nodes.wait_synced(INITIAL_SYNC_TIMEOUT).await),
                (
                    "policies",
                    documents.wait_synced(INITIAL_SYNC_TIMEOUT).await,
                ),
            ]
        });
        for (what, ok) in synced {
            if !ok {
                tracing::warn!(
                    what,
                    "cluster store: first list not in within {INITIAL_SYNC_TIMEOUT:?}; continuing, the watch fills it in"
                );
            }
        }
        let node = config.node_name().to_owned();
        let pod_cidr = match &config.pods.pod_cidr {
            Some(prefix) => {
                let text = prefix.to_string();
                Some(
                    text.parse::<Ipv4Cidr>()
                        .map_err(|e| ClusterError::BadPodCidr {
                            cidr: text.clone(),
                            detail: e.to_string(),
                        })?,
                )
            }
            None if !config.cluster.cluster_pool_ipv4_cidr.is_empty() => {
                Some(pool_block(config, &store, &node, rt)?)
            }
            None => None,
        };
        let client = Arc::new(ClusterClient {
            rt: rt.handle().clone(),
            node: node.clone(),
            node_ip: config.cluster.node_ip,
            pod_cidr,
            identities,
            ipcache,
            nodes,
            policies,
            documents,
            registered: AtomicBool::new(false),
            wanted: watch::Sender::new(BTreeMap::new()),
            published: Arc::new(AtomicUsize::new(0)),
            changes: watch::Sender::new(0),
            store,
        });
        if let Some(ip) = client.node_ip {
            rt.block_on(
                client
                    .nodes
                    .register(ip, client.pod_cidr, config.hubble_address()),
            )
            .map_err(|source| ClusterError::Register {
                node: node.clone(),
                source,
            })?;
            client.registered.store(true, Ordering::Relaxed);
        } else {
            tracing::warn!(
                node = %node,
                "no --node-ip: the node is not registered in the cluster store"
            );
        }
        client.spawn_tasks();
        tracing::info!(
            node = %node,
            cluster = %client.store.cluster(),
            endpoints = %config.cluster.kvstore_endpoints.join(","),
            "cluster store connected"
        );
        Ok(Some(client))
    }

    fn spawn_tasks(&self) {
        // The publisher: hands the wanted endpoints to the ipcache sync, which keeps them
        // (and re-claims them on every reconnect) even when a write fails, and withdraws
        // what went. One task, so publications are ordered.
        let (ipcache, mut wanted, published) = (
            self.ipcache.clone(),
            self.wanted.subscribe(),
            self.published.clone(),
        );
        self.rt.spawn(async move {
            let mut have: BTreeMap<IpAddr, IpcacheEntry> = BTreeMap::new();
            loop {
                let target = wanted.borrow_and_update().clone();
                for (ip, entry) in &target {
                    if have.get(ip) == Some(entry) {
                        continue;
                    }
                    match ipcache.publish(entry.clone()).await {
                        Ok(()) => {}
                        Err(IpcacheError::Store(e)) => {
                            tracing::warn!(%ip, error = %e, "cluster ipcache: publish failed; written again on reconnect")
                        }
                        Err(e) => tracing::error!(%ip, error = %e, "cluster ipcache: not published"),
                    }
                    have.insert(*ip, entry.clone());
                }
                let gone: Vec<IpAddr> = have
                    .keys()
                    .filter(|ip| !target.contains_key(ip))
                    .copied()
                    .collect();
                for ip in gone {
                    if let Err(e) = ipcache.withdraw(ip).await {
                        tracing::warn!(%ip, error = %e, "cluster ipcache: withdrawal failed; done on reconnect");
                    }
                    have.remove(&ip);
                }
                published.store(have.len(), Ordering::Relaxed);
                if wanted.changed().await.is_err() {
                    return;
                }
            }
        });
        // Wake-ups for the daemon's sync: every event of the prefixes the view reads.
        // Events carry nothing the daemon uses (it reads the view), so a lagging receiver
        // loses nothing: a lag is one more wake-up.
        let bump = |changes: &watch::Sender<u64>| changes.send_modify(|g| *g += 1);
        let (mut ids, changes) = (self.identities.subscribe(), self.changes.clone());
        self.rt.spawn(async move {
            while !matches!(
                ids.recv().await,
                Err(tokio::sync::broadcast::error::RecvError::Closed)
            ) {
                bump(&changes);
            }
        });
        let (mut ips, changes, node) = (
            self.ipcache.subscribe(),
            self.changes.clone(),
            self.node.clone(),
        );
        self.rt.spawn(async move {
            loop {
                use membrane_cluster::IpcacheEvent;
                use tokio::sync::broadcast::error::RecvError;
                match ips.recv().await {
                    Ok(IpcacheEvent::Upsert(e)) if e.node == node => {}
                    Ok(IpcacheEvent::Delete { node: n, .. }) if n == node => {}
                    Err(RecvError::Closed) => return,
                    Ok(_) | Err(RecvError::Lagged(_)) => bump(&changes),
                }
            }
        });
        let (mut docs, changes) = (self.documents.subscribe(), self.changes.clone());
        self.rt.spawn(async move {
            while !matches!(
                docs.recv().await,
                Err(tokio::sync::broadcast::error::RecvError::Closed)
            ) {
                bump(&changes);
            }
        });
        let (mut session, changes) = (self.store.subscribe_session(), self.changes.clone());
        self.rt.spawn(async move {
            while session.changed().await.is_ok() {
                bump(&changes);
            }
        });
    }

    /// Notified (coalesced) whenever the view may have changed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// This node's name in the cluster.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's pod CIDR, if it has one.
    pub fn pod_cidr(&self) -> Option<Ipv4Cidr> {
        self.pod_cidr
    }

    /// The cluster's nodes (Hubble's Peer service reads them, `crate::peer`).
    pub fn nodes(&self) -> &NodeRegistry {
        &self.nodes
    }

    /// The cluster's name.
    pub fn cluster_name(&self) -> &str {
        self.store.cluster()
    }

    /// The identity of an endpoint's labels, allocated cluster-wide if new. Blocks the
    /// calling thread (never a runtime worker) for at most [`ALLOCATE_TIMEOUT`]. With etcd
    /// unreachable, labels the cluster already numbered keep their number; new ones fail
    /// with an error naming the store.
    pub fn allocate(&self, labels: &Labels) -> Result<Identity, ClusterError> {
        // The timer is created inside `block_on`, in the runtime's context: a restarting
        // agent restores its endpoints from the main thread, outside any runtime.
        let allocation = async {
            tokio::time::timeout(ALLOCATE_TIMEOUT, self.identities.allocate(labels)).await
        };
        match self.rt.block_on(allocation) {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(source)) => Err(ClusterError::Allocate {
                labels: labels.to_string(),
                source,
            }),
            Err(_) => Err(ClusterError::AllocateTimeout {
                labels: labels.to_string(),
                ms: ALLOCATE_TIMEOUT.as_millis(),
            }),
        }
    }

    /// Drops one reference to the identity of `labels` (an endpoint went). Does not wait:
    /// the release runs on the runtime; a failed one is retried by the allocator's resync.
    pub fn release(&self, labels: Labels) {
        let identities = self.identities.clone();
        self.rt.spawn(async move {
            if let Err(e) = identities.release(&labels).await {
                tracing::warn!(labels = %labels, error = %e, "cluster identity release failed; retried on reconnect");
            }
        });
    }

    /// Sets the endpoints this node publishes (its whole set; what is missing is withdrawn).
    /// Does not wait.
    pub fn set_local_endpoints(&self, endpoints: BTreeMap<IpAddr, IpcacheEntry>) {
        self.wanted.send_if_modified(|w| {
            if *w == endpoints {
                return false;
            }
            *w = endpoints;
            true
        });
    }

    /// The ipcache entry of one of this node's endpoints.
    pub fn local_entry(
        &self,
        ip: IpAddr,
        identity: Identity,
        namespace: &str,
        pod: &str,
    ) -> IpcacheEntry {
        IpcacheEntry {
            ip,
            identity,
            node: self.node.clone(),
            host_ip: self.node_ip.unwrap_or(UNKNOWN_HOST_IP),
            namespace: Some(namespace.to_owned()),
            pod: Some(pod.to_owned()),
        }
    }

    /// What the watches hold now (memory only; no request).
    pub fn view(&self) -> ClusterView {
        let remote = self
            .ipcache
            .snapshot()
            .into_values()
            .filter(|e| e.node != self.node)
            .filter_map(|e| match e.ip {
                IpAddr::V4(v4) => Some((
                    v4,
                    RemoteEndpoint {
                        identity: e.identity,
                        node_ip: match e.host_ip {
                            IpAddr::V4(h) if !h.is_unspecified() => Some(h),
                            _ => None,
                        },
                    },
                )),
                IpAddr::V6(_) => None,
            })
            .collect();
        let nodes = self
            .nodes
            .nodes()
            .into_values()
            .filter(|n| n.name != self.node)
            .filter_map(|n| match n.underlay_ip {
                IpAddr::V4(underlay_ip) => Some(RemoteNode {
                    name: n.name,
                    underlay_ip,
                    pod_cidr: n.pod_cidr,
                }),
                IpAddr::V6(_) => None,
            })
            .collect();
        let policies = self
            .documents
            .snapshot()
            .into_iter()
            .filter_map(|(key, stored)| {
                let name = keys::parse_policy_key(&key).ok()?;
                Some((name, (stored.mod_revision, stored.value)))
            })
            .collect();
        ClusterView {
            identities: self.identities.identities(),
            remote,
            nodes,
            policies,
        }
    }

    /// Stores one policy document; returns the revision of the write. Blocks the calling
    /// thread for at most [`POLICY_TIMEOUT`].
    pub fn put_policy(&self, name: &PolicyName, text: String) -> Result<i64, ClusterError> {
        let put = self
            .policies
            .put(name, text, PolicyFormat::Yaml, &self.node);
        match self.rt.block_on(tokio::time::timeout(POLICY_TIMEOUT, put)) {
            Ok(r) => r.map_err(|source| ClusterError::Policy {
                name: name.to_string(),
                source,
            }),
            Err(_) => Err(ClusterError::PolicyTimeout {
                name: name.to_string(),
                ms: POLICY_TIMEOUT.as_millis(),
            }),
        }
    }

    /// Deletes one policy document; true if it existed. Blocks for at most
    /// [`POLICY_TIMEOUT`].
    pub fn delete_policy(&self, name: &PolicyName) -> Result<bool, ClusterError> {
        let delete = self.policies.delete(name);
        match self
            .rt
            .block_on(tokio::time::timeout(POLICY_TIMEOUT, delete))
        {
            Ok(r) => r.map_err(|source| ClusterError::Policy {
                name: name.to_string(),
                source,
            }),
            Err(_) => Err(ClusterError::PolicyTimeout {
                name: name.to_string(),
                ms: POLICY_TIMEOUT.as_millis(),
            }),
        }
    }

    /// `membrane status`'s cluster block (memory only). `remote_endpoints` and
    /// `policy_errors` come from the daemon's model.
    pub fn status(&self, remote_endpoints: usize, policy_errors: Vec<String>) -> ClusterStatus {
        let s = self.store.status();
        let nodes = self
            .nodes
            .nodes()
            .into_values()
            .map(|n| ClusterNodeRow {
                this_node: n.name == self.node,
                underlay_ip: n.underlay_ip.to_string(),
                pod_cidr: n.pod_cidr.map(|c| c.to_string()),
                name: n.name,
            })
            .collect();
        ClusterStatus {
            cluster: self.store.cluster().to_owned(),
            node: self.node.clone(),
            registered: self.registered.load(Ordering::Relaxed),
            store: StoreHealth {
                kind: "etcd".into(),
                endpoints: s.endpoints,
                connected: s.connected,
                last_error: s.last_error.as_ref().map(|e| e.message.clone()),
                last_error_at_unix_ms: s.last_error.as_ref().map(|e| e.at_unix_ms),
                revision: s.revision,
                lease_ttl_secs: self.store.config().lease_ttl_secs,
                session_generation: s.session_generation,
                bad_values: s.metrics.bad_values,
                ip_conflicts: s.metrics.ip_conflicts,
            },
            nodes,
            identities: self.identities.identities().len(),
            remote_endpoints,
            published_endpoints: self.published.load(Ordering::Relaxed),
            policies: self.documents.with_entries(|m| m.len()).unwrap_or(0),
            policy_errors,
        }
    }

    /// Stops the store's tasks without revoking the leases: this node's keys stay until
    /// the lease expires or a restarted agent takes them over (a restart must not withdraw
    /// its endpoints from every other node's ipcache).
    pub fn halt(&self) {
        self.store.halt();
    }
}

impl crate::daemon::State {
    /// Takes the store's view into the model: cluster identities (so policies resolve
    /// other nodes' endpoints by their labels), other nodes' endpoint addresses, policy
    /// documents. Returns whether anything changed (the caller reconciles). Identities that
    /// left the cluster (collected) leave the model unless a local endpoint still has them.
    pub(crate) fn take_cluster_view(&mut self, view: ClusterView) -> bool {
        let mut changed = false;
        for (id, labels) in &view.identities {
            if self.identities.get(*id) != Some(labels) {
                self.identities.insert(*id, labels.clone());
                changed = true;
            }
        }
        let in_use: std::collections::BTreeSet<Identity> =
            self.endpoints.values().map(|e| e.identity).collect();
        let stale: Vec<Identity> = self
            .identities
            .iter()
            .map(|(id, _)| id)
            .filter(|id| {
                !id.is_reserved()
                    && !id.is_local()
                    && !view.identities.contains_key(id)
                    && !in_use.contains(id)
            })
            .collect();
        for id in stale {
            self.identities.remove(id);
            changed = true;
        }
        if self.remote_ipcache != view.remote {
            self.remote_ipcache = view.remote;
            changed = true;
        }
        if self.remote_nodes != view.nodes {
            self.remote_nodes = view.nodes;
            changed = true;
        }
        changed |= self.take_cluster_policies(view.policies);
        changed
    }
}

/// A block of the cluster pool for `node` (the one it holds, else the first free one).
fn pool_block(
    config: &AgentConfig,
    store: &Store,
    node: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<Ipv4Cidr, ClusterError> {
    let bad = |source| ClusterError::PodCidr {
        node: node.to_owned(),
        source,
    };
    let mut pool = Vec::new();
    for text in &config.cluster.cluster_pool_ipv4_cidr {
        pool.push(
            text.parse::<Ipv4Cidr>()
                .map_err(|e| ClusterError::BadPodCidr {
                    cidr: text.clone(),
                    detail: format!("--cluster-pool-ipv4-cidr: {e}"),
                })?,
        );
    }
    let allocator = PodCidrAllocator::new(
        store,
        ClusterPoolConfig {
            pod_cidr_list: pool,
            mask_size: config.cluster.cluster_pool_ipv4_mask_size,
        },
    )
    .map_err(bad)?;
    let block = rt
        .block_on(tokio::time::timeout(
            POLICY_TIMEOUT,
            allocator.allocate(node),
        ))
        .map_err(|_| ClusterError::PodCidrTimeout {
            node: node.to_owned(),
            ms: POLICY_TIMEOUT.as_millis(),
        })?
        .map_err(bad)?;
    tracing::info!(node, %block, "pod CIDR from the cluster pool");
    Ok(block)
}

/// One document of a policy text, as stored: its name and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    pub name: PolicyName,
    pub text: String,
}

/// Splits a policy text (already validated whole) into one document per policy or
/// `WasmFilter`, each re-rendered as YAML and named by what it holds, as the store keeps
/// them (`policies/v1/<kind>/<namespace>/<name>`).
pub fn split_for_store(text: &str, source: &str) -> Result<Vec<StoredDocument>, ClusterError> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let bad = |detail: String| ClusterError::Document {
            input: source.to_owned(),
            index,
            detail,
        };
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| bad(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let text = serde_yaml_ng::to_string(&value).map_err(|e| bad(e.to_string()))?;
        let (policies, filters) =
            crate::policies::parse_all(&text, source).map_err(|e| bad(e.to_string()))?;
        let mut names: Vec<PolicyName> = policies
            .iter()
            .map(|p| PolicyName::from(&p.policy_ref()))
            .collect();
        names.extend(filters.iter().map(|f| PolicyName {
            kind: membrane_agent_api::wasm_resource::KIND.to_owned(),
            namespace: Some(f.namespace.clone()),
            name: f.name.clone(),
        }));
        match names.as_slice() {
            [name] => out.push(StoredDocument {
                name: name.clone(),
                text,
            }),
            other => {
                return Err(bad(format!(
                    "holds {} policies; the cluster store keeps one per document",
                    other.len()
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_splits_into_one_named_document_per_policy() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: b}
spec:
  endpointSelector: {}
  egress: [{toEntities: [world]}]
---
"#;
        let docs = split_for_store(text, "t.yaml").expect("splits");
        let names: Vec<String> = docs.iter().map(|d| d.name.to_string()).collect();
        assert_eq!(
            names,
            [
                "CiliumNetworkPolicy prod/a",
                "CiliumClusterwideNetworkPolicy b"
            ]
        );
        for d in &docs {
            let (policies, _) =
                crate::policies::parse_all(&d.text, "stored").expect("a stored text parses");
            assert_eq!(policies.len(), 1);
            assert_eq!(PolicyName::from(&policies[0].policy_ref()), d.name);
            assert!(keys::policy_key(&d.name).is_some());
        }
    }
}
