//! membrane's agent library: the wiring between the datapath (`membrane-datapath`), the
//! policy model (`membrane-policy`) and the proxy (`membrane-l7proxy`), and everything the
//! `membrane` CLI does. Binaries in `src/bin` are thin: they parse arguments and call here.
//!
//! Today it owns the minimal lab ([`lab`]): a node network namespace with two pods, one
//! policy enforced by the tc programs, and real connections that show an allowed and a
//! dropped flow. The endpoint manager, policy repository and local API arrive with the
//! issues that build them.
//!
//! It may depend on every library crate of the workspace; none of them may depend on it.

pub mod agent_cmd;
pub mod api;
pub mod bpf_cmd;
pub mod connectivity;
pub mod daemon;
pub mod datapath_sync;
pub mod lab;
pub mod policy_cmd;
#[cfg(feature = "proxy")]
pub mod proxy_process;
#[cfg(feature = "proxy")]
pub mod wasm_filters;
