//! List + watch of one prefix into a typed local map, with an event stream.
//!
//! The watcher lists the prefix at revision R and watches from R+1. A dropped watch (etcd
//! restarted, connection lost) is re-opened from the revision after the last event seen,
//! so nothing is missed and nothing is replayed; if etcd has compacted that revision away,
//! the watcher lists again and diffs the new list against its map, reporting what vanished
//! meanwhile as deletes ("stale entries drained"). Values that do not parse are counted
//! (`bad_values`) and skipped; the entry keeps its last good value, so a corrupt write
//! never loosens what a node enforces.
//!
//! Events go out on a bounded broadcast channel ([`EVENT_CHANNEL_CAPACITY`]); a consumer
//! that lags gets `RecvError::Lagged` and must re-read [`SyncedMap::snapshot`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::KeyValue;
use tokio::sync::{broadcast, watch};

use crate::keys::{self, StoreValue};
use crate::store::{Backoff, Inner, Metrics, Store};

/// Capacity of each event channel, events. A full channel makes slow consumers lag (they
/// resync from the snapshot) instead of blocking the watcher.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// A decoded entry with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<V> {
    /// The value.
    pub value: V,
    /// Revision that created the key (etcd's create_revision): the age of a claim.
    pub create_revision: i64,
    /// Revision of the last write.
    pub mod_revision: i64,
    /// Lease the key is attached to (0: none).
    pub lease: i64,
}

/// A change of a watched map. Keys are full store keys.
#[derive(Debug, Clone)]
pub enum MapEvent<V> {
    /// Created or changed.
    Upsert {
        /// The key.
        key: String,
        /// The new entry.
        entry: Stored<V>,
        /// The previous value, if any.
        prev: Option<V>,
    },
    /// Deleted (by a writer, a lease expiry, or found missing on a re-list).
    Delete {
        /// The key.
        key: String,
        /// The last value.
        prev: V,
    },
    /// A value that does not parse was written (the previous value, if any, is kept).
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        error: String,
    },
}

pub(crate) type Hook<V> = Arc<dyn Fn(&MapEvent<V>) + Send + Sync>;

struct Shared<V> {
    prefix: String,
    entries: RwLock<BTreeMap<String, Stored<V>>>,
    events: broadcast::Sender<MapEvent<V>>,
    synced: watch::Sender<bool>,
    hook: Option<Hook<V>>,
}

/// A prefix of the store mirrored locally.
pub struct SyncedMap<V: StoreValue> {
    shared: Arc<Shared<V>>,
}

impl<V: StoreValue> Clone for SyncedMap<V> {
    fn clone(&self) -> Self {
        SyncedMap {
            shared: self.shared.clone(),
        }
    }
}

impl<V: StoreValue + std::fmt::Debug> SyncedMap<V> {
    /// Starts mirroring `prefix`; `hook` sees every event first (in the watcher task).
    pub(crate) fn start(store: &Store, prefix: String, hook: Option<Hook<V>>) -> SyncedMap<V> {
        let shared = Arc::new(Shared {
            prefix,
            entries: RwLock::new(BTreeMap::new()),
            events: broadcast::Sender::new(EVENT_CHANNEL_CAPACITY),
            synced: watch::Sender::new(false),
            hook,
        });
        let s = shared.clone();
        let inner = store.inner().clone();
        store.spawn(async move { run(inner, s).await });
        SyncedMap { shared }
    }

    /// Every entry, by key.
    pub fn snapshot(&self) -> BTreeMap<String, Stored<V>> {
        self.shared
            .entries
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// One entry.
    pub fn get(&self, key: &str) -> Option<Stored<V>> {
        self.shared.entries.read().ok()?.get(key).cloned()
    }

    /// Runs `f` over the entries without copying them.
    pub fn with_entries<T>(&self, f: impl FnOnce(&BTreeMap<String, Stored<V>>) -> T) -> Option<T> {
        self.shared.entries.read().ok().map(|m| f(&m))
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<MapEvent<V>> {
        self.shared.events.subscribe()
    }

    /// Waits until the first list is in (true) or `timeout` passes (false).
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl<V: StoreValue> Shared<V> {
    fn emit(&self, ev: MapEvent<V>) {
        if let Some(h) = &self.hook {
            h(&ev);
        }
        // No receivers is fine.
        let _ = self.events.send(ev);
    }

    fn apply_put(&self, metrics: &Metrics, kv: &KeyValue) {
        let key = match keys::key_str(kv.key()) {
            Ok(k) => k.to_owned(),
            Err(e) => {
                metrics.bad_value(&e);
                return;
            }
        };
        match V::decode(&key, kv.value()) {
            Ok(value) => {
                let entry = Stored {
                    value,
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                };
                let prev = match self.entries.write() {
                    Ok(mut m) => {
                        if m.get(&key)
                            .is_some_and(|e| e.mod_revision == entry.mod_revision)
                        {
                            return; // unchanged (re-list)
                        }
                        m.insert(key.clone(), entry.clone()).map(|e| e.value)
                    }
                    Err(_) => return,
                };
                self.emit(MapEvent::Upsert { key, entry, prev });
            }
            Err(e) => {
                metrics.bad_value(&e);
                self.emit(MapEvent::Invalid {
                    key,
                    error: e.to_string(),
                });
            }
        }
    }

    fn apply_delete(&self, key: &[u8]) {
        let Ok(key) = keys::key_str(key) else { return };
        let prev = match self.entries.write() {
            Ok(mut m) => m.remove(key),
            Err(_) => return,
        };
        if let Some(prev) = prev {
            self.emit(MapEvent::Delete {
                key: key.to_owned(),
                prev: prev.value,
            });
        }
    }

    /// Replaces the map by a fresh list: deletes for keys gone, upserts for changed ones.
    fn apply_list(&self, metrics: &Metrics, kvs: &[KeyValue]) {
        let listed: BTreeSet<&[u8]> = kvs.iter().map(|kv| kv.key()).collect();
        let gone: Vec<String> = self
            .entries
            .read()
            .map(|m| {
                m.keys()
                    .filter(|k| !listed.contains(k.as_bytes()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for k in gone {
            self.apply_delete(k.as_bytes());
        }
        for kv in kvs {
            self.apply_put(metrics, kv);
        }
    }
}

/// Decodes an error-free tombstone check: etcd's delete events carry a key-value with
/// version 0 (a put always has version ≥ 1). Reading the version avoids
/// `Event::event_type`, which panics on an event type it does not know.
fn is_delete(kv: &KeyValue) -> bool {
    kv.version() == 0
}

async fn run<V: StoreValue>(inner: Arc<Inner>, shared: Arc<Shared<V>>) {
    let mut backoff = Backoff::new();
    // Revision of the last list or event applied; 0 = list needed.
    let mut rev: i64 = 0;
    loop {
        if rev == 0 {
            match inner.get_prefix(&shared.prefix, false).await {
                Ok((kvs, at)) => {
                    Metrics::inc(&inner.metrics.relists);
                    shared.apply_list(&inner.metrics, &kvs);
                    rev = at.max(1);
                    shared.synced.send_replace(true);
                }
                Err(_) => {
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            }
        }
        let mut stream = match inner.watch(&shared.prefix, rev + 1).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff.reset();
                    if resp.compact_revision() > 0 || resp.canceled() {
                        tracing::info!(
                            prefix = %shared.prefix,
                            compacted = resp.compact_revision(),
                            reason = resp.cancel_reason(),
                            "cluster store: watch canceled, listing again"
                        );
                        rev = 0;
                        break;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if is_delete(kv) {
                            shared.apply_delete(kv.key());
                        } else {
                            shared.apply_put(&inner.metrics, kv);
                        }
                        rev = rev.max(kv.mod_revision());
                    }
                }
                Ok(None) => break,
                Err(source) => {
                    inner.note_stream_error("watch", &shared.prefix, source);
                    break;
                }
            }
        }
        Metrics::inc(&inner.metrics.watch_restarts);
        tokio::time::sleep(backoff.next()).await;
    }
}
