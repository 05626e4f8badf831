//! The etcd client: connection (TLS with client certificates), the node's session lease and
//! lock lease with their keep-alives, bounded requests with errors naming endpoint and key,
//! and store health ([`StoreStatus`]).
//!
//! Sessions: every leased key of this node lives under one session lease. The keeper renews
//! it every TTL/3; when etcd says the lease is gone (this node was cut off longer than the
//! TTL) it grants a new one. Each new lease, and each reconnect after a failure, bumps the
//! session generation ([`Session::generation`]); the components that own keys (identity
//! references, ipcache entries, the node registration, the operator leadership) watch it
//! and re-publish their keys, which is the "resync" after an outage.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, GetOptions, Identity as TlsIdentity,
    KeyValue, LockOptions, PutOptions, TlsOptions, Txn, TxnResponse,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::StoreConfig;
use crate::error::{DecodeError, StoreError};
use crate::keys;

/// HTTP/2 keep-alive ping interval on the etcd connection (Cilium: 15 s). etcd's
/// `--grpc-keepalive-min-time` (5 s) must stay below it or etcd closes the connection.
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// How long a keep-alive ping may go unanswered before the connection is dropped.
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest wait between attempts of a background loop (lease keeper, watcher), ms.
pub const RETRY_MIN_MS: u64 = 100;
/// Longest wait between attempts of a background loop, ms. Short, so a node resyncs within
/// about this long after etcd is back.
pub const RETRY_MAX_MS: u64 = 2_000;
/// Shortest lease renewal interval, ms (renewals happen every TTL/3 above this).
pub const MIN_RENEW_INTERVAL_MS: u64 = 500;

/// The node's session: its lease (none while it has to be re-granted) and the generation,
/// bumped on every new lease and every reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Session {
    /// The session lease, if held.
    pub lease: Option<i64>,
    /// Bumped on each new lease and each reconnect.
    pub generation: u64,
}

/// Health of the store connection, for `membrane status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// The endpoints.
    pub endpoints: Vec<String>,
    /// True while the last request (or probe) succeeded.
    pub connected: bool,
    /// The last error and when, milliseconds since the Unix epoch.
    pub last_error: Option<ErrorRecord>,
    /// When a request last succeeded, milliseconds since the Unix epoch.
    pub last_ok_unix_ms: Option<u64>,
    /// Highest store revision seen.
    pub revision: i64,
    /// The session lease, if held.
    pub lease: Option<i64>,
    /// Session generation (new lease or reconnect).
    pub session_generation: u64,
    /// Counters.
    pub metrics: MetricsSnapshot,
}

/// An error and its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorRecord {
    /// The message (names endpoint and key).
    pub message: String,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// Counters of the store client (exported by the agent as `membrane_kvstore_*`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSnapshot {
    /// Stored values (or keys) that did not parse.
    pub bad_values: u64,
    /// The last of them.
    pub last_bad_value: Option<String>,
    /// IPs claimed by two nodes.
    pub ip_conflicts: u64,
    /// Identity allocation attempts repeated after losing a race.
    pub identity_alloc_retries: u64,
    /// Watches re-established after a failure.
    pub watch_restarts: u64,
    /// Full re-lists (initial, or after the watch's revision was compacted).
    pub relists: u64,
    /// Own keys written again (resync, deleted by someone, lease lost).
    pub republished: u64,
    /// Identities deleted by the garbage collector.
    pub identities_collected: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    bad_values: AtomicU64,
    last_bad_value: Mutex<Option<String>>,
    pub(crate) ip_conflicts: AtomicU64,
    pub(crate) identity_alloc_retries: AtomicU64,
    pub(crate) watch_restarts: AtomicU64,
    pub(crate) relists: AtomicU64,
    pub(crate) republished: AtomicU64,
    pub(crate) identities_collected: AtomicU64,
}

impl Metrics {
    pub(crate) fn bad_value(&self, e: &DecodeError) {
        tracing::warn!(error = %e, "cluster store: bad value skipped");
        self.bad_values.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_bad_value.lock() {
            *last = Some(e.to_string());
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            bad_values: get(&self.bad_values),
            last_bad_value: self.last_bad_value.lock().ok().and_then(|l| l.clone()),
            ip_conflicts: get(&self.ip_conflicts),
            identity_alloc_retries: get(&self.identity_alloc_retries),
            watch_restarts: get(&self.watch_restarts),
            relists: get(&self.relists),
            republished: get(&self.republished),
            identities_collected: get(&self.identities_collected),
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    connected: bool,
    last_error: Option<ErrorRecord>,
    last_ok_unix_ms: Option<u64>,
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Exponential backoff between [`RETRY_MIN_MS`] and [`RETRY_MAX_MS`].
#[derive(Debug)]
pub(crate) struct Backoff(u64);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(RETRY_MIN_MS)
    }
    pub(crate) fn reset(&mut self) {
        self.0 = RETRY_MIN_MS;
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX_MS);
        Duration::from_millis(d)
    }
}

/// Shared state of a store client.
pub(crate) struct Inner {
    client: Client,
    pub(crate) config: StoreConfig,
    endpoints_text: String,
    health: Mutex<Health>,
    revision: AtomicI64,
    session: watch::Sender<Session>,
    lock_lease: watch::Sender<Option<i64>>,
    pub(crate) metrics: Metrics,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A connection to the cluster store. Cheap to clone; [`Store::close`] stops its background
/// tasks and revokes its leases.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Connects: builds the client (TLS from files), grants the session and lock leases
    /// within the dial timeout, and starts the keep-alives and the status probe.
    pub async fn connect(config: StoreConfig) -> Result<Store, StoreError> {
        config.validate()?;
        let endpoints_text = config.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout())
            .with_keep_alive(GRPC_KEEPALIVE_INTERVAL, GRPC_KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| StoreError::TlsFile {
                    path: p.to_owned(),
                    source,
                })
            };
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(TlsIdentity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            opts = opts.with_tls(t);
        }
        let connect_err = |source| StoreError::Connect {
            endpoints: endpoints_text.clone(),
            source,
        };
        let timeout_err = || StoreError::ConnectTimeout {
            endpoints: endpoints_text.clone(),
            timeout_ms: config.dial_timeout_ms,
        };
        let mut client = tokio::time::timeout(
            config.dial_timeout(),
            Client::connect(config.endpoints.clone(), Some(opts)),
        )
        .await
        .map_err(|_| timeout_err())?
        .map_err(connect_err)?;
        // First contact: the session lease. Bounded by the dial timeout as a whole.
        let grant = async {
            let s = client.lease_grant(config.lease_ttl_secs, None).await?;
            let l = client.lease_grant(config.lock_ttl_secs, None).await?;
            Ok::<_, etcd_client::Error>((s.id(), l.id(), s.header().map(|h| h.revision())))
        };
        let (session_lease, lock_lease, rev) = tokio::time::timeout(config.dial_timeout(), grant)
            .await
            .map_err(|_| timeout_err())?
            .map_err(connect_err)?;

        let inner = Arc::new(Inner {
            client,
            endpoints_text,
            health: Mutex::new(Health {
                connected: true,
                last_error: None,
                last_ok_unix_ms: Some(now_unix_ms()),
            }),
            revision: AtomicI64::new(rev.unwrap_or(0)),
            session: watch::Sender::new(Session {
                lease: Some(session_lease),
                generation: 1,
            }),
            lock_lease: watch::Sender::new(Some(lock_lease)),
            metrics: Metrics::default(),
            shutdown: watch::Sender::new(false),
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let store = Store { inner };
        let i = store.inner.clone();
        store.spawn(async move { i.keep_lease(LeaseKind::Session, session_lease).await });
        let i = store.inner.clone();
        store.spawn(async move { i.keep_lease(LeaseKind::Lock, lock_lease).await });
        let i = store.inner.clone();
        store.spawn(async move { i.probe_status().await });
        Ok(store)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Runs `fut` until it ends or the store is closed.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.inner.shutdown.subscribe();
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                () = fut => {}
            }
        });
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(handle);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.inner.config.cluster
    }

    /// The current session.
    pub fn session(&self) -> Session {
        *self.inner.session.borrow()
    }

    /// Notified on every session change (new lease, reconnect).
    pub fn subscribe_session(&self) -> watch::Receiver<Session> {
        self.inner.session.subscribe()
    }

    /// Health and counters.
    pub fn status(&self) -> StoreStatus {
        let (connected, last_error, last_ok_unix_ms) = match self.inner.health.lock() {
            Ok(h) => (h.connected, h.last_error.clone(), h.last_ok_unix_ms),
            Err(_) => (false, None, None),
        };
        let session = self.session();
        StoreStatus {
            endpoints: self.inner.config.endpoints.clone(),
            connected,
            last_error,
            last_ok_unix_ms,
            revision: self.inner.revision.load(Ordering::Relaxed),
            lease: session.lease,
            session_generation: session.generation,
            metrics: self.inner.metrics.snapshot(),
        }
    }

    /// The underlying etcd client (tools, tests).
    pub fn etcd(&self) -> Client {
        self.inner.client.clone()
    }

    /// Stops the background tasks and revokes the leases: this node's leased keys
    /// (references, ipcache entries, registration, leadership) disappear at once.
    pub async fn close(&self) {
        self.halt();
        let mut c = self.inner.client.clone();
        let session = self.inner.session.borrow().lease;
        let lock = *self.inner.lock_lease.borrow();
        for lease in [session, lock].into_iter().flatten() {
            let _ =
                tokio::time::timeout(self.inner.config.request_timeout(), c.lease_revoke(lease))
                    .await;
        }
    }

    /// Stops the background tasks without revoking anything: the keys stay until the lease
    /// expires, as after a crash (tests use it to play a dead node).
    pub fn halt(&self) {
        self.inner.shutdown.send_replace(true);
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseKind {
    Session,
    Lock,
}

/// A held distributed lock; released with [`Inner::unlock`] (or by its lease's expiry).
pub(crate) struct LockGuard {
    key: Vec<u8>,
}

impl Inner {
    pub(crate) fn session(&self) -> Session {
        *self.session.borrow()
    }

    pub(crate) fn node(&self) -> &str {
        &self.config.node
    }

    fn note_revision(&self, rev: Option<i64>) {
        if let Some(r) = rev {
            self.revision.fetch_max(r, Ordering::Relaxed);
        }
    }

    /// A request succeeded: connected. The first success after a failure is a reconnect,
    /// which bumps the session generation so owners re-publish their keys.
    pub(crate) fn note_ok(&self) {
        let reconnected = match self.health.lock() {
            Ok(mut h) => {
                h.last_ok_unix_ms = Some(now_unix_ms());
                !std::mem::replace(&mut h.connected, true)
            }
            Err(_) => false,
        };
        if reconnected {
            tracing::info!(endpoints = %self.endpoints_text, "cluster store: reconnected");
            self.session.send_modify(|s| s.generation += 1);
        }
    }

    /// A request failed; `disconnect` when the failure says etcd is unreachable.
    pub(crate) fn note_error(&self, e: &StoreError, disconnect: bool) {
        if let Ok(mut h) = self.health.lock() {
            if disconnect && h.connected {
                tracing::warn!(error = %e, "cluster store: connection lost");
            }
            h.connected &= !disconnect;
            h.last_error = Some(ErrorRecord {
                message: e.to_string(),
                at_unix_ms: now_unix_ms(),
            });
        }
    }

    /// A stream (watch, keep-alive) failed.
    pub(crate) fn note_stream_error(
        &self,
        op: &'static str,
        key: &str,
        source: etcd_client::Error,
    ) {
        let disconnect = is_unavailable(&source);
        let e = StoreError::Request {
            op,
            key: key.to_owned(),
            endpoints: self.endpoints_text.clone(),
            source,
        };
        self.note_error(&e, disconnect);
    }

    /// Runs one request with the request timeout, mapping its error to name `op` and `key`
    /// and recording health.
    async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.call_within(op, key, self.config.request_timeout(), fut)
            .await
    }

    async fn call_within<T>(
        &self,
        op: &'static str,
        key: &str,
        bound: Duration,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(bound, fut).await {
            Ok(Ok(v)) => {
                self.note_ok();
                Ok(v)
            }
            Ok(Err(source)) => {
                let disconnect = is_unavailable(&source);
                let e = StoreError::Request {
                    op,
                    key: key.to_owned(),
                    endpoints: self.endpoints_text.clone(),
                    source,
                };
                self.note_error(&e, disconnect);
                Err(e)
            }
            Err(_) => {
                let e = StoreError::Timeout {
                    op,
                    key: key.to_owned(),
                    endpoints: self.endpoints_text.clone(),
                    timeout_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
                };
                // A lock wait that times out is contention, not an outage.
                self.note_error(&e, op != "lock");
                Err(e)
            }
        }
    }

    /// The session lease for a leased write of `key`.
    pub(crate) fn session_lease(&self, key: &str) -> Result<i64, StoreError> {
        self.session().lease.ok_or_else(|| StoreError::NoLease {
            key: key.to_owned(),
            endpoints: self.endpoints_text.clone(),
        })
    }

    /// One key.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client.clone();
        let mut resp = self.call("get", key, c.get(key, None)).await?;
        self.note_revision(resp.header().map(|h| h.revision()));
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix` and the revision of the read.
    pub(crate) async fn get_prefix(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut c = self.client.clone();
        let mut opts = GetOptions::new().with_prefix();
        if keys_only {
            opts = opts.with_keys_only();
        }
        let mut resp = self
            .call("get prefix", prefix, c.get(prefix, Some(opts)))
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        self.note_revision(Some(rev));
        Ok((resp.take_kvs(), rev))
    }

    /// Writes `key`, under the session lease if `leased`. Returns the revision.
    pub(crate) async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        leased: bool,
    ) -> Result<i64, StoreError> {
        let mut opts = PutOptions::new();
        if leased {
            opts = opts.with_lease(self.session_lease(key)?);
        }
        let mut c = self.client.clone();
        let resp = self.call("put", key, c.put(key, value, Some(opts))).await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        self.note_revision(Some(rev));
        Ok(rev)
    }

    /// Deletes `key`; true if it existed.
    pub(crate) async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .call("delete", key, c.delete(key, None::<DeleteOptions>))
            .await?;
        self.note_revision(resp.header().map(|h| h.revision()));
        Ok(resp.deleted() > 0)
    }

    /// Runs a transaction; `key` names it in errors.
    pub(crate) async fn txn(&self, key: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut c = self.client.clone();
        let resp = self.call("txn", key, c.txn(txn)).await?;
        self.note_revision(resp.header().map(|h| h.revision()));
        Ok(resp)
    }

    /// Opens a watch (the stream itself is read by the caller).
    pub(crate) async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<etcd_client::WatchStream, StoreError> {
        let mut c = self.client.clone();
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        self.call("watch", prefix, c.watch(prefix, Some(opts)))
            .await
    }

    /// Takes the distributed lock `name` (etcd's lock service, held under the lock lease so
    /// a dead holder frees it after [`StoreConfig::lock_ttl_secs`]). Waits at most the
    /// request timeout.
    pub(crate) async fn lock(&self, name: &str) -> Result<LockGuard, StoreError> {
        let lease = (*self.lock_lease.borrow()).ok_or_else(|| StoreError::NoLease {
            key: name.to_owned(),
            endpoints: self.endpoints_text.clone(),
        })?;
        let mut c = self.client.clone();
        let resp = self
            .call(
                "lock",
                name,
                c.lock(name, Some(LockOptions::new().with_lease(lease))),
            )
            .await?;
        Ok(LockGuard {
            key: resp.key().to_vec(),
        })
    }

    /// Releases a lock (best effort: on failure the lock lease frees it).
    pub(crate) async fn unlock(&self, guard: LockGuard) {
        let mut c = self.client.clone();
        let key = String::from_utf8_lossy(&guard.key).into_owned();
        let _ = self.call("unlock", &key, c.unlock(guard.key)).await;
    }

    /// Keeps a lease alive; re-grants it when etcd says it expired.
    async fn keep_lease(self: Arc<Self>, kind: LeaseKind, mut lease: i64) {
        let ttl = match kind {
            LeaseKind::Session => self.config.lease_ttl_secs,
            LeaseKind::Lock => self.config.lock_ttl_secs,
        };
        let renew = Duration::from_millis(
            (u64::try_from(ttl).unwrap_or(1) * 1000 / 3).max(MIN_RENEW_INTERVAL_MS),
        );
        let name = match kind {
            LeaseKind::Session => "session lease",
            LeaseKind::Lock => "lock lease",
        };
        let mut backoff = Backoff::new();
        loop {
            let mut c = self.client.clone();
            let expired = match self
                .call("lease keep-alive", name, c.lease_keep_alive(lease))
                .await
            {
                Ok((mut keeper, mut stream)) => {
                    backoff.reset();
                    loop {
                        tokio::time::sleep(renew).await;
                        let r = self
                            .call("lease keep-alive", name, async {
                                keeper.keep_alive().await?;
                                stream.message().await
                            })
                            .await;
                        match r {
                            Ok(Some(resp)) if resp.ttl() > 0 => continue,
                            Ok(Some(_)) => break true,
                            Ok(None) => break false,
                            Err(_) => break false,
                        }
                    }
                }
                Err(StoreError::Request { source, .. }) if is_lease_gone(&source) => true,
                Err(_) => false,
            };
            if !expired {
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
            tracing::warn!(
                lease,
                kind = name,
                "cluster store: lease expired, granting a new one"
            );
            match kind {
                LeaseKind::Session => self.session.send_modify(|s| s.lease = None),
                LeaseKind::Lock => {
                    self.lock_lease.send_replace(None);
                }
            }
            loop {
                let mut c = self.client.clone();
                match self
                    .call("lease grant", name, c.lease_grant(ttl, None))
                    .await
                {
                    Ok(resp) => {
                        lease = resp.id();
                        match kind {
                            LeaseKind::Session => self.session.send_modify(|s| {
                                s.lease = Some(lease);
                                s.generation += 1;
                            }),
                            LeaseKind::Lock => {
                                self.lock_lease.send_replace(Some(lease));
                            }
                        }
                        backoff.reset();
                        break;
                    }
                    Err(_) => tokio::time::sleep(backoff.next()).await,
                }
            }
        }
    }

    /// Probes the store every status interval with a quorum read.
    async fn probe_status(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.status_interval()).await;
            let _ = self.get(keys::HEARTBEAT_KEY).await;
        }
    }
}

/// True for errors that mean etcd is unreachable (as opposed to a refused request).
fn is_unavailable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    }
}

/// True when etcd says the lease does not exist (expired or revoked).
fn is_lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
        }
        _ => false,
    }
}
