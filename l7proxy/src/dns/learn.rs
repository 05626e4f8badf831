//! FQDN learning: telling the datapath about a DNS answer's addresses *before* the client
//! sees the answer (cilium-semantics.md §3.5 "Response processing", §6.3).
//!
//! Owns the [`FqdnObserver`] trait (what the agent implements: map the IPs to `fqdn:`
//! identities in the ipcache and policy maps, return when that is visible), the per-name
//! serialization, and the deadline:
//! - An allowed NOERROR answer with addresses becomes an [`FqdnLearning`]: the question
//!   name, the A/AAAA addresses of the name and its CNAME chain, each with the chain's
//!   minimum TTL raised to the configured minimum, at most `max_ips_per_name` of them.
//! - The observer runs in its own task under the name's lock, so two answers for one name
//!   never run the observer concurrently (Cilium's G1/G2 race: a second answer must not be
//!   released while the first one's update is still in flight).
//! - The answer waits for the observer until the deadline (default 100 ms, Cilium's
//!   `tofqdns-proxy-response-max-delay`). On overrun it is released anyway (holding it
//!   longer makes clients retry, cilium#9185), the overrun is counted and logged, and the
//!   observer keeps running (it is not cancelled half-way) for up to `abandon_after`.
//!
//! The name locks live in a map that forgets a name as soon as nobody holds or waits for
//! it, so memory follows the names in flight, not every name ever seen; unrelated names
//! never contend (unlike Cilium's 131 striped mutexes, cilium#25877).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

/// One learned address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LearnedIp {
    pub ip: IpAddr,
    /// Seconds the address may be used for the name (after the minimum TTL was applied).
    pub ttl: u32,
}

/// What one DNS answer taught: `name` resolves to `ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnLearning {
    /// The question name, lower-cased, fully qualified (`www.example.com.`).
    pub name: String,
    /// Addresses of the name and its CNAME chain, in answer order, no duplicates.
    pub ips: Vec<LearnedIp>,
    /// CNAME targets on the chain (informational: the IPs are learned for `name`).
    pub cnames: Vec<String>,
    /// The client's endpoint, when known.
    pub endpoint: Option<u64>,
}

/// An observer's failure; the answer is released anyway and the failure counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FqdnObserverError {
    message: String,
}

impl FqdnObserverError {
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
        }
    }
}

/// Told about every learning before the answer is released.
///
/// Implement it with `async fn learned(&self, learning: &FqdnLearning) -> Result<(),
/// FqdnObserverError>`. Return only once the datapath update is visible (the ipcache and
/// policy-map entries are written): the proxy releases the answer right after. Calls for
/// one name never overlap; calls for different names do.
pub trait FqdnObserver: Send + Sync + 'static {
    fn learned(
        &self,
        learning: &FqdnLearning,
    ) -> impl Future<Output = Result<(), FqdnObserverError>> + Send;
}

impl<T: FqdnObserver> FqdnObserver for Arc<T> {
    fn learned(
        &self,
        learning: &FqdnLearning,
    ) -> impl Future<Output = Result<(), FqdnObserverError>> + Send {
        (**self).learned(learning)
    }
}

/// Both observers, in order; the first failure stops the chain (the second never sees a
/// learning the first could not apply).
impl<A: FqdnObserver, B: FqdnObserver> FqdnObserver for (A, B) {
    async fn learned(&self, learning: &FqdnLearning) -> Result<(), FqdnObserverError> {
        self.0.learned(learning).await?;
        self.1.learned(learning).await
    }
}

type BoxedLearn<'a> = Pin<Box<dyn Future<Output = Result<(), FqdnObserverError>> + Send + 'a>>;

/// Object-safe form of [`FqdnObserver`], so the proxy is not generic over it.
pub(crate) trait DynFqdnObserver: Send + Sync + 'static {
    fn learned_boxed<'a>(&'a self, learning: &'a FqdnLearning) -> BoxedLearn<'a>;
}

impl<T: FqdnObserver> DynFqdnObserver for T {
    fn learned_boxed<'a>(&'a self, learning: &'a FqdnLearning) -> BoxedLearn<'a> {
        Box::pin(self.learned(learning))
    }
}

/// Learning settings (Cilium flag names in parentheses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FqdnLearningConfig {
    /// Lower bound applied to learned TTLs, seconds (`tofqdns-min-ttl`). Default 0.
    pub min_ttl: u32,
    /// At most this many addresses per answer are learned; the rest are dropped in answer
    /// order (`tofqdns-endpoint-max-ip-per-hostname`). Default 1000.
    pub max_ips_per_name: usize,
    /// How long an answer waits for the observer (`tofqdns-proxy-response-max-delay`).
    /// Default 100 ms.
    pub deadline: Duration,
    /// After this, an observer call (including its wait for the name's lock) is cancelled
    /// and counted as failed, so a stuck observer cannot pile up tasks. Default 10 s.
    pub abandon_after: Duration,
}

impl Default for FqdnLearningConfig {
    fn default() -> Self {
        Self {
            min_ttl: 0,
            max_ips_per_name: 1000,
            deadline: Duration::from_millis(100),
            abandon_after: Duration::from_secs(10),
        }
    }
}

/// Counters of the learning path.
#[derive(Debug, Default)]
pub(crate) struct LearnCounters {
    pub(crate) calls: AtomicU64,
    pub(crate) overruns: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) capped_ips: AtomicU64,
}

/// How a learning ended, from the answer's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LearnOutcome {
    /// The observer returned Ok before the deadline.
    Done,
    /// The observer failed (or panicked); the answer is released.
    Failed(String),
    /// The deadline passed first; the observer is still running.
    Overrun,
}

/// Applies the TTL floor and the per-name cap.
pub(crate) fn build_learning(
    config: &FqdnLearningConfig,
    counters: &LearnCounters,
    name: &str,
    ips: &[IpAddr],
    ttl: u32,
    cnames: Vec<String>,
    endpoint: Option<u64>,
) -> FqdnLearning {
    let ttl = ttl.max(config.min_ttl);
    if ips.len() > config.max_ips_per_name {
        counters.capped_ips.fetch_add(
            (ips.len() - config.max_ips_per_name) as u64,
            Ordering::Relaxed,
        );
    }
    FqdnLearning {
        name: name.to_owned(),
        ips: ips
            .iter()
            .take(config.max_ips_per_name)
            .map(|&ip| LearnedIp { ip, ttl })
            .collect(),
        cnames,
        endpoint,
    }
}

/// Runs observers under per-name locks with the answer's deadline.
pub(crate) struct Learner {
    observer: Arc<dyn DynFqdnObserver>,
    locks: Arc<NameLocks>,
    config: FqdnLearningConfig,
    counters: Arc<LearnCounters>,
}

impl Learner {
    pub(crate) fn new(
        observer: Arc<dyn DynFqdnObserver>,
        config: FqdnLearningConfig,
        counters: Arc<LearnCounters>,
    ) -> Self {
        Self {
            observer,
            locks: Arc::new(NameLocks::default()),
            config,
            counters,
        }
    }

    pub(crate) fn config(&self) -> &FqdnLearningConfig {
        &self.config
    }

    /// Names with a lock held or awaited right now.
    pub(crate) fn names_in_flight(&self) -> usize {
        self.locks.len()
    }

    /// Hands `learning` to the observer and waits for it until the deadline.
    pub(crate) async fn learn(&self, learning: FqdnLearning) -> LearnOutcome {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let name = learning.name.clone();
        let observer = self.observer.clone();
        let locks = self.locks.clone();
        let counters = self.counters.clone();
        let abandon_after = self.config.abandon_after;
        // A task of its own: when the deadline passes the answer goes out, but the update
        // must still finish (and keep the name locked until it does).
        let mut task = tokio::spawn(async move {
            let work = async {
                let _guard = locks.lock(&learning.name).await;
                observer.learned_boxed(&learning).await
            };
            match tokio::time::timeout(abandon_after, work).await {
                Ok(result) => result,
                Err(_) => {
                    counters.abandoned.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(name = %learning.name, ?abandon_after, "FQDN observer abandoned");
                    Err(FqdnObserverError::new(format!(
                        "abandoned after {abandon_after:?}"
                    )))
                }
            }
        });
        match tokio::time::timeout(self.config.deadline, &mut task).await {
            Ok(Ok(Ok(()))) => LearnOutcome::Done,
            Ok(Ok(Err(error))) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%name, %error, "FQDN observer failed; releasing the answer");
                LearnOutcome::Failed(error.to_string())
            }
            Ok(Err(join)) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%name, error = %join, "FQDN observer panicked; releasing the answer");
                LearnOutcome::Failed(format!("observer task failed: {join}"))
            }
            Err(_) => {
                self.counters.overruns.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    %name,
                    deadline = ?self.config.deadline,
                    "timed out waiting for the datapath update of FQDN IPs; releasing the answer"
                );
                LearnOutcome::Overrun
            }
        }
    }
}

/// One async mutex per name, created on demand and forgotten when unused.
#[derive(Debug, Default)]
pub(crate) struct NameLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl NameLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        // The map is consistent after any panic (single insert/remove operations).
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for and takes the lock of `name`.
    pub(crate) async fn lock(self: &Arc<Self>, name: &str) -> NameGuard {
        let mutex = self.map().entry(name.to_owned()).or_default().clone();
        // The guard exists before the wait so that a cancelled wait also runs the cleanup.
        let mut guard = NameGuard {
            locks: self.clone(),
            name: name.to_owned(),
            mutex,
            held: None,
        };
        let held = guard.mutex.clone().lock_owned().await;
        guard.held = Some(held);
        guard
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

/// Holds (or waits for) a name's lock; removes the name's entry when the last user leaves.
pub(crate) struct NameGuard {
    locks: Arc<NameLocks>,
    name: String,
    mutex: Arc<tokio::sync::Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        let mut map = self.locks.map();
        // Release first: the owned guard holds a reference to the mutex too.
        drop(self.held.take());
        // References now: the map's and ours. Anyone else holding or waiting cloned the
        // Arc under the map lock, which we hold, so the count cannot grow under us.
        if Arc::strong_count(&self.mutex) == 2
            && map
                .get(&self.name)
                .is_some_and(|m| Arc::ptr_eq(m, &self.mutex))
        {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[tokio::test]
    async fn name_locks_serialize_and_clean_up() {
        let locks = Arc::new(NameLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("same.example.").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0, "unused names are forgotten");
        // Different names do not wait for each other.
        let a = locks.lock("a.example.").await;
        let b = tokio::time::timeout(Duration::from_secs(5), locks.lock("b.example."))
            .await
            .expect("another name is free");
        assert_eq!(locks.len(), 2);
        drop((a, b));
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn cancelled_wait_leaves_no_entry_behind() {
        let locks = Arc::new(NameLocks::default());
        let held = locks.lock("x.").await;
        let waiting = tokio::time::timeout(Duration::from_millis(5), locks.lock("x.")).await;
        assert!(waiting.is_err(), "the name is held");
        drop(held);
        assert_eq!(locks.len(), 0);
    }

    #[test]
    fn learning_applies_min_ttl_and_cap() {
        let config = FqdnLearningConfig {
            min_ttl: 60,
            max_ips_per_name: 2,
            ..FqdnLearningConfig::default()
        };
        let counters = LearnCounters::default();
        let ips: Vec<IpAddr> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let learning = build_learning(&config, &counters, "a.example.", &ips, 5, Vec::new(), None);
        assert_eq!(learning.ips.len(), 2);
        assert!(learning.ips.iter().all(|l| l.ttl == 60));
        assert_eq!(counters.capped_ips.load(Ordering::Relaxed), 1);
        let learning = build_learning(
            &config,
            &counters,
            "a.example.",
            &ips[..1],
            300,
            Vec::new(),
            None,
        );
        assert_eq!(learning.ips[0].ttl, 300);
    }
}
