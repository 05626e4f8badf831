//! membrane's cluster store: the state nodes share through etcd v3, with Cilium's kvstore
//! layout and protocols (`shared/reference/cluster.md` §1, §3).
//!
//! **Owns** the etcd client and its sessions (leases, keep-alives, reconnect and resync),
//! the key layout and value formats ([`keys`]), cluster-wide identity allocation
//! ([`identity`]) and its garbage collection by the leader-elected operator role
//! ([`operator`]), the cluster ipcache ([`ipcache`]), node registration ([`nodes`]),
//! cluster-pool IPAM ([`ipam`]), policy documents ([`policies`]) and store health
//! ([`StoreStatus`]).
//!
//! **Must not depend on** aya, wasmtime, kube, the agent or the lab: the agent feeds what
//! this crate reports into its model and maps; this crate never touches the datapath. It
//! uses `membrane-policy` only for labels and identities. All I/O is async (tokio); no
//! request is unbounded (timeouts in [`StoreConfig`]), no retry loop is endless except the
//! background keepers, which back off up to [`store::RETRY_MAX_MS`].
//!
//! # API (what the agent calls)
//!
//! - [`Store::connect`]`(`[`StoreConfig`]`)` → [`Store`]; [`Store::status`] →
//!   [`StoreStatus`] { connected, last_error, revision, lease, session_generation, metrics };
//!   [`Store::close`] (revokes the leases) / [`Store::halt`].
//! - [`IdentityAllocator::start`]`(&store, `[`IdentityRange`]`)`: `allocate(&Labels)`,
//!   `release(&Labels)`, `lookup`, `labels_of`, `identities`, `subscribe` →
//!   [`IdentityEvent`], `wait_synced`.
//! - [`Operator::start`]`(&store, `[`OperatorConfig`]`, range)`: election + two-phase GC
//!   ([`Operator::campaign`], [`Operator::gc_round`] → [`GcReport`]).
//! - [`IpcacheSync::start`]`(&store)`: `publish(`[`IpcacheEntry`]`)`, `withdraw(ip)`,
//!   `snapshot`, `subscribe` → [`IpcacheEvent`], `conflicts` → [`IpConflict`].
//! - [`NodeRegistry::start`]`(&store)`: `register(underlay, pod_cidr, hubble)`,
//!   `deregister`, `nodes`, `subscribe` → [`NodeEvent`].
//! - [`PodCidrAllocator::new`]`(&store, `[`ClusterPoolConfig`]`)`: `allocate(node)`,
//!   `release(node)`, `claims`; [`EndpointAddressAllocator`] for addresses in the block.
//! - [`PolicyStore::new`]`(&store)`: `put`, `delete`, `get`, `list`, `watch`.
//!
//! Every watched prefix is a [`SyncedMap`]: list, then watch from the list's revision;
//! a dropped watch resumes from the last revision seen; a compacted one lists again and
//! reports what vanished as deletes. Values that do not parse are counted in
//! [`MetricsSnapshot::bad_values`] with an error naming the key, and skipped.

pub mod config;
pub mod error;
pub mod identity;
pub mod ipam;
pub mod ipcache;
pub mod keys;
pub mod nodes;
pub mod operator;
pub mod policies;
pub mod store;
pub mod watch;

pub use config::{StoreConfig, TlsFiles};
pub use error::{AllocError, ConfigError, DecodeError, IpamError, IpcacheError, StoreError};
pub use identity::{IdentityAllocator, IdentityEvent, IdentityRange};
pub use ipam::{ClusterPoolConfig, EndpointAddressAllocator, Ipv4Cidr, PodCidrAllocator};
pub use ipcache::{IpConflict, IpcacheEvent, IpcacheSync};
pub use keys::{IpcacheEntry, NodeInfo, PolicyDocument, PolicyFormat, PolicyName};
pub use nodes::{NodeEvent, NodeRegistry};
pub use operator::{GcReport, Operator, OperatorConfig};
pub use policies::{PolicyStore, PolicyStoreError};
pub use store::{ErrorRecord, MetricsSnapshot, Session, Store, StoreStatus};
pub use watch::{MapEvent, Stored, SyncedMap};
