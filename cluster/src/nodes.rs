//! Node registration and discovery: each node writes its [`NodeInfo`] (name, underlay IP,
//! pod CIDR, Hubble address) under its session lease at `nodes/v1/<cluster>/<node>` and
//! mirrors everyone's (reference `cluster.md` §3.1). A dead node's registration goes with
//! its lease; an own registration that someone deletes is written again at once, and on
//! every session change and sync interval.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use crate::error::StoreError;
use crate::ipam::Ipv4Cidr;
use crate::keys::{self, NodeInfo, StoreValue};
use crate::store::{Metrics, Store};
use crate::watch::{EVENT_CHANNEL_CAPACITY, MapEvent, SyncedMap};

/// A change of the cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node registered or changed.
    Upsert(NodeInfo),
    /// A node went (deregistered or its lease expired).
    Delete(NodeInfo),
}

struct Shared {
    store: Store,
    own: Arc<Mutex<Option<NodeInfo>>>,
}

/// Node registration of this node, and the cluster's nodes.
#[derive(Clone)]
pub struct NodeRegistry {
    shared: Arc<Shared>,
    map: SyncedMap<NodeInfo>,
    events: broadcast::Sender<NodeEvent>,
}

impl NodeRegistry {
    /// Starts mirroring `nodes/v1/<cluster>/` and the re-publication of the own key.
    pub fn start(store: &Store) -> NodeRegistry {
        let own: Arc<Mutex<Option<NodeInfo>>> = Arc::default();
        let events = broadcast::Sender::new(EVENT_CHANNEL_CAPACITY);
        let (republish_tx, republish_rx) = mpsc::channel::<()>(1);
        let own_key = keys::node_key(store.cluster(), store.node());
        let hook = {
            let events = events.clone();
            let own = own.clone();
            Arc::new(move |ev: &MapEvent<NodeInfo>| {
                let registered = || own.lock().is_ok_and(|o| o.is_some());
                match ev {
                    MapEvent::Upsert { key, entry, .. } => {
                        if *key == own_key
                            && own.lock().is_ok_and(|o| o.as_ref() != Some(&entry.value))
                            && registered()
                        {
                            let _ = republish_tx.try_send(());
                        }
                        let _ = events.send(NodeEvent::Upsert(entry.value.clone()));
                    }
                    MapEvent::Delete { key, prev } => {
                        if *key == own_key && registered() {
                            let _ = republish_tx.try_send(());
                        }
                        let _ = events.send(NodeEvent::Delete(prev.clone()));
                    }
                    MapEvent::Invalid { key, .. } => {
                        if *key == own_key && registered() {
                            let _ = republish_tx.try_send(());
                        }
                    }
                }
            })
        };
        let map = SyncedMap::start(store, keys::nodes_prefix(store.cluster()), Some(hook));
        let shared = Arc::new(Shared {
            store: store.clone(),
            own,
        });
        let s = shared.clone();
        store.spawn(async move { s.republish_loop(republish_rx).await });
        NodeRegistry {
            shared,
            map,
            events,
        }
    }

    /// Waits until the first list is in (true) or `timeout` passes.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.map.wait_synced(timeout).await
    }

    /// Registers (or updates) this node.
    pub async fn register(
        &self,
        underlay_ip: IpAddr,
        pod_cidr: Option<Ipv4Cidr>,
        hubble_address: Option<SocketAddr>,
    ) -> Result<NodeInfo, StoreError> {
        let info = NodeInfo {
            name: self.shared.store.node().to_owned(),
            cluster: self.shared.store.cluster().to_owned(),
            underlay_ip,
            pod_cidr,
            hubble_address,
        };
        if let Ok(mut own) = self.shared.own.lock() {
            *own = Some(info.clone());
        }
        self.shared.write().await?;
        Ok(info)
    }

    /// Removes this node's registration.
    pub async fn deregister(&self) -> Result<bool, StoreError> {
        if let Ok(mut own) = self.shared.own.lock() {
            *own = None;
        }
        let key = keys::node_key(self.shared.store.cluster(), self.shared.store.node());
        self.shared.store.inner().delete(&key).await
    }

    /// Every registered node, by name.
    pub fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        self.map
            .with_entries(|m| {
                m.values()
                    .map(|s| (s.value.name.clone(), s.value.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }
}

impl Shared {
    async fn write(&self) -> Result<(), StoreError> {
        let Some(info) = self.own.lock().ok().and_then(|o| o.clone()) else {
            return Ok(());
        };
        let key = keys::node_key(&info.cluster, &info.name);
        self.store.inner().put(&key, info.encode(), true).await?;
        Metrics::inc(&self.store.inner().metrics.republished);
        Ok(())
    }

    async fn republish_loop(self: Arc<Self>, mut rx: mpsc::Receiver<()>) {
        let mut session = self.store.subscribe_session();
        let mut seen = session.borrow().generation;
        let mut tick = tokio::time::interval(self.store.config().sync_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                r = rx.recv() => { if r.is_none() { return; } }
                r = session.changed() => {
                    if r.is_err() { return; }
                    let s = *session.borrow();
                    if s.generation == seen || s.lease.is_none() { continue; }
                    seen = s.generation;
                }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.write().await {
                tracing::debug!(error = %e, "cluster store: node registration re-publish");
            }
        }
    }
}
