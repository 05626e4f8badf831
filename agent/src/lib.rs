//! `membrane-agent`, the node agent: owns the datapath of one node and keeps it in line with
//! the desired state — endpoints (registered over the local API), policies (a watched
//! directory of YAML, like Cilium's static policy path, plus the local API), identities
//! allocated from labels — reports flows (the Hubble API, metrics, the flow page) and
//! supervises the node proxy.
//!
//! One module per job: [`config`], [`api_server`] (the local API), [`endpoints`],
//! [`policies`] (the watched directory, the applied-policy store, the cluster store's
//! documents), [`reconcile`] (the desired state, computed purely, then applied to the maps),
//! [`proxy`] (supervision, the channel's snapshots, records), [`flows`], [`servers`],
//! [`fqdn`], [`cluster`] (the cluster store: identities, ipcache, nodes, policies on etcd),
//! [`routing`] (other nodes in the ipcache, routes to their pod CIDRs, the tunnel),
//! [`ipam`] (the node's pod addresses for the CNI plugin, the runtime's conflist);
//! [`daemon`] ties them together.
//!
//! Must not depend on wasmtime, the lab or the CLI (checked by `cargo xtask test`); talks to
//! the proxy only through `membrane-agent-api`.

pub mod api_server;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod datapath_sync;
pub mod endpoints;
pub mod error;
pub mod flows;
pub mod fqdn;
pub mod ipam;
pub mod peer;
pub mod policies;
pub mod proxy;
pub mod reconcile;
pub mod routing;
pub mod servers;

pub use config::AgentConfig;
pub use daemon::run;
pub use error::AgentError;
