//! Userspace side of membrane's kernel datapath.
//!
//! Owns: loading the eBPF object built by `build.rs` ([`object`]), pinning its maps under a
//! per-run bpffs path ([`bpffs`]), attaching the tc programs to endpoint interfaces inside a
//! node network namespace and detaching them ([`loader`]), typed handles over every map
//! ([`maps`]), service load balancing: the service maps and the cgroup socket programs
//! ([`services`]), and the endpoint plumbing (network namespaces, veth pairs, addresses, routes:
//! [`netns`], [`plumbing`]).
//!
//! Must not depend on `membrane-l7proxy` (the two meet in `membrane-agent`), on the policy
//! model (it takes plain datapath entries), or on async runtimes: every call here is a
//! short blocking syscall or a short-lived `ip` command.

pub mod bpffs;
pub mod error;
pub mod events;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod object;
pub mod plumbing;
pub mod routing;
pub mod services;

pub use error::DatapathError;
pub use events::{EventKind, EventReader, EventVerdict, FlowEventView};
pub use loader::{Datapath, MapSizes, ProgramStats, RunTimeStats, enable_run_time_stats};
pub use maps::{
    CtEntryView, CtMap, EndpointEntry, EndpointsMap, IpcacheInfo, IpcacheMap, Ipv4Prefix,
    MetricsMap, PolicyMap, PolicyRule, PolicyVerdict, PortMatch,
};
pub use membrane_common::{Direction, reason};
pub use netns::Netns;
pub use services::{
    ApplyStats, BackendState, ServiceBackend, ServiceEntry, ServiceFrontend, ServiceKind,
    ServiceMaps, ServiceScope, SocketLbCounters, cgroup2_mount, netns_cookie,
};
