//! Cluster-wide identity allocation with Cilium's kvstore protocol (reference `cluster.md`
//! §1.2): the same labels get the same number on every node.
//!
//! Allocation of a label set not yet used on this node:
//! 1. take the distributed lock `locks/<labels>` (held under the node's short lock lease);
//! 2. list `value/<labels>/`: if any node references an ID, reuse it — write our leased
//!    reference in a transaction that checks the master key `id/<ID>` still holds exactly
//!    these labels;
//! 3. else reuse an unreferenced master key with these labels from the local cache (same
//!    check);
//! 4. else pick a free ID of the cluster range (a start point hashed from the labels and
//!    the attempt, then the first ID free in the local cache) and create the master key and
//!    our reference in one transaction that requires `create_revision(id/<ID>) == 0`;
//! 5. on a lost race release the lock, back off and retry, at most [`MAX_ALLOC_ATTEMPTS`].
//!
//! When the local cache already knows a master key with these labels (another node
//! allocated them), steps 1–2 shrink to the one guarded transaction of step 3, without the
//! lock. Later allocations of the same labels on this node only count references locally. The
//! last release deletes this node's reference; the master key stays for the garbage
//! collector ([`crate::operator`]). The local cache of master keys is a list+watch of
//! `id/`. Own references are re-written on every session change (new lease, reconnect) and
//! every sync interval, with their master key re-created if it went missing (Cilium's
//! "Re-created missing master/slave key").
//!
//! Reserved label sets give their reserved IDs without the store; CIDR, `fqdn:` and
//! `cidrgroup:` label sets are refused ([`AllocError::LocalScope`]): they stay node-local.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use membrane_policy::identity::reserved_identity_for;
use membrane_policy::{Identity, Labels};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::error::{AllocError, StoreError};
use crate::keys::{self, IdentityLabels, IdentityRef, LabelsKey, StoreValue};
use crate::store::{Metrics, Store};
use crate::watch::{EVENT_CHANNEL_CAPACITY, MapEvent, SyncedMap};

/// Attempts per allocation before [`AllocError::Contended`] (Cilium's
/// `defaultMaxAllocAttempts`).
pub const MAX_ALLOC_ATTEMPTS: u32 = 16;
/// First backoff after a lost race, ms; doubles per attempt up to [`ALLOC_BACKOFF_MAX_MS`].
pub const ALLOC_BACKOFF_BASE_MS: u64 = 2;
/// Longest backoff between allocation attempts, ms.
pub const ALLOC_BACKOFF_MAX_MS: u64 = 200;

/// The numeric range this cluster allocates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdentityRange {
    /// First ID.
    pub first: u32,
    /// Last ID (inclusive).
    pub last: u32,
}

impl Default for IdentityRange {
    /// Cluster 0's range: 256..=65535 (the policy crate's constants).
    fn default() -> Self {
        IdentityRange {
            first: Identity::FIRST_CLUSTER,
            last: Identity::LAST_CLUSTER,
        }
    }
}

impl IdentityRange {
    /// True if `id` is inside.
    pub fn contains(&self, id: Identity) -> bool {
        (self.first..=self.last).contains(&id.get())
    }
}

/// A change of the cluster's identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityEvent {
    /// An identity appeared (or its labels changed).
    Upsert {
        /// The identity.
        id: Identity,
        /// Its labels.
        labels: Labels,
    },
    /// An identity was garbage-collected.
    Delete {
        /// The identity.
        id: Identity,
    },
}

#[derive(Debug, Default)]
struct Cache {
    by_id: HashMap<Identity, Labels>,
    by_labels: HashMap<Labels, Identity>,
}

impl Cache {
    fn insert(&mut self, id: Identity, labels: Labels) {
        if let Some(old) = self.by_id.insert(id, labels.clone())
            && old != labels
            && self.by_labels.get(&old) == Some(&id)
        {
            self.by_labels.remove(&old);
        }
        self.by_labels.insert(labels, id);
    }

    fn remove(&mut self, id: Identity) {
        if let Some(old) = self.by_id.remove(&id)
            && self.by_labels.get(&old) == Some(&id)
        {
            self.by_labels.remove(&old);
        }
    }
}

#[derive(Debug, Clone)]
struct LocalRef {
    id: Identity,
    key: LabelsKey,
    refs: u64,
}

struct Shared {
    store: Store,
    range: IdentityRange,
    cache: Arc<RwLock<Cache>>,
    local: Mutex<HashMap<Labels, LocalRef>>,
    /// Serializes allocate/release/resync of one label set on this node.
    gates: Mutex<HashMap<Labels, Arc<tokio::sync::Mutex<()>>>>,
    /// References whose delete failed; retried on every resync.
    pending_release: Mutex<BTreeSet<String>>,
}

/// The cluster-wide identity allocator of one node.
#[derive(Clone)]
pub struct IdentityAllocator {
    shared: Arc<Shared>,
    map: SyncedMap<IdentityLabels>,
    events: broadcast::Sender<IdentityEvent>,
}

impl IdentityAllocator {
    /// Starts the cache (list+watch of `id/`) and the resync of own references.
    pub fn start(store: &Store, range: IdentityRange) -> IdentityAllocator {
        let cache = Arc::new(RwLock::new(Cache::default()));
        let events = broadcast::Sender::new(EVENT_CHANNEL_CAPACITY);
        let hook = {
            let cache = cache.clone();
            let events = events.clone();
            Arc::new(move |ev: &MapEvent<IdentityLabels>| {
                let out = match ev {
                    MapEvent::Upsert { key, entry, .. } => {
                        let Ok(id) = keys::parse_identity_id_key(key) else {
                            return;
                        };
                        if let Ok(mut c) = cache.write() {
                            c.insert(id, entry.value.0.clone());
                        }
                        IdentityEvent::Upsert {
                            id,
                            labels: entry.value.0.clone(),
                        }
                    }
                    MapEvent::Delete { key, .. } => {
                        let Ok(id) = keys::parse_identity_id_key(key) else {
                            return;
                        };
                        if let Ok(mut c) = cache.write() {
                            c.remove(id);
                        }
                        IdentityEvent::Delete { id }
                    }
                    MapEvent::Invalid { .. } => return,
                };
                let _ = events.send(out);
            })
        };
        let map = SyncedMap::start(store, keys::IDENTITY_ID_PREFIX.to_owned(), Some(hook));
        let shared = Arc::new(Shared {
            store: store.clone(),
            range,
            cache,
            local: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            pending_release: Mutex::new(BTreeSet::new()),
        });
        let s = shared.clone();
        store.spawn(async move { s.resync_loop().await });
        IdentityAllocator {
            shared,
            map,
            events,
        }
    }

    /// Waits until the first list of `id/` is in (true) or `timeout` passes.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        self.map.wait_synced(timeout).await
    }

    /// The identity of `labels`, allocating it cluster-wide if new; takes a local reference.
    pub async fn allocate(&self, labels: &Labels) -> Result<Identity, AllocError> {
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        if let Some(id) = reserved_identity_for(labels) {
            return Ok(id);
        }
        if labels.is_local_scope() {
            return Err(AllocError::LocalScope {
                labels: labels.to_string(),
            });
        }
        let lk = LabelsKey::encode(labels)?;
        if let Some(id) = self.shared.take_local_ref(labels) {
            return Ok(id);
        }
        let gate = self.shared.gate(labels);
        let _held = gate.lock().await;
        if let Some(id) = self.shared.take_local_ref(labels) {
            return Ok(id);
        }
        let id = self.shared.allocate_in_store(labels, &lk).await?;
        if let Ok(mut local) = self.shared.local.lock() {
            local.insert(
                labels.clone(),
                LocalRef {
                    id,
                    key: lk,
                    refs: 1,
                },
            );
        }
        Ok(id)
    }

    /// Drops one local reference; on the last one deletes this node's reference key.
    /// Returns true if the node no longer references the identity.
    pub async fn release(&self, labels: &Labels) -> Result<bool, AllocError> {
        let gate = self.shared.gate(labels);
        let _held = gate.lock().await;
        let last = {
            let Ok(mut local) = self.shared.local.lock() else {
                return Ok(false);
            };
            let Some(r) = local.get_mut(labels) else {
                return Ok(false);
            };
            r.refs -= 1;
            if r.refs > 0 {
                return Ok(false);
            }
            local.remove(labels)
        };
        let Some(r) = last else { return Ok(false) };
        let key = keys::identity_value_key(&r.key, self.shared.store.node());
        if let Err(e) = self.shared.store.inner().delete(&key).await {
            if let Ok(mut p) = self.shared.pending_release.lock() {
                p.insert(key);
            }
            return Err(e.into());
        }
        Ok(true)
    }

    /// The identity of `labels` in the cluster, if known (local cache; no store access).
    pub fn lookup(&self, labels: &Labels) -> Option<Identity> {
        if let Some(id) = reserved_identity_for(labels) {
            return Some(id);
        }
        self.shared
            .cache
            .read()
            .ok()?
            .by_labels
            .get(labels)
            .copied()
    }

    /// The labels of `id`, if known (local cache).
    pub fn labels_of(&self, id: Identity) -> Option<Labels> {
        if let Some(l) = membrane_policy::identity::reserved_labels(id) {
            return Some(l);
        }
        self.shared.cache.read().ok()?.by_id.get(&id).cloned()
    }

    /// Every identity of the cluster (local cache).
    pub fn identities(&self) -> BTreeMap<Identity, Labels> {
        self.shared
            .cache
            .read()
            .map(|c| c.by_id.iter().map(|(i, l)| (*i, l.clone())).collect())
            .unwrap_or_default()
    }

    /// The identities this node references, with their local reference counts.
    pub fn local_references(&self) -> BTreeMap<Identity, (Labels, u64)> {
        self.shared
            .local
            .lock()
            .map(|m| m.iter().map(|(l, r)| (r.id, (l.clone(), r.refs))).collect())
            .unwrap_or_default()
    }

    /// Identity changes from now on (bounded; a lagging receiver re-reads
    /// [`Self::identities`]).
    pub fn subscribe(&self) -> broadcast::Receiver<IdentityEvent> {
        self.events.subscribe()
    }

    /// Re-writes this node's references now (what the resync loop does on reconnect).
    pub async fn resync(&self) -> Result<usize, StoreError> {
        self.shared.resync_all().await
    }
}

fn txn_get_first(resp: &TxnResponse) -> Option<etcd_client::KeyValue> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

enum Reference {
    /// Our reference is written.
    Written,
    /// The master key is missing.
    MasterMissing,
    /// The master key holds other labels.
    OtherLabels(String),
}

impl Shared {
    fn take_local_ref(&self, labels: &Labels) -> Option<Identity> {
        let mut local = self.local.lock().ok()?;
        let r = local.get_mut(labels)?;
        r.refs += 1;
        Some(r.id)
    }

    fn gate(&self, labels: &Labels) -> Arc<tokio::sync::Mutex<()>> {
        match self.gates.lock() {
            Ok(mut g) => {
                // Drop gates nobody holds, so the map does not grow with every label set
                // ever seen.
                if g.len() > 1024 {
                    g.retain(|_, m| Arc::strong_count(m) > 1);
                }
                g.entry(labels.clone()).or_default().clone()
            }
            Err(_) => Arc::default(),
        }
    }

    fn pick_free(&self, lk: &LabelsKey, attempt: u32) -> Result<Identity, AllocError> {
        let size = u64::from(self.range.last - self.range.first) + 1;
        let mut h = DefaultHasher::new();
        lk.as_str().hash(&mut h);
        attempt.hash(&mut h);
        let start = h.finish() % size;
        let cache = self.cache.read().map_err(|_| AllocError::Exhausted {
            first: self.range.first,
            last: self.range.last,
        })?;
        (0..size)
            .map(|i| {
                // In range: `(start + i) % size < size` and `first + size - 1 == last`.
                Identity(self.range.first + u32::try_from((start + i) % size).unwrap_or(0))
            })
            .find(|id| !cache.by_id.contains_key(id))
            .ok_or(AllocError::Exhausted {
                first: self.range.first,
                last: self.range.last,
            })
    }

    /// Writes our reference to `id` if its master key holds `lk`.
    async fn reference(&self, id: Identity, lk: &LabelsKey) -> Result<Reference, StoreError> {
        let inner = self.store.inner();
        let id_key = keys::identity_id_key(id);
        let value_key = keys::identity_value_key(lk, inner.node());
        let lease = inner.session_lease(&value_key)?;
        let txn = Txn::new()
            .when([Compare::value(
                id_key.clone(),
                CompareOp::Equal,
                lk.as_str(),
            )])
            .and_then([TxnOp::put(
                value_key.clone(),
                IdentityRef(id).encode(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(id_key.clone(), None)]);
        let resp = inner.txn(&value_key, txn).await?;
        if resp.succeeded() {
            return Ok(Reference::Written);
        }
        Ok(match txn_get_first(&resp) {
            None => Reference::MasterMissing,
            Some(kv) => Reference::OtherLabels(String::from_utf8_lossy(kv.value()).into_owned()),
        })
    }

    /// Creates the master key of `id` for `lk` and our reference, only if `id` is free.
    async fn create(
        &self,
        id: Identity,
        lk: &LabelsKey,
    ) -> Result<Option<etcd_client::KeyValue>, StoreError> {
        let inner = self.store.inner();
        let id_key = keys::identity_id_key(id);
        let value_key = keys::identity_value_key(lk, inner.node());
        let lease = inner.session_lease(&value_key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                id_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(id_key.clone(), lk.as_str(), None),
                TxnOp::put(
                    value_key,
                    IdentityRef(id).encode(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ])
            .or_else([TxnOp::get(id_key.clone(), None)]);
        let resp = inner.txn(&id_key, txn).await?;
        if resp.succeeded() {
            return Ok(None);
        }
        Ok(txn_get_first(&resp))
    }

    async fn allocate_in_store(
        &self,
        labels: &Labels,
        lk: &LabelsKey,
    ) -> Result<Identity, AllocError> {
        let inner = self.store.inner();
        // Fast path, no lock: the cache knows a master key with these labels. Referencing it
        // is one transaction that checks the master still holds exactly these labels, so it
        // cannot race the garbage collector (whose delete requires no reference) nor create
        // a second number for the labels. Anything else goes the locked way.
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.by_labels.get(labels).copied());
        if let Some(id) = cached
            && matches!(self.reference(id, lk).await?, Reference::Written)
        {
            return Ok(id);
        }
        let lock_name = keys::identity_lock_key(lk);
        for attempt in 0..MAX_ALLOC_ATTEMPTS {
            if attempt > 0 {
                Metrics::inc(&inner.metrics.identity_alloc_retries);
                let ms = (ALLOC_BACKOFF_BASE_MS << attempt.min(16)).min(ALLOC_BACKOFF_MAX_MS);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let guard = match inner.lock(&lock_name).await {
                Ok(g) => g,
                Err(StoreError::Timeout { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let r = self.allocate_locked(labels, lk, attempt).await;
            // Unlock before returning: a node waiting for this lock is woken by etcd's watch
            // of the lock key, and a waiter that starts after the release never waits (an
            // unlock left to a background task made other nodes' allocations of the same
            // labels wait for etcd's 100 ms sync of lagging watchers: p99 80 ms).
            inner.unlock(guard).await;
            match r {
                Ok(Some(id)) => {
                    if let Ok(mut c) = self.cache.write() {
                        c.insert(id, labels.clone());
                    }
                    return Ok(id);
                }
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(AllocError::Contended {
            labels: labels.to_string(),
            attempts: MAX_ALLOC_ATTEMPTS,
        })
    }

    /// One attempt under the lock; `None` = lost a race, retry.
    async fn allocate_locked(
        &self,
        labels: &Labels,
        lk: &LabelsKey,
        attempt: u32,
    ) -> Result<Option<Identity>, AllocError> {
        let inner = self.store.inner();
        let (refs, _) = inner
            .get_prefix(&keys::identity_value_prefix(lk), false)
            .await?;
        let mut candidates: Vec<Identity> = Vec::new();
        for kv in &refs {
            let decoded = keys::key_str(kv.key()).and_then(|k| IdentityRef::decode(k, kv.value()));
            match decoded {
                Ok(IdentityRef(id)) if !candidates.contains(&id) => candidates.push(id),
                Ok(_) => {}
                Err(e) => inner.metrics.bad_value(&e),
            }
        }
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.by_labels.get(labels).copied());
        if let Some(id) = cached
            && !candidates.contains(&id)
        {
            candidates.push(id);
        }
        for id in candidates {
            match self.reference(id, lk).await? {
                Reference::Written => return Ok(Some(id)),
                Reference::MasterMissing => {
                    // References without a master (it was deleted by hand, or etcd lost
                    // it): re-create it for these labels.
                    if self.create(id, lk).await?.is_none() {
                        return Ok(Some(id));
                    }
                }
                Reference::OtherLabels(stored) => {
                    tracing::warn!(
                        id = id.get(),
                        stored = %stored,
                        wanted = lk.as_str(),
                        "cluster store: identity reference points at a master key with other labels"
                    );
                }
            }
        }
        let id = self.pick_free(lk, attempt)?;
        match self.create(id, lk).await? {
            None => Ok(Some(id)),
            Some(kv) => {
                // Lost the race for `id`: learn its owner so the next pick avoids it.
                if let Ok(key) = keys::key_str(kv.key())
                    && let Ok(l) = IdentityLabels::decode(key, kv.value())
                    && let Ok(mut c) = self.cache.write()
                {
                    c.insert(id, l.0);
                }
                Ok(None)
            }
        }
    }

    /// Re-writes every own reference (and missing master keys); retries failed releases.
    async fn resync_all(&self) -> Result<usize, StoreError> {
        let inner = self.store.inner();
        let pending: Vec<String> = self
            .pending_release
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        for key in pending {
            inner.delete(&key).await?;
            if let Ok(mut p) = self.pending_release.lock() {
                p.remove(&key);
            }
        }
        let labels: Vec<Labels> = self
            .local
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut written = 0;
        for l in labels {
            let gate = self.gate(&l);
            let _held = gate.lock().await;
            let Some(r) = self.local.lock().ok().and_then(|m| m.get(&l).cloned()) else {
                continue;
            };
            match self.reference(r.id, &r.key).await? {
                Reference::Written => {}
                Reference::MasterMissing => {
                    tracing::warn!(
                        id = r.id.get(),
                        "cluster store: re-creating missing identity master key"
                    );
                    self.create(r.id, &r.key).await?;
                }
                Reference::OtherLabels(stored) => {
                    tracing::error!(
                        id = r.id.get(),
                        stored = %stored,
                        wanted = r.key.as_str(),
                        "cluster store: identity in use here is stored with other labels"
                    );
                }
            }
            written += 1;
        }
        Metrics::add(&inner.metrics.republished, written);
        Ok(written)
    }

    async fn resync_loop(self: Arc<Self>) {
        let mut session = self.store.subscribe_session();
        let mut seen = session.borrow().generation;
        let mut tick = tokio::time::interval(self.store.config().sync_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                r = session.changed() => {
                    if r.is_err() { return; }
                    let s = *session.borrow();
                    if s.generation == seen || s.lease.is_none() { continue; }
                    seen = s.generation;
                }
                _ = tick.tick() => {}
            }
            if let Err(e) = self.resync_all().await {
                tracing::warn!(error = %e, "cluster store: identity resync failed");
            }
        }
    }
}
