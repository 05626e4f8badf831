//! The operator role: one node of the cluster, elected through the store, collects unused
//! identities (reference `cluster.md` §1.2 point 7).
//!
//! Election: the leader key `operator/v1/leader` is created only if absent, under the
//! candidate's session lease, so it is held while that node keeps its lease and taken over
//! by another candidate once it expires. A node that finds its own name under an older lease
//! of its own (it reconnected with a new lease) takes the key back.
//!
//! Garbage collection, two phases:
//! 1. a master key `id/<ID>` (in the cluster range) with no reference under
//!    `value/<labels>/` is marked, with its mod revision and the time;
//! 2. on a later round, at least the grace period after marking, it is deleted in a
//!    transaction that requires the same mod revision *and* still no reference under
//!    `value/<labels>/` (a range compare in the same transaction), so an allocation that
//!    re-used the identity meanwhile always wins. At most
//!    [`OperatorConfig::max_deletes_per_round`] deletes per round.
//!
//! Safety does not depend on there being one leader: the transaction guards every delete.
//! The leader only avoids doing the work twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use membrane_policy::Identity;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::identity::IdentityRange;
use crate::keys::{self, IdentityLabels, OperatorLeader, StoreValue};
use crate::store::{Metrics, Store};

/// Default interval between GC rounds, ms: Cilium's `identity-gc-interval` (15 min).
pub const DEFAULT_GC_INTERVAL_MS: u64 = 15 * 60 * 1000;
/// Default deletes per round (Cilium rate-limits GC deletes as well).
pub const DEFAULT_MAX_DELETES_PER_ROUND: usize = 250;

/// Operator-role settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperatorConfig {
    /// Interval between election attempts and GC rounds, milliseconds.
    pub gc_interval_ms: u64,
    /// Least time between marking an identity and deleting it, milliseconds. 0 = the next
    /// round.
    pub grace_ms: u64,
    /// At most this many deletes per round.
    pub max_deletes_per_round: usize,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            gc_interval_ms: DEFAULT_GC_INTERVAL_MS,
            grace_ms: 0,
            max_deletes_per_round: DEFAULT_MAX_DELETES_PER_ROUND,
        }
    }
}

/// What one GC round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    /// False if this node is not the leader (nothing was done).
    pub leader: bool,
    /// Master keys in range that are referenced.
    pub in_use: usize,
    /// Newly marked (phase 1).
    pub marked: Vec<Identity>,
    /// Deleted (phase 2).
    pub deleted: Vec<Identity>,
    /// Marked earlier, still waiting for the grace period or the rate limit.
    pub pending: Vec<Identity>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    mod_revision: i64,
    at: Instant,
}

struct Shared {
    store: Store,
    config: OperatorConfig,
    range: IdentityRange,
    leader: AtomicBool,
    marks: tokio::sync::Mutex<HashMap<Identity, Mark>>,
}

/// The operator role of one node (a candidate; it acts only while elected).
#[derive(Clone)]
pub struct Operator {
    shared: Arc<Shared>,
}

impl Operator {
    /// A candidate that campaigns and collects only when asked ([`Self::campaign`],
    /// [`Self::gc_round`]).
    pub fn new(store: &Store, config: OperatorConfig, range: IdentityRange) -> Operator {
        Operator {
            shared: Arc::new(Shared {
                store: store.clone(),
                config,
                range,
                leader: AtomicBool::new(false),
                marks: tokio::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A candidate that campaigns and, while leader, runs a GC round every interval.
    pub fn start(store: &Store, config: OperatorConfig, range: IdentityRange) -> Operator {
        let op = Operator::new(store, config, range);
        let o = op.clone();
        store.spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(o.shared.config.gc_interval_ms.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match o.campaign().await {
                    Ok(true) => {
                        if let Err(e) = o.gc_round().await {
                            tracing::warn!(error = %e, "cluster store: identity GC round failed");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "cluster store: operator election"),
                }
            }
        });
        op
    }

    /// True while this node believes it leads (as of its last campaign).
    pub fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::Relaxed)
    }

    /// Tries to become (or stay) the leader.
    pub async fn campaign(&self) -> Result<bool, StoreError> {
        let s = &self.shared;
        let inner = s.store.inner();
        let key = keys::OPERATOR_LEADER_KEY;
        let lease = inner.session_lease(key)?;
        let value = OperatorLeader {
            node: inner.node().to_owned(),
        }
        .encode();
        let put = || {
            TxnOp::put(
                key,
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(key, None)]);
        let resp = inner.txn(key, txn).await?;
        let mut leader = resp.succeeded();
        if !leader
            && let Some(kv) = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
        {
            match OperatorLeader::decode(key, kv.value()) {
                Ok(l) if l.node == inner.node() => {
                    leader = kv.lease() == lease || {
                        // Ours under an old lease: take it back under the current one.
                        let txn = Txn::new()
                            .when([Compare::mod_revision(
                                key,
                                CompareOp::Equal,
                                kv.mod_revision(),
                            )])
                            .and_then([put()]);
                        inner.txn(key, txn).await?.succeeded()
                    };
                }
                Ok(_) => {}
                Err(e) => inner.metrics.bad_value(&e),
            }
        }
        if !leader {
            s.marks.lock().await.clear();
        }
        s.leader.store(leader, Ordering::Relaxed);
        Ok(leader)
    }

    /// Gives up leadership (deletes the key if it is ours).
    pub async fn resign(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        let inner = s.store.inner();
        let key = keys::OPERATOR_LEADER_KEY;
        let value = OperatorLeader {
            node: inner.node().to_owned(),
        }
        .encode();
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        inner.txn(key, txn).await?;
        s.leader.store(false, Ordering::Relaxed);
        s.marks.lock().await.clear();
        Ok(())
    }

    /// One GC round (both phases), if this node leads.
    pub async fn gc_round(&self) -> Result<GcReport, StoreError> {
        let s = &self.shared;
        let mut report = GcReport {
            leader: self.is_leader(),
            ..GcReport::default()
        };
        if !report.leader {
            return Ok(report);
        }
        let inner = s.store.inner();
        let (masters, _) = inner.get_prefix(keys::IDENTITY_ID_PREFIX, false).await?;
        let (refs, _) = inner.get_prefix(keys::IDENTITY_VALUE_PREFIX, true).await?;
        let referenced: BTreeSet<String> = refs
            .iter()
            .filter_map(|kv| {
                let k = keys::key_str(kv.key()).ok()?;
                keys::parse_identity_value_key(k)
                    .ok()
                    .map(|(labels, _)| labels.to_owned())
            })
            .collect();
        let mut marks = s.marks.lock().await;
        let mut present = BTreeSet::new();
        let grace = Duration::from_millis(s.config.grace_ms);
        for kv in &masters {
            let Ok(key) = keys::key_str(kv.key()) else {
                continue;
            };
            let id = match keys::parse_identity_id_key(key) {
                Ok(id) if s.range.contains(id) => id,
                Ok(_) => continue,
                Err(e) => {
                    inner.metrics.bad_value(&e);
                    continue;
                }
            };
            // Never delete what cannot be read: a bad master key blocks its ID until a
            // person looks at it, and is counted.
            if let Err(e) = IdentityLabels::decode(key, kv.value()) {
                inner.metrics.bad_value(&e);
                continue;
            }
            present.insert(id);
            let labels_text = String::from_utf8_lossy(kv.value()).into_owned();
            if referenced.contains(&labels_text) {
                marks.remove(&id);
                report.in_use += 1;
                continue;
            }
            match marks.get(&id).copied() {
                Some(m) if m.mod_revision == kv.mod_revision() => {
                    if m.at.elapsed() < grace
                        || report.deleted.len() >= s.config.max_deletes_per_round
                    {
                        report.pending.push(id);
                        continue;
                    }
                    let value_prefix = format!("{}{labels_text}/", keys::IDENTITY_VALUE_PREFIX);
                    let txn = Txn::new()
                        .when([
                            Compare::mod_revision(key, CompareOp::Equal, m.mod_revision),
                            Compare::create_revision(value_prefix, CompareOp::Equal, 0)
                                .with_prefix(),
                        ])
                        .and_then([TxnOp::delete(key, None)]);
                    if inner.txn(key, txn).await?.succeeded() {
                        Metrics::inc(&inner.metrics.identities_collected);
                        report.deleted.push(id);
                    }
                    marks.remove(&id);
                }
                _ => {
                    marks.insert(
                        id,
                        Mark {
                            mod_revision: kv.mod_revision(),
                            at: Instant::now(),
                        },
                    );
                    report.marked.push(id);
                }
            }
        }
        marks.retain(|id, _| present.contains(id));
        Ok(report)
    }
}
