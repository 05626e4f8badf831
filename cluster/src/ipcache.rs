//! The cluster-wide ipcache: every node publishes its endpoints' addresses (IP → identity,
//! its underlay IP, namespace, pod) under its session lease and mirrors everyone's entries
//! (reference `cluster.md` §1.3).
//!
//! - A dead node's entries go when its lease expires; the watchers report them as deletes.
//! - An own entry that someone deletes (or overwrites, or corrupts) is written again as soon
//!   as the watch shows it (Cilium's self-deletion protection), on every session change and
//!   every sync interval.
//! - An IP is claimed with a create-only transaction. An IP another node already holds is
//!   refused with [`IpcacheError::Conflict`] naming both nodes, counted (`ip_conflicts`) and
//!   listed in [`IpcacheSync::conflicts`]; the older claim (the key's creator) is kept. The
//!   refused entry stays wanted: when the other node's claim goes (withdrawn, lease
//!   expired), this node's is written.
//!
//! The agent writes [`IpcacheSync::snapshot`] into its ipcache map once synced, then applies
//! [`IpcacheSync::subscribe`]'s events (entries of its own node included; it skips them).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::error::IpcacheError;
use crate::keys::{self, IpcacheEntry, StoreValue};
use crate::store::{Metrics, Store, now_unix_ms};
use crate::watch::{EVENT_CHANNEL_CAPACITY, MapEvent, SyncedMap};

/// Conflicts kept for [`IpcacheSync::conflicts`] (the most recent).
pub const MAX_CONFLICTS_KEPT: usize = 64;
/// Attempts of one claim when the key keeps changing under it.
pub const MAX_CLAIM_ATTEMPTS: u32 = 4;
/// Queue of own IPs to re-publish after the watch showed them changed; when full, the
/// periodic resync catches up.
const REPUBLISH_QUEUE: usize = 1024;

/// A change of the cluster's ipcache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpcacheEvent {
    /// An entry appeared or changed.
    Upsert(IpcacheEntry),
    /// An entry went (withdrawn, its node's lease expired, or found gone on resync).
    Delete {
        /// The address.
        ip: IpAddr,
        /// The node that held it.
        node: String,
    },
}

/// An IP claimed by two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConflict {
    /// The address.
    pub ip: IpAddr,
    /// The node whose (older) claim is kept.
    pub owner: String,
    /// The node whose claim is refused or was overwritten back.
    pub claimant: String,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone)]
struct Own {
    entry: IpcacheEntry,
    /// Revision at which this node created the key, to tell its claim from a later one.
    created: Option<i64>,
}

struct Shared {
    store: Store,
    own: Arc<Mutex<BTreeMap<IpAddr, Own>>>,
    conflicts: Mutex<VecDeque<IpConflict>>,
}

/// One node's side of the cluster ipcache.
#[derive(Clone)]
pub struct IpcacheSync {
    shared: Arc<Shared>,
    map: SyncedMap<IpcacheEntry>,
    events: broadcast::Sender<IpcacheEvent>,
}

impl IpcacheSync {
    /// Starts mirroring `ip/v1/<cluster>/` and the re-publication of own entries.
    pub fn start(store: &Store) -> IpcacheSync {
        let own: Arc<Mutex<BTreeMap<IpAddr, Own>>> = Arc::default();
        let events = broadcast::Sender::new(EVENT_CHANNEL_CAPACITY);
        let (republish_tx, republish_rx) = mpsc::channel::<IpAddr>(REPUBLISH_QUEUE);
        let node = store.node().to_owned();
        let hook = {
            let own = own.clone();
            let events = events.clone();
            Arc::new(move |ev: &MapEvent<IpcacheEntry>| {
                let mine = |ip: &IpAddr| own.lock().is_ok_and(|o| o.contains_key(ip));
                match ev {
                    MapEvent::Upsert { entry, .. } => {
                        let e = &entry.value;
                        if e.node != node && mine(&e.ip) {
                            let _ = republish_tx.try_send(e.ip);
                        }
                        let _ = events.send(IpcacheEvent::Upsert(e.clone()));
                    }
                    MapEvent::Delete { prev, .. } => {
                        if mine(&prev.ip) {
                            let _ = republish_tx.try_send(prev.ip);
                        }
                        let _ = events.send(IpcacheEvent::Delete {
                            ip: prev.ip,
                            node: prev.node.clone(),
                        });
                    }
                    MapEvent::Invalid { key, .. } => {
                        if let Ok(ip) = keys::parse_ip_key(key)
                            && mine(&ip)
                        {
                            let _ = republish_tx.try_send(ip);
                        }
                    }
                }
            })
        };
        let map = SyncedMap::start(store, keys::ip_prefix(store.cluster()), Some(hook));
        let shared = Arc::new(Shared {
            store: store.clone(),
            own,
            conflicts: Mutex::new(VecDeque::new()),
        });
        let s = shared.clone();
        store.spawn(async move { s.republish_loop(republish_rx).await });
        IpcacheSync {
            shared,
            map,
            events,
        }
    }

    /// Waits until the first list is in (true) or `timeout` passes.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.map.wait_synced(timeout).await
    }

    /// Publishes (or updates) an endpoint of this node.
    pub async fn publish(&self, entry: IpcacheEntry) -> Result<(), IpcacheError> {
        let node = self.shared.store.node();
        if entry.node != node {
            return Err(IpcacheError::ForeignEntry {
                ip: entry.ip,
                entry_node: entry.node,
                node: node.to_owned(),
            });
        }
        let ip = entry.ip;
        if let Ok(mut own) = self.shared.own.lock() {
            let created = own.get(&ip).and_then(|o| o.created);
            own.insert(
                ip,
                Own {
                    entry: entry.clone(),
                    created,
                },
            );
        }
        self.shared.claim(ip).await
    }

    /// Withdraws an endpoint of this node; true if its key was deleted.
    pub async fn withdraw(&self, ip: IpAddr) -> Result<bool, IpcacheError> {
        let Some(own) = self.shared.own.lock().ok().and_then(|mut o| o.remove(&ip)) else {
            return Ok(false);
        };
        let key = keys::ip_key(self.shared.store.cluster(), ip);
        // Only our own claim: never delete another node's entry for the address.
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                own.entry.encode(),
            )])
            .and_then([TxnOp::delete(key.clone(), None)]);
        let resp = self.shared.store.inner().txn(&key, txn).await?;
        Ok(resp.succeeded())
    }

    /// Every entry of the cluster (this node's included), by address.
    pub fn snapshot(&self) -> BTreeMap<IpAddr, IpcacheEntry> {
        self.map
            .with_entries(|m| m.values().map(|s| (s.value.ip, s.value.clone())).collect())
            .unwrap_or_default()
    }

    /// The entry of `ip`, if any.
    pub fn get(&self, ip: IpAddr) -> Option<IpcacheEntry> {
        self.map
            .get(&keys::ip_key(self.shared.store.cluster(), ip))
            .map(|s| s.value)
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<IpcacheEvent> {
        self.events.subscribe()
    }

    /// Recent conflicts (at most [`MAX_CONFLICTS_KEPT`]).
    pub fn conflicts(&self) -> Vec<IpConflict> {
        self.shared
            .conflicts
            .lock()
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Re-publishes every own entry now; returns how many are in place.
    pub async fn resync(&self) -> usize {
        self.shared.claim_all().await
    }
}

impl Shared {
    fn conflict(&self, ip: IpAddr, owner: &str, claimant: &str) {
        tracing::warn!(%ip, owner, claimant, "cluster store: IP claimed by two nodes");
        Metrics::inc(&self.store.inner().metrics.ip_conflicts);
        if let Ok(mut c) = self.conflicts.lock() {
            if c.len() == MAX_CONFLICTS_KEPT {
                c.pop_front();
            }
            c.push_back(IpConflict {
                ip,
                owner: owner.to_owned(),
                claimant: claimant.to_owned(),
                at_unix_ms: now_unix_ms(),
            });
        }
    }

    fn set_created(&self, ip: IpAddr, rev: i64) {
        if let Ok(mut own) = self.own.lock()
            && let Some(o) = own.get_mut(&ip)
        {
            o.created = Some(rev);
        }
    }

    /// Writes the wanted entry of `ip` unless another node holds the address.
    async fn claim(&self, ip: IpAddr) -> Result<(), IpcacheError> {
        let inner = self.store.inner();
        let node = inner.node().to_owned();
        let key = keys::ip_key(&inner.config.cluster, ip);
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let Some(own) = self.own.lock().ok().and_then(|o| o.get(&ip).cloned()) else {
                return Ok(()); // withdrawn meanwhile
            };
            let value = own.entry.encode();
            let lease = inner.session_lease(&key)?;
            let put = || {
                TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = inner.txn(&key, txn).await?;
            if resp.succeeded() {
                if let Some(rev) = resp.header().map(|h| h.revision()) {
                    self.set_created(ip, rev);
                }
                Metrics::inc(&inner.metrics.republished);
                return Ok(());
            }
            let Some(kv) = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            }) else {
                continue; // deleted meanwhile: create again
            };
            let overwrite = match IpcacheEntry::decode(&key, kv.value()) {
                Ok(existing) if existing.node == node => {
                    if kv.value() == value.as_slice() && kv.lease() == lease {
                        self.set_created(ip, kv.create_revision());
                        return Ok(());
                    }
                    true
                }
                Ok(existing) => {
                    if own.created == Some(kv.create_revision()) {
                        // We created the key; the other node wrote over it: ours is the
                        // older claim, put it back.
                        self.conflict(ip, &node, &existing.node);
                        true
                    } else {
                        self.conflict(ip, &existing.node, &node);
                        return Err(IpcacheError::Conflict {
                            ip,
                            owner: existing.node,
                            claimant: node,
                        });
                    }
                }
                Err(e) => {
                    // A value nobody can read is no claim.
                    inner.metrics.bad_value(&e);
                    true
                }
            };
            if overwrite {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([put()]);
                if inner.txn(&key, txn).await?.succeeded() {
                    self.set_created(ip, kv.create_revision());
                    Metrics::inc(&inner.metrics.republished);
                    return Ok(());
                }
            }
        }
        Err(IpcacheError::Contended {
            ip,
            attempts: MAX_CLAIM_ATTEMPTS,
        })
    }

    async fn claim_all(&self) -> usize {
        let ips: Vec<IpAddr> = self
            .own
            .lock()
            .map(|o| o.keys().copied().collect())
            .unwrap_or_default();
        let mut ok = 0;
        for ip in ips {
            match self.claim(ip).await {
                Ok(()) => ok += 1,
                Err(e) => tracing::debug!(error = %e, "cluster store: ipcache resync"),
            }
        }
        ok
    }

    async fn republish_loop(self: Arc<Self>, mut rx: mpsc::Receiver<IpAddr>) {
        let mut session = self.store.subscribe_session();
        let mut seen = session.borrow().generation;
        let mut tick = tokio::time::interval(self.store.config().sync_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                ip = rx.recv() => {
                    let Some(ip) = ip else { return };
                    if let Err(e) = self.claim(ip).await {
                        tracing::debug!(error = %e, "cluster store: ipcache re-publish");
                    }
                }
                r = session.changed() => {
                    if r.is_err() { return; }
                    let s = *session.borrow();
                    if s.generation != seen && s.lease.is_some() {
                        seen = s.generation;
                        self.claim_all().await;
                    }
                }
                _ = tick.tick() => {
                    self.claim_all().await;
                }
            }
        }
    }
}
